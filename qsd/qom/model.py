"""QEMU's object model (QOM) for the objects qsd has: types with typed properties in one
registry, and the tree under "/" that the qom-* commands walk.

Management tools address objects by path (``/objects/io0``) and read or change them by
property name, and object-add creates every user-creatable type the same way. So each
object type declares its properties once, as a class attribute ``qom_properties`` (name,
QAPI type, getter, setter, in the order QEMU's class_init adds them), and object-add,
``--object`` and qom-set all go through those setters. QEMU keeps properties and children
in GLib hash tables, and that order is what its listings show, so the listings here
replay it (see ``qsd.qapi.hashorder``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, ClassVar, NamedTuple, TypeVar

from qsd import qapi
from qsd.errors import QMPError
from qsd.qapi.hashorder import GHashSet

INT64_MAX = (1 << 63) - 1

# qom-list's names for the builtin QAPI types; any other type is shown by its name.
_DISPLAY_NAMES = {"str": "string"}


class Property(NamedTuple):
    """A class property. ``qapi`` is the QAPI type a new value is visited as, ``get``
    returns the value in wire form, ``set`` (None: read-only) takes the visited value.
    ``guard`` refuses a change before the value is even looked at."""

    name: str
    qapi: str
    get: Callable[[Any], object]
    set: Callable[[Any, Any], None] | None = None
    guard: Callable[[Any], None] | None = None

    def assign(self, obj: QOMObject, value: object, *, visited: bool) -> None:
        """Sets the property from a wire value, or from one the caller ``visited``."""
        assert self.set is not None
        if self.guard is not None:
            self.guard(obj)
        if not visited:
            value = qapi.parse_type(self.qapi, value, name=self.name)
        self.set(obj, value)

    @property
    def type(self) -> str:
        """The type qom-list shows: ``[QAuthZListRule]`` is shown as its element."""
        name = self.qapi.strip("[]")
        return _DISPLAY_NAMES.get(name, name)


def _hash_order(names: Iterable[str]) -> list[str]:
    table = GHashSet()
    for name in names:
        table.insert(name)
    return list(table)


class ObjectClass:
    """A registered type: its parent, the interfaces it declares itself, and its own
    properties; everything else is inherited along the parent chain."""

    def __init__(self, name: str, parent: ObjectClass | None, *, abstract: bool = False,
                 interfaces: Iterable[ObjectClass] = (),
                 properties: Iterable[Property] = ()) -> None:
        self.name = name
        self.parent = parent
        self.abstract = abstract
        self.interfaces = tuple(interfaces)
        self.own_properties = {prop.name: prop for prop in properties}
        self._hash_ordered = [self.own_properties[name]
                              for name in _hash_order(self.own_properties)]

    def ancestry(self) -> Iterator[ObjectClass]:
        """This class, its parent, ... up to the root type."""
        cls: ObjectClass | None = self
        while cls is not None:
            yield cls
            cls = cls.parent

    def implements(self, name: str) -> bool:
        """QEMU's object_class_dynamic_cast(): a parent or a declared interface."""
        for cls in self.ancestry():
            if cls.name == name:
                return True
            if any(iface.implements(name) for iface in cls.interfaces):
                return True
        return False

    def find_property(self, name: str) -> Property | None:
        for cls in self.ancestry():
            prop = cls.own_properties.get(name)
            if prop is not None:
                return prop
        return None

    def iter_properties(self) -> Iterator[Property]:
        """In the order QEMU's property iterator yields them: this class's table first."""
        for cls in self.ancestry():
            yield from cls._hash_ordered

    def __repr__(self) -> str:
        return f"<ObjectClass {self.name!r}>"


_TYPES: dict[str, ObjectClass] = {}
# The Python class of each type object-add can create, by its ObjectType name.
_CREATABLE: dict[str, type[QOMObject]] = {}


def register_type(cls: ObjectClass) -> ObjectClass:
    if cls.name in _TYPES:
        raise RuntimeError(f"QOM type {cls.name!r} registered twice")
    _TYPES[cls.name] = cls
    return cls


