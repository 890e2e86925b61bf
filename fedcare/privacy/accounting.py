"""Privacy accounting for DP-SGD with Poisson sampling: epsilon of a history, sigma for a plan.

A history is Opacus' accountant format, one ``(noise_multiplier, sample_rate, steps)``
triple per training event. A site's epsilon is the LARGER of Opacus' RDP (or PRV) accountant and
Google's ``dp_accounting`` RDP (or PLD), which shares no code with Opacus: the figure a site
enforces and reports is never below its own cross-check. ``dp_accounting`` RDP and PLD also serve as the
independent second opinion in every report.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence

import dp_accounting
from dp_accounting import pld, rdp
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedcare.errors import FedcareError
from fedcare.privacy.record import ACCOUNTANTS

History = Sequence[tuple[float, float, int]]


# The official accountant each dp_accounting figure is compared with: PRV and PLD both
# track the privacy loss distribution numerically, so PRV is checked against PLD.
SAME_METHOD: dict[str, str] = {"rdp": "rdp", "prv": "pld"}

AGREEMENT_TOLERANCE = 0.01

# 1e-3 keeps PLD within ~1e-4 relative of 1e-4 (measured) at a tenth of the time:
# ~1 s for 19 rounds of 16 steps on 2 cores, against ~10 s at the library default.
PLD_DISCRETIZATION = 1e-3


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise FedcareError(
            f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)} "
            "(run-config key accountant)"
        )


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise FedcareError(f"delta {delta!r} must lie strictly between 0 and 1 (run-config key target-delta)")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise FedcareError(f"sample rate {sample_rate!r} must lie in (0, 1]")


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise FedcareError(f"steps {steps!r} must be a whole number >= 0")


def _check_event(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier > 0.0 and math.isfinite(noise_multiplier)):
        raise FedcareError(f"noise multiplier {noise_multiplier!r} must be a positive number")
    _check_sample_rate(sample_rate)
    _check_steps(steps)


def _merged(history: History) -> tuple[tuple[float, float, int], ...]:
    """Consecutive events with the same sigma and q become one, as Opacus' own step() does.

    Composition of identical Gaussian events is exact under both accountants, and merging
    makes a ledger of many equal rounds cost one accountant term instead of one per round.
    """
    merged: list[tuple[float, float, int]] = []
    for noise_multiplier, sample_rate, steps in history:
        _check_event(noise_multiplier, sample_rate, steps)
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (noise_multiplier, sample_rate):
            merged[-1] = (noise_multiplier, sample_rate, merged[-1][2] + steps)
        else:
            merged.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return tuple(merged)


# A site re-verifies its whole ledger before every round; caching by exact history means
# only the newest prefix is computed in a long-lived process. PRV takes ~0.2 s a call.
@functools.lru_cache(maxsize=4096)
def _official_epsilon(merged: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    official = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    official.history = list(merged)
    return float(official.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _cross_check_epsilon(merged: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """dp_accounting's figure by the same method as ``accountant`` (RDP for RDP, PLD for PRV)."""
    checker = rdp.RdpAccountant() if SAME_METHOD[accountant] == "rdp" else pld.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
    with _quiet_dp_accounting():
        for event in _dp_events(merged):
            checker.compose(event)
        return float(checker.get_epsilon(delta))


def _dp_events(history: History) -> Iterator[dp_accounting.DpEvent]:
    """Each history entry with steps as dp_accounting's Poisson-subsampled Gaussian event."""
    for noise_multiplier, sample_rate, steps in history:
        if steps:
            yield dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def opacus_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of ``history`` at ``delta`` by Opacus' RDP or PRV accountant alone."""
    _check_accountant(accountant)
    _check_delta(delta)
    merged = _merged(history)
    return _official_epsilon(merged, float(delta), accountant) if merged else 0.0


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """The cumulative epsilon a site enforces: the larger of Opacus' ``accountant`` and dp_accounting's same method.

    Two implementations of one method differ in their orders and numerics by up to about 1% (Opacus
    RDP 7.999 against dp_accounting RDP 8.05 on the demo); taking the larger means the independent
    check in a report can never show a site spent more than it states.
    """
    merged = _merged(history)
    official = opacus_epsilon(merged, delta, accountant)
    return max(official, _cross_check_epsilon(merged, float(delta), accountant)) if merged else 0.0


