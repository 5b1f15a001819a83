"""Listeners shared by the workers of one engine: ``SO_REUSEPORT`` over TCP and TLS, exit 3 kept."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, reactor

from conftest import in_asyncio, wait_for
from connmix_tx.config import ListenerConfig, TLSConfig
from connmix_tx.reuseport import HAVE_REUSEPORT
from connmix_tx.service import FatalError, Listener
from connmix_tx.testing import free_ports

pytestmark = [
    pytest.mark.skipif(not HAVE_REUSEPORT, reason="no SO_REUSEPORT on this platform"),
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]


class Hello(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.transport.write(self.factory.name)


class HelloFactory(protocol.Factory):
    protocol = Hello

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.accepted = 0


def listener(port: int, name: bytes, reuse: bool, tls: TLSConfig | None = None) -> tuple[Listener, HelloFactory]:
    factory = HelloFactory(name)
    config = ListenerConfig(bind="127.0.0.1", port=port, tls=tls)
    started: list[str] = []
    service = Listener(reactor, "engine.servers[0]", config, factory, started.append, reuse_port=reuse)
    service.privilegedStartService()
    service.startService()
    return service, factory


async def read_hello(port: int, context: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return await asyncio.wait_for(reader.read(16), 5)
    finally:
        writer.close()


@in_asyncio
async def test_two_listeners_share_one_port_and_both_get_connections() -> None:
    (port,) = free_ports(1)
    first, a = listener(port, b"a", reuse=True)
    second, b = listener(port, b"b", reuse=True)
    try:
        assert first.port.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert first.actual_port == second.actual_port == port
        names = [await read_hello(port) for _ in range(40)]
        assert set(names) == {b"a", b"b"}  # the kernel spread them (2 * 2**-40 to fail)
        assert a.accepted + b.accepted == 40
    finally:
        await wait_for(first.stopService())
        await wait_for(second.stopService())


@in_asyncio
async def test_a_port_held_without_reuseport_is_still_exit_3() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FatalError) as info:
            listener(port, b"a", reuse=True)
    assert info.value.code == 3
    assert info.value.message == (
        f"cannot listen on 127.0.0.1:{port} (engine.servers[0]): address already in use"
    )


@in_asyncio
async def test_a_plain_listener_cannot_join_a_shared_port() -> None:
    (port,) = free_ports(1)
    shared, _ = listener(port, b"a", reuse=True)
    try:
        with pytest.raises(FatalError) as info:
            listener(port, b"b", reuse=False)
        assert info.value.code == 3
    finally:
        await wait_for(shared.stopService())


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reuseport-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "c.crt", directory / "c.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@in_asyncio
async def test_tls_listeners_share_a_port_too(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    tls = TLSConfig(str(cert), str(key), None)
    (port,) = free_ports(1)
    first, a = listener(port, b"a", reuse=True, tls=tls)
    second, b = listener(port, b"b", reuse=True, tls=tls)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        names = [await read_hello(port, context) for _ in range(20)]
        assert set(names) <= {b"a", b"b"} and len(names) == 20
        assert a.accepted + b.accepted == 20
        with pytest.raises(ssl.SSLError):
            await read_hello(port, ssl.create_default_context())  # unknown CA: it is really TLS
    finally:
        await wait_for(first.stopService())
        await wait_for(second.stopService())


def test_a_bad_certificate_on_a_shared_port_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(FatalError) as info:
        listener(free_ports(1)[0], b"a", reuse=True, tls=TLSConfig(str(bad), str(bad), None))
    assert info.value.code == 2
    assert info.value.message.startswith("config engine.servers[0].tls: ")


