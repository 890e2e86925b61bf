"""The site's decode cache: later rounds decode nothing, keys follow content and settings, clearing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_adapters.cache import clear_cache
from fedcare_ops.check_site import DEFAULT_CACHE_FOLDER
from data_adapters.dataset import site_datasets
from data_adapters.split import SeededSplit
from fedcare_ops.demo_data import write_demo_sites
from data_adapters.dicom import load_site, manifest_for
from data_adapters.transforms import Preprocess
from fedcare_ops.cli import app
from fedcare.errors import SiteDataError


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    return write_demo_sites(tmp_path / "demo", sites=1, seed=3, cases=[24])[0]


def _load(site: Path, cache: Path | None, window: object = "soft-tissue"):
    return load_site(site, manifest_for(site, None, None), preprocess=Preprocess(window=window), cache_dir=cache)


def _dicom_files(site: Path) -> list[Path]:
    return [p for p in site.rglob("*") if p.is_file() and p.name not in ("labels.csv", "site.toml")]


def _batches(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("batch-*.npy")}


def _scramble_keeping_stat(files: list[Path]) -> None:
    """Destroy every file's content but keep its size and mtime: only a re-read would notice."""
    for path in files:
        stat = path.stat()
        path.write_bytes(b"\xff" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_new_process_reads_from_the_cache_not_the_dicom(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _load(site, cache)
    assert len(first) == 24 and _batches(cache)
    _scramble_keeping_stat(_dicom_files(site))
    again = _load(site, cache)  # a fresh load: no in-memory state is shared with the first
    np.testing.assert_array_equal(np.stack(again.images), np.stack(first.images))
    assert again.labels.tolist() == first.labels.tolist() and again.skipped == []


def test_other_settings_decode_again(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    soft = _load(site, cache)
    batches = _batches(cache)
    lung = _load(site, cache, window="lung")
    assert _batches(cache) > batches  # new arrays for the new window
    assert not np.allclose(np.stack(soft.images), np.stack(lung.images))
    np.testing.assert_array_equal(np.stack(_load(site, None, window="lung").images), np.stack(lung.images))


def test_keys_follow_content_not_mtime(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _load(site, cache)
    batches = _batches(cache)
    victim = _dicom_files(site)[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    _load(site, cache)
    assert _batches(cache) == batches  # touched, same content: nothing new to store
    data = bytearray(victim.read_bytes())
    data[-2:] = b"\x00\x00"  # one pixel changed
    victim.write_bytes(bytes(data))
    _load(site, cache)
    assert len(_batches(cache)) == len(batches) + 1


def test_site_datasets_with_a_cache_give_the_same_items(site: Path, tmp_path: Path) -> None:
    plain = site_datasets(site, SeededSplit(0.25, 1))
    cached = site_datasets(site, SeededSplit(0.25, 1), cache_dir=tmp_path / "cache")
    assert (plain.num_train, plain.num_val, plain.class_counts) == (cached.num_train, cached.num_val, cached.class_counts)
    for i in range(len(plain.train)):
        a, b = plain.train[i], cached.train[i]
        assert a[1] == b[1] and bool((a[0] == b[0]).all())


def test_clearing_removes_the_cache_and_refuses_other_folders(site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _load(site, state / DEFAULT_CACHE_FOLDER)
    result = CliRunner().invoke(app, ["cache", "clear", "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and not (state / DEFAULT_CACHE_FOLDER).exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("not a cache")
    with pytest.raises(SiteDataError, match="not a fedcare decode cache"):
        clear_cache(precious)
    assert (precious / "keep.txt").exists()
    assert CliRunner().invoke(app, ["cache", "clear"]).exit_code == 2  # neither --state nor --cache-dir
