"""Credentials of a federation: a CA, the coordinator's TLS certificate, one key pair per site.

`make_credentials` writes them in the layout the compose file and the entry point expect:

    <out>/ca/ca.crt, ca.key                the CA; ca.key stays with whoever signs, never deployed
    <out>/coordinator/ca.crt, server.pem, server.key
    <out>/sites/<site>/ca.crt, site.key, site.pub

The `check_*` functions load what a process is about to use and turn every wrong or missing
file into a `FedcareError` naming the file and what to do, before Flower (which would print a
traceback or, worse, retry forever) ever sees it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.errors import FedcareError

CURVE = ec.SECP384R1
VALID_DAYS = 825  # the longest lifetime common TLS clients still accept for a server certificate
LOOPBACK = "127.0.0.1"


def make_credentials(out: Path, sites: Sequence[str], hosts: Sequence[str], *, overwrite: bool = False) -> Path:
    """Write a new CA, the coordinator's certificate for `hosts` and one key pair per site."""
    out = Path(out)
    if (out / "ca" / "ca.key").exists() and not overwrite:
        raise FedcareError(f"{out / 'ca' / 'ca.key'}: a CA already exists here; pass --overwrite to replace "
                           "every credential in this folder, or add sites with a new --out")
    if not hosts:
        raise FedcareError("give at least one --host: the name or address sites use to reach the coordinator")
    # The coordinator's own Fleet port reaches its SuperLink on loopback and checks this certificate there.
    hosts = list(hosts) + [LOOPBACK] * (LOOPBACK not in hosts)
    if len(set(sites)) != len(sites) or any(not _safe_name(name) for name in sites):
        raise FedcareError(f"site names {list(sites)} must be unique and use only letters, digits, '-' and '_'")
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcare federation CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    _write_key(out / "ca" / "ca.key", ca_key)
    _write_cert(out / "ca" / "ca.crt", ca_cert)

    server_key = ec.generate_private_key(CURVE())
    server_cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name,
                            server_key.public_key())
                   .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    _write_key(out / "coordinator" / "server.key", server_key)
    _write_cert(out / "coordinator" / "server.pem", server_cert)
    _write_cert(out / "coordinator" / "ca.crt", ca_cert)

    for site in sites:
        make_site_key(out / "sites" / site)
        _write_cert(out / "sites" / site / "ca.crt", ca_cert)
    return out


def make_site_key(folder: Path) -> Path:
    """Write `site.key` and `site.pub`: SECP384R1 in OpenSSH format, what Flower's node authentication reads."""
    key = ec.generate_private_key(CURVE())
    _write_key(folder / "site.key", key, serialization.PrivateFormat.OpenSSH)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (folder / "site.pub").write_bytes(public + b"\n")
    return folder / "site.pub"


def check_coordinator(ca: Path, certificate: Path, key: Path, host: str) -> None:
    """The coordinator's certificate is signed by `ca`, matches `key`, names `host` and is in date."""
    ca_cert = check_ca(ca)
    cert = load_certificate(certificate)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise FedcareError(f"{certificate}: not signed by the CA in {ca}; issue both with `fedcare deploy init`") from None
    _check_dates(certificate, cert)
    private = load_private_key(key)
    if private.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
        raise FedcareError(f"{key}: this key does not belong to the certificate {certificate}; use the pair "
                           "`fedcare deploy init` wrote together")
    check_host(certificate, host)


def check_host(certificate: Path, host: str) -> None:
    """Fail loudly when `host` is not among the certificate's subject alternative names."""
    names = certificate_hosts(load_certificate(certificate))
    if host.lower() not in names:
        raise FedcareError(f"{certificate}: issued for {', '.join(sorted(names)) or 'no host'}, not for '{host}'; "
                           f"sites would refuse it: reissue with `fedcare deploy init --host {host} ...`")


def check_site(ca: Path, key: Path) -> None:
    """A site's CA certificate is an in-date CA and its private key is a SECP384R1 key."""
    check_ca(ca)
    data = _read(key, "private key")
    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise FedcareError(f"{key}: not an unencrypted OpenSSH private key; copy the site.key that "
                           "`fedcare deploy init` wrote") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, CURVE):
        raise FedcareError(f"{key}: not an EC SECP384R1 private key; make one with `fedcare deploy init`")


def check_ca(path: Path) -> x509.Certificate:
    """The certificate at `path` parses, is a CA (what a TLS client can verify a server with) and is in date."""
    cert = load_certificate(path)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        # The usual slip: the coordinator's server.pem copied where the CA's certificate belongs.
        raise FedcareError(f"{path}: not a CA certificate (issued to {_common_name(cert)!r}); copy the ca.crt "
                           "that `fedcare deploy init` wrote for this site")
    _check_dates(path, cert)
    return cert


def coordinator_tls_problem(ca: Path, address: str, timeout: float = 5.0) -> str | None:
    """Why the coordinator at HOST:PORT cannot be trusted with the CA in `ca`, or None when its
    certificate verifies (or the coordinator is not reachable yet: then nothing can be checked).

    A SuperNode that meets a certificate it cannot verify, or a port without TLS, retries forever
    without saying so; one handshake here turns that into one line before it starts.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as err:
        if err.verify_code == _HOSTNAME_MISMATCH:
            return (f"FEDCARE_SUPERLINK={address}: the coordinator's certificate is not issued for '{host}'; "
                    "use the name it was issued for, or have the coordinator reissue it with "
                    f"`fedcare deploy init --host {host}`")
        return (f"{ca}: the coordinator at {address} presents a certificate this CA did not sign "
                f"({err.verify_message}); copy the ca.crt of this federation's `fedcare deploy init`")
    except ssl.SSLError:
        return (f"FEDCARE_SUPERLINK={address}: the coordinator does not answer with TLS there; set it to "
                "the coordinator's public Fleet port (FEDCARE_PORT on the coordinator, 9092 by default)")
    except (OSError, ValueError):
        return None  # not reachable yet (or not resolvable from here): the SuperNode keeps trying


def check_public_key(path: Path) -> None:
    """A site's public key, as the coordinator registers it: OpenSSH format, EC SECP384R1."""
    data = _read(path, "public key")
    try:
        public = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise FedcareError(f"{path}: not an OpenSSH public key; send the site.pub that `fedcare deploy init` "
                           "wrote") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, CURVE):
        raise FedcareError(f"{path}: not an EC SECP384R1 public key; Flower's node authentication needs one")


def load_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FedcareError(f"{path}: not a PEM certificate; copy it again from `fedcare deploy init`'s output") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise FedcareError(f"{path}: not an unencrypted PEM private key; copy it again from "
                           "`fedcare deploy init`'s output") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedcareError(f"{path}: not an EC private key; make one with `fedcare deploy init`")
    return key


def certificate_hosts(cert: x509.Certificate) -> set[str]:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {n.lower() for n in names.get_values_for_type(x509.DNSName)} | {
        str(a) for a in names.get_values_for_type(x509.IPAddress)}


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_HOSTNAME_MISMATCH = 62  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FedcareError(f"{path}: {what} file not found; check the mount and the path in the settings")
    try:
        return path.read_bytes()
    except OSError as err:
        raise FedcareError(f"{path}: {what} file cannot be read ({err.strerror}); check its owner and mode") from None


def _check_dates(path: Path, cert: x509.Certificate) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FedcareError(f"{path}: valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                           f"{cert.not_valid_after_utc:%Y-%m-%d}; reissue it with `fedcare deploy init`")


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    # Owner-only from the first byte: a private key must never be world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name)
