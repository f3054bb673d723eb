"""LoRA over a mixed batch, one backend per device, chosen once when the engine starts.

Every backend computes the same thing, in place::

    out[t] += w[t] * (x[t] @ A_T[s[t]]) @ B_T[s[t]]      for every token t with s[t] != 0

``A_T [S, in, R]`` and ``B_T [S, R, out]`` are a slot pool's stacks (slot 0 is "no adapter",
ranks zero-padded), ``s``/``w`` the slot and weight of each token (:class:`TokenSlots`). The
plain-torch backend (:mod:`.reference`) runs on any device and is what every other backend is
tested against: the C kernel on the CPU (:mod:`.cpu_c`), Triton's SGMV-style kernels on CUDA
(:mod:`.triton_sgmv`). What a backend must do is :mod:`.contract`; this module only chooses.
"""

from __future__ import annotations

import torch

from adapterhub.errors import ConfigError

from ..options import LORA_BACKENDS as CHOICES
from . import cpu_c
from .contract import LoraBackend, Pending, TokenSlots
from .reference import TorchLora

__all__ = ["CHOICES", "LoraBackend", "Pending", "TokenSlots", "select"]


def select(device: torch.device | str, choice: str = "auto", *, overlap: bool | None = False) -> LoraBackend:
    """The backend for ``device``, chosen once: ``auto`` = the C kernel on the CPU (where built),
    Triton on CUDA (where installed), else the plain-torch reference. A named one that cannot run
    there is a ConfigError naming what to use instead. ``overlap`` (the C kernel's: its LoRA on a
    core of its own beside the base layers): None = when torch's threads leave a core unused."""
    kind = torch.device(device).type
    has_triton = False
    if kind == "cuda":  # triton is imported only where it may run
        try:
            from . import triton_sgmv
            has_triton = triton_sgmv.available()
        except ImportError:
            pass
    if choice not in CHOICES:
        raise ConfigError(f"--lora-backend {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "auto":
        choice = ("c" if kind == "cpu" and cpu_c.available() else
                  "triton" if kind == "cuda" and has_triton else "torch")
    if choice == "c":
        if kind != "cpu" or not cpu_c.available():
            raise ConfigError(f"--lora-backend c runs on the CPU with the C extension built "
                              f"(device {device}, built: {cpu_c.available()}); use auto or torch")
        return cpu_c.CLora(overlap=cpu_c.spare_core() if overlap is None else overlap)
    if choice == "triton":
        if kind != "cuda" or not has_triton:
            raise ConfigError(f"--lora-backend triton runs on CUDA with triton installed (device {device}); "
                              "use auto or torch")
        return triton_sgmv.TritonLora()
    return TorchLora()
