"""`make demo`: the whole story on the built-in tiny base, in a few minutes on 2 CPU cores.

1. build the tiny base (`adapterhub base init`)
2. train three adapters on three synthetic tasks with three methods (`adapterhub train`), each
   published to a registry (the CLI prints its reference)
3. start the gRPC server on the nf4-quantized base (`adapterhub serve`)
4. fire concurrent requests for every task, with its adapter and with the bare base, mixed in the
   same batches, plus one composed request, through the Python client
5. print exact-match accuracy per task (adapter vs base) and the throughput; stop the server
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
N_TEST = int(os.environ.get("DEMO_N_TEST", "50"))
# task -> (method, extra CLI flags)
JOBS = {
    "sentiment": ("lora", ["--set", "r=16", "--max-steps", "300", "--lr", "3e-3"]),
    "category": ("adapter", ["--max-steps", "400", "--lr", "1e-2", "--warmup-steps", "20"]),
    "topic": ("prefix", ["--quantize", "nf4", "--set", "num_virtual_tokens=16", "--max-steps", "1200", "--lr", "3e-2",
                         "--warmup-steps", "20"]),
}
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str) -> str:
    """Run the adapterhub CLI like a user would; return its last stdout line."""
    print("$ adapterhub " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "adapterhub", *args], capture_output=True, text=True, env=ENV)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"demo step failed: adapterhub {' '.join(args)}")
    return done.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_dir: Path, registry: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", "--base", str(base_dir), "--quantize", "nf4", "--registry", str(registry),
            "--port", str(port), "--max-adapters", "4"]
    print("$ adapterhub " + " ".join(args), flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub", *args], stdout=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving on"):
            return proc, f"127.0.0.1:{port}"
        if proc.poll() is not None:
            raise SystemExit("the server exited before it was ready")
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def main() -> None:
    from adapterhub.data import read_examples
    from adapterhub.serve.client import Client
    from adapterhub.tasks import write_split

    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    base_dir, registry = OUT / "base", OUT / "registry"
    cli("base", "init", "--preset", "tiny", "--out", str(base_dir))

    refs, tests, train_s = {}, {}, {}
    for task, (method, flags) in JOBS.items():
        train, test = write_split(task, OUT / "data" / task, n_train=2000, n_test=N_TEST)
        t0 = time.perf_counter()
        refs[task] = cli("train", "--plugin", method, "--base", str(base_dir), "--data", str(train), "--task", task,
                         "--registry", str(registry), "--batch-size", "16", "--no-progress", *flags)
        train_s[task] = time.perf_counter() - t0
        tests[task] = read_examples(test)

    server, target = start_server(base_dir, registry)
    try:
        jobs = [(task, use_adapter, ex) for task in JOBS for ex in tests[task] for use_adapter in (True, False)]
        with Client(target, timeout=300) as client:

            def ask(job):
                task, use_adapter, example = job
                reply = client.generate(messages=[(m["role"], m["content"]) for m in example[:-1]],
                                        adapters=[refs[task]] if use_adapter else [], max_new_tokens=12)
                return task, use_adapter, reply.text.strip() == example[-1]["content"].strip(), len(reply.token_ids)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=16) as pool:
                results = list(pool.map(ask, jobs))
            serve_s = time.perf_counter() - t0
            composed = client.generate(messages=[("user", "category?\n\nthe red one")],
                                       adapters=[(refs["sentiment"], 0.5), (refs["category"], 1.0)], max_new_tokens=12)
            info = client.info()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print()
    print(f"{'task':<10} {'method':<8} {'adapter':<12} {'base EM':>8} {'adapter EM':>11} {'train s':>8}")
    rows = []
    for task, (method, _) in JOBS.items():
        base_em = sum(ok for t, a, ok, _ in results if t == task and not a) / len(tests[task])
        adapter_em = sum(ok for t, a, ok, _ in results if t == task and a) / len(tests[task])
        rows.append((base_em, adapter_em))
        print(f"{task:<10} {method:<8} {refs[task]:<12} {base_em:>8.2f} {adapter_em:>11.2f} {train_s[task]:>8.1f}")
    tokens = sum(n for *_, n in results)
    print(f"\nserved {len(results)} concurrent requests (adapters mixed with the base) on the {info.quantization} base "
          f"in {serve_s:.1f} s: {len(results) / serve_s:.1f} req/s, {tokens / serve_s:.0f} tokens/s")
    print(f"composed request {refs['sentiment']}:0.5 + {refs['category']} -> {composed.text!r} "
          f"(resolved: {', '.join(f'{a.requested} -> {a.resolved} ({a.method})' for a in composed.adapters)})")
    print(f"demo finished in {time.perf_counter() - started:.0f} s (exact match on {N_TEST} held-out examples per task)")
    if any(adapter_em < base_em + 0.3 for base_em, adapter_em in rows):
        raise SystemExit("an adapter did not learn its task (exact match not far above the base)")


if __name__ == "__main__":
    main()
