"""Who a site is and where it keeps its own things: data folder, state folder, privacy budget.

In deployment each hospital's SuperNode passes these in its node config; in simulation Flower
only gives `partition-id`, so simulated site N is the N-th NAME=PATH of the run's `site-folders`
(`fedcare run --site`), or else `site-<N>` under the run's `data-root`; its state is under
`sites-dir`, kept across runs exactly as a real site's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedcare.config import RunConfig, parse_site_folders
from fedcare.errors import ConfigError

NODE_KEYS = ("site-name", "data-path", "state-path", "budget-epsilon", "budget-delta")


@dataclass(frozen=True)
class Site:
    """One hospital: its name, its DICOM folder, its state folder and its lifetime budget."""

    name: str
    data_path: Path
    state_path: Path
    budget_epsilon: float
    budget_delta: float  # 0.0: derived from the site's number of training samples

    @property
    def ledger_path(self) -> Path:
        return self.state_path / "ledger.jsonl"


def site_from_node_config(node_config: Mapping[str, Any], run: RunConfig) -> Site:
    """Resolve the site this ClientApp runs for, from its node config."""
    if "partition-id" in node_config and "data-path" not in node_config:
        name, data_path = simulated_site(run, int(node_config["partition-id"]))
        return Site(
            name=name,
            data_path=data_path,
            state_path=Path(run.sites_dir) / name,
            budget_epsilon=run.site_budget(name),
            budget_delta=run.target_delta,
        )
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"node config: unknown key '{unknown[0]}'; known keys: {', '.join(NODE_KEYS)}")
    for key in ("site-name", "data-path", "state-path"):
        if not str(node_config.get(key, "")).strip():
            raise ConfigError(f"node config: '{key}' is missing; pass it with --node-config")
    return Site(
        name=str(node_config["site-name"]),
        data_path=Path(str(node_config["data-path"])),
        state_path=Path(str(node_config["state-path"])),
        budget_epsilon=_positive(node_config, "budget-epsilon", run.site_budget_epsilon),
        budget_delta=_delta(node_config.get("budget-delta", 0.0)),
    )


def simulated_site(run: RunConfig, partition_id: int) -> tuple[str, Path]:
    """The name and data folder of simulated site `partition_id`."""
    named = parse_site_folders(run.site_folders)
    if not named:
        return f"site-{partition_id}", Path(run.data_root) / f"site-{partition_id}"
    if not 0 <= partition_id < len(named):
        raise ConfigError(f"run config: site-folders names {len(named)} site(s), but the simulation has a site "
                          f"{partition_id + 1}: run as many sites as site-folders names")
    name, folder = named[partition_id]
    return name, Path(folder)


def simulated_sites(run: RunConfig, sites: int) -> list[tuple[str, Path]]:
    """Every simulated site's (name, data folder), in partition order."""
    return [simulated_site(run, index) for index in range(sites)]


def _positive(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"node config: '{key}' = {value!r} must be a number greater than 0")
    return float(value)


def _delta(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"node config: 'budget-delta' = {value!r} must be 0 (automatic) or in (0, 1)")
    return float(value)
