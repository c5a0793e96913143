// SPDX-License-Identifier: GPL-2.0

//! Model-based property tests of the driver's worker, on the host.
//!
//! The code under test is the driver's own `drivers/device.rs`, compiled unchanged against
//! the host stand-in of the `kernel` crate (`host-tests/kernel/`): [`VirtioMem::run`] is the
//! worker, [`VirtioMem::memory_event`] the memory notifier and [`VirtioMem::online_pages`]
//! the online page callback. The harness implements [`Platform`] and [`Transport`] with two
//! reference models:
//!
//! - [`Qemu`]: QEMU's virtio-mem device (`hw/virtio/virtio-mem.c`): a bitmap of plugged
//!   device blocks (as intervals), the requested size, the usable region that grows with
//!   the requested size (`requested + extent`, never shrinking except on UNPLUG_ALL), and
//!   its rules: ERROR for a misaligned request, one outside the usable region, plugging a
//!   plugged or unplugging an unplugged block; NACK for a plug beyond the requested size.
//! - The kernel: per memory block whether it is added, online and in which zone, a pending
//!   onlining or offlining, and per page whether it is absent, in the buddy or
//!   fake-offline (with or without the driver's reference), plus pages pinned by unmovable
//!   allocations and what the guest has besides (`MemAvailable`); `add_memory`,
//!   `offline_and_remove_memory`, onlining and offlining with the memory notifier's event
//!   order (CANCEL after a refused GOING_*, also when another notifier refused), the online
//!   page callback in `online_pages_range`'s chunks, and `alloc_contig_range`.
//!
//! The tests run on one thread. What other threads would do while the worker's lock is
//! free (it drops it only around `add_memory` and `offline_and_remove`) is done inside
//! those two calls; the operator's resizes arrive between runs, while a request is in flight
//! and while pages are being migrated.
//!
//! A script (a tape of bytes per worker wake-up, shrunk towards "nothing goes wrong")
//! injects BUSY / NACK / ERROR answers (and, in the second property, invalid answers and
//! timeouts after which the device did the request), resizes while a request is in flight,
//! `add_memory` failures, removal failures, `alloc_contig_range` failures, onlining and
//! offlining by other threads while the worker has dropped its lock, and notifier
//! refusals, torn config reads, a guest short of memory, system sleep (the freezer asking
//! the worker to stop in the middle of a round, the device frozen and restored, with or
//! without `VIRTIO_MEM_F_PERSISTENT_SUSPEND`, to idle or deeper), and (in a tenth of the
//! cases, not QEMU) a usable region shrunk without UNPLUG_ALL. Invariants are checked at every point
//! where another thread could look (the worker's lock is free) and at every request and
//! page hand-over; at the end the script stops injecting, and the driver must converge on
//! the requested size within the limits it has (whole memory blocks inside the usable
//! region, the offline threshold).
//!
//! Invariants: the plugged size is the sum of the subblocks marked plugged and, unless
//! the device did something behind the driver's back, the device's plugged size; every
//! subblock and block state in `sbm.rs` matches the models (plugged bits, added, online,
//! zone, in transition); every request is valid for QEMU (aligned, inside the usable
//! region, plugging unplugged / unplugging plugged blocks, at most 65535 blocks, encoded
//! as `struct virtio_mem_req`), and QEMU never has to answer ERROR on its own; no plug
//! beyond the requested size the driver read and no unplug of added memory below it (a
//! NACK from QEMU only after the size was lowered meanwhile); nothing is sent after ERROR,
//! an invalid answer or none, and the driver gives up only then; a block is removed only
//! with nothing plugged in it; a page goes to the buddy only if plugged, never by the
//! driver's hand after ERROR / no answer about it (it stays fake-offline), and with the
//! second property never by onlining either; alloc_contig_range only on pages in the
//! buddy, and never so much that the guest is left less than its margin; the driver's
//! page references are dropped and taken back exactly once per offlining; no block is
//! added while the offline threshold is reached; every page of an onlined block is either
//! onlined or kept fake-offline; a round asked to freeze stops within the step it is in
//! (at most the requests of one memory block's run and its undo), no request reaches a
//! frozen device (also one frozen while the worker's lock is free), and sleep is refused
//! when memory is plugged that the device would not keep (and allowed when nothing is,
//! unless a request got ERROR, an invalid answer or none: the driver then takes its range
//! as of unknown state).
//!
//! A failing case is kept in `proptest-regressions/` and replayed first by every later
//! run; every run prints its seed (`VMR_HOST_SEED=<hex>` replays the whole run).

use crate::config::{Geometry, Limits, ModeParams, RawConfig};
use crate::device::{MemEvent, NotifyAnswer, PmEvent, View, VirtioMem};
use crate::headroom::MemInfo;
use crate::pages::{self, Move, Page};
use crate::platform::{Platform, Transport};
use crate::protocol::{split_run, RequestType, REQUEST_SIZE, RESPONSE_SIZE};
use crate::qemu::{self, Blocks, Invalid};
use crate::sbm::{MbState, Plugged};
use crate::status::Snapshot;
use kernel::{
    device::{Device, Level},
    error::{code::*, Error},
    sync::{aref::ARef, Arc as KArc},
};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestError, TestRng, TestRunner,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The C driver's rule, which this driver keeps: no new block while 1 GiB (at least two
/// blocks) is added but offline.
const OFFLINE_THRESHOLD: u64 = 1 << 30;
/// `MemTotal` of the guest without the device's memory.
const BOOT_MEMORY: u64 = 1 << 30;
/// Free memory outside the device when the guest is not short of memory.
const PLENTY: u64 = 64 << 30;

// ---- QEMU's device ----------------------------------------------------------------------

/// Disjoint, sorted, non-adjacent half-open intervals of device block indices.
#[derive(Clone, Debug, Default)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn count(&self, a: u64, b: u64) -> u64 {
        self.0
            .iter()
            .map(|&(s, e)| e.min(b).saturating_sub(s.max(a)))
            .sum()
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|&(s, e)| e - s).sum()
    }

    fn set(&mut self, a: u64, b: u64, on: bool) {
        let mut out = Vec::with_capacity(self.0.len() + 2);
        for &(s, e) in &self.0 {
            if e <= a || s >= b {
                out.push((s, e));
                continue;
            }
            if s < a {
                out.push((s, a));
            }
            if e > b {
                out.push((b, e));
            }
        }
        if on {
            out.push((a, b));
        }
        out.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (s, e) in out {
            if let Some(last) = merged.last_mut() {
                if last.1 >= s {
                    last.1 = last.1.max(e);
                    continue;
                }
            }
            merged.push((s, e));
        }
        self.0 = merged;
    }
}

/// Plugged device blocks as QEMU's bitmap would have them, as intervals.
impl Blocks for Ranges {
    fn plugged_in(&self, first: u64, end: u64) -> u64 {
        self.count(first, end)
    }

    fn set(&mut self, first: u64, end: u64, plugged: bool) {
        Ranges::set(self, first, end, plugged)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// QEMU's virtio-mem device: its config space, its usable extent and its plugged blocks,
/// changed by the rules of `kunit/qemu.rs`.
#[derive(Clone, Debug)]
struct Qemu {
    cfg: RawConfig,
    /// QEMU's `VIRTIO_MEM_USABLE_EXTENT`, here a parameter of the case.
    extent: u64,
    plugged: Ranges,
}

const RESP_ACK: u16 = qemu::ACK;
const RESP_NACK: u16 = qemu::NACK;
const RESP_BUSY: u16 = qemu::BUSY;
const RESP_ERROR: u16 = qemu::ERROR;

impl Qemu {
    /// The `requested-size` property setter.
    fn set_requested(&mut self, size: u64) {
        assert!(size <= self.cfg.region_size && size.is_multiple_of(self.cfg.block_size));
        // The usable region grows with it.
        self.cfg.requested_size = size;
        qemu::resize_usable_region(&mut self.cfg, self.extent, false);
    }

    fn size(&self) -> u64 {
        self.cfg.plugged_size
    }

    fn config(&self) -> RawConfig {
        self.cfg
    }

    /// Device blocks `[a, b)` covering `[addr, addr + size)`.
    fn covering(&self, addr: u64, size: u64) -> (u64, u64) {
        let a = (addr - self.cfg.addr) / self.cfg.block_size;
        let b = (addr + size - self.cfg.addr).div_ceil(self.cfg.block_size);
        (a, b)
    }

    /// Whether all of `[addr, addr + size)` is plugged.
    fn all_plugged(&self, addr: u64, size: u64) -> bool {
        let (a, b) = self.covering(addr, size);
        self.plugged.count(a, b) == b - a
    }

    /// Why QEMU would answer ERROR to this (un)plug, whatever the requested size.
    fn invalid(&self, gpa: u64, nb_blocks: u16, plug: bool) -> Option<&'static str> {
        qemu::invalid(&self.cfg, &self.plugged, gpa, nb_blocks, plug).map(Invalid::name)
    }

    /// `virtio_mem_state_change_request`.
    fn state_change(&mut self, gpa: u64, nb_blocks: u16, plug: bool) -> u16 {
        qemu::state_change(&mut self.cfg, &mut self.plugged, gpa, nb_blocks, plug)
            .unwrap_or(RESP_ERROR)
    }

    /// `virtio_mem_unplug_all`.
    fn unplug_all(&mut self) {
        qemu::unplug_all(&mut self.cfg, &mut self.plugged, Some(self.extent));
    }
}

// ---- the kernel ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct Block {
    added: bool,
    /// Online, and whether in ZONE_MOVABLE.
    online: Option<bool>,
}

/// A transition past its GOING_* event, waiting for its end (another thread runs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Online { mb: usize, movable: bool },
    Offline { mb: usize },
}

/// What onlining policy `add_memory_driver_managed` follows (memhp_default_state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Offline,
    Kernel,
    Movable,
}

/// Another memory notifier refuses a GOING_* event: before ours (we only see the
/// CANCEL) or after ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refuse {
    No,
    Before,
    After,
}

impl Refuse {
    /// What a script byte picks: mostly no refusal.
    fn from_byte(b: u8) -> Self {
        match b {
            0..=229 => Refuse::No,
            230..=242 => Refuse::Before,
            _ => Refuse::After,
        }
    }
}

// ---- the script -------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// The operator sets `requested-size` to the size the byte picks.
    Resize(u8),
    /// Time passes: the worker runs if kicked or when its retry timer fires. The tape
    /// scripts what happens meanwhile.
    Run(Vec<u8>),
    /// User space onlines the first offline block from `mb` on.
    Online {
        mb: u8,
        movable: bool,
        refuse: u8,
        interleave: Option<Vec<u8>>,
    },
    /// User space offlines the first online block from `mb` on.
    Offline {
        mb: u8,
        refuse: u8,
        interleave: Option<Vec<u8>>,
    },
    /// An unmovable allocation lands on the `n`th page in the buddy.
    Pin(u16),
    /// All unmovable allocations are freed.
    Unpin,
    /// `echo N > /sys/module/virtio_mem_rust/parameters/unplug_online`.
    UnplugOnline(bool),
    /// The next config read returns an invalid config (read while the device changed
    /// it: the change's interrupt comes after the read).
    Garble(u8),
    /// Not QEMU: the device shrinks its usable region to the fraction `n / 256` of it
    /// without UNPLUG_ALL (and the requested size with it).
    Shrink(u8),
    /// Processes outside the device's memory leave `n` MiB free (normally plenty).
    Squeeze(u8),
    /// The device sets `VIRTIO_CONFIG_S_NEEDS_RESET` (QEMU's `virtio_error()`), if `n < 8`.
    NeedsReset(u8),
    /// System sleep: the freezer asks the worker to freeze after `after % 4` requests of
    /// the round the `tape` scripts (if it runs), then the device is frozen (to idle or
    /// deeper), the operator may pick a size meanwhile (`resize`), the device is restored.
    Suspend {
        after: u8,
        to_idle: bool,
        resize: Option<u8>,
        tape: Vec<u8>,
    },
}

/// Which device misbehaviour the script may inject.
#[derive(Clone, Copy, Debug)]
struct Faults {
    /// ERROR answers (QEMU: nothing changed).
    error: bool,
    /// Invalid or missing answers, the device having done nothing or the request.
    invalid: bool,
    /// Pages in a range whose state the driver cannot know (invalid or missing answer)
    /// must never reach the buddy, not even by onlining their block.
    strict_unknown: bool,
}

impl Faults {
    /// Every device fault: ERROR, invalid and missing answers, whose memory never reaches
    /// the buddy.
    const ALL: Faults = Faults {
        error: true,
        invalid: true,
        strict_unknown: true,
    };
    /// A device that answers as QEMU does.
    const NONE: Faults = Faults {
        error: false,
        invalid: false,
        strict_unknown: false,
    };
}

#[derive(Clone, Debug)]
struct Case {
    /// log2 of the memory block size (27..=30: offline threshold 8, 4, 2, 2 blocks).
    mb_shift: u32,
    /// log2 of subblocks per memory block.
    sbs_shift: u32,
    /// log2 of pages per subblock.
    pps_shift: u32,
    /// log2 of device blocks per subblock.
    bps_shift: u32,
    /// With one device block per subblock: log2 of pageblocks per subblock.
    pbs_shift: u32,
    /// Region before the first and after the last whole memory block, in quarters.
    lead: u8,
    tail: u8,
    nr_mbs: usize,
    /// QEMU's usable extent beyond the requested size, in quarter memory blocks.
    extent_q: u8,
    policy: Policy,
    /// MAX_PAGE_ORDER of the online page callback's chunks.
    max_order: u32,
    init_requested: u8,
    /// Memory plugged before the driver binds (device block ranges, by fractions).
    init_plugged: Vec<(u8, u8)>,
    ops: Vec<Op>,
    final_requested: u8,
    /// In the end, user space onlines every offline block (as a udev rule would).
    udev_onlines: bool,
    /// The device may shrink its usable region without UNPLUG_ALL (`Op::Shrink`).
    hostile: bool,
    /// `VIRTIO_MEM_F_PERSISTENT_SUSPEND` negotiated.
    persistent: bool,
}

