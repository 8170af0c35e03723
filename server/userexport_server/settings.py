"""Every knob of the server, read from USEREXPORT_* environment variables, with embedded defaults.

The defaults run the whole service on one machine: SQLite and local files under one data
directory, the gRPC API on 127.0.0.1:50051 and signed downloads on 127.0.0.1:50052.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy.exc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from sqlalchemy.engine import make_url

from userexport_server.db.engine import Timeouts
from userexport_server.listen import parse_listen

PREFIX = "USEREXPORT_"
# A configured key shorter than this is refused: it could be guessed.
MIN_KEY_CHARS = 16
_Loaded = TypeVar("_Loaded")


class ConfigError(ValueError):
    """A setting that cannot be used as given; the message names its environment variable."""


@dataclass(frozen=True)
class Settings:
    # Where the SQLite database, local files and generated secrets live.
    data_dir: pathlib.Path = pathlib.Path("data")
    # gRPC listen address.
    listen: str = "127.0.0.1:50051"
    # SQLAlchemy URL; empty: sqlite file in data_dir.
    database_url: str = ""
    # A hot standby of that database (a PostgreSQL streaming replica) for the exports' reads of the
    # users table; empty: they read the primary. An export reads there once the standby has replayed
    # its job's creation, waiting at most export_database_wait_seconds, else it reads the primary
    # (db/standby.py says why it falls back rather than failing).
    export_database_url: str = ""
    export_database_wait_seconds: float = 10.0
    # "local" (files in data_dir served over HTTP) or "gcs".
    storage: str = "local"
    # Local backend: where its download endpoint listens, and the base URL put into signed URLs.
    files_listen: str = "127.0.0.1:50052"
    files_public_url: str = ""
    # Local download endpoint bounds: the whole request head must arrive within this (slowloris),
    # each body chunk must be taken by the client within this, at most this many connections.
    files_head_timeout_seconds: float = 10.0
    files_write_timeout_seconds: float = 30.0
    files_max_connections: int = 512
    # Prometheus metrics endpoint (HTTP, any path); empty (USEREXPORT_METRICS_LISTEN=): not served.
    # 9464 is the port OpenTelemetry's Prometheus exporter uses by default; loopback keeps it private.
    metrics_listen: str = "127.0.0.1:9464"
    # GCS backend.
    gcs_bucket: str = ""
    gcs_endpoint: str = ""
    gcs_project: str = ""
    gcs_credentials_file: str = ""
    gcs_signer_email: str = ""
    # Signed download URLs live this long.
    url_ttl_seconds: int = 60
    # Database call timeouts (seconds): SQLite lock wait, PostgreSQL statement, connection pool wait.
    db_busy_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0
    db_pool_timeout_seconds: float = 10.0
    # Threads that run the API's blocking calls: reads (get, list, sign) apart from writes (create,
    # cancel), so writers waiting on a database lock never hold up reads.
    api_read_threads: int = 8
    api_write_threads: int = 4
    # How often health asks the workers, the database and the event listener whether they are alive.
    health_interval_seconds: float = 1.0
    # Export worker threads in this process.
    workers: int = 2
    # Users per slice: a job is cut into key ranges of this many users, each exported as its own
    # gzip member by any worker of any replica, and joined when all are done (about a second of
    # work each on PostgreSQL). A smaller job is one slice, written straight into its file.
    slice_users: int = 100_000
    # gzip level of export files (1 fastest .. 9 smallest): 1 keeps a million-user CSV under 10 s on SQLite,
    # files about 18% larger than level 6.
    gzip_level: int = 1
    # How often idle workers look for jobs created by other replicas.
    poll_interval_seconds: float = 1.0
    # A claimed job's lease; the running worker renews it every third of this, while its work moves.
    lease_seconds: float = 30.0
    # Work that has not moved (no rows read, no bytes written, no step done) for this long is stalled:
    # its query is cancelled, its lease no longer renewed, and it is handed back for another worker
    # (any replica) to run. Well above the longest single step: counting 10M users takes seconds.
    stall_seconds: float = 120.0
    # Job life cycle.
    job_ttl_seconds: int = 24 * 3600
    job_timeout_seconds: float = 8 * 3600
    expired_retention_seconds: int = 7 * 24 * 3600
    reaper_interval_seconds: float = 30.0
    # Claims a job gets when its runs hit transient database or storage errors; then it fails.
    job_attempts: int = 3
    # The reaper's orphan sweep leaves alone files younger than this (by last modification): a
    # `.tmp-` file this fresh may be another replica's running export. An hour is far more than any
    # export goes without writing a byte.
    orphan_grace_seconds: float = 3600.0
    # How often the reaper sweeps storage for orphans (it also sweeps once at start).
    orphan_sweep_interval_seconds: float = 600.0
    max_active_jobs_per_tenant: int = 2
    # How long the users change log keeps a change: a watermark older than this is WATERMARK_EXPIRED
    # (the reaper prunes older changes), so an incremental sync must run at least this often.
    change_retention_seconds: float = 7 * 24 * 3600
    # Bytes of completed export files one tenant may keep (0: no limit); more is RESOURCE_EXHAUSTED.
    max_retained_bytes_per_tenant: int = 5 * 1024**3
    # Tokens: HS256 secret (empty: a generated one in data_dir), JWKS file for RS256/ES256.
    jwt_secret: str = ""
    jwt_jwks_file: str = ""
    # JWKS URL (instead of a file): the key set is cached this many seconds, and a token with an unknown
    # kid re-fetches it at most once per cooldown, so rotated keys work without a restart.
    jwt_jwks_url: str = ""
    jwt_jwks_cache_seconds: float = 300.0
    jwt_jwks_refresh_cooldown_seconds: float = 30.0
    jwt_issuer: str = "userexport-local"
    jwt_audience: str = "userexport"
    jwt_tenant_claim: str = "tenant"
    jwt_leeway_seconds: int = 30
    # Seals ListJobs page tokens (empty: a generated one in data_dir); replicas must share it, as a
    # token from one is used on another.
    page_token_key: str = ""
    # Largest request message accepted, in bytes.
    max_request_bytes: int = 64 * 1024
    # TLS on the gRPC port (PEM files): a certificate (chain) and its key turn it on; a client CA
    # also requires every client to present a certificate it signed (mutual TLS). Empty: plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Seconds a SIGTERM waits for running exports before handing them back.
    shutdown_grace_seconds: float = 20.0
    log_level: str = "INFO"
    # "text" (key=value lines, for terminals and grep) or "json" (one object a line, for log pipelines).
    # Text by default, so existing log scraping keeps working; deployments opt into json.
    log_format: str = "text"
    # Traces: the OTLP/gRPC collector (http://collector:4317). Empty: the standard
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none set: tracing is off.
    # OTEL_SDK_DISABLED=true turns it off whatever is set.
    otlp_endpoint: str = ""

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'userexport.db'}"

    @property
    def db_timeouts(self) -> Timeouts:
        return Timeouts(busy=self.db_busy_timeout_seconds, statement=self.db_statement_timeout_seconds,
                        pool=self.db_pool_timeout_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment; keyword overrides (from flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is not None and (raw != "" or f.name in _EMPTY_MEANS_OFF):
                values[f.name] = _convert(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["otlp_endpoint"] = _otlp_endpoint(environ, values.get("otlp_endpoint", ""))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work, so a bad deployment stops
        at startup with one line instead of failing later (or half working)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                _check_number(f.name, value)
        for name in ("listen", "files_listen", "metrics_listen"):
            if name in _EMPTY_MEANS_OFF and not getattr(self, name):
                continue
            try:
                parse_listen(getattr(self, name))
            except ValueError as exc:
                raise _error(name, getattr(self, name), str(exc).split(" ", 1)[1]) from None
        if self.storage not in ("local", "gcs"):
            raise _error("storage", self.storage, "must be 'local' or 'gcs'")
        if self.storage == "gcs" and not self.gcs_bucket:
            raise _error("gcs_bucket", "", f"must be set when {PREFIX}STORAGE=gcs")
        _check_http_url("files_public_url", self.files_public_url)
        _check_http_url("otlp_endpoint", self.otlp_endpoint)
        _check_database_url("database_url", self.database_url)
        self._check_export_database()
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise _error("log_level", self.log_level, "must be DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in ("text", "json"):
            raise _error("log_format", self.log_format, "must be 'text' or 'json'")
        _check_data_dir(self.data_dir)
        if 0 < len(self.page_token_key) < MIN_KEY_CHARS:
            raise _error("page_token_key", "<hidden>", f"must be at least {MIN_KEY_CHARS} characters "
                         "(e.g. openssl rand -base64 32)")
        for name in ("jwt_jwks_file", "gcs_credentials_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            _check_readable(name, getattr(self, name))
        self._check_tls()

    def _check_export_database(self) -> None:
        if not self.export_database_url:
            return
        _check_database_url("export_database_url", self.export_database_url)
        if not self.export_database_url.startswith("postgresql") or not self.database_url.startswith("postgresql"):
            raise _error("export_database_url", "<hidden>", f"needs PostgreSQL: a hot standby of {PREFIX}DATABASE_URL")
        if self.export_database_wait_seconds >= self.stall_seconds:
            raise _error("export_database_wait_seconds", self.export_database_wait_seconds,
                         f"must be less than {PREFIX}STALL_SECONDS ({self.stall_seconds:g}): a read waiting for "
                         "the standby does not move")

    def _check_tls(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            set_, unset = ("tls_cert_file", "tls_key_file") if self.tls_cert_file else ("tls_key_file", "tls_cert_file")
            raise _error(unset, "", f"must be set with {PREFIX}{set_.upper()} (TLS needs a certificate and its key)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise _error("tls_cert_file", "", f"must be set with {PREFIX}TLS_CLIENT_CA_FILE (mutual TLS is TLS)")
        if self.tls_client_ca_file:
            _load_pem("tls_client_ca_file", self.tls_client_ca_file, x509.load_pem_x509_certificates)
        if self.tls_cert_file:
            certificate = _load_pem("tls_cert_file", self.tls_cert_file, x509.load_pem_x509_certificates)[0]
            key = _load_pem("tls_key_file", self.tls_key_file, lambda data: load_pem_private_key(data, None))
            if _public_der(key.public_key()) != _public_der(certificate.public_key()):
                raise _error("tls_key_file", self.tls_key_file, f"is not the key of {PREFIX}TLS_CERT_FILE")


# Settings where an empty value is a choice (off), not "use the default".
_EMPTY_MEANS_OFF = frozenset({"metrics_listen"})

# Numbers that must be above zero, and numbers with a range; every other number must be >= 0.
_POSITIVE = frozenset({
    "url_ttl_seconds", "db_busy_timeout_seconds", "db_statement_timeout_seconds", "db_pool_timeout_seconds",
    "api_read_threads", "api_write_threads", "health_interval_seconds", "poll_interval_seconds", "lease_seconds",
    "stall_seconds",
    "job_ttl_seconds", "job_timeout_seconds", "reaper_interval_seconds", "job_attempts", "slice_users",
    "orphan_sweep_interval_seconds", "max_active_jobs_per_tenant", "change_retention_seconds",
    "jwt_jwks_cache_seconds", "max_request_bytes",
    "files_head_timeout_seconds", "files_write_timeout_seconds", "files_max_connections",
})
_RANGES: dict[str, tuple[int, int]] = {
    "gzip_level": (1, 9),
    "url_ttl_seconds": (1, 7 * 24 * 3600),  # V4 signed URLs live at most 7 days
}


def _check_number(name: str, value: float) -> None:
    low, high = _RANGES.get(name, (0, None))
    if not math.isfinite(value):
        raise _error(name, value, "must be a finite number")
    if name in _POSITIVE and value <= 0:
        raise _error(name, value, "must be greater than 0")
    if value < low or (high is not None and value > high):
        raise _error(name, value, f"must be {low}..{high}" if high is not None else f"must be at least {low}")


def _otlp_endpoint(environ: Mapping[str, str], own: str) -> str:
    """Ours, else the standard OpenTelemetry variables' endpoint; none at all when OTEL_SDK_DISABLED=true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return own or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def _check_http_url(name: str, url: str) -> None:
    if not url:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _error(name, url, "must be an http:// or https:// URL")


