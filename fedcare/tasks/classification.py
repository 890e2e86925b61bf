"""Classification of an image (2D) or a series (3D) into the run's classes: two or more.

The classes are the run config's (`classes`, names in order); a site's labels.csv names each case's
class by its name or its index, and a label outside the run's classes stops the site with the
manifest row. The network has one output per class. A site reports loss, accuracy, the macro
one-vs-rest ROC AUC (with two classes, the ordinary AUC), each class's one-vs-rest AUC and the
confusion matrix of its validation split, as counts the server adds up over sites.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from data_adapters import site_datasets
from data_adapters.dataset import SiteDatasets
from fedcare.config import RunConfig
from fedcare.device import model_device
from fedcare.sites import Site
from fedcare.tasks.base import SiteCounts, Task
from fedcare.training import make_loader


# Per class: two to learn from (one alone is memorised, not learnt), one to validate, so that
# every class is seen by the validation AUC (with one class only it is 0.5 whatever the model does).
MIN_TRAIN_PER_CLASS = 2
MIN_VAL_PER_CLASS = 1


def class_auc_name(label: int) -> str:
    return f"auc-{label}"


def confusion_name(true: int, predicted: int) -> str:
    return f"confusion-{true}-{predicted}"


class Classification(Task):
    name = "classification"
    headline = "auc"
    metrics = ("loss", "accuracy", "auc", r"auc-\d+", r"confusion-\d+-\d+")
    counts = r"confusion-\d+-\d+"

    def out_channels(self, config: RunConfig) -> int:
        return len(config.class_names)

    def output_fits(self, output: Any, size: tuple[int, ...]) -> bool:
        return output.dim() == 2

    def config_problems(self, config: RunConfig) -> list[str]:
        if config.in_channels != 1 and config.input_mode == "3d" and config.data_format == "dicom":
            return [f"run config: 'in-channels' = {config.in_channels} with input-mode 3d needs NIfTI volumes "
                    "(data-format = \"nifti\", channels along the fourth axis): DICOM series are read as one channel"]
        return []

    def datasets(self, config: RunConfig, site: Site, split: Any) -> SiteDatasets:
        policy = site.policy
        return site_datasets(
            site.data_path, split, config.image_size, window=config.window_range,
            input_mode=config.input_mode, label_key=config.label_key or None, irregular=config.irregular_series,
            data_format=config.data_format, cache_dir=site.cache_path, patient_key=policy.patient_key,
            missing_images=policy.missing_images, classes=config.class_names, channels=config.in_channels,
        )

    def loss(self, config: RunConfig) -> nn.Module:
        return nn.CrossEntropyLoss()

    def evaluate(self, model: nn.Module, data: SiteDatasets, config: RunConfig) -> dict[str, float]:
        return evaluate_classes(model, data.val, config.batch_size, len(config.class_names))

    def site_problems(self, config: RunConfig, counts: SiteCounts, val_fraction: float) -> list[str]:
        problems = []
        for label, name in enumerate(config.class_names):
            train, val = counts.train_per_class.get(label, 0), counts.val_per_class.get(label, 0)
            if train < MIN_TRAIN_PER_CLASS or val < MIN_VAL_PER_CLASS:
                problems.append(f"class {label} ({name}) has {train} training and {val} validation case(s) with "
                                f"the site's val-fraction {val_fraction}; it needs at least {MIN_TRAIN_PER_CLASS} "
                                f"and {MIN_VAL_PER_CLASS}: label more cases of class {label}")
        return problems


    def summary_lines(self, figures: dict[str, float], config: RunConfig) -> list[str]:
        names = config.class_names
        if class_auc_name(0) not in figures:
            return []
        lines = ["## Per class (all sites, last evaluated round)", "",
                 "| class | one-vs-rest AUC | validation cases |", "|---|---|---|"]
        for label, name in enumerate(names):
            cases = sum(int(figures.get(confusion_name(label, p), 0)) for p in range(len(names)))
            lines.append(f"| {label} {name} | {figures[class_auc_name(label)]:.3f} | {cases} |")
        lines += ["", "Confusion matrix (rows: true class, columns: predicted class; validation cases summed "
                  "over sites):", "", "| true \\ predicted | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for true, name in enumerate(names):
            cells = " | ".join(str(int(figures.get(confusion_name(true, p), 0))) for p in range(len(names)))
            lines.append(f"| {name} | {cells} |")
        return lines


@torch.no_grad()
def evaluate_classes(model: nn.Module, dataset: Dataset, batch_size: int, num_classes: int) -> dict[str, float]:
    """Loss, accuracy, macro and per-class one-vs-rest ROC AUC, and the confusion counts on a split."""
    model.eval()
    device = model_device(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, scores, targets = 0.0, [], []
    for images, labels in make_loader(dataset, batch_size, None, shuffle=False):
        logits = model(images.to(device))
        total_loss += float(loss_fn(logits, labels.to(device)))
        scores.append(torch.softmax(logits, dim=1).cpu().numpy())
        targets.append(labels.numpy())
    score, target = np.concatenate(scores), np.concatenate(targets)
    predicted = score.argmax(axis=1)
    per_class = {class_auc_name(k): one_vs_rest_auc(target == k, score[:, k]) for k in range(num_classes)}
    confusion = {confusion_name(t, p): int(np.sum((target == t) & (predicted == p)))
                 for t in range(num_classes) for p in range(num_classes)}
    return {
        "loss": total_loss / len(target),
        "accuracy": float(np.mean(predicted == target)),
        "auc": float(np.mean(list(per_class.values()))),
        **per_class,
        **confusion,
    }


def one_vs_rest_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the cases marked `positive`: the chance that a random positive case
    scores above a random other one, ties counting half (the Mann-Whitney U statistic)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:  # undefined for a split holding this class only, or none of it: chance
        return 0.5
    values, inverse, counts = np.unique(np.asarray(score), return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, tied scores sharing their mean rank
    ranks = mean_rank[inverse.ravel()]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
