"""U-Net segmentation under DP-SGD: step time with and without DP, for every `grad_sample_mode`.

One optimizer step of the demo's 2D U-Net (64x64 slices, batch 32 as in configs/segmentation.toml, Dice + cross-entropy) and of
the 3D U-Net (32x32x8 patches, batch 4, as in configs/segmentation-3d.toml) is timed plain and
privately in each mode, interleaved so that load from other work hits every variant alike; a
row's ratio is the median private/plain time of the mode `grad-sample-mode = "auto"` picks for
that network (fedcare/model.py MEASURED_MODE), which must be the fastest
that works.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import interleaved, median_ratio, row  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedcare.config import RunConfig  # noqa: E402
from fedcare.model import build_model, grad_sample_mode  # noqa: E402
from fedcare.tasks import task_for  # noqa: E402

MODES = ("hooks", "functorch", "ew")
TARGET = 1.6
COMMAND = "python benchmarks/run.py --only unet-dp-overhead"
# Row -> the network's run config and the spatial shape of one sample ([H, W] or [D, H, W]).
ROWS = {
    "unet-dp-overhead": (RunConfig(task="segmentation", model="unet", batch_size=32, learning_rate=0.1), (64, 64)),
    "unet3d-dp-overhead": (RunConfig(task="segmentation", model="unet", input_mode="3d", batch_size=4,
                                     learning_rate=0.1), (8, 32, 32)),
}


def _batch(config: RunConfig, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(config.batch_size, 1, *shape, generator=generator)
    return images, (images[:, 0] > 0.9).long()


def _stepper(config: RunConfig, shape: tuple[int, ...], mode: str | None):
    """A function that takes one optimizer step: plain when `mode` is None, else DP-SGD in that mode."""
    model = build_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)
    images, masks = _batch(config, shape)
    if mode is not None:
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(images, masks), batch_size=config.batch_size),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
        )
    loss_fn = task_for(config).loss(config)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(images), masks).backward()
        optimizer.step()

    step()  # warm-up, and the check that the mode works at all
    return step


def run(quick: bool) -> list[dict]:
    """The 2D and 3D U-Net rows: DP/plain step time of the auto-chosen mode, every mode in `raw`."""
    torch.set_num_threads(1)  # a shared 2-core machine: one thread gives stable ratios
    repeats = 3 if quick else 10
    return [_row(name, config, shape, repeats) for name, (config, shape) in ROWS.items()]


def _row(name: str, config: RunConfig, shape: tuple[int, ...], repeats: int) -> dict:
    """One network's row: every mode's step time against plain, and the ratio of the mode "auto" picks."""
    steppers, raw = {"plain": _stepper(config, shape, None)}, {}
    for mode in MODES:
        try:
            steppers[mode] = _stepper(config, shape, mode)
        except Exception as err:  # a mode Opacus cannot apply to this network is a result, not a crash
            raw[mode] = {"works": False, "error": f"{type(err).__name__}: {str(err)[:120]}"}
    times = interleaved(steppers, repeats)
    plain = statistics.median(times["plain"])
    raw["plain"] = {"ms_per_step": round(1000 * plain, 1)}
    for mode in steppers.keys() - {"plain"}:
        raw[mode] = {"works": True, "ms_per_step": round(1000 * statistics.median(times[mode]), 1),
                     "ratio": round(median_ratio(times, mode, "plain"), 3)}
    working = [m for m in MODES if raw[m].get("works")]
    chosen = grad_sample_mode(build_model(config), config)
    raw["chosen"] = chosen
    raw["fastest"] = min(working, key=lambda m: raw[m]["ratio"]) if working else None
    ratio = raw[chosen]["ratio"] if raw.get(chosen, {}).get("works") else float("nan")
    return row(name, ratio, TARGET, raw, COMMAND)


if __name__ == "__main__":
    from run import main
    main(["--only", "bench_segmentation", *sys.argv[1:]])
