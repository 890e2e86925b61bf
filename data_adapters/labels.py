"""Read a site's label manifest: a CSV with a key column and a `label` column, one row per case.

The key says what a row labels: one instance (SOPInstanceUID), a whole series (SeriesInstanceUID),
a study (StudyInstanceUID or AccessionNumber), or, for NIfTI sites, an image file. The key column
is detected from the header (the most specific one present wins) or set by `label-key`. Labels
are joined by key, never by file name of a DICOM, because archive exports rename files freely.
Every problem is one SiteDataError line naming the file, the row where relevant, and the fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fedcare.errors import SiteDataError

__all__ = ["read_labels", "read_manifest", "Manifest", "LABELS_FILENAME", "UID_COLUMN", "LABEL_COLUMN",
           "DICOM_KEYS", "FILE_KEYS"]

LABELS_FILENAME = "labels.csv"
UID_COLUMN = "SOPInstanceUID"
LABEL_COLUMN = "label"
# Most specific first: when a manifest carries several, a row labels the smallest unit it names.
DICOM_KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber")
FILE_KEYS = ("image", "filename", "file", "path")


@dataclass
class Manifest:
    """{key value: label} with the CSV line of each row, for errors that point at the row."""

    path: Path
    key: str
    labels: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)  # key value -> pseudonymous patient, if the site names a column

    def describe(self, values: list[str], limit: int = 5) -> str:
        """'rows 4, 9': where the key values are in the manifest.

        Rows, never the values: UIDs and accession numbers are patient data, and a site's error
        message travels to the server in its failed reply.
        """
        rows = sorted(self.rows.get(v, 0) for v in values)
        shown = ", ".join(str(r) for r in rows[:limit]) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
        return f"row{'s' if len(rows) > 1 else ''} {shown}"


def _expected(key: str) -> str:
    return f"a CSV with header '{key},{LABEL_COLUMN}' and one row per case"


def _fail(path: Path, problem: str, fix: str, row: int | None = None) -> SiteDataError:
    where = f"{path}" if row is None else f"{path} row {row}"
    return SiteDataError(f"label manifest {where}: {problem}; {fix}")


def _read_text(path: Path, key: str) -> str:
    if not path.exists():
        raise SiteDataError(f"label manifest {path} does not exist: write {_expected(key)} or point to the right file")
    if not path.is_file():
        raise _fail(path, "is not a file", f"point to {_expected(key)}")
    try:
        # utf-8-sig: spreadsheet programs often prepend a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _fail(path, "is not UTF-8 text", f"save it as UTF-8 {_expected(key)}") from None
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or type(exc).__name__})", "check its permissions") from None


def _key_column(path: Path, names: list[str], header: list[str], key: str | None, allowed: tuple[str, ...]) -> str:
    if key is not None:
        if key.lower() not in names:
            found = ",".join(header)[:80]
            raise _fail(path, f"header has no '{key}' column (found: {found})", f"make it {_expected(key)}", 1)
        return next(k for k in allowed + (key,) if k.lower() == key.lower())
    for candidate in allowed:
        if candidate.lower() in names:
            return candidate
    found = ",".join(header)[:80]
    raise _fail(path, f"header has no key column (found: {found})",
                f"name one of {', '.join(allowed)} and a '{LABEL_COLUMN}' column", 1)


def read_manifest(csv_path: Path, key: str | None = None, allowed: tuple[str, ...] = DICOM_KEYS,
                  patient_column: str = "", classes: tuple[str, ...] = ()) -> Manifest:
    """Read a manifest keyed by `key`, or by the most specific column of `allowed` it holds.

    Extra columns are ignored and blank lines skipped. With the run's `classes` (names in label
    order), a label is a class name or its index, and anything else stops with the row; without
    them, any non-negative integer. A key value may appear only once. `patient_column` names a column
    of pseudonymous patient keys (the site's `patient-key`); a row with it empty is its own patient.
    """
    path = Path(csv_path)
    if key is not None and key.lower() not in {k.lower() for k in allowed}:
        raise SiteDataError(f"label-key {key!r} is not one of {', '.join(allowed)}: set label-key to one of them")
    text = _read_text(path, key or allowed[0])
    if not text.strip():
        raise _fail(path, "is empty", f"write {_expected(key or allowed[0])}")
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
        names = [h.strip().lower() for h in header]
        key = _key_column(path, names, header, key, allowed)
        if LABEL_COLUMN not in names:
            raise _fail(path, f"header has no '{LABEL_COLUMN}' column (found: {','.join(header)[:80]})",
                        f"make it {_expected(key)}", 1)
        manifest = Manifest(path=path, key=key)
        if patient_column and patient_column.lower() not in names:
            raise _fail(path, f"header has no '{patient_column}' column, which the site's patient-key names",
                        "add the column or change patient-key", 1)
        patient_col = names.index(patient_column.lower()) if patient_column else None
        _read_rows(manifest, reader, names.index(key.lower()), names.index(LABEL_COLUMN), patient_col,
                   ClassLabels(classes))
    except csv.Error as exc:
        raise _fail(path, f"is not valid CSV ({exc})", f"write {_expected(key or allowed[0])}", reader.line_num) from None
    if not manifest.labels:
        raise _fail(path, "has a header but no rows", "add one row per labelled case")
    return manifest


class ClassLabels:
    """Reads a label cell: a class name of the run, or its index; without names, any non-negative integer."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = names
        self.index = {name.lower(): label for label, name in enumerate(names)}

    def __call__(self, raw: str) -> int | None:
        """The label's class index, or None when it names no class of the run."""
        if raw.lower() in self.index:
            return self.index[raw.lower()]
        try:
            label = int(raw)
        except ValueError:
            return None
        return label if 0 <= label < (len(self.names) if self.names else label + 1) else None

    def fix(self) -> str:
        if not self.names:
            return "use class indices 0, 1, ..."
        listed = ", ".join(f"{label} {name}" for label, name in enumerate(self.names))
        return (f"the run's classes are {listed}: relabel the row with one of them, drop it, or add its class "
                "to the run's classes")


def _read_rows(manifest: Manifest, reader, key_col: int, label_col: int, patient_col: int | None,
               read_label: ClassLabels) -> None:
    path, key = manifest.path, manifest.key
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(key_col, label_col):
            problem = f"has {len(row)} column(s), expected at least {max(key_col, label_col) + 1}"
            raise _fail(path, problem, "fill in both columns", line)
        value, raw_label = row[key_col].strip(), row[label_col].strip()
        if not value:
            raise _fail(path, f"{key} is empty", f"give the {key} of the case", line)
        label = read_label(raw_label)
        if label is None:
            kind = "a class of the run" if read_label.names else "a non-negative integer"
            raise _fail(path, f"label {raw_label[:20]!r} is not {kind}", read_label.fix(), line)
        if value in manifest.labels:
            raise _fail(path, f"{key} repeats row {manifest.rows[value]}", "keep one row per case", line)
        manifest.labels[value] = label
        manifest.rows[value] = line
        if patient_col is not None and len(row) > patient_col and row[patient_col].strip():
            manifest.patients[value] = row[patient_col].strip()


def read_labels(csv_path: Path) -> dict[str, int]:
    """Return {SOPInstanceUID: label} from an instance-level manifest; raise SiteDataError if unusable."""
    return read_manifest(csv_path, key=UID_COLUMN).labels
