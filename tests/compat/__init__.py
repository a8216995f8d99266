"""The differential suite: qsd against transcripts recorded from QEMU 11.1.3's daemon."""
