# SPDX-License-Identifier: GPL-2.0
"""Boot tests of issue 9, "A shrink must never hurt the guest": asked for less memory than
the guest's data or processes leave, the driver gives back what the guest can spare, stops
there and says why, instead of taking the pages the guest lives on; once the data is gone
it reaches the requested size.

While the requested size cannot be reached the guest is watched for VMR_PRESSURE_SECONDS
(default 60 s; `make soak` watches 300 s), one sample every 10 s: a command must answer
within 10 s, QEMU's `size` must leave room for the data, /proc/meminfo's MemAvailable must
stay above half the driver's smallest margin.

The data is vmr-fill's (vm-scripts/vmr-fill.c: pseudo-random, different in every page,
checked byte for byte), which writes 3 GiB of tmpfs in 20 s on the rust kernel and 80 s
on the debug one; /dev/urandom, two writers at a time, took 81 s for 3 GiB on the rust
kernel and 160 s for 2 GiB on the debug one, and md5sum 40 s per 3 GiB.

With VMR_PRESSURE_REFERENCE=1 (`make soak`) each data scenario also runs once per pytest
session on the upstream C driver (build/bzImage-upstream), outside the `boot` fixture: it
is known to die or to print allocation failures there, so its outcome is printed beside
the test's and never judged.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import pytest

from test_boot import RUST_AND_DEBUG, settle_memtotal
from test_unplug import ram_down_to, resize, zero_or_pinned
from vmlib import GiB, GuestError, MiB, Vm, parse_size

# How long the guest is watched while the requested size is out of reach, and how often.
STALL = float(os.environ.get("VMR_PRESSURE_SECONDS", "60"))
EVERY = 10.0
# A guest command must answer within this, in seconds of wall time on every kernel (not
# scaled by Vm.slowdown: an idle guest answers in well under a second even on the debug
# kernel, so 10 s is plenty for both and a stall of the guest shows as a timeout).
ANSWER = 10.0
# Whether the upstream C driver runs each data scenario once per session for comparison:
# `make soak` sets VMR_PRESSURE_REFERENCE=1, which also runs the debug kernel's scenarios.
# Not in `make test`, for CI's time: on 2 cores the six tests took 31 minutes in all (3.5 to
# 7 each), the two reference runs 5 more
# (movable 200 s: the guest survives, but the OOM killer takes its shell 10 s after the
# request; default policy 90 s: the guest panics 30 s after the request).
REFERENCE = os.environ.get("VMR_PRESSURE_REFERENCE", "0") == "1"

MOVABLE = "memhp_default_state=online_movable"
# What may stay plugged, pinned by the kernel, after a shrink to 0 under the default policy
# that waited for the guest's memory (see test_shrink_beyond_what_the_data_leaves).
PINNED_AFTER_PRESSURE = 32 * MiB
DEVICE = "10G"  # -m 1G,maxmem=11G: the sizes of the issue
FILE = 512 * MiB
# The driver leaves the guest max(128 MiB, MemTotal/32) available by its own estimate;
# /proc/meminfo's MemAvailable is computed a little differently and the guest's own
# commands take some, so the floor checked here is half the smallest margin.
AVAILABLE_FLOOR = 64 * MiB

# At the start of a stall, then at the 2nd, 4th, 8th, ... round with "; N rounds so far".
PRESSURE = re.compile(r"virtio_mem_rust virtio\d+: guest needs its memory: (\d+) MiB available, "
                      r"(\d+) MiB more asked; waiting \((\d+) MiB stay the guest's(?:; \d+ rounds so far)?\)")
RESUMING = re.compile(r"virtio_mem_rust virtio\d+: guest memory available again: resuming the unplug")
# What a shrink must never cause. (The boot fixture also fails on WARNING/BUG/Oops/Call
# Trace/Kernel panic anywhere on the console.)
HURT = re.compile(r"oom-killer|Out of memory|Kernel panic|page allocation failure")
DEATH = re.compile(r"oom-killer|Out of memory|Kernel panic")


@dataclass(frozen=True)
class Scenario:
    append: str  # kernel command line (online policy)
    grow: str  # requested-size before the data is written
    files: int  # 512 MiB files of data written to tmpfs
    low: str  # then requested-size: less than the data leaves

    @property
    def data(self) -> int:
        return self.files * FILE


# The two scenarios, on every kernel: with vmr-fill the debug kernel runs them at
# full scale in about 5.5 minutes.
SCENARIOS = {
    "movable": Scenario(MOVABLE, "6G", 6, "2G"),
    "default": Scenario("", "4G", 6, "0"),
}


def mib(b: int | None) -> str:
    return "?" if b is None else f"{b // MiB} MiB"


def uptime(vm: Vm) -> float:
    out = vm.run("echo VMR_UPTIME $(cut -d' ' -f1 /proc/uptime)")
    return float(re.search(r"VMR_UPTIME ([\d.]+)", out).group(1))


def halves(files: int) -> list[list[int]]:
    """The data files' numbers in two halves, one per vCPU: two writers or checkers at a
    time take about the time of one."""
    numbers = list(range(1, files + 1))
    return [numbers[0::2], numbers[1::2]]


def write_data(vm: Vm, files: int) -> float:
    """Writes /tmp/data1.. (512 MiB each; the data of file i is vmr-fill's for seed i:
    pseudo-random, different in every page), two at a time; returns the seconds it took."""
    vm.run("mount -o remount,size=8G /tmp")  # sized at boot, from 1 GiB of RAM
    start = time.monotonic()
    vm.run(" & ".join("(" + " && ".join(f"vmr-fill {i} {FILE // MiB} > /tmp/data{i}" for i in half) + ")"
                      for half in halves(files)) + " & wait", timeout=600)
    took = time.monotonic() - start
    print(f"wrote {files} x 512 MiB of data to tmpfs in {took:.0f} s "
          f"({files * FILE / MiB / took:.0f} MiB/s)", flush=True)
    sizes = vm.run("stat -c 'VMR_SIZE %s' /tmp/data?")
    assert re.findall(r"VMR_SIZE (\d+)", sizes) == [str(FILE)] * files, sizes
    return took


def data_intact(vm: Vm, files: int) -> tuple[bool, str]:
    """Whether every byte of /tmp/data1.. is still what write_data() wrote (vmr-fill -c),
    and what the checkers said."""
    t = time.monotonic()
    out = vm.run(" & ".join("(" + " && ".join(f"vmr-fill -c {i} {FILE // MiB} < /tmp/data{i}" for i in half)
                            + f" && echo VMR_DATA_OK_{n})" for n, half in enumerate(halves(files)))
                 + " & wait", timeout=600, check=False)
    ok = "VMR_DATA_OK_0" in out and "VMR_DATA_OK_1" in out
    print(f"data checked in {time.monotonic() - t:.0f} s: {'intact' if ok else 'NOT intact'}", flush=True)
    return ok, "\n".join(l for l in out.splitlines() if "vmr-fill" in l or "VMR_DATA" in l)


@dataclass
class Sample:
    t: float  # s since the low requested size was set
    answer: float | None  # s the guest took to print /proc/meminfo; None: no answer
    size: int | None  # QEMU's size of vm0; None: QEMU gone
    available: int | None  # MemAvailable
    rss: int | None = None  # VmRSS of the watched process


@dataclass
class Watch:
    samples: list[Sample] = field(default_factory=list)
    exited_at: float | None = None  # s after the request at which QEMU was seen gone

    def lowest_size(self) -> int | None:
        sizes = [s.size for s in self.samples if s.size is not None]
        return min(sizes) if sizes else None

    def last_size(self) -> int | None:
        sizes = [s.size for s in self.samples if s.size is not None]
        return sizes[-1] if sizes else None


def rss_of(vm: Vm, pid: int, timeout: float = 60) -> int | None:
    """VmRSS of process `pid`, None once it has exited."""
    out = vm.run(f"awk '/^VmRSS:/ {{ print \"VMR_RSS_KB=\" $2 }}' /proc/{pid}/status 2>/dev/null",
                 timeout=timeout, check=False)
    m = re.search(r"VMR_RSS_KB=(\d+)", out)
    return int(m.group(1)) * 1024 if m else None


def watch(vm: Vm, seconds: float, base: int, pid: int | None = None) -> Watch:
    """Samples the guest every EVERY s for `seconds` s (and once more at the end): how long
    /proc/meminfo takes to come back, QEMU's size, MemAvailable, and VmRSS of `pid`. Stops
    early only if QEMU exits."""
    w = Watch()
    start = time.monotonic()
    n = 0
    while True:
        t = time.monotonic() - start
        s = Sample(t, None, None, None)
        try:
            s.size = vm.device()["size"]
        except Exception:
            pass
        t0 = time.monotonic()
        try:
            info = vm.meminfo(timeout=ANSWER / vm.slowdown)
            s.answer = time.monotonic() - t0
            s.available = info.get("MemAvailable")
            if pid is not None:
                s.rss = rss_of(vm, pid, timeout=ANSWER / vm.slowdown)
        except (GuestError, OSError):  # no answer in time, or QEMU closed the console
            pass
        w.samples.append(s)
        print(f"  {s.t:5.0f} s  answered in {'--' if s.answer is None else f'{s.answer:.2f} s'}"
              f"  QEMU size {mib(s.size)} (+ boot: {mib(None if s.size is None else base + s.size)})"
              f"  MemAvailable {mib(s.available)}"
              + ("" if pid is None else f"  process RSS {mib(s.rss)}"), flush=True)
        if not vm.running():
            w.exited_at = time.monotonic() - start
            print(f"  QEMU exited ({w.exited_at:.0f} s)", flush=True)
            return w
        if t >= seconds:
            return w
        n += 1
        time.sleep(max(0.0, min(start + n * EVERY, start + seconds) - time.monotonic()))


def check_watch(w: Watch, base: int, needed: int) -> None:
    """What must hold during a stall: QEMU still running, every sample answered within
    ANSWER s, boot memory + QEMU's size never below what the guest's data or process
    needs, MemAvailable never below AVAILABLE_FLOOR."""
    assert w.exited_at is None, f"QEMU exited {w.exited_at:.0f} s into the stall"
    slow = [s for s in w.samples if s.answer is None]
    assert not slow, f"the guest did not answer within {ANSWER:g} s at {[round(s.t) for s in slow]} s"
    low = [s for s in w.samples if s.size is None or base + s.size < needed]
    assert not low, (f"boot memory + QEMU size went below the {mib(needed)} the guest needs: "
                     f"{[(round(s.t), mib(s.size)) for s in low]}")
    tight = [s for s in w.samples if s.available is None or s.available < AVAILABLE_FLOOR]
    assert not tight, (f"MemAvailable went below {mib(AVAILABLE_FLOOR)}: "
                       f"{[(round(s.t), mib(s.available)) for s in tight]}")
    print(f"stall watched: {len(w.samples)} samples, slowest answer "
          f"{max(s.answer for s in w.samples):.2f} s, lowest QEMU size {mib(w.lowest_size())}, "
          f"lowest MemAvailable {mib(min(s.available for s in w.samples))}", flush=True)


def check_log_after_stall(vm: Vm) -> str:
    """Nothing on the console or in dmesg says the guest was hurt; the driver said, in one
    line at its pace and not one per retry, that the guest needs its memory."""
    log = vm.kernel_log()
    hurt = [l for l in (vm.console() + "\n" + log).splitlines() if HURT.search(l)]
    assert not hurt, f"the guest was hurt: {hurt[:5]}"
    stalls = [m.group(0) for m in PRESSURE.finditer(log)]
    assert stalls, "dmesg does not name memory pressure as the reason for the stall:\n" + "\n".join(
        [l for l in log.splitlines() if "virtio_mem" in l][-10:])
    print(f"{len(stalls)} pressure lines, the first: {stalls[0]}", flush=True)
    assert len(stalls) <= STALL / EVERY + 3, f"{len(stalls)} pressure lines in {STALL:g} s: a flood"
    return log


# -- the upstream C driver, once per scenario and session -----------------------------------

_REFERENCE: dict[str, str] = {}


def reference(policy: str) -> str:
    """The C driver's outcome in the same scenario, run once per session."""
    if not REFERENCE:
        return "not run (VMR_PRESSURE_REFERENCE=1 runs it, as `make soak` does)"
    if policy not in _REFERENCE:
        start = time.monotonic()
        print(f"--- the same scenario on the upstream C driver ({STALL:g} s)", flush=True)
        try:
            summary = run_reference(SCENARIOS[policy])
        except Exception as e:  # noqa: BLE001  (never judged: whatever happened is the summary)
            summary = f"did not complete: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _REFERENCE[policy] = f"{summary} [{time.monotonic() - start:.0f} s]"
    return _REFERENCE[policy]


