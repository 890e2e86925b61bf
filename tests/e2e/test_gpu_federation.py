"""End to end on a GPU: two simulated sites share one GPU (half each) and complete a short federation.

Runs only where torch sees a CUDA device; tests/unit/test_device.py checks the rest without one.
"""

from pathlib import Path

import pytest
import torch

from fedcare_ops.demo_data import write_demo_sites
from fedcare_ops.federation import SiteResources, run_simulation

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[2]


def test_a_short_gpu_federation_of_two_simulated_sites_completes(tmp_path):
    sites = write_demo_sites(tmp_path / "data", sites=2, cases=[120, 120], budgets={"site-0": 50.0, "site-1": 50.0},
                             policy={"device": "cuda"})
    assert sites
    folder = run_simulation(ROOT, None, 2, flwr_home=tmp_path / "flwr", resources=SiteResources(1, 0.5), overrides={
        "num-server-rounds": 2, "data-root": str(tmp_path / "data"), "sites-dir": str(tmp_path / "sites"),
        "outputs-dir": str(tmp_path / "out")})
    assert (folder / "global_model.pt").is_file()
