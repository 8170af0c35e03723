"""A transaction in flight at a watermark (PostgreSQL): it began writing before the export took its
watermark and commits after the export completed. A sequence number taken at write time would put
its changes before the watermark, and the next increment would miss them; the snapshot watermark
puts them in the next increment."""
from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from tests.harness import ServerHandle
from tests.integration.support import Caller
from tests.integration.test_incremental import by_user, export, ndjson_lines
from userexport.v1 import users_export_pb2 as pb

FIELDS = [("user_id", ""), ("nickname", "")]


def test_a_transaction_open_across_the_watermark_is_in_the_next_increment(
        server: ServerHandle, backend: str, tenant: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite has one writer: a transaction held open would stop the job's own writes")
    server.seed(30, tenant)
    with server.app.engine.connect() as conn:
        ids = conn.execute(text("SELECT user_id FROM users WHERE tenant = :t ORDER BY user_id"),
                           {"t": tenant}).scalars().all()
    updated, deleted, template = ids[:3], ids[3], ids[4]
    caller = Caller(server, tenant)
    dsn = server.app.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as held:  # another client of the database, writing in one transaction
        held.execute("UPDATE users SET nickname = 'in flight' WHERE tenant = %s AND user_id = ANY(%s)",
                     (tenant, updated))
        held.execute("DELETE FROM users WHERE tenant = %s AND user_id = %s", (tenant, deleted))
        held.execute("INSERT INTO users (tenant, user_id, connection_id, nickname) SELECT tenant, 'zz|new', "
                     "connection_id, 'in flight' FROM users WHERE tenant = %s AND user_id = %s", (tenant, template))
        baseline, data = export(caller, format=pb.ExportRequest.JSON, fields=FIELDS)
        held.commit()  # after the baseline's watermark, and after its file was whole
    before = by_user(ndjson_lines(data))
    assert len(before) == 30 and deleted in before and "zz|new" not in before
    assert all(before[u].get("nickname") != "in flight" for u in updated)

    _, changed = export(caller, format=pb.ExportRequest.JSON, fields=FIELDS, changed_since=baseline.watermark)
    assert ndjson_lines(changed) == [
        *({"_op": "upsert", "user_id": u, "nickname": "in flight"} for u in updated),
        {"_op": "delete", "user_id": deleted},
        {"_op": "upsert", "user_id": "zz|new", "nickname": "in flight"},
    ]
    caller.close()
