"""DP-SGD on one site: plan a round against the site's policy and ledger, then train it with Opacus.

The plan is made before any step is taken: the noise multiplier comes from the whole planned run
(never from one round), delta is the one the ledger's first entry fixed, and the epsilon after this
round is computed from the site's ledger plus this round's steps. A round the site's policy or
budget does not allow is not trained at all. Noise and batch sampling draw from generators seeded
from the site's own entropy each round (`fedcare.privacy.randomness`), never from the run config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.config import RunConfig
from fedcare.device import model_device
from fedcare.logs import SECURE_RNG, explain_once, silence
from fedcare.model import grad_sample_mode
from fedcare.tasks import task_for
from fedcare.privacy.accounting import default_delta, epsilon, epsilon_after, noise_multiplier_for
from fedcare.privacy.ledger import Ledger, LedgerEntry, private_history
from fedcare.privacy.randomness import site_generator
from fedcare.privacy.record import DP_SGD, NO_DP, PrivacyRecord
from fedcare.sites import DEFAULT_PHYSICAL_BATCH, Site
from fedcare.training import make_loader, make_optimizer, steps_per_epoch, train_epochs

History = list[tuple[float, float, int]]

# Opacus warns on every engine that secure_mode is off; the site's generators replace it, so the
# site says why once (private_training) instead of once a round.
silence(SECURE_RNG)
log = logging.getLogger("fedcare.site")


@dataclass(frozen=True)
class RoundPlan:
    """What one round on this site will release, fixed before training starts, and whether the site allows it."""

    record: PrivacyRecord     # its epsilon is the lifetime epsilon after the round
    delta_rule: str
    epsilon_before: float
    refusal: str | None = None
    status: str = "ok"        # ok | budget-exhausted | refused

    @property
    def affordable(self) -> bool:
        return self.refusal is None

    # The round's figures, read as the plan's own.
    noise_multiplier = property(lambda self: self.record.noise_multiplier)
    sample_rate = property(lambda self: self.record.sample_rate)
    steps = property(lambda self: self.record.steps)
    max_grad_norm = property(lambda self: self.record.max_grad_norm)
    delta = property(lambda self: self.record.delta)
    epsilon_after = property(lambda self: self.record.epsilon)

    def reply_fields(self) -> dict[str, float | int | str]:
        """The plan as a train reply's privacy record carries it; `epsilon` is what the site has spent by then."""
        spent = self.record.epsilon if self.affordable else self.epsilon_before
        fields = {**self.record.to_dict(), "epsilon": spent, "delta_rule": self.delta_rule,
                  "epsilon_before": self.epsilon_before, "epsilon_after": self.record.epsilon, "status": self.status}
        return fields | ({"reason": self.refusal} if self.refusal else {})


def site_delta(site: Site, num_train: int, entries: list[LedgerEntry]) -> tuple[float, str, str | None]:
    """(delta, how it was chosen, refusal): the ledger's delta once it has one, else the site's rule for N units."""
    configured = site.policy.budget_delta
    if entries:
        fixed = entries[0].delta
        if configured and configured != fixed:
            return fixed, "fixed by the ledger's first entry", (
                f"this site's budget-delta {configured:g} differs from its ledger's delta {fixed:g}, fixed at its "
                "first round; set budget-delta back to it (or 0)")
        return fixed, "fixed by the ledger's first entry", None
    if configured:
        return configured, "set by the site", None
    unit = site.policy.privacy_unit
    return default_delta(num_train), (f"the smaller of 1e-5 and 1/(10 N) rounded down, N = {num_train} {unit}s at the "
                                      "first round"), None


def unit_refusal(site: Site, entries: list[LedgerEntry]) -> str | None:
    """Why a round per this site's privacy unit cannot compose with its ledger, or None."""
    unit = site.policy.privacy_unit
    if entries and entries[0].privacy_unit != unit:
        return (f"this site's ledger accounts per {entries[0].privacy_unit}, and its privacy-unit now says {unit}: "
                f"epsilons of different units do not compose; set privacy-unit back to {entries[0].privacy_unit}")
    return None


