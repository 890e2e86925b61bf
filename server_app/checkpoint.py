"""Checkpoints of a run on the coordinator's disk, so a stopped run continues where it stopped.

After every round the server saves, atomically, the global model, the strategy's own state (the
server optimizer's moments for FedAdam), the round reached and the per-site log so far; the best
model by weighted validation AUC (mean Dice for segmentation) is kept beside it. Each run writes
only its own folder, `outputs-dir/checkpoints/<run-id>/`; `resume = "<run-id>"` restores that run
into the new run's folder, so the run it continued stays as it was. The sites need nothing from
here: their ledgers already hold every round they trained.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, MetricRecord

from fedcare.errors import FedcareError
from fedcare.outputs import checkpoint_folder, headline_metric, resume_folder, weighted_aggregate
from server_app.recording import RoundLog

# FedOpt strategies (FedAdam) keep the previous global model and the server optimizer's moments.
STRATEGY_STATE = ("current_arrays", "m_t", "v_t")
# What the per-site log must carry over; messages in flight belong to the process that sent them.
LOG_FIELDS = ("rounds", "privacy", "names", "seconds")


class Checkpoints:
    """The checkpoint folder of one run: `checkpoint.pt` and `best_model.pt`."""

    def __init__(self, outputs_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.folder = checkpoint_folder(outputs_dir, run_id)
        self.outputs_dir = Path(outputs_dir)
        self.resumed_run: str | None = None
        self.path = self.folder / "checkpoint.pt"
        self.best_path = self.folder / "best_model.pt"
        self.arrays: ArrayRecord | None = None
        # The best weighted validation figure of the task's headline metric; None before any.
        self.best_score: float | None = None

    def after_round(self, strategy: Any, config: dict[str, Any]) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """The `evaluate_fn` Flower calls after every round: save the round, keep the best model."""

        def save(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            this_round = server_round + strategy.round_offset
            self.arrays = arrays
            task = strategy.log.task
            aggregate = weighted_aggregate(strategy.log.rounds.get(this_round, {}), task)
            metric = headline_metric(aggregate, task)
            score = aggregate[metric] if metric else None
            if this_round > 0 and score is not None and task.better(score, self.best_score):
                self.best_score = score
                _save_atomic(arrays.to_torch_state_dict(), self.best_path)
            _save_atomic({
                "round": this_round,
                "arrays": arrays.to_torch_state_dict(),
                "strategy": {k: getattr(strategy, k) for k in STRATEGY_STATE if hasattr(strategy, k)},
                "log": {name: getattr(strategy.log, name) for name in LOG_FIELDS},
                "best_score": self.best_score,
                "config": config,
            }, self.path)
            return None

        return save

    def restore(self, strategy: Any, model_keys: set[str], resume: str) -> ArrayRecord:
        """Load the last checkpoint of run `resume` into `strategy`; returns the global model to continue from."""
        source = resume_folder(self.outputs_dir, resume)
        if source == self.folder:
            raise FedcareError(f"run config: 'resume' = {resume!r} names this run itself; name the run to continue")
        path = source / "checkpoint.pt"
        try:
            saved = torch.load(path, weights_only=False)
        except Exception as err:  # a torn or foreign file: say which, never start from zero silently
            raise FedcareError(f"{path}: unreadable checkpoint ({type(err).__name__}); "
                               "resume another run or set resume = \"\" to start afresh") from None
        if set(saved["arrays"]) != model_keys:
            raise FedcareError(f"{path}: checkpoint holds another model than the run config builds")
        self.resumed_run = source.name
        # The best model so far belongs to the continued run too; copied, so that run's folder stays whole.
        if (source / "best_model.pt").is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / "best_model.pt", self.best_path)
        strategy.round_offset = saved["round"]
        strategy.log = RoundLog(**saved["log"], task=strategy.log.task)
        for key, value in saved["strategy"].items():
            setattr(strategy, key, value)
        self.best_score = saved["best_score"]
        self.arrays = ArrayRecord(saved["arrays"])
        return self.arrays


def _save_atomic(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
