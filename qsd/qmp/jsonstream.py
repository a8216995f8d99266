"""QEMU's QMP input parser: bytes from a socket in, JSON values or parse errors out.

QEMU splits this into a lexer (``qobject/json-lexer.c``), a streamer that finds message
boundaries and enforces limits (``json-streamer.c``) and, since QEMU 11.1, a *push*
parser fed one token at a time (``json-parser.c``, "json-parser: replace with a push
parser", merged July 2026).  qsd follows 11.1; where 11.1 differs from older daemons
(e.g. Debian's 7.2) it is noted below.

Lexer (unchanged since QEMU 3.0, verified against 7.2):

- Tokens: ``{ } [ ] , :``, strings in double *or single* quotes (a single-quoted string may
  contain ``"`` unescaped; ``\\'`` is an escape in both kinds), numbers per RFC 8259,
  keywords ``[a-z]+`` (anything but true/false/null is rejected by the parser: ``invalid
  keyword 'nonsense'``).  Whitespace is space, tab, CR, LF.
- Inside strings any byte 0x20..0xFD is accepted (also after a backslash; bad escapes
  are the parser's business); control bytes and 0xFE/0xFF are lexical errors.
- ``%`` interpolation is only enabled for QEMU-internal callers, so from a socket ``%`` is
  a lexical error (``stray '%'``).
- A lexical error reports the token so far *including* the offending byte (``0123`` ->
  ``stray '01'``, ``-`` then newline -> ``stray '-\\n'``, ``"a<0x01>`` -> ``stray '"a\\u0001'``)
  and then skips input until a structural character, an ASCII control character other
  than tab (newline included) or 0xFE/0xFF.  That character is then lexed normally, so a
  control character or 0xFF that ends the skipping is itself reported as a second error
  (7.2: ``%a<0x01>`` gives ``stray '%'`` then ``stray '\\u0001'``).
- A single token longer than 64 MiB is cut off (``JSON token size limit exceeded``).

Streamer and parser (QEMU 11.1):

- Errors are reported at the first bad token, without waiting for the message to end;
  the rest of the message (until braces and brackets balance) is then dropped silently.
  QEMU 11.1's own example: ``{'execute':foo`` answers at once ``invalid keyword 'foo'``,
  the following ``}`` is swallowed.  (7.2 waited for the balancing ``}``.)
- A lexical error always ends the message, as does a closing bracket without an opener
  of its kind.  QEMU's qtest ``qmp-test`` relies on both (``{]`` and ``{<0xFF>`` must leave
  the monitor usable), and the QMP spec tells clients to send a control character or 0xFF
  to get the parser into a known state.
- Limits per message: nesting deeper than 1024 (``JSON nesting depth limit exceeded``),
  more than 2 Mi tokens (``JSON token count limit exceeded``), 64 MiB of token text or
  more (``JSON token size limit exceeded``; 11.1.3 refuses a request whose tokens add up
  to exactly 64 MiB, and takes one of 2 Mi tokens).  These texts carry no prefix.
- Parser errors read ``L:C: JSON parse error, <what>`` (as 11.1.3 prints them), where L/C
  are the start of the offending token counted from the start of the connection (1-based,
  in bytes).  As in QEMU, a token that directly follows a number, a keyword or the end of
  error-skipping is placed one column too far right.  ``<what>`` is at most 1023 bytes.
  7.2 said ``JSON parse error, <what>`` with other texts (``expected separator in dict``,
  ``missing : in object pair``); 11.1's are ``expecting value``, ``expecting key``,
  ``expecting ':'``, ``expected ',' or '}'``, ``expected ',' or ']'``, ``duplicate key``,
  ``invalid keyword 'x'``, ``stray 'x'``, ``premature end of input``, and from strings
  ``invalid escape sequence in string``, ``invalid UTF-8 sequence in string``,
  ``\\uXXXX is not a valid Unicode character`` (the escape text as written, e.g.
  ``\\u12"`` for ``"\\u12"``).
- Strings are modified UTF-8: ``C0 80`` is NUL; surrogates (raw or as a lone ``\\uD800``),
  noncharacters (U+FDD0..U+FDEF, U+xFFFE/U+xFFFF) and code points above U+10FFFF are
  rejected; a ``\\uD8xx\\uDCxx`` pair is combined.
- Integers in int64 stay ints, non-negative ones up to 2**64-1 too; larger ones become
  floats (``123456789012345678901234567890`` -> ``1.2345678901234568e+29``), as do
  negative ones below int64.  Duplicate keys are an error.

Speed (QEMU 11.1.3 reads its monitor a byte per main-loop turn: 18 s for a 4 MB string):

- A complete standard-JSON message in one buffer is decoded by Python's C decoder.
- An unfinished string, number or keyword longer than 4 KiB grows chunk by chunk without
  being lexed again, and is cut at the size limit as it arrives.
- After an error, the rest of the message is skipped by a regular expression that stops
  only where QEMU's lexer could end it (brackets, lexical errors).
- ``feed()`` takes a time budget; what it could not lex in time waits as ``backlog``, so
  the monitor can let the loop run between slices of a huge request.
"""

