"""Run the Flower app as a local simulation federation: the real `flwr run . --stream`.

Before anything starts, the run and every simulated site go through the readiness rules
(fedcare.readiness; the same `fedcare check-site` and the sites' ClientApp apply), so a run that
cannot succeed stops in seconds with a line per problem. Flower keeps its connections and the local
SuperLink's state under `FLWR_HOME`; we point it inside the project's outputs, give the SuperLink
ports of its own (a SuperLink already listening on Flower's default ports, say a user's own, would
otherwise be reused) and stop it, with every process it started, when done, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import tomli_w
import torch

from fedcare_ops.demo_data import is_demo_site
from data_adapters.readiness import check_site
from fedcare.config import RunConfig, parse_site_folders, read_preset
from fedcare.errors import FedcareError
from fedcare_ops.flower_output import FlowerOutput, stream
from fedcare_ops.processes import TAG, free_port, stop_tagged
from fedcare.readiness import run_problems
from fedcare.sites import site_from_node_config, simulated_sites

PATH_KEYS = ("data-root", "sites-dir", "outputs-dir")


class NotReady(FedcareError):
    """The run or some of its sites fail the readiness rules; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"not ready: {problems[0]}{more}")
        self.problems = problems


def resolve_config(project: Path, preset: Path | None, overrides: dict[str, Any] | None = None
                   ) -> tuple[RunConfig, dict[str, Any]]:
    """The run's checked config, relative paths made absolute inside `project`; with its raw values."""
    project = project.resolve()
    # Flower silently drops keys it does not know from a --run-config file: check them here first.
    values = app_defaults(project) | (read_preset(preset) if preset else {}) | dict(overrides or {})
    config = RunConfig.from_mapping(values)
    # Relative paths mean "inside the project", wherever the SuperLink's processes happen to run.
    for key in PATH_KEYS:
        path = Path(config.to_dict()[key])
        values[key] = str(path if path.is_absolute() else project / path)
    named = parse_site_folders(config.site_folders)
    if named:
        values["site-folders"] = "; ".join(f"{name}={Path(folder) if Path(folder).is_absolute() else project / folder}"
                                           for name, folder in named)
    return RunConfig.from_mapping(values), values


