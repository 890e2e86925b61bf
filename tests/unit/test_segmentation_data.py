"""DICOM SEG masks land on the slices they were made from: the demo's SEGs and pydicom-data's liver SEG."""

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_adapters import SeededSplit, read_segmentation_site, segmentation_datasets

from fedcare_ops.demo_segmentation import write_demo_segmentation_sites
from data_adapters.transforms import Preprocess, apply_window
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.readiness import run_problems

WINDOW = (-200.0, 300.0)


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory) -> Path:
    return write_demo_segmentation_sites(tmp_path_factory.mktemp("seg") / "data", sites=1, seed=5, cases=[30])[0]


def seg_frames_by_source(folder: Path) -> dict[str, np.ndarray]:
    """Every SEG frame of a folder keyed by the SOPInstanceUID it references, read with plain pydicom."""
    frames = {}
    for path in folder.rglob("*"):
        ds = pydicom.dcmread(path) if path.is_file() and path.name != "site.toml" else None
        if ds is None or ds.Modality != "SEG":
            continue
        pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
            frames[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID] = frame
    return frames


def test_every_demo_mask_frame_lands_on_its_source_slice(demo_site):
    site = read_segmentation_site(demo_site, Preprocess(window=WINDOW, image_size=64))
    frames = seg_frames_by_source(demo_site)
    ct = {ds.SOPInstanceUID: ds for p in demo_site.rglob("CT*.dcm") if (ds := pydicom.dcmread(p))}
    assert len(site.images) == len(frames) == len(ct) == 30
    # The demo stores frames in reverse slice order: trusting frame order would misplace them.
    seg = pydicom.dcmread(next(demo_site.rglob("SEG.dcm")))
    first_source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ct[first_source.ReferencedSOPInstanceUID].InstanceNumber == 10
    lesions = 0
    for image, mask, uid in zip(site.images, site.masks, site.uids):
        np.testing.assert_array_equal(mask, frames[uid])
        hu = ct[uid].pixel_array * float(ct[uid].RescaleSlope) + float(ct[uid].RescaleIntercept)
        np.testing.assert_allclose(image, apply_window(hu, WINDOW), atol=1e-5)
        if mask.any():
            lesions += 1
            ring = (image > 0.2) & (mask == 0)  # soft tissue around it
            assert image[mask > 0].mean() > image[ring].mean() + 0.05, "the mask must cover the bright lesion"
    assert 0 < lesions < len(site.masks)


def test_site_datasets_yield_tuples_and_split_by_series(demo_site):
    data = segmentation_datasets(demo_site, SeededSplit(0.3, 1), image_size=32, window=WINDOW)
    image, mask = data.train[0]
    assert image.shape == (1, 32, 32) and str(image.dtype) == "torch.float32"
    assert mask.shape == (32, 32) and str(mask.dtype) == "torch.int64" and set(mask.unique().tolist()) <= {0, 1}
    assert data.num_train + data.num_val == 30 and data.num_val % 10 == 0  # whole series of ten slices
    assert set(data.train.data).isdisjoint(data.val.data)


def test_pydicom_data_liver_seg_aligns_with_its_source_slices(tmp_path):
    seg_path = Path(get_testdata_file("liver.dcm"))
    seg = pydicom.dcmread(seg_path)
    # The source CT is not shipped: write its three slices (blank pixels) with the referenced UIDs.
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.PixelData = np.zeros((512, 512), np.int16).tobytes()
    template.SeriesInstanceUID = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    template.PixelSpacing = list(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    template.ImageOrientationPatient = list(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
        template.ImagePositionPatient = list(item.PlanePositionSequence[0].ImagePositionPatient)
        template.save_as(tmp_path / f"ct{i}", enforce_file_format=True)
    shutil.copy(seg_path, tmp_path / "seg")
    site = read_segmentation_site(tmp_path, Preprocess(window=WINDOW, image_size=512))
    frames = seg_frames_by_source(tmp_path)
    assert len(site.masks) == 3 and sorted(site.uids) == sorted(frames)
    for mask, uid in zip(site.masks, site.uids):
        np.testing.assert_array_equal(mask, frames[uid])
    assert sum(int(m.sum()) for m in site.masks) == int(seg.pixel_array.sum()) > 0


def test_segmentation_needs_the_unet_in_one_line():
    [problem] = run_problems(RunConfig.from_mapping({"task": "segmentation"}))
    assert "network 'small-cnn' does not answer task 'segmentation'" in problem and "\n" not in problem
    assert RunConfig.from_mapping({"task": "segmentation", "model": "unet"}).task == "segmentation"
