"""The tenant's connections, as ListConnections reads them: the rows of the connections table, which
every user row names (its foreign key), so they are the connections the users table knows."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, and_, or_, select

from userexport_server.db.models import Connection as ConnectionRow


@dataclass(frozen=True, slots=True)
class Connection:
    """A connection of a tenant: what ExportRequest.connection_id names, and its name."""

    id: str
    name: str


def list_connections(engine: Engine, tenant: str, *, page_size: int,
                     after: tuple[str, str] | None) -> tuple[list[Connection], bool]:
    """One page of the tenant's connections by (name, id), after the cursor; and whether more follow."""
    query = select(ConnectionRow.id, ConnectionRow.name).where(ConnectionRow.tenant == tenant)
    if after is not None:
        name, connection_id = after
        query = query.where(or_(ConnectionRow.name > name,
                                and_(ConnectionRow.name == name, ConnectionRow.id > connection_id)))
    query = query.order_by(ConnectionRow.name, ConnectionRow.id).limit(page_size + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [Connection(row.id, row.name) for row in rows[:page_size]], len(rows) > page_size
