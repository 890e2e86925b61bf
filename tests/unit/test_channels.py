"""Images of several channels reach the network: colour DICOM as red, green, blue, and 4D NIfTI volumes.

The colour site is real ultrasound (pydicom's examples_ybr_color.dcm, 30 JPEG frames), copied as
six patients' instances; the NIfTI volume carries the real CT5N series beside a second channel.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from flwr.app import ArrayRecord
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from client_app.app import train
from data_adapters.dataset import site_datasets
from data_adapters.decode import read_file
from data_adapters.headers import Unusable
from data_adapters.nifti import load_nifti_site, nifti_manifest, read_nifti
from data_adapters.readiness import check_site
from data_adapters.split import SeededSplit
from data_adapters.transforms import Preprocess
from fedcare.config import RunConfig
from fedcare.errors import SITE_LOG_HINT, ConfigError, SiteDataError, SiteNotReady
from fedcare.model import build_model
from fedcare.readiness import run_problems
from fedcare_ops.federation import preflight
from tests.unit.test_client_app import context, request, weights

ULTRASOUND = Path(get_testdata_file("examples_ybr_color.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))


def _rgb(path: Path) -> np.ndarray:
    """pydicom's own RGB frames, [F, H, W, 3]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pydicom.dcmread(path).pixel_array
    return arr if arr.ndim == 4 else arr[None]


