"""Start Flower processes in their own process groups and stop every one of them, whatever happens;
and the free loopback ports they listen on. Used by the local simulation and the loopback deployment.

Each SuperLink and SuperNode forks helpers (SuperExec, the ServerApp, ClientApps), and Flower starts
some of them in sessions of their own, so a process group alone does not reach them all. Every
process started here carries a tag in its environment, which its helpers inherit: stopping means
SIGTERM to the group, a grace period, then SIGKILL to every process still carrying the tag.
`Processes` is a context manager so a failure or Ctrl-C mid-federation leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedcare.errors import FedcareError


TAG = "FEDCARE_PROCESS_TAG"


class Processes:
    """The processes one federation started, each with its log file, stopped together on exit."""

    def __init__(self) -> None:
        self.started: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.tag = uuid.uuid4().hex

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str], log: Path,
              cwd: Path | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(list(command), env=dict(env) | {TAG: f"{self.tag}/{name}"}, cwd=cwd,
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.started[name], self.logs[name] = process, log
        return process

    def kill(self, name: str) -> None:
        """Kill one process and all its helpers at once, as a power cut or `docker kill` would."""
        self.stop(name, grace=0.0)

    def stop(self, name: str, grace: float = 10.0) -> None:
        process = self.started[name]
        if grace > 0:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(process, signal.SIGKILL)
        for pid in tagged_pids(f"{self.tag}/{name}", exact=True):
            _kill(pid)
        process.wait()
        # A helper in a session of its own (a site's ClientApp process) is killed above, but the kernel
        # may take a moment to end it: return once nothing of `name` is left.
        deadline = time.monotonic() + 10.0
        while tagged_pids(f"{self.tag}/{name}", exact=True) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)

    def pids(self) -> list[int]:
        """Every live process started here or by a helper of one started here."""
        return tagged_pids(self.tag)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Wait until something listens on the loopback `port`; fail early when `process` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedcareError(f"{log}: the process exited (status {process.returncode}) before serving "
                               f"port {port}; its log says why: {last_line(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FedcareError(f"{log}: nothing listened on port {port} after {timeout:.0f} s")


def last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_tagged(prefix: str, grace: float = 10.0) -> None:
    """SIGTERM every live process whose tag starts with `prefix`, then SIGKILL what outlives `grace`."""
    for pid in tagged_pids(prefix):
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while tagged_pids(prefix) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in tagged_pids(prefix):
        _kill(pid)


def tagged_pids(prefix: str, exact: bool = False) -> list[int]:
    """Live processes whose environment carries a tag starting with (or, if `exact`, equal to) `prefix`."""
    needle = f"{TAG}={prefix}".encode()
    matches = needle.__eq__ if exact else (lambda value: value.startswith(needle))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(matches(v) for v in (entry / "environ").read_bytes().split(b"\0")) and not _zombie(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
