"""The run folder: `outputs/<run-id>/` with the global model, metrics.json and summary.md.

Each run also has its own checkpoint folder, `outputs/checkpoints/<run-id>/`, written after every
round while the run folder is still staged; `resume = "<run-id>"` names the run to continue, so two
runs at once never share, overwrite or continue each other's checkpoint.

Everything is written into a hidden staging folder first and renamed into place at the end, and
`outputs/latest` is swapped atomically, so a reader never sees a half-written run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedcare.errors import ConfigError
from fedcare.figures import METRICS, metric_label

if TYPE_CHECKING:  # the outputs only ask the run's task; loading the registry here would slow the CLI
    from fedcare.tasks import Task

# Under outputs-dir: one folder per run, named by its run id, holding checkpoint.pt and best_model.pt.
CHECKPOINTS = "checkpoints"
AXIS_LABELS = {"auc": "validation ROC AUC of the global model", "dice": "validation mean Dice of the global model"}


class RunFolder:
    """A run's output folder, staged until `publish()`."""

    def __init__(self, outputs_dir: Path, run_id: str) -> None:
        self.outputs_dir = Path(outputs_dir)
        self.final = self.outputs_dir / run_id
        self.staging = self.outputs_dir / f".{run_id}.partial"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path(name)
        path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return path

    def publish(self, latest: bool = True) -> Path:
        """Move the finished run into place and, with `latest`, point `latest` at it."""
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.staging, self.final)
        if not latest:
            return self.final
        link = self.outputs_dir / "latest"
        temporary = self.outputs_dir / ".latest.tmp"
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(self.final.name)
        os.replace(temporary, link)
        return self.final


def checkpoint_folder(outputs_dir: Path, run_id: str) -> Path:
    """Where run `run_id` keeps its checkpoint and best model."""
    return Path(outputs_dir) / CHECKPOINTS / run_id


def resume_folder(outputs_dir: Path, resume: str) -> Path:
    """The checkpoint folder of the run `resume` names: its whole run id or an unambiguous start of it."""
    root = Path(outputs_dir) / CHECKPOINTS
    saved = sorted(p.name for p in root.iterdir() if (p / "checkpoint.pt").is_file()) if root.is_dir() else []
    if resume in saved:
        return root / resume
    matches = [name for name in saved if name.startswith(resume)]
    if len(matches) == 1:
        return root / matches[0]
    if matches:
        raise ConfigError(f"run config: 'resume' = {resume!r} is ambiguous: it starts the run ids "
                          f"{', '.join(matches)}; give the whole run id of the run to continue")
    known = f"runs with a checkpoint: {', '.join(saved)}" if saved else "no run has one yet"
    raise ConfigError(f"run config: 'resume' = {resume!r}: no checkpoint of that run in {root} ({known}); "
                      "name a run listed there, or set resume = \"\" to start afresh")


def weighted_aggregate(sites: dict[str, dict[str, Any]], task: Task) -> dict[str, float]:
    """Every metric of the task all evaluated sites reported: rates weighted by the sites' validation
    samples, counts (a confusion matrix's cells) added up."""
    evaluated = [s for s in sites.values() if s.get("evaluate_status") == "ok"]
    total = sum(s["num_examples"] for s in evaluated)
    if not total:
        return {}
    shared = [m for m in evaluated[0] if task.allows_metric(m) and all(m in s for s in evaluated)]
    return {m: (sum(s[m] for s in evaluated) if task.is_count(m)
                else sum(s[m] * s["num_examples"] for s in evaluated) / total) for m in shared} | {"num_examples": total}


def headline_metric(figures: dict[str, Any], task: Task) -> str | None:
    """The task's headline metric (AUC for classification, Dice for segmentation), if `figures` hold it."""
    return task.headline if task.headline in figures else None


def metrics_document(config: dict[str, Any], rounds: dict[int, dict[str, dict[str, Any]]],
                     seconds: dict[int, float], task: Task) -> dict[str, Any]:
    """metrics.json: the run config and, per round, every site's outcome, the weighted aggregate and
    the round's wall time (training and evaluation, framework included)."""
    return {
        "config": config,
        "rounds": [
            {"round": r, "sites": dict(sorted(rounds[r].items())), "aggregate": weighted_aggregate(rounds[r], task),
             "failures": _failures(r, rounds[r]), "seconds": seconds.get(r)}
            for r in sorted(rounds)
        ],
    }


