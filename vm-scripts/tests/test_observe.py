# SPDX-License-Identifier: GPL-2.0
"""Boot tests of what the driver tells an operator: the sysfs group
/sys/bus/virtio/devices/virtioN/virtio_mem/ (each attribute documented in
drivers/ABI-virtio_mem_rust), the debugfs files virtio_mem_rust/virtioN/{status,blocks,
retry}, the trace events virtio_mem_rust:*, and the warning when nothing onlines added
memory. Each value is checked against what QEMU says (QMP) and what the guest's core mm
says (/proc/meminfo, /proc/zoneinfo, /proc/iomem)."""

import random
import re
import time
from pathlib import Path

from test_boot import DRIVER, RUST_AND_DEBUG, online_all, settle_memtotal, virtio_mem_ram
from test_unplug import resize
from vmlib import GiB, GuestError, MiB, Vm

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
    parent, _ = virtio_mem_ram(vm)
    assert a["region_start"] == f"{parent[1]:#x}"
    assert a["region_size"] == parent[2] - parent[1] + 1
    assert a["memory_block_size"] == int(vm.run(
        "cat /sys/devices/system/memory/block_size_bytes"), 16)
    assert (a["mode"], a["subblock_size"], a["node"]) == (mode, unit, 0)


@RUST_AND_DEBUG
def test_attributes_follow_grow_and_shrink(boot, kernel):
    """Every documented attribute is there and nothing else; at each size QEMU's `size`,
    MemTotal, /proc/iomem and /proc/zoneinfo say what the attributes say; the counters add
    up; debugfs `status` is the same snapshot and `blocks` lists the added memory blocks."""
    vm = boot(kernel)
    assert vm.bound_driver() == DRIVER
    base = vm.memtotal()
    a = attrs(vm)
    files = set(vm.run(f"ls {SYSFS}").split())
    assert files == documented("virtio_mem") == set(a), "attributes and ABI document differ"
    assert a["plugged_size"] == a["bytes_plugged"] == 0 and a["state"] == "idle"
    assert a["block_size"] == 2 * MiB
    for size in ("4G", "1G"):
        resize(vm, base, size)
        a = check_idle(vm, base)
        if vm.device()["size"]:
            check_geometry(vm, a, "Sub Block Mode", 2 * MiB)
    assert a["bytes_plugged"] == 4 * GiB and a["bytes_unplugged"] == 3 * GiB
    assert a["memory_blocks_added"] == 32 and a["memory_blocks_removed"] == 24
    assert a["answers_ack"] == a["requests_plug"] + a["requests_unplug"] > 0
    # debugfs: the same snapshot, one line per name; a line per added memory block.
    assert snapshot(vm) == a
    assert set(re.findall(r"^What:\s+\S*/virtio_mem_rust/virtioN/(\w+)$", ABI.read_text(),
                          re.M)) == set(vm.run(f"ls {DEBUGFS}").split())
    blocks = block_lines(vm)
    assert len(blocks) == 8, blocks
    assert all(re.fullmatch(r"0x[0-9a-f]+ online kernel 64/64 f{16}", b) for b in blocks), blocks
    assert "failed_rounds: 0" in debugfs(vm, "retry")


def test_big_blocks_in_the_attributes(boot):
    """1 GiB blocks, online_movable: Big Block Mode, the big block as the unit, all of it in
    ZONE_MOVABLE; debugfs lists each big block with its memory blocks."""
    vm = boot(block_size="1G", append="memhp_default_state=online_movable")
    base = vm.memtotal()
    resize(vm, base, "3G")
    a = check_idle(vm, base, "online_movable")
    check_geometry(vm, a, "Big Block Mode", GiB)
    assert a["block_size"] == GiB and a["memory_blocks_added"] == 24
    blocks = block_lines(vm)
    assert len(blocks) == 3 and all(
        re.fullmatch(r"0x[0-9a-f]+ added movable online 8/8 movable 8", b) for b in blocks), blocks
    resize(vm, base, "1G")
    a = check_idle(vm, base, "online_movable")
    assert a["memory_blocks_removed"] == 16 and a["bytes_migrated"] >= 0


def wait_attr(vm: Vm, ok, timeout: float = 90) -> dict:
    """The attributes once `ok(attrs)` holds (or the last ones read, after `timeout`)."""
    deadline = time.monotonic() + timeout * vm.slowdown
    while True:
        a = attrs(vm)
        if ok(a) or time.monotonic() > deadline:
            return a
        time.sleep(0.5)


