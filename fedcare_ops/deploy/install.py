"""Install an approved app bundle at a site, all or nothing (used by the site's gate).

Flower's `install_from_fab` (flwr 1.42, `flwr/cli/install.py`) copies the bundle's files straight
into `$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash8>` and, with `skip_prompt`, returns any
folder already there as installed. So an installation that failed midway (a full state volume, a
killed process) left a half-copied app that every later task would load and fail on, with an
error that says nothing about the cause. Here the bundle is installed into a staging folder beside
the apps, marked complete, and renamed into place in one step; a failure removes the staging
folder, and a folder at the final place without the mark (left by an older install) is replaced.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from flwr.cli.install import install_from_fab
from flwr.common.constant import APP_DIR

from fedcare.errors import FedcareError

# Written last into a staged app: an app folder holding it has every file of the bundle.
INSTALLED_MARK = ".fedcare-installed"


class AppInstallError(FedcareError):
    """The site could not install an approved app bundle into its state folder."""

    kind = "the site could not install the approved app into its state folder (space or permissions)"


def install_app(content: bytes, digest: str, home: Path) -> Path:
    """Install the bundle `content` (sha256 `digest`) under `home`/apps; returns the app's folder.

    Raises AppInstallError, one line naming the folder, the cause and what to do, after removing
    whatever the failed attempt wrote, so the next task installs afresh.
    """
    apps = Path(home) / APP_DIR
    staging: Path | None = None
    try:
        apps.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=apps))
        staged = install_from_fab(content, install_dir=staging, skip_prompt=True)
        (staged / INSTALLED_MARK).write_text(digest + "\n")
        final = apps / staged.name
        if not (final / INSTALLED_MARK).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a partial copy an older, failed install left
            try:
                staged.rename(final)
            except OSError:
                if not (final / INSTALLED_MARK).is_file():
                    raise
                # else another task of the site installed the same bundle first: use that one
        return final
    except Exception as err:  # pylint: disable=broad-exception-caught
        # Whatever failed (a full disk, a damaged bundle), the site says so in one line.
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise AppInstallError(_problem(apps, digest, err, staging)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _problem(apps: Path, digest: str, err: Exception, staging: Path | None) -> str:
    if isinstance(err, OSError):
        cause = _os_cause(err)
        fix = "free space on the state volume or give it to the site's user"
    else:
        cause = " ".join(f"{type(err).__name__}: {err}".split())
        fix = "the bundle is damaged: ask the coordinator to submit the approved release again"
    left = (f"could not remove the partial copy {staging}: remove it by hand" if staging is not None
            and staging.exists() else "the partial copy is removed and the next run installs it afresh")
    return f"{apps}: installing approved app {digest[:12]} failed ({cause}); {fix}; {left}"


def _os_cause(err: OSError) -> str:
    """The system's words for an OSError, without the paths it quotes: shutil.copytree gathers its
    failures into one shutil.Error whose text is a list of (source, target, "[Errno N] why: path")."""
    if err.strerror:
        return err.strerror
    found = re.search(r"\[Errno \d+\] ([^:'\"]+)", str(err))
    return found.group(1).strip() if found else type(err).__name__
