# SPDX-License-Identifier: GPL-2.0
"""Boot a guest with a virtio-mem device under QEMU, drive it over QMP and its serial shell.

Used by the boot tests (vm-scripts/tests) and the demo (vm-scripts/demo). QMP goes through
the QEMU project's own client library (qemu.qmp); the guest's shell is the initramfs's
(vm-scripts/build-initramfs) on the first serial port.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
CACHE = Path(os.environ.get("VMR_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "virtio-mem-rust"))

# rust: Debian's cloud config with this driver as a module; upstream: Debian's own cloud kernel
# with its virtio_mem.ko; debug: the small debug kernel; tiny: the small kernel with the C
# driver built in (make mutants). See vm-scripts/build-kernel.
KERNELS = {"rust": BUILD / "bzImage", "upstream": BUILD / "bzImage-upstream",
           "debug": BUILD / "bzImage-debug", "tiny": BUILD / "bzImage-tiny"}
DRIVERS = {"rust": "virtio_mem_rust", "upstream": "virtio_mem", "debug": "virtio_mem_rust",
           "tiny": "virtio_mem"}
# Kernel command line of each kernel, before the caller's. The debug kernel (lockdep,
# DEBUG_VM, DEBUG_ATOMIC_SLEEP, KFENCE, PAGE_OWNER; vm-scripts/debug.config) panics on any
# WARN, KFENCE report included, and records the owner of every page. The rust kernel and
# Debian's load their driver module from the initramfs (KERNEL_FILES) as soon as init starts,
# as a distribution's initramfs would.
KERNEL_APPEND = {"debug": "panic_on_warn=1 page_owner=on", "upstream": "vmr.insmod=1",
                 "rust": "vmr.insmod=1"}
# Files a kernel needs in the initramfs: path inside it -> file on the host.
KERNEL_FILES = {"upstream": {"lib/vmr/virtio_mem.ko": BUILD / "upstream" / "virtio_mem.ko"},
                "rust": {"lib/vmr/virtio_mem_rust.ko": BUILD / "rust" / "virtio_mem_rust.ko"}}
# How much slower a kernel is than the rust kernel under TCG: every timeout of a Vm is
# multiplied by it. Measured on 2 host cores: the debug kernel boots in 7-9 s (rust: 3 s),
# grows 0 -> 4G in 2.2 s (0.2 s), shrinks 4G -> 0 in 2.3-5 s (0.3-1.2 s), writes 1.5 GiB
# of tmpfs in 140 s (62 s); its boot tests take 1.5 to 3.6 times as long.
SLOWDOWN = {"debug": 3.0}

GiB = 1 << 30
MiB = 1 << 20

# What must never appear on the guest's console: warnings, BUGs, oopses and panics, and the
# debug kernel's reports (lockdep's "WARNING: possible circular locking dependency", "BUG:
# sleeping function called from invalid context", "BUG: KFENCE: use-after-free ...", "INFO:
# trying to register non-static key", ...), also matched by their own text in case their
# prefix changes.
BAD_CONSOLE = re.compile(
    r"WARNING:|BUG:|kernel BUG at|Oops|Call Trace|Kernel panic|INFO: "
    r"|possible circular locking|possible recursive locking|inconsistent lock state"
    r"|KFENCE:|sleeping function called from invalid context|scheduling while atomic")


def parse_size(s: str | int) -> int:
    """'4G', '512M', '0' or an int -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"(\d+)([KMGT]?)", s.strip())
    if not m:
        raise ValueError(f"bad size {s!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def format_size(n: int) -> str:
    """Bytes -> '9G', '512M' or a plain number, as QEMU's command line takes them."""
    for unit, shift in (("G", 30), ("M", 20)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def cpio_newc(files: dict[str, bytes]) -> bytes:
    """A gzip'd newc cpio archive of regular files (and their directories), to append to the
    initramfs: the kernel unpacks concatenated archives in order."""
    out = io.BytesIO()
    ino = 1000

    def entry(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        ino += 1
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        out.write(hdr.encode() + name_b)
        out.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))

    dirs = sorted({str(Path(p).parent) for p in files} - {"."})
    for d in dirs:
        entry(d, 0o040755, b"")
    for p, data in sorted(files.items()):
        entry(p, 0o100644, data)
    entry("TRAILER!!!", 0, b"")
    return gzip.compress(out.getvalue())


def initramfs(kernel: str | None, extra_files: dict[str, bytes] | None = None) -> bytes:
    """The initramfs a Vm of `kernel` boots with: build/initramfs.cpio.gz, then the kernel's
    own files (KERNEL_FILES) and `extra_files` (the latter win), appended as one archive."""
    extra = {k: v.read_bytes() for k, v in KERNEL_FILES.get(kernel, {}).items()}
    extra.update(extra_files or {})
    base = (BUILD / "initramfs.cpio.gz").read_bytes()
    return base + cpio_newc(extra) if extra else base


class GuestError(RuntimeError):
    pass


class Vm:
    """One QEMU guest: q35, TCG, 2 vCPUs, 1 GiB boot memory, maxmem 9 GiB, and a
    virtio-mem-pci device `vm0` backed by an 8 GiB memory-backend-ram (`device_size`
    changes the backend, and maxmem with it: 1 GiB more).

    `kernel` is "rust", "upstream", "debug" or the path of a bzImage. Timeouts are those of
    the rust kernel; on a slower kernel (SLOWDOWN) every timeout is multiplied by its
    factor, `self.slowdown`."""

    def __init__(self, kernel: str | Path = "rust", *, requested: str | int = 0,
                 block_size: str | None = None, device_size: str | int = "8G", append: str = "",
                 extra_files: dict[str, bytes] | None = None, qemu_args: list[str] = (),
                 reboot: bool = False, interactive: bool = False, workdir: Path | None = None):
        self.name = str(kernel) if str(kernel) in KERNELS else None
        self.kernel = Path(KERNELS.get(str(kernel), kernel))
        self.slowdown = SLOWDOWN.get(self.name, 1.0)
        self.requested = parse_size(requested)
        self.block_size = block_size
        self.device_size = parse_size(device_size)
        self.append = append
        self.extra_files = extra_files or {}
        # More QEMU arguments; reboot=True lets a guest reboot (QEMU resets the machine)
        # instead of ending QEMU (-no-reboot).
        self.qemu_args = list(qemu_args)
        self.reboot = reboot
        # Console lines before this offset are not checked by bad_console_lines() (a test
        # that crashes the guest on purpose checks them itself first).
        self.console_checked_from = 0
        self.interactive = interactive
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="vmr-vm-"))
        self.proc: subprocess.Popen | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.ser: socket.socket | None = None
        self._buf = b""
        self._seq = 0

    # -- life cycle -------------------------------------------------------------------------

    def command_line(self) -> list[str]:
        for f in (self.kernel, BUILD / "initramfs.cpio.gz"):
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing: run `make kernels initramfs` first")
        for f in KERNEL_FILES.get(self.name, {}).values():
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing: run `make kernels` first")
        initrd = self.dir / "initramfs.cpio.gz"
        initrd.write_bytes(initramfs(self.name, self.extra_files))
        dev = f"virtio-mem-pci,id=vm0,memdev=mem0,requested-size={self.requested}"
        if self.block_size:
            dev += f",block-size={self.block_size}"
        cmd = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", "2", "-m", f"1G,maxmem={format_size(GiB + self.device_size)},slots=1",
            "-object", f"memory-backend-ram,id=mem0,size={format_size(self.device_size)}",
            "-device", dev,
            "-kernel", str(self.kernel), "-initrd", str(initrd),
            "-append", " ".join(filter(None, ("console=ttyS0 loglevel=5 panic=-1",
                                              KERNEL_APPEND.get(self.name), self.append))),
            "-nodefaults", "-no-user-config", "-nic", "none", "-display", "none",
            *([] if self.reboot else ["-no-reboot"]), *self.qemu_args,
        ]
        if self.interactive:
            cmd += ["-serial", "mon:stdio"]
        else:
            cmd += [
                # wait=on: QEMU starts the guest only once start() is connected, so no
                # console output can be lost (with wait=off, what the guest writes before
                # QEMU accepts the connection goes only to the log).
                "-chardev", f"socket,id=ser0,path={self.dir}/serial.sock,server=on,wait=on,"
                            f"logfile={self.dir}/console.log",
                "-serial", "chardev:ser0",
                "-qmp", f"unix:{self.dir}/qmp.sock,server=on,wait=off",
            ]
        return cmd

    def start(self, timeout: float = 120) -> "Vm":
        timeout *= self.slowdown
        self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                     stdout=open(self.dir / "qemu.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20

        def wait_for(sock: Path) -> None:
            while not sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise GuestError(f"QEMU did not start: {(self.dir / 'qemu.log').read_text()}")
                time.sleep(0.05)

        # The serial console first: QEMU waits for it (wait=on) before it goes on to QMP.
        wait_for(self.dir / "serial.sock")
        self.ser = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ser.connect(str(self.dir / "serial.sock"))
        wait_for(self.dir / "qmp.sock")
        self.qmp = QEMUMonitorProtocol(str(self.dir / "qmp.sock"))
        self.qmp.connect()
        self.wait_ready(timeout / self.slowdown)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        """Waits for the initramfs's init to say it is ready (after a boot, a reboot or a
        kexec), then for the shell: BusyBox's banner is read here, not by the first run()."""
        self._read_until(re.compile(rb"vmr-init: ready"), timeout * self.slowdown)
        self.run(":")

    def expect(self, pattern: bytes, timeout: float = 60) -> re.Match:
        """Waits for `pattern` on the console (after a send())."""
        return self._read_until(re.compile(pattern), timeout * self.slowdown)

    def send(self, cmd: str) -> None:
        """Types `cmd` into the guest's shell without waiting for it (a command after which
        the shell does not come back: kexec -e, a crash, reboot -f)."""
        assert self.ser
        self._buf = b""
        self.ser.sendall(f"{cmd.rstrip()}\n".encode())

    def stop(self) -> None:
        if self.qmp:
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.qmp.close()
            except (EOFError, OSError):
                pass  # QEMU closed the socket on quit
            self.qmp = None
        if self.ser:
            self.ser.close()
            self.ser = None
        if self.proc:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def running(self) -> bool:
        """QEMU is still running (a guest panic ends it: panic=-1 and -no-reboot)."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "Vm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the guest's shell ------------------------------------------------------------------

    def _read_until(self, pattern: re.Pattern, timeout: float) -> re.Match:
        assert self.ser
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self._buf)
            if m:
                self._buf = self._buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc and self.proc.poll() is not None):
                raise GuestError(f"timed out waiting for {pattern.pattern!r} after {timeout:g} s; "
                                 f"{self.where()}; console tail:\n" + self.console()[-3000:])
            self.ser.settimeout(min(left, 1.0))
            try:
                data = self.ser.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise GuestError("serial console closed; console tail:\n" + self.console()[-3000:])
            self._buf += data

    def run(self, cmd: str, timeout: float = 60, check: bool = True) -> str:
        """Runs `cmd` in the guest's shell and returns its output."""
        assert self.ser
        timeout *= self.slowdown
        self._seq += 1
        tag = f"__VMR_{self._seq}_"
        self._buf = b""
        cmd = cmd.rstrip()
        sep = " " if cmd.endswith("&") else "; "  # `&` already ends the command
        self.ser.sendall(f"{cmd}{sep}echo {tag}$?__\n".encode())
        m = self._read_until(re.compile(re.escape(tag.encode()) + rb"(\d+)__"), timeout)
        # Output is everything the shell printed before the tag.
        out = m.string[:m.start()].decode(errors="replace").replace("\r", "")
        rc = int(m.group(1))
        if check and rc != 0:
            raise GuestError(f"`{cmd}` exited {rc}: {out}")
        return out

    def where(self) -> str:
        """Where a guest that stopped answering is: QEMU's run state and each vCPU's
        instruction pointer (a kernel address is 0xffffffff8..., KASLR shifts it; below 1 MiB
        is the firmware), so that a hang before the first console line still says something."""
        if not self.running():
            return f"QEMU has exited with {self.proc.returncode if self.proc else None}"
        try:
            self.qmp.settimeout(10)
            status = self.qmp.cmd("query-status")
            regs = self.qmp.cmd("human-monitor-command", **{"command-line": "info registers -a"})
            rips = re.findall(r"RIP=([0-9a-f]+)", regs)
            return f"QEMU {status.get('status')}, vCPU RIPs {', '.join(rips) or regs[:200]}"
        except Exception as e:  # the monitor itself may be what hangs
            return f"QEMU's monitor did not answer: {e!r}"
        finally:
            self.qmp.settimeout(None)

    def console(self) -> str:
        p = self.dir / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def dmesg(self) -> str:
        return self.run("dmesg")

    def kernel_log(self, tries: int = 3) -> str:
        """The kernel's log buffer, exactly: checked against its md5sum taken in the guest.
        Under TCG the console mangles a character of the kernel's own output now and then
        (seen in 1 line out of about 80 of KUnit's at boot with loglevel=7); a command's
        output has come through intact so far, and this makes sure of it."""
        for _ in range(tries):
            out = self.run("dmesg > /tmp/vmr-kmsg; md5sum /tmp/vmr-kmsg; cat /tmp/vmr-kmsg")
            m = re.search(r"^([0-9a-f]{32})  /tmp/vmr-kmsg\n", out, re.M)
            if m and hashlib.md5(out[m.end():].encode()).hexdigest() == m.group(1):
                return out[m.end():]
        raise GuestError(f"the kernel log did not come through the console intact in {tries} tries")

    # -- what the user checks ---------------------------------------------------------------

    def memtotal(self) -> int:
        """The guest's MemTotal in bytes."""
        # A tag of its own: a guest loop may print /proc/meminfo lines to the console too.
        out = self.run("awk '/^MemTotal:/ { print \"VMR_MEMTOTAL_KB=\" $2 }' /proc/meminfo")
        return int(re.search(r"VMR_MEMTOTAL_KB=(\d+)", out).group(1)) * 1024

    def meminfo(self, timeout: float = 60) -> dict[str, int]:
        """/proc/meminfo in bytes ("MemTotal", "MemAvailable", "Shmem", ...); `timeout` as
        for run()."""
        # A tag of its own, as in memtotal(): kernel messages may share the console.
        out = self.run("sed 's/^/VMR_MEMINFO /' /proc/meminfo", timeout=timeout)
        return {m.group(1): int(m.group(2)) * 1024
                for m in re.finditer(r"^VMR_MEMINFO (\w+(?:\(\w+\))?):\s+(\d+) kB$", out, re.M)}

    def device(self) -> dict:
        """QEMU's view of vm0 (query-memory-devices): size, requested-size, addr, ..."""
        assert self.qmp
        for d in self.qmp.cmd("query-memory-devices"):
            if d["data"].get("id") == "vm0":
                return d["data"]
        raise GuestError("no memory device vm0")

    def set_requested(self, size: str | int) -> None:
        assert self.qmp
        self.qmp.cmd("qom-set", path="vm0", property="requested-size", value=parse_size(size))

    def wait_size(self, size: str | int, timeout: float = 120, poll: float = 0.02) -> float:
        """Waits until QEMU's size of vm0 is `size`; returns the seconds it took."""
        want = parse_size(size)
        timeout *= self.slowdown
        start = time.monotonic()
        while True:
            if self.device()["size"] == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise GuestError(f"vm0 size is {self.device()['size']:#x}, not {want:#x} after {timeout:g} s")
            time.sleep(poll)

    def bound_driver(self) -> str | None:
        """Name of the driver bound to the virtio-mem device (virtio id 0x0018), or None."""
        out = self.run("for d in /sys/bus/virtio/devices/*; do "
                       "[ \"$(cat $d/device)\" = 0x0018 ] && "
                       "{ [ -e $d/driver ] && basename $(readlink $d/driver) || echo NONE; }; done")
        name = out.strip().splitlines()[-1] if out.strip() else "NONE"
        return None if name == "NONE" else name

    def iomem(self) -> list[tuple[int, int, int, str]]:
        """/proc/iomem as (depth, start, end, name)."""
        rows = []
        for line in self.run("cat /proc/iomem").splitlines():
            m = re.match(r"^( *)([0-9a-f]+)-([0-9a-f]+) : (.*)$", line)
            if m:
                rows.append((len(m.group(1)) // 2, int(m.group(2), 16), int(m.group(3), 16), m.group(4)))
        return rows

    def zone_managed(self, zone: str, field: str = "managed") -> int:
        """Managed bytes of `zone` over all nodes (/proc/zoneinfo); with field="pages free",
        its free bytes."""
        total, cur = 0, None
        for line in self.run("cat /proc/zoneinfo").splitlines():
            m = re.match(r"Node \d+, zone\s+(\S+)", line)
            if m:
                cur = m.group(1)
                continue
            m = re.match(rf"\s+{field}\s+(\d+)", line)
            if m and cur == zone:
                total += int(m.group(1)) * 4096
        return total

    def bad_console_lines(self) -> list[str]:
        return [l for l in self.console()[self.console_checked_from:].splitlines()
                if BAD_CONSOLE.search(l)]

    def debug_state(self) -> dict[str, int]:
        """The debug kernel's checkers as the guest reports them: lockdep's debug_locks (0
        once lockdep turned itself off, after its first report or a full table), KFENCE's
        debugfs stats ("kfence enabled", "kfence total allocations", "kfence total bugs",
        ...), and "page_owner" (1 when page_owner=on took effect)."""
        out = self.run(
            "grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug; "
            "awk '/debug_locks:/ { print \"VMR_debug_locks: \" $2 }' /proc/lockdep_stats; "
            "sed 's/^/VMR_kfence /' /sys/kernel/debug/kfence/stats; "
            "[ -e /sys/kernel/debug/page_owner ] && echo 'VMR_page_owner: 1' || echo 'VMR_page_owner: 0'")
        return {m.group(1): int(m.group(2))
                for m in re.finditer(r"^VMR_([^:\n]+): (-?\d+)$", out, re.M)}

