"""Alembic environment: runs on the connection that migrate.upgrade() hands over."""
from __future__ import annotations

from alembic import context

from userexport_server.db.engine import make_engine
from userexport_server.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic revision --autogenerate` from the command line
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///data/userexport.db")
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