def test_stalled_shrink_shows_the_holder(boot):
    """online_movable, 2G, a process holds 64 MiB with extra references (vmsplice), shrink to
    0: `state` becomes retrying, `blocked_by` names a range of the device and what holds it,
    `failed_rounds` grows, `next_retry_ms` counts down to the next round; once the process
    is gone, 0 is reached and nothing is in the way any more."""
    vm = boot(append="memhp_default_state=online_movable")
    base = vm.memtotal()
    resize(vm, base, "2G")
    vm.run("setsid vmr-fill -p 64 </dev/null >/tmp/hold.log 2>&1 &")
    deadline = time.monotonic() + 30
    while "holding 64 MiB" not in vm.run("cat /tmp/hold.log"):
        assert time.monotonic() < deadline, "vmr-fill -p did not start"
        time.sleep(0.5)
    vm.set_requested("0")
    a = wait_attr(vm, lambda a: a["failed_rounds"] >= 2)
    print({k: a[k] for k in ("state", "plugged_size", "failed_rounds", "next_retry_ms",
                             "blocked_by", "alloc_contig_range_failures")})
    assert a["state"] == "retrying" and a["failed_rounds"] >= 2, a
    m = re.fullmatch(r"(0x[0-9a-f]+)-(0x[0-9a-f]+) (.+)", a["blocked_by"])
    assert m, a["blocked_by"]
    start, end = int(m.group(1), 16), int(m.group(2), 16)
    start_region = int(a["region_start"], 16)
    assert start_region <= start < end < start_region + a["region_size"]
    assert m.group(3) in ("user page with extra references", "pinned user page"), a["blocked_by"]
    assert int(a["next_retry_ms"]) <= 4000 * 2, a
    assert a["alloc_contig_range_failures"] > 0
    assert 0 < a["plugged_size"] == vm.device()["size"] < 2 * GiB
    counters_agree(snapshot(vm))
    rounds = a["failed_rounds"]
    a = wait_attr(vm, lambda a: a["failed_rounds"] > rounds, timeout=30)
    assert a["failed_rounds"] > rounds, "no further round"
    vm.run("kill $(pidof vmr-fill)")
    vm.wait_size("0", timeout=90)
    check_idle(vm, base, "online_movable")


def test_busy_device_shows_in_the_attributes(boot):
    """While a migration runs QEMU answers BUSY: `state` retrying, `blocked_by` device busy,
    the BUSY answers counted; after the migration, idle at the requested size."""
    vm = boot()
    base = vm.memtotal()
    resize(vm, base, "2G")
    vm.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1000})
    vm.qmp.cmd("migrate", uri="exec:cat>/dev/null")
    time.sleep(0.5)
    assert vm.qmp.cmd("query-migrate")["status"] == "active"
    vm.set_requested("1G")
    a = wait_attr(vm, lambda a: a["answers_busy"] > 0 and a["state"] == "retrying", 30)
    print({k: a[k] for k in ("state", "answers_busy", "blocked_by", "failed_rounds")})
    assert a["state"] == "retrying" and a["blocked_by"] == "device busy", a
    assert a["answers_busy"] > 0 and a["plugged_size"] == 2 * GiB == vm.device()["size"]
    counters_agree(snapshot(vm))
    vm.qmp.cmd("migrate_cancel")
    deadline = time.monotonic() + 30
    while vm.qmp.cmd("query-migrate")["status"] not in ("cancelled", "failed", "completed"):
        assert time.monotonic() < deadline, "migration did not stop"
        time.sleep(0.2)
    vm.wait_size("1G", timeout=60)
    check_idle(vm, base)


@RUST_AND_DEBUG
def test_offline_policy_waits_and_warns(boot, kernel):
    """memhp_default_state=offline and nothing onlining: 1 GiB is added and stays offline,
    `state` waiting_for_online, `offline_size` 1 GiB, and within seconds the log says nothing
    onlines hot-plugged memory and how to fix it (on the debug kernel, where the driver is
    built in and can ask core mm, at probe too). Once onlined, 2G is reached."""
    vm = boot(kernel, append="memhp_default_state=offline")
    base = vm.memtotal()
    if kernel == "debug":
        assert "memhp_default_state=offline: memory this device adds stays offline" in vm.dmesg()
    vm.set_requested("2G")
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
    deadline = time.monotonic() + 60 * vm.slowdown
    while vm.device()["size"] != 2 * GiB and time.monotonic() < deadline:
        online_all(vm)
        time.sleep(0.2)
    online_all(vm)
    check_idle(vm, base)


# Checks every snapshot the reader saved (debugfs `status`, blocks separated by ---): the
# invariants of the ABI document. Prints "samples N bad M" and the first bad one.
CHECK_SAMPLES = r"""
awk -F': ' '
/^---$/ { n++;
  if (!(v["state"] == "broken" || v["online_size"] + v["offline_size"] == v["plugged_size"]) ||
      v["plugged_size"] > v["region_size"] || v["plugged_size"] > v["usable_region_size"] ||
      v["bytes_plugged"] - v["bytes_unplugged"] != v["plugged_size"] ||
      req != ans || v["movable_size"] > v["online_size"]) {
    bad++; if (bad == 1) first = dump }
  delete v; req = 0; ans = 0; dump = ""; next }
{ v[$1] = $2; dump = dump $0 ";";
  if ($1 ~ /^requests_/) req += $2; if ($1 ~ /^answers_/) ans += $2 }
END { print "samples " n+0 " bad " bad+0; if (bad) print "first bad: " first }' /tmp/samples
"""


