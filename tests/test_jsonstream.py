"""QMP input parser: QEMU's texts, recovery points and robustness.

Lexer behaviour and recovery points were checked against Debian's qemu-storage-daemon
7.2; the error texts are QEMU 11.1's (push parser, with location), see the module.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.errors import QMPError
from qsd.qmp.jsonstream import JSONParseError, JSONStreamParser, parse_json_text


def feed_all(*chunks: bytes) -> list[object]:
    parser = JSONStreamParser()
    out: list[object] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def err(line: int, col: int, what: str) -> JSONParseError:
    return JSONParseError(f"{line}:{col}: JSON parse error, {what}")


def test_values_and_single_quotes() -> None:
    assert feed_all(b"{'execute': 'x', \"id\": 'it\\'s \"q\"'}\n") == [
        {"execute": "x", "id": "it's \"q\""}]
    assert feed_all(b'[1, -0, 2.5e3, true, false, null, "a\\/\\b\\f\\n\\r\\t"]') == [
        [1, 0, 2500.0, True, False, None, "a/\b\f\n\r\t"]]


def test_value_split_over_packets_and_lines() -> None:
    msg = b'{"execute":\n "query-version",\r\n\t"arguments": {"a": [12345, "x\\"y"]}}'
    for size in (1, 2, 3, 7):
        chunks = [msg[i:i + size] for i in range(0, len(msg), size)]
        assert feed_all(*chunks) == [
            {"execute": "query-version", "arguments": {"a": [12345, 'x"y']}}]


def test_number_or_keyword_needs_lookahead() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b"123") == []
    assert parser.feed(b"4 tru") == [1234]
    assert parser.feed(b"e\n") == [True]


def test_big_integers() -> None:
    (value,) = feed_all(b'[123456789012345678901234567890, 18446744073709551615, '
                        b'-9223372036854775808, -9223372036854775809]')
    assert value == [1.2345678901234568e29, 18446744073709551615,
                     -9223372036854775808, -9.223372036854776e18]
    assert isinstance(value, list) and isinstance(value[0], float)


def test_errors_are_reported_at_once() -> None:
    # QEMU 11.1's example: the error comes before the message is balanced.
    parser = JSONStreamParser()
    assert parser.feed(b"{'execute':foo\n") == [err(1, 12, "invalid keyword 'foo'")]
    assert parser.feed(b"}") == []
    assert parser.feed(b"{'execute':'x'}") == [{"execute": "x"}]


@pytest.mark.parametrize("data, expected", [
    (b'{"a" 1}', [err(1, 6, "expecting ':'")]),
    (b'{]', [err(1, 2, "expecting key")]),
    (b'{"a": 1 "b": 2}', [err(1, 9, "expected ',' or '}'")]),
    (b'[1 2]', [err(1, 4, "expected ',' or ']'")]),
    (b'[1,]', [err(1, 4, "expecting value")]),
    (b'{"a":1,"a":2}', [err(1, 12, "duplicate key")]),
    (b'nonsense\n', [err(1, 1, "invalid keyword 'nonsense'")]),
    (b'"\\u12"\n', [err(1, 1, '\\u12" is not a valid Unicode character')]),
    (b'"\\ud800"', [err(1, 1, "\\ud800 is not a valid Unicode character")]),
    (b'"\\udc00"', [err(1, 1, "\\udc00 is not a valid Unicode character")]),
    (b'"\\ud800\\u0041"', [err(1, 1, "\\ud800 is not a valid Unicode character")]),
    (b'"\\uffff"', [err(1, 1, "\\uffff is not a valid Unicode character")]),
    (b'"\\ufdd0"', [err(1, 1, "\\ufdd0 is not a valid Unicode character")]),
    (b'"\xef\xbf\xbf"', [err(1, 1, "invalid UTF-8 sequence in string")]),
    (b'"\xed\xa0\x80"', [err(1, 1, "invalid UTF-8 sequence in string")]),
    (b'"\xf4\x90\x80\x80"', [err(1, 1, "invalid UTF-8 sequence in string")]),
    (b'"\\x"', [err(1, 1, "invalid escape sequence in string")]),
    (b'0123\n', [err(1, 1, "stray '01'")]),
    (b'-\n', [err(1, 1, "stray '-\n'")]),
    (b'1.5e\n', [err(1, 1, "stray '1.5e\n'")]),
    (b'%p\n', [err(1, 1, "stray '%'")]),
    (b'"abc\n', [err(1, 1, "stray '\"abc\n'")]),
])
def test_error_texts(data: bytes, expected: list[object]) -> None:
    assert feed_all(data) == expected


def test_modified_utf8_and_pairs() -> None:
    assert feed_all(b'["\xc0\x80", "\\u0000", "\\ud800\\udc00", "\xc3\xa9"]') == [
        ["\x00", "\x00", "\U00010000", "\u00e9"]]


def test_recovery_after_lexical_error() -> None:
    # 7.2 and 11.1: 0xFF ends the message; the monitor stays usable (qtest qmp-test).
    assert feed_all(b'{\xff', b'{"execute":"x"}') == [
        err(1, 2, "stray '\ufffd'"), {"execute": "x"}]
    # Error skipping stops at a control character, which is an error of its own.
    assert feed_all(b"%a\x01\n{}") == [err(1, 1, "stray '%'"), err(1, 4, "stray '\x01'"), {}]
    # ...and at structural characters, which are lexed again (a lone '}' or ',').
    assert feed_all(b'["a"\x01,2]\n') == [
        err(1, 5, "stray '\x01'"), err(1, 7, "expecting value"), 2,
        err(1, 9, "expecting value")]
    # A newline consumed by the error itself does not end the skipping (7.2 too).
    assert feed_all(b"-\n", b"1.\n", b"{}") == [err(1, 1, "stray '-\n'"), {}]


def test_recovery_after_syntax_error_waits_for_balance() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b'{"a": [1 2], "b": {"c": 1}') == [err(1, 10, "expected ',' or ']'")]
    assert parser.feed(b'} {"d": 1}') == [{"d": 1}]
    # A closer without an opener ends the message (qmp-test: '{]' then a command).
    assert feed_all(b"{]\n", b"{'execute': 'no-such-cmd'}") == [
        err(1, 2, "expecting key"), {"execute": "no-such-cmd"}]


def test_location_counts_lines_of_the_connection() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b"{}\n{}\n") == [{}, {}]
    assert parser.feed(b'  {"a":\n  x}') == [err(4, 3, "invalid keyword 'x'")]


def test_nesting_limit() -> None:
    assert feed_all(b"[" * 1024 + b"]" * 1024) != []
    out = feed_all(b"[" * 1025 + b"]" * 1025 + b"{}")
    assert out == [JSONParseError("JSON nesting depth limit exceeded"), {}]


def test_interpolation_not_allowed_inside_strings_either() -> None:
    assert feed_all(b'"%s %%"') == ["%s %%"]


def test_feed_eof() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b"12") == []
    assert parser.feed_eof() == [12]
    parser = JSONStreamParser()
    assert parser.feed(b'{"a": 1') == []
    assert parser.feed_eof() == [err(1, 8, "premature end of input")]


def test_parse_json_text() -> None:
    assert parse_json_text('{"driver": "null-co"}') == {"driver": "null-co"}
    for text, message in [("", "Expecting a JSON value"),
                          ('{"a": 1} 2', "Expecting at most one JSON value"),
                          ('{"a"', "1:5: JSON parse error, premature end of input")]:
        with pytest.raises(QMPError) as info:
            parse_json_text(text)
        assert info.value.desc == message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def _is_qemu_text(value: object) -> bool:
    """No surrogates or noncharacters (QEMU rejects them) anywhere in the value."""
    if isinstance(value, str):
        return all(not (0xD800 <= ord(c) <= 0xDFFF or 0xFDD0 <= ord(c) <= 0xFDEF
                        or (ord(c) & 0xFFFE) == 0xFFFE) for c in value)
    if isinstance(value, list):
        return all(_is_qemu_text(v) for v in value)
    if isinstance(value, dict):
        return all(_is_qemu_text(k) and _is_qemu_text(v) for k, v in value.items())
    return True


@settings(max_examples=200)
@given(json_values, st.booleans(), st.integers(1, 9))
def test_roundtrip_any_split(value: object, ascii_only: bool, size: int) -> None:
    if not _is_qemu_text(value):
        return
    data = json.dumps(value, ensure_ascii=ascii_only).encode() + b"\n"
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    assert feed_all(*chunks) == [value]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=20) | st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b"\xff", b"\n", b"1e", b"-", b"true", b",", b":"]),
    max_size=30))
def test_garbage_never_raises(chunks: list[bytes]) -> None:
    parser = JSONStreamParser()
    for chunk in chunks:
        for item in parser.feed(chunk):
            assert isinstance(item, JSONParseError) or item is None or isinstance(
                item, dict | list | str | int | float | bool)
    parser.feed_eof()
    # After garbage, a control character resynchronises the stream.
    assert parser.feed(b"\x01\n{}")[-1] == {}


# QEMU's limits, written out so that the tests do not take them from the code they check.
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
_FRAME = (b'{"execute": "q", "id": ', b"}\n")
# The frame's tokens in bytes: every token counts with its text, spaces are no tokens.
_FRAME_TOKEN_SIZE = len(b'{"execute":"q","id":}')
_AFTER = b'{"execute": "after"}\n'
_SIZE_ERROR = JSONParseError("JSON token size limit exceeded")


def _huge_token(kind: str, length: int) -> bytes:
    if kind == "string":
        return b'"' + b"x" * (length - 2) + b'"'
    return (b"1" if kind == "number" else b"x") * length


def _expected(kind: str, length: int) -> list[object]:
    """11.1.3's rule: the first token that brings a request to 64 MiB of tokens or more
    refuses it (a token longer than that alone is cut there, and its rest goes with the
    refused request); before that a keyword is an error, a string or number the id."""
    # all of the frame's tokens but the closing brace come before the id
    if kind == "keyword" and _FRAME_TOKEN_SIZE - 1 + length < MAX_TOKEN_SIZE:
        what = f"invalid keyword '{'x' * length}'"[:1023]
        first: object = JSONParseError(f"1:24: JSON parse error, {what}")
    elif _FRAME_TOKEN_SIZE + length >= MAX_TOKEN_SIZE:
        first = _SIZE_ERROR
    else:
        first = {"execute": "q",
                 "id": "x" * (length - 2) if kind == "string" else float("inf")}
    return [first, {"execute": "after"}]


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["string", "number", "keyword"]),
       over=st.integers(-_FRAME_TOKEN_SIZE - 2, 2),
       chunk=st.sampled_from([4093, 65536, 1 << 20, 80 << 20]))
def test_a_huge_token_whatever_the_chunks(kind: str, over: int, chunk: int) -> None:
    length = MAX_TOKEN_SIZE + over
    data = _FRAME[0] + _huge_token(kind, length) + _FRAME[1] + _AFTER
    parser = JSONStreamParser()
    out: list[object] = []
    for start in range(0, len(data), chunk):
        out += parser.feed(data[start:start + chunk])
    assert out == _expected(kind, length)


def _feed_timed(data: bytes, budget: float) -> tuple[list[object], float]:
    """Feeds ``data`` as a monitor does, 64 KiB at a time and each until its backlog is
    done; returns the results and the most CPU time one feed() call took."""
    parser = JSONStreamParser()
    out: list[object] = []
    longest = 0.0
    for start in range(0, len(data), 65536):
        chunk = data[start:start + 65536]
        while True:
            before = time.thread_time()
            out += parser.feed(chunk, budget)
            longest = max(longest, time.thread_time() - before)
            chunk = b""
            if not parser.backlog:
                break
    return out, longest


@pytest.mark.parametrize("request_bytes, error", [
    (_FRAME[0] + _huge_token("string", 70 << 20) + _FRAME[1], _SIZE_ERROR),
    (_FRAME[0] + _huge_token("number", 70 << 20) + _FRAME[1], _SIZE_ERROR),
    (_FRAME[0] + _huge_token("keyword", 70 << 20) + _FRAME[1], _SIZE_ERROR),
    (b"[" + b"1," * (MAX_TOKEN_COUNT // 2 + 1000) + b"1]\n",
     JSONParseError("JSON token count limit exceeded")),
], ids=["string", "number", "keyword", "tokens"])
def test_huge_requests_are_refused_a_slice_at_a_time(request_bytes: bytes,
                                                     error: JSONParseError) -> None:
    """Each feed() keeps to its time budget (give or take one token's work), however
    the request is made, so that the monitor's loop is never held for long."""
    out, longest = _feed_timed(request_bytes + _AFTER, budget=0.002)
    assert out == [error, {"execute": "after"}]
    assert longest < 0.05


@pytest.mark.parametrize("token", [
    b'"' + b"x\\n" * 3000 + b'"', b"'" + b'"' * 9000 + b"'", b"9" * 9000, b"1." + b"5" * 9000,
    b"x" * 9000, b'"' + b"x" * 9000 + b"\x01", b"-" + b"1" * 9000 + b"e",
], ids=["string", "single-quoted", "integer", "fraction", "keyword", "bad-string", "bad-number"])
@pytest.mark.parametrize("before", [b'{"a": 1,\n "id": ', b'{"a": x,\n "id": '],
                         ids=["valid", "after-an-error"])
def test_a_long_token_split_anywhere(token: bytes, before: bytes) -> None:
    """A long token that grows over many feeds gives what it gives in one piece,
    locations of later errors included, and whether it is parsed or skipped."""
    data = before + token + b"}\n  nonsense\n"
    whole = feed_all(data)
    assert whole[-1] == err(3, 3, "invalid keyword 'nonsense'")
    for size in (1, 7, 4095, 4097, 5000):
        assert feed_all(*(data[i:i + size] for i in range(0, len(data), size))) == whole, size
