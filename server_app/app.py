"""The ServerApp: plans the run, sends the global model to every site each round, aggregates
their checked updates with the configured strategy, checkpoints every round, and writes the run
folder (models, metrics, summary, plot, privacy report).

The server never sees a site's data or its ledger: only weights and the numbers sites reply with.
Its log lines go through Flower's console handler, the one whose output `flwr run --stream` shows.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import FLOWER_LOGGER, console_handler
from flwr.serverapp import Grid, ServerApp

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.logs import one_line_per_record
from fedcare.model import build_model
from fedcare.outputs import (RunFolder, failed_every_round, headline_metric, metrics_document, metrics_plot,
                             summary_markdown)
from fedcare.privacy.report import write_privacy_report
from fedcare.readiness import run_problems
from server_app.checkpoint import Checkpoints
from server_app.history_check import check_and_remember
from server_app.privacy_summary import privacy_report_data
from server_app.strategies import TooFewSites, make_strategy

app = ServerApp()
log = logging.getLogger("fedcare.server")
# Flower's count of the replies the guarded strategy passed on: after the update checks it counts
# only accepted ones ("2 results and 0 failures" when a site failed), so the lines per site replace it.
FLOWER_REPLY_COUNT = "%s: Received %s results and %s failures"


def _not_flowers_reply_count(record: logging.LogRecord) -> bool:
    return record.msg != FLOWER_REPLY_COUNT


def stream_log() -> None:
    """Send fedcare.server's lines to Flower's console handler, once.

    The ServerApp process mirrors its stdout to the SuperLink, which is what `flwr run --stream`
    prints; Flower's handler writes there, but only for the `flwr` logger. Without a handler of its
    own this logger's INFO lines are dropped; not propagating keeps them from printing twice where
    the root logger has a handler too.
    """
    if console_handler not in log.handlers:
        log.addHandler(console_handler)
    if _not_flowers_reply_count not in FLOWER_LOGGER.filters:
        FLOWER_LOGGER.addFilter(_not_flowers_reply_count)
    log.setLevel(logging.INFO)
    log.propagate = False
    one_line_per_record()  # Flower's own lines too: Opacus gave the root logger a handler


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation up to `num-server-rounds` and publish the run folder."""
    stream_log()
    try:
        config = RunConfig.from_mapping(context.run_config)
        # The run-level readiness rules, so that a plain `flwr run` stops here too, not at every site.
        problems = run_problems(config)
        if problems:
            raise FedcareError("; ".join(problems))
        model = build_model(config)  # run_problems checked it is trainable under DP-SGD
        strategy = make_strategy(config)
        checkpoints = Checkpoints(Path(config.outputs_dir), str(context.run_id))
        initial = ArrayRecord(model.state_dict())
        if config.resume:
            initial = checkpoints.restore(strategy, set(model.state_dict()), config.resume)
        remaining = config.num_server_rounds - strategy.round_offset
        if remaining <= 0:
            raise FedcareError(f"the checkpoint is at round {strategy.round_offset}; set num-server-rounds "
                               "above it to continue")
    except FedcareError as err:
        log.error("run stopped: %s", err)
        raise SystemExit(2) from None

    resumed_from = strategy.round_offset
    stopped = None
    try:
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=remaining, timeout=config.round_timeout,
            train_config=ConfigRecord({"local-epochs": config.local_epochs}),
            evaluate_fn=checkpoints.after_round(strategy, config.to_dict()),
        )
    except TooFewSites as err:
        stopped = f"{err}; the run stopped at the last completed round"
        if err.resumable:
            stopped += f" and can continue with resume = \"{context.run_id}\""
        log.error("run stopped: %s", stopped)

    final = publish(str(context.run_id), config, strategy, checkpoints, resumed_from, stopped)
    written = ", ".join(sorted(path.name for path in final.iterdir()))
    log.info("Run folder: %s (%s); checkpoint: %s", final.resolve(), written, checkpoints.folder.resolve())
    if stopped:
        raise SystemExit(1)


def publish(run_id: str, config: RunConfig, strategy, checkpoints: Checkpoints, resumed_from: int,
            stopped: str | None) -> Path:
    """Write every output of the run into its folder, then move the folder into place."""
    folder = RunFolder(Path(config.outputs_dir), run_id)
    torch.save(checkpoints.arrays.to_torch_state_dict(), folder.path("global_model.pt"))
    # Only a best model scored in this run (or the one it resumed) is its own.
    has_best = checkpoints.best_score is not None and checkpoints.best_path.is_file()
    if has_best:
        shutil.copyfile(checkpoints.best_path, folder.path("best_model.pt"))
    flags = list(strategy.log.flags)
    if strategy.log.registry is not None:  # deployment: registered sites, remembered across runs
        flags += check_and_remember(Path(config.outputs_dir), strategy.log.privacy, run_id)
    task = strategy.log.task
    document = metrics_document(config.to_dict(), strategy.log.rounds, strategy.log.seconds, task)
    failed = failed_every_round(document)
    document.update(resumed_from_round=resumed_from, resumed_run=checkpoints.resumed_run,
                    checkpoint=str(checkpoints.folder.relative_to(config.outputs_dir)), stopped=stopped, flags=flags,
                    failed_every_round=failed)
    folder.write_json("metrics.json", document)
    folder.path("metrics.png").write_bytes(metrics_plot(document, task))
    write_privacy_report(folder.staging, privacy_report_data(strategy.log.privacy, strategy.log.rounds, run_id,
                                                             config.dp, resumed_from) | {"flags": flags})
    notes = [
        f"Strategy: {config.strategy}; rounds {resumed_from + 1} to {config.num_server_rounds}"
        + (f" (resumed run {checkpoints.resumed_run} from its checkpoint at round {resumed_from})"
           if checkpoints.resumed_run else ""),
        f"Checkpoint: {checkpoints.folder.relative_to(config.outputs_dir)} under the outputs folder; "
        f"continue this run with resume = \"{run_id}\"",
        "Differential privacy: " + ("on (DP-SGD on every site); see privacy_report.md" if config.dp
                                    else "OFF: no formal privacy guarantee; see privacy_report.md"),
    ]
    if stopped:
        notes.append(f"STOPPED: {stopped}")
    notes += [f"FLAG: {flag}" for flag in flags]
    notes += [f"FAILED EVERY ROUND: {site} ({reason})" for site, reason in failed.items()]
    # The last round that was evaluated: a run stopped mid-round has no figures for that round.
    final = next((r["aggregate"] for r in reversed(document["rounds"]) if headline_metric(r["aggregate"], task)), {})
    metric = headline_metric(final, task)
    if metric:
        name = {"auc": "AUC", "dice": "mean Dice"}.get(metric, metric)
        notes.append(f"Final weighted validation {name}: {final[metric]:.3f}"
                     + (f"; best model by {name}: best_model.pt ({name} {checkpoints.best_score:.3f})" if has_best else ""))
    folder.path("summary.md").write_text(summary_markdown(document, run_id, notes, task.summary_lines(final, config)))
    # A run that completed no round of its own is kept for reading, but never becomes `latest`.
    completed = any(r > resumed_from for r in strategy.log.seconds)
    return folder.publish(latest=completed)
