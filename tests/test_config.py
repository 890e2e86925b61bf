"""The run config: pyproject defaults, presets, and one-line errors for wrong keys and values."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcare.config import RunConfig, load_preset, parse_site_budgets
from fedcare.errors import ConfigError
from fedcare.sites import site_from_node_config

ROOT = Path(__file__).resolve().parents[1]


def pyproject_defaults() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_same_default():
    declared = pyproject_defaults()
    assert RunConfig.from_mapping(declared) == RunConfig()
    assert set(declared) == set(RunConfig().to_dict())


NODE_EXAMPLE = ROOT / "configs" / "site-node.example.toml"


@pytest.mark.parametrize("preset", sorted(set((ROOT / "configs").glob("*.toml")) - {NODE_EXAMPLE}))
def test_every_run_preset_is_valid(preset):
    assert isinstance(load_preset(preset), RunConfig)


def test_node_config_example_is_a_valid_site():
    with open(NODE_EXAMPLE, "rb") as handle:
        site = site_from_node_config(tomllib.load(handle), RunConfig())
    assert site.ledger_path == Path("/state/ledger.jsonl")


@pytest.mark.parametrize("values, named", [
    ({"num-server-round": 3}, "num-server-round"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"learning-rate": "fast"}, "learning-rate"),
    ({"dp": 1}, "dp"),
    ({"accountant": "moments"}, "accountant"),
    ({"val-fraction": 1.0}, "val-fraction"),
    ({"site-budgets": "site-0=eight"}, "site-0=eight"),
    ({"model": "resnet"}, "model"),
])
def test_wrong_key_or_value_names_it(values, named):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping(values)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_site_budgets_parse_and_default():
    config = RunConfig.from_mapping({"site-budgets": "site-0=4 site-2=2.5", "site-budget-epsilon": 9})
    assert parse_site_budgets(config.site_budgets) == {"site-0": 4.0, "site-2": 2.5}
    assert config.site_budget("site-1") == 9.0


def test_simulated_and_deployed_sites_resolve_their_own_folders():
    config = RunConfig.from_mapping({"data-root": "/d", "sites-dir": "/s", "site-budgets": "site-1=3"})
    simulated = site_from_node_config({"partition-id": 1, "num-partitions": 3}, config)
    assert (simulated.name, simulated.data_path, simulated.state_path, simulated.budget_epsilon) == (
        "site-1", Path("/d/site-1"), Path("/s/site-1"), 3.0)
    deployed = site_from_node_config(
        {"site-name": "st-olav", "data-path": "/data", "state-path": "/state", "budget-epsilon": 6.0}, config)
    assert deployed.ledger_path == Path("/state/ledger.jsonl") and deployed.budget_epsilon == 6.0
    with pytest.raises(ConfigError, match="state-path"):
        site_from_node_config({"site-name": "x", "data-path": "/data"}, config)
    with pytest.raises(ConfigError, match="budget-epsilon"):
        site_from_node_config({"site-name": "x", "data-path": "/d", "state-path": "/s", "budget-epsilon": -1}, config)


def test_cli_check_config_reports_a_wrong_key_in_one_line(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text("num-server-rounds = 3\nlocal-epoch = 2\n")
    done = subprocess.run([sys.executable, "-m", "fedcare", "check-config", str(preset)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "local-epoch" in done.stderr and str(preset) in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_cli_run_names_a_missing_site_folder_in_one_line(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text(f'data-root = "{tmp_path / "nowhere"}"\noutputs-dir = "{tmp_path / "out"}"\n')
    done = subprocess.run([sys.executable, "-m", "fedcare", "run", "--config", str(preset), "--sites", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "nowhere" in done.stderr and "site-0" in done.stderr and "fedcare demo-data" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
