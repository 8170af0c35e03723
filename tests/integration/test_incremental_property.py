"""The incremental contract as a property (hypothesis), on two replicas sharing PostgreSQL: random
inserts, updates, deletes and re-inserts run in transactions (some held open across watermarks)
while a baseline and increments export on either replica, each slice on whichever worker takes it.
Then the baseline folded with every increment by `_op` equals the table at the end, whole lines by
user_id: no user missing, none resurrected; and replaying a watermark gives the same lines."""
from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from tests.databases import BACKENDS, fresh_postgres_database
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller
from tests.integration.test_incremental import by_user, export, fold, ndjson_lines
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.models import User

COPIED = [c.name for c in User.__table__.columns if c.name not in ("tenant", "user_id")]
# One transaction of the writer: updates, deletes, inserts, re-inserts of deleted ids, and how long
# it stays open after its writes (across a watermark, when an export plans meanwhile).
ROUND = st.tuples(st.integers(0, 4), st.integers(0, 2), st.integers(0, 2), st.integers(0, 1),
                  st.sampled_from([0.0, 0.0, 0.05, 0.3]))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, ServerHandle]]:
    if "postgresql" not in BACKENDS:
        pytest.skip("replicas share PostgreSQL")
    with fresh_postgres_database() as url:
        # One data folder: the storage both replicas write parts to, and the secrets they share (the
        # page-token key too: a watermark sealed by one opens on the other).
        shared = tmp_path_factory.mktemp("replicas")
        first = ServerHandle(shared, database_url=url, slice_users=25)
        second = ServerHandle(shared, database_url=url, slice_users=25)
        yield first, second
        second.stop()
        first.stop()


class Writer(threading.Thread):
    """Applies the rounds, each in its own transaction, as any client of the database would."""

    def __init__(self, engine: Engine, tenant: str, rounds: list[tuple[int, int, int, int, float]], seed: int) -> None:
        super().__init__(name="churn-writer", daemon=True)
        self.engine, self.tenant, self.rounds, self.rng = engine, tenant, rounds, random.Random(seed)
        self.gone: set[str] = set()  # deleted and not inserted again
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for updates, deletes, inserts, reinserts, hold in self.rounds:
                with self.engine.begin() as conn:
                    self._round(conn, updates, deletes, inserts, reinserts)
                    time.sleep(hold)
                time.sleep(self.rng.random() * 0.05)
        except BaseException as error:  # the test reports it
            self.error = error

    def _round(self, conn: Any, updates: int, deletes: int, inserts: int, reinserts: int) -> None:
        t = {"t": self.tenant}
        ids = conn.execute(text("SELECT user_id FROM users WHERE tenant = :t ORDER BY random() LIMIT :n"),
                           {**t, "n": updates + deletes + 1}).scalars().all()
        template, changed, dropped = ids[0], ids[1:1 + updates], ids[1 + updates:]
        connections = conn.execute(text("SELECT id FROM connections WHERE tenant = :t"), t).scalars().all()
        for user_id in changed:
            conn.execute(text("UPDATE users SET nickname = :n, logins_count = coalesce(logins_count, 0) + 1, "
                              "connection_id = :c WHERE tenant = :t AND user_id = :u"),
                         {**t, "u": user_id, "n": uuid.uuid4().hex[:8], "c": self.rng.choice(connections)})
        for user_id in dropped:
            conn.execute(text("DELETE FROM users WHERE tenant = :t AND user_id = :u"), {**t, "u": user_id})
        self.gone.update(dropped)
        back = self.rng.sample(sorted(self.gone - set(dropped)), min(reinserts, len(self.gone - set(dropped))))
        for user_id in [f"new|{uuid.uuid4().hex}" for _ in range(inserts)] + back:
            conn.execute(text(f"INSERT INTO users (tenant, user_id, {', '.join(COPIED)}) SELECT tenant, :u, "
                              f"{', '.join(COPIED)} FROM users WHERE tenant = :t AND user_id = :template"),
                         {**t, "u": user_id, "template": template})
            self.gone.discard(user_id)


# No shrinking: a failing example is reported as drawn (shrinking costs minutes of exports).
@settings(max_examples=5, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rounds=st.lists(ROUND, min_size=4, max_size=14), increments=st.integers(1, 3), seed=st.integers(0, 2**16),
       users=st.integers(40, 120))
def test_a_baseline_folded_with_its_increments_is_the_table(
        replicas: tuple[ServerHandle, ServerHandle],
        rounds: list[tuple[int, int, int, int, float]], increments: int, seed: int, users: int) -> None:
    first, second = replicas
    tenant = new_tenant()
    first.seed(users, tenant)
    callers = [Caller(first, tenant), Caller(second, tenant)]
    writer = Writer(first.app.engine, tenant, rounds, seed)
    baseline, data = export(callers[0], format=pb.ExportRequest.JSON)
    writer.start()
    files, mark = [], baseline.watermark
    for i in range(increments):  # while the writer writes, on either replica in turn
        job, changed = export(callers[(i + 1) % 2], format=pb.ExportRequest.JSON, changed_since=mark)
        files.append(changed)
        mark = job.watermark
    writer.join(60)
    assert writer.error is None, writer.error
    last, changed = export(callers[0], format=pb.ExportRequest.JSON, changed_since=mark)
    files.append(changed)
    table = by_user(ndjson_lines(export(callers[1], format=pb.ExportRequest.JSON)[1]))

    synced = fold(by_user(ndjson_lines(data)), *map(ndjson_lines, files))
    assert synced.keys() == table.keys(), (synced.keys() - table.keys(), table.keys() - synced.keys())
    assert not writer.gone & synced.keys()  # no user resurrected
    assert synced == table
    # Replaying a watermark gives the same lines (nothing changed since the writer stopped).
    assert export(callers[1], format=pb.ExportRequest.JSON, changed_since=mark)[1] == changed
    assert export(callers[0], format=pb.ExportRequest.JSON, changed_since=last.watermark)[1] == b""
    for caller in callers:
        caller.close()
