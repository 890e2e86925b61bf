"""Every round a site's ledger charged, matched against the replies this run received.

A site sends its whole lifetime history (one DP-SGD event per charged round) with each train
reply. Between two replies of one run the history grows by exactly the rounds the site charged in
between; any more were charged without this run hearing of them:

- a round the site recorded but whose reply never arrived (the site or its link died after the
  ledger write): "charged, reply lost";
- the first round after a resume, which the stopped run had already trained at the site before it
  was stopped: that round was charged twice, both trainings real;
- anything else: another run's round on the same ledger between the two replies.

Without a later reply nothing can be reconciled: a site whose last reply of the run was lost may
hold a charge the report cannot see, and the report says so. Nor without an earlier one: the
history does not say which run charged an event, so a charge before the site's first received
reply of the run (its first round's reply lost) cannot be told from earlier runs' rounds.
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
    for (previous, before), (current, after) in zip(replies, replies[1:]):
        old, new = _history(before), _history(after)
        extra = new[len(old): len(new) - _charged(after)]
        if len(new) < len(old) or not extra:
            continue  # a shorter history is a ledger problem the site itself reports, not a charge
        lost = [r for r in range(previous + 1, current) if site not in privacy.get(r, {})]
        notes = [(r, LOST) for r in lost]
        if previous <= resumed_from < current:
            notes.append((resumed_from + 1, TWICE))
        for index, event in enumerate(extra):
            attributed, note = notes[index] if index < len(notes) else (current, ELSEWHERE)
            cumulative = accounting.epsilon(new[: len(old) + index + 1], after["delta"], after["accountant"])
            rows.append({"round": attributed, "sample_rate": event[1], "noise_multiplier": event[0],
                         "steps": event[2], "max_grad_norm": after["max_grad_norm"], "epsilon": cumulative,
                         "mechanism": DP_SGD, "note": note, "before": current})
    last_reply = replies[-1][0] if replies else 0
    unseen = [r for r in sorted(rounds) if r > last_reply
              and rounds[r].get(site, {}).get("train_status") == "failed"]
    return rows, unseen
