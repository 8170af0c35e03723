"""Filtered exports against a reference: random users with every kind of missing and odd value,
random filters, and for each the users a plain Python reading of the documented semantics keeps,
compared with what the real planning (count, key ranges) and the engine export, on both databases.
Also: the time ranges of a filter are served by their index on PostgreSQL (the plan says so)."""
from __future__ import annotations

import datetime as dt
import gzip
import random
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, event, insert, null, select, text

from tests.export.support import CONNECTION, OTHER_CONNECTION, MemoryWriter, csv_table, new_tenant
from userexport_server.db.models import Connection, User
from userexport_server.export.engine import run_export
from userexport_server.export.filters import (
    Comparison,
    Field,
    Junction,
    Node,
    Not,
    Op,
    Value,
    parse,
    request_predicate,
)
from userexport_server.export.spec import ExportSpec, FieldSpec, Format
from userexport_server.export.sql import count_users, key_ranges, projection
from userexport_server.seed import seed_users

UTC = dt.UTC
USERS = cast(Table, User.__table__)
NAMES = {CONNECTION: "Username-Password-Authentication", OTHER_CONNECTION: "google-oauth2"}
MISSING = object()  # a JSON path the user's metadata lacks

# Few distinct values, so that comparisons hit equal values as often as lesser and greater ones.
TIMES = [dt.datetime(2020, 1, 1, tzinfo=UTC), dt.datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
         dt.datetime(2021, 6, 30, 12, 30, 15, 250000, tzinfo=UTC), dt.datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
         dt.datetime(999, 12, 31, 23, 0, tzinfo=UTC)]
COUNTS = [0, 1, 7, -3, 2**31 - 1]
EMAILS = ["a@x.io", "B@x.io", "b@x.io", "é@x.io", "", "a@x.io ", "Z", "日本@x.jp", 'q"uote*\\@x']
JSON_VALUES: list[Any] = ["pro", "Pro", "", "3", "true", "x*y", 3, 3.0, -1, 0, 2.5, 1e300, 2**53 + 1, True, False,
                         None, {"deep": "pro"}, ["pro"]]
KEYS = ["plan", "tier", "a-b"]


def random_metadata(rng: random.Random) -> Any:
    """SQL NULL, JSON null, or an object with some of KEYS (one level of nesting under `n`)."""
    roll = rng.random()
    if roll < 0.15:
        return null()
    if roll < 0.25:
        return None  # stored as JSON null by the JSON type
    meta = {key: rng.choice(JSON_VALUES) for key in KEYS if rng.random() < 0.6}
    if rng.random() < 0.5:
        meta["n"] = {key: rng.choice(JSON_VALUES) for key in KEYS if rng.random() < 0.6}
    return meta


def maybe(rng: random.Random, values: list[Any]) -> Any:
    return None if rng.random() < 0.2 else rng.choice(values)


def random_user(rng: random.Random, index: int) -> dict[str, Any]:
    return {
        "user_id": f"auth0|{rng.choice('0AZaz')}{index:04d}",
        "connection_id": rng.choice([CONNECTION, OTHER_CONNECTION]),
        "email": maybe(rng, EMAILS),
        "email_verified": maybe(rng, [True, False]),
        "phone_verified": maybe(rng, [True, False]),
        "blocked": maybe(rng, [True, False]),
        "created_at": maybe(rng, TIMES),
        "updated_at": maybe(rng, TIMES),
        "last_login": maybe(rng, TIMES),
        "logins_count": maybe(rng, COUNTS),
        "app_metadata": random_metadata(rng),
        "user_metadata": random_metadata(rng),
    }


def random_users() -> list[dict[str, Any]]:
    rng = random.Random(20)
    return [random_user(rng, i) for i in range(300)]


@pytest.fixture(scope="module")
def population(engine: Engine) -> tuple[str, list[dict[str, Any]]]:
    """300 random users of a tenant of their own, each with a connection of the tenant."""
    tenant, users = new_tenant(), random_users()
    with engine.begin() as conn:
        conn.execute(insert(Connection), [{"tenant": tenant, "id": cid, "name": name} for cid, name in NAMES.items()])
        conn.execute(insert(User), [{"tenant": tenant, **user} for user in users])
    return tenant, users


# --- the reference: the semantics of docs/api.md, in Python ------------------------------------

def stored(user: dict[str, Any], field: Field) -> Any:
    """The user's value of `field`; None or MISSING: no value."""
    if field.root == "connection":
        return NAMES[user["connection_id"]]
    value = user[field.root]
    if field.path:
        for key in field.path:
            value = value.get(key, MISSING) if isinstance(value, dict) else MISSING
    return value


