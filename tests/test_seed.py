"""The seed command: counts, determinism, connections, adding more, and the console entry."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import psycopg
import pytest
from sqlalchemy import Engine, func, select, text

import userexport_server.seed as seed_module
from tests.databases import fresh_postgres_database
from tests.export.support import engine, new_tenant  # noqa: F401  (engine is a fixture)
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.db.models import Connection, User
from userexport_server.seed import AlreadySeeded, ascii_spelling, main, seed_users


def users_of(engine: Engine, tenant: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(select(User).where(User.tenant == tenant).order_by(User.user_id)).all()
    return [tuple(row)[1:] for row in rows]  # without the tenant


def test_seeds_the_requested_users_over_new_connections(engine: Engine) -> None:
    tenant = new_tenant()
    ids = seed_users(engine, tenant=tenant, users=500, connections=4)
    assert len(ids) == 4 and all(re.fullmatch(r"con_[A-Za-z0-9]{16}", i) for i in ids)
    with engine.connect() as conn:
        names = dict(conn.execute(select(Connection.id, Connection.name).where(Connection.tenant == tenant)).all())
        per_connection = dict(conn.execute(
            select(User.connection_id, func.count()).where(User.tenant == tenant).group_by(User.connection_id)).all())
    assert set(names) == set(ids)
    assert names[ids[0]] == "Username-Password-Authentication" and names[ids[1]] == "google-oauth2"
    assert sum(per_connection.values()) == 500 and set(per_connection) == set(ids)


def test_same_arguments_give_the_same_users() -> None:
    def seeded(seed: int) -> list[tuple[object, ...]]:
        fresh = make_engine("sqlite://")
        upgrade(fresh)
        seed_users(fresh, tenant="acme", users=300, seed=seed)
        return users_of(fresh, "acme")

    assert seeded(7) == seeded(7)
    assert seeded(7) != seeded(8)


def test_a_later_start_index_adds_users_to_the_same_connections(engine: Engine) -> None:
    tenant = new_tenant()
    ids = seed_users(engine, tenant=tenant, users=200)
    assert seed_users(engine, tenant=tenant, users=300, start_index=200) == ids
    assert len(users_of(engine, tenant)) == 500


def test_the_same_range_twice_adds_nothing(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=200)
    with pytest.raises(AlreadySeeded) as already:
        seed_users(engine, tenant=tenant, users=300)
    assert already.value.held == 200 and len(users_of(engine, tenant)) == 200


def test_users_exercise_quoting_and_the_guard(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=2000)
    with engine.connect() as conn:
        names = conn.execute(select(User.name).where(User.tenant == tenant)).scalars().all()
        missing_email = conn.execute(
            select(func.count()).where(User.tenant == tenant, User.email.is_(None))).scalar_one()
    joined = "".join(n or "" for n in names)
    for needle in (",", '"', "\n", "é"):
        assert needle in joined
    assert any(n and n[0] in "=+-@\t\r" for n in names)
    assert missing_email > 0


def test_console_entry_migrates_then_seeds(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m userexport_server.seed` makes the data folder private (0700), as the server does:
    it holds the database of user data."""
    assert main(["--users", "50", "--tenant", "acme", "--data-dir", str(tmp_path / "data")]) == 0
    assert "seeded 50 users for tenant 'acme'" in capsys.readouterr().out
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    seeded = make_engine(f"sqlite:///{tmp_path / 'data' / 'userexport.db'}")
    assert len(users_of(seeded, "acme")) == 50


def seed_command(data_dir: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userexport_server.main", "--data-dir", str(data_dir), "seed", *args],
                          capture_output=True, text=True, timeout=300)


