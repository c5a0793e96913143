# SPDX-License-Identifier: GPL-2.0
"""Boot tests of a distribution kernel's life with memory plugged: suspend to RAM and to idle,
hibernation (refused), kexec, a reboot, and kdump. Each runs on build/bzImage (this driver)
and, with VMR_SOAK=1 (`make soak`), on Debian's own kernel with its virtio_mem.ko (the C
driver), which behaves the same; only the driver's words differ (MESSAGES). The C driver's
runs are not in `make test`: they check Debian's code, not this driver's, and would add
4.5 minutes to every CI run (all six passed on 2026-12-02)."""

import base64
import re
import struct
import time

import os

import pytest

from test_boot import settle_zone_normal
from test_unplug import ram_down_to, resize
from vmlib import BUILD, GiB, GuestError, KERNELS, MiB, Vm, initramfs

SOAK = os.environ.get("VMR_SOAK", "0") == "1"
BOTH = pytest.mark.parametrize("kernel", [
    "rust", pytest.param("upstream", marks=pytest.mark.skipif(
        not SOAK, reason="the C driver's reference run: `make soak` (VMR_SOAK=1), not in CI's time"))])
# QEMU offers VIRTIO_MEM_F_PERSISTENT_SUSPEND (feature bit 2) when the machine can suspend
# to RAM (q35's S3, on by default in QEMU 10).
S3 = ["-global", "ICH9-LPC.disable_s3=0"]
NO_S3 = ["-global", "ICH9-LPC.disable_s3=1"]
PERSISTENT_SUSPEND = 2

# What each driver says (drivers/device.rs; Linux's drivers/virtio/virtio_mem.c).
MESSAGES = {
    "rust": {"hibernation": "hibernation is not supported with a virtio-mem device: "
                            "hibernation refused",
             "unplug_all": "0x80000000 is plugged at probe: unplugging all memory first",
             "kdump": "crash kernel: memory hot(un)plug disabled, 0x80000000 stays plugged"},
    "upstream": {"hibernation": "hibernation is not supported.",
                 "unplug_all": "unplugging all memory is required",
                 "kdump": "memory hot(un)plug disabled in kdump kernel"},
}


def features(vm: Vm) -> str:
    """The virtio-mem device's negotiated feature bits, as the guest's sysfs shows them."""
    return vm.run("for d in /sys/bus/virtio/devices/*; do "
                  "[ \"$(cat $d/device)\" = 0x0018 ] && cat $d/features; done").strip()


def qemu_status(vm: Vm) -> str:
    return vm.qmp.cmd("query-status")["status"]


