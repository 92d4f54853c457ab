"""``parse_json``: orjson's fast path gives exactly the standard library's result or 422.

orjson differs from the standard library on duplicate keys (it keeps the last), integers
beyond 64 bits (it returns a float) and nesting depth; those bodies must go to the standard
library. Every body here is parsed both ways and the outcomes (value, or the 422's errors)
compared.
"""

from __future__ import annotations

import json

import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.api.body import _parse_standard, _same_as_standard, parse_json


def _outcome(parse, body):
    try:
        value = parse(body)
    except RequestValidationError as error:
        return ("422", error.errors())
    return ("ok", repr(value))  # repr tells 1 from 1.0, -0.0 from 0.0 and keeps key order


def _assert_same(body):
    assert _outcome(parse_json, body) == _outcome(_parse_standard, body), body[:200]


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "a:b", ":"])
)
_keys = st.text(alphabet='ab:\\"é', max_size=3)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_values, compact=st.booleans())
def test_parse_json_matches_the_standard_library_on_json_values(value, compact):
    separators = (",", ":") if compact else (", ", ": ")
    body = json.dumps(value, separators=separators, ensure_ascii=False).encode()

    _assert_same(body)


_PIECES = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b"0", b"9", b"-", b"e", b".", b" "]
_PIECES += [b"NaN", b"Infinity", b'"a"', b'"a":1', b"12345678901234567890", b"\xef\xbb\xbf"]
_PIECES += [b"\xff", b"\\ud800", b"true", b"null", b"\t", b"\n"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=_values,
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 3), st.sampled_from(_PIECES)),
        max_size=4,
    ),
)
def test_parse_json_matches_the_standard_library_on_broken_bodies(value, edits):
    body = json.dumps(value).encode()
    for at, cut, piece in edits:
        at %= len(body) + 1
        body = body[:at] + piece + body[at + cut :]

    _assert_same(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a": 2}',
        b'{"a": {"b": 1, "b": 1}}',
        b'[{"x": 1}, {"x": 2, "x": 3}]',
        b'{"a:b": 1, "c": 2, "c": 3}',  # a colon in a string and a duplicate: counts cancel?
        b'{"a\\u003a": 1, "a\\u003a": 1}',
        b'{"schema": 1, "schema": 1}',
    ],
)
def test_parse_json_refuses_duplicate_keys_as_before(body):
    kind, errors = _outcome(parse_json, body)

    assert kind == "422"
    assert errors[0]["type"] == "json_duplicate_key"
    _assert_same(body)


@pytest.mark.parametrize(
    "number",
    [
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "123456789012345678901234567890",
        "1" * 4300,
        "1" * 4301,
        "1e400",
        "-1e400",
        "1.7976931348623159e308",
        "1e-400",
        "-0",
        "-0.0",
        "100000000000000000000.5",
    ],
)
def test_parse_json_numbers_as_the_standard_library(number):
    body = f'{{"step": [{number}]}}'.encode()

    _assert_same(body)
    if len(number) >= 19 and "." not in number and "e" not in number:
        kind, value = _outcome(parse_json, body)
        assert kind == "422" or str(int(number)) in value  # never turned into a float


@pytest.mark.parametrize("depth", [3, 64, 65, 200, 900, 1023, 1025, 5000])
def test_parse_json_depth_as_the_standard_library(depth):
    body = b"[" * depth + b"1" + b"]" * depth
    fast, standard = _kind(parse_json, body), _kind(_parse_standard, body)

    assert fast == standard
    if depth >= 5000:
        assert fast == "json_too_deep"


def _kind(parse, body):
    try:
        parse(body)
    except RequestValidationError as error:
        return error.errors()[0]["type"]
    return "ok"


@pytest.mark.parametrize(
    "body",
    [
        b"[NaN]",
        b'{"global_norm": [Infinity]}',
        b"[-Infinity]",
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": 1}'.encode("utf-16"),
        b'["\\ud800"]',
        b'["\xff"]',
        b"",
        b"[1] x",
        b'{"a": "\x01"}',
    ],
)
def test_parse_json_odd_bodies_as_the_standard_library(body):
    _assert_same(body)


def test_parse_json_bare_nan_message_is_unchanged():
    kind, errors = _outcome(parse_json, b'{"global_norm": [NaN]}')

    assert kind == "422"
    assert "bare NaN is not JSON" in errors[0]["msg"]


def test_parse_json_batch_bodies_take_the_fast_path():
    """Floats with long fractions (0.00012345678901234567: 20 digits in a row), large floats
    below 2⁶³ and the non-finite strings are no reason to leave orjson; a float of 2⁶³ or more
    is (it may have been an integer literal), and costs the standard library's time."""
    values = [0.00012345678901234567, 1e-7, 0.1, 9.2e18, -9.2e18, "NaN", "-Infinity"]
    body = json.dumps({"schema": 1, "layers": ["a/b"], "grad_norm": [values, values]}).encode()

    assert _same_as_standard(body, orjson.loads(body))
    assert not _same_as_standard(b"[9.3e18]", orjson.loads(b"[9.3e18]"))
    assert not _same_as_standard(b'{"a": -1e19}', orjson.loads(b'{"a": -1e19}'))
    assert not _same_as_standard(b"3.4028234663852886e38", 3.4028234663852886e38)
