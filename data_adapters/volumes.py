"""Turn a series' slices into one volume, checking the geometry instead of trusting file order.

Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of the
row and column directions), with InstanceNumber as the fallback when positions are missing. Uneven
steps, gaps, duplicated positions, mixed orientations and gantry tilt are detected and reported;
an irregular series is then excluded or resampled onto a regular grid, never silently stacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .headers import InstanceHeader

__all__ = ["Slice", "VolumePlan", "series_slices", "plan_volume", "stack_volume", "slice_normal", "IRREGULAR_CHOICES"]

IRREGULAR_CHOICES = ("exclude", "resample")
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines; scanners write them rounded to ~6 digits
_STEP_TOLERANCE = 0.01  # relative: 1% of the median step (and at least 0.01 mm)
_TILT_TOLERANCE_DEG = 0.5
_MAX_FILLED_GAP = 3.0  # resampling interpolates across gaps of up to 3 median steps, no wider


@dataclass(frozen=True)
class Slice:
    """One plane of a series: a single-frame instance, or one frame of a multi-frame instance."""

    path: str
    frame: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance_number: int | None


@dataclass
class VolumePlan:
    """Sorted slices and the geometry problems found; `problems` empty means a regular volume."""

    slices: list[Slice]
    spacing: tuple[float, float, float]  # (slice step, row spacing, column spacing) in mm
    offsets: np.ndarray  # each slice's position along the normal, mm (sorted)
    lateral: np.ndarray  # each slice's in-plane shift from the first one (row, column), pixels
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resamplable: bool = True

    @property
    def regular(self) -> bool:
        return not self.problems


def series_slices(instances: list[InstanceHeader]) -> list[Slice]:
    """Every plane of a series, multi-frame instances expanded frame by frame."""
    slices = []
    for header in instances:
        for frame in range(header.frames):
            position = header.positions[frame] if len(header.positions) == header.frames else None
            slices.append(Slice(header.path, frame, position, header.orientation, header.instance_number))
    return slices


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """The unit normal of a plane: row direction x column direction."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    length = np.linalg.norm(normal)
    return normal / length if length > 0 else np.array([0.0, 0.0, 1.0])


def _orientation_groups(slices: list[Slice]) -> list[list[Slice]]:
    """Slices grouped by orientation (within tolerance), largest group first."""
    groups: list[list[Slice]] = []
    for s in slices:
        for group in groups:
            if np.max(np.abs(np.subtract(group[0].orientation, s.orientation))) <= _ORIENTATION_TOLERANCE:
                group.append(s)
                break
        else:
            groups.append([s])
    return sorted(groups, key=len, reverse=True)


def _by_instance_number(slices: list[Slice], pixel_spacing: tuple[float, float], thickness: float | None) -> VolumePlan:
    ordered = sorted(slices, key=lambda s: ((s.instance_number is None), s.instance_number or 0, s.path, s.frame))
    step = float(thickness or 1.0)
    plan = VolumePlan(ordered, (step, *pixel_spacing), np.arange(len(ordered)) * step, np.zeros((len(ordered), 2)))
    plan.notes.append(f"no slice positions: sorted by InstanceNumber, slice step taken as {step:g} mm (unverified)")
    return plan


