"""The ClientApp: what runs inside each hospital. It reads the site's own DICOM, trains locally
(DP-SGD by default) and replies with model weights and numbers only.

The site decides whether it trains: before a private round it rebuilds its accountant from the
ledger on its own disk and refuses a round its lifetime budget cannot cover.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.egress import egress_log
from data_adapters import site_datasets
from fedcare.config import RunConfig
from fedcare.errors import SITE_ERROR_CODE, FedcareError, site_error_reason
from fedcare.model import build_model, check_private_trainable
from fedcare.privacy.dpsgd import plan_round, record_round, train_private
from fedcare.privacy.ledger import Ledger
from fedcare.sites import Site, site_from_node_config
from fedcare.training import evaluate, train_plain

app = ClientApp(mods=[egress_log])
log = logging.getLogger("fedcare.site")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on this site's data."""
    try:
        config, site = _settings(context)
        data = site_datasets(Path(site.data_path), config.val_fraction, config.seed, config.image_size)
        model = build_model(config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"]["server-round"])
        round_seed = config.seed * 1000 + server_round
        proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # sent by FedProx only
        if not config.dp:
            loss = train_plain(model, data.train, config, round_seed, proximal_mu)
            return _reply(msg, site, model, loss, data.num_train, ConfigRecord({"dp": False}))

        check_private_trainable(model)
        ledger = Ledger(site.ledger_path)
        history = ledger.history()
        plan = plan_round(config, site, data.num_train, history)
        privacy = {**plan.to_dict(), "dp": True, "epsilon": plan.epsilon_before}
        if not plan.affordable:
            log.warning("%s round %d refused: epsilon would reach %.3f, budget %.3f",
                        site.name, server_round, plan.epsilon_after, plan.budget_epsilon)
            privacy.update(status="budget-exhausted", **_history_lists(history))
            return Message(RecordDict({"privacy": ConfigRecord(privacy), "site": _site_record(site)}), reply_to=msg)

        loss, epsilon, steps = train_private(model, data.train, config, plan, history, round_seed, proximal_mu)
        record_round(ledger, plan, str(context.run_id), server_round, epsilon, steps)
        privacy.update(status="ok", epsilon=epsilon, steps=steps, **_history_lists(ledger.history()))
        log.info("%s round %d trained: epsilon %.3f of %.3f", site.name, server_round, epsilon, plan.budget_epsilon)
        return _reply(msg, site, model, loss, data.num_train, ConfigRecord(privacy))
    except FedcareError as err:
        return _failure(msg, context, err)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's held-out validation split."""
    try:
        config, site = _settings(context)
        data = site_datasets(Path(site.data_path), config.val_fraction, config.seed, config.image_size)
        model = build_model(config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        metrics = evaluate(model, data.val, config.batch_size)
        metrics["num-examples"] = data.num_val
        return Message(RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site)}), reply_to=msg)
    except FedcareError as err:
        return _failure(msg, context, err)


def _settings(context: Context) -> tuple[RunConfig, Site]:
    config = RunConfig.from_mapping(context.run_config)
    return config, site_from_node_config(context.node_config, config)


def _reply(msg: Message, site: Site, model, loss: float, num_train: int, privacy: ConfigRecord) -> Message:
    # num-examples is the number of training samples: FedAvg weights each site's update by it.
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": num_train}),
        "privacy": privacy,
        "site": _site_record(site),
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
