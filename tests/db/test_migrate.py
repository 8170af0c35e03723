"""The migrations build exactly the schema the models declare, on both databases: a column added to a
model without its migration (or the other way round) fails here rather than on a deployed database."""
from __future__ import annotations

import pathlib

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.databases import database_settings
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.db.models import Base


def test_the_migrated_schema_is_the_models(backend: str, tmp_path: pathlib.Path) -> None:
    with database_settings(backend) as settings:
        engine = make_engine(settings.get("database_url") or f"sqlite:///{tmp_path / 'schema.db'}")
        try:
            upgrade(engine)
            with engine.connect() as conn:
                differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        finally:
            engine.dispose()
    assert differences == []
