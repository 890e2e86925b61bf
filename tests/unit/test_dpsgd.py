"""DP-SGD on a site, with real Opacus: composition across rounds, clipping, noise, enforcement, randomness."""

import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import dp_accounting
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import LedgerBusy
from fedcare.model import build_model
from fedcare.policy import SitePolicy
from fedcare.privacy.accounting import epsilon as lifetime_epsilon
from fedcare.privacy.dpsgd import plan_round, private_training, record_round, train_private
from fedcare.privacy.ledger import Ledger
from fedcare.sites import Site
from tests.dp_checks import assert_dp_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = RunConfig(num_server_rounds=3, local_epochs=1, batch_size=8, target_epsilon=6.0, learning_rate=0.003)


def dataset(n: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 64, 64, generator=generator), torch.randint(0, 2, (n,), generator=generator))


def site(tmp_path: Path, budget: float = 50.0, **policy) -> Site:
    return Site("site-0", tmp_path / "data", tmp_path / "state", SitePolicy(budget_epsilon=budget, **policy))


def one_round(site_: Site, server_round: int, data: TensorDataset, config: RunConfig = CONFIG) -> float:
    """One round as the ClientApp runs it: every object made anew, only the ledger on disk kept."""
    with Ledger(site_.ledger_path).hold() as ledger:
        entries = ledger.entries()
        plan = plan_round(config, site_, len(data), entries, "run-1")
        if not plan.affordable:
            raise SystemExit(f"refused: {plan.refusal}")
        _, record = train_private(build_model(config), data, config, plan, ledger.history())
        assert record.steps == plan.steps
        record_round(ledger, record, "run-1", server_round)
    return record.epsilon


def test_rounds_with_a_fresh_app_compose_like_one_accountant(tmp_path):
    data, site_ = dataset(), site(tmp_path)
    epsilons = [one_round(site_, r, data) for r in (1, 2, 3)]
    plan = plan_round(CONFIG, site_, len(data), [], "run-1")
    total_steps = 3 * plan.steps
    single = lifetime_epsilon([(plan.noise_multiplier, plan.sample_rate, total_steps)], plan.delta)
    assert epsilons[-1] == pytest.approx(single, rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= CONFIG.target_epsilon + 1e-6

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(plan.sample_rate, dp_accounting.GaussianDpEvent(plan.noise_multiplier)),
        total_steps)
    independent = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(plan.delta)
    assert independent <= epsilons[-1] <= independent * 1.01  # never below the cross-check


def test_noise_multiplier_is_planned_for_the_whole_run_not_one_round(tmp_path):
    data = dataset()
    whole = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    one = plan_round(replace(CONFIG, num_server_rounds=1), site(tmp_path), len(data), [], "run-1")
    assert whole.noise_multiplier > one.noise_multiplier
    assert whole.epsilon_after < one.epsilon_after


def test_clipping_and_noise_are_really_applied(tmp_path):
    data = dataset(64)
    plan = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    private = private_training(build_model(CONFIG), data, CONFIG, plan, [])
    images, labels = next(iter(private.loader))
    assert_dp_step(private, build_model(CONFIG), nn.CrossEntropyLoss(), images, labels, plan)


def test_a_round_past_the_budget_is_refused_before_training(tmp_path):
    data, site_ = dataset(), site(tmp_path)
    first = one_round(site_, 1, data)
    tight = site(tmp_path, budget=first + 0.01)
    plan = plan_round(CONFIG, tight, len(data), Ledger(tight.ledger_path).entries(), "run-1")
    assert not plan.affordable and plan.status == "budget-exhausted"
    assert plan.epsilon_before == pytest.approx(first)
    assert plan.epsilon_after > tight.policy.budget_epsilon


def test_a_small_site_gets_a_delta_far_below_one_over_n_and_keeps_it(tmp_path):
    site_ = site(tmp_path)
    one_round(site_, 1, dataset(40))
    assert Ledger(site_.ledger_path).delta() == 1e-5  # 1/(10 N) would be 2.5e-3 for N = 40
    # The coordinator can change N (a larger batch, or more data): the ledger's delta does not move.
    later = plan_round(CONFIG, site_, 400, Ledger(site_.ledger_path).entries(), "run-1")
    assert later.delta == 1e-5 and later.affordable


