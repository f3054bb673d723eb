"""Next-token choice: greedy (argmax, as ``generate(do_sample=False)``) or seeded top-p sampling."""

from __future__ import annotations

import torch


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One row's next token from its last-position logits ``[vocab]``."""
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    logits = logits.float().cpu()
    # subtract the max first: a tiny temperature would otherwise turn logits into inf and probs into NaN
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_tokens(logits: torch.Tensor, params, generators) -> list[int]:
    """Every row's next token from ``[B, vocab]`` logits: one argmax call for all greedy rows."""
    greedy = logits.argmax(dim=-1).tolist()
    return [g if p.temperature <= 0 else next_token(row, p.temperature, p.top_p, gen)
            for g, row, p, gen in zip(greedy, logits, params, generators)]
