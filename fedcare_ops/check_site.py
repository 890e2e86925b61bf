"""`fedcare check-site` and `fedcare cache clear`: the commands a hospital runs on its own machine.

check-site prints the readiness report as tables, or as one JSON object with --json, and exits
0 when the site is ready, 1 when it is not (usage errors exit 2, through click). Only counts,
paths inside the site folder, reasons and masked values are printed: never pixel data, never an
identifying header value in clear. This module imports nothing heavy at load time, so that
`fedcare --help` stays fast; the work is imported when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from fedcare.sites import SITE_FILE, site_policy_file

__all__ = ["check_site_command", "cache_clear_command", "DEFAULT_CACHE_FOLDER"]

DEFAULT_CACHE_FOLDER = "decode-cache"  # under the site's state path
_SHOWN_UNREADABLE = 40


def check_site_command(
    path: Path = typer.Argument(..., exists=True, file_okay=False,
                                help="The site's image folder: DICOM, or NIfTI when --config says data-format = \"nifti\"."),
    labels: Optional[Path] = typer.Option(None, "--labels", exists=True, dir_okay=False,
                                          help="Label manifest CSV (default: labels.csv in the folder)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                          help="Run-config preset used for the privacy estimate, e.g. configs/demo.toml."),
    label_key: Optional[str] = typer.Option(None, "--label-key", help="Manifest key column (default: detected)."),
    input_mode: Optional[str] = typer.Option(None, "--input-mode", click_type=click.Choice(["2d", "3d"]),
                                             help="2d: each image or frame is a sample; 3d: each series is a volume "
                                             "(default: the run config's)."),
    irregular: Optional[str] = typer.Option(None, "--irregular-series", click_type=click.Choice(["exclude", "resample"]),
                                            help="3d: what to do with series of irregular geometry (default: the run "
                                            "config's)."),
    window: Optional[str] = typer.Option(None, "--window", help="Intensity window: a preset, 'minmax' or 'low,high' "
                                         "(default: the run config's)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Fill this decode cache while checking."),
    site_settings: Optional[Path] = typer.Option(None, "--site-settings", exists=True, dir_okay=False,
                                                 help="The site's own settings (a node config as TOML); default: "
                                                 "site.toml in the folder, if there is one."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Check that a site's folder is ready to join: images, labels, de-identification, privacy cost.

    Ready means the readiness rules of the run (fedcare.readiness) hold: the same rules `fedcare run`
    applies before it starts and the site's ClientApp applies before it trains.
    """
    from fedcare.config import RunConfig, load_preset

    from data_adapters.readiness import DEFAULT_POLICY, check_site

    run_config = load_preset(config) if config else RunConfig()
    settings = site_settings or path / SITE_FILE
    policy = site_policy_file(settings) if settings.is_file() else DEFAULT_POLICY
    result = check_site(path, labels, run_config, label_key=label_key, input_mode=input_mode,
                        irregular=irregular, window=window, cache_dir=cache_dir, policy=policy)
    if as_json:
        typer.echo(json.dumps(result.report, indent=2, sort_keys=True))
    else:
        show_report(result.report, Console())
    if not result.ready:
        raise SystemExit(1)  # not click's Exit: fedcare's main() would turn that into status 0


def cache_clear_command(
    state: Optional[Path] = typer.Option(None, "--state",
                                         help=f"The site's state folder (its {DEFAULT_CACHE_FOLDER}/ is cleared)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="A decode cache folder to clear."),
) -> None:
    """Delete a site's decode cache; the next round decodes its DICOM again."""
    from data_adapters.cache import clear_cache

    if (state is None) == (cache_dir is None):
        raise click.UsageError("give exactly one of --state or --cache-dir")
    folder = cache_dir if cache_dir is not None else state / DEFAULT_CACHE_FOLDER  # type: ignore[operator]
    removed = clear_cache(folder)
    typer.echo(f"{folder}: removed {removed} cached file(s)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def show_report(report: dict[str, Any], console: Console) -> None:
    """The report as tables: overview, series, exclusions, identifying tags, privacy, verdict."""
    overview = Table("site", str(report["folder"]), title="Site readiness", show_lines=False)
    smallest = report.get("smallest_class")
    for name, value in [
        ("files", report["files"]), ("DICOM instances", report["dicom_instances"]), ("series", report["series"]),
        ("decodable images (frames)", f"{report['images_readable']} ({report['frames_readable']})"),
        ("input mode", report["input_mode"]), ("label manifest", report["label_manifest"]),
        ("label key", report["label_key"]), ("labelled samples", report["labelled"]),
        ("per class", ", ".join(f"{k}: {v}" for k, v in report["per_class"].items()) or "-"),
        ("smallest class", f"{smallest['label']} ({smallest['count']})" if smallest else "-"),
        ("unlabelled samples", report["unlabelled"]), ("training samples", report["num_train"]),
        ("validation samples", report.get("num_val")),
    ]:
        overview.add_row(name, _fmt(value))
    console.print(overview)
    if report["series_by_modality"]:  # DICOM only: NIfTI files carry no series
        series = Table("modality", "manufacturer", "series", "instances", title="Series by modality and manufacturer")
        for row in report["series_by_modality"]:
            series.add_row(row["modality"], row["manufacturer"], str(row["series"]), str(row["instances"]))
        console.print(series)
    _show_paths(console, "Files left out", report["unreadable"])
    _show_paths(console, "Series left out (irregular geometry)", report["excluded_series"])
    if report["identifying"]:
        tags = Table("tag", "instances", "example (masked)", title="Identifying tags filled in")
        for row in report["identifying"]:
            tags.add_row(row["tag"], str(row["instances"]), row["example"])
        console.print(tags)
    privacy = report["privacy"]
    if privacy.get("dp") and "epsilon" in privacy:
        console.print(
            f"DP-SGD: {privacy['num_train']} training samples, batch {privacy['batch_size']}, sample rate "
            f"{privacy['sample_rate']:.4g}, {privacy['steps']} steps, noise multiplier {privacy['noise_multiplier']:.3g}: "
            f"epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:.2g} ({privacy['accountant']})"
        )
    elif not privacy.get("dp"):
        console.print("[yellow]DP is off in this run config: no privacy guarantee[/yellow]")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    for problem in report["problems"]:
        console.print(f"[red]not ready:[/red] {problem}", highlight=False)
    console.print("[green]ready[/green]" if report["ready"] else "[red]NOT READY[/red]")


def _show_paths(console: Console, title: str, rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    table = Table("path", "reason", title=f"{title}: {len(rows)}")
    for row in rows[:_SHOWN_UNREADABLE]:
        table.add_row(row["path"], row["reason"])
    if len(rows) > _SHOWN_UNREADABLE:
        table.add_row(f"... and {len(rows) - _SHOWN_UNREADABLE} more", "(--json lists all)")
    console.print(table)