@pytest.fixture(scope="module")
def colour_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six patients' copies of the real ultrasound instance, three per class."""
    site = tmp_path_factory.mktemp("colour") / "site"
    site.mkdir()
    rows = ["SOPInstanceUID,label"]
    for case in range(6):
        ds = pydicom.dcmread(ULTRASOUND)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"P{case}"
        ds.save_as(site / f"us{case}.dcm")
        rows.append(f"{ds.SOPInstanceUID},{case % 2}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    return site


def test_colour_frames_keep_red_green_blue_as_channels() -> None:
    rgb = _rgb(ULTRASOUND).astype(np.float32)
    _, frames = read_file(ULTRASOUND, channels=3)
    assert frames.shape == (30, 3, 240, 320)
    np.testing.assert_allclose(frames, rgb.transpose(0, 3, 1, 2), atol=1e-3)
    # One channel stays the luminance it always was.
    np.testing.assert_allclose(read_file(ULTRASOUND)[1], rgb @ np.float32([0.299, 0.587, 0.114]), atol=1e-3)


@pytest.mark.parametrize("path, channels, reason", [
    (CT, 3, r"^a greyscale image \(1 channel\), where the run's in-channels is 3: set in-channels = 1"),
    (ULTRASOUND, 2, r"^a colour image \(3 channels\), where the run's in-channels is 2: set in-channels = 3"),
])
def test_an_image_of_other_channels_than_the_run_asks_is_unusable_with_the_reason(path, channels, reason) -> None:
    with pytest.raises(Unusable, match=reason):
        read_file(path, channels=channels)


def test_a_colour_site_gives_three_channel_samples_through_the_cache(colour_site: Path, tmp_path: Path) -> None:
    first = site_datasets(colour_site, SeededSplit(seed=1), 32, window="0,255", channels=3, cache_dir=tmp_path)
    image, label = first.train[0]
    assert image.shape == (3, 32, 32) and first.num_train + first.num_val == 180
    # Ultrasound colour is not grey: its channels differ somewhere.
    assert max(float((first.train[i][0][0] - first.train[i][0][2]).abs().max()) for i in range(20)) > 0.05
    again = site_datasets(colour_site, SeededSplit(seed=1), 32, window="0,255", channels=3, cache_dir=tmp_path)
    assert np.array_equal(again.train[0][0].numpy(), image.numpy())
    # The same cache folder never hands 3-channel arrays to a one-channel run, nor the reverse.
    grey = site_datasets(colour_site, SeededSplit(seed=1), 32, window="0,255", channels=1, cache_dir=tmp_path)
    assert grey.train[0][0].shape == (1, 32, 32)


def test_a_private_round_trains_a_three_channel_network_on_colour(colour_site: Path, tmp_path: Path) -> None:
    run = {"in-channels": 3, "window": "0,255", "image-size": 32}
    reply = train(_request_for(run), context(colour_site, tmp_path, run=run))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    first_layer = next(iter(reply.content["arrays"].to_torch_state_dict().values()))
    assert first_layer.shape[1] == 3 and first_layer.device.type == "cpu"
    assert reply.content["privacy"]["status"] == "ok" and weights(reply).isfinite().all()


def _request_for(run: dict):
    message = request("train")
    message.content["arrays"] = ArrayRecord(build_model(RunConfig.from_mapping(run)).state_dict())
    return message


def test_a_greyscale_site_refuses_a_three_channel_run_in_one_line(demo_site: Path, tmp_path: Path, caplog) -> None:
    run = {"in-channels": 3}
    reply = train(_request_for(run), context(demo_site, tmp_path, run=run))
    assert reply.has_error() and reply.error.reason == f"st-olav: {SiteNotReady.kind} ({SITE_LOG_HINT})"
    # The site's own log says why: the reason most of its files were left out.
    assert "most often: a greyscale image (1 channel), where the run's in-channels is 3" in caplog.text


def test_weights_that_do_not_fit_the_runs_network_are_a_setting_named(colour_site: Path, tmp_path: Path) -> None:
    reply = train(request("train"), context(colour_site, tmp_path, run={"in-channels": 3}))
    assert reply.has_error() and reply.error.reason == f"st-olav: {ConfigError.kind} ({SITE_LOG_HINT})"


def _write_two_channel(path: Path) -> np.ndarray:
    """A [C, Z, H, W] volume: the real CT5N series' first instance repeated, and a bright second channel."""
    ct = read_file(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")[1][0]
    volume = np.stack([np.stack([ct] * 4), np.full((4, *ct.shape), 400.0, dtype=np.float32)])
    # NIfTI stores (i, j, k, channel) = (columns, rows, slices, channel).
    nib.save(nib.Nifti1Image(volume.transpose(3, 2, 1, 0), np.diag([0.4, 0.5, 2.5, 1.0])), str(path))
    return volume


def test_a_4d_nifti_volume_gives_its_channels_in_order(tmp_path: Path) -> None:
    volume = _write_two_channel(tmp_path / "mr.nii.gz")
    array, spacing = read_nifti(tmp_path / "mr.nii.gz", channels=2)
    np.testing.assert_allclose(array, volume, atol=1e-3)
    assert spacing == pytest.approx((2.5, 0.5, 0.4))
    with pytest.raises(ValueError, match=r"^2 channel\(s\), where the run's in-channels is 1"):
        read_nifti(tmp_path / "mr.nii.gz")


@pytest.mark.parametrize("input_mode, shape", [("3d", (2, 16, 16, 16)), ("2d", (2, 16, 16))])
def test_nifti_samples_carry_their_channels(tmp_path: Path, input_mode: str, shape: tuple[int, ...]) -> None:
    _write_two_channel(tmp_path / "mr.nii.gz")
    (tmp_path / "labels.csv").write_text("image,label\nmr.nii.gz,1\n")
    preprocess = Preprocess("soft-tissue", 16, volume=input_mode == "3d", channels=2)
    site = load_nifti_site(tmp_path, nifti_manifest(tmp_path), input_mode=input_mode, preprocess=preprocess)
    assert all(sample.shape == shape for sample in site.images)
    # The second channel (400 HU, above the soft-tissue window) is white; the CT channel is not.
    assert np.all(site.images[0][1] == 1.0) and site.images[0][0].mean() < 0.9
    with pytest.raises(SiteDataError, match=r"no readable NIfTI image .*most often: cannot read NIfTI: 2 channel"):
        load_nifti_site(tmp_path, nifti_manifest(tmp_path), input_mode=input_mode,
                        preprocess=Preprocess("soft-tissue", 16, volume=input_mode == "3d"))


@pytest.mark.parametrize("run, named", [
    ({"task": "segmentation", "in-channels": 3}, "segmentation reads one channel"),
    ({"input-mode": "3d", "in-channels": 2}, "DICOM series are read as one channel"),
])
def test_channels_a_task_cannot_read_are_refused_at_run_start(run: dict, named: str) -> None:
    problems = run_problems(RunConfig.from_mapping(run))
    assert any(named in p and "in-channels" in p for p in problems), problems


def test_nifti_sites_are_checked_before_a_run_starts_with_their_channels(tmp_path: Path) -> None:
    for name in ("site-0", "site-1"):
        (tmp_path / name).mkdir()
        for case in range(6):
            _write_two_channel(tmp_path / name / f"mr{case}.nii.gz")
        rows = "".join(f"mr{case}.nii.gz,{case % 2}\n" for case in range(6))
        (tmp_path / name / "labels.csv").write_text("image,label\n" + rows)
        (tmp_path / name / "site.toml").write_text('budget-epsilon = 8.0\nprivacy-unit = "image"\n')
    run = {"data-format": "nifti", "input-mode": "3d", "image-size": 16, "data-root": str(tmp_path),
           "sites-dir": str(tmp_path / "state")}
    assert preflight(RunConfig.from_mapping(run | {"in-channels": 2}), 2) == []
    checked = check_site(tmp_path / "site-0", config=RunConfig.from_mapping(run | {"in-channels": 2}))
    assert checked.ready and checked.report["images_readable"] == 6 and checked.report["num_train"] + checked.report["num_val"] == 6
    problems = preflight(RunConfig.from_mapping(run), 2)
    assert "site-0: no readable NIfTI image in the folder, most often: cannot read NIfTI: 2 channel(s), where the " \
           "run's in-channels is 1" in "\n".join(problems)
