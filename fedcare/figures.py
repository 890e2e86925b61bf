"""How a run's validation figures are shown: the per-round table's columns, in order, and their labels.

A task may report more (per-class figures, counts); summary.md shows those apart, as the task says.
"""

from __future__ import annotations

METRICS = ("loss", "accuracy", "auc", "dice")
LABELS = {"loss": "val loss", "accuracy": "val accuracy", "auc": "val AUC", "dice": "val Dice"}


def metric_label(metric: str) -> str:
    """A column's label: 'val AUC'; a metric without one of its own is 'val <name>'."""
    return LABELS.get(metric, f"val {metric}")
