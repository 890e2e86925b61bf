"""End to end on real processes: a TLS, key-authenticated SuperLink and one SuperNode per site on
loopback, started through the image's entry point, exactly as `make deploy-local` does.

The shared deployment (tests/shared_federation.py) also carries what must be refused (a SuperNode
whose key was never registered, one that skips TLS) and a site killed mid-run and restarted: killed
after its ledger recorded round 1 but before its reply left (the app it runs holds that one reply
back), so the report must show the round as charged with the reply lost. Then, on the same
federation, the whole coordinator is killed mid-run (after round 1's checkpoint) and started again
on its state, and the run resumed: its report must explain every round the sites' ledgers charged.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcare_ops.deploy.local import check_run
from fedcare.privacy.ledger import Ledger
from server_app.reconcile import LOST, TWICE
from tests.deploy_helpers import processes_mentioning
from tests.shared_federation import SITES

# One deployment serves both files (tests/e2e/conftest.py): under xdist they run on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment")]
ROOT = Path(__file__).resolve().parents[2]


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


def test_site_killed_mid_run_rejoins_and_keeps_its_ledger(deployment):
    outcome = deployment.of("site-kill")
    assert outcome["new_at_kill"], "site-1 never trained before the kill"
    assert outcome["killed_left"] == []
    folder = outcome["folder"]
    check_run(folder, SITES, 3)
    after = outcome["after_run"]
    assert after[:len(outcome["at_kill"])] == outcome["at_kill"]
    # The restarted site trained again in this run.
    assert [e for e in after[len(outcome["at_kill"]):] if e.run_id == folder.name]
    last = json.loads((folder / "metrics.json").read_text())["rounds"][-1]
    assert last["sites"]["site-1"]["train_status"] == "ok"
    # Every round the site's ledger charged in this run is in the report, a reply lost to the kill included.
    report = json.loads((folder / "privacy_report.json").read_text())
    charged = sorted(e.round for e in after if e.run_id == folder.name and e.private)
    assert sorted(row["round"] for row in report["sites"]["site-1"]["rounds"]) == charged
    # Round 1 was recorded before the kill and its reply never left: charged, reply lost.
    assert [(e.run_id, e.round) for e in outcome["new_at_kill"]] == [(folder.name, 1)]
    first = json.loads((folder / "metrics.json").read_text())["rounds"][0]["sites"]
    assert first.get("site-1", {}).get("train_status") != "ok"
    lost = [row for row in report["sites"]["site-1"]["rounds"] if row.get("note") == LOST]
    assert [row["round"] for row in lost] == [1]
    assert lost[0]["epsilon"] == pytest.approx(outcome["new_at_kill"][0].epsilon)
    assert outcome["restarts"] >= 1


def test_a_run_resumed_after_its_coordinator_was_killed_explains_every_charge(deployment):
    out = deployment.of("resume")
    assert out["first_ended"] and isinstance(out["first"], str)  # the killed run published no folder
    folder = out["resumed"]
    assert isinstance(folder, Path), folder
    report = check_run(folder, SITES, 2)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["resumed_run"] == out["run_id"] and metrics["resumed_from_round"] == 1
    for site in SITES:
        # The killed run's charges and the resumed run's: each one a row of the report, in order,
        # with the site's own cumulative epsilon; a round trained twice (killed mid-round) says so.
        charged = [e for e in out["ledgers"][site] if e.run_id in (out["run_id"], folder.name) and e.private]
        rows = report["sites"][site]["rounds"]
        assert [row["round"] for row in rows] == [e.round for e in charged], (rows, charged)
        assert [row["epsilon"] for row in rows] == pytest.approx([e.epsilon for e in charged])
        for row, entry in zip(rows, charged):
            assert (entry.run_id == out["run_id"] and entry.round > metrics["resumed_from_round"]) == \
                (row.get("note") == TWICE), (row, entry)


def test_unregistered_and_plaintext_supernodes_are_refused(deployment):
    root = deployment.root
    # They tried while every run of the deployment went on: none let them in.
    runs = [deployment.of("approved")["A"], *(deployment.of("gated")[key] for key in "BC"),
            deployment.of("site-kill")["folder"],
            deployment.of("resume")["resumed"], deployment.of("revoked")["D"]]
    for folder in runs:
        for item in json.loads((folder / "metrics.json").read_text())["rounds"]:
            assert not {"intruder", "no-tls"} & set(item["sites"])
    assert not (root / "sites" / "intruder" / "ledger.jsonl").exists()
    assert not (root / "sites" / "no-tls" / "ledger.jsonl").exists()
    # Only the registered keys are nodes of the federation.
    assert sorted(deployment.of("site-kill")["nodes"]) == sorted(deployment.of("apps")["node_ids"].values())
    # Both gave up on their own: the SuperLink never let them in.
    refused = deployment.of("refused")
    assert refused["intruder"] not in (None, 0) and refused["no-tls"] is not None
    assert "Failed to activate SuperNode" in (root / "logs" / "intruder.log").read_text()
    assert "No SuperNode found with the given public key" in (root / "logs" / "coordinator.log").read_text()
    assert "Giving up reconnection" in (root / "logs" / "no-tls.log").read_text()
    # The coordinator's operator sees each plaintext attempt at the public port, with its address.
    assert "fedcare-fleet-port: refused 127.0.0.1:" in (root / "logs" / "coordinator.log").read_text()
    assert "TLS handshake failed (HTTP_REQUEST)" in (root / "logs" / "coordinator.log").read_text()


def test_no_process_of_the_federation_outlives_it(deployment):
    assert deployment.left_running == []
