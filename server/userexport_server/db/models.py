"""SQLAlchemy models: every row carries its tenant, so isolation is a WHERE clause away."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Connection(Base):
    __tablename__ = "connections"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))


# A user_id, compared in byte order on PostgreSQL whatever the database's locale.
_USER_ID = String(255).with_variant(String(255, collation="C"), "postgresql")


class User(Base):
    """The Auth0 user profile; list and object attributes are JSON stored as compact text."""

    __tablename__ = "users"
    __table_args__ = (
        ForeignKeyConstraint(["tenant", "connection_id"], ["connections.tenant", "connections.id"]),
        # Serves a per-connection export in user_id order without a sort.
        Index("ix_users_tenant_connection_user", "tenant", "connection_id", "user_id"),
        # Serve the time ranges of an export's filter (export/filters.py).
        Index("ix_users_tenant_created_at", "tenant", "created_at"),
        Index("ix_users_tenant_updated_at", "tenant", "updated_at"),
        Index("ix_users_tenant_last_login", "tenant", "last_login"),
    )

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Byte order on PostgreSQL whatever the database's locale, so exports order users the same everywhere.
    user_id: Mapped[str] = mapped_column(_USER_ID, primary_key=True)
    connection_id: Mapped[str] = mapped_column(String(20))
    email: Mapped[str | None] = mapped_column(String(320))
    email_verified: Mapped[bool | None] = mapped_column(Boolean)
    username: Mapped[str | None] = mapped_column(String(128))
    phone_number: Mapped[str | None] = mapped_column(String(32))
    phone_verified: Mapped[bool | None] = mapped_column(Boolean)
    name: Mapped[str | None] = mapped_column(Text)
    given_name: Mapped[str | None] = mapped_column(Text)
    family_name: Mapped[str | None] = mapped_column(Text)
    nickname: Mapped[str | None] = mapped_column(Text)
    picture: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_login: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_ip: Mapped[str | None] = mapped_column(String(64))
    last_password_reset: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    logins_count: Mapped[int | None] = mapped_column(Integer)
    blocked: Mapped[bool | None] = mapped_column(Boolean)
    multifactor: Mapped[list[str] | None] = mapped_column(JSON)
    identities: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    app_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Job(Base):
    """One export job; `version` grows by one on every change so watchers can order events."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_tenant_request", "tenant", "request_id", unique=True),
        Index("ix_jobs_tenant_status", "tenant", "status"),
    )

    id: Mapped[str] = mapped_column(String(20), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    format: Mapped[str] = mapped_column(String(8))
    connection_id: Mapped[str | None] = mapped_column(String(20))
    connection_name: Mapped[str | None] = mapped_column(String(128))
    limit: Mapped[int | None] = mapped_column(BigInteger)
    fields: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    request_id: Mapped[str | None] = mapped_column(String(36))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    users_total: Mapped[int] = mapped_column(BigInteger, default=0)
    users_written: Mapped[int] = mapped_column(BigInteger, default=0)
    percentage_done: Mapped[int] = mapped_column(Integer, default=0)
    time_left_seconds: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    storage_key: Mapped[str | None] = mapped_column(String(512))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The export file's size once completed; 0 when there is no file (the retained-bytes quota sums it).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # W3C traceparent of the creation span when tracing is on: the export's spans continue that trace.
    trace_parent: Mapped[str | None] = mapped_column(String(55))
    # The request's changed_since (the sealed watermark as given) and filter; None: full, unfiltered.
    changed_since: Mapped[str | None] = mapped_column(Text)
    filter: Mapped[str | None] = mapped_column(Text)
    # Once completed: the export's watermark (the server's own form; the API seals it) and file digest.
    watermark: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # What the status alone does not say (e.g. users changed while a full export ran).
    status_details: Mapped[str | None] = mapped_column(Text)


class JobSlice(Base):
    """One key range of a job's users, exported as its own gzip member (jobs/slices.py).

    A slice covers user_id in (after, through] (None: open), at most `rows` users; its part file is
    `part_key` once done. Slices carry their own lease, so any worker on any replica takes the next
    one, and a replica's death loses only the slices it was running.
    """

    __tablename__ = "job_slices"
    __table_args__ = (
        Index("ix_job_slices_status", "status"),
        # Serves the claim's "tenant served least recently".
        Index("ix_job_slices_tenant_claimed", "tenant", "claimed_at"),
    )

    job_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    after: Mapped[str | None] = mapped_column(String(255).with_variant(String(255, collation="C"), "postgresql"))
    through: Mapped[str | None] = mapped_column(String(255).with_variant(String(255, collation="C"), "postgresql"))
    rows: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    users_written: Mapped[int] = mapped_column(BigInteger, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    part_key: Mapped[str | None] = mapped_column(String(512))


# The change log of users (migration 0008's triggers write it; export/changes.py reads it): one row
# per user an INSERT, UPDATE or DELETE touched (`op` I, U or D; a D row is the tombstone), at
# `txn`: the writing transaction's id on PostgreSQL (pg_current_xact_id), a counter on SQLite
# (user_change_clock.last). `changed_at` (seconds since the epoch, the database's clock) is what
# pruning goes by. No primary key: a transaction's rows share their txn.
user_changes = Table(
    "user_changes", Base.metadata,
    Column("txn", BigInteger, nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("user_id", _USER_ID, nullable=False),
    Column("connection_id", String(20)),
    Column("op", String(1), nullable=False),
    Column("changed_at", Double, nullable=False),
    # Serves "the changes of tenant T after watermark W": a range of the tenant's entries.
    Index("ix_user_changes_tenant_txn", "tenant", "txn"),
    Index("ix_user_changes_changed_at", "changed_at"),
)

# One row (id 1): on SQLite `last`, the last txn handed out (SQLite has one writer at a time, so a
# counter is commit order); on both, `pruned_mark`, the taken_at of the mark whose visible changes
# pruning deleted last (0: none yet): a watermark taken after it lost nothing.
user_change_clock = Table(
    "user_change_clock", Base.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("last", BigInteger, nullable=False),
    Column("pruned_mark", Double, nullable=False),
)

# Marks the reaper takes as it goes: watermarks (export/changes.py, server form) and when they were
# taken. A change visible to a mark is visible to every watermark taken later, so pruning deletes
# the changes visible to the newest mark older than the retention.
user_change_marks = Table(
    "user_change_marks", Base.metadata,
    Column("taken_at", Double, nullable=False),
    Column("watermark", Text, nullable=False),
    Index("ix_user_change_marks_taken_at", "taken_at"),
)
