"""Offline generation and exact-match evaluation (the reference the server is checked against)."""

from __future__ import annotations

from typing import Any

from .data import render_prompt


def generate_texts(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers for chat conversations, batched with left padding."""
    import torch

    prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    answers: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            device = next(model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    finally:
        tokenizer.padding_side = old_side
    return answers


def exact_match(model: Any, tokenizer: Any, examples: list[list[dict[str, str]]], **kwargs: Any) -> float:
    """Share of examples whose greedy answer equals the reference answer (whitespace-trimmed)."""
    prompts = [messages[:-1] for messages in examples]
    references = [messages[-1]["content"].strip() for messages in examples]
    answers = generate_texts(model, tokenizer, prompts, **kwargs)
    return sum(a == r for a, r in zip(answers, references)) / max(1, len(references))
