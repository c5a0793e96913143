// SPDX-License-Identifier: GPL-2.0

//! Model-based property tests of the worker's logic, on the host.
//!
//! The harness plays `device.rs`: it asks `sbm.rs` for the next [`PlugStep`],
//! [`UnplugStep`] and [`OnlineCursor`] run in exactly the order `device.rs` does, splits
//! runs into requests with [`protocol::split_run`], encodes them with
//! [`protocol::encode_request`], decodes the (poisoned) response buffer with
//! [`Response::decode`] and keeps the same bookkeeping on partial ACKs, NACK, BUSY and
//! ERROR. Against it stand two reference models:
//!
//! - [`Qemu`]: QEMU's virtio-mem device (`hw/virtio/virtio-mem.c`): a bitmap of plugged
//!   device blocks (as intervals), the requested size, the usable region that grows with
//!   the requested size (`requested + extent`, never shrinking except on UNPLUG_ALL), and
//!   its rules: ERROR for a misaligned request, one outside the usable region, plugging a
//!   plugged or unplugging an unplugged block; NACK for a plug beyond the requested size.
//! - The kernel: per memory block whether it is added, online and in which zone, a pending
//!   onlining or offlining, and per page whether it is absent, in the buddy or
//!   fake-offline (with or without the driver's reference), plus pages pinned by unmovable
//!   allocations; `add_memory`, `offline_and_remove_memory`, onlining and offlining with
//!   the memory notifier's event order (CANCEL after a refused GOING_*, also when another
//!   notifier refused), the online page callback in `online_pages_range`'s chunks, and
//!   `alloc_contig_range`.
//!
//! A script (a tape of bytes per worker wake-up, shrunk towards "nothing goes wrong")
//! injects BUSY / NACK / ERROR answers (and, in the second property, invalid answers and
//! timeouts after which the device did the request), resizes while a request is in flight,
//! `add_memory` failures, removal failures, `alloc_contig_range` failures, onlining and
//! offlining by other threads while the worker has dropped its lock, and notifier
//! refusals, torn config reads, and (in a tenth of the cases, not QEMU) a usable region
//! shrunk without UNPLUG_ALL. Invariants are checked at every point where another thread
//! could look (the worker's lock is free) and at every request and page hand-over; at the
//! end the script stops injecting, and the driver must converge on the requested size
//! within the limits it has (whole memory blocks inside the usable region, the offline
//! threshold).
//!
//! Invariants: the plugged size is the sum of the subblocks marked plugged and, unless
//! the device did something behind the driver's back, the device's plugged size; every
//! subblock and block state in `sbm.rs` matches the models (plugged bits, added, online,
//! zone, in transition); every request is valid for QEMU (aligned, inside the usable
//! region, plugging unplugged / unplugging plugged blocks, at most 65535 blocks, encoded
//! as `struct virtio_mem_req`), and QEMU never has to answer ERROR on its own; no plug
//! beyond the requested size the driver read (and a NACK from QEMU only after the size was
//! lowered meanwhile); nothing is sent after ERROR, an invalid answer or none, and the
//! driver gives up only then; a block is removed only with nothing plugged in it; a page
//! goes to the buddy only if plugged, never by the driver's hand after ERROR / no answer
//! about it (it stays fake-offline), and with the second property never by onlining
//! either; alloc_contig_range only on pages in the buddy; the driver's page references
//! are dropped and taken back exactly once per offlining; no block is added while the
//! offline threshold is reached; every page of an onlined block is either onlined or kept
//! fake-offline.
//!
//! # Where the harness mirrors `device.rs`
//!
//! Each function in the `impl World` block "device.rs, mirrored" is a transcription of the
//! function of the same name in `drivers/device.rs` as of commit 97cb2a0, `plugged_end` since
//! moved into `sbm.rs` (`run`,
//! `refresh`, `retry_later`, `mark_broken`, `request`, `request_sbs`, `plug`, `unplug`,
//! `unplug_pending`, `unplug_online`, `fake_offline`, `remove_block`, `remove_blocks`,
//! `remove_empty_blocks`, `memory_event`, `online_pages`, `sb_pfn`,
//! `sb_pages`) with `g.` as `self.g.`, the lock drops as `lock_dropped` checkpoints, and
//! `Platform` / `Transport` calls as calls into the models (`k_*`, `pages_*`,
//! `chan_request`, `read_config`, `queue_work`). When `device.rs` changes, these must
//! change with it. The enums `MemEvent`, `NotifyAnswer`,
//! `Stop`, the struct `Inner` and the constants `FAKE_OFFLINE_TRIES_MOVABLE` and
//! `OFFLINE_THRESHOLD` are copied too. The lines marked `(harness)` are the harness's own
//! bookkeeping. Not mirrored: `remove` (unbind), logging, `drop_slab`, `explain_busy`.

use crate::config::{Geometry, Limits, RawConfig, Sizes};
use crate::protocol::{
    self, BadResponse, RequestType, Response, REQUEST_SIZE, RESPONSE_POISON, RESPONSE_SIZE,
};
use crate::retry::Backoff;
use crate::sbm::{MbState, OnlineCursor, PlugStep, Plugged, Sbm, UnplugStep};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

// ---- copied from device.rs ---------------------------------------------------------------

const FAKE_OFFLINE_TRIES_MOVABLE: u32 = 5;
const OFFLINE_THRESHOLD: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemEvent {
    GoingOnline,
    Online,
    CancelOnline,
    GoingOffline,
    Offline,
    CancelOffline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NotifyAnswer {
    Ok,
    Bad,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Again,
    Nack,
    RetryLater,
    Busy,
    WaitForOnline,
    NoRoom,
    Broken,
}

fn unplug_stop(stop: Stop) -> Stop {
    match stop {
        Stop::Nack => Stop::Busy,
        s => s,
    }
}

/// `device.rs`'s `Inner`, minus the channel (the harness is the channel).
struct Inner {
    /// The response buffer, poisoned before each request.
    resp: [u8; RESPONSE_SIZE as usize],
    sbm: Sbm<Vec<u64>>,
    sizes: Sizes,
    plugged: u64,
    unplug_all_required: bool,
    broken: bool,
    removing: bool,
    backoff: Backoff,
    waiting_for_online: bool,
    nacked_at: Option<u64>,
    last_busy: Option<(u64, u64)>,
}

// Kernel error numbers the glue returns.
const ENOMEM: i32 = 12;
const EBUSY: i32 = 16;

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

/// QEMU's virtio-mem device (hw/virtio/virtio-mem.c), reduced to its state and rules.
#[derive(Clone, Debug)]
struct Qemu {
    addr: u64,
    region_size: u64,
    block_size: u64,
    usable: u64,
    requested: u64,
    /// QEMU's `VIRTIO_MEM_USABLE_EXTENT`, here a parameter of the case.
    extent: u64,
    plugged: Ranges,
}

const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;

impl Qemu {
    /// `virtio_mem_resize_usable_region`.
    fn resize_usable_region(&mut self, can_shrink: bool) {
        let bs = self.block_size;
        let mut new = self.region_size.min(self.requested + self.extent);
        new = new.div_ceil(bs) * bs;
        if self.requested == 0 {
            new = 0;
        }
        if new < self.usable && !can_shrink {
            return;
        }
        self.usable = new;
    }

    /// The `requested-size` property setter.
    fn set_requested(&mut self, size: u64) {
        assert!(size <= self.region_size && size.is_multiple_of(self.block_size));
        self.requested = size;
        self.resize_usable_region(false);
    }

    fn size(&self) -> u64 {
        self.plugged.total() * self.block_size
    }

    fn config(&self) -> RawConfig {
        RawConfig {
            block_size: self.block_size,
            addr: self.addr,
            region_size: self.region_size,
            usable_region_size: self.usable,
            plugged_size: self.size(),
            requested_size: self.requested,
            node_id: 0,
        }
    }

    fn blocks(&self, gpa: u64, size: u64) -> (u64, u64) {
        let a = (gpa - self.addr) / self.block_size;
        (a, a + size / self.block_size)
    }

    /// Device blocks `[a, b)` covering `[addr, addr + size)`.
    fn covering(&self, addr: u64, size: u64) -> (u64, u64) {
        let a = (addr - self.addr) / self.block_size;
        let b = (addr + size - self.addr).div_ceil(self.block_size);
        (a, b)
    }

    /// Whether all of `[addr, addr + size)` is plugged.
    fn all_plugged(&self, addr: u64, size: u64) -> bool {
        let (a, b) = self.covering(addr, size);
        self.plugged.count(a, b) == b - a
    }

    /// Why QEMU would answer ERROR to this (un)plug, whatever the requested size
    /// (`virtio_mem_valid_range` and the opposite-state test).
    fn invalid(&self, gpa: u64, nb_blocks: u16, plug: bool) -> Option<&'static str> {
        let size = u64::from(nb_blocks) * self.block_size;
        if !gpa.is_multiple_of(self.block_size) {
            return Some("misaligned");
        }
        if size == 0 {
            return Some("of no blocks");
        }
        if gpa < self.addr || gpa + size > self.addr + self.usable {
            return Some("outside the usable region");
        }
        let (a, b) = self.blocks(gpa, size);
        let n = self.plugged.count(a, b);
        if plug && n != 0 {
            return Some("plugging plugged blocks");
        }
        if !plug && n != b - a {
            return Some("unplugging unplugged blocks");
        }
        None
    }

    /// `virtio_mem_state_change_request`, in QEMU's order of checks.
    fn state_change(&mut self, gpa: u64, nb_blocks: u16, plug: bool) -> u16 {
        let size = u64::from(nb_blocks) * self.block_size;
        if !gpa.is_multiple_of(self.block_size)
            || size == 0
            || gpa < self.addr
            || gpa >= self.addr + self.usable
            || gpa + size > self.addr + self.usable
        {
            return RESP_ERROR;
        }
        if plug && self.size() + size > self.requested {
            return RESP_NACK;
        }
        let (a, b) = self.blocks(gpa, size);
        let n = self.plugged.count(a, b);
        if (plug && n != 0) || (!plug && n != b - a) {
            return RESP_ERROR;
        }
        self.plugged.set(a, b, plug);
        RESP_ACK
    }

    /// `virtio_mem_unplug_all`.
    fn unplug_all(&mut self) {
        self.plugged = Ranges::default();
        self.resize_usable_region(true);
    }
}

