"""(n) Training step time by thread setting, alone and beside a busy neighbour: ``train --threads``'s default.

On a 2-core machine torch's default (one thread per core, busy-waiting OpenMP workers) collapses
when another process holds a core: a worker spins for a core it does not get, and every step waits
for the slowest. Each candidate runs in a fresh process (OpenMP reads its wait policy once) that
trains a LoRA on the small preset base for a few steps; the neighbour is ``yes > /dev/null``.
Candidates: torch's default, threads from the CPU affinity, OpenMP's passive wait policy with those
threads, and one thread. Medians of the steps after the first two; ratios against one thread.
"""

from __future__ import annotations

import os
import statistics

from bench import common

STEPS = int(os.environ.get("BENCH_THREAD_STEPS", "8"))
CANDIDATES = {
    "torch default": {},
    "affinity": {"THREADS": "affinity"},
    "passive + affinity": {"THREADS": "affinity", "OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"THREADS": "1"},
}

WORKER = r"""
import json, sys, time
from adapterhub.base import load_base
from adapterhub.manager import PluginManager
torch.manual_seed(0)
base = load_base(sys.argv[1], "none")
lora = PluginManager(autoload=False).get_method("lora")
model = lora.attach(base.model, lora.make_config({}))
optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(0, base.model.config.vocab_size, (4, 64))
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optim.step()
    optim.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps({"threads": torch.get_num_threads(), "steps_s": times}))
"""


def main() -> dict:
    base = str(common.small_base())
    results: dict = {"steps": STEPS, "cpus": len(os.sched_getaffinity(0)),
                     **common.alone_and_beside_busy(CANDIDATES, WORKER, [base, str(STEPS)])}
    for runs in (results["alone"], results["beside_busy"]):
        for out in runs.values():
            out["median_s"] = statistics.median(out["steps_s"][2:])
    rows = []
    for name in CANDIDATES:
        alone, busy_ = results["alone"][name]["median_s"], results["beside_busy"][name]["median_s"]
        rows.append([name, results["alone"][name]["threads"], alone, busy_,
                     alone / results["alone"]["one thread"]["median_s"],
                     busy_ / results["beside_busy"]["one thread"]["median_s"]])
    print(common.table(["setting", "threads", "alone s/step", "beside busy s/step", "alone / one thread",
                        "busy / one thread"], rows))
    common.save("train_threads", results)
    return results


if __name__ == "__main__":
    main()
