"""End to end on real processes, all on ONE loopback deployment (tests/shared_federation.py): a
TLS, key-authenticated coordinator and one SuperNode per site started through the image's entry point,
as `make deploy-local` does. Starting one costs minutes on two cores, so its phases run one after
another on the same processes and the tests below check what each left:

  A  the project as approved at every site: trains to completion; "site-2" runs with its own
     registered key but claims to be site-0, and is filed and flagged as site-2; a SuperNode whose
     key was never registered and one that skips TLS try to join throughout, and are refused;
  a site killed after its ledger recorded round 1 but before its reply left (the app it runs holds
     that one reply back): the report shows the round charged with the reply lost;
  the whole coordinator killed mid-run (after round 1's checkpoint), started again on its state and
     the run resumed: its report explains every round the sites' ledgers charged;
  B  site-1's ledger restored from a backup older than A (started anew by its operator), and a
     release without the bundle's egress mod (approved): trains, the gate still logs every reply,
     site-1's shrunk history is flagged;
  C  the project with one changed line in client_app/app.py (it would write a file): every site
     refuses it, the changed line never runs;
  D  the approved project again after the sites revoked it: refused;
  and, with the federation still up, a site's attempts at the control API through the Fleet port.

The module is one xdist scope (make test uses --dist loadfile): the deployment is started once.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcare.privacy.ledger import Ledger
from fedcare_ops.deploy.local import check_run
from server_app.reconcile import LOST, TWICE
from tests.deploy_helpers import processes_mentioning
from tests.shared_federation import FEDCARE, IMPOSTOR, SITES, Deployment, deploy, site_cli

# "deployment": tests/conftest.py schedules this module first, as the longest one.
pytestmark = [pytest.mark.slow, pytest.mark.deployment]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return deploy(tmp_path_factory.mktemp("deployment"))


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


def egress(root: Path, site: str, run_folder: Path) -> list[dict]:
    lines = (root / "sites" / site / "egress.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["run"] == run_folder.name]


def site_logs(root: Path, site: str) -> str:
    """Everything the site logged, before and after the deployment's restart of site-1."""
    return "".join(log.read_text() for log in (root / "logs" / f"{site}.log", root / "logs" / f"{site}-restarted.log")
                   if log.exists())


def sites_of(folder: Path, round_number: int = 1) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return next(item for item in metrics["rounds"] if item["round"] == round_number)["sites"]


class Runs:
    """The deployment's runs A to D and the apps' digests by name; a key of a phase that failed fails
    the test that reads it, and only that test."""

    PHASE_OF = {"A": "approved", "logs": "approved", "B": "gated", "C": "gated", "revoked": "revoked", "D": "revoked"}

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def __getitem__(self, key: str):
        return self.deployment.of(self.PHASE_OF.get(key, "apps"))[key]


@pytest.fixture
def gated(deployment: Deployment) -> tuple[Path, Runs]:
    return deployment.root, Runs(deployment)


def test_an_approved_app_trains_to_completion_at_every_site(gated):
    root, out = gated
    check_run(out["A"], SITES, 1)
    for site in SITES:
        assert sites_of(out["A"])[site]["train_status"] == "ok"
        # Every task of A (train and evaluate) and of B went through the gate, none through Flower's
        # own flwr-clientapp (nor did any task of the deployment's other runs).
        assert out["logs"][site].count(f"runs approved app {out['digest']}") == 2
        assert site_logs(root, site).count(f"runs approved app {out['no_mod_digest']}") == 2
    for log in (root / "logs").glob("site-*.log"):
        assert "Start `flwr-clientapp` process" not in log.read_text(), log


