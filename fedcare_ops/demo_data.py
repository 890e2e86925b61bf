"""Synthetic CT sites for demos and tests: one folder of real DICOM files per simulated hospital.

Every case is a 2D CT-like slice in Hounsfield units (body ellipse, fat rim, soft-tissue texture,
a few small vessels); label 1 cases also hold a lesion-like blob. With more classes (`classes`),
label 2 cases hold a hypodense (darker) lesion and label 3 cases calcifications (small, very bright). Sites differ the way real
scanners do (stored-value encoding, noise, pixel spacing, vendor, class balance, file naming), so
the reader and the federated training see realistic heterogeneity. Output is a pure function of
the seed: the same seed gives byte-identical files. No real identities are written.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedcare.errors import SiteDataError
from fedcare.sites import write_site_settings

__all__ = ["write_demo_sites", "DEFAULT_CASES"]

DEFAULT_CASES = (120, 300, 600)
MAX_CLASSES = 4
# Each demo site's own lifetime epsilon: site-0's is small on purpose, so the demo shows a site that
# refuses the round that would overspend it while the federation goes on with the others.
DEMO_BUDGET = 10.0
DEMO_BUDGETS: Mapping[str, float] = {"site-0": 6.0}
# Each demo patient has one study of one series; the series lengths cycle through these, so patients
# hold different numbers of images (one to three) and patient-level DP-SGD has patients to sample.
_SERIES_LENGTHS = (2, 1, 3, 1, 2, 1)


def _study_of(case: int) -> tuple[int, int]:
    """(study, index within it) of a case: studies, one per patient, of the cycling series lengths."""
    cycle, offset = divmod(case, sum(_SERIES_LENGTHS))
    study = cycle * len(_SERIES_LENGTHS)
    for length in _SERIES_LENGTHS:
        if offset < length:
            return study, offset
        offset -= length
        study += 1
    raise AssertionError("unreachable: offset lies within one cycle")
# Beside the site folders demo-data writes (never inside them, where it would be one more file of the
# site): their names, one a line. `fedcare run --fresh-sites` clears the state of those sites only.
DEMO_MARKER = ".fedcare-demo-sites"


@dataclass(frozen=True)
class _Scanner:
    manufacturer: str
    model: str
    slope: float
    intercept: float
    signed: bool
    bits_stored: int
    noise_hu: float
    spacing_mm: float
    thickness_mm: float
    positive_rate: float
    hu_offset: float
    layout: int


# Sites beyond the third reuse these profiles in turn.
_SCANNERS = (
    _Scanner("SIEMENS", "SOMATOM Definition AS", 1.0, -1024.0, False, 12, 8.0, 0.7, 1.0, 0.50, 0.0, 0),
    _Scanner("GE MEDICAL SYSTEMS", "LightSpeed VCT", 0.5, -1000.0, True, 16, 15.0, 0.8, 1.25, 0.35, 6.0, 1),
    _Scanner("Philips", "Brilliance 64", 1.0, -2048.0, False, 16, 25.0, 0.9, 2.0, 0.25, -8.0, 2),
)


def _uid(seed: int, site: int, kind: str, index: int) -> str:
    # generate_uid ignores entropy_srcs when prefix=None, so keep pydicom's root to stay deterministic.
    return str(generate_uid(entropy_srcs=[f"fedcare-demo|seed={seed}|site={site}|{kind}={index}"]))


def _relative_name(layout: int, study: int, instance: int, sop_uid: str) -> Path:
    # Three archive styles so the reader can never rely on names or extensions.
    if layout == 0:
        return Path(f"STUDY_{study + 1}", "SERIES_1", f"IM{instance:05d}")
    if layout == 1:
        return Path(f"CT.{sop_uid}.dcm")
    return Path("DICOM", f"ST{study:06d}", "SE000000", f"I{instance:07d}.DCM")


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """Unit-variance-ish noise that varies over ~size/cells pixels (bilinear upsampling)."""
    grid = rng.normal(size=(cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size)
    lo = np.minimum(pos.astype(int), cells - 1)
    frac = pos - lo
    rows = grid[lo] * (1 - frac)[:, None] + grid[lo + 1] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None, :] + rows[:, lo + 1] * frac[None, :]


def _render(rng: np.random.Generator, size: int, scanner: _Scanner, label: int) -> np.ndarray:
    """One slice in HU (float64) of a case of class `label` (0: no finding)."""
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = size / 2 + rng.uniform(-2, 2, size=2) * scale
    # Coarser pixel spacing shows the same patient smaller on the grid.
    a = min(size * rng.uniform(0.34, 0.42) * 0.8 / scanner.spacing_mm, 0.45 * size)
    b = a * rng.uniform(0.70, 0.85)
    r2 = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2

    img = np.full((size, size), -1000.0)
    img[r2 <= 1.0] = -90.0 + 10.0 * rng.normal()
    tissue = r2 <= rng.uniform(0.72, 0.82)
    img[tissue] = (40.0 + 12.0 * _smooth_field(rng, size))[tissue]

    def blob(x0: float, y0: float, radius: float, contrast: float, ratio: float) -> None:
        dist = np.sqrt((xx - x0) ** 2 + ((yy - y0) / ratio) ** 2)
        # A logistic edge about a pixel wide, like partial-volume blurring.
        img[:] += tissue * contrast / (1.0 + np.exp((dist - radius) / (0.8 * scale)))

    def inside_point(limit: float) -> tuple[float, float]:
        while True:
            x, y = rng.uniform(-1, 1, size=2)
            if x * x + y * y <= limit:
                return cx + x * a, cy + y * b

    # Vessels appear in both classes so that "any bright dot" is not the answer.
    for _ in range(rng.integers(0, 4)):
        blob(*inside_point(0.5), rng.uniform(1.0, 2.2) * scale, rng.uniform(40, 90), 1.0)
    if label == 1:
        blob(*inside_point(0.3), rng.uniform(4.0, 8.0) * scale, rng.uniform(60, 120), rng.uniform(0.75, 1.0))
    elif label == 2:
        blob(*inside_point(0.3), rng.uniform(5.0, 9.0) * scale, -rng.uniform(150, 250), rng.uniform(0.75, 1.0))
    elif label == 3:
        for _ in range(rng.integers(1, 4)):
            blob(*inside_point(0.3), rng.uniform(1.5, 2.5) * scale, rng.uniform(400, 700), 1.0)

    img += rng.normal(0.0, scanner.noise_hu, size=img.shape) + scanner.hu_offset
    return img


def _encode(hu: np.ndarray, scanner: _Scanner) -> np.ndarray:
    """HU -> stored values, clipped to what the site's pixel format can hold."""
    stored = np.rint((hu - scanner.intercept) / scanner.slope)
    if scanner.signed:
        lo, hi, dtype = -(2 ** (scanner.bits_stored - 1)), 2 ** (scanner.bits_stored - 1) - 1, np.int16
    else:
        lo, hi, dtype = 0, 2**scanner.bits_stored - 1, np.uint16
    return np.clip(stored, lo, hi).astype(dtype)


