"""The site's decode cache: preprocessed arrays on local disk, keyed by file content and settings.

A key is the hash of the source files' content digests and the preprocessing fingerprint, so an
edited file or a new window or image size never reuses a stale array. Arrays are written in
batches (one .npy per load, frames stacked) and read back memory-mapped, so a later epoch or
round reads a handful of files instead of decoding thousands. Content digests are remembered by
(path, size, mtime), so an unchanged site is not even re-read to find its keys.

The folder holds only what this module writes, marked by a CACHEDIR.TAG; `clear` removes it. Its
size is bounded by the limit the site stores in it (`limit_cache`, from the site's cache-max-gb):
every new window, image size or channel count a run asks for is a new copy of the site's images, so
without a bound a coordinator could fill the site's disk run by run. The batches read or written
longest ago are removed first.

The cache only ever makes a site faster: a write that fails (disk full, a read-only folder) logs a
warning in the site's own log and the site goes on without caching, never failing its round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedcare.errors import SiteDataError

__all__ = ["DecodeCache", "content_digest", "sample_key", "clear_cache", "limit_cache", "prepare_cache_dir",
           "usable_cache_dir", "write_or_warn"]

log = logging.getLogger("fedcare.site")  # the site's own log: it never leaves the site

_TAG_NAME = "CACHEDIR.TAG"
# The standard signature (bford.info/cachedir) that backup tools recognise and skip.
_TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# fedcare decode cache: safe to delete\n"
_TABLE = "table.json"
_LIMIT = "limit.json"
_BATCHES = "batch-*.npy"


def content_digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=20).hexdigest()


def sample_key(digests: Iterable[str], fingerprint: str) -> str:
    """The cache key of one sample: its source files' content and the preprocessing settings."""
    h = hashlib.blake2b(fingerprint.encode(), digest_size=20)
    for digest in digests:
        h.update(digest.encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: the cache only gets slower, never wrong


def write_atomic(path: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, then rename it to `path`; a failed write leaves no partial file behind."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to a path
        np.save(handle, array)


def write_or_warn(root: Path, write: Callable[[], None]) -> bool:
    """Run one cache write; when the disk refuses it, warn in the site's log and return False."""
    try:
        write()
    except OSError as exc:
        log.warning("decode cache %s cannot be written (%s): going on without caching; free space there or "
                    "make it writable to keep decoded images for the next round", root, exc.strerror or exc)
        return False
    return True


def _write_json(path: Path, document: dict) -> None:
    write_atomic(path, path.with_name(f".{path.name}.{os.getpid()}.tmp"),
                 lambda tmp: tmp.write_text(json.dumps(document), encoding="utf-8"))


def prepare_cache_dir(root: Path) -> Path:
    """Create the cache folder with its tag (which marks it as safe to clear)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SiteDataError(f"cache-dir {root} is a file: point cache-dir at a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tag = root / _TAG_NAME
        if not tag.exists():
            tag.write_text(_TAG_TEXT, encoding="utf-8")
    except OSError as exc:
        raise SiteDataError(f"cache-dir {root} cannot be written ({exc.strerror}): point it at a writable folder") from None
    return root


def limit_cache(root: Path, max_bytes: int) -> None:
    """Store the site's size limit in its cache folder (0: none), for every process that writes there."""
    prepared = usable_cache_dir(root)
    if prepared is not None and _stored_limit(prepared) != max_bytes:
        write_or_warn(prepared, lambda: _write_json(prepared / _LIMIT, {"max_bytes": max_bytes}))


def usable_cache_dir(root: Path) -> Path | None:
    """The prepared cache folder, or None (with a warning in the site's log) when it cannot be written."""
    try:
        return prepare_cache_dir(root)
    except SiteDataError as err:
        log.warning("%s; going on without the decode cache", err)
        return None


class DecodeCache:
    """Content-addressed arrays under `root`; every array of one batch has the same frame shape.

    Reads go on from whatever the folder holds; after the first failed write no more are tried."""

    def __init__(self, root: Path) -> None:
        prepared = usable_cache_dir(root)
        self.root = Path(root)
        self.writable = prepared is not None
        self._table: dict[str, list] = _read_json(self.root / _TABLE)
        self._batches: dict[str, np.ndarray] = {}
        self.max_bytes = _stored_limit(self.root)

    def _write(self, write: Callable[[], None]) -> None:
        self.writable = self.writable and write_or_warn(self.root, write)

    # ---- content digests, remembered by (size, mtime) per folder ----

    def _digest_file(self, folder: Path) -> Path:
        name = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:20]
        return self.root / f"digests-{name}.json"

    def load_digests(self, folder: Path) -> dict[str, list]:
        """{relative path: [size, mtime_ns, digest]} recorded for `folder`."""
        return _read_json(self._digest_file(folder))

    def save_digests(self, folder: Path, digests: dict[str, list]) -> None:
        if self.writable:
            self._write(lambda: _write_json(self._digest_file(folder), digests))

    # ---- arrays ----

    def get(self, key: str) -> np.ndarray | None:
        """The array stored under `key` (memory-mapped, read-only), or None."""
        entry = self._table.get(key)
        if entry is None:
            return None
        batch, start, count = entry
        if batch not in self._batches:
            try:
                self._batches[batch] = np.load(self.root / batch, mmap_mode="r")
            except (OSError, ValueError):
                return None
            if self.writable:
                with contextlib.suppress(OSError):  # used now: removed last when the cache makes room
                    os.utime(self.root / batch)
        return self._batches[batch][start : start + count]

    def put_many(self, arrays: dict[str, np.ndarray]) -> None:
        """Store arrays of shape [n, ...] (n may differ) in one batch file per frame shape."""
        if arrays and self.writable:
            self._write(lambda: self._put_many(arrays))

    def _put_many(self, arrays: dict[str, np.ndarray]) -> None:
        by_shape: dict[tuple, list[tuple[str, np.ndarray]]] = {}
        for key, array in arrays.items():
            by_shape.setdefault(array.shape[1:], []).append((key, array))
        for items in by_shape.values():
            batch = f"batch-{secrets.token_hex(8)}.npy"
            stacked = np.concatenate([np.asarray(a, dtype=np.float32) for _, a in items])
            if not self._make_room(stacked.nbytes):
                continue
            write_atomic(self.root / batch, self.root / f".{batch}.tmp", lambda tmp: _save_array(tmp, stacked))
            start = 0
            for key, array in items:
                self._table[key] = [batch, start, len(array)]
                start += len(array)
        # Merge with entries another process may have added meanwhile; losing a race costs a re-decode.
        merged = {**_read_json(self.root / _TABLE), **self._table}
        kept = {batch.name for batch in self.root.glob(_BATCHES)}
        self._table = {key: entry for key, entry in merged.items() if entry[0] in kept}
        _write_json(self.root / _TABLE, self._table)

    def _make_room(self, needed: int) -> bool:
        """Remove the batches used longest ago until `needed` more bytes fit under the limit; False when
        they never can (the batch alone is over it), and then nothing is removed."""
        if not self.max_bytes:
            return True
        if needed > self.max_bytes:
            log.warning("decode cache %s: %s bytes of images are over its cache-max-gb limit; not cached", self.root,
                        f"{needed:,}")
            return False
        batches = sorted(_batch_files(self.root))
        used = sum(size for _, size, _ in batches)
        for _, size, path in batches:
            if used + needed <= self.max_bytes:
                break
            path.unlink(missing_ok=True)  # a process that has it memory-mapped keeps reading it
            used -= size
        return True


def _stored_limit(root: Path) -> int:
    """The limit `limit_cache` stored, in bytes; 0 (none) when there is none or it is damaged."""
    limit = _read_json(root / _LIMIT).get("max_bytes", 0)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


def _batch_files(root: Path) -> list[tuple[int, int, Path]]:
    """(last used, bytes, path) of each batch; one another process removes meanwhile is skipped."""
    found = []
    for path in root.glob(_BATCHES):
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        found.append((status.st_mtime_ns, status.st_size, path))
    return found


def clear_cache(cache_dir: Path) -> int:
    """Delete a decode cache folder; returns the number of files removed.

    Refuses a folder without the cache's CACHEDIR.TAG, so a mistyped path cannot delete data.
    """
    root = Path(cache_dir)
    if not root.exists():
        return 0
    if not (root / _TAG_NAME).is_file():
        raise SiteDataError(
            f"{root} is not a fedcare decode cache (no {_TAG_NAME}): check the cache-dir path; nothing was deleted"
        )
    count = sum(len(files) for _, _, files in os.walk(root))
    shutil.rmtree(root)
    return count
