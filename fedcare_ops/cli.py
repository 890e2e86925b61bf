"""The `fedcare` command line: demo data, local federations, config checks and privacy reports.

Every user mistake ends in one line on stderr naming the file or setting, and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from fedcare.errors import FedcareError
from fedcare.figures import METRICS, metric_label

if TYPE_CHECKING:
    from fedcare.egress import Audit, ModelShapes

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(Path("outputs/demo-data"), help="Folder that receives one sub-folder per site."),
    sites: int = typer.Option(3, min=1, help="Number of simulated hospitals."),
    seed: int = typer.Option(0, help="Same seed, same files."),
    cases: Optional[str] = typer.Option(None, help="Cases per site, e.g. '120,300,600'."),
    overwrite: bool = typer.Option(False, help="Replace existing site folders."),
    task: str = typer.Option("classification", help="classification (labels.csv) | segmentation (DICOM SEG; "
                             "--cases counts slices, in series of 10)."),
    allow_without_dp: bool = typer.Option(False, help="Let the sites train without DP when a run asks "
                                          "(dp-required = false in each site.toml); off by default."),
    classes: int = typer.Option(2, help="classification: kinds of case, 2 to 4 (labels 0 to classes - 1): no "
                                "finding, lesion, hypodense lesion, calcification."),
) -> None:
    """Write real DICOM files and a labels.csv (or DICOM SEG masks) for each simulated hospital."""
    from data_adapters.labels import LABELS_FILENAME
    from fedcare.sites import SITE_FILE
    from fedcare_ops.demo_data import write_demo_sites
    from fedcare_ops.demo_segmentation import write_demo_segmentation_sites

    if task not in ("classification", "segmentation"):
        raise FedcareError(f"--task {task!r} must be classification or segmentation")
    counts = _int_list(cases, "--cases") if cases else None
    policy = {"dp-required": False} if allow_without_dp else None
    writer = (write_demo_segmentation_sites if task == "segmentation"
              else functools.partial(write_demo_sites, classes=classes))
    with console.status(f"Writing demo DICOM for {sites} sites..."):
        folders = writer(out, sites=sites, seed=seed, cases=counts, overwrite=overwrite, policy=policy)
    table = Table("site", "folder", "DICOM files")
    for folder in folders:
        images = sum(1 for p in folder.rglob("*") if p.is_file() and p.name not in (LABELS_FILENAME, SITE_FILE))
        table.add_row(folder.name, str(folder), str(images))
    console.print(table)


@app.command("run")
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A run-config preset, e.g. configs/demo.toml."),
    sites: int = typer.Option(3, min=1, help="Simulated sites (site-0 ... site-N-1 under data-root)."),
    site: Optional[list[str]] = typer.Option(None, "--site", metavar="NAME=PATH",
                                             help="A site and its own folder (repeat); replaces --sites and data-root."),
    fresh_sites: bool = typer.Option(False, help="Delete the demo sites' state (privacy ledgers) first; "
                                     "refused for folders `fedcare demo-data` did not write."),
    project: Path = typer.Option(Path("."), help="The Flower app's folder."),
    cpus_per_site: int = typer.Option(2, min=1, help="CPU cores Flower's simulation reserves for each site."),
    gpus_per_site: float = typer.Option(0.0, min=0.0, help="GPUs reserved for each site; 0.5 lets two sites "
                                        "share one GPU (each trains where its own `device` setting says)."),
) -> None:
    """Run the federation as a local simulation with `flwr run . --stream`.

    Exits 1 when the run or a site is not ready (every problem printed first), when the run stops,
    or when a site failed every round; 130 on Ctrl-C or SIGTERM, after stopping every process it started.
    """
    from fedcare_ops.federation import NotReady, SiteResources, clear_demo_state, resolve_config, run_simulation
    from fedcare.outputs import failed_every_round
    from fedcare.sites import simulated_sites

    overrides = {"site-folders": _site_folders(site)} if site else {}
    sites = len(site) if site else sites
    planned, _ = resolve_config(project, config, overrides)
    if fresh_sites:
        removed = clear_demo_state(planned, sites)
        console.print(f"Demo sites start from a clean state: removed {len(removed)} state folder(s) under "
                      f"{planned.sites_dir}/")
    try:
        folder = run_simulation(project, config, sites, overrides=overrides,
                                resources=SiteResources(cpus_per_site, gpus_per_site))
    except NotReady as err:
        for problem in err.problems:
            Console(stderr=True).print(f"[red]not ready:[/red] {problem}", highlight=False, soft_wrap=True)
        raise FedcareError(f"{len(err.problems)} problem(s) above: nothing was started") from None
    show_run(folder)
    table, lines = Table("site", "replies sent", "bytes", "egress audit", title="What left each site"), []
    for name, _ in simulated_sites(planned, sites):
        log = Path(planned.sites_dir) / name / "egress.jsonl"
        result = audit_site_log(log) if log.is_file() else None
        verdict = "no egress log" if result is None else "clean" if result.clean else f"{len(result.violations)} VIOLATIONS"
        table.add_row(name, str(sum(result.replies.values())) if result else "0", str(result.bytes if result else 0),
                      verdict)
        lines.append(f"- {name}: {verdict}" + (f"; {(log.parent / 'egress_audit.txt').resolve()}" if result else ""))
    console.print(table)
    with open(folder / "summary.md", "a") as summary:
        summary.write("\n## Egress audits (run at each site)\n\n" + "\n".join(lines) + "\n")
    failed = failed_every_round(json.loads((folder / "metrics.json").read_text()))
    if failed:
        raise FedcareError(f"{', '.join(failed)} failed every round ({next(iter(failed.values()))}); "
                           f"{folder / 'summary.md'} says which and why")


def _site_folders(entries: list[str]) -> str:
    """--site NAME=PATH values as the run config's site-folders, each PATH made absolute from here."""
    from fedcare.config import parse_site_folders

    named = parse_site_folders("; ".join(entries))
    return "; ".join(f"{name}={Path(folder).resolve()}" for name, folder in named)


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
    """Audit one egress log against the models it names; keep the verdict beside the log."""
    from fedcare.egress import audit

    result = audit(log, _model_shapes())
    if result.violations and not result.replies:
        # Nothing in it reads as a reply: not a site's log, and no verdict file to leave beside it.
        raise FedcareError(f"{log}: not an egress log ({len(result.violations)} line(s), none a reply entry); "
                           "a site's log is <state folder>/egress.jsonl")
    (log.parent / "egress_audit.txt").write_text("\n".join([f"Egress audit of {log.name}"] + audit_lines(result)) + "\n")
    return result


