"""The transfer comparison of ``benchmarks.transfer`` over an emulated board link.

The sender runs in its own network namespace, joined to the host by a veth pair with a ``tc``
token-bucket rate limit (the testbed's emulated link, ``deploy/testbed``); the broker and the
receiver stay on the host. On loopback the raw publish moves hundreds of MB/s and the protocol's
hashing and copying compete with it for the same cores; through a link of a board's or a
server's speed this shows what the protocol costs where it is used. Needs root (namespaces,
``tc``); otherwise the part is skipped with the reason.

    python -m benchmarks.shaped_link --send URL TOPIC raw|protocol SIZE CHUNK   # the sender
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.transfer import payload, publish, receiver
from cahfp.mqtt.link import MqttLink

RATES_MBPS = (1000, 100)  # a server's gigabit link; a board on Fast Ethernet


def bench_link(size: int, chunk: int, repeats: int, rates=RATES_MBPS) -> dict:
    """Median seconds of raw and protocol sends of ``size`` bytes through each link rate, in
    alternation; ``{"skipped": reason}`` where the emulation cannot run."""
    from coordinator.broker import EmbeddedBroker
    from deploy.testbed.emulation import Testbed, TestbedError
    from device_profiles import load_profile

    size = len(payload(size))  # what the sender will send
    base = load_profile("x86-server")
    profiles = [
        base.model_copy(
            update={"emulation": base.emulation.model_copy(update={"bandwidth_mbps": r})}
        )
        for r in rates
    ]
    try:
        bed = Testbed(profiles, subnet="10.78.0")
        bed.setup()
    except (TestbedError, OSError) as exc:
        return {"skipped": str(exc)}
    out: dict = {"size": size, "chunk": chunk, "rates": {}}
    try:
        with EmbeddedBroker("mosquitto", bind=bed.host_ip, max_packet=16 << 20) as broker:
            for slot, rate in zip(bed.slots, rates, strict=True):
                runs: dict[str, list[float]] = {"raw": [], "protocol": []}
                for _ in range(repeats):
                    for name in runs:
                        runs[name].append(
                            _send_from(slot.netns, broker.url, size, chunk, name == "protocol")
                        )
                med = {name: statistics.median(t) for name, t in runs.items()}
                out["rates"][rate] = {
                    "seconds": runs,
                    "median": med,
                    "mb_per_s": {name: size / 1e6 / t for name, t in med.items()},
                    "ratio": med["raw"] / med["protocol"],
                }
                print(f"link {rate} Mbit/s: protocol {out['rates'][rate]['ratio']:.0%} of raw")
    finally:
        bed.teardown(quiet=True)
    return out


def _send_from(netns: str, url: str, size: int, chunk: int, protocol: bool) -> float:
    """One transfer from a sender process inside ``netns`` to a receiver here (seconds from the
    sender's first publish to the receiver holding the whole payload; both read
    CLOCK_MONOTONIC, which ``time.perf_counter`` is on Linux)."""
    mode = "protocol" if protocol else "raw"
    topic = f"bench/link/{mode}/{time.monotonic_ns()}"
    done, result = threading.Event(), {}
    rx = receiver(url, topic, size, protocol, done, result)
    cmd = ["nsenter", f"--net=/var/run/netns/{netns}", sys.executable, "-m", __spec__.name]
    proc = subprocess.Popen(
        [*cmd, "--send", url, topic, mode, str(size), str(chunk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the sender did not connect")
        time.sleep(0.3)  # let the subscription settle
        proc.stdin.write("go\n")
        proc.stdin.flush()
        start = float(proc.stdout.readline().split()[1])
        if not done.wait(600):
            raise RuntimeError("transfer did not complete")
        proc.stdin.close()  # the sender disconnects and exits
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        rx.stop()
    return result["end"] - start


def _send_main(url: str, topic: str, mode: str, size: str, chunk: str) -> int:
    data = payload(int(size))
    tx = MqttLink(url, f"tx-{os.getpid()}-{time.monotonic_ns()}")
    tx.start(10)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    start = time.perf_counter()
    publish(tx, topic, data, mode == "protocol", int(chunk))
    print(f"start {start!r}", flush=True)
    sys.stdin.read()  # until the parent has the payload and closes our stdin
    tx.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "--send":
        sys.exit(__doc__)
    sys.exit(_send_main(*sys.argv[2:]))
