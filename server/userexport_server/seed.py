"""Seed a tenant with realistic, deterministic Auth0-like users, fast enough for a million.

Rows are generated as driver-ready values (dates as text, JSON as compact text) and loaded with one
executemany on SQLite or one COPY on PostgreSQL inside a single transaction: ORM objects would take
minutes where this takes seconds. A few users carry commas, quotes, newlines, non-ASCII and leading
= + - @ so exports exercise CSV quoting and the injection guard.

A seed of COLUMNAR_FROM users or more is generated as polars columns, PROGRESS_EVERY users at a
time, and reaches PostgreSQL as one CSV COPY: no Python per user, so ten million can be seeded again
for a benchmark (docs/benchmarks.md, "Seeding"). Smaller seeds keep the row generator, whose exact
users tests pin (tests/export/test_golden.py); both draw the same kinds of users from the same tables.

    python -m userexport_server.seed --users 1000000 [--tenant T] [--database-url URL | --data-dir D]
"""
from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import pathlib
import random
import string
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import polars as pl
from sqlalchemy import Connection, Engine, text

from userexport.client.arguments import int_at_least
from userexport_server.db.engine import make_engine, unbounded_statements, write_transaction
from userexport_server.db.migrate import upgrade
from userexport_server.private_files import make_private_dirs
from userexport_server.settings import Settings

