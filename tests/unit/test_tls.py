"""The local CA (services/common/tls.py): files and modes, the server certificate's names, renewal, and
TLS 1.2+ handshakes between the project's server and client contexts over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from services.common import tls
from services.common.config import Settings, load_settings


@pytest.fixture
def s(tmp_path: Path) -> Settings:
    return dataclasses.replace(load_settings(), state_dir=tmp_path / "state", plain_http=0)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_first_use_creates_ca_and_server_certificate_with_private_keys(s: Settings) -> None:
    ca, server = tls.ensure(s)
    assert (tls.tls_dir(s).stat().st_mode & 0o777) == 0o700
    assert (ca.key.stat().st_mode & 0o777) == 0o600 and (server.key.stat().st_mode & 0o777) == 0o600
    ca_cert, server_cert = _cert(ca.cert), _cert(server.cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    server_cert.verify_directly_issued_by(ca_cert)
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    left = server_cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < left <= dt.timedelta(days=365)


def test_second_use_keeps_the_files(s: Settings) -> None:
    ca, server = tls.ensure(s)
    before = (ca.cert.read_bytes(), ca.key.read_bytes(), server.cert.read_bytes(), server.key.read_bytes())
    tls.ensure(s)
    assert (ca.cert.read_bytes(), ca.key.read_bytes(), server.cert.read_bytes(), server.key.read_bytes()) == before


def test_server_certificate_close_to_expiry_is_renewed(s: Settings) -> None:
    ca, server = tls.ensure(s)
    loaded = tls._load(ca)
    assert loaded is not None
    tls._save(server, *tls._leaf(loaded, "127.0.0.1", tls.SERVER_RENEW_DAYS - 1, server=True))
    old = _cert(server.cert).serial_number
    tls.ensure(s)
    renewed = _cert(server.cert)
    assert renewed.serial_number != old
    assert renewed.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=364)


def test_a_new_ca_reissues_the_server_certificate(s: Settings) -> None:
    ca, server = tls.ensure(s)
    ca.cert.unlink()  # e.g. the CA was renewed: the server certificate must chain to the new one
    tls.ensure(s)
    _cert(server.cert).verify_directly_issued_by(_cert(ca.cert))


def test_client_certificate_names_the_institution(s: Settings) -> None:
    pair, cert = tls.issue_client_cert(s, "H15040099901", days=30)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "H15040099901"
    assert (pair.key.stat().st_mode & 0o777) == 0o600
    cert.verify_directly_issued_by(_cert(tls.ca_paths(s).cert))
    with pytest.raises(ValueError):
        tls.issue_client_cert(s, "../etc")


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, dict | None]:
    """One TLS connection over loopback; the server answers with the client certificate's CN."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        cn = dict(x[0] for x in peer["subject"])["commonName"] if peer else "-"
        writer.write(cn.encode() + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        line = (await reader.readline()).decode().strip()
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        return line, {"version": version}
    finally:
        server.close()


async def test_client_trusting_the_ca_connects_with_tls_1_2_or_later(s: Settings) -> None:
    cn, info = await _handshake(tls.server_ssl_context(s), tls.client_ssl_context(s))
    assert cn == "-" and info is not None and info["version"] in ("TLSv1.2", "TLSv1.3")


async def test_client_not_trusting_the_ca_fails(s: Settings) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(tls.server_ssl_context(s), ssl.create_default_context())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_1_1_is_refused(s: Settings) -> None:
    old = tls.client_ssl_context(s)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        await _handshake(tls.server_ssl_context(s), old)


async def test_mutual_tls_optional_and_required(s: Settings, tmp_path: Path) -> None:
    pair, _ = tls.issue_client_cert(s, "H15040099901")
    cn, _ = await _handshake(tls.server_ssl_context(s, "optional"), tls.client_ssl_context(s, pair))
    assert cn == "H15040099901"
    cn, _ = await _handshake(tls.server_ssl_context(s, "optional"), tls.client_ssl_context(s))
    assert cn == "-"  # optional: no certificate is fine
    assert await _refused(tls.server_ssl_context(s, "required"), tls.client_ssl_context(s))
    cn, _ = await _handshake(tls.server_ssl_context(s, "required"), tls.client_ssl_context(s, pair))
    assert cn == "H15040099901"
    # A certificate from another CA is refused even when certificates are optional.
    stranger = dataclasses.replace(s, state_dir=tmp_path / "other")
    foreign, _ = tls.issue_client_cert(stranger, "H15040099901")
    assert await _refused(tls.server_ssl_context(s, "optional"), tls.client_ssl_context(s, foreign))


async def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bool:
    """With TLS 1.3 the client learns of a refused certificate after its side of the handshake: an error
    or a connection closed without the server's answer."""
    try:
        cn, _ = await _handshake(server_ctx, client_ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    return cn == ""