// ---- coverage ----------------------------------------------------------------------------

macro_rules! stats {
    ($($f:ident),* $(,)?) => {
        #[derive(Clone, Debug, Default)]
        struct Stats { $($f: u64),* }
        impl Stats {
            fn add(&mut self, o: &Stats) { $(self.$f += o.$f;)* }
            fn fields(&self) -> Vec<(&'static str, u64)> { vec![$((stringify!($f), self.$f)),*] }
        }
    };
}

stats!(
    cases,
    runs,
    requests,
    split_runs,
    partial_done,
    busy,
    requests_after_busy,
    nack_injected,
    nack_qemu,
    error,
    invalid_answer,
    lost,
    resize_in_flight,
    again,
    wait_for_online,
    no_room,
    add_fail,
    add_undo_incomplete,
    remove_fail,
    remove_ok,
    fake_offline_fail,
    online_unplug,
    offline_unplug,
    mixed_chunk,
    unplug_all,
    garbled,
    refused_notifier,
    interleaved,
    converged_exact,
    converged_at_limit,
    hostile_shrink,
    hostile_error,
    shrink_kept,
    removed_offline_at_unbind,
    needs_reset,
    suspends,
    suspend_refused,
    frozen_with_memory,
    round_stopped_for_sleep,
    frozen_behind_the_worker,
    refused_after_unbind,
    shrink_refused,
    waits_after_nack,
    pending_unplug,
    broken_cases,
    pressure_stall,
    drop_slab,
    explain_busy,
);

// ---- the world: the models, the script, the driver's log -----------------------------------

struct World {
    /// The driver under test (set once probed).
    vm: Option<KArc<VirtioMem<HostPlatform>>>,
    /// The device the driver logs to.
    log: ARef<Device>,
    geo: Geometry,
    limits: Limits,
    page_shift: u32,
    sbs: usize,
    offline_threshold_mbs: usize,
    /// The `unplug_online` module parameter.
    unplug_online: bool,
    // The glue's worker: kicked, or its retry timer armed.
    kick: bool,
    timer: bool,

    dev: Qemu,
    garble_next_read: Option<u8>,
    choices: Vec<u64>,
    /// The requested size of the config the driver read last.
    read_requested: u64,
    /// What the device's answers told the driver it has plugged.
    told_plugged: u64,
    /// Memory was plugged at probe and UNPLUG_ALL has not been ACKed yet.
    unplug_all_pending: bool,
    reads_this_run: u64,

    blocks: Vec<Block>,
    pages: Vec<Page>,
    pinned: Vec<bool>,
    /// Free memory of the guest outside the device (in `MemAvailable`).
    other_free: u64,
    pending: Option<Pending>,
    /// The block whose pages the online page callback may see now.
    onlining: Option<usize>,
    /// The order of the chunk core mm handed to the online page callback.
    onlining_order: u32,
    /// The block the worker is adding: marked offline before `add_memory`, until it is
    /// added or `add_failed`.
    adding: Option<usize>,
    /// The block whose adding failed, while the worker undoes its plug.
    undoing: Option<usize>,
    /// The block the worker removed, until it marks it so.
    removed: Option<usize>,
    policy: Policy,
    max_order: u32,
    pfn0: u64,
    ppm: usize,

    faults: Faults,
    tape: VecDeque<u8>,
    /// The device answered so that the driver must stop (ERROR, invalid, nothing).
    device_broke: Option<String>,
    /// The device changed state without the driver being told.
    lost: bool,
    /// Device byte ranges of requests answered ERROR (false) or invalid/missing (true).
    unknown: Vec<(u64, u64, bool)>,
    requests_this_run: u64,
    /// The last request: type, range, whether ACKed (for the coverage counters).
    last_request: Option<(RequestType, u64, u64, bool)>,
    /// The device answered BUSY during this run.
    busy_this_run: bool,
    /// Whether the last NACK to a plug was scripted (else QEMU's own).
    last_nack_scripted: bool,
    /// The device shrank its usable region without UNPLUG_ALL (not QEMU): from then on
    /// it may answer ERROR on its own, and convergence is not required.
    hostile: bool,
    /// `Case::hostile`.
    may_shrink: bool,
    /// A config read was garbled (the driver may log errors about it).
    garbled: bool,
    /// The driver is being unbound (`VirtioMem::remove`).
    unbinding: bool,
    /// The device has set `VIRTIO_CONFIG_S_NEEDS_RESET`.
    needs_reset: bool,
    /// `hotplug_init` has reserved the region (resource, memory group, notifier, online
    /// page callback); `Some(errno)` makes it fail.
    hotplug_ready: bool,
    hotplug_fails: Option<Error>,
    /// `Case::persistent`.
    persistent_suspend: bool,
    /// The freezer asks the worker to freeze once this many requests of the round were
    /// answered.
    freeze_after: Option<u64>,
    /// The freezer has asked, and the requests sent since.
    freezing: bool,
    requests_while_freezing: u64,
    /// Between the device's freeze and restore: it has no queue.
    frozen: bool,
    /// Frozen while the worker's lock was free: restored after the run.
    restore_after_run: bool,
    /// Every line the driver logged, in order.
    logged: Vec<String>,
    trace: VecDeque<String>,
    trace_cap: usize,
    stats: Stats,
}

macro_rules! fail {
    ($w:expr, $($arg:tt)*) => { $w.fail(format!($($arg)*)) };
}

macro_rules! trace {
    ($w:expr, $($arg:tt)*) => {{
        let msg = format!($($arg)*);
        push_trace(&mut *$w, msg);
    }};
}

/// Keeps the last events for a failure's report.
fn push_trace(w: &mut World, msg: String) {
    if w.trace.len() >= w.trace_cap {
        w.trace.pop_front();
    }
    w.trace.push_back(msg);
}

impl World {
    fn fail(&self, msg: String) -> ! {
        let mut s = format!("{msg}\n--- last events (oldest first):\n");
        for t in &self.trace {
            let _ = writeln!(s, "  {t}");
        }
        panic!("{s}");
    }

    fn byte(&mut self) -> u8 {
        self.tape.pop_front().unwrap_or(0)
    }

    fn sb_size(&self) -> u64 {
        self.geo.subblock_size
    }

    // ---- the glue ----

    fn queue_work(&mut self, delay_ms: u32) {
        if delay_ms == 0 {
            self.kick = true;
        } else {
            self.timer = true;
        }
    }

    /// The device's config changed: the glue's callback, `config_changed()` and
    /// `queue_work(0)`.
    fn config_interrupt(&mut self) {
        if let Some(vm) = &self.vm {
            vm.config_changed();
        }
        self.queue_work(0);
    }

    /// The operator sets `requested-size` to the size `sel` picks.
    fn resize(&mut self, sel: u8) {
        self.resize_to(self.choices[usize::from(sel) % self.choices.len()]);
    }

    /// The selector of `size` for [`Self::resize`].
    fn sel(&self, size: u64) -> u8 {
        self.choices
            .iter()
            .position(|&c| c == size)
            .expect("a size the operator picks from") as u8
    }

    /// The operator sets `requested-size`.
    fn resize_to(&mut self, size: u64) {
        self.dev.set_requested(size);
        trace!(
            self,
            "operator: requested-size {:#x} (usable {:#x})",
            size,
            self.dev.cfg.usable_region_size
        );
        self.config_interrupt();
    }

    /// `Transport::read_config`.
    fn read_config(&mut self) -> RawConfig {
        let mut raw = self.dev.config();
        self.reads_this_run += 1;
        if self.reads_this_run == 2 {
            self.stats.again += 1;
        }
        if let Some(how) = self.garble_next_read.take() {
            self.stats.garbled += 1;
            self.garbled = true;
            match how % 3 {
                0 => raw.requested_size = raw.usable_region_size + raw.block_size,
                1 => raw.block_size *= 2,
                _ => raw.plugged_size = raw.region_size + raw.block_size,
            }
            trace!(self, "config read garbled: {raw:x?}");
            // A torn read during a change: the change's own interrupt follows.
            self.config_interrupt();
        } else {
            // The driver takes it unless the usable region shrank below plugged memory
            // (a hostile device): then it goes on with the sizes it had.
            let plugged_end = self.dev.plugged.0.last().map_or(0, |&(_, e)| e);
            if raw.usable_region_size >= plugged_end * raw.block_size {
                self.read_requested = raw.requested_size;
            }
        }
        raw
    }

    /// `Transport::request`: the device model reads the request as QEMU does
    /// (`struct virtio_mem_req`, little endian) and answers into `resp`, unless the script
    /// says otherwise. Returns the used length; `Err` is a timeout.
    fn chan_request(
        &mut self,
        req: &[u8; REQUEST_SIZE],
        resp: &mut [u8; RESPONSE_SIZE as usize],
    ) -> Result<u32, Error> {
        let ty = match u16::from_le_bytes([req[0], req[1]]) {
            0 => RequestType::Plug,
            1 => RequestType::Unplug,
            2 => RequestType::UnplugAll,
            // STATE only in a crash kernel, which this is not.
            t => fail!(
                self,
                "request of type {t} (STATE outside a crash kernel, or unknown)"
            ),
        };
        let addr = u64::from_le_bytes(req[8..16].try_into().unwrap());
        let nb = u16::from_le_bytes([req[16], req[17]]);
        if req[2..8].iter().chain(&req[18..]).any(|&b| b != 0) {
            fail!(self, "request with non-zero padding: {req:x?}");
        }
        if resp[..] != crate::protocol::RESPONSE_POISON[..] {
            fail!(
                self,
                "{} sent with a response buffer not poisoned: {resp:x?}",
                ty.name()
            );
        }
        if self.frozen {
            fail!(
                self,
                "{} {:#x} ({} blocks) sent to a frozen device (it has no queue)",
                ty.name(),
                addr,
                nb
            );
        }
        if self.freezing {
            // What the step under way may still send: one memory block's run, split into
            // requests, and the undo of its plug if adding it failed.
            let bound = 2 * split_run(self.sbs, self.geo.blocks_per_sb()).count() as u64;
            self.requests_while_freezing += 1;
            if self.requests_while_freezing > bound {
                fail!(
                    self,
                    "{} {:#x} ({} blocks): request {} since the freezer asked (at most {})",
                    ty.name(),
                    addr,
                    nb,
                    self.requests_while_freezing,
                    bound
                );
            }
        }
        self.stats.requests += 1;
        self.requests_this_run += 1;
        if self.busy_this_run {
            self.stats.requests_after_busy += 1;
        }
        if self.requests_this_run > 100_000 {
            fail!(self, "the worker does not stop sending requests");
        }
        if let Some(why) = &self.device_broke {
            fail!(
                self,
                "{} {:#x} ({} blocks) sent after the device {}",
                ty.name(),
                addr,
                nb,
                why
            );
        }
        let bs = self.dev.cfg.block_size;
        let size = u64::from(nb) * bs;
        match ty {
            RequestType::UnplugAll => {
                if addr != 0 || nb != 0 {
                    fail!(self, "UNPLUG_ALL with arguments");
                }
            }
            _ => {
                if self.unplug_all_pending {
                    fail!(self, "{} before UNPLUG_ALL succeeded", ty.name());
                }
                let plug = ty == RequestType::Plug;
                let why = self.dev.invalid(addr, nb, plug);
                // After a shrink without UNPLUG_ALL the device's own rule may catch it.
                let excused = self.hostile && why == Some("outside the usable region");
                if let Some(why) = why.filter(|_| !excused) {
                    fail!(
                        self,
                        "{} {:#x} ({} blocks) is invalid: {} (usable {:#x}..{:#x})",
                        ty.name(),
                        addr,
                        nb,
                        why,
                        self.dev.cfg.addr,
                        self.dev.cfg.addr + self.dev.cfg.usable_region_size
                    );
                }
                if !self.lost && plug && self.told_plugged + size > self.read_requested {
                    fail!(
                        self,
                        "PLUG {:#x} ({} blocks) beyond the requested size: plugged {:#x}, requested {:#x}",
                        addr,
                        nb,
                        self.told_plugged,
                        self.read_requested
                    );
                }
                // Added memory is given back only down to the requested size (blocks
                // never added are unplugged whatever it is).
                let added = self
                    .geo
                    .mb_of(addr, size)
                    .map(|mb| self.blocks[mb])
                    .filter(|b| b.added);
                if !self.lost
                    && !plug
                    && added.is_some()
                    && self.told_plugged < self.read_requested + size
                {
                    fail!(
                        self,
                        "UNPLUG {:#x} ({} blocks) below the requested size: plugged {:#x}, requested {:#x}",
                        addr,
                        nb,
                        self.told_plugged,
                        self.read_requested
                    );
                }
                match added.map(|b| b.online) {
                    Some(Some(_)) if !plug => self.stats.online_unplug += 1,
                    Some(None) if !plug => self.stats.offline_unplug += 1,
                    _ => {}
                }
            }
        }
        let used_len = 2 + u32::from(self.tape.front().copied().unwrap_or(0) % 9);
        let mut b = self.byte();
        if b >= 237 {
            // The operator resizes while the request is in flight.
            self.stats.resize_in_flight += 1;
            let sel = self.byte();
            self.resize(sel);
            b = 0;
        }
        let range = (addr, addr + size);
        let answer: Result<(u16, u32), ()> = match b {
            200..=214 => {
                self.stats.busy += 1;
                self.busy_this_run = true;
                Ok((RESP_BUSY, used_len))
            }
            215..=224 => {
                self.stats.nack_injected += 1;
                if ty == RequestType::UnplugAll {
                    // Not an answer UNPLUG_ALL can have: the driver must stop.
                    self.device_broke = Some("answered UNPLUG_ALL with NACK".into());
                }
                self.last_nack_scripted = true;
                Ok((RESP_NACK, used_len))
            }
            225..=229 if self.faults.error => {
                self.stats.error += 1;
                self.device_broke = Some("answered ERROR".into());
                self.unknown.push((range.0, range.1, false));
                Ok((RESP_ERROR, used_len))
            }
            230..=233 if self.faults.invalid => {
                self.stats.invalid_answer += 1;
                self.device_broke = Some("answered garbage".into());
                self.unknown.push((range.0, range.1, true));
                // A type of 0xffff stands for "nothing written": the poison stays.
                Ok(match b {
                    230 => (0xffff, 0),
                    231 => (RESP_ACK, 11),
                    232 => (0xffff, 10),
                    _ => (4 + u16::from(b), 10),
                })
            }
            234..=236 if self.faults.invalid => {
                // Done, but the answer never comes (timeout).
                self.stats.lost += 1;
                self.qemu_answer(ty, addr, nb);
                self.device_broke = Some("did not answer in time".into());
                self.unknown.push((range.0, range.1, true));
                self.lost = true;
                Err(())
            }
            _ => {
                let r = self.qemu_answer(ty, addr, nb);
                Ok((r, used_len))
            }
        };
        trace!(
            self,
            "{} {:#x} ({} blocks) -> {:?}",
            ty.name(),
            addr,
            nb,
            answer
        );
        let acked = matches!(answer, Ok((RESP_ACK, 2..=10)));
        // Coverage: a run split into requests, and one done in part.
        if let Some((t, _, end, was_acked)) = self.last_request {
            if t == ty && end == addr && was_acked {
                self.stats.split_runs += 1;
                if !acked {
                    self.stats.partial_done += 1;
                }
            }
        }
        self.last_request = Some((ty, addr, addr + size, acked));
        if acked {
            match ty {
                RequestType::Plug => self.told_plugged += size,
                RequestType::Unplug => self.told_plugged -= size,
                RequestType::UnplugAll => {
                    self.told_plugged = 0;
                    self.unplug_all_pending = false;
                }
                RequestType::State => unreachable!("STATE fails the case above"),
            }
        } else if ty == RequestType::Unplug && self.undoing.is_some() {
            self.stats.add_undo_incomplete += 1;
        }
        // The freezer asks between this request and the next.
        if self
            .freeze_after
            .is_some_and(|n| self.requests_this_run >= n)
        {
            self.ask_to_freeze();
        }
        let (t, len) = answer.map_err(|()| ETIMEDOUT)?;
        if t != 0xffff {
            resp[0..2].copy_from_slice(&t.to_le_bytes());
        }
        Ok(len)
    }

    /// The freezer asks the worker to freeze (system sleep).
    fn ask_to_freeze(&mut self) {
        if !self.freezing {
            trace!(self, "freezer: the worker is asked to freeze");
            self.freezing = true;
            self.requests_while_freezing = 0;
        }
    }

    /// QEMU's own answer.
    fn qemu_answer(&mut self, ty: RequestType, addr: u64, nb: u16) -> u16 {
        let r = match ty {
            RequestType::UnplugAll => {
                self.stats.unplug_all += 1;
                self.dev.unplug_all();
                RESP_ACK
            }
            RequestType::Plug => self.dev.state_change(addr, nb, true),
            RequestType::Unplug => self.dev.state_change(addr, nb, false),
            RequestType::State => unreachable!("STATE fails the case above"),
        };
        if r == RESP_ERROR && self.hostile {
            // The device's own fault: it shrank the usable region under the driver.
            self.stats.hostile_error += 1;
            self.device_broke = Some("answered ERROR after shrinking its usable region".into());
            return r;
        }
        if r == RESP_ERROR {
            fail!(
                self,
                "the device model had to answer ERROR to {} {:#x} ({} blocks)",
                ty.name(),
                addr,
                nb
            );
        }
        if r == RESP_NACK {
            self.stats.nack_qemu += 1;
            self.last_nack_scripted = false;
            // Only a requested size lowered since the driver read it explains a NACK.
            if self.dev.cfg.requested_size >= self.read_requested {
                fail!(
                    self,
                    "QEMU NACKs a plug with requested {:#x} unchanged (driver read {:#x})",
                    self.dev.cfg.requested_size,
                    self.read_requested
                );
            }
        }
        r
    }

    // ---- what the guest has ----

    /// `Platform::mem_info`: the guest's free memory outside the device and the device's
    /// pages in the buddy (not pinned) are available; `MemTotal` counts online pages.
    fn mem_info(&self) -> MemInfo {
        let page = 1u64 << self.page_shift;
        let buddy = (0..self.pages.len())
            .filter(|&i| self.pages[i] == Page::Buddy && !self.pinned[i])
            .count() as u64;
        let online = self.pages.iter().filter(|&&p| p == Page::Buddy).count() as u64;
        MemInfo {
            available: self.other_free + buddy * page,
            total: BOOT_MEMORY + online * page,
            slab_reclaimable: 4 << 20,
            active_file: 0,
        }
    }

    // ---- the kernel's page helpers (glue::pages) ----

    fn page_index(&self, pfn: u64, nr: u64) -> std::ops::Range<usize> {
        let first = pfn.checked_sub(self.pfn0);
        match first {
            Some(i) if nr > 0 && i + nr <= self.pages.len() as u64 => i as usize..(i + nr) as usize,
            _ => fail!(
                self,
                "pages {:#x}+{} outside the device's memory blocks",
                pfn,
                nr
            ),
        }
    }

    fn page_addr(&self, i: usize) -> u64 {
        (self.pfn0 + i as u64) << self.page_shift
    }

    /// Page `i` goes to the buddy: it must be plugged in the device, and not in the range
    /// of a request answered ERROR or invalidly or not at all (`any_unknown`: the driver
    /// hands it back itself), or answered invalidly or not at all (with
    /// `strict_unknown`: the page is onlined).
    fn to_buddy_check(&self, i: usize, how: &str, any_unknown: bool) {
        let a = self.page_addr(i);
        let size = 1u64 << self.page_shift;
        if !self.dev.all_plugged(a, size) {
            fail!(
                self,
                "{how}: page {a:#x} goes to the buddy but is not plugged"
            );
        }
        let hit = self.unknown.iter().any(|&(s, e, really)| {
            a < e && s < a + size && (any_unknown || (really && self.faults.strict_unknown))
        });
        if hit {
            fail!(
                self,
                "{how}: page {a:#x} goes to the buddy, but the device answered its request ERROR, invalidly or not at all"
            );
        }
    }

    /// Moves page `i` by core mm's rules (`kunit/pages.rs`); a failure if they refuse it.
    fn move_page(&mut self, i: usize, m: Move, how: &str) {
        let plugged = self
            .dev
            .all_plugged(self.page_addr(i), 1 << self.page_shift);
        match pages::next(self.pages[i], m, plugged) {
            Ok(p) => self.pages[i] = p,
            Err(why) => fail!(
                self,
                "{how}: page {:#x} ({:?}, plugged {plugged}): {why}",
                self.page_addr(i),
                self.pages[i]
            ),
        }
    }

    /// `Platform::online_pages`: plugged pages of a block being onlined go to the buddy.
    fn pages_online(&mut self, pfn: u64, order: u32) {
        if order < self.onlining_order {
            self.stats.mixed_chunk += 1;
        }
        for i in self.page_index(pfn, 1 << order) {
            if self.onlining != Some(i / self.ppm) {
                fail!(self, "pages::online({pfn:#x}, {order}) outside an onlining");
            }
            self.to_buddy_check(i, "online page callback", false);
            self.move_page(i, Move::Online, "online page callback");
        }
    }

    /// `Platform::keep_fake_offline`.
    fn pages_keep_fake_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            if self.onlining != Some(i / self.ppm) {
                fail!(
                    self,
                    "pages::keep_fake_offline({pfn:#x}, {nr}) outside an onlining"
                );
            }
            self.move_page(i, Move::KeepFakeOffline, "keep_fake_offline");
        }
    }

    /// `Platform::fake_online`: fake-offline pages, now plugged, go to the buddy.
    fn pages_fake_online(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            // The driver hands it back itself: never after ERROR or no answer about it.
            self.to_buddy_check(i, "pages::fake_online", true);
            self.move_page(i, Move::FakeOnline, "fake_online");
        }
    }

    /// `Platform::fake_offline`: alloc_contig_range.
    fn pages_fake_offline(&mut self, pfn: u64, nr: u64) -> Result<(), Error> {
        let r = self.page_index(pfn, nr);
        // Never more than the guest can spare: it keeps its margin.
        let info = self.mem_info();
        let bytes = nr << self.page_shift;
        if !info.may_take(bytes) {
            fail!(
                self,
                "alloc_contig_range({pfn:#x}, {nr}) takes {bytes:#x} from a guest with {:#x} available (margin {:#x})",
                info.counted(),
                info.margin()
            );
        }
        let b = self.byte();
        if b >= 225 {
            self.stats.resize_in_flight += 1;
            let sel = self.byte();
            self.resize(sel);
        }
        if let Some(i) = r.clone().find(|&i| self.pages[i] != Page::Buddy) {
            fail!(
                self,
                "alloc_contig_range({pfn:#x}, {nr}): page {:#x} is {:?}, not in the buddy",
                self.page_addr(i),
                self.pages[i]
            );
        }
        let res = if r.clone().any(|i| self.pinned[i]) {
            Err(EBUSY)
        } else {
            match b {
                170..=209 => Err(EBUSY),
                210..=224 => Err(ENOMEM),
                _ => Ok(()),
            }
        };
        if res.is_ok() {
            for i in r {
                self.move_page(i, Move::FakeOffline, "alloc_contig_range");
            }
        } else {
            self.stats.fake_offline_fail += 1;
        }
        trace!(self, "alloc_contig_range({pfn:#x}, {nr}) -> {res:?}");
        res
    }

    fn pages_is_movable(&self, pfn: u64) -> bool {
        let i = self.page_index(pfn, 1).start;
        self.blocks[i / self.ppm].online == Some(true)
    }

    /// `Platform::going_offline`: the driver drops its references.
    fn pages_going_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            self.move_page(i, Move::GoingOffline, "going_offline");
        }
    }

    /// `Platform::cancel_offline`: the driver takes its references back.
    fn pages_cancel_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            self.move_page(i, Move::CancelOffline, "cancel_offline");
        }
    }

    fn mb_range(&self, mb: usize) -> (u64, u64) {
        (self.geo.mb_addr(mb), self.geo.memory_block_size)
    }

    /// The driver has held its lock since the last look: it marked in `sbm.rs` what it added,
    /// failed to add or removed meanwhile.
    fn driver_took_lock(&mut self) {
        self.adding = None;
        self.undoing = None;
        self.removed = None;
    }

    /// The driver adds block `mb` only while fewer than the offline threshold are added
    /// and offline (checked while its lock is held: others may offline blocks later).
    fn threshold_check(&self, mb: usize) {
        let offline = self
            .blocks
            .iter()
            .filter(|b| b.added && b.online.is_none())
            .count();
        if offline >= self.offline_threshold_mbs {
            fail!(
                self,
                "block {mb} about to be added with {offline} blocks offline (threshold {})",
                self.offline_threshold_mbs
            );
        }
    }

    /// Reads what the driver logged: counts what the coverage report wants, and fails on
    /// lines that only a driver bug explains.
    fn read_log(&mut self) {
        for (level, line) in self.log.take_log() {
            let has = |s: &str| line.contains(s);
            if has("waiting for added memory to be onlined") {
                self.stats.wait_for_online += 1;
            } else if has("no usable memory block left") {
                self.stats.no_room += 1;
            } else if has("shrank below plugged memory") {
                self.stats.shrink_refused += 1;
            } else if has("never added, is unplugged again") {
                self.stats.pending_unplug += 1;
            } else if has("guest needs its memory") {
                self.stats.pressure_stall += 1;
            } else if has("went online while") || has("went offline while") {
                fail!(
                    self,
                    "the driver's bookkeeping disagrees with core mm: {line}"
                );
            }
            let device_fault = self.device_broke.is_some() || self.garbled || self.hostile;
            // Refusing to suspend is the driver's answer to the PM core, checked there.
            let refusal = has("suspending with plugged memory is not supported");
            if level == Level::Err && !device_fault && !refusal {
                fail!(
                    self,
                    "the driver logs an error while nothing went wrong: {line}"
                );
            }
            trace!(self, "log {level:?}: {}", line.trim_end());
            self.logged.push(line);
        }
    }

    /// Checked whenever the worker's lock is free, with the driver's state `d`.
    fn check(&self, d: &View<'_>, when: &str) {
        if d.broken && self.device_broke.is_none() {
            fail!(
                self,
                "{when}: the driver gave up on a device that did nothing wrong"
            );
        }
        let sbs = self.sbs;
        let sb = self.sb_size();
        let bits: usize = (0..self.blocks.len())
            .map(|mb| {
                (0..sbs)
                    .filter(|&s| d.sbm.unwrap().plugged(mb, s, 1) == Plugged::All)
                    .count()
            })
            .sum();
        // After unbind the driver's count still holds what a block removed in an unknown
        // state may have plugged (its last log line says so): only added blocks are checked.
        if bits as u64 * sb != d.plugged && !self.unbinding {
            fail!(
                self,
                "{when}: plugged {:#x}, but {} subblocks of {:#x} are marked plugged",
                d.plugged,
                bits,
                sb
            );
        }
        if d.unplug_all_required {
            if d.plugged != 0
                || (0..self.blocks.len()).any(|mb| d.sbm.unwrap().state(mb) != MbState::Unused)
            {
                fail!(self, "{when}: bookkeeping changed before UNPLUG_ALL");
            }
            return;
        }
        if !self.lost && !self.unbinding && d.plugged != self.dev.size() {
            fail!(
                self,
                "{when}: driver plugged {:#x}, device plugged {:#x}",
                d.plugged,
                self.dev.size()
            );
        }
        let bpsb = self.geo.blocks_per_sb();
        for mb in 0..self.blocks.len() {
            if self.unbinding && !self.blocks[mb].added {
                continue;
            }
            let mut n = 0;
            for s in 0..sbs {
                let (a, b) = self.dev.covering(self.geo.sb_addr(mb, s), sb);
                let c = self.dev.plugged.count(a, b);
                let marked = d.sbm.unwrap().plugged(mb, s, 1) == Plugged::All;
                if !self.lost {
                    if c != 0 && c != bpsb {
                        fail!(
                            self,
                            "{when}: block {mb} subblock {s} partly plugged in the device"
                        );
                    }
                    if marked != (c == bpsb) {
                        fail!(
                            self,
                            "{when}: block {mb} subblock {s}: marked plugged {marked}, device {c}/{bpsb}"
                        );
                    }
                }
                n += usize::from(marked);
            }
            let k = self.blocks[mb];
            let full = n == sbs;
            let adding = self.adding == Some(mb);
            let want = match (k.added, k.online) {
                (false, _) if adding && full => MbState::Offline,
                (false, _) if adding => MbState::OfflinePartial,
                // Removed, not yet marked so: as it was (offline; at unbind also one of
                // unknown state, its subblocks still marked plugged).
                (false, _) if self.removed == Some(mb) && full => MbState::Offline,
                (false, _) if self.removed == Some(mb) => MbState::OfflinePartial,
                (false, _) if n == 0 => MbState::Unused,
                (false, _) => MbState::Plugged,
                (true, None) if full => MbState::Offline,
                (true, None) => MbState::OfflinePartial,
                (true, Some(false)) if full => MbState::Kernel,
                (true, Some(false)) => MbState::KernelPartial,
                (true, Some(true)) if full => MbState::Movable,
                (true, Some(true)) => MbState::MovablePartial,
            };
            let state = d.sbm.unwrap().state(mb);
            if state != want {
                fail!(
                    self,
                    "{when}: block {mb} is {:?} in sbm, {:?} in the model ({k:?}, {n} plugged)",
                    state,
                    want
                );
            }
            let pending = matches!(self.pending, Some(Pending::Online { mb: m, .. } | Pending::Offline { mb: m }) if m == mb);
            if d.sbm.unwrap().in_transition(mb) != pending {
                fail!(
                    self,
                    "{when}: block {mb} in transition {}, model {pending}",
                    d.sbm.unwrap().in_transition(mb)
                );
            }
            // Pages.
            if self.onlining == Some(mb) {
                continue;
            }
            let pps = self.ppm / sbs;
            for i in mb * self.ppm..(mb + 1) * self.ppm {
                let p = self.pages[i];
                let s = (i % self.ppm) / pps;
                let marked = d.sbm.unwrap().plugged(mb, s, 1) == Plugged::All;
                if self.pinned[i] && p != Page::Buddy {
                    fail!(
                        self,
                        "{when}: pinned page {:#x} is {p:?}",
                        self.page_addr(i)
                    );
                }
                let ok = match (k.online, p) {
                    (None, Page::Absent) => !k.added,
                    (None, Page::Offline) => k.added,
                    (None, _) | (Some(_), Page::Absent | Page::Offline) => false,
                    (Some(_), Page::Buddy) => {
                        marked
                            && self
                                .dev
                                .all_plugged(self.page_addr(i), 1 << self.page_shift)
                    }
                    // Unplugged: the driver's reference is dropped only while offlining.
                    (Some(_), Page::FakeOffline { ref_held }) if !marked => {
                        ref_held
                            || matches!(self.pending, Some(Pending::Offline { mb: m }) if m == mb)
                    }
                    // Plugged but fake-offline: only the rest of a run whose unplug broke
                    // the device stays so.
                    (Some(_), Page::FakeOffline { ref_held }) => {
                        ref_held && self.device_broke.is_some() && d.broken
                    }
                };
                if !ok {
                    fail!(
                        self,
                        "{when}: page {:#x} of block {mb} ({k:?}, subblock {s} marked plugged {marked}) is {p:?}",
                        self.page_addr(i)
                    );
                }
            }
        }
    }
}

