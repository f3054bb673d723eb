"""What the objective test modules share: JSONL files and the CLI run in-process with its output."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from adapterhub.cli import main


def write(path: Path, rows: list) -> Path:
    """One JSON object (or a raw string, for bad lines) a line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(*args: str) -> tuple[int, str, str]:
    """``adapterhub ARGS``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()
