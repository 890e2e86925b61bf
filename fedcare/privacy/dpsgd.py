"""DP-SGD on one site: plan a round against the site's lifetime budget, then train it with Opacus.

The plan is made before any data is touched: the noise multiplier comes from the whole planned
run (never from one round), and the epsilon after this round is computed from the site's ledger
history plus this round's steps. A round the budget cannot cover is not trained at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.config import RunConfig
from fedcare.model import grad_sample_mode
from fedcare.privacy.accounting import default_delta, epsilon, epsilon_after, noise_multiplier_for
from fedcare.privacy.ledger import Ledger
from fedcare.sites import Site
from fedcare.training import make_loader, make_optimizer, steps_per_epoch, task_loss, train_epochs

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class RoundPlan:
    """What one round of DP-SGD on this site will spend, fixed before training starts."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float
    delta: float
    delta_rule: str
    accountant: str
    budget_epsilon: float
    epsilon_before: float
    epsilon_after: float

    @property
    def affordable(self) -> bool:
        return self.epsilon_after <= self.budget_epsilon

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def plan_round(config: RunConfig, site: Site, num_train: int, history: History) -> RoundPlan:
    """Plan this round: q and steps from the site's data, sigma from the whole run's target."""
    epoch_steps = steps_per_epoch(num_train, config.batch_size)
    sample_rate = 1.0 / epoch_steps
    round_steps = config.local_epochs * epoch_steps
    if site.budget_delta > 0:
        delta, delta_rule = site.budget_delta, "set by the site"
    else:
        delta, delta_rule = default_delta(num_train), f"1/(10 N) rounded down, N = {num_train}"
    sigma = config.noise_multiplier or noise_multiplier_for(
        target_epsilon=config.target_epsilon, delta=delta, sample_rate=sample_rate,
        steps=config.num_server_rounds * round_steps, accountant=config.accountant,
    )
    return RoundPlan(
        sample_rate=sample_rate, noise_multiplier=sigma, steps=round_steps,
        max_grad_norm=config.max_grad_norm, delta=delta, delta_rule=delta_rule,
        accountant=config.accountant, budget_epsilon=site.budget_epsilon,
        epsilon_before=epsilon(history, delta, config.accountant),
        epsilon_after=epsilon_after(history, sigma, sample_rate, round_steps, delta, config.accountant),
    )


@dataclass
class PrivateTraining:
    """Opacus' engine, wrapped model, DP optimizer and Poisson loader for one round."""

    engine: PrivacyEngine
    model: nn.Module
    optimizer: DPOptimizer
    loader: DataLoader


def private_training(
    model: nn.Module, dataset: Dataset, config: RunConfig, plan: RoundPlan, history: History, round_seed: int,
    proximal_mu: float = 0.0,
) -> PrivateTraining:
    """Wrap model, optimizer and data for DP-SGD, with the accountant resumed from the ledger.

    The accountant starts from the ledger's history so that `get_epsilon` composes this round with
    everything the site released before, in this run and in earlier ones.
    """
    engine = PrivacyEngine(accountant=plan.accountant)
    engine.accountant.history = list(history)
    private_model, optimizer, loader = engine.make_private(
        module=model, optimizer=make_optimizer(model, config, proximal_mu),
        data_loader=make_loader(dataset, config.batch_size, round_seed, shuffle=False),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True, grad_sample_mode=grad_sample_mode(config),
    )
    return PrivateTraining(engine, private_model, optimizer, loader)


def train_private(
    model: nn.Module, dataset: Dataset, config: RunConfig, plan: RoundPlan, history: History, round_seed: int,
    proximal_mu: float = 0.0,
) -> tuple[float, float, int]:
    """Train one round under DP-SGD; returns (mean loss, cumulative epsilon, steps taken)."""
    private = private_training(model, dataset, config, plan, history, round_seed, proximal_mu)
    loss = train_epochs(private.model, private.loader, private.optimizer, config.local_epochs, task_loss(config))
    steps = sum(step for _, _, step in private.engine.accountant.history) - sum(step for _, _, step in history)
    return loss, private.engine.get_epsilon(plan.delta), steps


def record_round(ledger: Ledger, plan: RoundPlan, run_id: str, server_round: int, epsilon: float, steps: int) -> None:
    """Append the round to the site's ledger before anything it produced leaves the site."""
    ledger.append(
        run_id=run_id, round=server_round, sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier, steps=steps, max_grad_norm=plan.max_grad_norm,
        delta=plan.delta, accountant=plan.accountant, epsilon=epsilon, budget_epsilon=plan.budget_epsilon,
    )
