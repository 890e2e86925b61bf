"""Which app bundles a site runs: the digest of a bundle, and the site's own list of approved digests.

`app_digest(folder)` is the sha256 of the FAB that `flwr run` builds from a project folder: the
same bytes Flower's `build_fab_from_disk` produces (flwr 1.42, `flwr/cli/build.py`), hashed as
Flower hashes them for `fab.hash_str` and the `<publisher>.<name>.<version>.<hash8>.fab` name.
The coordinator's operator publishes it; the site's IT and data-protection officer approve it.

`Approvals` keeps a site's decisions in `<state>/approved-apps.json`: every digest ever approved,
with who approved it, when and why, and for revoked ones who revoked it and when. Every change is
written to a temporary file, flushed and renamed over the old one, so a crash never leaves half a file.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk

from fedcare.errors import FedcareError
from fedcare.logs import GITWILDMATCH, silence

APPROVALS_FILE = "approved-apps.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Raised by Flower's own bundling on every pattern of every digest; the bytes hashed do not depend on it.
silence(GITWILDMATCH)


def app_digest(folder: Path) -> str:
    """The sha256 (hex) of the bundle `flwr run` would build and submit from `folder`."""
    folder = Path(folder)
    if not (folder / "pyproject.toml").is_file():
        raise FedcareError(f"{folder / 'pyproject.toml'}: not found; give the Flower app's project folder")
    try:
        return hashlib.sha256(build_fab_from_disk(folder)).hexdigest()
    except (ValueError, OSError) as err:
        reason = " ".join(str(err).split())
        raise FedcareError(f"{folder}: Flower cannot bundle this folder ({reason}); fix pyproject.toml") from None


def check_digest(digest: str) -> str:
    """A digest as the site stores it: 64 lowercase hex characters."""
    value = digest.strip().lower()
    if not _DIGEST.match(value):
        raise FedcareError(f"digest {digest!r}: expected the 64 hex characters `fedcare app digest` prints")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Approvals:
    """A site's approved app digests, in `<state>/approved-apps.json`."""

    def __init__(self, state: Path) -> None:
        self.path = Path(state) / APPROVALS_FILE

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every digest the site decided on, approved or revoked, keyed by digest."""
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            apps = document["apps"]
            if not isinstance(apps, dict) or not all(isinstance(v, dict) for v in apps.values()):
                raise TypeError("apps is not a table of digests")
        except (OSError, ValueError, KeyError, TypeError):
            raise FedcareError(f"{self.path}: the site's app approvals cannot be read; restore it from a "
                               "backup or approve the apps again") from None
        return apps

    def approved(self, digest: str) -> bool:
        entry = self.entries().get(digest)
        return entry is not None and entry.get("status") == "approved"

    def approve(self, digest: str, note: str, by: str | None = None) -> dict[str, Any]:
        digest = check_digest(digest)
        if not note.strip():
            raise FedcareError("--note is empty: say what was reviewed, e.g. 'fedcare 0.1.0, diff reviewed by IT'")
        apps = self.entries()
        entry = {"status": "approved", "note": note.strip(), "approved_by": by or _user(), "approved_at": _now()}
        if digest in apps:
            # A digest approved again after a revocation keeps the record of the revocation.
            entry["history"] = apps[digest].get("history", []) + [{k: v for k, v in apps[digest].items()
                                                                    if k != "history"}]
        apps[digest] = entry
        self._write(apps)
        return entry

    def revoke(self, digest: str, by: str | None = None) -> dict[str, Any]:
        digest = check_digest(digest)
        apps = self.entries()
        if apps.get(digest, {}).get("status") != "approved":
            raise FedcareError(f"digest {digest}: not approved at this site ({self.path}); "
                               "`fedcare site list` shows what is")
        apps[digest] |= {"status": "revoked", "revoked_by": by or _user(), "revoked_at": _now()}
        self._write(apps)
        return apps[digest]

    def _write(self, apps: dict[str, dict[str, Any]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"apps": apps}, indent=2, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except OSError as err:
            raise FedcareError(f"{self.path}: cannot write the site's app approvals ({err.strerror}); "
                               "check --state and its owner") from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid {os.getuid()}"
