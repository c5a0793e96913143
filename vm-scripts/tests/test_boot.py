# SPDX-License-Identifier: GPL-2.0
"""Boot tests: build/bzImage in QEMU (q35, TCG, 2 vCPUs, 1 GiB + an 8 GiB virtio-mem-pci
device vm0), resized with qom-set over QMP; checked as an operator would: QEMU's `size`,
the guest's MemTotal, /proc/iomem, the zones, dmesg and the console."""

import re
import subprocess
import shutil
import time
from typing import Callable

import pytest

from observe import check_idle, wait_for_online_and_warning
from vmlib import CACHE, GiB, MiB, REPO, Vm

DRIVER = "virtio_mem_rust"
# The main resize tests run on build/bzImage and on the debug kernel (build/bzImage-debug:
# lockdep, DEBUG_VM, DEBUG_ATOMIC_SLEEP, KFENCE, page_owner=on, panic_on_warn=1; see
# conftest.py for what is checked on it). Ids: test_grow_default_policy[rust], ...[debug].
RUST_AND_DEBUG = pytest.mark.parametrize("kernel", ["rust", "debug"])


def settle(vm: Vm, read: Callable[[], int], want: int, timeout: float = 30) -> int:
    """What `read` returns once it is `want`, or after `timeout` (onlining may trail QEMU's
    size a little)."""
    deadline = time.monotonic() + timeout * vm.slowdown
    while True:
        m = read()
        if m == want or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def settle_memtotal(vm: Vm, want: int, timeout: float = 30) -> int:
    """MemTotal once it reaches `want`."""
    return settle(vm, vm.memtotal, want, timeout)


def settle_zone_normal(vm: Vm, want: int, timeout: float = 30) -> int:
    """ZONE_NORMAL's managed bytes once they reach `want`. With 1 GiB of boot memory (all
    below 4 GiB) and the default online policy, only the device's memory makes up
    ZONE_NORMAL: unlike MemTotal, which differs by a few KiB from boot to boot (KASLR,
    Debian's RANDOMIZE_BASE, changes the early page tables; 4 KiB seen), it is exact."""
    return settle(vm, lambda: vm.zone_managed("Normal"), want, timeout)


def virtio_mem_ram(vm: Vm) -> tuple[tuple, list[tuple]]:
    """The device's parent resource in /proc/iomem and the System RAM (virtio_mem) below it."""
    rows = vm.iomem()
    parents = [r for r in rows if re.fullmatch(r"virtio\d+", r[3])]
    assert len(parents) == 1, f"no single virtio-mem parent resource in /proc/iomem: {rows}"
    parent = parents[0]
    children = [r for r in rows if r[3] == "System RAM (virtio_mem)"]
    return parent, children


def grow_and_check(vm: Vm, steps=("4G", "6G")):
    assert vm.bound_driver() == DRIVER
    assert vm.device()["size"] == 0
    base = vm.memtotal()
    for size in steps:
        want = int(size[:-1]) * GiB
        vm.set_requested(size)
        vm.wait_size(size)
        assert vm.device()["size"] == want
        assert settle_memtotal(vm, base + want) == base + want, "MemTotal did not grow by exactly the plugged size"
    parent, children = virtio_mem_ram(vm)
    dev = vm.device()
    assert (parent[1], parent[2] + 1) == (dev["memaddr"], dev["memaddr"] + dev["max-size"])
    assert children, "no System RAM (virtio_mem) in /proc/iomem"
    for c in children:
        assert c[0] == parent[0] + 1 and parent[1] <= c[1] and c[2] <= parent[2], \
            f"{c} is not inside the device's resource {parent}"
    # Memory blocks of 128 MiB, fully plugged here: the RAM resources cover exactly the plugged size.
    assert sum(c[2] - c[1] + 1 for c in children) == want
    dmesg = vm.dmesg()
    assert "Sub Block Mode" in dmesg
    assert f"plugged {want:#x} of requested {want:#x}" in dmesg
    return base


@RUST_AND_DEBUG
def test_grow_default_policy(boot, kernel):
    vm = boot(kernel)
    grow_and_check(vm)
    # Auto-online onlined the memory to a kernel zone.
    assert vm.zone_managed("Movable") == 0


