"""Fast, read-only access to a parsed DICOM dataset's elements by keyword.

pydicom converts an element on first access and compares tags in Python; an index reads a few
dozen values from thousands of files, so `Elements` keys the raw elements by plain int and decodes
the few value representations it needs itself (numbers and ASCII strings), leaving the rest to
pydicom.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

__all__ = ["Elements", "decode_value", "mask", "tag_and_vr"]


def mask(value: str) -> str:
    """Enough to recognise that a value is there, not enough to identify anyone."""
    value = value.strip()
    return f"{value[:1]}***" if value else ""


@lru_cache(maxsize=None)
def tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag), dictionary_VR(tag)


def decode_value(vr: str, data: bytes, little_endian: bool) -> Any:
    """A raw value as int (US, SS) or str (everything else this project reads)."""
    if vr in ("US", "SS"):
        order = "little" if little_endian else "big"
        return int.from_bytes(data[:2], order, signed=vr == "SS") if len(data) >= 2 else None
    try:
        # Display and grouping only: a wrong guess at the character set cannot change a UID or number.
        return data.decode("utf-8").strip(" \x00")
    except UnicodeDecodeError:
        return data.decode("latin-1").strip(" \x00")


class Elements:
    """A dataset's elements by keyword; nested sequence items are wrapped the same way."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.raw = {int(tag): elem for tag, elem in ds._dict.items()}

    def value(self, keyword: str) -> Any:
        tag, vr = tag_and_vr(keyword)
        elem = self.raw.get(tag)
        if elem is None:
            return None
        if not isinstance(elem, RawDataElement):
            return elem.value
        if elem.value is None or vr == "SQ":
            return self.ds[tag].value
        return decode_value(vr, elem.value, elem.is_little_endian)

    def text(self, keyword: str) -> str:
        value = self.value(keyword)
        return "" if value is None else str(value).strip()

    def numbers(self, keyword: str) -> tuple[float, ...] | None:
        value = self.value(keyword)
        if value is None or value == "":
            return None
        try:
            if isinstance(value, str):
                return tuple(float(part) for part in value.split("\\"))
            if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
                return tuple(float(v) for v in value)
            return (float(value),)
        except (TypeError, ValueError):
            return None

    def number(self, keyword: str) -> float | None:
        values = self.numbers(keyword)
        return values[0] if values else None

    def items(self, keyword: str) -> list["Elements"]:
        return [Elements(item) for item in self.value(keyword) or []]

    def first(self, *keywords: str) -> "Elements | None":
        """The first item along a path of nested sequences, e.g. shared groups -> pixel measures."""
        current: Elements | None = self
        for keyword in keywords:
            items = current.value(keyword) if current is not None else None
            current = Elements(items[0]) if items else None
        return current
