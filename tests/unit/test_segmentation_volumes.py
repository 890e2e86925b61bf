"""3D segmentation data: real CT series resampled to the target spacing, patches aligned with their
masks, whole-volume Dice by sliding window, and the 3D settings' one-line errors."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from data_adapters import SeededSplit, read_segmentation_volumes, segmentation_volume_datasets

from fedcare_ops.demo_segmentation import write_demo_segmentation_sites
from data_adapters.decode import read_file
from data_adapters.index import index_site
from data_adapters.segmentation import SegmentedSeries
from data_adapters.segmentation_volumes import resample_to_spacing, series_volume
from data_adapters.transforms import apply_window
from data_adapters.volumes import plan_volume, series_slices
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.readiness import run_problems
from fedcare.segmentation import DiceCrossEntropy, all_background_dice, evaluate_volumes

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
WINDOW = (-200.0, 300.0)


@pytest.fixture(scope="module")
def demo_sites(tmp_path_factory) -> list[Path]:
    """Three sites, one per demo scanner: 0.7 / 0.8 / 0.9 mm pixels, 1.0 / 1.25 / 2.0 mm slices."""
    return write_demo_segmentation_sites(tmp_path_factory.mktemp("seg3d") / "data", sites=3, seed=5, cases=[40, 20, 20])


def assert_spans(shape: tuple[int, ...], extent_mm: tuple[float, ...], target_mm: tuple[float, ...]) -> None:
    """The resampled grid covers the series' extent (first to last voxel centre) to within half a voxel."""
    for voxels, extent, step in zip(shape, extent_mm, target_mm):
        assert abs((voxels - 1) * step - extent) <= step / 2 + 1e-6, (shape, extent_mm, target_mm)


def test_a_real_ct_series_is_resampled_to_the_target_spacing():
    headers = index_site(CT5N).instances
    plan = plan_volume(series_slices(headers), headers[0].pixel_spacing, headers[0].slice_thickness)
    frames = [read_file(CT5N / s.path)[1][s.frame] for s in plan.slices]
    labels = np.zeros((len(frames), *frames[0].shape), dtype=np.uint8)
    series = SegmentedSeries("ct5n", plan, frames, labels, [h.sop_uid for h in headers])
    hu, lesion, spacing = series_volume(series)
    ds = pydicom.dcmread(next(CT5N.iterdir()))
    assert hu.shape == (5, 16, 16) and spacing == pytest.approx((2.5, *map(float, ds.PixelSpacing)))
    extent = ((5 - 1) * 2.5, (ds.Rows - 1) * float(ds.PixelSpacing[0]), (ds.Columns - 1) * float(ds.PixelSpacing[1]))
    windowed = apply_window(hu, WINDOW)
    # Spacing is written "x y z"; the volume is [D, H, W]: an anisotropic in-plane target tells rows from columns.
    for target_xyz in ((1.0, 1.0, 2.0), (1.0, 0.5, 2.5)):
        target = target_xyz[::-1]
        image, mask = resample_to_spacing(windowed, lesion, spacing, target)
        assert image.shape == mask.shape
        assert_spans(image.shape, extent, target)
        assert image.dtype == np.float32 and mask.dtype == np.int64 and not mask.any()
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image.mean() == pytest.approx(windowed.mean(), abs=0.03)


def test_every_scanner_gives_volumes_of_the_same_physical_extent_and_lesion_size(demo_sites):
    target = (2.0, 1.0, 1.0)
    for folder in demo_sites:
        site = read_segmentation_volumes(folder, WINDOW, spacing=(2.0, 1.0, 1.0))
        series = sorted(p for p in folder.iterdir() if p.is_dir())
        assert len(site.images) == len(series) and site.excluded == 0 and not site.failures
        source_lesion_mm3 = resampled_lesion_mm3 = 0.0
        for volume, mask, path in zip(site.images, site.masks, series):
            ct = [pydicom.dcmread(p) for p in path.glob("CT*.dcm")]
            z = sorted(float(ds.ImagePositionPatient[2]) for ds in ct)
            row_mm, col_mm = map(float, ct[0].PixelSpacing)
            extent = (z[-1] - z[0], (ct[0].Rows - 1) * row_mm, (ct[0].Columns - 1) * col_mm)
            assert volume.shape == mask.shape
            assert_spans(volume.shape, extent, target)
            seg = pydicom.dcmread(path / "SEG.dcm")
            source_lesion_mm3 += float(seg.pixel_array.sum()) * row_mm * col_mm * (z[1] - z[0])
            resampled_lesion_mm3 += float(mask.sum()) * float(np.prod(target))
        # Nearest-neighbour masks keep a lesion's size in mm^3, whatever the scanner's voxels were.
        assert resampled_lesion_mm3 == pytest.approx(source_lesion_mm3, rel=0.15)