def test_seeding_many_users_prints_progress_then_a_second_run_adds_nothing(tmp_path: pathlib.Path) -> None:
    first = seed_command(tmp_path, "--users", "200000")
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == ["seeding: 100000 of 200000 users", "seeding: 200000 of 200000 users"]
    assert re.fullmatch(r"seeded 200000 users for tenant 'default' in [\d.]+s over connections (con_\w+(, )?){3}\n",
                        first.stdout), first.stdout
    again = seed_command(tmp_path, "--users", "200000")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout == ("nothing added: tenant 'default' already holds the users of seed 0 from index 0 "
                            "(to add more, pass --start-index 200000)\n")
    more = seed_command(tmp_path, "--users", "10", "--start-index", "200000")
    assert more.returncode == 0 and more.stdout.startswith("seeded 10 users"), more.stderr
    seeded = make_engine(f"sqlite:///{tmp_path / 'userexport.db'}")
    with seeded.connect() as conn:
        assert conn.execute(select(func.count()).select_from(User)).scalar_one() == 200_010
    seeded.dispose()


@pytest.mark.parametrize(("name", "spelling"), [("Łukasz", "lukasz"), ("Søren", "soren"), ("Zoë", "zoe"),
                                                ("Ångström", "angstrom"), ("O'Brien", "obrien"), ("山田", "user")])
def test_names_are_transliterated_into_email_local_parts(name: str, spelling: str) -> None:
    """Accents are dropped, not the letters under them: before, Łukasz gave `ukasz.dubois.1@`."""
    assert ascii_spelling(name) == spelling


def test_every_seeded_email_is_ascii_and_keeps_the_whole_name(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=400)
    with engine.connect() as conn:
        emails = [email for email in conn.execute(select(User.email).where(User.tenant == tenant)).scalars() if email]
    assert emails and all(email.isascii() for email in emails)
    locals_ = {email.split("@")[0].rsplit(".", 1)[0] for email in emails}
    assert any(local.startswith("lukasz.") for local in locals_) and not any(local.startswith("ukasz.")
                                                                              for local in locals_)


# The columnar path (COLUMNAR_FROM users or more), made to take small seeds here, in batches of 1,000.
COLUMNAR_USERS = 4_000
ID_SHAPES = {"auth0": r"auth0\|[0-9a-f]{24}", "google-oauth2": r"google-oauth2\|1\d{20}", "github": r"github\|1\d{20}"}


@pytest.fixture
def columnar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seed_module, "COLUMNAR_FROM", 1)
    monkeypatch.setattr(seed_module, "PROGRESS_EVERY", 1_000)


def user_number(user_id: str) -> int:
    """The number a seeded id carries: 8 hex digits after auth0|, 10 decimal ones after the 1 of the others."""
    provider, ident = user_id.split("|")
    return int(ident[:8], 16) if provider == "auth0" else int(ident[1:11])


def shape(value: object) -> object:
    """A JSON value's keys (in order), item shapes and leaf types, without the values."""
    if isinstance(value, dict):
        return tuple((key, shape(item)) for key, item in value.items())
    if isinstance(value, list):
        return ("list", frozenset(shape(item) for item in value))
    return type(value).__name__


def profile(users: list[tuple[object, ...]]) -> dict[str, object]:
    """What kinds of users a seed made: each column's share of NULLs and the shapes of its values;
    the ids' shapes; how many tricky names."""
    columns = [c.name for c in User.__table__.columns][1:]
    summary: dict[str, object] = {}
    for at, name in enumerate(columns):
        present = [u[at] for u in users if u[at] is not None]
        summary[f"{name} null share"] = 1 - len(present) / len(users)
        summary[f"{name} shapes"] = {shape(v) for v in present}
    summary["id shapes"] = {next((p for p, pattern in ID_SHAPES.items() if re.fullmatch(pattern, str(u[0]))), str(u[0]))
                            for u in users}
    summary["tricky names"] = sum(1 for u in users if str(u[7]) in seed_module._TRICKY)
    return summary