@functools.lru_cache(maxsize=1)
def _model_shapes() -> "ModelShapes":
    # One set for every site audited in this process: each model is built once, not once per log.
    from fedcare.egress import ModelShapes

    return ModelShapes()


def audit_lines(result: "Audit") -> list[str]:
    verdict = ("CLEAN: only model parameters and allowed numbers left the site" if result.clean
               else f"{len(result.violations)} VIOLATION(S)")
    return [f"replies: {sum(result.replies.values())} over {len(result.rounds)} rounds; {result.bytes} bytes",
            f"verdict: {verdict}"] + result.violations


@app.command("check-config")
def check_config(
    path: Path = typer.Argument(..., help="A run-config TOML file."),
    sites: Optional[int] = typer.Option(None, min=1, help="Also check the run-level rules for this many sites."),
) -> None:
    """Check a run-config preset the way a run would (keys, values, sizes the network takes), without running it."""
    from fedcare.config import load_preset
    from fedcare.readiness import run_problems

    problems = run_problems(load_preset(path), sites)
    if problems:
        raise FedcareError(f"{path}: " + "; ".join(problems))
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


@app.command("ledger-init")
def ledger_init(
    state: Path = typer.Argument(..., help="The site's state folder."),
    lost: bool = typer.Option(False, "--lost", help="Confirm that the old ledger is lost and its spending unknown."),
) -> None:
    """Start a site's privacy ledger afresh, on purpose, where the old one is gone."""
    from fedcare.privacy.ledger import Ledger

    ledger = Ledger(state / "ledger.jsonl")
    if ledger.initialised or ledger.path.exists():
        raise FedcareError(f"{ledger.path}: this site already has a ledger; a ledger is never reset")
    traces = [name for name in ("egress.jsonl", "split.json") if (state / name).exists()]
    if traces and not lost:
        raise FedcareError(f"{state}: {' and '.join(traces)} show earlier rounds; restore the ledger from backup, or "
                           "pass --lost to start a new one knowing that what the site spent before is not counted")
    ledger.initialise()
    console.print(f"{ledger.path}: a new, empty ledger" + (" (the earlier spending is NOT counted)" if traces else ""))


# Site-side data commands; their modules import the heavy parts only when a command runs.
from fedcare_ops.check_site import cache_clear_command, check_site_command  # noqa: E402

