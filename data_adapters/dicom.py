"""Read one site's DICOM folder into 2D Hounsfield-unit images joined to their labels.

Files are found by content, not by name: every file under the folder is tried with pydicom.
Files that are not DICOM or cannot be decoded are skipped and counted with a reason, never fatal.
Header strings (names, IDs, dates) are patient data: nothing here logs or prints them, and
pydicom's own warnings, which can quote element values, are silenced while reading.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedcare.errors import SiteDataError

from .labels import LABELS_FILENAME, read_labels

__all__ = ["SiteImages", "read_site"]

NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable DICOM (truncated or corrupt)"
CANNOT_OPEN = "cannot open file (permissions or I/O error)"
NO_PIXELS = "no pixel data"
NO_UID = "no SOPInstanceUID"
MULTI_FRAME = "multi-frame (not supported in 2D classification)"
NOT_GRAYSCALE = "not a grayscale image (only single-sample images are supported)"
DUPLICATE = "duplicate SOPInstanceUID (the same instance is stored twice)"
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
# Preamble-less DICOM (older exports) usually starts with a group 0x0008 or 0x0002 element.
_RAW_DICOM_STARTS = (b"\x08\x00", b"\x02\x00")
_RAW_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


@dataclass
class SiteImages:
    """A site's labelled images. `uids` stay on the site: never log or send them."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    uids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: int = 0

    def __len__(self) -> int:
        return len(self.images)


class _Skip(Exception):
    """A file that is left out, with the reason shown to the site operator."""


def _dcmread(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except OSError:
        raise _Skip(CANNOT_OPEN) from None
    except pydicom.errors.InvalidDicomError:
        with open(path, "rb") as fh:
            if fh.read(2) not in _RAW_DICOM_STARTS:
                raise _Skip(NOT_DICOM) from None
        try:
            ds = pydicom.dcmread(path, force=True)
            _ = ds.SOPInstanceUID, ds.Rows  # a forced parse of junk rarely survives this
            if "TransferSyntaxUID" not in ds.file_meta:
                # Without file meta the pixel decoder needs the encoding the parser detected.
                implicit_vr, little_endian = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = _RAW_SYNTAX[(implicit_vr, little_endian)]
            return ds
        except Exception:
            raise _Skip(NOT_DICOM) from None
    except Exception:
        raise _Skip(UNREADABLE) from None


def _rescale(ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) from the image or, for enhanced objects, its functional groups."""
    candidates = [ds]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(group) or []:
            candidates.extend(item.get("PixelValueTransformationSequence") or [])
            break  # one frame only: multi-frame objects are skipped anyway
    for item in candidates:
        if "RescaleSlope" in item and "RescaleIntercept" in item:
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return None


def _to_hu(ds: Dataset) -> np.ndarray:
    """Decode the pixels and map stored values to physical units (HU for CT) as float32."""
    raw = ds.pixel_array
    rescale = _rescale(ds)
    if rescale is not None:
        slope, intercept = rescale
        return raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _check_header(ds: Dataset) -> str | None:
    """The instance's SOPInstanceUID, or None for a DICOMDIR index stored under another name."""
    meta = getattr(ds, "file_meta", None)
    media_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    if media_class == _MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
        return None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Skip(NO_PIXELS)
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:
        raise _Skip(NO_UID)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise _Skip(MULTI_FRAME)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _Skip(NOT_GRAYSCALE)
    return uid


def _load(path: Path) -> tuple[str, np.ndarray] | None:
    """(SOPInstanceUID, HU image) for a usable file, None for files to ignore silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _dcmread(path)
        try:
            uid = _check_header(ds)
        except _Skip:
            raise
        except Exception:
            raise _Skip(UNREADABLE) from None
        if uid is None:
            return None
        try:
            image = _to_hu(ds)
        except Exception as exc:
            # Decoder messages describe the pixel format (and missing plugins), not the patient.
            detail = (str(exc).splitlines() or [""])[0][:160]
            raise _Skip(f"cannot decode pixel data: {type(exc).__name__}: {detail}") from None
    if image.ndim != 2:
        raise _Skip(NOT_GRAYSCALE)
    return uid, image


def _candidate_files(folder: Path, manifest: Path) -> list[Path]:
    skip = {manifest.resolve()}
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()  # deterministic order, so the same folder gives the same split
        for name in sorted(files):
            path = Path(root, name)
            if name.upper() == "DICOMDIR" or name == LABELS_FILENAME or path.resolve() in skip:
                continue
            found.append(path)
    return found


def read_site(folder: Path, labels_csv: Path | None = None) -> SiteImages:
    """Read every DICOM image under `folder` and join it to `labels_csv` (default folder/labels.csv).

    Unlabelled instances are excluded and counted; unreadable files are skipped and listed with
    a reason. A labelled instance with no readable file is an error, because training on a
    silently shrunken site would hide a broken export.
    """
    folder = Path(folder)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise SiteDataError(f"data folder {folder} {state}: point the site at the folder that holds its DICOM files")
    manifest = Path(labels_csv) if labels_csv is not None else folder / LABELS_FILENAME
    wanted = read_labels(manifest)

    site = SiteImages()
    labels: list[int] = []
    seen: set[str] = set()
    for path in _candidate_files(folder, manifest):
        relative = str(path.relative_to(folder))
        try:
            loaded = _load(path)
        except _Skip as skip:
            site.skipped.append((relative, str(skip)))
            continue
        if loaded is None:
            continue
        uid, image = loaded
        if uid in seen:
            site.skipped.append((relative, DUPLICATE))
            continue
        seen.add(uid)
        if uid not in wanted:
            site.unlabelled += 1
        else:
            site.uids.append(uid)
            site.images.append(image)
            labels.append(wanted[uid])

    if not seen:
        raise SiteDataError(
            f"data folder {folder} holds no readable DICOM images ({len(site.skipped)} file(s) skipped): "
            "copy the site's DICOM export into it"
        )
    found = set(site.uids)
    missing = [uid for uid in wanted if uid not in found]
    if missing:
        raise SiteDataError(
            f"{len(missing)} labelled SOPInstanceUID(s) in {manifest} have no readable DICOM file under {folder} "
            f"(first: {missing[0]}; {len(site.skipped)} file(s) were skipped as unreadable): "
            "restore those files or remove their rows from the manifest"
        )
    site.labels = np.asarray(labels, dtype=np.int64)
    return site