def epsilon_after(
    history: History,
    sigma: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon the history would reach if one more event of ``steps`` steps were added."""
    return epsilon([*history, (sigma, sample_rate, steps)], delta, accountant)


@functools.lru_cache(maxsize=256)
def _planned_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # A site plans the same run every round with the same figures: the search (close to a second)
    # runs once per process, not once per round.
    # The search starts at sigma 20 and 40, where Opacus warns that its largest RDP order
    # is optimal; that only concerns probes far from the answer, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
        ))


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Sigma that keeps the WHOLE planned run of ``steps`` steps within ``target_epsilon``.

    Computing sigma per round from zero history (what make_private_with_epsilon does when
    called each round) gives every round the whole budget; pass all planned steps here.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise FedcareError(
            f"target epsilon {target_epsilon!r} must be a positive number (run-config key target-epsilon)"
        )
    if steps == 0:
        raise FedcareError("cannot plan a noise multiplier for 0 steps: the run must train at least one step")
    try:
        sigma = _planned_sigma(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)
    except ValueError as error:
        raise FedcareError(
            f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} over {steps} steps "
            f"with sample rate {sample_rate:g} ({error}): raise target-epsilon or plan fewer rounds"
        ) from None
    # Opacus plans against its own figure; the site enforces the larger one, so add noise until it fits.
    while epsilon([(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        sigma *= 1.005
    return sigma


@contextlib.contextmanager
def _quiet_dp_accounting() -> Iterator[None]:
    # dp_accounting logs through absl each time a fractional RDP order (1.1, 1.2) fails to
    # converge; it then drops that order, which can only loosen the bound. Silence the
    # repeats so a site's log shows its own messages.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def independent_epsilons(history: History, delta: float) -> dict[str, float]:
    """Epsilon of ``history`` by dp_accounting's RDP and PLD accountants: ``{"rdp", "pld"}``.

    Each history entry is composed as its own event, without the merging the official path
    does, so a mistake there cannot hide in both figures.
    """
    _check_delta(delta)
    for event in history:
        _check_event(*event)
    if not any(steps for _, _, steps in history):
        return {"rdp": 0.0, "pld": 0.0}
    rdp_accountant = rdp.RdpAccountant()
    pld_accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    with _quiet_dp_accounting():
        for event in _dp_events(history):
            rdp_accountant.compose(event)
            pld_accountant.compose(event)
        return {
            "rdp": float(rdp_accountant.get_epsilon(delta)),
            "pld": float(pld_accountant.get_epsilon(delta)),
        }


def check_agreement(official: float, independent: dict[str, float], accountant: str) -> str | None:
    """One-line warning when the official epsilon and dp_accounting's same method differ by >1%.

    Both directions are reported: a LOWER official figure means the stated guarantee may not
    hold; a higher one is conservative (Opacus' RDP stops at order 63 and PRV returns an
    upper bound with an absolute error of 0.01, which matter most for small epsilons).
    """
    _check_accountant(accountant)
    method = SAME_METHOD[accountant]
    other = float(independent[method])
    if official == other:
        return None
    if math.isfinite(official) and math.isfinite(other):
        gap = abs(official - other)
        if gap <= AGREEMENT_TOLERANCE * abs(other):
            return None
        relative = f"{gap / abs(other):.1%}" if other else "an unbounded fraction"
    else:
        relative = "an unbounded fraction"
    names = f"official {accountant.upper()} epsilon {official:.4g} vs dp-accounting {method.upper()} {other:.4g}"
    if official < other:
        return (
            f"{names}: the official figure is LOWER by {relative}, so the stated guarantee may not hold; "
            "do not sign until the accounting is explained"
        )
    return (
        f"{names}: the official figure is higher by {relative} (more than 1%); "
        "the guarantee is stated at the higher, more conservative figure"
    )


MAX_DEFAULT_DELTA = 1e-5


def default_delta(num_samples: int) -> float:
    """A delta well below 1/N: 1/(10 N) rounded DOWN to one significant figure, and never above 1e-5.

    A delta of 1/N would allow a mechanism that publishes one whole patient record at random and
    still calls itself (0, delta)-DP. A tenth of that is the usual margin for large N; a small site
    (N = 100 gives 1/(10 N) = 1e-3) gets 1e-5, so a few hundred cases never mean a weak delta.
    Rounding down keeps the bound and gives a figure a reader can compare across sites.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise FedcareError(f"number of training samples {num_samples!r} must be a whole number >= 1")
    # Integer arithmetic: floats turn 1/1250 into 7.999...e-4 and would round it down to 7e-4.
    denominator = 10 * num_samples
    digits = len(str(denominator))
    if denominator == 10 ** (digits - 1):
        return min(MAX_DEFAULT_DELTA, float(f"1e-{digits - 1}"))
    mantissa = 10**digits // denominator
    return min(MAX_DEFAULT_DELTA, float(f"{mantissa}e-{digits}"))
