"""One readiness check, everywhere: `fedcare check-site`, the runner's pre-flight and the site's own
ClientApp refuse the same sites for the same reasons, and the run-level rules (min-sites, the sizes
the network takes) stop a run before anything starts. Real demo DICOM, real messages, no Flower run.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client_app.app import train
from fedcare_ops.demo_data import write_demo_sites
from data_adapters.readiness import check_site
from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE, SiteDataError, SiteNotReady
from fedcare_ops.federation import NotReady, preflight, run_simulation
from fedcare.policy import SitePolicy
from fedcare.readiness import run_problems
from fedcare.sites import write_site_settings
from tests.unit.test_client_app import request

ROOT = Path(__file__).resolve().parents[2]
RUN = {"num-server-rounds": 2, "batch-size": 16, "target-epsilon": 4.0, "min-sites": 1}


@pytest.fixture(scope="module")
def demo(demo_site: Path) -> Path:
    return demo_site


def site_context(data: Path, state: Path, run: dict, budget_delta: float) -> Context:
    node = {"site-name": "h3", "data-path": str(data), "state-path": str(state), "budget-epsilon": 50.0,
            "budget-delta": budget_delta}  # the same settings as the site's site.toml below
    return Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config=run)


def run_with_site(folder: Path, tmp_path: Path, **overrides) -> dict:
    return RUN | {"site-folders": f"h3={folder}", "sites-dir": str(tmp_path / "sites"),
                  "outputs-dir": str(tmp_path / "out")} | overrides


def assert_all_three_agree(folder: Path, tmp_path: Path, run: dict, budget_delta: float, caplog) -> list[str]:
    """check-site's problems are the pre-flight's and the ClientApp's; returns them."""
    config = RunConfig.from_mapping(run)
    write_site_settings(folder, budget_epsilon=50.0, budget_delta=budget_delta)
    checked = check_site(folder, config=config, policy=SitePolicy(budget_epsilon=50.0, budget_delta=budget_delta))
    assert not checked.ready and checked.report["problems"]
    assert preflight(config, 1) == [f"h3: {problem}" for problem in checked.report["problems"]]
    reply = train(request("train"), site_context(folder, tmp_path / "state", run, budget_delta))
    assert reply.has_error() and reply.error.code == SITE_ERROR_CODE
    assert reply.error.reason.startswith(f"h3: {SiteNotReady.kind}")
    # The reasons stay in the site's log: the same lines check-site printed.
    assert "h3 is not ready for this run: " + "; ".join(checked.report["problems"]) in caplog.text
    assert not (tmp_path / "state" / "ledger.jsonl").exists()  # refused before any privacy was spent
    return checked.report["problems"]


def test_a_label_outside_the_runs_classes_is_one_line_naming_the_manifest_row(demo_site_copy, tmp_path, caplog):
    folder = demo_site_copy
    rows = list(csv.reader((folder / "labels.csv").read_text().splitlines()))
    rows[1:] = [[uid, "2" if index % 3 == 0 else label] for index, (uid, label) in enumerate(rows[1:])]
    (folder / "labels.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    run = run_with_site(folder, tmp_path)
    write_site_settings(folder, budget_epsilon=50.0)
    config, policy = RunConfig.from_mapping(run), SitePolicy(budget_epsilon=50.0)
    checked = check_site(folder, config=config, policy=policy)
    [problem] = checked.report["problems"]
    assert f"{folder / 'labels.csv'} row 2: label '2' is not a class of the run" in problem
    assert "0 negative, 1 positive" in problem and "\n" not in problem
    assert preflight(config, 1) == [f"h3: {problem}"]
    reply = train(request("train"), site_context(folder, tmp_path / "state", run, 0.0))
    assert reply.has_error() and reply.error.code == SITE_ERROR_CODE
    assert reply.error.reason.startswith(f"h3: {SiteDataError.kind}") and "row 2" in caplog.text  # the row stays at the site
    # The same labels in a three-class run: the site is ready, by index or by the class's name.
    three = RunConfig.from_mapping(run | {"classes": "negative, positive, other"})
    assert check_site(folder, config=three, policy=policy).ready
    (folder / "labels.csv").write_text((folder / "labels.csv").read_text().replace(",2\n", ",other\n"))
    assert check_site(folder, config=three, policy=policy).ready


def test_a_three_image_site_is_refused_by_check_site_the_run_and_the_site(tmp_path, caplog):
    [folder] = write_demo_sites(tmp_path / "tiny", sites=1, seed=2, cases=[3])
    # The site also set itself a delta far too large for any guarantee.
    problems = assert_all_three_agree(folder, tmp_path, run_with_site(folder, tmp_path), 0.05, caplog)
    assert any(p.startswith("class ") and "label more cases of class" in p for p in problems)
    [delta] = [p for p in problems if p.startswith("delta would be")]
    assert "above 0.001" in delta and "set budget-delta in the site's settings" in delta


def test_image_size_seven_stops_check_config_and_the_run_in_one_line(demo, tmp_path, fedcare):
    [problem] = run_problems(RunConfig(image_size=7))
    assert "'image-size' = 7 is too small for the 'small-cnn' network" in problem
    assert problem.endswith("set image-size to 8 or more")
    assert run_problems(RunConfig(image_size=8)) == []

    preset = tmp_path / "small.toml"
    preset.write_text("image-size = 7\n")
    status, _, err = fedcare("check-config", str(preset))
    assert status == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "image-size" in err

    home = tmp_path / "flwr-home"
    with pytest.raises(NotReady) as stopped:
        run_simulation(ROOT, preset, 1, overrides={"data-root": str(demo.parent), "outputs-dir": str(tmp_path),
                                                   "min-sites": 1}, flwr_home=home)
    assert stopped.value.problems[0] == problem  # the run's own problem first, then the site's
    assert not home.exists()  # refused before Flower was started


def test_min_sites_above_the_sites_stops_the_run_before_it_starts(demo, tmp_path):
    run = {"min-sites": 3, "data-root": str(demo.parent), "outputs-dir": str(tmp_path)}
    [problem] = run_problems(RunConfig.from_mapping(run), 2)
    assert "'min-sites' = 3 is more than the 2 site(s)" in problem and "set min-sites to 2 or less" in problem
    home = tmp_path / "flwr-home"
    with pytest.raises(NotReady) as stopped:
        run_simulation(ROOT, None, 2, overrides=run, flwr_home=home)
    assert problem in stopped.value.problems
    assert not home.exists()
