"""The site's gate (`fedcare-clientapp`): the only way a ClientApp runs at a fedcare site.

Flower hook (flwr >=1.42,<1.43, pinned in pyproject.toml). A site's SuperNode is started with
`--isolation process`, so it runs no ClientApp itself; the site's own executor
(`fedcare_ops.deploy.site_exec`, installed in the site image) takes each ClientApp task from the
SuperNode's Runtime API and starts this program instead of Flower's `flwr-clientapp`. It does what
`flwr/supernode/runtime/run_clientapp.py` does, with the site's checks in between:

1. `pull_task_input` (Flower's): the message, context, run and the FAB bytes the coordinator sent;
2. the sha256 of those bytes (what Flower calls `fab.hash_str`) must be on the site's approved list
   (`fedcare_ops.deploy.approvals`), and the run request must pass `check_run_request`: BEFORE
   `install_from_fab` or any import from the bundle. A refused bundle gets an Error reply
   ("app not approved by this site: digest ..."), the site logs the digest, and no file of it runs;
3. otherwise `install_from_fab` (all or nothing: `fedcare_ops.deploy.install`; a failed install is
   one line in the site's log and a failed reply naming only its kind), `get_load_client_app_fn`
   and the ClientApp's call, as Flower does;
4. every reply, refusals included, gets its line in `<state>/egress.jsonl` before `push_message`.

What the bundle cannot change: this module, the approvals file's path and the egress log's path
come from the site's own command line, never from the run's config or the bundle. And since this
process has imported the `fedcare` package before the bundle goes on `sys.path`, every `fedcare.*`
module an approved ClientApp imports (ledger, accounting, egress) is the site image's; the bundle
supplies `client_app/` and `data_adapters/`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedcare.config import RunConfig
from fedcare_ops.deploy.approvals import Approvals
from fedcare_ops.deploy.install import AppInstallError, install_app
from fedcare.egress import EGRESS_BY_GATE, append_entry, network_spec, reply_entry
from fedcare.model import network_parameters, sample_voxels
from fedcare.errors import APP_REFUSED_CODE, SITE_ERROR_CODE, FedcareError, site_error_reason
from fedcare.sites import site_from_settings

log = logging.getLogger("fedcare.gate")
NOT_APPROVED = "app not approved by this site: digest {digest}"


def check_run_request(run_config: dict[str, Any], node_config: dict[str, Any]) -> str | None:
    """Why this site refuses the run's settings (the coordinator chooses them all) by its own policy, or None.

    The policy (fedcare.policy) comes from the site's node config and is checked here, in the site's
    image, so an approved bundle's own checks are a second line, not the only one.
    """
    try:
        site = site_from_settings(node_config, "node config")
        config = RunConfig.from_mapping(run_config)
        return site.policy.refusal(config) or site.policy.size_refusal(network_parameters(config), sample_voxels(config))
    except FedcareError as err:
        log.error("%s", err)  # the detail may name the site's folders: it stays here
        return err.kind


def refusal(fab_content: bytes, claimed_hash: str, approvals: Approvals, run_config: dict[str, Any],
            node_config: dict[str, Any]) -> tuple[str, str | None]:
    """The bundle's digest, and why the site refuses to run it (None: it may run)."""
    digest = hashlib.sha256(fab_content).hexdigest()
    try:
        approved = approvals.approved(digest)
    except FedcareError as err:
        log.error("%s", err)
        approved = False  # an unreadable list approves nothing
    if not approved or claimed_hash != digest:
        return digest, NOT_APPROVED.format(digest=digest)
    return digest, check_run_request(dict(run_config), dict(node_config))


def run_task(client: RuntimeHttpClient, state: Path) -> int:
    """Pull one task, gate it, run it if allowed, log and push the reply; returns the exit status."""
    message, context, run, fab = pull_task_input(client)
    site = str(context.node_config.get("site-name", f"node {context.node_id}"))
    digest, reason = refusal(fab.content, fab.hash_str, Approvals(state), context.run_config, context.node_config)
    status, details = SubStatus.FAILED, reason or ""
    if reason is not None:
        log.error("%s: run %s refused: %s", site, context.run_id, reason)
        reply = Message(Error(code=APP_REFUSED_CODE, reason=f"{site}: {reason}"), reply_to=message)
    else:
        log.info("%s: run %s runs approved app %s", site, context.run_id, digest)
        reply, status, details = _run_approved(message, context, site, run.fab_id, run.fab_version, fab.content,
                                               digest)
    append_entry(state / "egress.jsonl", reply_entry(reply, context.run_id, _server_round(message),
                                                     _network(context.run_config)))
    push_message(client, reply, context)
    push_task_output(client=client, context=context, sub_status=status, details=details)
    return 0 if status == SubStatus.COMPLETED else 1


def _run_approved(message: Message, context: Context, site: str, fab_id: str, fab_version: str, content: bytes,
                  digest: str) -> tuple[Message, str, str]:
    # The approved bundle's own egress mod stands down: the gate writes the line (see client_app/egress.py).
    os.environ[EGRESS_BY_GATE] = "1"
    reason = install_problem(site, context.run_id, content, digest)
    if reason is not None:
        return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=message), SubStatus.FAILED, reason
    try:
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        return load(fab_id, fab_version, digest)(message=message, context=context), SubStatus.COMPLETED, ""
    except Exception as err:  # pylint: disable=broad-exception-caught
        # As flwr-clientapp does: the app's exception becomes the reply's error, the site logs the traceback.
        log.exception("the approved ClientApp raised")
        reason = f"{type(err)}:<'{err}'>"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), \
            SubStatus.FAILED, reason


def install_problem(site: str, run_id: int, content: bytes, digest: str) -> str | None:
    """Install the approved bundle under FLWR_HOME; if that fails, log why in one line and return the
    reply's reason, which names only the kind of problem (the line names the site's folders)."""
    try:
        install_app(content, digest, get_flwr_home())
    except AppInstallError as err:
        log.error("%s: run %s: %s", site, run_id, err)  # no app code ran: no traceback to show
        return site_error_reason(site, err)
    return None


def _server_round(message: Message) -> int:
    if message.has_content() and "config" in message.content:
        return int(message.content["config"].get("server-round", 0))
    return 0


def _network(run_config: dict[str, Any]) -> str:
    try:
        return network_spec(RunConfig.from_mapping(run_config))
    except FedcareError:  # a run config the app refuses: its line still says what was asked
        return str(run_config.get("model", "?"))


def connect(runtime_api_address: str, token: str) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API (loopback, inside the site), as flwr-clientapp makes it."""
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


def site_log() -> None:
    """The gate's lines on stderr, INFO and up, as "LEVEL logger: message"."""
    # force: importing the app's library imports Opacus, whose own basicConfig would otherwise win.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)


def main(argv: list[str] | None = None) -> None:
    """`fedcare-clientapp --runtime-api-address HOST:PORT --state DIR` (token on stdin or FEDCARE_TASK_TOKEN)."""
    parser = argparse.ArgumentParser(description="Run one ClientApp task through the site's gate.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    site_log()
    token = os.environ.pop("FEDCARE_TASK_TOKEN", "").strip()
    if not token:
        print("error: FEDCARE_TASK_TOKEN is not set; fedcare-site-exec starts this program", file=sys.stderr)
        sys.exit(2)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    client = connect(args.runtime_api_address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    try:
        code = run_task(client, args.state.resolve())
    finally:
        heartbeat.stop()
        client.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
