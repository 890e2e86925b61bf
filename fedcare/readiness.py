"""The readiness rules: what a run and each site need before training means anything.

One set of rules, applied everywhere: `fedcare check-site` reports them on the site's machine,
`fedcare run` applies them to the run and to every site before it starts anything, and the
ClientApp applies them again before it trains, because a site trusts nobody but itself. Every
problem is one line holding the reason and the fix; printing is the commands' business.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, SiteNotReady
from fedcare.model import build_model, grad_sample_mode
from fedcare.outputs import resume_folder
from fedcare.policy import SitePolicy
from fedcare.privacy.accounting import default_delta
from fedcare.tasks import Task, task_for
from fedcare.tasks.base import SiteCounts

__all__ = ["MAX_DELTA", "SiteCounts", "input_problem",
           "require_site_ready", "run_problems", "site_delta", "site_problems"]

# Above this delta an (epsilon, delta) guarantee allows a real chance of exposing a record outright;
# a site's own budget-delta may not exceed it (its default rule never does: at most 1e-5).
MAX_DELTA = 1e-3
_LARGEST_SIZE_TRIED = 512


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
    """Whether the task and network fit the config, take its image-size (the smallest size they take
    if not) and, under DP, have a per-sample gradient mode; checked in that order, so a size that
    does not fit is named as such rather than as a failed per-sample gradient."""
    try:
        task = task_for(config)
        problems = task.config_problems(config)
        model = build_model(config)
    except ConfigError as err:
        return str(err)
    if problems:
        return "; ".join(problems)
    size_problem = _size_problem(model, config, task)
    if size_problem or not config.dp:
        return size_problem
    return _mode_problem(model, config)


def _size_problem(model: torch.nn.Module, config: RunConfig, task: Task) -> str | None:
    size = task.input_size(config)
    fits = _fits(model, config, size)
    if fits is not False:
        return None if fits else (f"run config: network '{config.model}' does not answer task '{task.name}' "
                                  "(its output is not what the task scores): pick a network for that task")
    if size != (config.image_size,) * len(size):
        return f"run config: network '{config.model}' takes no input of {size} voxels: change patch-size"
    dims = len(size)
    smallest = next((s for s in range(config.image_size + 1, _LARGEST_SIZE_TRIED + 1)
                     if _fits(model, config, (s,) * dims)), None)
    fix = f"set image-size to {smallest} or more" if smallest else "set a larger image-size"
    return (f"run config: 'image-size' = {config.image_size} is too small for the '{config.model}' network "
            f"(it shrinks the image below one pixel or cannot rebuild it): {fix}")


def _fits(model: torch.nn.Module, config: RunConfig, size: tuple[int, ...]) -> bool | None:
    """True: the network takes this size and answers the task; None: it takes it but answers another
    task; False: it cannot take it. One forward pass of an empty image answers for every network,
    present or future, and the task says whether what comes out is what it scores."""
    image = torch.zeros((1, config.in_channels, *size))
    try:
        with torch.no_grad():
            out = model.eval()(image)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    return True if task_for(config).output_fits(out, size) else None


def _mode_problem(model: torch.nn.Module, config: RunConfig) -> str | None:
    try:
        grad_sample_mode(model, config)
    except ConfigError as err:
        return str(err)
    return None


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
    problems += task_for(config).site_problems(config, counts, policy.val_fraction)
    delta = site_delta(counts.num_train, policy.budget_delta)
    if config.dp and delta is not None and delta > MAX_DELTA:
        problems.append(f"delta would be {delta:.2g} (the site's budget-delta), above {MAX_DELTA:g}, so the privacy "
                        f"guarantee would mean little: set budget-delta in the site's settings to {MAX_DELTA:g} or "
                        "less, or to 0 for the site's own rule")
    return problems


def require_site_ready(config: RunConfig, counts: SiteCounts, policy: SitePolicy, site: str) -> None:
    """Stop the site before it trains when it or the run is not ready, every reason in one line."""
    size = input_problem(config)
    problems = ([size] if size else []) + site_problems(config, counts, policy)
    if problems:
        raise SiteNotReady(f"{site} is not ready for this run: " + "; ".join(problems))
