"""Change a tenant's users at random: updates, deletes and inserts, for demos, tests and benchmarks
of incremental exports (every change lands in the change log through the database's triggers, as
any writer's would).

    userexport-server churn --updates 1000 --deletes 100 --inserts 100 [--tenant T]

An update bumps logins_count, sets last_login and updated_at to now and picks a new nickname; one in
ten also moves the user to another of the tenant's connections (an export of the old connection
then sees a delete). Inserts are new seeded users (seed.py) of the tenant's connections.
"""
from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass

from sqlalchemy import DateTime, Engine, bindparam, text

from userexport_server.db.engine import make_engine, write_transaction
from userexport_server.db.migrate import upgrade
from userexport_server.seed import AlreadySeeded, seed_users
from userexport_server.settings import Settings

MOVED_SHARE = 0.1  # of the updated users, those moved to another connection
_NICKNAMES = ("ace", "blue", "comet", "dune", "echo", "fern", "gale", "halo", "iris", "jade")
# Inserted users are numbered from a random start this high, far above any seeded tenant's count.
_FIRST_INDEX, _LAST_INDEX = 2**31, 2**32

_UPDATE = text(
    "UPDATE users SET logins_count = coalesce(logins_count, 0) + 1, last_login = :now, updated_at = :now, "
    "nickname = :nickname, connection_id = coalesce(:moved_to, connection_id) "
    "WHERE tenant = :tenant AND user_id = :user_id").bindparams(bindparam("now", type_=DateTime(timezone=True)))


@dataclass(frozen=True, slots=True)
class Churned:
    """What churn did: the ids of the users it updated and deleted, and how many it inserted."""

    updated: tuple[str, ...]
    deleted: tuple[str, ...]
    inserted: int


def churn(engine: Engine, *, tenant: str, updates: int = 0, deletes: int = 0, inserts: int = 0,
          rng: random.Random | None = None) -> Churned:
    """Update and delete distinct random users of `tenant` (as many as it has, at most), in one
    transaction, then insert `inserts` new ones in another."""
    rng = rng or random.Random()
    with write_transaction(engine) as conn:
        picked = list(conn.execute(text("SELECT user_id, connection_id FROM users WHERE tenant = :tenant "
                                        "ORDER BY random() LIMIT :n"), {"tenant": tenant, "n": updates + deletes}))
        connections = list(conn.execute(text("SELECT id FROM connections WHERE tenant = :tenant ORDER BY id"),
                                        {"tenant": tenant}).scalars())
        updated, deleted = picked[:updates], picked[updates:]  # (user_id, connection_id) each
        now = dt.datetime.now(dt.UTC)

        def moved(current: str) -> str | None:
            """Another connection than the user's, for MOVED_SHARE of them (a move to its own would be none)."""
            others = [c for c in connections if c != current]
            return rng.choice(others) if others and rng.random() < MOVED_SHARE else None

        if updated:
            conn.execute(_UPDATE, [{"tenant": tenant, "user_id": user_id, "now": now, "moved_to": moved(current),
                                    "nickname": rng.choice(_NICKNAMES)} for user_id, current in updated])
        if deleted:
            conn.execute(text("DELETE FROM users WHERE tenant = :tenant AND user_id = :user_id"),
                         [{"tenant": tenant, "user_id": user_id} for user_id, _ in deleted])
    if inserts:
        _insert(engine, tenant, inserts, max(1, len(connections)), rng)
    return Churned(tuple(u for u, _ in updated), tuple(u for u, _ in deleted), inserts)


def _insert(engine: Engine, tenant: str, count: int, connections: int, rng: random.Random) -> None:
    """`count` new seeded users, numbered from a random start (another when that one was taken)."""
    while True:
        try:
            seed_users(engine, tenant=tenant, users=count, connections=connections,
                       start_index=rng.randrange(_FIRST_INDEX, _LAST_INDEX - count))
            return
        except AlreadySeeded:
            continue


def churn_database(settings: Settings, *, tenant: str, updates: int, deletes: int, inserts: int) -> str:
    """What `userexport-server churn` does: migrate, churn, and return the line to print."""
    engine = make_engine(settings.sqlalchemy_url, settings.db_timeouts)
    try:
        upgrade(engine)
        started = time.perf_counter()
        done = churn(engine, tenant=tenant, updates=updates, deletes=deletes, inserts=inserts)
    finally:
        engine.dispose()
    return (f"churned tenant {tenant!r}: {len(done.updated)} updated, {len(done.deleted)} deleted, "
            f"{done.inserted} inserted in {time.perf_counter() - started:.1f}s")
