"""The site reader and datasets: HU conversion, skipping bad files, one-line errors, splits, items."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_rescale

from data_adapters import SeededSplit, cached_site_images, read_labels, read_site, site_datasets, split_indices

from fedcare_ops.demo_data import write_demo_sites
from fedcare.errors import SiteDataError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_sites(tmp_path_factory.mktemp("demo") / "out", sites=3, seed=5, cases=[10, 12, 14])


def _write_labels(folder: Path, rows: dict[str, int]) -> Path:
    path = folder / "labels.csv"
    path.write_text("SOPInstanceUID,label\n" + "".join(f"{uid},{label}\n" for uid, label in rows.items()))
    return path


@pytest.fixture()
def real_site(tmp_path: Path) -> Path:
    """pydicom's bundled CT and MR files plus the clutter a real export folder has."""
    site = tmp_path / "real"
    (site / "sub" / "dir").mkdir(parents=True)
    ct_src, mr_src = Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))
    shutil.copy(ct_src, site / "CT_small.dcm")
    # An old-style export: no preamble, no file meta, implicit VR, no extension, nested.
    raw_mr = pydicom.dcmread(mr_src)
    raw_mr.preamble, raw_mr.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(site / "sub" / "dir" / "IM0001", raw_mr, implicit_vr=True, little_endian=True)
    shutil.copy(ct_src, site / "copy_of_ct.dcm")  # same instance twice
    (site / "notes.txt").write_text("scanner moved to room 3\n")
    ct_bytes = ct_src.read_bytes()
    (site / "broken.dcm").write_bytes(ct_bytes[: int(len(ct_bytes) * 0.6)])
    shutil.copy(get_testdata_file("emri_small.dcm"), site / "multiframe.dcm")
    shutil.copy(get_testdata_file("DICOMDIR"), site / "DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), site / "index")  # a DICOMDIR under another name
    extra = pydicom.dcmread(ct_src)
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    extra.save_as(site / "unlabelled.dcm")
    _write_labels(site, {pydicom.dcmread(ct_src).SOPInstanceUID: 1, pydicom.dcmread(mr_src).SOPInstanceUID: 0})
    return site


def _one_line_error(excinfo: pytest.ExceptionInfo[SiteDataError], *parts: object) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)
    return message


# ---- demo sites: HU regardless of each site's stored-value encoding ----


def test_demo_sites_decode_to_the_same_hounsfield_scale(demo: list[Path]) -> None:
    raw_air = []
    for folder in demo:
        site = read_site(folder)
        assert len(site) == len(read_labels(folder / "labels.csv")) and site.skipped == [] and site.unlabelled == 0
        assert all(im.dtype == np.float32 and im.shape == (64, 64) for im in site.images)
        assert site.labels.dtype == np.int64
        air = np.concatenate([im[:4, :4].ravel() for im in site.images])
        tissue = np.concatenate([im[24:40, 24:40].ravel() for im, y in zip(site.images, site.labels) if y == 0])
        assert abs(np.mean(air) + 1000) < 25, folder.name
        assert abs(np.median(tissue) - 40) < 25, folder.name
        first = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "labels.csv")
        raw_air.append(float(pydicom.dcmread(first).pixel_array[:4, :4].mean()))
    # The stored values really differ, so equal HU above proves each encoding was undone.
    assert max(raw_air) - min(raw_air) > 500


# ---- real files from pydicom ----