def test_an_uneven_series_is_excluded_or_resampled_as_configured(demo_sites, tmp_path):
    folder = tmp_path / "site"
    shutil.copytree(demo_sites[1], folder)
    moved = pydicom.dcmread(folder / "series-000" / "CT005.dcm")
    moved.ImagePositionPatient[2] += 0.4  # one slice 0.4 mm off a 1.25 mm step
    moved.save_as(folder / "series-000" / "CT005.dcm")
    kept = read_segmentation_volumes(folder, WINDOW, irregular="exclude")
    assert (len(kept.images), kept.excluded) == (1, 1)
    resampled = read_segmentation_volumes(folder, WINDOW, irregular="resample")
    assert (len(resampled.images), resampled.excluded) == (2, 0)
    for image, mask in zip(resampled.images, resampled.masks):
        if mask.any():
            assert image[mask == 1].mean() > image[(mask == 0) & (image > 0.2)].mean() + 0.1


def test_patches_have_the_configured_shape_and_their_masks_cover_the_bright_lesion(demo_sites):
    data = segmentation_volume_datasets(demo_sites[0], SeededSplit(0.25, 1), window=WINDOW,
                                        spacing=(2.0, 1.0, 1.0), patch_size=(8, 24, 16))
    # Four series, two with a lesion: one of each kind is held out, whole.
    assert (data.num_train, data.num_val) == (2, 2) and set(data.train.data).isdisjoint(data.val.data)
    assert data.class_counts == {0: 2, 1: 2}
    lesion_patches = 0
    for _ in range(10):
        for index in range(len(data.train)):
            image, mask = data.train[index]
            assert type(image) is torch.Tensor and image.shape == (1, 8, 24, 16) and image.dtype == torch.float32
            assert type(mask) is torch.Tensor and mask.shape == (8, 24, 16) and mask.dtype == torch.int64
            if mask.any():
                lesion_patches += 1
                lesion, tissue = image[0][mask == 1], image[0][(mask == 0) & (image[0] > 0.2)]
                assert lesion.mean() > tissue.mean() + 0.1, "the mask must lie on the bright lesion"
    assert lesion_patches >= 3  # half of a lesion series' patches are centred on its lesion
    image, mask = data.val[0]  # a whole volume, bigger than the patch
    assert image.shape[1:] == mask.shape and mask.shape[1:] == (45, 45)


class MaskOracle(nn.Module):
    """Logits that say 'lesion' exactly where the input (here: the mask itself) is 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([1.0 - x, x], dim=1) * 10.0


class NeverLesion(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones_like(x), torch.zeros_like(x)], dim=1)


def test_whole_volume_dice_stitches_windows_in_place_and_scores_empty_volumes(demo_sites):
    site = read_segmentation_volumes(demo_sites[0], WINDOW)
    masks = [torch.from_numpy(m) for m in site.masks]
    # Volumes of 6x45x45 voxels: padded in depth, several windows across; a misplaced window would cost Dice.
    as_input = [(m[None].float(), m) for m in masks]
    loss = DiceCrossEntropy(lesion_weight=10.0)
    assert evaluate_volumes(MaskOracle(), as_input, (8, 16, 16), 4, loss)["dice"] == pytest.approx(1.0)
    has_lesion = [bool(m.any()) for m in masks]
    assert 0 < sum(has_lesion) < len(masks)
    never = evaluate_volumes(NeverLesion(), as_input, (8, 16, 16), 4, loss)["dice"]
    assert never == 0.0 == all_background_dice(as_input)  # the split holds lesions: finding none scores 0


SEGMENTATION_3D = {"task": "segmentation", "model": "unet", "input-mode": "3d"}


def test_3d_segmentation_is_a_valid_run_config():
    config = RunConfig.from_mapping({**SEGMENTATION_3D, "spacing": "0.8, 0.8, 1.5", "patch-size": "48 48 16"})
    assert config.input_mode == "3d" and config.patch_size == "48 48 16"


@pytest.mark.parametrize("setting, value, says", [
    ("spacing", "1.0 1.0", "three positive numbers"),
    ("spacing", "1.0 0 2.0", "three positive numbers"),
    ("spacing", "one one two", "three positive numbers"),
    ("patch-size", "32 32", "three positive numbers"),
    ("patch-size", "32 32 7.5", "whole numbers"),
    ("patch-size", "30 32 8", "multiple of 8"),
])
def test_a_wrong_3d_setting_is_named_in_one_line(setting, value, says):
    try:  # parsed with the config; the U-Net's multiple is the task's to check when the run starts
        message = "; ".join(run_problems(RunConfig.from_mapping({**SEGMENTATION_3D, setting: value})))
    except ConfigError as err:
        message = str(err)
    assert f"'{setting}'" in message and says in message and "e.g." in message and "\n" not in message
