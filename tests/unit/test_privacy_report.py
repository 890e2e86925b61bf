"""Privacy reports from a run's site figures and from one site's ledger, with real accounting."""

import json
import struct

import pytest

from fedcare.errors import FedcareError, LedgerError
from fedcare.privacy import accounting
from fedcare.privacy.ledger import Ledger
from fedcare.privacy.record import NO_DP, PrivacyRecord
from fedcare.privacy.report import REPORT_FILES, report_from_ledger, write_privacy_report

Q = 1 / 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def site_figures(history_before, rounds, delta, accountant, budget):
    """What a site sends the server: its lifetime history and this run's rounds, all real figures."""
    history = list(history_before)
    entries = []
    for number, sigma in enumerate(rounds, start=1):
        history.append((sigma, Q, 16))
        spent = accounting.epsilon(history, delta, accountant)
        entries.append({"round": number, "sample_rate": Q, "noise_multiplier": sigma, "steps": 16})
        entries[-1].update(max_grad_norm=1.0, epsilon=spent)
    return {
        "accountant": accountant,
        "delta": delta,
        "budget_epsilon": budget,
        "epsilon": entries[-1]["epsilon"],
        "status": "ok",
        "history": [list(event) for event in history],
        "rounds": entries,
        "refused_rounds": [],
    }


@pytest.fixture
def run_report():
    return {
        "dp": True,
        "run_id": "run-7",
        "sites": {
            "site-0": site_figures([(1.36, Q, 16)] * 2, [1.36, 1.36, 1.36], 1e-3, "rdp", 8.0),
            "site-1": site_figures([], [1.0, 1.0], 2e-4, "prv", 3.0) | {"num_samples": 480},
        },
    }


def read_json(run_dir):
    return json.loads((run_dir / "privacy_report.json").read_text())


def png_size(data):
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_three_files_are_written_without_temporaries(tmp_path, run_report):
    paths = write_privacy_report(tmp_path / "run", run_report)
    assert [path.name for path in paths] == list(REPORT_FILES)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == sorted(REPORT_FILES)


def test_json_follows_the_schema(tmp_path, run_report):
    write_privacy_report(tmp_path, run_report)
    document = read_json(tmp_path)
    assert document["dp"] is True and document["run_id"] == "run-7"
    assert set(document["sites"]) == {"site-0", "site-1"}
    for site in document["sites"].values():
        assert {"accountant", "delta", "budget_epsilon", "epsilon", "status", "rounds"} <= set(site)
        assert site["status"] in ("ok", "budget-exhausted")
        epsilons = [entry["epsilon"] for entry in site["rounds"]]
        assert epsilons == sorted(epsilons) and epsilons[-1] == site["epsilon"]
        for entry in site["rounds"]:
            assert {"round", "sample_rate", "noise_multiplier", "steps", "max_grad_norm", "epsilon"} <= set(entry)
        assert site["agreement_warning"] is None
    site = document["sites"]["site-0"]
    # Lifetime: two rounds from an earlier run count before this run's first round.
    assert site["rounds"][0]["epsilon"] == pytest.approx(accounting.epsilon([(1.36, Q, 48)], 1e-3))
    assert site["independent"]["rdp"] == pytest.approx(site["epsilon"], rel=1e-3)
    assert site["independent"]["pld"] < site["independent"]["rdp"]


def test_markdown_has_the_site_table_assumptions_and_sign_off(tmp_path, run_report):
    write_privacy_report(tmp_path, run_report)
    page = (tmp_path / "privacy_report.md").read_text()
    assert "NO DIFFERENTIAL PRIVACY" not in page
    assert "| Site | Status | ε protects | Budget ε | Spent ε (lifetime) | δ |" in page
    epsilon = run_report["sites"]["site-0"]["epsilon"]
    assert f"| site-0 | ok | one sample | 8 | {epsilon:.4g} | 0.001 |" in page
    assert "set by the site (budget-delta), below 1/N = 0.00208 for N = 480" in page
    assert "(k·ε, k·e^((k−1)·ε)·δ)" in page and "roughly" not in page  # group privacy, stated exactly
    assert "os.urandom" in page and "training loss never leaves" in page
    for phrase in ("Poisson sampling", "protects a whole\n  patient", "not covered", "No images, per-case labels",
                   "confusion matrix"):
        assert phrase in page
    assert "## Sign-off" in page and "| Signature |" in page and "| Date |" in page
    assert "WARNING" not in page


def test_an_inconsistent_official_epsilon_is_flagged(tmp_path, run_report):
    run_report["sites"]["site-1"]["epsilon"] *= 0.9
    write_privacy_report(tmp_path, run_report)
    document = read_json(tmp_path)
    assert document["sites"]["site-0"]["agreement_warning"] is None
    assert "LOWER" in document["sites"]["site-1"]["agreement_warning"]
    page = (tmp_path / "privacy_report.md").read_text()
    assert "**WARNING, ACCOUNTING DISAGREEMENT at site `site-1`:**" in page
    assert "**DISAGREES" in page


