"""`make bench`: every benchmark, one after another (they must not share the 2 cores), each
writing its tables to benchmarks/results/. Takes a few hours on 2 cores; run one alone with
`python -m benchmarks.NAME`."""

from __future__ import annotations

import importlib
import sys
import time

ORDER = ["score_fidelity", "inference", "system", "transfer", "accuracy"]


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ORDER
    for name in names:
        start = time.perf_counter()
        print(f"== benchmarks.{name}", flush=True)
        code = importlib.import_module(f"benchmarks.{name}").main([])
        print(
            f"== benchmarks.{name}: exit {code} after {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
