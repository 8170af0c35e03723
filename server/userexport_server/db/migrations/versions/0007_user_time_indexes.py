"""users indexes on (tenant, created_at), (tenant, updated_at) and (tenant, last_login): an export
filtered on a time range reads only the users in it, not the whole tenant

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEXES = {f"ix_users_tenant_{column}": column for column in ("created_at", "updated_at", "last_login")}


def upgrade() -> None:
    for name, column in _INDEXES.items():
        op.create_index(name, "users", ["tenant", column])


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="users")
