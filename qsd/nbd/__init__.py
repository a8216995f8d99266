"""QEMU's NBD server: listener and handshake (main loop), transmission (export's loop).

``protocol`` holds the wire constants, ``server`` accepts connections and runs the
fixed-newstyle handshake, ``transmission`` is the per-request hot path.
"""
