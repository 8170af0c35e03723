"""Alembic migrations, applied on start; the same scripts serve SQLite and PostgreSQL."""
from __future__ import annotations

import pathlib

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from userexport_server.db.engine import prepare_database

MIGRATIONS = pathlib.Path(__file__).resolve().parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent, safe from several replicas at once)."""
    prepare_database(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together would race on CREATE TABLE; a transaction lock serialises them.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7301202611)")
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
