"""End to end on real processes: a site runs only the app bundle its operator approved, only the
coordinator's operator reaches the control API, and a node cannot speak for another site.

The shared deployment (tests/shared_federation.py: a coordinator and registered sites through the
image's entry point) carries every case, one run after another:

  A  the project as approved at every site: trains to completion; "site-2" runs with its own
     registered key but claims to be site-0, and is filed and flagged as site-2;
  B  (after the deployment's site-kill and resume runs) site-1's ledger restored from a backup older
     than A (started anew by its operator), and a release without the bundle's egress mod
     (approved): trains, the gate still logs every reply, site-1's shrunk history is flagged;
  C  the project with one changed line in client_app/app.py (it would write a file): every site
     refuses it, the changed line never runs;
  D  the approved project again after the sites revoked it: refused.

Then, with the federation still up, a site's attempts at the control API through the Fleet port.
"""

import json
import subprocess
from pathlib import Path

import pytest

from fedcare_ops.deploy.local import check_run
from tests.shared_federation import FEDCARE, IMPOSTOR, SITES, Deployment, site_cli

# One deployment serves both files (tests/e2e/conftest.py): under xdist they run on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment")]


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


def test_no_process_of_the_gated_federation_outlives_it(deployment):
    assert deployment.left_running == []
