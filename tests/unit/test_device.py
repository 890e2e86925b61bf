"""A site's device: auto picks the GPU when torch sees one and the CPU otherwise; replies are CPU tensors.

Nothing here needs a GPU; the tests marked `gpu` run only where torch sees a CUDA device.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from client_app.app import app, train
from fedcare.config import load_preset
from fedcare.device import resolve_device
from fedcare.errors import ConfigError, FedcareError
from fedcare_ops.federation import SiteResources
from fedcare.model import build_model, grad_sample_mode
from tests.unit.test_client_app import RUN, request

ROOT = Path(__file__).resolve().parents[2]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data(demo_site: Path) -> Path:
    return demo_site


def context(data: Path, state: Path, device: str) -> Context:
    node = {"site-name": "st-olav", "data-path": str(data), "state-path": str(state), "budget-epsilon": 50.0,
            "device": device}
    return Context(run_id=11, node_id=5, node_config=node, state=RecordDict(), run_config=RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_auto_trains_on_the_cpu_where_torch_sees_no_gpu(data, tmp_path):
    assert resolve_device("auto") == torch.device("cpu")
    reply = app(request("train"), context(data, tmp_path, "auto"))
    assert reply.content["privacy"]["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_asking_for_cuda_without_it_fails_at_start_in_one_line(data, tmp_path, caplog):
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda")
    assert "'device' = 'cuda'" in str(caught.value) and "\n" not in str(caught.value)
    reply = train(request("train"), context(data, tmp_path, "cuda:1"))
    assert reply.has_error() and "setting is wrong" in reply.error.reason
    assert "torch sees no CUDA device" in caplog.text
    assert not (tmp_path / "ledger.jsonl").exists()  # stopped before it touched the site's state


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "tpu"])
def test_a_device_setting_that_names_nothing_is_a_one_line_error(setting):
    with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda or cuda:N"):
        resolve_device(setting)


def test_every_reply_carries_cpu_tensors(data, tmp_path):
    reply = train(request("train"), context(data, tmp_path, "auto"))
    for tensor in reply.content["arrays"].to_torch_state_dict().values():
        assert tensor.device.type == "cpu"


def test_no_code_path_puts_a_tensor_on_a_fixed_device():
    """New tensors take the device of the model or the batch; only fedcare/device.py names a device."""
    fixed = re.compile(r"\.cuda\(|device=[\"']cuda|torch\.device\([\"']cuda")
    offenders = []
    for folder in ("fedcare", "client_app", "server_app", "data_adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "device.py" and fixed.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize("preset", ["configs/gpu-2d.toml", "configs/gpu-3d-segmentation.toml"])
def test_the_gpu_presets_are_trainable_under_opacus(preset):
    config = load_preset(ROOT / preset)
    assert grad_sample_mode(build_model(config), config) in ("hooks", "functorch", "ew")  # refuses otherwise


def test_the_gpu_benchmark_says_so_and_exits_0_where_there_is_no_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", "/dev/null"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    if not torch.cuda.is_available():
        assert "no CUDA device" in done.stdout


@gpu
def test_a_site_trains_on_its_gpu_and_replies_with_cpu_weights(data, tmp_path):
    reply = train(request("train"), context(data, tmp_path, "cuda"))
    assert reply.content["privacy"]["status"] == "ok"
    assert all(t.device.type == "cpu" for t in reply.content["arrays"].to_torch_state_dict().values())
    assert torch.cuda.memory_allocated() < 64 * 2**20  # released after the round


def test_simulated_sites_reserve_what_fedcare_run_asks_of_flowers_backend():
    assert SiteResources().federation_config(3) == (
        "num-supernodes=3 client-resources-num-cpus=2 client-resources-num-gpus=0")
    if torch.cuda.is_available():
        assert SiteResources(1, 0.5).federation_config(2).endswith("client-resources-num-gpus=0.5")
    else:
        with pytest.raises(FedcareError, match="--gpus-per-site 0.5: torch sees no CUDA device"):
            SiteResources(1, 0.5).federation_config(2)

