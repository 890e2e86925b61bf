"""Run a role's processes together and end them together: what the entry point becomes once checked.

A coordinator is the SuperLink (on loopback) and the public Fleet port in front of it; a site is the
SuperNode and the site's executor with its gate. If either process of a pair exits, the other is
stopped and the container exits with the first one's status, so Docker's restart policy brings the
whole role back rather than leaving half of it running. SIGTERM and SIGINT are passed on to both.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

GRACE_SECONDS = 10.0


def supervise(commands: Mapping[str, Sequence[str]], env: Mapping[str, str]) -> int:
    """Start every command; when one exits, stop the rest; return the first exit status."""
    processes: dict[str, subprocess.Popen] = {}

    def forward(signum: int, _frame: object) -> None:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for name, command in commands.items():
        processes[name] = subprocess.Popen(list(command), env=dict(env))
        sys.stdout.flush()
    status = None
    while status is None:
        for name, process in processes.items():
            if process.poll() is not None:
                status = process.returncode
                print(f"fedcare: {name} exited with status {status}; stopping the others", file=sys.stderr,
                      flush=True)
                break
        else:
            time.sleep(0.5)
    _stop(processes.values())
    return status


def _stop(processes: Iterable[subprocess.Popen]) -> None:
    live = [p for p in processes if p.poll() is None]
    for process in live:
        process.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for process in live:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
