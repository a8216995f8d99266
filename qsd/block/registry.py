"""The block driver registry: every driver, by the name ``blockdev-add`` knows it by.

A driver is one module in ``qsd/block/drivers/`` (or a package there, whose
``__init__`` imports the module that registers) holding a BlockNode subclass that
declares itself::

    @register("null-co", "null-aio", options=BlockdevOptionsNull)
    class NullNode(BlockNode): ...

The node class says everything else about the driver (class attributes, ``open``, the
``do_*`` primitives it supports, ``child_perm``, ``driver_limits``).  A driver that can
make new images (``blockdev-create``) also names its creation function::

    @register("file", options=BlockdevOptionsFile, create=create_file)

which gets the validated branch of BlockdevCreateOptions and the graph (to open the
nodes it writes to) and raises QMPError with QEMU's text when creation fails.  A lookup
imports the module named after the driver (``null-co`` lives in ``null.py``), and the
whole package only when that finds nothing, so a command line loads just the drivers it
uses; adding a driver touches only its module and the QAPI schema; tests register drivers
of their own the same way.  A driver that opens
children it defines itself (a backing file named in an image header) passes their
options to ``children.open_child`` in wire form, as a dict.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from qsd.block.node import BlockNode

N = TypeVar("N", bound=type[BlockNode])
# Makes an image from a BlockdevCreateOptions branch and the BlockGraph (QEMU's
# bdrv_co_create); typed loosely here because the graph imports this module.
Creator = Callable[[Any, Any], Awaitable[None]]

_DRIVER_PACKAGE = "qsd.block.drivers"


class BlockDriver(NamedTuple):
    """One registered driver (QEMU's BlockDriver): its name, its node class, the QAPI
    model of its options and, for drivers that make images, how."""

    name: str
    node_class: type[BlockNode]
    options: type
    create: Creator | None = None


_drivers: dict[str, BlockDriver] = {}
_loaded = False


def register(*names: str, options: type, create: Creator | None = None
             ) -> Callable[[N], N]:
    """Class decorator: the class implements the drivers ``names``."""
    def apply(cls: N) -> N:
        for name in names:
            if name in _drivers and _drivers[name].node_class is not cls:
                raise ValueError(f"block driver {name!r} registered twice")
            _drivers[name] = BlockDriver(name, cls, options, create)
        return cls
    return apply


def _load() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module(_DRIVER_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{_DRIVER_PACKAGE}.{info.name}")
    _loaded = True


def _load_module_of(name: str) -> None:
    for module in dict.fromkeys((name.replace("-", "_"), name.partition("-")[0])):
        if not module.isidentifier():
            continue
        try:
            importlib.import_module(f"{_DRIVER_PACKAGE}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{_DRIVER_PACKAGE}.{module}":
                raise
        if name in _drivers:
            return


def lookup(name: str) -> BlockDriver | None:
    if name not in _drivers and not _loaded:
        _load_module_of(name)
        if name not in _drivers:
            _load()
    return _drivers.get(name)


def drivers() -> dict[str, BlockDriver]:
    """Every registered driver by name."""
    _load()
    return dict(_drivers)
