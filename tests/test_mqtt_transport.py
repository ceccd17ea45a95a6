"""The MQTT transport's receive path, without a broker: answers are handed on one at a time, so
a backlog of updates stays in the link's (memory-bounded) inbox instead of being reassembled at
once."""

import collections
import time

from cahfp.messages import Metrics, UpdateMessage
from cahfp.protocol import Topics, split_payload
from coordinator.mqtt_transport import MqttTransport
from edge_client.inbox import Incoming


class FakeLink:
    """Just enough of MqttLink: a queue of received messages."""

    def __init__(self):
        self.inbox = collections.deque()
        self.connects = 1
        self.published = []

    def subscribe(self, topic, qos=1):
        pass

    def get(self, timeout):
        return self.inbox.popleft() if self.inbox else None

    def publish(self, topic, payload, qos=1, retain=False):
        self.published.append((topic, payload))

    def stop(self):
        pass


def queue_update(link, topics, client, task_id, payload):
    transfer, chunks = split_payload(payload, 1000)
    for c in chunks:
        link.inbox.append(Incoming(topics.update_data(client), c, False))
    msg = UpdateMessage(
        task_id=task_id,
        round=1,
        client_id=client,
        status="ok",
        metrics=Metrics(samples=10),
        transfer=transfer,
    )
    link.inbox.append(Incoming(topics.update(client), msg.model_dump_json().encode(), False))


def test_collect_hands_on_each_update_before_reading_the_rest():
    topics, link = Topics("fed"), FakeLink()
    transport = MqttTransport(link, topics)
    payloads = {f"c{i}": bytes([i]) * 5000 for i in range(5)}
    for i, (client, data) in enumerate(payloads.items()):
        queue_update(link, topics, client, f"t{i}", data)
    per_update = len(link.inbox) // len(payloads)
    pending = {f"t{i}" for i in range(5)}
    seen = []
    for msg, payload in transport.collect(pending, time.monotonic() + 5):
        assert payload == payloads[msg.client_id]
        # everything after this update is still waiting in the inbox
        assert len(link.inbox) == per_update * (len(payloads) - len(seen) - 1)
        seen.append(msg.client_id)
        pending.discard(msg.task_id)
    assert seen == list(payloads)


def test_late_answers_between_rounds_are_dropped_without_piling_up():
    topics, link = Topics("fed"), FakeLink()
    transport = MqttTransport(link, topics)
    for i in range(3):
        queue_update(link, topics, f"c{i}", f"old{i}", bytes([i]) * 3000)
    assert transport.poll(0.0) == 3
    assert not link.inbox and not transport.payloads and not transport.controls
