"""A lean reader for the top level of the common DICOM encodings, used before pydicom.

Most archive files are Part 10 files whose data set is little endian (implicit VR, explicit VR, or
explicit VR around encapsulated JPEG/RLE pixel data). For those, walking the top-level elements
with `struct` and keeping the few values an index needs costs a fraction of building pydicom's
objects. Anything else (no preamble, big endian, deflate, a private syntax, an element this
walker does not expect, a sequence whose items the index needs) returns None, and the caller
reads the file with pydicom. Tests compare both readers on every real file available.
"""

from __future__ import annotations

import struct
from typing import Any

from .elements import Elements, decode_value, tag_and_vr

__all__ = ["FastElements", "FastHeader", "fast_parse"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")  # JPEG family, JPEG 2000, RLE
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Sequences whose content matters (geometry, rescale, references, LUTs): their files go to pydicom.
_NEEDED_SEQUENCES = frozenset(tag_and_vr(k)[0] for k in (
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence",
    "ModalityLUTSequence",
))
_U16, _U32, _TAG = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<HH")


class FastElements(Elements):
    """Raw top-level values by tag, little endian; a sequence is kept only as 'present and not empty'."""

    def __init__(self, values: dict[int, bytes]) -> None:
        self.ds = None  # type: ignore[assignment]
        self.raw = values  # type: ignore[assignment]

    def value(self, keyword: str) -> Any:
        tag, vr = tag_and_vr(keyword)
        data = self.raw.get(tag)
        if data is None:
            return None
        if vr == "SQ":
            return [None] if data else []
        return decode_value(vr, data, True)


class FastHeader:
    """What `fast_parse` found: data set and file meta values, and where the pixel data starts."""

    def __init__(self, elements: FastElements, meta: FastElements, pixels: tuple[int, int] | None,
                 pixel_offset: int, implicit: bool) -> None:
        self.elements, self.meta, self.pixels = elements, meta, pixels
        self.pixel_offset = pixel_offset  # first byte of the pixel data value
        self.implicit = implicit


def _element_header(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, header size) of the element at `pos`; IndexError past the end."""
    group, elem = _TAG.unpack_from(buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], 8
    vr = buf[pos + 4 : pos + 6]
    if len(vr) < 2 or not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise ValueError("not an explicit VR")
    if vr in _LONG_VRS:
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], 12
    return tag, vr, _U16.unpack_from(buf, pos + 6)[0], 8


def _skip_items(buf: bytes, pos: int, implicit: bool) -> int:
    """Past a sequence of undefined length whose first item starts at `pos`."""
    while True:
        tag, _, length, size = _element_header(buf, pos, True)
        pos += size
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise ValueError("not a sequence item")
        pos = _skip_elements(buf, pos, implicit, until=_ITEM_END) if length == _UNDEFINED else pos + length


def _skip_elements(buf: bytes, pos: int, implicit: bool, until: int) -> int:
    while True:
        tag, vr, length, size = _element_header(buf, pos, implicit)
        pos += size
        if tag == until:
            return pos
        if length == _UNDEFINED:
            # An undefined-length UN holds an implicit VR sequence (PS3.5 6.2.2).
            pos = _skip_items(buf, pos, implicit or vr == b"UN")
        else:
            pos += length
        if pos > len(buf):
            raise IndexError("past the end")


def _meta(buf: bytes) -> tuple[dict[int, bytes], int]:
    values, pos = {}, 132
    while pos + 8 <= len(buf) and _U16.unpack_from(buf, pos)[0] == 0x0002:
        tag, _, length, size = _element_header(buf, pos, False)
        values[tag] = buf[pos + size : pos + size + length]
        pos += size + length
    return values, pos


def fast_parse(buf: bytes, keep: frozenset[int] | None, complete: bool) -> FastHeader | None:
    """Walk a file's bytes up to the pixel data, keeping the values of `keep` (all when None).

    `complete` says whether `buf` is the whole file; a header that runs past a partial buffer, or
    anything unusual, gives None.
    """
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    try:
        meta, pos = _meta(buf)
        syntax = meta.get(0x00020010, b"").decode("ascii").strip("\x00 ")
        if syntax != _IMPLICIT_LE and syntax != _EXPLICIT_LE and not syntax.startswith(_ENCAPSULATED_PREFIXES):
            return None
        implicit = syntax == _IMPLICIT_LE
        values: dict[int, bytes] = {}
        while pos + 8 <= len(buf):
            tag, vr, length, size = _element_header(buf, pos, implicit)
            if tag in _PIXEL_TAGS:
                header = FastHeader(FastElements(values), FastElements(meta), (tag, length), pos + size, implicit)
                return header
            if tag in _NEEDED_SEQUENCES or tag >> 16 == 0xFFFE:
                return None
            if length == _UNDEFINED:
                end = _skip_items(buf, pos + size, implicit or vr == b"UN")
                if keep is None or tag in keep:
                    values[tag] = b"\x01" if end - pos > size + 8 else b""  # presence of items only
            else:
                end = pos + size + length
                if end > len(buf):
                    return None
                if keep is None or tag in keep:
                    values[tag] = buf[pos + size : end]
            pos = end
    except (IndexError, ValueError, struct.error, UnicodeDecodeError):
        return None
    if not complete or pos != len(buf):
        return None  # the header goes on past what was read, or the file ends mid-element
    return FastHeader(FastElements(values), FastElements(meta), None, len(buf), implicit)
