"""Read a site's label manifest: a CSV with columns SOPInstanceUID and label (one row per image).

Labels are joined to DICOM files by SOPInstanceUID, never by file name, because archive exports
rename files freely. Every problem is reported as one SiteDataError line naming the file, the
row where relevant, and what to change.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedcare.errors import SiteDataError

__all__ = ["read_labels", "LABELS_FILENAME", "UID_COLUMN", "LABEL_COLUMN"]

LABELS_FILENAME = "labels.csv"
UID_COLUMN = "SOPInstanceUID"
LABEL_COLUMN = "label"
_EXPECTED = f"a CSV with header '{UID_COLUMN},{LABEL_COLUMN}' and one row per DICOM instance"


def _fail(path: Path, problem: str, fix: str, row: int | None = None) -> SiteDataError:
    where = f"{path}" if row is None else f"{path} row {row}"
    return SiteDataError(f"label manifest {where}: {problem}; {fix}")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise SiteDataError(f"label manifest {path} does not exist: write {_EXPECTED} or point to the right file")
    if not path.is_file():
        raise _fail(path, "is not a file", f"point to {_EXPECTED}")
    try:
        # utf-8-sig: spreadsheet programs often prepend a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _fail(path, "is not UTF-8 text", f"save it as UTF-8 {_EXPECTED}") from None
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or type(exc).__name__})", "check its permissions") from None


def _column_indices(path: Path, header: list[str]) -> tuple[int, int]:
    names = [h.strip().lower() for h in header]
    found = []
    for column in (UID_COLUMN, LABEL_COLUMN):
        if column.lower() not in names:
            found_text = ",".join(header)[:80]
            raise _fail(path, f"header has no '{column}' column (found: {found_text})", f"make it {_EXPECTED}", 1)
        found.append(names.index(column.lower()))
    return found[0], found[1]


def read_labels(csv_path: Path) -> dict[str, int]:
    """Return {SOPInstanceUID: label} from a manifest; raise SiteDataError if it is unusable.

    Extra columns are ignored and blank lines skipped. Labels must be non-negative integers
    (class indices); a UID may appear only once.
    """
    path = Path(csv_path)
    text = _read_text(path)
    if not text.strip():
        raise _fail(path, "is empty", f"write {_EXPECTED}")
    reader = csv.reader(text.splitlines())
    labels: dict[str, int] = {}
    first_row: dict[str, int] = {}
    try:
        uid_col, label_col = _column_indices(path, next(reader))
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(uid_col, label_col):
                problem = f"has {len(row)} column(s), expected at least {max(uid_col, label_col) + 1}"
                raise _fail(path, problem, "fill in both columns", line)
            uid, raw_label = row[uid_col].strip(), row[label_col].strip()
            if not uid:
                raise _fail(path, f"{UID_COLUMN} is empty", "give the SOPInstanceUID of the image", line)
            try:
                label = int(raw_label)
            except ValueError:
                label = -1
            if label < 0:
                problem = f"label {raw_label[:20]!r} is not a non-negative integer"
                raise _fail(path, problem, "use class indices 0, 1, ...", line)
            if uid in labels:
                raise _fail(path, f"SOPInstanceUID repeats row {first_row[uid]}", "keep one row per instance", line)
            labels[uid] = label
            first_row[uid] = line
    except csv.Error as exc:
        raise _fail(path, f"is not valid CSV ({exc})", f"write {_EXPECTED}", reader.line_num) from None
    if not labels:
        raise _fail(path, "has a header but no rows", "add one row per labelled DICOM instance")
    return labels
