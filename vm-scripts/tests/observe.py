# SPDX-License-Identifier: GPL-2.0
"""What the driver tells an operator, read in the guest: the sysfs group
/sys/bus/virtio/devices/virtioN/virtio_mem/ (each attribute documented in
drivers/ABI-virtio_mem_rust) and the debugfs files virtio_mem_rust/virtioN/{status,blocks,
retry}, with the checks every boot test that reads them makes against QEMU (QMP) and the
guest's core mm (/proc/meminfo, /proc/zoneinfo, /proc/iomem)."""

import re
import time
from pathlib import Path

from vmlib import GiB, Vm

ABI = Path(__file__).resolve().parents[2] / "drivers" / "ABI-virtio_mem_rust"
SYSFS = "/sys/bus/virtio/devices/virtio0/virtio_mem"
DEBUGFS = "/sys/kernel/debug/virtio_mem_rust/virtio0"
TRACEFS = "/sys/kernel/tracing"
STATES = {"idle", "plugging", "unplugging", "retrying", "waiting_for_online", "refused",
          "no_room", "broken", "suspended", "kdump"}
# The group's files: one per attribute the ABI document describes (checked against the
# directory by test_attributes_follow_grow_and_shrink).
NAMES = set(re.findall(r"^What:\s+\S*/virtio_mem/(\w+)$", ABI.read_text(), re.M))
# Values that are words, not numbers.
WORDS = {"region_start", "mode", "state", "next_retry_ms", "blocked_by"}


def documented(where: str) -> set[str]:
    """The files the ABI document describes under `where` (virtio_mem/ or the debugfs
    directory)."""
    return set(re.findall(rf"^What:\s+\S*/{where}/(\w+)$", ABI.read_text(), re.M))


def attrs(vm: Vm) -> dict[str, str]:
    """Every attribute of the group, read in one go."""
    out = vm.run(f"cd {SYSFS} && grep -H . *; cd /")
    # Kernel messages may come in between on the console: only the attributes' lines.
    a = dict(re.findall(r"^([a-z_]+):(.*)$", out, re.M))
    a = {k: v for k, v in a.items() if k in NAMES}
    for k, v in a.items():
        if k not in WORDS:
            a[k] = int(v)
    return a


def debugfs(vm: Vm, name: str) -> str:
    vm.run("grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs none /sys/kernel/debug")
    out = vm.run(f"cat {DEBUGFS}/{name}")
    return out


def block_lines(vm: Vm) -> list[str]:
    """debugfs `blocks`, its lines only (a kernel message may come in between)."""
    return [l for l in debugfs(vm, "blocks").splitlines() if l.startswith("0x")]


def snapshot(vm: Vm) -> dict:
    """debugfs `status`: every attribute from one snapshot (sysfs files read one by one may
    each come from a different one while the driver works)."""
    out = debugfs(vm, "status")
    a = {k: v for k, v in re.findall(r"^([a-z_]+): (.*)$", out, re.M) if k in NAMES}
    assert set(a) == NAMES, out
    return {k: (v if k in WORDS else int(v)) for k, v in a.items()}


def counters_agree(a: dict) -> None:
    """What holds in every snapshot: the counters add up to the driver's plugged size, every
    request got an answer, nothing above the region."""
    assert a["bytes_plugged"] - a["bytes_unplugged"] == a["plugged_size"], a
    requests = sum(a[k] for k in a if k.startswith("requests_"))
    answers = sum(a[k] for k in a if k.startswith("answers_"))
    assert requests == answers, a
    assert a["online_size"] + a["offline_size"] == a["plugged_size"], a
    assert a["movable_size"] <= a["online_size"], a
    assert a["plugged_size"] <= a["usable_region_size"] <= a["region_size"], a
    assert a["state"] in STATES, a


def settled_attrs(vm: Vm, timeout: float = 10) -> dict:
    """The attributes once the driver's count and the device's last word agree with QEMU."""
    deadline = time.monotonic() + timeout * vm.slowdown
    while True:
        a = attrs(vm)
        size = vm.device()["size"]
        if (a["plugged_size"] == a["device_plugged_size"] == size and a["state"] == "idle") \
                or time.monotonic() > deadline:
            return a
        time.sleep(0.2)


def check_idle(vm: Vm, base: int, policy: str = "default") -> dict:
    """After a resize that got there: every attribute against QMP and core mm."""
    from test_boot import settle_memtotal, virtio_mem_ram  # test_boot imports this module
    a = settled_attrs(vm)
    dev = vm.device()
    print({k: a[k] for k in ("state", "requested_size", "plugged_size", "online_size",
                             "offline_size", "movable_size", "memory_blocks_added",
                             "memory_blocks_removed")})
    counters_agree(a)
    counters_agree(snapshot(vm))
    assert a["requested_size"] == dev["requested-size"]
    assert a["plugged_size"] == a["device_plugged_size"] == dev["size"]
    assert (a["state"], a["blocked_by"], a["failed_rounds"], a["next_retry_ms"]) == \
        ("idle", "none", 0, "none")
    # All of it online (the policy onlines it), MemTotal grown by exactly that.
    assert a["online_size"] == a["plugged_size"] and a["offline_size"] == 0
    assert settle_memtotal(vm, base + a["online_size"]) == base + a["online_size"]
    want_movable = a["online_size"] if policy == "online_movable" else 0
    assert a["movable_size"] == want_movable == vm.zone_managed("Movable")
    added = a["memory_blocks_added"] - a["memory_blocks_removed"]
    ram = [c for c in virtio_mem_ram(vm)[1]] if a["plugged_size"] else []
    assert sum(c[2] - c[1] + 1 for c in ram) == added * a["memory_block_size"]
    return a


def check_geometry(vm: Vm, a: dict, mode: str, unit: int) -> None:
    from test_boot import virtio_mem_ram  # test_boot imports this module
    parent, _ = virtio_mem_ram(vm)
    assert a["region_start"] == f"{parent[1]:#x}"
    assert a["region_size"] == parent[2] - parent[1] + 1
    assert a["memory_block_size"] == int(vm.run(
        "cat /sys/devices/system/memory/block_size_bytes"), 16)
    assert (a["mode"], a["subblock_size"], a["node"]) == (mode, unit, 0)


def wait_attr(vm: Vm, ok, timeout: float = 90) -> dict:
    """The attributes once `ok(attrs)` holds (or the last ones read, after `timeout`)."""
    deadline = time.monotonic() + timeout * vm.slowdown
    while True:
        a = attrs(vm)
        if ok(a) or time.monotonic() > deadline:
            return a
        time.sleep(0.5)


def wait_for_online_and_warning(vm: Vm) -> None:
    """With nothing onlining added memory and 2G asked: 1 GiB added and left offline,
    `state` waiting_for_online, and within seconds one warning that nothing onlines
    hot-plugged memory, naming the kernel parameter and the Kconfig option that fix it."""
    a = wait_attr(vm, lambda a: a["state"] == "waiting_for_online", 60)
    assert a["state"] == "waiting_for_online", a
    a = snapshot(vm)
    assert a["plugged_size"] == a["offline_size"] == GiB and a["online_size"] == 0, a
    counters_agree(a)
    deadline = time.monotonic() + 30 * vm.slowdown
    while "nothing onlines hot-plugged memory" not in vm.dmesg():
        assert time.monotonic() < deadline, "no warning about memory left offline"
        time.sleep(1)
    warning = [l for l in vm.dmesg().splitlines() if "nothing onlines hot-plugged" in l]
    print(warning)
    assert len(warning) == 1 and "memhp_default_state=online" in warning[0] \
        and "CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO" in warning[0]
