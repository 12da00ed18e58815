"""Paths of the real checkers (installed by `make tools` into .venv-tools, Python 3.12)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".venv-tools" / "bin"


def tool(name: str) -> Path:
    """Path of a checker from .venv-tools; fails (never skips) with how to install it."""
    path = TOOLS_BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make tools` (tools-requirements.txt) to install the checkers")
    return path


def run(cmd: list[str | Path], *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a checker offline; its output is returned for the assertions to quote."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)
