"""DP overhead: one local epoch under Opacus DP-SGD vs the same epoch without DP.

Both sides use the real demo network (`build_model`), the demo DICOM of the three hospitals pooled
into one training set, the same batch size, seed and optimizer, and the real code paths: the
plain side is `make_loader` + `make_optimizer` + `train_epochs`, the private side is
`private_training` (Opacus' engine, DP optimizer and Poisson loader, with a plan from
`plan_round`) + `train_epochs`. Each repetition times every variant once, in turn; the ratio is
the median over repetitions of private/plain. Every `grad_sample_mode` is tried; the row's ratio
is the one of "auto", the mode the project picks (fedcare.model.GRAD_SAMPLE_MODE).
Target: <= 1.6x, the CPU figure in Opacus' own README.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import demo_sites, interleaved, median_ratio, row, set_threads  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402

from data_adapters import site_datasets  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.model import build_model, grad_sample_mode  # noqa: E402
from fedcare.privacy.dpsgd import RoundPlan, plan_round, private_training  # noqa: E402
from fedcare.sites import Site  # noqa: E402
from fedcare.training import make_loader, make_optimizer, train_epochs  # noqa: E402

COMMAND = "python benchmarks/run.py --only dp-overhead"
MODES = ("hooks", "functorch", "ew")
TARGET = 1.6


def _config(mode: str = "auto") -> RunConfig:
    return RunConfig(local_epochs=1, batch_size=32, optimizer="sgd", learning_rate=0.1, grad_sample_mode=mode)


def _plain_epoch(dataset, config: RunConfig) -> None:
    model = build_model(config)
    loader = make_loader(dataset, config.batch_size, config.seed, shuffle=True)
    train_epochs(model, loader, make_optimizer(model, config), 1)


def _private_epoch(dataset, config: RunConfig, plan: RoundPlan) -> None:
    private = private_training(build_model(config), dataset, config, plan, [], round_seed=config.seed)
    train_epochs(private.model, private.loader, private.optimizer, 1)


def run(quick: bool) -> list[dict]:
    """Time plain and private epochs interleaved; `quick` uses the smaller demo and fewer repetitions."""
    warnings.simplefilter("ignore")  # Opacus' secure-RNG and hook warnings would drown the output
    threads = set_threads()
    repeats = 3 if quick else 7
    folder = demo_sites(quick)
    config = _config()
    parts = [site_datasets(path, config.val_fraction, config.seed, config.image_size)
             for path in sorted(folder.glob("site-*"))]
    train = ConcatDataset([part.train for part in parts])  # decoded once here, outside the timings
    # A budget no epoch can exhaust: the benchmark measures the cost of training, not a refusal.
    site = Site("bench", folder, folder, budget_epsilon=1e6, budget_delta=0.0)
    # Planned once, outside the timings: sigma's search is per run, not per epoch, and mode-independent.
    plan = plan_round(config, site, len(train), [])

    variants = {"plain": lambda: _plain_epoch(train, config)}
    errors: dict[str, str] = {}
    for mode in MODES:
        try:  # a mode Opacus cannot run on this network is reported, not fatal
            _private_epoch(train, _config(mode), plan)
        except Exception as err:  # noqa: BLE001
            errors[mode] = f"{type(err).__name__}: {err}"[:200]
            continue
        variants[mode] = (lambda m: lambda: _private_epoch(train, _config(m), plan))(mode)
    _plain_epoch(train, config)  # warm-up, as each mode had above
    times = interleaved(variants, repeats)

    auto = grad_sample_mode(config)
    modes = {}
    for mode in MODES:
        if mode in errors:
            modes[mode] = {"works": False, "error": errors[mode]}
        else:
            modes[mode] = {"works": True, "ratio": median_ratio(times, mode, "plain"),
                           "median_s": statistics.median(times[mode])}
    working = [m for m in MODES if modes[m]["works"]]
    fastest = min(working, key=lambda m: modes[m]["ratio"]) if working else None
    raw = {
        "train_samples": len(train), "batch_size": config.batch_size, "repeats": repeats, "threads": threads,
        "plain_median_s": statistics.median(times["plain"]), "auto_mode": auto, "fastest_mode": fastest,
        "modes": modes,
    }
    ratio = modes[auto]["ratio"] if modes.get(auto, {}).get("works") else float("nan")
    return [row("dp-overhead", ratio, TARGET, raw, COMMAND)]


if __name__ == "__main__":
    from run import main
    main(["--only", "dp-overhead", *sys.argv[1:]])
