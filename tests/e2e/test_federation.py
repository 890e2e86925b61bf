"""End to end: the real `flwr run` on a local simulation SuperLink, two sites, two rounds.

The runs share one pair of site folders, as a hospital's disk would across runs: the second run
must continue each site's lifetime ledger, and a site without budget left must refuse to train.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedcare_ops.demo_data import write_demo_sites
from fedcare.config import RunConfig
from fedcare.model import build_model
from fedcare_ops.federation import run_simulation
from fedcare.privacy.ledger import Ledger
from fedcare.sites import write_site_settings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.mktemp("federation")
    write_demo_sites(base / "data", sites=2, seed=3, cases=[40, 60], budgets={"site-0": 50.0, "site-1": 50.0})
    settings = {
        "num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "learning-rate": 0.003,
        "data-root": str(base / "data"), "sites-dir": str(base / "sites"), "outputs-dir": str(base / "out"),
        "target-epsilon": 4.0,
        "min-sites": 1,  # one site refuses or fails on purpose below; the other carries the round
    }

    def run(check=True, **overrides):
        values = settings | overrides
        # What `fedcare run` would print, kept for the checks on what users see.
        with open(base / f"output-{len(list(base.glob('output-*')))}.txt", "w") as output:
            folder = run_simulation(ROOT, None, 2, overrides=values, flwr_home=base / "flwr-home", check=check,
                                    output=output)
        return folder, values

    return base, run


@pytest.fixture(scope="module")
def first_run(federation):
    return federation[1]()


def test_each_flower_line_is_printed_once_and_expected_notices_are_explained_once(federation, first_run):
    base, _ = federation
    output = (base / "output-0.txt").read_text()
    # Flower's own lines, which a second (root) handler used to print again without colour
    expected = {"[ROUND 1/2]": 1, "[ROUND 2/2]": 1, "configure_evaluate: Sampled 2 nodes (out of 2)": 2}
    assert {line: output.count(line) for line in expected} == expected
    assert ":DEBUG:" not in output
    # every round's start and every site's progress, each round, once
    assert output.count("round 1: asked 2 site(s) to train: node ") == 1
    assert output.count("round 2: asked 2 site(s) to train: site-0, site-1") == 1  # named by their first replies
    for server_round in (1, 2):
        for site in ("site-0", "site-1"):
            assert output.count(f"round {server_round} {site}: trained") == 1, (server_round, site)
    assert output.count("Secure RNG turned off") <= 1
    assert 1 <= output.count("secure RNG is off; expected") <= 2  # once per site process at most
    # Flower's simulation and Ray notices that do not apply: one line each saying why, their hints gone
    assert "default simulated SuperNodes changed" not in output and "--num-supernodes <N>" not in output
    assert output.count("does not apply: `fedcare run` sets it from --sites (2 here)") == 1
    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in output


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_run_folder_has_model_metrics_summary_and_report(first_run):
    folder, _ = first_run
    for name in ("global_model.pt", "metrics.json", "summary.md", "privacy_report.json",
                 "privacy_report.md", "privacy_report.png"):
        assert (folder / name).is_file(), name
    assert (folder.parent / "latest").resolve() == folder
    assert not list(folder.parent.glob(".*.partial"))


def test_every_site_reports_every_round(first_run):
    folder, values = first_run
    metrics = read(folder, "metrics.json")
    assert metrics["config"]["num-server-rounds"] == 2
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for item in metrics["rounds"]:
        assert sorted(item["sites"]) == ["site-0", "site-1"]
        for entry in item["sites"].values():
            assert entry["train_status"] == "ok" and entry["evaluate_status"] == "ok"
            assert 0.0 <= entry["auc"] <= 1.0 and entry["num_examples"] > 0
        # num-examples are images, training plus validation: all 40 and 60 cases, each patient on one side
        assert sorted(e["num_train_examples"] + e["num_examples"] for e in item["sites"].values()) == [40, 60]
        total = sum(e["num_examples"] for e in item["sites"].values())
        weighted = sum(e["auc"] * e["num_examples"] for e in item["sites"].values()) / total
        assert item["aggregate"]["auc"] == pytest.approx(weighted)
    summary = (folder / "summary.md").read_text()
    assert summary.count("| site-0 |") == 2 and summary.count("| site-1 |") == 2


def test_global_model_moved_away_from_the_initial_weights(first_run):
    folder, values = first_run
    trained = torch.load(folder / "global_model.pt")
    initial = build_model(RunConfig.from_mapping(values)).state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_privacy_report_matches_each_sites_ledger(federation, first_run):
    base, _ = federation
    folder, _ = first_run
    report = read(folder, "privacy_report.json")
    assert report["dp"] is True
    for site in ("site-0", "site-1"):
        entries = Ledger(base / "sites" / site / "ledger.jsonl").entries()
        rounds = report["sites"][site]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2] == [e.round for e in entries]
        assert [r["epsilon"] for r in rounds] == pytest.approx([e.epsilon for e in entries])
        assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 4.0 + 1e-6
        assert report["sites"][site]["status"] == "ok"


def test_second_run_continues_the_ledger_and_a_spent_site_refuses(federation, first_run):
    base, run = federation
    spent = Ledger(base / "sites" / "site-0" / "ledger.jsonl").entries()[-1].epsilon
    before = Ledger(base / "sites" / "site-1" / "ledger.jsonl").entries()
    write_site_settings(base / "data" / "site-0", budget_epsilon=round(spent + 0.01, 4))  # the site lowers its own
    folder, _ = run()

    assert len(Ledger(base / "sites" / "site-0" / "ledger.jsonl").entries()) == 2
    after = Ledger(base / "sites" / "site-1" / "ledger.jsonl").entries()
    assert len(after) == 4 and after[:2] == before
    assert after[2].epsilon > before[-1].epsilon  # spending composes across runs

    report = read(folder, "privacy_report.json")["sites"]
    assert report["site-0"]["status"] == "budget-exhausted"
    assert report["site-0"]["epsilon"] <= report["site-0"]["budget_epsilon"]
    assert report["site-1"]["status"] == "ok"
    metrics = read(folder, "metrics.json")
    for item in metrics["rounds"]:
        assert item["sites"]["site-0"]["train_status"] == "refused"
        assert item["sites"]["site-0"]["evaluate_status"] == "ok"
        assert item["sites"]["site-1"]["train_status"] == "ok"


def test_a_site_with_a_broken_manifest_fails_its_reply_by_name(federation, first_run, tmp_path):
    base, run = federation
    data = tmp_path / "data"
    shutil.copytree(base / "data", data)
    (data / "site-1" / "labels.csv").write_text("SOPInstanceUID;label\n1.2.3;yes\n")
    # The runner's readiness check would refuse site-1 before starting; here the site must refuse itself.
    folder, _ = run(check=False, **{"data-root": str(data), "sites-dir": str(tmp_path / "sites")})
    metrics = read(folder, "metrics.json")
    for item in metrics["rounds"]:
        assert item["sites"]["site-0"]["train_status"] == "ok"
        failure = [f for f in item["failures"] if f["site"] == "site-1" and f["stage"] == "train"]
        assert failure and "label manifest" in failure[0]["reason"]  # the kind; the file stays in the site's log
        assert str(data) not in failure[0]["reason"] and "Traceback" not in failure[0]["reason"]
    assert "trained" not in json.dumps(read(folder, "privacy_report.json")["sites"].get("site-1", {}))
