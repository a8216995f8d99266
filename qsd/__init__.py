"""qsd: QEMU's qemu-storage-daemon rebuilt in Python."""

# The QEMU release whose daemon qsd follows; reported by query-version and the greeting.
QEMU_VERSION = (11, 1, 0)
PACKAGE = "qsd 0.1.0"
