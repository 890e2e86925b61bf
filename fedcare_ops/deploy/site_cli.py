"""`fedcare app digest` and `fedcare site approve|list|revoke`: how a site decides which app bundles run.

The coordinator's operator publishes `fedcare app digest` of the release; the site's IT and
data-protection officer review the release, compute the same digest from the reviewed folder, and
approve it in the site's state folder (`--state`, or FEDCARE_STATE as in the site's container).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fedcare_ops.deploy.approvals import Approvals, app_digest

console = Console()
app_app = typer.Typer(no_args_is_help=True, help="The Flower app bundle a run submits.")
site_app = typer.Typer(no_args_is_help=True, help="The site's own decisions: which app bundles may run here.")

STATE = typer.Option(..., "--state", envvar="FEDCARE_STATE", help="The site's state folder (default: $FEDCARE_STATE).")
BY = typer.Option(None, "--by", help="Who decides (default: the logged-in user).")


@app_app.command("digest")
def digest_command(folder: Path = typer.Argument(Path("."), help="The Flower app's project folder.")) -> None:
    """Print the sha256 of the bundle `flwr run` builds from FOLDER (Flower's fab.hash_str)."""
    print(app_digest(folder))


@site_app.command("approve")
def approve_command(
    digest: str = typer.Argument(..., help="The digest `fedcare app digest` printed for the reviewed release."),
    note: str = typer.Option(..., "--note", help="What was reviewed and by whom, e.g. 'v0.2, diff reviewed by IT'."),
    state: Path = STATE,
    by: Optional[str] = BY,
) -> None:
    """Allow the app bundle with DIGEST to run at this site."""
    entry = Approvals(state).approve(digest, note, by)
    console.print(f"approved {digest.strip().lower()} by {entry['approved_by']} at {entry['approved_at']}",
                  highlight=False)


@site_app.command("revoke")
def revoke_command(digest: str = typer.Argument(...), state: Path = STATE, by: Optional[str] = BY) -> None:
    """Stop the app bundle with DIGEST from running at this site, from its next task on."""
    entry = Approvals(state).revoke(digest, by)
    console.print(f"revoked {digest.strip().lower()} by {entry['revoked_by']} at {entry['revoked_at']}",
                  highlight=False)


@site_app.command("list")
def list_command(state: Path = STATE) -> None:
    """Every app digest this site decided on: approved or revoked, by whom, when and why."""
    approvals = Approvals(state)
    table = Table("digest", "status", "approved", "revoked", "note", title=f"App approvals in {approvals.path}")
    for digest, entry in sorted(approvals.entries().items(), key=lambda item: item[1].get("approved_at", "")):
        table.add_row(digest, entry["status"], f"{entry['approved_at']} {entry['approved_by']}",
                      f"{entry.get('revoked_at', '')} {entry.get('revoked_by', '')}".strip() or "-", entry["note"])
    console.print(table)
