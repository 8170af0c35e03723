"""TLS and mutual TLS on the gRPC port, with certificates made in the test, against real servers.

TLS is independent of the database, so these servers run on SQLite only. A plaintext client, a
client trusting another CA, and (with mutual TLS) a client without a certificate or with one from
another CA are all refused; the right ones work through the client, the CLI and `health`.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness import ServerHandle
from tests.tls_certs import SERVER_NAME, CertificateAuthority, Issued
from userexport.client import TlsConfig, UsersExportClient, UsersExportError
from userexport.client.cli import main as cli_main

TIMEOUT = 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertificateAuthority | Issued]:
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = (CertificateAuthority(directory / n, n) for n in ("server-ca", "client-ca",
                                                                                            "stranger-ca"))
    return {"server_ca": server_ca, "client_ca": client_ca, "stranger_ca": stranger_ca,
            "server": server_ca.issue("server", dns_names=(SERVER_NAME,)),
            "client": client_ca.issue("client", client=True),
            "stranger": stranger_ca.issue("stranger", client=True),
            "self_signed": server_ca.self_signed_server()}


def _start(data_dir: pathlib.Path, server: Issued, client_ca: pathlib.Path | None = None) -> ServerHandle:
    return ServerHandle(data_dir, workers=0, tls_cert_file=str(server.cert_file), tls_key_file=str(server.key_file),
                        tls_client_ca_file=str(client_ca or ""))


@pytest.fixture(scope="module")
def tls_server(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = _start(tmp_path_factory.mktemp("tls"), pki["server"])
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = _start(tmp_path_factory.mktemp("mtls"), pki["server"], client_ca=pki["client_ca"].cert_file)
    yield handle
    handle.stop()


def list_jobs(server: ServerHandle, tls: TlsConfig | None) -> int:
    """How many jobs the tenant has (0), or raise UsersExportError."""
    with UsersExportClient(server.target, server.token(), timeout=TIMEOUT, tls=tls) as client:
        return len(client.list_jobs().jobs)


def trusting(pki: dict, ca: str = "server_ca", identity: str | None = None) -> TlsConfig:
    issued = pki[identity] if identity else None
    return TlsConfig(ca_file=str(pki[ca].cert_file), server_name=SERVER_NAME,
                     cert_file=str(issued.cert_file) if issued else None,
                     key_file=str(issued.key_file) if issued else None)


def test_a_tls_call_works(tls_server: ServerHandle, pki: dict) -> None:
    assert list_jobs(tls_server, trusting(pki)) == 0


def test_a_plaintext_client_is_refused(tls_server: ServerHandle) -> None:
    with pytest.raises(UsersExportError) as error:
        list_jobs(tls_server, None)
    assert error.value.unreachable


def test_a_client_trusting_another_ca_is_refused(tls_server: ServerHandle, pki: dict) -> None:
    with pytest.raises(UsersExportError) as error:
        list_jobs(tls_server, trusting(pki, ca="stranger_ca"))
    assert error.value.unreachable


def test_the_wrong_server_name_is_refused(tls_server: ServerHandle, pki: dict) -> None:
    with pytest.raises(UsersExportError):
        list_jobs(tls_server, TlsConfig(ca_file=str(pki["server_ca"].cert_file), server_name="other.test"))


def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server: ServerHandle, pki: dict) -> None:
    with pytest.raises(UsersExportError) as error:
        list_jobs(mtls_server, trusting(pki))
    assert error.value.unreachable


def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(mtls_server: ServerHandle, pki: dict) -> None:
    with pytest.raises(UsersExportError) as error:
        list_jobs(mtls_server, trusting(pki, identity="stranger"))
    assert error.value.unreachable


def test_mutual_tls_with_the_client_certificate_works(mtls_server: ServerHandle, pki: dict) -> None:
    assert list_jobs(mtls_server, trusting(pki, identity="client")) == 0


def test_a_client_certificate_without_its_key_is_a_usage_error(pki: dict) -> None:
    with pytest.raises(ValueError, match="needs its key"):
        TlsConfig(cert_file=str(pki["client"].cert_file))


def test_cli_flags_and_environment(mtls_server: ServerHandle, pki: dict, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Flags work; the same through USEREXPORT_TLS_* variables; without the client cert: exit 4."""
    common = ["--server", mtls_server.target, "--data-dir", str(mtls_server.data_dir)]
    flags = ["--tls-ca-file", str(pki["server_ca"].cert_file), "--tls-server-name", SERVER_NAME]
    identity = ["--tls-client-cert-file", str(pki["client"].cert_file),
                "--tls-client-key-file", str(pki["client"].key_file)]
    assert cli_main(["jobs", "list", *common, *flags, *identity]) == 0
    assert cli_main(["jobs", "list", *common, *flags]) == 4
    assert cli_main(["jobs", "list", *common]) == 4  # plaintext
    assert cli_main(["jobs", "list", *common, *flags, "--tls-client-cert-file", str(pki["client"].cert_file)]) == 2
    for name, value in (("CA_FILE", pki["server_ca"].cert_file), ("SERVER_NAME", SERVER_NAME),
                        ("CLIENT_CERT_FILE", pki["client"].cert_file), ("CLIENT_KEY_FILE", pki["client"].key_file)):
        monkeypatch.setenv(f"USEREXPORT_TLS_{name}", str(value))
    capsys.readouterr()
    assert cli_main(["jobs", "list", *common]) == 0, capsys.readouterr().err


