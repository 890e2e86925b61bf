"""The readiness report a site reads before it joins a federation: what its folder holds and what
training on it would cost in privacy. Whether the site is ready is decided by the rules in
fedcare.readiness, the same ones `fedcare run` and the site's ClientApp apply.

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
from fedcare.policy import SitePolicy
from fedcare.privacy.record import PATIENT
from fedcare.readiness import SiteCounts, site_problems

from .dataset import per_class, split_indices
from .dicom import SiteImages, load_site
from .headers import MEDIA_DIRECTORY, InstanceHeader
from .index import DUPLICATE
from .labels import LABELS_FILENAME, Manifest, read_manifest
from .nifti import load_nifti_site, nifti_files, nifti_manifest
from .transforms import Preprocess

__all__ = ["SiteCheck", "check_site", "privacy_estimate"]

_NOT_AN_INSTANCE = ("not a DICOM file", "unreadable DICOM", "cannot open file", "DICOMDIR")


@dataclass
class SiteCheck:
    """The report as a plain dict (`report`), and whether the site is ready to train."""

    report: dict[str, Any]

    @property
    def ready(self) -> bool:
        return bool(self.report["ready"])


# check-site without a site's own settings: every policy key at its default (the budget plays no
# part in readiness); a site passes its own policy.
DEFAULT_POLICY = SitePolicy(budget_epsilon=math.inf)

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


def privacy_estimate(num_train: int, config: RunConfig, policy: SitePolicy = DEFAULT_POLICY) -> dict[str, Any]:
    """Sample rate, steps and the epsilon the configured run would spend with `num_train` units (patients
    or images, per the site's privacy unit), under the site's own policy.

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
    delta = policy.budget_delta or default_delta(num_train)
    accountant = policy.accountant
    sigma = config.noise_multiplier or noise_multiplier_for(
        target_epsilon=config.target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant,
    )
    return {
        "dp": True, "privacy_unit": policy.privacy_unit, "num_train": num_train, "batch_size": config.batch_size,
        "sample_rate": sample_rate,
        "steps": steps, "noise_multiplier": sigma, "delta": delta, "accountant": accountant,
        "epsilon": epsilon([(sigma, sample_rate, steps)], delta, accountant),
        "target_epsilon": config.target_epsilon,
    }


def _manifest(folder: Path, labels: Path | None, label_key: str | None, patient_key: str,
              classes: tuple[str, ...], problems: list[str]) -> Manifest | None:
    path = labels if labels is not None else folder / LABELS_FILENAME
    if labels is None and not path.exists():
        problems.append(f"no label manifest: pass --labels or write {path}")
        return None
    try:
        return read_manifest(path, key=label_key, patient_column=patient_key, classes=classes)
    except FedcareError as err:
        problems.append(str(err))
        return None


def _label_summary(site: SiteImages, manifest: Manifest | None, config: RunConfig, policy: SitePolicy,
                   problems: list[str], warnings: list[str]) -> dict:
    classes, counts = np.unique(site.labels, return_counts=True)
    per_label = {str(int(c)): int(n) for c, n in zip(classes, counts)}
    summary: dict[str, Any] = {"labelled": int(len(site.labels)), "per_class": per_label, "unlabelled": site.unlabelled}
    summary["smallest_class"] = (
        {"label": int(classes[np.argmin(counts)]), "count": int(counts.min())} if len(counts) else None
    )
    train, val = split_indices(site.labels, policy.val_fraction, 0, site.groups) if len(counts) else ([], [])
    summary["num_train"], summary["num_val"] = int(len(train)), int(len(val))
    summary["num_train_patients"] = len({site.groups[i] for i in train})  # DP-SGD's N at patient level
    if manifest is None:
        return summary
    summary["missing_labels"] = [{"row": manifest.rows[v]} for v in site.missing]
    if site.missing:
        line = (f"{len(site.missing)} manifest row(s) match no readable image ({manifest.describe(site.missing)}): "
                "fix those files (see 'Files left out') or drop their rows from the manifest")
        if policy.missing_images == "stop":
            problems.append(line + " (missing-images = \"stop\")")
        else:
            warnings.append(line + "; the site trains on its other cases (missing-images = \"report\")")
    labels = site.labels
    counts_of = SiteCounts(len(train), len(val), per_class(labels[train]) if len(train) else {},
                           per_class(labels[val]) if len(val) else {})
    problems += site_problems(config, counts_of, policy)
    return summary


def check_site(
    folder: Path,
    labels: Path | None = None,
    config: RunConfig | None = None,
    *,
    label_key: str | None = None,
    input_mode: str | None = None,
    irregular: str | None = None,
    window: str | tuple[float, float] | None = None,
    cache_dir: Path | None = None,
    policy: SitePolicy = DEFAULT_POLICY,
) -> SiteCheck:
    """Index and decode every file under `folder`, join the labels, estimate the privacy cost and
    apply the readiness rules of fedcare.readiness.

    Settings left at None are the run config's; `policy` is the site's own (its budget-delta,
    val-fraction, accountant and privacy unit decide the estimate). The images are preprocessed as
    training would (window, image size, channels), so `cache_dir` is filled with exactly the arrays
    the first round will ask for. The run config's data-format says whether the folder holds DICOM or NIfTI.
    """
    config = config or RunConfig()
    input_mode = input_mode or config.input_mode
    window = window if window is not None else config.window
    problems: list[str] = []
    warnings: list[str] = []
    if config.data_format == "nifti":
        site, manifest, report = _nifti_files(Path(folder), labels, config, input_mode, window, cache_dir, problems)
    else:
        label_key = label_key if label_key is not None else (config.label_key or None)
        manifest = _manifest(Path(folder), labels, label_key, policy.patient_key, config.class_names, problems)
        site, report = _dicom_files(Path(folder), manifest, config, input_mode, irregular or config.irregular_series,
                                    window, cache_dir)
    report |= {
        "input_mode": input_mode,
        "label_manifest": str(manifest.path) if manifest else None,
        "label_key": manifest.key if manifest else None,
        **_label_summary(site, manifest, config, policy, problems, warnings),
    }
    if not report["images_readable"]:
        kind = "NIfTI" if config.data_format == "nifti" else "DICOM"
        problems.append(f"no readable {kind} image in the folder{site.commonest_failure()}")
    try:
        units = report["num_train_patients"] if policy.privacy_unit == PATIENT else report["num_train"]
        report["privacy"] = privacy_estimate(units, config, policy) if manifest else {"dp": config.dp}
    except FedcareError:
        report["privacy"] = {"dp": config.dp}  # no training case: the rules above already say so
    report["warnings"] = warnings + [
        f"{item['tag']} is filled in {item['instances']} instance(s): the data may not be de-identified"
        for item in report["identifying"] if item["marked_deidentified"] < item["instances"]
    ]
    report["problems"] = problems
    report["ready"] = not problems
    return SiteCheck(report)


def _dicom_files(folder: Path, manifest: Manifest | None, config: RunConfig, input_mode: str, irregular: str,
                 window: str | tuple[float, float], cache_dir: Path | None) -> tuple[SiteImages, dict[str, Any]]:
    """A DICOM folder's labelled samples and what its files hold: series, left-out files, identifying tags."""
    channels = config.in_channels
    # File-level counts come from decoding every file as 2D images; in 3D mode the labels are
    # then joined to series volumes in a second pass.
    files = load_site(folder, manifest if input_mode == "2d" else None, decode_all=True, strict=False,
                      preprocess=Preprocess(window, config.image_size, channels=channels), cache_dir=cache_dir)
    site = files if input_mode == "2d" else load_site(
        folder, manifest, input_mode="3d", irregular=irregular, cache_dir=cache_dir, strict=False,
        preprocess=Preprocess(window, config.image_size, volume=True, channels=channels),
    )
    index = files.index
    assert index is not None
    left_out = index.skipped + [(path, MEDIA_DIRECTORY) for path in index.directories] + files.failures
    not_instances = sum(1 for path, reason in left_out if reason.startswith(_NOT_AN_INSTANCE))
    return site, {
        "folder": str(folder),
        "files": index.files,
        "dicom_instances": index.files - not_instances - len(index.duplicates),
        "series": len(index.series()),
        "series_by_modality": _series_groups(index.instances),
        "images_readable": len(files.readable),
        "frames_readable": int(sum(files.readable.values())),
        "unreadable": [{"path": path, "reason": reason} for path, reason in left_out],
        "duplicates": [{"path": h.path, "reason": DUPLICATE} for h in index.duplicates if h.path in files.readable],
        "excluded_series": [{"path": p, "reason": r} for p, r in site.excluded],
        "identifying": _identifying(index.instances),
    }


def _nifti_files(folder: Path, labels: Path | None, config: RunConfig, input_mode: str,
                 window: str | tuple[float, float], cache_dir: Path | None,
                 problems: list[str]) -> tuple[SiteImages, Manifest | None, dict[str, Any]]:
    """A NIfTI folder's labelled samples and what its files hold (NIfTI headers carry no patient tags)."""
    manifest = None
    try:
        manifest = nifti_manifest(folder, labels, config.class_names)
    except FedcareError as err:
        problems.append(str(err))
    preprocess = Preprocess(window, config.image_size, volume=input_mode == "3d", channels=config.in_channels)
    site = (load_nifti_site(folder, manifest, input_mode=input_mode, preprocess=preprocess, cache_dir=cache_dir,
                            strict=False) if manifest is not None else SiteImages())
    return site, manifest, {
        "folder": str(folder),
        "files": len(nifti_files(folder, manifest)),
        "dicom_instances": 0, "series": 0, "series_by_modality": [],
        "images_readable": len(site.readable),
        "frames_readable": int(sum(site.readable.values())),
        "unreadable": [{"path": path, "reason": reason} for path, reason in site.failures],
        "duplicates": [], "excluded_series": [], "identifying": [],
    }
