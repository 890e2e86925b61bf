"""3D mode: series become volumes sorted by geometry; irregular series are reported, excluded or resampled."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_adapters.decode import read_file
from data_adapters.dicom import load_site, read_site
from data_adapters.index import index_site
from data_adapters.labels import read_manifest
from data_adapters.seg import label_volume, read_segmentation, segmentations_by_series
from data_adapters.volumes import plan_volume, series_slices

DICOMDIRTESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT5N = DICOMDIRTESTS / "98892001" / "CT5N"


def _label_every_series(site: Path) -> Path:
    uids = sorted({h.series_uid for h in index_site(site).instances})
    manifest = site / "labels.csv"
    manifest.write_text("SeriesInstanceUID,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(uids)))
    return manifest


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("archive") / "site"
    shutil.copytree(DICOMDIRTESTS, site, ignore=shutil.ignore_patterns("DICOMDIR*", "TINY_ALPHA", "*.txt"))
    _label_every_series(site)
    return site


def _series_of(site, folder: str) -> str:
    return next(h.series_uid for h in site.index.instances if f"/{folder}/" in f"/{h.path}")


def test_ct5n_is_a_five_slice_volume_with_2_5_mm_spacing(archive: Path) -> None:
    site = read_site(archive, input_mode="3d")
    volumes = dict(zip(site.uids, zip(site.images, site.spacings)))
    volume, spacing = volumes[_series_of(site, "CT5N")]
    assert volume.shape == (5, 16, 16)
    assert spacing == pytest.approx((2.5, 0.488281, 0.488281))
    # Slices in order of position along the normal (z up), whatever the file names say.
    by_z = sorted(CT5N.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    np.testing.assert_array_equal(volume, np.concatenate([read_file(p)[1] for p in by_z]))


def test_irregular_series_are_reported_and_excluded(archive: Path) -> None:
    site = read_site(archive, input_mode="3d")
    reasons = dict(site.excluded)
    by_folder = {path.split("/")[1]: reason for path, reason in reasons.items()}
    assert by_folder["CT2"].startswith("gap too wide to interpolate")
    assert "mixed orientation" in by_folder["MR700"]
    assert any("single slice" in r for r in reasons.values())  # MR1: three one-slice series
    kept = {_series_of(site, "CT5N")}
    assert kept <= set(site.uids) and _series_of(site, "CT2") not in site.uids
    # Excluded by choice is not an error, and never a silent stack: resampling cannot save these.
    resampled = read_site(archive, input_mode="3d", irregular="resample")
    assert dict(resampled.excluded).keys() == reasons.keys()


def _rewrite_positions(tmp_path: Path, positions: list[tuple[float, float, float]]) -> Path:
    """CT5N's real slices written again with other ImagePositionPatient values."""
    site = tmp_path / "site"
    site.mkdir()
    for i, (path, position) in enumerate(zip(sorted(CT5N.iterdir()), positions)):
        ds = pydicom.dcmread(path)
        if position is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = list(position)
        ds.InstanceNumber = i + 1
        ds.save_as(site / f"slice{i}", enforce_file_format=True)
    _label_every_series(site)
    return site


def test_uneven_steps_are_excluded_or_resampled(tmp_path: Path) -> None:
    site = _rewrite_positions(tmp_path, [(0, 0, z) for z in (0.0, 2.5, 5.0, 7.0, 10.0)])
    assert read_site(site, input_mode="3d").excluded[0][1].startswith("uneven slice spacing (2.00 to 3.00 mm)")
    resampled = read_site(site, input_mode="3d", irregular="resample")
    assert resampled.excluded == [] and resampled.spacings[0][0] == pytest.approx(2.5)
    volume = resampled.images[0]
    slices = [read_file(site / f"slice{i}")[1][0] for i in range(5)]
    assert volume.shape == (5, 16, 16)
    np.testing.assert_allclose(volume[2], slices[2])  # z = 5.0 is on the grid
    np.testing.assert_allclose(volume[3], slices[3] * 5 / 6 + slices[4] / 6, atol=1e-3)  # z = 7.5


