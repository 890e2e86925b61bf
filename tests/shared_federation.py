"""ONE real deployment on loopback for the deployment tests (tests/e2e/test_deployment.py): a TLS,
key-authenticated coordinator and gated sites through the image's entry point, started once because
starting and stopping one costs minutes on two cores. Its phases run one after another on the same
processes, each recording what the tests then check:

  approved   A: the project as approved at every site (1 round), while "site-2", registered with
             its own key, claims to be site-0; an unregistered key and a plaintext SuperNode try
             to join from the start.
  site-kill  a 3-round run in which site-1 is killed after its ledger recorded round 1, before its
             reply left, and started again as Docker's restart policy would.
  resume     the whole coordinator killed mid-run and started again on its state; the run resumed.
  gated      B: site-1's ledger restored from a backup older than A, and a release without the
             bundle's egress mod; C: the project with one changed line, refused.
  revoked    D: the approved project again after the sites revoked it: refused.
  control    a site's attempts at the control API through the Fleet port.

A phase that raises is recorded, not raised: the next phases still run, and only the tests that
read the failed phase fail, with its error.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fedcare.errors import FedcareError
from fedcare.privacy.ledger import Ledger
from fedcare_ops.demo_data import write_demo_sites
from fedcare_ops.deploy.approvals import app_digest
from fedcare_ops.deploy.credentials import make_site_key
from fedcare_ops.deploy.local import LocalFederation
from fedcare_ops.deploy.register import flwr_env, write_connection
from tests.deploy_helpers import copy_project, processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
FEDCARE = str(Path(sys.executable).with_name("fedcare"))
FLWR = str(Path(sys.executable).with_name("flwr"))
SITES = ["site-0", "site-1"]
IMPOSTOR = "site-2"  # registered with its own key, claims to be site-0
GATED = {"min-sites": 2, "round-timeout": 240.0}
RECORDED = "    record_round(ledger, record, work.run_id, work.server_round)\n"
# site-1's round-1 reply waits after the ledger write, long enough for the test to kill the site then.
HELD = RECORDED + ('    if site.name == "site-1" and work.server_round == 1:  # held back until the site is killed\n'
                   '        __import__("time").sleep(240)\n')


@dataclass
class Deployment:
    """What each phase of the shared deployment left for the tests to check."""

    root: Path
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    left_running: list[str] = field(default_factory=list)

    def of(self, phase: str) -> dict[str, Any]:
        """One phase's outcome; a test that reads a phase which raised fails with that phase's error."""
        if phase in self.failed:
            pytest.fail(f"the deployment's {phase!r} phase failed:\n{self.failed[phase]}", pytrace=False)
        return self.phases[phase]

    def record(self, phase: str, steps: Callable[[], dict[str, Any]]) -> None:
        started = time.monotonic()
        try:
            self.phases[phase] = steps()
        except Exception:  # noqa: BLE001 - kept for the tests that read this phase
            self.failed[phase] = traceback.format_exc()
        # Shown with a failing test's captured set-up output: which phase took how long.
        print(f"deployment phase {phase}: {time.monotonic() - started:.0f} s", flush=True)


def site_cli(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FEDCARE, "site", *args, "--state", str(state)], capture_output=True, text=True, timeout=60)


def deploy(root: Path) -> Deployment:
    """Start the coordinator and sites under `root`, run every phase on them, stop them all."""
    deployment, started = Deployment(root), time.monotonic()
    write_demo_sites(root / "data", sites=3, seed=11, cases=[40, 50, 40])
    no_mod = copy_project(root / "release-no-mod", "app = ClientApp(mods=[site_guard, egress_log])",
                          "app = ClientApp(mods=[site_guard])  # no egress mod in this release: the gate logs anyway")
    marker = root / "the-changed-line-ran"
    changed = copy_project(root / "changed", '''    """One round of local training, if the site's policy allows what the run asks."""\n''',
                           f'''    """One round of local training."""\n    Path({str(marker)!r}).write_text("ran")\n''')
    held = copy_project(root / "release-held", RECORDED, HELD)
    apps = {"marker": marker, "digest": app_digest(ROOT), "no_mod_digest": app_digest(no_mod),
            "changed_digest": app_digest(changed)}
    with LocalFederation(root, ROOT) as federation:
        submitted = _count_runs(federation)
        federation.make_credentials(SITES + [IMPOSTOR])
        make_site_key(root / "unregistered")  # a key pair the coordinator never saw
        (root / "unregistered" / "ca.crt").write_bytes((root / "credentials" / "ca" / "ca.crt").read_bytes())
        federation.start_coordinator()
        apps["node_ids"] = federation.register(SITES + [IMPOSTOR])
        for site in SITES + [IMPOSTOR]:
            for project in (ROOT, no_mod):
                federation.approve(site, project, note=f"reviewed {project.name}")
        for site in SITES:
            federation.approve(site, held, note="the project, site-1's round-1 reply held back")
            federation.start_site(site, root / "data" / site)
        federation.start_site("site-0", root / "data" / IMPOSTOR, tls=root / "credentials" / "sites" / IMPOSTOR,
                              state=federation.site_state(IMPOSTOR), log_name=IMPOSTOR)
        federation.start_site("intruder", root / "data" / "site-0", tls=root / "unregistered")
        federation.start_site_without_tls("no-tls", root / "data" / "site-1")
        federation.wait_until_connected(SITES + [IMPOSTOR])
        deployment.phases["apps"] = apps
        print(f"deployment set-up: {time.monotonic() - started:.0f} s", flush=True)

        deployment.record("approved", lambda: approved_run(root, federation))
        deployment.record("site-kill", lambda: kill_site_mid_run(root, federation, held))
        deployment.record("resume", lambda: kill_coordinator_mid_run_and_resume(root, federation))
        deployment.record("gated", lambda: gated_runs(federation, no_mod, changed))
        deployment.record("revoked", lambda: revoke_and_run(federation, apps["digest"]))
        deployment.record("control", lambda: control_attempts(root, federation) | {"submitted": submitted()})
        # By now both have given up on their own, or the SuperLink let them in (and `None` says so).
        deployment.record("refused", lambda: {name: federation.processes.started[name].poll()
                                              for name in ("intruder", "no-tls")})
        started = time.monotonic()
    print(f"deployment stopped: {time.monotonic() - started:.0f} s", flush=True)
    deployment.left_running = processes_mentioning(str(root))
    return deployment


