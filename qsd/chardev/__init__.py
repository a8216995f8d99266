"""Character devices (QEMU's chardevs): the byte streams that QMP monitors sit on.

``base`` has what every backend shares (the frontend hook, the log file, connections)
and the null backend, ``socket`` and ``file`` (file and stdio) are the others,
``builder`` turns a ``ChardevBackend`` into an open chardev for both ``--chardev`` and
``chardev-add``, ``options`` reads the command line's QemuOpts syntax into that same
``ChardevBackend``. Chardevs are QOM objects: the daemon's are the children of the
/chardevs container, by id.
"""