def holds(node: Node, user: dict[str, Any]) -> bool:
    if isinstance(node, Not):
        return not holds(node.operand, user)
    if isinstance(node, Junction):
        return (all if node.all else any)(holds(operand, user) for operand in node.operands)
    if node.op is Op.NE:
        return not holds(Comparison(node.field, Op.EQ, node.value), user)
    value = stored(user, node.field)
    if node.value is None:
        return value is None or value is MISSING
    if value is None or value is MISSING:
        return False
    if node.field.path:  # JSON equality: same JSON type, same value
        if isinstance(node.value, bool):
            return value is node.value
        if isinstance(node.value, int):
            return isinstance(value, int | float) and not isinstance(value, bool) and value == node.value
        return isinstance(value, str) and value == node.value
    compare: dict[Op, Callable[[Any, Any], bool]] = {
        Op.EQ: lambda a, b: a == b, Op.LT: lambda a, b: a < b, Op.LE: lambda a, b: a <= b,
        Op.GT: lambda a, b: a > b, Op.GE: lambda a, b: a >= b}
    return compare[node.op](value, node.value)


# --- random filters, written out as text -------------------------------------------------------

def random_comparison(rng: random.Random, users: list[dict[str, Any]]) -> Comparison:
    kind = rng.choice(["time", "count", "bool", "text", "connection", "json", "json"])
    ordered = [Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE]
    if kind == "json":
        key = rng.choice(KEYS)
        path = tuple(rng.choice([[key], ["n", key], ["n"], ["plan", "deep"]]))
        scalars = [v for v in JSON_VALUES if isinstance(v, str | bool) or v is None
                   or (isinstance(v, int) and -2**63 <= v < 2**63)]
        return Comparison(Field(rng.choice(["app_metadata", "user_metadata"]), path), rng.choice([Op.EQ, Op.NE]),
                          rng.choice([*scalars, 5, "deep"]))
    if kind == "connection":
        return Comparison(Field("connection"), rng.choice([Op.EQ, Op.NE]), rng.choice([*NAMES.values(), "github"]))
    values: list[Any]
    if kind == "bool":
        field, values, ops = Field(rng.choice(["email_verified", "phone_verified", "blocked"])), [True, False], [
            Op.EQ, Op.NE]
    elif kind == "time":
        field, ops = Field(rng.choice(["created_at", "updated_at", "last_login"])), ordered
        values = [*TIMES, dt.datetime(2022, 1, 1, tzinfo=UTC)]
    elif kind == "count":
        field, values, ops = Field("logins_count"), [*COUNTS, 5, -10, 2**40], ordered
    else:
        field, ops = Field(rng.choice(["email", "user_id"])), ordered
        values = [*EMAILS, "a", "b@", "c"] if field.root == "email" else [u["user_id"] for u in users] + ["auth0|a"]
    value = maybe(rng, values)
    return Comparison(field, rng.choice(ops if value is not None else ordered[:2]), value)


def random_filter(rng: random.Random, users: list[dict[str, Any]], depth: int = 0) -> Node:
    roll = rng.random()
    if depth < 3 and roll < 0.35:
        return Junction(rng.random() < 0.5, tuple(random_filter(rng, users, depth + 1)
                                                  for _ in range(rng.randint(2, 3))))
    if depth < 4 and roll < 0.5:
        return Not(random_filter(rng, users, depth + 1))
    return random_comparison(rng, users)


def written(node: Node, rng: random.Random) -> str:
    """The filter as text, in one of the ways the grammar allows."""
    if isinstance(node, Not):
        return rng.choice(["NOT ", "-", "NOT(", "-("]).replace("(", "") + "(" + written(node.operand, rng) + ")"
    if isinstance(node, Junction):
        joiner = " AND " if node.all else " OR "
        return joiner.join("(" + written(operand, rng) + ")" for operand in node.operands)
    name = ".".join((node.field.root, *node.field.path))
    return f"{name}{rng.choice(['', ' '])}{node.op.value}{rng.choice(['', '  '])}{literal(node.value, rng)}"


def literal(value: Value, rng: random.Random) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.datetime):
        offset = dt.timezone(dt.timedelta(hours=rng.choice([0, 2, -9]), minutes=rng.choice([0, 30])))
        shown = value.astimezone(offset).isoformat()
        return '"' + (shown.replace("+00:00", "Z") if rng.random() < 0.5 else shown) + '"'
    quote = rng.choice(['"', "'"])
    escaped = "".join("\\" + c if c in (quote, "\\", "*") else c for c in value)
    return quote + escaped + quote


