"""Where a site trains: its own `device` setting, resolved once per message.

`auto` (the default) is the first CUDA device when torch sees one, else the CPU; `cpu`, `cuda` and
`cuda:N` name one. Everything a round computes follows the model: batches, per-sample gradients,
noise, evaluation and sliding-window inference run on the model's device, new tensors take the
device of the model or of the batch, and the weights a site sends are CPU tensors whatever it
trained on. After each message the site releases the GPU memory it cached, so a SuperNode that
serves many rounds does not grow.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fedcare.errors import ConfigError

DEVICE_SETTINGS = "auto, cpu, cuda or cuda:N"


def resolve_device(setting: str, source: str = "site settings") -> torch.device:
    """The torch device a site's `device` setting names; a device torch cannot see is a one-line error."""
    setting = setting.strip().lower()
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", setting)
    if not match:
        raise ConfigError(f"{source}: 'device' = {setting!r} must be one of {DEVICE_SETTINGS}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{source}: 'device' = {setting!r} but torch sees no CUDA device here (a CPU build of "
                          "torch, or no GPU); set device = \"auto\" or \"cpu\", or install a CUDA build")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{source}: 'device' = {setting!r} but torch sees {torch.cuda.device_count()} CUDA "
                          "device(s), numbered from 0")
    return torch.device(f"cuda:{index}")


def model_device(model: nn.Module) -> torch.device:
    """The device a model's weights are on: where its batches and noise must be (the CPU if it has none)."""
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as CPU tensors, as a reply carries them."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def release(device: torch.device) -> None:
    """Give back the GPU memory torch cached during the round (nothing to do on a CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
