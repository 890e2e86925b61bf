"""The `fedcare` command line: demo data, local federations, config checks and privacy reports.

Every user mistake ends in one line on stderr naming the file or setting, and a non-zero exit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from fedcare.errors import FedcareError

if TYPE_CHECKING:
    from fedcare.egress import Audit

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(Path("outputs/demo-data"), help="Folder that receives one sub-folder per site."),
    sites: int = typer.Option(3, min=1, help="Number of simulated hospitals."),
    seed: int = typer.Option(0, help="Same seed, same files."),
    cases: Optional[str] = typer.Option(None, help="Cases per site, e.g. '120,300,600'."),
    overwrite: bool = typer.Option(False, help="Replace existing site folders."),
) -> None:
    """Write real DICOM files and a labels.csv for each simulated hospital."""
    from data_adapters import write_demo_sites

    counts = _int_list(cases, "--cases") if cases else None
    with console.status(f"Writing demo DICOM for {sites} sites..."):
        folders = write_demo_sites(out, sites=sites, seed=seed, cases=counts, overwrite=overwrite)
    table = Table("site", "folder", "DICOM files")
    for folder in folders:
        table.add_row(folder.name, str(folder), str(sum(1 for p in folder.rglob("*") if p.is_file()) - 1))
    console.print(table)


@app.command("run")
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A run-config preset, e.g. configs/demo.toml."),
    sites: int = typer.Option(3, min=1, help="Simulated sites (site-0 ... site-N-1 under data-root)."),
    fresh_sites: bool = typer.Option(False, help="Delete the simulated sites' state (privacy ledgers) first."),
    project: Path = typer.Option(Path("."), help="The Flower app's folder."),
) -> None:
    """Run the federation as a local simulation with `flwr run . --stream`."""
    from fedcare.config import RunConfig, load_preset
    from fedcare.federation import run_simulation

    planned = load_preset(config) if config else RunConfig()
    if fresh_sites:
        for index in range(sites):
            shutil.rmtree(Path(planned.sites_dir) / f"site-{index}", ignore_errors=True)
        console.print(f"Simulated sites start from a clean state: removed their ledgers under {planned.sites_dir}/")
    folder = run_simulation(project, config, sites)
    show_run(folder)
    table, lines = Table("site", "replies sent", "bytes", "egress audit", title="What left each site"), []
    for index in range(sites):
        log = Path(planned.sites_dir) / f"site-{index}" / "egress.jsonl"
        result = audit_site_log(log)
        verdict = "clean" if result.clean else f"{len(result.violations)} VIOLATIONS"
        table.add_row(f"site-{index}", str(sum(result.replies.values())), str(result.bytes), verdict)
        lines.append(f"- site-{index}: {verdict}; {(log.parent / 'egress_audit.txt').resolve()}")
    console.print(table)
    with open(folder / "summary.md", "a") as summary:
        summary.write("\n## Egress audits (run at each site)\n\n" + "\n".join(lines) + "\n")


@app.command("audit")
def audit_command(
    log: Path = typer.Argument(..., help="A site's egress.jsonl."),
) -> None:
    """Check a site's egress log: only model parameters and allowed numbers may have left the site."""
    result = audit_site_log(log)
    table = Table("reply type", "count", title=f"Egress audit of {log}")
    for kind, count in sorted(result.replies.items()):
        table.add_row(kind, str(count))
    console.print(table)
    for line in audit_lines(result):
        console.print(line, highlight=False)
    if not result.clean:
        raise typer.Exit(1)


def audit_site_log(log: Path) -> "Audit":
    """Audit one egress log against every model the project can build; keep the verdict beside the log."""
    from fedcare.config import MODELS, RunConfig
    from fedcare.egress import audit
    from fedcare.model import build_model

    shapes = {name: {k: list(v.shape) for k, v in build_model(RunConfig(model=name)).state_dict().items()}
              for name in MODELS}
    result = audit(log, shapes)
    (log.parent / "egress_audit.txt").write_text("\n".join([f"Egress audit of {log.name}"] + audit_lines(result)) + "\n")
    return result


def audit_lines(result: "Audit") -> list[str]:
    verdict = ("CLEAN: only model parameters and allowed numbers left the site" if result.clean
               else f"{len(result.violations)} VIOLATION(S)")
    return [f"replies: {sum(result.replies.values())} over {len(result.rounds)} rounds; {result.bytes} bytes",
            f"verdict: {verdict}"] + result.violations


@app.command("check-config")
def check_config(path: Path = typer.Argument(..., help="A run-config TOML file.")) -> None:
    """Check a run-config preset the way a run would, without running it."""
    from fedcare.config import load_preset

    load_preset(path)
    console.print(f"{path}: ok")


@app.command("privacy-report")
def privacy_report(
    ledger: Path = typer.Argument(..., help="A site's ledger.jsonl."),
    out: Path = typer.Option(Path("privacy-report"), help="Folder for privacy_report.{json,md,png}."),
    budget: Optional[float] = typer.Option(None, help="The site's lifetime epsilon budget, if not the ledger's."),
) -> None:
    """Render a site's privacy report from its own ledger, without the server."""
    from fedcare.privacy.report import report_from_ledger, write_privacy_report

    if not ledger.is_file():
        raise FedcareError(f"{ledger}: ledger not found; a site's ledger is <state folder>/ledger.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    for path in write_privacy_report(out, report_from_ledger(ledger, budget)):
        console.print(f"wrote {path}")


# Site-side data commands; their modules import the heavy parts only when a command runs.



def show_run(folder: Path) -> None:
    """Print the final round per site and where the run's files are."""
    document = json.loads((folder / "metrics.json").read_text())
    last = document["rounds"][-1]
    table = Table("site", "training", "val AUC", "val accuracy", "val cases", title=f"Round {last['round']}")
    for site, entry in last["sites"].items():
        table.add_row(site, entry.get("train_status", "-"), _fmt(entry.get("auc")),
                      _fmt(entry.get("accuracy")), str(entry.get("num_examples", "-")))
    aggregate = last["aggregate"]
    table.add_row("all sites", "", _fmt(aggregate.get("auc")), _fmt(aggregate.get("accuracy")),
                  str(aggregate.get("num_examples", "-")))
    console.print(table)
    console.print(f"Run folder: {folder}")
    for name in ("global_model.pt", "metrics.json", "summary.md", "privacy_report.md"):
        console.print(f"  {folder / name}")


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise FedcareError(f"{option} {text!r}: expected whole numbers separated by commas, e.g. 120,300,600") from None


def main() -> None:
    """Entry point: one-line errors for user mistakes, exit 1 (2 for usage errors)."""
    try:
        app(standalone_mode=False)
    except FedcareError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
