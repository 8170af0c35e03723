"""job change notifications from a trigger: NOTIFY is part of the transaction that changes the job, so
no committed change can go unannounced (a replica that dies after COMMIT, or cannot get a second
connection to notify on, used to leave the other replicas' watchers waiting)

PostgreSQL only: SQLite serves one process, whose bus hears every change in process. The payload is
`<origin>:<job id>:<version>:<status>`; the origin is the writing process's `userexport.origin`
setting (empty for any other client), so a replica can skip its own echoes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION userexport_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.version IS DISTINCT FROM OLD.version THEN
        PERFORM pg_notify('userexport_jobs', concat_ws(':', coalesce(current_setting('userexport.origin', true), ''),
                                                      NEW.id, NEW.version, NEW.status));
    END IF;
    RETURN NULL;
END
$$
"""
TRIGGER = """
CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE ON jobs
FOR EACH ROW EXECUTE FUNCTION userexport_job_changed()
"""


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_changed ON jobs")
    op.execute("DROP FUNCTION IF EXISTS userexport_job_changed()")
