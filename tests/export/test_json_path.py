"""json_path.values_at against PostgreSQL's own `json #> text[]`, which it replaces in the export's
projection: the same text (byte for byte) or the same null, on generated documents with the spacing,
escaped and repeated keys, number spellings and nesting that stored JSON can hold, on paths of the
field grammar (keys of paths.py's alphabet, numeric keys such as "-1" or "01" included), and on the
export's own tricky values (tests/export/support.py)."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.databases import ADMIN_DSN, BACKENDS
from userexport_server.export.json_path import values_at

pytestmark = pytest.mark.skipif("postgresql" not in BACKENDS, reason="compares with PostgreSQL")

KEYS = ["a", "b", "ab", "0", "1", "-1", "01", "connection", "$x", "a-b"]
SPACE = st.sampled_from(["", " ", "  ", "\n", "\t", " \r\n "])
NUMBERS = st.sampled_from(["0", "-0", "-0.0", "1.50", "1e400", "1E-7", "12345678901234567890123", "-3"])
STRINGS = st.sampled_from(['""', '"x"', '"a\\"b"', '"\\u00e9\\/"', '"\\ud83d\\ude00"', '"\\\\"', '"}]"', '",:"'])
SCALARS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "null"]))
# A stored key: plain, or spelled with escapes that decode to a key of KEYS, or one no path names.
STORED_KEYS = st.one_of(st.sampled_from(KEYS).map(json.dumps),
                        st.sampled_from(['"\\u0061"', '"a\\u0062"', '"\\u0030"', '"\\u00e9"', '"a\\"b"', '"\\/"']))


def _members(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    member = st.tuples(STORED_KEYS, SPACE, SPACE, children).map(lambda m: f"{m[0]}{m[1]}:{m[2]}{m[3]}")
    return st.tuples(st.lists(member, max_size=4), SPACE).map(lambda m: "{" + m[1] + ("," + m[1]).join(m[0]) + "}")


def _elements(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(st.lists(children, max_size=4), SPACE).map(lambda e: "[" + e[1] + ("," + e[1]).join(e[0]) + "]")


DOCUMENTS = st.tuples(SPACE, st.recursive(SCALARS, lambda c: st.one_of(_members(c), _elements(c)), max_leaves=12),
                      SPACE).map("".join)
PATHS = st.lists(st.one_of(st.sampled_from(KEYS), st.integers(0, 3)), max_size=3)


@pytest.fixture(scope="module")
def postgres() -> Iterator[psycopg.Connection]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        yield conn


def postgres_values(conn: psycopg.Connection, documents: Sequence[str | None], path: Sequence[str | int]) -> list:
    rows = conn.execute("SELECT d::json #> %s::text[] FROM unnest(%s::text[]) WITH ORDINALITY AS t(d, n) ORDER BY n",
                        ([str(s) for s in path], list(documents))).fetchall()
    return [row[0] for row in rows]


def ours(documents: Sequence[str | None], path: Sequence[str | int], wide: bool = False) -> list:
    return values_at(pa.array(documents, pa.large_string() if wide else pa.string()), path).to_pylist()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents=st.lists(st.one_of(st.none(), DOCUMENTS), min_size=1, max_size=8), path=PATHS)
def test_every_generated_document_gives_what_postgresql_gives(postgres: psycopg.Connection, documents: list[str | None],
                                                              path: list[str | int]) -> None:
    # psycopg hands json back as text only when asked: compare the raw text PostgreSQL sends.
    postgres.adapters.register_loader("json", psycopg.types.string.TextLoader)
    assert ours(documents, path) == postgres_values(postgres, documents, path)


@pytest.mark.parametrize(("document", "path", "expected"), [
    ('{"a":1,"a":2}', ["a"], "2"),                                # a repeated key: the last wins
    ('{"a":{"b":1},"a":{"c":2}}', ["a", "b"], "1"),               # each occurrence is followed
    ('[1, 2, 3]', ["-1"], "3"),                                   # a numeric key counts from the end
    ('[1, 2, 3]', ["-4"], None),
    ('[1, 2, 3]', ["01"], "2"),
    ('{"0": 7}', [0], "7"),                                       # an index names an object's key too
    ('{"a\\u0062": 1.50}', ["ab"], "1.50"),                       # escaped keys are decoded; numbers as written
    (' [ {"connection" : "x", "b": [1, 2]} ] ', [0, "b"], "[1, 2]"),
    (' {"a":  1} ', [], '{"a":  1}'),                             # the whole value, without the spaces around it
    ('"x"', [0], None),                                           # a scalar has nothing below it
    ('{"a": null}', ["a"], "null"),                               # JSON null is text; SQL null is missing
    ("[1, 2", [0], None),                                         # not JSON (the json type stores none such)
])
def test_postgresql_rules_that_the_scan_follows(postgres: psycopg.Connection, document: str, path: list[str | int],
                                                expected: str | None) -> None:
    postgres.adapters.register_loader("json", psycopg.types.string.TextLoader)
    assert ours([document], path) == [expected]
    assert ours([document], path, wide=True) == [expected]
    if expected is not None or document != "[1, 2":
        assert postgres_values(postgres, [document], path) == [expected]


def test_an_array_slice_and_its_nulls_are_read_at_their_offset() -> None:
    texts = pa.array([None, '{"a": 1}', '{"a": "x"}', None, '{"b": 2}', '{"a": []}'])
    assert values_at(texts.slice(1, 4), ["a"]).to_pylist() == ["1", '"x"', None, None]
    assert values_at(pa.array([], pa.string()), ["a"]).to_pylist() == []
    assert values_at(pa.array(["", None]), ["a"]).to_pylist() == [None, None]


def test_texts_of_another_type_are_refused() -> None:
    with pytest.raises(TypeError, match="JSON texts must be strings"):
        values_at(pa.array([1, 2]), ["a"])
