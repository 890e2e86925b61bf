"""Read a site's DICOM folder into labelled samples: 2D images or frames, or 3D series volumes.

The folder is indexed from headers (see index.py), the label manifest joined by its key column,
and only labelled images are decoded. In 2D mode a file that is not yet indexed is read once for
both its header and its pixels (reader.py). In 3D mode the index comes first, then each series is
planned (volumes.py) and decoded. With a cache folder, preprocessed arrays are kept on disk keyed
by file content and settings, and a later round reads no DICOM at all. Header strings (names,
IDs, dates) are patient data: nothing here logs or prints them, and pydicom's warnings, which can
quote values, are silenced.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcare.errors import SiteDataError

from .cache import DecodeCache, sample_key
from .headers import InstanceHeader, Unusable, read_header
from .index import DUPLICATE, SiteIndex, index_site
from .labels import LABELS_FILENAME, Manifest, read_manifest
from .reader import SiteReader
from .transforms import Preprocess
from .volumes import IRREGULAR_CHOICES, VolumePlan, plan_volume, series_slices, stack_volume

__all__ = ["SiteImages", "read_site", "load_site", "INPUT_MODES", "manifest_for", "require_folder"]

INPUT_MODES = ("2d", "3d")
log = logging.getLogger("fedcare.site")  # the site's own log: it never leaves the site
# Segmentations are masks made from other images, not images to classify.
_MASK_MODALITIES = ("SEG", "RTSTRUCT")
_KEY_ATTRIBUTE = {
    "SOPInstanceUID": "sop_uid", "SeriesInstanceUID": "series_uid",
    "StudyInstanceUID": "study_uid", "AccessionNumber": "accession",
}


@dataclass
class SiteImages:
    """A site's labelled samples. `uids`, `groups` and paths stay on the site: never log or send them."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    uids: list[str] = field(default_factory=list)  # SOPInstanceUID (2D) or SeriesInstanceUID (3D)
    groups: list[str] = field(default_factory=list)  # the patient of each sample, else its manifest key
    spacings: list[tuple[float, ...]] = field(default_factory=list)  # mm per axis of each sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files left out, with reasons
    failures: list[tuple[str, str]] = field(default_factory=list)  # indexed files whose pixels failed to decode
    excluded: list[tuple[str, str]] = field(default_factory=list)  # 3D series left out (first file, reason)
    unlabelled: int = 0
    readable: dict[str, int] = field(default_factory=dict)  # decoded file -> frames
    matched: set[str] = field(default_factory=set)  # manifest key values that found their images
    missing: list[str] = field(default_factory=list)  # manifest key values with no readable image
    index: SiteIndex | None = None

    def __len__(self) -> int:
        return len(self.images)

    def commonest_failure(self) -> str:
        """', most often: REASON' among files that failed to decode (a run setting can make them all fail)."""
        if not self.failures:
            return ""
        reason, _ = Counter(reason for _, reason in self.failures).most_common(1)[0]
        return f", most often: {reason}"


def _key_value(header: InstanceHeader, manifest: Manifest | None) -> str:
    return getattr(header, _KEY_ATTRIBUTE[manifest.key]) if manifest is not None else header.sop_uid


def _label(header: InstanceHeader, manifest: Manifest | None) -> int | None:
    return manifest.labels.get(_key_value(header, manifest)) if manifest is not None else None


def _unit(header: InstanceHeader, manifest: Manifest | None, fallback: str) -> str:
    """Whose image this is: the manifest's pseudonymous patient, else the header's PatientID, else `fallback`."""
    patient = manifest.patients.get(_key_value(header, manifest)) if manifest is not None else None
    return f"patient:{patient}" if patient else header.unit(fallback)


def _is_image(header: InstanceHeader) -> bool:
    return header.modality not in _MASK_MODALITIES


def _load_2d(site: SiteImages, site_reader: SiteReader, manifest: Manifest | None, decode_all: bool) -> None:
    labels = []
    if decode_all:
        # Counted as readable, never trained on twice.
        site.readable.update((h.path, len(f)) for h in site.index.duplicates  # type: ignore[union-attr]
                             if (f := site_reader.frames(h)) is not None)
    for header in site.index.instances:  # type: ignore[union-attr]
        label = _label(header, manifest) if _is_image(header) else None
        if label is None and not decode_all:
            site.unlabelled += header.frames if _is_image(header) else 0
            continue
        frames = site_reader.frames(header)
        if frames is None:
            continue
        site.readable[header.path] = len(frames)
        if label is None:
            site.unlabelled += len(frames) if _is_image(header) else 0
            continue
        spacing = header.pixel_spacing or (1.0, 1.0)
        site.matched.add(_key_value(header, manifest))
        for frame in frames:
            site.images.append(frame)
            site.uids.append(header.sop_uid)
            site.groups.append(_unit(header, manifest, _key_value(header, manifest)))
            site.spacings.append(spacing)
            labels.append(label)
    site.labels = np.asarray(labels, dtype=np.int64)


