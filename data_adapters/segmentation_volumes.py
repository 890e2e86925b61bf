"""3D segmentation datasets of one site: whole CT volumes at one voxel spacing, and patches of them.

Each series that a DICOM SEG references becomes a volume through the same geometry checks as 3D
classification: slices ordered along the slice normal (`plan_volume`), an irregular series
excluded or resampled per `irregular-series` (`stack_volume`), and the mask placed slice by slice
by referenced SOP instance (`label_volume`) and carried through the same resampling. Intensities
are windowed to [0, 1] as in 2D; then MONAI's `Spacingd` resamples the image (bilinear) and the
mask (nearest) from the series' own voxel spacing to the run's `spacing`, so that a lesion of a
given size in mm covers the same number of voxels whichever scanner a site has.

Training items are random `patch-size` patches, one per series each time the series is drawn, as
`(image[1, D, H, W] float32, mask[D, H, W] int64)` tuples (tuples, because Opacus' Poisson
sampling can draw an empty batch). One item per series keeps DP-SGD's unit of privacy a whole
series, not a patch of it. Validation items are whole volumes, for sliding-window inference with
the same patch size (`fedcare.segmentation.evaluate_volumes`). The split is by series, stratified
by whether a series holds a lesion; volumes stay in memory per process, like the 2D slices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, MetaTensor
from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropd, Spacingd, SpatialPadd
from monai.utils import convert_to_tensor

from fedcare.errors import SiteDataError
from fedcare.privacy.randomness import entropy_seed

from .dataset import SiteDatasets, _memoised
from .split import SeededSplit, Split
from .dicom import require_folder
from .segmentation import SegmentedSeries, SeriesTally, no_segmented_series, segmented_series
from .transforms import Window, apply_window, parse_window
from .volumes import IRREGULAR_CHOICES, stack_volume

__all__ = ["VolumeSite", "read_segmentation_volumes", "resample_to_spacing", "resampled_voxels",
           "segmentation_volume_datasets", "series_volume"]
log = logging.getLogger("fedcare.site")  # the site's own log: it never leaves the site

VoxelSpacing = tuple[float, float, float]  # mm between voxels along (D, H, W): slices, rows, columns
_KEYS = ("image", "mask")


@dataclass
class VolumeSite(SeriesTally):
    """A site's segmented volumes at the target spacing. `groups` (series UIDs) stay on the site."""

    images: list[np.ndarray] = field(default_factory=list)  # [D, H, W] float32 in [0, 1]
    masks: list[np.ndarray] = field(default_factory=list)  # [D, H, W] int64, 0 background, 1 lesion
    groups: list[str] = field(default_factory=list)  # the patient of each volume, else its SeriesInstanceUID
    excluded: int = 0  # series left out for irregular geometry
    too_large: int = 0  # series left out: at the run's spacing they would exceed the site's max-sample-voxels


def series_volume(series: SegmentedSeries,
                  irregular: str = "exclude") -> tuple[np.ndarray, np.ndarray, VoxelSpacing] | None:
    """The series' [D, H, W] volume, lesion mask and voxel spacing on one regular grid.

    None when its geometry is irregular and `irregular` is "exclude", or when it cannot be resampled.
    """
    plan = series.plan
    if not plan.regular and (irregular == "exclude" or not plan.resamplable):
        return None
    volume, spacing = stack_volume(series.frames, plan)
    # The mask takes the image's resampling (linear), then its half level: whole voxels, no blend.
    lesion, _ = stack_volume(list((series.labels > 0).astype(np.float32)), plan)
    return volume, (lesion >= 0.5).astype(np.uint8), spacing


def resampled_voxels(shape: tuple[int, ...], spacing: VoxelSpacing, target: VoxelSpacing) -> int:
    """How many voxels a [D, H, W] volume of `shape` at `spacing` has once resampled to `target` (mm): the
    grid `Spacingd` makes, from the first voxel centre to the last."""
    extent = (np.asarray(shape[-3:], dtype=np.float64) - 1) * np.asarray(spacing) / np.asarray(target)
    return int(np.prod(np.maximum(np.round(extent + 1.0), 1.0)))


def resample_to_spacing(image: np.ndarray, mask: np.ndarray, spacing: VoxelSpacing,
                        target: VoxelSpacing) -> tuple[np.ndarray, np.ndarray]:
    """A [D, H, W] image (bilinear) and mask (nearest) from `spacing` to `target`, both (D, H, W) in mm."""
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    resample = Spacingd(keys=_KEYS, pixdim=target, mode=("bilinear", "nearest"))
    volume = resample({
        "image": MetaTensor(torch.from_numpy(np.asarray(image, dtype=np.float32))[None], affine=affine),
        "mask": MetaTensor(torch.from_numpy(np.asarray(mask, dtype=np.float32))[None], affine=affine),
    })
    return volume["image"][0].numpy().astype(np.float32), volume["mask"][0].numpy().round().astype(np.int64)