def file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    """Valid file meta for one demo instance, written little endian with explicit VRs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _case_dataset(site: int, study: int, in_study: int, scanner: _Scanner, pixels: np.ndarray,
                  uids: dict[str, str]) -> Dataset:
    """One CT instance: slice `in_study` of the one series of `study`, which is one patient's."""
    size = pixels.shape[0]
    ds = Dataset()
    ds.file_meta = file_meta(CTImageStorage, uids["sop"])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"2024{1 + study % 12:02d}{1 + study % 28:02d}"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = f"DEMO SITE {site}"
    ds.ReferringPhysicianName = ""
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = f"ANON^SITE{site}"
    ds.PatientID = f"DEMO-{site}-{study + 1:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic fedcare demo data"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = scanner.thickness_mm
    ds.KVP = 120
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = in_study + 1
    # Rounded so the DS strings stay short and identical across platforms.
    half = round(size * scanner.spacing_mm / 2, 3)
    z = round(-in_study * scanner.thickness_mm, 3)
    ds.ImagePositionPatient = [-half, -half, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [scanner.spacing_mm, scanner.spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = int(scanner.signed)
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = scanner.intercept
    ds.RescaleSlope = scanner.slope
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds


def _labels(rng: np.random.Generator, n_cases: int, positive_rate: float, classes: int) -> np.ndarray:
    """Class 0 for about 1 - positive_rate of the cases, the other classes sharing the rest in turn."""
    n_pos = int(round(n_cases * positive_rate))
    if n_cases >= 2:
        n_pos = min(max(n_pos, classes - 1), n_cases - 1)
    labels = np.zeros(n_cases, dtype=int)
    labels[rng.permutation(n_cases)[:n_pos]] = 1 + np.arange(n_pos) % (classes - 1)
    return labels


def _write_site(folder: Path, site: int, n_cases: int, seed: int, image_size: int, classes: int = 2) -> None:
    scanner = _SCANNERS[site % len(_SCANNERS)]
    rng = np.random.default_rng([seed, site])
    # More classes need more cases of findings: at least half the cases then hold one.
    labels = _labels(rng, n_cases, scanner.positive_rate if classes == 2 else max(scanner.positive_rate, 0.6),
                     classes)

    rows = ["SOPInstanceUID,label"]
    for case in range(n_cases):
        study, in_study = _study_of(case)
        uids = {
            "sop": _uid(seed, site, "sop", case),
            "study": _uid(seed, site, "study", study),
            "series": _uid(seed, site, "series", study),
            "frame": _uid(seed, site, "frame", study),
        }
        pixels = _encode(_render(rng, image_size, scanner, int(labels[case])), scanner)
        path = folder / _relative_name(scanner.layout, study, in_study + 1, uids["sop"])
        path.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(path, _case_dataset(site, study, in_study, scanner, pixels, uids), enforce_file_format=True)
        rows.append(f"{uids['sop']},{labels[case]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8", newline="")


def _case_counts(sites: int, cases: Sequence[int] | None) -> list[int]:
    if sites < 1:
        raise SiteDataError(f"demo data needs at least 1 site, got sites={sites}")
    if cases is None:
        return [DEFAULT_CASES[i % len(DEFAULT_CASES)] for i in range(sites)]
    counts = [int(c) for c in cases]
    if len(counts) != sites:
        raise SiteDataError(f"demo data: {len(counts)} case counts given for {sites} sites; give one count per site")
    if min(counts) < 1:
        raise SiteDataError(f"demo data: every site needs at least 1 case, got cases={counts}")
    return counts


def write_demo_sites(
    out: Path,
    sites: int = 3,
    seed: int = 0,
    cases: Sequence[int] | None = None,
    image_size: int = 64,
    *,
    overwrite: bool = False,
    budgets: Mapping[str, float] = DEMO_BUDGETS,
    policy: Mapping[str, Any] | None = None,
    classes: int = 2,
) -> list[Path]:
    """Write `out/site-0 ... out/site-{sites-1}`, each with DICOM files, a labels.csv and its site.toml.

    Each site is written completely in a temporary folder beside `out` and then renamed into
    place, so an interrupted run never leaves a half-written site. Returns the site folders.
    `budgets` gives sites a lifetime epsilon other than DEMO_BUDGET; `policy` adds settings to every
    site's site.toml (e.g. {"dp-required": False} for runs without DP). `classes` (2 to 4) sets how
    many kinds of case there are: labels 0 to classes - 1.
    """
    if not 2 <= classes <= MAX_CLASSES:
        raise SiteDataError(f"demo data: classes must be 2 to {MAX_CLASSES} (no finding, lesion, hypodense "
                            f"lesion, calcification), got {classes}")
    return write_sites(out, sites, _case_counts(sites, cases), seed, image_size,
                       functools.partial(_write_site, classes=classes), overwrite=overwrite,
                       budgets=budgets, policy=policy)


def write_sites(
    out: Path, sites: int, counts: list[int], seed: int, image_size: int,
    write_site: Callable[[Path, int, int, int, int], None], *, overwrite: bool = False,
    budgets: Mapping[str, float] = DEMO_BUDGETS, policy: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write each site with `write_site(folder, site, n_cases, seed, image_size)`, atomically per site.

    Every site also gets its own settings file (fedcare.sites.SITE_FILE): a simulated site's lifetime
    budget and privacy policy are the site's, as a deployed site's node config is.
    """
    out = Path(out)
    _case_counts(sites, counts)
    if image_size < 16:
        raise SiteDataError(f"demo data: image_size must be at least 16 pixels, got {image_size}")
    targets = [out / f"site-{i}" for i in range(sites)]
    for target in targets:
        occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
        if occupied and not overwrite:
            raise SiteDataError(
                f"demo site folder {target} already exists and is not empty: "
                "pick another output folder or overwrite it (overwrite=True, --overwrite)"
            )

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-writing-", dir=out.parent))
    try:
        for site, (target, n_cases) in enumerate(zip(targets, counts)):
            fresh = staging / target.name
            fresh.mkdir()
            write_site(fresh, site, n_cases, seed, image_size)
            write_site_settings(fresh, **{"budget-epsilon": budgets.get(target.name, DEMO_BUDGET), **(policy or {})})
            if target.is_dir() and not target.is_symlink():
                # Move the old copy aside first: a failure leaves the old or the new site, never a mix.
                os.replace(target, staging / f"old-{target.name}")
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(fresh, target)
            _mark_demo_site(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def _mark_demo_site(folder: Path) -> None:
    marker = folder.parent / DEMO_MARKER
    names = set(marker.read_text().split()) if marker.is_file() else set()
    marker.write_text("".join(f"{name}\n" for name in sorted(names | {folder.name})))


def is_demo_site(folder: Path) -> bool:
    """Whether `fedcare demo-data` wrote this site folder (synthetic data, no patient in it)."""
    marker = Path(folder).parent / DEMO_MARKER
    return marker.is_file() and Path(folder).name in marker.read_text().split()