// ---- the platform and the transport the driver runs on ------------------------------------

/// The world, shared by the harness, the platform and the transport. One thread: a
/// callback that finds it taken is a bug of the harness (it called into the driver while
/// holding it), reported as such rather than deadlocking.
#[derive(Clone)]
struct Sim(std::sync::Arc<std::sync::Mutex<World>>);

pub(crate) struct HostPlatform(Sim);
pub(crate) struct HostTransport(Sim);

impl Sim {
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        match self.0.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                panic!("harness bug: the models' state is taken while the driver calls in")
            }
        }
    }

    fn vm(&self) -> KArc<VirtioMem<HostPlatform>> {
        self.w().vm.clone().expect("the driver is probed")
    }

    /// Checks the invariants (the worker's lock must be free).
    fn check(&self, when: &str) {
        let vm = self.vm();
        vm.view(|d| {
            let mut w = self.w();
            w.read_log();
            w.check(d, when);
            check_snapshot(&vm.snapshot(), d, when);
        });
    }

    /// Calls `f` with a look at the driver's state.
    fn view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        self.vm().view(f)
    }

    fn state(&self, mb: usize) -> MbState {
        self.view(|d| d.sbm.unwrap().state(mb))
    }

    fn plugged(&self) -> u64 {
        self.view(|d| d.plugged)
    }

    fn broken(&self) -> bool {
        self.view(|d| d.broken)
    }

    // ---- the kernel's memory hotplug ----

    fn notify(&self, event: MemEvent, mb: usize, movable: bool) -> NotifyAnswer {
        let (start, size) = self.w().mb_range(mb);
        let a = self.vm().memory_event(event, start, size, movable);
        trace!(self.w(), "notifier {event:?} block {mb} -> {a:?}");
        a
    }

    /// online_pages() of core mm for an added, offline block. Returns whether it went
    /// online; `interleave` lets the worker run between GOING_ONLINE and the rest.
    fn k_online(
        &self,
        mb: usize,
        movable: bool,
        refuse: Refuse,
        interleave: Option<Vec<u8>>,
    ) -> bool {
        {
            let w = self.w();
            assert!(w.blocks[mb].added && w.blocks[mb].online.is_none() && w.pending.is_none());
        }
        self.notify_transition(
            (MemEvent::GoingOnline, MemEvent::CancelOnline),
            Pending::Online { mb, movable },
            refuse,
            interleave,
        )
    }

    /// The notifier side of onlining or offlining block `pending`: `going` to every
    /// notifier (another one may refuse before or after ours: `refuse`), `cancel` if
    /// anyone refused, else the rest of the change, with the worker run in between if
    /// `interleave`. Returns whether the change went through.
    fn notify_transition(
        &self,
        (going, cancel): (MemEvent, MemEvent),
        pending: Pending,
        refuse: Refuse,
        interleave: Option<Vec<u8>>,
    ) -> bool {
        let (mb, movable) = match pending {
            Pending::Online { mb, movable } => (mb, movable),
            Pending::Offline { mb } => (mb, self.w().blocks[mb].online.unwrap()),
        };
        if refuse == Refuse::Before {
            self.w().stats.refused_notifier += 1;
            self.notify(cancel, mb, movable);
            return false;
        }
        if self.notify(going, mb, movable) == NotifyAnswer::Bad {
            self.notify(cancel, mb, movable);
            return false;
        }
        self.w().pending = Some(pending);
        if refuse == Refuse::After {
            self.w().stats.refused_notifier += 1;
            self.notify(cancel, mb, movable);
            self.w().pending = None;
            return false;
        }
        if let Some(tape) = interleave {
            self.w().stats.interleaved += 1;
            self.wake(tape);
        }
        self.finish_pending().unwrap_or(true)
    }

    fn finish_online(&self, mb: usize, movable: bool) {
        let (start, end, max_order) = {
            let mut w = self.w();
            w.onlining = Some(mb);
            let start = w.pfn0 + (mb * w.ppm) as u64;
            (start, start + w.ppm as u64, w.max_order)
        };
        let vm = self.vm();
        let mut pfn = start;
        while pfn < end {
            let mut order = if pfn == 0 {
                max_order
            } else {
                max_order.min(pfn.trailing_zeros())
            };
            while pfn + (1 << order) > end {
                order -= 1;
            }
            self.w().onlining_order = order;
            vm.online_pages(pfn, order);
            pfn += 1 << order;
        }
        {
            let w = self.w();
            let first = mb * w.ppm;
            if let Some(i) = (first..first + w.ppm).find(|&i| w.pages[i] == Page::Offline) {
                fail!(
                    w,
                    "block {mb} onlined, but page {:#x} was neither onlined nor kept fake-offline",
                    w.page_addr(i)
                );
            }
        }
        self.notify(MemEvent::Online, mb, movable);
        let mut w = self.w();
        w.onlining = None;
        w.pending = None;
        w.blocks[mb].online = Some(movable);
    }

    /// offline_pages() of core mm for an online block.
    fn k_offline(&self, mb: usize, refuse: Refuse, interleave: Option<Vec<u8>>) -> bool {
        {
            let mut w = self.w();
            let movable = w.blocks[mb].online.expect("offlining an online block");
            assert!(w.pending.is_none());
            let first = mb * w.ppm;
            // Isolation fails at once for unmovable pages outside ZONE_MOVABLE.
            if !movable && (first..first + w.ppm).any(|i| w.pinned[i] && w.pages[i] == Page::Buddy)
            {
                trace!(w, "offlining block {mb}: isolation fails");
                return false;
            }
        }
        self.notify_transition(
            (MemEvent::GoingOffline, MemEvent::CancelOffline),
            Pending::Offline { mb },
            refuse,
            interleave,
        )
    }

    fn finish_offline(&self, mb: usize) -> bool {
        let (movable, stuck) = {
            let mut w = self.w();
            let movable = w.blocks[mb].online.unwrap();
            let first = mb * w.ppm;
            // Migration and test_pages_isolated: pinned pages and referenced PageOffline
            // pages keep the block online (user space gives up; a kthread would loop).
            let stuck = (first..first + w.ppm).find(|&i| match w.pages[i] {
                Page::Buddy => w.pinned[i],
                Page::FakeOffline { ref_held } => ref_held,
                Page::Absent | Page::Offline => true,
            });
            if let Some(i) = stuck {
                let (a, p) = (w.page_addr(i), w.pages[i]);
                trace!(w, "offlining block {mb}: page {a:#x} is {p:?}");
            }
            (movable, stuck.is_some())
        };
        if stuck {
            self.notify(MemEvent::CancelOffline, mb, movable);
            self.w().pending = None;
            return false;
        }
        self.notify(MemEvent::Offline, mb, movable);
        let mut w = self.w();
        let first = mb * w.ppm;
        for i in first..first + w.ppm {
            w.move_page(i, Move::Offline, "offline_pages");
        }
        w.blocks[mb].online = None;
        w.pending = None;
        true
    }

    /// Another thread's transition, blocking the hotplug lock, finishes.
    fn finish_pending(&self) -> Option<bool> {
        let pending = self.w().pending;
        match pending? {
            Pending::Online { mb, movable } => {
                self.finish_online(mb, movable);
                Some(true)
            }
            Pending::Offline { mb } => Some(self.finish_offline(mb)),
        }
    }

    /// `Platform::add_memory`: add_memory_driver_managed, with auto-onlining.
    fn k_add_memory(&self, addr: u64, size: u64) -> Result<(), Error> {
        self.finish_pending();
        let (mb, policy) = {
            let mut w = self.w();
            if !w.hotplug_ready {
                fail!(
                    w,
                    "add_memory({addr:#x}) before the region's memory group exists"
                );
            }
            let mb = w
                .geo
                .mb_exactly(addr, size)
                .unwrap_or_else(|| fail!(w, "add_memory({addr:#x}, {size:#x}): not a block"));
            if w.blocks[mb].added {
                fail!(w, "block {mb} added twice");
            }
            let b = w.byte();
            if b >= 215 {
                w.stats.add_fail += 1;
                trace!(w, "add_memory block {mb} fails");
                return Err(ENOMEM);
            }
            trace!(w, "add_memory block {mb}");
            w.blocks[mb] = Block {
                added: true,
                online: None,
            };
            let first = mb * w.ppm;
            for i in first..first + w.ppm {
                w.move_page(i, Move::Add, "add_memory");
            }
            (mb, w.policy)
        };
        match policy {
            Policy::Offline => {}
            p => {
                self.k_online(mb, p == Policy::Movable, Refuse::No, None);
            }
        }
        Ok(())
    }

    /// `Platform::offline_and_remove`: offline_and_remove_memory.
    fn k_offline_and_remove(&self, addr: u64, size: u64) -> Result<(), Error> {
        self.finish_pending();
        let (mb, b, online, at_unbind) = {
            let mut w = self.w();
            let mb = w.geo.mb_exactly(addr, size).unwrap_or_else(|| {
                fail!(w, "offline_and_remove({addr:#x}, {size:#x}): not a block")
            });
            if !w.blocks[mb].added {
                fail!(w, "block {mb} removed but not added");
            }
            let (a, b) = w.dev.covering(addr, size);
            let online = w.blocks[mb].online;
            // At unbind the driver removes offline blocks with unplugged subblocks or of
            // unknown state, plugged memory and all: nothing would keep their unplugged
            // pages from the buddy once the online page callback is gone. Plugged memory
            // is lost to the guest then, never handed to it.
            let at_unbind = w.unbinding && online.is_none();
            if w.dev.plugged.count(a, b) != 0 && !at_unbind {
                fail!(w, "block {mb} removed with memory plugged in it");
            }
            (mb, w.byte(), online, at_unbind)
        };
        let marked = self.view(|d| d.sbm.unwrap().plugged(mb, 0, d.sbm.unwrap().sbs_per_mb()));
        if marked != Plugged::None && !at_unbind {
            fail!(self.w(), "block {mb} removed with subblocks marked plugged");
        }
        let res = match (b, online) {
            (200..=214, _) | (215.., None) => Err(EBUSY),
            (215..=229, Some(_)) => {
                self.k_offline(mb, Refuse::After, None);
                Err(EBUSY)
            }
            (230.., Some(movable)) => {
                if self.k_offline(mb, Refuse::No, None) {
                    // Removal fails after offlining: core mm onlines it again.
                    self.k_online(mb, movable, Refuse::No, None);
                }
                Err(EBUSY)
            }
            (_, Some(_)) => {
                if self.k_offline(mb, Refuse::No, None) {
                    Ok(())
                } else {
                    Err(EBUSY)
                }
            }
            (_, None) => Ok(()),
        };
        let mut w = self.w();
        if res.is_ok() {
            if at_unbind {
                w.stats.removed_offline_at_unbind += 1;
            }
            w.blocks[mb] = Block::default();
            let first = mb * w.ppm;
            for i in first..first + w.ppm {
                if at_unbind {
                    if w.pages[i] != Page::Offline {
                        let p = w.pages[i];
                        fail!(w, "block {mb} removed at unbind with page {i} {p:?}");
                    }
                    w.pages[i] = Page::Absent;
                } else {
                    w.move_page(i, Move::Remove, "offline_and_remove_memory");
                }
            }
            w.stats.remove_ok += 1;
        } else {
            w.stats.remove_fail += 1;
        }
        trace!(w, "offline_and_remove block {mb} -> {res:?}");
        res
    }

    /// Another thread onlines or offlines a block while the worker's lock is free.
    fn concurrent(&self) {
        let (mb, block, sel) = {
            let mut w = self.w();
            if w.byte() < 200 || w.pending.is_some() {
                return;
            }
            let sel = w.byte();
            let mb = usize::from(sel) % w.blocks.len();
            (mb, w.blocks[mb], sel)
        };
        match block {
            Block {
                added: true,
                online: None,
            } => {
                self.k_online(mb, sel & 0x80 != 0, Refuse::No, None);
            }
            Block {
                online: Some(_), ..
            } => {
                self.k_offline(mb, Refuse::No, None);
            }
            _ => {}
        }
    }

    /// The worker's lock is free here: anyone may look, and others may act.
    fn lock_dropped(&self, what: &str) {
        self.check(what);
        self.concurrent();
        self.frozen_behind_the_worker();
    }

    /// The device is frozen (to idle: always allowed) while the worker has dropped its
    /// lock, as if the freezer had not waited for it: the round must send nothing more.
    /// Restored after the run.
    fn frozen_behind_the_worker(&self) {
        {
            let mut w = self.w();
            if w.frozen || w.unbinding || w.tape.front().is_none_or(|&b| b < 250) {
                return;
            }
            w.byte();
            w.stats.frozen_behind_the_worker += 1;
            trace!(w, "device frozen while the worker's lock is free");
        }
        if let Err(e) = self.vm().freeze(true) {
            fail!(self.w(), "freeze to idle failed: {e:?}");
        }
        let mut w = self.w();
        w.frozen = true;
        w.restore_after_run = true;
    }

    // ---- the script ----

    /// The worker thread: runs when kicked, or when its retry timer fires.
    fn wake(&self, tape: Vec<u8>) {
        let saved = {
            let mut w = self.w();
            let saved = std::mem::replace(&mut w.tape, tape.into());
            if !(w.kick || w.timer) {
                w.tape = saved;
                return;
            }
            w.kick = false;
            w.timer = false;
            w.stats.runs += 1;
            w.requests_this_run = 0;
            w.reads_this_run = 0;
            w.busy_this_run = false;
            w.last_request = None;
            trace!(w, "worker runs");
            saved
        };
        self.vm().run();
        self.w().driver_took_lock();
        self.check("after a run");
        self.w().tape = saved;
        if std::mem::take(&mut self.w().restore_after_run) {
            self.w().frozen = false;
            self.vm().restore();
            self.w().kick = true;
            trace!(self.w(), "device restored");
        }
    }

    /// The first block from `from` on (wrapping around) for which `want` holds.
    fn pick_block(&self, from: u8, want: impl Fn(&Block) -> bool) -> Option<usize> {
        let w = self.w();
        let n = w.blocks.len();
        (0..n)
            .map(|i| (usize::from(from) + i) % n)
            .find(|&m| want(&w.blocks[m]))
    }

    fn resize_to(&self, size: u64) {
        self.w().resize_to(size);
    }

    fn sel(&self, size: u64) -> u8 {
        self.w().sel(size)
    }

    fn apply(&self, op: &Op) {
        match op {
            Op::Resize(sel) => self.w().resize(*sel),
            Op::Run(tape) => self.wake(tape.clone()),
            Op::Online {
                mb,
                movable,
                refuse,
                interleave,
            } => {
                let Some(mb) = self.pick_block(*mb, |b| b.added && b.online.is_none()) else {
                    return;
                };
                trace!(self.w(), "user onlines block {mb}");
                self.k_online(mb, *movable, Refuse::from_byte(*refuse), interleave.clone());
            }
            Op::Offline {
                mb,
                refuse,
                interleave,
            } => {
                let Some(mb) = self.pick_block(*mb, |b| b.online.is_some()) else {
                    return;
                };
                trace!(self.w(), "user offlines block {mb}");
                self.k_offline(mb, Refuse::from_byte(*refuse), interleave.clone());
            }
            Op::Pin(n) => {
                let mut w = self.w();
                let buddy: Vec<usize> = (0..w.pages.len())
                    .filter(|&i| w.pages[i] == Page::Buddy)
                    .collect();
                if !buddy.is_empty() {
                    let i = buddy[usize::from(*n) % buddy.len()];
                    w.pinned[i] = true;
                    let a = w.page_addr(i);
                    trace!(w, "page {a:#x} pinned");
                }
            }
            Op::Unpin => self.w().pinned.iter_mut().for_each(|p| *p = false),
            Op::UnplugOnline(on) => self.w().unplug_online = *on,
            Op::Garble(how) => self.w().garble_next_read = Some(*how),
            Op::Shrink(n) => {
                let mut w = self.w();
                if w.may_shrink {
                    let bs = w.dev.cfg.block_size;
                    let usable = w.dev.cfg.usable_region_size * u64::from(*n) / 256 / bs * bs;
                    if usable < w.dev.cfg.usable_region_size {
                        // Below plugged memory the driver must refuse the change and goes
                        // on with the old region (the device may then answer ERROR on its
                        // own); above it, the driver must keep inside the new end.
                        let plugged_end = w.dev.plugged.0.last().map_or(0, |&(_, e)| e) * bs;
                        if usable < plugged_end || w.lost {
                            w.stats.hostile_shrink += 1;
                            w.hostile = true;
                        } else {
                            w.stats.shrink_kept += 1;
                        }
                        w.dev.cfg.usable_region_size = usable;
                        w.dev.cfg.requested_size = w.dev.cfg.requested_size.min(usable);
                        trace!(w, "device: usable region shrunk to {usable:#x}");
                        w.config_interrupt();
                    }
                }
            }
            Op::NeedsReset(n) => {
                let mut w = self.w();
                if *n < 8 && w.faults.error && w.device_broke.is_none() {
                    w.stats.needs_reset += 1;
                    w.needs_reset = true;
                    // No request may reach it any more.
                    w.device_broke = Some("needs a reset".into());
                    trace!(w, "device: needs a reset");
                    w.config_interrupt();
                }
            }
            Op::Suspend {
                after,
                to_idle,
                resize,
                tape,
            } => self.suspend(*after, *to_idle, *resize, tape.clone()),
            Op::Squeeze(n) => {
                // Processes take or give back memory outside the device: from none free to
                // about twice the margin.
                let mut w = self.w();
                w.other_free = u64::from(*n) << 20;
                let free = w.other_free;
                trace!(w, "guest: {free:#x} free outside the device");
            }
        }
        self.check("after an operation");
    }

    /// System sleep (see [`Op::Suspend`]): the freezer, the device's freeze, restore, thaw.
    fn suspend(&self, after: u8, to_idle: bool, resize: Option<u8>, tape: Vec<u8>) {
        {
            let mut w = self.w();
            w.stats.suspends += 1;
            let after = u64::from(after % 4);
            trace!(
                w,
                "system sleep (to idle {to_idle}): freezer asks after {after} requests"
            );
            w.freeze_after = Some(after);
            if after == 0 {
                w.ask_to_freeze();
            }
        }
        // The worker, if kicked, is in a round when the freezer asks: the round stops
        // between requests and kicks itself again.
        let runs = self.w().stats.runs;
        let kicked = {
            let w = self.w();
            w.kick || w.timer
        };
        self.wake(tape);
        {
            let mut w = self.w();
            w.freeze_after = None;
            // The worker is frozen now (in its wait, or after the round stopped); if it
            // was not asked during its round, it was asked before its next.
            w.ask_to_freeze();
            if kicked && w.stats.runs > runs && w.kick {
                w.stats.round_stopped_for_sleep += 1;
            }
        }
        let vm = self.vm();
        let res = vm.freeze(to_idle);
        self.check("after freeze");
        let mut w = self.w();
        w.read_log();
        // Memory the device has, or may have: the driver takes the range of a request
        // answered ERROR, invalid or not at all as of unknown state (as at unbind).
        let plugged = w.dev.size() != 0;
        let maybe = plugged
            || w.told_plugged != 0
            || w.unplug_all_pending
            || w.lost
            || !w.unknown.is_empty();
        let keeps = to_idle || w.persistent_suspend;
        match res {
            Err(e) if e != EPERM => fail!(w, "freeze failed with {e:?}"),
            Err(_) if keeps || !maybe => fail!(
                w,
                "freeze refused with nothing plugged that the device would lose (plugged \
                 {:#x}, to idle {to_idle}, persistent {})",
                w.dev.size(),
                w.persistent_suspend
            ),
            Ok(()) if plugged && !keeps => fail!(
                w,
                "freeze allowed with {:#x} plugged: the device would lose it",
                w.dev.size()
            ),
            Err(_) => {
                // The PM core gives up: everything is thawed; the worker goes on.
                w.stats.suspend_refused += 1;
                trace!(w, "freeze refused: thaw");
                w.freezing = false;
                return;
            }
            Ok(()) => {}
        }
        if plugged {
            w.stats.frozen_with_memory += 1;
        }
        // The glue resets the device and deletes its queue.
        w.frozen = true;
        trace!(w, "device frozen");
        if let Some(sel) = resize {
            // A change while frozen: the virtio core holds its notification until restore.
            let size = w.choices[usize::from(sel) % w.choices.len()];
            w.dev.set_requested(size);
            trace!(w, "operator (while asleep): requested-size {size:#x}");
        }
        if !to_idle && !w.persistent_suspend {
            // A wakeup from S3 without the feature resets the machine: QEMU unplugs all
            // (nothing is plugged here, but the usable region may shrink).
            w.dev.unplug_all();
            trace!(w, "machine reset at wakeup");
        }
        // A kick or the retry timer while frozen: the worker must send nothing.
        w.kick = true;
        drop(w);
        self.wake(Vec::new());
        // Restore: a new queue, the device ready, the worker kicked; then the thaw.
        let mut w = self.w();
        w.frozen = false;
        trace!(w, "device restored");
        drop(w);
        vm.restore();
        let mut w = self.w();
        w.kick = true;
        w.freezing = false;
    }

    /// No more faults: the driver must reach the requested size, within its limits.
    fn converge(&self, sel: u8, udev_onlines: bool) {
        {
            let mut w = self.w();
            w.faults.error = false;
            w.faults.invalid = false;
            w.pinned.iter_mut().for_each(|p| *p = false);
            w.unplug_online = true;
            w.garble_next_read = None;
            w.other_free = PLENTY;
            // The guest's memory is back: a stalled unplug goes on at the next poll.
            w.resize(sel);
        }
        let target = self.w().dev.cfg.requested_size;
        let mut stable = false;
        for _ in 0..1000 {
            if self.w().kick || self.w().timer {
                self.wake(Vec::new());
                continue;
            }
            let mut onlined = false;
            if udev_onlines {
                let (n, movable) = {
                    let w = self.w();
                    (w.blocks.len(), w.policy == Policy::Movable)
                };
                for mb in 0..n {
                    let b = self.w().blocks[mb];
                    if b.added && b.online.is_none() {
                        onlined |= self.k_online(mb, movable, Refuse::No, None);
                    }
                }
            }
            if !onlined && !self.w().kick && !self.w().timer {
                stable = true;
                break;
            }
        }
        let vm = self.vm();
        vm.view(|d| {
            let mut w = self.w();
            if !stable {
                fail!(w, "the worker is still busy after 1000 rounds");
            }
            if w.hostile {
                return;
            }
            if w.device_broke.is_some() {
                w.stats.broken_cases += 1;
                if !d.broken {
                    fail!(w, "the device broke, but the driver does not know");
                }
                return;
            }
            let sb = w.sb_size();
            let p = d.plugged;
            if p >= target + sb {
                fail!(
                    w,
                    "did not converge: plugged {p:#x}, requested {target:#x} (subblock {sb:#x})"
                );
            }
            if p + sb <= target {
                // Short of it: only the driver's limits explain that. Every added block is
                // full, and there is no room for another one, or the offline threshold
                // holds.
                let nr = w.blocks.len();
                let usable_mbs = w.geo.usable_mbs(w.dev.cfg.usable_region_size);
                // An added block with an unplugged subblock inside the usable region (one
                // beyond its end, after a shrink or with a small extent, cannot be plugged).
                let usable_end = w.dev.cfg.addr + w.dev.cfg.usable_region_size;
                let partial = (0..nr).find(|&mb| {
                    w.blocks[mb].added
                        && (0..w.sbs).any(|sb| {
                            d.sbm.unwrap().plugged(mb, sb, 1) != Plugged::All
                                && w.geo.sb_addr(mb, sb) + w.sb_size() <= usable_end
                        })
                });
                let room = (0..usable_mbs).any(|mb| d.sbm.unwrap().state(mb) == MbState::Unused);
                let offline = (0..nr)
                    .filter(|&mb| w.blocks[mb].added && w.blocks[mb].online.is_none())
                    .count();
                let threshold = offline >= w.offline_threshold_mbs && d.waiting_for_online;
                // The device refused to plug at this requested size: the driver waits for
                // another one, by design. QEMU refuses only a plug beyond a requested size
                // lowered meanwhile.
                if d.nacked_at == Some(target) && w.last_nack_scripted {
                    w.stats.waits_after_nack += 1;
                    return;
                }
                if partial.is_some() || (room && !threshold) || d.nacked_at == Some(target) {
                    fail!(
                        w,
                        "did not converge: plugged {p:#x}, requested {target:#x} (subblock {sb:#x}); \
                         partial block {partial:?}, room for a new block {room}, offline blocks \
                         {offline} (threshold {}), nacked_at {:?}",
                        w.offline_threshold_mbs,
                        d.nacked_at
                    );
                }
                w.stats.converged_at_limit += 1;
            } else {
                w.stats.converged_exact += 1;
            }
            // Nothing emptied stays added.
            if let Some(mb) = (0..w.blocks.len()).find(|&mb| d.sbm.unwrap().is_empty_added(mb)) {
                fail!(w, "block {mb} stays added with nothing plugged");
            }
        });
    }

    /// The driver is unbound (the glue has stopped the worker): what it leaves added must be
    /// safe without it. Offline blocks stay only if the device surely has all of them
    /// plugged (no online page callback will keep unplugged pages away any more), nothing
    /// may be onlined or offlined through the notifier, and no request is sent.
    fn unbind(&self) {
        {
            let mut w = self.w();
            w.unbinding = true;
            w.tape.clear();
            trace!(w, "unbind");
        }
        self.vm().remove();
        self.w().driver_took_lock();
        self.check("after unbind");
        let vm = self.vm();
        vm.view(|d| {
            let w = self.w();
            for mb in 0..w.blocks.len() {
                let k = w.blocks[mb];
                if !k.added || k.online.is_some() {
                    continue;
                }
                let (start, size) = w.mb_range(mb);
                let unknown = w.unknown.iter().any(|&(s, e, really)| {
                    really && s < start + size && start < e
                });
                if d.sbm.unwrap().state(mb) != MbState::Offline || unknown {
                    fail!(
                        w,
                        "block {mb} stays added and offline after unbind while {:?} (state unknown: {unknown})",
                        d.sbm.unwrap().state(mb)
                    );
                }
            }
        });
        let n = self.w().blocks.len();
        for mb in 0..n {
            let b = self.w().blocks[mb];
            if b.added && b.online.is_none() {
                if self.k_online(mb, false, Refuse::No, None) {
                    fail!(self.w(), "block {mb} onlined after unbind");
                }
                self.w().stats.refused_after_unbind += 1;
            }
        }
        let requests = self.w().stats.requests;
        self.w().kick = true;
        self.wake(Vec::new());
        if self.w().stats.requests != requests {
            fail!(self.w(), "a request after unbind");
        }
    }

    /// Breaks the reference cycle (world → driver → platform → world) at the end of a case.
    fn finish(self) -> Stats {
        let mut w = self.w();
        w.vm = None;
        w.stats.clone()
    }
}