def test_real_ct_and_mr_load_with_correct_rescale(real_site: Path) -> None:
    site = read_site(real_site)
    ct = pydicom.dcmread(real_site / "CT_small.dcm")
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    images = dict(zip(site.uids, site.images))
    assert set(images) == {ct.SOPInstanceUID, mr.SOPInstanceUID}
    assert dict(zip(site.uids, site.labels.tolist())) == {ct.SOPInstanceUID: 1, mr.SOPInstanceUID: 0}

    ct_hu = images[ct.SOPInstanceUID]
    assert ct_hu.dtype == np.float32 and ct_hu.shape == (128, 128)
    np.testing.assert_allclose(ct_hu, apply_rescale(ct.pixel_array, ct), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(ct_hu, ct.pixel_array.astype(np.float32) - 1024)
    np.testing.assert_array_equal(images[mr.SOPInstanceUID], mr.pixel_array.astype(np.float32))


def test_bad_files_are_skipped_and_counted_not_fatal(real_site: Path) -> None:
    site = read_site(real_site)
    reasons = dict(site.skipped)
    # Multi-frame images are samples now (one per frame): the unlabelled 10-frame MR counts 10.
    assert set(reasons) == {"notes.txt", "broken.dcm", "copy_of_ct.dcm"}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["broken.dcm"].startswith(("cannot decode pixel data", "unreadable DICOM"))
    assert reasons["copy_of_ct.dcm"].startswith("duplicate SOPInstanceUID")
    assert site.unlabelled == 1 + 10


def test_reading_never_emits_header_strings(real_site: Path, capsys, caplog, recwarn) -> None:
    caplog.set_level(logging.DEBUG)
    site = read_site(real_site)
    ct = pydicom.dcmread(real_site / "CT_small.dcm")
    secrets = {str(ct.PatientName), str(ct.PatientID), str(ct.StudyDate), str(ct.InstitutionName)}
    captured = capsys.readouterr()
    emitted = captured.out + captured.err + caplog.text + " ".join(str(w.message) for w in recwarn)
    emitted += " ".join(reason for _, reason in site.skipped)
    assert all(secrets) and not [s for s in secrets if s in emitted]


# ---- one-line errors that name the path ----


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        read_site(tmp_path / "nowhere")
    _one_line_error(err, tmp_path / "nowhere", "does not exist")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images yet")
    _write_labels(tmp_path, {"1.2.3": 0})
    with pytest.raises(SiteDataError) as err:
        read_site(tmp_path)
    _one_line_error(err, tmp_path, "no readable DICOM")


def test_missing_manifest(demo: list[Path], tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        read_site(demo[0], labels_csv=tmp_path / "absent.csv")
    _one_line_error(err, tmp_path / "absent.csv", "does not exist")


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "is empty"),
        ("   \n\n", "is empty"),
        ("uid,label\n1.2.3,0\n", "no 'SOPInstanceUID' column"),
        ("SOPInstanceUID\n1.2.3\n", "no 'label' column"),
        ("SOPInstanceUID,label\n", "no rows"),
        ("SOPInstanceUID,label\n1.2.3,0\n1.2.4,yes\n", "row 3"),
        ("SOPInstanceUID,label\n1.2.3,0\n1.2.4,-1\n", "row 3"),
        ("SOPInstanceUID,label\n1.2.3,0\n1.2.4\n", "row 3"),
        ("SOPInstanceUID,label\n1.2.3,0\n\n1.2.3,1\n", "repeats row 2"),
        ("SOPInstanceUID,label\n,1\n", "row 2"),
    ],
)
def test_malformed_manifest(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(SiteDataError) as err:
        read_labels(path)
    _one_line_error(err, path, expected)


def test_manifest_tolerates_bom_extra_columns_and_case(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfnote,sopinstanceuid,Label\nx, 1.2.3 ,1\ny,1.2.4,0\n\n")
    assert read_labels(path) == {"1.2.3": 1, "1.2.4": 0}


def test_labelled_instance_without_file(real_site: Path) -> None:
    labels = read_labels(real_site / "labels.csv")
    manifest = _write_labels(real_site, {**labels, "1.2.999.1": 1, "1.2.999.2": 0})
    with pytest.raises(SiteDataError) as err:
        read_site(real_site)
    # Named by manifest row, not by UID: the message reaches the server in the site's failed reply.
    message = _one_line_error(err, manifest, "2 labelled", "rows 4, 5")
    assert "1.2.999.1" not in message


# ---- splits and datasets ----


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = np.array([0] * 70 + [1] * 30)
    train, val = split_indices(labels, 0.2, seed=3)
    again = split_indices(labels, 0.2, seed=3)
    other = split_indices(labels, 0.2, seed=4)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, other[1])
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == 100
    assert np.bincount(labels[val]).tolist() == [14, 6]


def test_split_keeps_both_classes_in_validation_for_tiny_sites() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    train, val = split_indices(labels, 0.1, seed=0)
    assert set(labels[val]) == {0, 1}  # class 2 has one case: it must train
    assert set(labels[train]) == {0, 1, 2}
    with pytest.raises(SiteDataError):
        split_indices(labels, 1.0, seed=0)


def test_dataset_items_are_windowed_tensor_tuples(demo: list[Path]) -> None:
    data = site_datasets(demo[2], SeededSplit(0.25, 1))
    assert data.num_train + data.num_val == 14 == sum(data.class_counts.values())
    assert (data.num_train, data.num_val) == (len(data.train), len(data.val))
    assert data.skipped == 0 and data.unlabelled == 0
    for item in [data.train[0], data.val[0]]:
        assert isinstance(item, tuple) and len(item) == 2
        image, label = item
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (1, 64, 64)
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.4
        assert isinstance(label, int)
    batch = next(iter(torch.utils.data.DataLoader(data.train, batch_size=4)))
    assert batch[0].shape == (4, 1, 64, 64) and batch[1].dtype == torch.int64


def test_dataset_resizes_other_shapes(real_site: Path) -> None:
    data = site_datasets(real_site, SeededSplit(0.0), image_size=32)
    shapes = {tuple(data.train[i][0].shape) for i in range(len(data.train))}
    assert shapes == {(1, 32, 32)} and data.num_train == 2
    assert data.skipped == 3 and data.unlabelled == 1 + 10


def test_decoded_images_are_cached_until_the_folder_changes(demo: list[Path]) -> None:
    first = cached_site_images(demo[1])
    assert cached_site_images(demo[1]) is first
    manifest = demo[1] / "labels.csv"
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert cached_site_images(demo[1]) is not first
