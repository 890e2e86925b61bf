"""A check shared by the tests of commands: a user mistake ends in one line on stderr and exit status 1."""

from __future__ import annotations

import subprocess


def one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
