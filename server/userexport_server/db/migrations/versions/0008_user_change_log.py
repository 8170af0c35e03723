"""users change log: triggers record every INSERT, UPDATE and DELETE of users (a DELETE leaves a
tombstone), whoever the writer is, so an export can hold only the users changed after a watermark

The database writes the log itself, in the writing transaction, so no client of the database can
change a user unrecorded (short of disabling triggers, which takes a superuser or the table's owner).

PostgreSQL: statement-level triggers with transition tables, one INSERT into the log per statement
(a COPY of a million users is one), and a TRUNCATE leaves a tombstone for every user. Each row's
`txn` is the writing transaction's id (pg_current_xact_id), which a watermark compares with its
snapshot: a transaction still in flight at the watermark is not visible in it, so its changes
belong to the next increment, however long it stays open.

SQLite: row triggers; `txn` comes from a counter (user_change_clock.last) bumped by each change.
SQLite has one writer at a time and a transaction sees only what committed before it began, so a
counter is commit order.

An UPDATE records the user under its old and its new key and connection (a user moved to another
connection changed in both). `changed_at` is seconds since the epoch on the database's clock.

user_change_clock holds SQLite's counter and the pruning horizon, user_change_marks the reaper's
samples of which changes were committed when (export/changes.py says how pruning uses them).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_LOGGED = "INSERT INTO user_changes (txn, tenant, user_id, connection_id, op, changed_at)"

POSTGRES_FUNCTION = f"""
CREATE OR REPLACE FUNCTION userexport_users_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    writer bigint := pg_current_xact_id()::text::bigint;
    stamp double precision := extract(epoch FROM clock_timestamp());
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_LOGGED} SELECT writer, tenant, user_id, connection_id, 'I', stamp FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        {_LOGGED} SELECT writer, tenant, user_id, connection_id, 'U', stamp
            FROM (SELECT tenant, user_id, connection_id FROM old_rows
                  UNION SELECT tenant, user_id, connection_id FROM new_rows) AS touched;
    ELSIF TG_OP = 'DELETE' THEN
        {_LOGGED} SELECT writer, tenant, user_id, connection_id, 'D', stamp FROM old_rows;
    ELSE  -- TRUNCATE: every user goes
        {_LOGGED} SELECT writer, tenant, user_id, connection_id, 'D', stamp FROM users;
    END IF;
    RETURN NULL;
END
$$
"""
POSTGRES_TRIGGERS = {
    "users_inserted": "AFTER INSERT ON users REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
    "users_updated": "AFTER UPDATE ON users REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT",
    "users_deleted": "AFTER DELETE ON users REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
    "users_truncated": "BEFORE TRUNCATE ON users FOR EACH STATEMENT",
}

_SQLITE_TICK = "UPDATE user_change_clock SET last = last + 1 WHERE id = 1;"
_SQLITE_NOW = "(julianday('now') - 2440587.5) * 86400.0"


def _sqlite_logged(row: str, op_code: str, condition: str = "") -> str:
    return (f"{_LOGGED} SELECT last, {row}.tenant, {row}.user_id, {row}.connection_id, '{op_code}', {_SQLITE_NOW} "
            f"FROM user_change_clock WHERE id = 1{condition};")


SQLITE_TRIGGERS = {
    "users_inserted": ("AFTER INSERT ON users", _SQLITE_TICK + _sqlite_logged("NEW", "I")),
    "users_updated": ("AFTER UPDATE ON users", _SQLITE_TICK + _sqlite_logged("OLD", "U") + _sqlite_logged(
        "NEW", "U", " AND (NEW.tenant IS NOT OLD.tenant OR NEW.user_id IS NOT OLD.user_id"
                    " OR NEW.connection_id IS NOT OLD.connection_id)")),
    "users_deleted": ("AFTER DELETE ON users", _SQLITE_TICK + _sqlite_logged("OLD", "D")),
}


def upgrade() -> None:
    op.create_table(
        "user_changes",
        sa.Column("txn", sa.BigInteger, nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql"),
                  nullable=False),
        sa.Column("connection_id", sa.String(20), nullable=True),
        sa.Column("op", sa.String(1), nullable=False),
        sa.Column("changed_at", sa.Double, nullable=False),
    )
    op.create_index("ix_user_changes_tenant_txn", "user_changes", ["tenant", "txn"])
    op.create_index("ix_user_changes_changed_at", "user_changes", ["changed_at"])
    clock = op.create_table(
        "user_change_clock",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last", sa.BigInteger, nullable=False),
        sa.Column("pruned_mark", sa.Double, nullable=False),
    )
    op.bulk_insert(clock, [{"id": 1, "last": 0, "pruned_mark": 0.0}])
    op.create_table(
        "user_change_marks",
        sa.Column("taken_at", sa.Double, nullable=False),
        sa.Column("watermark", sa.Text, nullable=False),
    )
    op.create_index("ix_user_change_marks_taken_at", "user_change_marks", ["taken_at"])
    if op.get_context().dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        for name, when in POSTGRES_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION userexport_users_changed()")
    else:
        for name, (when, body) in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} BEGIN {body} END")


def downgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    for name in (POSTGRES_TRIGGERS if postgres else SQLITE_TRIGGERS):
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON users" if postgres else ""))
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS userexport_users_changed()")
    op.drop_index("ix_user_change_marks_taken_at", table_name="user_change_marks")
    op.drop_table("user_change_marks")
    op.drop_table("user_change_clock")
    op.drop_index("ix_user_changes_changed_at", table_name="user_changes")
    op.drop_index("ix_user_changes_tenant_txn", table_name="user_changes")
    op.drop_table("user_changes")
