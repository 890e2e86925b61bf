"""Indexing real archives from headers alone: grouping by UID, reasons for every left-out file, the cache."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from data_adapters.dicom import load_site
from data_adapters.fastparse import fast_parse
from data_adapters.headers import Unusable, header_from_dataset, parse, read_header
from data_adapters.index import DUPLICATE, index_site, site_files

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DICOMDIRTESTS = PYDICOM_FILES / "dicomdirtests"


@pytest.fixture(scope="module")
def pydicom_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pydicom's whole bundled test-file folder, as one site."""
    site = tmp_path_factory.mktemp("pydicom") / "site"
    shutil.copytree(PYDICOM_FILES, site)
    return site


def test_every_file_is_indexed_or_left_out_with_a_reason(pydicom_tree: Path) -> None:
    index = index_site(pydicom_tree)
    indexed = {h.path for h in index.instances} | {h.path for h in index.duplicates}
    left_out = dict(index.left_out())
    every = {p.relative_to(pydicom_tree).as_posix() for p in site_files(pydicom_tree)}
    assert indexed | set(left_out) == every and not indexed & set(left_out) - {h.path for h in index.duplicates}
    assert index.files == len(every)
    assert all(reason.strip() for reason in left_out.values())
    assert left_out["README.txt"] == "not a DICOM file"
    assert left_out["dicomdirtests/DICOMDIR"].startswith("DICOMDIR")
    assert left_out["reportsi.dcm"] == "no pixel data (Basic Text SR Storage)"
    assert left_out["MR_truncated.dcm"] == "unreadable DICOM (truncated: pixel data ends 62 bytes early)"
    assert left_out["MR_small_RLE.dcm"] == DUPLICATE  # the same instance in another transfer syntax
    assert all(r.startswith("no pixel data") for p, r in left_out.items() if "TINY_ALPHA/PT" in p)


def test_series_are_grouped_by_uid_not_by_folder() -> None:
    index = index_site(DICOMDIRTESTS)
    by_folder: dict[str, set[str]] = {}
    for header in index.instances:
        by_folder.setdefault(str(Path(header.path).parent), set()).add(header.series_uid)
    assert len(by_folder["98892003/MR1"]) == 3
    assert len(by_folder["98892003/MR2"]) == 3
    series = index.series()
    ct5n = next(members for members in series.values() if all("CT5N" in h.path for h in members))
    assert len(ct5n) == 5 and {h.modality for h in ct5n} == {"CT"}
    # A series spread over two folders stays one series.
    mr2_in_mr1 = {h.series_uid for h in index.instances if "MR1/" in h.path} & {
        h.series_uid for h in index.instances if "MR2/" in h.path}
    for uid in mr2_in_mr1:
        assert any(key[1] == uid and len(members) >= 2 for key, members in series.items())


def test_header_records_geometry_and_encoding() -> None:
    ct = read_header(Path(get_testdata_file("CT_small.dcm")), "CT_small.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ct is not None
    assert (ct.modality, ct.manufacturer, ct.rows, ct.columns, ct.frames) == ("CT", ds.Manufacturer, 128, 128, 1)
    assert ct.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert ct.positions == (tuple(float(v) for v in ds.ImagePositionPatient),)
    assert ct.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert ct.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert ct.sop_uid == ds.SOPInstanceUID and ct.series_uid == ds.SeriesInstanceUID
    # Identifying tags are recorded by name with a masked value only.
    tags = dict(ct.identifying)
    assert tags["PatientName"] == str(ds.PatientName)[0] + "***"
    assert str(ds.PatientName) not in repr(ct.identifying)


def test_index_reads_headers_only(tmp_path: Path) -> None:
    # JPEG-lossy.dcm cannot be decoded by any plugin: the index still lists it as an instance.
    shutil.copy(get_testdata_file("JPEG-lossy.dcm"), tmp_path / "lossy")
    index = index_site(tmp_path)
    assert [h.path for h in index.instances] == ["lossy"] and index.skipped == []
    loaded = load_site(tmp_path, None, decode_all=True, strict=False)
    assert loaded.failures and loaded.failures[0][1].startswith("cannot decode pixel data")


def test_syntax_without_decoder_is_listed(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # no installed plugin decodes MPEG-2 video
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    index = index_site(tmp_path)
    assert index.instances == []
    assert dict(index.skipped)["video.dcm"].startswith("no installed decoder for MPEG2")


def test_headers_from_index_match_a_full_read(pydicom_tree: Path) -> None:
    """The header-only reader (selected elements) and a full pydicom read agree on every field."""
    header_only = index_site(pydicom_tree)
    full = load_site(pydicom_tree, None, decode_all=True, strict=False).index
    assert full is not None
    assert [h.path for h in header_only.instances] == [h.path for h in full.instances]
    mismatched = [a.path for a, b in zip(header_only.instances, full.instances) if a != b]
    assert mismatched == []


def test_lean_header_reader_matches_pydicom_on_every_real_file(pydicom_tree: Path) -> None:
    """read_header walks common files itself; pydicom's full parse must give the same record."""
    store = Path(get_testdata_file("emri_small.dcm")).parent  # pydicom-data
    files = site_files(pydicom_tree) + sorted(store.iterdir())
    compared = lean = 0
    for path in files:
        raw = path.read_bytes()
        try:
            ds, pixels = parse(io.BytesIO(raw), stop_at_pixels=False)
            expected = header_from_dataset(ds, "x", path.stat(), pixels, None)
        except Exception:
            continue
        try:
            found = read_header(path, "x")
        except Unusable:
            continue  # e.g. truncated pixel data: only the header reader checks the file size
        assert found == expected, path.name
        compared += 1
        lean += fast_parse(raw, None, complete=True) is not None
    assert compared > 150 and lean > 50


def test_cached_index_reads_no_unchanged_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(DICOMDIRTESTS / "98892001", site)
    cache = tmp_path / "cache"
    first = index_site(site, cache_dir=cache)
    victim = site / first.instances[0].path
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)  # same size, and the old mtime put back below
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert index_site(site, cache_dir=cache).instances == first.instances  # not re-read
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = index_site(site, cache_dir=cache)
    assert dict(again.skipped)[first.instances[0].path] == "not a DICOM file"
