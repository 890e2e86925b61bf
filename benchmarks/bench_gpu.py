"""GPU sites: one DP-SGD epoch and one plain epoch of each preset, on the CPU and on the GPU, side by side.

    python benchmarks/bench_gpu.py [--out benchmarks/gpu_results.json]     (make bench-gpu)

For each preset (the demo's 2D classifier at 64 px, DenseNet121 at 256 px from configs/gpu-2d.toml,
the 3D U-Net on 96-voxel cubes from configs/gpu-3d-segmentation.toml) it times a plain epoch and a
DP-SGD epoch (Opacus with the project's per-sample gradient mode, Poisson sampling, clipping, noise
from the site's generators) on synthetic tensors of the preset's shape, interleaved, with the same
functions a site trains with. It reports the DP-over-plain ratio on the GPU (target 1.3x or less for
the 2D classifier) and the GPU-over-CPU speed-up. The CPU runs a few steps only of the large presets
(times are per step, so the figures compare). Where torch sees no CUDA device it says so and exits 0.

It imports only what a site's training needs (torch, monai, opacus, numpy, pydicom, dp-accounting and this
project's training code), never Flower, so it runs where only those wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcare.config import load_preset  # noqa: E402
from fedcare.device import release  # noqa: E402
from fedcare.model import build_model  # noqa: E402
from fedcare.policy import SitePolicy  # noqa: E402
from fedcare.privacy.dpsgd import plan_round, private_training  # noqa: E402
from fedcare.sites import Site  # noqa: E402
from fedcare.tasks import task_for  # noqa: E402
from fedcare.training import make_loader, make_optimizer, train_epochs  # noqa: E402

TARGET_2D = 1.3


@dataclass(frozen=True)
class Preset:
    name: str
    config: str
    shape: tuple[int, ...]       # one sample's input, channels first
    samples_gpu: int             # samples in the GPU epoch
    samples_cpu: int             # samples in the CPU epoch (a few steps of the large presets)


PRESETS = (
    Preset("small-cnn-2d-64", "configs/demo.toml", (1, 64, 64), 1024, 256),
    Preset("densenet121-2d-256", "configs/gpu-2d.toml", (1, 256, 256), 256, 16),
    Preset("unet-3d-96", "configs/gpu-3d-segmentation.toml", (1, 96, 96, 96), 16, 2),
)


def _data(preset: Preset, samples: int, segmentation: bool) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(samples, *preset.shape, generator=generator)
    targets = (torch.rand(samples, *preset.shape[1:], generator=generator) > 0.98).long() if segmentation else (
        torch.randint(0, 2, (samples,), generator=generator))
    return TensorDataset(images, targets)


def _epoch(preset: Preset, device: torch.device, private: bool, samples: int) -> float:
    """Seconds per optimizer step of one epoch, plain or DP-SGD, on `device`."""
    config = load_preset(ROOT / preset.config)
    config = replace(config, local_epochs=1)
    data = _data(preset, samples, config.task == "segmentation")
    model = build_model(config).to(device)
    loss = task_for(config).loss(config)
    steps = max(1, samples // config.batch_size)
    if private:
        site = Site("bench", ROOT, ROOT, SitePolicy(budget_epsilon=1e6, min_noise_multiplier=0.0, privacy_unit="image"))
        plan = plan_round(config, site, samples, [], "bench")
        training = private_training(model, data, config, plan, [])
        model, optimizer, loader = training.model, training.optimizer, training.loader
    else:
        optimizer = make_optimizer(model, config)
        loader = make_loader(data, config.batch_size, torch.Generator().manual_seed(0), shuffle=True)
    _sync(device)
    start = time.perf_counter()
    train_epochs(model, loader, optimizer, 1, loss)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    release(device)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset: Preset, device: torch.device, samples: int, repeats: int) -> dict[str, float]:
    """Median seconds per step, plain and private, interleaved after one warm-up of each."""
    for private in (False, True):
        _epoch(preset, device, private, min(samples, 64))
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(repeats):
        for name, private in (("plain", False), ("dp", True)):
            times[name].append(_epoch(preset, device, private, samples))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device here; nothing measured (run it on a site's GPU machine)")
        return 0
    warnings.simplefilter("ignore")
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    rows = []
    for preset in PRESETS:
        on_gpu = measure(preset, gpu, preset.samples_gpu, args.repeats)
        on_cpu = measure(preset, cpu, preset.samples_cpu, 1)
        rows.append({
            "preset": preset.name, "config": preset.config,
            "gpu_s_per_step": on_gpu, "cpu_s_per_step": on_cpu,
            "dp_over_plain_gpu": on_gpu["dp"] / on_gpu["plain"],
            "gpu_speedup_dp": on_cpu["dp"] / on_gpu["dp"], "gpu_speedup_plain": on_cpu["plain"] / on_gpu["plain"],
        })
        print(f"{preset.name}: DP/plain on GPU {rows[-1]['dp_over_plain_gpu']:.2f}x, GPU over CPU "
              f"{rows[-1]['gpu_speedup_dp']:.1f}x (DP) {rows[-1]['gpu_speedup_plain']:.1f}x (plain)", flush=True)
    document = {
        "date": datetime.now(timezone.utc).date().isoformat(), "gpu": torch.cuda.get_device_name(gpu),
        "torch": torch.__version__, "target_dp_over_plain_2d": TARGET_2D,
        "met": rows[0]["dp_over_plain_gpu"] <= TARGET_2D, "rows": rows,
        "command": "python benchmarks/bench_gpu.py",
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
