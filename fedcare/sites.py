"""Who a site is and what it keeps for itself: name, data folder, state folder and privacy policy.

In deployment each hospital's SuperNode passes these in its node config. In simulation Flower only
gives `partition-id`, so simulated site N is the N-th NAME=PATH of the run's `site-folders`
(`fedcare run --site`), or else the folder `site-<N>` under the run's `data-root`; its settings are
the file `site.toml` in that folder (written by `fedcare demo-data`, or by the site's operator): the
same keys as a node config, read by the same code, so a simulated site refuses what a deployed one
refuses. No setting that protects a site is ever taken from the run config.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from fedcare.config import RunConfig, parse_site_folders
from fedcare.errors import ConfigError
from fedcare.policy import POLICY_KEYS, SitePolicy

# A simulated site's own settings live beside its images; no reader takes them for data.
SITE_FILE = "site.toml"
DEFAULT_CACHE = "decode-cache"
# The decode cache's limit: each window, image size or channel count a run asks for is another copy of
# the site's images, so it is bounded by the site, never by the run.
DEFAULT_CACHE_GB = 20.0
# The most samples the site puts through its network at once. The run's batch-size is a privacy
# setting (the sampling rate), and a larger one is split into physical batches of this size, which
# changes no result, so the run config cannot set how much memory a step takes.
DEFAULT_PHYSICAL_BATCH = 64
NODE_KEYS = ("site-name", "data-path", "state-path", "cache-dir", "cache-max-gb", "max-physical-batch", "device",
             *POLICY_KEYS)


@dataclass(frozen=True)
class Site:
    """One hospital: its name, its DICOM folder, its state folder and its privacy policy."""

    name: str
    data_path: Path
    state_path: Path
    policy: SitePolicy
    cache_dir: str = DEFAULT_CACHE  # under the state folder; "" keeps no decode cache
    cache_max_gb: float = DEFAULT_CACHE_GB  # the most the decode cache holds; 0: no limit
    max_physical_batch: int = DEFAULT_PHYSICAL_BATCH  # samples through the network at once
    device: str = "auto"  # where it trains: auto, cpu, cuda or cuda:N (fedcare.device)

    @property
    def ledger_path(self) -> Path:
        return self.state_path / "ledger.jsonl"

    @property
    def cache_path(self) -> Path | None:
        return self.state_path / self.cache_dir if self.cache_dir else None

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 1e9)

    @property
    def egress_path(self) -> Path:
        return self.state_path / "egress.jsonl"

    @property
    def split_path(self) -> Path:
        return self.state_path / "split.json"


def site_from_node_config(node_config: Mapping[str, Any], run: RunConfig) -> Site:
    """Resolve the site this ClientApp runs for, from its node config (or its site.toml in simulation)."""
    if "partition-id" in node_config and "data-path" not in node_config:
        name, folder = simulated_site(run, int(node_config["partition-id"]))
        return site_in_folder(folder, Path(run.sites_dir), name)
    return site_from_settings(node_config, "node config")


def site_in_folder(folder: Path, sites_dir: Path, name: str | None = None) -> Site:
    """A simulated site from the settings file in its folder; its state defaults to `sites_dir`/<name>."""
    settings = read_site_settings(folder)
    source = str(folder / SITE_FILE)
    name = name or str(settings.get("site-name", folder.name))
    # A state-path in the file is relative to the site's folder; without one, the site's state lies in sites-dir.
    state = folder / str(settings["state-path"]) if "state-path" in settings else sites_dir / name
    values = {**settings, "site-name": name, "data-path": str(folder), "state-path": str(state)}
    return site_from_settings(values, source)


def site_from_settings(settings: Mapping[str, Any], source: str) -> Site:
    """A site from its own settings; unknown keys, missing folders or a missing budget stop here."""
    unknown = sorted(set(settings) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}'; known keys: {', '.join(NODE_KEYS)}")
    for key in ("site-name", "data-path", "state-path"):
        if not str(settings.get(key, "")).strip():
            raise ConfigError(f"{source}: '{key}' is missing; set it in the site's own settings")
    cache_dir = str(settings.get("cache-dir", DEFAULT_CACHE))
    if Path(cache_dir).is_absolute() or ".." in Path(cache_dir).parts:
        raise ConfigError(f"{source}: 'cache-dir' = {cache_dir!r} must be a folder name inside the state folder")
    cache_max_gb = settings.get("cache-max-gb", DEFAULT_CACHE_GB)
    if isinstance(cache_max_gb, bool) or not isinstance(cache_max_gb, (int, float)) or not 0 <= cache_max_gb < math.inf:
        raise ConfigError(f"{source}: 'cache-max-gb' = {cache_max_gb!r} must be a number of gigabytes, 0 or more "
                          "(0: no limit)")
    physical = settings.get("max-physical-batch", DEFAULT_PHYSICAL_BATCH)
    if isinstance(physical, bool) or not isinstance(physical, int) or physical < 1:
        raise ConfigError(f"{source}: 'max-physical-batch' = {physical!r} must be a whole number of samples, 1 or more")
    return Site(
        name=str(settings["site-name"]),
        data_path=Path(str(settings["data-path"])),
        state_path=Path(str(settings["state-path"])),
        policy=SitePolicy.from_settings(settings, source),
        cache_dir=cache_dir,
        cache_max_gb=float(cache_max_gb),
        max_physical_batch=physical,
        device=str(settings.get("device", "auto")),
    )


def site_policy_file(path: Path) -> SitePolicy:
    """The privacy policy in a site's settings file (site.toml, or a node config written as TOML)."""
    try:
        with open(path, "rb") as handle:
            return SitePolicy.from_settings(tomllib.load(handle), str(path))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def read_site_settings(folder: Path) -> dict[str, Any]:
    """The keys of a simulated site's `site.toml`; a missing or broken file stops with one line."""
    path = Path(folder) / SITE_FILE
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: the site's settings file is missing; a site sets its own budget there "
                          "(e.g. budget-epsilon = 8.0); `fedcare demo-data` writes one per demo site") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


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


def write_site_settings(folder: Path, **values: Any) -> Path:
    """Write or update a simulated site's `site.toml` (keys in snake case or kebab case)."""
    path = Path(folder) / SITE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    current = read_site_settings(folder) if path.is_file() else {}
    current.update({key.replace("_", "-"): value for key, value in values.items()})
    site_from_settings({"site-name": "x", "data-path": "x", "state-path": "x", **current}, str(path))
    path.write_text("# This site's own settings: the run config can ask, only this file decides.\n"
                    + tomli_w.dumps(current))
    return path
