"""End to end on real processes: a TLS, key-authenticated SuperLink and one SuperNode per site on
loopback, started through the image's entry point, exactly as `make deploy-local` does.

The second federation also carries what must be refused (a SuperNode whose key was never
registered, one that skips TLS) and a site killed mid-run and restarted: killed after its ledger
recorded round 1 but before its reply left (the app it runs holds that one reply back), so the
report must show the round as charged with the reply lost. Then, on the same federation, the
whole coordinator is killed mid-run (after round 1's checkpoint) and started again on its state,
and the run resumed: its report must explain every round the sites' ledgers charged.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedcare_ops.demo_data import write_demo_sites
from fedcare_ops.deploy.local import LocalFederation, check_run
from fedcare_ops.deploy.credentials import make_site_key
from fedcare_ops.processes import TAG
from fedcare.privacy.ledger import Ledger
from fedcare.errors import FedcareError
from server_app.reconcile import LOST, TWICE
from tests.deploy_helpers import copy_project, processes_mentioning

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SITES = ["site-0", "site-1"]
RECORDED = "    record_round(ledger, record, work.run_id, work.server_round)\n"
# site-1's round-1 reply waits after the ledger write, long enough for the test to kill the site then.
HELD = RECORDED + ('    if site.name == "site-1" and work.server_round == 1:  # held back until the site is killed\n'
                   '        __import__("time").sleep(240)\n')


def test_make_deploy_local_runs_two_sites_for_two_rounds_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "deploy-local"
    done = subprocess.run([str(Path(sys.executable).with_name("fedcare")), "deploy", "local", "--sites", "2",
                           "--rounds", "2", "--out", str(out), "--project", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = (out / "runs" / "latest").resolve()
    report = check_run(folder, SITES, 2)
    for site in SITES:
        entries = Ledger(out / "sites" / site / "ledger.jsonl").entries()
        assert [e.round for e in entries] == [1, 2]
        assert [r["epsilon"] for r in report["sites"][site]["rounds"]] == pytest.approx([e.epsilon for e in entries])
    coordinator_log = (out / "logs" / "coordinator.log").read_text()
    assert "https://127.0.0.1" in coordinator_log  # the SuperLink served TLS only
    assert processes_mentioning(str(out)) == []


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """One federation, 3 rounds: two registered sites, two that must be refused, one site restarted."""
    root = tmp_path_factory.mktemp("hardened")
    write_demo_sites(root / "data", sites=2, seed=5, cases=[40, 60])
    held = copy_project(root / "release-held", RECORDED, HELD)
    outcome: dict = {}
    with LocalFederation(root, ROOT) as federation:
        federation.make_credentials(SITES)
        make_site_key(root / "unregistered")  # a key pair the coordinator never saw
        (root / "unregistered" / "ca.crt").write_bytes((root / "credentials" / "ca" / "ca.crt").read_bytes())
        federation.start_coordinator()
        outcome["node_ids"] = federation.register(SITES)
        for site in SITES:
            federation.approve(site, held, note="the project, site-1's round-1 reply held back")
            federation.approve(site)  # the project itself, for the run resumed after the coordinator's kill
            federation.start_site(site, root / "data" / site)
        federation.start_site("intruder", root / "data" / "site-0", tls=root / "unregistered")
        federation.start_site_without_tls("no-tls", root / "data" / "site-1")

        runner = threading.Thread(target=lambda: outcome.update(
            # min-sites 1: the round in which site-1 is killed goes on with site-0 alone.
            folder=federation.run(3, {"min-sites": 1, "round-timeout": 300.0}, project=held)))
        runner.start()
        ledger = Ledger(federation.site_state("site-1") / "ledger.jsonl")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (ledger.path.exists() and ledger.entries()):
            time.sleep(0.5)
        outcome["before_kill"] = ledger.entries()
        federation.processes.kill("site-1")
        outcome["killed_left"] = [p for p in federation.processes.pids()
                                  if f"{federation.processes.tag}/site-1\0".encode() in _environ(p)]
        # What Docker's `restart: unless-stopped` does: start the site again whenever it exits. Until
        # the SuperLink sees the killed node's heartbeat lapse it refuses a second activation.
        restarts = 0
        while runner.is_alive():
            process = federation.processes.started.get("site-1-restarted")
            if process is None or process.poll() is not None:
                federation.start_site("site-1", root / "data" / "site-1", log_name="site-1-restarted")
                restarts += 1
            runner.join(timeout=5)
        outcome["restarts"] = restarts
        outcome["refused"] = {name: federation.processes.started[name].poll() for name in ("intruder", "no-tls")}
        outcome["nodes"] = _node_list(federation)
        outcome["resume"] = kill_coordinator_mid_run_and_resume(root, federation)
    outcome["left_running"] = processes_mentioning(str(root))
    return root, outcome


def test_site_killed_mid_run_rejoins_and_keeps_its_ledger(hardened):
    root, outcome = hardened
    assert outcome["before_kill"], "site-1 never trained before the kill"
    assert outcome["killed_left"] == []
    folder = outcome["folder"]
    check_run(folder, SITES, 3)
    after = Ledger(root / "sites" / "site-1" / "ledger.jsonl").entries()
    assert after[:len(outcome["before_kill"])] == outcome["before_kill"]
    assert len(after) > len(outcome["before_kill"])  # the restarted site trained again
    last = json.loads((folder / "metrics.json").read_text())["rounds"][-1]
    assert last["sites"]["site-1"]["train_status"] == "ok"
    # Every round the site's ledger charged in this run is in the report, a reply lost to the kill included.
    report = json.loads((folder / "privacy_report.json").read_text())
    charged = sorted(e.round for e in after if e.run_id == folder.name and e.private)
    assert sorted(row["round"] for row in report["sites"]["site-1"]["rounds"]) == charged
    # Round 1 was recorded before the kill and its reply never left: charged, reply lost.
    assert [e.round for e in outcome["before_kill"]] == [1]
    first = json.loads((folder / "metrics.json").read_text())["rounds"][0]["sites"]
    assert first.get("site-1", {}).get("train_status") != "ok"
    lost = [row for row in report["sites"]["site-1"]["rounds"] if row.get("note") == LOST]
    assert [row["round"] for row in lost] == [1]
    assert lost[0]["epsilon"] == pytest.approx(outcome["before_kill"][0].epsilon)
    assert outcome["restarts"] >= 1


def kill_coordinator_mid_run_and_resume(root: Path, federation: LocalFederation) -> dict:
    """A 2-round run whose coordinator (SuperLink, ServerApp, Fleet port) is killed once round 1's
    checkpoint is written (the sites may be training round 2 then); the coordinator started again on
    its state; the run resumed from it. Sites that exit meanwhile are started again, as Docker's
    restart policy would. Two rounds: each round and each `flwr run` costs a minute on two cores."""
    checkpoints = root / "runs" / "checkpoints"
    before = set(checkpoints.glob("*/checkpoint.pt"))
    settings = {"min-sites": 2, "round-timeout": 180.0}
    out: dict = {}

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
                                               if _checkpoint_round(c) >= 1]:
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
    return out


def test_a_run_resumed_after_its_coordinator_was_killed_explains_every_charge(hardened):
    root, outcome = hardened
    out = outcome["resume"]
    assert out["first_ended"] and isinstance(out["first"], str)  # the killed run published no folder
    folder = out["resumed"]
    assert isinstance(folder, Path), folder
    report = check_run(folder, SITES, 2)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["resumed_run"] == out["run_id"] and metrics["resumed_from_round"] == 1
    for site in SITES:
        # The killed run's charges and the resumed run's: each one a row of the report, in order,
        # with the site's own cumulative epsilon; a round trained twice (killed mid-round) says so.
        charged = [e for e in Ledger(root / "sites" / site / "ledger.jsonl").entries()
                   if e.run_id in (out["run_id"], folder.name) and e.private]
        rows = report["sites"][site]["rounds"]
        assert [row["round"] for row in rows] == [e.round for e in charged], (rows, charged)
        assert [row["epsilon"] for row in rows] == pytest.approx([e.epsilon for e in charged])
        for row, entry in zip(rows, charged):
            assert (entry.run_id == out["run_id"] and entry.round > metrics["resumed_from_round"]) == \
                (row.get("note") == TWICE), (row, entry)


def test_unregistered_and_plaintext_supernodes_are_refused(hardened):
    root, outcome = hardened
    metrics = json.loads((outcome["folder"] / "metrics.json").read_text())
    for item in metrics["rounds"]:
        assert not {"intruder", "no-tls"} & set(item["sites"])
    assert not (root / "sites" / "intruder" / "ledger.jsonl").exists()
    assert not (root / "sites" / "no-tls" / "ledger.jsonl").exists()
    # Only the registered keys are nodes of the federation.
    assert sorted(outcome["nodes"]) == sorted(outcome["node_ids"].values())
    # Both gave up on their own: the SuperLink never let them in.
    assert outcome["refused"]["intruder"] not in (None, 0) and outcome["refused"]["no-tls"] is not None
    assert "Failed to activate SuperNode" in (root / "logs" / "intruder.log").read_text()
    assert "No SuperNode found with the given public key" in (root / "logs" / "coordinator.log").read_text()
    assert "Giving up reconnection" in (root / "logs" / "no-tls.log").read_text()
    # The coordinator's operator sees each plaintext attempt at the public port, with its address.
    assert "fedcare-fleet-port: refused 127.0.0.1:" in (root / "logs" / "coordinator.log").read_text()
    assert "TLS handshake failed (HTTP_REQUEST)" in (root / "logs" / "coordinator.log").read_text()


def test_no_process_of_the_federation_outlives_it(hardened):
    _, outcome = hardened
    assert outcome["left_running"] == []


def _checkpoint_round(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["round"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return -1  # being replaced right now: look again


def _environ(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "environ").read_bytes() + b"\0"
    except OSError:
        return b""


def _node_list(federation: LocalFederation) -> list[int]:
    from fedcare_ops.deploy.register import flwr_env

    done = subprocess.run([str(Path(sys.executable).with_name("flwr")), "supernode", "list", "fedcare", "--format",
                           "json"], env=flwr_env(federation.home), capture_output=True, text=True, timeout=60)
    document = json.loads(done.stdout[done.stdout.index("{"):])
    return [int(node["node-id"]) for node in document["nodes"]]
