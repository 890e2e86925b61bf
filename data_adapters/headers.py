"""Read one DICOM file's header, never its pixel data, into an `InstanceHeader`.

The header says everything the site needs to plan its data: which study and series an instance
belongs to, its geometry, how its pixels are encoded and whether a decoder for them is installed.
Files that cannot be used raise `Unusable` with a reason for the site operator; the reason never
quotes a header value. Common files are walked by fastparse.py; the others are parsed by pydicom,
keeping only the elements an index reads, from the first 64 KiB when the header fits there.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .elements import Elements, mask, tag_and_vr
from .fastparse import fast_parse

__all__ = ["InstanceHeader", "Unusable", "read_header", "IDENTIFYING_KEYWORDS", "MEDIA_DIRECTORY"]

NOT_DICOM = "not a DICOM file"
UNREADABLE = "unreadable DICOM (corrupt header)"
CANNOT_OPEN = "cannot open file (permissions or I/O error)"
NO_UID = "no SOPInstanceUID"
MEDIA_DIRECTORY = "DICOMDIR (a media index, not an image)"
_DIRECTORY_CLASS = "1.2.840.10008.1.3.10"
_DIRECTORY_MARKER = "OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity"
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Most headers end well before this; longer ones are re-read from the file.
_HEAD_BYTES = 64 * 1024
# Preamble-less DICOM (older exports) usually starts with a group 0x0008 or 0x0002 element.
_RAW_DICOM_STARTS = (b"\x08\x00", b"\x02\x00", b"\x00\x08")
_RAW_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# Attributes that name or identify a patient or staff member: filled in, they suggest the export
# was not de-identified (DICOM PS3.15 basic profile).
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "InstitutionAddress",
)
# The top-level elements an index reads; the readers skip all others without building them.
# Nested items of these sequences are read whole.
_INDEXED_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "Modality", "Manufacturer", "AccessionNumber", "PatientIdentityRemoved", "InstanceNumber",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "PixelSpacing", "SliceThickness", "ImageOrientationPatient", "ImagePositionPatient",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence",
    _DIRECTORY_MARKER, *IDENTIFYING_KEYWORDS,
)


class Unusable(Exception):
    """A file that is left out, with the reason shown to the site operator."""


@dataclass(frozen=True)
class InstanceHeader:
    """What the site needs to know about one instance. Strings stay on the site: never log them."""

    path: str  # relative to the site folder, with '/' separators
    size: int
    mtime_ns: int
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    modality: str
    manufacturer: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    photometric: str
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    slice_thickness: float | None
    orientation: tuple[float, ...] | None  # six direction cosines: row then column
    positions: tuple[tuple[float, float, float], ...]  # one per frame, () when unknown
    instance_number: int | None
    accession: str
    referenced_series: tuple[str, ...]  # series a derived object (SEG) was made from
    identifying: tuple[tuple[str, str], ...]  # (keyword, masked value) of filled identifying tags
    deidentified: bool  # PatientIdentityRemoved is YES
    patient_id: str = ""  # PatientID: which images are one patient's (never leaves the site)

    def unit(self, fallback: str) -> str:
        """The key that keeps one patient's images together: PatientID, else `fallback` (a series or instance)."""
        return f"patient:{self.patient_id}" if self.patient_id else f"unit:{fallback}"

    def to_row(self) -> list[Any]:
        return [getattr(self, name) for name in self.__dataclass_fields__]

    @classmethod
    def from_row(cls, row: list[Any]) -> "InstanceHeader":
        """Inverse of `to_row` after a JSON round trip, which turns tuples into lists."""
        values = dict(zip(cls.__dataclass_fields__, row))
        for name in ("pixel_spacing", "orientation"):
            if values[name] is not None:
                values[name] = tuple(values[name])
        values["positions"] = tuple(tuple(p) for p in values["positions"])
        values["referenced_series"] = tuple(values["referenced_series"])
        values["identifying"] = tuple(tuple(pair) for pair in values["identifying"])
        return cls(**values)


def _functional(el: Elements, macro: str, keyword: str, first_frame: Elements | None) -> tuple[float, ...] | None:
    """A functional-group value: shared by all frames, else taken from the first frame."""
    for root in (el.first("SharedFunctionalGroupsSequence"), first_frame):
        item = root.first(macro) if root is not None else None
        values = item.numbers(keyword) if item is not None else None
        if values is not None:
            return values
    return el.numbers(keyword)


