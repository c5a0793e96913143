# SPDX-License-Identifier: GPL-2.0
"""Boot tests of Big Block Mode: devices whose blocks are a Linux memory block (128 MiB)
or larger, and Big Block Mode forced on a 2 MiB-block device. Memory comes and goes a whole
big block at a time; QEMU's `size`, MemTotal and /proc/iomem must follow exactly."""

import re
import time

import pytest

from observe import (attrs, block_lines, check_geometry, check_idle, counters_agree, snapshot,
                     wait_attr)
from test_boot import DRIVER, settle_memtotal, virtio_mem_ram
from test_unplug import ram_down_to, resize
from vmlib import GiB, GuestError, MiB, Vm, parse_size


def probe_line(vm: Vm) -> str:
    """The driver's probe line (mode, big block size)."""
    m = re.search(r"virtio_mem_rust virtio\d+: address .*", vm.dmesg())
    assert m, "no probe line in the kernel log"
    return m.group(0)


def follow(vm: Vm, base: int, steps, timeout: float = 180) -> None:
    """Resizes through `steps`: each time QEMU's size exactly, MemTotal boot + size, and
    exactly that much System RAM (virtio_mem) in /proc/iomem, inside the device's range."""
    for size in steps:
        want = parse_size(size)
        t = resize(vm, base, size, timeout=timeout)
        print(f"{size}: {t:.2f} s")
        assert vm.device()["size"] == want
        assert ram_down_to(vm, want) == want, f"/proc/iomem does not hold {size} of device RAM"
        if want:
            parent, children = virtio_mem_ram(vm)
            for c in children:
                assert parent[1] <= c[1] and c[2] <= parent[2], f"{c} outside {parent}"
        else:
            assert not [r for r in vm.iomem() if r[3] == "System RAM (virtio_mem)"]


@pytest.mark.parametrize("block_size", ["128M", "256M", "1G"])
def test_big_blocks_follow_the_requested_size(boot, block_size):
    """A device of 128 MiB, 256 MiB or 1 GiB blocks: Big Block Mode, big blocks of the
    device block; 0 -> 4G -> 6G -> 2G -> 0 exact, with the memory in ZONE_MOVABLE; sysfs and
    debugfs say so at each step."""
    vm = boot(block_size=block_size, append="memhp_default_state=online_movable")
    assert vm.bound_driver() == DRIVER
    line = probe_line(vm)
    assert "Big Block Mode" in line and f"big block {parse_size(block_size):#x}" in line, line
    base = vm.memtotal()
    bs = parse_size(block_size)
    for size in ("4G", "6G", "2G", "0G"):
        follow(vm, base, (size,))
        # What sysfs and debugfs say: the big block as the unit, all of it movable, one
        # line per big block with all its memory blocks online in ZONE_MOVABLE.
        a = check_idle(vm, base, "online_movable")
        mbs = bs // a["memory_block_size"]
        blocks = block_lines(vm)
        assert len(blocks) == parse_size(size) // bs and all(re.fullmatch(
            rf"0x[0-9a-f]+ added movable online {mbs}/{mbs} movable {mbs}", b)
            for b in blocks), blocks
        if size == "4G":
            check_geometry(vm, a, "Big Block Mode", bs)
            assert a["block_size"] == bs
    assert a["bytes_plugged"] == 6 * GiB and a["memory_blocks_removed"] == 48
    assert vm.zone_managed("Movable") == 0


def test_big_blocks_on_the_debug_kernel(boot):
    """The debug kernel (lockdep, KFENCE, DEBUG_VM, panic_on_warn): 1 GiB blocks,
    0 -> 2G -> 1G -> 0 in ZONE_MOVABLE."""
    vm = boot("debug", block_size="1G", append="memhp_default_state=online_movable")
    assert "Big Block Mode" in probe_line(vm)
    follow(vm, vm.memtotal(), ("2G", "1G", "0G"))


@pytest.mark.parametrize("kernel", ["rust", "debug"])
def test_force_bbm(boot, kernel):
    """force_bbm=1 on a 2 MiB-block device: big blocks of a memory block (128 MiB)."""
    vm = boot(kernel, append="memhp_default_state=online_movable virtio_mem_rust.force_bbm=1")
    line = probe_line(vm)
    assert "Big Block Mode" in line and "big block 0x8000000" in line, line
    follow(vm, vm.memtotal(), ("1G", "384M", "0G"))