DEFAULT_TENANT = "default"
PROGRESS_EVERY = 100_000  # users between two progress lines of the seed commands
_T = TypeVar("_T")

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
    batches: Iterator[_Rows | _Frame] = (
        _frames(tenant, conns, users, seed, start_index) if users >= COLUMNAR_FROM
        else _rows(_users(tenant, conns, users, seed, start_index)))
    first = next(batches, None)
    with write_transaction(engine) as conn:  # SQLite: BEGIN IMMEDIATE, so reading first cannot lose the write lock race
        unbounded_statements(conn)  # one COPY of a million users takes longer than the statement timeout
        if first is not None and conn.execute(
            text("SELECT 1 FROM users WHERE tenant = :t AND user_id = :u"), {"t": tenant, "u": first.first_user_id()}
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
        if first is not None:
            _write(conn, first, itertools.chain([first], batches), progress)
    return [cid for cid, _, _ in conns]


def _write(conn: Connection, first: _Rows | _Frame, batches: Iterator[_Rows | _Frame],
           progress: Callable[[int], None] | None) -> None:
    """Insert the batches: one COPY on PostgreSQL (in the format of the first), executemany on SQLite."""
    driver: Any = conn.connection.driver_connection
    done = 0
    if conn.dialect.name == "postgresql":
        # Dates are written as UTC wall-clock text; the session zone makes PostgreSQL read them so.
        conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
        with _populating(conn, enabled=isinstance(first, _Frame)) as freeze, driver.cursor() as cursor, \
                cursor.copy(first.copy_sql(freeze)) as copy:
            for batch in _prefetched(batches):
                batch.copy_into(copy)
                done += len(batch)
                _report(progress, done)
        conn.exec_driver_sql("ANALYZE users")
    else:
        insert = f"INSERT INTO users ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        for batch in _prefetched(batches):
            driver.executemany(insert, batch.rows())
            done += len(batch)
            _report(progress, done)


@contextlib.contextmanager
def _populating(conn: Connection, *, enabled: bool) -> Iterator[bool]:
    """A large seed into an empty users table loads as PostgreSQL's "Populating a Database" advises
    and pg_restore does: the table locked and truncated in the transaction (so COPY FREEZE writes
    frozen rows, and no WAL under wal_level=minimal), its secondary indexes and foreign keys dropped,
    then made again from their own definitions after the COPY, in one sorted build each and one
    join instead of a check per row. The COPY of 300k users cost the backend 10.4 CPU-s with the
    indexes and the foreign key checked per row, 7.2 without the check, 3.2 with the primary key
    alone. Yields whether it did so (the COPY may then FREEZE); a table that holds users is loaded
    as it is, never locked for the seed."""
    empty = "SELECT NOT EXISTS (SELECT 1 FROM users)"
    if not enabled or not conn.exec_driver_sql(empty).scalar_one():
        yield False
        return
    conn.exec_driver_sql("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    if not conn.exec_driver_sql(empty).scalar_one():  # filled before the lock
        yield False
        return
    deferred = conn.execute(text(
        "SELECT format('DROP INDEX %s', indexrelid::regclass), pg_get_indexdef(indexrelid)"
        " FROM pg_index WHERE indrelid = 'users'::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = indexrelid)"  # the key's stays
        " UNION ALL SELECT format('ALTER TABLE users DROP CONSTRAINT %I', conname),"
        " format('ALTER TABLE users ADD CONSTRAINT %I %s', conname, pg_get_constraintdef(oid))"
        " FROM pg_constraint WHERE conrelid = 'users'::regclass AND contype = 'f'")).all()
    for drop, _ in deferred:
        conn.exec_driver_sql(drop)
    conn.exec_driver_sql("TRUNCATE users")
    conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
    yield True
    for _, create in deferred:
        conn.exec_driver_sql(create)


def _prefetched(batches: Iterator[_T]) -> Iterator[_T]:
    """The batches, the next one made in a thread while the caller writes this one (polars and the
    database driver both let go of the GIL, so the generator and the database run at once)."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seed") as pool:
        following = pool.submit(next, batches, None)
        while (batch := following.result()) is not None:
            following = pool.submit(next, batches, None)
            yield batch


def _report(progress: Callable[[int], None] | None, done: int) -> None:
    """Batches hold PROGRESS_EVERY users (the last may hold fewer): a line after each full one."""
    if progress is not None and done % PROGRESS_EVERY == 0:
        progress(done)


class _Rows:
    """Users from the row generator, in _COLUMNS order (the path of small seeds)."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def first_user_id(self) -> str:
        return str(self._rows[0][1])

    def copy_sql(self, freeze: bool) -> str:
        return f"COPY users ({', '.join(_COLUMNS)}) FROM STDIN{' (FREEZE)' if freeze else ''}"

    def copy_into(self, copy: Any) -> None:
        for row in self._rows:
            copy.write_row(row)

    def rows(self) -> list[tuple[Any, ...]]:
        return self._rows


def _rows(rows: Iterator[tuple[Any, ...]]) -> Iterator[_Rows]:
    """The row generator's users, PROGRESS_EVERY at a time."""
    while batch := list(itertools.islice(rows, PROGRESS_EVERY)):
        yield _Rows(batch)


COLUMNAR_FROM = PROGRESS_EVERY  # users from which a seed is generated as columns (see the module's docstring)
_HEX4 = tuple(f"{v:04x}" for v in range(1 << 16))  # four hex digits per 16 bits of a draw
_CSV_DATE = "%Y-%m-%d %H:%M:%S%.6f"  # _stamp's text
_COPY_WRITE = 1 << 20  # bytes per COPY write: a 68 MB batch in one write took 9 s, in these 2.5


class _Frame:
    """Users as one polars frame of driver-ready columns in _COLUMNS order (the path of large seeds)."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame

    def __len__(self) -> int:
        return self._frame.height

    def first_user_id(self) -> str:
        return str(self._frame["user_id"][0])

    def copy_sql(self, freeze: bool) -> str:
        return f"COPY users ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT csv{', FREEZE' if freeze else ''})"

    def copy_into(self, copy: Any) -> None:
        text = io.BytesIO()
        # An empty quoted string is text and an empty unquoted one NULL, as COPY's CSV reads them.
        self._frame.write_csv(text, include_header=False, null_value="", quote_style="necessary")
        view = text.getbuffer()
        for start in range(0, len(view), _COPY_WRITE):  # one large write costs psycopg many times more
            copy.write(view[start:start + _COPY_WRITE])
        view.release()

    def rows(self) -> Iterator[tuple[Any, ...]]:
        return self._frame.iter_rows()


class _Draws:
    """Uniform draws for a range of user numbers: each draw is a new stream, the user's number hashed
    with that stream's own seed, so a user depends on (tenant, seed, number) only, like no other."""

    def __init__(self, key: str, index: pl.Expr) -> None:
        self._base = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        self._index, self._streams = index, 0

    def bits(self) -> pl.Expr:
        """64 random bits (UInt64)."""
        self._streams += 1
        return self._index.hash((self._base + self._streams * 0x9E3779B97F4A7C15) % (1 << 64))

    def random(self) -> pl.Expr:
        """A float in [0, 1)."""
        return (self.bits() // 2048).cast(pl.Float64) * 2.0**-53

    def below(self, n: int) -> pl.Expr:
        return (self.bits() % n).cast(pl.Int64)

    def pick(self, items: Sequence[Any]) -> pl.Expr:
        return _lookup(items, self.below(len(items)))

    def hex(self, digits: int) -> pl.Expr:
        """`digits` (a multiple of 4) random lowercase hex digits."""
        parts = []
        for _ in range(digits // 16):
            word = self.bits()
            parts += [_lookup(_HEX4, word // (1 << shift) % (1 << 16)) for shift in (48, 32, 16, 0)]
        return pl.concat_str(parts)


def _lookup(items: Sequence[Any], position: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(list(items))).gather(position)


def _json_bool(condition: pl.Expr) -> pl.Expr:
    return pl.when(condition).then(pl.lit("true")).otherwise(pl.lit("false"))


def _frames(
    tenant: str, conns: Sequence[tuple[str, str, _Kind]], count: int, seed: int, start: int
) -> Iterator[_Frame]:
    """The users of _users, of the same kinds and shares, as columns, PROGRESS_EVERY at a time."""
    for first in range(start, start + count, PROGRESS_EVERY):
        numbers = pl.DataFrame({"index": pl.int_range(first, min(first + PROGRESS_EVERY, start + count),
                                                      dtype=pl.Int64, eager=True)})
        yield _Frame(numbers.select(_user_columns(tenant, conns, seed)))


def _user_columns(tenant: str, conns: Sequence[tuple[str, str, _Kind]], seed: int) -> list[pl.Expr]:
    """The expressions of _COLUMNS over a frame of user numbers (`index`)."""
    index = pl.col("index")
    draw = _Draws(f"users/{tenant}/{seed}", index)
    weights = [0.6] + [0.4 / (len(conns) - 1)] * (len(conns) - 1) if len(conns) > 1 else [1.0]
    cumulative = [sum(weights[: i + 1]) for i in range(len(weights) - 1)]
    r = draw.random()
    # One connection: every user's is 0, a column like r (a bare literal would gather one value).
    connection = pl.sum_horizontal([(r >= edge).cast(pl.Int64) for edge in cumulative]) if cumulative \
        else (r * 0).cast(pl.Int64)
    kind = {attribute: _lookup([getattr(k, attribute) for _, _, k in conns], connection)
            for attribute in ("provider", "social", "id_digits")}
    # The number keeps ids unique across calls and in order; the random tail makes them look real.
    ident = pl.when(kind["id_digits"]).then(pl.concat_str(
        [pl.lit("1"), index.cast(pl.String).str.zfill(10), draw.below(10**10).cast(pl.String).str.zfill(10)])
    ).otherwise(pl.concat_str([_lookup(_HEX4, index // (1 << 16)), _lookup(_HEX4, index % (1 << 16)), draw.hex(16)]))
    given_at, family_at = draw.below(len(_GIVEN)), draw.below(len(_FAMILY))
    given, family = _lookup(_GIVEN, given_at), _lookup(_FAMILY, family_at)
    given_ascii, family_ascii = _lookup([_ASCII[n] for n in _GIVEN], given_at), _lookup(
        [_ASCII[n] for n in _FAMILY], family_at)
    # Every 40th user has a tricky name, in turn, so any 400 users hold all of them.
    tricky = index % 40 == 39
    micros = 1_000_000
    created = pl.lit(_BASE) + pl.duration(microseconds=draw.below(_SPAN_SECONDS * micros))
    updated = created + pl.duration(microseconds=draw.below(86400 * 90 * micros))
    logged_in = draw.random() < 0.85
    has_phone = draw.random() < 0.3
    second_identity = pl.concat_str([pl.lit(',{"connection":"github","user_id":"'), draw.below(10**8).cast(pl.String),
                                     pl.lit('","provider":"github","isSocial":true}')])
    identities = pl.concat_str([
        pl.lit('[{"connection":"'), _lookup([name for _, name, _ in conns], connection), pl.lit('","user_id":"'),
        ident, pl.lit('","provider":"'), kind["provider"], pl.lit('","isSocial":'), _json_bool(kind["social"]),
        pl.lit("}"), pl.when(draw.random() < 0.05).then(second_identity).otherwise(pl.lit("")), pl.lit("]")])
    return [
        pl.lit(tenant).alias("tenant"),
        pl.concat_str([kind["provider"], pl.lit("|"), ident]).alias("user_id"),
        _lookup([cid for cid, _, _ in conns], connection).alias("connection_id"),
        pl.when(draw.random() < 0.97).then(pl.concat_str(
            [given_ascii, pl.lit("."), family_ascii, pl.lit("."), index.cast(pl.String), pl.lit("@"),
             _lookup(_DOMAINS, index % len(_DOMAINS))])).alias("email"),
        pl.when(draw.random() < 0.98).then(draw.random() < 0.8).alias("email_verified"),
        pl.when(~kind["social"] & (draw.random() < 0.6)).then(
            pl.concat_str([given_ascii, index.cast(pl.String)])).alias("username"),
        pl.when(has_phone).then(pl.concat_str(
            [pl.lit("+1"), (2_000_000_000 + draw.below(8_000_000_000)).cast(pl.String)])).alias("phone_number"),
        pl.when(has_phone).then(draw.random() < 0.5).alias("phone_verified"),
        pl.when(tricky).then(_lookup(_TRICKY, index // 40 % len(_TRICKY))).otherwise(
            pl.concat_str([given, pl.lit(" "), family])).alias("name"),
        pl.when(draw.random() < 0.9).then(given).alias("given_name"),
        pl.when(draw.random() < 0.9).then(family).alias("family_name"),
        given.str.to_lowercase().alias("nickname"),
        pl.concat_str([pl.lit("https://s.gravatar.com/avatar/"), draw.hex(32), pl.lit(f"?s=480&r=pg&d={_AVATARS}"),
                       given_ascii.str.slice(0, 2), pl.lit(".png")]).alias("picture"),
        created.dt.strftime(_CSV_DATE).alias("created_at"),
        updated.dt.strftime(_CSV_DATE).alias("updated_at"),
        pl.when(logged_in).then(
            (updated + pl.duration(microseconds=draw.below(86400 * 30 * micros))).dt.strftime(_CSV_DATE)
        ).alias("last_login"),
        pl.when(logged_in).then(pl.concat_str(
            [(1 + draw.below(223)).cast(pl.String), pl.lit("."), draw.below(256).cast(pl.String), pl.lit("."),
             draw.below(256).cast(pl.String), pl.lit("."), (1 + draw.below(254)).cast(pl.String)])).alias("last_ip"),
        pl.when(draw.random() < 0.2).then(
            (updated - pl.duration(days=1 + draw.below(29))).dt.strftime(_CSV_DATE)).alias("last_password_reset"),
        pl.when(logged_in).then(1 + draw.below(499)).otherwise(0).alias("logins_count"),
        (draw.below(30) == 0).alias("blocked"),
        pl.when(draw.random() < 0.15).then(draw.pick(
            [f'["{factor}"]' for factor in ("guardian", "google-authenticator", "sms")])).alias("multifactor"),
        identities.alias("identities"),
        _app_metadata_column(draw).alias("app_metadata"),
        _user_metadata_column(draw, created, tricky).alias("user_metadata"),
    ]


def _app_metadata_column(draw: _Draws) -> pl.Expr:
    """_app_metadata's shapes: none, {} or roles (one or two, distinct), plan and billing."""
    first_role, other_role = draw.below(len(_ROLES)), draw.below(len(_ROLES) - 1)
    second_role = pl.when(draw.random() < 0.5).then(pl.concat_str(
        [pl.lit(',"'), _lookup(_ROLES, (first_role + 1 + other_role) % len(_ROLES)), pl.lit('"')]
    )).otherwise(pl.lit(""))
    full = pl.concat_str([
        pl.lit('{"roles":["'), _lookup(_ROLES, first_role), pl.lit('"'), second_role, pl.lit('],"plan":"'),
        draw.pick(("free", "pro", "enterprise")), pl.lit('","billing":{"seats":'), (1 + draw.below(49)).cast(pl.String),
        pl.lit(',"trial":'), _json_bool(draw.random() < 0.2), pl.lit("}}")])
    r = draw.random()
    return pl.when(r < 0.4).then(None).when(r < 0.5).then(pl.lit("{}")).otherwise(full)


def _user_metadata_column(draw: _Draws, created: pl.Expr, tricky: pl.Expr) -> pl.Expr:
    """_user_metadata's shape: country, consent, preferences (two distinct languages), a score, and
    for the users with tricky names a bio that is one of the tricky values."""
    languages = ("en", "fr", "de", "ja")
    first, other = draw.below(len(languages)), draw.below(len(languages) - 1)
    score = draw.below(10_001)
    bio = pl.when(tricky).then(
        pl.concat_str([pl.lit(',"bio":'), draw.pick([orjson.dumps(t).decode() for t in _TRICKY])]))
    meta = pl.concat_str([
        pl.lit('{"country":"'), draw.pick(_COUNTRIES), pl.lit('","consent":{"given":'), _json_bool(draw.random() < 0.7),
        pl.lit(',"date":"'), created.dt.strftime("%Y-%m-%d"),
        pl.lit('","text_details":"https://example.com/terms/v2"},"preferences":{"newsletter":'),
        _json_bool(draw.random() < 0.3), pl.lit(',"languages":["'), _lookup(languages, first), pl.lit('","'),
        _lookup(languages, (first + 1 + other) % len(languages)), pl.lit('"]},"score":'),
        (score // 100).cast(pl.String), pl.lit("."), (score % 100).cast(pl.String).str.zfill(2),
        bio.otherwise(pl.lit("")), pl.lit("}")])
    return pl.when(draw.random() < 0.35).then(None).otherwise(meta)


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