impl Transport for HostTransport {
    fn read_config(&mut self) -> RawConfig {
        self.0.w().read_config()
    }

    fn needs_reset(&self) -> bool {
        self.0.w().needs_reset
    }

    fn request(
        &mut self,
        req: &[u8; REQUEST_SIZE],
        resp: &mut [u8; RESPONSE_SIZE as usize],
        _timeout_ms: u32,
    ) -> Result<u32, Error> {
        self.0.w().chan_request(req, resp)
    }
}

impl Platform for HostPlatform {
    type Transport = HostTransport;

    fn mm_limits(&self) -> Limits {
        self.0.w().limits
    }

    fn mode_params(&self) -> ModeParams {
        ModeParams::default()
    }

    fn node(&self, _node_id: u16, _addr: u64) -> i32 {
        0
    }

    fn has_acpi_pxm(&self) -> bool {
        false
    }

    fn has_persistent_suspend(&self) -> bool {
        self.0.w().persistent_suspend
    }

    fn is_kdump_kernel(&self) -> bool {
        false
    }

    fn has_vmcore(&self) -> bool {
        true
    }

    fn freezing(&self) -> bool {
        self.0.w().freezing
    }

    fn hotplug_init(&self, addr: u64, size: u64, _nid: i32, unit: u64) -> Result<(), Error> {
        let mut w = self.0.w();
        let (a, s) = (w.dev.cfg.addr, w.dev.cfg.region_size);
        if (addr, size, unit) != (a, s, w.geo.memory_block_size) {
            fail!(w, "hotplug_init({addr:#x}, {size:#x}, unit {unit:#x}): not the device's region in memory blocks");
        }
        if let Some(e) = w.hotplug_fails {
            return Err(e);
        }
        w.hotplug_ready = true;
        Ok(())
    }

