"""A coordinator cannot fill a site's disk through its decode cache: the site's cache-max-gb bounds it.

Written as the coordinator would attack: every run asks for another window, so every run's first
evaluation decodes the whole site again and caches one more copy of its images. With the limit the
cache keeps the copies used last and stays under it; without one (before the limit existed) it
grew by a copy per run.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from client_app.app import evaluate_global
from data_adapters.cache import DecodeCache, limit_cache
from fedcare.errors import ConfigError
from fedcare.sites import site_from_settings
from tests.unit.test_client_app import context, request


def evaluate(data: Path, state: Path, window: str, **node) -> Message:
    """The site's evaluation, asked by a run that wants `window`."""
    return evaluate_global(request("evaluate"), context(data, state, run={"batch-size": 16, "window": window}, **node))


def cached_bytes(state: Path) -> int:
    return sum(path.stat().st_size for path in (state / "decode-cache").glob("batch-*.npy"))


def test_runs_asking_for_new_windows_cannot_grow_the_cache_past_the_sites_limit(demo_site: Path, tmp_path: Path):
    reply = evaluate(demo_site, tmp_path / "measure", "-1000,400")
    assert not reply.has_error()
    one_copy = cached_bytes(tmp_path / "measure")
    assert one_copy > 0
    state, limit = tmp_path / "state", 2.5 * one_copy
    for run in range(1, 6):  # five runs, five windows: five copies of the site without a limit
        reply = evaluate(demo_site, state, f"{-1000 + run},400", cache_max_gb=limit / 1e9)
        assert not reply.has_error()
        assert cached_bytes(state) <= limit
    assert cached_bytes(state) >= 2 * one_copy  # the last two runs' copies are kept
    # The last window's images are still served from the cache: a reader finds every one of its arrays.
    cache = DecodeCache(state / "decode-cache")
    assert cache.max_bytes == int(limit) and len(cache._table) > 0
    assert all(cache.get(key) is not None for key in cache._table)


def test_no_limit_keeps_every_copy_and_a_batch_over_the_limit_is_not_cached(tmp_path: Path, caplog):
    limit_cache(tmp_path / "cache", 0)
    cache = DecodeCache(tmp_path / "cache")
    for index in range(3):
        cache.put_many({f"key-{index}": np.zeros((2, 8, 8), dtype=np.float32)})
    assert len(list((tmp_path / "cache").glob("batch-*.npy"))) == 3
    limit_cache(tmp_path / "cache", 100)
    small = DecodeCache(tmp_path / "cache")
    small.put_many({"big": np.zeros((4, 8, 8), dtype=np.float32)})  # 1 KiB: over the limit on its own
    assert small.get("big") is None and "over its cache-max-gb limit; not cached" in caplog.text
    assert len(list((tmp_path / "cache").glob("batch-*.npy"))) == 3  # nothing removed for it


@pytest.mark.parametrize("value", [-1, "20GB", True, float("inf")])
def test_a_wrong_cache_limit_is_one_line_naming_it(tmp_path: Path, value):
    settings = {"site-name": "north", "data-path": str(tmp_path), "state-path": str(tmp_path), "budget-epsilon": 8.0,
                "cache-max-gb": value}
    with pytest.raises(ConfigError, match=r"site\.toml: 'cache-max-gb' = .* must be a number of gigabytes"):
        site_from_settings(settings, "site.toml")