def _geometry(el: Elements, frames: int) -> tuple[Any, Any, Any, tuple]:
    """(pixel spacing, slice thickness, orientation, per-frame positions) of classic or enhanced objects."""
    frame_items = el.items("PerFrameFunctionalGroupsSequence")
    first_frame = frame_items[0] if frame_items else None
    spacing = _functional(el, "PixelMeasuresSequence", "PixelSpacing", first_frame)
    thickness = _functional(el, "PixelMeasuresSequence", "SliceThickness", first_frame)
    orientation = _functional(el, "PlaneOrientationSequence", "ImageOrientationPatient", first_frame)
    positions: list[tuple[float, ...] | None] = []
    if frame_items:
        for item in frame_items:
            plane = item.first("PlanePositionSequence")
            positions.append(plane.numbers("ImagePositionPatient") if plane is not None else None)
    elif frames == 1:
        positions = [el.numbers("ImagePositionPatient")]
    usable = bool(positions) and len(positions) == frames and all(p is not None and len(p) == 3 for p in positions)
    return (
        tuple(spacing[:2]) if spacing and len(spacing) >= 2 else None,
        thickness[0] if thickness else None,
        tuple(orientation) if orientation and len(orientation) == 6 else None,
        tuple(tuple(p) for p in positions) if usable else (),  # type: ignore[arg-type]
    )


def _identifying(el: Elements) -> tuple[tuple[str, str], ...]:
    found = []
    for keyword in IDENTIFYING_KEYWORDS:
        value = el.value(keyword)
        if isinstance(value, (list, pydicom.Sequence)):
            shown = "[sequence]" if len(value) else ""
        else:
            shown = mask(str(value)) if value is not None else ""
        if shown:
            found.append((keyword, shown))
    return tuple(found)


