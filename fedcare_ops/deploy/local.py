"""A real deployment on loopback: what a hospital runs, minus the containers (`make deploy-local`).

One `flower-superlink` with TLS and node authentication (the coordinator) behind its Fleet-only
public port, the sites' keys registered with `flwr supernode register` through the coordinator's
own control port (and bound to their names in its site registry), one `flower-supernode` per site
with its key, TLS, node config, data folder and gate, all started through the image's entry point;
each site approves the project's app digest first, as its IT would; then
`flwr run . <connection> --stream`, a check of the run folder and privacy report, and every
process stopped, also on failure. Ports are free loopback ports, never Flower's defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcare_ops.demo_data import write_demo_sites
from fedcare_ops.deploy.approvals import Approvals, app_digest
from fedcare_ops.deploy.credentials import make_credentials
from fedcare.identities import REGISTRY_FILE
from fedcare_ops.processes import Processes, free_port, wait_for_port
from fedcare_ops.deploy.register import CONNECTION, flwr_env, register_sites, site_keys
from fedcare.errors import FedcareError

HOST = "localhost"  # the name the sites use for the coordinator, and so the one its certificate must carry
RUN_FILES = ("global_model.pt", "metrics.json", "summary.md", "privacy_report.json", "privacy_report.md")
# Small enough for two CPU cores; the run config's other keys keep pyproject's defaults.
QUICK_RUN = {"local-epochs": 1, "batch-size": 16, "learning-rate": 0.003, "target-epsilon": 4.0}


class LocalFederation:
    """The coordinator and its sites as real processes under `root`; stops them all on exit."""

    def __init__(self, root: Path, project: Path) -> None:
        self.root, self.project = Path(root).resolve(), Path(project).resolve()
        self.credentials, self.home, self.logs = self.root / "credentials", self.root / "flwr-home", self.root / "logs"
        self.port, self.control_port = free_port(), free_port()
        self.address = f"{HOST}:{self.port}"  # the public Fleet port, all a site may reach
        self.control_address = f"127.0.0.1:{self.control_port}"  # the operator's, on loopback
        self.processes = Processes()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.processes.stop_all()

    def make_credentials(self, sites: Sequence[str]) -> None:
        make_credentials(self.credentials, sites, [HOST, "127.0.0.1"], overwrite=True)

    def start_coordinator(self) -> None:
        process = self.processes.start("coordinator", [self._entrypoint(), "coordinator"], self._env(
            FEDCARE_TLS_DIR=self.credentials / "coordinator", FEDCARE_HOST=HOST, FEDCARE_LISTEN="127.0.0.1",
            FEDCARE_PORT=self.port, FEDCARE_CONTROL_PORT=self.control_port, FEDCARE_STATE=self.root / "coordinator"),
            self.logs / "coordinator.log")
        for port in (self.control_port, self.port):
            wait_for_port(port, process, self.logs / "coordinator.log")

    def register(self, sites: Sequence[str]) -> dict[str, int]:
        coordinator = self.credentials / "coordinator"
        return register_sites(site_keys(self.credentials, list(sites)), self.control_address, coordinator / "ca.crt",
                              self.home, registry=coordinator / REGISTRY_FILE)

    def approve(self, name: str, project: Path | None = None, note: str = "deploy-local: the project as checked out"
                ) -> str:
        """What a site's IT does before a release may run there: approve its digest; returns it."""
        digest = app_digest(project or self.project)
        Approvals(self.site_state(name)).approve(digest, note, by="deploy-local")
        return digest

    def start_site(self, name: str, data: Path, budget_epsilon: float = 50.0, tls: Path | None = None,
                   log_name: str | None = None, state: Path | None = None) -> subprocess.Popen:
        """A site's SuperNode and gate through the image's entry point, with its own key, data and state;
        `name` is the name it claims (its node config), whatever key `tls` holds."""
        log_name = log_name or name
        return self.processes.start(log_name, [self._entrypoint(), "site"], self._env(
            FEDCARE_TLS_DIR=tls or self.credentials / "sites" / name, FEDCARE_SUPERLINK=self.address,
            FEDCARE_SITE_NAME=name, FEDCARE_DATA=data, FEDCARE_STATE=state or self.site_state(name),
            FEDCARE_BUDGET_EPSILON=budget_epsilon, FEDCARE_RUNTIME_PORT=free_port()), self.logs / f"{log_name}.log")

    def wait_until_connected(self, log_names: Sequence[str], timeout: float = 120.0) -> None:
        """Until each named site's SuperNode has been let in (it logs the node id the SuperLink gave it)."""
        deadline = time.monotonic() + timeout
        waiting = list(log_names)
        while waiting and time.monotonic() < deadline:
            waiting = [n for n in waiting if "SuperNode ID:" not in _text(self.logs / f"{n}.log")]
            time.sleep(0.5)
        if waiting:
            raise FedcareError(f"{self.logs / (waiting[0] + '.log')}: the site did not connect within {timeout:.0f} s")

    def start_site_without_tls(self, name: str, data: Path) -> subprocess.Popen:
        """A SuperNode that skips TLS: the entry point refuses to start one, so call Flower directly."""
        command = [str(Path(sys.executable).with_name("flower-supernode")), "--insecure", "--superlink", self.address,
                   "--port", str(free_port()), "--max-retries", "3",
                   "--node-config", f'site-name="{name}" data-path="{data}" state-path="{self.site_state(name)}"']
        return self.processes.start(name, command, self._env(FLWR_HOME=self.site_state(name) / "flwr-home"),
                                    self.logs / f"{name}.log")

    def site_state(self, name: str) -> Path:
        return self.root / "sites" / name

    def run(self, rounds: int, settings: Mapping[str, Any] | None = None, project: Path | None = None,
            stream: bool = True, timeout: float = 600.0) -> Path:
        """`flwr run <project> <connection> --stream` (default: this project); returns the run folder it published.

        `stream=False` submits without following the logs and waits for the run folder instead: a run
        the ServerApp stops (sites refused it) is published at once, but Flower's log stream only ends
        when the SuperLink marks the run finished, about a minute later."""
        outputs = self.root / "runs"
        values = QUICK_RUN | dict(settings or {}) | {"num-server-rounds": rounds, "outputs-dir": str(outputs)}
        before = _run_folders(outputs)
        project = Path(project or self.project)
        command = [str(Path(sys.executable).with_name("flwr")), "run", str(project), CONNECTION,
                   *(["--stream"] if stream else []),
                   "--run-config", " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())]
        with open(self.logs / "flwr-run.log", "ab") as log:
            status = subprocess.run(command, cwd=project, env=flwr_env(self.home), stdout=log,
                                    stderr=subprocess.STDOUT).returncode
        deadline = time.monotonic() + (0 if stream else timeout)
        while not _run_folders(outputs) - before and time.monotonic() < deadline:
            time.sleep(1.0)
        # `flwr run` exits 0 even when the run failed: the run folder it wrote is the evidence (a run
        # stopped before any round completes has one too, but it never becomes `latest`).
        new = sorted(_run_folders(outputs) - before, key=lambda folder: folder.stat().st_mtime)
        if not new:
            raise FedcareError(f"the federated run did not complete (flwr exit status {status}); see "
                               f"{self.logs / 'flwr-run.log'} and {self.logs / 'coordinator.log'}")
        return new[-1]

    def _entrypoint(self) -> str:
        return str(self.project / "deploy" / "entrypoint.sh")

    def _env(self, **settings: object) -> dict[str, str]:
        # The entry point calls `python`: the one of this environment, as the image's is.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return os.environ | {"PATH": path, "FLWR_DISABLE_UPDATE_CHECK": "1"} | {k: str(v) for k, v in settings.items()}


def check_run(folder: Path, sites: Sequence[str], rounds: int) -> dict[str, Any]:
    """The run folder is complete, and every site trained under DP within its budget; returns the report."""
    for name in RUN_FILES:
        if not (folder / name).is_file():
            raise FedcareError(f"{folder / name}: missing from the run folder; the ServerApp did not finish")
    metrics = json.loads((folder / "metrics.json").read_text())
    if [item["round"] for item in metrics["rounds"]] != list(range(1, rounds + 1)):
        raise FedcareError(f"{folder / 'metrics.json'}: expected rounds 1..{rounds}")
    report = json.loads((folder / "privacy_report.json").read_text())
    for site in sites:
        entry = report["sites"].get(site)
        if not report.get("dp") or entry is None or not entry["rounds"]:
            raise FedcareError(f"{folder / 'privacy_report.json'}: no DP training recorded for {site}")
        if entry["rounds"][-1]["epsilon"] > entry["budget_epsilon"]:
            raise FedcareError(f"{folder / 'privacy_report.json'}: {site} spent more than its budget")
    return report


def run_local(root: Path, project: Path, sites: int = 2, rounds: int = 2, cases: Sequence[int] | None = None,
              settings: Mapping[str, Any] | None = None) -> Path:
    """The whole loopback deployment from nothing; returns the checked run folder."""
    root = Path(root).resolve()
    names = [f"site-{index}" for index in range(sites)]
    data = root / "demo-data"
    if not all((data / name / "labels.csv").is_file() for name in names):
        write_demo_sites(data, sites=sites, seed=0, cases=list(cases or [40 + 20 * i for i in range(sites)]),
                         overwrite=True)
    # A fresh federation each time: new credentials, an empty coordinator and empty site ledgers,
    # so the demo repeats; a real site's ledger is never reset.
    for folder in ("credentials", "coordinator", "sites", "flwr-home", "logs"):
        shutil.rmtree(root / folder, ignore_errors=True)
    with LocalFederation(root, project) as federation:
        federation.make_credentials(names)
        federation.start_coordinator()
        federation.register(names)
        for name in names:
            federation.approve(name)
            federation.start_site(name, data / name)
        folder = federation.run(rounds, {"min-sites": sites} | dict(settings or {}))
    check_run(folder, names, rounds)
    return folder


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _run_folders(outputs: Path) -> set[Path]:
    """The run folders under `outputs`: each holds the metrics.json its ServerApp wrote."""
    return {path.parent.resolve() for path in outputs.glob("*/metrics.json")
            if not path.parent.is_symlink() and not path.parent.name.startswith(".")}  # not latest, not a partial one