from __future__ import annotations

import json
import re
import time
from typing import NamedTuple

from qsd.errors import QMPError

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
_MAX_MESSAGE = 1023  # QEMU formats the detail into a char[1024]

JSONValue = dict[str, object] | list[object] | str | int | float | bool | None


class JSONParseError(NamedTuple):
    """One input error, to be answered as ``{"error": {"class": "GenericError", ...}}``."""

    desc: str


class _Fail(Exception):
    """A parser error detail (the text after QEMU's location prefix), as raw bytes."""

    def __init__(self, detail: bytes) -> None:
        super().__init__(detail)
        self.detail = detail


# A string's inside (QEMU's lexer takes any byte but controls and 0xFE/0xFF), for either
# quote; a number where what follows surely ends it (the rest go the slow way).
_BODY = {quote: rb"(?:[^" + quote + rb"\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+"
         for quote in (b'"', b"'")}
_NUMBER = rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?(?=[ \t\r\n,:\[\]{}])"
# Complete tokens that need no lookahead decision; keywords only when the next byte is
# known (at the end of the buffer more letters may follow).
_TOKEN = re.compile(
    rb"([ \t\r\n]+)"
    rb"|([{}\[\],:])"
    rb'|("' + _BODY[b'"'] + rb'")'
    rb"|('" + _BODY[b"'"] + rb"')"
    rb"|([a-z]++)(?=[^a-z])"
    rb"|(" + _NUMBER + rb")"
)
# After an error the rest of the message only has its brackets counted: whole runs of
# tokens that cannot end it (no bracket, no lexical error) are skipped in one go.
_ERROR_SKIP = re.compile(
    rb"(?:[ \t\r\n,:]++"
    rb'|"' + _BODY[b'"'] + rb'"'
    rb"|'" + _BODY[b"'"] + rb"'"
    rb"|[a-z]++(?=[^a-z])"
    rb"|" + _NUMBER + rb")*+"
)
# The inside of an unfinished string, resumable where the previous scan stopped.
_STRING_BODY = {quote[0]: re.compile(body) for quote, body in _BODY.items()}
_DIGITS = re.compile(rb"[0-9]*")
_KEYWORD_TAIL = re.compile(rb"[a-z]*")
# Error recovery skips everything but structural characters, controls other than tab,
# and the impossible UTF-8 bytes.
_RECOVERY_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\[\]{}:,\xfe\xff]*")
_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr((plane << 16) | 0xFFFE) + chr((plane << 16) | 0xFFFF) for plane in range(17))
    + "]"
)
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")

# Token kinds besides the structural bytes themselves.
_STR, _INT, _FLOAT, _KW, _ERR, _EOI, _HUGE = range(256, 263)

# Parser states (QEMU's JSONParserState).
_AFTER_LCURLY, _AFTER_LSQUARE, _BEFORE_KEY, _BEFORE_VALUE, _END_OF_KEY, _END_OF_VALUE = range(6)

_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COMMA, _COLON = b"{}[],:"


class _Fallback(ValueError):
    """The fast path met something where Python's json and QEMU might differ."""


def _pairs_to_dict(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Fallback("duplicate key")
    return result


def _qemu_int(text: str) -> int | float:
    # Past 20 digits a JSON integer cannot be in range (no leading zeros); float() also
    # spares int() its digit limit (a 5000-digit number is inf, as QEMU's strtod says).
    if len(text) > 21:
        return float(text)
    value = int(text)
    return value if -(1 << 63) <= value < (1 << 64) else float(text)


def _no_constants(text: str) -> object:
    raise _Fallback(text)


# The fast path: a whole ASCII message that is also standard JSON means the same to
# Python's C decoder as to QEMU, except for the hooks' cases and the escapes below.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_to_dict, parse_int=_qemu_int,
                            parse_constant=_no_constants)
