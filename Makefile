# Every target sets up what it needs: Debian packages (as root), then .venv.
# VENV and SYSTEM_PYTHON select another venv and the Python it is made from.
VENV := .venv
SYSTEM_PYTHON := python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Ceph for the rbd tests, which skip without it.  Left out in the sid chroot (test-py314):
# ceph-mon's postinst needs systemd, which a chroot does not have, and fails there.
CEPH_PROGRAMS := ceph-mon:ceph-mon ceph-mgr:ceph-mgr ceph-osd:ceph-osd rbd:ceph-common
CEPH_MODULES := rados:python3-rados rbd:python3-rbd
DEBIAN_PROGRAMS := fusermount3:fuse3 qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
	fio:fio strace:strace nbdinfo:libnbd-bin qemu-storage-daemon:qemu-system-common openssl:openssl \
	qemu-system-x86_64:qemu-system-x86 busybox:busybox-static /boot/vmlinuz-*:linux-image-amd64 \
	$(CEPH_PROGRAMS)
DEBIAN_PYTHON_MODULES := nbd:python3-libnbd ensurepip:python3-venv $(CEPH_MODULES)

.PHONY: run test test-py314 fuzz compat lint iotests bench stress stress-throttle deps venv clean

deps:
	@scripts/install-debian-deps $(DEBIAN_PROGRAMS) -- $(DEBIAN_PYTHON_MODULES)

$(STAMP): pyproject.toml scripts/link-debian-modules
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@scripts/install-libnbd-binding $(PY)
	@scripts/link-debian-modules $(PY) rados rbd
	@touch $@

venv: deps $(STAMP)

run: venv
	@$(PY) scripts/run-demo

test: venv
	@$(PY) -m pytest -q tests
	@$(PY) iotests/check

# The same suite on Python 3.14, in a Debian sid chroot that scripts/sid-chroot builds.
test-py314:
	@scripts/sid-chroot setup
	@scripts/sid-chroot run make VENV=.venv-py314 SYSTEM_PYTHON=python3.14 CEPH_PROGRAMS= \
		CEPH_MODULES= test

# The vhost-user-blk fuzz test's long run: 100,000 requests from a hostile front-end.
fuzz: venv
	@QSD_FUZZ_REQUESTS=100000 $(PY) -m pytest -q -s tests/test_vhost_fuzz.py

# Re-records the compatibility suite's transcripts from QEMU 11.1's daemon in that chroot
# and shows what changed (docs/COMPATIBILITY.md).
compat: venv
	@scripts/sid-chroot setup
	@$(PY) scripts/compat record --reference "$(CURDIR)/scripts/sid-chroot run /usr/bin/qemu-storage-daemon"

# Churn, load and leaks, and the QMP/NBD/FUSE fuzzers, at the scale docs/RELIABILITY.md
# reports (make test runs a few rounds of each); every case prints a STRESS line of figures.
stress: venv
	@QSD_STRESS=1 QSD_FUZZ=1 $(PY) -m pytest -q -s --timeout=7200 tests/test_stress.py \
		tests/test_fuzz_qmp.py tests/test_fuzz_nbd.py tests/test_fuzz_fuse.py

iotests: venv
	@$(PY) iotests/check

lint: venv
	@$(VENV)/bin/ruff check qsd tests scripts iotests
	@$(VENV)/bin/mypy --strict qsd

bench: venv
	@$(PY) scripts/bench-fuse

stress-throttle: venv
	@$(PY) scripts/stress-throttle

clean:
	rm -rf $(VENV) .venv-py314 run bench-results
