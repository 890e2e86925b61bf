"""The run's model: the named network (fedcare.networks) built for the run's data and task, and
how Opacus computes its per-sample gradients.

Per-sample gradient mode, when the run config says "auto": the mode measured fastest for the
project's own networks (MEASURED_MODE), else a rule (hooks where Opacus has a per-sample gradient
for every layer with weights, functorch otherwise) checked by one per-sample backward pass on a
two-sample batch, falling back to functorch, and refusing the network when no mode works.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from opacus.grad_sample import GradSampleModule, wrap_model
from torch import nn

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.networks import NetworkShape, build_network
from fedcare.tasks import task_for

# Measured on 2 CPU cores (benchmarks/bench_dp.py, bench_segmentation.py): small CNN ew 1.5x plain,
# hooks 1.6x, functorch 2.0x (ew skips the summed weight gradient hooks compute and discard); 2D
# U-Net hooks 2.35x, functorch 2.55x (ew fails on PReLU); in 3D hooks unfold each 3x3x3 input 27
# times, so functorch's vmapped backward wins as patches grow.
MEASURED_MODE = {("small-cnn", 2): "ew", ("unet", 2): "hooks", ("unet", 3): "functorch",
                 ("densenet121", 2): "functorch", ("densenet121", 3): "functorch"}
_FALLBACK = "functorch"


def network_shape(config: RunConfig) -> NetworkShape:
    """The spatial dimensions, input channels and outputs the run's data and task fix."""
    return NetworkShape(spatial_dims=3 if config.input_mode == "3d" else 2, in_channels=config.in_channels,
                        out_channels=task_for(config).out_channels(config))


def build_model(config: RunConfig) -> nn.Module:
    """A fresh, seeded network for the run's task; the same config gives the same weights.

    The run's seed is used in a forked generator state only, so building a model leaves torch's
    global generator as it was: a site draws nothing afterwards from a state the coordinator set.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_network(config.model, network_shape(config), config.network_args)


def network_parameters(config: RunConfig) -> int:
    """How many parameters the run's network has, counted without allocating them (on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_network(config.model, network_shape(config), config.network_args).parameters())


def sample_voxels(config: RunConfig) -> int:
    """How many voxels (times channels) one training sample of the run has, from the run config alone."""
    return config.in_channels * math.prod(task_for(config).input_size(config))


def grad_sample_mode(model: nn.Module, config: RunConfig) -> str:
    """The per-sample gradient mode for this run's network: the config's, the measured one, or the rule's."""
    if config.grad_sample_mode != "auto":
        return config.grad_sample_mode
    measured = MEASURED_MODE.get((config.model, network_shape(config).spatial_dims))
    return measured or _tried_mode(config)


@functools.lru_cache(maxsize=8)  # one trial per network and input size in a process
def _tried_mode(config: RunConfig) -> str:
    model = build_model(config)
    supported = all(type(m) in GradSampleModule.GRAD_SAMPLERS for m in model.modules()
                    if any(p.requires_grad for p in m.parameters(recurse=False)))
    candidates = ("hooks", _FALLBACK) if supported else (_FALLBACK,)
    # An input that asks for its gradient, as a batch inside a network does: hooks then fire as in training.
    # Its own generator: the trial draws nothing from the site's generator state.
    shape = (2, config.in_channels, *task_for(config).input_size(config))
    sample = torch.rand(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    errors = []
    for mode in candidates:
        problem = _per_sample_problem(model, mode, sample)
        if problem is None:
            return mode
        errors.append(f"{mode}: {problem}")
    raise ConfigError(f"model: Opacus computes no per-sample gradient for network '{config.model}' "
                      f"({'; '.join(errors)}); pick another network or change its factory in fedcare/networks.py")


def _per_sample_problem(model: nn.Module, mode: str, sample: torch.Tensor) -> str | None:
    try:
        wrapped = wrap_model(copy.deepcopy(model), grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        wrapped.train()
        wrapped(sample).float().mean().backward()
    except Exception as err:  # noqa: BLE001 - any failure means this mode cannot train the network
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    missing = [n for n, p in wrapped.named_parameters() if p.requires_grad and getattr(p, "grad_sample", None) is None]
    return f"no per-sample gradient for {missing[0]}" if missing else None