def app_defaults(project: Path) -> dict[str, Any]:
    """The app's own run-config defaults (`[tool.flwr.app.config]`), which Flower starts from too."""
    try:
        with open(project / "pyproject.toml", "rb") as handle:
            return dict(tomllib.load(handle).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise FedcareError(f"{project / 'pyproject.toml'}: cannot read the app's run config ({err}); "
                           "point --project at the Flower app's folder") from None


def preflight(config: RunConfig, sites: int) -> list[str]:
    """Every problem of the run and of each simulated site, one line each; [] when all are ready.

    Classification sites get the whole site check (and fill their decode cache for round one);
    segmentation sites are checked by their ClientApp when the run reaches them.
    """
    named = parse_site_folders(config.site_folders)
    if named and len(named) != sites:
        return [f"run config: site-folders names {len(named)} site(s) but the run has {sites}: run as many sites "
                "as it names"]
    problems = run_problems(config, sites)
    for partition, (name, folder) in enumerate(simulated_sites(config, sites)):
        if not folder.is_dir():
            hint = ("write demo sites with `fedcare demo-data --out DATA-ROOT --sites N`, set data-root to a folder "
                    "holding site-0 ... site-N-1, or name each site's folder with --site NAME=PATH")
            problems.append(f"{name}: data folder {folder} does not exist: {hint}")
        elif config.task == "classification":
            problems += [f"{name}: {line}" for line in _site_check(config, partition)]
    return problems


def _site_check(config: RunConfig, partition: int) -> list[str]:
    try:
        site = site_from_node_config({"partition-id": partition}, config)
        result = check_site(site.data_path, None, config, cache_dir=site.cache_path, policy=site.policy)
    except FedcareError as err:
        return [str(err)]
    return result.report["problems"]


def clear_demo_state(config: RunConfig, sites: int) -> list[Path]:
    """Delete the state (privacy ledgers) of the simulated sites, only if every one is a demo site.

    A ledger is a site's lifetime record of privacy spent; only data `fedcare demo-data` wrote
    (it lists its sites in a marker beside their folders) is synthetic enough to start it over.
    """
    for name, folder in simulated_sites(config, sites):
        if not is_demo_site(folder):
            raise FedcareError(f"--fresh-sites: {name}'s folder {folder} was not written by `fedcare demo-data`, "
                               f"so its privacy ledger under {Path(config.sites_dir) / name} is kept; it is that "
                               "data's lifetime record: run without --fresh-sites (delete the state by hand only if you are sure; demo data "
                               "written before demo-data marked its sites: write it again with `fedcare demo-data "
                               "--overwrite`)")
    chosen = [site_from_node_config({"partition-id": i}, config) for i in range(sites)]
    removed = []
    for site in chosen:
        if site.state_path.exists():
            shutil.rmtree(site.state_path)
            removed.append(site.state_path)
    return removed


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C, so that the caller's cleanup runs instead of the process dying."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off while the processes a run started are being stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class SiteResources:
    """What Flower's simulation backend reserves for each simulated site; sites that fit run side by side.

    `gpus` below 1 lets several simulated sites share one GPU (0.5: two at a time). Each site still
    decides where it trains with its own `device` setting (fedcare.device), `auto` by default.
    """

    cpus: int = 2
    gpus: float = 0.0

    def federation_config(self, sites: int) -> str:
        """The `flwr run --federation-config` value for `sites` simulated sites with these resources."""
        if self.cpus < 1 or self.gpus < 0:
            raise FedcareError(f"--cpus-per-site {self.cpus} / --gpus-per-site {self.gpus:g}: give at least 1 CPU "
                               "and 0 or more GPUs per site")
        if self.gpus > 0 and not torch.cuda.is_available():
            raise FedcareError(f"--gpus-per-site {self.gpus:g}: torch sees no CUDA device here, so the simulation "
                               "would wait for a GPU forever; run without it (0, the default) on this machine")
        return (f"num-supernodes={sites} client-resources-num-cpus={self.cpus} "
                f"client-resources-num-gpus={self.gpus:g}")


def run_simulation(project: Path, preset: Path | None, sites: int, overrides: dict[str, Any] | None = None,
                   flwr_home: Path | None = None, check: bool = True,
                   resources: SiteResources = SiteResources(), output: TextIO | None = None) -> Path:
    """Run one federation of `sites` simulated sites; returns the published run folder.

    With `check` (the default) the run and its sites go through the readiness rules first and a
    NotReady error lists what to fix; without it the sites' own ClientApps are left to refuse.
    Flower's output (`flwr run --stream`, stdout and stderr) goes to this terminal, or to `output`, with
    its notices that do not apply explained (fedcare_ops.flower_output).
    """
    project = project.resolve()
    federation = resources.federation_config(sites)
    config, values = resolve_config(project, preset, overrides)
    problems = preflight(config, sites) if check else run_problems(config, sites)
    if problems:
        raise NotReady(problems)
    outputs = Path(config.outputs_dir)
    home = (flwr_home or outputs / "flwr-home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    merged = home / "run-config.toml"
    merged.write_text(tomli_w.dumps(values))

    tag = f"simulation/{uuid.uuid4().hex}"
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # `flwr` starts the SuperLink detached and it forks the simulation and its workers; all of
        # them inherit this tag, which is how they are found and stopped afterwards.
        TAG: tag,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The app runs in this environment, already installed; never let the SuperLink `uv sync`
        # a second copy of torch from the network at run time.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # flwr starts `flower-superlink` by name: the one beside this interpreter must be found first.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(project), "local", "--stream", "--run-config", str(merged),
               "--federation-config", federation]
    before, started = _latest(outputs), time.time()
    copying = None
    try:
        with stop_on_signals():
            status, copying = stream(command, cwd=project, env=env, output=FlowerOutput(output or sys.stdout, sites))
    finally:
        with uninterrupted():
            stop_tagged(tag)
            if copying is not None:
                copying.join(timeout=10)  # the last lines, once nothing holds the stream open
    published = _latest(outputs)
    published = published if published != before else None
    # A run that completed no round keeps its folder but is not published as latest: find it anyway.
    folder = published or _written_since(outputs, started)
    if folder is not None:
        document = json.loads((folder / "metrics.json").read_text())
        if document.get("stopped"):
            failures = [f"{f['site']}: {f['reason']}" for f in document["rounds"][-1]["failures"]] if document["rounds"] else []
            cause = f" (first failure: {failures[0]})" if failures else ""
            raise FedcareError(f"the run stopped early: {document['stopped']}{cause}; what it did is in {folder}")
    if status != 0 or published is None:
        raise FedcareError(f"the federated run did not complete (flwr exit status {status}); the server's log is "
                           f"{home / 'local-superlink' / 'superlink.log'}")
    return published


def _latest(outputs: Path) -> Path | None:
    link = outputs / "latest"
    return link.resolve() if link.is_symlink() else None


def _written_since(outputs: Path, started: float) -> Path | None:
    """The newest run folder the server wrote after `started`, published or not."""
    written = [path for path in outputs.iterdir() if not path.name.startswith(".") and not path.is_symlink()
               and (path / "metrics.json").is_file() and (path / "metrics.json").stat().st_mtime >= started]
    return max(written, key=lambda path: (path / "metrics.json").stat().st_mtime, default=None)
