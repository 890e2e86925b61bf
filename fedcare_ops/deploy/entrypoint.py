"""The container's entry point (`deploy/entrypoint.sh` runs it): coordinator, site or healthcheck.

Settings come from environment variables, so one image serves every hospital and the coordinator;
keys and certificates come from mounted files. Every file is checked here first, so a wrong mount
ends in one line naming it rather than in Flower's traceback or an endless reconnect loop (a site
also makes one TLS handshake with FEDCARE_SUPERLINK, if it answers, and stops in one line when its
CA does not verify the coordinator's certificate or the port speaks no TLS); then the role's
processes start together (`fedcare_ops.deploy.supervise`):

- coordinator: `flower-superlink` on the operator's address only (loopback by default), whose one
  HTTP port serves Flower's Control, Runtime and Fleet APIs alike, and `fedcare-fleet-port` on the
  public port, which passes on only the Fleet API the sites need (`fedcare_ops.deploy.fleet_port`);
- site: `flower-supernode --isolation process`, which runs no ClientApp itself, and
  `fedcare-site-exec`, which runs each ClientApp task through the site's gate: only app bundles
  whose digest the site approved run, and the gate writes the egress log (`fedcare_ops.deploy.gate`).

    FEDCARE_TLS_DIR          folder with ca.crt and server.pem/server.key (coordinator) or site.key (site)
    FEDCARE_STATE            writable folder: ledger, approvals, egress log, FLWR_HOME, the coordinator's database
    FEDCARE_PORT             coordinator: the public Fleet port (default 9092), the only one sites connect to
    FEDCARE_HOST             coordinator: the name sites use for it; must be in its certificate
    FEDCARE_LISTEN           coordinator: the address of the public Fleet port (default 0.0.0.0)
    FEDCARE_CONTROL_LISTEN   coordinator: the address of the SuperLink's own port with the control API
                             (default 127.0.0.1; the operator's network only, never the sites')
    FEDCARE_CONTROL_PORT     coordinator: that port (default 9093)
    FEDCARE_SUPERLINK        site: HOST:PORT of the coordinator
    FEDCARE_SITE_NAME, FEDCARE_DATA (default /data)
    FEDCARE_BUDGET_EPSILON   site: its lifetime epsilon budget; a site does not start without one
    FEDCARE_<KEY>            site: the rest of its privacy policy (fedcare/policy.py), e.g. FEDCARE_BUDGET_DELTA,
                             FEDCARE_MIN_NOISE_MULTIPLIER, FEDCARE_MAX_RUN_EPSILON, FEDCARE_EVALUATION_QUOTA
    FEDCARE_RUNTIME_PORT     site: loopback port of the SuperNode's own runtime API (default 9094)
    FEDCARE_MIN_FREE_MB      healthcheck: free space the state folder must have (default 256)

The coordinator's ServerApp files every reply under the site name registered with the replying
node's key: `fedcare deploy register` writes `site-registry.json` beside the coordinator's
certificate (FEDCARE_TLS_DIR), and this entry point hands its path on as FEDCARE_SITE_REGISTRY.
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

from fedcare_ops.deploy.approvals import Approvals
from fedcare_ops.deploy.credentials import check_coordinator, check_host, check_site, coordinator_tls_problem
from fedcare_ops.deploy.install import INSTALLED_MARK
from fedcare.identities import REGISTRY_FILE, REGISTRY_VARIABLE
from fedcare_ops.deploy.supervise import supervise
from fedcare.errors import FedcareError
from fedcare.policy import POLICY_DEFAULTS, POLICY_KEYS, SitePolicy

# Below this much free space in the state folder a round's ledger, egress or checkpoint write may fail.
MIN_FREE_MB = 256

COORDINATOR_PORT = 9092
CONTROL_PORT = 9093
SITE_RUNTIME_PORT = 9094
LOOPBACK = "127.0.0.1"


def coordinator_command(env: Mapping[str, str]) -> list[str]:
    """The `flower-superlink` command line for these settings, after checking its files."""
    tls = _tls_dir(env, "ca.crt, server.pem, server.key")
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
        # Flower serves its control API on this port too: it stays off the sites' network.
        "--host", _get(env, "FEDCARE_CONTROL_LISTEN", LOOPBACK),
        "--port", _port(env, "FEDCARE_CONTROL_PORT", CONTROL_PORT),
    ]


def coordinator_commands(env: Mapping[str, str]) -> dict[str, list[str]]:
    """The coordinator's processes: the SuperLink, and the public port that serves only its Fleet API."""
    superlink = coordinator_command(env)
    tls = Path(_get(env, "FEDCARE_TLS_DIR", "/tls"))
    control, public = _port(env, "FEDCARE_CONTROL_PORT", CONTROL_PORT), _port(env, "FEDCARE_PORT", COORDINATOR_PORT)
    if control == public:
        raise FedcareError(f"FEDCARE_CONTROL_PORT={control} is also FEDCARE_PORT: the control API needs a port "
                           "of its own, off the sites' network")
    control_host = _get(env, "FEDCARE_CONTROL_LISTEN", LOOPBACK)
    upstream = LOOPBACK if control_host in ("0.0.0.0", "::") else control_host
    check_host(tls / "server.pem", upstream)  # the Fleet port verifies the SuperLink's certificate
    fleet = [sys.executable, "-m", "fedcare_ops.deploy.fleet_port", "--listen", _get(env, "FEDCARE_LISTEN", "0.0.0.0"),
             "--port", public, "--upstream", f"{upstream}:{control}", "--certfile", str(tls / "server.pem"),
             "--keyfile", str(tls / "server.key"), "--ca", str(tls / "ca.crt")]
    return {"superlink": superlink, "fleet-port": fleet}


