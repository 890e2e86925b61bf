"""The container's entry point (`deploy/entrypoint.sh` runs it): coordinator, site or healthcheck.

Settings come from environment variables, so one image serves every hospital and the coordinator;
keys and certificates come from mounted files. Every file is checked here first, so a wrong mount
ends in one line naming it rather than in Flower's traceback or an endless reconnect loop; then
the process replaces itself with the real `flower-superlink` or `flower-supernode`.

    FEDCARE_TLS_DIR          folder with ca.crt and server.pem/server.key (coordinator) or site.key (site)
    FEDCARE_STATE            writable folder: ledger, cache, FLWR_HOME, the coordinator's database
    FEDCARE_PORT             the coordinator's one port (default 9092), the only one sites connect to
    FEDCARE_HOST             coordinator: the name sites use for it; must be in its certificate
    FEDCARE_LISTEN           coordinator: the address to listen on (default 0.0.0.0)
    FEDCARE_SUPERLINK        site: HOST:PORT of the coordinator
    FEDCARE_SITE_NAME, FEDCARE_DATA (default /data)
    FEDCARE_BUDGET_EPSILON   site: its lifetime epsilon budget; a site does not start without one
    FEDCARE_<KEY>            site: the rest of its privacy policy (fedcare/policy.py), e.g. FEDCARE_BUDGET_DELTA,
                             FEDCARE_MIN_NOISE_MULTIPLIER, FEDCARE_MAX_RUN_EPSILON, FEDCARE_EVALUATION_QUOTA
    FEDCARE_RUNTIME_PORT     site: loopback port of the SuperNode's own runtime API (default 9094)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from fedcare.deploy.credentials import check_coordinator, check_site
from fedcare.errors import FedcareError
from fedcare.policy import POLICY_DEFAULTS, POLICY_KEYS, SitePolicy

COORDINATOR_PORT = 9092
SITE_RUNTIME_PORT = 9094


def coordinator_command(env: Mapping[str, str]) -> list[str]:
    """The `flower-superlink` command line for these settings, after checking its files."""
    tls = Path(_get(env, "FEDCARE_TLS_DIR", "/tls"))
    host = _get(env, "FEDCARE_HOST", "coordinator")
    check_coordinator(tls / "ca.crt", tls / "server.pem", tls / "server.key", host)
    state = _state(env)
    return [
        _program("flower-superlink"),
        "--ssl-ca-certfile", str(tls / "ca.crt"), "--ssl-certfile", str(tls / "server.pem"),
        "--ssl-keyfile", str(tls / "server.key"),
        "--enable-supernode-auth",
        # The image already holds every dependency; a hospital network allows no `uv sync`.
        "--disable-runtime-dependency-installation",
        "--database", str(state / "superlink.db"),
        "--host", _get(env, "FEDCARE_LISTEN", "0.0.0.0"), "--port", _port(env, "FEDCARE_PORT", COORDINATOR_PORT),
    ]


def site_command(env: Mapping[str, str]) -> list[str]:
    """The `flower-supernode` command line for these settings, after checking its files."""
    tls = Path(_get(env, "FEDCARE_TLS_DIR", "/tls"))
    check_site(tls / "ca.crt", tls / "site.key")
    superlink = _get(env, "FEDCARE_SUPERLINK", "")
    if ":" not in superlink:
        raise FedcareError(f"FEDCARE_SUPERLINK={superlink!r}: set it to the coordinator's HOST:PORT")
    name = _get(env, "FEDCARE_SITE_NAME", "")
    if not name:
        raise FedcareError("FEDCARE_SITE_NAME is not set: name the site as it should appear in reports")
    data = Path(_get(env, "FEDCARE_DATA", "/data"))
    if not data.is_dir():
        raise FedcareError(f"{data}: the site's DICOM folder is missing; mount it (read-only) there")
    node = {"site-name": name, "data-path": str(data), "state-path": str(_state(env)), **site_policy(env)}
    # TOML values, as Flower parses --node-config: quoted strings, bare numbers.
    node_config = " ".join(f"{key}={json.dumps(value)}" for key, value in node.items())
    return [
        _program("flower-supernode"),
        "--superlink", superlink, "--root-certificates", str(tls / "ca.crt"),
        "--auth-supernode-private-key", str(tls / "site.key"),
        "--node-config", node_config,
        "--port", _port(env, "FEDCARE_RUNTIME_PORT", SITE_RUNTIME_PORT),
    ]


def healthy(role: str, env: Mapping[str, str]) -> bool:
    """Whether the role's process answers on its port (the coordinator's, or the site's runtime API)."""
    port = int(_port(env, "FEDCARE_PORT", COORDINATOR_PORT) if role == "coordinator"
               else _port(env, "FEDCARE_RUNTIME_PORT", SITE_RUNTIME_PORT))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment Flower runs with: FLWR_HOME on the state volume, no network installs."""
    home = _state(env) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    # HOME too: Flower and its libraries write caches there, and the image's HOME is not the volume.
    return dict(env) | {"FLWR_HOME": str(home), "HOME": str(home),
                        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def main(argv: list[str] | None = None) -> None:
    """`entrypoint coordinator|site|healthcheck ROLE`: check, then become the Flower process."""
    args = sys.argv[1:] if argv is None else argv
    try:
        role = args[0] if args else os.environ.get("FEDCARE_ROLE", "")
        if role == "healthcheck":
            sys.exit(0 if healthy(args[1] if len(args) > 1 else os.environ.get("FEDCARE_ROLE", ""), os.environ) else 1)
        builders = {"coordinator": coordinator_command, "site": site_command}
        if role not in builders:
            raise FedcareError(f"role {role!r}: expected 'coordinator', 'site' or 'healthcheck ROLE'")
        command = builders[role](os.environ)
        env = process_env(os.environ)
        # Relative paths of the run (the ServerApp's outputs-dir) land on the state volume.
        os.chdir(_state(os.environ))
    except FedcareError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.stdout.flush()
    os.execve(command[0], command, env)


def _state(env: Mapping[str, str]) -> Path:
    state = Path(_get(env, "FEDCARE_STATE", "/state"))
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FedcareError(f"{state}: the state folder is not writable ({err.strerror}); mount a volume "
                           "the container's user owns") from None
    return state.resolve()


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def _port(env: Mapping[str, str], name: str, default: int) -> str:
    value = _get(env, name, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise FedcareError(f"{name}={value!r}: expected a port number")
    return value


def site_policy(env: Mapping[str, str]) -> dict[str, object]:
    """The site's privacy policy from its FEDCARE_<KEY> variables, checked; the budget must be set."""
    if not env.get("FEDCARE_BUDGET_EPSILON", "").strip():
        raise FedcareError("FEDCARE_BUDGET_EPSILON is not set: a site sets its own lifetime epsilon budget "
                           "(e.g. FEDCARE_BUDGET_EPSILON=8.0); it does not start without one")
    policy: dict[str, object] = {}
    for key in (*POLICY_KEYS, "cache-dir", "device"):
        variable = "FEDCARE_" + key.upper().replace("-", "_")
        if env.get(variable, "").strip():
            value = _value(env, variable)
            # "8" means 8.0 where the setting is a float, as TOML users write it.
            floating = isinstance(POLICY_DEFAULTS.get(key, 0.0), float) and type(value) is int
            policy[key] = float(value) if floating else value
    try:
        SitePolicy.from_settings(policy, "site settings")
    except FedcareError as err:
        raise FedcareError(f"{err} (set it with FEDCARE_<KEY>, e.g. FEDCARE_MIN_NOISE_MULTIPLIER=0.8)") from None
    return policy


def _value(env: Mapping[str, str], name: str) -> object:
    # A TOML value, as in a node config: 8.0, true, 100; anything else is taken as text.
    try:
        return tomllib.loads(f"value = {env[name].strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return env[name].strip()


def _program(name: str) -> str:
    # Beside this interpreter first: the virtual environment's Flower, not some other on PATH.
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FedcareError(f"{name} not found; install the project (pip install .) in this environment")
    return found


if __name__ == "__main__":
    main()
