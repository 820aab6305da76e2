"""TLS for the gateway and the dashboard: a local CA generated at first start (README "Security").

Under `<state_dir>/secrets/tls/` (0700; keys 0600):
    ca.key, ca.crt          the deployment's CA (ECDSA P-256, 10 years; renewed with a year left)
    server.key, server.crt  the servers' certificate for 127.0.0.1 and localhost (1 year; renewed with
                            30 days left, or when the CA changed)
    clients/<code>.key|crt  an institution's client certificate for mutual TLS (CN = fixmedins_code)

Every process of a deployment reads the same files; the first to need them creates them, under a
file lock (the gateway and the dashboard start at the same time). Servers check for renewal at start.

    python -m services.common.tls ensure                                  # create / renew, print the paths
    python -m services.common.tls client-cert H15040099901 --operator NAME [--days 365]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import ssl
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.config import Settings, load_settings
from services.common.secrets import secrets_dir, write_atomically

CA_DAYS: Final = 3650
CA_RENEW_DAYS: Final = 365
SERVER_DAYS: Final = 365
SERVER_RENEW_DAYS: Final = 30
CLIENT_DAYS_DEFAULT: Final = 365
SERVER_NAMES: Final = ("localhost",)
SERVER_IPS: Final = ("127.0.0.1",)
CLIENT_CERT_MODES: Final = ("off", "optional", "required")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def tls_dir(s: Settings) -> Path:
    path = secrets_dir(s) / "tls"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def ca_paths(s: Settings) -> Pair:
    d = tls_dir(s)
    return Pair(d / "ca.crt", d / "ca.key")


def server_paths(s: Settings) -> Pair:
    d = tls_dir(s)
    return Pair(d / "server.crt", d / "server.key")


def client_paths(s: Settings, fixmedins_code: str) -> Pair:
    d = tls_dir(s) / "clients"
    d.mkdir(mode=0o700, exist_ok=True)
    return Pair(d / f"{fixmedins_code}.crt", d / f"{fixmedins_code}.key")


@contextlib.contextmanager
def _locked(s: Settings) -> Iterator[None]:
    with open(tls_dir(s) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _save(pair: Pair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomically(pair.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)
    write_atomically(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load(pair: Pair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return cert, key


def _fresh(cert: x509.Certificate, renew_days: int) -> bool:
    return cert.not_valid_after_utc - _now() > dt.timedelta(days=renew_days)


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xsettle"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # a little clock skew between processes
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _ensure_ca(s: Settings) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pair = ca_paths(s)
    loaded = _load(pair)
    if loaded and _fresh(loaded[0], CA_RENEW_DAYS):
        return loaded
    key = ec.generate_private_key(ec.SECP256R1())
    name = f"xsettle local CA {_now():%Y%m%d%H%M%S}"
    builder = _builder(name, x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xsettle"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), CA_DAYS)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _save(pair, cert, key)
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], subject: str, days: int, *, server: bool
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(subject, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure(s: Settings) -> tuple[Pair, Pair]:
    """The CA and the server certificate, created at first use and renewed when close to expiry."""
    with _locked(s):
        ca = _ensure_ca(s)
        pair = server_paths(s)
        loaded = _load(pair)
        if not (loaded and _fresh(loaded[0], SERVER_RENEW_DAYS) and _issued_by(loaded[0], ca[0])):
            _save(pair, *_leaf(ca, SERVER_IPS[0], SERVER_DAYS, server=True))
    return ca_paths(s), pair


def issue_client_cert(s: Settings, fixmedins_code: str,
                      days: int = CLIENT_DAYS_DEFAULT) -> tuple[Pair, x509.Certificate]:
    """A client certificate for one institution (CN = its fixmedins_code), replacing its previous one."""
    if not fixmedins_code.isalnum() or len(fixmedins_code) > 32:
        raise ValueError("fixmedins_code: 1-32 letters and digits")
    ensure(s)
    with _locked(s):
        ca = _ensure_ca(s)
        cert, key = _leaf(ca, fixmedins_code, days, server=False)
        pair = client_paths(s, fixmedins_code)
        _save(pair, cert, key)
    return pair, cert


def server_ssl_context(s: Settings, client_certs: str = "off") -> ssl.SSLContext:
    """TLS 1.2+ with the server certificate; client_certs "optional" asks for a certificate (one that the CA
    did not issue is refused), "required" refuses a client without one."""
    if client_certs not in CLIENT_CERT_MODES:
        raise ValueError(f"client_certs must be one of {CLIENT_CERT_MODES}")
    ca, server = ensure(s)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server.cert, server.key)
    if client_certs != "off":
        ctx.load_verify_locations(cafile=str(ca.cert))
        ctx.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(s: Settings, client_cert: Pair | None = None) -> ssl.SSLContext:
    """Trusts the deployment's CA only (not the system's), checks the host name; optionally presents a
    client certificate (mutual TLS)."""
    ca, _ = ensure(s)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        ctx.load_cert_chain(client_cert.cert, client_cert.key)
    return ctx


def client_session(s: Settings, *, limit: int = 100, client_cert: Pair | None = None,
                   **session_args: Any) -> aiohttp.ClientSession:
    """An aiohttp session for the project's servers: TLS with the CA (unless the deployment runs plain HTTP),
    keep-alive connections reused across requests (one handshake per connection, not per request)."""
    ssl_arg: ssl.SSLContext | bool = False if s.plain_http else client_ssl_context(s, client_cert)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ssl=ssl_arg), **session_args)


def _print_cert(label: str, pair: Pair) -> None:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    print(f"{label}: {pair.cert} (key {pair.key}), serial {cert.serial_number:x}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


async def _issue_audited(s: Settings, operator: str, code: str, days: int) -> Pair:
    """Issue inside the audit row's transaction: no certificate without its audit row (a failed commit
    leaves files nobody was told about, which the next issue replaces)."""
    import asyncpg

    from services.common import audit

    conn = await asyncpg.connect(s.pg_dsn)
    try:
        async with conn.transaction():
            pair, cert = issue_client_cert(s, code, days)
            await audit.record(conn, operator, "tls.client_cert.issue", code, None,
                               {"serial": f"{cert.serial_number:x}", "not_after": cert.not_valid_after_utc.isoformat()})
    finally:
        await conn.close()
    return pair


def main(argv: Sequence[str] | None = None) -> int:
    from services.common.audit import OperatorRequired, check_operator

    parser = argparse.ArgumentParser(prog="python -m services.common.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ensure", help="create or renew the CA and the server certificate; print their paths")
    issue = sub.add_parser("client-cert", help="issue an institution's client certificate (mutual TLS)")
    issue.add_argument("fixmedins_code")
    issue.add_argument("--operator", default=os.environ.get("XS_OPERATOR"))
    issue.add_argument("--days", type=int, default=CLIENT_DAYS_DEFAULT)
    args = parser.parse_args(argv)
    s = load_settings()
    if args.command == "ensure":
        ca, server = ensure(s)
        _print_cert("CA", ca)
        _print_cert("server", server)
        return 0
    try:
        operator = check_operator(args.operator)
    except OperatorRequired as e:
        print(e, file=sys.stderr)
        return 2
    if not 1 <= args.days <= 3650:
        print("--days must be 1..3650", file=sys.stderr)
        return 2
    try:
        pair = asyncio.run(_issue_audited(s, operator, args.fixmedins_code, args.days))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    _print_cert(f"client certificate of {args.fixmedins_code}", pair)
    return 0


if __name__ == "__main__":
    sys.exit(main())