def site_command(env: Mapping[str, str]) -> list[str]:
    """The `flower-supernode` command line for these settings, after checking its files."""
    tls = _tls_dir(env, "ca.crt, site.key")
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
        # No ClientApp runs from the SuperNode: the site's executor runs each through the gate.
        "--isolation", "process",
        "--host", LOOPBACK, "--port", _port(env, "FEDCARE_RUNTIME_PORT", SITE_RUNTIME_PORT),
    ]


def site_commands(env: Mapping[str, str]) -> dict[str, list[str]]:
    """The site's processes: the SuperNode, and the executor that runs each ClientApp through the gate."""
    supernode = site_command(env)
    runtime = f"{LOOPBACK}:{_port(env, 'FEDCARE_RUNTIME_PORT', SITE_RUNTIME_PORT)}"
    executor = [sys.executable, "-m", "fedcare_ops.deploy.site_exec", "--runtime-api-address", runtime,
                "--state", str(_state(env))]
    return {"supernode": supernode, "site-exec": executor}


def check_coordinator_certificate(env: Mapping[str, str]) -> None:
    """The coordinator at FEDCARE_SUPERLINK, if it answers, presents a certificate the site's CA verifies."""
    problem = coordinator_tls_problem(Path(_get(env, "FEDCARE_TLS_DIR", "/tls")) / "ca.crt",
                                      _get(env, "FEDCARE_SUPERLINK", ""))
    if problem:
        raise FedcareError(problem)


def state_problem(env: Mapping[str, str]) -> str | None:
    """Why the state folder cannot take the next round's writes (not writable, too little room), or None."""
    value = _get(env, "FEDCARE_MIN_FREE_MB", str(MIN_FREE_MB))
    if not value.isdigit():
        return f"FEDCARE_MIN_FREE_MB={value!r}: expected a number of megabytes"
    try:
        state = _state(env)
    except FedcareError as err:
        return str(err)
    free = shutil.disk_usage(state).free // 2**20
    if free < int(value):
        return (f"{state}: {free} MB free, below FEDCARE_MIN_FREE_MB={value}: free space on the state volume "
                "before the next round's ledger, egress log or checkpoint write fails")
    return None


