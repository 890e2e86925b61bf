"""What `fedcare run` shows of Flower's output: every line, with the notices that do not apply explained.

Flower's simulation process logs, before any of the app runs, that its default number of simulated
SuperNodes changed and how to resize a federation; `fedcare run` always sets the number from
`--sites`. Ray, which runs the simulated sites, warns that it will stop hiding GPUs from actors that
reserve none; fedcare sets each site's share with `--gpus`, and a site decides its own device. Each
such notice is replaced by one line that says why it is expected; the lines that only follow it up
are dropped. Everything else is copied as it comes.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

__all__ = ["FlowerOutput", "Notice", "NOTICES", "stream"]


@dataclass(frozen=True)
class Notice:
    """A notice in Flower's output: the text that marks it, what it means here, and its follow-up lines."""

    marker: str
    why: str
    follow_ups: tuple[str, ...] = ()


NOTICES = (
    Notice("default simulated SuperNodes changed",
           "fedcare: Flower's notice about its default number of simulated SuperNodes does not apply: "
           "`fedcare run` sets it from --sites ({sites} here)",
           ("To change federation size, use the following command", "flwr federation simulation-config")),
    Notice("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
           "fedcare: Ray's notice about GPU visibility is expected: a simulated site sees a GPU only when "
           "`fedcare run --gpus` gives it a share, and then trains where its own `device` setting says",
           ("warnings.warn(",)),
)


class FlowerOutput:
    """Copies Flower's lines to `sink`, one explanation in place of each notice of NOTICES.

    A notice's follow-up lines are dropped only within the few lines after it, so that the same
    words elsewhere (another warning's `warnings.warn(`) still show."""

    def __init__(self, sink: TextIO, sites: int, notices: Sequence[Notice] = NOTICES, reach: int = 3) -> None:
        self.sink, self.sites, self.notices, self.reach = sink, sites, notices, reach
        self.follow_ups: tuple[str, ...] = ()
        self.left = 0  # lines after the last notice in which its follow-ups are still dropped

    def __call__(self, line: str) -> None:
        notice = next((n for n in self.notices if n.marker in line), None)
        self.left -= 1
        if notice is not None:
            self.follow_ups, self.left = notice.follow_ups, self.reach
            self.sink.write(notice.why.format(sites=self.sites) + "\n")
        elif self.left >= 0 and any(follow_up in line for follow_up in self.follow_ups):
            return
        else:
            self.sink.write(line)
        self.sink.flush()


def _copy(source: IO[str], output: FlowerOutput) -> None:
    for line in source:
        output(line)


def stream(command: Sequence[str], *, cwd: Path, env: dict[str, str], output: FlowerOutput) -> tuple[int, threading.Thread]:
    """Run `command` with stdout and stderr as one stream through `output`; returns (exit status, the
    copying thread). Processes it starts detached may hold the stream open: stop them, then join the thread."""
    process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1)
    copying = threading.Thread(target=_copy, args=(process.stdout, output), daemon=True)
    copying.start()
    try:
        return process.wait(), copying
    except BaseException:
        process.terminate()
        raise