def test_a_node_claiming_another_sites_name_is_filed_under_its_registered_key(gated):
    _, out = gated
    metrics = json.loads((out["A"] / "metrics.json").read_text())
    for item in metrics["rounds"]:
        assert item["sites"][IMPOSTOR]["train_status"] == "rejected"
        assert "claims to be 'site-0'" in item["sites"][IMPOSTOR]["train_error"]
        assert item["sites"]["site-0"]["train_status"] == "ok"  # the real site-0, by its key
    assert any("registered as 'site-2', claims to be 'site-0'" in flag for flag in metrics["flags"])
    assert "FLAG: identity" in (out["A"] / "summary.md").read_text()
    report = json.loads((out["A"] / "privacy_report.json").read_text())
    assert set(report["sites"]) == set(SITES)  # the impostor's numbers are nobody's


def test_a_site_whose_history_shrank_is_flagged(gated):
    _, out = gated
    check_run(out["B"], SITES, 1)
    flags = json.loads((out["B"] / "metrics.json").read_text())["flags"]
    shrunk = [flag for flag in flags if flag.startswith("privacy history: site-1")]
    assert shrunk and "rolled back" in shrunk[0]
    assert not any(flag.startswith("privacy history: site-0") for flag in flags)
    assert json.loads((out["B"] / "privacy_report.json").read_text())["flags"] == flags


def test_the_egress_log_is_written_by_the_gate_once_per_reply_even_without_the_bundles_mod(gated):
    root, out = gated
    for site in SITES:
        in_a = egress(root, site, out["A"])
        assert sorted(e["type"] for e in in_a) == ["evaluate", "train"]  # once each, not twice
        in_b = egress(root, site, out["B"])  # a release whose bundle has no egress mod at all
        assert sorted(e["type"] for e in in_b) == ["evaluate", "train"]
        assert all(e["arrays"] for e in in_b if e["type"] == "train")
        # Refusals leave the site too, and no bundle code ran for them: only the gate can have logged them.
        assert [e["error"] for e in egress(root, site, out["C"])] == \
            [f"{site}: app not approved by this site: digest {out['changed_digest']}"]
    done = subprocess.run([FEDCARE, "audit", str(root / "sites" / "site-0" / "egress.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_app_is_refused_by_every_site_and_its_changed_line_never_runs(gated):
    root, out = gated
    assert out["changed_digest"] != out["digest"]
    sites = sites_of(out["C"])
    for site in SITES:
        assert sites[site]["train_status"] == "refused"
        assert sites[site]["train_error"] == f"{site}: app not approved by this site: digest {out['changed_digest']}"
        assert out["changed_digest"] in site_logs(root, site)  # the site logs the digest
        installed = [p.name for p in (root / "sites" / site / "flwr-home" / "apps").iterdir()]
        assert not any(name.endswith(out["changed_digest"][:8]) for name in installed)
    assert not out["marker"].exists()
    assert "STOPPED" in (out["C"] / "summary.md").read_text()


def test_revoking_a_digest_refuses_the_next_run(gated):
    root, out = gated
    assert all(done.returncode == 0 for done in out["revoked"]), [d.stderr for d in out["revoked"]]
    sites = sites_of(out["D"])
    for site in SITES:
        assert sites[site]["train_status"] == "refused"
        assert out["digest"] in sites[site]["train_error"]
        listed = site_cli("list", state=root / "sites" / site)
        assert "revoked" in listed.stdout and listed.returncode == 0


def test_a_site_cannot_list_or_submit_runs_through_the_fleet_port(deployment):
    control = deployment.of("control")
    for attempt in ("ls", "run", "register"):
        assert control[attempt].returncode != 0, control[attempt].stdout + control[attempt].stderr
    assert control["runtime"] == 403  # nor the ServerApp's Runtime API
    # The operator's own connection (loopback control port) sees exactly the runs the operator
    # submitted (the deployment's seven), none from the site.
    operator = control["operator_ls"]
    runs = json.loads(operator.stdout[operator.stdout.index("{"):])["runs"]
    assert operator.returncode == 0 and len(runs) == control["submitted"] == 7


def test_no_process_of_the_deployment_outlives_it(deployment):
    assert deployment.left_running == []
