"""Turn a site's DICOM folder into train/validation MONAI datasets for one federated client.

Items are `(image, label)` tuples, not dicts: Opacus' Poisson sampling can draw an empty batch,
and only tuple items collate into one. Decoded images are cached per folder so that a client
called once per round does not re-read its DICOM files; the cache key changes whenever a file
or the label manifest changes.
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

from .dicom import SiteImages, read_site
from .labels import LABELS_FILENAME

__all__ = ["SiteDatasets", "cached_site_images", "image_transform", "site_datasets", "split_indices"]

# A few sites per process at most (simulation); one entry per folder, replaced when it changes.
_CACHE: dict[Path, tuple[tuple[int, int, int], SiteImages]] = {}
_CACHE_LIMIT = 16


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of sample indices into (train, validation), both sorted.

    Each class sends round(n * val_fraction) of its n cases to validation, but at least one
    and never all of them when it has two or more, so validation sees every class and training
    keeps every class.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SiteDataError(f"val-fraction must be in [0, 1), got {val_fraction}: choose e.g. 0.2")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        elif len(members) < 2:
            n_val = 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return _sorted_index(train), _sorted_index(val)


def _sorted_index(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


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


def cached_site_images(folder: Path) -> SiteImages:
    """`read_site(folder)`, decoded once per process while the folder and its labels.csv are unchanged."""
    folder = Path(folder)
    if not folder.is_dir():
        return read_site(folder)  # raises the usual one-line error
    key = folder.resolve()
    stamp = _stamp(key, key / LABELS_FILENAME)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    site = read_site(folder)
    if len(_CACHE) >= _CACHE_LIMIT and key not in _CACHE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (stamp, site)
    return site


class _Samples:
    """Maps a sample index to `(image[1,H,W] float32 tensor, label)`; picklable for DataLoader workers."""

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, transform: Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


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
    val_fraction: float = 0.2,
    seed: int = 42,
    image_size: int = 64,
    window: tuple[float, float] = (-200.0, 300.0),
) -> SiteDatasets:
    """Read (or reuse) a site's images and split them into train/validation MONAI datasets."""
    if image_size < 8:
        raise SiteDataError(f"image-size must be at least 8 pixels, got {image_size}")
    site = cached_site_images(folder)
    train_idx, val_idx = split_indices(site.labels, val_fraction, seed)
    samples = _Samples(site.images, site.labels, image_transform(image_size, window))
    # MONAI's Dataset applies `transform` to each data item: here the item is a sample index.
    classes, counts = np.unique(site.labels, return_counts=True)
    return SiteDatasets(
        train=Dataset(data=train_idx.tolist(), transform=samples),
        val=Dataset(data=val_idx.tolist(), transform=samples),
        num_train=len(train_idx),
        num_val=len(val_idx),
        skipped=len(site.skipped),
        unlabelled=site.unlabelled,
        class_counts={int(c): int(n) for c, n in zip(classes, counts)},
    )