app.command("check-site")(check_site_command)
cache_app = typer.Typer(no_args_is_help=True, help="The site's decode cache.")
cache_app.command("clear")(cache_clear_command)
app.add_typer(cache_app, name="cache")

# Which app bundles a site runs: their digest, and the site's approvals (fedcare_ops/deploy/site_cli.py).
from fedcare_ops.deploy.site_cli import app_app, site_app  # noqa: E402

app.add_typer(app_app, name="app")
app.add_typer(site_app, name="site")

# Deployment: credentials, key registration and the loopback federation (fedcare_ops/deploy/).
deploy_app = typer.Typer(no_args_is_help=True, help="Deploy across hospitals: credentials, site keys, a loopback run.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("init")
def deploy_init(
    sites: int = typer.Option(2, min=1, help="Number of sites (site-0 ... site-N-1) unless --site names them."),
    out: Path = typer.Option(..., help="Folder for ca/, coordinator/ and sites/<site>/; keep it out of git."),
    host: list[str] = typer.Option(["localhost"], help="Name or address sites use for the coordinator (repeat)."),
    site: Optional[list[str]] = typer.Option(None, help="Site names instead of site-0 ... (repeat)."),
    overwrite: bool = typer.Option(False, help="Replace the credentials already in --out."),
) -> None:
    """Make a CA, the coordinator's TLS certificate and one SECP384R1 key pair per site."""
    from fedcare_ops.deploy.credentials import make_credentials

    names = site or [f"site-{index}" for index in range(sites)]
    make_credentials(out, names, host, overwrite=overwrite)
    console.print(f"wrote {out}/ca (keep ca.key offline), {out}/coordinator and {out}/sites/{{{','.join(names)}}}")


@deploy_app.command("register")
def deploy_register(
    superlink: str = typer.Option(..., help="The coordinator's control HOST:PORT (its FEDCARE_CONTROL_PORT, 9093)."),
    credentials: Path = typer.Option(..., help="The folder `fedcare deploy init` wrote."),
    site: Optional[list[str]] = typer.Option(None, help="Register only these sites (repeat); default all."),
    flwr_home: Optional[Path] = typer.Option(None, help="FLWR_HOME for the connection; default <credentials>/flwr-home."),
) -> None:
    """Register the sites' public keys with the coordinator's SuperLink (its control port), and bind
    each site's name to its key in the coordinator's site registry."""
    from fedcare.identities import REGISTRY_FILE
    from fedcare_ops.deploy.register import register_sites, site_keys

    coordinator = credentials / "coordinator"
    node_ids = register_sites(site_keys(credentials, site), superlink, coordinator / "ca.crt",
                              flwr_home or credentials / "flwr-home", certificate=coordinator / "server.pem",
                              registry=coordinator / REGISTRY_FILE)
    for name, node_id in node_ids.items():
        console.print(f"{name}: registered as node {node_id}")
    console.print(f"site registry: {coordinator / REGISTRY_FILE} (the coordinator reads it from its /tls mount)")


@deploy_app.command("local")
def deploy_local(
    sites: int = typer.Option(2, min=1, help="Sites to start, each with its own demo DICOM and key."),
    rounds: int = typer.Option(2, min=1, help="Federated rounds."),
    out: Path = typer.Option(Path("outputs/deploy-local"), help="Every file of the run: logs, state, credentials."),
    project: Path = typer.Option(Path("."), help="The Flower app's folder."),
) -> None:
    """Run a real TLS, key-authenticated federation on loopback; stop every process it started."""
    from fedcare_ops.deploy.local import run_local

    folder = run_local(out, project, sites=sites, rounds=rounds)
    show_run(folder)
    console.print(f"Logs of every process: {out.resolve() / 'logs'}")


def show_run(folder: Path) -> None:
    """Print the final round per site (the task's headline figures; summary.md has the rest) and where
    the run's files are."""
    document = json.loads((folder / "metrics.json").read_text())
    last = document["rounds"][-1]
    aggregate = last["aggregate"]
    metrics = [name for name in METRICS if name in aggregate and name != "loss"]
    table = Table("site", "training", *(metric_label(name) for name in metrics), "val cases",
                  title=f"Round {last['round']}")
    for site, entry in last["sites"].items():
        table.add_row(site, entry.get("train_status", "-"), *(_fmt(entry.get(name)) for name in metrics),
                      str(entry.get("num_examples", "-")))
    table.add_row("all sites", "", *(_fmt(aggregate.get(name)) for name in metrics),
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
        # Without standalone mode click hands back typer.Exit's code instead of exiting with it.
        status = app(standalone_mode=False)
    except FedcareError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
