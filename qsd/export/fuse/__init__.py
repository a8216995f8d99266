"""FUSE export: the raw kernel protocol (no libfuse), one request queue per context."""
