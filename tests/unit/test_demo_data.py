"""The demo generator writes valid, de-identified, deterministic multi-site CT DICOM data."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from fedcare_ops.demo_data import write_demo_sites
from fedcare.errors import SiteDataError

CASES = [12, 20, 16]
DESIGNED_POSITIVE_RATE = [0.50, 0.35, 0.25]


def _instances(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*") if p.is_file() and p.name not in ("labels.csv", "site.toml"))


def _labels(site: Path) -> dict[str, int]:
    with open(site / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["SOPInstanceUID", "label"]
    return {uid: int(label) for uid, label in rows[1:]}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "site.toml"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_sites(tmp_path_factory.mktemp("demo") / "out", sites=3, seed=7, cases=CASES)


@pytest.fixture(scope="module")
def datasets(demo: list[Path]) -> list[list[pydicom.Dataset]]:
    # force=False: a missing preamble or file meta would raise here.
    return [[pydicom.dcmread(p) for p in _instances(site)] for site in demo]


def test_writes_one_folder_per_site_with_requested_case_counts(demo: list[Path]) -> None:
    assert [p.name for p in demo] == ["site-0", "site-1", "site-2"]
    assert [len(_instances(site)) for site in demo] == CASES
    assert [len(_labels(site)) for site in demo] == CASES


def test_files_are_valid_ct_dicom(datasets: list[list[pydicom.Dataset]]) -> None:
    for site, instances in enumerate(datasets):
        for ds in instances:
            assert ds.preamble is not None
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT"
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel) == (64, 64, 16, 1)
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.pixel_array.shape == (64, 64)
            assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
            assert float(ds.SliceThickness) > 0
            # De-identified: only synthetic identities.
            assert str(ds.PatientName) == f"ANON^SITE{site}"
            assert ds.PatientID.startswith(f"DEMO-{site}-")


def test_study_series_structure(datasets: list[list[pydicom.Dataset]]) -> None:
    for instances in datasets:
        studies: dict[str, set[str]] = {}
        numbers: Counter[str] = Counter()
        for ds in instances:
            studies.setdefault(ds.StudyInstanceUID, set()).add(ds.SeriesInstanceUID)
            numbers[f"{ds.SeriesInstanceUID}/{ds.InstanceNumber}"] += 1
        assert len(studies) >= 2
        assert all(len(series) == 1 for series in studies.values())
        assert max(numbers.values()) == 1, "instance numbers repeat within a series"
        assert len({ds.SOPInstanceUID for ds in instances}) == len(instances)


def test_sites_differ_like_scanners(demo: list[Path], datasets: list[list[pydicom.Dataset]]) -> None:
    def per_site(attribute) -> list:
        values = [{attribute(ds) for ds in instances} for instances in datasets]
        assert all(len(v) == 1 for v in values), "a site mixes scanner settings"
        return [v.pop() for v in values]

    encodings = per_site(lambda ds: (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.PixelRepresentation))
    spacings = per_site(lambda ds: tuple(float(v) for v in ds.PixelSpacing))
    vendors = per_site(lambda ds: (ds.Manufacturer, ds.ManufacturerModelName))
    for values in (encodings, spacings, vendors):
        assert len(set(values)) == 3
    assert {pr for _, _, pr in encodings} == {0, 1}
    suffixes = [{p.suffix for p in _instances(site)} for site in demo]
    assert len({frozenset(s) for s in suffixes}) == 3, "file naming should vary by site"


def test_labels_csv_matches_files(demo: list[Path], datasets: list[list[pydicom.Dataset]]) -> None:
    for site, instances in zip(demo, datasets):
        assert set(_labels(site)) == {ds.SOPInstanceUID for ds in instances}
        assert set(_labels(site).values()) == {0, 1}


def test_class_balance_follows_site_design(demo: list[Path]) -> None:
    for site, n, rate in zip(demo, CASES, DESIGNED_POSITIVE_RATE):
        positives = sum(_labels(site).values())
        assert abs(positives - n * rate) <= 1, (site.name, positives)


def _max_smoothed_body_hu(ds: pydicom.Dataset) -> float:
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    smooth = sliding_window_view(hu, (3, 3)).mean(axis=(-1, -2))
    return float(smooth[smooth > -300].max())


def test_lesions_are_brighter_than_lesion_free_tissue(demo: list[Path], datasets: list[list[pydicom.Dataset]]) -> None:
    for site, instances in zip(demo, datasets):
        labels = _labels(site)
        peaks = {0: [], 1: []}
        for ds in instances:
            peaks[labels[ds.SOPInstanceUID]].append(_max_smoothed_body_hu(ds))
        assert np.mean(peaks[1]) > np.mean(peaks[0]) + 25, site.name
        assert 70 < np.mean(peaks[1]) < 250


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_demo_sites(tmp_path / "a", sites=2, seed=3, cases=[5, 4])
    b = write_demo_sites(tmp_path / "b", sites=2, seed=3, cases=[5, 4])
    c = write_demo_sites(tmp_path / "c", sites=2, seed=4, cases=[5, 4])
    for x, y, z in zip(a, b, c):
        assert _tree_bytes(x) == _tree_bytes(y)
        assert _tree_bytes(x)["labels.csv"] != _tree_bytes(z)["labels.csv"]
        assert set(_tree_bytes(x).values()).isdisjoint(v for k, v in _tree_bytes(z).items() if k != "labels.csv")


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = write_demo_sites(out, sites=2, seed=1, cases=[3, 3])
    before = _tree_bytes(out)
    with pytest.raises(SiteDataError, match="already exists") as err:
        write_demo_sites(out, sites=2, seed=2, cases=[3, 3])
    assert str(first[0]) in str(err.value) and "\n" not in str(err.value)
    assert _tree_bytes(out) == before

    write_demo_sites(out, sites=2, seed=2, cases=[4, 2], overwrite=True)
    assert [len(_instances(site)) for site in first] == [4, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "staging folders must be cleaned up"


def test_refusal_happens_before_any_site_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "site-1").mkdir(parents=True)
    (out / "site-1" / "keep.txt").write_text("hospital data")
    (out / "site-0").mkdir()  # empty folders may be reused
    with pytest.raises(SiteDataError):
        write_demo_sites(out, sites=2, cases=[2, 2])
    assert list((out / "site-0").iterdir()) == []
    assert write_demo_sites(out, sites=1, cases=[2])[0] == out / "site-0"


@pytest.mark.parametrize("sites,cases", [(2, [3]), (2, [3, 0]), (0, None)])
def test_bad_site_or_case_counts_are_refused(tmp_path: Path, sites: int, cases: list[int] | None) -> None:
    with pytest.raises(SiteDataError):
        write_demo_sites(tmp_path / "out", sites=sites, cases=cases)
    assert not (tmp_path / "out").exists()
