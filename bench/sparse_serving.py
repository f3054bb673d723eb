"""Sparse (SHiRA) adapters served in the mixed batch vs the exclusive path, with LoRA at equal
trainable parameters beside them.

    python -m bench.sparse_serving

Small base (6 layers, hidden 512), full precision, one engine. Four sparse adapters (r=8 on every
Linear of the decoder layers, values random: each costs what a trained one costs) are published
twice: as ``sparse`` (served per row by the sparse kind) and under a plugin that is the same method
without a serving form (the exclusive path that ``freeze``/``full`` take: attach, generate alone,
detach). Four LoRA adapters of rank 8 on the same modules (the same parameter count) and the base
alone are the references. Each workload: 8 concurrent requests, 2 per adapter, 16 new greedy
tokens each; medians of 2 rounds after a warm-up (kept small: the 2 cores here are shared). The
mixed and exclusive answers are compared token for token. Writes ``bench/results/sparse_serving.json``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time

from . import common

ADAPTERS, PER_ADAPTER, NEW_TOKENS, ROUNDS = 4, 2, 16, 2


class ExclusiveSparse:
    """The sparse method without a serving form: the server takes the exclusive path."""

    @staticmethod
    def make():
        import dataclasses

        from adapterhub.plugins.sparse import SparseMethod

        class NoFormSparse(SparseMethod):
            name = "sparse-exclusive"
            peft_type = None
            capabilities = dataclasses.replace(SparseMethod.capabilities, mixed_batch=False, composable=False)

            def serving_form(self, files, base_config):
                return None

        return NoFormSparse()

    @__import__("adapterhub").hookimpl
    def adapterhub_register_methods(self, register):
        register(self.make())


def _registry(base):
    """Tasks s0..s3 (sparse), x0..x3 (the same files as sparse-exclusive), l0..l3 (LoRA r=8)."""
    import torch

    from adapterhub.adapters import save_adapter
    from adapterhub.base import fingerprint, load_base
    from adapterhub.manager import PluginManager
    from adapterhub.registry import open_registry

    home = common.OUT / "sparse_serving"
    store = open_registry(home / "registry")
    if "l3" in store.list_tasks():
        return home / "registry"
    meta = {"name": "small", "fingerprint": fingerprint(base)}
    manager = PluginManager(autoload=False)
    for method_name, prefix, trained in [("sparse", "s", "shira_weight"), ("lora", "l", "lora_B")]:
        method = manager.get_method(method_name)
        config = method.make_config({"r": 8})
        model = method.attach(load_base(base, "none").model, config)
        for i in range(ADAPTERS):
            gen = torch.Generator().manual_seed(100 * i + len(prefix))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if trained in name:
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            out = save_adapter(method, model, config, home / f"{prefix}{i}", base=meta)
            store.publish(f"{prefix}{i}", out)
            if method_name == "sparse":
                copy = home / f"x{i}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(out, copy)
                described = json.loads((copy / "adapterhub.json").read_text())
                described["method"] = "sparse-exclusive"
                (copy / "adapterhub.json").write_text(json.dumps(described))
                store.publish(f"x{i}", copy)
    return home / "registry"


def _workload(engine, prefix: str | None) -> dict:
    from adapterhub.serve.requests import GenerationRequest

    jobs = [(f"{prefix}{i % ADAPTERS}@1" if prefix else None, f"request {i} about the day")
            for i in range(ADAPTERS * PER_ADAPTER)]
    answers: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs) + 1)

    def run(k: int) -> None:
        ref, prompt = jobs[k]
        barrier.wait()
        request = GenerationRequest.build(prompt=prompt, adapters=[(ref, 1.0)] if ref else [], max_new_tokens=NEW_TOKENS)
        answers[k] = list(engine.submit(request).result().token_ids)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    tokens = sum(len(a) for a in answers)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "answers": answers}


def main() -> dict:
    from adapterhub.base import load_base
    from adapterhub.manager import get_manager
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    common.threads()
    base = common.small_base()
    registry = _registry(base)
    get_manager().register(ExclusiveSparse(), name="sparse-exclusive-bench")
    # LoRA's overlap (its C kernel on the spare core) stalls beside busy neighbours on the 2 shared cores
    # here (bench/serve_threads.py): off, so the LoRA reference measures the kernel, not the neighbours
    engine = Engine.create(load_base(base, "none"), AdapterSource(registry), capacity=16, max_batch=32,
                           lora_overlap=False)
    workloads = {"base": None, "lora r=8 (mixed)": "l", "sparse r=8 (mixed)": "s", "sparse r=8 (exclusive)": "x"}
    runs: dict[str, list[dict]] = {name: [] for name in workloads}
    try:
        for name, prefix in workloads.items():
            _workload(engine, prefix)  # warm-up: loads the adapters
            for _ in range(ROUNDS):
                runs[name].append(_workload(engine, prefix))
    finally:
        engine.stop(grace=1)
        get_manager().unregister("sparse-exclusive-bench")
    same = runs["sparse r=8 (mixed)"][0]["answers"] == runs["sparse r=8 (exclusive)"][0]["answers"]
    differs = runs["sparse r=8 (mixed)"][0]["answers"] != runs["base"][0]["answers"]
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "tokens_per_s")}
              for name, rs in runs.items()}
    mixed, exclusive = median["sparse r=8 (mixed)"], median["sparse r=8 (exclusive)"]
    print(common.table(["workload", "seconds", "tokens/s"],
                       [[name, m["seconds"], m["tokens_per_s"]] for name, m in median.items()]))
    print(f"mixed answers equal the exclusive path's: {same}; they differ from the base's: {differs}")
    results = {
        "requests": ADAPTERS * PER_ADAPTER, "adapters": ADAPTERS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
        "median": median, "mixed_equals_exclusive": same, "sparse_changes_answers": differs,
        "rounds_seconds": {name: [r["seconds"] for r in rs] for name, rs in runs.items()},
        "targets": [common.verdict("exclusive seconds / mixed seconds (sparse)", exclusive["seconds"] / mixed["seconds"],
                                   ">=", 1.0)],
    }
    common.save("sparse_serving", results)
    return results


if __name__ == "__main__":
    main()