def run_reference(sc: Scenario) -> str:
    vm = Vm("upstream", device_size=DEVICE, append=sc.append)
    try:
        vm.start()
        base = vm.memtotal()
        vm.set_requested(sc.grow)
        vm.wait_size(sc.grow)
        write_data(vm, sc.files)
        t_request = uptime(vm)
        vm.set_requested(sc.low)
        w = watch(vm, STALL, base)
        lines = vm.console().splitlines()
        failures = sum(1 for l in lines if "page allocation failure" in l)

        def after_request(pattern: str) -> tuple[str, str] | None:
            """The first console line matching `pattern`, without its timestamp, and when it
            came (s after the request)."""
            for l in lines:
                m = re.match(r"\s*\[\s*([\d.]+)\]\s*(.*)", l)
                if m and re.search(pattern, m.group(2)):
                    return f"{float(m.group(1)) - t_request:.0f} s", m.group(2).strip()[:90]
            return None

        first = after_request(DEATH.pattern)
        died = not vm.running()
        if died:
            panic = after_request("Kernel panic")
            state = (f"DIED: {panic[1]!r} {panic[0]} after the request" if panic
                     else f"DIED: QEMU gone {w.exited_at or STALL:.0f} s after the request")
            if first:
                state += f", first {first[1]!r} at {first[0]}"
            sums = "n/a (guest dead)"
        else:
            answered = [s.answer for s in w.samples if s.answer is not None]
            state = (f"survived {STALL:g} s ({len(answered)}/{len(w.samples)} samples answered, "
                     f"slowest {max(answered):.2f} s)" if answered else "QEMU running, guest silent")
            if first:
                state += f", but {first[1]!r} at {first[0]}"
            if w.samples[-1].answer is None:
                sums = "n/a (guest silent)"
            else:
                sums = "intact" if data_intact(vm, sc.files)[0] else "CHANGED or unreadable"
        return (f"{state}; QEMU size {mib(w.last_size())} (lowest {mib(w.lowest_size())}, "
                f"data {mib(sc.data)}, boot {mib(base)}); page allocation failure: "
                f"{f'yes, {failures} times' if failures else 'no'}; data {sums}")
    finally:
        died = vm.proc is not None and not vm.running()
        vm.stop()
        if died:
            print(f"upstream console kept in {vm.dir / 'console.log'}", flush=True)
        else:
            vm.cleanup()


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["movable", "default"])
@RUST_AND_DEBUG
def test_shrink_beyond_what_the_data_leaves(boot, kernel, policy):
    """Issue 9. 1 GiB boot memory and a 10 GiB device; grown to 6G (ZONE_MOVABLE) or 4G
    (default policy), 3 GiB of data in tmpfs (six 512 MiB files), then asked for 2G or 0:
    less than the data leaves. For the stall window the guest answers within 10 s, QEMU's
    size never goes below the data, MemAvailable stays above 64 MiB, no OOM, panic or
    allocation failure, dmesg says the guest needs its memory, and afterwards every byte of
    the data is as written. Once the data is deleted the requested size is reached (for 0
    under the default policy: or at most a few MiB pinned by the kernel, exactly as in
    test_shrink_to_zero_idle), MemTotal follows and emptied blocks are removed.

    Before the fix the driver took every free page: the guest OOM-killed init and panicked
    about 500 s later. With VMR_PRESSURE_REFERENCE=1 the C driver's outcome in the same
    scenario is printed too.

    On the debug kernel it runs only with VMR_PRESSURE_REFERENCE=1 (`make soak`): 340 s
    (movable) and 396 s (default) there on the Debian-config CI set, 12 minutes more for
    every CI run (both passed there, 2026-12-02)."""
    if kernel == "debug" and not REFERENCE:
        pytest.skip("debug kernel: run by `make soak` (VMR_PRESSURE_REFERENCE=1), not in CI's time")
    sc = SCENARIOS[policy]
    ref = reference(policy)
    print(f"upstream C driver, {policy}: {ref}", flush=True)
    start = time.monotonic()
    vm = boot(kernel, device_size=DEVICE, append=sc.append)
    shrink_beyond_the_data(vm, sc)
    print(f"upstream C driver, {policy}: {ref}", flush=True)
    print(f"{kernel} {policy}: {time.monotonic() - start:.0f} s from boot", flush=True)


