"""Local work on one site: the training epoch loop every task shares (its loss and evaluation are
the task's, fedcare.tasks).

DP-SGD reuses the same epoch loop with Opacus' wrapped model, optimizer and loader
(`fedcare.privacy.dpsgd`), so private and plain training differ only in what they are handed.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.config import RunConfig
from fedcare.device import model_device
from fedcare.privacy.randomness import site_generator


def make_loader(dataset: Dataset, batch_size: int, generator: torch.Generator | None, shuffle: bool) -> DataLoader:
    """A loader drawing its order from `generator` (on a site: one seeded from the site's own entropy)."""
    # num_workers=0: MONAI datasets in worker processes are a known source of segfaults under Flower.
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


def make_optimizer(model: nn.Module, config: RunConfig, proximal_mu: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer; with `proximal_mu` > 0 each step is followed by FedProx's pull to the global model."""
    # Measured on the demo: SGD with momentum learns reliably from clipped, noised DP gradients,
    # where Adam's per-coordinate scaling amplifies the noise; without DP, Adam converges faster.
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
    if proximal_mu > 0:
        add_proximal_pull(optimizer, proximal_mu * config.learning_rate)
    return optimizer


def add_proximal_pull(optimizer: torch.optim.Optimizer, strength: float) -> None:
    """After every step, move each weight `strength` of the way back towards where it started.

    This is the gradient step of FedProx's term mu/2 ||w - w_global||^2, taken on its own rather
    than through the loss: DP-SGD's per-sample gradients must hold only what the data contributes,
    and this pull depends on no sample, so it costs no privacy.
    """
    anchors = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]

    def pull(opt: torch.optim.Optimizer, *_: object) -> None:
        with torch.no_grad():
            for group, starts in zip(opt.param_groups, anchors):
                for param, start in zip(group["params"], starts):
                    param.sub_(strength * (param - start))

    optimizer.register_step_post_hook(pull)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; Opacus' Poisson loader keeps the same count (q = 1/steps)."""
    return math.ceil(num_samples / batch_size)


def train_epochs(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, epochs: int,
                 loss_fn: nn.Module | None = None) -> float:
    """Run `epochs` passes over `loader`; returns the mean training loss per sample (cross-entropy by default)."""
    device = model_device(model)
    loss_fn = (loss_fn if loss_fn is not None else nn.CrossEntropyLoss()).to(device)
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            # Poisson sampling may draw an empty batch: it must still be a (noise-only) step, since
            # the accountant counts every step and skipping one would depend on the data.
            optimizer.zero_grad()
            if not len(labels):
                noise_only_step(optimizer)
                continue
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            count += len(labels)
    return total / max(count, 1)


def noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """A DP-SGD step for an empty Poisson batch: no sample contributes, the optimizer adds only noise.

    The network is not run on zero samples (instance norm cannot normalise an empty batch); every
    parameter gets empty per-sample gradients, which Opacus' optimizer clips and noises as usual.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()


def train_plain(model: nn.Module, dataset: Dataset, config: RunConfig, loss_fn: nn.Module,
                proximal_mu: float = 0.0) -> float:
    """Ordinary local training with the task's loss, for a round the site's policy lets run without DP."""
    loader = make_loader(dataset, config.batch_size, site_generator(), shuffle=True)
    return train_epochs(model, loader, make_optimizer(model, config, proximal_mu), config.local_epochs, loss_fn)
