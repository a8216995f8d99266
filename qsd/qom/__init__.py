"""QEMU's object model: object types with typed properties, the /objects tree, and the
object-add/object-del lifecycle (see docs/ARCHITECTURE.md)."""
