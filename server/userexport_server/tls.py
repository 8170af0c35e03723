"""TLS on the gRPC port: the server's credentials from its PEM files, and how the `health` command,
run beside the server (the Docker HEALTHCHECK), trusts it without extra configuration."""
from __future__ import annotations

import pathlib

import grpc
from cryptography import x509

from userexport.client.api import TlsConfig
from userexport_server.settings import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; with a client CA, clients must present a certificate it signed."""
    if not settings.tls_cert_file:
        return None
    client_ca = pathlib.Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(pathlib.Path(settings.tls_key_file).read_bytes(), pathlib.Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def health_check_tls(settings: Settings, client: TlsConfig | None) -> TlsConfig | None:
    """What the health command dials with. A plaintext server: `client` (None: plaintext too).
    A TLS server: `client`'s options, each defaulting to what fits the server's own certificate:
    that certificate as the trusted root (gRPC accepts the leaf itself as the anchor, self-signed
    or CA-signed) and its first DNS name as the name to check, as the health command dials
    127.0.0.1. Mutual TLS needs `client`'s certificate and key."""
    if not settings.tls_cert_file:
        return client
    client = client or TlsConfig()
    return TlsConfig(ca_file=client.ca_file or settings.tls_cert_file, cert_file=client.cert_file,
                     key_file=client.key_file,
                     server_name=client.server_name or certificate_dns_name(pathlib.Path(settings.tls_cert_file)))


def certificate_dns_name(path: pathlib.Path) -> str | None:
    """The first DNS name of the first certificate in a PEM file (None: it names none)."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None
