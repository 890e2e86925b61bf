"""The ClientApp: what runs inside each hospital. It reads the site's own DICOM, trains locally
(DP-SGD by default) and replies with model weights and numbers only.

The site decides whether it trains: before a private round it rebuilds its accountant from the
ledger on its own disk and refuses a round its lifetime budget cannot cover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client_app.egress import egress_log
from client_app.guard import failed_reply, site_guard
from data_adapters import SiteDatasets, segmentation_datasets, segmentation_volume_datasets, site_datasets
from data_adapters.transforms import parse_patch_size
from fedcare.config import RunConfig
from fedcare.model import build_model, check_private_trainable
from fedcare.privacy.dpsgd import plan_round, record_round, train_private
from fedcare.privacy.ledger import Ledger
from fedcare.readiness import SiteCounts, require_site_ready
from fedcare.sites import Site, site_from_node_config
from fedcare.segmentation import evaluate_segmentation, evaluate_volumes
from fedcare.training import evaluate, task_loss, train_plain

# site_guard outermost: not even a failing mod can send an exception's text out of the site.
app = ClientApp(mods=[site_guard, egress_log])
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
    server_round = int(msg.content["config"]["server-round"])
    model = build_model(config)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = site_data(config, site, server_round)
    # The same readiness rules as `fedcare check-site` and `fedcare run`: the site enforces them itself.
    counts = SiteCounts(data.num_train, data.num_val, data.train_per_class, data.val_per_class)
    require_site_ready(config, counts, site.budget_delta, site.name)
    return Work(config, site, data, model, server_round)


def seed_for_round(config: RunConfig, server_round: int) -> int:
    """The seed of one round's local randomness (batches, patches): new each round, fixed by the run's seed."""
    return config.seed * 1000 + server_round


def site_data(config: RunConfig, site: Site, server_round: int) -> SiteDatasets:
    """The site's train/validation datasets for the run's task and input mode."""
    folder = Path(site.data_path)
    if config.task == "segmentation" and config.input_mode == "3d":
        return segmentation_volume_datasets(
            folder, config.val_fraction, config.seed, window=config.window, spacing=config.spacing,
            patch_size=config.patch_size, irregular=config.irregular_series,
            patch_seed=seed_for_round(config, server_round),
        )
    if config.task == "segmentation":
        return segmentation_datasets(folder, config.val_fraction, config.seed, config.image_size, window=config.window)
    return site_datasets(
        folder, config.val_fraction, config.seed, config.image_size, window=config.window,
        input_mode=config.input_mode, label_key=config.label_key or None, irregular=config.irregular_series,
        data_format=config.data_format, missing_images=config.missing_images,
        cache_dir=(site.state_path / config.cache_dir) if config.cache_dir else None,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this site's data: DP-SGD unless the run switches it off."""
    try:
        work = start(msg, context)
        seed = seed_for_round(work.config, work.server_round)
        proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # sent by FedProx only
        if not work.config.dp:
            loss = train_plain(work.model, work.data.train, work.config, seed, proximal_mu)
            return _reply(msg, work, loss, ConfigRecord({"dp": False}))
        return train_within_budget(msg, context, work, seed, proximal_mu)
    except Exception as err:  # noqa: BLE001 - whatever it is, only its kind may leave the site
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
        metrics = evaluate_site(work)
        metrics["num-examples"] = work.data.num_val
        return Message(RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(work.site)}), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - whatever it is, only its kind may leave the site
        return _failure(msg, context, err)


def evaluate_site(work: Work) -> dict[str, float]:
    """The task's metrics of the global model on the site's validation split; segmentation's key is "dice"."""
    config, model, val = work.config, work.model, work.data.val
    if config.task != "segmentation":
        return evaluate(model, val, config.batch_size)
    if config.input_mode == "3d":
        return evaluate_volumes(model, val, parse_patch_size(config.patch_size), config.batch_size,
                                task_loss(config))
    return evaluate_segmentation(model, val, config.batch_size, task_loss(config))


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


def _failure(msg: Message, context: Context, err: Exception) -> Message:
    return failed_reply(msg, context, err)