def test_columnar_users_are_the_same_kinds_as_the_row_generators(engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same columns, types, JSON shapes, id shapes, NULL shares (within 0.04: 5 standard errors
    at 4,000 users) and tricky names (every 40th user) from either generator."""
    by_rows, by_columns = new_tenant(), new_tenant()
    seed_users(engine, tenant=by_rows, users=COLUMNAR_USERS)
    monkeypatch.setattr(seed_module, "COLUMNAR_FROM", 1)
    seed_users(engine, tenant=by_columns, users=COLUMNAR_USERS)
    rows, columns = users_of(engine, by_rows), users_of(engine, by_columns)
    assert len(columns) == COLUMNAR_USERS
    mine, theirs = profile(columns), profile(rows)
    shares = [key for key in theirs if key.endswith("null share")]
    assert {k: v for k, v in mine.items() if k not in shares} == {k: v for k, v in theirs.items() if k not in shares}
    far = [(k, mine[k], theirs[k]) for k in shares if abs(float(str(mine[k])) - float(str(theirs[k]))) > 0.04]
    assert not far
    assert mine["tricky names"] == COLUMNAR_USERS // 40


def test_columnar_ids_are_unique_numbered_and_ordered_with_the_numbers(engine: Engine, columnar: None) -> None:
    """Every user number from start_index once; within a provider, ids sort as their numbers do (so
    a later range sorts after an earlier one); emails carry the same number."""
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=COLUMNAR_USERS)
    seed_users(engine, tenant=tenant, users=1_500, start_index=COLUMNAR_USERS)
    users = users_of(engine, tenant)
    numbers = [user_number(str(u[0])) for u in users]
    assert sorted(numbers) == list(range(COLUMNAR_USERS + 1_500))
    for provider in ID_SHAPES:
        ordered = [n for u, n in zip(users, numbers, strict=True) if str(u[0]).startswith(provider + "|")]
        assert ordered and ordered == sorted(ordered), provider
    for (user_id, _, email, *_), number in zip(users, numbers, strict=True):
        assert email is None or re.fullmatch(rf"[a-z]+\.[a-z]+\.{number}@[a-z.]+", str(email)), (user_id, email)


def test_columnar_seeds_repeat_and_a_seeded_range_adds_nothing(columnar: None) -> None:
    def seeded(seed: int) -> list[tuple[object, ...]]:
        fresh = make_engine("sqlite://")
        upgrade(fresh)
        seed_users(fresh, tenant="acme", users=2_500, seed=seed)
        with pytest.raises(AlreadySeeded):
            seed_users(fresh, tenant="acme", users=2_500, seed=seed)
        return users_of(fresh, "acme")

    assert seeded(7) == seeded(7)
    assert seeded(7) != seeded(8)


def test_columnar_progress_comes_after_each_full_batch(engine: Engine, columnar: None) -> None:
    done: list[int] = []
    seed_users(engine, tenant=new_tenant(), users=3_500, progress=done.append)
    assert done == [1_000, 2_000, 3_000]


def test_a_columnar_seed_into_an_empty_postgresql_table_keeps_its_indexes_and_keys(columnar: None) -> None:
    """The first large seed of a PostgreSQL database drops the users' secondary indexes and foreign
    key for the COPY and makes them again: the same definitions after, the rows all there and valid."""
    try:
        database = fresh_postgres_database()
        url = database.__enter__()
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is unreachable: {error}")
    try:
        fresh = make_engine(url)
        upgrade(fresh)

        def definitions() -> list[str]:
            with fresh.connect() as conn:
                return sorted(conn.execute(text(
                    "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'users'::regclass"
                    " UNION ALL SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'users'::regclass"
                )).scalars())

        before = definitions()
        assert len(before) >= 6  # the key, four indexes, the foreign key
        seed_users(fresh, tenant="first", users=COLUMNAR_USERS)
        assert definitions() == before
        seed_users(fresh, tenant="second", users=1_200)  # the table holds users now: loaded as it is
        with fresh.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(text("SELECT tenant, count(*) FROM users GROUP BY tenant")).all())
            stale = conn.execute(text("SELECT count(*) FROM pg_index WHERE indrelid = 'users'::regclass"
                                      " AND NOT (indisvalid AND indisready)")).scalar_one()
        assert counts == {"first": COLUMNAR_USERS, "second": 1_200} and stale == 0
        assert len(users_of(fresh, "first")) == COLUMNAR_USERS
        fresh.dispose()
    finally:
        database.__exit__(None, None, None)