# --- the comparison ------------------------------------------------------------------------------

def exported_ids(engine: Engine, tenant: str, spec: ExportSpec, slices: int) -> tuple[int, list[str]]:
    """What planning counts, and the user_ids the export writes cut into about `slices` key ranges,
    slice by slice as the workers do."""
    with engine.connect() as conn:
        total = count_users(conn, tenant, spec)
        ranges = key_ranges(conn, tenant, spec, total, max(1, -(-total // slices)))
        ids: list[str] = []
        for key_range in ranges:
            writer = MemoryWriter()
            run_export(conn, tenant, spec, writer, key_range=key_range)
            rows = csv_table(gzip.decompress(writer.buffer.getvalue()).decode())
            ids.extend(row[0] for row in rows[1 if key_range.after is None else 0:])  # the first has the header
    return total, ids


@pytest.mark.parametrize("seed", range(6))
def test_filtered_exports_match_the_reference(engine: Engine, population: tuple[str, list[dict[str, Any]]],
                                              seed: int) -> None:
    tenant, users = population
    rng = random.Random(seed)
    for _ in range(25):
        node = random_filter(rng, users)
        text_ = written(node, rng)
        assert parse(text_) == node, text_  # the text says what the tree does
        connection_id = rng.choice([None, None, None, CONNECTION])
        limit = rng.choice([None, None, None, 5, 1000])
        spec = ExportSpec(Format.CSV, (FieldSpec("user_id"),), connection_id=connection_id, limit=limit,
                          filter=text_)
        expected = sorted(u["user_id"] for u in users
                          if holds(node, u) and connection_id in (None, u["connection_id"]))[:limit]
        total, ids = exported_ids(engine, tenant, spec, slices=rng.randint(1, 4))
        assert (total, ids) == (len(expected), expected), text_
        with engine.connect() as conn:  # the predicate as other queries use it: SQLAlchemy Core, its own binds
            matched = conn.execute(select(USERS.c.user_id).order_by(USERS.c.user_id).limit(limit).where(
                request_predicate(spec, tenant, USERS, engine.dialect.name))).scalars().all()
        assert matched == expected, text_


def test_the_reference_tells_the_filters_apart() -> None:
    """Random filters keep sometimes none, sometimes all, mostly some of the users: the comparison
    above is no comparison of empty sets."""
    users = random_users()
    rng = random.Random(0)
    kept = [sum(holds(node, u) for u in users) for node in (random_filter(rng, users) for _ in range(200))]
    assert sum(0 < k < len(users) for k in kept) > 120
    assert any(k == 0 for k in kept) and any(k == len(users) for k in kept)


# --- index use -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(engine: Engine) -> str:
    """A tenant of 20,000 seeded users; seeding ANALYZEs the table on PostgreSQL."""
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=20_000)
    return tenant


def plans(engine: Engine, tenant: str, spec: ExportSpec) -> Iterator[str]:
    """EXPLAIN of every statement that planning runs (count, key ranges) and of the export's own."""
    statements: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append((statement, parameters))

    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", keep)
        total = count_users(conn, tenant, spec)
        key_ranges(conn, tenant, spec, total, max(1, total // 3))
        event.remove(conn, "before_cursor_execute", keep)
        assert len(statements) == 2  # the count, and the key ranges in one pass
        compiled = projection(spec, tenant, "postgresql").statement.compile(dialect=conn.dialect)
        statements.append((compiled.string, compiled.construct_params()))
        for statement, parameters in statements:
            yield "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))


@pytest.mark.parametrize("field", ["created_at", "updated_at", "last_login"])
def test_a_time_range_is_read_through_its_index_on_postgresql(engine: Engine, seeded: str, field: str) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's plans")
    with engine.connect() as conn:
        low, high = conn.execute(text(
            f"SELECT percentile_disc(0.90) WITHIN GROUP (ORDER BY {field}), "
            f"percentile_disc(0.95) WITHIN GROUP (ORDER BY {field}) FROM users WHERE tenant = :tenant"),
            {"tenant": seeded}).one()
    ranged = f'{field} >= "{low.isoformat()}" AND {field} < "{high.isoformat()}" AND blocked = false'
    index = f"ix_users_tenant_{field}"
    for plan in plans(engine, seeded, ExportSpec(Format.CSV, (FieldSpec("user_id"),), filter=ranged)):
        assert index in plan, plan
    for plan in plans(engine, seeded, ExportSpec(Format.CSV, (FieldSpec("user_id"),), filter="blocked = false")):
        assert index not in plan, plan  # the assertion above can fail
