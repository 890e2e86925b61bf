"""Framework overhead: a whole simulated round through Flower vs the same local work in a plain loop.

Ours: the real `flwr run . --stream` on a local simulation SuperLink (`run_simulation`), the demo's
three hospitals, the demo preset with DP on; the round time is metrics.json's "seconds" (server
sends the model, every site trains, the server aggregates, every site evaluates), median over the
rounds after the first, which pays for imports and the first DICOM decode.
Baseline: one process, one loop doing what each site's ClientApp does, with the same functions:
read the site's datasets, build the model, load the global weights, plan the DP round against a
ledger, train `local-epochs` with Opacus, record the round; then the sample-weighted average; then
each site evaluates the new model on its validation split. Median over the same rounds.
Target: ratio <= 1.15. The fixed start-up (SuperLink, simulation runtime, app loading, shutdown)
is reported separately: the run's wall time minus the sum of its round times.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DP_SETTINGS, SCRATCH, demo_sites, federation, row, set_threads  # noqa: E402

from data_adapters import StoredSplit  # noqa: E402
from fedcare.config import RunConfig  # noqa: E402
from fedcare.model import build_model  # noqa: E402
from fedcare.privacy.dpsgd import plan_round, record_round, train_private  # noqa: E402
from fedcare.privacy.ledger import Ledger  # noqa: E402
from fedcare.privacy.units import private_units  # noqa: E402
from fedcare.sites import Site, site_in_folder  # noqa: E402
from fedcare.tasks import task_for  # noqa: E402
from fedcare.training import train_plain  # noqa: E402

COMMAND = "python benchmarks/run.py --only framework-overhead"
TARGET = 1.15


def rounds(quick: bool) -> int:
    # Round 1 pays for imports and the first DICOM decode and is left out: 3 rounds leave 2 to time.
    return 3 if quick else 5


def dp_settings(quick: bool) -> dict:
    """The demo preset with DP on, as both sides of this row (and the rows that reuse its run) use it."""
    return DP_SETTINGS | {"num-server-rounds": rounds(quick)}


def dp_federation(quick: bool):
    """The demo federation with DP: this row's run, reused by the communication, scale and accuracy rows."""
    return federation("demo-dp", demo_sites(quick), 3, dp_settings(quick))


def _site_round(config: RunConfig, site: Site, weights: dict, server_round: int) -> tuple[dict, int] | None:
    """What the ClientApp's train handler does for one site, without Flower; None when the site refuses."""
    data = task_for(config).datasets(config, site, StoredSplit(site.split_path, site.policy.val_fraction))
    model = build_model(config)
    model.load_state_dict(weights)
    proximal_mu = config.proximal_mu if config.strategy == "fedprox" else 0.0  # what FedProx sends
    if not config.dp:
        train_plain(model, data.train, config, task_for(config).loss(config), proximal_mu)
        return model.state_dict(), data.num_train
    with Ledger(site.ledger_path).hold() as ledger:
        entries = ledger.entries()
        units = private_units(data.train, data.train_units, site.policy.privacy_unit)
        plan = plan_round(config, site, len(units), entries, "plain-loop")
        if not plan.affordable:
            return None
        _, record = train_private(model, units, config, plan, ledger.history(), proximal_mu)
        record_round(ledger, record, "plain-loop", server_round)
    return model.state_dict(), data.num_train


def _site_evaluate(config: RunConfig, site: Site, weights: dict) -> dict:
    data = task_for(config).datasets(config, site, StoredSplit(site.split_path, site.policy.val_fraction))
    model = build_model(config)
    model.load_state_dict(weights)
    return task_for(config).evaluate(model, data, config) | {"num-examples": data.num_val}


def average(updates: list[tuple[dict, int]]) -> dict:
    """FedAvg: the average of the sites' weights, weighted by their numbers of training samples."""
    total = sum(n for _, n in updates)
    return {name: sum(weights[name].double() * (n / total) for weights, n in updates).to(updates[0][0][name].dtype)
            for name in updates[0][0]}


def plain_loop(config: RunConfig, sites: list[Site]) -> tuple[list[float], list[dict]]:
    """Every round of the federation in one process; returns each round's seconds and the last
    round's evaluation on every site."""
    if config.strategy not in ("fedavg", "fedprox"):
        raise ValueError(f"the plain loop averages like FedAvg; {config.strategy!r} is not mirrored")
    weights = build_model(config).state_dict()
    seconds, evaluations = [], []
    for server_round in range(1, config.num_server_rounds + 1):
        start = time.perf_counter()
        updates = [_site_round(config, site, weights, server_round) for site in sites]
        weights = average([update for update in updates if update is not None])
        evaluations = [_site_evaluate(config, site, weights) for site in sites]
        seconds.append(time.perf_counter() - start)
    return seconds, evaluations


def local_sites(config: RunConfig, data: Path, state: Path) -> list[Site]:
    """The simulated sites as the ClientApp resolves them, with fresh state under `state`."""
    shutil.rmtree(state, ignore_errors=True)
    names = sorted(p.name for p in data.glob("site-*"))
    return [site_in_folder(data / name, state) for name in names]


def run(quick: bool) -> list[dict]:
    """One Flower run and one plain loop over the same sites, config and rounds."""
    warnings.simplefilter("ignore")
    threads = set_threads()
    settings = dp_settings(quick)
    data = demo_sites(quick)
    state = SCRATCH / "runs" / "plain-loop"
    config = RunConfig.from_mapping(settings | {"data-root": str(data), "sites-dir": str(state)})

    # The plain loop runs before and after the Flower run, so that a busy spell of the shared
    # machine during either does not land on one side only; fresh ledgers each time.
    plain = []
    for phase in ("before", "after"):
        if phase == "after":
            flower = dp_federation(quick)
        plain += plain_loop(config, local_sites(config, data, state))[0][1:]
    flower_rounds = flower.round_seconds
    flower_round = statistics.median(flower_rounds[1:])
    plain_round = statistics.median(plain)
    raw = {
        "sites": 3, "rounds": config.num_server_rounds, "local_epochs": config.local_epochs, "dp": config.dp,
        "threads": threads, "train_samples": [e["num_train_examples"] for e in flower.metrics["rounds"][0]["sites"].values()],
        "flower_round_s": flower_round, "plain_round_s": plain_round,
        "flower_rounds_s": flower_rounds, "plain_rounds_after_first_s": plain,
        "flower_wall_s": flower.wall_s, "fixed_startup_s": flower.wall_s - sum(flower_rounds),
    }
    return [row("framework-overhead", flower_round / plain_round, TARGET, raw, COMMAND)]


if __name__ == "__main__":
    from run import main
    main(["--only", "framework-overhead", *sys.argv[1:]])
