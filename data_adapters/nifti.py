"""The second adapter: NIfTI volumes (.nii, .nii.gz) for sites that already converted their DICOM.

Volumes are read with MONAI's NibabelReader (nibabel applies scl_slope/scl_inter, so CT stays in
HU) and reoriented to the DICOM layout used everywhere else, [slices, rows, columns]. The label
manifest is keyed by image file (column image, filename, file or path: a path relative to the
folder, or a bare file name when it is unique). The result is the same `SiteImages` as the DICOM
adapter gives, so `site_datasets` serves both; preprocessed arrays use the same disk cache.
A 4D volume holds one channel per 3D volume along its fourth axis (several MR sequences, as the
Medical Segmentation Decathlon ships them); their count must be the run's `in-channels`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedcare.errors import SiteDataError

from .cache import DecodeCache, content_digest, sample_key
from .dicom import INPUT_MODES, SiteImages, require_folder
from .index import site_files
from .labels import FILE_KEYS, LABELS_FILENAME, Manifest, read_manifest
from .transforms import Preprocess

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "read_nifti", "load_nifti_site", "nifti_files", "nifti_manifest"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, channels: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume as float32 [Z, H, W] (one channel) or [C, Z, H, W], and its voxel spacing
    (z, row, column) in mm. A channel count other than `channels` raises ValueError with the reason."""
    if importlib.util.find_spec("nibabel") is None:
        raise SiteDataError("reading NIfTI needs nibabel: pip install nibabel (a fedcare dependency)")
    from monai.transforms import LoadImage

    try:
        image = LoadImage(reader="NibabelReader", image_only=True, dtype=np.float32)(str(path))
    except Exception as exc:
        raise ValueError(" ".join(str(exc).split())[:200]) from None
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"a {array.ndim}-D image: only 2D and 3D NIfTI volumes, with channels along a fourth axis, "
                         "are supported")
    if array.shape[-1] != channels:
        raise ValueError(f"{array.shape[-1]} channel(s), where the run's in-channels is {channels}: set in-channels "
                         f"to the channels the site's volumes hold")
    pixdim = [float(v) for v in image.pixdim[:3]] if hasattr(image, "pixdim") else [1.0, 1.0, 1.0]
    pixdim += [1.0] * (3 - len(pixdim))
    # NIfTI voxels are (i, j, k, channel): columns, rows, slices in DICOM terms.
    volume = array.transpose(3, 2, 1, 0)
    return np.ascontiguousarray(volume[0] if channels == 1 else volume), (pixdim[2], pixdim[1], pixdim[0])


def nifti_manifest(folder: Path, labels_csv: Path | None = None, classes: tuple[str, ...] = ()) -> Manifest:
    path = Path(labels_csv) if labels_csv is not None else Path(folder) / LABELS_FILENAME
    return read_manifest(path, allowed=FILE_KEYS, classes=classes)


def nifti_files(folder: Path, manifest: Manifest | None) -> list[Path]:
    """The NIfTI files under `folder`, the manifest itself left out."""
    return [p for p in site_files(folder, (manifest.path,) if manifest else ()) if is_nifti(p)]


def _match(manifest: Manifest, relative: str, names: dict[str, int]) -> str | None:
    """The manifest key naming this file: its relative path, or its bare name when unique."""
    if relative in manifest.labels:
        return relative
    name = relative.rsplit("/", 1)[-1]
    return name if names.get(name) == 1 and name in manifest.labels else None


def load_nifti_site(
    folder: Path,
    manifest: Manifest,
    *,
    input_mode: str = "3d",
    preprocess: Preprocess | None = None,
    cache_dir: Path | None = None,
    strict: bool = True,
) -> SiteImages:
    """Labelled NIfTI volumes (3d) or their slices (2d) of a folder; with `strict`, manifest rows without
    a readable file are an error (else they are listed in `missing`)."""
    folder = require_folder(folder)
    if input_mode not in INPUT_MODES:
        raise SiteDataError(f"input-mode {input_mode!r} must be one of {', '.join(INPUT_MODES)}")
    cache = DecodeCache(cache_dir) if cache_dir is not None and preprocess is not None else None
    files = nifti_files(folder, manifest)
    names: dict[str, int] = {}
    for p in files:
        names[p.name] = names.get(p.name, 0) + 1
    site, labels, pending = SiteImages(), [], {}
    for path in files:
        relative = path.relative_to(folder).as_posix()
        key = _match(manifest, relative, names)
        if key is None:
            site.unlabelled += 1
            continue
        try:
            samples, spacing = _samples(path, input_mode, preprocess, cache, pending)
        except ValueError as reason:
            site.failures.append((relative, f"cannot read NIfTI: {reason}"))
            continue
        site.readable[relative] = len(samples)
        site.matched.add(key)
        for sample in samples:
            site.images.append(sample)
            site.uids.append(relative)
            site.groups.append(key)
            site.spacings.append(spacing)
            labels.append(manifest.labels[key])
    if cache is not None:
        cache.put_many(pending)
    site.labels = np.asarray(labels, dtype=np.int64)
    site.skipped = list(site.failures)
    site.missing = [value for value in manifest.labels if value not in site.matched]
    if site.missing and strict:
        raise SiteDataError(
            f"{len(site.missing)} labelled file(s) in {manifest.path} have no readable NIfTI image under {folder} "
            f"({manifest.describe(site.missing)}{site.commonest_failure()}): restore those files or remove their rows "
            "from the manifest"
        )
    return site


def _samples(path: Path, input_mode: str, preprocess: Preprocess | None, cache: DecodeCache | None,
             pending: dict[str, np.ndarray]) -> tuple[list[np.ndarray], tuple[float, ...]]:
    """One volume (3d) or its slices (2d), preprocessed, through the cache when there is one."""
    key = None
    if cache is not None and preprocess is not None:
        key = sample_key([content_digest(path.read_bytes())], preprocess.fingerprint + f"|nifti|{input_mode}")
        hit = cache.get(key)
        if hit is not None:
            return _split(hit, input_mode), _spacing_unknown(input_mode)
    channels = preprocess.channels if preprocess is not None else 1
    volume, spacing = read_nifti(path, channels)
    if input_mode == "2d" and channels > 1:
        volume = volume.transpose(1, 0, 2, 3)  # [Z, C, H, W]: each slice a sample with its channels
    prepared = preprocess(volume) if preprocess is not None else volume
    if key is not None:
        pending[key] = prepared
    return _split(prepared, input_mode), spacing if input_mode == "3d" else spacing[1:]


def _split(array: np.ndarray, input_mode: str) -> list[np.ndarray]:
    return list(array) if input_mode == "2d" else [array]


def _spacing_unknown(input_mode: str) -> tuple[float, ...]:
    # Spacing is not kept in the cache; it is only informational for preprocessed samples.
    return (1.0, 1.0, 1.0) if input_mode == "3d" else (1.0, 1.0)
