"""The model factory: one place that turns the run config into a MONAI network.

Every network built here must survive Opacus' per-sample gradients, because each site trains it
under DP-SGD. That rules out BatchNorm (it mixes samples in a batch, so one sample's gradient
depends on the others and cannot be clipped on its own) and in-place activations (Opacus' backward
hooks see views that an in-place op would overwrite). GroupNorm keeps normalisation per sample.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, UNet
from opacus.validators import ModuleValidator
from torch import nn

from fedcare.config import RunConfig
from fedcare.errors import ConfigError

NUM_CLASSES = 2
GROUP_NORM = ("group", {"num_groups": 4, "affine": False})
# How Opacus computes per-sample gradients for each network, when the run config says "auto":
# the fastest mode that works, measured on 2 CPU cores by benchmarks/bench_dp.py (small CNN: ew
# 1.5x plain, hooks 1.6x, functorch 2.0x; ew skips the summed weight gradient hooks compute and
# discard) and benchmarks/bench_segmentation.py (U-Net: hooks 2.35x, functorch 2.55x, ew fails on PReLU).
GRAD_SAMPLE_MODE = {"small-cnn": "ew", "densenet121": "functorch", "unet": "hooks"}
# In 3D the ranking turns: hooks get a convolution's per-sample gradient by unfolding its input
# (27 copies of each voxel for a 3x3x3 kernel), dearer than functorch's vmapped backward as patches
# grow. The 3D U-Net, one DP-SGD step, 1 thread, interleaved (ms, hooks / functorch / plain):
# batch 4 of 32x32x8 patches 48.5 / 47.8 / 16.8 (benchmarks/bench_segmentation.py, unet3d-dp-overhead);
# batch 8 of them 76.0 / 70.4 / 27.9; batch 4 of 48x48x16 138 / 115 / 54; batch 8 of 64^3
# 1989 / 1454 / 865 (UNET_CHANNELS 8-64). Networks not listed keep their 2D mode.
GRAD_SAMPLE_MODE_3D = {"unet": "functorch"}
# Few channels: a site trains this on CPU under DP-SGD, where per-sample gradients cost memory per channel.
UNET_CHANNELS = (8, 16, 32, 64)


def build_model(config: RunConfig) -> nn.Module:
    """A fresh, seeded network for the run's task; the same config gives the same weights.

    The run's seed is used in a forked generator state only, so building a model leaves torch's
    global generator as it was: a site draws nothing afterwards from a state the coordinator set.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build(config)


def _build(config: RunConfig) -> nn.Module:
    spatial_dims = 3 if config.input_mode == "3d" else 2
    if config.model == "small-cnn":
        model = small_cnn(spatial_dims)
    elif config.model == "densenet121":
        model = DenseNet121(
            spatial_dims=spatial_dims, in_channels=1, out_channels=NUM_CLASSES,
            norm=("group", {"num_groups": 32}), act=("relu", {"inplace": False}),
        )
    elif config.model == "unet":
        model = unet(spatial_dims)
    else:
        raise ConfigError(f"run config: 'model' = {config.model!r} has no factory")
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def small_cnn(spatial_dims: int = 2, channels: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """Strided MONAI convolution blocks, then global max pooling: a lesion anywhere in the image counts.

    Shaped for DP-SGD's per-sample gradients, whose cost grows with every weight a sample touches:
    2x2 kernels with stride 2 read each pixel once (3x3 ones read most pixels twice or more), no bias
    before a norm that would cancel it, and GroupNorm without affine weights (normalising is what
    keeps the network trainable; its scale and shift are more per-sample work for little gain).
    """
    layers: list[nn.Module] = []
    in_channels = 1
    for out_channels in channels:
        layers.append(Convolution(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            strides=2, kernel_size=2, padding=0, bias=False, norm=GROUP_NORM, act="relu",
        ))
        in_channels = out_channels
    pool = nn.AdaptiveMaxPool3d(1) if spatial_dims == 3 else nn.AdaptiveMaxPool2d(1)
    layers += [pool, nn.Flatten(), nn.Linear(in_channels, NUM_CLASSES)]
    return nn.Sequential(*layers)


def unet(spatial_dims: int = 2, channels: tuple[int, ...] = UNET_CHANNELS) -> nn.Module:
    """MONAI's residual U-Net with instance norm and PReLU: no BatchNorm, nothing in place, so Opacus
    trains it in hooks and functorch mode (SegResNet's `x += identity` is refused by Opacus' hooks)."""
    return UNet(
        spatial_dims=spatial_dims, in_channels=1, out_channels=NUM_CLASSES, channels=channels,
        strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance", act="prelu",
    )


def check_private_trainable(model: nn.Module) -> None:
    """Stop with the name of the first layer DP-SGD cannot train, before any site spends budget."""
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ConfigError(f"model: Opacus cannot train it privately: {problems[0]}; "
                          "use GroupNorm or InstanceNorm instead of BatchNorm")
    for name, module in model.named_modules():
        if getattr(module, "inplace", False):
            raise ConfigError(f"model: layer '{name}' ({type(module).__name__}) is in-place; "
                              "DP-SGD needs inplace=False")


def grad_sample_mode(config: RunConfig) -> str:
    """The per-sample gradient mode for this run's network (measured choice unless the config names one)."""
    if config.grad_sample_mode != "auto":
        return config.grad_sample_mode
    if config.input_mode == "3d":
        return GRAD_SAMPLE_MODE_3D.get(config.model, GRAD_SAMPLE_MODE[config.model])
    return GRAD_SAMPLE_MODE[config.model]


def unet_size_multiple(channels: tuple[int, ...] = UNET_CHANNELS) -> int:
    """What each side of a U-Net input must divide by: every level below the top halves it."""
    return 2 ** (len(channels) - 1)
