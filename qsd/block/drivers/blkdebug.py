"""The ``blkdebug`` filter: its ``image`` child's data, with requests that fail on
purpose (QEMU's block/blkdebug.c), so that tests can make any read, write, zero-write,
discard, flush or block-status request fail with a chosen errno.

Rules come from the ``inject-error`` and ``set-state`` options and from a ``config`` file
of ``[inject-error]``/``[set-state]`` sections (QEMU's config-file syntax, see
``blkdebug_config``).  A rule does nothing until its *event* fires: the block layer and
the drivers above raise events on this node as requests pass (``read_aio`` when a format
reads data from it, ``pwritev`` when a write reaches it, ``flush_to_disk`` before it is
flushed, ...; ``none`` once at open).  An event arms every ``inject-error`` rule for it
whose ``state`` matches the node's state (replacing the rules armed before) and applies
its ``set-state`` rules.  An armed rule fails each request of its ``iotype`` that touches
its ``sector`` (or any request), after yielding to the loop unless ``immediately``; a
``once`` rule is dropped after its first failure.

The node also announces the limits given as options (``align``, ``max-transfer``, ...)
so that the block layer's splitting and read-modify-write paths can be exercised.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import threading
from typing import Any

from qsd.block import io
from qsd.block.limits import INT_MAX, BlockLimits
from qsd.block.node import (
    BLOCK_OFFSET_VALID,
    BLOCK_RAW,
    BlockNode,
    BlockStatus,
    Child,
    ChildOpener,
    Data,
)
from qsd.block.permissions import QAPI_NAMES, ChildRole, default_child_perm
from qsd.block.registry import register
from qsd.errors import QMPError
from qsd.qapi.generated import BlkdebugEvent, BlkdebugIOType, BlockdevOptionsBlkdebug
from qsd.qapi.hashorder import qdict_order

IOTYPES = list(BlkdebugIOType)
# What a rule without ``iotype`` fails: everything but block status.
DEFAULT_IOTYPES = sum(1 << IOTYPES.index(t) for t in IOTYPES
                      if t is not BlkdebugIOType.block_status)
# The options that are sizes to QEMU (QemuOpts QEMU_OPT_SIZE), in the order it checks
# them against the alignment.
SIZE_OPTIONS = ("align", "max-transfer", "opt-write-zero", "max-write-zero",
                "opt-discard", "max-discard")
# Options that change what the node does, so that they make a json: filename.
STRONG = ("config", *SIZE_OPTIONS)
RULE_LISTS = ("inject-error", "set-state")
# Each section's options and their QemuOpts types.
GROUPS = {
    "inject-error": {"event": "string", "state": "number", "iotype": "string",
                     "errno": "number", "sector": "number", "once": "bool",
                     "immediately": "bool", "delay-ns": "number"},
    "set-state": {"event": "string", "state": "number", "new_state": "number"},
}
_BOOLS = {"on": True, "yes": True, "true": True, "y": True,
          "off": False, "no": False, "false": False, "n": False}
# The sscanf() patterns of QEMU's qemu_config_parse(), as regular expressions (a
# conversion takes what it can and never gives back: possessive quantifiers).
_GROUP_WITH_ID = re.compile(r'\[(\S{1,63}+)\s*"([^"]{1,63})')
_GROUP = re.compile(r"\[([^\]]{1,63})")
_ASSIGN = re.compile(r'\s*(\S{1,63}+)\s*=\s*"([^"]{1,1023})')
_NAME = re.compile(r"\s*(\S{1,63}+)")


def _number(text: str) -> int | None:
    """QEMU's qemu_strtou64(text, base 0): the whole text, wrapped to 64 bits."""
    body = text.lstrip()
    sign = -1 if body.startswith("-") else 1
    body = body[1:] if body[:1] in "+-" else body
    try:
        if body[:2].lower() == "0x":
            value = int(body[2:], 16)
        elif body.startswith("0") and len(body) > 1:
            value = int(body[1:], 8)
        else:
            value = int(body, 10)
    except ValueError:
        return None
    if not body[:1].isalnum() or value >= 1 << 64:
        return None
    return (sign * value) % (1 << 64)


