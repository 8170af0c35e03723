"""Seed a tenant with realistic, deterministic Auth0-like users, fast enough for a million.

Rows are generated as driver-ready values (dates as text, JSON as compact text) and loaded with one
executemany on SQLite or one COPY on PostgreSQL inside a single transaction: ORM objects would take
minutes where this takes seconds. A few users carry commas, quotes, newlines, non-ASCII and leading
= + - @ so exports exercise CSV quoting and the injection guard.

    python -m userexport_server.seed --users 1000000 [--tenant T] [--database-url URL | --data-dir D]
"""
from __future__ import annotations

import argparse
import bisect
import datetime as dt
import itertools
import pathlib
import random
import string
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, text

from userexport.client.arguments import int_at_least
from userexport_server.db.engine import make_engine, unbounded_statements, write_transaction
from userexport_server.db.migrate import upgrade
from userexport_server.private_files import make_private_dirs
from userexport_server.settings import Settings

DEFAULT_TENANT = "default"
PROGRESS_EVERY = 100_000  # users between two progress lines of the seed commands

_COLUMNS = (
    "tenant", "user_id", "connection_id", "email", "email_verified", "username", "phone_number",
    "phone_verified", "name", "given_name", "family_name", "nickname", "picture", "created_at",
    "updated_at", "last_login", "last_ip", "last_password_reset", "logins_count", "blocked",
    "multifactor", "identities", "app_metadata", "user_metadata",
)


@dataclass(frozen=True, slots=True)
class _Kind:
    """A connection flavour: its name, identity provider and how its user ids look."""

    name: str
    provider: str
    social: bool
    id_digits: bool  # numeric provider ids (Google, GitHub) rather than hex (Auth0 database)


_KINDS = (
    _Kind("Username-Password-Authentication", "auth0", False, False),
    _Kind("google-oauth2", "google-oauth2", True, True),
    _Kind("github", "github", True, True),
    _Kind("windowslive", "windowslive", True, False),
    _Kind("linkedin", "linkedin", True, False),
    _Kind("apple", "apple", True, False),
)

_GIVEN = ("Ada", "Alan", "Grace", "Linus", "Zoë", "José", "Renée", "Łukasz", "Søren", "Mia", "Noah",
          "Olivia", "Liam", "Emma", "Hiroshi", "Ana", "Ivan", "Fatima", "Chloé", "Björn")
_FAMILY = ("Lovelace", "Turing", "Hopper", "Torvalds", "Müller", "García", "O'Brien", "Ångström",
           "Kowalski", "Kierkegaard", "Smith", "Jones", "Dubois", "山田", "Petrov", "Haddad", "Nguyen")
# Letters that NFKD leaves whole (no base letter and accent to split): their usual ASCII spelling.
_UNDECOMPOSED = str.maketrans({"Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "Đ": "D", "đ": "d", "ß": "ss", "Æ": "AE",
                               "æ": "ae", "Œ": "OE", "œ": "oe"})


def ascii_spelling(name: str) -> str:
    """An e-mail-safe spelling of a name: accents dropped, not the letters that carry them
    ("Łukasz" -> "lukasz", "Zoë" -> "zoe"); "user" for a name with no Latin letter at all (山田)."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_UNDECOMPOSED))
    return decomposed.encode("ascii", "ignore").decode().replace("'", "").lower() or "user"


# Email-safe spellings of the names above.
_ASCII = {n: ascii_spelling(n) for n in _GIVEN + _FAMILY}
_DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "gmail.example.com")
# Values that must survive CSV quoting and the injection guard.
_TRICKY = ('Smith, "Bobby" Jr.', "Line one\nline two", "=HYPERLINK(\"http://x\")", "+1 (555) 0100",
           "-minus", "@handle", "\ttabbed", "\rreturned", "naïve café 東京", 'a "quoted" word')
_COUNTRIES = ("US", "FR", "DE", "JP", "BR", "IN", "GB", "ES")
_ROLES = ("admin", "editor", "viewer", "billing")
_AVATARS = "https%3A%2F%2Fcdn.auth0.com%2Favatars%2F"
_BASE = dt.datetime(2015, 1, 1)
_SPAN_SECONDS = 10 * 365 * 86400


class _Random(random.Random):
    """random.Random with cheap draws: randrange's checks cost more than the rest of a user."""

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def pick(self, items: Sequence[Any]) -> Any:
        return items[int(self.random() * len(items))]


class AlreadySeeded(Exception):
    """The first user of the requested range is in the tenant already: the range was seeded before."""

    def __init__(self, tenant: str, seed: int, start_index: int, held: int) -> None:
        super().__init__(f"tenant {tenant!r} already holds the users of seed {seed} from index {start_index}")
        self.held = held  # users of the tenant: a --start-index that adds users after them


