"""Site data for fedcare: read a hospital's DICOM folder and label manifest into MONAI datasets,
and write synthetic multi-site CT demo data with realistic scanner differences.

Everything here runs on the site; image contents, UIDs and header strings never leave it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dataset import SiteDatasets, cached_site_images, image_transform, site_datasets, split_indices
    from .demo_data import DEFAULT_CASES, write_demo_sites
    from .dicom import SiteImages, read_site
    from .labels import read_labels

# Imported on first use: `fedcare demo-data` should not pay for loading torch and MONAI.
_HOME = {
    "DEFAULT_CASES": "demo_data",
    "SiteDatasets": "dataset",
    "SiteImages": "dicom",
    "cached_site_images": "dataset",
    "image_transform": "dataset",
    "read_labels": "labels",
    "read_site": "dicom",
    "site_datasets": "dataset",
    "split_indices": "dataset",
    "write_demo_sites": "demo_data",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
