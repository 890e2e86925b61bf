"""Who each node of the federation is: the site name bound to its key when it was registered.

A reply's `site.name` is only what the node claims. The coordinator's SuperLink authenticates every
SuperNode by its key, and `flwr supernode register KEY.pub` (Flower 1.42, Control API) answers with
the node id it gave that key: a key has one node id, and the Grid tells the ServerApp each reply's
source node id. `fedcare deploy register` keeps those answers in `site-registry.json` beside the
coordinator's certificate:

    {"sites": {"st-olav": {"node_id": 123, "public_key_sha256": "...", "registered_at": "..."}}}

and the ServerApp reads it (path in FEDCARE_SITE_REGISTRY, set by the entry point) to file every
reply under the name registered for its node, whatever name the node claims.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedcare.errors import FedcareError

REGISTRY_FILE = "site-registry.json"
REGISTRY_VARIABLE = "FEDCARE_SITE_REGISTRY"


def key_fingerprint(public_key: Path) -> str:
    """sha256 of the key's OpenSSH line (type and base64 body, without the comment)."""
    parts = Path(public_key).read_bytes().split()
    return hashlib.sha256(b" ".join(parts[:2])).hexdigest()


def record_registrations(path: Path, node_ids: dict[str, int], keys: dict[str, Path]) -> Path:
    """Add or replace the named sites in the registry at `path` (atomically); keep the others."""
    path = Path(path)
    sites = read_registry(path) if path.exists() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, node_id in node_ids.items():
        sites[name] = {"node_id": int(node_id), "public_key_sha256": key_fingerprint(keys[name]), "registered_at": now}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"sites": sites}, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read_registry(path: Path) -> dict[str, dict[str, Any]]:
    """The registry's sites, by name."""
    try:
        sites = json.loads(Path(path).read_text(encoding="utf-8"))["sites"]
        if not all(isinstance(entry.get("node_id"), int) for entry in sites.values()):
            raise TypeError("a node id is not a number")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise FedcareError(f"{path}: not a site registry; write it again with `fedcare deploy register`") from None
    return sites


def names_by_node(env: dict[str, str] | None = None) -> dict[int, str] | None:
    """node id -> registered site name, from FEDCARE_SITE_REGISTRY; None where no registry is set
    (simulation, where sites are partitions). A set path without a file registers nobody."""
    value = (os.environ if env is None else env).get(REGISTRY_VARIABLE, "").strip()
    if not value:
        return None
    if not Path(value).exists():
        return {}
    return {entry["node_id"]: name for name, entry in read_registry(Path(value)).items()}
