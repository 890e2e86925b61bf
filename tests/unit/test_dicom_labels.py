"""Label manifests keyed by instance, series, study or accession; the key column detected or configured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_adapters.dataset import site_datasets
from data_adapters.split import SeededSplit, split_indices
from fedcare_ops.demo_data import write_demo_sites
from data_adapters.dicom import read_site
from data_adapters.labels import read_manifest
from fedcare.errors import SiteDataError

CT5N = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    return write_demo_sites(tmp_path / "demo", sites=1, seed=4, cases=[40])[0]


def _headers(site: Path) -> list[pydicom.Dataset]:
    files = sorted(p for p in site.rglob("*") if p.is_file() and p.name not in ("labels.csv", "site.toml"))
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def test_series_key_labels_every_image_of_the_series_and_splits_whole_series(demo: Path) -> None:
    series = sorted({ds.SeriesInstanceUID for ds in _headers(demo)})
    (demo / "labels.csv").write_text("SeriesInstanceUID,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(series)))
    site = read_site(demo)
    patient_of = {ds.SeriesInstanceUID: ds.PatientID for ds in _headers(demo)}
    assert len(site) == 40 and site.unlabelled == 0
    assert set(site.groups) == {f"patient:{patient_of[uid]}" for uid in series}  # the split keeps patients whole
    train, val = split_indices(site.labels, 0.25, 0, site.groups)
    assert {site.groups[i] for i in train}.isdisjoint({site.groups[i] for i in val})
    assert len({site.groups[i] for i in val}) == 6  # 24 one-series patients, 12 per class: three of each
    data = site_datasets(demo, SeededSplit(0.25, 0))
    assert (data.num_train, data.num_val) == (len(train), len(val))


def test_accession_key_and_unlabelled_images(tmp_path: Path) -> None:
    for i, path in enumerate(sorted(CT5N.iterdir())):
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "ACC1" if i < 3 else "ACC2"
        ds.save_as(tmp_path / path.name)
    (tmp_path / "labels.csv").write_text("AccessionNumber,label\nACC1,1\n")
    site = read_site(tmp_path)
    assert sorted(site.labels.tolist()) == [1, 1, 1] and site.unlabelled == 2


def test_configured_key_wins_over_detection(tmp_path: Path) -> None:
    shutil.copytree(CT5N, tmp_path / "site")
    headers = _headers(tmp_path / "site")
    rows = "".join(f"{ds.SOPInstanceUID},{ds.StudyInstanceUID},{i % 2}\n" for i, ds in enumerate(headers))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("SOPInstanceUID,StudyInstanceUID,label\n" + rows)
    assert read_manifest(manifest).key == "SOPInstanceUID"  # the most specific column
    assert sorted(read_site(tmp_path / "site", manifest).labels.tolist()) == [0, 0, 0, 1, 1]
    study_rows = f"StudyInstanceUID,label\n{headers[0].StudyInstanceUID},1\n"
    (tmp_path / "study.csv").write_text(study_rows)
    assert read_site(tmp_path / "site", tmp_path / "study.csv").labels.tolist() == [1] * 5
    with pytest.raises(SiteDataError, match="label-key 'PatientID' is not one of"):
        read_manifest(manifest, key="PatientID")
    with pytest.raises(SiteDataError, match="no 'AccessionNumber' column"):
        read_manifest(manifest, key="AccessionNumber")
    (tmp_path / "nokey.csv").write_text("uid,label\n1.2,0\n")
    with pytest.raises(SiteDataError, match="no key column") as err:
        read_manifest(tmp_path / "nokey.csv")
    assert str(tmp_path / "nokey.csv") in str(err.value) and "\n" not in str(err.value)


def test_labels_without_images_are_named_by_row(demo: Path) -> None:
    manifest = demo / "labels.csv"
    manifest.write_text(manifest.read_text() + "1.2.3.999,0\n")
    with pytest.raises(SiteDataError, match=r"1 labelled SOPInstanceUID value\(s\) .*\(row 42;"):
        read_site(demo)


def test_dataset_reports_only_counts(demo: Path) -> None:
    """What the ClientApp may send on: numbers only, no UID, path or header string."""
    data = site_datasets(demo)
    for name in ("num_train", "num_val", "skipped", "unlabelled", "excluded"):
        assert isinstance(getattr(data, name), int)
    assert all(isinstance(k, int) and isinstance(v, int) for k, v in data.class_counts.items())
    image, label = data.train[0]
    assert isinstance(label, int) and not hasattr(image, "meta") and np.isfinite(image.numpy()).all()