@lru_cache(maxsize=None)
def decoder_problem(transfer_syntax: str) -> str | None:
    """Why no installed plugin can decode this transfer syntax, or None when one can."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        return f"unknown transfer syntax {transfer_syntax[:64]}"
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if available:
        return None
    return f"no installed decoder for {uid.name} (install pylibjpeg with its libjpeg, openjpeg and rle plugins)"


@lru_cache(maxsize=1)
def _indexed_tag_set() -> frozenset[int]:
    return frozenset(_indexed_tags())


@lru_cache(maxsize=1)
def _indexed_tags() -> list[int]:
    # Plain ints: pydicom's membership test is then a C-level set lookup.
    return [int(tag_and_vr(keyword)[0]) for keyword in _INDEXED_KEYWORDS]


def parse(source: Any, stop_at_pixels: bool) -> tuple[Dataset, tuple[int, int] | None]:
    """Parse a file object; returns the dataset and (pixel tag, value length) when it has pixel data.

    With `stop_at_pixels`, parsing stops before the pixel data and keeps only the indexed
    elements (a header index); otherwise the whole file is read.
    """
    found: list[tuple[int, int]] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            found.append((int(tag), length))
            return True
        return False

    options: dict[str, Any] = {"stop_when": at_pixels, "specific_tags": _indexed_tags()} if stop_at_pixels else {}
    try:
        ds = read_partial(source, **options)
    except pydicom.errors.InvalidDicomError:
        source.seek(0)
        if source.read(2) not in _RAW_DICOM_STARTS:
            raise Unusable(NOT_DICOM) from None
        source.seek(0)
        found.clear()
        try:
            ds = read_partial(source, force=True, **options)
            recognised = "SOPClassUID" in ds or "SOPInstanceUID" in ds  # a forced parse of junk has neither
        except Exception:
            recognised = False
        if not recognised:
            raise Unusable(NOT_DICOM) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        # Without file meta the pixel decoder needs the encoding the parser detected.
        implicit_vr, little_endian = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = _RAW_SYNTAX.get((implicit_vr, little_endian), ExplicitVRLittleEndian)
    if not stop_at_pixels:
        found = [(tag, _declared_length(elem)) for tag, elem in ds._dict.items() if tag in _PIXEL_TAGS][:1]
    return ds, (found[0] if found else None)


def _declared_length(elem: Any) -> int:
    length = getattr(elem, "length", None)
    return int(length) if length is not None else len(elem.value or b"")


def pixel_bytes_read(ds: Dataset) -> int | None:
    """How many pixel data bytes a full parse actually found: fewer than declared means truncated."""
    for tag, elem in ds._dict.items():
        if tag in _PIXEL_TAGS:
            return len(elem.value) if isinstance(elem.value, (bytes, bytearray)) else None
    return None


def _pixel_problem(
    el: Elements, syntax: str, pixels: tuple[int, int] | None, remaining: int | None, frames: int
) -> str | None:
    """Why the pixel data cannot be used, judged from the header and the file size alone."""
    if pixels is None:
        name = UID(el.text("SOPClassUID")).name
        return f"no pixel data ({name})" if name else "no pixel data"
    problem = decoder_problem(syntax)
    if problem:
        return problem
    tag, length = pixels
    if length == 0xFFFFFFFF or remaining is None or syntax == DeflatedExplicitVRLittleEndian:
        # Encapsulated, fully read, or inflated on the fly: only decoding can tell what is missing.
        return None
    if length > remaining:
        return f"unreadable DICOM (truncated: pixel data ends {length - remaining} bytes early)"
    bits = int(el.number("BitsAllocated") or 0)
    samples = int(el.number("SamplesPerPixel") or 1)
    expected = int(el.number("Rows") or 0) * int(el.number("Columns") or 0) * samples * frames * bits // 8
    # YBR_FULL_422 stores two samples per pixel pair, so its native size is 2/3 of the RGB size.
    if tag == 0x7FE00010 and length < expected and el.text("PhotometricInterpretation") != "YBR_FULL_422":
        return f"unreadable DICOM (pixel data holds {length} of {expected} bytes)"
    return None


def _with_header(fh: Any, head: bytes, size: int) -> tuple[Dataset, tuple[int, int] | None, int]:
    """Parse the file's first bytes `head` with pydicom, and the whole file only when the header is longer.

    Returns the dataset, (pixel tag, value length) and the bytes left after the pixel element's header.
    """
    source: Any = io.BytesIO(head)
    try:
        ds, pixels = parse(source, stop_at_pixels=True)
        complete = pixels is not None or size <= len(head)
    except Unusable:
        raise
    except Exception:
        if size <= len(head):
            raise
        complete = False
    if not complete:
        fh.seek(0)
        source = fh
        ds, pixels = parse(fh, stop_at_pixels=True)
    implicit_vr = ds.original_encoding[0]
    element_header = 8 if implicit_vr else 12  # pixel VRs (OB, OW, OF, OD) have 32-bit lengths
    return ds, pixels, size - source.tell() - element_header


def header_from_dataset(
    ds: Dataset, relative: str, stat: os.stat_result, pixels: tuple[int, int] | None, remaining: int | None
) -> InstanceHeader | None:
    """`header_from_elements` of a dataset parsed by pydicom."""
    return header_from_elements(Elements(ds), Elements(ds.file_meta), relative, stat, pixels, remaining)


def header_from_elements(
    el: Elements, meta: Elements, relative: str, stat: os.stat_result,
    pixels: tuple[int, int] | None, remaining: int | None,
) -> InstanceHeader | None:
    """The header record of a file's elements; None for a DICOMDIR; raises Unusable for non-images.

    `pixels` is (pixel tag, declared length) and `remaining` what the file holds after the pixel
    element's header (None when unknown).
    """
    if meta.text("MediaStorageSOPClassUID") == _DIRECTORY_CLASS or el.value(_DIRECTORY_MARKER) is not None:
        return None
    sop_uid = el.text("SOPInstanceUID")
    if not sop_uid:
        raise Unusable(NO_UID)
    if el.value("NumberOfFrames") not in (None, "") and el.number("NumberOfFrames") is None:
        raise Unusable("unreadable DICOM (NumberOfFrames is not a number)")
    frames = max(int(el.number("NumberOfFrames") or 1), 1)
    syntax = meta.text("TransferSyntaxUID")
    problem = _pixel_problem(el, syntax, pixels, remaining, frames)
    if problem:
        raise Unusable(problem)
    spacing, thickness, orientation, positions = _geometry(el, frames)
    referenced = (item.text("SeriesInstanceUID") for item in el.items("ReferencedSeriesSequence"))
    instance_number = el.number("InstanceNumber")
    return InstanceHeader(
        path=relative, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        sop_uid=sop_uid, study_uid=el.text("StudyInstanceUID"), series_uid=el.text("SeriesInstanceUID"),
        sop_class=el.text("SOPClassUID"), modality=el.text("Modality") or "OT",
        manufacturer=el.text("Manufacturer") or "unknown", transfer_syntax=syntax,
        rows=int(el.number("Rows") or 0), columns=int(el.number("Columns") or 0), frames=frames,
        samples_per_pixel=int(el.number("SamplesPerPixel") or 1),
        photometric=el.text("PhotometricInterpretation"),
        pixel_spacing=spacing, slice_thickness=thickness, orientation=orientation, positions=positions,
        instance_number=int(instance_number) if instance_number is not None else None,
        accession=el.text("AccessionNumber"), referenced_series=tuple(r for r in referenced if r),
        identifying=_identifying(el), deidentified=el.text("PatientIdentityRemoved").upper() == "YES",
        patient_id=el.text("PatientID"),
    )


def read_header(path: Path, relative: str) -> InstanceHeader | None:
    """Header of one file without reading its pixel data; None for a DICOMDIR.

    Raises Unusable (with the reason) for files that are not DICOM images this site can decode.
    """
    with warnings.catch_warnings():
        # pydicom's warnings can quote element values, which may identify a patient.
        warnings.simplefilter("ignore")
        try:
            with open(path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                head = fh.read(_HEAD_BYTES)
                fast = fast_parse(head, _indexed_tag_set(), complete=stat.st_size <= len(head))
                if fast is not None:
                    remaining = stat.st_size - fast.pixel_offset
                    return header_from_elements(fast.elements, fast.meta, relative, stat, fast.pixels, remaining)
                ds, pixels, remaining = _with_header(fh, head, stat.st_size)
                return header_from_dataset(ds, relative, stat, pixels, remaining)
        except Unusable:
            raise
        except OSError:
            raise Unusable(CANNOT_OPEN) from None
        except Exception:
            raise Unusable(UNREADABLE) from None