def _check_database_url(name: str, url: str) -> None:
    if not url:
        return
    try:
        backend = make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        raise _error(name, "<hidden>", "is not a database URL (postgresql://user@host:5432/db)") from None
    if backend not in ("sqlite", "postgresql"):
        raise _error(name, f"{backend}://...", "must be a postgresql:// or sqlite:/// URL")


def _check_data_dir(path: pathlib.Path) -> None:
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise _error("data_dir", path, f"cannot be used: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _error("data_dir", path, f"cannot be used: {existing} is not writable by this user")


def _load_pem(name: str, path: str, load: Callable[[bytes], _Loaded]) -> _Loaded:
    """Parse a PEM file now, so a wrong one stops startup instead of failing every handshake."""
    try:
        return load(pathlib.Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise _error(name, path, f"is not a usable PEM file: {_first_sentence(exc)}") from None


def _first_sentence(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def _check_readable(name: str, path: str) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _error(name, path, f"cannot be read: {exc.strerror or exc}") from None


def _error(name: str, value: Any, problem: str) -> ConfigError:
    shown = f"={value}" if value != "" else ""
    return ConfigError(f"{PREFIX}{name.upper()}{shown} {problem}")


def _convert(type_name: Any, raw: str, name: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if "Path" in kind:
            return pathlib.Path(raw)
    except ValueError:
        raise _error(name, raw, f"is not {'an integer' if kind == 'int' else 'a number'}") from None
    return raw