# The module that defines each type object-add can create, by its ObjectType name. A
# module registers its types when it is imported; object-add imports only the one it
# needs, so that starting without TLS objects never loads cryptography.
TYPE_MODULES = {
    "authz-list": "qsd.authz",
    "authz-listfile": "qsd.authz",
    "authz-simple": "qsd.authz",
    "iothread": "qsd.iothread",
    "main-loop": "qsd.iothread",
    "secret": "qsd.crypto.secret",
    "throttle-group": "qsd.block.throttle_groups",
    "tls-creds-psk": "qsd.crypto.tlscreds",
    "tls-creds-x509": "qsd.crypto.tlscreds",
}


def load_all_types() -> None:
    for module in dict.fromkeys(TYPE_MODULES.values()):
        importlib.import_module(module)


def type_by_name(name: str) -> ObjectClass | None:
    load_all_types()
    return _TYPES.get(name)


def all_types() -> list[ObjectClass]:
    load_all_types()
    return list(_TYPES.values())


def creatable_class(qapi_name: str) -> type[QOMObject] | None:
    module = TYPE_MODULES.get(qapi_name)
    if module is not None:
        importlib.import_module(module)
    return _CREATABLE.get(qapi_name)


INTERFACE = register_type(ObjectClass("interface", None, abstract=True))
USER_CREATABLE = register_type(ObjectClass("user-creatable", INTERFACE, abstract=True))