def shrink_beyond_the_data(vm: Vm, sc: Scenario) -> None:
    """The steps and checks of test_shrink_beyond_what_the_data_leaves on a started Vm."""
    base = vm.memtotal()
    resize(vm, base, sc.grow)
    write_data(vm, sc.files)
    assert vm.meminfo()["Shmem"] >= sc.data
    print(f"--- requested-size {sc.low}: {mib(sc.data)} of data, boot memory {mib(base)}", flush=True)
    vm.set_requested(sc.low)
    w = watch(vm, STALL, base)
    check_watch(w, base, sc.data)
    check_log_after_stall(vm)
    ok, out = data_intact(vm, sc.files)
    assert ok, f"the data changed: {out}"

    low = parse_size(sc.low)
    t = time.monotonic()
    vm.run("rm /tmp/data?")
    if low == 0 and sc.append != MOVABLE:
        # While the guest lived on its margin, its own kernel allocations (slab, page tables,
        # stacks) came from the hot-plugged memory, its only ZONE_NORMAL, and some of them
        # stay: 8 MiB were left on the rust kernel, 10 and 12 MiB on the debug kernel (a
        # kernfs slab page named by page_owner), against 2 MiB after an idle shrink.
        try:
            zero_or_pinned(vm, base, max_left=PINNED_AFTER_PRESSURE)
        except AssertionError:
            print("what the driver said last:\n" + "\n".join(
                [l for l in vm.dmesg().splitlines() if "virtio_mem_rust" in l][-12:]), flush=True)
            raise
    else:
        vm.wait_size(low, timeout=120)
        print(f"reached {sc.low} {time.monotonic() - t:.1f} s after `rm` of the data began", flush=True)
        assert settle_memtotal(vm, base + low) == base + low, f"MemTotal is not boot + {sc.low}"
        assert ram_down_to(vm, low) == low
    assert RESUMING.search(vm.kernel_log()), "dmesg does not say the unplug resumed"


