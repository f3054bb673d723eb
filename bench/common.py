"""Shared benchmark setup: the bases, random LoRA adapters, registries, result files.

Two base shapes (:data:`SHAPES`): ``smollm2``, SmolLM2-135M-Instruct (30 layers, 210 LoRA
targets: the shape users run, close to a 7B's 224), and ``small``, a random 6-layer Llama (hidden
512, byte tokenizer) that is fast enough for 128-adapter batches and 1000-adapter registries.
``BENCH_BASE=smollm2|small`` picks the shape of the benchmarks that run on either.

Everything heavy (base weights, adapters, registries) goes under ``bench/out/`` (git-ignored) and
is reused by later runs; results (JSON + PNG, small) go under ``bench/results/`` and are committed.
Adapters are NOT trained: PEFT LoRA (rank 16, alpha 32, every Linear but the head) with LoRA B
random-initialised (nonzero), so each adapter changes the output and costs what a trained one costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
RESULTS = ROOT / "results"
RANK = 16


def freeze_heap() -> None:
    """Move every Python object alive now out of the garbage collector's sight (``gc.freeze``).

    Call once every contestant is built. PEFT with 128 adapters is ~700k objects; a full collection
    walks them all (tens of ms) in whichever contestant's loop triggers it, which then looks slow
    (and a pause in the submitting loop splits the engine's burst into two prefills).
    """
    import gc

    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def gc_paused():
    """No garbage collection while a contestant is built (setup time only, never timed).

    PEFT's 128 adapters are built one ``load_adapter`` at a time, and the collections that hundreds
    of thousands of new objects trigger took 10.5 s of a 153 s build (timed by ``gc.callbacks``).
    """
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def smollm2_dir() -> Path:
    """The built SmolLM2-135M-Instruct preset: ``BENCH_SMOLLM2_DIR``, else adapterhub's cache."""
    return Path(os.environ.get("BENCH_SMOLLM2_DIR", Path.home() / ".cache/adapterhub/smollm2-135m-instruct"))


def smollm2_model():
    """SmolLM2-135M-Instruct (:func:`smollm2_dir`) in plain transformers, fp32, eval mode, with
    :func:`threads` torch threads: the model the engine-free ceiling benches time."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads())
    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()


def abba(first, second, *, rounds: int, repeat: int) -> tuple[float, list[float], float]:
    """Time two callables in ABBA order per round (each call warmed once, then ``repeat`` calls):
    the median of second / first over rounds, each round's ratio, and first's median seconds per call.
    Ratios within a round cancel the drift of a shared machine."""
    import statistics

    def per_call(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    ratios, firsts = [], []
    for _ in range(rounds):
        a1, b1 = per_call(first), per_call(second)
        b2, a2 = per_call(second), per_call(first)
        ratios.append((b1 + b2) / (a1 + a2))
        firsts.append((a1 + a2) / 2)
    return statistics.median(ratios), ratios, statistics.median(firsts)


def threads() -> int:
    """Torch threads for every contestant alike: ``BENCH_THREADS`` (default 1).

    The 2 cores here are shared with other jobs; with 2 OpenMP threads a busy neighbour makes
    single steps 10-100x slower (spin-waiting threads), which drowns the ratios in noise.
    """
    import torch

    n = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark base: the ``adapterhub base init`` preset it is built from, and where it lives."""

    name: str
    preset: str
    label: str

    @property
    def home(self) -> Path:
        """Its adapters and registry (the small base's stay where they always were)."""
        return OUT if self.name == "small" else OUT / self.name


SHAPES = {
    "smollm2": Shape("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct (30 layers, 210 LoRA targets)"),
    "small": Shape("small", "small", "small random base (6 layers, hidden 512)"),
}


def shape(default: str = "smollm2") -> Shape:
    """The shape ``BENCH_BASE`` names, else ``default``."""
    name = os.environ.get("BENCH_BASE", default)
    if name not in SHAPES:
        raise SystemExit(f"BENCH_BASE={name!r}: choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def base_dir(which: Shape) -> Path:
    """The base directory of ``which``, built once under ``bench/out/`` (SmolLM2: about 25 s on idle cores).

    ``BENCH_SMOLLM2_DIR`` names an existing SmolLM2 directory to use instead (no build).
    """
    from adapterhub.base import init_base

    given = os.environ.get("BENCH_SMOLLM2_DIR") if which.name == "smollm2" else None
    if given:
        return Path(given)
    path = OUT / f"base-{which.name}"
    if not (path / "config.json").is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        print(f"building the {which.name} base under {path} (once)", flush=True)
        init_base(which.preset, path)
    return path


def small_base() -> Path:
    """``adapterhub base init --preset small`` (6 layers, hidden 512), made once."""
    return base_dir(SHAPES["small"])


def _home(base: Path, which: Shape) -> Path:
    """``which``'s adapter/registry folder, emptied when the base's fingerprint changed (a rebuilt
    base would otherwise meet adapters that record another fingerprint, which loading refuses)."""
    from adapterhub.base import fingerprint

    home, current = which.home, fingerprint(base)
    stamp = home / f"base-fingerprint-{which.name}"
    if stamp.is_file() and stamp.read_text() != current:
        for stale in ("adapters", "registry"):
            shutil.rmtree(home / stale, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    stamp.write_text(current)
    return home


def lora_adapters(base: Path, n: int, which: Shape = SHAPES["small"]) -> list[Path]:
    """``n`` rank-16 LoRA adapter directories (PEFT format + adapterhub.json), B random."""
    import torch

    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.manager import PluginManager

    root = _home(base, which) / "adapters"
    dirs = [root / f"a{i}" for i in range(n)]
    missing = [i for i, d in enumerate(dirs) if not (d / "adapterhub.json").is_file()]
    if not missing:
        return dirs
    method = PluginManager(autoload=False).get_method("lora")
    config = method.make_config({"r": RANK, "alpha": 2.0 * RANK})
    model = method.attach(load_base(base, "none").model, config)
    meta = {"name": which.name, "fingerprint": fingerprint(base)}
    for i in missing:
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        save_adapter(method, model, config, dirs[i], base=meta)
    return dirs


def registry(base: Path, n: int, which: Shape = SHAPES["small"]) -> Path:
    """A registry holding tasks ``a0 .. a{n-1}`` (version 1 each); grows, never shrinks."""
    from adapterhub.registry import open_registry

    adapters = lora_adapters(base, n, which)
    path = _home(base, which) / "registry"
    store = open_registry(path)
    have = {t for t in _tasks(path)}
    for i, directory in enumerate(adapters):
        if f"a{i}" not in have:
            store.publish(f"a{i}", directory)
    return path


# Common English words; those that are one token (with their leading space) make prompts of an
# exact token count on a BPE tokenizer, so no contestant pads and every one sees the same ids.
WORDS = ("the cat sat on a mat and dog ran to big red house in old town with new car for day man "
         "water light tree book city river green small road time work hand door night world sun "
         "blue open film game song food bird story fish young white table black paper music").split()


def prompts(tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` random prompts of exactly ``length`` tokens each.

    On a BPE tokenizer: words that are one token each. On the byte tokenizer of the random bases
    (no such word): letters and spaces, one token each (the prompts the small base always had).
    """
    import random

    rng = random.Random(seed)
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < len(WORDS) // 2:
        return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length)) for _ in range(n)]
    texts = ["".join(" " + rng.choice(words) for _ in range(length)) for _ in range(n)]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == length for t in texts), "a prompt merged words"
    return texts


def _tasks(path: Path) -> list[str]:
    from adapterhub.registry import open_registry

    return list(open_registry(path).list_tasks()) if path.is_dir() else []


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def result_name(bench: str, which: Shape) -> str:
    """``bench/results/`` file stem: the small base keeps the plain name its earlier results have."""
    return bench if which.name == "small" else f"{bench}-{which.name}"


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "met" if value else "MISSED"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def verdict(name: str, value: float, op: str, target: float) -> dict[str, Any]:
    met = value <= target if op == "<=" else value >= target
    print(f"  target {name}: {value:.3f} {op} {target} -> {'met' if met else 'MISSED'}")
    return {"name": name, "value": value, "op": op, "target": target, "met": met}


def plot(name: str, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    draw(ax)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``adapterhub serve`` in a subprocess on 127.0.0.1 (so the load generator shares no GIL with it)."""

    def __init__(self, base_dir: Path, registry_dir: Path, *, quantize: str, max_adapters: int, max_batch: int = 32,
                 lora_dtype: str = "auto", http: bool = False):
        import subprocess
        import sys

        from adapterhub.serve.client import Client

        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1")}
        cmd = [sys.executable, "-m", "adapterhub.cli", "serve", "--base", str(base_dir), "--registry", str(registry_dir),
               "--quantize", quantize, "--port", str(self.port), "--max-adapters", str(max_adapters),
               "--max-batch", str(max_batch), "--max-queue", "4096", "--max-new-tokens", "64", "--lora-dtype", lora_dtype]
        self.http_port = free_port() if http else None  # the OpenAI HTTP API beside gRPC
        if http:
            cmd += ["--http-port", str(self.http_port)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = Client(f"127.0.0.1:{self.port}", timeout=600)
        deadline = time.monotonic() + 180
        while True:
            try:
                self.client.info()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {' '.join(cmd)}")
                time.sleep(0.5)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


# The thread setting a fresh worker process applies before it imports anything heavy (THREADS:
# "affinity" or a count; unset: torch's default): prepended to the workers of the thread benchmarks.
THREADS_PREAMBLE = r"""
import os
import torch
want = os.environ.get("THREADS")
if want == "affinity":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
elif want:
    torch.set_num_threads(int(want))
"""


def alone_and_beside_busy(candidates: dict[str, dict[str, str]], worker: str, args: list[str]) -> dict[str, dict]:
    """Run ``worker`` (Python source printing one JSON line) once per candidate environment, each in a
    fresh process (torch's threads are process-wide, OpenMP reads its wait policy once): first alone,
    then beside a busy neighbour (``yes``) holding a core. Returns {"alone": {name: json}, "beside_busy": ...}."""
    import subprocess
    import sys

    def run(env: dict[str, str]) -> dict:
        done = subprocess.run([sys.executable, "-c", THREADS_PREAMBLE + worker, *args], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    results: dict[str, dict] = {"alone": {}, "beside_busy": {}}
    for name, env in candidates.items():
        results["alone"][name] = run(env)
        print(name, "alone done", flush=True)
    busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        for name, env in candidates.items():
            results["beside_busy"][name] = run(env)
            print(name, "beside busy done", flush=True)
    finally:
        busy.terminate()
        busy.wait()
    return results