def test_bbm_block_size(boot):
    """force_bbm=1 bbm_block_size=256M: big blocks of 256 MiB, what is asked in whole big
    blocks (the C driver's rounding: 1G - 128M leaves 1 GiB plugged, 640M leaves 512 MiB)."""
    vm = boot(append="memhp_default_state=online_movable virtio_mem_rust.force_bbm=1 "
                     f"virtio_mem_rust.bbm_block_size={256 * MiB}")
    line = probe_line(vm)
    assert "Big Block Mode" in line and "big block 0x10000000" in line, line
    base = vm.memtotal()
    follow(vm, base, ("1G", "512M"))
    vm.set_requested("384M")  # 128 MiB less: not a whole big block
    time.sleep(3)
    assert vm.device()["size"] == 512 * MiB
    follow(vm, base, ("0G",))


def test_bbm_block_size_not_a_power_of_two_is_ignored(boot):
    vm = boot(append="memhp_default_state=online_movable virtio_mem_rust.force_bbm=1 "
                     f"virtio_mem_rust.bbm_block_size={200 * MiB}")
    assert re.search(r"bbm_block_size=0xc800000 ignored: not a power of two; using 0x8000000",
                     vm.dmesg())
    assert "big block 0x8000000" in probe_line(vm)
    follow(vm, vm.memtotal(), ("512M", "0G"))


def test_region_without_a_whole_big_block_is_refused(boot):
    """Big blocks larger than the region (bbm_block_size=4G on a 2 GiB device): one clear
    error, the driver not bound, nothing plugged. (A device block larger than its region
    QEMU never creates: the KUnit config suite feeds that one.)"""
    vm = boot(device_size="2G", append="virtio_mem_rust.force_bbm=1 "
                                       f"virtio_mem_rust.bbm_block_size={4 * GiB}")
    assert vm.bound_driver() is None
    errors = [l for l in vm.dmesg().splitlines() if "invalid device config" in l]
    assert len(errors) == 1 and "region_size = 0x80000000 does not hold a single big block" \
        in errors[0], errors
    base = vm.memtotal()
    vm.set_requested("1G")
    time.sleep(2)
    assert vm.device()["size"] == 0
    assert vm.memtotal() == base


def size_after(vm: Vm, want: int, timeout: float) -> int:
    """QEMU's size once it is `want`, or after `timeout`."""
    try:
        vm.wait_size(want, timeout=timeout)
    except GuestError:
        pass
    return vm.device()["size"]


def wait_rounds(vm: Vm, rounds: int, timeout: float = 90) -> str:
    """The kernel log once the driver has said it is still short after `rounds` tries."""
    deadline = time.monotonic() + timeout * vm.slowdown
    while True:
        dmesg = vm.dmesg()
        tries = [int(n) for n in re.findall(r"plugged of requested 0x\w+ after (\d+) tries", dmesg)]
        if max(tries, default=0) >= rounds or time.monotonic() > deadline:
            return dmesg
        time.sleep(1)


def test_shrink_to_zero_idle_default_policy(boot):
    """Default policy (the device's memory is the guest's only ZONE_NORMAL), 128 MiB
    blocks, nothing running: 4G -> 0. An unmovable kernel page (a slab page, seen) can land
    in a big block while it grows and keeps the whole block: at most one is left, the log
    names what holds it, and the driver keeps retrying. Nothing else changes."""
    vm = boot(block_size="128M")
    base = vm.memtotal()
    follow(vm, base, ("4G",))
    vm.set_requested("0")
    left = size_after(vm, 0, 60)
    print(f"left after 60 s: {left // MiB} MiB")
    assert left <= 128 * MiB, f"{left // MiB} MiB left: more than one big block"
    assert settle_memtotal(vm, base + left) == base + left
    if left:
        dmesg = wait_rounds(vm, 2)
        assert "holds the memory:" in dmesg
        assert re.search(r"still 0x8000000 plugged of requested 0x0 after \d+ tries", dmesg)
    assert "alive" in vm.run("echo alive")


# What blocked_by may name as the holder of a page (drivers/ABI-virtio_mem_rust).
HOLDERS = {"slab", "large kmalloc", "pinned user page", "user page with extra references",
           "page table", "reserved page", "mapped page not on an LRU list", "kernel allocation",
           "movable pages that did not move"}