    fn queue_work(&self, delay_ms: u32) {
        self.0.w().queue_work(delay_ms)
    }

    fn add_memory(&self, addr: u64, size: u64) -> Result<(), Error> {
        let sim = &self.0;
        let mb = {
            let mut w = sim.w();
            let mb = w
                .geo
                .mb_exactly(addr, size)
                .unwrap_or_else(|| fail!(w, "add_memory({addr:#x}, {size:#x}): not a block"));
            w.driver_took_lock();
            w.threshold_check(mb);
            w.adding = Some(mb);
            mb
        };
        sim.lock_dropped("before add_memory");
        let added = sim.k_add_memory(addr, size);
        if added.is_ok() {
            sim.w().adding = None;
        }
        sim.lock_dropped("after add_memory");
        if added.is_err() {
            sim.w().undoing = Some(mb);
        }
        added
    }

    fn offline_and_remove(&self, addr: u64, size: u64) -> Result<(), Error> {
        let sim = &self.0;
        sim.w().driver_took_lock();
        sim.lock_dropped("before offline_and_remove");
        let res = sim.k_offline_and_remove(addr, size);
        if res.is_ok() {
            let mut w = sim.w();
            w.removed = w.geo.mb_exactly(addr, size);
        }
        sim.lock_dropped("after offline_and_remove");
        res
    }

