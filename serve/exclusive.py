"""The exclusive path: an adapter without a serving form (``freeze``, ``full``: whole weight
matrices) is attached to the base by its method, generates its one request alone, and is detached.

The scheduler (:mod:`engine`) pauses the running batch meanwhile and turns the tokens into the
request's result; this module only runs the request.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from adapterhub.base import load_base
from adapterhub.errors import AdapterHubError, PluginError


def generate_alone(base: Any, device: torch.device, entry: Any, seq: Any, *, pad_id: int, eos_id: int,
                   aborted: Callable[[], bool]) -> list[int]:
    """``seq``'s new tokens with ``entry``'s adapter attached; generation stops early when the
    request is cancelled or late, or ``aborted()`` (a stop's grace ran out)."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # transformers loads with the base, not here

    class Abort(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            late = seq.deadline is not None and time.monotonic() > seq.deadline
            stop = seq.cancelled or late or aborted()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    try:
        model = entry.method.load(base_to_attach(base, device), entry.directory)
    except AdapterHubError:
        raise
    except Exception as exc:  # a plugin bug fails this request only, and says whose bug it is
        raise PluginError(
            f"method plugin {entry.method.name!r} ({entry.method.origin}) failed to load {entry.key}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        model.eval()
        p = seq.params
        ids = torch.tensor([seq.prompt_ids], device=device)
        kwargs: dict[str, Any] = {"do_sample": False}
        if p.temperature > 0:
            torch.manual_seed(p.seed & 0xFFFF_FFFF_FFFF_FFFF)  # as make_generator: a seed is 64 bits
            kwargs = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=eos_id,
                                 stopping_criteria=StoppingCriteriaList([Abort()]), **kwargs)
    finally:
        if base.quantize == "none":
            entry.method.detach(model)
        del model
    return out[0, len(seq.prompt_ids):].tolist()


def base_to_attach(base: Any, device: torch.device) -> Any:
    """The model the exclusive path attaches to.

    On a bitsandbytes-quantized base, PEFT attached after the base has run a forward pass gives
    wrong outputs on the CPU backend (logits off by ~3 on the tiny base; bnb repacks 4-bit
    weights on first use), and some methods cannot detach from a 4-bit base at all (PEFT IA3).
    So a quantized server loads a fresh copy of the base for each slow-path request: slow, but
    never wrong. A full-precision base is shared: attach, run, ``method.detach``.
    """
    if base.quantize == "none":
        return base.model
    return load_base(base.directory, base.quantize, device=str(device), dtype=base.dtype).model
