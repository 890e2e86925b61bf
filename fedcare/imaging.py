"""What the run config's imaging settings mean: an intensity window, a voxel spacing, a patch size.

Parsed once, when the run config is read (`RunConfig.window_range`, `spacing_zyx`, `patch_zyx`), and
applied by the data adapters on each site. Spacing and patch size are written "x y z", as people
read a scan, and parsed into the [D, H, W] axis order of a volume.
"""

from __future__ import annotations

import math

from fedcare.errors import SiteDataError

__all__ = ["WINDOW_PRESETS", "MINMAX", "Window", "parse_window", "parse_spacing", "parse_patch_size"]

# (low, high) in HU; soft tissue is the project's long-standing default.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (-200.0, 300.0),
    "abdomen": (-160.0, 240.0),
    "mediastinum": (-125.0, 225.0),
    "liver": (-25.0, 175.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
    "brain": (0.0, 80.0),
}
MINMAX = "minmax"

Window = tuple[float, float] | str


def parse_window(value: Window | list[float]) -> Window:
    """A preset name, 'minmax', 'low,high' or (low, high) -> (low, high) or 'minmax'."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name == MINMAX:
            return MINMAX
        if name in WINDOW_PRESETS:
            return WINDOW_PRESETS[name]
        parts = name.split(",")
        try:
            low, high = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or high is None:
            raise SiteDataError(
                f"window {value!r} is not a preset ({', '.join(sorted(WINDOW_PRESETS))}, {MINMAX}) "
                "or 'low,high': set window to one of those"
            )
    else:
        low, high = (float(v) for v in value)
    if not high > low:
        raise SiteDataError(f"intensity window must have low < high, got {value!r}: swap or widen it")
    return (low, high)


def _three(text: str, setting: str, unit: str, example: str) -> tuple[float, float, float]:
    """'x y z' (spaces or commas) -> three positive numbers, or a one-line error naming the setting."""
    try:
        values = tuple(float(v) for v in str(text).replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise SiteDataError(f"{setting} {text!r} must be three positive numbers in {unit}, x y z "
                            f"(along a row, down a column, between slices), e.g. \"{example}\"")
    return values  # type: ignore[return-value]


def parse_spacing(text: str) -> tuple[float, float, float]:
    """Target voxel spacing 'x y z' in mm -> (z, y, x), the axis order of a [D, H, W] volume."""
    x, y, z = _three(text, "spacing", "mm", "1.0 1.0 2.0")
    return z, y, x


def parse_patch_size(text: str) -> tuple[int, int, int]:
    """Patch size 'x y z' in voxels -> (z, y, x), the axis order of a [D, H, W] volume."""
    values = _three(text, "patch-size", "voxels", "32 32 8")
    if not all(float(v).is_integer() for v in values):
        raise SiteDataError(f"patch-size {text!r} must be whole numbers of voxels, x y z, e.g. \"32 32 8\"")
    x, y, z = (int(v) for v in values)
    return z, y, x
