"""Decode one DICOM instance into float32 frames in physical units, shaped [frames, rows, columns].

Each step is a small function on (array, dataset), in the order a viewer applies them: palette
colour looked up, the modality rescale (classic, or per frame from Enhanced CT/MR functional
groups), and MONOCHROME1 inverted so that a higher value always means brighter (MONOCHROME2
meaning). The run's `in-channels` decides what becomes of colour: one channel is its luminance,
three keep red, green and blue as channels ([frames, 3, rows, columns]); any other count, or a
greyscale image where three are asked, makes the image unusable with the reason. The
compressed syntaxes decode through pydicom's plugins: numpy for native, RLE and deflated data,
pylibjpeg (libjpeg, openjpeg, rle) for the JPEG family and JPEG 2000.
"""

from __future__ import annotations

import contextlib
import logging
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .elements import Elements
from .fastparse import fast_parse
from .headers import Unusable, parse

__all__ = [
    "as_monochrome2", "decode_bytes", "decode_dataset", "decode_native", "decode_or_explain", "modality_rescale",
    "native_pixels", "quiet", "read_file", "read_instance", "COLOUR_CHANNELS",
]

_PIXEL_DATA = 0x7FE00010
_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# ITU-R BT.601 luma weights: what a greyscale rendering of an RGB DICOM shows.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
COLOUR_CHANNELS = 3


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records, which can quote element values that identify a
    patient; libraries that configure the root logger (opacus does) would otherwise print them."""
    pydicom_log = logging.getLogger("pydicom")  # its child loggers (pixels.decoders...) inherit the level
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)


def _frames_first(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom drops the frame axis of single-frame images; put it back: [F, H, W] or [F, H, W, 3]."""
    single_ndim = 2 if int(ds.get("SamplesPerPixel", 1) or 1) == 1 else 3
    return arr[np.newaxis] if arr.ndim == single_ndim else arr


def native_pixels(el: Elements, syntax: str, data: bytes | memoryview | None) -> np.ndarray | None:
    """Uncompressed little-endian greyscale pixels read straight from the value bytes, [F, H, W].

    The common case in an archive, and the one where pydicom's general decoder costs most per
    byte; everything else (compressed, big endian, colour, bit-packed) returns None for pydicom.
    """
    bits = int(el.number("BitsAllocated") or 0)
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN or data is None or bits not in (8, 16, 32)
        or int(el.number("SamplesPerPixel") or 1) != 1
        or el.text("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    rows, columns = int(el.number("Rows") or 0), int(el.number("Columns") or 0)
    frames = max(int(el.number("NumberOfFrames") or 1), 1)
    signed = int(el.number("PixelRepresentation") or 0) == 1
    count = rows * columns * frames
    if rows < 1 or columns < 1 or len(data) < count * bits // 8:
        return None  # let pydicom explain what is wrong
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, columns)
    unused = bits - int(el.number("BitsStored") or bits)
    if 0 < unused < bits:
        # As pydicom does: clear (or sign-extend into) the bits above BitsStored.
        arr = np.right_shift(np.left_shift(arr, unused), unused)
    return arr


def decode_native(el: Elements, syntax: str, data: bytes | memoryview | None) -> np.ndarray | None:
    """Native greyscale pixels in modality units without pydicom's decoder, or None when it is needed."""
    arr = native_pixels(el, syntax, data)
    if arr is None:
        return None
    values, params = modality_rescale(arr, el)
    return np.ascontiguousarray(as_monochrome2(values, el, params))


def _grey(frames: np.ndarray, channels: int) -> np.ndarray:
    """Greyscale frames [F, H, W], which only a one-channel run can use."""
    if channels != 1:
        raise Unusable(f"a greyscale image (1 channel), where the run's in-channels is {channels}: "
                       "set in-channels = 1, or leave this image out of the manifest")
    return frames


def _colour(arr: np.ndarray, channels: int) -> np.ndarray:
    """RGB frames [F, H, W, 3] as luminance [F, H, W] (one channel) or as channels [F, 3, H, W]."""
    if channels == 1:
        return np.ascontiguousarray(np.tensordot(arr.astype(np.float32), _LUMA, axes=([-1], [0])))
    if channels == COLOUR_CHANNELS:
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)
    raise Unusable(f"a colour image ({COLOUR_CHANNELS} channels), where the run's in-channels is {channels}: "
                   f"set in-channels = {COLOUR_CHANNELS}, or 1 to train on its luminance")


def _transformation(group: Dataset) -> Dataset | None:
    items = group.get("PixelValueTransformationSequence") or []
    if items and "RescaleSlope" in items[0] and "RescaleIntercept" in items[0]:
        return items[0]
    return None


