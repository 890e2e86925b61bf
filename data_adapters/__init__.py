"""Site data for fedcare: index and decode a hospital's DICOM (or NIfTI) folder, join its label
manifest, cache the preprocessed arrays and check the site's readiness.

Everything here runs on the site; image contents, UIDs and header strings never leave it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import DecodeCache, clear_cache
    from .dataset import SiteDatasets, cached_site_images, image_transform, site_datasets
    from .dicom import SiteImages, load_site, read_site
    from .index import SiteIndex, index_site
    from .labels import read_labels, read_manifest
    from .nifti import load_nifti_site
    from .readiness import check_site
    from .seg import label_volume, read_segmentation
    from .segmentation import read_segmentation_site, segmentation_datasets
    from .segmentation_volumes import read_segmentation_volumes, segmentation_volume_datasets
    from .split import SeededSplit, StoredSplit, split_indices
    from .transforms import WINDOW_PRESETS, Preprocess
    from .volumes import plan_volume, stack_volume

# Imported on first use: `fedcare demo-data` should not pay for loading torch and MONAI.
_HOME = {
    "DecodeCache": "cache",
    "Preprocess": "transforms",
    "SiteIndex": "index",
    "WINDOW_PRESETS": "transforms",
    "check_site": "readiness",
    "clear_cache": "cache",
    "index_site": "index",
    "label_volume": "seg",
    "load_nifti_site": "nifti",
    "load_site": "dicom",
    "plan_volume": "volumes",
    "read_manifest": "labels",
    "read_segmentation": "seg",
    "stack_volume": "volumes",
    "SiteDatasets": "dataset",
    "SiteImages": "dicom",
    "cached_site_images": "dataset",
    "image_transform": "dataset",
    "read_labels": "labels",
    "read_site": "dicom",
    "site_datasets": "dataset",
    "split_indices": "split",
    "SeededSplit": "split",
    "StoredSplit": "split",
    "read_segmentation_site": "segmentation",
    "segmentation_datasets": "segmentation",
    "read_segmentation_volumes": "segmentation_volumes",
    "segmentation_volume_datasets": "segmentation_volumes",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
