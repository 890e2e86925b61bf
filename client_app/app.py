"""The ClientApp: what runs inside each hospital. It reads the site's own DICOM, trains locally
under DP-SGD and replies with model weights and numbers only.

The site decides everything that protects it. Its policy (its own settings, never the run
config) answers each request before any data is read; a round it allows is planned, trained and
recorded while it holds its ledger, so no other run can spend the same budget meanwhile. The
train/validation split is the site's own, made once and kept; the noise and batch sampling draw
from the site's entropy; the exact training loss stays in the site's log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client_app.egress import egress_log
from client_app.guard import failed_reply, site_guard
from data_adapters import SiteDatasets, StoredSplit
from data_adapters.cache import limit_cache
from fedcare.config import RunConfig
from fedcare.device import cpu_state, model_device, release, resolve_device
from fedcare.egress import count_replies
from fedcare.errors import ConfigError, RunTooLarge, StateError
from fedcare.logs import one_line_per_record
from fedcare.model import build_model, network_parameters, sample_voxels
from fedcare.privacy.dpsgd import RoundPlan, plan_release_without_dp, plan_round, record_round, train_private
from fedcare.privacy.ledger import Ledger, LedgerEntry, private_history
from fedcare.privacy.randomness import reseed_global
from fedcare.privacy.record import PrivacyRecord
from fedcare.privacy.units import private_units
from fedcare.readiness import SiteCounts, require_site_ready
from fedcare.sites import Site, site_from_node_config
from fedcare.tasks import Task, task_for
from fedcare.training import train_plain

# site_guard outermost: not even a failing mod can send an exception's text out of the site.
app = ClientApp(mods=[site_guard, egress_log])
log = logging.getLogger("fedcare.site")
one_line_per_record()  # each of Flower's lines once in the site's log (fedcare.logs)


@dataclass
class Work:
    """What a message asks of this site: the run's request, the site itself and the global model."""

    config: RunConfig
    task: Task
    site: Site
    model: nn.Module  # on the site's device
    server_round: int
    run_id: str


def start(msg: Message, context: Context) -> Work:
    """Resolve the site, check its state folder and load the global model the server sent."""
    config = RunConfig.from_mapping(context.run_config)
    site = site_from_node_config(context.node_config, config)
    device = resolve_device(site.device)
    open_state(site)
    too_large = site.policy.size_refusal(network_parameters(config), sample_voxels(config))  # nothing allocated yet
    if too_large:
        raise RunTooLarge(f"{site.name}: {too_large}")
    if site.cache_path is not None:
        limit_cache(site.cache_path, site.cache_max_bytes)  # before this run's images are cached
    model = build_model(config)
    load_global_model(model, msg)
    model.to(device)
    reseed_global()  # nothing after this draws from a state the run's seed set
    return Work(config, task_for(config), site, model, int(msg.content["config"]["server-round"]),
                str(context.run_id))


def load_global_model(model: nn.Module, msg: Message) -> None:
    """The server's weights into the network the run config describes, or a one-line ConfigError."""
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except RuntimeError as err:
        first = str(err).splitlines()[-1].strip()[:200]
        raise ConfigError(f"the server's weights do not fit the network the run config describes ({first}): the "
                          "coordinator's model, model-args, in-channels and classes must be those of the run") from None


def open_state(site: Site) -> None:
    """Start the site's ledger on its first round; refuse a state folder whose ledger has vanished.

    A ledger that is gone while the egress log or the stored split shows earlier rounds means lost
    spending, and starting a new empty ledger would reset the site's budget without anyone deciding so.
    """
    ledger = Ledger(site.ledger_path)
    if ledger.initialised or ledger.path.exists():
        return  # a ledger is there: training verifies it in full
    traces = [path.name for path in (site.egress_path, site.split_path) if path.exists()]
    if traces:
        raise StateError(f"{site.state_path}: {' and '.join(traces)} show earlier rounds but the privacy ledger is "
                         "gone; restore it from backup, or start it afresh on purpose with "
                         f"`fedcare ledger-init {site.state_path}`")
    ledger.initialise()


def ready_data(work: Work) -> SiteDatasets:
    """The site's datasets, once the same readiness rules as `fedcare check-site` and `fedcare run` pass."""
    data = site_data(work)
    counts = SiteCounts(data.num_train, data.num_val, data.train_per_class, data.val_per_class)
    require_site_ready(work.config, counts, work.site.policy, work.site.name)
    return data


def site_data(work: Work) -> SiteDatasets:
    """The site's train/validation datasets for the run's task, on the site's own split."""
    split = StoredSplit(work.site.split_path, work.site.policy.val_fraction)
    return work.task.datasets(work.config, work.site, split)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training, if the site's policy allows what the run asks."""
    try:
        work = start(msg, context)
        try:
            return train_round(msg, work)
        finally:
            release(model_device(work.model))
    except Exception as err:  # noqa: BLE001 - whatever it is, only its kind may leave the site
        return _failure(msg, context, err)


def train_round(msg: Message, work: Work) -> Message:
    """Answer the request before reading any data; train a round the policy allows while holding the ledger."""
    refusal = work.site.policy.refusal(work.config)
    if refusal:
        log.warning("%s round %d refused: %s", work.site.name, work.server_round, refusal)
        return _privacy_reply(msg, work, {"status": "refused", "reason": refusal})
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # sent by FedProx only
    with Ledger(work.site.ledger_path).hold() as ledger:
        train_within = train_within_budget if work.config.dp else train_without_dp
        return train_within(msg, work, ledger, ready_data(work), proximal_mu)


