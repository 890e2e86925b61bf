"""Privacy reports: JSON for machines, Markdown for the data-protection officer, a PNG of epsilon.

``write_privacy_report`` takes what the server collected from the sites over a run (or what
``report_from_ledger`` reads from one site's ledger), recomputes every site's epsilon with
dp_accounting as an independent check, and writes ``privacy_report.json``, ``.md`` and
``.png`` atomically. A run without DP says so in all three, so that no reader mistakes it
for a protected one.
"""

import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcare.errors import FedcareError, LedgerError
from fedcare.privacy import accounting
from fedcare.atomic import write_atomic
from fedcare.privacy.ledger import Ledger, private_history
from fedcare.privacy.report_markdown import render_markdown

REPORT_FILES: tuple[str, ...] = ("privacy_report.json", "privacy_report.md", "privacy_report.png")

NO_DP_WARNING = (
    "NO DIFFERENTIAL PRIVACY: this run trained without DP-SGD, so no formal privacy guarantee holds "
    "for any site's training data; the model weights that left each site may reveal information "
    "about individual patients."
)

STATUSES: tuple[str, ...] = ("ok", "budget-exhausted", "refused")
SITE_KEYS: tuple[str, ...] = ("accountant", "delta", "budget_epsilon", "epsilon", "status", "rounds")
ROUND_KEYS: tuple[str, ...] = ("round", "sample_rate", "noise_multiplier", "steps", "max_grad_norm", "epsilon")


def write_privacy_report(run_dir: Path, report: dict) -> list[Path]:
    """Write the JSON, Markdown and PNG privacy reports into ``run_dir``; returns their paths.

    ``report`` is ``{"dp": bool, "run_id": str, "sites": {site: {...}}}`` as described in
    ``SITE_KEYS``/``ROUND_KEYS`` plus each site's lifetime ``history`` for the independent
    check. Extra keys are kept in the JSON.
    """
    run_dir = Path(run_dir)
    document = _document(run_dir, report)
    contents = (
        (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"),
        render_markdown(document).encode("utf-8"),
        _plot(document),
    )
    paths = [run_dir / name for name in REPORT_FILES]
    for path, data in zip(paths, contents):
        write_atomic(path, data)
    return paths


def report_from_ledger(ledger_path: Path, budget_epsilon: float | None = None) -> dict:
    """The report data for ONE site built from its verified ledger alone.

    The site is the ledger's folder name. Every entry becomes a round labelled with its run,
    its cumulative epsilon recomputed at the latest entry's delta and accountant so that
    the curve is one consistent figure even if a site changed delta between runs.
    """
    ledger = Ledger(Path(ledger_path))
    if not ledger.path.is_file():
        raise LedgerError(f"{ledger.path}: no ledger here; pass the ledger.jsonl in the site's state folder")
    entries = ledger.entries()
    if not entries:
        raise LedgerError(f"{ledger.path}: the ledger has no entries yet, so there is nothing to report")
    latest = entries[-1]
    budget = latest.budget_epsilon if budget_epsilon is None else float(budget_epsilon)
    private = [entry for entry in entries if entry.private]
    history = private_history(entries)
    rounds = [
        {
            "run_id": entry.run_id,
            "round": entry.round,
            "sample_rate": entry.sample_rate,
            "noise_multiplier": entry.noise_multiplier,
            "steps": entry.steps,
            "max_grad_norm": entry.max_grad_norm,
            "epsilon": accounting.epsilon(history[: index + 1], latest.delta, latest.accountant),
        }
        for index, entry in enumerate(private)
    ]
    if not rounds:
        raise LedgerError(f"{ledger.path}: the ledger records no DP-SGD round, only releases without DP")
    unbounded = [f"{entry.run_id} round {entry.round}" for entry in entries if not entry.private]
    # "Exhausted" means the site would refuse a further round like its last one.
    last = private[-1]
    next_epsilon = accounting.epsilon_after(
        history, last.noise_multiplier, last.sample_rate, last.steps, last.delta, last.accountant
    )
    site = {
        "accountant": latest.accountant,
        "delta": latest.delta,
        "budget_epsilon": budget,
        "epsilon": rounds[-1]["epsilon"],
        "status": "ok" if next_epsilon <= budget else "budget-exhausted",
        "history": [list(event) for event in history],
        "rounds": rounds,
        "refused_rounds": [],
        "unbounded_rounds": unbounded,
    }
    return {
        "dp": True,
        "run_id": ", ".join(dict.fromkeys(entry.run_id for entry in entries)),
        "source": "ledger",
        "ledger": str(ledger.path),
        "ledger_entries": len(entries),
        "ledger_hash": latest.hash,
        "sites": {ledger.path.parent.name: site},
    }


def _invalid(run_dir: Path, problem: str) -> FedcareError:
    return FedcareError(f"cannot write the privacy report in {run_dir}: {problem}; fix what the sites sent")


def _check_site(run_dir: Path, name: str, site: object) -> None:
    if not isinstance(site, dict):
        raise _invalid(run_dir, f"site {name!r} is not a mapping")
    missing = [key for key in SITE_KEYS if key not in site]
    if missing:
        raise _invalid(run_dir, f"site {name!r} lacks {', '.join(missing)}")
    if site["status"] not in STATUSES:
        raise _invalid(run_dir, f"site {name!r} has status {site['status']!r}, not one of {', '.join(STATUSES)}")
    if site["accountant"] not in accounting.ACCOUNTANTS:
        raise _invalid(run_dir, f"site {name!r} has accountant {site['accountant']!r}")
    for key in ("delta", "budget_epsilon", "epsilon"):
        if not (isinstance(site[key], (int, float)) and math.isfinite(site[key])):
            raise _invalid(run_dir, f"site {name!r} has {key} {site[key]!r}, not a finite number")
    for number, entry in enumerate(site["rounds"], start=1):
        absent = [key for key in ROUND_KEYS if key not in entry]
        if absent:
            raise _invalid(run_dir, f"round entry {number} of site {name!r} lacks {', '.join(absent)}")


def _delta_rule(site: dict) -> str:
    """How the site's delta was chosen, in words, when the site did not say so itself."""
    if site.get("delta_rule"):
        return str(site["delta_rule"])
    samples = site.get("num_samples")
    if not samples:
        return ("the site's budget-delta, or when that is 0 the smaller of 1e-5 and 1/(10 N) rounded down at its "
                "first round; fixed for the ledger's lifetime")
    if site["delta"] >= 1 / samples:
        return f"WARNING: delta is not below 1/N = {1 / samples:.3g} for N = {samples}: the guarantee is weak"
    if site["delta"] == accounting.default_delta(samples):
        return f"the smaller of 1e-5 and 1/(10 N) rounded down to one significant figure, N = {samples} training samples"
    return f"set by the site (budget-delta), below 1/N = {1 / samples:.3g} for N = {samples}"


def _independent_check(site: dict) -> tuple[dict | None, str | None]:
    if site.get("history") is None:
        return None, "the site sent no history, so its epsilon could not be checked independently"
    history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in site["history"]]
    figures = accounting.independent_epsilons(history, site["delta"])
    warning = accounting.check_agreement(site["epsilon"], figures, site["accountant"])
    # JSON has no infinity; an unbounded figure is recorded as null and the warning says why.
    return {method: value if math.isfinite(value) else None for method, value in figures.items()}, warning