_FAST_MAX = 1 << 20  # far below the token count and size limits
_LONG_TOKEN = 1 << 12  # an unfinished token this long grows without being lexed again
_SUSPICIOUS_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|[fF][dD][d-fD-F]|[fF]{3}[eEfF])")


def _run_end(pattern: re.Pattern[bytes], buf: bytes, pos: int, end: int | None = None) -> int:
    """Where a ``*`` pattern (which always matches, maybe empty) stops, not past end."""
    m = pattern.match(buf, pos) if end is None else pattern.match(buf, pos, end)
    return m.end() if m else pos


def _valid_codepoint(cp: int) -> bool:
    """QEMU's is_valid_codepoint(): no surrogates, noncharacters or values past U+10FFFF."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and (cp & 0xFFFE) != 0xFFFE)


def _decode_raw(raw: bytes) -> str:
    """Unescaped string bytes as modified UTF-8 (``C0 80`` is NUL)."""
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise _Fail(b"invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _Fail(b"invalid UTF-8 sequence in string")
    return text


def _hex4(token: bytes, at: int) -> int:
    """QEMU's cvt4hex(): four hex digits at ``at`` or -1."""
    m = _HEX4.match(token, at)
    return int(m.group(), 16) if m else -1


def parse_string(token: bytes) -> str:
    """A string token (quotes included) to its value, or _Fail with QEMU's text."""
    body_end = len(token) - 1
    if token.find(b"\\", 1, body_end) < 0:
        return _decode_raw(token[1:body_end])
    parts: list[str] = []
    pos = 1
    while True:
        bs = token.find(b"\\", pos, body_end)
        if bs < 0:
            parts.append(_decode_raw(token[pos:body_end]))
            return "".join(parts)
        parts.append(_decode_raw(token[pos:bs]))
        esc = token[bs + 1]
        if esc in _ESCAPES:
            parts.append(_ESCAPES[esc])
            pos = bs + 2
            continue
        if esc != ord("u"):
            raise _Fail(b"invalid escape sequence in string")
        cp = _hex4(token, bs + 2)
        end = bs + 6
        if 0xD800 <= cp <= 0xDBFF and token.startswith(b"\\u", end):
            trailing = _hex4(token, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                end += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # QEMU prints the escape as written; it stops at the token's end.
            raise _Fail(token[bs:min(end, len(token))] + b" is not a valid Unicode character")
        parts.append(chr(cp))
        pos = end


def _number(kind: int, text: bytes) -> int | float:
    """QEMU's QNum rules: int64, else uint64 for non-negative values, else double."""
    if kind == _INT:
        return _qemu_int(text.decode("ascii"))
    return float(text)


class _Frame:
    """A container being built, with the key awaiting its value (objects only)."""

    __slots__ = ("container", "state", "key")

    def __init__(self, container: dict[str, object] | list[object], state: int) -> None:
        self.container = container
        self.state = state
        self.key: str | None = None


class JSONStreamParser:
    """Incremental QMP input parser; see the module docstring for the exact behaviour."""

    def __init__(self) -> None:
        # Input not lexed yet: an unfinished token (more of a long one in _more), or what
        # a spent time budget left (_backlog).
        self._buf = b""
        self._more: list[bytes] = []
        self._more_len = 0
        self._backlog = False
        self._deadline: float | None = None
        # QEMU's lexer position: (line, column) of the next byte, at the start of _buf.
        self._line = 1
        self._col = 1
        self._recovering = False
        self._skew = False
        self._string_scan = 0  # >0: _buf holds an unfinished string, good up to here
        self._cur = b""  # the buffer being lexed; token offsets refer to it
        # Streamer state.
        self._braces = 0
        self._brackets = 0
        self._token_count = 0
        self._token_size = 0
        self._error = False
        # Parser state.
        self._stack: list[_Frame] = []
        self._out: list[object | JSONParseError] = []

    # -- public API --------------------------------------------------------

    @property
    def backlog(self) -> bool:
        """Whether input is left over from a feed() whose time budget ran out."""
        return self._backlog

    def feed(self, data: bytes, budget: float | None = None) -> list[object | JSONParseError]:
        """Consume ``data``; return the values and errors it completes, in order.

        With a ``budget`` (seconds), lexing stops at a token once that much time has
        passed and the rest waits as ``backlog`` for the next call (``feed(b"")``), so
        that a caller on an event loop can let other work run in between.
        """
        self._out = []
        self._deadline = None if budget is None else time.monotonic() + budget
        if not self._absorb(data):
            self._lex(self._pending(data), final=False)
        return self._out

    def feed_eof(self) -> list[object | JSONParseError]:
        """End of input, QEMU's json_message_parser_flush(): finish a pending token.

        A pending number or keyword completes; an unterminated string is a stray-token
        error; an unfinished value is ``premature end of input``.  (QEMU's monitor never
        flushes: at EOF it drops the connection and its parser.)
        """
        self._out = []
        self._deadline = None
        self._lex(self._pending(b""), final=True)
        self._recovering = False
        self._cur = b""
        self._token(_EOI, b"", 0)
        return self._out

    # -- lexer ---------------------------------------------------------------

    def _pending(self, data: bytes) -> bytes:
        """The input not lexed yet, followed by ``data``."""
        if self._more:
            data = b"".join([self._buf, *self._more, data])
            self._more.clear()
            self._more_len = 0
        elif self._buf:
            data = self._buf + data
        self._buf = b""
        return data

    def _absorb(self, data: bytes) -> bool:
        """Grow a long unfinished string, number or keyword by ``data`` without lexing
        it again; False if ``data`` has to be lexed with it.

        This keeps a huge token linear in its size.  At the size limit the token is cut
        as QEMU's lexer cuts it, and lexing starts afresh after the cut.
        """
        head = self._buf
        length = len(head) + self._more_len
        if length < _LONG_TOKEN or self._backlog or not data:
            return False
        cut = min(len(data), MAX_TOKEN_SIZE + 1 - length)
        if head[0] in _STRING_BODY:
            start = length - self._string_scan  # 1 after a backslash, else 0
            if start and not 0x20 <= data[0] <= 0xFD:
                return False
            end = _run_end(_STRING_BODY[head[0]], data, start, cut)
            if end < cut - 1 or (end == cut - 1 and data[end] != ord("\\")):
                return data[end] == head[0] and self._skip_ended(_STR, length, end + 1, data)
            self._string_scan = length + end
        elif ord("a") <= head[0] <= ord("z"):
            end = _run_end(_KEYWORD_TAIL, data, 0, cut)
            if end < cut:
                # It ends here, and one this long is invalid: its head makes the error.
                self._cur = head
                self._token(_KW, head[:_MAX_MESSAGE], self._loc_offset(0), length + end)
                self._skew = True
                self._drop_pending(length + end)
                self._lex(data[end:], final=False)
                return True
        elif not ord("0") <= (self._more[-1] if self._more else head)[-1] <= ord("9"):
            return False
        else:
            # A number takes more digits once it ends in one (a leading zero is never
            # this long); a fraction or an exponent is lexed.
            end = _run_end(_DIGITS, data, 0, cut)
            if end < cut:
                return data[end] not in b".eE" and self._skip_ended(_INT, length, end, data)
        if length + cut <= MAX_TOKEN_SIZE:
            self._more.append(data)
            self._more_len += len(data)
            return True
        # The token reaches the limit: hand it on without its bytes, and lex what
        # follows the cut.
        self._drop_pending(MAX_TOKEN_SIZE + 1)
        self._token(_HUGE, b"", 0, MAX_TOKEN_SIZE + 1)
        self._lex(data[cut:], final=False)
        return True

    def _skip_ended(self, kind: int, length: int, used: int, data: bytes) -> bool:
        """After an error nothing is parsed, so a long string or number that ends after
        ``used`` bytes of ``data`` is passed on by its size alone; False before one."""
        if not self._error:
            return False
        self._loc_offset(0)
        self._token(kind, b"", 0, length + used)
        self._skew = kind == _INT
        self._drop_pending(length + used)
        self._lex(data[used:], final=False)
        return True

    def _drop_pending(self, size: int) -> None:
        """Forget an unfinished token that has been lexed ``size`` bytes far (these
        tokens hold no newline)."""
        self._buf = b""
        self._more.clear()
        self._more_len = 0
        self._string_scan = 0
        self._col += size

    def _loc_offset(self, start: int) -> int:
        """The buffer offset whose position QEMU reports for a token starting at start."""
        if self._skew:
            self._skew = False
            return start + 1
        return start

    def _lex(self, buf: bytes, final: bool) -> None:
        """Tokenize ``buf``; keep an incomplete trailing token for the next call, and
        the rest of ``buf`` as backlog when the time budget runs out."""
        self._cur = buf
        self._backlog = False
        n = len(buf)
        pos = 0
        match = _TOKEN.match
        text = buf.decode("ascii") if n < 4 * _FAST_MAX and buf.isascii() else None
        deadline = self._deadline
        rounds = 0
        while pos < n:
            if deadline is not None:
                rounds += 1
                if not rounds & 63 and time.monotonic() > deadline:
                    self._backlog = True
                    break
            if (text is not None and buf[pos] in b"{[" and not self._recovering
                    and not self._braces and not self._brackets and not self._error):
                end = self._lex_fast(text, pos)
                if end > 0:
                    pos = end
                    continue
            if self._recovering:
                pos = _run_end(_RECOVERY_SKIP, buf, pos)
                if pos == n:
                    break
                self._recovering = False
                self._skew = True
                continue
            if self._error and not self._string_scan:
                end = _run_end(_ERROR_SKIP, buf, pos)
                if end > pos:
                    pos = end
                    continue
            if self._string_scan:
                # An unfinished string from the previous call starts at 0.
                end = self._lex_string(buf, 0, self._string_scan, final)
            else:
                m = match(buf, pos)
                if m is not None:
                    group = m.lastindex
                    if group == 1:
                        self._skew = False
                    elif group == 2:
                        self._token(buf[pos], b"", self._loc_offset(pos))
                    elif group == 5:
                        self._token(_KW, m.group(), self._loc_offset(pos))
                        self._skew = True
                    elif group == 6:
                        number = m.group()
                        kind = _INT if number.isdigit() or number[1:].isdigit() else _FLOAT
                        self._token(kind, number, self._loc_offset(pos))
                        self._skew = True
                    else:
                        self._token(_STR, m.group(), self._loc_offset(pos))
                    pos = m.end()
                    continue
                end = self._lex_slow(buf, pos, final)
            if end < 0:
                break
            pos = end
        self._advance(buf, pos)
        self._buf = buf[pos:]
        if not self._backlog and len(self._buf) > MAX_TOKEN_SIZE:
            # QEMU's lexer hands an oversized token on and starts afresh after it.
            huge, rest = self._buf[: MAX_TOKEN_SIZE + 1], self._buf[MAX_TOKEN_SIZE + 1:]
            self._buf = b""
            self._string_scan = 0
            self._cur = huge
            self._token(_HUGE, huge, 0)
            self._advance(huge, len(huge))
            self._lex(rest, final)

    def _lex_fast(self, text: str, pos: int) -> int:
        """A complete standard-JSON message at ``pos`` decoded in one go, else -1."""
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return -1
        if end - pos > _FAST_MAX or _SUSPICIOUS_ESCAPE.search(text, pos, end):
            return -1
        # Python 3.14's decoder no longer stops at the recursion limit, so the depth is
        # bounded here: more openers than the limit allows (strings included) go slow.
        if text.count("[", pos, end) + text.count("{", pos, end) > MAX_NESTING:
            return -1
        self._skew = False
        self._out.append(value)
        return int(end)

    def _lex_slow(self, buf: bytes, pos: int, final: bool) -> int:
        """Tokens needing a closer look; returns the end, or -1 if more input is needed."""
        c = buf[pos]
        if c in _STRING_BODY:
            return self._lex_string(buf, pos, pos + 1, final)
        if c == ord("-") or ord("0") <= c <= ord("9"):
            return self._lex_number(buf, pos, final)
        if ord("a") <= c <= ord("z"):
            if not final:
                return -1
            end = _run_end(_KEYWORD_TAIL, buf, pos)
            self._token(_KW, buf[pos:end], self._loc_offset(pos))
            self._skew = True
            return end
        return self._lex_error(buf, pos, pos + 1)

    def _lex_string(self, buf: bytes, pos: int, scan: int, final: bool) -> int:
        """A string starting at ``pos`` whose bytes before ``scan`` are known good."""
        n = len(buf)
        end = _run_end(_STRING_BODY[buf[pos]], buf, scan)
        if end < n and buf[end] == buf[pos]:
            self._string_scan = 0
            self._token(_STR, buf[pos:end + 1], self._loc_offset(pos))
            return end + 1
        if end + (end < n and buf[end] == ord("\\")) >= n and not final:
            # Unfinished: remember how far it is good (the bytes move to offset 0).
            self._string_scan = end - pos
            return -1
        self._string_scan = 0
        if end < n and buf[end] == ord("\\"):
            end += 1
        return self._lex_error(buf, pos, end + 1)

    def _lex_error(self, buf: bytes, start: int, end: int) -> int:
        """A lexical error: the token so far plus the offending byte, then recovery."""
        self._token(_ERR, buf[start:end], self._loc_offset(start))
        self._recovering = True
        return min(end, len(buf))

    def _lex_number(self, buf: bytes, pos: int, final: bool) -> int:
        """QEMU's number states; an incomplete number waits for more input."""
        n = len(buf)
        i = pos
        kind = _INT
        if buf[i] == ord("-"):
            i += 1
            if i == n:
                return self._number_end(buf, pos, i, None, final)
            if not ord("0") <= buf[i] <= ord("9"):
                return self._lex_error(buf, pos, i + 1)
        if buf[i] == ord("0"):
            i += 1
            if i < n and ord("0") <= buf[i] <= ord("9"):
                return self._lex_error(buf, pos, i + 1)
        else:
            i = _run_end(_DIGITS, buf, i)
        if i < n and buf[i] == ord("."):
            kind = _FLOAT
            i += 1
            if i == n:
                return self._number_end(buf, pos, i, None, final)
            if not ord("0") <= buf[i] <= ord("9"):
                return self._lex_error(buf, pos, i + 1)
            i = _run_end(_DIGITS, buf, i)
        if i < n and buf[i] in b"eE":
            kind = _FLOAT
            i += 1
            if i < n and buf[i] in b"+-":
                i += 1
            if i == n:
                return self._number_end(buf, pos, i, None, final)
            if not ord("0") <= buf[i] <= ord("9"):
                return self._lex_error(buf, pos, i + 1)
            i = _run_end(_DIGITS, buf, i)
        return self._number_end(buf, pos, i, kind, final)

    def _number_end(self, buf: bytes, pos: int, end: int, kind: int | None,
                    final: bool) -> int:
        """Emit a number that ends at ``end`` (kind None: it cannot end there)."""
        if end == len(buf) and not final:
            return -1
        if kind is None:
            return self._lex_error(buf, pos, end)
        self._token(kind, buf[pos:end], self._loc_offset(pos))
        self._skew = True
        return end

    def _advance(self, buf: bytes, upto: int) -> None:
        """Move the saved lexer position over ``buf[:upto]``."""
        self._line, self._col = self._position(buf, upto)

    def _position(self, buf: bytes, upto: int) -> tuple[int, int]:
        newlines = buf.count(b"\n", 0, upto)
        if not newlines:
            return self._line, self._col + upto
        return self._line + newlines, upto - buf.rfind(b"\n", 0, upto)

    # -- streamer ------------------------------------------------------------

    def _token(self, kind: int, text: bytes, loc: int, size: int = 0) -> None:
        """QEMU's json_message_process_token(): boundaries, limits, error recovery.

        ``size`` stands for the length of a huge token passed without its bytes.
        """
        self._token_size += size or len(text) or 1
        self._token_count += 1
        underflow = False
        if kind == _LCURLY:
            self._braces += 1
        elif kind == _RCURLY:
            if self._braces:
                self._braces -= 1
            else:
                underflow = True
        elif kind == _LSQUARE:
            self._brackets += 1
        elif kind == _RSQUARE:
            if self._brackets:
                self._brackets -= 1
            else:
                underflow = True
        if not self._error:
            error: str | None = None
            if self._token_size >= MAX_TOKEN_SIZE:
                error = "JSON token size limit exceeded"
            elif self._token_count > MAX_TOKEN_COUNT:
                error = "JSON token count limit exceeded"
            elif self._braces + self._brackets > MAX_NESTING:
                error = "JSON nesting depth limit exceeded"
            else:
                try:
                    self._parse(kind, text)
                except _Fail as fail:
                    line, col = self._position(self._cur, loc)
                    detail = fail.detail[:_MAX_MESSAGE].decode("utf-8", "replace")
                    error = f"{line}:{col}: JSON parse error, {detail}"
            if error is not None:
                self._out.append(JSONParseError(error))
                self._error = True
        if (kind in (_ERR, _EOI) or underflow
                or (self._braces == 0 and self._brackets == 0)):
            self._error = False
            self._braces = self._brackets = 0
            self._token_count = self._token_size = 0
            self._stack.clear()

    # -- push parser ---------------------------------------------------------

    def _parse(self, kind: int, text: bytes) -> None:
        """Feed one token to the push parser; a finished top-level value goes to _out."""
        stack = self._stack
        if kind == _ERR:
            raise _Fail(b"stray '" + text + b"'")
        if kind == _EOI:
            if stack:
                raise _Fail(b"premature end of input")
            return
        frame = stack[-1] if stack else None
        state = frame.state if frame is not None else _BEFORE_VALUE
        value: object
        if frame is not None and state == _AFTER_LCURLY and kind == _RCURLY:
            value = stack.pop().container
        elif frame is not None and state == _AFTER_LSQUARE and kind == _RSQUARE:
            value = stack.pop().container
        elif frame is not None and state in (_AFTER_LCURLY, _BEFORE_KEY):
            if kind != _STR:
                raise _Fail(b"expecting key")
            frame.key = parse_string(text)
            frame.state = _END_OF_KEY
            return
        elif frame is not None and state == _END_OF_KEY:
            if kind != _COLON:
                raise _Fail(b"expecting ':'")
            frame.state = _BEFORE_VALUE
            return
        elif frame is not None and state == _END_OF_VALUE:
            is_list = isinstance(frame.container, list)
            if kind == _COMMA:
                frame.state = _BEFORE_VALUE if is_list else _BEFORE_KEY
                return
            if kind != (_RSQUARE if is_list else _RCURLY):
                raise _Fail(b"expected ',' or ']'" if is_list else b"expected ',' or '}'")
            value = stack.pop().container
        else:
            # _BEFORE_VALUE or _AFTER_LSQUARE with something other than ']'
            if kind == _LCURLY:
                stack.append(_Frame({}, _AFTER_LCURLY))
                return
            if kind == _LSQUARE:
                stack.append(_Frame([], _AFTER_LSQUARE))
                return
            value = self._scalar(kind, text)
        self._store(value)

    @staticmethod
    def _scalar(kind: int, text: bytes) -> object:
        """A string, number or keyword token's value."""
        if kind == _STR:
            return parse_string(text)
        if kind == _INT or kind == _FLOAT:
            return _number(kind, text)
        if kind == _KW:
            if text == b"true":
                return True
            if text == b"false":
                return False
            if text == b"null":
                return None
            raise _Fail(b"invalid keyword '" + text + b"'")
        raise _Fail(b"expecting value")

    def _store(self, value: object) -> None:
        """Put a finished value into its container, or emit it at top level."""
        if not self._stack:
            self._out.append(value)
            return
        frame = self._stack[-1]
        container = frame.container
        if isinstance(container, list):
            container.append(value)
        else:
            key = frame.key
            assert key is not None
            if key in container:
                raise _Fail(b"duplicate key")
            container[key] = value
            frame.key = None
        frame.state = _END_OF_VALUE


def parse_json_text(text: str) -> object:
    """One JSON value from a command-line argument, QEMU's qobject_from_json().

    The first error wins; a second value is ``Expecting at most one JSON value``, none at
    all ``Expecting a JSON value``.  Raises QMPError with QEMU's text.
    """
    parser = JSONStreamParser()
    items = parser.feed(text.encode("utf-8", "surrogateescape")) + parser.feed_eof()
    if not items:
        raise QMPError("Expecting a JSON value")
    first = items[0]
    if isinstance(first, JSONParseError):
        raise QMPError(first.desc)
    if len(items) > 1:
        raise QMPError("Expecting at most one JSON value")
    return first