def read_segmentation_volumes(
    folder: Path, window: Window = "soft-tissue", spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    irregular: str = "exclude", max_voxels: int = 0,
) -> VolumeSite:
    """Decode every segmented series of `folder` into a windowed volume and lesion mask at `spacing` (z, y, x mm).

    A series that would have more than `max_voxels` voxels at `spacing` is left out before it is
    resampled (0: no cap): the run config sets the spacing, and a fine one multiplies a volume's size.
    """
    folder = require_folder(folder)
    if irregular not in IRREGULAR_CHOICES:
        raise SiteDataError(f"irregular-series {irregular!r} must be one of {', '.join(IRREGULAR_CHOICES)}")
    window, target = parse_window(window), spacing
    site = VolumeSite()
    for series in segmented_series(folder, site):
        found = series_volume(series, irregular)
        if found is None:
            site.excluded += 1
            continue
        hu, lesion, voxel = found
        if max_voxels and resampled_voxels(hu.shape, voxel, target) > max_voxels:
            site.too_large += 1
            continue
        image, mask = resample_to_spacing(apply_window(hu, window), lesion, voxel, target)
        site.images.append(image)
        site.masks.append(mask)
        site.groups.append(series.unit)
    if site.too_large:
        log.warning("%d segmented series left out: at the run's spacing %s mm each would have more than %s voxels "
                    "(the site's max-sample-voxels)", site.too_large, target, f"{max_voxels:,}")
    if not site.images and site.too_large:
        raise SiteDataError(f"data folder {folder}: at the run's spacing {target} mm every segmented series would "
                            f"have more than {max_voxels:,} voxels (the site's max-sample-voxels): ask for a coarser "
                            "spacing, or raise max-sample-voxels")
    if not site.images and site.excluded:
        raise SiteDataError(f"data folder {folder}: all {site.excluded} segmented series have irregular slice "
                            "geometry: set irregular-series = \"resample\" or re-export the series")
    if not site.images:
        raise no_segmented_series(folder, site)
    return site


def _tensors(image: object, mask: object) -> tuple[torch.Tensor, torch.Tensor]:
    # Plain tensors, no MetaTensor: lighter to collate and what Opacus expects.
    return (convert_to_tensor(image, dtype=torch.float32, track_meta=False),
            convert_to_tensor(mask, dtype=torch.int64, track_meta=False))


class _Patches:
    """Maps a volume index to one random patch of it: `(image[1, D, H, W] float32, mask[D, H, W] int64)`."""

    def __init__(self, site: VolumeSite, patch: tuple[int, int, int], seed: int) -> None:
        self.site = site
        self.lesion = [bool(m.any()) for m in site.masks]
        # A volume smaller than a patch (few slices, say) is padded with zeros: air after windowing.
        self.pad = SpatialPadd(_KEYS, spatial_size=patch)
        # Half the patches of a volume with a lesion are centred on it: a lesion fills a small share
        # of a volume, and uniform patches would rarely show the network one.
        self.near_lesion = RandCropByPosNegLabeld(_KEYS, label_key="mask", spatial_size=patch, pos=1, neg=1,
                                                  num_samples=1)
        self.anywhere = RandSpatialCropd(_KEYS, roi_size=patch, random_size=False)
        state = np.random.RandomState(seed)
        self.near_lesion.set_random_state(state=state)
        self.anywhere.set_random_state(state=state)

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.pad({"image": self.site.images[index][None], "mask": self.site.masks[index][None]})
        patch = self.near_lesion(volume)[0] if self.lesion[index] else self.anywhere(volume)
        return _tensors(patch["image"], patch["mask"][0])


class _Volumes:
    """Maps a volume index to the whole volume: `(image[1, D, H, W] float32, mask[D, H, W] int64)`."""

    def __init__(self, site: VolumeSite) -> None:
        self.site = site

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensors(self.site.images[index][None], self.site.masks[index])


def segmentation_volume_datasets(
    folder: Path, split: Split = SeededSplit(), window: Window = "soft-tissue",
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0), patch_size: tuple[int, int, int] = (8, 32, 32),
    irregular: str = "exclude",
    patch_seed: int | None = None,
    max_voxels: int = 0,
) -> SiteDatasets:
    """Read (or reuse, per process) a site's segmented volumes; `split` divides them by series.

    `spacing` (mm) and `patch_size` (voxels) are in the volume's (z, y, x) order, as the run config parses them;
    `patch_seed` draws the training patches (a site passes none: then they come from its own entropy);
    `max_voxels` is the site's cap on a resampled volume (0: none).
    """
    folder = require_folder(folder)
    patch = tuple(patch_size)
    key = (folder.resolve(), "segmentation-3d", repr(parse_window(window)), tuple(spacing), irregular, max_voxels)
    site = _memoised(key, folder.resolve(), folder / ".no-manifest",
                     lambda: read_segmentation_volumes(folder, window, spacing, irregular, max_voxels))
    has_lesion = np.array([int(m.any()) for m in site.masks])
    train_idx, val_idx = split(has_lesion, site.groups)
    classes, counts = np.unique(has_lesion, return_counts=True)
    patches = _Patches(site, patch, entropy_seed() % 2**32 if patch_seed is None else patch_seed)
    return SiteDatasets(
        train=Dataset(data=train_idx.tolist(), transform=patches),
        val=Dataset(data=val_idx.tolist(), transform=_Volumes(site)),
        num_train=len(train_idx), num_val=len(val_idx), skipped=len(site.failures),
        unlabelled=site.unsegmented, class_counts={int(c): int(n) for c, n in zip(classes, counts)},
        excluded=site.excluded + site.too_large, train_units=[site.groups[i] for i in train_idx],
    )