def _series_label(members: list[InstanceHeader], manifest: Manifest | None) -> tuple[str, int | None]:
    """A volume's (group, label): every labelled member must agree."""
    found = {(_key_value(h, manifest), _label(h, manifest)) for h in members if _label(h, manifest) is not None}
    labels = {label for _, label in found}
    if len(labels) > 1:
        rows = manifest.describe(sorted(key for key, _ in found)) if manifest else ""
        raise SiteDataError(
            f"label manifest {manifest.path if manifest else ''}: one series holds images labelled "
            f"{sorted(labels)} ({rows}); in 3D mode label whole series, or use input-mode 2d"
        )
    group = members[0].series_uid if manifest is None or manifest.key == "SOPInstanceUID" else _key_value(members[0], manifest)
    return group, (labels.pop() if labels else None)


def _load_3d(site: SiteImages, site_reader: SiteReader, manifest: Manifest | None, irregular: str, decode_all: bool) -> None:
    labels = []
    for members in site.index.series().values():  # type: ignore[union-attr]
        if not any(_is_image(h) for h in members):
            continue
        group, label = _series_label(members, manifest)
        if label is None and not decode_all:
            site.unlabelled += 1
            continue
        # Rows of an excluded series are accounted for: left out by the site's choice, not missing.
        site.matched.update(_key_value(h, manifest) for h in members)
        plan = plan_volume(series_slices(members), members[0].pixel_spacing, members[0].slice_thickness)
        if not plan.regular and (irregular == "exclude" or not plan.resamplable):
            site.excluded.append((members[0].path, "; ".join(plan.problems)))
            continue
        volume = _volume(site_reader, members, plan)
        if volume is None:
            continue
        site.readable.update((h.path, h.frames) for h in members)
        if label is None:
            site.unlabelled += 1
            continue
        site.images.append(volume)
        site.uids.append(members[0].series_uid)
        site.groups.append(_unit(members[0], manifest, group))
        site.spacings.append(plan.spacing)
        labels.append(label)
    site.labels = np.asarray(labels, dtype=np.int64)


def _volume(site_reader: SiteReader, members: list[InstanceHeader], plan: VolumePlan) -> np.ndarray | None:
    """Decode, stack (resampling an irregular plan) and preprocess one series; cached as one sample."""
    digests = [site_reader.known_digest(h) for h in members]
    cacheable = site_reader.cache is not None and site_reader.preprocess is not None
    if cacheable and all(digests):
        hit = site_reader.cache.get(_volume_key(digests, plan, site_reader.preprocess))  # type: ignore[union-attr, arg-type]
        if hit is not None:
            return hit
    decoded: dict[str, np.ndarray] = {}
    for header in members:
        try:
            raw, _ = site_reader.read(header.path)
            decoded[header.path] = site_reader.decode(raw)
        except Unusable as reason:
            site_reader.failures[header.path] = str(reason)
            return None
    volume, _ = stack_volume([decoded[s.path][s.frame] for s in plan.slices], plan)
    prepared = site_reader.preprocess(volume) if site_reader.preprocess is not None else volume
    if cacheable:
        digests = [site_reader.digests[h.path][2] for h in members]
        site_reader.pending[_volume_key(digests, plan, site_reader.preprocess)] = prepared  # type: ignore[arg-type]
    return prepared


def _volume_key(digests: list[str], plan: VolumePlan, preprocess: Preprocess) -> str:
    # The plan's problems are part of the key: a resampled volume differs from a plain stack.
    return sample_key(sorted(digests) + [repr(plan.problems)], preprocess.fingerprint)


def require_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise SiteDataError(f"data folder {folder} {state}: point the site at the folder that holds its DICOM files")
    return folder


def manifest_for(folder: Path, labels_csv: Path | None, label_key: str | None, patient_key: str = "",
                 classes: tuple[str, ...] = ()) -> Manifest:
    """The site's manifest: `labels_csv`, or labels.csv in the folder; `patient_key` names its patient
    column; `classes` are the run's class names, which its labels must be."""
    path = Path(labels_csv) if labels_csv is not None else Path(folder) / LABELS_FILENAME
    return read_manifest(path, key=label_key, patient_column=patient_key, classes=classes)


