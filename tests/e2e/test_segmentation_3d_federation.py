"""End to end: 3D segmentation with the real `flwr run`, two sites, one round, DP-SGD on every site,
whole-volume Dice reaching the server under the same key as in 2D. One round keeps it short; the 2D
run checks several rounds and the ledgers across them."""

import json

import pytest

from fedcare_ops.demo_segmentation import write_demo_segmentation_sites
from fedcare_ops.federation import run_simulation
from fedcare.privacy.ledger import Ledger
from tests.e2e.test_segmentation_federation import ROOT

pytestmark = pytest.mark.slow


def test_3d_sites_train_on_patches_privately_and_report_volume_dice(tmp_path):
    # epsilon 50 on 2 sites of 4 series: this test checks the mechanics, so the sites accept little noise
    write_demo_segmentation_sites(tmp_path / "data", sites=2, seed=3, cases=[40, 40],
                                  budgets={"site-0": 100.0, "site-1": 100.0}, policy={"min-noise-multiplier": 0.0})
    settings = {
        "task": "segmentation", "model": "unet", "input-mode": "3d", "patch-size": "16 16 8",
        "num-server-rounds": 1, "local-epochs": 1, "batch-size": 2, "learning-rate": 0.05,
        "data-root": str(tmp_path / "data"), "sites-dir": str(tmp_path / "sites"), "outputs-dir": str(tmp_path / "out"),
        "target-epsilon": 50.0,
    }
    folder = run_simulation(ROOT, None, 2, overrides=settings, flwr_home=tmp_path / "flwr-home")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["input-mode"] == "3d"
    [only] = metrics["rounds"]
    for entry in only["sites"].values():
        assert entry["train_status"] == "ok" and entry["evaluate_status"] == "ok"
        assert 0.0 <= entry["dice"] <= 1.0 and "auc" not in entry
    assert set(only["aggregate"]) == {"loss", "dice", "num_examples"}
    for site in ("site-0", "site-1"):
        assert [e.round for e in Ledger(tmp_path / "sites" / site / "ledger.jsonl").entries()] == [1]