def health(server: ServerHandle, **env: object) -> subprocess.CompletedProcess[str]:
    """`userexport-server health` in the server's environment (its TLS settings), plus `env`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    settings = server.settings
    environment.update({"USEREXPORT_DATA_DIR": str(server.data_dir), "USEREXPORT_LISTEN": server.target,
                        "USEREXPORT_TLS_CERT_FILE": settings.tls_cert_file,
                        "USEREXPORT_TLS_KEY_FILE": settings.tls_key_file,
                        "USEREXPORT_TLS_CLIENT_CA_FILE": settings.tls_client_ca_file},
                       **{k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, "-m", "userexport_server.main", "health"], env=environment,
                          capture_output=True, text=True, timeout=60)


def test_health_trusts_a_self_signed_server_certificate_by_default(pki: dict, tmp_path: pathlib.Path) -> None:
    """Beside the server (the Docker HEALTHCHECK) no extra setting is needed: the server's own
    certificate is the root, its DNS name the name to check though the target is 127.0.0.1."""
    server = _start(tmp_path, pki["self_signed"])
    try:
        result = health(server)
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    finally:
        server.stop()


def test_health_trusts_a_ca_signed_server_certificate_by_default(tls_server: ServerHandle, pki: dict) -> None:
    """The leaf itself is accepted as the trust anchor; a CA given instead is really checked."""
    result = health(tls_server)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    assert health(tls_server, USEREXPORT_TLS_CA_FILE=pki["server_ca"].cert_file).returncode == 0
    refused = health(tls_server, USEREXPORT_TLS_CA_FILE=pki["stranger_ca"].cert_file)
    assert (refused.returncode, refused.stdout) == (1, ""), refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(f"unhealthy: {tls_server.target}: UNAVAILABLE")


def test_health_against_mutual_tls_needs_a_client_certificate(mtls_server: ServerHandle, pki: dict) -> None:
    assert health(mtls_server).returncode == 1
    result = health(mtls_server, USEREXPORT_TLS_CLIENT_CERT_FILE=pki["client"].cert_file,
                    USEREXPORT_TLS_CLIENT_KEY_FILE=pki["client"].key_file)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr


def test_grpcurl_with_the_readme_flags_reaches_a_mutual_tls_server(mtls_server: ServerHandle, pki: dict) -> None:
    """The grpcurl line for TLS of docs/api.md and docs/configuration.md, with a real grpcurl: CA, client
    certificate and key."""
    grpcurl = pathlib.Path(sys.executable).parent / "grpcurl"
    base = [str(grpcurl), "-cacert", str(pki["server_ca"].cert_file), "-servername", SERVER_NAME]
    identity = ["-cert", str(pki["client"].cert_file), "-key", str(pki["client"].key_file)]
    listed = subprocess.run([*base, *identity, mtls_server.target, "list"], capture_output=True, text=True,
                            timeout=30)
    assert listed.returncode == 0 and "userexport.v1.UsersExportService" in listed.stdout, listed.stderr
    refused = subprocess.run([*base, mtls_server.target, "list"], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0  # no client certificate: the handshake fails