# The growing process: a dd that reads 1.5 GiB from a pipe into a single buffer, fed by
# vmr-fill (pseudo-random data; through the pipe about 40 MiB/s on the rust kernel, 13 on
# the debug one, and as slowly back to the checker at the end), so
# its RSS grows steadily, every page different and none of them zero (zero subpages of a
# THP could be split off and freed under pressure). Then it blocks writing its buffer to a
# reader that waits on a FIFO: it holds the memory, which cannot go anywhere (no swap).
# Released, the reader checks every byte of the buffer against vmr-fill's data and dd exits.
PROCESS = 1536 * MiB
GROWER = (f"mkfifo /tmp/release && (vmr-fill 7 {PROCESS // MiB} "
          "| sh -c 'echo $$ > /tmp/grower.pid; "
          f"exec dd bs={PROCESS // MiB}M count=1 iflag=fullblock 2>/dev/null' "
          f"| sh -c 'read go < /tmp/release; exec vmr-fill -c 7 {PROCESS // MiB} > /tmp/grower.check') &")


@RUST_AND_DEBUG
def test_shrink_beside_a_growing_process(boot, kernel):
    """ZONE_MOVABLE, 4G plugged. A process grows to 1.5 GiB of anonymous memory (pseudo-random
    data) and holds it (about 40 s on the rust kernel, 2 minutes on the debug one). While it
    grows, a shrink to 2G (which leaves it room) completes beside it; once it holds its
    1.5 GiB, a shrink to 512M (1 GiB boot + 512 MiB is less than it needs) must not hurt it:
    for the stall window it keeps its memory and is not OOM-killed, the guest answers,
    QEMU's size leaves room for it, dmesg says the guest needs its memory. Then the process
    hands its buffer to a checker (every byte as written, through all the migrations) and
    exits, and 512M is reached.

    (The big shrink comes only after the growth: memory the driver has already given back
    while the process was small is gone, and the driver does not plug it back unless the
    requested size grows, so a process growing past what is left afterwards would meet the
    OOM killer whatever the driver did.)

    On the debug kernel it runs only with VMR_PRESSURE_REFERENCE=1 (`make soak`): about 7
    minutes there, which a cold CI run cannot spare (it passed there: 1537 MiB held for
    120 s, 512M reached 9.3 s after the process exited)."""
    if kernel == "debug" and not REFERENCE:
        pytest.skip("debug kernel: run by `make soak` (VMR_PRESSURE_REFERENCE=1), not in CI's time")
    vm = boot(kernel, append=MOVABLE)
    start = time.monotonic()
    base = vm.memtotal()
    resize(vm, base, "4G")
    vm.run(GROWER)
    deadline = time.monotonic() + 10 * vm.slowdown
    while not (m := re.search(r"^(\d+)$", vm.run("cat /tmp/grower.pid 2>/dev/null", check=False), re.M)):
        assert time.monotonic() < deadline, "the process did not start"
        time.sleep(0.2)
    pid = int(m.group(1))
    time.sleep(2)
    t = resize(vm, base, "2G")
    rss = rss_of(vm, pid)
    print(f"4G -> 2G in {t:.2f} s beside the process, which holds {mib(rss)} so far", flush=True)
    assert rss is not None, "the process is gone"
    assert rss < PROCESS, "the process had finished growing before the shrink ended: nothing was beside it"
    grow_start = time.monotonic()
    while (rss := rss_of(vm, pid)) is not None and rss < PROCESS:
        assert time.monotonic() - grow_start < 300 * vm.slowdown, f"the process grew to {mib(rss)} only"
        time.sleep(2)
    assert rss is not None, "the process is gone"
    print(f"the process holds {mib(rss)} ({time.monotonic() - grow_start:.0f} s more)", flush=True)
    assert vm.device()["size"] == 2 * GiB

    print(f"--- requested-size 512M: the process holds {mib(rss)}, boot memory {mib(base)}", flush=True)
    vm.set_requested("512M")
    w = watch(vm, STALL, base, pid)
    check_watch(w, base, PROCESS)
    gone = [s for s in w.samples if s.rss is None or s.rss < PROCESS]
    assert not gone, f"the process lost memory or exited: {[(round(s.t), mib(s.rss)) for s in gone]}"
    check_log_after_stall(vm)

    t = time.monotonic()
    vm.run("echo go > /tmp/release")
    deadline = time.monotonic() + 120 * vm.slowdown
    while rss_of(vm, pid) is not None:
        assert time.monotonic() < deadline, "the process did not exit once released"
        time.sleep(1)
    check = vm.run("cat /tmp/grower.check")
    print(f"the process exited {time.monotonic() - t:.0f} s after its release; its memory: "
          f"{check.strip()}", flush=True)
    assert "vmr-fill: ok" in check, f"the process's memory changed: {check}"
    vm.wait_size("512M", timeout=120)
    print(f"reached 512M {time.monotonic() - t:.1f} s after the release", flush=True)
    assert settle_memtotal(vm, base + 512 * MiB) == base + 512 * MiB
    assert ram_down_to(vm, 512 * MiB) == 512 * MiB
    log = vm.kernel_log()
    assert RESUMING.search(log), "dmesg does not say the unplug resumed"
    assert not [l for l in log.splitlines() if HURT.search(l)]
    print(f"{kernel}: {time.monotonic() - start:.0f} s from boot", flush=True)
