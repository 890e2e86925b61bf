"""Turn a site's DICOM folder into train/validation MONAI datasets for one federated client.

Items are `(image, label)` tuples, not dicts: Opacus' Poisson sampling can draw an empty batch,
and only tuple items collate into one. Images are windowed and resized once, when decoded; the
result is kept in memory per folder and settings, so a client called once per round does not
re-read its DICOM files (the key changes whenever a file or the label manifest changes), and
optionally on disk (`cache_dir`), so a new process does not decode them again either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirst, EnsureType, Resize, ScaleIntensityRange

from fedcare.errors import SiteDataError

from .dicom import SiteImages, load_site, manifest_for, read_site, require_folder
from .labels import LABELS_FILENAME
from .nifti import load_nifti_site, nifti_manifest
from .split import SeededSplit, Split, split_indices
from .transforms import Preprocess, Window

__all__ = ["SiteDatasets", "cached_site_images", "image_transform", "per_class", "site_datasets", "split_indices"]

# A few sites per process at most (simulation); one entry per folder and settings, replaced when it changes.
_CACHE: dict[tuple, tuple[tuple[int, int, int], SiteImages]] = {}
_CACHE_LIMIT = 16


def _stamp(folder: Path, manifest: Path) -> tuple[int, int, int]:
    """(latest mtime under folder, file count, manifest mtime): changes when any input changes."""
    latest, count = folder.stat().st_mtime_ns, 0
    for root, dirs, files in os.walk(folder):
        # Directory mtimes catch deletions and renames, which leave no newer file behind.
        for name in dirs + files:
            try:
                latest = max(latest, os.stat(os.path.join(root, name)).st_mtime_ns)
            except OSError:
                continue
        count += len(files)
    manifest_mtime = manifest.stat().st_mtime_ns if manifest.exists() else -1
    return latest, count, manifest_mtime


def _memoised(key: tuple, folder: Path, manifest: Path, build) -> SiteImages:
    """`build()`, kept per process while the folder and its manifest are unchanged."""
    stamp = _stamp(folder, manifest)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    site = build()
    if len(_CACHE) >= _CACHE_LIMIT and key not in _CACHE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (stamp, site)
    return site


def cached_site_images(folder: Path) -> SiteImages:
    """`read_site(folder)`, decoded once per process while the folder and its labels.csv are unchanged."""
    folder = Path(folder)
    if not folder.is_dir():
        return read_site(folder)  # raises the usual one-line error
    key = folder.resolve()
    return _memoised((key, "hu"), key, key / LABELS_FILENAME, lambda: read_site(folder))


class _Samples:
    """Maps a sample index to `(image[C, ...] float32 tensor, label)`; picklable for DataLoader workers.

    One-channel images are kept without their channel axis (as decoded and cached); it is added here.
    """

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, channels: int = 1) -> None:
        self.images, self.labels, self.channels = images, labels, channels

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy: cached images may be read-only memory maps. A plain tensor (no MetaTensor) is
        # lighter to collate and what Opacus expects.
        image = torch.from_numpy(np.array(self.images[index], dtype=np.float32))
        return (image[None] if self.channels == 1 else image), int(self.labels[index])


@dataclass
class SiteDatasets:
    """Train and validation datasets of one site, plus counts that are safe to report."""

    train: Dataset
    val: Dataset
    num_train: int
    num_val: int
    skipped: int
    unlabelled: int
    class_counts: dict[int, int] = field(default_factory=dict)
    excluded: int = 0  # 3D series left out: irregular geometry, or over the site's max-sample-voxels
    train_per_class: dict[int, int] = field(default_factory=dict)  # classification only
    val_per_class: dict[int, int] = field(default_factory=dict)
    train_units: list[str] = field(default_factory=list)  # whose each training sample is (stays on the site)


def image_transform(image_size: int, window: tuple[float, float]) -> Compose:
    """HU image [H,W] -> windowed [1,image_size,image_size] float32 tensor in [0, 1]."""
    low, high = window
    if not high > low:
        raise SiteDataError(f"intensity window must have low < high, got {window}")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
            Resize((image_size, image_size)),
            # A plain tensor (no MetaTensor): lighter to collate and what Opacus expects.
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def site_datasets(
    folder: Path,
    split: Split = SeededSplit(),
    image_size: int = 64,
    window: Window = (-200.0, 300.0),
    *,
    input_mode: str = "2d",
    label_key: str | None = None,
    labels_csv: Path | None = None,
    irregular: str = "exclude",
    cache_dir: Path | None = None,
    data_format: str = "dicom",
    patient_key: str = "",
    missing_images: str = "stop",
    classes: tuple[str, ...] = (),
    channels: int = 1,
) -> SiteDatasets:
    """Read (or reuse) a site's images and split them into train/validation MONAI datasets.

    `split` decides each case's side: a site passes its own `StoredSplit`;
    `window` is (low, high), a preset name or 'minmax'; `input_mode` '2d' makes each image or
    frame a sample, '3d' each series a volume (irregular series excluded or resampled, per
    `irregular`); `cache_dir` keeps the preprocessed arrays on disk for the next process;
    `data_format` 'nifti' reads converted .nii/.nii.gz volumes instead of DICOM; `patient_key` names the
    manifest's pseudonymous patient column (else DICOM PatientID tells whose each image is); `missing_images`
    'report' trains on the other cases when manifest rows have no readable image, 'stop' refuses; `classes`
    are the run's class names, which the manifest's labels must be (by name or index); `channels` is the
    run's in-channels (3 keeps colour DICOM as red, green, blue; a 4D NIfTI volume has its own count).
    """
    folder = require_folder(folder)
    preprocess = Preprocess(window=window, image_size=image_size, volume=input_mode == "3d", channels=channels)
    manifest_path = Path(labels_csv) if labels_csv is not None else folder / LABELS_FILENAME
    key = (folder.resolve(), manifest_path.resolve(), label_key, input_mode, irregular, preprocess.fingerprint,
           str(cache_dir), data_format, patient_key, missing_images, classes)

    def build() -> SiteImages:
        if data_format == "nifti":
            return load_nifti_site(folder, nifti_manifest(folder, manifest_path, classes), input_mode=input_mode,
                                   preprocess=preprocess, cache_dir=cache_dir)
        if data_format != "dicom":
            raise SiteDataError(f"data-format {data_format!r} must be 'dicom' or 'nifti'")
        manifest = manifest_for(folder, manifest_path, label_key, patient_key, classes)
        return load_site(folder, manifest, input_mode=input_mode, irregular=irregular,
                         preprocess=preprocess, cache_dir=cache_dir, missing_images=missing_images)

    site = _memoised(key, folder.resolve(), manifest_path, build)
    train_idx, val_idx = split(site.labels, site.groups)
    samples = _Samples(site.images, site.labels, channels)
    # MONAI's Dataset applies `transform` to each data item: here the item is a sample index.
    return SiteDatasets(
        train=Dataset(data=train_idx.tolist(), transform=samples),
        val=Dataset(data=val_idx.tolist(), transform=samples),
        num_train=len(train_idx),
        num_val=len(val_idx),
        skipped=len(site.skipped),
        unlabelled=site.unlabelled,
        class_counts=per_class(site.labels),
        excluded=len(site.excluded),
        train_per_class=per_class(site.labels[train_idx]),
        val_per_class=per_class(site.labels[val_idx]),
        train_units=[site.groups[i] for i in train_idx],
    )


def per_class(labels: np.ndarray) -> dict[int, int]:
    """{label: number of samples}."""
    classes, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return {int(c): int(n) for c, n in zip(classes, counts)}