def plan_round(config: RunConfig, site: Site, num_train: int, entries: list[LedgerEntry], run_id: str) -> RoundPlan:
    """Plan this round: q and steps from the site's N training units, sigma from the whole run's target, limits
    from the policy. `num_train` counts patients when the site's privacy unit is the patient."""
    policy = site.policy
    epoch_steps = steps_per_epoch(num_train, config.batch_size)
    sample_rate = 1.0 / epoch_steps
    round_steps = config.local_epochs * epoch_steps
    delta, delta_rule, refusal = site_delta(site, num_train, entries)
    history = private_history(entries)
    sigma = config.noise_multiplier or noise_multiplier_for(
        target_epsilon=config.target_epsilon, delta=delta, sample_rate=sample_rate,
        steps=config.num_server_rounds * round_steps, accountant=policy.accountant,
    )
    before = epsilon(history, delta, policy.accountant)
    after = epsilon_after(history, sigma, sample_rate, round_steps, delta, policy.accountant)
    this_run = private_history([entry for entry in entries if entry.run_id == run_id])
    run_after = epsilon_after(this_run, sigma, sample_rate, round_steps, delta, policy.accountant)
    record = PrivacyRecord(DP_SGD, policy.privacy_unit, num_train, sample_rate, sigma, round_steps,
                           config.max_grad_norm, delta, policy.accountant, after, policy.budget_epsilon)
    refusal = (unit_refusal(site, entries) or refusal or policy.delta_refusal(config.target_delta, delta)
               or policy.noise_refusal(sigma))
    if refusal:
        return RoundPlan(record, delta_rule, before, refusal, "refused")
    if after > policy.budget_epsilon:
        return RoundPlan(record, delta_rule, before, f"epsilon would reach {after:.3f}, over the site's lifetime "
                         f"budget {policy.budget_epsilon:g}", "budget-exhausted")
    if policy.max_run_epsilon and run_after > policy.max_run_epsilon:
        return RoundPlan(record, delta_rule, before, f"this run would spend epsilon {run_after:.3f} at this site, "
                         f"over the {policy.max_run_epsilon:g} it allows one run", "refused")
    return RoundPlan(record, delta_rule, before)


def plan_release_without_dp(config: RunConfig, site: Site, num_train: int, entries: list[LedgerEntry]) -> RoundPlan:
    """A round the site's policy lets run without DP: recorded as an unbounded release, epsilon unchanged."""
    delta, delta_rule, _ = site_delta(site, num_train, entries)
    before = epsilon(private_history(entries), delta, site.policy.accountant)
    steps = config.local_epochs * steps_per_epoch(num_train, config.batch_size)
    record = PrivacyRecord(NO_DP, site.policy.privacy_unit, num_train, 1.0, 0.0, steps, config.max_grad_norm, delta,
                           site.policy.accountant, before, site.policy.budget_epsilon)
    refusal = unit_refusal(site, entries)
    return RoundPlan(record, delta_rule, before, refusal, "refused" if refusal else "ok")


@dataclass
class PrivateTraining:
    """Opacus' engine, wrapped model, DP optimizer and Poisson loader for one round."""

    engine: PrivacyEngine
    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader


def private_training(
    model: nn.Module, dataset: Dataset, config: RunConfig, plan: RoundPlan, history: History,
    proximal_mu: float = 0.0,
) -> PrivateTraining:
    """Wrap model, optimizer and data for DP-SGD, with the accountant resumed from the ledger.

    The accountant starts from the ledger's history so that it composes this round with everything
    the site released before. The Poisson sampler and the noise each get a generator of their own,
    seeded from the site's entropy for this round alone.
    """
    explain_once(SECURE_RNG, log)  # the notice this engine raises, silenced above
    engine = PrivacyEngine(accountant=plan.record.accountant)
    engine.accountant.history = list(history)
    private_model, optimizer, loader = engine.make_private(
        module=model, optimizer=make_optimizer(model, config, proximal_mu),
        data_loader=make_loader(dataset, config.batch_size, site_generator(), shuffle=False),
        noise_multiplier=plan.record.noise_multiplier, max_grad_norm=plan.record.max_grad_norm,
        poisson_sampling=True, grad_sample_mode=grad_sample_mode(model, config),
        noise_generator=site_generator(model_device(model)),  # the noise is drawn where the gradients are
    )
    return PrivateTraining(engine, private_model, optimizer, loader)


def train_private(
    model: nn.Module, dataset: Dataset, config: RunConfig, plan: RoundPlan, history: History,
    proximal_mu: float = 0.0, physical_batch: int = DEFAULT_PHYSICAL_BATCH,
) -> tuple[float, PrivacyRecord]:
    """Train one round under DP-SGD; returns (mean loss, the round's record with the steps really taken).

    A Poisson batch larger than `physical_batch` (the site's max-physical-batch) goes through the
    network in parts whose clipped gradients are summed before the one noisy step: the same step,
    in less memory.
    """
    private = private_training(model, dataset, config, plan, history, proximal_mu)
    with BatchMemoryManager(data_loader=private.loader, max_physical_batch_size=physical_batch,
                            optimizer=private.optimizer) as loader:
        loss = train_epochs(private.model, loader, private.optimizer, config.local_epochs, task_for(config).loss(config))
    steps = sum(step for _, _, step in private.engine.accountant.history) - sum(step for _, _, step in history)
    record = plan.record
    spent = epsilon_after(history, record.noise_multiplier, record.sample_rate, steps, record.delta, record.accountant)
    return loss, replace(record, steps=steps, epsilon=spent)


def record_round(ledger: Ledger, record: PrivacyRecord, run_id: str, server_round: int) -> None:
    """Append the round to the site's ledger before anything it produced leaves the site."""
    ledger.append_record(run_id, server_round, record)
