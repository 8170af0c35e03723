"""The seed command: counts, determinism, connections, adding more, and the console entry."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
from sqlalchemy import Engine, func, select

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
