"""End to end: segmentation with the real `flwr run`, two sites, two rounds, DP-SGD on every site."""

import json
from pathlib import Path

import pytest

from data_adapters import write_demo_segmentation_sites
from fedcare.federation import run_simulation
from fedcare.privacy.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("segmentation")
    write_demo_segmentation_sites(base / "data", sites=2, seed=3, cases=[40, 60])
    settings = {
        "task": "segmentation", "model": "unet", "num-server-rounds": 2, "local-epochs": 4, "batch-size": 8,
        "learning-rate": 0.5, "data-root": str(base / "data"), "sites-dir": str(base / "sites"),
        "outputs-dir": str(base / "out"), "target-epsilon": 50.0, "site-budget-epsilon": 100.0,
    }
    folder = run_simulation(ROOT, None, 2, overrides=settings, flwr_home=base / "flwr-home")
    return base, folder, json.loads((folder / "metrics.json").read_text())


def test_every_site_trains_privately_and_reports_dice(segmentation_run):
    base, folder, metrics = segmentation_run
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for item in metrics["rounds"]:
        for entry in item["sites"].values():
            assert entry["train_status"] == "ok" and entry["evaluate_status"] == "ok"
            assert 0.0 <= entry["dice"] <= 1.0 and "auc" not in entry
        assert set(item["aggregate"]) == {"loss", "dice", "num_examples"}
    for site in ("site-0", "site-1"):
        assert [e.round for e in Ledger(base / "sites" / site / "ledger.jsonl").entries()] == [1, 2]
    assert json.loads((folder / "privacy_report.json").read_text())["dp"] is True
    assert "val Dice" in (folder / "summary.md").read_text()
