"""Secrets, TLS credentials and TLS sessions (QEMU's ``crypto/``)."""
