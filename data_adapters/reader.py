"""Read a site's files once: header and pixels from one read, through the decode cache when it has them.

`SiteReader` keeps what a load learns about each file (its content digest, its decoded and
preprocessed frames, or why it could not be decoded) and hands new arrays to the disk cache at
the end. Files in the common encodings are walked without building pydicom objects (fastparse.py);
everything else goes through pydicom.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import DecodeCache, content_digest, sample_key
from .decode import decode_bytes, quiet
from .fastparse import fast_parse
from .headers import InstanceHeader, Unusable, header_from_dataset, header_from_elements, parse, pixel_bytes_read
from .transforms import Preprocess

__all__ = ["SiteReader"]


class SiteReader:
    """Reads and decodes a site's files once: through the disk cache when there is one, else from the file."""

    def __init__(self, folder: Path, preprocess: Preprocess | None, cache: DecodeCache | None) -> None:
        self.folder, self.preprocess, self.cache = folder, preprocess, cache
        self.digests: dict[str, list] = cache.load_digests(folder) if cache else {}
        self.fresh: dict[str, np.ndarray] = {}  # decoded during the index pass
        self.failures: dict[str, str] = {}
        self.pending: dict[str, np.ndarray] = {}
        self.channels = preprocess.channels if preprocess is not None else 1

    def known_digest(self, header: InstanceHeader) -> str | None:
        entry = self.digests.get(header.path)
        return entry[2] if entry and entry[0] == header.size and entry[1] == header.mtime_ns else None

    def read(self, relative: str) -> tuple[bytes, os.stat_result]:
        path = self.folder / relative
        try:
            with open(path, "rb") as fh:
                stat, raw = os.fstat(fh.fileno()), fh.read()
        except OSError:
            raise Unusable("cannot open file (permissions or I/O error)") from None
        self.digests[relative] = [stat.st_size, stat.st_mtime_ns, content_digest(raw)]
        return raw, stat

    def decode(self, raw: bytes) -> np.ndarray:
        with quiet():
            return decode_bytes(raw, self.channels)

    def _key(self, digest: str) -> str | None:
        if self.cache is None or self.preprocess is None:
            return None
        return sample_key([digest], self.preprocess.fingerprint)

    def _cached(self, digest: str | None) -> np.ndarray | None:
        key = self._key(digest) if digest is not None else None
        return self.cache.get(key) if key is not None else None  # type: ignore[union-attr]

    def _store(self, relative: str, frames: np.ndarray) -> np.ndarray:
        prepared = self.preprocess(frames) if self.preprocess is not None else frames
        key = self._key(self.digests[relative][2])
        if key is not None:
            self.pending[key] = prepared
        return prepared

    def scan(self, path: Path, relative: str, wanted: Callable[[InstanceHeader], bool]) -> InstanceHeader | None:
        """Index reader for 2D: one read of the file gives the header and, for wanted images, the pixels."""
        raw, stat = self.read(relative)
        fast = fast_parse(raw, None, complete=True)
        with quiet():
            if fast is not None:
                header = header_from_elements(fast.elements, fast.meta, relative, stat, fast.pixels,
                                              len(raw) - fast.pixel_offset)
            else:
                ds, pixels = _parse_or_explain(raw)
                header = header_from_dataset(ds, relative, stat, pixels, remaining=pixel_bytes_read(ds))
            if header is not None and wanted(header):
                # A touched but unchanged file keeps its content digest, so its cached array still serves.
                hit = self._cached(self.digests[relative][2])
                try:
                    self.fresh[relative] = hit if hit is not None else self._store(relative, decode_bytes(raw, self.channels))
                except Unusable as reason:
                    self.failures[relative] = str(reason)
        return header

    def frames(self, header: InstanceHeader) -> np.ndarray | None:
        """The (preprocessed) frames of one instance, or None when it cannot be decoded."""
        if header.path in self.failures:
            return None
        if header.path in self.fresh:
            return self.fresh.pop(header.path)
        hit = self._cached(self.known_digest(header))
        if hit is not None:
            return hit
        try:
            raw, _ = self.read(header.path)
            return self._store(header.path, self.decode(raw))
        except Unusable as reason:
            self.failures[header.path] = str(reason)
            return None

    def finish(self) -> None:
        if self.cache is not None:
            self.cache.put_many(self.pending)
            self.cache.save_digests(self.folder, self.digests)
            self.pending = {}


def _parse_or_explain(raw: bytes) -> tuple:
    try:
        return parse(io.BytesIO(raw), stop_at_pixels=False)
    except Unusable:
        raise
    except Exception:
        raise Unusable("unreadable DICOM (corrupt header)") from None
