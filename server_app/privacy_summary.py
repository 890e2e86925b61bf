"""Turn the privacy numbers the sites sent back into the run's privacy report data.

Sites send only numbers (q, sigma, steps, C, delta, cumulative epsilon and their lifetime
history); the report's independent check recomputes epsilon from that history on the server.
"""

from __future__ import annotations

from typing import Any


def privacy_report_data(privacy: dict[int, dict[str, dict[str, Any]]], run_id: str, dp: bool) -> dict[str, Any]:
    """Per site: its budget, what it has spent, and each round of this run it trained or refused."""
    sites: dict[str, dict[str, Any]] = {}
    for server_round in sorted(privacy):
        for name, numbers in sorted(privacy[server_round].items()):
            if not numbers.get("dp"):
                continue
            site = sites.setdefault(name, {"rounds": [], "refused_rounds": [], "status": "ok"})
            site.update(
                accountant=numbers["accountant"], delta=numbers["delta"], delta_rule=numbers["delta_rule"],
                budget_epsilon=numbers["budget_epsilon"], epsilon=numbers["epsilon"],
                history=[list(h) for h in zip(numbers["history-noise-multiplier"],
                                              numbers["history-sample-rate"], numbers["history-steps"])],
            )
            if numbers["status"] == "ok":
                site["rounds"].append({k: numbers[k] for k in (
                    "sample_rate", "noise_multiplier", "steps", "max_grad_norm", "epsilon")} | {"round": server_round})
            else:
                site["refused_rounds"].append(server_round)
                site["status"] = "budget-exhausted"
    return {"dp": dp, "run_id": run_id, "sites": sites}