// ---- the kernel ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    /// Not online (block not added, or offline).
    Absent,
    /// Given to the buddy: the kernel may use it.
    Buddy,
    /// PageOffline, owned by the driver; `ref_held` unless the driver dropped its
    /// reference for an offlining in progress.
    FakeOffline { ref_held: bool },
}

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
    shrink_refused,
    waits_after_nack,
    pending_unplug,
    broken_cases,
);

// ---- the world: driver mirror + models --------------------------------------------------

struct World {
    // VirtioMem's fixed fields.
    geo: Geometry,
    page_shift: u32,
    offline_threshold_mbs: usize,
    config_changed: bool,
    g: Inner,
    /// The `unplug_online` module parameter.
    unplug_online: bool,
    // The glue's worker: kicked, or its retry timer armed.
    kick: bool,
    timer: bool,

    dev: Qemu,
    garble_next_read: Option<u8>,
    choices: Vec<u64>,

    blocks: Vec<Block>,
    pages: Vec<Page>,
    pinned: Vec<bool>,
    pending: Option<Pending>,
    /// The block whose pages the online page callback may see now.
    onlining: Option<usize>,
    /// The block the worker is adding: marked offline before `add_memory`, until it is
    /// added or `add_failed`.
    adding: Option<usize>,
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
    /// The device answered BUSY during this run.
    busy_this_run: bool,
    /// Whether the last NACK to a plug was scripted (else QEMU's own).
    last_nack_scripted: bool,
    /// The device shrank its usable region without UNPLUG_ALL (not QEMU): from then on
    /// it may answer ERROR on its own, and convergence is not required.
    hostile: bool,
    /// `Case::hostile`.
    may_shrink: bool,
    trace: VecDeque<String>,
    trace_cap: usize,
    stats: Stats,
}

macro_rules! fail {
    ($w:expr, $($arg:tt)*) => { $w.fail(format!($($arg)*)) };
}

macro_rules! trace {
    ($w:expr, $($arg:tt)*) => {{
        if $w.trace.len() >= $w.trace_cap { $w.trace.pop_front(); }
        $w.trace.push_back(format!($($arg)*));
    }};
}

impl World {
    fn new(case: &Case, faults: Faults) -> Self {
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
        let mut dev = Qemu {
            addr,
            region_size,
            block_size: bs,
            usable: 0,
            requested: 0,
            extent: (u64::from(case.extent_q % 9) * (mb / 4)) / bs * bs,
            plugged: Ranges::default(),
        };
        dev.requested = choices[usize::from(case.init_requested) % choices.len()];
        dev.resize_usable_region(true);
        let nblocks = dev.usable / bs;
        if nblocks > 0 {
            for &(a, l) in &case.init_plugged {
                let first = u64::from(a) * nblocks / 256;
                let len = (u64::from(l) * nblocks / 1024).max(1);
                dev.plugged.set(first, (first + len).min(nblocks), true);
            }
        }

        // VirtioMem::new.
        let raw = dev.config();
        let geo = Geometry::new(&raw, &limits).expect("the case's geometry is valid");
        let sizes = Sizes::new(&raw, &geo).expect("the case's sizes are valid");
        assert_eq!(geo.nr_mbs, case.nr_mbs as u64);
        let nr_mbs = geo.nr_mbs as usize;
        let sbs_per_mb = geo.sbs_per_mb() as usize;
        let words = Sbm::<Vec<u64>>::words_needed(nr_mbs, sbs_per_mb).unwrap();
        let mut sbm = Sbm::new(vec![0u64; words], nr_mbs, sbs_per_mb).unwrap();
        sbm.set_usable_mbs(geo.usable_mbs(sizes.usable));
        let unplug_all_required = sizes.plugged != 0;
        let offline_threshold_mbs =
            (OFFLINE_THRESHOLD >> geo.memory_block_size.trailing_zeros()).max(2) as usize;

        let ppm = 1usize << (case.mb_shift - page_shift);
        let pfn0 = geo.mb_addr(0) >> page_shift;
        World {
            geo,
            page_shift,
            offline_threshold_mbs,
            config_changed: true,
            g: Inner {
                resp: RESPONSE_POISON,
                sbm,
                sizes,
                plugged: 0,
                unplug_all_required,
                broken: false,
                removing: false,
                backoff: Backoff::new(),
                waiting_for_online: false,
                nacked_at: None,
                last_busy: None,
            },
            unplug_online: true,
            // The glue queues the worker at probe.
            kick: true,
            timer: false,
            dev,
            garble_next_read: None,
            choices,
            blocks: vec![Block::default(); nr_mbs],
            pages: vec![Page::Absent; nr_mbs * ppm],
            pinned: vec![false; nr_mbs * ppm],
            pending: None,
            onlining: None,
            adding: None,
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
            busy_this_run: false,
            last_nack_scripted: false,
            hostile: false,
            may_shrink: case.hostile,
            trace: VecDeque::new(),
            trace_cap: 80,
            stats: Stats::default(),
        }
    }

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

    fn sbs(&self) -> usize {
        self.g.sbm.sbs_per_mb()
    }

    // ---- the glue ----

    fn queue_work(&mut self, delay_ms: u32) {
        if delay_ms == 0 {
            self.kick = true;
        } else {
            self.timer = true;
        }
    }