def wait_status(vm: Vm, want: str, timeout: float = 60) -> float:
    start = time.monotonic()
    while qemu_status(vm) != want:
        if time.monotonic() - start > timeout * vm.slowdown:
            raise GuestError(f"QEMU's status is {qemu_status(vm)!r}, not {want!r} after {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - start


def with_data(vm: Vm, base: int, mib: int = 1024) -> None:
    """2 GiB plugged (online_movable: tmpfs fills the device's memory first), then `mib` MiB
    of vmr-fill's data in tmpfs."""
    resize(vm, base, "2G")
    vm.run("mount -o remount,size=2G /tmp")  # sized at boot, from 1 GiB of RAM
    vm.run(f"vmr-fill 11 {mib} > /tmp/data", timeout=300)
    used = vm.zone_managed("Movable") - vm.zone_managed("Movable", "pages free")
    print(f"ZONE_MOVABLE (the device's memory) in use: {used // MiB} MiB")
    assert used >= mib * MiB // 2, "the data is not in the device's memory"


def after_sleep(vm: Vm, base: int, mib: int = 1024) -> None:
    """The data survived, and the driver follows the requested size both ways."""
    assert "vmr-fill: ok" in vm.run(f"vmr-fill -c 11 {mib} < /tmp/data", timeout=300)
    assert vm.device()["size"] == 2 * GiB
    resize(vm, base, "512M", timeout=300)
    resize(vm, base, "3G")
    assert "vmr-fill: ok" in vm.run(f"vmr-fill -c 11 {mib} < /tmp/data", timeout=300)


@BOTH
def test_suspend_to_ram(boot, kernel):
    """S3 with 2 GiB plugged and 1 GiB of data in it: the device keeps its memory across the
    sleep (VIRTIO_MEM_F_PERSISTENT_SUSPEND negotiated), the driver re-creates its queue on
    resume and follows resizes after it."""
    vm = boot(kernel, append="memhp_default_state=online_movable", qemu_args=S3)
    assert features(vm)[PERSISTENT_SUSPEND] == "1", "QEMU with S3 offers PERSISTENT_SUSPEND"
    assert "deep" in vm.run("cat /sys/power/mem_sleep")
    base = vm.memtotal()
    with_data(vm, base)
    # The shell is inside the write while the guest sleeps, and says when it returned.
    vm.send("echo mem > /sys/power/state; echo vmr-resumed-$?")
    print(f"suspended after {wait_status(vm, 'suspended'):.1f} s")
    vm.qmp.cmd("system_wakeup")
    assert vm.expect(rb"vmr-resumed-(\d+)").group(1) == b"0", "suspend or resume failed"
    log = vm.kernel_log()
    assert "PM: suspend entry (deep)" in log and "PM: suspend exit" in log
    after_sleep(vm, base)


@BOTH
def test_suspend_to_idle(boot, kernel):
    """Suspend-to-idle (s2idle, the only sleep state of a q35 machine without S3), woken by
    a key on the serial console (the RTC's alarm does not wake it in QEMU): the driver freezes and restores its device as for S3 and goes on after it.
    (QEMU 10 offers VIRTIO_MEM_F_PERSISTENT_SUSPEND on every x86 machine, also without S3,
    so the refusal without it, and s2idle's exemption from that, are the KUnit and host
    tests' to check.)"""
    vm = boot(kernel, append="memhp_default_state=online_movable", qemu_args=NO_S3)
    assert vm.run("cat /sys/power/mem_sleep").strip() == "[s2idle]"
    base = vm.memtotal()
    with_data(vm, base, 512)
    vm.run("echo enabled > /sys/class/tty/ttyS0/power/wakeup")
    vm.send("echo mem > /sys/power/state; echo vmr-resumed-$?")
    time.sleep(5)
    vm.ser.sendall(b"\n")  # the wake-up key; the shell then reads an empty line
    assert vm.expect(rb"vmr-resumed-(\d+)").group(1) == b"0", "suspend or resume failed"
    log = vm.kernel_log()
    entry = re.search(r"\[ *([\d.]+)\] PM: suspend entry \(s2idle\)", log)
    exit_ = re.search(r"\[ *([\d.]+)\] PM: suspend exit", log)
    assert entry and exit_, "no s2idle in the kernel's log"
    slept = float(exit_.group(1)) - float(entry.group(1))
    print(f"slept {slept:.1f} s")
    assert slept > 2, "the guest did not stay in s2idle until woken"
    after_sleep(vm, base, 512)


@BOTH
def test_hibernation_refused(boot, kernel):
    """Hibernation with memory plugged is vetoed by the driver's PM notifier with its message
    (QEMU unplugs everything on the reset a restore needs); the guest goes on."""
    vm = boot(kernel)
    base = vm.memtotal()
    resize(vm, base, "1G")
    out = vm.run("{ echo disk > /sys/power/state; } 2>&1; echo vmr-rc=$?")
    assert "Operation not permitted" in out and "vmr-rc=1" in out, out
    assert MESSAGES[kernel]["hibernation"] in vm.kernel_log()
    resize(vm, base, "2G")
    resize(vm, base, "512M")


def boot_files(kernel: str) -> dict[str, bytes]:
    """The running kernel and its initramfs, for kexec inside the guest."""
    return {"boot/bzImage": KERNELS[kernel].read_bytes(), "boot/initrd": initramfs(kernel)}


@BOTH
def test_kexec_with_memory_plugged(boot, kernel):
    """kexec with 2 GiB plugged: the new kernel finds memory plugged that it knows nothing
    of, unplugs all of it (UNPLUG_ALL), then plugs the requested size again. Movable, so
    that the shrink to 0 at the end is exact (the new kernel passes the command line on)."""
    vm = boot(kernel, append="memhp_default_state=online_movable", extra_files=boot_files(kernel))
    base = vm.memtotal()
    resize(vm, base, "2G")
    vm.run('kexec -l /boot/bzImage --initrd=/boot/initrd --command-line="$(cat /proc/cmdline)"',
           timeout=120)
    vm.send("kexec -e")
    vm.wait_ready()
    vm.wait_size("2G")
    log = vm.kernel_log()
    assert MESSAGES[kernel]["unplug_all"] in log
    # Everything the device plugged is the kernel's again: shrinking to 0 takes exactly
    # 2 GiB off MemTotal, and growing gives it back.
    assert ram_down_to(vm, 2 * GiB) == 2 * GiB
    now = vm.memtotal()
    resize(vm, now - 2 * GiB, "0M")
    resize(vm, now - 2 * GiB, "1G")


@BOTH
def test_reboot_with_memory_plugged(boot, kernel):
    """reboot -f with 2 GiB plugged: QEMU's reset unplugs it all, and the driver in the
    rebooted guest plugs the requested size again."""
    vm = boot(kernel, reboot=True)
    base = vm.memtotal()
    resize(vm, base, "2G")
    vm.send("reboot -f")
    vm.wait_ready()
    vm.wait_size("2G")
    # The rebooted kernel's MemTotal may differ from the first one's by a few KiB (KASLR):
    # ZONE_NORMAL is exact, MemTotal close.
    assert settle_zone_normal(vm, 2 * GiB) == 2 * GiB
    now = vm.memtotal()
    assert abs(now - base - 2 * GiB) <= 64 * 1024, "MemTotal did not grow by about 2 GiB"
    resize(vm, now - 2 * GiB, "1G")


def vmcore_loads(vm: Vm) -> list[tuple[int, int]]:
    """The PT_LOAD ranges (physical start, end) of /proc/vmcore's ELF header."""
    def read(n: int) -> bytes:
        out = vm.run(f"dd if=/proc/vmcore bs={n} count=1 2>/dev/null | base64 -w 0; echo")
        return base64.b64decode(out.strip().splitlines()[-1])

    head = read(4096)
    assert head[:4] == b"\x7fELF" and head[4] == 2, "not an ELF64 header"
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    need = phoff + phentsize * phnum
    if need > len(head):
        head = read(need)
    loads = []
    for i in range(phnum):
        p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", head, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_paddr + p_memsz))
    return loads


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@BOTH
def test_kdump(boot, kernel):
    """kdump with 2 GiB plugged: the crash kernel says it is in kdump mode, unplugs nothing
    (QEMU's size stays 2 GiB, also when the requested size changes), /proc/vmcore's program
    headers hold the plugged ranges of the device and nothing else of it, and all of
    /proc/vmcore can be read."""
    vm = boot(kernel, append="crashkernel=256M", extra_files=boot_files(kernel))
    base = vm.memtotal()
    resize(vm, base, "2G")
    dev = vm.device()
    # kexec_file_load (-s): the kernel writes the crash kernel's ELF header from its own view
    # of System RAM, driver-managed memory included, and keeps it current across hotplug.
    vm.run('kexec -s -p /boot/bzImage --initrd=/boot/initrd --append="console=ttyS0 loglevel=5 '
           'panic=-1 vmr.insmod=1 nr_cpus=1 reset_devices irqpoll"', timeout=120)
    assert vm.run("cat /sys/kernel/kexec_crash_loaded").strip() == "1"
    # The crash below is on purpose: the console is checked up to here, and from the crash
    # kernel's boot on.
    assert not vm.bad_console_lines()
    vm.console_checked_from = len(vm.console())
    vm.send("echo c > /proc/sysrq-trigger")
    vm.wait_ready(timeout=180)
    vm.console_checked_from = len(vm.console())
    assert vm.run("cat /proc/cmdline").find("elfcorehdr=") >= 0, "not in the crash kernel"
    log = vm.kernel_log()
    assert MESSAGES[kernel]["kdump"] in log
    assert vm.device()["size"] == 2 * GiB
    vm.set_requested("3G")
    time.sleep(3)
    vm.set_requested("0")
    time.sleep(3)
    assert vm.device()["size"] == 2 * GiB, "the crash kernel changed the device's plugged memory"
    region = (dev["memaddr"], dev["memaddr"] + dev["max-size"])
    inside = merged([(max(s, region[0]), min(e, region[1])) for s, e in vmcore_loads(vm)
                     if s < region[1] and e > region[0]])
    assert inside == [(region[0], region[0] + 2 * GiB)], \
        f"/proc/vmcore's ranges in the device's region {region}: {inside}"
    t = time.monotonic()
    out = vm.run("dd if=/proc/vmcore of=/dev/null bs=1M 2>&1", timeout=900)
    print(f"read all of /proc/vmcore in {time.monotonic() - t:.1f} s: {out.strip()}")
    assert vm.device()["size"] == 2 * GiB
