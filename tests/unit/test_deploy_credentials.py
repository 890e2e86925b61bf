"""Credentials and the entry point's checks: what `fedcare deploy init` writes, and a wrong file
ending in one line that names it (exit 1, no traceback), before any Flower process starts."""

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcare_ops.deploy.credentials import (certificate_hosts, check_coordinator, coordinator_tls_problem,
                                            make_credentials)
from fedcare_ops.deploy.entrypoint import coordinator_command, coordinator_commands, site_command, site_commands
from fedcare.errors import FedcareError
from fedcare_ops.processes import free_port
from tests.cli_checks import one_line_error

ROOT = Path(__file__).resolve().parents[2]
FEDCARE = str(Path(sys.executable).with_name("fedcare"))


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    out = tmp_path_factory.mktemp("credentials")
    done = subprocess.run([FEDCARE, "deploy", "init", "--sites", "2", "--out", str(out), "--host", "coordinator.example",
                           "--host", "10.0.0.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_init_writes_ca_coordinator_certificate_and_one_p384_key_pair_per_site(credentials):
    cert = x509.load_pem_x509_certificate((credentials / "coordinator" / "server.pem").read_bytes())
    # 127.0.0.1 too: the coordinator's Fleet port reaches its SuperLink on loopback and verifies it there.
    assert certificate_hosts(cert) == {"coordinator.example", "10.0.0.5", "127.0.0.1"}
    check_coordinator(credentials / "ca" / "ca.crt", credentials / "coordinator" / "server.pem",
                      credentials / "coordinator" / "server.key", "coordinator.example")
    for site in ("site-0", "site-1"):
        folder = credentials / "sites" / site
        private = serialization.load_ssh_private_key((folder / "site.key").read_bytes(), password=None)
        public = serialization.load_ssh_public_key((folder / "site.pub").read_bytes())
        assert isinstance(private.curve, ec.SECP384R1) and isinstance(public.curve, ec.SECP384R1)
        assert stat.S_IMODE((folder / "site.key").stat().st_mode) == 0o600
        assert (folder / "ca.crt").read_bytes() == (credentials / "ca" / "ca.crt").read_bytes()
    assert not (credentials / "coordinator" / "ca.key").exists()  # the CA's key is never deployed


def test_init_refuses_to_overwrite_an_existing_ca(credentials):
    with pytest.raises(FedcareError, match="already exists"):
        make_credentials(credentials, ["site-0"], ["localhost"])


def run_entrypoint(role: str, env: dict) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    return subprocess.run([str(ROOT / "deploy" / "entrypoint.sh"), role], env=os.environ | {"PATH": path} | env,
                          capture_output=True, text=True, timeout=60)


def test_certificate_for_another_host_fails_loudly(credentials, tmp_path):
    done = run_entrypoint("coordinator", {"FEDCARE_TLS_DIR": str(credentials / "coordinator"),
                                          "FEDCARE_HOST": "wrong-host.example", "FEDCARE_STATE": str(tmp_path)})
    one_line_error(done, str(credentials / "coordinator" / "server.pem"), "not for 'wrong-host.example'",
                   "fedcare deploy init --host wrong-host.example")


def test_missing_certificate_names_the_file(credentials, tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "site.key").write_bytes((credentials / "sites" / "site-0" / "site.key").read_bytes())
    done = run_entrypoint("site", {"FEDCARE_TLS_DIR": str(tls), "FEDCARE_STATE": str(tmp_path / "state")})
    one_line_error(done, str(tls / "ca.crt"), "certificate file not found")


def test_malformed_site_key_names_the_file(credentials, tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes((credentials / "ca" / "ca.crt").read_bytes())
    (tls / "site.key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n")
    done = run_entrypoint("site", {"FEDCARE_TLS_DIR": str(tls), "FEDCARE_STATE": str(tmp_path / "state")})
    one_line_error(done, str(tls / "site.key"), "not an unencrypted OpenSSH private key")


def test_key_of_another_certificate_is_refused(credentials, tmp_path):
    other = make_credentials(tmp_path / "other", ["site-0"], ["coordinator.example"])
    with pytest.raises(FedcareError, match="does not belong to the certificate"):
        check_coordinator(credentials / "ca" / "ca.crt", credentials / "coordinator" / "server.pem",
                          other / "coordinator" / "server.key", "coordinator.example")
    with pytest.raises(FedcareError, match="not signed by the CA"):
        check_coordinator(credentials / "ca" / "ca.crt", other / "coordinator" / "server.pem",
                          other / "coordinator" / "server.key", "coordinator.example")


def test_register_with_a_malformed_public_key_is_one_line(credentials, tmp_path):
    copy = tmp_path / "creds"
    (copy / "sites" / "site-0").mkdir(parents=True)
    (copy / "coordinator").mkdir()
    for name in ("ca.crt", "server.pem"):
        (copy / "coordinator" / name).write_bytes((credentials / "coordinator" / name).read_bytes())
    (copy / "sites" / "site-0" / "site.pub").write_text("ecdsa-sha2-nistp384 garbage\n")
    done = subprocess.run([FEDCARE, "deploy", "register", "--credentials", str(copy), "--superlink",
                           "coordinator.example:9092"], capture_output=True, text=True, timeout=60)
    one_line_error(done, str(copy / "sites" / "site-0" / "site.pub"), "not an OpenSSH public key")


def test_entrypoint_builds_the_flower_commands_with_tls_auth_and_node_config(credentials, tmp_path):
    coordinator = coordinator_command({"FEDCARE_TLS_DIR": str(credentials / "coordinator"),
                                       "FEDCARE_HOST": "10.0.0.5", "FEDCARE_STATE": str(tmp_path / "c")})
    assert Path(coordinator[0]).name == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile"):
        assert flag in coordinator
    assert "--insecure" not in coordinator and coordinator[coordinator.index("--port") + 1] == "9093"
    # Flower's one HTTP port carries the control API: the SuperLink listens on loopback only, and the
    # public port 9092 is the Fleet-only front.
    assert coordinator[coordinator.index("--host") + 1] == "127.0.0.1"
    both = coordinator_commands({"FEDCARE_TLS_DIR": str(credentials / "coordinator"), "FEDCARE_HOST": "10.0.0.5",
                                 "FEDCARE_STATE": str(tmp_path / "c")})
    fleet = both["fleet-port"]
    assert "fedcare_ops.deploy.fleet_port" in fleet and fleet[fleet.index("--port") + 1] == "9092"
    assert fleet[fleet.index("--upstream") + 1] == "127.0.0.1:9093"
    site = site_command({"FEDCARE_TLS_DIR": str(credentials / "sites" / "site-1"), "FEDCARE_STATE": str(tmp_path / "s"),
                         "FEDCARE_SUPERLINK": "coordinator.example:9092", "FEDCARE_SITE_NAME": "st-olav",
                         "FEDCARE_DATA": str(tmp_path), "FEDCARE_BUDGET_EPSILON": "8"})
    assert Path(site[0]).name == "flower-supernode" and "--insecure" not in site
    assert site[site.index("--isolation") + 1] == "process"  # no ClientApp runs but through the gate
    assert site[site.index("--node-config") + 1] == (f'site-name="st-olav" data-path="{tmp_path}" '
                                                     f'state-path="{(tmp_path / "s").resolve()}" budget-epsilon=8.0')
    executor = site_commands({"FEDCARE_TLS_DIR": str(credentials / "sites" / "site-1"),
                              "FEDCARE_STATE": str(tmp_path / "s"), "FEDCARE_SUPERLINK": "coordinator.example:9092",
                              "FEDCARE_SITE_NAME": "st-olav", "FEDCARE_DATA": str(tmp_path),
                              "FEDCARE_BUDGET_EPSILON": "8"})["site-exec"]
    assert "fedcare_ops.deploy.site_exec" in executor
    assert executor[executor.index("--runtime-api-address") + 1] == "127.0.0.1:9094"


def test_a_site_without_a_budget_does_not_start_and_says_so_in_one_line(credentials, tmp_path):
    env = {"FEDCARE_TLS_DIR": str(credentials / "sites" / "site-1"), "FEDCARE_STATE": str(tmp_path / "s"),
           "FEDCARE_SUPERLINK": "coordinator.example:9092", "FEDCARE_SITE_NAME": "st-olav", "FEDCARE_DATA": str(tmp_path)}
    with pytest.raises(FedcareError) as caught:
        site_command(env)
    assert "FEDCARE_BUDGET_EPSILON is not set" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(FedcareError, match="min-noise-multiplier"):
        site_command({**env, "FEDCARE_BUDGET_EPSILON": "8", "FEDCARE_MIN_NOISE_MULTIPLIER": "-1"})
    policy = site_command({**env, "FEDCARE_BUDGET_EPSILON": "8", "FEDCARE_DP_REQUIRED": "true",
                           "FEDCARE_EVALUATION_QUOTA": "20"})
    assert "dp-required=true evaluation-quota=20" in policy[policy.index("--node-config") + 1]


def test_control_port_must_differ_from_the_fleet_port(credentials, tmp_path):
    with pytest.raises(FedcareError, match="FEDCARE_CONTROL_PORT=9092"):
        coordinator_commands({"FEDCARE_TLS_DIR": str(credentials / "coordinator"), "FEDCARE_HOST": "10.0.0.5",
                              "FEDCARE_STATE": str(tmp_path), "FEDCARE_CONTROL_PORT": "9092"})


def test_a_roles_processes_end_together_with_the_first_ones_status(tmp_path):
    # What the entry point does with a role's two processes: one exits, the other is stopped.
    done = subprocess.run([sys.executable, "-c", "import os, sys; from fedcare_ops.deploy.supervise import supervise; "
                           "sys.exit(supervise({'long': ['sleep', '60'], 'short': ['sh', '-c', 'exit 3']}, "
                           "os.environ))"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and "short exited with status 3" in done.stderr


class TlsServer:
    """A real TLS listener on loopback presenting `cert`/`key` (or plain TCP without them): what a
    site's entry point meets at FEDCARE_SUPERLINK. It completes handshakes and says nothing."""

    def __init__(self, cert: Path | None = None, key: Path | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.context = None
        if cert is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(cert), str(key))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    if self.context is None:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # a plaintext port's answer
                    else:
                        with self.context.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def site_env(tls: Path, state: Path, data: Path, port: int) -> dict:
    return {"FEDCARE_TLS_DIR": str(tls), "FEDCARE_STATE": str(state), "FEDCARE_SUPERLINK": f"localhost:{port}",
            "FEDCARE_SITE_NAME": "site-0", "FEDCARE_DATA": str(data), "FEDCARE_BUDGET_EPSILON": "8"}


def test_a_site_whose_ca_did_not_sign_the_coordinators_certificate_stops_in_one_line(credentials, tmp_path):
    other = make_credentials(tmp_path / "other", ["site-0"], ["localhost"])
    server = TlsServer(other / "coordinator" / "server.pem", other / "coordinator" / "server.key")
    try:
        done = run_entrypoint("site", site_env(credentials / "sites" / "site-0", tmp_path / "s", tmp_path, server.port))
    finally:
        server.close()
    one_line_error(done, str(credentials / "sites" / "site-0" / "ca.crt"), "certificate this CA did not sign",
                   "copy the ca.crt")


def test_a_coordinator_port_without_tls_or_for_another_name_stops_the_site_in_one_line(credentials, tmp_path):
    plain = TlsServer()
    try:
        done = run_entrypoint("site", site_env(credentials / "sites" / "site-0", tmp_path / "s", tmp_path, plain.port))
    finally:
        plain.close()
    one_line_error(done, f"FEDCARE_SUPERLINK=localhost:{plain.port}", "does not answer with TLS")
    # The federation's own certificate, issued for coordinator.example and 10.0.0.5, reached as localhost.
    ours = TlsServer(credentials / "coordinator" / "server.pem", credentials / "coordinator" / "server.key")
    try:
        assert "not issued for 'localhost'" in coordinator_tls_problem(
            credentials / "sites" / "site-0" / "ca.crt", f"localhost:{ours.port}")
        # Reached by a name it carries, it verifies; a coordinator not up yet cannot be checked.
        assert coordinator_tls_problem(credentials / "sites" / "site-0" / "ca.crt", f"127.0.0.1:{ours.port}") is None
    finally:
        ours.close()
    assert coordinator_tls_problem(credentials / "sites" / "site-0" / "ca.crt", f"127.0.0.1:{free_port()}") is None


def test_a_server_certificate_given_as_the_sites_ca_or_no_tls_folder_is_one_line(credentials, tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes((credentials / "coordinator" / "server.pem").read_bytes())
    (tls / "site.key").write_bytes((credentials / "sites" / "site-0" / "site.key").read_bytes())
    done = run_entrypoint("site", site_env(tls, tmp_path / "s", tmp_path, free_port()))
    one_line_error(done, str(tls / "ca.crt"), "not a CA certificate", "coordinator.example")
    done = run_entrypoint("site", site_env(tmp_path / "no-such-folder", tmp_path / "s", tmp_path, free_port()))
    one_line_error(done, f"FEDCARE_TLS_DIR={tmp_path / 'no-such-folder'}", "folder not found", "ca.crt, site.key")