def train_within_budget(msg: Message, work: Work, ledger: Ledger, data: SiteDatasets, proximal_mu: float) -> Message:
    """Plan the round against the site's ledger; refuse it, or train it and record it before replying."""
    site = work.site
    entries = ledger.entries()
    units = private_units(data.train, data.train_units, site.policy.privacy_unit)  # DP-SGD samples patients
    plan = plan_round(work.config, site, len(units), entries, work.run_id)
    history = private_history(entries)
    if not plan.affordable:
        log.warning("%s round %d refused: %s", site.name, work.server_round, plan.refusal)
        return _privacy_reply(msg, work, plan.reply_fields() | _history_lists(entries, work.run_id))
    loss, record = train_private(work.model, units, work.config, plan, history, proximal_mu, site.max_physical_batch)
    record_round(ledger, record, work.run_id, work.server_round)
    log.info("%s round %d trained: loss %.4f, epsilon %.3f of %.3f", site.name, work.server_round, loss,
             record.epsilon, record.budget_epsilon)
    reply = RoundPlan(record, plan.delta_rule, plan.epsilon_before).reply_fields()
    return _update(msg, work, data, reply | _history_lists(entries, work.run_id, (record, work.server_round)))


def train_without_dp(msg: Message, work: Work, ledger: Ledger, data: SiteDatasets, proximal_mu: float) -> Message:
    """A round without DP, which only a site whose policy allows it reaches: an unbounded release, recorded."""
    entries = ledger.entries()
    plan = plan_release_without_dp(work.config, work.site, len(set(data.train_units)) or data.num_train, entries)
    if not plan.affordable:
        return _privacy_reply(msg, work, plan.reply_fields() | _history_lists(entries, work.run_id))
    loss = train_plain(work.model, data.train, work.config, work.task.loss(work.config), proximal_mu)
    record_round(ledger, plan.record, work.run_id, work.server_round)
    log.warning("%s round %d trained WITHOUT DP (allowed by the site's policy): loss %.4f; the release is unbounded",
                work.site.name, work.server_round, loss)
    return _update(msg, work, data, plan.reply_fields() | _history_lists(entries, work.run_id))


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's validation split, within the site's evaluation quota."""
    try:
        work = start(msg, context)
        try:
            return evaluate_within_quota(msg, work)
        finally:
            release(model_device(work.model))
    except Exception as err:  # noqa: BLE001 - whatever it is, only its kind may leave the site
        return _failure(msg, context, err)


def evaluate_within_quota(msg: Message, work: Work) -> Message:
    """The validation metrics, unless this run has had all the evaluations the site allows."""
    quota = work.site.policy.evaluation_quota
    if count_replies(work.site.egress_path, work.run_id, "evaluate") >= quota:
        reason = f"this run has had the {quota} evaluations this site allows one run"
        log.warning("%s round %d evaluation refused: %s", work.site.name, work.server_round, reason)
        return Message(RecordDict({"refusal": ConfigRecord({"reason": reason}), "site": _site_record(work.site)}),
                       reply_to=msg)
    data = ready_data(work)
    # Evaluation batches change no metric: at most the site's physical batch.
    batches = replace(work.config, batch_size=min(work.config.batch_size, work.site.max_physical_batch))
    metrics = work.task.evaluate(work.model, data, batches)
    metrics["num-examples"] = data.num_val
    return Message(RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(work.site)}), reply_to=msg)


def _update(msg: Message, work: Work, data: SiteDatasets, privacy: dict) -> Message:
    # num-examples is the number of training samples: FedAvg weights each site's update by it. The
    # training loss is not sent: it is an exact function of private batches that no accountant covers.
    content = RecordDict({
        "arrays": ArrayRecord(cpu_state(work.model)),
        "metrics": MetricRecord({"num-examples": data.num_train}),
        "privacy": ConfigRecord(privacy),
        "site": _site_record(work.site),
    })
    return Message(content, reply_to=msg)


def _privacy_reply(msg: Message, work: Work, privacy: dict) -> Message:
    """A train reply without weights: the site refused the round, and says why."""
    return Message(RecordDict({"privacy": ConfigRecord(privacy), "site": _site_record(work.site)}), reply_to=msg)


def _site_record(site: Site) -> ConfigRecord:
    return ConfigRecord({"name": site.name})


def _history_lists(entries: list[LedgerEntry], run_id: str,
                   charged: tuple[PrivacyRecord, int] | None = None) -> dict[str, list]:
    """The whole lifetime history as plain numbers, so the server can re-check epsilon independently;
    and for each event the round of this run that charged it (0: another run's), so the server can
    name a round the site charged whose reply never arrived. `charged`: this round, just recorded."""
    events = [(entry.event, entry.round if entry.run_id == run_id else 0) for entry in entries if entry.private]
    if charged is not None and charged[0].private:
        events.append((charged[0].event, charged[1]))
    return {
        "history-noise-multiplier": [float(sigma) for (sigma, _, _), _ in events],
        "history-sample-rate": [float(q) for (_, q, _), _ in events],
        "history-steps": [int(steps) for (_, _, steps), _ in events],
        "history-run-round": [int(number) for _, number in events],
    }


def _failure(msg: Message, context: Context, err: Exception) -> Message:
    return failed_reply(msg, context, err)
