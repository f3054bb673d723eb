"""(l) The registry beyond one machine (issue 30, must-show 1 and the registry half of 3).

1. **Race.** On an S3 bucket (moto's server on 127.0.0.1) and on ``file://``: two trainer
   processes publish ``PUBLISHES`` adapters between them (each a distinct real LoRA on the tiny
   base: a trained one with its ``lora_B`` scaled and perturbed per publish) while two tag movers
   make ``MOVES`` tag moves; then ``adapterhub registry verify`` (a subprocess), and the checks:
   every publish present once under the number it was told, numbers unique, every tag on a
   version.
2. **Serve.** Two ``adapterhub serve`` processes on the bucket (each with a read cache of its own)
   answer a greedy generate for every version (``--sample N`` to ask fewer), and must agree.
3. **Cold load.** Time to first token for a SmolLM2-135M-Instruct LoRA (``adapterhub train --plugin
   lora`` for a few steps) on a fresh server whose registry is the bucket vs a local directory:
   the first request (the adapter is fetched, verified into the read cache and loaded), the second
   (resident), and the first on a restarted server whose read cache is warm.

moto runs in this process on loopback: no network latency, so the S3 numbers are a floor for what a
real bucket costs (add a round trip per object). Writes ``bench/results/registry_race.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import common

TASK = "race"
TAGS = ("prod", "canary", "stable")
PUBLISHES, MOVES, TRAINERS, MOVERS = 200, 100, 2, 2
WORK = common.OUT / "registry-race"


# -- the adapters ---------------------------------------------------------------------------------


def variant(template: Path, out: Path, seed: int) -> Path:
    """A distinct LoRA with the template's files: its lora_B scaled and perturbed (seeded)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    for key, value in tensors.items():
        if "lora_B" in key:
            noise = rng.standard_normal(value.shape).astype(value.dtype) * np.abs(value).mean()
            tensors[key] = (value * (0.5 + rng.random() * 2.5) + noise).astype(value.dtype)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    for name in ("adapter_config.json", "adapterhub.json"):
        shutil.copyfile(template / name, out / name)
    return out


# -- the racing processes (spawned) ---------------------------------------------------------------


def trainer(url: str, env: dict, template: str, work: str, writer: int, count: int, go, results) -> None:
    os.environ.update(env)
    from adapterhub.registry import open_registry

    store = open_registry(url, cache_dir=Path(work) / f"cache-t{writer}")
    go.wait()
    published, seconds = {}, []
    for i in range(count):
        directory = variant(Path(template), Path(work) / f"w{writer}" / str(i), seed=writer * 100_000 + i)
        start = time.perf_counter()
        published[i] = store.publish(TASK, directory, extra={"writer": writer, "i": i}).version
        seconds.append(time.perf_counter() - start)
        shutil.rmtree(directory)
    results.put(("trainer", writer, published, seconds))


def tag_mover(url: str, env: dict, mover: int, moves: int, go, results) -> None:
    os.environ.update(env)
    from adapterhub.registry import open_registry

    store = open_registry(url)
    rng = random.Random(mover)
    go.wait()
    seconds = []
    while len(seconds) < moves:
        versions = store.list_versions(TASK)
        if not versions:
            time.sleep(0.005)
            continue
        start = time.perf_counter()
        store.set_tag(f"{TASK}@{rng.choice(versions)}", rng.choice(TAGS))
        seconds.append(time.perf_counter() - start)
    results.put(("mover", mover, None, seconds))


