"""Helpers the tests import (conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write_slice(src: Path, dst: Path, n_lines: int) -> Path:
    """The first n_lines users of an S3-Rec file."""
    with open(src) as f:
        lines = [next(f) for _ in range(n_lines)]
    dst.write_text("".join(lines))
    return dst


def e4srec(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `e4srec` CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "e4srec.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, **(env or {})}, timeout=600,
    )
