"""object-add (and ``--object``) and object-del: the one way user-creatable objects come
and go, in the order QEMU's user_creatable_add_type() does things.

That order shows in the errors: the options are visited as a whole first (type errors),
then each property's setter runs, in QDict order (range and consistency errors), then
the object joins /objects (duplicate ids), and only then is it completed (errors about
files, secrets, the combination of values), leaving /objects again if that fails.
"""

from __future__ import annotations

from qsd import qapi
from qsd.errors import QMPError
from qsd.qapi.generated import ObjectOptions
from qsd.qapi.hashorder import qdict_order
from qsd.qom.model import Container, QOMObject, creatable_class


def add_object(objects: Container[QOMObject], options: ObjectOptions) -> QOMObject:
    qom_type = options.qom_type.value
    cls = creatable_class(qom_type)
    if cls is None:
        raise QMPError(f"invalid object type: {qom_type}")
    obj = cls()
    given = dict(qapi.present_members(options))
    for name in qdict_order(given):
        if name in ("qom-type", "id"):
            continue
        prop = obj.qom_class.find_property(name)
        assert prop is not None, f"{qom_type}.{name}"
        prop.assign(obj, given[name], visited=True)
    objects.add_child(options.id, obj)
    try:
        obj.complete()
    except BaseException:
        objects.remove_child(options.id)
        raise
    return obj


def delete_object(objects: Container[QOMObject], object_id: str) -> None:
    obj = objects.get(object_id)
    if obj is None:
        raise QMPError(f"object '{object_id}' not found")
    obj.check_delete()
    objects.remove_child(object_id)
    obj.finalize()