def test_gantry_tilt_is_detected_and_sheared_back(tmp_path: Path) -> None:
    shift = 0.488281  # one pixel per slice along the column direction (y): atan(0.488 / 2.5) = 11.1 degrees
    site = _rewrite_positions(tmp_path, [(0.0, i * shift, i * 2.5) for i in range(5)])
    assert "gantry tilt of 11.1 degrees" in read_site(site, input_mode="3d").excluded[0][1]
    resampled = read_site(site, input_mode="3d", irregular="resample")
    volume = resampled.images[0]
    assert volume.shape == (5, 16, 16) and resampled.excluded == []
    slices = [read_file(site / f"slice{i}")[1][0] for i in range(5)]
    np.testing.assert_allclose(volume[0], slices[0])  # the reference slice stays put
    # The top slice moved back by its offset, 4 pixels: row r now shows what row r + 4 held.
    np.testing.assert_allclose(volume[4][:-4], slices[4][4:], atol=1e-3)


def test_a_narrow_gap_is_interpolated(tmp_path: Path) -> None:
    site = _rewrite_positions(tmp_path, [(0, 0, z) for z in (0.0, 2.5, 5.0, 10.0, 12.5)])
    assert read_site(site, input_mode="3d").excluded[0][1].startswith("gap: 5.00 mm")
    assert read_site(site, input_mode="3d", irregular="resample").images[0].shape == (6, 16, 16)


def test_without_positions_instance_number_orders_the_slices(tmp_path: Path) -> None:
    site = _rewrite_positions(tmp_path, [None] * 5)
    index = index_site(site)
    plan = plan_volume(series_slices(index.instances), index.instances[0].pixel_spacing, 2.5)
    assert [s.instance_number for s in plan.slices] == [1, 2, 3, 4, 5]
    assert plan.regular and "sorted by InstanceNumber" in plan.notes[0]


def test_enhanced_ct_frames_are_slices(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "ect")
    _label_every_series(tmp_path)
    site = read_site(tmp_path, input_mode="3d")
    assert site.images[0].shape == (2, 512, 512)
    assert site.spacings[0] == pytest.approx((10.0, 0.388672, 0.388672))
    header = site.index.instances[0]
    assert header.positions == ((99.5, -301.5, -159.0), (99.5, -301.5, -149.0))


def test_enhanced_mr_without_positions_keeps_frame_order(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "emri")
    _label_every_series(tmp_path)
    site = read_site(tmp_path, input_mode="3d")
    np.testing.assert_array_equal(site.images[0], read_file(tmp_path / "emri")[1])


def test_seg_masks_land_on_their_source_slices(tmp_path: Path) -> None:
    seg_path = Path(get_testdata_file("liver.dcm"))
    seg = read_segmentation(seg_path)
    ds = pydicom.dcmread(seg_path)
    assert seg.masks.shape == (3, 512, 512) and seg.pixel_spacing == pytest.approx((0.810547, 0.810547))
    assert seg.positions[0] == pytest.approx((-235.2, -226.8, -128.69))
    assert seg.referenced_series == (ds.ReferencedSeriesSequence[0].SeriesInstanceUID,)
    # The source CT is not shipped: write its three slices (blank pixels) with the referenced UIDs.
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.PixelData = np.zeros((512, 512), np.int16).tobytes()
    template.SeriesInstanceUID = seg.referenced_series[0]
    template.PixelSpacing = list(seg.pixel_spacing)
    template.ImageOrientationPatient = list(seg.orientation)
    for i, ((uid, _), position) in enumerate(zip(seg.sources, seg.positions)):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
        template.ImagePositionPatient = list(position)
        template.save_as(tmp_path / f"ct{i}", enforce_file_format=True)
    shutil.copy(seg_path, tmp_path / "seg")
    index = index_site(tmp_path)
    assert [h.path for h in segmentations_by_series(index)[seg.referenced_series[0]]] == ["seg"]
    ct = [h for h in index.instances if h.series_uid == seg.referenced_series[0]]
    plan = plan_volume(series_slices(ct), ct[0].pixel_spacing)
    labels = label_volume(seg, plan, ct)
    by_uid = {uid: seg.masks[i].sum() for i, (uid, _) in enumerate(seg.sources)}
    sop_of = {h.path: h.sop_uid for h in ct}
    assert [int(labels[z].sum()) for z in range(3)] == [by_uid[sop_of[s.path]] for s in plan.slices]
    assert labels.max() == 1 and labels.sum() == ds.pixel_array.sum()


def test_series_labels_must_agree_in_3d(tmp_path: Path) -> None:
    for path in CT5N.iterdir():
        shutil.copy(path, tmp_path / path.name)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sorted(tmp_path.iterdir())]
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(uids)))
    with pytest.raises(Exception, match="one series holds images labelled"):
        load_site(tmp_path, read_manifest(tmp_path / "labels.csv"), input_mode="3d")
