"""QEMU's KEY=VALUE,... command-line syntax (``util/keyval.c``) as nested dicts.

Used for ``--blockdev``, ``--export``, ``--object`` and ``--nbd-server`` (QEMU's
``--chardev`` and ``--monitor`` go through the older QemuOpts parser, which agrees with
this one for flat options such as ``--monitor m`` -> ``{"chardev": "m"}``).

Syntax and meaning, as QEMU 11.1 has them (texts verified against Debian's 7.2 daemon,
whose keyval.c is the same):

- ``key=value`` pairs separated by ``,``; a value runs to the next single ``,`` and ``,,``
  stands for a literal comma.  A trailing ``,`` is allowed.  Values are strings.
- A key is fragments joined by ``.``: ``a.b=1`` is ``{"a": {"b": "1"}}``.  The first
  fragment must be a QAPI name (letter first, then letters, digits, ``-``, ``_``;
  optionally a ``__RFQDN_`` prefix); later ones may instead be decimal indexes.  A dict
  whose keys are all indexes becomes a list and the indexes must be 0..n-1
  (``Parameter 'a.0' missing``).  Fragments are at most 127 characters.
- The same key twice: the last value wins (``--blockdev null-co,a=1,a=2`` fails only
  later, in the QAPI visitor: ``Parameter 'a' is unexpected``).
- With an implied key, a leading element without ``=`` is its value: ``--blockdev
  file,filename=x`` -> ``driver=file``.  That value ends at the first ``,`` or ``=``, so
  ``,,`` does not escape there (``null-co,,x`` -> ``Invalid parameter ''``).
- An element ``help`` or ``?`` without ``=`` asks for help; where the option offers none
  (everything but ``--object``) that is ``Help is not available for this option``, reported
  after the rest parsed fine.

Error texts: ``Invalid parameter 'KEY'``, ``Expected '=' after parameter 'KEY'``,
``Parameter 'KEY' is too long``, ``Parameter fragment 'FRAG' is too long``, ``Parameters
'PREFIX.*' used inconsistently``, ``Parameter 'PREFIX.N' missing``, ``Help is not
available for this option``.  Callers prefix them QEMU's way (``--blockdev ARG: text``).
"""

from __future__ import annotations

import re

from qsd.errors import QMPError

KeyvalDict = dict[str, object]

_MAX_FRAGMENT = 127
_INT_MAX = (1 << 31) - 1
_DIGITS = re.compile(r"[0-9]+")
# QEMU's parse_qapi_name(name, complete=false): optional downstream "__RFQDN_" prefix.
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*", re.ASCII)
_INDEX_KEY = re.compile(r"[0-9]")


def is_json_arg(arg: str) -> bool:
    """Whether a CLI option argument uses the JSON form, as QEMU decides: a leading ``{``."""
    return arg.startswith("{")


def keyval_parse(params: str, implied_key: str | None = None) -> KeyvalDict:
    """Parse ``params`` for an option without help support (all but ``--object``)."""
    result, want_help = keyval_parse_help(params, implied_key)
    if want_help:
        raise QMPError("Help is not available for this option")
    return result


def keyval_parse_help(params: str, implied_key: str | None = None) -> tuple[KeyvalDict, bool]:
    """Parse ``params``; also say whether a ``help``/``?`` element asked for help."""
    root: KeyvalDict = {}
    want_help = False
    pos = 0
    while pos < len(params):
        pos, asked = _parse_one(root, params, pos, implied_key)
        want_help = want_help or asked
        implied_key = None
    if want_help:
        return root, True
    _listify(root, "")
    return root, False


def _key_index(key: str) -> int:
    """QEMU's key_to_index(): the leading digits as a number capped at INT_MAX, or -1."""
    m = _DIGITS.match(key)
    if m is None:
        return -1
    return min(int(m.group()), _INT_MAX)


