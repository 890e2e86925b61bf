"""The site decides how many samples go through its network at once (max-physical-batch); the run's
batch-size stays what it is for privacy, the sampling rate: a larger Poisson batch is put through in
parts whose clipped gradients make the one noisy step, so a coordinator's batch-size cannot set how
much memory a site's step takes, and the site's accounting does not change."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client_app.app import evaluate_global, train
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.model import build_model
from fedcare.policy import SitePolicy
from fedcare.privacy.dpsgd import plan_round, train_private
from fedcare.sites import Site, site_from_settings
from tests.unit.test_client_app import context, request

CONFIG = RunConfig(num_server_rounds=1, local_epochs=2, batch_size=32, target_epsilon=8.0)


def batches_seen(model: nn.Module) -> list[int]:
    """The batch size of every forward pass `model` makes from now on."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
    return seen


def test_a_poisson_batch_over_the_physical_batch_goes_through_in_parts_and_is_still_one_step(tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(96, 1, 64, 64, generator=generator), torch.randint(0, 2, (96,), generator=generator))
    site = Site("site-0", tmp_path / "data", tmp_path / "state", SitePolicy(budget_epsilon=50.0))
    plan = plan_round(CONFIG, site, len(data), [], "run-1")
    assert plan.sample_rate == pytest.approx(32 / 96)
    for physical, largest in ((5, lambda seen: max(seen) <= 5), (1000, lambda seen: max(seen) > 16)):
        model = build_model(CONFIG)
        seen = batches_seen(model)
        _, record = train_private(model, data, CONFIG, plan, [], physical_batch=physical)
        assert largest(seen), (physical, seen)
        # As many noisy steps as planned and accounted: the parts of a batch are not steps of their own.
        assert record.steps == plan.steps == 2 * 3
        assert record.epsilon == pytest.approx(plan.record.epsilon)


def test_a_site_with_a_small_physical_batch_trains_and_evaluates(demo_site: Path, tmp_path: Path):
    reply = train(request("train"), context(demo_site, tmp_path, max_physical_batch=3))
    assert not reply.has_error() and reply.content["privacy"]["status"] == "ok"
    reply = evaluate_global(request("evaluate"), context(demo_site, tmp_path, max_physical_batch=3))
    assert not reply.has_error() and 0.0 <= reply.content["metrics"]["auc"] <= 1.0


@pytest.mark.parametrize("value", [0, 2.5, "64", True])
def test_a_wrong_physical_batch_is_one_line_naming_it(tmp_path: Path, value):
    settings = {"site-name": "north", "data-path": str(tmp_path), "state-path": str(tmp_path), "budget-epsilon": 8.0,
                "max-physical-batch": value}
    with pytest.raises(ConfigError, match=r"site\.toml: 'max-physical-batch' = .* must be a whole number of samples"):
        site_from_settings(settings, "site.toml")
