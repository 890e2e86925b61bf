"""Synthetic segmentation sites: CT series of real DICOM slices, and one DICOM SEG per series.

Each series is a stack of axial CT-like slices (the classification demo's body, tissue, vessels,
scanner noise and stored-value encodings). A share of the series, different per site as in the
classification demo, holds a lesion: an ellipsoid over a few neighbouring slices. The SEG object
(Segmentation Storage, BINARY, 1-bit packed) has one frame per source slice, each frame naming its
source CT instance in its Derivation Image Sequence; frames are stored in reverse slice order, so a
reader that trusted frame order instead of the references would misplace every mask. Output is a
pure function of the seed. No real identities are written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage

from fedcare.errors import SiteDataError

from .demo_data import _SCANNERS, _case_dataset, _encode, _render, _Scanner, _uid, file_meta, write_sites

__all__ = ["write_demo_segmentation_sites", "SEGMENTATION_CASES", "SLICES_PER_SERIES"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SEGMENTATION_CASES = (200, 300, 500)  # slices per site; whole series of SLICES_PER_SERIES each
SLICES_PER_SERIES = 10
# The demo's sites hold 20 to 50 series, one patient each: too few for DP-SGD over patients to find a
# lesion (lesion Dice 0.06 at epsilon 8, measured), so the segmentation demo protects slices, and
# every report says that epsilon protects one image there.
SEGMENTATION_POLICY = {"privacy-unit": "image"}


def _lesion(rng: np.random.Generator, size: int) -> tuple[float, float, float, float, int, int]:
    """(x, y, radius in pixels, contrast in HU, first slice, last slice) of one ellipsoidal lesion."""
    scale = size / 64.0
    x, y = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size  # well inside the body's soft tissue
    first = int(rng.integers(1, SLICES_PER_SERIES - 6))  # five to seven of the series' ten slices
    return x, y, float(rng.uniform(4.5, 8.0) * scale), float(rng.uniform(140, 240)), first, first + int(rng.integers(4, 7))


def _slice_with_lesion(hu: np.ndarray, lesion: tuple | None, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Add the lesion's cross-section at slice `z` to `hu`; returns (HU, its binary mask)."""
    mask = np.zeros(hu.shape, dtype=bool)
    if lesion is None or not lesion[4] <= z <= lesion[5]:
        return hu, mask
    x, y, radius, contrast, first, last = lesion
    centre, half = (first + last) / 2, (last - first) / 2 + 0.5
    r = radius * np.sqrt(max(1.0 - ((z - centre) / half) ** 2, 0.15))  # ellipsoid cross-section
    yy, xx = np.mgrid[0:hu.shape[0], 0:hu.shape[1]]
    dist = np.hypot(xx - x, yy - y)
    mask = dist <= r
    # A logistic edge about a pixel wide, like partial-volume blurring; the mask is its half level.
    return hu + contrast / (1.0 + np.exp((dist - r) / 0.8)), mask


def _seg_dataset(ct: list[Dataset], masks: list[np.ndarray], uids: dict[str, str], scanner: _Scanner) -> Dataset:
    """A DICOM SEG of one series: one binary frame per source slice, in reverse slice order."""
    ds = Dataset()
    ds.file_meta = file_meta(SEGMENTATION_STORAGE, uids["sop"])
    first = ct[0]
    for keyword in ("SpecificCharacterSet", "StudyInstanceUID", "StudyDate", "StudyID", "AccessionNumber",
                    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientIdentityRemoved",
                    "DeidentificationMethod", "ReferringPhysicianName", "FrameOfReferenceUID"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.SOPClassUID, ds.SOPInstanceUID = SEGMENTATION_STORAGE, uids["sop"]
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "SEG", uids["series"], 100, 1
    ds.Manufacturer, ds.ContentDate, ds.ContentTime = "fedcare demo", first.StudyDate, "120000"
    ds.ContentLabel, ds.ContentCreatorName, ds.ImageType = "LESION", "", ["DERIVED", "PRIMARY"]
    ds.SegmentationType, ds.SamplesPerPixel, ds.PhotometricInterpretation = "BINARY", 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.Rows, ds.Columns = first.Rows, first.Columns
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = 1, "lesion", "MANUAL"
    ds.SegmentSequence = DicomSequence([segment])
    referenced = Dataset()
    referenced.SeriesInstanceUID = first.SeriesInstanceUID
    referenced.ReferencedInstanceSequence = DicomSequence([_sop_reference(c) for c in ct])
    ds.ReferencedSeriesSequence = DicomSequence([referenced])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = DicomSequence([measures]), DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    order = list(reversed(range(len(ct))))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_frame_group(ct[i]) for i in order])
    ds.NumberOfFrames = len(order)
    ds.PixelData = pack_bits(np.stack([masks[i] for i in order]).astype(np.uint8))
    return ds


