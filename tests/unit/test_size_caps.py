"""A coordinator cannot make a site build a network, or prepare samples, that fill its memory or its
disk: the site's own caps (max-model-parameters, max-sample-voxels) decide, before anything is built.

Written as the coordinator would attack: the run config names MONAI's DenseNet121 with arguments that
give it 440 million parameters (1.8 GB of weights before any gradient); or asks for 6000-pixel images
(144 MB each, decoded and cached for every image of the site); or for a 3D spacing a hundred times
finer than the scanner's, which multiplies each volume's size a million times.
"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from client_app.app import evaluate_global, train
from data_adapters import read_segmentation_volumes
from fedcare.config import RunConfig
from fedcare.errors import SITE_LOG_HINT, ConfigError, RunTooLarge, SiteDataError
from fedcare.model import build_model, network_parameters, sample_voxels
from fedcare_ops.demo_segmentation import write_demo_segmentation_sites
from tests.unit.test_client_app import context, request

HUGE = {"model": "DenseNet121", "model-args": '{"init_features": 512, "growth_rate": 256}'}
TOO_LARGE = f"st-olav: {RunTooLarge.kind} ({SITE_LOG_HINT})"


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_the_network_and_a_sample_are_counted_without_being_built() -> None:
    config = RunConfig.from_mapping({"model": "densenet121"})
    assert network_parameters(config) == sum(p.numel() for p in build_model(config).parameters())
    assert network_parameters(RunConfig.from_mapping(HUGE)) == 439_801_858
    assert sample_voxels(RunConfig.from_mapping({"image-size": 512, "in-channels": 3})) == 3 * 512 * 512
    assert sample_voxels(RunConfig.from_mapping({"image-size": 96, "input-mode": "3d"})) == 96 ** 3
    patches = RunConfig.from_mapping({"task": "segmentation", "input-mode": "3d", "patch-size": "96 96 64"})
    assert sample_voxels(patches) == 96 * 96 * 64


def test_a_site_refuses_to_build_a_network_over_its_cap(demo_site: Path, tmp_path: Path, caplog) -> None:
    peak = peak_kib()
    for handler in (train, evaluate_global):
        reply = handler(request(handler.__name__.split("_")[0]), context(demo_site, tmp_path, run=HUGE))
        assert reply.has_error() and reply.error.reason == TOO_LARGE
    assert peak_kib() - peak < 500 * 1024  # nothing of 1.8 GB was built
    assert "439,801,858 parameters, over the 100,000,000 this site builds" in caplog.text


def test_a_site_that_lifts_its_cap_gets_to_the_weights(demo_site: Path, tmp_path: Path) -> None:
    small = {"model": "DenseNet121", "model-args": '{"init_features": 8, "growth_rate": 4}'}
    reply = train(request("train"), context(demo_site, tmp_path, run=small, max_model_parameters=1000))
    assert reply.error.reason == TOO_LARGE
    # Without the cap the same request gets as far as the weights (the request's are the default network's).
    reply = train(request("train"), context(demo_site, tmp_path, run=small, max_model_parameters=0))
    assert reply.error.reason == f"st-olav: {ConfigError.kind} ({SITE_LOG_HINT})"


def test_a_site_refuses_images_over_its_cap_before_reading_any(demo_site: Path, tmp_path: Path, caplog) -> None:
    peak = peak_kib()
    for handler in (train, evaluate_global):
        reply = handler(request(handler.__name__.split("_")[0]), context(demo_site, tmp_path, run={"image-size": 6000}))
        assert reply.has_error() and reply.error.reason == TOO_LARGE
    assert peak_kib() - peak < 500 * 1024  # not one 144 MB image was made
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))  # nor cached
    assert "the run's samples have 36,000,000 voxels, over the 33,554,432 this site prepares" in caplog.text
    # The site's own cap decides: lowered, an ordinary request is refused too, and its channels count.
    reply = train(request("train"), context(demo_site, tmp_path, max_sample_voxels=64 * 64 - 1))
    assert reply.error.reason == TOO_LARGE


def test_a_3d_spacing_that_would_blow_up_every_volume_is_refused_before_resampling(tmp_path: Path) -> None:
    [folder] = write_demo_segmentation_sites(tmp_path / "data", sites=1, seed=5, cases=[20])
    # The demo's volumes are 10 x 64 x 64 voxels at 1.0 x 0.7 x 0.7 mm: at 0.01 mm, over 10^11 each.
    with pytest.raises(SiteDataError, match=r"at the run's spacing \(0\.01, 0\.01, 0\.01\) mm every segmented series "
                                            r"would have more than 33,554,432 voxels \(the site's max-sample-voxels\)"):
        read_segmentation_volumes(folder, spacing=(0.01, 0.01, 0.01), max_voxels=33_554_432)
    site = read_segmentation_volumes(folder, spacing=(2.0, 1.0, 1.0), max_voxels=33_554_432)
    assert site.images and site.too_large == 0
    # The count is the grid the resampling makes, exactly: at the cap a volume is kept, one voxel under it not.
    largest = max(image.size for image in site.images)
    assert read_segmentation_volumes(folder, spacing=(2.0, 1.0, 1.0), max_voxels=largest).too_large == 0
    with pytest.raises(SiteDataError, match="max-sample-voxels"):
        read_segmentation_volumes(folder, spacing=(2.0, 1.0, 1.0), max_voxels=largest - 1)
