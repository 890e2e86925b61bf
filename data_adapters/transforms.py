"""Preprocessing from physical units to model input: an intensity window, then a resize.

Windows are named presets (CT in HU) or an explicit "low,high" pair; "minmax" scales each sample
by its own 0.5-99.5 percentiles, for modalities without a physical scale (MR, CR, US). The steps
act on a whole stack of frames at once, so decoding a multi-frame file costs one call, and they
match today's MONAI pipeline (ScaleIntensityRange with clipping, then an area Resize). An image of
several channels (colour, or MR sequences in one NIfTI) is windowed and resized channel by
channel, each as a grey image would be: "minmax" scales each channel by its own percentiles.

What a window, a spacing or a patch size means is the run config's (`fedcare.imaging`); the
adapters apply the parsed values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcare.errors import SiteDataError
from fedcare.imaging import MINMAX, WINDOW_PRESETS, Window, parse_patch_size, parse_spacing, parse_window

__all__ = ["WINDOW_PRESETS", "Preprocess", "parse_window", "parse_spacing", "parse_patch_size", "apply_window",
           "resize_frames", "resize_volume"]

_PERCENTILES = (0.5, 99.5)
_VERSION = 1  # bump when preprocessing changes, so cached arrays from older code are not reused


def apply_window(frames: np.ndarray, window: Window) -> np.ndarray:
    """Physical values -> [0, 1], clipped: a fixed window, or each sample's own percentiles."""
    if window == MINMAX:
        low, high = (float(v) for v in np.percentile(frames, _PERCENTILES))
        high = high if high > low else low + 1.0
    else:
        low, high = window  # type: ignore[misc]
    out = (frames.astype(np.float32, copy=True) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # For one small image, waking torch's thread pool costs far more than the work (ms vs us),
    # worst when the site's other processes keep the cores busy.
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[F, H, W] -> [F, size, size]; a no-op at that size.

    Shrinking averages areas, as MONAI's Resize does; enlarging is bilinear, because area
    interpolation upwards is adaptive pooling, slow and no better.
    """
    if frames.shape[-2:] == (size, size):
        return np.ascontiguousarray(frames, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
    with _one_thread():
        if min(frames.shape[-2:]) >= size:
            return F.interpolate(tensor, size=(size, size), mode="area")[:, 0].numpy()
        return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def resize_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """[Z, H, W] -> [size, size, size] by trilinear interpolation (slices are rarely as fine as pixels)."""
    if volume.shape == (size, size, size):
        return np.ascontiguousarray(volume, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    with _one_thread():
        return F.interpolate(tensor, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()


@dataclass(frozen=True)
class Preprocess:
    """Window then resize; `fingerprint` keys the decode cache, so a change of settings re-decodes.

    One channel: frames [F, H, W] -> [F, S, S], or a volume [Z, H, W] -> [S, S, S]. Several:
    frames [F, C, H, W] -> [F, C, S, S], or a volume [C, Z, H, W] -> [C, S, S, S].
    """

    window: Window = WINDOW_PRESETS["soft-tissue"]
    image_size: int = 64
    volume: bool = False  # 3D: one [Z, H, W] volume per sample instead of independent frames
    channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", parse_window(self.window))
        if self.image_size < 8:
            raise SiteDataError(f"image-size must be at least 8 pixels, got {self.image_size}")

    @property
    def fingerprint(self) -> str:
        # One-channel keys are as before channels existed, so a site's existing cache still serves.
        several = f"|channels={self.channels}" if self.channels != 1 else ""
        return f"v{_VERSION}|window={self.window}|size={self.image_size}|volume={self.volume}{several}"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if self.channels == 1:
            return self._grey(frames)
        if self.volume:
            return np.stack([self._grey(channel) for channel in frames])
        count, channels = frames.shape[:2]
        size = self.image_size
        return self._grey(frames.reshape(count * channels, *frames.shape[2:])).reshape(count, channels, size, size)

    def _grey(self, frames: np.ndarray) -> np.ndarray:
        if self.volume:
            return resize_volume(apply_window(frames, self.window), self.image_size)
        if self.window == MINMAX:
            return np.stack([resize_frames(apply_window(f[None], MINMAX), self.image_size)[0] for f in frames])
        return resize_frames(apply_window(frames, self.window), self.image_size)
