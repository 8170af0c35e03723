"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('connections',
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('id', sa.String(length=20), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('tenant', 'id')
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=20), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=8), nullable=False),
    sa.Column('connection_id', sa.String(length=20), nullable=True),
    sa.Column('connection_name', sa.String(length=128), nullable=True),
    sa.Column('limit', sa.BigInteger(), nullable=True),
    sa.Column('fields', sa.JSON(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('users_total', sa.BigInteger(), nullable=False),
    sa.Column('users_written', sa.BigInteger(), nullable=False),
    sa.Column('percentage_done', sa.Integer(), nullable=False),
    sa.Column('time_left_seconds', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('storage_key', sa.String(length=512), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_status_created', ['status', 'created_at'], unique=False)
        batch_op.create_index('ix_jobs_tenant_created', ['tenant', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_tenant_request', ['tenant', 'request_id'], unique=True)

    op.create_table('users',
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'),
              nullable=False),
    sa.Column('connection_id', sa.String(length=20), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('email_verified', sa.Boolean(), nullable=True),
    sa.Column('username', sa.String(length=128), nullable=True),
    sa.Column('phone_number', sa.String(length=32), nullable=True),
    sa.Column('phone_verified', sa.Boolean(), nullable=True),
    sa.Column('name', sa.Text(), nullable=True),
    sa.Column('given_name', sa.Text(), nullable=True),
    sa.Column('family_name', sa.Text(), nullable=True),
    sa.Column('nickname', sa.Text(), nullable=True),
    sa.Column('picture', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_login', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_ip', sa.String(length=64), nullable=True),
    sa.Column('last_password_reset', sa.DateTime(timezone=True), nullable=True),
    sa.Column('logins_count', sa.Integer(), nullable=True),
    sa.Column('blocked', sa.Boolean(), nullable=True),
    sa.Column('multifactor', sa.JSON(), nullable=True),
    sa.Column('identities', sa.JSON(), nullable=True),
    sa.Column('app_metadata', sa.JSON(), nullable=True),
    sa.Column('user_metadata', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['tenant', 'connection_id'], ['connections.tenant', 'connections.id'], ),
    sa.PrimaryKeyConstraint('tenant', 'user_id')
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index('ix_users_tenant_connection_user', ['tenant', 'connection_id', 'user_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index('ix_users_tenant_connection_user')

    op.drop_table('users')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_request')
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.drop_index('ix_jobs_status_created')

    op.drop_table('jobs')
    op.drop_table('connections')