def metrics_plot(document: dict[str, Any], task: Task) -> bytes:
    """metrics.png: the task's headline metric by round for every site, and the weighted global figure."""
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    metric = task.headline
    sites = sorted({site for item in document["rounds"] for site in item["sites"]})
    for site in sites:
        points = [(item["round"], item["sites"][site][metric]) for item in document["rounds"]
                  if metric in item["sites"].get(site, {})]
        if points:
            axes.plot(*zip(*points), marker="o", alpha=0.7, label=site)
    overall = [(item["round"], item["aggregate"][metric]) for item in document["rounds"] if metric in item["aggregate"]]
    if overall:
        axes.plot(*zip(*overall), marker="s", color="black", linewidth=2.5, label="all sites (weighted)")
    axes.set_xlabel("round")
    axes.set_ylabel(AXIS_LABELS.get(metric, metric_label(metric)))
    if task.higher_is_better:  # a score in [0, 1]; a loss-like headline keeps its own scale
        axes.set_ylim(0, 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # a run that evaluated nothing has no line to name
        axes.legend(fontsize="small", loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def failed_every_round(document: dict[str, Any]) -> dict[str, str]:
    """{site: last reason} for every site whose training failed or was rejected in every round of the run.

    A site that refused a round for its privacy budget made its own choice; it is not listed.
    """
    rounds = document["rounds"]
    failed = {}
    for site in sorted({name for item in rounds for name in item["sites"]}):
        entries = [item["sites"].get(site, {}) for item in rounds]
        if all(entry.get("train_status") in ("failed", "rejected") for entry in entries):
            reason = str(entries[-1].get("train_error", ""))
            failed[site] = reason.split(": ", 1)[1] if reason.startswith(f"{site}: ") else reason
    return failed


def summary_markdown(document: dict[str, Any], run_id: str, notes: list[str], extra: list[str] = ()) -> str:
    """A short table a person reads: each site, each round, and the global model's figures."""
    lines = [f"# Federated run {run_id}", ""] + [f"- {note}" for note in notes] + [""]
    # The columns of the metrics this run's sites reported (classification's three by default).
    shown = [m for m in METRICS if any(m in e for item in document["rounds"] for e in item["sites"].values())]
    shown = shown or list(METRICS[:3])
    lines += ["| round | site | training | " + " | ".join(metric_label(m) for m in shown) + " | val cases |",
              "|---|---|---|" + "---|" * len(shown) + "---|"]
    for item in document["rounds"]:
        for site, entry in item["sites"].items():
            training = entry.get("train_status", "-")
            if training != "ok" and entry.get("train_error"):
                training += f" ({entry['train_error']})"
            lines.append(f"| {item['round']} | {site} | {training} | " + _figures(entry, shown)
                         + f" {entry.get('num_examples', '-')} |")
        lines.append(f"| {item['round']} | **all sites** | | " + _figures(item["aggregate"], shown)
                     + f" {item['aggregate'].get('num_examples', '-')} |")
    if extra:
        lines += [""] + list(extra)
    failures = [f for item in document["rounds"] for f in item["failures"]]
    lines += ["", "## Failures", ""]
    lines += [f"- round {f['round']}, {f['site']}, {f['stage']}: {f['reason']}" for f in failures] or ["- none"]
    return "\n".join(lines) + "\n"


def _figures(entry: dict[str, Any], shown: list[str]) -> str:
    return " ".join(f"{entry[m]:.3f} |" if m in entry else "- |" for m in shown)


def _failures(server_round: int, sites: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"round": server_round, "site": site, "stage": stage, "status": entry[f"{stage}_status"], "reason": entry.get(f"{stage}_error", "")}
        for site, entry in sorted(sites.items())
        for stage in ("train", "evaluate")
        if entry.get(f"{stage}_status") not in (None, "ok")
    ]
