"""The run config: pyproject defaults, presets, and one-line errors for wrong keys and values."""

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcare.config import RunConfig, load_preset
from fedcare.errors import ConfigError
from fedcare.model import build_model
from fedcare.readiness import run_problems
from fedcare.sites import site_from_node_config, write_site_settings

ROOT = Path(__file__).resolve().parents[2]


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
    ({"val-fraction": 0.5}, "val-fraction"),
    ({"site-budget-epsilon": 1e9}, "site-budget-epsilon"),
    ({"classes": "only-one"}, "classes"),
    ({"classes": "a, b, a"}, "classes"),
    ({"model-args": "[1, 2]"}, "model-args"),
    ({"in-channels": 0}, "in-channels"),
])
def test_wrong_key_or_value_names_it(values, named):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping(values)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("values, says", [
    ({"model": "resnett"}, "'model' = 'resnett' is neither one of fedcare's networks"),
    ({"task": "regression"}, "'task' = 'regression' must be one of classification, segmentation"),
    ({"model-args": '{"no_such_argument": 1}'}, "'model-args' do not fit network 'small-cnn'"),
    ({"model": "EfficientNetBN", "model-args": '{"model_name": "efficientnet-b0", "pretrained": true}'},
     "downloads and reads nothing"),
    # A size the network cannot take is named as such, not as a per-sample gradient Opacus cannot compute.
    ({"model": "DenseNet121", "image-size": 4}, "'image-size' = 4 is too small for the 'DenseNet121' network"),
    ({"model": "Transchex", "model-args": '{"path_or_repo_id": "/etc", "filename": "passwd"}'},
     "'model-args' filename, path_or_repo_id would have the site load"),
])
def test_an_unknown_task_or_network_stops_the_run_in_one_line(values, says):
    # Names are looked up in the registries when the run starts: the ServerApp, `fedcare run` and
    # `fedcare check-config` all stop on these problems.
    problems = run_problems(RunConfig.from_mapping(values))
    assert len(problems) == 1 and says in problems[0] and "\n" not in problems[0]


def test_a_coordinator_cannot_make_a_site_fetch_weights_it_names():
    # The hostile coordinator's run config: a MONAI network whose argument downloads weights from a
    # server the coordinator controls (here a listener on loopback that records who connects).
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/weights.pth"
    config = RunConfig.from_mapping({"model": "HoVerNet", "model-args": json.dumps({"pretrained_url": url})})
    with pytest.raises(ConfigError, match="pretrained_url would have the site load weights"):
        build_model(config)
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()


def test_simulated_and_deployed_sites_resolve_their_own_folders_and_policies(tmp_path):
    config = RunConfig.from_mapping({"data-root": str(tmp_path / "d"), "sites-dir": "/s"})
    write_site_settings(tmp_path / "d" / "site-1", budget_epsilon=3, min_noise_multiplier=0.8)
    simulated = site_from_node_config({"partition-id": 1, "num-partitions": 3}, config)
    assert (simulated.name, simulated.data_path, simulated.state_path, simulated.policy.budget_epsilon) == (
        "site-1", tmp_path / "d" / "site-1", Path("/s/site-1"), 3.0)
    assert simulated.policy.min_noise_multiplier == 0.8 and simulated.policy.dp_required
    deployed = site_from_node_config(
        {"site-name": "st-olav", "data-path": "/data", "state-path": "/state", "budget-epsilon": 6.0}, config)
    assert deployed.ledger_path == Path("/state/ledger.jsonl") and deployed.policy.budget_epsilon == 6.0
    with pytest.raises(ConfigError, match="state-path"):
        site_from_node_config({"site-name": "x", "data-path": "/data"}, config)
    with pytest.raises(ConfigError, match="budget-epsilon"):
        site_from_node_config({"site-name": "x", "data-path": "/d", "state-path": "/s", "budget-epsilon": -1}, config)
    with pytest.raises(ConfigError, match="cache-dir"):
        site_from_node_config({"site-name": "x", "data-path": "/d", "state-path": "/s", "budget-epsilon": 1.0,
                               "cache-dir": "../elsewhere"}, config)


def test_a_deployed_site_without_a_budget_stops_in_one_line_naming_the_setting():
    with pytest.raises(ConfigError) as caught:
        site_from_node_config({"site-name": "x", "data-path": "/d", "state-path": "/s"}, RunConfig())
    assert "'budget-epsilon' is missing" in str(caught.value) and "\n" not in str(caught.value)


def test_a_simulated_site_without_its_settings_file_stops_in_one_line(tmp_path):
    (tmp_path / "site-0").mkdir()
    with pytest.raises(ConfigError, match="site.toml"):
        site_from_node_config({"partition-id": 0, "num-partitions": 1}, RunConfig(data_root=str(tmp_path)))


def test_cli_check_config_reports_a_wrong_key_in_one_line(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text("num-server-rounds = 3\nlocal-epoch = 2\n")
    done = subprocess.run([sys.executable, "-m", "fedcare_ops", "check-config", str(preset)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "local-epoch" in done.stderr and str(preset) in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_cli_run_names_a_missing_site_folder_in_one_line(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text(f'data-root = "{tmp_path / "nowhere"}"\noutputs-dir = "{tmp_path / "out"}"\n')
    done = subprocess.run([sys.executable, "-m", "fedcare_ops", "run", "--config", str(preset), "--sites", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "nowhere" in done.stderr and "site-0" in done.stderr and "fedcare demo-data" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
