"""Does watching a federation slow it? The same simulation (VGG-11 x0.25, Fashion-MNIST, 4
clients, CA-HFP, in process) with no dashboard, and with ``--dashboard`` followed by a browser-like
watcher (one server-sent-event stream read to the end, and ``/api/state`` plus ``/metrics``
fetched every second, as a page and a Prometheus scrape would), run alternately; the seconds
per round of each.

    python -m benchmarks.dashboard            # writes benchmarks/results/dashboard.md
    python -m benchmarks.dashboard --quick
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import env_line, environment, md_table, write_results


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--pairs", type=int, default=3, help="alternating runs of each arm")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--data-dir")
    p.add_argument("--out-dir")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.pairs, args.train_samples = 2, 1, 600
    return args


def _watch(url: str, stop: threading.Event, counts: dict) -> None:
    """A page's event stream and a poller of the state and the metrics."""

    def stream():
        try:
            with urllib.request.urlopen(url + "/events", timeout=60) as r:
                while not stop.is_set():
                    if r.readline().startswith(b"data:"):
                        counts["events"] += 1
        except OSError:
            pass  # the run ended

    threading.Thread(target=stream, daemon=True).start()
    while not stop.is_set():
        for path in ("/api/state", "/metrics"):
            try:
                with urllib.request.urlopen(url + path, timeout=10) as r:
                    r.read()
                counts["polls"] += 1
            except OSError:
                pass
        stop.wait(1.0)


def run_one(args, out: Path, watched: bool) -> dict:
    cmd = [sys.executable, "-m", "cahfp.cli", "simulate", "--rounds", str(args.rounds),
           "--clients", "4", "--backend", "inprocess", "--threads", "1", "--out", str(out),
           "--set", f"data.train_samples={args.train_samples}", "--set", "data.eval_samples=500",
           "--set", "clients.budget=fixed-tiers"]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if watched:
        cmd += ["--dashboard", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    counts = {"events": 0, "polls": 0}
    stop = threading.Event()
    if watched:
        line = ""
        while "dashboard:" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("simulate ended before its dashboard started")
        url = re.search(r"(http://\S+)/", line).group(1)
        threading.Thread(target=_watch, args=(url, stop, counts), daemon=True).start()
    proc.stderr.read()
    code = proc.wait()
    stop.set()
    if code != 0:
        raise RuntimeError(f"simulate exited with {code}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if r["round"] > 0]
    return {"watched": watched, "round_s": statistics.mean(seconds), **counts}


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            for watched in (False, True) if k % 2 == 0 else (True, False):
                runs.append(run_one(args, Path(tmp) / f"r{k}-{int(watched)}", watched))
    seconds = time.perf_counter() - start
    plain = [r["round_s"] for r in runs if not r["watched"]]
    watched = [r["round_s"] for r in runs if r["watched"]]
    ratio = statistics.mean(watched) / statistics.mean(plain)
    table = [
        ["no dashboard", f"{statistics.mean(plain):.3f}", " ".join(f"{x:.3f}" for x in plain),
         "-", "-"],
        ["dashboard, watched", f"{statistics.mean(watched):.3f}",
         " ".join(f"{x:.3f}" for x in watched),
         str(sum(r["events"] for r in runs)), str(sum(r["polls"] for r in runs))],
    ]  # fmt: skip
    cmd = "python -m benchmarks.dashboard" + (" --quick" if args.quick else "")
    md = "\n".join([
        "# Dashboard overhead",
        "",
        f"Measured {env_line(env)}; {seconds:.0f} s. Reproduce: `{cmd}`.",
        "",
        f"`cahfp simulate` (VGG-11 x0.25, 4 clients sharing {args.train_samples} Fashion-MNIST "
        f"images, fixed tiers, {args.rounds} rounds, one torch thread), {args.pairs} alternating "
        "pair(s): without a dashboard, and with `--dashboard` while one event stream is read and "
        "`/api/state` and `/metrics` are fetched every second.",
        "",
        md_table(["run", "s per round (mean)", "each run", "events read", "fetches"], table),
        "",
        f"Watched against plain: {ratio:.3f}x the seconds per round.",
        "",
    ])  # fmt: skip
    raw = {"env": env, "runs": runs, "ratio": ratio}
    path = write_results("dashboard_quick" if args.quick else "dashboard", md, raw, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