    fn unplug_online(&self) -> bool {
        self.0.w().unplug_online
    }

    fn drop_slab(&self) -> bool {
        let mut w = self.0.w();
        if w.mem_info().spare() == 0 {
            fail!(w, "drop_slab on a guest with no memory to spare");
        }
        w.stats.drop_slab += 1;
        true
    }

    fn mem_info(&self) -> MemInfo {
        self.0.w().mem_info()
    }

    fn explain_busy(&self, _pfn: u64, _nr: u64) {
        self.0.w().stats.explain_busy += 1;
    }

    fn online_pages(&self, pfn: u64, order: u32) {
        self.0.w().pages_online(pfn, order)
    }

    fn keep_fake_offline(&self, pfn: u64, nr: u64) {
        let mut w = self.0.w();
        if nr < 1 << w.onlining_order {
            w.stats.mixed_chunk += 1;
        }
        w.pages_keep_fake_offline(pfn, nr)
    }

    fn fake_online(&self, pfn: u64, nr: u64) {
        self.0.w().pages_fake_online(pfn, nr)
    }

    fn fake_offline(&self, pfn: u64, nr: u64) -> Result<(), Error> {
        self.0.w().pages_fake_offline(pfn, nr)
    }

    fn is_movable(&self, pfn: u64) -> bool {
        self.0.w().pages_is_movable(pfn)
    }

    fn going_offline(&self, pfn: u64, nr: u64) {
        self.0.w().pages_going_offline(pfn, nr)
    }

    fn cancel_offline(&self, pfn: u64, nr: u64) {
        self.0.w().pages_cancel_offline(pfn, nr)
    }
}

// ---- a case: probe, script, convergence ---------------------------------------------------

/// Builds the world of `case` and probes the driver on it, as the glue does: `new` (with
/// the worker queued); `start` is left to the caller.
fn probe_unstarted(case: &Case, faults: Faults) -> Sim {
    let mb = 1u64 << case.mb_shift;
    let sb_shift = case.mb_shift - case.sbs_shift;
    let sb = 1u64 << sb_shift;
    let page_shift = sb_shift - case.pps_shift;
    let bs = sb >> case.bps_shift;
    let pageblock = if case.bps_shift == 0 {
        sb >> case.pbs_shift.min(case.pps_shift)
    } else {
        sb
    };
    let quarter = |q: u8| (u64::from(q % 4) * (mb / 4)) / bs * bs;
    let lead = quarter(case.lead);
    let tail = quarter(case.tail);
    let addr = (64u64 << case.mb_shift) - lead;
    let region_size = lead + case.nr_mbs as u64 * mb + tail;
    let limits = Limits {
        page_size: 1 << page_shift,
        memory_block_size: mb,
        pageblock_size: pageblock,
        pluggable_start: 0,
        pluggable_end: (1 << 52) - 1,
    };
    // Sizes the operator picks from: quarter memory blocks, some a device block more.
    let mut choices = Vec::new();
    for k in 0..=4 * (case.nr_mbs as u64 + 1) {
        let q = (k * (mb / 4)).min(region_size) / bs * bs;
        choices.push(q);
        if bs < sb && q + bs <= region_size {
            choices.push(q + bs);
        }
    }
    let extent = (u64::from(case.extent_q % 9) * (mb / 4)) / bs * bs;
    let mut dev = Qemu {
        cfg: RawConfig {
            block_size: bs,
            addr,
            region_size,
            usable_region_size: 0,
            plugged_size: 0,
            requested_size: choices[usize::from(case.init_requested) % choices.len()],
            node_id: 0,
        },
        extent,
        plugged: Ranges::default(),
    };
    qemu::resize_usable_region(&mut dev.cfg, extent, true);
    let nblocks = dev.cfg.usable_region_size / bs;
    if nblocks > 0 {
        for &(a, l) in &case.init_plugged {
            let first = u64::from(a) * nblocks / 256;
            let len = (u64::from(l) * nblocks / 1024).max(1);
            dev.plugged.set(first, (first + len).min(nblocks), true);
        }
    }
    dev.cfg.plugged_size = dev.plugged.total() * bs;

    // The harness's own view of the geometry, for addresses (config.rs is tested on its own).
    let raw = dev.config();
    let geo =
        Geometry::new(&raw, &limits, &ModeParams::default()).expect("the case's geometry is valid");
    assert_eq!(geo.nr_mbs, case.nr_mbs as u64);
    let nr_mbs = geo.nr_mbs as usize;
    let sbs = geo.sbs_per_mb() as usize;
    let offline_threshold_mbs =
        (OFFLINE_THRESHOLD >> geo.memory_block_size.trailing_zeros()).max(2) as usize;
    let ppm = 1usize << (case.mb_shift - page_shift);
    let pfn0 = geo.mb_addr(0) >> page_shift;
    let log = Device::new();
    let world = World {
        vm: None,
        log: log.clone(),
        geo,
        limits,
        page_shift,
        sbs,
        offline_threshold_mbs,
        unplug_online: true,
        // The glue queues the worker at probe.
        kick: true,
        timer: false,
        unplug_all_pending: dev.size() != 0,
        dev,
        garble_next_read: None,
        choices,
        read_requested: 0,
        told_plugged: 0,
        reads_this_run: 0,
        blocks: vec![Block::default(); nr_mbs],
        pages: vec![Page::Absent; nr_mbs * ppm],
        pinned: vec![false; nr_mbs * ppm],
        other_free: PLENTY,
        pending: None,
        onlining: None,
        onlining_order: 0,
        adding: None,
        undoing: None,
        removed: None,
        policy: case.policy,
        max_order: case.max_order.min(case.mb_shift - page_shift),
        pfn0,
        ppm,
        faults,
        tape: VecDeque::new(),
        device_broke: None,
        lost: false,
        unknown: Vec::new(),
        requests_this_run: 0,
        last_request: None,
        busy_this_run: false,
        last_nack_scripted: false,
        hostile: false,
        may_shrink: case.hostile,
        garbled: false,
        unbinding: false,
        needs_reset: false,
        hotplug_ready: false,
        hotplug_fails: None,
        persistent_suspend: case.persistent,
        freeze_after: None,
        freezing: false,
        requests_while_freezing: 0,
        frozen: false,
        restore_after_run: false,
        logged: Vec::new(),
        trace: VecDeque::new(),
        trace_cap: 80,
        stats: Stats::default(),
    };
    let sim = Sim(std::sync::Arc::new(std::sync::Mutex::new(world)));
    let vm = VirtioMem::new(HostPlatform(sim.clone()), HostTransport(sim.clone()), log)
        .unwrap_or_else(|e| panic!("probing a valid device fails: {e:?}"));
    sim.w().vm = Some(vm);
    sim
}