def test_a_site_whose_setting_changes_the_ledgers_delta_refuses(tmp_path):
    one_round(site(tmp_path), 1, dataset())
    changed = site(tmp_path, budget_delta=1e-7)
    plan = plan_round(CONFIG, changed, 40, Ledger(changed.ledger_path).entries(), "run-1")
    assert plan.status == "refused" and "differs from its ledger's delta" in plan.refusal


def test_a_run_asking_for_another_delta_is_refused(tmp_path):
    asking = replace(CONFIG, target_delta=1e-3)
    plan = plan_round(asking, site(tmp_path), 40, [], "run-1")
    assert plan.status == "refused" and "asks for delta 0.001" in plan.refusal


def test_too_little_planned_noise_is_refused(tmp_path):
    # One round, epsilon 50: Opacus would plan a tiny sigma for it; this site wants at least 0.8.
    greedy = replace(CONFIG, num_server_rounds=1, target_epsilon=50.0)
    plan = plan_round(greedy, site(tmp_path, budget=100.0, min_noise_multiplier=0.8), 40, [], "run-1")
    assert plan.status == "refused" and "below this site's minimum 0.8" in plan.refusal


def test_a_run_past_the_sites_per_run_cap_is_refused_once_it_has_spent_it(tmp_path):
    capped = site(tmp_path, budget=50.0, max_run_epsilon=3.0)
    config = replace(CONFIG, target_epsilon=3.0, num_server_rounds=2)
    one_round(capped, 1, dataset(), config)
    one_round(capped, 2, dataset(), config)
    plan = plan_round(config, capped, 40, Ledger(capped.ledger_path).entries(), "run-1")  # a round past the plan
    assert plan.status == "refused" and "allows one run" in plan.refusal
    assert plan_round(config, capped, 40, Ledger(capped.ledger_path).entries(), "run-2").affordable


def test_each_round_draws_noise_and_batches_the_coordinator_cannot_predict(tmp_path):
    """The attack: a coordinator that sets the run's seed replays the site's randomness. It must fail."""
    data = dataset(64)
    plan = plan_round(CONFIG, site(tmp_path), len(data), [], "run-1")
    draws = []
    for _ in range(2):
        torch.manual_seed(CONFIG.seed)  # everything the coordinator can set, set the same way
        private = private_training(build_model(CONFIG), data, CONFIG, plan, [])
        assert private.optimizer.generator is not None  # not torch's global generator
        first_noise = torch.normal(0.0, 1.0, (4,), generator=private.optimizer.generator)
        draws.append((first_noise, next(iter(private.loader))[1]))
    assert not torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1]) or len(draws[0][1]) == 0

    updates = []
    for _ in range(2):
        torch.manual_seed(CONFIG.seed)
        model = build_model(CONFIG)
        train_private(model, data, CONFIG, plan, [])
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(updates[0], updates[1])


def test_two_rounds_planned_at_once_against_one_ledger_never_exceed_the_budget(tmp_path):
    data = dataset()
    first = one_round(site(tmp_path), 1, data)
    # Room for exactly one more round: two runs race for it.
    budget = plan_round(CONFIG, site(tmp_path), len(data), Ledger(tmp_path / "state" / "ledger.jsonl").entries(),
                        "run-1").epsilon_after + 1e-6
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def racing_run(server_round: int) -> None:
        barrier.wait()
        try:
            one_round(site(tmp_path, budget=budget), server_round, data)
            outcomes.append("trained")
        except (LedgerBusy, SystemExit) as refused:
            outcomes.append(f"refused: {refused}")

    threads = [threading.Thread(target=racing_run, args=(r,)) for r in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = Ledger(tmp_path / "state" / "ledger.jsonl").entries()
    assert outcomes.count("trained") == 1, outcomes
    assert len(entries) == 2 and entries[0].epsilon == first and entries[-1].epsilon <= budget


RESTART = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from tests.unit.test_dpsgd import dataset, one_round, site
    print(one_round(site(Path(sys.argv[1]), float(sys.argv[4])), int(sys.argv[2]), dataset()))
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
    ledger = Ledger(tmp_path / "state" / "ledger.jsonl")
    assert [e.round for e in ledger.entries()] == [1, 2]

    refused = site_process(3, float(second.stdout) + 0.01)  # a new process with a budget nearly spent
    assert refused.returncode != 0 and "refused: epsilon would reach" in refused.stderr
    assert len(ledger.entries()) == 2