def plan_volume(
    slices: list[Slice], pixel_spacing: tuple[float, float] | None, thickness: float | None = None
) -> VolumePlan:
    """Sort a series' slices and check their geometry."""
    spacing_2d = tuple(pixel_spacing) if pixel_spacing else (1.0, 1.0)
    if not all(s.position is not None and s.orientation is not None for s in slices):
        return _by_instance_number(slices, spacing_2d, thickness)
    problems: list[str] = []
    groups = _orientation_groups(slices)
    resamplable = True
    if len(groups) > 1:
        problems.append(f"mixed orientation ({len(groups)} different planes in one series)")
        slices = groups[0]  # what a resample keeps: the largest group of parallel slices
    normal = slice_normal(slices[0].orientation)  # type: ignore[arg-type]
    offsets = np.array([np.dot(s.position, normal) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(offsets, kind="stable")
    slices = [slices[i] for i in order]
    offsets = offsets[order]
    positions = np.array([s.position for s in slices], float)
    row, col = np.asarray(slices[0].orientation[:3]), np.asarray(slices[0].orientation[3:])  # type: ignore[index]
    shift = positions - positions[0]
    # ImagePositionPatient moves along the row direction with the column index, and vice versa.
    lateral = np.stack([shift @ col / spacing_2d[0], shift @ row / spacing_2d[1]], axis=1)
    steps = np.diff(offsets)
    step = float(np.median(steps)) if len(steps) else float(thickness or 1.0)
    if len(slices) < 2:
        problems.append("a single slice: not a volume")
        resamplable = False
    elif np.any(steps <= max(_STEP_TOLERANCE * abs(step), 1e-3)):
        problems.append(f"{int(np.sum(steps <= 1e-3)) + 1} slices share a position (several acquisitions in one series?)")
        resamplable = False
    else:
        problems += _step_problems(steps, step)
        resamplable = not any(p.startswith("gap too wide") for p in problems)
        tilt = _tilt_degrees(lateral, spacing_2d, offsets)
        if tilt > _TILT_TOLERANCE_DEG:
            problems.append(f"gantry tilt of {tilt:.1f} degrees")
    return VolumePlan(slices, (abs(step), *spacing_2d), offsets, lateral, problems, resamplable=resamplable)


def _step_problems(steps: np.ndarray, step: float) -> list[str]:
    tolerance = max(_STEP_TOLERANCE * step, 0.01)
    if np.all(np.abs(steps - step) <= tolerance):
        return []
    widest = float(steps.max())
    if widest > step * 1.5:
        missing = int(round(widest / step)) - 1
        kind = "gap too wide to interpolate" if widest > _MAX_FILLED_GAP * step else "gap"
        return [f"{kind}: {widest:.2f} mm between slices where the step is {step:.2f} mm (~{missing} missing)"]
    return [f"uneven slice spacing ({float(steps.min()):.2f} to {widest:.2f} mm)"]


def _tilt_degrees(lateral: np.ndarray, spacing_2d: tuple[float, ...], offsets: np.ndarray) -> float:
    if len(offsets) < 2 or offsets[-1] == offsets[0]:
        return 0.0
    shift_mm = np.hypot((lateral[-1, 0] - lateral[0, 0]) * spacing_2d[0], (lateral[-1, 1] - lateral[0, 1]) * spacing_2d[1])
    return float(np.degrees(np.arctan2(shift_mm, offsets[-1] - offsets[0])))


def stack_volume(frames: list[np.ndarray], plan: VolumePlan) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Stack [H, W] frames (in plan order) into [Z, H, W]; an irregular plan is resampled first.

    Tilt is undone by shifting each slice back by its in-plane offset; uneven steps and narrow gaps
    are interpolated linearly along the normal onto the median step.
    """
    volume = np.stack([np.asarray(f, dtype=np.float32) for f in frames])
    if plan.regular:
        return volume, plan.spacing
    if not plan.resamplable:
        raise ValueError("this series cannot be resampled: " + "; ".join(plan.problems))
    if np.any(np.abs(plan.lateral) > 1e-3):
        volume = np.stack([
            ndimage.shift(s, -plan.lateral[i], order=1, mode="nearest") for i, s in enumerate(volume)
        ]).astype(np.float32)
    step = plan.spacing[0]
    grid = np.arange(plan.offsets[0], plan.offsets[-1] + step / 2, step)
    upper = np.clip(np.searchsorted(plan.offsets, grid, side="right"), 1, len(plan.offsets) - 1)
    lower = upper - 1
    span = plan.offsets[upper] - plan.offsets[lower]
    weight = np.clip((grid - plan.offsets[lower]) / np.where(span > 0, span, 1.0), 0.0, 1.0)[:, None, None]
    resampled = (1 - weight) * volume[lower] + weight * volume[upper]
    return resampled.astype(np.float32), plan.spacing