/// [`probe_unstarted`], then `start`.
fn probe(case: &Case, faults: Faults) -> Sim {
    let sim = probe_unstarted(case, faults);
    sim.vm().start().expect("hotplug setup");
    sim
}

fn play(case: &Case, faults: Faults) -> Stats {
    let sim = probe(case, faults);
    sim.check("at probe");
    for op in &case.ops {
        sim.apply(op);
    }
    if let Some(p) = sim.w().pending {
        panic!("pending transition left: {p:?}");
    }
    sim.converge(case.final_requested, case.udev_onlines);
    sim.unbind();
    let mut stats = sim.finish();
    stats.cases = 1;
    stats
}

/// The seed of this run's random cases: `VMR_HOST_SEED` (hex) if set, else a random one.
/// Printed, so that a failing run can be replayed whole.
fn seed(name: &str) -> [u8; 32] {
    let hex = std::env::var("VMR_HOST_SEED").ok().unwrap_or_else(|| {
        let mut s = String::new();
        for b in rand_bytes() {
            let _ = write!(s, "{b:02x}");
        }
        s
    });
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| panic!("VMR_HOST_SEED must be 64 hex digits: {hex}"));
    }
    println!("{name}: seed {hex} (VMR_HOST_SEED={hex} replays this run)");
    seed
}

/// 32 random bytes from the standard library's randomly keyed hasher.
fn rand_bytes() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 32];
    for (i, c) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        c.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

/// Runs `cases` random cases and prints how many were actually run (`generated cases: N`,
/// summed up by `vm-scripts/test-all`; shown with `cargo test -- --show-output`). A
/// failure is kept in `proptest-regressions/model.txt` (replayed first by later runs) and
/// reported with its seed and its shrunk case.
fn run_model(name: &str, cases: u32, faults: Faults, len: std::ops::Range<usize>) -> Stats {
    let total = RefCell::new(Stats::default());
    let run = AtomicU64::new(0);
    let config = Config {
        cases: crate::scaled(cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/model.txt"
        )))),
        source_file: Some(file!()),
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed(name));
    let mut runner = TestRunner::new_with_rng(config, rng);
    let result = runner.run(&case_with(len), |case| {
        run.fetch_add(1, Ordering::Relaxed);
        let stats = play(&case, faults);
        total.borrow_mut().add(&stats);
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => {
            panic!("{name}: failed: {why}\nshrunk case: {case:#?}")
        }
        Err(e) => panic!("{name}: {e}"),
    }
    println!("{name}: generated cases: {}", run.into_inner());
    total.into_inner()
}

// ---- strategies ---------------------------------------------------------------------------

fn tape() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![5 => Just(0u8), 4 => any::<u8>()], 0..24)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Resize),
        10 => tape().prop_map(Op::Run),
        3 => (any::<u8>(), any::<bool>(), any::<u8>(), prop::option::weighted(0.2, tape()))
            .prop_map(|(mb, movable, refuse, interleave)| Op::Online { mb, movable, refuse, interleave }),
        2 => (any::<u8>(), any::<u8>(), prop::option::weighted(0.2, tape()))
            .prop_map(|(mb, refuse, interleave)| Op::Offline { mb, refuse, interleave }),
        1 => any::<u16>().prop_map(Op::Pin),
        1 => Just(Op::Unpin),
        1 => prop::bool::weighted(0.6).prop_map(Op::UnplugOnline),
        1 => any::<u8>().prop_map(Op::Garble),
        1 => any::<u8>().prop_map(Op::Shrink),
        1 => any::<u8>().prop_map(Op::Squeeze),
        1 => any::<u8>().prop_map(Op::NeedsReset),
        1 => (any::<u8>(), prop::bool::weighted(0.3), prop::option::weighted(0.3, any::<u8>()), tape())
            .prop_map(|(after, to_idle, resize, tape)| Op::Suspend { after, to_idle, resize, tape }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    case_with(1..60)
}

fn case_with(len: std::ops::Range<usize>) -> impl Strategy<Value = Case> {
    let geometry = (
        27u32..=30,
        // 2 to 16 subblocks a memory block, now and then 128: a bitmap of more than one
        // word (large memory blocks, 2 GiB on big x86 machines, hold 1024).
        prop::sample::select(vec![1u32, 2, 3, 4, 1, 2, 3, 4, 7]),
        0u32..=2,
        prop::sample::select(vec![0u32, 0, 1, 2, 14, 15]),
        0u32..=2,
        any::<u8>(),
        any::<u8>(),
        1usize..=6,
        any::<u8>(),
    );
    let setup = (
        prop::sample::select(vec![Policy::Offline, Policy::Kernel, Policy::Movable]),
        0u32..=7,
        any::<u8>(),
        prop::option::weighted(0.2, prop::collection::vec((any::<u8>(), any::<u8>()), 1..4)),
        any::<u8>(),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.5),
    );
    (geometry, setup, prop::collection::vec(op(), len)).prop_map(
        |(
            (mb_shift, sbs_shift, pps_shift, bps_shift, pbs_shift, lead, tail, nr_mbs, extent_q),
            (
                policy,
                max_order,
                init_requested,
                init_plugged,
                final_requested,
                udev_onlines,
                hostile,
                persistent,
            ),
            ops,
        )| Case {
            mb_shift,
            sbs_shift,
            pps_shift,
            bps_shift,
            pbs_shift,
            lead,
            tail,
            nr_mbs,
            extent_q,
            policy,
            max_order,
            init_requested,
            init_plugged: init_plugged.unwrap_or_default(),
            ops,
            final_requested,
            udev_onlines,
            hostile,
            persistent,
        },
    )
}

/// Prints the counters and checks that each path was taken, except `skip` and the rare
/// ones (expected fewer than ~20 times per run: requiring them would make the test flaky).
fn report(stats: &Stats, skip: &[&str]) {
    const RARE: [&str; 3] = ["waits_after_nack", "pending_unplug", "hostile_error"];
    let skip = [skip, &RARE[..]].concat();
    let mut msg = String::new();
    for (name, n) in stats.fields() {
        let _ = write!(msg, "{name} {n}, ");
    }
    eprintln!("model coverage: {msg}");
    // With fewer cases (mutation runs), a path may go untaken by chance: not a failure.
    if crate::scaled(100) < 100 {
        return;
    }
    for (name, n) in stats.fields() {
        assert!(
            n > 0 || skip.contains(&name),
            "no case exercised {name}: {msg}"
        );
    }
}

/// 10,000 random sequences of resizes (the usable region growing with them, shrinking at
/// UNPLUG_ALL), worker runs with BUSY / NACK / ERROR answers and resizes in flight,
/// add and removal failures, busy memory, onlining and offlining (refused by notifiers,
/// interleaved with the worker, and by other threads while the worker's lock is free),
/// pinned pages, `unplug_online` changes, torn config reads and a guest short of memory;
/// each followed by convergence without faults. Also checks that every interesting path
/// was taken.
#[test]
fn driver_follows_the_device_model() {
    let faults = Faults {
        error: true,
        invalid: false,
        strict_unknown: false,
    };
    let stats = run_model("driver_follows_the_device_model", 10_000, faults, 1..60);
    report(&stats, &["invalid_answer", "lost"]);
}

/// The same with invalid answers and answers that never come (the device may have done
/// the request): memory whose state the driver cannot know never reaches the buddy, by
/// the driver's hand or by onlining.
#[test]
fn unknown_device_state_never_reaches_the_buddy() {
    let faults = Faults::ALL;
    let stats = run_model(
        "unknown_device_state_never_reaches_the_buddy",
        2_500,
        faults,
        1..60,
    );
    // A request after BUSY in the same run (an interleaved run) comes about 10 times in
    // 2,500 cases, as few as 2 in one run of 11 here: required, it would fail now and
    // then by chance. The 10,000 cases above require it (45 or more each time).
    report(&stats, &["requests_after_busy"]);
}

// ---- the bugs found, one directed case each ---------------------------------------------
//
// Each failed while its bug was there; all are fixed and run in every `cargo test` as
// regression tests. Fixed in 64328f7: an unplug with nothing done relabelled a full block
// as partial; CANCEL_OFFLINE without our GOING_OFFLINE took back references never dropped;
// a partly undone add kept the undone subblocks marked plugged; a stale NACK stopped
// plugging for good; the undo UNPLUG was sent after ERROR; a block of a broken device
// (state unknown) could be onlined. Fixed later: a block left plugged but not added was
// never unplugged; a BUSY device did not end the round on the online unplug path.

const MB: u64 = 128 << 20;

/// 128 MiB memory blocks, two 64 MiB subblocks of one device block each, one request per
/// run, two memory blocks, the usable region two blocks beyond the requested size.
fn small() -> Case {
    Case {
        mb_shift: 27,
        sbs_shift: 1,
        pps_shift: 0,
        bps_shift: 0,
        pbs_shift: 0,
        lead: 0,
        tail: 0,
        nr_mbs: 2,
        extent_q: 8,
        policy: Policy::Offline,
        max_order: 0,
        init_requested: 0,
        init_plugged: vec![],
        ops: vec![],
        final_requested: 0,
        udev_onlines: false,
        hostile: false,
        persistent: false,
    }
}

/// The driver probed on `case`, after its first run.
fn booted(case: Case) -> Sim {
    let faults = Faults::ALL;
    let sim = probe(&case, faults);
    sim.w().trace_cap = 1000;
    sim.wake(vec![]);
    sim
}

/// Regression test (fixed in 64328f7): `sbm.unplugged(mb, first, 0)`, called by
/// `device.rs` after a BUSY or NACK with nothing done, turned a fully plugged block's
/// state into the partial one (sbm.rs `unplugged` set the partial state whatever `count`).
#[test]
fn unplugged_with_nothing_done_relabels_a_full_block() {
    let w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    assert_eq!(w.state(0), MbState::Offline);
    w.resize_to(0);
    // UNPLUG answered BUSY: nothing unplugged, block 0 stays offline (not partial).
    w.wake(vec![200]);
    assert_eq!(w.w().stats.busy, 1);
    assert_eq!(w.state(0), MbState::Offline);
}

/// Regression test (fixed in 64328f7): another memory notifier refuses
/// MEM_GOING_OFFLINE before ours: core mm sends MEM_CANCEL_OFFLINE to every notifier
/// (mm/memory_hotplug.c, offline_pages()), and `memory_event` took back references to
/// fake-offline pages it never dropped. The C driver ignores a CANCEL without its GOING
/// event (`hotplug_active`). (`pages_cancel_offline` fails on a reference held twice.)
#[test]
fn cancel_offline_without_going_offline_takes_references_twice() {
    let w = booted(Case {
        policy: Policy::Kernel,
        ..small()
    });
    w.resize_to(MB / 2);
    w.wake(vec![]);
    assert_eq!(w.state(0), MbState::KernelPartial);
    w.apply(&Op::Offline {
        mb: 0,
        refuse: 230,
        interleave: None,
    });
    assert_eq!(w.w().stats.refused_notifier, 1);
    assert_eq!(w.state(0), MbState::KernelPartial);
    assert!(!w.view(|d| d.sbm.unwrap().in_transition(0)));
}

/// Regression test (fixed in 64328f7): `add_memory` fails and the undo UNPLUG, split
/// into one request per subblock, is ACKed for the first subblock and BUSY for the
/// second: `add_failed(mb, false)` left both marked plugged, while `request_sbs` had
/// already taken the first off the plugged size.
#[test]
fn partly_undone_add_keeps_unplugged_subblocks_marked() {
    let w = booted(Case {
        bps_shift: 15,
        ..small()
    });
    w.resize_to(MB);
    // PLUG, PLUG, (lock free), add_memory fails, (lock free), UNPLUG ACK, UNPLUG BUSY.
    w.wake(vec![0, 0, 0, 215, 0, 0, 200]);
    assert_eq!(w.w().stats.add_undo_incomplete, 1);
    assert_eq!(w.state(0), MbState::Plugged);
    assert_eq!(w.view(|d| d.sbm.unwrap().plugged(0, 0, 1)), Plugged::None);
    assert_eq!(w.view(|d| d.sbm.unwrap().plugged(0, 1, 1)), Plugged::All);
    assert_eq!(w.plugged(), MB / 2);
}

/// Regression test: `add_memory` fails and so does the undo UNPLUG (BUSY): the block was
/// left `Plugged`, which neither `next_unplug` nor anything else looked at again. Its
/// memory stayed plugged whatever the requested size; the worker retried every 300 s in
/// vain. Now such blocks are unplugged at the start of every round, as the C driver does
/// (`virtio_mem_cleanup_pending_mb`).
#[test]
fn plugged_block_is_never_unplugged() {
    let w = booted(small());
    w.resize_to(MB);
    // PLUG, (lock free), add_memory fails, (lock free), UNPLUG BUSY.
    w.wake(vec![0, 0, 215, 0, 200]);
    assert_eq!(w.state(0), MbState::Plugged);
    let zero = w.sel(0);
    w.converge(zero, false);
}

/// Regression test (fixed in 64328f7): with QEMU's own rules, no fault injected: the
/// operator lowers the requested size while a PLUG is in flight (QEMU NACKs it) and sets
/// the old size again before the worker reads the config. `refresh` saw the same
/// requested size, kept `nacked_at`, and the driver never plugged the rest (until the
/// size changed again).
#[test]
fn stale_nack_stops_plugging() {
    let w = booted(Case {
        policy: Policy::Kernel,
        ..small()
    });
    w.resize_to(2 * MB);
    let zero = w.sel(0);
    // PLUG block 0, (lock free), add_memory, (lock free), then the operator sets 0
    // while block 1's PLUG is in flight: QEMU NACKs it.
    w.wake(vec![0, 0, 0, 0, 237, zero]);
    assert_eq!(w.view(|d| d.nacked_at), Some(2 * MB));
    let full = w.sel(2 * MB);
    w.converge(full, false);
    assert_eq!(w.plugged(), 2 * MB);
    assert_eq!(w.view(|d| d.nacked_at), None);
}

