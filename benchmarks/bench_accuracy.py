"""Accuracy: final validation AUC on the demo for pooled training, each site alone, FedAvg, FedProx
(and, in full mode, FedAdam, FedMedian, FedTrimmedAvg) and FedAvg with DP at two budgets: what
federation, the choice of strategy, and privacy cost.

Every figure is the AUC on each site's own validation split, weighted by its number of validation
samples (as metrics.json's aggregate). Centralised baselines run in one process with the no-DP
preset (configs/no-dp.toml: Adam, lr 3e-3) for as many epochs as a federated run's rounds x local
epochs: pooled trains on all sites' training splits together; "alone" trains on one site's and is
scored on every site's validation split (own-split AUC in raw). Federated figures come from the
real `flwr run` (`run_simulation`) in full mode; in quick mode only FedAvg + DP at epsilon 8 does
(the framework row's run) and the others come from the in-process loop that runs the same site
code and FedAvg average (bench_framework.plain_loop). No-DP runs use configs/no-dp.toml's values,
DP runs configs/demo.toml's. Ratio: FedAvg + DP (epsilon 8) / pooled, higher is better, target 0.9.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DP_SETTINGS, NO_DP_SETTINGS, SCRATCH, demo_sites, federation, row, set_threads, weighted_auc  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402

from data_adapters import SeededSplit, site_datasets  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.model import build_model  # noqa: E402
from fedcare.tasks import task_for  # noqa: E402
from fedcare.training import train_plain  # noqa: E402

COMMAND = "python benchmarks/run.py --only accuracy"
TARGET = 0.9
LOW_EPSILON = 2.0


def _centralised(config: RunConfig, splits: dict, train_on: list[str]) -> dict:
    """Train one model on the named sites' training splits; score it on every site's validation split."""
    model = build_model(config)
    train_plain(model, ConcatDataset([splits[name].train for name in train_on]), config, task_for(config).loss(config))
    scores = {name: task_for(config).evaluate(model, split, config) for name, split in splits.items()}
    return {"auc": weighted_auc([(scores[n]["auc"], splits[n].num_val) for n in splits]),
            "own_auc": {n: scores[n]["auc"] for n in train_on} if len(train_on) == 1 else None}


def _in_process(name: str, settings: dict, data: Path) -> float:
    from bench_framework import local_sites, plain_loop

    config = RunConfig.from_mapping(settings | {"data-root": str(data)})
    _, evaluations = plain_loop(config, local_sites(config, data, SCRATCH / "runs" / name))
    return weighted_auc([(e["auc"], e["num-examples"]) for e in evaluations])


def run(quick: bool) -> list[dict]:
    from bench_framework import dp_federation, rounds

    warnings.simplefilter("ignore")
    threads = set_threads()
    data = demo_sites(quick)
    n_rounds = rounds(quick)
    no_dp = NO_DP_SETTINGS | {"num-server-rounds": n_rounds}
    dp_low = DP_SETTINGS | {"num-server-rounds": n_rounds, "target-epsilon": LOW_EPSILON}
    federated = {
        "fedavg": no_dp,
        "fedprox": no_dp | {"strategy": "fedprox"},
        f"fedavg-dp-eps{LOW_EPSILON:g}": dp_low,
    }
    if not quick:
        # The server-side strategies have no in-process twin: they are compared on real runs only.
        federated |= {name: no_dp | {"strategy": name} for name in ("fedadam", "fedmedian", "fedtrimmedavg")}
    figures: dict[str, dict] = {}
    shared = dp_federation(quick)
    figures["fedavg-dp-eps8"] = {"auc": shared.final_auc, "source": "flwr run"}
    for name, settings in federated.items():
        if quick:
            figures[name] = {"auc": _in_process(f"accuracy-{name}", settings, data), "source": "in-process loop"}
        else:
            figures[name] = {"auc": federation(f"accuracy-{name}", data, 3, settings).final_auc, "source": "flwr run"}

    central = RunConfig.from_mapping(no_dp | {"local-epochs": n_rounds * no_dp["local-epochs"]})
    splits = {p.name: site_datasets(p, SeededSplit(0.2, central.seed), central.image_size)
              for p in sorted(data.glob("site-*"))}
    figures["pooled"] = _centralised(central, splits, list(splits)) | {"source": "in-process"}
    for name in splits:
        figures[f"{name}-alone"] = _centralised(central, splits, [name]) | {"source": "in-process"}

    raw = {"rounds": n_rounds, "local_epochs": no_dp["local-epochs"], "centralised_epochs": central.local_epochs,
           "threads": threads, "val_samples": {n: s.num_val for n, s in splits.items()},
           "auc": {name: f["auc"] for name, f in figures.items()},
           "source": {name: f["source"] for name, f in figures.items()},
           "own_split_auc": {name: f["own_auc"] for name, f in figures.items() if f.get("own_auc")}}
    ratio = figures["fedavg-dp-eps8"]["auc"] / figures["pooled"]["auc"]
    return [row("accuracy", ratio, TARGET, raw, COMMAND, higher_is_better=True)]


if __name__ == "__main__":
    from run import main
    main(["--only", "accuracy", *sys.argv[1:]])