def seed_users(
    engine: Engine,
    *,
    tenant: str,
    users: int,
    connections: int = 3,
    seed: int = 0,
    start_index: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Add `users` users (numbered from `start_index`) to `tenant`; return its seeded connection ids.

    Deterministic in (tenant, seed, start_index). Connections depend on (tenant, seed) only and are
    created when missing, so a second call with a later start_index adds users to the same ones. A
    range whose first user exists already raises AlreadySeeded and adds nothing, so running the
    same seed twice is harmless. `progress` is called with the count of users generated so far,
    every PROGRESS_EVERY users.
    """
    rng = random.Random(f"connections/{tenant}/{seed}")
    alphabet = string.ascii_letters + string.digits
    conns = [
        ("con_" + "".join(rng.choices(alphabet, k=16)), _connection_name(i), _KINDS[i % len(_KINDS)])
        for i in range(connections)
    ]
    generated = _users(tenant, conns, users, seed, start_index)
    first = next(generated, None)
    rows = _counted(itertools.chain([first] if first is not None else [], generated), progress)
    with write_transaction(engine) as conn:  # SQLite: BEGIN IMMEDIATE, so reading first cannot lose the write lock race
        unbounded_statements(conn)  # one COPY of a million users takes longer than the statement timeout
        if first is not None and conn.execute(
            text("SELECT 1 FROM users WHERE tenant = :t AND user_id = :u"), {"t": tenant, "u": first[1]}
        ).first():
            held = conn.execute(text("SELECT count(*) FROM users WHERE tenant = :t"), {"t": tenant}).scalar_one()
            raise AlreadySeeded(tenant, seed, start_index, held)
        existing = set(
            conn.execute(text("SELECT id FROM connections WHERE tenant = :t"), {"t": tenant}).scalars()
        )
        for cid, name, _ in conns:
            if cid not in existing:
                conn.execute(
                    text("INSERT INTO connections (tenant, id, name) VALUES (:t, :id, :name)"),
                    {"t": tenant, "id": cid, "name": name},
                )
        driver = conn.connection.driver_connection
        if conn.dialect.name == "postgresql":
            # Dates are written as UTC wall-clock text; the session zone makes PostgreSQL read them so.
            conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
            copy_sql = f"COPY users ({', '.join(_COLUMNS)}) FROM STDIN"
            with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row(row)
            conn.exec_driver_sql("ANALYZE users")
        else:
            placeholders = ", ".join("?" * len(_COLUMNS))
            driver.executemany(  # type: ignore[union-attr]
                f"INSERT INTO users ({', '.join(_COLUMNS)}) VALUES ({placeholders})", rows
            )
    return [cid for cid, _, _ in conns]


def _counted(rows: Iterator[tuple[Any, ...]], progress: Callable[[int], None] | None) -> Iterator[tuple[Any, ...]]:
    """The rows, calling `progress` after every PROGRESS_EVERY of them (a million take a while)."""
    for count, row in enumerate(rows, 1):
        yield row
        if progress is not None and count % PROGRESS_EVERY == 0:
            progress(count)


def _connection_name(i: int) -> str:
    kind = _KINDS[i % len(_KINDS)]
    return kind.name if i < len(_KINDS) else f"{kind.name}-{i // len(_KINDS) + 1}"


def _users(
    tenant: str, conns: Sequence[tuple[str, str, _Kind]], count: int, seed: int, start: int
) -> Iterator[tuple[Any, ...]]:
    """Rows in _COLUMNS order; most users sit on the first (database) connection, like real tenants."""
    rng = _Random(f"users/{tenant}/{seed}/{start}")
    rand, below, pick, bits = rng.random, rng.below, rng.pick, rng.getrandbits
    weights = [0.6] + [0.4 / (len(conns) - 1)] * (len(conns) - 1) if len(conns) > 1 else [1.0]
    cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
    dumps = orjson.dumps
    for index in range(start, start + count):
        cid, cname, kind = conns[min(bisect.bisect(cumulative, rand()), len(conns) - 1)]
        # The index keeps ids unique across calls; the random tail makes them look real.
        ident = f"1{index:010d}{below(10**10):010d}" if kind.id_digits else f"{index:08x}{bits(64):016x}"
        given, family = pick(_GIVEN), pick(_FAMILY)
        # Every 40th user has a tricky name, in turn, so any 400 users hold all of them.
        tricky = index % 40 == 39
        name = _TRICKY[index // 40 % len(_TRICKY)] if tricky else f"{given} {family}"
        local = f"{_ASCII[given]}.{_ASCII[family]}"
        created = _BASE + dt.timedelta(seconds=rand() * _SPAN_SECONDS)
        updated = created + dt.timedelta(seconds=rand() * 86400 * 90)
        logged_in = rand() < 0.85
        phone = f"+1{2_000_000_000 + below(8_000_000_000)}" if rand() < 0.3 else None
        identities = [{"connection": cname, "user_id": ident, "provider": kind.provider, "isSocial": kind.social}]
        if rand() < 0.05:
            identities.append(
                {"connection": "github", "user_id": str(below(10**8)), "provider": "github", "isSocial": True}
            )
        yield (
            tenant,
            f"{kind.provider}|{ident}",
            cid,
            f"{local}.{index}@{_DOMAINS[index % len(_DOMAINS)]}" if rand() < 0.97 else None,
            rand() < 0.8 if rand() < 0.98 else None,
            f"{_ASCII[given]}{index}" if not kind.social and rand() < 0.6 else None,
            phone,
            rand() < 0.5 if phone else None,
            name,
            given if rand() < 0.9 else None,
            family if rand() < 0.9 else None,
            given.lower(),
            f"https://s.gravatar.com/avatar/{bits(128):032x}?s=480&r=pg&d={_AVATARS}{_ASCII[given][:2]}.png",
            _stamp(created),
            _stamp(updated),
            _stamp(updated + dt.timedelta(seconds=rand() * 86400 * 30)) if logged_in else None,
            f"{1 + below(223)}.{below(256)}.{below(256)}.{1 + below(254)}" if logged_in else None,
            _stamp(updated - dt.timedelta(days=1 + below(29))) if rand() < 0.2 else None,
            1 + below(499) if logged_in else 0,
            below(30) == 0,
            dumps([pick(("guardian", "google-authenticator", "sms"))]).decode() if rand() < 0.15 else None,
            dumps(identities).decode(),
            _app_metadata(rng, dumps),
            _user_metadata(rng, dumps, created, tricky),
        )


def _app_metadata(rng: _Random, dumps: Callable[[Any], bytes]) -> str | None:
    r = rng.random()
    if r < 0.4:
        return None
    if r < 0.5:
        return "{}"
    return dumps(
        {
            "roles": rng.sample(_ROLES, 1 + rng.below(2)),
            "plan": rng.pick(("free", "pro", "enterprise")),
            "billing": {"seats": 1 + rng.below(49), "trial": rng.random() < 0.2},
        }
    ).decode()


def _user_metadata(rng: _Random, dumps: Callable[[Any], bytes], created: dt.datetime, tricky: bool) -> str | None:
    if rng.random() < 0.35:
        return None
    meta: dict[str, Any] = {
        "country": rng.pick(_COUNTRIES),
        "consent": {
            "given": rng.random() < 0.7,
            "date": created.strftime("%Y-%m-%d"),
            "text_details": "https://example.com/terms/v2",
        },
        "preferences": {"newsletter": rng.random() < 0.3, "languages": rng.sample(["en", "fr", "de", "ja"], 2)},
        "score": round(rng.random() * 100, 2),
    }
    if tricky:
        meta["bio"] = rng.pick(_TRICKY)
    return dumps(meta).decode()


def _stamp(value: dt.datetime) -> str:
    """SQLAlchemy's DateTime storage text on SQLite; PostgreSQL parses the same text (as UTC)."""
    return value.isoformat(sep=" ", timespec="microseconds")


def seed_and_report(engine: Engine, *, tenant: str, users: int, connections: int, seed: int = 0,
                    start_index: int = 0) -> str:
    """What the seed commands do: migrate, seed with a progress line on stderr every PROGRESS_EVERY
    users, and return the line to print. A range seeded before adds nothing and says so, so a
    script may run the same seed twice."""
    upgrade(engine)

    def progress(done: int) -> None:
        print(f"seeding: {done} of {users} users", file=sys.stderr, flush=True)

    started = dt.datetime.now()
    try:
        ids = seed_users(engine, tenant=tenant, users=users, connections=connections, seed=seed,
                         start_index=start_index, progress=progress)
    except AlreadySeeded as already:
        return f"nothing added: {already} (to add more, pass --start-index {already.held})"
    seconds = (dt.datetime.now() - started).total_seconds()
    return f"seeded {users} users for tenant {tenant!r} in {seconds:.1f}s over connections {', '.join(ids)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: migrate the database, then seed it."""
    parser = argparse.ArgumentParser(prog="python -m userexport_server.seed", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int_at_least(1), required=True, help="how many users to add")
    parser.add_argument("--tenant", default=DEFAULT_TENANT)
    parser.add_argument("--connections", type=int_at_least(1), default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-index", type=int_at_least(0), default=0,
                        help="number of the first user (to add more later)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--database-url", help="SQLAlchemy URL (default: from USEREXPORT_* settings)")
    target.add_argument("--data-dir", type=pathlib.Path, help="directory of the default SQLite database")
    args = parser.parse_args(argv)
    settings = Settings.from_env(database_url=args.database_url, data_dir=args.data_dir)
    print(seed_database(settings, tenant=args.tenant, users=args.users, connections=args.connections,
                        seed=args.seed, start_index=args.start_index))
    return 0


def seed_database(settings: Settings, *, tenant: str, users: int, connections: int, seed: int = 0,
                  start_index: int = 0) -> str:
    """Seed the configured database (the data folder made private first, as the server makes it);
    returns the report line."""
    if not settings.database_url:
        make_private_dirs(settings.data_dir)
    engine = make_engine(settings.sqlalchemy_url, settings.db_timeouts)
    try:
        return seed_and_report(engine, tenant=tenant, users=users, connections=connections, seed=seed,
                               start_index=start_index)
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
