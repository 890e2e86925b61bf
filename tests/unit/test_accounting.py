"""Accounting against published reference values, Opacus itself and dp-accounting."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcare.errors import FedcareError
from fedcare.privacy import accounting

Q = 1 / 16
ROUND = (1.0, Q, 16)  # sigma 1, q 1/16, 16 steps: the notes' per-round reference


def opacus_epsilon(history, delta, accountant=RDPAccountant):
    """Opacus on the raw, unmerged history: the figure fedcare must reproduce."""
    official = accountant()
    official.history = list(history)
    return official.get_epsilon(delta)


def test_rdp_reference_value_from_opacus_tests():
    assert accounting.epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-3)


def test_round_reference_values():
    assert round(accounting.epsilon([ROUND], 1e-5), 2) == 2.76
    assert round(accounting.epsilon([ROUND] * 3, 1e-5), 2) == 3.80


@pytest.mark.parametrize("official", [RDPAccountant, PRVAccountant])
def test_round_by_round_equals_one_event_of_all_steps(official):
    name = official.mechanism()
    one_event = accounting.epsilon([(1.0, Q, 48)], 1e-5, name)
    assert accounting.epsilon([ROUND] * 3, 1e-5, name) == pytest.approx(one_event, rel=1e-9)
    assert accounting.opacus_epsilon([ROUND] * 3, 1e-5, name) == pytest.approx(opacus_epsilon([ROUND] * 3, 1e-5, official), rel=1e-9)


@pytest.mark.parametrize("accountant, method", [("rdp", "rdp"), ("prv", "pld")])
def test_the_enforced_epsilon_is_never_below_the_independent_recomputation(accountant, method):
    """The demo's site-0 case: Opacus RDP said 7.999 where dp-accounting RDP said 8.05."""
    history = [(0.9, 1 / 3, 6)] * 3 + [(1.4, 1 / 10, 30)]
    enforced = accounting.epsilon(history, 1e-5, accountant)
    independent = accounting.independent_epsilons(history, 1e-5)[method]
    assert enforced >= independent * (1 - 1e-3)
    assert enforced >= accounting.opacus_epsilon(history, 1e-5, accountant)
    assert accounting.check_agreement(enforced, accounting.independent_epsilons(history, 1e-5), accountant) is None \
        or "LOWER" not in accounting.check_agreement(enforced, accounting.independent_epsilons(history, 1e-5), accountant)


def test_events_with_different_sigma_are_all_counted():
    history = [ROUND, (2.0, Q, 16), ROUND, (1.0, 0.1, 5)]
    assert accounting.epsilon(history, 1e-5) == pytest.approx(opacus_epsilon(history, 1e-5), rel=1e-3)
    assert accounting.epsilon(history, 1e-5) > accounting.epsilon(history[:3], 1e-5)


def test_empty_history_and_zero_steps_spend_nothing():
    assert accounting.epsilon([], 1e-5) == 0.0
    assert accounting.epsilon([(1.0, Q, 0)], 1e-5, "prv") == 0.0
    assert accounting.independent_epsilons([], 1e-5) == {"rdp": 0.0, "pld": 0.0}


@pytest.mark.parametrize(
    "arguments",
    [
        ([ROUND], 1e-5, "gdp"),
        ([ROUND], 0.0, "rdp"),
        ([ROUND], 1.5, "rdp"),
        ([(0.0, Q, 16)], 1e-5, "rdp"),
        ([(1.0, 1.5, 16)], 1e-5, "rdp"),
        ([(1.0, Q, 2.5)], 1e-5, "rdp"),
    ],
)
def test_bad_input_is_a_one_line_fedcare_error(arguments):
    with pytest.raises(FedcareError) as error:
        accounting.epsilon(*arguments)
    assert "\n" not in str(error.value)


def test_epsilon_after_adds_one_event():
    history = [ROUND] * 2
    after = accounting.epsilon_after(history, 1.0, Q, 16, 1e-5, "rdp")
    assert after == pytest.approx(accounting.epsilon([ROUND] * 3, 1e-5))
    assert after > accounting.epsilon(history, 1e-5)


@pytest.mark.parametrize("history", [[(1.5, 0.04, 2250)], [ROUND] * 3, [ROUND, (1.36, Q, 16), (2.0, 0.02, 40)]])
def test_dp_accounting_agrees_with_opacus(history):
    independent = accounting.independent_epsilons(history, 1e-5)
    official_rdp = accounting.epsilon(history, 1e-5, "rdp")
    assert independent["rdp"] == pytest.approx(official_rdp, rel=1e-3)
    assert independent["pld"] <= independent["rdp"]
    assert accounting.check_agreement(official_rdp, independent, "rdp") is None
    assert accounting.check_agreement(accounting.epsilon(history, 1e-5, "prv"), independent, "prv") is None


def test_check_agreement_flags_both_directions_beyond_one_percent():
    independent = {"rdp": 4.0, "pld": 3.5}
    assert accounting.check_agreement(4.02, independent, "rdp") is None
    lower = accounting.check_agreement(3.9, independent, "rdp")
    higher = accounting.check_agreement(4.1, independent, "rdp")
    assert lower is not None and "LOWER" in lower and "\n" not in lower
    assert higher is not None and "LOWER" not in higher
    # PRV is compared with PLD, not with RDP.
    assert accounting.check_agreement(3.5, independent, "prv") is None
    assert accounting.check_agreement(4.0, independent, "prv") is not None
    assert accounting.check_agreement(1.0, {"rdp": math.inf, "pld": 1.0}, "rdp") is not None


def test_noise_multiplier_for_the_whole_planned_run():
    steps = 50 * 16
    sigma = accounting.noise_multiplier_for(8.0, 1e-5, Q, steps)
    spent = accounting.epsilon([(sigma, Q, 16)] * 50, 1e-5)
    assert 0.95 * 8.0 <= spent <= 8.0
    sigma_one_round = accounting.noise_multiplier_for(8.0, 1e-5, Q, 16)
    assert sigma == pytest.approx(1.36, abs=0.01)
    assert sigma_one_round == pytest.approx(0.62, abs=0.01)
    # The per-round sigma repeated for 50 rounds spends about five times the target.
    assert accounting.epsilon([(sigma_one_round, Q, 16)] * 50, 1e-5) > 30.0


def test_noise_multiplier_for_an_unreachable_target():
    with pytest.raises(FedcareError, match="raise target-epsilon"):
        accounting.noise_multiplier_for(1e-4, 1e-5, Q, 800)


@pytest.mark.parametrize("samples, delta", [(96, 1e-5), (480, 1e-5), (1, 1e-5), (10_000, 1e-5), (12_500, 8e-6), (60000, 1e-6)])
def test_default_delta_examples(samples, delta):
    assert accounting.default_delta(samples) == delta


def test_default_delta_is_below_a_tenth_of_one_over_n_with_one_significant_figure_and_at_most_1e_5():
    for samples in [*range(1, 5000), *range(5000, 200_000, 997)]:
        delta = accounting.default_delta(samples)
        assert delta <= 1 / (10 * samples) < 1 / samples
        assert delta <= 1e-5
        assert delta > min(1e-5, 1 / (10 * samples)) / 10
        assert float(f"{delta:.0e}") == delta


@pytest.mark.parametrize("samples", [0, -3, 2.5, True])
def test_default_delta_refuses_impossible_counts(samples):
    with pytest.raises(FedcareError):
        accounting.default_delta(samples)
