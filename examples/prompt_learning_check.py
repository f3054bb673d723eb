"""Served vs PEFT for prompt-learning adapters (prefix, prompt, P-tuning): logits and answers.

    python examples/prompt_learning_check.py --registry DIR --refs task@1,... --data DIR [--base DIR]
                                              [--n 50] [--json bench/results/prompt_learning_check.json]

For each reference, on the full-precision base and the same chat prompts (``DIR/train.jsonl`` and
``DIR/test.jsonl``, as written by ``adapterhub.tasks.write_split``):

* next-token logits of the real engine's prefill (``serve.Engine``, the mixed-batch path) against
  the method's own uncached forward (the exported adapter under plain ``PeftModel.from_pretrained``):
  largest absolute difference and argmax agreement;
* exact match of four greedy decoders: the engine, PEFT's forward token by token (no cache),
  plain ``PeftModel.generate`` as a user calls it, and ``generate(..., use_cache=False)``.

The adapter is exported with the registry's own export (what ``adapterhub registry export`` writes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def prompts_of(path: Path, tokenizer, n: int) -> tuple[list, list[list[int]], list[str]]:
    from adapterhub.data import read_examples, render_prompt

    examples = read_examples(path)[:n]
    ids = [tokenizer(render_prompt(tokenizer, m[:-1]), add_special_tokens=False)["input_ids"] for m in examples]
    return [m[:-1] for m in examples], ids, [m[-1]["content"].strip() for m in examples]


def served(engine, ref: str, conversations: list, max_new: int) -> tuple[list, list[list[int]]]:
    """The engine's first-step logits and greedy tokens for each prompt (one request at a time)."""
    from adapterhub.serve.requests import GenerationRequest

    seen: list = []
    emit = engine._emit

    def record(rows, logits):  # the engine's own logits, as it picks tokens from them
        seen.append(logits.detach().clone())
        emit(rows, logits)

    engine._emit = record
    firsts, tokens = [], []
    try:
        for messages in conversations:
            seen.clear()
            request = GenerationRequest.build(messages=[(m["role"], m["content"]) for m in messages],
                                              adapters=[(ref, 1.0)], max_new_tokens=max_new)
            tokens.append(list(engine.submit(request, stream=False).result().token_ids))
            firsts.append(seen[0][0])
    finally:
        engine._emit = emit
    return firsts, tokens


def main() -> None:
    import torch
    from peft import PeftModel

    from adapterhub.base import load_base
    from adapterhub.generation import greedy_tokens
    from adapterhub.registry import open_registry
    from adapterhub.registry.transfer import export_dir
    from adapterhub.serve.adapter_source import AdapterSource
    from adapterhub.serve.engine import Engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(Path.home() / ".cache/adapterhub/smollm2-135m-instruct"))
    parser.add_argument("--registry", required=True)
    parser.add_argument("--refs", required=True, help="comma-separated adapter references")
    parser.add_argument("--data", required=True, help="directory with train.jsonl and test.jsonl")
    parser.add_argument("--n", type=int, default=50, help="prompts per split")
    parser.add_argument("--max-new", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()

    base = load_base(args.base, "none")
    tokenizer = base.tokenizer
    store = open_registry(args.registry)
    engine = Engine.create(base, AdapterSource(args.registry), capacity=4)
    results = {"base": args.base, "n": args.n, "max_new_tokens": args.max_new, "adapters": {}}
    eos = tokenizer.eos_token_id

    def text(tokens):
        return tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True).strip()

    try:
        for ref in args.refs.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                exported = export_dir(store, ref, Path(tmp) / "export")
                peft = PeftModel.from_pretrained(load_base(args.base, "none").model, str(exported))
                peft.eval()
                row = {"method": store.manifest(ref).method}
                for split in ("train", "test"):
                    chats, prompts, refs = prompts_of(Path(args.data) / f"{split}.jsonl", tokenizer, args.n)
                    first, engine_tokens = served(engine, ref, chats, args.max_new)
                    diffs, agree = [], 0
                    with torch.inference_mode():
                        for ids, logits in zip(prompts, first):
                            x = torch.tensor([ids])
                            own = peft(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
                            diffs.append(float((own - logits).abs().max()))
                            agree += int(own.argmax() == logits.argmax())
                    forward = greedy_tokens(peft, tokenizer, prompts, max_new_tokens=args.max_new)
                    decoders = {"engine": engine_tokens, "peft_forward": forward}
                    for name, kwargs in (("peft_generate", {}), ("peft_generate_no_cache", {"use_cache": False})):
                        outs = []
                        with torch.inference_mode():
                            for ids in prompts:
                                x = torch.tensor([ids])
                                out = peft.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                                    max_new_tokens=args.max_new, do_sample=False, **kwargs)
                                outs.append(out[0, x.shape[1]:].tolist())
                        decoders[name] = outs
                    row[split] = {
                        "served_vs_forward_max_abs_logit_diff": max(diffs),
                        "served_vs_forward_argmax_agree": agree / len(prompts),
                        "exact_match": {k: sum(text(t) == r for t, r in zip(v, refs)) / len(refs)
                                        for k, v in decoders.items()},
                        "same_tokens_as_forward": {k: sum(_cut(a, eos) == _cut(b, eos) for a, b in zip(v, forward))
                                                   / len(refs) for k, v in decoders.items()},
                        "example": {k: text(v[0]) for k, v in decoders.items()} | {"reference": refs[0]},
                    }
                    print(ref, split, json.dumps(row[split]), flush=True)
                results["adapters"][ref] = row
    finally:
        engine.stop(grace=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


if __name__ == "__main__":
    main()
