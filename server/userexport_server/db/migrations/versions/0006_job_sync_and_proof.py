"""job changed_since, filter, watermark, sha256, status_details: what an incremental or filtered
export asked for, the watermark a completed export hands out, and the digest that proves its file

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = ("changed_since", "filter", "watermark", "sha256", "status_details")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changed_since", sa.Text, nullable=True))
        batch_op.add_column(sa.Column("filter", sa.Text, nullable=True))
        batch_op.add_column(sa.Column("watermark", sa.Text, nullable=True))
        batch_op.add_column(sa.Column("sha256", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("status_details", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for name in reversed(_COLUMNS):
            batch_op.drop_column(name)
