"""How the system's cost grows with its work, measured against the physical limits, in one run.

1. Local training step time of the compact submodel vs dense at keep 0.75 / 0.5 / 0.25 (VGG,
   ResNet): speed-up as a fraction of the ideal 1 / FLOPs fraction.
2. Uplink and downlink bytes per round vs the ideal (bytes of the kept parameters alone).
3. Scoring (curvature scores + planning + extraction) time as a fraction of local training time
   for the default recipe.
4. Coordinator scale: 10, 100, 1000 lightweight clients (real MQTT connections answering with
   valid random submodels of a 1M-parameter model) through one mosquitto, one round each.
5. Coordinator evaluation and checkpoint time per round vs aggregation time.

    python -m benchmarks.system            # writes benchmarks/results/system.md
    python -m benchmarks.system --quick
"""

from __future__ import annotations

import time

from benchmarks.common import environment, write_results
from benchmarks.system.checkpoint import part_checkpoint
from benchmarks.system.kernels import part_kernels
from benchmarks.system.options import parse_args
from benchmarks.system.report import report
from benchmarks.system.scale import part_scale
from benchmarks.system.scoring import part_scoring
from benchmarks.system.training import part_training_and_bytes


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    start = time.perf_counter()
    speed, wire = part_training_and_bytes(args)
    kernels = part_kernels(args)
    scoring = part_scoring(args)
    ck = part_checkpoint()
    scale = part_scale(args) if args.scale else []
    seconds = time.perf_counter() - start
    name = "system" + ("_quick" if args.quick else "")
    raw = {
        "env": env,
        "speed": speed,
        "kernels": kernels,
        "wire": wire,
        "scoring": scoring,
        "scale": scale,
        "checkpoint": ck,
    }
    path = write_results(
        name,
        report(args, env, seconds, speed, kernels, wire, scoring, scale, ck),
        raw,
        args.out_dir,
    )
    print(f"wrote {path}")
    return 0