def approved_run(root: Path, federation: LocalFederation) -> dict[str, Any]:
    out: dict[str, Any] = {"A": federation.run(1, GATED)}
    # The sites' logs of A alone: later phases run the same approved app again.
    out["logs"] = {site: (root / "logs" / f"{site}.log").read_text() for site in SITES}
    # The impostor was only needed in A: in later runs it would train each round for nothing. The
    # next run may still ask it (the SuperLink sees it gone only when its heartbeat lapses), and
    # goes on without it, as that run's round 1 waits for killed site-1's heartbeat to lapse anyway.
    federation.processes.stop(IMPOSTOR)
    return out


def gated_runs(federation: LocalFederation, no_mod: Path, changed: Path) -> dict[str, Any]:
    # After the site-kill and resume phases site-1's history is several rounds long: B's single
    # round after the restore is then a shorter history than the coordinator saw, as A alone was not.
    for name in ("ledger.jsonl", "ledger.head.json"):  # the "backup" predates run A: no ledger yet
        (federation.site_state("site-1") / name).unlink()
    # The site refuses to train on a vanished ledger until its operator starts one on purpose.
    restored = subprocess.run([FEDCARE, "ledger-init", str(federation.site_state("site-1")), "--lost"],
                              capture_output=True, text=True, timeout=60)
    assert restored.returncode == 0, restored.stderr
    out = {"B": federation.run(1, GATED, project=no_mod)}
    # C stops at round 1 (every site refuses): no need to follow its logs to the end.
    out["C"] = federation.run(1, GATED, project=changed, stream=False)
    return out


def kill_site_mid_run(root: Path, federation: LocalFederation, held: Path) -> dict[str, Any]:
    """The held release for 3 rounds; site-1 killed once its ledger recorded round 1, then restarted."""
    ledger = Ledger(federation.site_state("site-1") / "ledger.jsonl")
    earlier = len(ledger.entries())  # phase "approved" trained here already
    stream, start = federation.logs / "flwr-run.log", (federation.logs / "flwr-run.log").stat().st_size
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(
        # min-sites 1: the round in which site-1 is killed goes on with site-0 alone.
        folder=federation.run(3, {"min-sites": 1, "round-timeout": 300.0}, project=held)))
    runner.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(ledger.entries()) <= earlier:
        time.sleep(0.5)
    out["at_kill"] = ledger.entries()
    out["new_at_kill"] = out["at_kill"][earlier:]
    federation.processes.kill("site-1")
    out["killed_left"] = [p for p in federation.processes.pids()
                          if f"{federation.processes.tag}/site-1\0".encode() in environ(p)]
    # A site started again at once is let in again the moment its heartbeat lapses, and if that comes
    # before the ServerApp next asks for its reply, round 1 waits out its whole timeout (5 minutes)
    # instead of failing the reply as lost: so only once round 1 moved on to evaluation does the site
    # start again, and from then on whenever it exits, as Docker's `restart: unless-stopped` would.
    while runner.is_alive() and "configure_evaluate" not in _read_from(stream, start):
        runner.join(timeout=1)
    restarts = 0
    while runner.is_alive():
        process = federation.processes.started.get("site-1-restarted")
        if process is None or process.poll() is not None:
            federation.start_site("site-1", root / "data" / "site-1", log_name="site-1-restarted")
            restarts += 1
        runner.join(timeout=5)
    out["restarts"] = restarts
    out["after_run"] = ledger.entries()  # later phases add to it
    out["nodes"] = node_list(federation)
    return out