def _sop_reference(ct: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, ct.SOPInstanceUID
    return item


def _frame_group(ct: Dataset) -> Dataset:
    source = _sop_reference(ct)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "121322", "DCM", "Source image for image processing operation"
    source.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    derivation = Dataset()
    derivation.SourceImageSequence = DicomSequence([source])
    position, ident, content = Dataset(), Dataset(), Dataset()
    position.ImagePositionPatient = ct.ImagePositionPatient
    ident.ReferencedSegmentNumber = 1
    content.DimensionIndexValues = [1, int(ct.InstanceNumber)]
    group = Dataset()
    group.DerivationImageSequence = DicomSequence([derivation])
    group.PlanePositionSequence = DicomSequence([position])
    group.SegmentIdentificationSequence = DicomSequence([ident])
    group.FrameContentSequence = DicomSequence([content])
    return group


def _write_segmentation_site(folder: Path, site: int, n_slices: int, seed: int, image_size: int) -> None:
    scanner = _SCANNERS[site % len(_SCANNERS)]
    rng = np.random.default_rng([seed, site, 1])
    n_series = n_slices // SLICES_PER_SERIES
    with_lesion = np.zeros(n_series, dtype=bool)
    # Every site keeps series with and without a lesion, in its scanner profile's proportion.
    with_lesion[rng.permutation(n_series)[:min(max(int(round(n_series * scanner.positive_rate)), 1), n_series - 1)]] = True
    for study in range(n_series):
        lesion = _lesion(rng, image_size) if with_lesion[study] else None
        uids = {kind: _uid(seed, site, f"seg-{kind}", study) for kind in ("study", "series", "frame")}
        series = folder / f"series-{study:03d}"
        series.mkdir(parents=True)
        slices, masks = [], []
        for z in range(SLICES_PER_SERIES):
            case = study * SLICES_PER_SERIES + z
            hu, mask = _slice_with_lesion(_render(rng, image_size, scanner, label=0), lesion, z)
            ds = _case_dataset(site, study, z, scanner, _encode(hu, scanner), {**uids, "sop": _uid(seed, site, "seg-sop", case)})
            dcmwrite(series / f"CT{z + 1:03d}.dcm", ds, enforce_file_format=True)
            slices.append(ds)
            masks.append(mask)
        seg_uids = {"sop": _uid(seed, site, "seg-object", study), "series": _uid(seed, site, "seg-series", study)}
        dcmwrite(series / "SEG.dcm", _seg_dataset(slices, masks, seg_uids, scanner),
                 enforce_file_format=True)


def write_demo_segmentation_sites(
    out: Path, sites: int = 3, seed: int = 0, cases: Sequence[int] | None = None, image_size: int = 64,
    *, overwrite: bool = False, budgets: Mapping[str, float] | None = None, policy: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write `out/site-0 ...`: per site, CT series and a DICOM SEG for each; `cases` counts slices.

    Every site gets DEMO_BUDGET as its lifetime epsilon unless `budgets` names it.

    Slice counts are rounded down to whole series of SLICES_PER_SERIES, and each site needs two
    series at least (one with a lesion, one without). Sites are written atomically as in the
    classification demo.
    """
    counts = [SEGMENTATION_CASES[i % len(SEGMENTATION_CASES)] for i in range(sites)] if cases is None else list(cases)
    if sites >= 1 and len(counts) == sites and min(counts) < 2 * SLICES_PER_SERIES:
        raise SiteDataError(f"segmentation demo data: every site needs at least {2 * SLICES_PER_SERIES} slices "
                            f"(two series), got cases={counts}")
    return write_sites(out, sites, counts, seed, image_size, _write_segmentation_site, overwrite=overwrite,
                       budgets=budgets or {}, policy=SEGMENTATION_POLICY | dict(policy or {}))
