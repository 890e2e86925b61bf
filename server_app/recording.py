"""What happened at each site in each round: trained, refused (budget, policy or app), busy (another
run holds its ledger), rejected, failed, or silent; and the line per site and round the run's log shows.

The log files every reply by site before the strategy aggregates (see `server_app.strategies`),
so a refusal or a failure is recorded with its reason and never mistaken for an update.

In deployment a site is the name registered with its node's key (`fedcare.identities`),
never the name the node claims: a node that claims another name, or is in no registry, is flagged
and its replies are rejected. In simulation (no registry) the partition's name is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from flwr.app import Message

from fedcare.errors import APP_REFUSED_CODE, LedgerBusy, site_of_error
from fedcare.figures import METRICS, metric_label
from fedcare.outputs import headline_metric, weighted_aggregate
from fedcare.tasks import TASKS, Task

NO_REPLY = "no reply before the round timeout"
# A site whose ledger another run holds for a round is not faulty: the round is to be retried after.
BUSY = "busy"


@dataclass
class RoundLog:
    """Per-round, per-site outcomes, keyed by site name; filled while the strategy runs."""

    rounds: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    privacy: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    expected: dict[tuple[int, str], list[Message]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)  # wall time of each round, train and evaluate
    registry: dict[int, str] | None = None  # node id -> registered site name; None: simulation
    impostors: dict[str, str] = field(default_factory=dict)  # filed name -> why its replies are rejected
    flags: list[str] = field(default_factory=list)  # what the run report must show, once each
    task: Task = field(default_factory=lambda: TASKS["classification"])  # what the sites' metrics mean

    def site_of(self, msg: Message, sent_to: dict[str, int] | None = None) -> str:
        # The SuperLink answers for a site that went away with an error from itself; the message it
        # replies to tells which site that was.
        node = (sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        claimed = None
        if msg.has_content() and "site" in msg.content:
            claimed = str(msg.content["site"]["name"])
        elif msg.has_error():
            claimed = site_of_error(msg.error.code, str(msg.error.reason))
        if self.registry is not None:
            return self.registered(node, claimed)
        if claimed:
            self.learn(node, claimed)
        return self.names.get(node, f"node {node}")

    def registered(self, node: int, claimed: str | None) -> str:
        """The registered name of `node`; flag it when it claims another or has none."""
        name = self.registry.get(node) if self.registry is not None else None
        if name is None:
            name = f"node {node} (unregistered)"
            self.flag_impostor(name, f"node {node} is in no site registry (it claims '{claimed}')")
        elif claimed is not None and claimed != name:
            self.flag_impostor(name, f"node {node}, registered as '{name}', claims to be '{claimed}'")
        self.names[node] = name
        return name

    def name_of(self, node: int) -> str:
        if self.registry is not None and node in self.registry:
            return self.registry[node]
        return self.names.get(node, f"node {node}")

    def flag_impostor(self, name: str, reason: str) -> None:
        self.impostors.setdefault(name, reason)
        self.flag(f"identity: {reason}; its replies are rejected")

    def flag(self, text: str) -> None:
        if text not in self.flags:
            self.flags.append(text)

    def learn(self, node: int, name: str) -> None:
        """Remember a node's site name, and file what it did before it told us under that name."""
        self.names[node] = name
        for sites in self.rounds.values():
            if f"node {node}" in sites:
                sites.setdefault(name, {}).update(sites.pop(f"node {node}"))

    def entry(self, server_round: int, site: str) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {}).setdefault(site, {})

    def file_replies(self, server_round: int, stage: str, replies: Iterable[Message]) -> list[Message]:
        """Record every reply of a train or evaluate stage; return those that carry results."""
        expected = self.expected.pop((server_round, stage), [])
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in expected}
        answered, usable = set(), []
        for msg in replies:
            site = self.site_of(msg, sent_to)
            answered.add(sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
            entry = self.entry(server_round, site)
            if site in self.impostors:
                entry[f"{stage}_status"], entry[f"{stage}_error"] = "rejected", self.impostors[site]
                continue
            if msg.has_error():
                # A site's gate refusing the app is the site's decision, not a failure.
                entry[f"{stage}_status"] = error_status(msg.error.code, str(msg.error.reason))
                entry[f"{stage}_error"] = str(msg.error.reason)
                continue
            if "privacy" in msg.content:
                self.privacy.setdefault(server_round, {})[site] = dict(msg.content["privacy"])
            refusal = refusal_reason(msg)
            if refusal:
                entry[f"{stage}_status"], entry[f"{stage}_error"] = "refused", refusal
                continue
            entry[f"{stage}_status"] = "ok"
            metrics = dict(msg.content["metrics"])
            if stage == "train":
                entry.update(num_train_examples=int(metrics["num-examples"]))
            else:
                # Whatever the task reports (loss, accuracy, auc; or loss, dice), filed under its own name.
                entry.update({k: v for k, v in metrics.items() if k != "num-examples"},
                             num_examples=int(metrics["num-examples"]))
            usable.append(msg)
        for node in (m.metadata.dst_node_id for m in expected):
            if node not in answered:
                entry = self.entry(server_round, self.name_of(node))
                entry[f"{stage}_status"], entry[f"{stage}_error"] = "failed", NO_REPLY
        return usable

    def reject(self, server_round: int, msg: Message, reason: str) -> None:
        entry = self.entry(server_round, self.site_of(msg))
        entry["train_status"], entry["train_error"] = "rejected", reason

    def all_budget_exhausted(self, server_round: int) -> bool:
        """Whether every site that answered the round refused it because its privacy budget is spent."""
        privacy = self.privacy.get(server_round, {})
        sites = self.rounds.get(server_round, {})
        return bool(sites) and all(privacy.get(site, {}).get("status") == "budget-exhausted" for site in sites)

    def round_lines(self, server_round: int) -> list[str]:
        """One line per site (trained with the epsilon it has spent, refused and why, failed and its kind),
        then the round's weighted validation figure: what the operator sees while the run goes on."""
        lines = []
        for site, entry in sorted(self.rounds.get(server_round, {}).items()):
            status = entry.get("train_status", "not asked")
            numbers = self.privacy.get(server_round, {}).get(site, {})
            text = {"ok": "trained"}.get(status, status)
            if status != "ok" and entry.get("train_error"):
                text += f" ({entry['train_error']})"
            if "epsilon" in numbers and "budget_epsilon" in numbers:
                text += f"; epsilon spent {numbers['epsilon']:.2f} of budget {numbers['budget_epsilon']:.2f}"
            figures = ", ".join(f"{metric_label(m)} {entry[m]:.3f}" for m in METRICS if m in entry)
            if figures:
                text += f"; {figures}"
            lines.append(f"round {server_round} {site}: {text}")
        aggregate = weighted_aggregate(self.rounds.get(server_round, {}), self.task)
        metric = headline_metric(aggregate, self.task)
        if metric:
            lines.append(f"round {server_round} all sites: weighted {metric_label(metric)} {aggregate[metric]:.3f} "
                         f"over {aggregate['num_examples']} validation case(s)")
        return lines

    def expect(self, server_round: int, stage: str, messages: Iterable[Message]) -> list[Message]:
        # Flower sets each message's id in place when it sends it, so keep the messages themselves.
        messages = list(messages)
        self.expected[(server_round, stage)] = messages
        return messages


def error_status(code: int, reason: str) -> str:
    """refused (the site's gate refused the app), busy (another run holds its ledger) or failed."""
    if code == APP_REFUSED_CODE:
        return "refused"
    return BUSY if LedgerBusy.kind in reason else "failed"


def refusal_reason(msg: Message) -> str | None:
    """Why a site refused what it was asked (a train round, an evaluation), or None if it answered."""
    if "refusal" in msg.content:
        return str(msg.content["refusal"]["reason"])
    if "arrays" in msg.content or "privacy" not in msg.content:
        return None
    numbers = msg.content["privacy"]
    if numbers.get("status") == "budget-exhausted":
        return (f"privacy budget exhausted: this round would take epsilon to {numbers['epsilon_after']:.2f}, "
                f"over the site's budget {numbers['budget_epsilon']:.2f}")
    return f"refused by the site's privacy policy: {numbers.get('reason', 'no reason given')}"
