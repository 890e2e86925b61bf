"""Segmentation masks from DICOM SEG objects, matched to their source images by referenced UIDs.

A SEG stores one frame per (segment, source plane). Each frame names its source instance (and
frame) in the Derivation Image Sequence; when a writer left that out, the frame's position along
the slice normal finds the plane instead. The result is a label map aligned with a series volume:
0 for background, the segment number elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from fedcare.errors import SiteDataError

from .decode import quiet, read_file
from .headers import Elements, InstanceHeader, Unusable
from .index import SiteIndex
from .volumes import VolumePlan, slice_normal

__all__ = ["Segmentation", "read_segmentation", "label_volume", "segmentations_by_series"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_POSITION_TOLERANCE_MM = 0.1


@dataclass
class Segmentation:
    """One SEG object: its frames as masks, and for each frame the segment and the source plane."""

    masks: np.ndarray  # [F, H, W] bool
    segment_numbers: list[int]
    sources: list[tuple[str, int] | None]  # (source SOPInstanceUID, source frame index) per frame
    positions: list[tuple[float, float, float] | None]
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    referenced_series: tuple[str, ...]
    segment_count: int


def _frame_source(item: Elements) -> tuple[str, int] | None:
    derivation = item.first("DerivationImageSequence")
    source = derivation.first("SourceImageSequence") if derivation is not None else None
    if source is None or not source.text("ReferencedSOPInstanceUID"):
        return None
    frame = source.number("ReferencedFrameNumber")
    return source.text("ReferencedSOPInstanceUID"), int(frame) - 1 if frame else 0


def _frame_segment(item: Elements) -> int:
    ident = item.first("SegmentIdentificationSequence")
    return int(ident.number("ReferencedSegmentNumber") or 1) if ident is not None else 1


def _plane(item: Elements, macro: str, keyword: str) -> tuple[float, ...] | None:
    found = item.first(macro)
    return found.numbers(keyword) if found is not None else None


def segmentation_from_dataset(ds: Dataset, masks: np.ndarray) -> Segmentation:
    """Frame-by-frame references and geometry of a parsed SEG whose decoded frames are `masks`."""
    el = Elements(ds)
    if el.text("SOPClassUID") != SEGMENTATION_STORAGE:
        raise SiteDataError("not a DICOM SEG object (SOPClassUID is not Segmentation Storage): pass a SEG file")
    shared = el.first("SharedFunctionalGroupsSequence")
    frames = el.items("PerFrameFunctionalGroupsSequence")
    spacing = _plane(shared, "PixelMeasuresSequence", "PixelSpacing") if shared is not None else None
    orientation = _plane(shared, "PlaneOrientationSequence", "ImageOrientationPatient") if shared is not None else None
    if orientation is None and frames:
        orientation = _plane(frames[0], "PlaneOrientationSequence", "ImageOrientationPatient")
    # Fractional SEGs store probabilities or occupancy up to MaximumFractionalValue; half is "inside".
    threshold = 0.5 * float(el.number("MaximumFractionalValue") or 1) if el.text("SegmentationType") == "FRACTIONAL" else 0.5
    return Segmentation(
        masks=masks > threshold,
        segment_numbers=[_frame_segment(item) for item in frames] or [1] * len(masks),
        sources=[_frame_source(item) for item in frames] or [None] * len(masks),
        positions=[_plane(item, "PlanePositionSequence", "ImagePositionPatient") for item in frames] or [None] * len(masks),
        orientation=tuple(orientation) if orientation else None,
        pixel_spacing=tuple(spacing[:2]) if spacing else None,
        referenced_series=tuple(item.text("SeriesInstanceUID") for item in el.items("ReferencedSeriesSequence")),
        segment_count=len(el.items("SegmentSequence")),
    )


def read_segmentation(path: Path) -> Segmentation:
    """Read and decode a DICOM SEG file (binary or fractional)."""
    try:
        ds, masks = read_file(Path(path))
    except Unusable as reason:
        raise SiteDataError(f"segmentation {path}: {reason}; re-export it") from None
    with quiet():
        return segmentation_from_dataset(ds, masks)


def label_volume(seg: Segmentation, plan: VolumePlan, headers: list[InstanceHeader]) -> np.ndarray:
    """A [Z, H, W] uint8 label map for the volume `plan` describes (0: background, n: segment n).

    Frames are placed by their source instance, else by position along the slice normal; a frame
    that fits no plane of the volume is an error, since it would silently lose a label.
    """
    sop_of = {h.path: h.sop_uid for h in headers}
    plane_of = {(sop_of[s.path], s.frame): z for z, s in enumerate(plan.slices)}
    shape = (len(plan.slices), *seg.masks.shape[1:])
    labels = np.zeros(shape, dtype=np.uint8)
    orientation = plan.slices[0].orientation if plan.slices else None
    normal = slice_normal(orientation) if orientation is not None else None
    for i, mask in enumerate(seg.masks):
        z = plane_of.get(seg.sources[i]) if seg.sources[i] is not None else None
        if z is None and seg.positions[i] is not None and normal is not None:
            distance = np.abs(plan.offsets - float(np.dot(seg.positions[i], normal)))
            z = int(np.argmin(distance)) if distance.min() <= _POSITION_TOLERANCE_MM else None
        if z is None:
            raise SiteDataError(f"segmentation frame {i + 1} matches no slice of its series: check that the SEG "
                                "was made from this series")
        if mask.shape != shape[1:]:
            raise SiteDataError(f"segmentation frame {i + 1} is {mask.shape}, the series is {shape[1:]}")
        labels[z][mask] = seg.segment_numbers[i]
    return labels


def segmentations_by_series(index: SiteIndex) -> dict[str, list[InstanceHeader]]:
    """The SEG instances of a site, grouped by the series they were made from."""
    found: dict[str, list[InstanceHeader]] = {}
    for header in index.instances:
        if header.sop_class == SEGMENTATION_STORAGE:
            for series in header.referenced_series:
                found.setdefault(series, []).append(header)
    return found
