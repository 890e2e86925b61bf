"""The ClientApp: what runs inside each hospital. It reads the site's own DICOM, trains locally
(DP-SGD by default) and replies with model weights and numbers only.

The site decides whether it trains: before a private round it rebuilds its accountant from the
ledger on its own disk and refuses a round its lifetime budget cannot cover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client_app.egress import egress_log
from data_adapters import SiteDatasets, segmentation_datasets, site_datasets
from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE, FedcareError, site_error_reason
from fedcare.model import build_model, check_private_trainable
from fedcare.privacy.dpsgd import plan_round, record_round, train_private
from fedcare.privacy.ledger import Ledger
from fedcare.sites import Site, site_from_node_config
from fedcare.segmentation import evaluate_segmentation
from fedcare.training import evaluate, train_plain

app = ClientApp(mods=[egress_log])
log = logging.getLogger("fedcare.site")


@dataclass
class Work:
    """What a message asks of this site, with everything it needs loaded once."""

    config: RunConfig
    site: Site
    data: SiteDatasets
    model: nn.Module
    server_round: int


def start(msg: Message, context: Context) -> Work:
    """Resolve the site, read its data and load the global model the server sent."""
    config = RunConfig.from_mapping(context.run_config)
    site = site_from_node_config(context.node_config, config)
    if config.task == "segmentation":
        data = segmentation_datasets(Path(site.data_path), config.val_fraction, config.seed, config.image_size,
                                     window=config.window)
    else:
        data = site_datasets(
            Path(site.data_path), config.val_fraction, config.seed, config.image_size, window=config.window,
            input_mode=config.input_mode, label_key=config.label_key or None, irregular=config.irregular_series,
            data_format=config.data_format,
            cache_dir=(site.state_path / config.cache_dir) if config.cache_dir else None,
        )
    model = build_model(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return Work(config, site, data, model, int(msg.content["config"]["server-round"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this site's data: DP-SGD unless the run switches it off."""
    try:
        work = start(msg, context)
        round_seed = work.config.seed * 1000 + work.server_round
        proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # sent by FedProx only
        if not work.config.dp:
            loss = train_plain(work.model, work.data.train, work.config, round_seed, proximal_mu)
            return _reply(msg, work, loss, ConfigRecord({"dp": False}))
        return train_within_budget(msg, context, work, round_seed, proximal_mu)
    except FedcareError as err:
        return _failure(msg, context, err)


def train_within_budget(msg: Message, context: Context, work: Work, round_seed: int, proximal_mu: float) -> Message:
    """Plan the round against the site's ledger; refuse it, or train it and record it before replying."""
    site, config = work.site, work.config
    check_private_trainable(work.model)
    ledger = Ledger(site.ledger_path)
    history = ledger.history()
    plan = plan_round(config, site, work.data.num_train, history)
    privacy = {**plan.to_dict(), "dp": True, "epsilon": plan.epsilon_before}
    if not plan.affordable:
        log.warning("%s round %d refused: epsilon would reach %.3f, budget %.3f",
                    site.name, work.server_round, plan.epsilon_after, plan.budget_epsilon)
        privacy.update(status="budget-exhausted", **_history_lists(history))
        return Message(RecordDict({"privacy": ConfigRecord(privacy), "site": _site_record(site)}), reply_to=msg)

    loss, epsilon, steps = train_private(work.model, work.data.train, config, plan, history, round_seed, proximal_mu)
    record_round(ledger, plan, str(context.run_id), work.server_round, epsilon, steps)
    # The lifetime history now ends with this round; no need to read the ledger back.
    privacy.update(status="ok", epsilon=epsilon, steps=steps,
                   **_history_lists([*history, (plan.noise_multiplier, plan.sample_rate, steps)]))
    log.info("%s round %d trained: epsilon %.3f of %.3f", site.name, work.server_round, epsilon, plan.budget_epsilon)
    return _reply(msg, work, loss, ConfigRecord(privacy))


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's held-out validation split (loss, accuracy, AUC; or loss, Dice)."""
    try:
        work = start(msg, context)
        evaluate_task = evaluate_segmentation if work.config.task == "segmentation" else evaluate
        metrics = evaluate_task(work.model, work.data.val, work.config.batch_size)
        metrics["num-examples"] = work.data.num_val
        return Message(RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(work.site)}), reply_to=msg)
    except FedcareError as err:
        return _failure(msg, context, err)


def _reply(msg: Message, work: Work, loss: float, privacy: ConfigRecord) -> Message:
    # num-examples is the number of training samples: FedAvg weights each site's update by it.
    content = RecordDict({
        "arrays": ArrayRecord(work.model.state_dict()),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": work.data.num_train}),
        "privacy": privacy,
        "site": _site_record(work.site),
    })
    return Message(content, reply_to=msg)


def _site_record(site: Site) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


def _history_lists(history: list[tuple[float, float, int]]) -> dict[str, list]:
    # The whole lifetime history as plain numbers, so the server can re-check epsilon independently.
    return {
        "history-noise-multiplier": [float(sigma) for sigma, _, _ in history],
        "history-sample-rate": [float(q) for _, q, _ in history],
        "history-steps": [int(steps) for _, _, steps in history],
    }


def _failure(msg: Message, context: Context, err: FedcareError) -> Message:
    name = context.node_config.get("site-name") or f"site-{context.node_config.get('partition-id', '?')}"
    log.error("%s: %s", name, err)
    return Message(Error(code=SITE_ERROR_CODE, reason=site_error_reason(name, err)), reply_to=msg)
