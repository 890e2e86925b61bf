"""The readiness report a site reads before it joins a federation: what its folder holds and what
training on it would cost in privacy.

Everything in the report is a count, a file path inside the site's own folder, a reason, or a
masked value: no pixel data, and no identifying header value in clear. The report never leaves the
site; it is what `fedcare check-site` prints.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.policy import POLICY_DEFAULTS

from .dataset import split_indices
from .dicom import SiteImages, load_site
from .headers import MEDIA_DIRECTORY, InstanceHeader
from .index import DUPLICATE
from .labels import LABELS_FILENAME, Manifest, read_manifest

__all__ = ["SiteCheck", "check_site", "privacy_estimate"]

_NOT_AN_INSTANCE = ("not a DICOM file", "unreadable DICOM", "cannot open file", "DICOMDIR")
_MIN_PER_CLASS = 2  # a class needs a case in training and one in validation


@dataclass
class SiteCheck:
    """The report as a plain dict (`report`), and whether the site is ready to train."""

    report: dict[str, Any]

    @property
    def ready(self) -> bool:
        return bool(self.report["ready"])


def _series_groups(instances: list[InstanceHeader]) -> list[dict[str, Any]]:
    series: dict[tuple[str, str], set[str]] = {}
    counts: Counter = Counter()
    for h in instances:
        series.setdefault((h.modality, h.manufacturer), set()).add(h.series_uid)
        counts[(h.modality, h.manufacturer)] += 1
    return [
        {"modality": modality, "manufacturer": vendor, "series": len(uids), "instances": counts[(modality, vendor)]}
        for (modality, vendor), uids in sorted(series.items())
    ]


def _identifying(instances: list[InstanceHeader]) -> list[dict[str, Any]]:
    """Which identifying attributes are filled in, in how many instances, with one masked example."""
    found: dict[str, list] = {}
    for h in instances:
        for keyword, masked in h.identifying:
            entry = found.setdefault(keyword, [0, masked, 0])
            entry[0] += 1
            entry[2] += int(h.deidentified)
    return [
        {"tag": keyword, "instances": n, "example": example, "marked_deidentified": marked}
        for keyword, (n, example, marked) in sorted(found.items())
    ]


def privacy_estimate(num_train: int, config: RunConfig) -> dict[str, Any]:
    """Sample rate, steps and the epsilon the configured run would spend with `num_train` samples.

    Mirrors `fedcare.privacy.dpsgd.plan_round`: q = 1/ceil(N/B), steps = rounds x epochs x ceil(N/B),
    sigma from the whole run's target unless the config fixes it.
    """
    from fedcare.privacy.accounting import default_delta, epsilon, noise_multiplier_for

    if not config.dp:
        return {"dp": False}
    if num_train < 1:
        raise FedcareError("no training samples: label at least one image per class")
    epoch_steps = math.ceil(num_train / config.batch_size)
    sample_rate = 1.0 / epoch_steps
    steps = config.num_server_rounds * config.local_epochs * epoch_steps
    delta = config.target_delta or default_delta(num_train)
    accountant = POLICY_DEFAULTS["accountant"]
    sigma = config.noise_multiplier or noise_multiplier_for(
        target_epsilon=config.target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant,
    )
    return {
        "dp": True, "num_train": num_train, "batch_size": config.batch_size, "sample_rate": sample_rate,
        "steps": steps, "noise_multiplier": sigma, "delta": delta, "accountant": accountant,
        "epsilon": epsilon([(sigma, sample_rate, steps)], delta, accountant),
        "target_epsilon": config.target_epsilon,
    }


def _manifest(folder: Path, labels: Path | None, label_key: str | None, problems: list[str]) -> Manifest | None:
    path = labels if labels is not None else folder / LABELS_FILENAME
    if labels is None and not path.exists():
        problems.append(f"no label manifest: pass --labels or write {path}")
        return None
    try:
        return read_manifest(path, key=label_key)
    except FedcareError as err:
        problems.append(str(err))
        return None


def _label_summary(site: SiteImages, manifest: Manifest | None, config: RunConfig, problems: list[str]) -> dict:
    classes, counts = np.unique(site.labels, return_counts=True)
    per_class = {str(int(c)): int(n) for c, n in zip(classes, counts)}
    summary: dict[str, Any] = {"labelled": int(len(site.labels)), "per_class": per_class, "unlabelled": site.unlabelled}
    summary["smallest_class"] = (
        {"label": int(classes[np.argmin(counts)]), "count": int(counts.min())} if len(counts) else None
    )
    if manifest is not None:
        summary["missing_labels"] = [{"row": manifest.rows[v]} for v in site.missing]
        if site.missing:
            problems.append(f"{len(site.missing)} manifest row(s) match no readable image "
                            f"({manifest.describe(site.missing)})")
        if len(counts) < 2:
            problems.append(f"labelled images cover {len(counts)} class(es): a classifier needs at least 2")
        elif counts.min() < _MIN_PER_CLASS:
            problems.append(f"class {int(classes[np.argmin(counts)])} has {int(counts.min())} labelled case(s): "
                            f"it needs at least {_MIN_PER_CLASS} (one to train, one to validate)")
    # The site's own split is drawn from its entropy; the estimate takes one of the same size.
    val_fraction = POLICY_DEFAULTS["val-fraction"]
    train, _ = split_indices(site.labels, val_fraction, 0, site.groups) if len(counts) else ([], [])
    summary["num_train"] = int(len(train))
    return summary


def check_site(
    folder: Path,
    labels: Path | None = None,
    config: RunConfig | None = None,
    *,
    label_key: str | None = None,
    input_mode: str = "2d",
    irregular: str = "exclude",
    window: str | tuple[float, float] = "soft-tissue",
    cache_dir: Path | None = None,
) -> SiteCheck:
    """Index and decode every file under `folder`, join the labels and estimate the privacy cost.

    The images are preprocessed as training would (window, image size), so `cache_dir` is filled
    with exactly the arrays the first round will ask for.
    """
    from .transforms import Preprocess

    config = config or RunConfig()
    problems: list[str] = []
    manifest = _manifest(Path(folder), labels, label_key, problems)
    # File-level counts come from decoding every file as 2D images; in 3D mode the labels are
    # then joined to series volumes in a second pass.
    files = load_site(folder, manifest if input_mode == "2d" else None, decode_all=True, strict=False,
                      preprocess=Preprocess(window, config.image_size), cache_dir=cache_dir)
    site = files if input_mode == "2d" else load_site(
        folder, manifest, input_mode="3d", irregular=irregular, cache_dir=cache_dir, strict=False,
        preprocess=Preprocess(window, config.image_size, volume=True),
    )
    index = files.index
    assert index is not None
    left_out = index.skipped + [(path, MEDIA_DIRECTORY) for path in index.directories] + files.failures
    unreadable = [{"path": path, "reason": reason} for path, reason in left_out]
    not_instances = sum(1 for path, reason in left_out if reason.startswith(_NOT_AN_INSTANCE))
    report: dict[str, Any] = {
        "folder": str(folder),
        "files": index.files,
        "dicom_instances": index.files - not_instances - len(index.duplicates),
        "series": len(index.series()),
        "series_by_modality": _series_groups(index.instances),
        "images_readable": len(files.readable),
        "frames_readable": int(sum(files.readable.values())),
        "input_mode": input_mode,
        "label_manifest": str(manifest.path) if manifest else None,
        "label_key": manifest.key if manifest else None,
        **_label_summary(site, manifest, config, problems),
        "unreadable": unreadable,
        "duplicates": [{"path": h.path, "reason": DUPLICATE} for h in index.duplicates if h.path in files.readable],
        "excluded_series": [{"path": p, "reason": r} for p, r in site.excluded],
        "identifying": _identifying(index.instances),
    }
    if not files.readable:
        problems.append("no readable DICOM image in the folder")
    try:
        report["privacy"] = privacy_estimate(report["num_train"], config) if manifest else {"dp": config.dp}
    except FedcareError as err:
        report["privacy"] = {"dp": config.dp}
        problems.append(str(err))
    report["warnings"] = [
        f"{item['tag']} is filled in {item['instances']} instance(s): the data may not be de-identified"
        for item in report["identifying"] if item["marked_deidentified"] < item["instances"]
    ]
    report["problems"] = problems
    report["ready"] = not problems
    return SiteCheck(report)
