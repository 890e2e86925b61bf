"""DP-SGD on the segmentation U-Net, with real Opacus: per-sample gradients, clipping, noise, empty batches."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.model import build_model, grad_sample_mode
from fedcare.networks import NetworkShape, make_private_trainable, unet
from fedcare.privacy.dpsgd import plan_round, private_training, train_private
from fedcare.segmentation import DiceCrossEntropy, LesionTally
from fedcare.policy import SitePolicy
from fedcare.sites import Site
from fedcare.tasks import task_for
from fedcare.training import noise_only_step
from tests.dp_checks import assert_dp_step

CONFIG = RunConfig(task="segmentation", model="unet", num_server_rounds=2, batch_size=8, target_epsilon=6.0,
                   learning_rate=0.05)


def lesions(n: int = 32, size: int = 32, seed: int = 0) -> TensorDataset:
    """Noisy images with a bright disc in half of them, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(8, size - 8, (n, 2), generator=generator)
    masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 <= 16).long()
    masks[n // 2:] = 0
    images = 0.3 * torch.rand(n, 1, size, size, generator=generator) + 0.5 * masks[:, None]
    return TensorDataset(images, masks)


def site(tmp_path: Path) -> Site:
    return Site("site-0", tmp_path / "data", tmp_path / "state", SitePolicy(budget_epsilon=50.0))


def test_unet_is_private_trainable_with_the_measured_mode():
    model = build_model(CONFIG)
    assert grad_sample_mode(model, CONFIG) in ("hooks", "functorch")
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    make_private_trainable(unet(NetworkShape(3, 1, 2)))  # the 3D network is built the same way


def test_per_sample_gradients_clipping_and_noise_are_really_applied(tmp_path):
    data = lesions()
    plan = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    private = private_training(build_model(CONFIG), data, CONFIG, plan, [])
    images, masks = next(iter(private.loader))
    assert_dp_step(private, build_model(CONFIG), task_for(CONFIG).loss(CONFIG), images, masks, plan)


def test_an_empty_poisson_batch_is_a_noise_only_step(tmp_path):
    data = lesions()
    plan = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    private = private_training(build_model(CONFIG), data, CONFIG, plan, [])
    private.optimizer.zero_grad()
    noise_only_step(private.optimizer)
    grads = torch.cat([p.grad.flatten() for p in private.model.parameters() if p.requires_grad])
    expected = plan.noise_multiplier * plan.max_grad_norm / private.optimizer.expected_batch_size
    assert grads.std().item() == pytest.approx(expected, rel=0.03)


def test_a_private_round_trains_and_counts_every_step(tmp_path):
    data = lesions()
    plan = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    loss, record = train_private(build_model(CONFIG), data, CONFIG, plan, [])
    assert record.steps == plan.steps and 0 < record.epsilon <= CONFIG.target_epsilon and torch.isfinite(torch.tensor(loss))


def test_site_dice_counts_every_voxel_once_across_slices():
    masks = torch.zeros(3, 4, 4, dtype=torch.long)
    masks[0, :2] = 1  # 8 lesion pixels on the first slice
    predicted = masks.clone()
    predicted[1, 0, 0] = 1  # one false alarm on an empty slice
    predicted[0, 0, 0] = 0  # one lesion pixel missed
    tally = LesionTally()
    tally.add(predicted[:2], masks[:2])
    tally.add(predicted[2:], masks[2:])
    assert tally.dice == pytest.approx(2 * 7 / (8 + 8))
    nothing = LesionTally()
    nothing.add(torch.zeros_like(masks), torch.zeros_like(masks))
    assert nothing.dice == 1.0  # no lesion anywhere and none predicted: nothing was wrong


def test_the_loss_of_a_batch_is_the_mean_of_its_samples_losses():
    # DP-SGD clips each sample's gradient on its own: no sample's labels may weigh in another's loss.
    torch.manual_seed(0)
    logits, masks = torch.randn(4, 2, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long)
    masks[0, 2:4, 2:4] = 1  # lesion pixels in one sample only: a batch-weighted mean would rescale the others
    loss = DiceCrossEntropy(lesion_weight=10.0)
    alone = torch.stack([loss(logits[i:i + 1], masks[i:i + 1]) for i in range(4)])
    assert float(loss(logits, masks)) == pytest.approx(float(alone.mean()), rel=1e-6)
    assert float(loss(logits[1:], masks[1:])) == pytest.approx(float(alone[1:].mean()), rel=1e-6)


def test_the_run_config_sets_the_lesion_weight_of_training_and_evaluation():
    config = RunConfig(task="segmentation", model="unet", lesion_weight=3.0)
    assert task_for(config).loss(config).class_weight.tolist() == [1.0, 3.0]
    with pytest.raises(ConfigError, match="lesion-weight"):
        RunConfig.from_mapping({"task": "segmentation", "model": "unet", "lesion-weight": 0.0})