def _functional_rescale(ds: Dataset, frames: int) -> np.ndarray | None:
    """Per-frame (slope, intercept) from Enhanced CT/MR functional groups, or None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    shared_item = _transformation(shared[0]) if shared else None
    items = [(_transformation(per_frame[i]) if i < len(per_frame) else None) or shared_item for i in range(frames)]
    if all(item is None for item in items):
        return None
    return np.array(
        [(float(i.RescaleSlope), float(i.RescaleIntercept)) if i is not None else (1.0, 0.0) for i in items],
        dtype=np.float32,
    )


def rescale_parameters(el: Elements, frames: int) -> np.ndarray | None:
    """Each frame's (slope, intercept) as [F, 2]; None when a Modality LUT sequence applies instead."""
    if el.value("PerFrameFunctionalGroupsSequence") or el.value("SharedFunctionalGroupsSequence"):
        params = _functional_rescale(el.ds, frames)
        if params is not None:
            return params
    slope, intercept = el.number("RescaleSlope"), el.number("RescaleIntercept")
    if slope is not None and intercept is not None:
        return np.tile(np.float32([slope, intercept]), (frames, 1))
    if el.value("ModalityLUTSequence"):
        return None
    return np.tile(np.float32([1.0, 0.0]), (frames, 1))


def modality_rescale(arr: np.ndarray, el: Elements) -> tuple[np.ndarray, np.ndarray]:
    """Stored values [F, H, W] -> modality values (HU for CT), float32, and each frame's (slope, intercept)."""
    params = rescale_parameters(el, arr.shape[0])
    if params is None:
        identity = np.tile(np.float32([1.0, 0.0]), (arr.shape[0], 1))
        return np.asarray(apply_modality_lut(arr, el.ds), dtype=np.float32), identity
    out = arr.astype(np.float32)
    if not np.all(params == np.float32([1.0, 0.0])):
        out *= params[:, 0, None, None]
        out += params[:, 1, None, None]
    return out, params


def as_monochrome2(values: np.ndarray, el: Elements, params: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (low values bright, e.g. CR) mirrored over the stored range, frame by frame."""
    if el.text("PhotometricInterpretation") != "MONOCHROME1":
        return values
    bits = int(el.number("BitsStored") or el.number("BitsAllocated") or 16)
    signed = int(el.number("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = params[:, 0, None] * np.float32([low, high]) + params[:, 1, None]  # [F, 2]
    return (ends.sum(axis=1)[:, None, None] - values).astype(np.float32)


def decode_dataset(ds: Dataset, el: Elements | None = None, channels: int = 1) -> np.ndarray:
    """Pixel data of a parsed dataset as float32 in modality units (MONOCHROME2 meaning): [F, H, W]
    for one channel, [F, 3, H, W] for colour kept as channels."""
    el = el or Elements(ds)
    raw = el.raw.get(_PIXEL_DATA)
    data = raw.value if isinstance(raw, RawDataElement) else None
    native = decode_native(el, Elements(ds.file_meta).text("TransferSyntaxUID"), data)
    if native is not None:
        return _grey(native, channels)
    arr = _frames_first(ds.pixel_array, ds)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 4:
        return _colour(arr, channels)
    values, params = modality_rescale(arr, el)
    return _grey(np.ascontiguousarray(as_monochrome2(values, el, params)), channels)


def decode_or_explain(ds: Dataset, channels: int = 1) -> np.ndarray:
    """`decode_dataset`, with any decoder failure turned into Unusable and a one-line reason."""
    try:
        return decode_dataset(ds, channels=channels)
    except Unusable:
        raise
    except Exception as exc:
        # Decoder messages describe the pixel format (and missing plugins), not the patient.
        detail = " ".join(str(exc).split())[:200]
        raise Unusable(f"cannot decode pixel data: {type(exc).__name__}: {detail}") from None


def decode_bytes(raw: bytes, channels: int = 1) -> np.ndarray:
    """Decode a whole file's bytes; native greyscale without building a pydicom dataset when possible."""
    fast = fast_parse(raw, None, complete=True)
    if fast is not None and fast.pixels is not None:
        start, length = fast.pixel_offset, fast.pixels[1]
        if length != 0xFFFFFFFF and start + length <= len(raw):
            syntax = fast.meta.text("TransferSyntaxUID")
            frames = decode_native(fast.elements, syntax, memoryview(raw)[start : start + length])
            if frames is not None:
                return _grey(frames, channels)
    return read_instance(raw, channels)[1]


def read_instance(raw: bytes, channels: int = 1) -> tuple[Dataset, np.ndarray]:
    """Parse a whole file's bytes and decode it: (dataset, frames). Raises Unusable with the reason."""
    with quiet():
        ds, _ = parse(io.BytesIO(raw), stop_at_pixels=False)
        return ds, decode_or_explain(ds, channels)


def read_file(path: Path, channels: int = 1) -> tuple[Dataset, np.ndarray]:
    """`read_instance` of a file on disk."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        raise Unusable("cannot open file (permissions or I/O error)") from None
    return read_instance(raw, channels)