def load_site(
    folder: Path,
    manifest: Manifest | None,
    *,
    input_mode: str = "2d",
    irregular: str = "exclude",
    preprocess: Preprocess | None = None,
    cache_dir: Path | None = None,
    decode_all: bool = False,
    strict: bool = True,
    missing_images: str = "stop",
) -> SiteImages:
    """Index, decode and label a site folder. `decode_all` also decodes unlabelled images (to count them).

    Without a manifest every image is unlabelled. Manifest rows that match no readable image are
    listed in `missing`. With `strict`, raises SiteDataError for a folder without any DICOM image,
    and, when `missing_images` is "stop", for missing rows; with "report" the site's log names
    their rows and the other cases are used.
    """
    folder = Path(folder)
    if input_mode not in INPUT_MODES:
        raise SiteDataError(f"input-mode {input_mode!r} must be one of {', '.join(INPUT_MODES)}")
    if irregular not in IRREGULAR_CHOICES:
        raise SiteDataError(f"irregular-series {irregular!r} must be one of {', '.join(IRREGULAR_CHOICES)}")
    if input_mode == "3d" and preprocess is not None and preprocess.channels != 1:
        raise SiteDataError(f"in-channels = {preprocess.channels} with input-mode 3d: DICOM series are read as one "
                            "channel; give volumes of several channels as NIfTI (data-format = \"nifti\") or set "
                            "in-channels = 1")
    cache = DecodeCache(cache_dir) if cache_dir is not None else None
    site_reader = SiteReader(folder, preprocess, cache)
    exclude = (manifest.path,) if manifest is not None else ()
    if input_mode == "2d":
        def wanted(header: InstanceHeader) -> bool:
            return decode_all or _label(header, manifest) is not None

        index = index_site(folder, exclude, cache_dir, reader=lambda path, rel: site_reader.scan(path, rel, wanted))
    else:
        index = index_site(folder, exclude, cache_dir, reader=read_header)
    site = SiteImages(index=index)
    if input_mode == "2d":
        _load_2d(site, site_reader, manifest, decode_all)
    else:
        _load_3d(site, site_reader, manifest, irregular, decode_all)
    site_reader.finish()
    site.failures = sorted(site_reader.failures.items())
    # A copy that cannot be decoded is reported as unreadable, not as a duplicate.
    copies = [(h.path, DUPLICATE) for h in index.duplicates if h.path not in site_reader.failures]
    site.skipped = index.skipped + copies + site.failures
    if manifest is not None:
        site.missing = [value for value in manifest.labels if value not in site.matched]
    if strict:
        _check_complete(site, folder, manifest, missing_images)
    return site


def _check_complete(site: SiteImages, folder: Path, manifest: Manifest | None, missing_images: str) -> None:
    if not any(_is_image(h) for h in site.index.instances) and not site.readable:  # type: ignore[union-attr]
        raise SiteDataError(
            f"data folder {folder} holds no readable DICOM images ({len(site.skipped)} file(s) skipped): "
            "copy the site's DICOM export into it"
        )
    if site.missing and manifest is not None:
        # A silently shrunken site would hide a broken export: name the rows so they can be fixed.
        line = (f"{len(site.missing)} labelled {manifest.key} value(s) in {manifest.path} have no readable DICOM "
                f"image under {folder} ({manifest.describe(site.missing)}; {len(site.skipped)} file(s) were skipped "
                f"as unreadable{site.commonest_failure()}): fix those files or drop their rows from the manifest")
        if missing_images == "stop":
            raise SiteDataError(line + " (missing-images = \"stop\")")
        log.warning("%s; training on the other %d case(s)", line, len(site.images))


def read_site(
    folder: Path,
    labels_csv: Path | None = None,
    *,
    label_key: str | None = None,
    input_mode: str = "2d",
    irregular: str = "exclude",
) -> SiteImages:
    """Every labelled DICOM image under `folder` in physical units (HU for CT), joined to its label.

    The manifest is `labels_csv` (default folder/labels.csv), keyed by `label_key` or the column it
    holds. Unlabelled images are excluded and counted; unreadable files are listed with a reason.
    A manifest row with no readable image is an error.
    """
    folder = require_folder(folder)
    manifest = manifest_for(folder, labels_csv, label_key)
    return load_site(folder, manifest, input_mode=input_mode, irregular=irregular)
