"""The coordinator's memory of each site's lifetime privacy history, across runs.

Every private train reply carries the site's whole ledger history (noise multiplier, sample rate and
steps of every round it ever trained). The coordinator keeps the longest history each registered
site has reported in `<outputs-dir>/site-histories.json`; a site whose report later is shorter, or
no longer starts with what it reported before, had its ledger rolled back or restored from an old
backup, so its epsilon is under-counted: the run report flags it. Deployment only: simulated sites
are reset on purpose (`fedcare run --fresh-sites`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HISTORIES_FILE = "site-histories.json"


def history_of(numbers: dict[str, Any]) -> list[list[float]] | None:
    """The lifetime history in one privacy record, as [sigma, q, steps] rows; None if it has none."""
    if "history-steps" not in numbers:
        return None
    return [[float(s), float(q), float(n)] for s, q, n in zip(numbers["history-noise-multiplier"],
                                                               numbers["history-sample-rate"],
                                                               numbers["history-steps"])]


def check_histories(known: dict[str, list[list[float]]], privacy: dict[int, dict[str, dict[str, Any]]],
                    run_id: str) -> list[str]:
    """Compare each reported history with the longest known one, in round order; update `known`."""
    flags = []
    for server_round in sorted(privacy):
        for site, numbers in sorted(privacy[server_round].items()):
            reported = history_of(numbers)
            if reported is None:
                continue
            before = known.get(site, [])
            if reported[:len(before)] == before:
                known[site] = reported
                continue
            flags.append(f"privacy history: {site} reported {len(reported)} round(s) of lifetime history in run "
                         f"{run_id} round {server_round}, but {len(before)} before: its ledger was rolled back or "
                         "restored from an old backup, so its epsilon is under-counted")
            if len(reported) > len(before):
                known[site] = reported
    return flags


def check_and_remember(outputs_dir: Path, privacy: dict[int, dict[str, dict[str, Any]]], run_id: str) -> list[str]:
    """`check_histories` against the coordinator's file, which is then rewritten atomically."""
    path = Path(outputs_dir) / HISTORIES_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    flags = check_histories(known, privacy, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return flags