def app_problem(env: Mapping[str, str]) -> str | None:
    """Why the site could not load its approved apps: approvals it cannot read, or an installed approved
    app whose ClientApp module is missing; None when it can. Nothing of the app is imported here."""
    try:
        approvals = Approvals(_state(env))
        approvals.entries()
    except FedcareError as err:
        return str(err)
    apps = _state(env) / "flwr-home" / "apps"
    for folder in sorted(apps.iterdir()) if apps.is_dir() else []:
        mark = folder / INSTALLED_MARK
        if folder.name.startswith(".") or not mark.is_file() or not approvals.approved(mark.read_text().strip()):
            continue  # staging, or an app no longer approved: the gate installs or refuses afresh
        module = _clientapp_file(folder)
        if module is None or not module.is_file():
            return (f"{folder}: the installed approved app has no ClientApp module; remove the folder, and the "
                    "next run installs the bundle afresh")
    return None


def _clientapp_file(app: Path) -> Path | None:
    try:
        with open(app / "pyproject.toml", "rb") as handle:
            target = tomllib.load(handle)["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
    return app / (str(target).split(":")[0].replace(".", "/") + ".py")


def healthy(role: str, env: Mapping[str, str]) -> bool:
    """Whether the state folder has room to write, a site's approved apps can load, and the role's
    process answers on its port (the coordinator's, or the site's runtime API); a failing state folder
    or app is named in one line on stderr."""
    problem = state_problem(env) or (app_problem(env) if role == "site" else None)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return False
    port = int(_port(env, "FEDCARE_PORT", COORDINATOR_PORT) if role == "coordinator"
               else _port(env, "FEDCARE_RUNTIME_PORT", SITE_RUNTIME_PORT))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return True
    except OSError:
        return False


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment Flower runs with: FLWR_HOME on the state volume, no network installs, and
    (coordinator) where the ServerApp finds the registered sites."""
    home = _state(env) / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    registry = Path(_get(env, "FEDCARE_TLS_DIR", "/tls")) / REGISTRY_FILE
    # HOME too: Flower and its libraries write caches there, and the image's HOME is not the volume.
    return dict(env) | {"FLWR_HOME": str(home), "HOME": str(home), REGISTRY_VARIABLE: str(registry.resolve()),
                        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def main(argv: list[str] | None = None) -> None:
    """`entrypoint coordinator|site|healthcheck ROLE`: check, then become the Flower process."""
    args = sys.argv[1:] if argv is None else argv
    try:
        role = args[0] if args else os.environ.get("FEDCARE_ROLE", "")
        if role == "healthcheck":
            sys.exit(0 if healthy(args[1] if len(args) > 1 else os.environ.get("FEDCARE_ROLE", ""), os.environ) else 1)
        builders = {"coordinator": coordinator_commands, "site": site_commands}
        if role not in builders:
            raise FedcareError(f"role {role!r}: expected 'coordinator', 'site' or 'healthcheck ROLE'")
        commands = builders[role](os.environ)
        if role == "site":
            check_coordinator_certificate(os.environ)
        env = process_env(os.environ)
        # Relative paths of the run (the ServerApp's outputs-dir) land on the state volume.
        os.chdir(_state(os.environ))
    except FedcareError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.stdout.flush()
    sys.exit(supervise(commands, env))


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


def _tls_dir(env: Mapping[str, str], holds: str) -> Path:
    tls = Path(_get(env, "FEDCARE_TLS_DIR", "/tls"))
    if not tls.is_dir():
        # Without it Flower would only retry its connection, never saying that TLS is what is missing.
        raise FedcareError(f"FEDCARE_TLS_DIR={tls}: folder not found; mount the folder with {holds} there "
                           "(`fedcare deploy init` wrote it)")
    return tls


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
    for key in (*POLICY_KEYS, "cache-dir", "cache-max-gb", "max-physical-batch", "device"):
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