class QOMObject:
    """An object in the tree. A subclass becomes a QOM type of its own by passing
    ``qom_type=`` in its class statement, with ``properties`` (its own, in the order
    QEMU's class_init adds them), ``abstract`` and ``interfaces``; one without it is the
    same QOM type as its base. ``qapi_name`` is the ObjectType name object-add knows a
    user-creatable type by, where that differs from its QOM name.

    The user-creatable hooks follow QEMU's UserCreatable: ``complete`` runs once every
    property given to object-add is set (the object is already in the tree, so it can
    look other objects up), ``check_delete`` refuses object-del, ``finalize`` releases
    what the object holds after it left the tree.
    """

    qom_class: ClassVar[ObjectClass]

    qom_parent: Container[Any] | None = None
    qom_name: str | None = None

    def __init_subclass__(cls, *, qom_type: str | None = None,
                          properties: Iterable[Property] = (), abstract: bool = False,
                          interfaces: tuple[str, ...] = (), qapi_name: str | None = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if qom_type is None:
            return
        parent: ObjectClass = next(vars(base)["qom_class"] for base in cls.__mro__[1:]
                                   if "qom_class" in vars(base))
        ifaces = []
        for name in interfaces:
            iface = _TYPES.get(name)  # not type_by_name: a module is being imported
            assert iface is not None, name
            ifaces.append(iface)
        cls.qom_class = register_type(ObjectClass(
            qom_type, parent, abstract=abstract, interfaces=ifaces, properties=properties))
        if not abstract and cls.qom_class.implements(USER_CREATABLE.name):
            _CREATABLE[qapi_name or qom_type] = cls

    @property
    def id(self) -> str:
        """The name under the parent (an object's id under /objects)."""
        return self.qom_name or ""

    def qom_children(self) -> Iterable[tuple[str, QOMObject]]:
        """Child properties, in QEMU's order; only containers have them here."""
        return ()

    def complete(self) -> None:
        """Runs once object-add has set every property given."""

    def check_delete(self) -> None:
        """Raises QMPError when object-del must refuse to delete this object."""

    def finalize(self) -> None:
        """Releases what the object holds, after it left the tree."""


QOMObject.qom_class = register_type(ObjectClass("object", None, abstract=True, properties=(
    Property("type", "str", get=lambda obj: obj.qom_class.name),)))


C = TypeVar("C", bound=QOMObject)


class Container(QOMObject, Mapping[str, C], qom_type="container"):
    """A node of the tree that only holds children ("/", "/objects", "/chardevs"), of
    type ``C``.

    Its mapping interface gives the children by name in creation order; the order QEMU
    lists them in is kept separately, since it depends on every addition and removal.
    """

    def __init__(self) -> None:
        self._children: dict[str, C] = {}
        self._order = GHashSet()

    def add_child(self, name: str, child: C) -> None:
        if name in self._children or self.qom_class.find_property(name) is not None:
            raise QMPError(f"attempt to add duplicate property '{name}' to object "
                           f"(type '{self.qom_class.name}')")
        self._children[name] = child
        self._order.insert(name)
        child.qom_parent = self
        child.qom_name = name

    def remove_child(self, name: str) -> C:
        child = self._children.pop(name)
        self._order.remove(name)
        child.qom_parent = None
        return child

    def __getitem__(self, name: str) -> C:
        return self._children[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def qom_children(self) -> Iterable[tuple[str, QOMObject]]:
        return [(name, self._children[name]) for name in self._order]


def canonical_path(obj: QOMObject) -> str:
    parts = []
    while obj.qom_parent is not None:
        parts.append(obj.id)
        obj = obj.qom_parent
    return "/" + "/".join(reversed(parts))


def _child(obj: QOMObject, name: str) -> QOMObject | None:
    return obj.get(name) if isinstance(obj, Container) else None


def _resolve_absolute(obj: QOMObject, parts: list[str]) -> QOMObject | None:
    """Empty components are skipped, so "//objects/" is "/objects"."""
    for part in parts:
        if part:
            found = _child(obj, part)
            if found is None:
                return None
            obj = found
    return obj


def _resolve_partial(parent: QOMObject, parts: list[str], ambiguous: list[bool]
                     ) -> QOMObject | None:
    """A relative path matches below any object of the tree; two matches are ambiguous
    (an empty path matches every object)."""
    obj = _resolve_absolute(parent, parts)
    for _, child in parent.qom_children():
        found = _resolve_partial(child, parts, ambiguous)
        if found is not None:
            if obj is not None:
                ambiguous[0] = True
                return None
            obj = found
        if ambiguous[0]:
            return None
    return obj


def resolve_path(root: QOMObject, path: str) -> tuple[QOMObject | None, bool]:
    """QEMU's object_resolve_path(): the object and whether the path was ambiguous."""
    parts = path.split("/") if path else []
    if parts and parts[0] == "":
        return _resolve_absolute(root, parts[1:]), False
    ambiguous = [False]
    return _resolve_partial(root, parts, ambiguous), ambiguous[0]


def list_properties(obj: QOMObject) -> list[tuple[str, str, Callable[[], object]]]:
    """(name, type, getter) for qom-list: QEMU walks the object's own table (children)
    and then each class's, prepending each to its reply, so the root type comes first."""
    found: list[tuple[str, str, Callable[[], object]]] = []
    for name, child in obj.qom_children():
        found.append((name, f"child<{child.qom_class.name}>", partial(canonical_path, child)))
    for prop in obj.qom_class.iter_properties():
        found.append((prop.name, prop.type, partial(prop.get, obj)))
    found.reverse()
    return found


def class_properties(cls: ObjectClass) -> list[tuple[str, str]]:
    """qom-list-properties: (name, type) of what an object of ``cls`` starts with."""
    return [(prop.name, prop.type) for prop in reversed(list(cls.iter_properties()))]


def get_property(obj: QOMObject, name: str) -> object:
    child = _child(obj, name)
    if child is not None:
        return canonical_path(child)
    prop = obj.qom_class.find_property(name)
    if prop is None:
        raise QMPError(f"Property '{obj.qom_class.name}.{name}' not found")
    return prop.get(obj)


def set_property(obj: QOMObject, name: str, value: object) -> None:
    """qom-set: ``value`` is visited as the property's QAPI type, then set."""
    prop = obj.qom_class.find_property(name)
    if prop is None and _child(obj, name) is None:
        raise QMPError(f"Property '{obj.qom_class.name}.{name}' not found")
    if prop is None or prop.set is None:
        raise QMPError(f"Property '{obj.qom_class.name}.{name}' is not writable")
    prop.assign(obj, value, visited=False)


def non_negative(name: str, value: int, maximum: int = INT64_MAX) -> int:
    """The range check most integer properties share, with QEMU's text."""
    if not 0 <= value <= maximum:
        raise QMPError(f"{name} value must be in range [0, {maximum}]")
    return value


def store(attr: str) -> Callable[[Any, Any], None]:
    """The setter of a property that is only kept, for the object to use when it wants."""
    return lambda obj, value: setattr(obj, attr, value)


def read_string(attr: str) -> Callable[[Any], str]:
    """The getter of a string property: one that is not set reads as "" (QEMU's NULL)."""
    return lambda obj: getattr(obj, attr) or ""


def read_enum(attr: str) -> Callable[[Any], str]:
    return lambda obj: getattr(obj, attr).value
