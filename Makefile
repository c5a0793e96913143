# SPDX-License-Identifier: GPL-2.0
#
# User-facing commands. The kernel module itself is built by Kbuild (see Kbuild), either in
# a kernel tree (CONFIG_VIRTIO_MEM_RUST) or out of tree with make -C <kernel build dir> M=$PWD.
#
#   make demo    set up, build, boot a VM and show its memory growing (the main job)
#   make test    set up, build and run every test (style, host, KUnit, boot), with counts
#   make kunit   only the KUnit suites through kunit.py (its own kernel)
#   make bench   the resize scenarios on both kernels, timed over QMP
#   make run     an interactive VM (Ctrl-A c for the QEMU monitor)
#   make soak    the memory-pressure boot tests with a 300 s stall window, C driver beside,
#                also on the debug kernel; the lifecycle tests beside the C driver
#   make mutants-host  cargo-mutants over drivers/*.rs, judged by the host tests

SHELL := /bin/bash
CACHE := $(or $(VMR_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/virtio-mem-rust)
PY := $(CACHE)/venv/bin/python
export PATH := $(HOME)/.cargo/bin:$(PATH)
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup kernels initramfs demo bench test run check-style host-tests kunit vm-tests \
	soak mutants mutants-host clean

setup:
	vm-scripts/setup

kernels: setup
	vm-scripts/build-kernel rust
	vm-scripts/build-kernel upstream
	vm-scripts/build-kernel debug

initramfs: setup
	vm-scripts/build-initramfs

demo: kernels initramfs
	$(PY) vm-scripts/demo $(DEMO_ARGS)

bench: kernels initramfs
	$(PY) vm-scripts/bench $(BENCH_ARGS)

run: kernels initramfs
	$(PY) vm-scripts/run-vm $(RUN_ARGS)

check-style: kernels
	vm-scripts/check-style

# The driver's logic on the host (device.rs and the plain-core modules, against a stand-in
# kernel crate; the KUnit suites too): unit and property tests (cargo test).
host-tests: setup
	cd host-tests && CARGO_TARGET_DIR=$(CACHE)/host-tests-target cargo test --release --lib -- --show-output

# The KUnit suites through the kernel's kunit.py, under QEMU.
kunit: setup
	vm-scripts/kunit

vm-tests: kernels initramfs
	$(PY) -m pytest -v -rA vm-scripts/tests $(PYTEST_ARGS)

# Issue 9's scenarios (vm-scripts/tests/test_pressure.py) with the guest watched for 300 s
# while the shrink cannot go on (60 s in vm-tests and make test), each beside the upstream C driver's run
# and on the debug kernel too; and the suspend, hibernation, kexec, reboot and kdump tests
# (test_lifecycle.py) beside the C driver's runs on Debian's own kernel.
soak: kernels initramfs
	VMR_PRESSURE_SECONDS=300 VMR_PRESSURE_REFERENCE=1 VMR_SOAK=1 \
		$(PY) -m pytest -v -rA vm-scripts/tests/test_pressure.py \
		vm-scripts/tests/test_lifecycle.py $(PYTEST_ARGS)

# Every layer (style, host, KUnit through kunit.py, boot tests on the three kernels), with
# counts per layer.
test: kernels initramfs
	vm-scripts/test-all

# Removes each validation of the driver in turn; a test must notice (about 30 minutes).
mutants: setup initramfs
	vm-scripts/build-kernel tiny
	$(PY) vm-scripts/mutants

# cargo-mutants over drivers/*.rs as the host tests compile them; the host tests judge
# (about two hours; MUTANTS_ARGS="--file '**/device.rs'" for the worker alone).
mutants-host: setup
	vm-scripts/mutants-host $(MUTANTS_ARGS)

clean:
	rm -rf build