def test_png_is_a_plot(tmp_path, run_report):
    write_privacy_report(tmp_path, run_report)
    data = (tmp_path / "privacy_report.png").read_bytes()
    assert png_size(data) == (800, 500)
    assert b"NO DIFFERENTIAL PRIVACY" not in data


def test_a_run_without_dp_says_so_in_every_file(tmp_path):
    report = {"dp": False, "run_id": "run-8", "sites": {"site-0": {}, "site-1": {}}}
    write_privacy_report(tmp_path, report)
    document = read_json(tmp_path)
    assert document["dp"] is False and "NO DIFFERENTIAL PRIVACY" in document["warning"]
    page = (tmp_path / "privacy_report.md").read_text()
    assert page.startswith("**NO DIFFERENTIAL PRIVACY**")
    assert "no formal privacy guarantee" in page.lower() and "`site-1`" in page
    png = (tmp_path / "privacy_report.png").read_bytes()
    png_size(png)
    assert b"NO DIFFERENTIAL PRIVACY: no formal privacy guarantee holds" in png


def test_the_callers_report_is_not_changed(tmp_path, run_report):
    before = json.dumps(run_report, sort_keys=True)
    write_privacy_report(tmp_path, run_report)
    assert json.dumps(run_report, sort_keys=True) == before


@pytest.mark.parametrize("key", ["delta", "status", "rounds"])
def test_a_site_missing_figures_is_a_one_line_error(tmp_path, run_report, key):
    del run_report["sites"]["site-1"][key]
    with pytest.raises(FedcareError) as error:
        write_privacy_report(tmp_path, run_report)
    assert str(tmp_path) in str(error.value) and key in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def two_run_ledger(tmp_path):
    ledger = Ledger(tmp_path / "site-north" / "ledger.jsonl")
    for run_id in ("run-a", "run-b"):
        for number in (1, 2):
            spent = accounting.epsilon_after(ledger.history(), 1.0, Q, 16, 1e-5, "rdp")
            ledger.append(run_id, number, Q, 1.0, 16, 1.0, 1e-5, "rdp", spent, 8.0)
    return ledger


def test_report_from_a_ledger_with_two_runs(tmp_path, two_run_ledger):
    report = report_from_ledger(two_run_ledger.path)
    site = report["sites"]["site-north"]
    assert report["dp"] is True and list(report["sites"]) == ["site-north"]
    labels = [(entry["run_id"], entry["round"]) for entry in site["rounds"]]
    assert labels == [("run-a", 1), ("run-a", 2), ("run-b", 1), ("run-b", 2)]
    assert [entry["epsilon"] for entry in site["rounds"]] == [entry.epsilon for entry in two_run_ledger.entries()]
    assert site["epsilon"] == pytest.approx(accounting.epsilon([(1.0, Q, 64)], 1e-5))
    assert (site["budget_epsilon"], site["status"], site["delta"]) == (8.0, "ok", 1e-5)
    assert site["history"] == [[1.0, Q, 16]] * 4

    write_privacy_report(tmp_path / "out", report)
    page = (tmp_path / "out" / "privacy_report.md").read_text()
    assert "lifetime ledger of site `site-north`" in page and "run-a, run-b" in page
    assert "| run-b | 2 |" in page
    assert read_json(tmp_path / "out")["sites"]["site-north"]["agreement_warning"] is None


def test_report_from_a_ledger_with_a_smaller_budget_is_exhausted(two_run_ledger):
    spent = two_run_ledger.spent(1e-5, "rdp")
    assert report_from_ledger(two_run_ledger.path, budget_epsilon=spent + 0.1)["sites"]["site-north"]["status"] == (
        "budget-exhausted"
    )
    assert report_from_ledger(two_run_ledger.path, budget_epsilon=spent + 1.0)["sites"]["site-north"]["status"] == "ok"


def test_report_from_a_tampered_or_missing_ledger_fails(tmp_path, two_run_ledger):
    with pytest.raises(LedgerError, match="no ledger here"):
        report_from_ledger(tmp_path / "elsewhere" / "ledger.jsonl")
    two_run_ledger.head_path.unlink()
    with pytest.raises(LedgerError, match="head file"):
        report_from_ledger(two_run_ledger.path)


def test_a_round_without_dp_in_the_ledger_is_reported_as_an_unbounded_release(tmp_path, two_run_ledger):
    spent = two_run_ledger.entries()[-1].epsilon
    two_run_ledger.append_record("run-c", 1, PrivacyRecord(NO_DP, "patient", 1, 1.0, 0.0, 16, 1.0, 1e-5, "rdp", spent, 8.0))
    report = report_from_ledger(two_run_ledger.path)
    site = report["sites"]["site-north"]
    assert site["unbounded_rounds"] == ["run-c round 1"] and len(site["rounds"]) == 4
    write_privacy_report(tmp_path / "out", report)
    page = (tmp_path / "out" / "privacy_report.md").read_text()
    assert "WARNING, UNBOUNDED RELEASE at site `site-north`" in page and "trained WITHOUT DP" in page
