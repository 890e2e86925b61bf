"""Turn the privacy numbers the sites sent back into the run's privacy report data.

Sites send only numbers (the round's `PrivacyRecord`, its status and their lifetime history); the
report's independent check recomputes epsilon from that history on the server. What left a site
outside the DP guarantee is listed too: rounds a site's policy let run without DP, and how many
validation results each site sent. Every round the site's ledger charged is explained, including
those whose reply never arrived and a round charged twice across a resume (`server_app.reconcile`).
"""

from __future__ import annotations

from typing import Any

from fedcare.privacy.record import FIELDS, PrivacyRecord
from server_app.reconcile import extra_charges

ROUND_FIELDS = ("sample_rate", "noise_multiplier", "steps", "max_grad_norm", "epsilon", "mechanism")


def privacy_report_data(privacy: dict[int, dict[str, dict[str, Any]]], rounds: dict[int, dict[str, dict[str, Any]]],
                        run_id: str, dp: bool, resumed_from: int = 0) -> dict[str, Any]:
    """Per site: its budget, what it has spent, each round of this run it trained or refused, what else left it.

    `resumed_from`: the checkpoint's round when the run continued another (0: a fresh run)."""
    sites: dict[str, dict[str, Any]] = {}
    for server_round in sorted(privacy):
        for name, numbers in sorted(privacy[server_round].items()):
            site = sites.setdefault(name, _empty_site())
            if not all(key in numbers for key in FIELDS):  # refused before the site planned anything
                site["refused_rounds"].append(server_round)
                site["status"] = "refused" if site["status"] == "ok" else site["status"]
                continue
            record = PrivacyRecord.from_dict(numbers)
            site.setdefault("delta_rule", numbers["delta_rule"])  # how the first round of the run chose it
            site.update(
                privacy_unit=record.privacy_unit, population=record.population,
                accountant=record.accountant, delta=record.delta,
                budget_epsilon=record.budget_epsilon, epsilon=record.epsilon,
                history=[list(h) for h in zip(numbers["history-noise-multiplier"],
                                              numbers["history-sample-rate"], numbers["history-steps"])],
            )
            if numbers["status"] != "ok":
                site["refused_rounds"].append(server_round)
                site["status"] = numbers["status"]
            elif record.private:
                site["rounds"].append({k: numbers[k] for k in ROUND_FIELDS} | {"round": server_round})
            else:
                site["unbounded_rounds"].append(server_round)
    for name, site in sites.items():
        extra, unseen = extra_charges(privacy, rounds, name, resumed_from)
        # Each charge no reply accounts for goes just before the round whose reply revealed it.
        ordered = [((row["before"], 0), row) for row in extra] + [((row["round"], 1), row) for row in site["rounds"]]
        site["rounds"] = [row for _, row in sorted(ordered, key=lambda item: item[0])]
        site["unseen_rounds"] = unseen
    for name, count in validation_releases(rounds).items():
        if name not in sites and not count:
            continue  # a name that released nothing accepted here (a rejected impostor, say) is nobody's site
        sites.setdefault(name, _empty_site())
        sites[name]["validation_releases"] = count
    return {"dp": dp, "run_id": run_id, "sites": sites}


def validation_releases(rounds: dict[int, dict[str, dict[str, Any]]]) -> dict[str, int]:
    """How many validation results (loss and the task's metrics on the site's own split) each site sent."""
    counts: dict[str, int] = {}
    for sites in rounds.values():
        for name, entry in sites.items():
            counts[name] = counts.get(name, 0) + (entry.get("evaluate_status") == "ok")
    return counts


def _empty_site() -> dict[str, Any]:
    """A site's report entry before any of its rounds is read: what a site that trained nothing spent."""
    return {"rounds": [], "refused_rounds": [], "unbounded_rounds": [], "status": "ok",
            "accountant": "rdp", "delta": 0.0, "budget_epsilon": 0.0, "epsilon": 0.0}
