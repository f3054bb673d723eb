"""``python -m bench [NAME ...]``: run the benchmarks (all by default), one after another.

Each writes ``bench/results/NAME.json`` and ``NAME.png`` and prints its table and targets.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = {
    "throughput": "(a) mixed-batch throughput vs distinct adapters, vs PEFT",
    "hotswap": "(b) hot-swap cost",
    "serving": "(c) gRPC serving under Poisson load, 5/100/1000 adapters",
    "training": "(d) training step time vs plain PEFT + Trainer",
    "memory": "(e) server memory, nf4 vs unquantized, per adapter",
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    summary = []
    for name in names:
        print(f"\n=== {name}: {BENCHMARKS[name]} ===", flush=True)
        start = time.perf_counter()
        results = importlib.import_module(f"bench.{name}").main()
        summary += [(name, t) for t in results.get("targets", [])]
        print(f"({name} took {time.perf_counter() - start:.0f}s)", flush=True)
    print("\n=== targets ===")
    for name, t in summary:
        print(f"{name:>10}: {t['name']}: {t['value']:.3f} {t['op']} {t['target']} -> {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
