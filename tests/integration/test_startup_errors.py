"""A bad configuration or a port in use ends `userexport-server serve` quickly with one line on
stderr naming the variable (one per port in use), exit code 2 and no traceback; a server already on
the port keeps answering (port reuse is off, so the second cannot steal half its calls)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import grpc
import pytest

from tests.harness import ServerHandle, ServerProcess
from tests.tls_certs import SERVER_NAME, CertificateAuthority


def serve(data_dir: pathlib.Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    environment.update({"USEREXPORT_DATA_DIR": str(data_dir), "USEREXPORT_LISTEN": "127.0.0.1:0",
                        "USEREXPORT_FILES_LISTEN": "127.0.0.1:0", "USEREXPORT_METRICS_LISTEN": "127.0.0.1:0", **env})
    return subprocess.run([sys.executable, "-m", "userexport_server.main", "serve", *options], env=environment,
                          capture_output=True, text=True, timeout=30)


def assert_one_line_naming(result: subprocess.CompletedProcess[str], variable: str, text: str = "") -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("userexport-server: ") and variable in lines[0], lines[0]
    assert text in lines[0]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"), "ca")
    one, other = ca.issue("one", dns_names=(SERVER_NAME,)), ca.issue("other", dns_names=(SERVER_NAME,))
    return {"cert": str(one.cert_file), "key": str(one.key_file), "other_key": str(other.key_file),
            "ca": str(ca.cert_file)}


BAD_ENVIRONMENTS: dict[str, tuple[dict[str, str], str, str]] = {
    "unknown storage": ({"USEREXPORT_STORAGE": "s3"}, "USEREXPORT_STORAGE", "'local' or 'gcs'"),
    "gcs without bucket": ({"USEREXPORT_STORAGE": "gcs"}, "USEREXPORT_GCS_BUCKET", "must be set"),
    "unreadable jwks": ({"USEREXPORT_JWT_JWKS_FILE": "/nonexistent/jwks.json"}, "USEREXPORT_JWT_JWKS_FILE",
                        "cannot be read"),
    "gzip level 10": ({"USEREXPORT_GZIP_LEVEL": "10"}, "USEREXPORT_GZIP_LEVEL", "1..9"),
    "gzip level 0": ({"USEREXPORT_GZIP_LEVEL": "0"}, "USEREXPORT_GZIP_LEVEL", "1..9"),
    "negative workers": ({"USEREXPORT_WORKERS": "-3"}, "USEREXPORT_WORKERS", "at least 0"),
    "negative url ttl": ({"USEREXPORT_URL_TTL_SECONDS": "-60"}, "USEREXPORT_URL_TTL_SECONDS", "greater than 0"),
    "url ttl over 7 days": ({"USEREXPORT_URL_TTL_SECONDS": "604801"}, "USEREXPORT_URL_TTL_SECONDS", ""),
    "non-numeric int": ({"USEREXPORT_WORKERS": "two"}, "USEREXPORT_WORKERS", "not an integer"),
    "non-numeric float": ({"USEREXPORT_LEASE_SECONDS": "soon"}, "USEREXPORT_LEASE_SECONDS", "not a number"),
    "infinite float": ({"USEREXPORT_POLL_INTERVAL_SECONDS": "inf"}, "USEREXPORT_POLL_INTERVAL_SECONDS", "finite"),
    "zero lease": ({"USEREXPORT_LEASE_SECONDS": "0"}, "USEREXPORT_LEASE_SECONDS", "greater than 0"),
    "listen without port": ({"USEREXPORT_LISTEN": "localhost"}, "USEREXPORT_LISTEN", "HOST:PORT"),
    "listen port too big": ({"USEREXPORT_LISTEN": "127.0.0.1:70000"}, "USEREXPORT_LISTEN", "port"),
    "listen bad host": ({"USEREXPORT_LISTEN": "no such host!:1"}, "USEREXPORT_LISTEN", "HOST:PORT"),
    "metrics listen without port": ({"USEREXPORT_METRICS_LISTEN": "9464"}, "USEREXPORT_METRICS_LISTEN", "HOST:PORT"),
    "unbracketed ipv6": ({"USEREXPORT_FILES_LISTEN": "::1:50052"}, "USEREXPORT_FILES_LISTEN", "brackets"),
    "unresolvable host": ({"USEREXPORT_LISTEN": "nonexistent.invalid:50051"}, "USEREXPORT_LISTEN", "not found"),
    "bad public url": ({"USEREXPORT_FILES_PUBLIC_URL": "files.example.com"}, "USEREXPORT_FILES_PUBLIC_URL", "http"),
    "mysql url": ({"USEREXPORT_DATABASE_URL": "mysql://u@h/db"}, "USEREXPORT_DATABASE_URL", "postgresql://"),
    "garbage url": ({"USEREXPORT_DATABASE_URL": "not a url"}, "USEREXPORT_DATABASE_URL", "not a database URL"),
    "unreachable database": ({"USEREXPORT_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"},
                             "USEREXPORT_DATABASE_URL", "cannot open the database"),
    "garbage standby url": ({"USEREXPORT_EXPORT_DATABASE_URL": "not a url"}, "USEREXPORT_EXPORT_DATABASE_URL",
                            "not a database URL"),
    "standby of sqlite": ({"USEREXPORT_EXPORT_DATABASE_URL": "postgresql://u@h/db"}, "USEREXPORT_EXPORT_DATABASE_URL",
                          "needs PostgreSQL"),
    "standby wait past stall": ({"USEREXPORT_DATABASE_URL": "postgresql://u@h/db",
                                 "USEREXPORT_EXPORT_DATABASE_URL": "postgresql://u@standby/db",
                                 "USEREXPORT_EXPORT_DATABASE_WAIT_SECONDS": "120"},
                                "USEREXPORT_EXPORT_DATABASE_WAIT_SECONDS", "less than USEREXPORT_STALL_SECONDS"),
    "log level": ({"USEREXPORT_LOG_LEVEL": "LOUD"}, "USEREXPORT_LOG_LEVEL", ""),
    "log format": ({"USEREXPORT_LOG_FORMAT": "xml"}, "USEREXPORT_LOG_FORMAT", "'text' or 'json'"),
    "otlp endpoint": ({"USEREXPORT_OTLP_ENDPOINT": "collector:4317"}, "USEREXPORT_OTLP_ENDPOINT", "http"),
    "standard otlp endpoint": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector"}, "USEREXPORT_OTLP_ENDPOINT",
                               "http"),
    "data dir is a file": ({"USEREXPORT_DATA_DIR": "/etc/hostname/data"}, "USEREXPORT_DATA_DIR", "not a directory"),
}


@pytest.mark.parametrize("case", BAD_ENVIRONMENTS, ids=list(BAD_ENVIRONMENTS))
def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path: pathlib.Path, case: str) -> None:
    env, variable, text = BAD_ENVIRONMENTS[case]
    assert_one_line_naming(serve(tmp_path / "data", env), variable, text)


@pytest.mark.parametrize("case", ["cert without key", "key without cert", "ca without cert", "not pem",
                                  "key of another cert", "missing cert"])
def test_a_bad_tls_setting_is_one_line_naming_the_variable(tmp_path: pathlib.Path, certificates: dict[str, str],
                                                           case: str) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    env, variable = {
        "cert without key": ({"USEREXPORT_TLS_CERT_FILE": certificates["cert"]}, "USEREXPORT_TLS_KEY_FILE"),
        "key without cert": ({"USEREXPORT_TLS_KEY_FILE": certificates["key"]}, "USEREXPORT_TLS_CERT_FILE"),
        "ca without cert": ({"USEREXPORT_TLS_CLIENT_CA_FILE": certificates["ca"]}, "USEREXPORT_TLS_CERT_FILE"),
        "not pem": ({"USEREXPORT_TLS_CERT_FILE": str(not_pem), "USEREXPORT_TLS_KEY_FILE": certificates["key"]},
                    "USEREXPORT_TLS_CERT_FILE"),
        "key of another cert": ({"USEREXPORT_TLS_CERT_FILE": certificates["cert"],
                                 "USEREXPORT_TLS_KEY_FILE": certificates["other_key"]}, "USEREXPORT_TLS_KEY_FILE"),
        "missing cert": ({"USEREXPORT_TLS_CERT_FILE": str(tmp_path / "none.crt"),
                          "USEREXPORT_TLS_KEY_FILE": certificates["key"]}, "USEREXPORT_TLS_CERT_FILE"),
    }[case]
    assert_one_line_naming(serve(tmp_path / "data", env), variable)


def files_port(server: ServerProcess) -> int:
    found = re.search(r"local storage serving .*? listen=127\.0\.0\.1:(\d+)", server.log_text())
    assert found, server.log_text()
    return int(found.group(1))


def test_a_second_server_on_a_port_in_use_exits_and_the_first_keeps_answering(tmp_path: pathlib.Path) -> None:
    first = ServerProcess(tmp_path / "first")
    try:
        for variable, port in (("USEREXPORT_LISTEN", first.port), ("USEREXPORT_FILES_LISTEN", files_port(first)),
                               ("USEREXPORT_METRICS_LISTEN", first.metrics_port)):
            second = serve(tmp_path / "second", {variable: f"127.0.0.1:{port}"})
            assert_one_line_naming(second, variable, f"cannot listen on 127.0.0.1:{port}: address in use")
        # Every port in use at once: a line for each, so one try tells the operator all of them.
        # The flags come after the command and override the environment.
        second = serve(tmp_path / "second", {}, "--data-dir", str(tmp_path / "second"),
                       "--listen", first.target, "--files-listen", f"127.0.0.1:{files_port(first)}",
                       "--metrics-listen", f"127.0.0.1:{first.metrics_port}")
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.splitlines() == [
            f"userexport-server: cannot listen on {first.target}: address in use (USEREXPORT_LISTEN)",
            f"userexport-server: cannot listen on 127.0.0.1:{files_port(first)}: address in use "
            "(USEREXPORT_FILES_LISTEN)",
            f"userexport-server: cannot listen on 127.0.0.1:{first.metrics_port}: address in use "
            "(USEREXPORT_METRICS_LISTEN)"]
        health = subprocess.run([sys.executable, "-m", "userexport_server.main", "health", "--target", first.target],
                                capture_output=True, text=True, timeout=30)
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
        assert first.process.poll() is None
    finally:
        first.stop()


def test_grpc_port_reuse_is_off(tmp_path: pathlib.Path) -> None:
    """A server that would share the port (grpcio's default SO_REUSEPORT) cannot bind ours."""
    server = ServerHandle(tmp_path, workers=0)
    try:
        intruder = grpc.server(thread_pool=None)
        try:
            try:
                bound = intruder.add_insecure_port(server.target)
            except RuntimeError:
                bound = 0
            assert bound == 0
        finally:
            intruder.stop(None)
    finally:
        server.stop()
