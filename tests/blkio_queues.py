"""A libblkio front-end with several queues, for the vhost-user-blk tests.

Runs where libblkio is installed (it is a plain script, no qsd imports, any Python 3):

    blkio_queues.py SOCKET NUM_QUEUES QUEUE REQUESTS SEED

Connects to the vhost-user-blk socket with ``num-queues`` queues and, on queue QUEUE
only, writes REQUESTS 4 KiB blocks of a pattern derived from SEED and QUEUE (16 in
flight), reads every one back through the same queue and compares.  Prints ``ok`` and
the device capacity.
"""

import ctypes
import ctypes.util
import sys


class MemRegion(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("len", ctypes.c_size_t),
                ("iova", ctypes.c_uint64), ("fd_offset", ctypes.c_int64),
                ("fd", ctypes.c_int), ("flags", ctypes.c_uint32)]


class Completion(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_void_p), ("error_msg", ctypes.c_char_p),
                ("ret", ctypes.c_int), ("reserved_", ctypes.c_uint8 * 12)]


BLOCK = 4096
DEPTH = 16


def main() -> int:
    path, num_queues, queue, requests, seed = (sys.argv[1], int(sys.argv[2]),
                                               int(sys.argv[3]), int(sys.argv[4]),
                                               int(sys.argv[5]))
    lib = ctypes.CDLL(ctypes.util.find_library("blkio") or "libblkio.so.1")
    lib.blkio_get_error_msg.restype = ctypes.c_char_p
    lib.blkio_get_queue.restype = ctypes.c_void_p
    lib.blkio_get_queue.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkioq_read.argtypes = lib.blkioq_write.argtypes = [
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
        ctypes.c_void_p, ctypes.c_uint32]
    lib.blkioq_do_io.argtypes = [ctypes.c_void_p, ctypes.POINTER(Completion),
                                 ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

    def check(ret: int, what: str) -> None:
        if ret < 0:
            raise SystemExit(f"{what}: {ret} {lib.blkio_get_error_msg().decode()}")

    b = ctypes.c_void_p()
    check(lib.blkio_create(b"virtio-blk-vhost-user", ctypes.byref(b)), "create")
    check(lib.blkio_set_str(b, b"path", path.encode()), "path")
    check(lib.blkio_connect(b), "connect")
    check(lib.blkio_set_int(b, b"num-queues", num_queues), "num-queues")
    check(lib.blkio_start(b), "start")
    capacity = ctypes.c_uint64()
    check(lib.blkio_get_uint64(b, b"capacity", ctypes.byref(capacity)), "capacity")
    region = MemRegion()
    check(lib.blkio_alloc_mem_region(b, ctypes.byref(region), 2 * DEPTH * BLOCK), "alloc")
    check(lib.blkio_map_mem_region(b, ctypes.byref(region)), "map")
    q = lib.blkio_get_queue(b, queue)
    if not q:
        raise SystemExit("no such queue")
    buf = (ctypes.c_char * (2 * DEPTH * BLOCK)).from_address(region.addr)
    completions = (Completion * DEPTH)()
    blocks = capacity.value // BLOCK
    span = min(blocks, 4096)

    def offset(i: int) -> int:
        return ((seed * 7919 + i * 104729) % span) * BLOCK

    def pattern(i: int) -> bytes:
        return bytes([(seed + queue * 31 + i) % 251 + 1]) * BLOCK

    # Later requests may overwrite a block: each offset is checked against its last writer.
    last_writer = {offset(i): i for i in range(requests)}
    for read_back in (False, True):
        done = 0
        submitted = 0
        while done < requests:
            while submitted < requests and submitted - done < DEPTH:
                slot = submitted % DEPTH
                addr = region.addr + slot * BLOCK
                if read_back:
                    lib.blkioq_read(q, offset(submitted), addr + DEPTH * BLOCK, BLOCK,
                                    submitted, 0)
                else:
                    buf[slot * BLOCK:(slot + 1) * BLOCK] = pattern(submitted)
                    lib.blkioq_write(q, offset(submitted), addr, BLOCK, submitted, 0)
                submitted += 1
            n = lib.blkioq_do_io(q, completions, 1, DEPTH, None)
            check(n, "do_io")
            for c in completions[:n]:
                index = c.user_data or 0
                if c.ret != 0:
                    raise SystemExit(f"request {index} failed: {c.ret}")
                if read_back:
                    slot = index % DEPTH
                    got = bytes(buf[(DEPTH + slot) * BLOCK:(DEPTH + slot + 1) * BLOCK])
                    if got != pattern(last_writer[offset(index)]):
                        raise SystemExit(f"request {index}: data mismatch")
            done += n
    print("ok", capacity.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
