"""Every round a site's ledger charged, matched against the replies this run received.

A site sends its whole lifetime history (one DP-SGD event per charged round) with each train
reply, and for each event the round of this run that charged it (0 for another run's). Any event
no received reply accounts for is explained:

- an event of this run whose round's reply never arrived (the site or its link died after the
  ledger write): "charged, reply lost";
- an event of another run just before the first round after a resume: the stopped run had already
  trained that round at the site before it was stopped, so the round was charged twice, both
  trainings real;
- any other event of another run between two replies of this one: that run's round on the same ledger.

A site whose last reply of the run was lost may hold a charge the report cannot see, and the report
says so. A site that sends no run rounds (an older ClientApp) is matched by history length only.
"""

from __future__ import annotations

from typing import Any

from fedcare.privacy import accounting
from fedcare.privacy.record import DP_SGD

LOST = "charged, reply lost"
TWICE = "charged twice: the stopped run trained this round at the site before the resume, then this run again"
ELSEWHERE = "charged between this run's replies by another run on the site's ledger (or a reply lost before)"


def _history(numbers: dict[str, Any]) -> list[tuple[float, float, int]] | None:
    if "history-steps" not in numbers:
        return None
    return [(float(s), float(q), int(n)) for s, q, n in zip(numbers["history-noise-multiplier"],
                                                          numbers["history-sample-rate"], numbers["history-steps"])]


def _charged(numbers: dict[str, Any]) -> bool:
    """Whether this reply's own round added a DP-SGD event to the site's history."""
    return numbers.get("status") == "ok" and numbers.get("mechanism") == DP_SGD


def _run_rounds(numbers: dict[str, Any], length: int) -> list[int] | None:
    rounds = numbers.get("history-run-round")
    return [int(r) for r in rounds] if rounds is not None and len(rounds) == length else None


def extra_charges(privacy: dict[int, dict[str, dict[str, Any]]], rounds: dict[int, dict[str, dict[str, Any]]],
                  site: str, resumed_from: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The site's charges no received reply accounts for, as report round rows with a `note`, and the
    rounds after its last reply whose training failed at the site (their charges cannot be seen).

    Each row carries the round it is attributed to, the event's figures and the cumulative epsilon
    after it (at the site's delta and accountant), and `before`: the round whose reply revealed it.
    """
    replies = sorted((r, sites[site]) for r, sites in privacy.items() if site in sites
                     and _history(sites[site]) is not None)
    rows: list[dict[str, Any]] = []
    previous, old = 0, None
    for current, after in replies:
        new = _history(after)
        run_rounds = _run_rounds(after, len(new))
        start = len(old) if old is not None else 0
        if old is None and run_rounds is None:
            previous, old = current, new  # nothing tells this run's events from earlier runs'
            continue
        if len(new) < start:
            previous, old = current, new  # a shorter history is a ledger problem the site itself reports
            continue
        lost = [r for r in range(previous + 1, current) if site not in privacy.get(r, {})]
        twice = previous <= resumed_from < current and old is not None
        for index in range(start, len(new) - _charged(after)):
            if run_rounds is not None:
                note = (run_rounds[index], LOST) if run_rounds[index] else None
                if note is None and old is None:
                    continue  # an earlier run's event, before this run began
            else:
                note = (lost.pop(0), LOST) if lost else None
            if note is None:
                note, twice = ((resumed_from + 1, TWICE) if twice else (current, ELSEWHERE)), False
            sigma, rate, steps = new[index]
            rows.append({"round": note[0], "sample_rate": rate, "noise_multiplier": sigma, "steps": steps,
                         "max_grad_norm": after["max_grad_norm"], "mechanism": DP_SGD, "note": note[1],
                         "epsilon": accounting.epsilon(new[: index + 1], after["delta"], after["accountant"]),
                         "before": current})
        previous, old = current, new
    last_reply = replies[-1][0] if replies else 0
    unseen = [r for r in sorted(rounds) if r > last_reply
              and rounds[r].get(site, {}).get("train_status") == "failed"]
    return rows, unseen
