"""Run the Flower app as a local simulation federation: the real `flwr run . --stream`.

Flower keeps its connections and the local SuperLink's state under `FLWR_HOME`; we point it inside
the project's outputs, give the SuperLink ports of its own (a SuperLink already listening on
Flower's default ports, say a user's own, would otherwise be reused) and stop it, with every
process it started, when done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import tomli_w

from fedcare.config import RunConfig, read_preset
from fedcare.errors import FedcareError
from fedcare.processes import TAG, free_port, stop_tagged

PATH_KEYS = ("data-root", "sites-dir", "outputs-dir")


def run_simulation(project: Path, preset: Path | None, sites: int, overrides: dict[str, Any] | None = None,
                   flwr_home: Path | None = None) -> Path:
    """Run one federation of `sites` simulated sites; returns the published run folder."""
    project = project.resolve()
    # Flower silently drops keys it does not know from a --run-config file: check them here first.
    values = (read_preset(preset) if preset else {}) | dict(overrides or {})
    config = RunConfig.from_mapping(values)
    # Relative paths mean "inside the project", wherever the SuperLink's processes happen to run.
    for key in PATH_KEYS:
        path = Path(config.to_dict()[key])
        values[key] = str(path if path.is_absolute() else project / path)
    config = RunConfig.from_mapping(values)
    missing = [f"site-{index}" for index in range(sites) if not (Path(config.data_root) / f"site-{index}").is_dir()]
    if missing:
        raise FedcareError(f"{config.data_root}: no folder {missing[0]} for simulated site {missing[0]}; write demo "
                           f"sites with `fedcare demo-data --out {config.data_root} --sites {sites}` or set data-root "
                           "to a folder holding site-0 ... site-N-1")
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
               "--federation-config", f"num-supernodes={sites}"]
    before = _latest(outputs)
    try:
        status = subprocess.run(command, cwd=project, env=env).returncode
    finally:
        stop_tagged(tag)
    after = _latest(outputs)
    if status != 0 or after is None or after == before:
        raise FedcareError(f"the federated run did not complete (flwr exit status {status}); "
                           f"see {home / 'local-superlink' / 'superlink.log'}")
    document = json.loads((after / "metrics.json").read_text())
    if document.get("stopped"):
        failures = [f"{f['site']}: {f['reason']}" for f in document["rounds"][-1]["failures"]] if document["rounds"] else []
        cause = f" (first failure: {failures[0]})" if failures else ""
        raise FedcareError(f"the run stopped early: {document['stopped']}{cause}; what it did is in {after}")
    return after


def _latest(outputs: Path) -> Path | None:
    link = outputs / "latest"
    return link.resolve() if link.is_symlink() else None
