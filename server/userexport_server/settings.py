"""Every knob of the server, read from USEREXPORT_* environment variables, with embedded defaults.

The defaults run the whole service on one machine: SQLite and local files under one data
directory, the gRPC API on 127.0.0.1:50051 and signed downloads on 127.0.0.1:50052.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from userexport_server.db.engine import Timeouts

PREFIX = "USEREXPORT_"


@dataclass(frozen=True)
class Settings:
    # Where the SQLite database, local files and generated secrets live.
    data_dir: pathlib.Path = pathlib.Path("data")
    # gRPC listen address.
    listen: str = "127.0.0.1:50051"
    # SQLAlchemy URL; empty: sqlite file in data_dir.
    database_url: str = ""
    # "local" (files in data_dir served over HTTP) or "gcs".
    storage: str = "local"
    # Local backend: where its download endpoint listens, and the base URL put into signed URLs.
    files_listen: str = "127.0.0.1:50052"
    files_public_url: str = ""
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
    # gzip level of export files (1 fastest .. 9 smallest): 1 keeps a million-user CSV under 10 s on SQLite,
    # files about 18% larger than level 6.
    gzip_level: int = 1
    # How often idle workers look for jobs created by other replicas.
    poll_interval_seconds: float = 1.0
    # A claimed job's lease; the running worker renews it every third of this.
    lease_seconds: float = 30.0
    # Job life cycle.
    job_ttl_seconds: int = 24 * 3600
    job_timeout_seconds: int = 8 * 3600
    expired_retention_seconds: int = 7 * 24 * 3600
    reaper_interval_seconds: float = 30.0
    # Claims a job gets when its runs hit transient database or storage errors; then it fails.
    job_attempts: int = 3
    # The reaper's orphan sweep leaves alone files younger than this (by last modification): a
    # `.tmp-` file this fresh may be another replica's running export. An hour is far more than any
    # export goes without writing a byte.
    orphan_grace_seconds: float = 3600.0
    max_active_jobs_per_tenant: int = 2
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
    # Largest request message accepted, in bytes.
    max_request_bytes: int = 64 * 1024
    # Seconds a SIGTERM waits for running exports before handing them back.
    shutdown_grace_seconds: float = 20.0
    log_level: str = "INFO"

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
            if raw is not None and raw != "":
                values[f.name] = _convert(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _convert(type_name: Any, raw: str, name: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if "Path" in kind:
            return pathlib.Path(raw)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw
