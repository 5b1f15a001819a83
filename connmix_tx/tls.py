"""TLS on the listeners and on the engine's PB dials (docs/operations.md, "TLS on every listener").

Listeners: a listener section with ``tls`` serves through Twisted's ``ssl:`` server endpoint
(``service.endpoint_string``).  The ``ssl:`` string cannot ask peers for a certificate, so a
registry or mesh point whose ``tls`` names ``caCertificates`` is served through an
``SSL4ServerEndpoint`` built from ``server_options`` instead: peers must then present a
certificate signed by one of those CAs.  ``caCertificates`` on the API and protocol servers is
not used (browsers and back-ends are not asked for client certificates).

Dials (engine side): the engine decides from its *own* configuration whether its peers speak TLS.

* The center registry is dialled with TLS when the engine's ``center.registry.tls`` is set; the
  server is verified against its ``caCertificates`` when given, otherwise the link is encrypted
  but the server is not verified.
* Other engines' mesh points are dialled with TLS when the engine's ``engine.meshPoint.tls`` is
  set (a cluster uses TLS on all mesh points or on none), verified against its
  ``caCertificates`` when given.
* The engine presents its ``engine.meshPoint.tls`` certificate as its client certificate on both
  dials, so that a registry / mesh point with ``caCertificates`` can check it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints, ssl

from connmix_tx.config import TLSConfig
from connmix_tx.reactors import IReactor


class TLSError(Exception):
    """A certificate or key that cannot be loaded; the text says which file and why."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror}") from None


def private_certificate(tls: TLSConfig) -> ssl.PrivateCertificate:
    """The certificate and key of a ``tls`` section (they may share one PEM file)."""
    pem = _read(tls.certificate)
    if tls.private_key != tls.certificate:
        pem += b"\n" + _read(tls.private_key)
    try:
        return ssl.PrivateCertificate.loadPEM(pem)
    except Exception as e:
        raise TLSError(f"cannot load {tls.certificate}: {_describe(e)}") from None


def ca_certificates(path: str) -> list[ssl.Certificate]:
    """Every certificate of a PEM bundle."""
    from cryptography import x509

    try:
        loaded = x509.load_pem_x509_certificates(_read(path))
    except ValueError as e:
        raise TLSError(f"cannot load {path}: {_describe(e)}") from None
    return [ssl.Certificate.loadPEM(cert.public_bytes(_pem_encoding())) for cert in loaded]


def _pem_encoding() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def server_options(tls: TLSConfig, require_client_certificate: bool) -> ssl.CertificateOptions:
    """Server context of a listener; with ``require_client_certificate`` peers must present a
    certificate signed by ``tls.ca_certificates``."""
    own = private_certificate(tls)
    if require_client_certificate and tls.ca_certificates:
        return own.options(*ca_certificates(tls.ca_certificates))
    return own.options()


def check_server_files(tls: TLSConfig) -> None:
    """Load the files of a listener's ``tls`` once, to report a bad PEM before listening."""
    private_certificate(tls)
    if tls.ca_certificates:
        ca_certificates(tls.ca_certificates)


def client_options(host: str, peer: TLSConfig, own: TLSConfig | None) -> Any:
    """Client context for dialling ``host`` whose TLS is described by ``peer`` (see module doc)."""
    client_cert = private_certificate(own) if own is not None else None
    if peer.ca_certificates:
        cas = ca_certificates(peer.ca_certificates)
        trust = cas[0] if len(cas) == 1 else ssl.trustRootFromCertificates(cas)
        return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert)
    if client_cert is not None:
        return ssl.CertificateOptions(privateKey=client_cert.privateKey.original,
                                      certificate=client_cert.original, verify=False)
    return ssl.CertificateOptions(verify=False)


def client_endpoint(reactor: IReactor, host: str, port: int, peer: TLSConfig | None,
                    own: TLSConfig | None = None, timeout: float = 30) -> Any:
    """A TCP client endpoint to ``host:port``, wrapped in TLS when ``peer`` is set."""
    tcp = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if peer is None:
        return tcp
    return endpoints.wrapClientTLS(client_options(host, peer, own), tcp)


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return text or type(error).__name__
