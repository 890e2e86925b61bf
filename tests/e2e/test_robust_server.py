"""End to end on real Flower runs: faulty sites, too few sites, and resuming from a checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from fedcare_ops.demo_data import write_demo_sites
from fedcare.errors import FedcareError
from fedcare_ops.federation import run_simulation
from fedcare.privacy.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sites") / "data"
    # The first test runs without DP (the faults are the point), which these sites allow.
    write_demo_sites(folder, sites=4, seed=5, cases=[40, 40, 40, 40], budgets={f"site-{i}": 50.0 for i in range(4)},
                     policy={"dp-required": False})
    return folder


def settings(base: Path, data: Path, **overrides) -> dict:
    return {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 16, "data-root": str(data),
            "sites-dir": str(base / "sites"), "outputs-dir": str(base / "out")} | overrides


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_bad_updates_are_rejected_and_the_run_completes(data, tmp_path):
    folder = run_simulation(ROOT / "tests" / "faulty_app", None, 4, flwr_home=tmp_path / "flwr",
                            overrides=settings(tmp_path, data, **{"min-sites": 1}))
    for item in metrics(folder)["rounds"]:
        sites = item["sites"]
        assert sites["site-0"]["train_status"] == "ok"
        assert sites["site-1"]["train_status"] == "rejected" and "NaN" in sites["site-1"]["train_error"]
        assert sites["site-2"]["train_status"] == "rejected" and "shape" in sites["site-2"]["train_error"]
        assert sites["site-3"]["train_status"] == "failed"
        assert "simulated disk failure" in sites["site-3"]["train_error"]
        assert {f["site"] for f in item["failures"] if f["stage"] == "train"} == {"site-1", "site-2", "site-3"}
    model = torch.load(folder / "global_model.pt")
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_too_few_sites_stop_the_run_with_a_checkpoint_then_resume(data, tmp_path, capfd):
    base = settings(tmp_path, data, **{"num-server-rounds": 2, "dp": True, "target-epsilon": 6.0,
                                       "optimizer": "sgd", "learning-rate": 0.1})
    first = run_simulation(ROOT, None, 2, flwr_home=tmp_path / "flwr", overrides=base)
    assert [r["round"] for r in metrics(first)["rounds"]] == [1, 2]
    checkpoint = torch.load(tmp_path / "out" / "checkpoints" / first.name / "checkpoint.pt", weights_only=False)
    assert checkpoint["round"] == 2 and metrics(first)["checkpoint"] == f"checkpoints/{first.name}"
    assert (first / "best_model.pt").is_file() and (first / "metrics.png").is_file()
    # The `flwr run --stream` output: the run's own line per site and round, once each, and its folder.
    stream = capfd.readouterr().out
    assert stream.count("round 2 site-1: trained; epsilon spent") == 1
    assert stream.count("round 2 all sites: weighted val AUC") == 1
    assert stream.count(f"Run folder: {first}") == 1 and "Received 2 results" not in stream

    resumed = run_simulation(ROOT, None, 2, flwr_home=tmp_path / "flwr",
                             overrides=base | {"num-server-rounds": 4, "resume": first.name})
    document = metrics(resumed)
    assert [r["round"] for r in document["rounds"]] == [1, 2, 3, 4]
    assert document["resumed_from_round"] == 2 and document["resumed_run"] == first.name
    for site in ("site-0", "site-1"):
        rounds = [e.round for e in Ledger(tmp_path / "sites" / site / "ledger.jsonl").entries()]
        assert rounds == [1, 2, 3, 4]  # one entry per trained round, none repeated, none lost
    report = json.loads((resumed / "privacy_report.json").read_text())
    assert [r["round"] for r in report["sites"]["site-0"]["rounds"]] == [1, 2, 3, 4]

    broken = tmp_path / "broken"
    write_demo_sites(broken, sites=2, seed=5, cases=[40, 40], budgets={"site-0": 50.0, "site-1": 50.0})
    (broken / "site-1" / "labels.csv").unlink()
    with pytest.raises(FedcareError, match="stopped early"):  # check=False: the site, not the runner, refuses
        run_simulation(ROOT, None, 2, flwr_home=tmp_path / "flwr", check=False,
                       overrides=base | {"num-server-rounds": 5, "resume": resumed.name, "data-root": str(broken)})
    stream = capfd.readouterr().out
    assert "round 5 site-1: failed (site-1: " in stream
    # The stopped run completed no round of its own: its folder is kept, but latest is still the resumed run.
    assert (tmp_path / "out" / "latest").resolve() == resumed
    [stopped] = [p for p in (tmp_path / "out").iterdir() if p.name not in ("latest", "checkpoints", resumed.name,
                                                                            first.name) and (p / "metrics.json").is_file()]
    document = metrics(stopped)
    assert "min-sites is 2" in document["stopped"]
    assert f'can continue with resume = "{stopped.name}"' in document["stopped"] in stream
    assert document["rounds"][-1]["sites"]["site-1"]["train_status"] == "failed"
    # Each run wrote its own checkpoint; the stopped one's is at round 4, where it continued the resumed run.
    assert torch.load(tmp_path / "out" / "checkpoints" / stopped.name / "checkpoint.pt", weights_only=False)["round"] == 4
    assert torch.load(tmp_path / "out" / "checkpoints" / first.name / "checkpoint.pt", weights_only=False)["round"] == 2
