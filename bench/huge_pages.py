"""(x) torch's large tensors on transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, what the
``adapterhub`` command sets, :mod:`adapterhub.huge_pages`) against 4 KiB pages.

torch reads the variable once, at import, so each run is a fresh process: the engine workload of
(t) (``bench/prepack.py``: SmolLM2-135M-Instruct fp32, ``BATCH`` real-English prompts of 100 tokens
at once, 48 greedy tokens each, prefix cache and LoRA overlap off, ``BENCH_THREADS`` threads),
after one warm-up run in the same process. ``BENCH_HUGE_PAGES_ROUNDS`` (default 2) rounds in ABBA
order; ratios huge / small pages within each round, medians over rounds. Per run: tokens/s, the
prefill pass, the median decode step, the process's ``AnonHugePages`` and RSS after the load, and
its tokens (both arms must be equal). Results: ``bench/results/huge_pages-smollm2.json``.

    python -m bench huge_pages
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from . import common

ROUNDS = int(os.environ.get("BENCH_HUGE_PAGES_ROUNDS", "2"))
ENV = "THP_MEM_ALLOC_ENABLE"


def thp_mode() -> str:
    """The kernel's THP setting (the bracketed word), or why there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable (no /sys/kernel/mm/transparent_hugepage)"
    return text[text.find("[") + 1:text.find("]")]


def memory_kb() -> dict[str, int]:
    """This process's resident and anonymous-huge-page kilobytes (Linux)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "AnonHugePages"):
                out[key] = int(rest.split()[0])
    return out


def child() -> None:
    """One arm: build the engine, a warm-up run, one timed run; a JSON line on stdout."""
    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine
    from adapterhub.serve.requests import Limits

    from . import http_corpus, prepack

    common.threads()
    base = common.smollm2_dir()
    registry = common.registry(base, 1, common.SHAPES["smollm2"])
    engine = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=2,
                           limits=Limits(context_length=2048), prefix_cache_bytes=0, lora_overlap=False,
                           max_batch=prepack.BATCH)
    times = prepack.timed_passes(engine)
    texts = http_corpus.prompts(engine.tokenizer, prepack.BATCH, prepack.PROMPT_TOKENS)
    common.freeze_heap()
    prepack.run(engine, times, texts)
    result = prepack.run(engine, times, texts)
    result.update(memory_kb())
    engine.stop(1)
    print(json.dumps(result), flush=True)


def arm(huge: bool) -> dict:
    env = {**os.environ, ENV: "1" if huge else "0"}
    done = subprocess.run([sys.executable, "-m", "bench.huge_pages", "--child"], env=env, capture_output=True,
                          text=True, check=False, cwd=common.ROOT.parent)
    if done.returncode != 0:
        raise SystemExit(f"a {'huge' if huge else 'small'}-page run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> dict:
    mode = thp_mode()
    print(f"transparent huge pages: {mode}", flush=True)
    runs: dict[str, list[dict]] = {"huge": [], "small": []}
    ratios: dict[str, list[float]] = {"tok_s": [], "prefill_s": [], "decode_step_s": []}
    for r in range(ROUNDS):
        order = ["small", "huge", "huge", "small"]
        this: dict[str, list[dict]] = {"huge": [], "small": []}
        for name in order if r % 2 == 0 else order[::-1]:
            this[name].append(arm(name == "huge"))
        for key in ratios:
            ratios[key].append(statistics.mean(x[key] for x in this["huge"]) / statistics.mean(x[key] for x in this["small"]))
        for name in runs:
            runs[name] += this[name]
        print(f"round {r + 1}: huge / small pages tok/s {ratios['tok_s'][-1]:.2f}, prefill {ratios['prefill_s'][-1]:.2f}, "
              f"decode step {ratios['decode_step_s'][-1]:.2f}", flush=True)
    keys = ("tok_s", "prefill_s", "decode_step_s", "Rss", "AnonHugePages")
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in keys} for name, rs in runs.items()}
    equal = sum(a == b for a, b in zip(runs["huge"][0]["tokens"], runs["small"][0]["tokens"]))
    results = {
        "environment": common.environment(), "thp": mode, "rounds": ROUNDS,
        "workload": "bench/prepack.py's: 16 prompts of 100 tokens at once, 48 tokens each, fp32",
        "huge_over_small": {k: statistics.median(v) for k, v in ratios.items()}, "ratios_by_round": ratios,
        "median": summary, "equal_rows": f"{equal}/{len(runs['huge'][0]['tokens'])}",
    }
    print(common.table(["pages", "tok/s", "prefill s", "decode step ms", "RSS MB", "AnonHugePages MB"],
                       [[n, f"{s['tok_s']:.1f}", f"{s['prefill_s']:.2f}", f"{1000 * s['decode_step_s']:.0f}",
                         f"{s['Rss'] / 1024:.0f}", f"{s['AnonHugePages'] / 1024:.0f}"] for n, s in summary.items()]))
    print("huge / small: " + ", ".join(f"{k} {v:.2f}" for k, v in results["huge_over_small"].items())
          + f"; equal rows {results['equal_rows']}")
    results["targets"] = [common.verdict("decode step huge / small pages", results["huge_over_small"]["decode_step_s"],
                                         "<=", 1.0)]
    common.save("huge_pages-smollm2", results)
    return results


if __name__ == "__main__" and "--child" in sys.argv:
    child()