def _parse_one(root: KeyvalDict, params: str, pos: int,
               implied_key: str | None) -> tuple[int, bool]:
    """One element starting at ``pos``; returns where the next one starts."""
    stop = _find_any(params, pos, "=,")
    implied_value: str | None = None
    key = params[pos:stop]
    if stop > pos and not params.startswith("=", stop):
        if key in ("help", "?"):
            return (stop + 1 if stop < len(params) else stop), True
        if implied_key is not None:
            implied_value = key
            key = implied_key

    cur = root
    frag_start = 0
    fragment = ""
    while True:
        if frag_start and (m := _DIGITS.match(key, frag_start)):
            length = m.end() - frag_start
        else:
            m = _QAPI_NAME.match(key, frag_start)
            length = m.end() - frag_start if m else 0
        end = frag_start + length
        if not length or (end < len(key) and key[end] != "."):
            raise QMPError(f"Invalid parameter '{key}'")
        if length > _MAX_FRAGMENT:
            kind = " fragment" if frag_start or end != len(key) else ""
            raise QMPError(f"Parameter{kind} '{key[frag_start:end]}' is too long")
        if frag_start:
            cur = _put_dict(cur, fragment, key[:frag_start - 1])
        fragment = key[frag_start:end]
        if end == len(key):
            break
        frag_start = end + 1

    if implied_value is not None:
        value = implied_value
        pos = stop + 1 if stop < len(params) else stop
    else:
        if not params.startswith("=", stop):
            raise QMPError(f"Expected '=' after parameter '{key}'")
        value, pos = _read_value(params, stop + 1)
    old = cur.get(fragment)
    if old is not None and not isinstance(old, str):
        raise QMPError(f"Parameters '{key}.*' used inconsistently")
    cur[fragment] = value
    return pos, False


def _find_any(text: str, start: int, chars: str) -> int:
    """Index of the first of ``chars`` at or after ``start``, or len(text)."""
    found = [i for i in (text.find(c, start) for c in chars) if i >= 0]
    return min(found) if found else len(text)


def _read_value(params: str, pos: int) -> tuple[str, int]:
    """A value up to a single comma (``,,`` is a comma); returns it and the next start."""
    parts: list[str] = []
    while True:
        comma = params.find(",", pos)
        if comma < 0:
            parts.append(params[pos:])
            return "".join(parts), len(params)
        parts.append(params[pos:comma])
        if not params.startswith(",", comma + 1):
            return "".join(parts), comma + 1
        parts.append(",")
        pos = comma + 2


def _put_dict(cur: KeyvalDict, fragment: str, key_so_far: str) -> KeyvalDict:
    """The dict at ``cur[fragment]``, created if absent; a string there is a conflict."""
    old = cur.get(fragment)
    if old is None:
        new: KeyvalDict = {}
        cur[fragment] = new
        return new
    if not isinstance(old, dict):
        raise QMPError(f"Parameters '{key_so_far}.*' used inconsistently")
    return old


def _listify(cur: KeyvalDict, prefix: str) -> object:
    """Turn dicts whose keys are all indexes into lists, depth first (keyval_listify)."""
    has_index = has_member = False
    for name, value in cur.items():
        if _INDEX_KEY.match(name):
            has_index = True
        else:
            has_member = True
        if isinstance(value, dict):
            cur[name] = _listify(value, f"{prefix}{name}.")
    if has_index and has_member:
        raise QMPError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    elements: dict[int, object] = {}
    for name, value in cur.items():
        elements[_key_index(name)] = value
    # QEMU only looks at indexes below the number of keys; a larger one leaves a gap.
    for i in range(min(len(cur), max(elements) + 1)):
        if i not in elements:
            raise QMPError(f"Parameter '{prefix}{i}' missing")
    top = max(elements)
    if top >= len(cur):
        raise QMPError(f"Parameter '{prefix}{len(cur)}' missing")
    # "0" and "00" are distinct keys but one index: the later one wins, as in QEMU.
    return [elements[i] for i in range(top + 1)]
