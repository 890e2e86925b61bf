"""DP-SGD on the 3D U-Net with real Opacus, on patches of real demo DICOM: per-sample gradients,
clipping, noise, the step count, and the per-sample gradient mode measured faster in 3D."""

from pathlib import Path

import pytest
import torch

from data_adapters import segmentation_volume_datasets

from fedcare_ops.demo_segmentation import write_demo_segmentation_sites
from fedcare.config import RunConfig
from fedcare.model import MEASURED_MODE, build_model, grad_sample_mode
from fedcare.privacy.dpsgd import plan_round, private_training, train_private
from fedcare.tasks import task_for
from fedcare.policy import SitePolicy
from fedcare.sites import Site
from tests.dp_checks import assert_dp_step

CONFIG = RunConfig(task="segmentation", model="unet", input_mode="3d", patch_size="16 16 8", num_server_rounds=2,
                   batch_size=4, target_epsilon=6.0, learning_rate=0.05)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Patches this small take milliseconds on one thread; on a busy CPU, threads that wait for each
    # other in every convolution make a step a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    folder = write_demo_segmentation_sites(tmp_path_factory.mktemp("dp3d") / "data", sites=1, seed=2, cases=[80])[0]
    data = segmentation_volume_datasets(folder, spacing=CONFIG.spacing_zyx, patch_size=CONFIG.patch_zyx)
    return data.train


def site(tmp_path: Path) -> Site:
    return Site("site-0", tmp_path / "data", tmp_path / "state", SitePolicy(budget_epsilon=50.0))


def test_3d_unet_trains_privately_in_the_mode_measured_faster_in_3d():
    model = build_model(CONFIG)
    assert model(torch.zeros(2, 1, 8, 16, 16)).shape == (2, 2, 8, 16, 16)
    assert grad_sample_mode(model, CONFIG) == "functorch"
    two_d = RunConfig(task="segmentation", model="unet")
    assert grad_sample_mode(build_model(two_d), two_d) == MEASURED_MODE[("unet", 2)] == "hooks"
    forced = RunConfig(task="segmentation", model="unet", input_mode="3d", grad_sample_mode="hooks")
    assert grad_sample_mode(model, forced) == "hooks"


def test_per_sample_gradients_clipping_and_noise_on_3d_patches(tmp_path, patches):
    plan = plan_round(CONFIG, site(tmp_path), len(patches), [], "run-1")
    private = private_training(build_model(CONFIG), patches, CONFIG, plan, [])
    images, masks = next(batch for batch in private.loader if len(batch[1]) > 1)
    assert images.shape[1:] == (1, 8, 16, 16) and masks.shape[1:] == (8, 16, 16)
    assert_dp_step(private, build_model(CONFIG), task_for(CONFIG).loss(CONFIG), images, masks, plan)

def test_a_private_3d_round_trains_and_counts_every_step(tmp_path, patches):
    plan = plan_round(CONFIG, site(tmp_path), len(patches), [], "run-1")
    loss, record = train_private(build_model(CONFIG), patches, CONFIG, plan, [])
    assert record.steps == plan.steps and 0 < record.epsilon <= CONFIG.target_epsilon and torch.isfinite(torch.tensor(loss))
