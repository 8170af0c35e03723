"""`userexport-server churn` and churn(): random updates, deletes and inserts of a tenant's users, on
both databases, each landing in the change log as any writer's change would."""
from __future__ import annotations

import pathlib
import random

import pytest
from sqlalchemy import Engine, text

from tests.export.support import engine, new_tenant  # noqa: F401  (the fixture)
from userexport_server.churn import churn
from userexport_server.main import main
from userexport_server.seed import seed_users


def users(engine: Engine, tenant: str) -> dict[str, tuple[int, str]]:
    with engine.connect() as conn:
        return {r.user_id: (r.logins_count, r.connection_id) for r in conn.execute(text(
            "SELECT user_id, logins_count, connection_id FROM users WHERE tenant = :t"), {"t": tenant})}


def logged(engine: Engine, tenant: str, op: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT user_id FROM user_changes WHERE tenant = :t AND op = :op"),
                                {"t": tenant, "op": op}).scalars())


def test_churn_updates_deletes_and_inserts_distinct_users(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=200, connections=2)
    before = users(engine, tenant)
    seeded = logged(engine, tenant, "I")
    done = churn(engine, tenant=tenant, updates=30, deletes=10, inserts=15, rng=random.Random(7))
    after = users(engine, tenant)
    assert len(set(done.updated)) == 30 and len(set(done.deleted)) == 10 and not set(done.updated) & set(done.deleted)
    assert after.keys() & set(done.deleted) == set() and len(after) == 200 - 10 + 15
    assert all(after[u][0] == (before[u][0] or 0) + 1 for u in done.updated)
    moved = [u for u in done.updated if after[u][1] != before[u][1]]
    assert 0 < len(moved) < 30  # one in ten moves connection (seed 7 moves some)
    new = after.keys() - before.keys()
    assert len(new) == 15 and {c for _, c in after.values()} == {c for _, c in before.values()}
    assert logged(engine, tenant, "U") == set(done.updated)
    assert logged(engine, tenant, "D") == set(done.deleted)
    assert logged(engine, tenant, "I") - seeded == new


def test_churn_takes_at_most_the_users_there_are(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=5)
    done = churn(engine, tenant=tenant, updates=4, deletes=4)
    assert len(done.updated) == 4 and len(done.deleted) == 1 and len(users(engine, tenant)) == 4


def test_the_churn_command(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["seed", "--users", "50", "--tenant", "acme", *data]) == 0
    assert main(["churn", "--updates", "3", "--deletes", "2", "--inserts", "4", "--tenant", "acme", *data]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "churned tenant 'acme': 3 updated, 2 deleted, 4 inserted in ")
    with pytest.raises(SystemExit):
        main(["churn", "--updates", "-1", *data])
