"""DP-SGD on a site, with real Opacus: composition across rounds, clipping, noise, enforcement."""

import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.model import build_model
from fedcare.privacy.dpsgd import plan_round, private_training, record_round, train_private
from fedcare.privacy.ledger import Ledger
from fedcare.sites import Site
from tests.dp_checks import assert_dp_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RunConfig(num_server_rounds=3, local_epochs=1, batch_size=8, target_epsilon=6.0, learning_rate=0.003)


def dataset(n: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 64, 64, generator=generator), torch.randint(0, 2, (n,), generator=generator))


def site(tmp_path: Path, budget: float = 50.0) -> Site:
    return Site("site-0", tmp_path / "data", tmp_path / "state", budget_epsilon=budget, budget_delta=0.0)


def one_round(site_: Site, server_round: int, data: TensorDataset) -> float:
    """One round as the ClientApp runs it: every object made anew, only the ledger on disk kept."""
    ledger = Ledger(site_.ledger_path)
    history = ledger.history()
    plan = plan_round(CONFIG, site_, len(data), history)
    assert plan.affordable
    _, epsilon, steps = train_private(build_model(CONFIG), data, CONFIG, plan, history, server_round)
    assert steps == plan.steps
    record_round(ledger, plan, "run-1", server_round, epsilon, steps)
    return epsilon


def test_rounds_with_a_fresh_app_compose_like_one_accountant(tmp_path):
    data, site_ = dataset(), site(tmp_path)
    epsilons = [one_round(site_, r, data) for r in (1, 2, 3)]
    plan = plan_round(CONFIG, site_, len(data), [])
    total_steps = 3 * plan.steps

    single = RDPAccountant()
    single.history = [(plan.noise_multiplier, plan.sample_rate, total_steps)]
    assert epsilons[-1] == pytest.approx(single.get_epsilon(plan.delta), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= CONFIG.target_epsilon + 1e-6

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier)),
        total_steps)
    independent = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(plan.delta)
    assert epsilons[-1] == pytest.approx(independent, rel=1e-2)  # the report flags more than 1 %


def test_noise_multiplier_is_planned_for_the_whole_run_not_one_round(tmp_path):
    data = dataset()
    whole = plan_round(CONFIG, site(tmp_path), len(data), [])
    one = plan_round(RunConfig(**{**CONFIG.__dict__, "num_server_rounds": 1}), site(tmp_path), len(data), [])
    assert whole.noise_multiplier > one.noise_multiplier
    assert whole.epsilon_after < one.epsilon_after


def test_clipping_and_noise_are_really_applied(tmp_path):
    data = dataset(64)
    plan = plan_round(CONFIG, site(tmp_path), len(data), [])
    private = private_training(build_model(CONFIG), data, CONFIG, plan, [], round_seed=1)
    images, labels = next(iter(private.loader))
    assert_dp_step(private, build_model(CONFIG), nn.CrossEntropyLoss(), images, labels, plan)


def test_a_round_past_the_budget_is_refused_before_training(tmp_path):
    data, site_ = dataset(), site(tmp_path)
    first = one_round(site_, 1, data)
    tight = Site(site_.name, site_.data_path, site_.state_path, budget_epsilon=first + 0.01, budget_delta=0.0)
    plan = plan_round(CONFIG, tight, len(data), Ledger(tight.ledger_path).history())
    assert not plan.affordable
    assert plan.epsilon_before == pytest.approx(first)
    assert plan.epsilon_after > tight.budget_epsilon


RESTART = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from torch.utils.data import TensorDataset
    sys.path.insert(0, sys.argv[3])
    from tests.test_dpsgd import CONFIG, dataset, one_round
    from fedcare.sites import Site
    state = Path(sys.argv[1])
    site = Site("site-0", state, state, budget_epsilon=float(sys.argv[4]), budget_delta=0.0)
    print(one_round(site, int(sys.argv[2]), dataset()))
""")


def test_a_restarted_site_keeps_what_it_spent(tmp_path):
    def site_process(server_round: int, budget: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", RESTART, str(tmp_path), str(server_round), str(ROOT), str(budget)],
                              capture_output=True, text=True, cwd=ROOT)

    first = site_process(1, 50.0)
    assert first.returncode == 0, first.stderr
    second = site_process(2, 50.0)
    assert second.returncode == 0, second.stderr
    assert float(second.stdout) > float(first.stdout)
    assert [e.round for e in Ledger(tmp_path / "ledger.jsonl").entries()] == [1, 2]

    refused = site_process(3, float(second.stdout) + 0.01)  # a new process with a budget nearly spent
    assert refused.returncode != 0 and "affordable" in refused.stderr
    assert len(Ledger(tmp_path / "ledger.jsonl").entries()) == 2
