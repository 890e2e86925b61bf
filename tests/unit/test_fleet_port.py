"""The coordinator's public Fleet port logs every connection it refuses, with the peer's address:
plain HTTP, a client that does not trust its certificate, a request for a non-Fleet path (403).
A real `fedcare_ops.deploy.fleet_port` process on loopback; no SuperLink is needed behind it."""

import socket
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedcare_ops.deploy.credentials import make_credentials
from fedcare_ops.processes import Processes, free_port, wait_for_port


@pytest.fixture(scope="module")
def fleet_port(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-port")
    credentials = make_credentials(root / "credentials", ["site-0"], ["localhost"])
    other = make_credentials(root / "other", ["site-0"], ["localhost"])
    coordinator, port, log = credentials / "coordinator", free_port(), root / "fleet-port.log"
    with Processes() as processes:
        process = processes.start("fleet-port", [
            sys.executable, "-m", "fedcare_ops.deploy.fleet_port", "--listen", "127.0.0.1", "--port", str(port),
            "--upstream", f"127.0.0.1:{free_port()}", "--certfile", str(coordinator / "server.pem"),
            "--keyfile", str(coordinator / "server.key"), "--ca", str(coordinator / "ca.crt")], {}, log)
        wait_for_port(port, process, log)  # connects and closes: a port check, which is not logged
        yield port, log, credentials / "sites" / "site-0" / "ca.crt", other / "ca" / "ca.crt"


def log_line(log: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in log.read_text().splitlines() if text in line]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no line with {text!r} in {log}:\n{log.read_text()}")


def test_plaintext_http_is_refused_and_logged_with_the_peer(fleet_port):
    port, log, _, _ = fleet_port
    with socket.create_connection(("127.0.0.1", port)) as plain:
        peer = f"127.0.0.1:{plain.getsockname()[1]}"
        plain.sendall(b"GET /v1/control/list-runs HTTP/1.1\r\nHost: x\r\n\r\n")
        plain.settimeout(10)
        try:
            assert plain.recv(1024) == b""  # no answer but the closed connection
        except ConnectionResetError:
            pass
    line = log_line(log, f"refused {peer}:")
    assert "TLS handshake failed" in line and "does not speak TLS" in line


def test_a_client_with_another_ca_is_refused_and_logged(fleet_port):
    port, log, _, other_ca = fleet_port
    context = ssl.create_default_context(cafile=str(other_ca))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        peer = f"127.0.0.1:{raw.getsockname()[1]}"
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="localhost")
    line = log_line(log, f"refused {peer}:")
    # The client's alert (unknown CA, or decrypt error where both CAs carry the same name).
    assert "TLS handshake failed (TLSV1_ALERT_" in line and "rejected this coordinator's certificate" in line


def test_a_non_fleet_path_gets_403_and_a_log_line_while_fleet_requests_pass(fleet_port):
    port, log, ca, _ = fleet_port
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
        refused = client.get(f"https://localhost:{port}/v1/control/list-runs")
        # /health passes the front and finds no SuperLink behind it here: 502, and no refusal line.
        passed = client.get(f"https://localhost:{port}/health")
    assert refused.status_code == 403 and passed.status_code == 502
    line = log_line(log, "GET /v1/control/list-runs")
    assert "refused 127.0.0.1:" in line and "is not the Fleet API (403)" in line
    assert "/health" not in log.read_text()
    # Only the three refusals of this module: the port checks and the good handshakes left no line.
    assert len([text for text in log.read_text().splitlines() if "refused" in text]) <= 3
