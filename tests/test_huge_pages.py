"""Transparent huge pages for torch's large tensors (``adapterhub.huge_pages``), each case in a fresh
interpreter: torch reads ``THP_MEM_ALLOC_ENABLE`` once, when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# a 64 MiB tensor, then this process's anonymous huge pages in kB (Linux)
PROBE = """
import torch
x = torch.ones(16 * 2**20)
print([int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])
"""


def thp_mode() -> str | None:
    if not THP.is_file() or not Path("/proc/self/smaps_rollup").is_file():
        return None
    text = THP.read_text()
    return text[text.find("[") + 1:text.find("]")]


def run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != huge_pages.ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_enable_sets_the_variable_only_before_torch_and_only_where_the_user_left_it_unset():
    check = "import os, sys\nfrom adapterhub import huge_pages\n{pre}print(huge_pages.enable(), os.environ.get('{env}'))"
    assert run(check.format(pre="", env=huge_pages.ENV)) == "True 1"
    assert run(check.format(pre="", env=huge_pages.ENV), **{huge_pages.ENV: "0"}) == "False 0"
    assert run(check.format(pre="import torch\n", env=huge_pages.ENV)) == "False None"


def test_the_command_enables_huge_pages_before_it_runs():
    code = ("import os\nfrom adapterhub.cli import main\nmain(['plugins'])\n"
            f"print('ENV', os.environ.get('{huge_pages.ENV}'))")
    assert run(code) == "ENV 1"


@pytest.mark.skipif(thp_mode() in (None, "never"), reason="no transparent huge pages on this machine")
def test_torch_puts_a_large_tensor_on_huge_pages_once_enabled():
    enabled = run("from adapterhub import huge_pages\nhuge_pages.enable()\n" + PROBE)
    assert int(enabled) >= 32 * 1024, f"only {enabled} kB of a 64 MiB tensor on huge pages"
    if thp_mode() == "madvise":  # only then does the variable decide (always: every large mapping)
        assert int(run(PROBE, **{huge_pages.ENV: "0"})) == 0
