"""The site's executor (`fedcare-site-exec`): takes ClientApp tasks from the site's own SuperNode and
runs each through the site's gate (`fedcare_ops.deploy.gate`), never through Flower's `flwr-clientapp`.

Flower hook (flwr >=1.42,<1.43). With `flower-supernode --isolation process` the SuperNode starts
no executor of its own; whatever the site runs beside it asks the SuperNode's Runtime API for work
with `AcquireTask` (what `flower-superexec`'s loop does in `flwr/supercore/superexec/run_superexec.py`)
and gets a task and a token. This loop asks only for `flwr-clientapp` tasks and starts
`python -m fedcare_ops.deploy.gate` for each, with the token in its environment (not on its command line).
It runs from the site image and reads nothing from any app bundle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

POLL_SECONDS = 1.0  # Flower's own SuperExec default


def gate_command(runtime_api_address: str, state: Path) -> list[str]:
    """The command that runs one task through the gate: this interpreter, the site image's code."""
    return [sys.executable, "-m", "fedcare_ops.deploy.gate", "--runtime-api-address", runtime_api_address,
            "--state", str(state), "--parent-pid", str(os.getpid())]


def serve(runtime_api_address: str, state: Path) -> None:
    """Forever: acquire a ClientApp task, start the gate for it, reap finished gates."""
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    running: list[subprocess.Popen] = []
    try:
        while True:
            running = [process for process in running if process.poll() is None]
            response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if response.HasField("task") and response.token:
                env = os.environ | {"FEDCARE_TASK_TOKEN": response.token}
                running.append(subprocess.Popen(gate_command(runtime_api_address, state), env=env))
            time.sleep(POLL_SECONDS)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    """`fedcare-site-exec --runtime-api-address 127.0.0.1:PORT --state DIR [--parent-pid PID]`."""
    parser = argparse.ArgumentParser(description="Run the site's ClientApp tasks through its gate.")
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's Runtime API, on loopback.")
    parser.add_argument("--state", type=Path, required=True, help="The site's state folder (approvals, egress log).")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process (the SuperNode) exits.")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    try:
        serve(args.runtime_api_address, args.state.resolve())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