/// Regression test (fixed in 64328f7): a new block's PLUG, one request per subblock, is
/// ACKed for the first subblock and answered ERROR for the second: the driver marks the
/// device broken, adds the block anyway and, when adding failed, sent the undo UNPLUG to
/// the broken device. (`chan_request` fails on any request after ERROR.)
#[test]
fn request_sent_after_error_when_adding_fails() {
    let w = booted(Case {
        bps_shift: 15,
        ..small()
    });
    w.resize_to(MB);
    // PLUG ACK, PLUG ERROR, (lock free), add_memory fails.
    w.wake(vec![0, 225, 0, 215]);
    assert!(w.broken());
    assert_eq!(w.w().stats.add_fail, 1);
    assert_eq!(w.w().stats.requests, 2);
    assert_eq!(w.state(0), MbState::Plugged);
}

/// Block 0 plugged and offline, then its UNPLUG done by the device but the answer lost:
/// the device is broken, the block's state unknown.
fn lost_unplug() -> Sim {
    let w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    w.resize_to(0);
    w.wake(vec![234]);
    assert!(w.broken());
    w
}

/// Regression test (fixed in 64328f7): an offline block's UNPLUG times out after QEMU
/// did it: the driver marks the device broken but keeps the subblocks marked plugged,
/// and onlining the block (user space, udev) handed memory the device has unplugged to
/// the buddy. The same happened after an invalid answer, when the device's state is
/// unknown. Now GOING_ONLINE is refused once the device is broken.
#[test]
fn onlining_after_a_lost_unplug_hands_unplugged_memory_to_the_buddy() {
    let w = lost_unplug();
    w.apply(&Op::Online {
        mb: 0,
        movable: false,
        refuse: 0,
        interleave: None,
    });
    assert_eq!(w.w().blocks[0].online, None);
    assert_eq!(w.state(0), MbState::Offline);
    assert!(!w.view(|d| d.sbm.unwrap().in_transition(0)));
}

/// Regression test (not a safety bug): in an online block, a BUSY device did not end the
/// round (BUSY mapped to `RetryLater` like busy memory), so the cursor went on with every
/// smaller run, each migrated with alloc_contig_range, sent, answered BUSY and given back;
/// then the next block. Now `Stop::Busy` ends the round, as on offline blocks.
#[test]
fn busy_device_ends_the_round_on_the_online_path() {
    let w = booted(Case {
        policy: Policy::Kernel,
        sbs_shift: 3,
        ..small()
    });
    w.resize_to(MB);
    w.wake(vec![]);
    w.resize_to(0);
    // Every alloc_contig_range succeeds, every UNPLUG is answered BUSY.
    w.wake([0u8, 200].repeat(100));
    let busy = w.w().stats.busy;
    assert_eq!(busy, 1, "{busy} UNPLUGs answered BUSY in one round");
}

/// A guest short of memory keeps it: with nothing free outside the device and the
/// device's memory online, the driver gives back only what leaves the guest its margin,
/// says so, and finishes once memory is free again.
#[test]
fn guest_short_of_memory_keeps_its_margin() {
    let w = booted(Case {
        policy: Policy::Kernel,
        sbs_shift: 3,
        nr_mbs: 4,
        ..small()
    });
    w.resize_to(4 * MB);
    w.wake(vec![]);
    assert_eq!(w.plugged(), 4 * MB);
    // Nothing free outside the device: 512 MiB in the buddy, the margin 128 MiB.
    w.apply(&Op::Squeeze(0));
    w.resize_to(0);
    w.wake(vec![]);
    let left = w.plugged();
    assert!(left >= MB, "left {left:#x}: less than the margin");
    assert!(left < 4 * MB, "nothing given back");
    assert!(w.w().stats.pressure_stall >= 1, "the stall was not told");
    // 512 MiB in the buddy, nothing else free, MemTotal 1 GiB + what is left: the margin is
    // 128 MiB, so 384 MiB are given back and 128 MiB stay.
    let told = "guest needs its memory: 128 MiB available, 128 MiB more asked; waiting \
                (128 MiB stay the guest's)\n";
    let logged = w.w().logged.clone();
    assert!(logged.iter().any(|l| l == told), "{logged:#?}");
    let zero = w.sel(0);
    w.converge(zero, false);
    assert_eq!(w.plugged(), 0);
    // The stall's end is told once, as the unplug's resumption; nothing was told before it.
    let logged = w.w().logged.clone();
    let told = |s: &str| logged.iter().filter(|l| l.contains(s)).count();
    assert_eq!(
        told("guest memory available again: resuming the unplug"),
        1,
        "{logged:#?}"
    );
    assert_eq!(told("no longer waiting for the guest's memory"), 0);
    assert_eq!(told("plugged 0x20000000 of requested 0x20000000"), 1);
}

/// What the operator reads at unbind: an offline block of unknown state removed (or, if
/// that fails, that it stays and why it matters), and what may stay plugged. (The choice of
/// these lines survived `make mutants-host` before this test.)
#[test]
fn unbind_tells_what_goes_and_what_stays() {
    for removal_fails in [false, true] {
        let w = lost_unplug();
        {
            let mut w = w.w();
            w.unbinding = true;
            // (lock free), then offline_and_remove fails or not.
            w.tape = vec![0, if removal_fails { 200 } else { 0 }].into();
        }
        w.vm().remove();
        w.w().driver_took_lock();
        w.check("after unbind");
        let logged = w.w().logged.clone();
        let told = |s: &str| logged.iter().any(|l| l.contains(s));
        let gone = "memory block 0x200000000, offline, of unknown state in the device, removed";
        let stays = "memory block 0x200000000, offline, of unknown state in the device, stays \
                     added after removal";
        assert_eq!(told(gone), !removal_fails, "{logged:#?}");
        assert_eq!(told(stays), removal_fails, "{logged:#?}");
        assert!(told("removed with 0x8000000 still plugged"), "{logged:#?}");
        w.finish();
    }
}

/// Once the device is unbound, the notifier refuses to online or offline its blocks and the
/// log names each block's state. (`MbState::name` survived `make mutants-host` before this
/// test.)
#[test]
fn unbound_device_refuses_hotplug_naming_the_state() {
    let w = booted(small());
    w.resize_to(2 * MB);
    w.wake(vec![]);
    // Both blocks added offline (offline policy); the user onlines the first.
    assert!(w.k_online(0, false, Refuse::No, None));
    assert_eq!(w.state(0), MbState::Kernel);
    assert_eq!(w.state(1), MbState::Offline);
    w.w().unbinding = true;
    w.vm().remove();
    w.w().driver_took_lock();
    assert_eq!(
        w.notify(MemEvent::GoingOffline, 0, false),
        NotifyAnswer::Bad
    );
    assert_eq!(w.notify(MemEvent::GoingOnline, 1, false), NotifyAnswer::Bad);
    w.w().read_log();
    let logged = w.w().logged.clone();
    for told in [
        "refusing to offline memory block 0x200000000: it is kernel\n",
        "refusing to online memory block 0x208000000: it is offline\n",
    ] {
        assert!(
            logged.iter().any(|l| l == told),
            "{told:?} not in {logged:#?}"
        );
    }
    w.finish();
}

/// A usable region that shrinks above plugged memory is followed with a warning; growing
/// says nothing of the kind. (That condition survived `make mutants-host` before this test.)
#[test]
fn usable_region_shrunk_without_unplug_all_is_told() {
    // The usable region is two blocks beyond the requested size.
    let w = booted(Case {
        nr_mbs: 4,
        hostile: true,
        ..small()
    });
    w.resize_to(2 * MB);
    w.wake(vec![]);
    assert_eq!(w.plugged(), 2 * MB);
    // Asking for less leaves the usable region as it is (QEMU never shrinks it then).
    w.resize_to(MB);
    w.wake(vec![]);
    assert_eq!(w.plugged(), MB);
    let shrink = "without UNPLUG_ALL; nothing will be plugged beyond it";
    assert!(!w.w().logged.iter().any(|l| l.contains(shrink)));
    // From 4 blocks to 3: still above the plugged block.
    w.apply(&Op::Shrink(192));
    w.wake(vec![]);
    assert_eq!(w.w().stats.shrink_kept, 1);
    let logged = w.w().logged.clone();
    assert!(
        logged.iter().any(|l| l.contains(shrink)
            && l.contains("usable_region_size shrank from 0x20000000 to 0x18000000")),
        "{logged:#?}"
    );
}

/// The probe's line tells the operator the device's geometry and the mode. (The mode's
/// name survived `make mutants-host` before this test.)
#[test]
fn probe_says_what_the_device_is() {
    let w = booted(small());
    let logged = w.w().logged.clone();
    let told = "address 0x200000000, region 0x10000000 (usable 0x0), device block 0x4000000, \
                subblock 0x4000000, memory block 0x8000000, node 0, Sub Block Mode\n";
    assert_eq!(
        logged.first().map(String::as_str),
        Some(told),
        "{logged:#?}"
    );
}

/// Probe fails if the region cannot be set up for memory hotplug (resource, memory group,
/// notifier, online page callback): nothing may be added without them. (A `start` that
/// ignores `hotplug_init` survived `make mutants-host` before this test.)
#[test]
fn probe_fails_when_hotplug_cannot_be_set_up() {
    let faults = Faults::NONE;
    let sim = probe(&small(), faults);
    assert!(sim.w().hotplug_ready);
    sim.finish();

    let case = small();
    let w = probe_unstarted(&case, faults);
    w.w().hotplug_fails = Some(EBUSY);
    let vm = w.vm();
    assert_eq!(vm.start(), Err(EBUSY));
    let log = w.w().log.take_log();
    assert!(
        log.iter()
            .any(|(l, t)| *l == Level::Err && t.contains("cannot set up memory hotplug")),
        "{log:?}"
    );
    w.finish();
}

/// An emptied block whose removal fails is tried again later, also when nothing else is
/// left to do (the requested size is reached). (A `run` that let such a round end as done,
/// with no retry queued, survived `make mutants-host` before this test.)
#[test]
fn failed_removal_of_an_emptied_block_is_retried() {
    let w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    assert_eq!(w.state(0), MbState::Offline);
    w.resize_to(0);
    // UNPLUG ACK, (lock free), offline_and_remove fails: retry later.
    w.wake(vec![0, 0, 200]);
    assert!(w.w().timer, "no retry after a failed removal");
    assert!(w.w().blocks[0].added);
    // The retry: nothing to (un)plug, the removal fails again: another retry.
    w.wake(vec![0, 200]);
    assert!(w.w().timer, "no retry after the removal failed again");
    w.wake(vec![]);
    assert!(!w.w().blocks[0].added);
    assert_eq!(w.state(0), MbState::Unused);
}

/// Hibernation and restoring an image are refused, one clear line each, whatever is
/// plugged; other PM events pass.
#[test]
fn hibernation_is_refused_with_one_clear_line() {
    let w = booted(small());
    let vm = w.vm();
    assert_eq!(vm.pm_event(PmEvent::HibernationPrepare), NotifyAnswer::Bad);
    assert_eq!(vm.pm_event(PmEvent::Other), NotifyAnswer::Ok);
    assert_eq!(vm.pm_event(PmEvent::RestorePrepare), NotifyAnswer::Bad);
    let log = w.w().log.take_log();
    let line = |what: &str| {
        (
            Level::Err,
            format!("hibernation is not supported with a virtio-mem device: {what} refused\n"),
        )
    };
    assert_eq!(
        log,
        vec![line("hibernation"), line("restoring a hibernation image")]
    );
}

/// Suspend with memory plugged and without VIRTIO_MEM_F_PERSISTENT_SUSPEND is refused with
/// a line that says what and why; suspend-to-idle and a device with the feature are not.
#[test]
fn suspend_refusal_says_why() {
    let w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    let vm = w.vm();
    assert_eq!(vm.freeze(false), Err(EPERM));
    let log = w.w().log.take_log();
    let told = "suspending with plugged memory is not supported: 0x8000000 plugged, and the \
                device does not keep it while suspended (no VIRTIO_MEM_F_PERSISTENT_SUSPEND); \
                suspend refused\n";
    assert_eq!(log, vec![(Level::Err, told.to_string())]);
    assert_eq!(vm.freeze(true), Ok(()));
    vm.restore();
    w.w().persistent_suspend = true;
    assert_eq!(vm.freeze(false), Ok(()));
    vm.restore();
    assert!(w.w().log.take_log().is_empty());
}

/// What the sysfs attributes show, checked wherever the worker's lock is free: the last
/// published snapshot agrees with the driver's state and with itself (`ABI-virtio_mem_rust`
/// promises these).
fn check_snapshot(s: &Snapshot, d: &View<'_>, when: &str) {
    assert_eq!(
        s.plugged, d.plugged,
        "{when}: published plugged size is stale"
    );
    // A broken device may hold memory of unknown state (a request without a valid answer):
    // neither online nor offline.
    if !d.broken && !d.going_away {
        assert_eq!(
            s.usage.online + s.usage.offline,
            s.plugged,
            "{when}: online + offline != plugged in {s:?}"
        );
    }
    assert!(s.usage.movable <= s.usage.online, "{when}: {s:?}");
    let c = &s.counters;
    assert_eq!(
        c.bytes_plugged - c.bytes_unplugged,
        s.plugged,
        "{when}: bytes plugged - unplugged != plugged in {s:?}"
    );
    assert_eq!(
        c.answers.iter().sum::<u64>(),
        c.requests.iter().sum::<u64>(),
        "{when}: a request without its answer in {s:?}"
    );
}