def thirty_resizes(vm: Vm, sizes: list[int]) -> float:
    """Resizes through `sizes` (MiB), each to the end; the time it took."""
    t0 = time.monotonic()
    for s in sizes:
        vm.set_requested(f"{s}M")
        vm.wait_size(f"{s}M", timeout=120)
    return time.monotonic() - t0


def test_reader_hammering_the_attributes(boot):
    """A loop in the guest reads every attribute and the debugfs snapshot as fast as it can
    during 30 random resizes (online_movable, 0 to 4 GiB): every snapshot it saw agrees with
    itself (online + offline == plugged, plugged within the usable region, the counters add
    up, an answer per request) and every state is a documented word; the same 30 resizes
    take about as long as without it (figures printed)."""
    vm = boot(append="memhp_default_state=online_movable")
    base = vm.memtotal()
    rng = random.Random(13)
    sizes = [rng.randrange(0, 33) * 128 for _ in range(30)]
    sizes[-1] = 1024
    quiet = thirty_resizes(vm, sizes)
    resize(vm, base, "0M")
    debugfs(vm, "status")
    vm.run(f"setsid sh -c 'while :; do cat {SYSFS}/* > /tmp/files || echo FAIL >> /tmp/fail; "
           f"cat {DEBUGFS}/status >> /tmp/samples; echo --- >> /tmp/samples; "
           f"cat {SYSFS}/state >> /tmp/states; done' </dev/null >/dev/null 2>&1 &")
    time.sleep(1)
    loud = thirty_resizes(vm, sizes)
    vm.run("kill $(pgrep -f 'while :') 2>/dev/null; true")
    time.sleep(0.5)
    print(f"30 resizes: {quiet:.1f} s without the reader, {loud:.1f} s with it")
    out = vm.run(CHECK_SAMPLES, timeout=120)
    print(out)
    m = re.search(r"samples (\d+) bad (\d+)", out)
    assert m and int(m.group(1)) >= 100, out
    assert int(m.group(2)) == 0, out
    states = set(vm.run("sort -u /tmp/states").split())
    print(f"states seen: {sorted(states)}")
    assert states <= STATES and "idle" in states, states
    assert not vm.run("cat /tmp/fail 2>/dev/null; true").strip(), "a read failed"
    check_idle(vm, base, "online_movable")
    # Slower by at most half plus 20 s: TCG gives the reader one of the two vCPUs.
    assert loud <= quiet * 1.5 + 20, f"{loud:.1f} s with the reader, {quiet:.1f} s without"


def test_trace_events(boot):
    """The three trace events exist with their documented fields, and fire: a request per
    PLUG and UNPLUG with its answer and time, a round with the sizes and why it stopped, a
    try to take online memory per range given back."""
    vm = boot()
    base = vm.memtotal()
    vm.run(f"grep -q ' {TRACEFS} ' /proc/mounts || mount -t tracefs none {TRACEFS}")
    ev = f"{TRACEFS}/events/virtio_mem_rust"
    fields = {
        "virtio_mem_rust_request": ("dev", "type", "addr", "nb_blocks", "answer", "usecs"),
        "virtio_mem_rust_round": ("dev", "requested", "before", "after", "stop"),
        "virtio_mem_rust_unplug_online": ("dev", "start", "size", "result", "usecs"),
    }
    for name, want in fields.items():
        fmt = vm.run(f"cat {ev}/{name}/format")
        got = re.findall(r"field:[^;]*?(\w+);", fmt)
        assert all(f in got for f in want), (name, got)
    vm.run(f"echo 1 > {ev}/enable && echo > {TRACEFS}/trace")
    resize(vm, base, "512M")
    resize(vm, base, "256M")
    a = settled_attrs(vm)
    trace = vm.run(f"grep virtio_mem_rust {TRACEFS}/trace", timeout=60).splitlines()
    req = [re.search(r"virtio_mem_rust_request: virtio0 (\w+) addr=(0x[0-9a-f]+) "
                     r"nb_blocks=(\d+) answer=(\w+) usecs=(\d+)", l) for l in trace
           if "_request:" in l]
    assert all(req), trace
    plugs = [r for r in req if r.group(1) == "PLUG"]
    unplugs = [r for r in req if r.group(1) == "UNPLUG"]
    assert len(plugs) == a["requests_plug"] and len(unplugs) == a["requests_unplug"]
    assert all(r.group(4) == "ACK" for r in req)
    assert sum(int(r.group(3)) for r in plugs) * 2 * MiB == 512 * MiB
    assert sum(int(r.group(3)) for r in unplugs) * 2 * MiB == 256 * MiB
    rounds = [l for l in trace if "_round:" in l]
    assert any("requested=0x20000000 before=0x0 after=0x20000000 stop=done" in l
               for l in rounds), rounds
    assert any("requested=0x10000000 before=0x20000000 after=0x10000000 stop=done" in l
               for l in rounds), rounds
    taken = [re.search(r"start=(0x[0-9a-f]+) size=(0x[0-9a-f]+) result=(-?\d+) usecs=(\d+)", l)
             for l in trace if "_unplug_online:" in l]
    assert all(taken) and taken, trace
    assert sum(int(t.group(2), 16) for t in taken if t.group(3) == "0") == 256 * MiB