def kill_coordinator_mid_run_and_resume(root: Path, federation: LocalFederation) -> dict[str, Any]:
    """A 2-round run whose coordinator (SuperLink, ServerApp, Fleet port) is killed once round 1's
    checkpoint is written (the sites may be training round 2 then); the coordinator started again on
    its state; the run resumed from it. Sites that exit meanwhile are started again, as Docker's
    restart policy would. Two rounds: each round and each `flwr run` costs a minute on two cores."""
    checkpoints = root / "runs" / "checkpoints"
    before = set(checkpoints.glob("*/checkpoint.pt"))
    settings = {"min-sites": 2, "round-timeout": 180.0}
    out: dict[str, Any] = {}

    def run(key: str, extra: dict) -> None:
        try:
            out[key] = federation.run(2, settings | extra)
        except FedcareError as err:
            out[key] = str(err)

    first = threading.Thread(target=run, args=("first", {}))
    first.start()
    deadline = time.monotonic() + 300
    # The ServerApp writes a round-0 checkpoint at the start: wait for round 1's.
    while time.monotonic() < deadline and not [c for c in set(checkpoints.glob("*/checkpoint.pt")) - before
                                               if checkpoint_round(c) >= 1]:
        time.sleep(0.2)
    [checkpoint] = set(checkpoints.glob("*/checkpoint.pt")) - before
    out["run_id"] = checkpoint.parent.name
    federation.processes.kill("coordinator")
    first.join(timeout=120)
    out["first_ended"] = not first.is_alive()
    federation.start_coordinator()
    resumed = threading.Thread(target=run, args=("resumed", {"resume": out["run_id"]}))
    resumed.start()
    while resumed.is_alive():
        for log_name, site in (("site-0", "site-0"), ("site-1-restarted", "site-1")):
            if federation.processes.started[log_name].poll() is not None:
                federation.start_site(site, root / "data" / site, log_name=log_name)
        resumed.join(timeout=5)
    # As they stand now: phase "gated" later restores site-1's ledger from a backup.
    out["ledgers"] = {site: Ledger(federation.site_state(site) / "ledger.jsonl").entries() for site in SITES}
    return out


def revoke_and_run(federation: LocalFederation, digest: str) -> dict[str, Any]:
    revoked = [site_cli("revoke", digest, state=federation.site_state(site)) for site in SITES]
    return {"revoked": revoked, "D": federation.run(1, GATED, stream=False)}


def control_attempts(root: Path, federation: LocalFederation) -> dict[str, Any]:
    """A site's FLWR_HOME: only the public ca.crt, and the Fleet port it connects to."""
    home = root / "site-flwr-home"
    write_connection(home, federation.address, root / "credentials" / "sites" / "site-0" / "ca.crt")
    runtime = httpx.post(f"https://127.0.0.1:{federation.port}/v1/runtime/acquire-task", content=b"",
                         verify=ssl.create_default_context(cafile=str(root / "credentials" / "ca" / "ca.crt")))
    return {"ls": flwr(home, "ls", "fedcare"), "run": flwr(home, "run", str(ROOT), "fedcare"),
            "register": flwr(home, "supernode", "list", "fedcare"), "runtime": runtime.status_code,
            "operator_ls": flwr(federation.home, "ls", "fedcare", "--format", "json")}


def flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], env=flwr_env(home), capture_output=True, text=True, timeout=120)


def node_list(federation: LocalFederation) -> list[int]:
    """The node ids the coordinator's SuperLink knows, as its operator lists them."""
    done = flwr(federation.home, "supernode", "list", "fedcare", "--format", "json")
    document = json.loads(done.stdout[done.stdout.index("{"):])
    return [int(node["node-id"]) for node in document["nodes"]]


def checkpoint_round(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["round"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return -1  # being replaced right now: look again


def environ(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "environ").read_bytes() + b"\0"
    except OSError:
        return b""


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def _count_runs(federation: LocalFederation) -> Callable[[], int]:
    """Counts the operator's `flwr run` submissions from here on; returns how to read the count."""
    calls = [0]
    run = federation.run

    def counted(*args: Any, **kwargs: Any) -> Path:
        calls[0] += 1
        return run(*args, **kwargs)

    federation.run = counted  # type: ignore[method-assign]
    return lambda: calls[0]
