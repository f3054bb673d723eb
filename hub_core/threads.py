"""``--threads N`` for the commands that run the model in this process (``train``, ``merge``, ``score``).

One thread by default, like ``train --threads``: on a 2-core machine torch's default (one busy-waiting
OpenMP thread per core) collapsed beside a busy neighbour (``bench/train_threads.py``). No torch at
import: the CLI parser reads this module.
"""

from __future__ import annotations

import argparse

from .errors import ConfigError

DEFAULT = 1
HELP = ("torch CPU threads (default 1: torch's default of one per core collapses when another process holds a "
        "core, bench/results/train_threads.json); raise it on a quiet machine with many cores")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` with the shared default and help."""
    parser.add_argument("--threads", type=int, default=DEFAULT, metavar="N", help=HELP)


def use_threads(n: int) -> None:
    """Run torch on ``n`` CPU threads from now on (call it before the model loads)."""
    if n < 1:
        raise ConfigError(f"--threads {n} must be >= 1")
    import torch

    torch.set_num_threads(n)
