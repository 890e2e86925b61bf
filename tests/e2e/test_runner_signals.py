"""`fedcare run` stopped from outside (SIGTERM from a scheduler or `kill`, as Ctrl-C would) stops
every process it started: the local SuperLink, the simulation and its workers. Real CLI, real flwr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcare_ops.demo_data import write_demo_sites

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def started_under(home: Path) -> list[int]:
    """Live processes whose environment points Flower at `home`: only this run's have it."""
    needle = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def test_sigterm_stops_every_process_the_run_started(tmp_path):
    write_demo_sites(tmp_path / "data", sites=2, seed=3, cases=[40, 40])
    preset = tmp_path / "long.toml"
    preset.write_text(f'num-server-rounds = 50\ndata-root = "{tmp_path / "data"}"\nsites-dir = "{tmp_path / "sites"}"\n'
                      f'outputs-dir = "{tmp_path / "out"}"\nbatch-size = 16\n')
    home = tmp_path / "out" / "flwr-home"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "fedcare_ops", "run", "--config", str(preset), "--sites", "2"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 180
            # Wait for the SuperLink and the simulation to be up, and the first round under way.
            while not (home / "local-superlink" / "superlink.log").is_file() or len(started_under(home)) < 3:
                assert run.poll() is None and time.monotonic() < deadline, "the run ended or never started"
                time.sleep(1)
            time.sleep(5)
            assert started_under(home)
            os.kill(run.pid, signal.SIGTERM)
            assert run.wait(timeout=60) == 130
        finally:
            if run.poll() is None:
                run.kill()
    assert started_under(home) == []
    assert not (tmp_path / "out" / "latest").exists()
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
