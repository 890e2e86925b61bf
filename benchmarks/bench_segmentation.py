"""U-Net segmentation under DP-SGD: step time with and without DP, for every `grad_sample_mode`.

One optimizer step of the demo's 2D U-Net (64x64 slices, batch 16, Dice + cross-entropy) is timed
plain and privately in each mode, interleaved so that load from other work hits every variant
alike; the row's ratio is the median private/plain time of the mode `grad-sample-mode = "auto"`
picks for the U-Net (fedcare/model.py GRAD_SAMPLE_MODE), which must be the fastest that works.
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
from fedcare.segmentation import DiceCrossEntropy  # noqa: E402

MODES = ("hooks", "functorch", "ew")
TARGET = 1.6
COMMAND = "python benchmarks/bench_segmentation.py"
CONFIG = RunConfig(task="segmentation", model="unet", batch_size=16, learning_rate=0.1)


def _batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(CONFIG.batch_size, 1, size, size, generator=generator)
    return images, (images[:, 0] > 0.9).long()


def _stepper(mode: str | None):
    """A function that takes one optimizer step: plain when `mode` is None, else DP-SGD in that mode."""
    model = build_model(CONFIG)
    optimizer = torch.optim.SGD(model.parameters(), lr=CONFIG.learning_rate, momentum=0.9)
    images, masks = _batch()
    if mode is not None:
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(images, masks), batch_size=16),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
        )
    loss_fn = DiceCrossEntropy()

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(images), masks).backward()
        optimizer.step()

    step()  # warm-up, and the check that the mode works at all
    return step


def run(quick: bool) -> list[dict]:
    """The `unet-dp-overhead` row: DP/plain step time of the auto-chosen mode, every mode in `raw`."""
    torch.set_num_threads(1)  # a shared 2-core machine: one thread gives stable ratios
    repeats = 3 if quick else 10
    steppers, raw = {"plain": _stepper(None)}, {}
    for mode in MODES:
        try:
            steppers[mode] = _stepper(mode)
        except Exception as err:  # a mode Opacus cannot apply to this network is a result, not a crash
            raw[mode] = {"works": False, "error": f"{type(err).__name__}: {str(err)[:120]}"}
    times = interleaved(steppers, repeats)
    plain = statistics.median(times["plain"])
    raw["plain"] = {"ms_per_step": round(1000 * plain, 1)}
    for mode in steppers.keys() - {"plain"}:
        raw[mode] = {"works": True, "ms_per_step": round(1000 * statistics.median(times[mode]), 1),
                     "ratio": round(median_ratio(times, mode, "plain"), 3)}
    working = [m for m in MODES if raw[m].get("works")]
    chosen = grad_sample_mode(CONFIG)
    raw["chosen"] = chosen
    raw["fastest"] = min(working, key=lambda m: raw[m]["ratio"]) if working else None
    ratio = raw[chosen]["ratio"] if raw.get(chosen, {}).get("works") else float("nan")
    return [row("unet-dp-overhead", ratio, TARGET, raw, COMMAND)]


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
