"""Fixtures shared by several test modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedcare_ops.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fedcare(monkeypatch, capsys):
    """`fedcare ARGS...` -> (exit status, stdout, stderr)."""
    monkeypatch.chdir(ROOT)

    def command(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedcare", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out = capsys.readouterr()
        return exited.value.code, out.out, out.err

    return command