def race(url: str, env: dict, template: Path, work: Path) -> dict:
    os.environ.update(env)
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=trainer, args=(url, env, str(template), str(work), w, PUBLISHES // TRAINERS, go, results))
             for w in range(TRAINERS)]
    procs += [ctx.Process(target=tag_mover, args=(url, env, m, MOVES // MOVERS, go, results)) for m in range(MOVERS)]
    for p in procs:
        p.start()
    time.sleep(3)  # let every process import and open the store before the start signal
    start = time.perf_counter()
    go.set()
    reports = [results.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join(60)
    published = {(w, i): v for kind, w, pub, _ in reports if kind == "trainer" for i, v in pub.items()}
    publish_s = [s for kind, _, _, secs in reports if kind == "trainer" for s in secs]
    move_s = [s for kind, _, _, secs in reports if kind == "mover" for s in secs]

    verify = subprocess.run([sys.executable, "-m", "adapterhub", "registry", "--registry", url, "verify", "--json"],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=1800)
    problems = json.loads(verify.stdout)["problems"] if verify.stdout.strip() else [verify.stderr]
    from adapterhub.registry import open_registry

    store = open_registry(url, cache_dir=work / "cache-check")
    live = store.list_versions(TASK)
    numbers = sorted(published.values())
    present_once = all(published[(m.extra["writer"], m.extra["i"])] == v
                       for v in live for m in [store.get_manifest(TASK, v)])
    tags = store.tags(TASK)
    return {
        "url": url, "publishes": len(published), "tag_moves": len(move_s), "wall_s": round(wall, 2),
        "publishes_per_s": round(len(published) / wall, 1),
        "publish_ms": {"median": round(1000 * statistics.median(publish_s), 1),
                       "p95": round(1000 * sorted(publish_s)[int(0.95 * len(publish_s))], 1)},
        "tag_move_ms": {"median": round(1000 * statistics.median(move_s), 1),
                        "p95": round(1000 * sorted(move_s)[int(0.95 * len(move_s))], 1)},
        "verify_exit_code": verify.returncode, "verify_problems": problems,
        "versions_unique": len(set(numbers)) == len(numbers) == PUBLISHES,
        "every_publish_present_once": live == numbers and present_once,
        "tags": tags, "tags_valid": set(tags.values()) <= set(live) and len(tags) == len(TAGS),
        "versions": live,
    }


# -- servers --------------------------------------------------------------------------------------


class Server:
    """``adapterhub serve`` on a registry URL in a subprocess (its own --cache-dir)."""

    def __init__(self, base: Path, url: str, env: dict, cache: Path, *, quantize: str = "none"):
        from adapterhub.serve.client import Client

        self.port = common.free_port()
        cmd = [sys.executable, "-m", "adapterhub", "serve", "--base", str(base), "--registry", url, "--cache-dir",
               str(cache), "--quantize", quantize, "--port", str(self.port), "--max-adapters", "8",
               "--max-new-tokens", "16"]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = Client(f"127.0.0.1:{self.port}", timeout=600)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.client.info()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {' '.join(cmd)}") from None
                time.sleep(0.3)

    def ttft(self, adapters: list[str]) -> float:
        start = time.perf_counter()
        for _ in self.client.stream("The best film of the year is", adapters=adapters, max_new_tokens=4):
            return time.perf_counter() - start
        raise RuntimeError("no token came")

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


def serve_every_version(base: Path, url: str, env: dict, versions: list[int], work: Path) -> dict:
    servers = [Server(base, url, env, work / f"serve-cache-{k}") for k in range(2)]
    try:
        answers: dict[int, list[list[int]]] = {}
        failed = 0
        start = time.perf_counter()
        for version in versions:
            answers[version] = []
            for server in servers:
                try:
                    reply = server.client.generate("hello", adapters=[f"{TASK}@{version}"], max_new_tokens=4)
                    answers[version].append(list(reply.token_ids))
                except Exception as exc:  # counted, and named below
                    failed += 1
                    print(f"  {TASK}@{version}: {exc}", flush=True)
        seconds = time.perf_counter() - start
        tag_answers = [[list(s.client.generate("hello", adapters=[f"{TASK}@{t}"], max_new_tokens=4).token_ids)
                        for s in servers] for t in TAGS]
    finally:
        for server in servers:
            server.stop()
    agree = sum(len(a) == 2 and a[0] == a[1] for a in answers.values())
    distinct = len({tuple(a[0]) for a in answers.values() if a})
    return {"servers": 2, "versions_asked": len(versions), "requests": 2 * len(versions), "failed": failed,
            "versions_both_answered_alike": agree, "distinct_answers": distinct,
            "tags_answered_alike": sum(a[0] == a[1] for a in tag_answers), "seconds": round(seconds, 1)}


# -- cold load ------------------------------------------------------------------------------------


def smollm2_lora(base: Path, work: Path) -> Path:
    """A LoRA trained a few steps by ``adapterhub train`` (made once)."""
    out = work / "smollm2-lora"
    if (out / "adapterhub.json").is_file():
        return out
    from adapterhub.tasks import write_split

    data, _ = write_split("sentiment", work / "smollm2-data", n_train=32, n_test=2)
    subprocess.run([sys.executable, "-m", "adapterhub", "train", "--plugin", "lora", "--base", str(base), "--data",
                    str(data), "--no-publish", "--output", str(out), "--max-steps", "3", "--batch-size", "4",
                    "--no-progress"], check=True, timeout=1800)
    return out


def cold_load(s3, work: Path, repeats: int) -> dict:
    from adapterhub.registry import open_registry

    base = common.base_dir(common.SHAPES["smollm2"])
    lora = smollm2_lora(base, work)
    registries = {"local directory": (str(work / "ttft-registry"), {}),
                  "s3 (moto, 127.0.0.1)": (f"s3://{s3.new_bucket()}/ttft", s3.env())}
    shutil.rmtree(work / "ttft-registry", ignore_errors=True)
    result = {"adapter_bytes": sum(f.stat().st_size for f in lora.iterdir()), "base": "SmolLM2-135M-Instruct",
              "quantize": "none", "repeats": repeats, "by_registry": {}}
    for name, (url, env) in registries.items():
        os.environ.update(env)
        open_registry(url).publish("smol", lora)
        rows: dict[str, list[float]] = {"base only": [], "first request": [], "second request": [],
                                        "first request, warm read cache": []}
        for r in range(repeats):
            cache = work / f"ttft-cache-{abs(hash(name))}-{r}"
            shutil.rmtree(cache, ignore_errors=True)
            server = Server(base, url, env, cache)
            try:
                server.ttft([])  # warm the base up
                rows["base only"].append(server.ttft([]))
                rows["first request"].append(server.ttft(["smol@1"]))
                rows["second request"].append(server.ttft(["smol@1"]))
            finally:
                server.stop()
            server = Server(base, url, env, cache)
            try:
                server.ttft([])
                rows["first request, warm read cache"].append(server.ttft(["smol@1"]))
            finally:
                server.stop()
        result["by_registry"][name] = {k: round(1000 * statistics.median(v), 1) for k, v in rows.items()}
        result["by_registry"][name]["all_ms"] = {k: [round(1000 * x, 1) for x in v] for k, v in rows.items()}
    return result


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.registry_race")
    parser.add_argument("--sample", type=int, default=0, help="serve this many versions (0: every one)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh servers per cold-load measurement")
    parser.add_argument("--skip-cold-load", action="store_true")
    args = parser.parse_args([] if argv is None else argv)
    sys.path.insert(0, str(common.ROOT.parent / "tests"))  # the test suite's S3 server and trained tiny LoRA
    from objectstore_helpers import S3Server
    from serve_helpers import train_lora

    from adapterhub.base import init_base, load_tokenizer

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    base = common.OUT / "registry-race-base" / "tiny"
    if not (base / "config.json").is_file():
        init_base("tiny", base)
    template = train_lora(base, load_tokenizer(base), common.OUT / "registry-race-base", "sentiment", steps=6)
    s3 = S3Server()
    try:
        results: dict = {"publishes": PUBLISHES, "tag_moves": MOVES, "trainers": TRAINERS, "movers": MOVERS}
        for name, url, env in (("s3", f"s3://{s3.new_bucket()}/registry", s3.env()),
                               ("file", (WORK / "file-registry").as_uri(), {})):
            print(f"race on {name}: {url}", flush=True)
            results[f"race_{name}"] = race(url, env, template, WORK / f"race-{name}")
            r = results[f"race_{name}"]
            print(f"  {r['publishes']} publishes + {r['tag_moves']} tag moves in {r['wall_s']} s; verify exit "
                  f"{r['verify_exit_code']} ({len(r['verify_problems'])} problems); numbers unique "
                  f"{r['versions_unique']}; every publish present once {r['every_publish_present_once']}; "
                  f"tags valid {r['tags_valid']}", flush=True)
        versions = results["race_s3"]["versions"]
        if args.sample:
            versions = sorted(random.Random(0).sample(versions, min(args.sample, len(versions))))
        print(f"two servers on the bucket, {len(versions)} versions each", flush=True)
        results["serve_s3"] = serve_every_version(base, results["race_s3"]["url"], s3.env(), versions, WORK)
        print(f"  {results['serve_s3']}", flush=True)
        if not args.skip_cold_load:
            print("cold load, SmolLM2 LoRA", flush=True)
            results["cold_load"] = cold_load(s3, WORK, args.repeats)
            print(json.dumps(results["cold_load"]["by_registry"], indent=2), flush=True)
    finally:
        s3.stop()
    for key in ("race_s3", "race_file"):
        results[key]["versions"] = f"{len(results[key]['versions'])} versions"
    print(f"wrote {common.save('registry_race', results)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
