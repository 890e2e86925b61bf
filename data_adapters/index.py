"""Index a site folder from DICOM headers alone: which instances, studies and series it holds.

Every file under the folder is tried, whatever its name or extension; instances are grouped by
StudyInstanceUID and SeriesInstanceUID, never by folder, because archive exports mix series in
one folder and split one series over several. Files that cannot be used are listed with a reason
and never stop the index. With a cache folder, headers are remembered by (path, size, mtime), so
indexing an unchanged site again reads no file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedcare.errors import SiteDataError
from fedcare.sites import SITE_FILE

from .cache import usable_cache_dir, write_atomic, write_or_warn
from .decode import quiet
from .headers import MEDIA_DIRECTORY, InstanceHeader, Unusable, read_header

__all__ = ["SiteIndex", "index_site", "site_files", "DUPLICATE", "SeriesKey"]

DUPLICATE = "duplicate SOPInstanceUID (the same instance is stored twice)"
_INDEX_VERSION = 2  # 2: headers carry PatientID

SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


@dataclass
class SiteIndex:
    """The instances of a site folder, and every other file with the reason it was left out."""

    root: Path
    instances: list[InstanceHeader] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    directories: list[str] = field(default_factory=list)  # DICOMDIR media indexes
    duplicates: list[InstanceHeader] = field(default_factory=list)  # later copies of an indexed instance

    @property
    def files(self) -> int:
        return len(self.instances) + len(self.skipped) + len(self.directories) + len(self.duplicates)

    def series(self) -> dict[SeriesKey, list[InstanceHeader]]:
        """Instances grouped by (study, series) UID, in file order."""
        groups: dict[SeriesKey, list[InstanceHeader]] = defaultdict(list)
        for header in self.instances:
            groups[(header.study_uid, header.series_uid)].append(header)
        return dict(groups)

    def left_out(self) -> list[tuple[str, str]]:
        """Every file that is not an indexed instance, with its reason (DICOMDIRs and duplicates included)."""
        return (self.skipped + [(path, MEDIA_DIRECTORY) for path in self.directories]
                + [(h.path, DUPLICATE) for h in self.duplicates])


def site_files(folder: Path, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Every file under `folder` in a stable order (sorted per directory), minus `exclude` and the site's settings."""
    skip = {path.resolve() for path in (*exclude, Path(folder) / SITE_FILE)}
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # deterministic order, so the same folder gives the same split
        for name in sorted(files):
            path = Path(root, name)
            if path.resolve() in skip:
                continue
            found.append(path)
    return found


def _cache_path(cache_dir: Path, folder: Path) -> Path:
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache_dir / f"index-{digest}.json"


def _load_cache(path: Path | None) -> dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is only a slower index
    return document.get("entries", {}) if document.get("version") == _INDEX_VERSION else {}


def _save_cache(path: Path, entries: dict[str, list]) -> None:
    document = json.dumps({"version": _INDEX_VERSION, "entries": entries})
    write_or_warn(path.parent, lambda: write_atomic(path, path.with_suffix(f".tmp{os.getpid()}"),
                                                    lambda tmp: tmp.write_text(document, encoding="utf-8")))


Reader = Callable[[Path, str], "InstanceHeader | None"]


def _entry(path: Path, relative: str, cached: list | None, reader: Reader) -> tuple[list, InstanceHeader | None]:
    """([size, mtime_ns, kind, payload], header) for one file, from the cache when it is unchanged."""
    try:
        stat = path.stat()
    except OSError:
        return [-1, -1, "skip", "cannot open file (permissions or I/O error)"], None
    if cached is not None and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
        return cached, InstanceHeader.from_row(cached[3]) if cached[2] == "instance" else None
    if path.name.upper() == "DICOMDIR":
        return [stat.st_size, stat.st_mtime_ns, "dir", None], None
    try:
        header = reader(path, relative)
    except Unusable as reason:
        return [stat.st_size, stat.st_mtime_ns, "skip", str(reason)], None
    if header is None:
        return [stat.st_size, stat.st_mtime_ns, "dir", None], None
    return [header.size, header.mtime_ns, "instance", header.to_row()], header


def index_site(
    folder: Path, exclude: tuple[Path, ...] = (), cache_dir: Path | None = None, reader: Reader = read_header
) -> SiteIndex:
    """Index every file under `folder` (except `exclude`, e.g. the label manifest) from headers only.

    A second copy of an instance (same SOPInstanceUID) is left out as a duplicate. `reader` reads a
    file that the cache does not know; a loader may pass one that also decodes the pixels it needs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise SiteDataError(f"data folder {folder} {state}: point the site at the folder that holds its DICOM files")
    usable = usable_cache_dir(cache_dir) if cache_dir is not None else None
    cache_file = _cache_path(usable, folder) if usable is not None else None
    cached = _load_cache(cache_file)
    entries: dict[str, list] = {}
    index = SiteIndex(root=folder)
    seen: set[str] = set()
    with quiet():
        for path in site_files(folder, exclude):
            relative = path.relative_to(folder).as_posix()
            entries[relative], header = _entry(path, relative, cached.get(relative), reader)
            kind = entries[relative][2]
            if kind == "dir":
                index.directories.append(relative)
            elif kind == "skip":
                index.skipped.append((relative, entries[relative][3]))
            elif header is not None:
                if header.sop_uid in seen:
                    index.duplicates.append(header)
                    continue
                seen.add(header.sop_uid)
                index.instances.append(header)
    if cache_file is not None and entries != cached:
        _save_cache(cache_file, entries)
    return index
