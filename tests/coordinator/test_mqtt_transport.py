"""The MQTT transport's receive path, without a broker: answers are handed on one at a time, so
a backlog of updates stays in the link's (memory-bounded) inbox instead of being reassembled at
once."""

import collections
import time

from cahfp.messages import Metrics, ModelSpec, TaskMessage, UpdateMessage
from cahfp.mqtt.inbox import Incoming
from cahfp.mqtt.protocol import Hello, Presence, Topics, split_payload
from cahfp.training import Recipe
from coordinator.mqtt_transport import MqttTransport
from coordinator.upload_budget import UploadBudget

SPEC = ModelSpec(name="vgg11", width=0.25, num_classes=10, in_channels=1, image_size=28)


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

    def publish_payload(self, topic, data, chunk_size, transfer=None):
        return split_payload(data, chunk_size, transfer)[0], []

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


def announce(link, topics, cid, status="online", every=None, hello=True):
    p = Presence(client_id=cid, status=status, every=every).model_dump_json().encode()
    link.inbox.append(Incoming(topics.presence(cid), p, True))
    if hello:
        h = Hello(client_id=cid, samples=10).model_dump_json().encode()
        link.inbox.append(Incoming(topics.hello(cid), h, True))


def test_presence_decides_who_is_online_not_the_retained_hello(monkeypatch):
    link, topics = FakeLink(), Topics("fed")
    t = MqttTransport(link, topics)
    announce(link, topics, "gone", status="offline")  # stopped cleanly: its hello stays
    announce(link, topics, "quiet", every=1.0)  # refreshes every second
    announce(link, topics, "old")  # no refresh promised: online until an offline
    link.inbox.append(
        Incoming(
            topics.hello("nopresence"),
            Hello(client_id="nopresence", samples=1).model_dump_json().encode(),
            True,
        )
    )
    assert t.clients() == ["old", "quiet"]
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 3.5)  # "quiet" missed 3 refreshes
    assert t.clients() == ["old"]
    announce(link, topics, "quiet", every=1.0, hello=False)  # it refreshes again
    assert t.clients() == ["old", "quiet"]


def test_collect_gives_up_on_a_client_that_has_gone(monkeypatch):
    link, topics = FakeLink(), Topics("fed")
    t = MqttTransport(link, topics)
    announce(link, topics, "a", every=1.0)
    announce(link, topics, "b")
    assert t.clients() == ["a", "b"]
    for cid in ("a", "b"):
        task = TaskMessage(
            task_id=f"t-{cid}",
            round=1,
            client_id=cid,
            model=SPEC,
            recipe=Recipe(),
            payload="state",
            deadline_s=600,
        )
        t.send(task, b"x" * 100)
    pending = {"t-a", "t-b"}
    announce(link, topics, "b", status="offline", hello=False)
    start = time.monotonic()
    clock = iter(start + 0.6 * i for i in range(1000))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    assert list(t.collect(pending, start + 600)) == []
    # "b" said offline (over 5 s ago), "a" stopped refreshing (3 s): neither is waited for
    assert pending == set()


def test_a_device_beyond_its_upload_budget_is_dropped_on_arrival():
    budget = UploadBudget("cahfp/fed/update/", floor=1000, factor=2)
    data = "cahfp/fed/update/dev/data"
    assert budget.admit("cahfp/fed/status", 10**9)  # other topics are not budgeted
    assert budget.admit(data, 1000) and not budget.admit(data, 1)  # the floor, then nothing
    budget.expect("dev", 1, 500)  # a new round, a task of 500 bytes: 2 x 500 more
    assert budget.admit(data, 1500) and budget.admit("cahfp/fed/update/dev", 500)
    assert not budget.admit(data, 1)
    assert budget.admit("cahfp/fed/update/other/data", 1000)  # budgets are per device
    assert budget.take_dropped() == {"dev": 2} and budget.take_dropped() == {}
