"""Train/validation splits of a site's cases: the site's own, made once and kept.

`StoredSplit` is what a site trains with. It draws a secret salt from the operating system once,
stores it with the side of every group of cases in the site's state folder (`split.json`), and
gives a group the same side in every later round and run: nothing in the run config (no seed, no
validation fraction) moves a case from one side to the other. Group keys are stored only as salted
hashes, so the file names no patient, series or instance. Cases added later are split among
themselves, stratified, and kept from then on.

`SeededSplit` is the reproducible split from a seed, for benchmarks and tests off the site.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedcare.atomic import write_atomic
from fedcare.errors import SiteDataError

__all__ = ["SeededSplit", "Split", "StoredSplit", "split_indices"]

TRAIN, VALIDATION = "train", "val"


def split_indices(
    labels: np.ndarray, val_fraction: float, seed: int, groups: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of sample indices into (train, validation), both sorted.

    Each class sends round(n * val_fraction) of its n cases to validation, but at least one
    and never all of them when it has two or more, so validation sees every class and training
    keeps every class. With `groups` (e.g. the frames of one multi-frame instance, or the images
    of one labelled series), whole groups are split, so no case is in both.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SiteDataError(f"val-fraction must be in [0, 1), got {val_fraction}: choose e.g. 0.2")
    if groups is not None:
        return _split_groups(np.asarray(labels), val_fraction, seed, groups)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        elif len(members) < 2:
            n_val = 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return _sorted_index(train), _sorted_index(val)


def _split_groups(labels: np.ndarray, val_fraction: float, seed: int, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # Groups in order of first appearance: with one sample per group this is the plain split.
    first: dict[str, int] = {}
    member = np.array([first.setdefault(g, len(first)) for g in groups], dtype=np.int64)
    group_labels = np.zeros(len(first), dtype=labels.dtype)
    group_labels[member] = labels
    train_groups, val_groups = split_indices(group_labels, val_fraction, seed)
    return np.flatnonzero(np.isin(member, train_groups)), np.flatnonzero(np.isin(member, val_groups))


def _sorted_index(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class Split(Protocol):
    """Splits sample indices into (train, validation), keeping each group of samples on one side."""

    def __call__(self, labels: np.ndarray, groups: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SeededSplit:
    """The stratified split that `seed` fixes: reproducible anywhere, so never a site's own."""

    val_fraction: float = 0.2
    seed: int = 42

    def __call__(self, labels: np.ndarray, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return split_indices(labels, self.val_fraction, self.seed, groups or None)


class StoredSplit:
    """The site's split, kept in `path`; `val_fraction` applies to groups seen for the first time."""

    def __init__(self, path: Path, val_fraction: float) -> None:
        self.path = Path(path)
        self.val_fraction = val_fraction

    def __call__(self, labels: np.ndarray, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(labels)
        groups = groups or [str(index) for index in range(len(labels))]
        salt, sides = self._read()
        keys = [hashlib.sha256((salt + group).encode()).hexdigest()[:24] for group in groups]
        new = [index for index, key in enumerate(keys) if key not in sides]
        if new:
            seed = int.from_bytes(os.urandom(8), "little")
            train, val = split_indices(labels[new], self.val_fraction, seed, [keys[index] for index in new])
            sides.update({keys[new[i]]: TRAIN for i in train} | {keys[new[i]]: VALIDATION for i in val})
            self._write(salt, sides)
        side = np.array([sides[key] for key in keys])
        return np.flatnonzero(side == TRAIN), np.flatnonzero(side == VALIDATION)

    def _read(self) -> tuple[str, dict[str, str]]:
        if not self.path.is_file():
            return os.urandom(16).hex(), {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            return str(document["salt"]), {str(k): str(v) for k, v in document["sides"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SiteDataError(f"{self.path}: the site's train/validation split is unreadable; restore it from "
                                "backup (deleting it makes a new split, mixing cases the model saw into validation)") from None

    def _write(self, salt: str, sides: dict[str, str]) -> None:
        document = {"salt": salt, "sides": dict(sorted(sides.items()))}
        write_atomic(self.path, (json.dumps(document, indent=0) + "\n").encode("ascii"))
