"""The qcow2 format: ``format`` (on-disk layout, shared with image creation), ``l2``
(entries and subclusters), ``cache`` (write-back metadata caches), ``refcount``
(allocation), ``compress``, ``check`` (repairs), ``options`` and ``driver`` (the node)."""

from qsd.block.drivers.qcow2 import driver as driver
