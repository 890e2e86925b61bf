"""The task registry: what each task declares, and what the server does with it."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.config import RunConfig
from fedcare.egress import allowed_metric
from fedcare.outputs import headline_metric, weighted_aggregate
from fedcare.tasks import TASKS, Task, task_for
from fedcare.tasks.classification import one_vs_rest_auc


def test_the_one_vs_rest_auc_is_the_chance_a_positive_case_scores_higher():
    # Checked against the definition itself, every pair counted, ties half.
    rng = np.random.default_rng(3)
    positive = rng.random(60) < 0.3
    score = np.round(rng.random(60) + 0.3 * positive, 1)  # rounded: many ties
    pairs = [(p, n) for p in score[positive] for n in score[~positive]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert one_vs_rest_auc(positive, score) == pytest.approx(expected)
    assert one_vs_rest_auc(positive, -score) == pytest.approx(1 - expected)
    assert one_vs_rest_auc(np.ones(5, bool), np.arange(5.0)) == 0.5  # one class only: chance


def test_rates_are_weighted_by_validation_cases_and_counts_are_added_up():
    task = task_for(RunConfig(classes="a, b, c"))
    sites = {
        "north": {"evaluate_status": "ok", "num_examples": 10, "auc": 0.9, "auc-2": 0.6, "confusion-2-1": 3},
        "south": {"evaluate_status": "ok", "num_examples": 30, "auc": 0.5, "auc-2": 1.0, "confusion-2-1": 4},
        "east": {"evaluate_status": "failed"},
    }
    aggregate = weighted_aggregate(sites, task)
    assert aggregate["auc"] == pytest.approx(0.6) and aggregate["auc-2"] == pytest.approx(0.9)
    assert aggregate["confusion-2-1"] == 7 and aggregate["num_examples"] == 40
    assert headline_metric(aggregate, task) == "auc"


def test_a_loss_like_headline_keeps_the_lowest_model():
    class Score(Task):
        headline, higher_is_better = "mae", False

    assert Score().better(0.2, 0.3) and not Score().better(0.4, 0.3) and Score().better(5.0, None)
    assert TASKS["classification"].better(0.9, 0.8) and not TASKS["classification"].better(0.7, 0.8)


def test_only_the_tasks_metrics_may_leave_a_site():
    for name in ("loss", "auc", "auc-3", "confusion-0-2", "dice", "num-examples"):
        assert allowed_metric(name)
    for name in ("train-loss", "auc-x", "confusion-1", "patient-0"):
        assert not allowed_metric(name)


def test_3d_segmentation_is_the_segmentation_tasks_3d_variant():
    assert task_for(RunConfig(task="segmentation", model="unet", input_mode="3d")).name == "segmentation-3d"
    assert task_for(RunConfig(task="segmentation", model="unet")).name == "segmentation"
    assert task_for(RunConfig(input_mode="3d")).name == "classification"  # one task for 2D and 3D
