"""The readiness rules: what a run and each site need before training means anything.

One set of rules, applied everywhere: `fedcare check-site` reports them on the site's machine,
`fedcare run` applies them to the run and to every site before it starts anything, and the
ClientApp applies them again before it trains, because a site trusts nobody but itself. Every
problem is one line holding the reason and the fix; printing is the commands' business.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, SiteNotReady
from fedcare.model import NUM_CLASSES, build_model
from fedcare.outputs import resume_folder
from fedcare.policy import SitePolicy
from fedcare.privacy.accounting import default_delta

__all__ = ["MAX_DELTA", "MIN_TRAIN_PER_CLASS", "MIN_VAL_PER_CLASS", "SiteCounts", "input_problem",
           "require_site_ready", "run_problems", "site_delta", "site_problems"]

# Above this delta an (epsilon, delta) guarantee allows a real chance of exposing a record outright;
# a site's own budget-delta may not exceed it (its default rule never does: at most 1e-5).
MAX_DELTA = 1e-3
# Per class: two to learn from (one alone is memorised, not learnt), one to validate, so that
# every class is seen by the validation AUC (with one class only it is 0.5 whatever the model does).
MIN_TRAIN_PER_CLASS = 2
MIN_VAL_PER_CLASS = 1
_LARGEST_SIZE_TRIED = 512


@dataclass(frozen=True)
class SiteCounts:
    """How many cases a site trains and validates on, per class label (classification only)."""

    num_train: int
    num_val: int
    train_per_class: Mapping[int, int] = field(default_factory=dict)
    val_per_class: Mapping[int, int] = field(default_factory=dict)


def run_problems(config: RunConfig, sites: int | None = None) -> list[str]:
    """What stops the run as configured, whatever the sites hold; `sites`: how many will join.

    Checked on the coordinator (`fedcare run`, the ServerApp): a `resume` must name one run's checkpoint."""
    problems = []
    if sites is not None and config.min_sites > sites:
        problems.append(f"run config: 'min-sites' = {config.min_sites} is more than the {sites} site(s) of this "
                        f"run, so no round could ever start: set min-sites to {sites} or less, or add sites")
    size = input_problem(config)
    if size:
        problems.append(size)
    if config.resume:
        try:
            resume_folder(Path(config.outputs_dir), config.resume)
        except ConfigError as err:
            problems.append(str(err))
    return problems


@functools.lru_cache(maxsize=8)  # a site asks once per request; the answer depends on the config alone
def input_problem(config: RunConfig) -> str | None:
    """Whether the network takes inputs of the configured image-size; the smallest size it takes if not."""
    if config.task == "segmentation" and config.input_mode == "3d":
        return None  # patches, not image-size; their multiples are checked with the config
    model = build_model(config)
    if _takes(model, config, config.image_size):
        return None
    smallest = next((s for s in range(config.image_size + 1, _LARGEST_SIZE_TRIED + 1) if _takes(model, config, s)),
                    None)
    fix = f"set image-size to {smallest} or more" if smallest else "set a larger image-size"
    return (f"run config: 'image-size' = {config.image_size} is too small for the '{config.model}' network "
            f"(it shrinks the image below one pixel or cannot rebuild it): {fix}")


def _takes(model: torch.nn.Module, config: RunConfig, size: int) -> bool:
    # One forward pass of an empty image answers for every network, present or future.
    dims = 3 if config.input_mode == "3d" else 2
    image = torch.zeros((1, 1) + (size,) * dims)
    try:
        with torch.no_grad():
            out = model.eval()(image)
    except (RuntimeError, ValueError):
        return False
    # A segmentation network must hand back a mask of the image's own size.
    return config.task != "segmentation" or tuple(out.shape[2:]) == (size,) * dims


def site_delta(num_train: int, budget_delta: float) -> float | None:
    """The delta a site's DP-SGD would use at its first round: its own setting, else its rule (fedcare.privacy.dpsgd)."""
    if budget_delta > 0:
        return budget_delta
    return default_delta(num_train) if num_train >= 1 else None


def site_problems(config: RunConfig, counts: SiteCounts, policy: SitePolicy) -> list[str]:
    """Why a site with these counts and its own policy is not ready for this run; [] when it is."""
    problems = []
    if counts.num_train < 1 or counts.num_val < 1:
        problems.append(f"{counts.num_train} training and {counts.num_val} validation case(s) with the site's "
                        f"val-fraction {policy.val_fraction}: label more cases, at least one for each")
    if config.task == "classification":
        problems += _class_problems(policy, counts)
    delta = site_delta(counts.num_train, policy.budget_delta)
    if config.dp and delta is not None and delta > MAX_DELTA:
        problems.append(f"delta would be {delta:.2g} (the site's budget-delta), above {MAX_DELTA:g}, so the privacy "
                        f"guarantee would mean little: set budget-delta in the site's settings to {MAX_DELTA:g} or "
                        "less, or to 0 for the site's own rule")
    return problems


def _class_problems(policy: SitePolicy, counts: SiteCounts) -> list[str]:
    labels = sorted(set(counts.train_per_class) | set(counts.val_per_class))
    beyond = [label for label in labels if not 0 <= label < NUM_CLASSES]
    if beyond:
        return [f"labels {', '.join(map(str, beyond))} are outside the network's {NUM_CLASSES} classes "
                f"(0 to {NUM_CLASSES - 1}): relabel those cases in labels.csv with 0 to {NUM_CLASSES - 1}, "
                "or drop their rows"]
    problems = []
    for label in range(NUM_CLASSES):
        train, val = counts.train_per_class.get(label, 0), counts.val_per_class.get(label, 0)
        if train < MIN_TRAIN_PER_CLASS or val < MIN_VAL_PER_CLASS:
            problems.append(f"class {label} has {train} training and {val} validation case(s) with the site's "
                            f"val-fraction {policy.val_fraction}; it needs at least {MIN_TRAIN_PER_CLASS} and "
                            f"{MIN_VAL_PER_CLASS}: label more cases of class {label}")
    return problems


def require_site_ready(config: RunConfig, counts: SiteCounts, policy: SitePolicy, site: str) -> None:
    """Stop the site before it trains when it or the run is not ready, every reason in one line."""
    size = input_problem(config)
    problems = ([size] if size else []) + site_problems(config, counts, policy)
    if problems:
        raise SiteNotReady(f"{site} is not ready for this run: " + "; ".join(problems))
