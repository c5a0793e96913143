# SPDX-License-Identifier: GPL-2.0
"""Boot tests of what the driver tells an operator: the sysfs group and debugfs files
(observe.py reads and checks them) through grow and shrink, a reader hammering them during
random resizes, the trace events virtio_mem_rust:*, and the warning at probe when nothing
onlines added memory. The same attributes are checked in the scenarios of the other boot
tests: BUSY during migration (test_unplug.py), the offline threshold (test_boot.py), Big
Block Mode and a shrink stalled by held pages (test_bbm.py)."""

import random
import re
import time

from observe import (ABI, DEBUGFS, STATES, SYSFS, TRACEFS, attrs, block_lines,
                     check_geometry, check_idle, debugfs, documented, settled_attrs,
                     snapshot, wait_for_online_and_warning)
from test_boot import DRIVER, RUST_AND_DEBUG, online_all
from test_unplug import resize
from vmlib import GiB, MiB, Vm


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


def test_offline_policy_warns_at_probe_built_in(boot):
    """The debug kernel, where the driver is built in and can ask core mm its online policy:
    with memhp_default_state=offline it says so at probe, and waits and warns as the module
    does (test_offline_threshold); once onlined, 2G is reached."""
    vm = boot("debug", append="memhp_default_state=offline")
    base = vm.memtotal()
    assert "memhp_default_state=offline: memory this device adds stays offline" in vm.dmesg()
    vm.set_requested("2G")
    wait_for_online_and_warning(vm)
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
    during 30 random resizes (online_movable, 0 to 2 GiB): every snapshot it saw agrees with
    itself (online + offline == plugged, plugged within the usable region, the counters add
    up, an answer per request) and every state is a documented word; the same 30 resizes
    take about as long as without it (figures printed)."""
    vm = boot(append="memhp_default_state=online_movable")
    base = vm.memtotal()
    rng = random.Random(13)
    sizes = [rng.randrange(0, 17) * 128 for _ in range(30)]
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