@RUST_AND_DEBUG
def test_grow_online_movable(boot, kernel):
    vm = boot(kernel, append="memhp_default_state=online_movable")
    grow_and_check(vm)
    assert vm.zone_managed("Movable") == 6 * GiB


def test_boot_with_memory_requested(boot):
    # The same guest without the device's memory, for MemTotal's baseline: equal up to a
    # few KiB from boot to boot (settle_zone_normal says why). Exact: ZONE_NORMAL.
    base = boot().memtotal()
    vm = boot(requested="1G")
    vm.wait_size("1G")
    assert vm.device()["size"] == GiB
    assert settle_zone_normal(vm, GiB) == GiB
    assert abs(vm.memtotal() - base - GiB) <= 64 * 1024, "MemTotal did not grow by about 1 GiB"
    _, children = virtio_mem_ram(vm)
    assert sum(c[2] - c[1] + 1 for c in children) == GiB


def test_out_of_tree_module(boot, tmp_path):
    """The driver built with `make -C <kernel build dir> M=<dir>` against the rust kernel's
    tree (Debian's config) loads into that kernel in place of the in-tree module and plugs
    memory."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("Kbuild", "Kconfig", "drivers", "include-uapi"):
        p = REPO / name
        (shutil.copytree if p.is_dir() else shutil.copy)(p, src / name)
    kbuild = CACHE / "kbuild-debian-rust"
    env_script = f". {REPO}/vm-scripts/lib.sh && rust_env && make -s -C {kbuild} M={src}"
    r = subprocess.run(["bash", "-c", env_script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not re.search(r"warning|error", r.stdout + r.stderr, re.I), r.stdout + r.stderr
    ko = (src / "virtio_mem_rust.ko").read_bytes()
    # The same initramfs path as the in-tree module's (KERNEL_FILES): this one replaces it.
    vm = boot("rust", extra_files={"lib/vmr/virtio_mem_rust.ko": ko})
    assert "virtio_mem_rust" in vm.run("cat /proc/modules")
    # The kernel marks an out-of-tree module with taint O (and E: it is not signed).
    assert "O" in vm.run("cat /sys/module/virtio_mem_rust/taint")
    base = vm.memtotal()
    vm.set_requested("2G")
    vm.wait_size("2G")
    assert settle_memtotal(vm, base + 2 * GiB) == base + 2 * GiB
    assert vm.bound_driver() == DRIVER


def test_grow_partial_blocks(boot):
    """Sizes that end inside a 128 MiB memory block: the block is added with only some
    subblocks plugged (the rest stays fake-offline), and a later grow plugs the rest of it
    while it is online."""
    vm = boot()
    base = vm.memtotal()
    for size in ("100M", "300M", "1000M"):
        want = int(size[:-1]) * MiB
        vm.set_requested(size)
        vm.wait_size(size)
        assert settle_memtotal(vm, base + want) == base + want
    # Added memory blocks: ceil(1000 / 128) = 8, the last one partially plugged.
    _, children = virtio_mem_ram(vm)
    assert sum(c[2] - c[1] + 1 for c in children) == 8 * 128 * MiB
    assert "refusing" not in vm.dmesg()


def online_all(vm: Vm) -> None:
    vm.run("for m in /sys/devices/system/memory/memory*; do "
           "[ \"$(cat $m/state)\" = offline ] && echo online > $m/state; done; true")


def test_offline_threshold(boot):
    """With nothing onlining hotplugged memory, the driver stops adding once 1 GiB is added
    but offline, says so (sysfs `state` waiting_for_online, `offline_size` 1 GiB, one
    warning naming the fix), and goes on as the blocks are onlined."""
    vm = boot(append="memhp_default_state=offline")
    base = vm.memtotal()
    vm.set_requested("2G")
    vm.wait_size("1G")
    # The driver says so: waiting_for_online in sysfs, 1 GiB offline, and a warning.
    wait_for_online_and_warning(vm)
    assert vm.device()["size"] == GiB, "went past the offline threshold"
    assert vm.memtotal() == base, "memory came online without being onlined"
    deadline = time.monotonic() + 60
    while vm.device()["size"] != 2 * GiB and time.monotonic() < deadline:
        online_all(vm)
        time.sleep(0.2)
    assert vm.device()["size"] == 2 * GiB
    online_all(vm)
    assert settle_memtotal(vm, base + 2 * GiB) == base + 2 * GiB
    check_idle(vm, base)
