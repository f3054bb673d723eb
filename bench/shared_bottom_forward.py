"""Does a top trained ``--on`` a bottom learn against what the server runs? Logit gaps on a real base.

    python bench/shared_bottom_forward.py [--base DIR] [--bottoms lora,bitfit,ia3,dora] [--steps 3]
                                          [--json bench/results/shared_bottom_forward.json]

For each bottom method: a bottom trained ``--steps`` steps on sentiment, a LoRA top trained
``--on`` it on topic (both through ``adapterhub train``'s pipeline, into a temporary registry),
then for a few topic prompts the largest last-token logit difference between

- ``fold``: the bottom merged into the base weights and the top on it (what training ran), and
- ``served``: the server's engine composing the two (what ``model=topic@1`` gets), and
- ``top alone``: the engine applying the top without its bottom (how far off serving would be
  without ``requires``).

Methods declaring ``foldable_bottom`` should be at float32 rounding; the others are refused by
``train --on`` (here they are trained around that refusal, by folding them by hand, to show why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub" / "smollm2-135m-instruct"
PROMPTS = ("the team saw a goal", "my old drum band", "we had bread and soup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(DEFAULT_CACHE), help="base directory (adapterhub base init)")
    parser.add_argument("--bottoms", default="lora,bitfit,ia3,dora", help="bottom methods, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="training steps of each bottom and top")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "shared_bottom_forward.json"))
    args = parser.parse_args()

    import torch

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.chat import render_prompt
    from adapterhub.manager import get_manager
    from adapterhub.pipeline import train_and_publish
    from adapterhub.registry import open_registry
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.batch_plan import BatchPlan
    from adapterhub.serve.engine import Engine
    from adapterhub.stacking import fold_bottoms
    from adapterhub.tasks import write_split
    from adapterhub.training import TrainOptions

    work = Path(tempfile.mkdtemp(prefix="adapterhub-bottom-forward-"))
    registry = str(work / "registry")
    data = {t: str(write_split(t, work / t, n_train=32, n_test=2)[0]) for t in ("sentiment", "topic")}
    manager = get_manager()
    results = {"base": args.base, "steps": args.steps, "machine": platform.machine(), "cpus": os.cpu_count(),
               "bottoms": {}}

    def train(method_name: str, task: str, file: str, lr: float, on: str | None = None) -> str:
        method = manager.get_method(method_name)
        options = TrainOptions.for_method(method, {"progress": False, "seed": 0, "max_steps": args.steps,
                                                   "batch_size": 4, "lr": lr, "threads": args.threads})
        top = {"base": args.base, "data": file, "task": task, "registry": registry, "on_adapter": on}
        return train_and_publish(method, method.make_config({}), options, top).reference

    started = time.perf_counter()
    try:
        tokenizer = load_base(args.base).tokenizer
        prompts = [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": f"topic?\n\n{p}"}]),
                             add_special_tokens=False, return_tensors="pt")["input_ids"] for p in PROMPTS]
        for name in args.bottoms.split(","):
            bottom = train(name, f"b-{name}", data["sentiment"], lr=5e-3 if name != "ia3" else 5e-2)
            foldable = manager.get_method(name).foldable_bottom
            if foldable:
                top = train("lora", f"t-{name}", data["topic"], lr=2e-3, on=bottom)
            else:  # train --on refuses it: publish a top trained on the base alone, to compare the forwards
                top = train("lora", f"t-{name}", data["topic"], lr=2e-3)
            store = open_registry(registry)
            base = load_base(args.base, "none")
            fold_bottoms(base, [store.manifest(bottom)], registry)
            _, folded = load_adapter(base.model, store.materialize(top))
            engine = Engine.create(load_base(args.base, "none"), AdapterSource(registry), capacity=4)
            entries = [(engine.cache.acquire(r), 1.0) for r in (bottom, top)]
            gaps = {"served": 0.0, "top alone": 0.0}
            try:
                for ids in prompts:
                    with torch.no_grad():
                        fold = folded(input_ids=ids).logits[0, -1].float()
                    positions = torch.arange(ids.shape[1])[None]
                    for label, rows in (("served", entries), ("top alone", entries[1:])):
                        plan = BatchPlan([rows], engine.pool, engine.device, backend=engine.backend)
                        out = engine.passes.forward(plan, ids, torch.ones_like(ids), positions, None)[0]
                        gaps[label] = max(gaps[label], (out - fold).abs().max().item())
            finally:
                for entry, _ in entries:
                    engine.cache.release(entry)
                engine.stop(grace=1)
            results["bottoms"][name] = {"foldable_bottom": foldable, "bottom": bottom, "top": top,
                                        "max_abs_logit_gap": gaps,
                                        "logit_scale": round(fold.abs().max().item(), 2)}
            print(name, results["bottoms"][name], flush=True)
            write(args.json, results)  # after each bottom: a run cut short keeps what it measured
            del base, folded, engine
            torch.set_num_threads(args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    write(args.json, results)
    print(json.dumps(results["bottoms"], indent=1))


def write(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
