"""Many lightweight virtual clients for load tests: each is a real MQTT connection that
registers like a board and answers every task at once with a valid update (a random submodel
of the global model with random values; one of the ``distinct`` updates is the dense model),
and every statistics task with valid BatchNorm statistics, so that the coordinator does all its
real work (tasks, transfers, reassembly, validation, aggregation, the statistics phase) without
the clients training.

    python -m benchmarks.swarm --broker mqtt://127.0.0.1:1883 --federation F --clients 100 \\
        --model vgg11 --width 0.33

paho's network loop waits with select(), which cannot watch file descriptors above 1023, and
every connection takes three: run at most MAX_CLIENTS per process and start several processes
(distinct ``--prefix``) for more.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import queue
import random
import sys
import threading
import time

import torch

from cahfp.client_round import architecture
from cahfp.messages import Metrics, ModelSpec, TaskMessage, UpdateMessage
from cahfp.mqtt.link import MqttLink
from cahfp.protocol import Hello, Presence, ProtocolError, Topics, parse_json, split_payload
from cahfp.pruning import extract, make_plan, score_groups
from cahfp.pruning.reconstruct import is_statistic
from cahfp.wire import encode_state, encode_update

log = logging.getLogger("cahfp.swarm")
MAX_CLIENTS = 250  # per process: 3 file descriptors each must stay below select()'s 1024


def random_updates(spec: ModelSpec, count: int, seed: int = 0) -> list[tuple[bytes, str, float]]:
    """``count`` distinct valid updates, keeps spread over 0.25-1 (the last one dense):
    (payload, sha256, keep achieved)."""
    model = architecture(spec)
    x = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        keep = 0.25 + 0.75 * (i + 1) / count
        if keep < 1:
            plan = make_plan(
                model, score_groups(model, None, "random", example_input=x, seed=seed + i), keep
            )
            ext = extract(model, plan)
            sub, index_map, achieved = ext.module, ext.index_map, plan.flops_fraction
        else:
            sub, index_map, achieved = model, {}, 1.0
        state = {
            k: (_random_like(v, k, gen) if v.is_floating_point() else v)
            for k, v in sub.state_dict().items()
        }
        data = encode_update(state, index_map)
        out.append((data, hashlib.sha256(data).hexdigest(), achieved))
    return out


def _random_like(v: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    """Small random values; a variance stays positive."""
    r = torch.randn(v.shape, generator=gen) * 0.01
    return 1 + r.abs() if name.endswith("running_var") else r


def random_statistics(spec: ModelSpec, seed: int = 0) -> tuple[bytes, str]:
    """A valid answer to a statistics task: every BatchNorm layer's statistics, random values
    (``cahfp.state/1`` payload, sha256)."""
    gen = torch.Generator().manual_seed(seed)
    stats = {
        k: _random_like(v, k, gen) if v.is_floating_point() else v
        for k, v in architecture(spec).state_dict().items()
        if is_statistic(k)
    }
    data = encode_state(stats, {})
    return data, hashlib.sha256(data).hexdigest()


class Swarm:
    def __init__(
        self,
        url: str,
        fed: str,
        n: int,
        spec: ModelSpec,
        prefix: str = "v",
        distinct: int = 8,
        protocol: int = 5,
        seed: int = 0,
    ):
        if n > MAX_CLIENTS:
            raise ValueError(
                f"{n} clients in one process: at most {MAX_CLIENTS} (paho waits with select(), "
                "limited to file descriptors below 1024); start several swarms with distinct "
                "prefixes"
            )
        self.topics = Topics(fed)
        self.updates = random_updates(spec, distinct, seed)
        self.statistics = random_statistics(spec, seed)
        self.rng = random.Random(seed)
        self.jobs: queue.Queue[tuple[MqttLink, str, bytes]] = queue.Queue()
        self.links: dict[str, MqttLink] = {}
        self.answered = 0
        self.stop = threading.Event()
        for i in range(n):
            cid = f"{prefix}{i:04d}"
            offline = Presence(client_id=cid, status="offline").model_dump_json().encode()
            link = MqttLink(
                url,
                cid,
                protocol=protocol,
                keepalive=60,
                will=(self.topics.presence(cid), offline, 1, True),
            )
            link.client.on_message = self._on_message(link, cid)
            link.subscribe(self.topics.task(cid), 1)  # the control message only: the payload
            self.links[cid] = link  # is not needed to answer

    def _on_message(self, link: MqttLink, cid: str):
        def handler(client, userdata, msg):
            self.jobs.put((link, cid, bytes(msg.payload)))

        return handler

    def start(self, timeout: float = 120.0) -> None:
        for cid, link in self.links.items():
            link.start(timeout)
            link.publish(
                self.topics.presence(cid),
                Presence(client_id=cid, status="online").model_dump_json(),
                1,
                True,
            )
            link.publish(
                self.topics.hello(cid), Hello(client_id=cid, samples=100).model_dump_json(), 1, True
            )
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _work(self) -> None:
        """Answer tasks one after another, each update's chunks acknowledged by the broker
        before the next (bounded memory)."""
        while not self.stop.is_set():
            try:
                link, cid, raw = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                task = parse_json(TaskMessage, raw, max_bytes=256 << 10)
            except ProtocolError as exc:
                log.warning("%s: bad task: %s", cid, exc)
                continue
            if task.purpose == "statistics":
                (data, digest), keep = self.statistics, 1.0
                samples = task.calibration_batches * task.recipe.batch_size
            else:
                data, digest, keep = self.updates[self.rng.randrange(len(self.updates))]
                samples = 100
            transfer, chunks = split_payload(data, link.chunk_size(), digest=digest)
            infos = [link.publish(self.topics.update_data(cid), c, 1) for c in chunks]
            msg = UpdateMessage(
                task_id=task.task_id,
                round=task.round,
                client_id=cid,
                status="ok",
                transfer=transfer,
                metrics=Metrics(samples=samples, samples_trained=samples, keep_achieved=keep),
            )
            infos.append(link.publish(self.topics.update(cid), msg.model_dump_json(), 1))
            for info in infos:
                info.wait_for_publish(timeout=60)
            self.answered += 1

    def close(self) -> None:
        self.stop.set()
        for cid, link in self.links.items():
            offline = Presence(client_id=cid, status="offline").model_dump_json().encode()
            link.stop(final=[(self.topics.presence(cid), offline, True)])


def main(argv=None) -> int:
    import resource

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--broker", required=True)
    p.add_argument("--federation", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--prefix", default="v")
    p.add_argument("--model", default="vgg11")
    p.add_argument("--width", type=float, default=0.33)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seconds", type=float, default=3600, help="exit after this long")
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    torch.set_num_threads(1)
    spec = ModelSpec(
        name=args.model,
        width=args.width,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
    )
    swarm = Swarm(args.broker, args.federation, args.clients, spec, prefix=args.prefix)
    swarm.start()
    print(f"swarm ready: {args.clients} clients", flush=True)
    try:
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
