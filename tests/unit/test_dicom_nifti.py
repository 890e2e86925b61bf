"""The NIfTI adapter: converted volumes through MONAI's reader, with the DICOM adapter's interface."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_adapters.dataset import site_datasets
from data_adapters.split import SeededSplit
from data_adapters.decode import read_file
from data_adapters.nifti import load_nifti_site, nifti_manifest, read_nifti
from fedcare.errors import SiteDataError

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def _ct5n_volume() -> np.ndarray:
    """The real CT5N series in HU, [slices, rows, columns], slices ordered by position."""
    paths = sorted(CT5N.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    return np.concatenate([read_file(p)[1] for p in paths])


def _write(path: Path, volume: np.ndarray, spacing=(2.5, 0.5, 0.4)) -> None:
    # NIfTI stores (i, j, k) = (columns, rows, slices).
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), affine), str(path))


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    volume = _ct5n_volume()
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "case1.nii.gz", volume)
    _write(tmp_path / "sub" / "case2.nii", volume[::-1] + 100)
    _write(tmp_path / "unlabelled.nii.gz", volume)
    (tmp_path / "labels.csv").write_text("image,label\ncase1.nii.gz,0\nsub/case2.nii,1\n")
    return tmp_path


def test_volumes_keep_values_layout_and_spacing(site: Path) -> None:
    volume, spacing = read_nifti(site / "case1.nii.gz")
    np.testing.assert_allclose(volume, _ct5n_volume())
    assert spacing == pytest.approx((2.5, 0.5, 0.4))
    loaded = load_nifti_site(site, nifti_manifest(site), input_mode="3d")
    assert loaded.labels.tolist() == [0, 1] and loaded.unlabelled == 1
    np.testing.assert_allclose(loaded.images[1], _ct5n_volume()[::-1] + 100)


def test_slices_are_samples_in_2d_and_split_by_file(site: Path) -> None:
    loaded = load_nifti_site(site, nifti_manifest(site), input_mode="2d")
    assert len(loaded) == 10 and loaded.labels.tolist() == [0] * 5 + [1] * 5
    _write(site / "case3.nii.gz", _ct5n_volume() + 50)
    _write(site / "case4.nii.gz", _ct5n_volume() - 50)
    (site / "labels.csv").write_text((site / "labels.csv").read_text() + "case3.nii.gz,0\ncase4.nii.gz,1\n")
    data = site_datasets(site, SeededSplit(0.5), data_format="nifti")
    assert (data.num_train, data.num_val) == (10, 10) and data.unlabelled == 1  # whole files, one per class
    image, label = data.train[0]
    assert tuple(image.shape) == (1, 64, 64) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    volumes = site_datasets(site, SeededSplit(0.5), image_size=16, input_mode="3d", data_format="nifti",
                            cache_dir=site.parent / "cache")
    assert tuple(volumes.train[0][0].shape) == (1, 16, 16, 16)


def test_missing_and_broken_files(site: Path) -> None:
    (site / "labels.csv").write_text("image,label\ncase1.nii.gz,0\nsub/case2.nii,1\ncase3.nii.gz,1\n")
    with pytest.raises(SiteDataError, match=r"\(row 4\)"):
        load_nifti_site(site, nifti_manifest(site))
    (site / "case3.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(SiteDataError, match=r"\(row 4, most often: cannot read NIfTI: "):
        load_nifti_site(site, nifti_manifest(site))
    (site / "labels.csv").write_text("image,label\ncase1.nii.gz,0\n")
    loaded = load_nifti_site(site, nifti_manifest(site))
    assert [path for path, _ in loaded.skipped] == [] and loaded.unlabelled == 3
