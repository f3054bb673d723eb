"""Transparent huge pages for torch's large CPU tensors, in the processes the ``adapterhub`` command runs.

A decode step streams every weight of the base once (540 MB for SmolLM2-135M in float32), and
with 4 KiB pages that read spends its time on TLB misses. PyTorch backs each CPU allocation of
2 MiB or more with huge pages (``madvise``) when ``THP_MEM_ALLOC_ENABLE=1``. It reads the variable
once, at its first allocation (during ``import torch``), so the command sets it before anything
imports torch. The engine's decode step took 0.97 of the time without (16 rows, fp32, one thread,
fresh processes in ABBA rounds: ``bench/huge_pages.py``), tokens/s 1.02. A value the user set,
``0`` included, is kept. Linux without THP (``never``) ignores the advice; other systems never read
the variable.
"""

from __future__ import annotations

import os
import sys

ENV = "THP_MEM_ALLOC_ENABLE"


def enable() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for this process and its children; False where it was already
    set (the user's choice stands) or torch is already imported (too late: it has read it)."""
    if ENV in os.environ or "torch" in sys.modules:
        return False
    os.environ[ENV] = "1"
    return True
