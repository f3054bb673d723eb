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


def next_tokens(logits: torch.Tensor, params, generators) -> list[int | Exception]:
    """Every row's next token from ``[B, vocab]`` logits, or the error that row alone hit (its logits
    are not finite, or sampling raised), so one bad row never costs the others theirs.

    One max for all greedy rows (its indices are argmax's), read from the device together with
    whether each row's logits are finite, and the sampled rows' logits brought to the host in one
    copy (their generators are host generators, so a seed gives the same tokens on every device):
    at most two reads from the device a step."""
    top, greedy = logits.max(dim=-1)  # max propagates NaN: a row with any NaN has a NaN top
    tokens, finite = torch.stack([greedy, torch.isfinite(top).long()]).tolist()
    out: list[int | Exception] = [t if ok else NonFiniteLogits("its logits are not finite (NaN or inf)")
                                  for t, ok in zip(tokens, finite)]
    sampled = [i for i, p in enumerate(params) if p.temperature > 0 and finite[i]]
    if not sampled:
        return out
    rows = logits[sampled].float().cpu()
    for row, i in zip(rows, sampled):
        try:
            out[i] = next_token(row, params[i].temperature, params[i].top_p, generators[i])
        except Exception as exc:  # noqa: BLE001 -- this row's own failure, reported to its request alone
            out[i] = exc
    return out


class NonFiniteLogits(ArithmeticError):
    """A row's logits hold NaN or inf: its adapters' numbers (or its input) overflowed."""
