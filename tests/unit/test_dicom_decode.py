"""Decoding real scanner files: every syntax pydicom handles, rescale, MONOCHROME1, multi-frame, windows."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from data_adapters.dataset import image_transform
from data_adapters.decode import decode_bytes, native_pixels, read_file, read_instance
from data_adapters.fastparse import fast_parse
from data_adapters.elements import Elements
from data_adapters.headers import Unusable
from data_adapters.transforms import WINDOW_PRESETS, Preprocess, apply_window, parse_window
from fedcare.errors import SiteDataError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(get_testdata_file("emri_small.dcm")).parent  # pydicom-data's store
# Larger files of pydicom-data (several MB each) add seconds and no syntax the others lack.
_SMALL_ENOUGH = 1_500_000


def _pydicom_frames(path: Path) -> np.ndarray | None:
    """pydicom's own pixel_array with a frame axis, or None when pydicom cannot decode the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
        except Exception:
            return None
    single = 2 if int(ds.get("SamplesPerPixel", 1)) == 1 else 3
    return arr[None] if arr.ndim == single else arr


def _real_files() -> list[Path]:
    files = [p for p in sorted(PYDICOM_FILES.rglob("*")) if p.is_file()]
    return files + [p for p in sorted(PYDICOM_DATA.iterdir()) if p.stat().st_size < _SMALL_ENOUGH]


def test_every_image_pydicom_decodes_is_decoded() -> None:
    decoded = 0
    for path in _real_files():
        reference = _pydicom_frames(path)
        if reference is None:
            continue
        try:
            _, frames = read_file(path)
        except Unusable as reason:
            pytest.fail(f"{path.name}: {reason}")
        assert frames.dtype == np.float32 and frames.ndim == 3, path.name
        assert frames.shape[:3] == reference.shape[:3] or frames.shape[0] == reference.shape[0], path.name
        decoded += 1
    assert decoded > 100


def test_decoding_without_pydicom_objects_matches_pydicom_decoding() -> None:
    """`decode_bytes` takes a lean path for native greyscale files; it must agree with the full one."""
    lean = 0
    for path in _real_files():
        raw = path.read_bytes()
        try:
            expected = read_instance(raw)[1]
        except Exception:
            continue
        np.testing.assert_array_equal(decode_bytes(raw), expected, err_msg=path.name)
        lean += fast_parse(raw, None, complete=True) is not None
    assert lean >= 30


def test_native_fast_path_equals_pydicom() -> None:
    checked = 0
    for path in _real_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
        syntax = ds.file_meta.get("TransferSyntaxUID", "")
        fast = native_pixels(Elements(ds), syntax, ds.get("PixelData"))
        reference = _pydicom_frames(path)
        if fast is None or reference is None:
            continue
        np.testing.assert_array_equal(fast, reference, err_msg=path.name)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "reference,variants",
    [
        ("MR_small.dcm", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                          "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm"]),
        ("emri_small.dcm", ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                            "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"]),
    ],
)
def test_lossless_syntaxes_decode_to_the_same_values(reference: str, variants: list[str]) -> None:
    _, expected = read_file(Path(get_testdata_file(reference)))
    for name in variants:
        _, frames = read_file(Path(get_testdata_file(name)))
        np.testing.assert_array_equal(frames, expected, err_msg=name)


def test_ct_rescale_gives_hounsfield_units() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds, frames = read_file(path)
    np.testing.assert_allclose(frames[0], apply_rescale(ds.pixel_array, ds), atol=1e-3)
    assert float(ds.RescaleIntercept) == -1024 and frames.min() < -800


def test_enhanced_ct_rescale_comes_from_functional_groups() -> None:
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    ds, frames = read_file(path)
    assert "RescaleIntercept" not in ds  # only the shared functional groups carry it
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ds.pixel_array.astype(np.float32) * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    assert frames.shape == (2, 512, 512)
    np.testing.assert_allclose(frames, expected)


def test_monochrome1_is_inverted_to_monochrome2_meaning() -> None:
    path = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    ds, frames = read_file(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    slope, intercept, bits = float(ds.RescaleSlope), float(ds.RescaleIntercept), int(ds.BitsStored)
    rescaled = ds.pixel_array.astype(np.float32) * slope + intercept
    top = (2**bits - 1) * slope + intercept
    np.testing.assert_allclose(frames[0], (intercept + top) - rescaled, rtol=1e-6)
    assert np.corrcoef(frames[0].ravel(), ds.pixel_array.ravel())[0, 1] < -0.99


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"])
def test_colour_images_become_luminance(name: str) -> None:
    path = Path(get_testdata_file(name))
    rgb = _pydicom_frames(path).astype(np.float32)
    _, frames = read_file(path)
    np.testing.assert_allclose(frames, rgb @ np.float32([0.299, 0.587, 0.114]), atol=1e-3)


@pytest.mark.parametrize("name", ["image_dfl.dcm", "JPGExtended.dcm", "JPEG-LL.dcm", "693_J2KI.dcm"])
def test_deflated_and_jpeg_family_decode_like_pydicom(name: str) -> None:
    path = Path(get_testdata_file(name))
    ds, frames = read_file(path)
    expected = _pydicom_frames(path).astype(np.float32)
    if "RescaleSlope" in ds:
        expected = expected * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(frames, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"])
def test_undecodable_files_raise_a_reason(name: str) -> None:
    with pytest.raises(Unusable, match="^cannot decode pixel data: "):
        read_file(Path(get_testdata_file(name)))


def test_window_presets_and_errors() -> None:
    assert parse_window("soft-tissue") == (-200.0, 300.0) == WINDOW_PRESETS["soft-tissue"]
    assert parse_window("Lung") == WINDOW_PRESETS["lung"]
    assert parse_window("-100, 100") == (-100.0, 100.0) and parse_window("minmax") == "minmax"
    for bad in ("liver2", "300,-200", "1,2,3"):
        with pytest.raises(SiteDataError):
            parse_window(bad)
    hu = np.array([[[-1000.0, -200.0, 50.0, 300.0, 2000.0]]])
    np.testing.assert_allclose(apply_window(hu, (-200.0, 300.0)), [[[0, 0, 0.5, 1, 1]]])
    scaled = apply_window(np.arange(1000.0).reshape(1, 10, 100), "minmax")
    assert scaled.min() == 0.0 and scaled.max() == 1.0


def test_preprocessing_matches_the_previous_monai_pipeline() -> None:
    """Today's behaviour for CT: soft-tissue window, area resize, as the old per-item transform did."""
    _, frames = read_file(Path(get_testdata_file("CT_small.dcm")))
    old = image_transform(64, (-200.0, 300.0))(frames[0]).numpy()
    new = Preprocess(window=(-200.0, 300.0), image_size=64)(frames)
    assert new.shape == (1, 64, 64)
    np.testing.assert_allclose(new, old, atol=1e-5)
