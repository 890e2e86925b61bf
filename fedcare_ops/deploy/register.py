"""Register sites' public keys with the coordinator's SuperLink (`flwr supernode register`).

The `flwr` CLI reaches a SuperLink through a named connection in `$FLWR_HOME/config.toml`; we
write one (address and the CA that signed the coordinator's certificate) into a FLWR_HOME of our
own, never into the operator's `~/.flwr`. The node id the SuperLink gives each key is recorded
with the site's name in the coordinator's site registry (`fedcare.identities`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fedcare_ops.deploy.credentials import check_host, check_public_key, load_certificate
from fedcare.identities import record_registrations
from fedcare.errors import FedcareError

CONNECTION = "fedcare"


def write_connection(home: Path, address: str, ca: Path) -> Path:
    """Write `$FLWR_HOME/config.toml` with one TLS connection named `fedcare` as the default."""
    load_certificate(ca)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                      f'address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(Path(ca).resolve()))}\n')
    return config


def flwr_env(home: Path) -> dict[str, str]:
    return os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                         "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def register_sites(keys: Mapping[str, Path], address: str, ca: Path, home: Path,
                   certificate: Path | None = None, registry: Path | None = None) -> dict[str, int]:
    """Register each site's public key; returns the node id the SuperLink gave each site, and
    records name, node id and key in `registry` (if given) as each one succeeds."""
    for key in keys.values():
        check_public_key(key)  # every key first: a typo in the last must not leave half the sites registered
    if certificate is not None:
        check_host(certificate, address.rsplit(":", 1)[0].strip("[]"))
    write_connection(home, address, ca)
    flwr = str(Path(sys.executable).with_name("flwr"))
    node_ids = {}
    for site, key in keys.items():
        done = subprocess.run([flwr, "supernode", "register", str(key), CONNECTION, "--name", site, "--format", "json"],
                              env=flwr_env(home), capture_output=True, text=True)
        node_ids[site] = _node_id(done, site, key, address)
        if registry is not None:
            record_registrations(registry, {site: node_ids[site]}, {site: key})
    return node_ids


def site_keys(credentials: Path, sites: list[str] | None = None) -> dict[str, Path]:
    """The public keys under `<credentials>/sites/<site>/site.pub`, all of them or the named ones."""
    folder = Path(credentials) / "sites"
    names = list(sites or [])
    if not names and folder.is_dir():
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise FedcareError(f"{folder}: no site folders; run `fedcare deploy init` first or name --site")
    return {name: folder / name / "site.pub" for name in names}


def _node_id(done: subprocess.CompletedProcess, site: str, key: Path, address: str) -> int:
    try:  # --format json prints one (indented) JSON document, possibly after log lines
        document = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        document = None
    if done.returncode == 0 and isinstance(document, dict) and document.get("success"):
        return int(document["node-id"])
    reason = (document or {}).get("error-message") if isinstance(document, dict) else None
    reason = reason or _last_line(done.stderr) or _last_line(done.stdout) or f"exit status {done.returncode}"
    raise FedcareError(f"{key}: registering {site} with the SuperLink at {address} failed: "
                       f"{' '.join(reason.split())}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