def _document(run_dir: Path, report: dict) -> dict:
    """The report as written to JSON: the input, checked, plus the independent figures."""
    if not isinstance(report, dict) or not isinstance(report.get("dp"), bool):
        raise _invalid(run_dir, "the report must be a mapping whose 'dp' is true or false")
    if not isinstance(report.get("sites", {}), dict):
        raise _invalid(run_dir, "'sites' must map each site name to its figures")
    document = json.loads(json.dumps(report))  # a deep copy: the caller's dict stays as it was
    document.setdefault("run_id", "")
    document.setdefault("sites", {})
    document.setdefault("generated", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if not document["dp"]:
        document["warning"] = NO_DP_WARNING
        return document
    for name, site in document["sites"].items():
        _check_site(run_dir, name, site)
        site.setdefault("refused_rounds", [])
        site["independent"], site["agreement_warning"] = _independent_check(site)
        site["over_budget"] = site["epsilon"] > site["budget_epsilon"]
        site["delta_rule"] = _delta_rule(site)
    return document


def _positions(document: dict) -> tuple[dict[str, list[int]], str]:
    """x values per site: round numbers, or event order when rounds restart (several runs)."""
    sites = document["sites"]
    by_round = {name: [entry["round"] for entry in site["rounds"]] for name, site in sites.items()}
    if all(all(a < b for a, b in zip(rounds, rounds[1:])) for rounds in by_round.values()):
        return by_round, "round"
    by_order = {name: list(range(1, len(site["rounds"]) + 1)) for name, site in sites.items()}
    return by_order, "training event, oldest first (all runs in the ledger)"


def _plot(document: dict) -> bytes:
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if not document["dp"]:
        title = "NO DIFFERENTIAL PRIVACY: no formal privacy guarantee holds"
        axes.set_title(title, color="red", fontweight="bold")
        axes.text(0.5, 0.5, NO_DP_WARNING, ha="center", va="center", wrap=True, color="red", transform=axes.transAxes)
        axes.set_axis_off()
    else:
        source = "ledger of runs" if document.get("source") == "ledger" else "run"
        title = f"Cumulative lifetime epsilon per site, {source} {document['run_id']}"
        positions, x_label = _positions(document)
        for index, (name, site) in enumerate(sorted(document["sites"].items())):
            colour = f"C{index % 10}"
            epsilons = [entry["epsilon"] for entry in site["rounds"]]
            axes.plot(positions[name], epsilons, marker="o", color=colour, label=f"{name} ({site['status']})")
            axes.axhline(
                site["budget_epsilon"], linestyle="--", color=colour, label=f"{name} budget {site['budget_epsilon']:g}"
            )
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.set_ylabel("cumulative epsilon (each site's delta)")
        highest = [max(site["budget_epsilon"], site["epsilon"]) for site in document["sites"].values()]
        axes.set_ylim(0, 1.1 * max(highest, default=1.0))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if document["sites"]:
            axes.legend(fontsize="small")
    buffer = io.BytesIO()
    # The title also goes into the PNG's text metadata, so tools that index files see it.
    figure.savefig(buffer, format="png", metadata={"Title": title})
    return buffer.getvalue()
