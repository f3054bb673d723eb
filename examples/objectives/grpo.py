"""GRPO on the real base: does the average verifiable reward on held-out prompts rise?

    python examples/objectives/grpo.py [--base DIR] [--steps 40] [--method lora]

Prompts are the project's ``json`` task questions (hub_core/tasks.py: capitals, sums, opposites)
with the instruction "Answer in at most 3 words."; held-out questions are disjoint from the
training ones. The reward, :func:`correct_and_brief` below (passed as ``path/grpo.py:function``),
is verifiable: 0 unless the right answer (the data's ``keyword`` column) appears as a word, then
0.5 + 0.5 x the built-in ``max_words`` (1 for at most 3 words, 3/n for n words). The task has
few capital and opposite questions and the training prompts use them up, so the held-out prompts
are sums.

Brevity must pay only when the answer is right. Summing the built-ins instead was hacked in
earlier runs of this script: ``keyword,max_words`` (lr 2e-3) learned one-"word" gibberish
(max_words 1.0, keyword 0.0), ``2*keyword,max_words`` (lr 1e-3) short wrong equations ("20 = 56":
held-out greedy keyword 0.40 -> 0.04), since brevity differs within every group of samples and
correctness rarely does.

Measured on the held-out prompts before (the base: a fresh LoRA equals it) and after training:
the mean reward (and each part) of greedy answers, and of 2 answers sampled per prompt at the
training temperature (what GRPO optimises). Generation here uses transformers ``generate`` with its KV cache,
as GRPO's own sampling does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import real_base, save_results, write_jsonl  # noqa: E402

MAX_WORDS = 3
INSTRUCTION = f"Answer in at most {MAX_WORDS} words."
COMPLETION_TOKENS = 16
SAMPLES = 2
TEMPERATURE = 0.7


def prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    from adapterhub.tasks import make_examples

    rows, seen = [], set(exclude)
    for example in make_examples("json", n * 20, seed=seed):  # held-out ones skip many seen questions
        question = example["instruction"]
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": f"{question} {INSTRUCTION}", "keyword": json.loads(example["output"])["answer"],
                     "max_words": MAX_WORDS})
        if len(rows) == n:
            break
    return rows


def correct_and_brief(completions: list, *, keyword: list, max_words: list, **kwargs) -> list[float]:
    """0 for a wrong answer; 0.5 + 0.5 x the max_words reward for a right one (TRL's signature)."""
    from adapterhub import rewards

    right = rewards.keyword(completions, keyword=keyword)
    brief = rewards.max_words(completions, max_words=max_words)
    return [0.0 if r == 0 else r * (0.5 + 0.5 * b) for r, b in zip(right, brief)]


def answers(model, tokenizer, rows: list[dict], *, samples: int, seed: int = 0, batch_size: int = 16) -> list[str]:
    """``samples`` answers per row: greedy when 1, else sampled as GRPO samples."""
    import torch

    from adapterhub.data import render_prompt

    tokenizer.padding_side = "left"
    texts = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        sampling = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0} if samples > 1 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            ids = model.generate(**batch, max_new_tokens=COMPLETION_TOKENS, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in out]


def measure(model, tokenizer, rows: list[dict], *, samples: int) -> dict:
    from adapterhub.rewards import keyword, max_words

    texts = answers(model, tokenizer, rows, samples=samples)
    repeated = [row for row in rows for _ in range(samples)]
    correct = keyword(texts, keyword=[r["keyword"] for r in repeated])
    brief = max_words(texts, max_words=[r["max_words"] for r in repeated])
    n = len(texts)
    reward = correct_and_brief(texts, keyword=[r["keyword"] for r in repeated],
                               max_words=[r["max_words"] for r in repeated])
    return {"reward": round(sum(reward) / n, 4),
            "keyword": round(sum(correct) / n, 4), "max_words": round(sum(brief) / n, 4),
            "mean_words": round(sum(len(t.split()) for t in texts) / n, 2),
            "sample_answers": [f"{r['prompt']} -> {t}" for r, t in list(zip(repeated, texts))[:: max(1, n // 4)][:4]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="/work/bases/smollm2-135m-instruct" if Path(
        "/work/bases/smollm2-135m-instruct").is_dir() else None)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="answers per step: 2 prompts x num_generations=4")
    parser.add_argument("--dtype", default="float32", help="float32: bfloat16 matmuls are many times slower on "
                                                            "CPUs without bf16 units (the base is stored in bf16)")
    parser.add_argument("--train-prompts", type=int, default=200)
    parser.add_argument("--test-prompts", type=int, default=32)
    args = parser.parse_args()

    from adapterhub.adapters import load_adapter
    from adapterhub.base import load_base
    from adapterhub.cli import main as cli

    script_started = time.perf_counter()
    base_dir = real_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="grpo-measure-"))
    train_rows = prompts(args.train_prompts, seed=1)
    test_rows = prompts(args.test_prompts, seed=2, exclude={r["prompt"].removesuffix(" " + INSTRUCTION)
                                                            for r in train_rows})
    data = write_jsonl(work / "prompts.jsonl", train_rows)

    base = load_base(base_dir, "none", dtype=args.dtype)
    before = {"greedy": measure(base.model, base.tokenizer, test_rows, samples=1),
              "sampled": measure(base.model, base.tokenizer, test_rows, samples=SAMPLES)}
    print(json.dumps({"before": before}, indent=2), flush=True)
    del base
    config = {"reward": f"{Path(__file__).resolve()}:correct_and_brief", "num_generations": 4,
              "temperature": TEMPERATURE, "max_completion_length": COMPLETION_TOKENS}
    started = time.perf_counter()
    assert cli(["train", "--plugin", args.method, "--objective", "grpo",
                *[a for k, v in config.items() for a in ("--objective-set", f"{k}={v}")],
                "--base", str(base_dir), "--dtype", args.dtype, "--data", str(data), "--no-publish",
                "--output", str(work / "adapter"), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--warmup-steps", "1", "--logging-steps", "1", "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    trained = load_base(base_dir, "none", dtype=args.dtype)
    _, model = load_adapter(trained.model, work / "adapter")
    after = {"greedy": measure(model, trained.tokenizer, test_rows, samples=1),
             "sampled": measure(model, trained.tokenizer, test_rows, samples=SAMPLES)}
    meta = json.loads((work / "adapter" / "adapterhub.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    save_results("grpo", {
        "base": str(base_dir), "method": args.method, "objective": "grpo",
        "config": {**config, "reward": "examples/objectives/grpo.py:correct_and_brief"},
        "steps": args.steps, "lr": args.lr, "dtype": args.dtype, "batch_size": args.batch_size,
        "train_prompts": len(train_rows), "test_prompts": len(test_rows), "train_seconds": round(seconds, 1),
        "script_seconds": round(time.perf_counter() - script_started, 1),
        "train_reward_start": meta["metrics"].get("train_reward_start"),
        "train_reward_end": meta["metrics"].get("train_reward_end"),
        "lineage": {k: v for k, v in meta["training"]["objective"].items() if k != "config"},
        "before": before, "after": after,
    })

if __name__ == "__main__":
    main()