class Section:
    """One ``[inject-error]`` or ``[set-state]`` group: its options as strings, set one
    by one with QemuOpts' checks (qemu_opt_set)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.values: dict[str, str] = {}

    def set(self, name: str, value: str) -> None:
        kind = GROUPS[self.group].get(name)
        if kind is None:
            raise QMPError(f"Invalid parameter '{name}'")
        if kind == "number" and _number(value) is None:
            raise QMPError(f"Parameter '{name}' expects a number")
        if kind == "bool" and value not in _BOOLS:
            raise QMPError(f"Parameter '{name}' expects 'on' or 'off'")
        self.values[name] = value

    def number(self, name: str, default: int) -> int:
        value = self.values.get(name)
        return default if value is None else _number(value) or 0

    def flag(self, name: str) -> bool:
        return _BOOLS.get(self.values.get(name, "off"), False)

    @property
    def event(self) -> str:
        return self.values["event"]

    def iotype(self) -> str | None:
        return self.values.get("iotype")

    def check(self) -> None:
        """add_rule()'s checks: an event that exists, an iotype that exists."""
        event = self.values.get("event")
        if event is None:
            raise QMPError("Missing event name for rule")
        if event not in BlkdebugEvent.__members__.values():
            raise QMPError(f"invalid parameter value: {event}")
        iotype = self.values.get("iotype")
        if self.group == "inject-error" and iotype is not None \
                and iotype not in BlkdebugIOType.__members__.values():
            raise QMPError(f"invalid parameter value: {iotype}")


def _parse_file(path: str) -> list[Section]:
    """QEMU's qemu_config_parse(): ``[group]`` lines open a section, ``key = "value"``
    lines set an option of the open one, empty lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as exc:
        raise QMPError(f"Could not open '{path}': {os.strerror(exc.errno or 0)}") from None
    sections: list[Section] = []
    current: Section | None = None
    for line in lines:
        if line.startswith(("\n", "#")):
            continue
        match = _GROUP_WITH_ID.match(line) or _GROUP.match(line)
        if match:
            group = match.group(1)
            if group not in GROUPS:
                raise QMPError(f"There is no option group '{group}'")
            current = Section(group)
            sections.append(current)
            continue
        # ' %63s = "%1023[^"]"', else ' %63s = ""', which counts the name alone.
        match = _ASSIGN.match(line) or _NAME.match(line)
        if match is None:
            raise QMPError("parse error")
        if current is None:
            raise QMPError("no group defined")
        current.set(match.group(1), match.group(2) if match.re is _ASSIGN else "")
    return sections


def _wire_text(value: object) -> str:
    """How QemuOpts sees an option value given over QMP."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _rules(explicit: dict[str, object], group: str) -> list[dict[str, object]]:
    """The rules of ``group`` among the options as given (wire form)."""
    rules = explicit.get(group)
    return rules if isinstance(rules, list) else []


def read_config(path: str | None, explicit: dict[str, object]) -> list[Section]:
    """QEMU's read_config(): the file's sections, then the options' rules, checked and
    returned inject-error sections first."""
    sections = _parse_file(path) if path is not None else []
    for group in RULE_LISTS:
        for rule in _rules(explicit, group):
            section = Section(group)
            for name, value in rule.items():
                section.set(name, _wire_text(value))
            sections.append(section)
    ordered = [s for s in sections if s.group == "inject-error"] + \
              [s for s in sections if s.group == "set-state"]
    for section in ordered:
        section.check()
    return ordered