    /// The device's config changed: `config_changed()` and `queue_work(0)`.
    fn config_interrupt(&mut self) {
        self.config_changed = true;
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
            self.dev.usable
        );
        self.config_interrupt();
    }

    fn read_config(&mut self) -> RawConfig {
        let mut raw = self.dev.config();
        if let Some(how) = self.garble_next_read.take() {
            self.stats.garbled += 1;
            match how % 3 {
                0 => raw.requested_size = raw.usable_region_size + raw.block_size,
                1 => raw.block_size *= 2,
                _ => raw.plugged_size = raw.region_size + raw.block_size,
            }
            trace!(self, "config read garbled: {raw:x?}");
            // A torn read during a change: the change's own interrupt follows.
            self.config_interrupt();
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
    ) -> Result<u32, ()> {
        let ty = match u16::from_le_bytes([req[0], req[1]]) {
            0 => RequestType::Plug,
            1 => RequestType::Unplug,
            2 => RequestType::UnplugAll,
            t => fail!(
                self,
                "request of unknown type {t} (virtio-mem protocol violation)"
            ),
        };
        let addr = u64::from_le_bytes(req[8..16].try_into().unwrap());
        let nb = u16::from_le_bytes([req[16], req[17]]);
        if req[2..8].iter().chain(&req[18..]).any(|&b| b != 0) {
            fail!(self, "request with non-zero padding: {req:x?}");
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
        let bs = self.dev.block_size;
        match ty {
            RequestType::UnplugAll => {
                if addr != 0 || nb != 0 {
                    fail!(self, "UNPLUG_ALL with arguments");
                }
            }
            _ => {
                if self.g.unplug_all_required {
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
                        self.dev.addr,
                        self.dev.addr + self.dev.usable
                    );
                }
                if plug && self.g.plugged + u64::from(nb) * bs > self.g.sizes.requested {
                    fail!(
                        self,
                        "PLUG {:#x} ({} blocks) beyond the requested size: plugged {:#x}, requested {:#x}",
                        addr,
                        nb,
                        self.g.plugged,
                        self.g.sizes.requested
                    );
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
        let range = (addr, addr + u64::from(nb) * bs);
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
        let (t, len) = answer?;
        if t != 0xffff {
            resp[0..2].copy_from_slice(&t.to_le_bytes());
        }
        Ok(len)
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
            if self.dev.requested >= self.g.sizes.requested {
                fail!(
                    self,
                    "QEMU NACKs a plug with requested {:#x} unchanged (driver read {:#x})",
                    self.dev.requested,
                    self.g.sizes.requested
                );
            }
        }
        r
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

    /// `pages::online`: plugged pages of a block being onlined go to the buddy.
    fn pages_online(&mut self, pfn: u64, order: u32) {
        for i in self.page_index(pfn, 1 << order) {
            if self.onlining != Some(i / self.ppm) || self.pages[i] != Page::Absent {
                fail!(
                    self,
                    "pages::online({pfn:#x}, {order}) outside an onlining or twice"
                );
            }
            self.to_buddy_check(i, "online page callback", false);
            self.pages[i] = Page::Buddy;
        }
    }

    /// `pages::keep_fake_offline`.
    fn pages_keep_fake_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            if self.onlining != Some(i / self.ppm) || self.pages[i] != Page::Absent {
                fail!(
                    self,
                    "pages::keep_fake_offline({pfn:#x}, {nr}) outside an onlining or twice"
                );
            }
            self.pages[i] = Page::FakeOffline { ref_held: true };
        }
    }

    /// `pages::fake_online`: fake-offline pages, now plugged, go to the buddy.
    fn pages_fake_online(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            if self.blocks[i / self.ppm].online.is_none()
                || self.pages[i] != (Page::FakeOffline { ref_held: true })
            {
                fail!(
                    self,
                    "pages::fake_online({pfn:#x}, {nr}): page {:#x} is {:?} in a block online {:?}",
                    self.page_addr(i),
                    self.pages[i],
                    self.blocks[i / self.ppm].online
                );
            }
            // The driver hands it back itself: never after ERROR or no answer about it.
            self.to_buddy_check(i, "pages::fake_online", true);
            self.pages[i] = Page::Buddy;
        }
    }

    /// `pages::fake_offline`: alloc_contig_range.
    fn pages_fake_offline(&mut self, pfn: u64, nr: u64) -> Result<(), i32> {
        let r = self.page_index(pfn, nr);
        let b = self.byte();
        if b >= 225 {
            self.stats.resize_in_flight += 1;
            let sel = self.byte();
            self.resize(sel);
        }
        for i in r.clone() {
            if self.blocks[i / self.ppm].online.is_none() || self.pages[i] != Page::Buddy {
                fail!(
                    self,
                    "alloc_contig_range({pfn:#x}, {nr}): page {:#x} is {:?}, not in the buddy of an online block",
                    self.page_addr(i),
                    self.pages[i]
                );
            }
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
                self.pages[i] = Page::FakeOffline { ref_held: true };
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

    /// `pages::going_offline`: the driver drops its references.
    fn pages_going_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            if self.pages[i] != (Page::FakeOffline { ref_held: true }) {
                fail!(
                    self,
                    "pages::going_offline: page {:#x} is {:?} (WARN: fake-offline page referenced)",
                    self.page_addr(i),
                    self.pages[i]
                );
            }
            self.pages[i] = Page::FakeOffline { ref_held: false };
        }
    }

    /// `pages::cancel_offline`: the driver takes its references back.
    fn pages_cancel_offline(&mut self, pfn: u64, nr: u64) {
        for i in self.page_index(pfn, nr) {
            if self.pages[i] != (Page::FakeOffline { ref_held: false }) {
                fail!(
                    self,
                    "pages::cancel_offline: page {:#x} is {:?}: a reference taken that was never dropped",
                    self.page_addr(i),
                    self.pages[i]
                );
            }
            self.pages[i] = Page::FakeOffline { ref_held: true };
        }
    }

    // ---- the kernel's memory hotplug ----

    fn mb_range(&self, mb: usize) -> (u64, u64) {
        (self.geo.mb_addr(mb), self.geo.memory_block_size)
    }

    fn notify(&mut self, event: MemEvent, mb: usize, movable: bool) -> NotifyAnswer {
        let (start, size) = self.mb_range(mb);
        let a = self.memory_event(event, start, size, movable);
        trace!(self, "notifier {event:?} block {mb} -> {a:?}");
        a
    }

    /// online_pages() of core mm for an added, offline block. Returns whether it went
    /// online; `interleave` lets the worker run between GOING_ONLINE and the rest.
    fn k_online(
        &mut self,
        mb: usize,
        movable: bool,
        refuse: Refuse,
        interleave: Option<Vec<u8>>,
    ) -> bool {
        assert!(
            self.blocks[mb].added && self.blocks[mb].online.is_none() && self.pending.is_none()
        );
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
        &mut self,
        (going, cancel): (MemEvent, MemEvent),
        pending: Pending,
        refuse: Refuse,
        interleave: Option<Vec<u8>>,
    ) -> bool {
        let (mb, movable) = match pending {
            Pending::Online { mb, movable } => (mb, movable),
            Pending::Offline { mb } => (mb, self.blocks[mb].online.unwrap()),
        };
        if refuse == Refuse::Before {
            self.stats.refused_notifier += 1;
            self.notify(cancel, mb, movable);
            return false;
        }
        if self.notify(going, mb, movable) == NotifyAnswer::Bad {
            self.notify(cancel, mb, movable);
            return false;
        }
        self.pending = Some(pending);
        if refuse == Refuse::After {
            self.stats.refused_notifier += 1;
            self.notify(cancel, mb, movable);
            self.pending = None;
            return false;
        }
        if let Some(tape) = interleave {
            self.stats.interleaved += 1;
            self.wake(tape);
        }
        self.finish_pending().unwrap_or(true)
    }

    fn finish_online(&mut self, mb: usize, movable: bool) {
        self.onlining = Some(mb);
        let start = self.pfn0 + (mb * self.ppm) as u64;
        let end = start + self.ppm as u64;
        let mut pfn = start;
        while pfn < end {
            let mut order = if pfn == 0 {
                self.max_order
            } else {
                self.max_order.min(pfn.trailing_zeros())
            };
            while pfn + (1 << order) > end {
                order -= 1;
            }
            self.online_pages(pfn, order);
            pfn += 1 << order;
        }
        let first = mb * self.ppm;
        if let Some(i) = (first..first + self.ppm).find(|&i| self.pages[i] == Page::Absent) {
            fail!(
                self,
                "block {mb} onlined, but page {:#x} was neither onlined nor kept fake-offline",
                self.page_addr(i)
            );
        }
        self.notify(MemEvent::Online, mb, movable);
        self.onlining = None;
        self.pending = None;
        self.blocks[mb].online = Some(movable);
    }

    /// offline_pages() of core mm for an online block.
    fn k_offline(&mut self, mb: usize, refuse: Refuse, interleave: Option<Vec<u8>>) -> bool {
        let movable = self.blocks[mb].online.expect("offlining an online block");
        assert!(self.pending.is_none());
        let first = mb * self.ppm;
        // Isolation fails at once for unmovable pages outside ZONE_MOVABLE.
        if !movable
            && (first..first + self.ppm).any(|i| self.pinned[i] && self.pages[i] == Page::Buddy)
        {
            trace!(self, "offlining block {mb}: isolation fails");
            return false;
        }
        self.notify_transition(
            (MemEvent::GoingOffline, MemEvent::CancelOffline),
            Pending::Offline { mb },
            refuse,
            interleave,
        )
    }

    fn finish_offline(&mut self, mb: usize) -> bool {
        let movable = self.blocks[mb].online.unwrap();
        let first = mb * self.ppm;
        // Migration and test_pages_isolated: pinned pages and referenced PageOffline
        // pages keep the block online (user space gives up; a kthread would loop).
        let stuck = (first..first + self.ppm).find(|&i| match self.pages[i] {
            Page::Buddy => self.pinned[i],
            Page::FakeOffline { ref_held } => ref_held,
            Page::Absent => true,
        });
        if let Some(i) = stuck {
            trace!(
                self,
                "offlining block {mb}: page {:#x} is {:?}",
                self.page_addr(i),
                self.pages[i]
            );
            self.notify(MemEvent::CancelOffline, mb, movable);
            self.pending = None;
            return false;
        }
        self.notify(MemEvent::Offline, mb, movable);
        for i in first..first + self.ppm {
            self.pages[i] = Page::Absent;
        }
        self.blocks[mb].online = None;
        self.pending = None;
        true
    }

    /// Another thread's transition, blocking the hotplug lock, finishes.
    fn finish_pending(&mut self) -> Option<bool> {
        match self.pending? {
            Pending::Online { mb, movable } => {
                self.finish_online(mb, movable);
                Some(true)
            }
            Pending::Offline { mb } => Some(self.finish_offline(mb)),
        }
    }

    /// `glue.add_memory`: add_memory_driver_managed, with auto-onlining.
    fn k_add_memory(&mut self, addr: u64, size: u64) -> Result<(), i32> {
        self.finish_pending();
        let mb = self
            .geo
            .mb_exactly(addr, size)
            .expect("adds one of its memory blocks");
        if self.blocks[mb].added {
            fail!(self, "block {mb} added twice");
        }
        let b = self.byte();
        if b >= 215 {
            self.stats.add_fail += 1;
            trace!(self, "add_memory block {mb} fails");
            return Err(ENOMEM);
        }
        trace!(self, "add_memory block {mb}");
        self.blocks[mb] = Block {
            added: true,
            online: None,
        };
        match self.policy {
            Policy::Offline => {}
            p => {
                self.k_online(mb, p == Policy::Movable, Refuse::No, None);
            }
        }
        Ok(())
    }

    /// `glue::offline_and_remove`: offline_and_remove_memory.
    fn k_offline_and_remove(&mut self, addr: u64, size: u64) -> Result<(), i32> {
        self.finish_pending();
        let mb = self
            .geo
            .mb_exactly(addr, size)
            .expect("removes one of its memory blocks");
        if !self.blocks[mb].added {
            fail!(self, "block {mb} removed but not added");
        }
        if self.dev.plugged.count(
            self.dev.covering(addr, size).0,
            self.dev.covering(addr, size).1,
        ) != 0
        {
            fail!(self, "block {mb} removed with memory plugged in it");
        }
        if self.g.sbm.plugged(mb, 0, self.sbs()) != Plugged::None {
            fail!(self, "block {mb} removed with subblocks marked plugged");
        }
        let b = self.byte();
        let online = self.blocks[mb].online;
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
        if res.is_ok() {
            self.blocks[mb] = Block::default();
            self.stats.remove_ok += 1;
        } else {
            self.stats.remove_fail += 1;
        }
        trace!(self, "offline_and_remove block {mb} -> {res:?}");
        res
    }

    /// Another thread onlines or offlines a block while the worker's lock is free.
    fn concurrent(&mut self) {
        if self.byte() < 200 || self.pending.is_some() {
            return;
        }
        let sel = self.byte();
        let n = self.blocks.len();
        let mb = usize::from(sel) % n;
        match self.blocks[mb] {
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
    fn lock_dropped(&mut self, what: &str) {
        self.check(what);
        self.concurrent();
    }

    // ---- invariants ----

    /// Checked whenever the worker's lock is free.
    fn check(&self, when: &str) {
        if self.g.broken && self.device_broke.is_none() {
            fail!(
                self,
                "{when}: the driver gave up on a device that did nothing wrong"
            );
        }
        let sbs = self.sbs();
        let sb = self.sb_size();
        let bits: usize = (0..self.blocks.len())
            .map(|mb| {
                (0..sbs)
                    .filter(|&s| self.g.sbm.plugged(mb, s, 1) == Plugged::All)
                    .count()
            })
            .sum();
        if bits as u64 * sb != self.g.plugged {
            fail!(
                self,
                "{when}: plugged {:#x}, but {} subblocks of {:#x} are marked plugged",
                self.g.plugged,
                bits,
                sb
            );
        }
        if self.g.unplug_all_required {
            if self.g.plugged != 0
                || (0..self.blocks.len()).any(|mb| self.g.sbm.state(mb) != MbState::Unused)
            {
                fail!(self, "{when}: bookkeeping changed before UNPLUG_ALL");
            }
            return;
        }
        if !self.lost && self.g.plugged != self.dev.size() {
            fail!(
                self,
                "{when}: driver plugged {:#x}, device plugged {:#x}",
                self.g.plugged,
                self.dev.size()
            );
        }
        let bpsb = self.geo.blocks_per_sb();
        for mb in 0..self.blocks.len() {
            let mut n = 0;
            for s in 0..sbs {
                let (a, b) = self.dev.covering(self.geo.sb_addr(mb, s), sb);
                let c = self.dev.plugged.count(a, b);
                let marked = self.g.sbm.plugged(mb, s, 1) == Plugged::All;
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
                (false, _) if self.removed == Some(mb) && n == 0 => MbState::OfflinePartial,
                (false, _) if n == 0 => MbState::Unused,
                (false, _) => MbState::Plugged,
                (true, None) if full => MbState::Offline,
                (true, None) => MbState::OfflinePartial,
                (true, Some(false)) if full => MbState::Kernel,
                (true, Some(false)) => MbState::KernelPartial,
                (true, Some(true)) if full => MbState::Movable,
                (true, Some(true)) => MbState::MovablePartial,
            };
            let state = self.g.sbm.state(mb);
            if state != want {
                fail!(
                    self,
                    "{when}: block {mb} is {:?} in sbm, {:?} in the model ({k:?}, {n} plugged)",
                    state,
                    want
                );
            }
            let pending = matches!(self.pending, Some(Pending::Online { mb: m, .. } | Pending::Offline { mb: m }) if m == mb);
            if self.g.sbm.in_transition(mb) != pending {
                fail!(
                    self,
                    "{when}: block {mb} in transition {}, model {pending}",
                    self.g.sbm.in_transition(mb)
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
                let marked = self.g.sbm.plugged(mb, s, 1) == Plugged::All;
                if self.pinned[i] && p != Page::Buddy {
                    fail!(
                        self,
                        "{when}: pinned page {:#x} is {p:?}",
                        self.page_addr(i)
                    );
                }
                let ok = match (k.online, p) {
                    (None, Page::Absent) => true,
                    (None, _) | (Some(_), Page::Absent) => false,
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
                        ref_held && self.device_broke.is_some() && self.g.broken
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

    // ---- the script ----

    /// The worker thread: runs when kicked, or when its retry timer fires.
    fn wake(&mut self, tape: Vec<u8>) {
        let saved = std::mem::replace(&mut self.tape, tape.into());
        if self.kick || self.timer {
            self.kick = false;
            self.timer = false;
            self.stats.runs += 1;
            self.requests_this_run = 0;
            self.busy_this_run = false;
            trace!(self, "worker runs");
            self.run();
            self.check("after a run");
        }
        self.tape = saved;
    }

    /// The first block from `from` on (wrapping around) for which `want` holds.
    fn pick_block(&self, from: u8, want: impl Fn(&Block) -> bool) -> Option<usize> {
        let n = self.blocks.len();
        (0..n)
            .map(|i| (usize::from(from) + i) % n)
            .find(|&m| want(&self.blocks[m]))
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Resize(sel) => self.resize(*sel),
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
                trace!(self, "user onlines block {mb}");
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
                trace!(self, "user offlines block {mb}");
                self.k_offline(mb, Refuse::from_byte(*refuse), interleave.clone());
            }
            Op::Pin(n) => {
                let buddy: Vec<usize> = (0..self.pages.len())
                    .filter(|&i| self.pages[i] == Page::Buddy)
                    .collect();
                if !buddy.is_empty() {
                    let i = buddy[usize::from(*n) % buddy.len()];
                    self.pinned[i] = true;
                    trace!(self, "page {:#x} pinned", self.page_addr(i));
                }
            }
            Op::Unpin => self.pinned.iter_mut().for_each(|p| *p = false),
            Op::UnplugOnline(on) => self.unplug_online = *on,
            Op::Garble(how) => self.garble_next_read = Some(*how),
            Op::Shrink(_) if !self.may_shrink => {}
            Op::Shrink(n) => {
                let bs = self.dev.block_size;
                let usable = self.dev.usable * u64::from(*n) / 256 / bs * bs;
                if usable < self.dev.usable {
                    self.stats.hostile_shrink += 1;
                    self.hostile = true;
                    self.dev.usable = usable;
                    self.dev.requested = self.dev.requested.min(usable);
                    trace!(self, "device: usable region shrunk to {usable:#x}");
                    self.config_interrupt();
                }
            }
        }
        self.check("after an operation");
    }

    /// No more faults: the driver must reach the requested size, within its limits.
    fn converge(&mut self, sel: u8, udev_onlines: bool) {
        self.faults.error = false;
        self.faults.invalid = false;
        self.pinned.iter_mut().for_each(|p| *p = false);
        self.unplug_online = true;
        self.garble_next_read = None;
        self.resize(sel);
        let target = self.dev.requested;
        let mut stable = false;
        for _ in 0..1000 {
            if self.kick || self.timer {
                self.wake(Vec::new());
                continue;
            }
            let mut onlined = false;
            if udev_onlines {
                for mb in 0..self.blocks.len() {
                    if self.blocks[mb].added && self.blocks[mb].online.is_none() {
                        let movable = self.policy == Policy::Movable;
                        onlined |= self.k_online(mb, movable, Refuse::No, None);
                    }
                }
            }
            if !onlined && !self.kick && !self.timer {
                stable = true;
                break;
            }
        }
        if !stable {
            fail!(self, "the worker is still busy after 1000 rounds");
        }
        if self.hostile {
            return;
        }
        if self.device_broke.is_some() {
            self.stats.broken_cases += 1;
            if !self.g.broken {
                fail!(self, "the device broke, but the driver does not know");
            }
            return;
        }
        let sb = self.sb_size();
        let p = self.g.plugged;
        if p >= target + sb {
            fail!(
                self,
                "did not converge: plugged {p:#x}, requested {target:#x} (subblock {sb:#x})"
            );
        }
        if p + sb <= target {
            // Short of it: only the driver's limits explain that. Every added block is
            // full, and there is no room for another one, or the offline threshold holds.
            let nr = self.blocks.len();
            let usable_mbs = self.geo.usable_mbs(self.dev.usable);
            let partial = (0..nr).find(|&mb| {
                self.blocks[mb].added && self.g.sbm.plugged(mb, 0, self.sbs()) != Plugged::All
            });
            let room = (0..usable_mbs).any(|mb| self.g.sbm.state(mb) == MbState::Unused);
            let offline = (0..nr)
                .filter(|&mb| self.blocks[mb].added && self.blocks[mb].online.is_none())
                .count();
            let threshold = offline >= self.offline_threshold_mbs && self.g.waiting_for_online;
            // The device refused to plug at this requested size: the driver waits for
            // another one, by design. QEMU refuses only a plug beyond a requested size
            // lowered meanwhile.
            if self.g.nacked_at == Some(target) && self.last_nack_scripted {
                self.stats.waits_after_nack += 1;
                return;
            }
            if partial.is_some() || (room && !threshold) || self.g.nacked_at == Some(target) {
                fail!(
                    self,
                    "did not converge: plugged {p:#x}, requested {target:#x} (subblock {sb:#x}); \
                     partial block {partial:?}, room for a new block {room}, offline blocks \
                     {offline} (threshold {}), nacked_at {:?}",
                    self.offline_threshold_mbs,
                    self.g.nacked_at
                );
            }
            self.stats.converged_at_limit += 1;
        } else {
            self.stats.converged_exact += 1;
        }
        // Nothing emptied stays added.
        if let Some(mb) = (0..self.blocks.len()).find(|&mb| self.g.sbm.is_empty_added(mb)) {
            fail!(self, "block {mb} stays added with nothing plugged");
        }
    }
}

// ---- device.rs, mirrored ------------------------------------------------------------------

impl World {
    /// `VirtioMem::run`.
    fn run(&mut self) {
        let start_plugged = self.g.plugged;
        let result = loop {
            if self.g.broken || self.g.removing {
                return;
            }
            if self.g.unplug_all_required {
                match self.request(RequestType::UnplugAll, 0, 0) {
                    Some(Response::Ack) => {
                        self.g.unplug_all_required = false;
                        self.config_changed = true;
                    }
                    Some(Response::Busy) => break Err(Stop::Busy),
                    other => return self.mark_broken(RequestType::UnplugAll, other),
                }
            }
            if std::mem::replace(&mut self.config_changed, false) && !self.refresh() {
                return;
            }

            // Blocks whose adding and undoing both failed: give them back first.
            if let Err(stop) = self.unplug_pending() {
                break Err(stop);
            }
            // Blocks emptied earlier whose removal failed: try again.
            let removed_all = self.remove_empty_blocks();

            let requested = self.g.sizes.requested;
            let result = if requested > self.g.plugged && self.g.nacked_at != Some(requested) {
                let diff = requested - self.g.plugged;
                self.plug(diff)
            } else if requested < self.g.plugged {
                let diff = self.g.plugged - requested;
                self.unplug(diff)
            } else {
                Ok(())
            };
            match result {
                Err(Stop::Again) => {
                    self.stats.again += 1;
                    continue;
                }
                Ok(()) if !removed_all => break Err(Stop::RetryLater),
                r => break r,
            }
        };
        trace!(self, "run ends: {result:?}, plugged {:#x}", self.g.plugged);

        let requested = self.g.sizes.requested;
        match result {
            Ok(()) | Err(Stop::Again) => self.g.backoff.reset(),
            Err(Stop::Nack) => {
                self.g.nacked_at = Some(requested);
            }
            Err(Stop::RetryLater | Stop::Busy) => {
                if self.g.plugged != start_plugged {
                    self.g.backoff.reset();
                }
                self.retry_later()
            }
            Err(Stop::WaitForOnline) => self.stats.wait_for_online += 1,
            Err(Stop::NoRoom) => self.stats.no_room += 1,
            Err(Stop::Broken) => self.g.broken = true,
        }
    }

    /// `VirtioMem::refresh`.
    fn refresh(&mut self) -> bool {
        let raw = self.read_config();
        let sizes = match Sizes::new(&raw, &self.geo) {
            Ok(s) => s,
            Err(_) => return false,
        };
        // The usable region may only shrink with UNPLUG_ALL, which leaves nothing plugged.
        if let Some((mb, sb)) = self.g.sbm.plugged_end() {
            let end = self.geo.sb_addr(mb, sb);
            if sizes.usable < end - self.geo.addr {
                self.stats.shrink_refused += 1;
                return false;
            }
        }
        // Any change may make a refused plug possible (the requested size may even have
        // gone and come back between two reads).
        self.g.nacked_at = None;
        self.g.sizes = sizes;
        let usable_mbs = self.geo.usable_mbs(sizes.usable);
        self.g.sbm.set_usable_mbs(usable_mbs);
        true
    }

    /// `VirtioMem::retry_later`.
    fn retry_later(&mut self) {
        let r = self.g.backoff.failed();
        self.queue_work(r.delay_ms);
    }

    /// `VirtioMem::mark_broken`.
    fn mark_broken(&mut self, _ty: RequestType, _resp: Option<Response>) {
        self.g.broken = true;
    }

    /// `VirtioMem::request`.
    fn request(&mut self, ty: RequestType, addr: u64, nb_blocks: u16) -> Option<Response> {
        // Nothing more goes to a device that answered ERROR, nothing or nonsense.
        if self.g.broken {
            return None;
        }
        let req = protocol::encode_request(ty, addr, nb_blocks);
        // Whatever the device leaves unwritten, or left from an earlier answer, is invalid.
        self.g.resp = RESPONSE_POISON;
        let mut resp = self.g.resp; // (harness: the transport borrows it)
        let used_len = match self.chan_request(&req, &mut resp) {
            Ok(len) => len,
            Err(()) => return None,
        };
        self.g.resp = resp; // (harness)
        match Response::decode(&self.g.resp, used_len) {
            Ok(r) => Some(r),
            Err(BadResponse::Length(_)) | Err(BadResponse::Type(_)) => None,
        }
    }

    /// `VirtioMem::request_sbs`.
    fn request_sbs(
        &mut self,
        ty: RequestType,
        mb: usize,
        first: usize,
        count: usize,
    ) -> (usize, Result<(), Stop>) {
        let bpsb = self.geo.blocks_per_sb();
        let mut done = 0;
        let mut pieces = 0;
        for (off, n) in protocol::split_run(count, bpsb) {
            pieces += 1;
            if pieces == 2 {
                self.stats.split_runs += 1;
            }
            let addr = self.geo.sb_addr(mb, first + off);
            if n as u64 * bpsb > u64::from(u16::MAX) {
                fail!(
                    self,
                    "split_run made a request of {} blocks",
                    n as u64 * bpsb
                );
            }
            let nb = (n as u64 * bpsb) as u16;
            let stop = match self.request(ty, addr, nb) {
                Some(Response::Ack) => {
                    done += n;
                    let bytes = (n as u64) << self.geo.sb_shift();
                    match ty {
                        RequestType::Plug => self.g.plugged += bytes,
                        RequestType::Unplug => {
                            self.g.plugged = self
                                .g
                                .plugged
                                .checked_sub(bytes)
                                .unwrap_or_else(|| fail!(self, "plugged size underflows"))
                        }
                        RequestType::UnplugAll => self.g.plugged = 0,
                    }
                    continue;
                }
                Some(Response::Nack) => Stop::Nack,
                Some(Response::Busy) => Stop::Busy,
                other => {
                    self.mark_broken(ty, other);
                    Stop::Broken
                }
            };
            if done > 0 {
                self.stats.partial_done += 1;
            }
            return (done, Err(stop));
        }
        (done, Ok(()))
    }

    /// `VirtioMem::plug`.
    fn plug(&mut self, diff: u64) -> Result<(), Stop> {
        let target = self.g.plugged + diff;
        loop {
            if self.config_changed {
                return Err(Stop::Again);
            }
            let nb_sb = ((target - self.g.plugged) >> self.geo.sb_shift()) as usize;
            if nb_sb == 0 {
                return Ok(());
            }
            let Some(step) = self.g.sbm.next_plug(nb_sb) else {
                return Err(Stop::NoRoom);
            };
            match step {
                PlugStep::Added { mb, first, count } => {
                    let (done, res) = self.request_sbs(RequestType::Plug, mb, first, count);
                    if done > 0 && self.g.sbm.plugged_added(mb, first, done) {
                        self.pages_fake_online(self.sb_pfn(mb, first), self.sb_pages(done));
                    }
                    res?;
                }
                PlugStep::New { mb, count } => {
                    if self.g.sbm.offline_mbs() >= self.offline_threshold_mbs {
                        self.g.waiting_for_online = true;
                        return Err(Stop::WaitForOnline);
                    }
                    let (done, res) = self.request_sbs(RequestType::Plug, mb, 0, count);
                    if done == 0 {
                        return res;
                    }
                    self.g.sbm.plugged_new(mb, done);

                    let addr = self.geo.mb_addr(mb);
                    let size = self.geo.memory_block_size;
                    self.threshold_check(mb); // (harness)
                    self.adding = Some(mb); // (harness)
                    self.lock_dropped("before add_memory");
                    let added = self.k_add_memory(addr, size);
                    if added.is_ok() {
                        self.adding = None; // (harness)
                    }
                    self.lock_dropped("after add_memory");

                    if added.is_err() {
                        let (undone, _) = self.request_sbs(RequestType::Unplug, mb, 0, done);
                        if undone != done {
                            self.stats.add_undo_incomplete += 1;
                        }
                        self.g.sbm.unplugged(mb, 0, undone);
                        self.g.sbm.add_failed(mb, undone == done);
                        self.adding = None; // (harness)
                        let stop = if self.g.broken {
                            Stop::Broken
                        } else {
                            Stop::RetryLater
                        };
                        return Err(stop);
                    }
                    res?;
                }
            }
        }
    }

    /// `VirtioMem::unplug`.
    fn unplug(&mut self, diff: u64) -> Result<(), Stop> {
        let sb_shift = self.geo.sb_shift();
        let target = self.g.plugged - diff;
        self.g.last_busy = None;
        let mut tried = vec![false; self.g.sbm.nr_mbs()];
        let mut removal_failed = false;
        loop {
            if self.config_changed {
                return Err(Stop::Again);
            }
            let Some(left) = self.g.plugged.checked_sub(target) else {
                fail!(self, "unplugged below the target")
            };
            let nb_sb = (left >> sb_shift) as usize;
            let step = self
                .g
                .sbm
                .next_unplug(nb_sb, self.unplug_online, |mb| tried[mb]);
            let Some(step) = step else {
                let left = nb_sb > 0 || removal_failed;
                return if left { Err(Stop::RetryLater) } else { Ok(()) };
            };
            let mb = match step {
                UnplugStep::Offline { mb, first, count } => {
                    self.stats.offline_unplug += 1;
                    if count == 0 || count > nb_sb || self.blocks[mb].online.is_some() {
                        fail!(
                            self,
                            "bad offline unplug step {step:?} for {nb_sb} subblocks"
                        );
                    }
                    let (done, res) = self.request_sbs(RequestType::Unplug, mb, first, count);
                    self.g.sbm.unplugged(mb, first, done);
                    if let Err(stop) = res {
                        return Err(unplug_stop(stop));
                    }
                    mb
                }
                UnplugStep::Online { mb } => {
                    let mut cursor = OnlineCursor::new(&self.g.sbm);
                    loop {
                        let Some(left) = self.g.plugged.checked_sub(target) else {
                            fail!(self, "unplugged below the target")
                        };
                        let nb_sb = (left >> sb_shift) as usize;
                        let Some((first, count)) = cursor.next(&self.g.sbm, mb, nb_sb) else {
                            break;
                        };
                        self.stats.online_unplug += 1;
                        if count == 0 || count > nb_sb || first + count > self.sbs() {
                            fail!(self, "bad online run {first}+{count} for {nb_sb} subblocks");
                        }
                        match self.unplug_online(mb, first, count) {
                            // Busy memory: smaller runs of it come next. A busy device
                            // ends the round.
                            Ok(()) | Err(Stop::RetryLater) => {}
                            Err(stop) => return Err(stop),
                        }
                    }
                    tried[mb] = true;
                    mb
                }
            };
            if self.g.sbm.plugged(mb, 0, self.g.sbm.sbs_per_mb()) == Plugged::None {
                let removed = self.remove_block(mb);
                removal_failed |= !removed;
                tried[mb] = true;
            }
        }
    }

    /// `VirtioMem::unplug_pending`.
    fn unplug_pending(&mut self) -> Result<(), Stop> {
        loop {
            let Some((mb, first, count)) = self.g.sbm.next_pending() else {
                return Ok(());
            };
            if self.blocks[mb].added {
                fail!(self, "block {mb} is added but marked plugged-not-added");
            }
            self.stats.pending_unplug += 1;
            let (done, res) = self.request_sbs(RequestType::Unplug, mb, first, count);
            self.g.sbm.unplugged(mb, first, done);
            res.map_err(unplug_stop)?;
        }
    }

    /// `VirtioMem::unplug_online`.
    fn unplug_online(&mut self, mb: usize, first: usize, count: usize) -> Result<(), Stop> {
        let pfn = self.sb_pfn(mb, first);
        let nr = self.sb_pages(count);
        if let Err(stop) = self.fake_offline(pfn, nr) {
            if matches!(stop, Stop::RetryLater) {
                self.g.last_busy = Some((pfn, nr));
            }
            return Err(stop);
        }
        let (done, res) = self.request_sbs(RequestType::Unplug, mb, first, count);
        self.g.sbm.unplugged(mb, first, done);
        match res {
            Ok(()) => Ok(()),
            Err(Stop::Broken) => Err(Stop::Broken),
            Err(stop) => {
                // Still plugged for certain: back to the kernel.
                self.pages_fake_online(self.sb_pfn(mb, first + done), self.sb_pages(count - done));
                Err(unplug_stop(stop))
            }
        }
    }

    /// `VirtioMem::fake_offline`.
    fn fake_offline(&mut self, pfn: u64, nr: u64) -> Result<(), Stop> {
        let tries = if self.pages_is_movable(pfn) {
            FAKE_OFFLINE_TRIES_MOVABLE
        } else {
            1
        };
        for _ in 0..tries {
            if self.config_changed {
                return Err(Stop::Again);
            }
            match self.pages_fake_offline(pfn, nr) {
                Ok(()) => return Ok(()),
                Err(e) if e == ENOMEM => return Err(Stop::RetryLater),
                Err(_) => continue,
            }
        }
        Err(Stop::RetryLater)
    }

    /// `VirtioMem::remove_block`.
    fn remove_block(&mut self, mb: usize) -> bool {
        let addr = self.geo.mb_addr(mb);
        let size = self.geo.memory_block_size;
        self.lock_dropped("before offline_and_remove");
        let res = self.k_offline_and_remove(addr, size);
        if res.is_ok() {
            self.removed = Some(mb); // (harness)
        }
        self.lock_dropped("after offline_and_remove");
        match res {
            Ok(()) => {
                self.g.sbm.removed(mb);
                self.removed = None; // (harness)
                true
            }
            Err(_) => false,
        }
    }

    /// `VirtioMem::remove_blocks`.
    fn remove_blocks(&mut self, wanted: impl Fn(&Sbm<Vec<u64>>, usize) -> bool) -> bool {
        let mut all = true;
        let mut from = 0;
        loop {
            let Some(mb) = (from..self.g.sbm.nr_mbs()).find(|&mb| wanted(&self.g.sbm, mb)) else {
                return all;
            };
            from = mb + 1;
            let removed = self.remove_block(mb);
            if !removed {
                all = false;
            }
        }
    }

    /// `VirtioMem::remove_empty_blocks`.
    fn remove_empty_blocks(&mut self) -> bool {
        self.remove_blocks(|sbm, mb| sbm.is_empty_added(mb))
    }

    /// `VirtioMem::sb_pfn`.
    fn sb_pfn(&self, mb: usize, sb: usize) -> u64 {
        self.geo.sb_addr(mb, sb) >> self.page_shift
    }

    /// `VirtioMem::sb_pages`.
    fn sb_pages(&self, count: usize) -> u64 {
        (count as u64) << (self.geo.sb_shift() - self.page_shift)
    }

    /// `VirtioMem::memory_event`.
    fn memory_event(
        &mut self,
        event: MemEvent,
        start: u64,
        size: u64,
        movable: bool,
    ) -> NotifyAnswer {
        self.check("memory notifier");
        let (removing, broken) = (self.g.removing, self.g.broken);
        let Some(mb) = self.geo.mb_exactly(start, size) else {
            if matches!(event, MemEvent::GoingOnline | MemEvent::GoingOffline) {
                return NotifyAnswer::Bad;
            }
            return NotifyAnswer::Done;
        };
        match event {
            MemEvent::GoingOnline if removing => return NotifyAnswer::Bad,
            // After a lost or invalid answer, subblocks marked plugged may not be: nothing
            // of a broken device goes online any more.
            MemEvent::GoingOnline if broken => return NotifyAnswer::Bad,
            MemEvent::GoingOffline if removing => return NotifyAnswer::Bad,
            MemEvent::GoingOnline => {
                if self.g.sbm.going_online(mb).is_err() {
                    return NotifyAnswer::Bad;
                }
            }
            MemEvent::Online => {
                if let Err(s) = self.g.sbm.online(mb, movable) {
                    fail!(
                        self,
                        "dev_err: memory block {mb} went online while {}",
                        s.name()
                    );
                }
                if self.g.waiting_for_online {
                    self.g.waiting_for_online = false;
                    self.queue_work(0);
                }
            }
            MemEvent::CancelOnline => self.g.sbm.cancel_online(mb),
            MemEvent::GoingOffline => {
                if self.g.sbm.going_offline(mb).is_err() {
                    return NotifyAnswer::Bad;
                }
                let runs: Vec<_> = self.g.sbm.unplugged_runs(mb).collect();
                for (first, count) in runs {
                    self.pages_going_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
            }
            // Core mm cancels for every notifier, also when ours refused or was never asked
            // (an earlier one refused): only undo what our GOING_OFFLINE did.
            MemEvent::CancelOffline
                if !(self.g.sbm.in_transition(mb) && self.g.sbm.state(mb).is_online()) => {}
            MemEvent::CancelOffline => {
                let runs: Vec<_> = self.g.sbm.unplugged_runs(mb).collect();
                for (first, count) in runs {
                    self.pages_cancel_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
                self.g.sbm.cancel_offline(mb);
            }
            MemEvent::Offline => {
                if let Err(s) = self.g.sbm.offline(mb) {
                    fail!(
                        self,
                        "dev_err: memory block {mb} went offline while {}",
                        s.name()
                    );
                }
            }
        }
        NotifyAnswer::Ok
    }

    /// `VirtioMem::online_pages`.
    fn online_pages(&mut self, pfn: u64, mut order: u32) {
        let shift = self.page_shift;
        let sb_order = self.geo.sb_shift() - shift;
        let end = (pfn + (1 << order)) << shift;
        let mut addr = pfn << shift;
        while addr < end {
            let size = 1 << (shift + order);
            let online = match self.geo.mb_of(addr, size) {
                Some(mb) => {
                    let (first, count) = self.geo.sb_span(mb, addr, size);
                    match self.g.sbm.plugged(mb, first, count) {
                        Plugged::All => true,
                        Plugged::None => false,
                        Plugged::Mixed => {
                            self.stats.mixed_chunk += 1;
                            order = sb_order;
                            continue;
                        }
                    }
                }
                None => false,
            };
            if online {
                self.pages_online(addr >> shift, order);
            } else {
                self.pages_keep_fake_offline(addr >> shift, 1 << order);
            }
            addr += size;
        }
    }
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
    ]
}

fn case() -> impl Strategy<Value = Case> {
    case_with(1..60)
}

fn case_with(len: std::ops::Range<usize>) -> impl Strategy<Value = Case> {
    let geometry = (
        27u32..=30,
        1u32..=4,
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
        },
    )
}

fn play(case: &Case, faults: Faults) -> Stats {
    let mut w = World::new(case, faults);
    w.check("at probe");
    for op in &case.ops {
        w.apply(op);
    }
    if let Some(p) = w.pending {
        panic!("pending transition left: {p:?}");
    }
    w.converge(case.final_requested, case.udev_onlines);
    w.stats.cases = 1;
    w.stats
}

/// Runs `cases` random cases and prints how many were actually run (`generated cases: N`,
/// summed up by `vm-scripts/test-all`; shown with `cargo test -- --show-output`).
fn run_model(name: &str, cases: u32, faults: Faults, len: std::ops::Range<usize>) -> Stats {
    let total = RefCell::new(Stats::default());
    let run = AtomicU64::new(0);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case_with(len), |case| {
        run.fetch_add(1, Ordering::Relaxed);
        let stats = play(&case, faults);
        total.borrow_mut().add(&stats);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!("{name}: generated cases: {}", run.into_inner());
    total.into_inner()
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
/// pinned pages, `unplug_online` changes and torn config reads; each followed by
/// convergence without faults. Also checks that every interesting path was taken.
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
    let faults = Faults {
        error: true,
        invalid: true,
        strict_unknown: true,
    };
    let stats = run_model(
        "unknown_device_state_never_reaches_the_buddy",
        2_500,
        faults,
        1..60,
    );
    report(&stats, &[]);
}

// ---- the bugs found, one directed case each ---------------------------------------------
//
// Each failed while its bug was there; all are fixed and run in every `cargo test` as
// regression tests. Fixed in 64328f7: an unplug with nothing done relabelled a full block
// as partial; CANCEL_OFFLINE without our GOING_OFFLINE took back references never dropped;
// a partly undone add kept the undone subblocks marked plugged; a stale NACK stopped
// plugging for good; the undo UNPLUG was sent after ERROR; a block of a broken device
// (state unknown) could be onlined. Fixed later: a block left plugged but not added was
// never unplugged; a BUSY device did not end the round on the online unplug path. Until
// a bug is fixed, its test is `#[ignore]`d and the random tests tolerate it.

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
    }
}

/// A world after its first run.
fn booted(case: Case) -> World {
    let faults = Faults {
        error: true,
        invalid: true,
        strict_unknown: true,
    };
    let mut w = World::new(&case, faults);
    w.trace_cap = 1000;
    w.wake(vec![]);
    w
}

/// Regression test (fixed in 64328f7): `sbm.unplugged(mb, first, 0)`, called by
/// `device.rs` after a BUSY or NACK with nothing done, turned a fully plugged block's
/// state into the partial one (sbm.rs `unplugged` set the partial state whatever `count`).
#[test]
fn unplugged_with_nothing_done_relabels_a_full_block() {
    let mut w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    assert_eq!(w.g.sbm.state(0), MbState::Offline);
    w.resize_to(0);
    // UNPLUG answered BUSY: nothing unplugged, block 0 stays offline (not partial).
    w.wake(vec![200]);
    assert_eq!(w.stats.busy, 1);
    assert_eq!(w.g.sbm.state(0), MbState::Offline);
}

/// Regression test (fixed in 64328f7): another memory notifier refuses
/// MEM_GOING_OFFLINE before ours: core mm sends MEM_CANCEL_OFFLINE to every notifier
/// (mm/memory_hotplug.c, offline_pages()), and `memory_event` took back references to
/// fake-offline pages it never dropped. The C driver ignores a CANCEL without its GOING
/// event (`hotplug_active`). (`pages_cancel_offline` fails on a reference held twice.)
#[test]
fn cancel_offline_without_going_offline_takes_references_twice() {
    let mut w = booted(Case {
        policy: Policy::Kernel,
        ..small()
    });
    w.resize_to(MB / 2);
    w.wake(vec![]);
    assert_eq!(w.g.sbm.state(0), MbState::KernelPartial);
    w.apply(&Op::Offline {
        mb: 0,
        refuse: 230,
        interleave: None,
    });
    assert_eq!(w.stats.refused_notifier, 1);
    assert_eq!(w.g.sbm.state(0), MbState::KernelPartial);
    assert!(!w.g.sbm.in_transition(0));
}

/// Regression test (fixed in 64328f7): `add_memory` fails and the undo UNPLUG, split
/// into one request per subblock, is ACKed for the first subblock and BUSY for the
/// second: `add_failed(mb, false)` left both marked plugged, while `request_sbs` had
/// already taken the first off the plugged size.
#[test]
fn partly_undone_add_keeps_unplugged_subblocks_marked() {
    let mut w = booted(Case {
        bps_shift: 15,
        ..small()
    });
    w.resize_to(MB);
    // PLUG, PLUG, (lock free), add_memory fails, (lock free), UNPLUG ACK, UNPLUG BUSY.
    w.wake(vec![0, 0, 0, 215, 0, 0, 200]);
    assert_eq!(w.stats.add_undo_incomplete, 1);
    assert_eq!(w.g.sbm.state(0), MbState::Plugged);
    assert_eq!(w.g.sbm.plugged(0, 0, 1), Plugged::None);
    assert_eq!(w.g.sbm.plugged(0, 1, 1), Plugged::All);
    assert_eq!(w.g.plugged, MB / 2);
}

/// Regression test: `add_memory` fails and so does the undo UNPLUG (BUSY): the block was
/// left `Plugged`, which neither `next_unplug` nor anything else looked at again. Its
/// memory stayed plugged whatever the requested size; the worker retried every 300 s in
/// vain. Now such blocks are unplugged at the start of every round, as the C driver does
/// (`virtio_mem_cleanup_pending_mb`).
#[test]
fn plugged_block_is_never_unplugged() {
    let mut w = booted(small());
    w.resize_to(MB);
    // PLUG, (lock free), add_memory fails, (lock free), UNPLUG BUSY.
    w.wake(vec![0, 0, 215, 0, 200]);
    assert_eq!(w.g.sbm.state(0), MbState::Plugged);
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
    let mut w = booted(Case {
        policy: Policy::Kernel,
        ..small()
    });
    w.resize_to(2 * MB);
    let zero = w.sel(0);
    // PLUG block 0, (lock free), add_memory, (lock free), then the operator sets 0
    // while block 1's PLUG is in flight: QEMU NACKs it.
    w.wake(vec![0, 0, 0, 0, 237, zero]);
    assert_eq!(w.g.nacked_at, Some(2 * MB));
    let full = w.sel(2 * MB);
    w.converge(full, false);
    assert_eq!(w.g.plugged, 2 * MB);
    assert_eq!(w.g.nacked_at, None);
}

/// Regression test (fixed in 64328f7): a new block's PLUG, one request per subblock, is
/// ACKed for the first subblock and answered ERROR for the second: the driver marks the
/// device broken, adds the block anyway and, when adding failed, sent the undo UNPLUG to
/// the broken device. (`chan_request` fails on any request after ERROR.)
#[test]
fn request_sent_after_error_when_adding_fails() {
    let mut w = booted(Case {
        bps_shift: 15,
        ..small()
    });
    w.resize_to(MB);
    // PLUG ACK, PLUG ERROR, (lock free), add_memory fails.
    w.wake(vec![0, 225, 0, 215]);
    assert!(w.g.broken);
    assert_eq!(w.stats.add_fail, 1);
    assert_eq!(w.stats.requests, 2);
    assert_eq!(w.g.sbm.state(0), MbState::Plugged);
}

/// Regression test (fixed in 64328f7): an offline block's UNPLUG times out after QEMU
/// did it: the driver marks the device broken but keeps the subblocks marked plugged,
/// and onlining the block (user space, udev) handed memory the device has unplugged to
/// the buddy. The same happened after an invalid answer, when the device's state is
/// unknown. Now GOING_ONLINE is refused once the device is broken.
#[test]
fn onlining_after_a_lost_unplug_hands_unplugged_memory_to_the_buddy() {
    let mut w = booted(small());
    w.resize_to(MB);
    w.wake(vec![]);
    w.resize_to(0);
    // UNPLUG done by the device, answer lost.
    w.wake(vec![234]);
    assert!(w.g.broken);
    w.apply(&Op::Online {
        mb: 0,
        movable: false,
        refuse: 0,
        interleave: None,
    });
    assert_eq!(w.blocks[0].online, None);
    assert_eq!(w.g.sbm.state(0), MbState::Offline);
    assert!(!w.g.sbm.in_transition(0));
}

/// Regression test (not a safety bug): in an online block, a BUSY device did not end the
/// round (BUSY mapped to `RetryLater` like busy memory), so the cursor went on with every
/// smaller run, each migrated with alloc_contig_range, sent, answered BUSY and given back;
/// then the next block. Now `Stop::Busy` ends the round, as on offline blocks.
#[test]
fn busy_device_ends_the_round_on_the_online_path() {
    let mut w = booted(Case {
        policy: Policy::Kernel,
        sbs_shift: 3,
        ..small()
    });
    w.resize_to(MB);
    w.wake(vec![]);
    w.resize_to(0);
    // Every alloc_contig_range succeeds, every UNPLUG is answered BUSY.
    w.wake([0u8, 200].repeat(100));
    assert_eq!(
        w.stats.busy, 1,
        "{} UNPLUGs answered BUSY in one round",
        w.stats.busy
    );
}
