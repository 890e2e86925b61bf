"""Networks by name: the project's own, or any MONAI network, built for the data and made DP-trainable.

A run names its network (`model`) and may give it arguments (`model-args`, a JSON object). The
name is looked up in NETWORKS first, then among MONAI's networks (`monai.networks.nets`, any case:
"DenseNet121", "EfficientNetBN", "SEResNet50"...). Either way the network is built for the data's
spatial dimensions and channels and the task's outputs, then made trainable under Opacus:
BatchNorm becomes GroupNorm (BatchNorm mixes the samples of a batch, so one sample's gradient
could not be clipped on its own) and nothing runs in place (Opacus' hooks read the activations an
in-place op would overwrite). What cannot be made so is refused, naming the layer.

Add a network of your own in one place: a factory `(NetworkShape, **args) -> nn.Module` in NETWORKS
(docs/adapting.md shows one).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import monai.networks.nets as monai_nets
from monai.networks.blocks import Convolution
from monai.utils import OptionalImportError
from opacus.validators import ModuleValidator
from torch import nn

from fedcare.errors import ConfigError

__all__ = ["NETWORKS", "NetworkShape", "build_network", "make_private_trainable", "small_cnn", "unet",
           "UNET_CHANNELS", "unet_size_multiple"]

GROUP_NORM = ("group", {"num_groups": 4, "affine": False})
# Few channels: a site trains this on CPU under DP-SGD, where per-sample gradients cost memory per channel.
UNET_CHANNELS = (8, 16, 32, 64)
# Arguments by which a network would load weights or files (pretrained_url, path_or_repo_id,
# weights...): the coordinator writes model-args, and a site reads nothing and downloads nothing it
# names. A site's own starting weights come as the run's initial model instead.
_FETCHING = re.compile(r"pretrain|path|url|file|weight|repo|hub|download|checkpoint", re.IGNORECASE)
# What a MONAI network calls its input channels and its outputs (classes, or channels of a mask).
_IN_NAMES = ("in_channels", "n_input_channels")
_OUT_NAMES = ("out_channels", "num_classes")


@dataclass(frozen=True)
class NetworkShape:
    """What the data and the task fix about a network: 2D or 3D, input channels, outputs."""

    spatial_dims: int
    in_channels: int
    out_channels: int


def small_cnn(shape: NetworkShape, channels: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """Strided MONAI convolution blocks, then global max pooling: a lesion anywhere in the image counts.

    Shaped for DP-SGD's per-sample gradients, whose cost grows with every weight a sample touches:
    2x2 kernels with stride 2 read each pixel once (3x3 ones read most pixels twice or more), no bias
    before a norm that would cancel it, and GroupNorm without affine weights (normalising is what
    keeps the network trainable; its scale and shift are more per-sample work for little gain).
    """
    layers: list[nn.Module] = []
    in_channels = shape.in_channels
    for out_channels in channels:
        layers.append(Convolution(
            spatial_dims=shape.spatial_dims, in_channels=in_channels, out_channels=out_channels,
            strides=2, kernel_size=2, padding=0, bias=False, norm=GROUP_NORM, act="relu",
        ))
        in_channels = out_channels
    pool = nn.AdaptiveMaxPool3d(1) if shape.spatial_dims == 3 else nn.AdaptiveMaxPool2d(1)
    layers += [pool, nn.Flatten(), nn.Linear(in_channels, shape.out_channels)]
    return nn.Sequential(*layers)


def unet(shape: NetworkShape, channels: tuple[int, ...] = UNET_CHANNELS) -> nn.Module:
    """MONAI's residual U-Net with instance norm and PReLU: no BatchNorm, nothing in place, so Opacus
    trains it in hooks and functorch mode (SegResNet's `x += identity` is refused by Opacus' hooks)."""
    return monai_nets.UNet(
        spatial_dims=shape.spatial_dims, in_channels=shape.in_channels, out_channels=shape.out_channels,
        channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=1, norm="instance",
        act="prelu",
    )


def densenet121(shape: NetworkShape, **args: Any) -> nn.Module:
    """MONAI's DenseNet121 with GroupNorm of 32 groups from the start (what Opacus' swap would give)."""
    return monai_network("DenseNet121", shape, {"norm": ("group", {"num_groups": 32})} | args)


# The project's own networks; any other name is looked up among MONAI's.
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": small_cnn,
    "unet": unet,
    "densenet121": densenet121,
}


def build_network(name: str, shape: NetworkShape, args: dict[str, Any]) -> nn.Module:
    """The named network for `shape`, with `args`, trainable under DP-SGD (or a ConfigError naming why not)."""
    fetching = sorted(key for key in args if _FETCHING.search(key))
    if fetching:
        raise ConfigError(f"run config: 'model-args' {', '.join(fetching)} would have the site load weights or files "
                          "the run names; a site downloads and reads nothing of the coordinator's choosing: remove "
                          "them (starting weights come as the run's initial model instead)")
    factory = NETWORKS.get(name)
    try:
        model = factory(shape, **args) if factory else monai_network(name, shape, args)
    except OptionalImportError as err:  # e.g. einops for MONAI's transformers
        missing = str(err).split("(No module named", 1)[-1].split(")")[0].strip(" '")
        raise ConfigError(f"run config: network '{name}' needs the package {missing or 'it imports'}, which this "
                          "site does not have: choose another network, or add the package to the site's image") from None
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as err:  # a wrong model-args key or value
        detail = " ".join(str(err).split())[:160]
        raise ConfigError(f"run config: 'model-args' do not fit network '{name}': {type(err).__name__}: {detail}") from None
    return make_private_trainable(model)


def monai_network(name: str, shape: NetworkShape, args: dict[str, Any]) -> nn.Module:
    """A network of monai.networks.nets by (case-insensitive) class name, for `shape`."""
    found = {n.lower(): n for n in dir(monai_nets) if isinstance(getattr(monai_nets, n), type)}
    if name.lower() not in found:
        raise ConfigError(f"run config: 'model' = {name!r} is neither one of fedcare's networks "
                          f"({', '.join(NETWORKS)}) nor a network of monai.networks.nets "
                          "(e.g. DenseNet121, EfficientNetBN, SEResNet50)")
    network = getattr(monai_nets, found[name.lower()])
    params = _parameters(network)
    given: dict[str, Any] = {"pretrained": False} if "pretrained" in params else {}
    given |= _shape_arguments(name, params, shape)
    return network(**given | args)


def _parameters(network: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments a network takes, following **kwargs up to the classes it passes them to."""
    params: dict[str, inspect.Parameter] = {}
    for cls in network.__mro__:
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        own = inspect.signature(cls).parameters
        params |= {n: p for n, p in own.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            break
    return params


def _shape_arguments(name: str, params: Any, shape: NetworkShape) -> dict[str, Any]:
    in_name = next((n for n in _IN_NAMES if n in params), None)
    out_name = next((n for n in _OUT_NAMES if n in params), None)
    if in_name is None or out_name is None:
        raise ConfigError(f"run config: network '{name}' takes no input-channel or output argument "
                          f"({'/'.join(_IN_NAMES)}, {'/'.join(_OUT_NAMES)}) that fedcare can set from the "
                          "data and the task: add a factory for it to fedcare/networks.py")
    given = {in_name: shape.in_channels, out_name: shape.out_channels}
    if "spatial_dims" in params:
        given["spatial_dims"] = shape.spatial_dims
    elif shape.spatial_dims != 2:
        raise ConfigError(f"run config: network '{name}' does not say how many spatial dimensions it has; "
                          "use it for 2D data or add a factory for it to fedcare/networks.py")
    return given


def make_private_trainable(model: nn.Module) -> nn.Module:
    """Swap what Opacus cannot train (BatchNorm) for what it can, turn off in-place ops, or refuse by layer."""
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ConfigError(f"model: Opacus cannot train it privately: {problems[0]}; "
                          "replace that layer in the network's factory (fedcare/networks.py)")
    return model


def unet_size_multiple(channels: tuple[int, ...] = UNET_CHANNELS) -> int:
    """What each side of a U-Net input must divide by: every level below the top halves it."""
    return 2 ** (len(channels) - 1)
