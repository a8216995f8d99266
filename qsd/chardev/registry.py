"""The daemon's chardevs by id, listed in the order QEMU's query-chardev shows them.

QEMU keeps chardevs as children of the ``/chardevs`` QOM container, a GLib hash table,
and builds query-chardev's list by prepending while it walks that table; the order is
therefore the table's iteration order reversed, which ``GHashSet`` replays.
"""

from __future__ import annotations

from collections.abc import Iterator

from qsd.chardev.base import Chardev
from qsd.qapi.hashorder import GHashSet


class Chardevs:
    def __init__(self) -> None:
        self._by_id: dict[str, Chardev] = {}
        self._order = GHashSet()

    def __contains__(self, chardev_id: object) -> bool:
        return chardev_id in self._by_id

    def __iter__(self) -> Iterator[Chardev]:
        return iter(list(self._by_id.values()))

    def get(self, chardev_id: str) -> Chardev | None:
        return self._by_id.get(chardev_id)

    def add(self, chardev: Chardev) -> None:
        assert chardev.id not in self._by_id
        self._by_id[chardev.id] = chardev
        self._order.insert(chardev.id)

    def remove(self, chardev_id: str) -> Chardev:
        self._order.remove(chardev_id)
        return self._by_id.pop(chardev_id)

    def query(self) -> list[dict[str, object]]:
        """query-chardev's reply."""
        return [{"label": chardev.id, "filename": chardev.filename(),
                 "frontend-open": chardev.frontend is not None}
                for chardev in (self._by_id[key] for key in reversed(list(self._order)))]

    def take_all(self) -> list[Chardev]:
        """Empties the registry and returns what it held (for the caller to close)."""
        chardevs = list(self._by_id.values())
        self._by_id.clear()
        self._order = GHashSet()
        return chardevs
