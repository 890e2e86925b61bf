"""What a task is: the data a site trains on, the loss, the metrics, and how models are ranked.

Everything in the project that differs between tasks asks the run's Task (`task_for(config)`):
the ClientApp for datasets, loss and evaluation; the readiness rules for what a site's data needs;
the ServerApp for the headline metric and whether higher is better (the best-model rule); the
egress audit for which metrics may leave a site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from data_adapters.dataset import SiteDatasets
from fedcare.config import RunConfig
from fedcare.sites import Site

__all__ = ["SiteCounts", "Task"]


@dataclass(frozen=True)
class SiteCounts:
    """How many cases a site trains and validates on, per class label (classification only)."""

    num_train: int
    num_val: int
    train_per_class: Mapping[int, int] = field(default_factory=dict)
    val_per_class: Mapping[int, int] = field(default_factory=dict)


class Task:
    """One kind of study. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    headline: str = ""             # the validation metric that ranks rounds and models
    higher_is_better: bool = True  # a loss-like headline keeps the lowest
    # Metrics a site may send (exact names, or regular expressions for per-class names).
    metrics: tuple[str, ...] = ("loss",)
    # Metrics that are counts: the server adds them up over sites instead of weighting them.
    counts: str = r"(?!)"          # a regular expression; by default none

    def out_channels(self, config: RunConfig) -> int:
        """The network's outputs: one per class (of an image, or of each pixel)."""
        raise NotImplementedError

    def input_size(self, config: RunConfig) -> tuple[int, ...]:
        """The spatial size of one training sample, as the network sees it."""
        dims = 3 if config.input_mode == "3d" else 2
        return (config.image_size,) * dims

    def config_problems(self, config: RunConfig) -> list[str]:
        """What in the run config this task cannot work with; [] when it can."""
        return []

    def output_fits(self, output: Any, size: tuple[int, ...]) -> bool:
        """Whether a network's output for one sample of `size` is what this task scores."""
        raise NotImplementedError

    def datasets(self, config: RunConfig, site: Site, split: Any) -> SiteDatasets:
        """The site's train/validation datasets on the site's own split."""
        raise NotImplementedError

    def loss(self, config: RunConfig) -> nn.Module:
        """The training loss: a batch mean of per-sample losses, as DP-SGD needs."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: SiteDatasets, config: RunConfig) -> dict[str, float]:
        """The validation metrics of `model` on the site's validation split."""
        raise NotImplementedError

    def site_problems(self, config: RunConfig, counts: SiteCounts, val_fraction: float) -> list[str]:
        """What a site's data lacks for this task; [] when it is enough."""
        return []

    def summary_lines(self, figures: dict[str, float], config: RunConfig) -> list[str]:
        """Markdown for summary.md beyond the per-round table, from the final aggregate figures."""
        return []

    def allows_metric(self, name: str) -> bool:
        """Whether a metric of this name may leave a site."""
        return any(re.fullmatch(pattern, name) for pattern in self.metrics)

    def is_count(self, name: str) -> bool:
        """Whether the server sums this metric over sites (a count) rather than weighting it."""
        return re.fullmatch(self.counts, name) is not None

    def better(self, score: float, best: float | None) -> bool:
        """Whether `score` beats the best so far (None: nothing yet)."""
        if best is None:
            return True
        return score > best if self.higher_is_better else score < best