def _c_int(value: int) -> int:
    """A QemuOpts number (an unsigned 64-bit value) stored in a C int."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _int64(value: int) -> int:
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


class Rule:
    """One rule: its event, the state it applies in, and what it does."""

    def __init__(self, section: Section) -> None:
        self.event = section.event
        self.state = _c_int(section.number("state", 0))
        self.inject = section.group == "inject-error"
        if self.inject:
            self.error = _c_int(section.number("errno", errno.EIO))
            self.once = section.flag("once")
            self.immediately = section.flag("immediately")
            self.delay_ns = _int64(section.number("delay-ns", 0))
            sector = _int64(section.number("sector", -1))
            # QEMU compares the offset as an unsigned number: -1 means "any sector".
            self.offset = -1 if sector == -1 else (sector * 512) % (1 << 64)
            iotype = section.iotype()
            self.iotypes = DEFAULT_IOTYPES if iotype is None \
                else 1 << IOTYPES.index(BlkdebugIOType(iotype))
        else:
            self.new_state = _c_int(section.number("new_state", 0))

    def matches(self, offset: int, length: int, iotype: int) -> bool:
        return bool(self.iotypes & (1 << iotype)) and (
            self.offset == -1 or (length > 0 and offset <= self.offset < offset + length))


@register("blkdebug", options=BlockdevOptionsBlkdebug)
class BlkdebugNode(BlockNode):
    is_filter = True
    strong_options = STRONG

    _image: Child | None = None
    config = ""

    async def open(self, options: BlockdevOptionsBlkdebug, children: ChildOpener) -> None:
        """QEMU's blkdebug_open(): the sizes as QemuOpts sees them, the rules (file first,
        then the options), the child, then the limits against the child's alignment."""
        for name in qdict_order({k: None for k in SIZE_OPTIONS if k in self.explicit}):
            value = self.explicit[name]
            if isinstance(value, int) and value < 0:
                raise QMPError(f"Value '{value}' is out of range for parameter '{name}'")
        self.config = options.config or ""
        self._limits: dict[str, int] = {}
        sections = read_config(options.config, self.explicit)
        self._lock = threading.Lock()
        self._rules: dict[str, list[Rule]] = {}
        self._active: list[Rule] = []
        for section in sections:
            self._rules.setdefault(section.event, []).insert(0, Rule(section))
        self.state = 1
        self._take = self._perm_bits(options.take_child_perms)
        self._unshare = self._perm_bits(options.unshare_child_perms)
        self._image = await children.open_child(self, options.image, "image",
                                                ChildRole.FILTERED | ChildRole.PRIMARY)
        self._limits = self._check_limits(options, self._image.node.bl.request_alignment)
        self.debug_event(BlkdebugEvent.none)

    @staticmethod
    def _perm_bits(names: list[Any] | None) -> int:
        return sum(1 << QAPI_NAMES.index(str(name)) for name in set(names or ()))

    def _check_limits(self, options: BlockdevOptionsBlkdebug, child_align: int
                      ) -> dict[str, int]:
        values = {name: getattr(options, name.replace("-", "_")) or 0
                  for name in SIZE_OPTIONS}
        align = values["align"]
        if align and (align >= INT_MAX or align & (align - 1)):
            raise QMPError(f"Cannot meet constraints with align {align}")
        align = max(align, child_align)
        multiple_of = {"max-transfer": align, "opt-write-zero": align,
                       "max-write-zero": max(values["opt-write-zero"], align),
                       "opt-discard": align,
                       "max-discard": max(values["opt-discard"], align)}
        for name, base in multiple_of.items():
            value = values[name]
            if value and (value >= INT_MAX or value % base):
                raise QMPError(f"Cannot meet constraints with {name} {value}")
        return values

    def driver_limits(self, bl: BlockLimits) -> None:
        """QEMU's blkdebug_refresh_limits(): each option given overrides its limit."""
        for name, field in (("align", "request_alignment"),
                            ("max-transfer", "max_transfer"),
                            ("opt-write-zero", "pwrite_zeroes_alignment"),
                            ("max-write-zero", "max_pwrite_zeroes"),
                            ("opt-discard", "pdiscard_alignment"),
                            ("max-discard", "max_pdiscard")):
            if self._limits.get(name):
                setattr(bl, field, self._limits[name])

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        nperm, nshared = default_child_perm(child.role, perm, shared, not self.read_only)
        return nperm | self._take, nshared & ~self._unshare

    def filtered_child(self) -> Child | None:
        return self._image

    def allocated_size(self) -> int:
        """QEMU's protocol drivers without a size callback answer ENOTSUP."""
        return -errno.ENOTSUP

    # ---- filenames ---------------------------------------------------------------------

    def exact_filename(self) -> str:
        """``blkdebug:CONFIG:IMAGE`` while nothing but a config file is set."""
        image = self._child().node.exact_filename()
        strong = [key for key in self.full_open_options() if key not in
                  ("driver", "image", "config")]
        if not image or strong:
            return ""
        return f"blkdebug:{self.config}:{image}"

    def full_open_options(self) -> dict[str, object]:
        """The rules flattened to ``inject-error.N.KEY`` options, as QEMU keeps them, and
        copied in the order QEMU iterates its options (which decides the order of keys
        that share a QDict bucket)."""
        given = {key: self.explicit[key] for key in STRONG if key in self.explicit}
        for group in RULE_LISTS:
            for index, rule in enumerate(_rules(self.explicit, group)):
                for name, value in rule.items():
                    given[f"{group}.{index}.{name}"] = value
        opts: dict[str, object] = {"driver": self.driver}
        opts.update((key, given[key]) for key in qdict_order(given))
        opts["image"] = self._child().node.full_open_options()
        return opts

    # ---- rules ---------------------------------------------------------------------------

    def debug_event(self, event: str) -> None:
        """QEMU's blkdebug_co_debug_event(): arms the inject-error rules of ``event`` for
        the current state (the first one clears what was armed before) and applies its
        set-state rules."""
        rules = self._rules.get(event)
        if not rules:
            return
        with self._lock:
            new_state = self.state
            armed = False
            for rule in list(rules):
                if rule.state and rule.state != self.state:
                    continue
                if rule.inject:
                    if not armed:
                        self._active.clear()
                        armed = True
                    self._active.insert(0, rule)
                else:
                    new_state = rule.new_state
            self.state = new_state

    async def _check(self, offset: int, length: int, iotype: BlkdebugIOType) -> None:
        """QEMU's rule_check(): fails the request if an armed rule covers it."""
        if not self._active:
            return
        kind = IOTYPES.index(iotype)
        with self._lock:
            for rule in self._active:
                if rule.matches(offset, length, kind):
                    break
            else:
                return
            if rule.once:
                self._active.remove(rule)
                self._rules[rule.event].remove(rule)
        if rule.delay_ns > 0:
            await asyncio.sleep(rule.delay_ns / 1e9)
        if not rule.immediately:
            await asyncio.sleep(0)
        if rule.error > 0:
            raise OSError(rule.error, os.strerror(rule.error))

    # ---- requests --------------------------------------------------------------------------

    def _child(self) -> Child:
        assert self._image is not None
        return self._image

    async def do_read(self, offset: int, length: int) -> bytes:
        await self._check(offset, length, BlkdebugIOType.read)
        return await io.read(self._child(), offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await self._check(offset, len(data), BlkdebugIOType.write)
        await io.write(self._child(), offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        """Pieces smaller than the zero-write alignment are refused, so that the block
        layer's fallback to plain writes is exercised (as QEMU's blkdebug does)."""
        if length < max(self.bl.request_alignment, self.bl.pwrite_zeroes_alignment):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        await self._check(offset, length, BlkdebugIOType.write_zeroes)
        await io.write_zeroes(self._child(), offset, length, may_unmap, no_fallback, fua)

    async def do_discard(self, offset: int, length: int) -> None:
        if length < self.bl.request_alignment:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        await self._check(offset, length, BlkdebugIOType.discard)
        await io.discard(self._child(), offset, length)

    async def do_flush(self) -> None:
        await self._check(0, 0, BlkdebugIOType.flush)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await io.truncate(self._child(), length, exact, prealloc)

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        await self._check(offset, length, BlkdebugIOType.block_status)
        return BlockStatus(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset,
                           self._child().node)