def hold_and_shrink(vm: Vm, base: int) -> int:
    """2G plugged; a process holds 64 MiB of its memory with extra references (vmsplice:
    no migration can move those pages); shrink to 0. Returns what is left plugged once the
    driver has retried twice: the big blocks it could not empty; sysfs says `retrying` and
    names the range and its holder, and the failed rounds grow. The process lives on."""
    follow(vm, base, ("2G",))
    # Detached (setsid): killing a job of the console's interactive ash made that shell
    # exit soon after in 1 of 3 tries, with or without any memory plugged.
    vm.run("setsid vmr-fill -p 64 </dev/null >/tmp/hold.log 2>&1 &")
    deadline = time.monotonic() + 30
    while "holding 64 MiB" not in vm.run("cat /tmp/hold.log"):
        assert time.monotonic() < deadline, "vmr-fill -p did not start"
        time.sleep(0.5)
    vm.set_requested("0")
    dmesg = wait_rounds(vm, 2)
    held = vm.device()["size"]
    print(f"held: {held // MiB} MiB")
    assert held in (GiB, 2 * GiB), f"{held // MiB} MiB plugged"
    assert re.search(r"still 0x\w+ plugged of requested 0x0 after \d+ tries", dmesg)
    assert "holds the memory:" in dmesg
    assert settle_memtotal(vm, base + held) == base + held
    # sysfs says so: retrying, the range that could not be freed (inside the device's
    # region) and what holds it, failed rounds that grow, the time to the next one.
    a = wait_attr(vm, lambda a: a["failed_rounds"] >= 2)
    print({k: a[k] for k in ("state", "plugged_size", "failed_rounds", "next_retry_ms",
                             "blocked_by", "alloc_contig_range_failures")})
    assert a["state"] == "retrying" and a["failed_rounds"] >= 2, a
    m = re.fullmatch(r"(0x[0-9a-f]+)-(0x[0-9a-f]+) (.+)", a["blocked_by"])
    assert m, a["blocked_by"]
    start, end = int(m.group(1), 16), int(m.group(2), 16)
    region = int(a["region_start"], 16)
    assert region <= start < end < region + a["region_size"]
    assert m.group(3) in HOLDERS, a["blocked_by"]
    assert int(a["next_retry_ms"]) <= 300_000 and a["alloc_contig_range_failures"] > 0, a
    assert a["plugged_size"] == held
    counters_agree(snapshot(vm))
    rounds = a["failed_rounds"]
    a = wait_attr(vm, lambda a: a["failed_rounds"] > rounds, timeout=30)
    assert a["failed_rounds"] > rounds, "no further round"
    assert vm.run("pidof vmr-fill").strip(), "the holding process died"
    vm.run("kill $(pidof vmr-fill)")
    return held


def test_held_pages_keep_their_big_block_movable(boot):
    """1 GiB blocks in ZONE_MOVABLE, where nothing but the process can hold a page: its
    big block stays, the log names the holder (a user page with extra references), the
    driver retries; once the process is gone that block goes too, to exactly 0."""
    vm = boot(block_size="1G", append="memhp_default_state=online_movable")
    base = vm.memtotal()
    hold_and_shrink(vm, base)
    assert "holds the memory: a user page with extra references" in vm.dmesg()
    assert attrs(vm)["blocked_by"].endswith(" user page with extra references")
    follow(vm, base, ("0G",), timeout=90)
    check_idle(vm, base, "online_movable")


def test_held_pages_keep_their_big_block_default_policy(boot):
    """The same with the default policy (the device's memory is the guest's only
    ZONE_NORMAL: kernel pages can hold a big block too, and the log names the first holder
    it finds, a page table seen). Once the process is gone, at most one big block is left,
    as on an idle guest."""
    vm = boot(block_size="1G")
    base = vm.memtotal()
    held = hold_and_shrink(vm, base)
    left = size_after(vm, 0, 30)
    print(f"left once the process is gone: {left // MiB} MiB")
    assert left <= min(held, GiB), f"{left // MiB} MiB left"
    assert settle_memtotal(vm, base + left) == base + left


def test_shrink_movable_keeps_data(boot):
    """1 GiB blocks in ZONE_MOVABLE, 2 GiB of pseudo-random data in tmpfs (vmr-fill),
    6G -> 2G: four big blocks go, their data is migrated, and every byte stays as
    written."""
    vm = boot(block_size="1G", append="memhp_default_state=online_movable")
    base = vm.memtotal()
    follow(vm, base, ("6G",))
    vm.run("mount -o remount,size=3G /tmp")  # sized at boot, from 1 GiB of RAM
    vm.run("vmr-fill 7 2048 > /tmp/data", timeout=600)
    follow(vm, base, ("2G",), timeout=300)
    assert "vmr-fill: ok" in vm.run("vmr-fill -c 7 2048 < /tmp/data", timeout=600)
