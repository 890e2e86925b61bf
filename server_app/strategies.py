"""The aggregation strategy named in the run config, wrapped so that the server can be trusted.

`guarded(StrategyClass)` adds, around any Flower Message-API strategy: a per-site log of every
reply, validation of every update before aggregation, the `min-sites` rule (at a round's start
too: Flower's own wait for nodes has no limit, this one gives up after `round-timeout`), a line
per site and round in the run's log, and a round offset so that a resumed run carries on
numbering its rounds where the checkpoint left off.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcare.config import RunConfig
from fedcare.identities import names_by_node
from fedcare.errors import FedcareError
from fedcare.tasks import Task, task_for
from server_app.recording import RoundLog
from server_app.validation import screen_updates

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam,
              "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}


log = logging.getLogger("fedcare.server")
# How often the wait for `min-sites` connected sites says how many there are.
WAIT_REPORT_SECONDS = 30.0


class TooFewSites(FedcareError):
    """Fewer sites than `min-sites` were connected, or sent a usable update, in a round."""

    def __init__(self, message: str, resumable: bool = True) -> None:
        super().__init__(message)
        # False when every site refused for its spent budget: resuming would only be refused again.
        self.resumable = resumable


class TaskMetrics:
    """The sites' validation metrics combined as the run's task says: counts (a confusion matrix's
    cells) added up, rates weighted by the sites' samples, so Flower's own round lines agree with
    metrics.json."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
        combined = aggregate_metricrecords(records, weighting_metric_name)
        for name in list(combined.keys()):
            if self.task.is_count(name):
                combined[name] = sum(float(metrics.get(name, 0.0)) for record in records
                                     for metrics in record.metric_records.values())
        return combined


def make_strategy(config: RunConfig) -> Any:
    """The configured strategy, every site sampled each round, updates weighted by samples."""
    parameters: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": config.proximal_mu},
        "fedadam": {"eta": config.server_learning_rate},
        "fedtrimmedavg": {"beta": config.trim_fraction},
    }
    task = task_for(config)
    return guarded(STRATEGIES[config.strategy])(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=config.min_sites,
        min_evaluate_nodes=config.min_sites, min_available_nodes=config.min_sites,
        min_sites=config.min_sites, max_update_norm_ratio=config.max_update_norm_ratio,
        round_timeout=config.round_timeout, task=task, evaluate_metrics_aggr_fn=TaskMetrics(task),
        **parameters.get(config.strategy, {}),
    )


def cast_like(arrays: ArrayRecord, model: ArrayRecord) -> ArrayRecord:
    """The aggregate in the model's own dtypes: FedOpt strategies compute in float64, and a global
    model that changed dtype would no longer match what the sites train and send back."""
    return ArrayRecord({name: Array(arrays[name].numpy().astype(model[name].numpy().dtype, copy=False))
                        for name in arrays.keys()})


def guarded(strategy_class: type) -> type:
    """A subclass of `strategy_class` with the per-site log, update checks and round offset."""

    class GuardedStrategy(strategy_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, min_sites: int = 1, max_update_norm_ratio: float = 10.0,
                     round_timeout: float = 600.0, task: Task | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Deployment: sites are who their keys were registered as (FEDCARE_SITE_REGISTRY).
            self.log = RoundLog(registry=names_by_node(), **({"task": task} if task else {}))
            self.round_offset = 0
            self.min_sites = min_sites
            self.max_update_norm_ratio = max_update_norm_ratio
            self.round_timeout = round_timeout
            self.global_arrays: ArrayRecord | None = None
            self.round_started = time.monotonic()

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            self.global_arrays = arrays
            this_round = server_round + self.round_offset
            self.round_started = time.monotonic()
            self.wait_for_sites(this_round, grid)
            sent = self.log.expect(this_round, "train", super().configure_train(this_round, arrays, config, grid))
            # Which sites this round waits for; a simulated site is known by its node id until its first reply.
            log.info("round %d: asked %d site(s) to train: %s", this_round, len(sent),
                     ", ".join(sorted(self.log.name_of(msg.metadata.dst_node_id) for msg in sent)))
            return sent

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                               grid: Grid) -> Iterable[Message]:
            this_round = server_round + self.round_offset
            self.wait_for_sites(this_round, grid)
            return self.log.expect(this_round, "evaluate",
                                   super().configure_evaluate(this_round, arrays, config, grid))

        def aggregate_train(self, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            this_round = server_round + self.round_offset
            updates = self.log.file_replies(this_round, "train", replies)
            accepted, rejected = screen_updates(updates, self.global_arrays, self.max_update_norm_ratio)
            for msg, reason in rejected:
                self.log.reject(this_round, msg, reason)
            if len(accepted) < self.min_sites:
                for line in self.log.round_lines(this_round):
                    log.info("%s", line)
                spent = self.log.all_budget_exhausted(this_round)
                raise TooFewSites(
                    f"round {this_round}: {len(accepted)} usable update(s), min-sites is {self.min_sites}"
                    + ("; every site refused because its privacy budget is spent, so this federation cannot "
                       "continue on these sites" if spent else ""), resumable=not spent)
            arrays, metrics = super().aggregate_train(this_round, accepted)
            return (cast_like(arrays, self.global_arrays) if arrays is not None else None), metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            this_round = server_round + self.round_offset
            metrics = super().aggregate_evaluate(this_round, self.log.file_replies(this_round, "evaluate", replies))
            self.log.seconds[this_round] = time.monotonic() - self.round_started
            for line in self.log.round_lines(this_round):
                log.info("%s", line)
            return metrics

        def wait_for_sites(self, this_round: int, grid: Grid) -> None:
            """Wait up to `round-timeout` for `min-sites` connected sites, then stop the run."""
            deadline = time.monotonic() + self.round_timeout
            reported = float("-inf")
            while len(connected := list(grid.get_node_ids())) < self.min_sites:
                now = time.monotonic()
                if now >= deadline:
                    raise TooFewSites(f"round {this_round}: {len(connected)} site(s) connected after round-timeout "
                                      f"{self.round_timeout:g} s, min-sites is {self.min_sites}")
                if now - reported >= WAIT_REPORT_SECONDS:
                    reported = now
                    log.info("round %d: waiting for sites, %d connected of min-sites %d (gives up after "
                             "round-timeout %g s)", this_round, len(connected), self.min_sites, self.round_timeout)
                time.sleep(min(1.0, max(deadline - now, 0.0)))

    GuardedStrategy.__name__ = f"Guarded{strategy_class.__name__}"
    return GuardedStrategy
