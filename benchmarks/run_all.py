"""`make bench`: every benchmark, one after another (they must not share the 2 cores), each
writing its tables to benchmarks/results/. Takes many hours on 2 cores, nearly all of it the
accuracy benchmark's pieces (one setting each, resumable: an interrupted `make bench` picks up
where it stopped); run one alone with `python -m benchmarks.NAME` (`python -m benchmarks.run_all
system transfer` runs a subset)."""

from __future__ import annotations

import importlib
import sys
import time

from benchmarks.accuracy import SETTINGS

# (module, arguments)
ORDER: list[tuple[str, list[str]]] = [
    ("score_fidelity", []),
    ("inference", []),
    ("accelerators", []),
    ("dashboard", []),
    ("system", []),
    ("transfer", []),
    *[("accuracy", ["--setting", name]) for name in SETTINGS],
    ("accuracy", ["--report"]),
    ("accuracy", ["--ablations"]),
]


def main(argv=None) -> int:
    names = argv if argv is not None else sys.argv[1:]
    runs = [r for r in ORDER if r[0] in names] if names else ORDER
    unknown = set(names) - {name for name, _ in ORDER}
    if unknown:
        print(f"unknown benchmarks: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for name, args in runs:
        label = " ".join([f"benchmarks.{name}", *args])
        start = time.perf_counter()
        print(f"== {label}", flush=True)
        code = importlib.import_module(f"benchmarks.{name}").main(list(args))
        print(f"== {label}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
