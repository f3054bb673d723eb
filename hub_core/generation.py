"""Offline greedy generation and exact-match evaluation.

Decoding calls the model's own forward pass token by token, on batches of prompts that have the
same length, so no padding or position bookkeeping can differ between methods. It does not use
``model.generate``: with peft 0.21 and transformers 5, ``generate`` on a prefix-tuned model ignores
the prefix, while the forward pass applies it. The cost (no KV cache) is fine for the small
evaluation sets this is used for.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .chat import render_prompt


def greedy_tokens(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int,
                  batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations (without the prompt), stopping at the tokenizer's eos token."""
    import torch

    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            with torch.inference_mode():
                for _ in range(max_new_tokens):
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :]
                    nxt = logits.argmax(dim=-1)
                    for row, i in enumerate(chunk):
                        if not done[row]:
                            outputs[i].append(int(nxt[row]))
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
    return outputs


def generate_texts(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *,
                   max_new_tokens: int = 32, batch_size: int = 64) -> list[str]:
    """Greedy answers for chat conversations (rendered with the chat template)."""
    prompts = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in conversations]
    tokens = greedy_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def exact_match(model: Any, tokenizer: Any, examples: list[list[dict[str, str]]], **kwargs: Any) -> float:
    """Share of examples whose greedy answer equals the reference answer (whitespace-trimmed)."""
    prompts = [messages[:-1] for messages in examples]
    references = [messages[-1]["content"].strip() for messages in examples]
    answers = generate_texts(model, tokenizer, prompts, **kwargs)
    return sum(a == r for a, r in zip(answers, references)) / max(1, len(references))
