"""Segmentation datasets of one site: CT series paired with the DICOM SEG objects made from them.

A series takes part when at least one SEG references it (ReferencedSeriesSequence); each SEG frame
is placed on its source slice by the referenced SOP instance (`seg.label_volume`), never by frame
order. Several segments, or several SEGs of one series, merge into one lesion class. Items are
`(image[1, H, W] float32, mask[H, W] int64)` tuples (tuples, because Opacus' Poisson sampling can
draw an empty batch). The split is by series, stratified by whether a series holds a lesion, so
no patient's neighbouring slices sit on both sides. Reading a series and its SEGs
(`segmented_series`) is shared with the 3D path in segmentation_volumes.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset

from fedcare.errors import SiteDataError

from .dataset import SiteDatasets, _memoised
from .split import SeededSplit, Split
from .decode import read_file
from .dicom import require_folder
from .headers import Unusable
from .index import index_site
from .seg import SEGMENTATION_STORAGE, label_volume, read_segmentation, segmentations_by_series
from .transforms import Preprocess, Window
from .volumes import VolumePlan, plan_volume, series_slices

__all__ = ["SegmentationSite", "SegmentedSeries", "SeriesTally", "no_segmented_series", "read_segmentation_site",
           "segmentation_datasets", "segmented_series"]


@dataclass
class SeriesTally:
    """What a site's reading left out, as counts and reasons that are safe to report."""

    unsegmented: int = 0  # image series that no SEG references
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


@dataclass
class SegmentationSite(SeriesTally):
    """A site's segmented slices. `uids` (source SOPInstanceUIDs) and `groups` stay on the site."""

    images: list[np.ndarray] = field(default_factory=list)  # [H, W] float32 in [0, 1]
    masks: list[np.ndarray] = field(default_factory=list)  # [H, W] int64, 0 background, 1 lesion
    uids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # the patient of each slice, else its SeriesInstanceUID


@dataclass
class SegmentedSeries:
    """One image series with its merged SEG labels, both in the plan's slice order (on the site only)."""

    uid: str  # SeriesInstanceUID
    plan: VolumePlan
    frames: list[np.ndarray]  # [H, W] physical values (HU for CT), one per planned slice
    labels: np.ndarray  # [Z, H, W] uint8, 0 background, segment numbers elsewhere
    sop_uids: list[str]  # source SOPInstanceUID of each planned slice
    unit: str = ""  # the series' patient (PatientID), else the series itself: what the split keeps together


def _resize_mask(labels: np.ndarray, size: int) -> np.ndarray:
    # Nearest neighbour: a label map must keep whole labels, never blend them.
    tensor = torch.from_numpy(labels.astype(np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="nearest")[:, 0].numpy().astype(np.int64)


def segmented_series(folder: Path, tally: SeriesTally) -> Iterator[SegmentedSeries]:
    """Every image series of `folder` that a SEG references, decoded one at a time to bound memory.

    Series without a SEG and series that cannot be decoded are counted on `tally` and skipped.
    """
    index = index_site(folder)
    segs = segmentations_by_series(index)
    for (_, series_uid), members in sorted(index.series().items()):
        images = [h for h in members if h.sop_class != SEGMENTATION_STORAGE]
        if not images:
            continue
        if series_uid not in segs:
            tally.unsegmented += 1
            continue
        plan = plan_volume(series_slices(images), images[0].pixel_spacing, images[0].slice_thickness)
        labels = np.zeros((len(plan.slices), images[0].rows, images[0].columns), dtype=np.uint8)
        try:
            for header in segs[series_uid]:
                labels = np.maximum(labels, label_volume(read_segmentation(folder / header.path), plan, images))
            decoded = {h.path: read_file(folder / h.path)[1] for h in images}
        except Unusable as reason:
            tally.failures.append((images[0].path, str(reason)))
            continue
        sop_of = {h.path: h.sop_uid for h in images}
        yield SegmentedSeries(series_uid, plan, [decoded[s.path][s.frame] for s in plan.slices], labels,
                              [sop_of[s.path] for s in plan.slices], images[0].unit(series_uid))


def no_segmented_series(folder: Path, tally: SeriesTally) -> SiteDataError:
    """The error for a site folder that yielded nothing to train on."""
    return SiteDataError(f"data folder {folder} holds no image series with a DICOM SEG that references it "
                         f"({tally.unsegmented} series without one): export the segmentations with the images")


def read_segmentation_site(folder: Path, preprocess: Preprocess) -> SegmentationSite:
    """Decode every segmented series of `folder` into windowed, resized slices and aligned masks."""
    folder = require_folder(folder)
    site = SegmentationSite()
    for series in segmented_series(folder, site):
        site.images += list(preprocess(np.stack(series.frames)))
        site.masks += list(_resize_mask((series.labels > 0).astype(np.uint8), preprocess.image_size))
        site.uids += series.sop_uids
        site.groups += [series.unit] * len(series.frames)
    if not site.images:
        raise no_segmented_series(folder, site)
    return site


class _SegmentedSlices:
    """Maps a sample index to `(image[1, H, W] float32, mask[H, W] int64)` tensors."""

    def __init__(self, site: SegmentationSite) -> None:
        self.site = site

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.site.images[index], dtype=np.float32))
        return image[None], torch.from_numpy(np.array(self.site.masks[index], dtype=np.int64))


def segmentation_datasets(
    folder: Path, split: Split = SeededSplit(), image_size: int = 64,
    window: Window = (-200.0, 300.0),
) -> SiteDatasets:
    """Read (or reuse, per process) a site's segmented series; `split` divides them by series."""
    folder = require_folder(folder)
    preprocess = Preprocess(window=window, image_size=image_size)
    key = (folder.resolve(), "segmentation", preprocess.fingerprint)
    site = _memoised(key, folder.resolve(), folder / ".no-manifest", lambda: read_segmentation_site(folder, preprocess))
    lesion_series = {g for g, m in zip(site.groups, site.masks) if m.any()}
    strata = np.array([int(g in lesion_series) for g in site.groups])
    train_idx, val_idx = split(strata, site.groups)
    has_lesion = np.array([int(m.any()) for m in site.masks])
    classes, counts = np.unique(has_lesion, return_counts=True)
    samples = _SegmentedSlices(site)
    return SiteDatasets(
        train=Dataset(data=train_idx.tolist(), transform=samples),
        val=Dataset(data=val_idx.tolist(), transform=samples),
        num_train=len(train_idx), num_val=len(val_idx), skipped=len(site.failures),
        unlabelled=site.unsegmented, class_counts={int(c): int(n) for c, n in zip(classes, counts)},
        train_units=[site.groups[i] for i in train_idx],
    )
