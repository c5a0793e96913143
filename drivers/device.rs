// SPDX-License-Identifier: GPL-2.0

//! One virtio-mem device: its validated geometry, its state behind one mutex, the worker
//! that follows the requested size, and the answers to core mm's memory notifier and
//! online page callback, to system sleep (freeze, restore, the PM notifier) and, in a crash
//! kernel, to `/proc/vmcore` (which of the region's memory is RAM to dump).
//!
//! The mode is chosen at probe and never changes: each mode's plug, unplug, memory notifier
//! and online page callback live in their own file (`device_sbm.rs`, `device_bbm.rs`), on
//! their own state, which only they can reach.
//!
//! # Locking
//!
//! `inner` is taken by the worker, the memory notifier and the online page callback. Core
//! mm calls the latter two with the memory hotplug lock held, so the worker never holds
//! `inner` while it calls into memory hotplug (`add_memory`, `offline_and_remove`): it
//! drops the lock around it ([`unlocked`]). The worker does hold it across device
//! requests, which are bounded by a timeout.

#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
use crate::{bbm::Bbm, sbm::Sbm};
use crate::{
    config::{BbmSizeIgnored, ConfigError, Geometry, ModeKind, Sizes},
    headroom::{self, MemInfo, Say, Stall},
    platform::{Platform, Transport},
    protocol::{
        self, BadResponse, BlockState, RequestType, Response, StateAnswer, RESPONSE_POISON,
        RESPONSE_SIZE,
    },
    retry::{self, Backoff},
    status::{self, Answer, Attr, Blocked, Counters, Fixed, Snapshot, State, Usage},
};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
use kernel::alloc::KVVec;
use kernel::{
    device::Device,
    new_mutex,
    prelude::*,
    str::CStr,
    sync::aref::ARef,
    sync::{Arc, Mutex, MutexGuard},
};

/// How long the worker waits for the device to answer one request.
const REQUEST_TIMEOUT_MS: u32 = 30_000;
/// Tries of `alloc_contig_range` for one range: ZONE_MOVABLE promises more, so more.
const FAKE_OFFLINE_TRIES_MOVABLE: u32 = 5;
#[path = "device_bbm.rs"]
mod bbm_worker;
#[path = "device_sbm.rs"]
mod sbm_worker;

use bbm_worker::BbmState;
use sbm_worker::SbmState;

/// Stop adding memory while at least this much is added but offline (or two blocks).
const OFFLINE_THRESHOLD: u64 = 1 << 30;
/// How long added memory may stay offline before the operator is told nothing onlines it.
const ONLINE_GRACE_MS: u64 = 5_000;

/// Memory notifier events, as the glue passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemEvent {
    GoingOnline,
    Online,
    CancelOnline,
    GoingOffline,
    Offline,
    CancelOffline,
}

/// Memory notifier answers, as the glue expects them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum NotifyAnswer {
    Ok = 0,
    Bad = 1,
    Done = 2,
}

/// PM notifier events, as the glue passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PmEvent {
    /// `PM_HIBERNATION_PREPARE`: an image of memory is about to be written.
    HibernationPrepare,
    /// `PM_RESTORE_PREPARE`: an image is about to be read back over memory.
    RestorePrepare,
    /// Any other event (suspend, and the ends of each).
    Other,
}

/// The device's state behind its lock, by mode: each mode's bookkeeping is reachable only
/// through its own variant, so Sub Block Mode data cannot be touched in Big Block Mode.
enum Locked<T> {
    Sbm(Pin<KBox<Mutex<Inner<T, SbmState>>>>),
    Bbm(Pin<KBox<Mutex<Inner<T, BbmState>>>>),
}

/// Runs `$body` with `$g` (`&mut Inner<_, _>`) the device's locked state, whatever its
/// mode: for what both modes share.
macro_rules! with_inner {
    ($self:expr, |$g:ident| $body:expr) => {
        match &$self.inner {
            Locked::Sbm(m) => {
                let mut guard = m.lock();
                let $g = &mut *guard;
                $body
            }
            Locked::Bbm(m) => {
                let mut guard = m.lock();
                let $g = &mut *guard;
                $body
            }
        }
    };
}

/// The locked state of a device on platform `P` in mode `M`.
type Guard<'a, P, M> = MutexGuard<'a, Inner<<P as Platform>::Transport, M>>;

/// Runs `f` with the lock dropped (core mm calls back into the memory notifier and the
/// online page callback while it adds or removes memory), then takes it again.
fn unlocked<'a, T, R>(g: MutexGuard<'a, T>, f: impl FnOnce() -> R) -> (MutexGuard<'a, T>, R) {
    let lock = g.lock_ref();
    drop(g);
    let r = f();
    (lock.lock(), r)
}

/// What a round of the worker asks of a mode (implemented for each mode's state in
/// `device_sbm.rs` and `device_bbm.rs`).
trait Worker<P: Platform>: Sized + Unpin {
    /// Gives back what is plugged but not added (adding failed, and so did the undo),
    /// whatever the requested size.
    fn unplug_pending(vm: &VirtioMem<P>, g: &mut Inner<P::Transport, Self>) -> Result<(), Stop>;
    /// Tries again to remove what was emptied but could not be removed. `true` if none is
    /// left.
    fn remove_leftovers<'a>(
        vm: &'a VirtioMem<P>,
        g: Guard<'a, P, Self>,
    ) -> (Guard<'a, P, Self>, bool);
    /// Plugs and adds `diff` bytes (as much of it as whole units allow).
    fn plug<'a>(
        vm: &'a VirtioMem<P>,
        g: Guard<'a, P, Self>,
        diff: u64,
    ) -> (Guard<'a, P, Self>, Result<(), Stop>);
    /// Unplugs (and removes) `diff` bytes (as much of it as whole units allow).
    fn unplug<'a>(
        vm: &'a VirtioMem<P>,
        g: Guard<'a, P, Self>,
        diff: u64,
    ) -> (Guard<'a, P, Self>, Result<(), Stop>);
    /// The end address of the highest plugged memory, if any is plugged.
    fn plugged_end(&self, geo: &Geometry) -> Option<u64>;
    /// How the plugged memory is used (online, offline, movable), from the bookkeeping.
    fn usage(&self, geo: &Geometry) -> Usage;
    /// Units (memory blocks, big blocks) added to Linux with nothing of them online.
    fn added_offline(&self) -> usize;
    /// One line per unit that is not unused: address, state, zone, what is plugged.
    fn write_blocks(&self, geo: &Geometry, w: &mut impl Write) -> fmt::Result;
    /// The usable region is now its first `usable` bytes.
    fn set_usable(&mut self, geo: &Geometry, usable: u64);
}

/// Why the worker stopped before reaching the requested size.
enum Stop {
    /// The config changed meanwhile: start over with the new sizes.
    Again,
    /// The device refused to plug more (NACK): wait for the next config change.
    Nack,
    /// Memory could not be freed or removed, or adding failed: retry later.
    RetryLater,
    /// The device answered BUSY (or NACK to an unplug): nothing more this round.
    Busy,
    /// The guest needs its memory (see `headroom.rs`): taking more online memory would
    /// leave it less than its margin. Retry soon.
    Pressure(MemInfo),
    /// Too much memory is added but not online: wait until it is onlined.
    WaitForOnline,
    /// Every usable memory block is in use.
    NoRoom,
    /// The device answered ERROR, an invalid response or nothing: stop for good.
    Broken,
    /// The worker is asked to freeze (system sleep), or the device is frozen: stop
    /// between requests, and go on after the thaw.
    Freezing,
}

impl Stop {
    /// Why a round stopped, for its trace event.
    fn name(&self) -> &'static CStr {
        match self {
            Self::Again => c"config_changed",
            Self::Nack => c"nack",
            Self::RetryLater => c"retry_later",
            Self::Busy => c"busy",
            Self::Pressure(_) => c"guest_needs_memory",
            Self::WaitForOnline => c"wait_for_online",
            Self::NoRoom => c"no_room",
            Self::Broken => c"broken",
            Self::Freezing => c"freezing",
        }
    }
}

struct Inner<T, M> {
    chan: T,
    /// The response buffer, poisoned before each request.
    resp: [u8; RESPONSE_SIZE as usize],
    /// The mode's bookkeeping.
    mode: M,
    /// The last valid sizes the device reported.
    sizes: Sizes,
    /// What this driver has plugged (the device's `plugged_size` is only compared to it).
    plugged: u64,
    /// The plugged size of the device's last valid config (read at the start and the end of
    /// each round), for the operator.
    device_plugged: u64,
    /// Memory was plugged at probe: UNPLUG_ALL before anything else.
    unplug_all_required: bool,
    broken: bool,
    /// The memory block (Sub Block Mode) or big block (Big Block Mode) of the request that
    /// got no valid answer (which made the device broken): what the device did with it is
    /// unknown.
    unknown_mb: Option<usize>,
    removing: bool,
    /// `remove` has begun: nothing is published any more (its removals leave memory
    /// plugged that no bookkeeping shows).
    going_away: bool,
    backoff: Backoff,
    waiting_for_online: bool,
    /// The requested size the device NACKed a plug at: no new try until it changes.
    nacked_at: Option<u64>,
    /// A range (pfn, pages) the last unplug round could not free, for the log.
    last_busy: Option<(u64, u64)>,
    /// Rounds stopped in a row because the guest needs its memory.
    stall: Stall,
    /// What the guest had when the last round stopped because it needs its memory; `None`
    /// once a round ends otherwise.
    pressure: Option<MemInfo>,
    /// Between freeze and restore: the device is reset and has no queue, no request may
    /// be sent.
    frozen: bool,
    /// In a crash kernel: the last range asked with STATE (its start) and whether it is
    /// RAM. Reads of `/proc/vmcore` go page by page.
    last_state: Option<(u64, bool)>,
    /// What the driver is doing, what stood in its way last, and its counters: published
    /// with the sizes as a [`Snapshot`].
    state: State,
    blocked: Blocked,
    counters: Counters,
    /// When the next round is due (the platform's clock, ms), if a retry is scheduled.
    retry_at_ms: Option<u64>,
    /// Since when memory is added but offline (ms), and whether the operator was told.
    offline_since_ms: Option<u64>,
    offline_told: bool,
}

impl<T, M> Inner<T, M> {
    fn new(chan: T, mode: M, sizes: Sizes, unplug_all_required: bool) -> Self {
        Self {
            chan,
            resp: RESPONSE_POISON,
            mode,
            sizes,
            plugged: 0,
            device_plugged: sizes.plugged,
            unplug_all_required,
            broken: false,
            unknown_mb: None,
            removing: false,
            going_away: false,
            backoff: Backoff::new(),
            waiting_for_online: false,
            nacked_at: None,
            last_busy: None,
            stall: Stall::default(),
            pressure: None,
            frozen: false,
            last_state: None,
            state: State::Idle,
            blocked: Blocked::None,
            counters: Counters::default(),
            retry_at_ms: None,
            offline_since_ms: None,
            offline_told: false,
        }
    }
}

/// One virtio-mem device, on platform `P` (the glue, or a mock in the KUnit suites).
pub(crate) struct VirtioMem<P: Platform> {
    dev: ARef<Device>,
    platform: P,
    geo: Geometry,
    /// log2 of the page size.
    page_shift: u32,
    nid: i32,
    /// Stop adding memory while this many memory blocks (Sub Block Mode) or big blocks
    /// (Big Block Mode) are added but offline.
    offline_threshold: usize,
    /// A crash kernel (`is_kdump_kernel()`): nothing is plugged, unplugged or added; the
    /// device is only asked what is plugged.
    kdump: bool,
    /// Set by the config change callback (any context), consumed by the worker.
    config_changed: AtomicBool,
    inner: Locked<P::Transport>,
    /// The geometry as the sysfs attributes show it.
    fixed: Fixed,
    /// The last published state (see `status.rs`): taken by readers, and by the worker only
    /// to replace it, never across a request.
    snapshot: Pin<KBox<Mutex<Snapshot>>>,
}

/// The state the tests check, as [`VirtioMem::view`] shows it.
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
// Not `expect`: the host tests read every field, KUnit only some.
#[allow(dead_code)]
pub(crate) struct View<'a> {
    /// The mode's bookkeeping: one of the two.
    pub(crate) sbm: Option<&'a Sbm<KVVec<u64>>>,
    pub(crate) bbm: Option<&'a Bbm<KVVec<u64>>>,
    pub(crate) plugged: u64,
    /// The requested size of the last valid config.
    pub(crate) requested: u64,
    pub(crate) broken: bool,
    pub(crate) unplug_all_required: bool,
    pub(crate) waiting_for_online: bool,
    pub(crate) nacked_at: Option<u64>,
    pub(crate) frozen: bool,
    /// The device is going away (`remove` has begun).
    pub(crate) going_away: bool,
}

/// How a stop while unplugging is handled: the device does not NACK an unplug, so a NACK
/// there is retried like BUSY.
fn unplug_stop(stop: Stop) -> Stop {
    match stop {
        Stop::Nack => Stop::Busy,
        s => s,
    }
}

/// Turns a refused config field into a log line and `EINVAL`.
fn config_err(dev: &Device, e: ConfigError) -> Error {
    dev_err!(
        dev,
        "invalid device config: {} = {:#x} {}\n",
        e.field,
        e.value,
        e.reason
    );
    EINVAL
}

impl<P: Platform> VirtioMem<P> {
    /// Reads and validates the config, allocates the state. Nothing is registered yet.
    pub(crate) fn new(platform: P, mut chan: P::Transport, dev: ARef<Device>) -> Result<Arc<Self>> {
        let kdump = platform.is_kdump_kernel();
        if kdump && !platform.has_vmcore() {
            // Nothing would keep /proc/vmcore from reading unplugged memory (the C driver
            // refuses the same way).
            dev_err!(
                dev,
                "crash kernel without /proc/vmcore support (CONFIG_PROC_VMCORE): device \
                 refused, its memory left as it is\n"
            );
            return Err(EBUSY);
        }
        let raw = chan.read_config();
        let limits = platform.mm_limits();
        let params = platform.mode_params();
        let geo = Geometry::new(&raw, &limits, &params).map_err(|e| config_err(&dev, e))?;
        let sizes = Sizes::new(&raw, &geo).map_err(|e| config_err(&dev, e))?;
        let nid = platform.node(raw.node_id, geo.addr);
        if let Some(why) = geo.bbm_size_ignored {
            dev_warn!(
                dev,
                "bbm_block_size={:#x} ignored: {}; using {:#x}\n",
                params.bbm_block_size,
                match why {
                    BbmSizeIgnored::NotPowerOfTwo => "not a power of two",
                    BbmSizeIgnored::TooSmall => "smaller than the device block or memory block",
                },
                geo.bb_size
            );
        }
        let unit = match geo.mode {
            ModeKind::Sbm => geo.subblock_size,
            ModeKind::Bbm => geo.bb_size,
        };
        dev_info!(
            dev,
            "address {:#x}, region {:#x} (usable {:#x}), device block {:#x}, {} {:#x}, \
             memory block {:#x}, node {}{}, {}\n",
            geo.addr,
            geo.region_size,
            sizes.usable,
            geo.device_block_size,
            match geo.mode {
                ModeKind::Sbm => "subblock",
                ModeKind::Bbm => "big block",
            },
            unit,
            geo.memory_block_size,
            nid,
            if platform.has_acpi_pxm() {
                " (ACPI PXM)"
            } else {
                ""
            },
            geo.mode.name()
        );
        if !kdump && platform.auto_online() == Some(false) {
            dev_warn!(
                dev,
                "memhp_default_state=offline: memory this device adds stays offline until user \
                 space onlines it (udev: /sys/devices/system/memory/memoryN/state); boot with \
                 memhp_default_state=online (or online_movable), or build with \
                 CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO\n"
            );
        }
        if geo.mode == ModeKind::Bbm && geo.outside_bbs() != 0 {
            dev_warn!(
                dev,
                "{:#x} of the region lies outside whole big blocks of {:#x} and stays unused\n",
                geo.outside_bbs(),
                geo.bb_size
            );
        }
        // In a crash kernel the plugged memory is the crashed kernel's, to be dumped.
        let unplug_all_required = sizes.plugged != 0 && !kdump;
        if kdump {
            dev_info!(
                dev,
                "crash kernel: memory hot(un)plug disabled, {:#x} stays plugged; /proc/vmcore \
                 reads only what the device says is plugged\n",
                sizes.plugged
            );
        } else if unplug_all_required {
            dev_info!(
                dev,
                "{:#x} is plugged at probe: unplugging all memory first\n",
                sizes.plugged
            );
        }
        let offline_threshold =
            (OFFLINE_THRESHOLD >> unit.max(geo.memory_block_size).trailing_zeros()).max(2) as usize;
        let inner = match geo.mode {
            ModeKind::Sbm => Locked::Sbm(KBox::pin_init(
                new_mutex!(
                    Inner::new(
                        chan,
                        sbm_worker::new_state(&dev, &geo, sizes.usable)?,
                        sizes,
                        unplug_all_required
                    ),
                    "VirtioMem::inner"
                ),
                GFP_KERNEL,
            )?),
            ModeKind::Bbm => Locked::Bbm(KBox::pin_init(
                new_mutex!(
                    Inner::new(
                        chan,
                        bbm_worker::new_state(&dev, &geo, sizes.usable)?,
                        sizes,
                        unplug_all_required
                    ),
                    "VirtioMem::inner"
                ),
                GFP_KERNEL,
            )?),
        };
        let fixed = Fixed {
            region_start: geo.addr,
            region_size: geo.region_size,
            block_size: geo.device_block_size,
            subblock_size: unit,
            memory_block_size: geo.memory_block_size,
            mode: geo.mode.name(),
            node: nid,
        };
        let snapshot = Snapshot {
            state: if kdump { State::Kdump } else { State::Idle },
            requested: sizes.requested,
            usable: sizes.usable,
            plugged: 0,
            device_plugged: sizes.plugged,
            usage: Usage {
                offline: if kdump { sizes.plugged } else { 0 },
                ..Usage::default()
            },
            ..Snapshot::default()
        };
        let snapshot = KBox::pin_init(new_mutex!(snapshot, "VirtioMem::snapshot"), GFP_KERNEL)?;
        Ok(Arc::new(
            Self {
                dev,
                platform,
                geo,
                page_shift: limits.page_size.trailing_zeros(),
                nid,
                offline_threshold,
                kdump,
                config_changed: AtomicBool::new(true),
                inner,
                fixed,
                snapshot,
            },
            GFP_KERNEL,
        )?)
    }

    /// The platform the device runs on.
    pub(crate) fn platform(&self) -> &P {
        &self.platform
    }

    /// Publishes the state under the lock `g` as the snapshot readers see (`status.rs`).
    /// Called wherever the worker's bookkeeping agrees with its counters: before the lock
    /// is dropped, and at the end of a round or a notifier event.
    fn publish<M: Worker<P>>(&self, g: &Inner<P::Transport, M>) {
        if g.going_away {
            return;
        }
        let s = Snapshot {
            state: g.state,
            requested: g.sizes.requested,
            usable: g.sizes.usable,
            plugged: g.plugged,
            device_plugged: g.device_plugged,
            usage: g.mode.usage(&self.geo),
            failed_rounds: g.backoff.failed_rounds(),
            retry_at_ms: g.retry_at_ms,
            blocked: g.blocked,
            counters: g.counters,
        };
        *self.snapshot.lock() = s;
    }

    /// The last published state (never waits for a device request).
    pub(crate) fn snapshot(&self) -> Snapshot {
        *self.snapshot.lock()
    }

    /// Writes sysfs attribute `attr` of the last published state.
    pub(crate) fn show(&self, attr: Attr, w: &mut impl Write) -> fmt::Result {
        status::show(attr, &self.fixed, &self.snapshot(), self.now_ms(), w)
    }

    /// Every attribute of the last published state, `name: value` per line (debugfs
    /// `status`).
    pub(crate) fn write_status(&self, w: &mut impl Write) -> fmt::Result {
        status::show_all(&self.fixed, &self.snapshot(), self.now_ms(), w)
    }

    /// One line per memory block (Sub Block Mode) or big block (Big Block Mode) that is
    /// not unused (debugfs `blocks`). Takes the worker's lock: may wait for a request.
    pub(crate) fn write_blocks(&self, w: &mut impl Write) -> fmt::Result {
        match &self.inner {
            Locked::Sbm(m) => Worker::<P>::write_blocks(&m.lock().mode, &self.geo, w),
            Locked::Bbm(m) => Worker::<P>::write_blocks(&m.lock().mode, &self.geo, w),
        }
    }

    /// The retry schedule (debugfs `retry`), from the last published state.
    pub(crate) fn write_retry(&self, w: &mut impl Write) -> fmt::Result {
        let s = self.snapshot();
        writeln!(w, "failed_rounds: {}", s.failed_rounds)?;
        write!(w, "next_retry_ms: ")?;
        status::show(Attr::NextRetryMs, &self.fixed, &s, self.now_ms(), w)?;
        writeln!(
            w,
            "schedule: from {} ms, doubling up to {} ms; guest short of memory: every {} ms at \
             most; slab dropped from failed round {} on",
            retry::MIN_MS,
            retry::MAX_MS,
            headroom::POLL_MS,
            retry::DROP_SLAB_AFTER
        )
    }

    /// Runs `hotplug` (adding or removing memory) with the lock dropped, the state
    /// published first: core mm calls back into the memory notifier meanwhile.
    fn hotplug_unlocked<'a, M: Worker<P>>(
        &'a self,
        g: Guard<'a, P, M>,
        hotplug: impl FnOnce(&P) -> Result,
    ) -> (Guard<'a, P, M>, Result) {
        self.publish(&g);
        unlocked(g, || hotplug(&self.platform))
    }

    /// Adds memory `addr .. addr + size` (see [`Self::hotplug_unlocked`]) and counts its
    /// memory blocks if that worked.
    fn add_unlocked<'a, M: Worker<P>>(
        &'a self,
        g: Guard<'a, P, M>,
        addr: u64,
        size: u64,
    ) -> (Guard<'a, P, M>, Result) {
        let (mut g, res) = self.hotplug_unlocked(g, |p| p.add_memory(addr, size));
        if res.is_ok() {
            g.counters.memory_blocks_added += size / self.geo.memory_block_size;
        }
        (g, res)
    }

    /// Offlines and removes memory `addr .. addr + size` (see [`Self::hotplug_unlocked`]):
    /// counts its memory blocks if that worked, names it in `blocked_by` if not.
    fn remove_unlocked<'a, M: Worker<P>>(
        &'a self,
        g: Guard<'a, P, M>,
        addr: u64,
        size: u64,
    ) -> (Guard<'a, P, M>, Result) {
        let (mut g, res) = self.hotplug_unlocked(g, |p| p.offline_and_remove(addr, size));
        match res {
            Ok(()) => g.counters.memory_blocks_removed += size / self.geo.memory_block_size,
            Err(_) => {
                g.blocked = Blocked::Removal {
                    start: addr,
                    end: addr + size,
                }
            }
        }
        (g, res)
    }

    /// Takes the region for Linux: resource, memory group, notifier, online page callback.
    /// Not in a crash kernel, which adds none of the region's memory.
    pub(crate) fn start(&self) -> Result {
        if self.kdump {
            return Ok(());
        }
        let g = &self.geo;
        self.platform
            // The memory group's unit: the big block (a memory block in Sub Block Mode).
            .hotplug_init(g.addr, g.region_size, self.nid, g.bb_size)
            .inspect_err(|e| {
                dev_err!(
                    self.dev,
                    "cannot set up memory hotplug for {:#x}..{:#x}: {:?}\n",
                    g.addr,
                    g.addr + g.region_size - 1,
                    e
                )
            })
    }

    /// The config changed. May run in interrupt context: only note it (the glue queues
    /// the worker, which ignores it in a crash kernel).
    pub(crate) fn config_changed(&self) {
        self.config_changed.store(true, Ordering::Release);
    }

    /// System sleep begins (the virtio core's `freeze`). The worker is frozen already or
    /// holds no request (it sends one only under the lock taken here). With memory plugged,
    /// sleep is refused (`EPERM`, as the C driver) unless the device keeps it
    /// (`VIRTIO_MEM_F_PERSISTENT_SUSPEND`) or the guest only idles (`to_idle`: nothing is
    /// reset). Otherwise no request is sent until [`Self::restore`]: the glue resets the
    /// device and deletes its queue next.
    pub(crate) fn freeze(&self, to_idle: bool) -> Result {
        with_inner!(self, |g| self.freeze_locked(g, to_idle))
    }

    fn freeze_locked<M>(&self, g: &mut Inner<P::Transport, M>, to_idle: bool) -> Result {
        // What the device may hold: what this driver plugged, what was plugged before it
        // came (not unplugged yet, or the crashed kernel's), what a request without a valid
        // answer may have plugged.
        let plugged = g.plugged != 0
            || g.unplug_all_required
            || g.unknown_mb.is_some()
            || (self.kdump && g.sizes.plugged != 0);
        if plugged && !to_idle && !self.platform.has_persistent_suspend() {
            let held = if g.unplug_all_required || self.kdump {
                g.sizes.plugged
            } else {
                g.plugged
            };
            dev_err!(
                self.dev,
                "suspending with plugged memory is not supported: {:#x} plugged{}, and the \
                 device does not keep it while suspended (no VIRTIO_MEM_F_PERSISTENT_SUSPEND); \
                 suspend refused\n",
                held,
                if g.unknown_mb.is_some() {
                    " (more of unknown state)"
                } else {
                    ""
                }
            );
            return Err(EPERM);
        }
        g.frozen = true;
        g.last_state = None;
        if !self.kdump {
            g.state = State::Suspended;
            self.snapshot.lock().state = State::Suspended;
        }
        Ok(())
    }

    /// System sleep ends (the virtio core's `restore`): the glue has a new queue and the
    /// device is ready. The next round re-reads the config and follows it (the glue kicks
    /// the worker).
    pub(crate) fn restore(&self) {
        with_inner!(self, |g| {
            g.frozen = false;
            g.last_state = None;
            if !self.kdump {
                // The round the glue kicks says what it does.
                g.state = State::Idle;
                self.snapshot.lock().state = State::Idle;
            }
        });
        self.config_changed();
    }

    /// The PM notifier: hibernation, and restoring a hibernation image, are refused while
    /// the driver has a device. The image would be written back over memory the device may
    /// no longer have plugged (a reset of the machine unplugs all of it).
    pub(crate) fn pm_event(&self, event: PmEvent) -> NotifyAnswer {
        let what = match event {
            PmEvent::HibernationPrepare => "hibernation",
            PmEvent::RestorePrepare => "restoring a hibernation image",
            PmEvent::Other => return NotifyAnswer::Ok,
        };
        dev_err!(
            self.dev,
            "hibernation is not supported with a virtio-mem device: {} refused\n",
            what
        );
        NotifyAnswer::Bad
    }

    /// `/proc/vmcore` in a crash kernel: whether page `pfn` is RAM to read. A page outside
    /// the region is not this driver's to judge (`true`); inside, only memory the device
    /// says is plugged is RAM, asked with a STATE request per device block (or page, if
    /// larger). The last answer is kept: reads go page by page. No valid answer (ERROR,
    /// an invalid answer, a timeout) means "not RAM" (zeroes in the dump) and a broken
    /// device, asked nothing more.
    pub(crate) fn pfn_is_ram(&self, pfn: u64) -> bool {
        let geo = &self.geo;
        let Some(addr) = pfn.checked_mul(1 << self.page_shift) else {
            return true;
        };
        if !self.kdump || addr < geo.addr || addr - geo.addr >= geo.region_size {
            return true;
        }
        let page = 1u64 << self.page_shift;
        let unit = geo.device_block_size.max(page);
        // The device blocks of the page (a hostile region start may not be page aligned).
        let start = (addr & !(unit - 1)).max(geo.addr);
        with_inner!(self, |g| {
            let ram = self.pfn_is_ram_locked(g, addr, start, unit);
            self.publish_kdump(g);
            ram
        })
    }

    /// [`Self::pfn_is_ram`] of the page at `addr`, whose device blocks (or the page, if
    /// larger: `unit`) start at `start`.
    fn pfn_is_ram_locked<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        addr: u64,
        start: u64,
        unit: u64,
    ) -> bool {
        let geo = &self.geo;
        let usable_end = geo.addr + g.sizes.usable;
        // Nothing plugged at probe, or beyond the usable region: unplugged.
        if g.sizes.plugged == 0 || start >= usable_end {
            return false;
        }
        if let Some((_, ram)) = g.last_state.filter(|&(cached, _)| cached == start) {
            return ram;
        }
        if g.frozen {
            return false;
        }
        let end = (addr & !(unit - 1)).saturating_add(unit).min(usable_end);
        // At most a page's worth of device blocks (a power of two: shifts, no division).
        let nb = ((end - start) >> geo.device_block_size.trailing_zeros()) as u16;
        let ram = self.state(g, start, nb) == Some(BlockState::Plugged);
        g.last_state = Some((start, ram));
        ram
    }

    /// `/proc/vmcore` in a crash kernel (`CONFIG_PROC_VMCORE_DEVICE_RAM`): hands the
    /// plugged ranges of the usable region to `add` (start, size), merged, lowest first,
    /// whole pages. Each range asked with STATE is at most a memory block (and 32768 device
    /// blocks); a MIXED one is asked again in aligned halves, down to a device block (or a
    /// page, if larger: one not wholly plugged is left out, `pfn_is_ram` would say so too).
    /// `EIO` if the device gives no valid answer (it is then broken).
    pub(crate) fn device_ram(&self, add: impl FnMut(u64, u64) -> Result) -> Result {
        with_inner!(self, |g| {
            let res = self.device_ram_locked(g, add);
            self.publish_kdump(g);
            res
        })
    }

    /// In a crash kernel: the counters of the STATE requests, and whether the device broke.
    fn publish_kdump<M>(&self, g: &Inner<P::Transport, M>) {
        let mut s = self.snapshot.lock();
        s.counters = g.counters;
        if g.broken {
            s.state = State::Broken;
        }
    }

    fn device_ram_locked<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        mut add: impl FnMut(u64, u64) -> Result,
    ) -> Result {
        let geo = &self.geo;
        if !self.kdump || g.sizes.plugged == 0 {
            return Ok(());
        }
        if g.frozen {
            return Err(EBUSY);
        }
        let bs = geo.device_block_size;
        let page = 1u64 << self.page_shift;
        let unit = bs.max(page);
        let max = geo
            .memory_block_size
            .min(bs.saturating_mul(1 << 15))
            .max(unit);
        let end = geo.addr + g.sizes.usable;
        // Whole pages of a plugged range, if any.
        let mut flush = |s: u64, e: u64| -> Result {
            let (s, e) = (s.next_multiple_of(page), e & !(page - 1));
            if s < e {
                add(s, e - s)?;
            }
            Ok(())
        };
        let mut run: Option<(u64, u64)> = None;
        let mut pos = geo.addr;
        while pos < end {
            // The largest aligned range at `pos` (from the region's start) within `end`.
            let off = pos - geo.addr;
            let mut size = if off == 0 {
                max
            } else {
                max.min(1 << off.trailing_zeros())
            };
            while size > end - pos && size > bs {
                size >>= 1;
            }
            let plugged = loop {
                let nb = (size >> bs.trailing_zeros()) as u16;
                match self.state(g, pos, nb) {
                    None => {
                        dev_err!(
                            self.dev,
                            "no plugged ranges for /proc/vmcore: the device gave no valid \
                             state of {:#x}..{:#x}\n",
                            pos,
                            pos + size - 1
                        );
                        return Err(EIO);
                    }
                    Some(BlockState::Mixed) if size > unit => size >>= 1,
                    Some(s) => break s == BlockState::Plugged,
                }
            };
            if plugged {
                run = match run {
                    Some((s, e)) if e == pos => Some((s, pos + size)),
                    Some((s, e)) => {
                        flush(s, e)?;
                        Some((pos, pos + size))
                    }
                    None => Some((pos, pos + size)),
                };
            }
            pos += size;
        }
        if let Some((s, e)) = run {
            flush(s, e)?;
        }
        Ok(())
    }

    /// The device goes away: refuse onlining and offlining from now on, and remove what
    /// can be removed (what depends on the mode). The glue has cancelled the worker
    /// already.
    pub(crate) fn remove(&self) {
        // The sysfs attributes are gone already; the snapshot stays as it was.
        with_inner!(self, |g| g.going_away = true);
        match &self.inner {
            Locked::Sbm(m) => self.sbm_remove(m.lock()),
            Locked::Bbm(m) => self.bbm_remove(m.lock()),
        }
    }

    /// The memory notifier, for a range overlapping the device's region.
    pub(crate) fn memory_event(
        &self,
        event: MemEvent,
        start: u64,
        size: u64,
        movable: bool,
    ) -> NotifyAnswer {
        match &self.inner {
            Locked::Sbm(m) => {
                let mut g = m.lock();
                let answer = self.sbm_memory_event(&mut g, event, start, size, movable);
                self.publish(&g);
                answer
            }
            Locked::Bbm(m) => {
                let mut g = m.lock();
                let answer = self.bbm_memory_event(&mut g, event, start, size, movable);
                self.publish(&g);
                answer
            }
        }
    }

    /// The online page callback: pages `pfn .. pfn + 2^order` of the region go online.
    pub(crate) fn online_pages(&self, pfn: u64, order: u32) {
        match &self.inner {
            Locked::Sbm(m) => self.sbm_online_pages(&m.lock(), pfn, order),
            Locked::Bbm(m) => self.bbm_online_pages(&m.lock(), pfn, order),
        }
    }

    /// What this driver has plugged, and whether it gave up on the device.
    #[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
    pub(crate) fn status(&self) -> (u64, bool) {
        self.view(|v| (v.plugged, v.broken))
    }

    /// Calls `f` with a look at the state, under the lock: the tests' invariants.
    #[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
    pub(crate) fn view<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        match &self.inner {
            Locked::Sbm(m) => {
                let g = m.lock();
                f(&Self::view_of(&g, Some(&g.mode), None))
            }
            Locked::Bbm(m) => {
                let g = m.lock();
                f(&Self::view_of(&g, None, Some(&g.mode.bbm)))
            }
        }
    }

    #[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
    fn view_of<'a, M>(
        g: &'a Inner<P::Transport, M>,
        sbm: Option<&'a Sbm<KVVec<u64>>>,
        bbm: Option<&'a Bbm<KVVec<u64>>>,
    ) -> View<'a> {
        View {
            sbm,
            bbm,
            plugged: g.plugged,
            requested: g.sizes.requested,
            broken: g.broken,
            unplug_all_required: g.unplug_all_required,
            waiting_for_online: g.waiting_for_online,
            nacked_at: g.nacked_at,
            frozen: g.frozen,
            going_away: g.going_away,
        }
    }

    /// What the guest had when the last round stopped because it needs its memory; `None`
    /// if the last round did not stop for that.
    #[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
    pub(crate) fn waiting_for_guest(&self) -> Option<MemInfo> {
        with_inner!(self, |g| g.pressure)
    }

    /// The worker: follows the requested size. Nothing in a crash kernel, nothing while
    /// frozen (restore kicks it again).
    pub(crate) fn run(&self) {
        if self.kdump {
            return;
        }
        match &self.inner {
            Locked::Sbm(m) => self.after_round(self.run_locked(m.lock())),
            Locked::Bbm(m) => self.after_round(self.run_locked(m.lock())),
        }
    }

    /// After a round: the plugged size the device says now (it does not announce a change
    /// of it), the state of a device given up on, and the snapshot.
    fn after_round<M: Worker<P>>(&self, mut g: Guard<'_, P, M>) {
        if !g.broken && !g.frozen {
            let raw = g.chan.read_config();
            // Only a valid config counts (an invalid one is logged by the next round).
            if let Ok(sizes) = Sizes::new(&raw, &self.geo) {
                g.device_plugged = sizes.plugged;
            }
        }
        if g.broken {
            g.state = State::Broken;
            g.retry_at_ms = None;
        } else if g.frozen {
            g.state = State::Suspended;
        }
        self.publish(&g);
    }

    /// The platform's clock in milliseconds.
    fn now_ms(&self) -> u64 {
        self.platform.now_ns() / 1_000_000
    }

    /// A round of the worker in mode `M`.
    fn run_locked<'a, M: Worker<P>>(&'a self, mut g: Guard<'a, P, M>) -> Guard<'a, P, M> {
        let start_plugged = g.plugged;
        g.blocked = Blocked::None;
        g.retry_at_ms = None;
        let result = loop {
            if g.broken || g.removing || g.frozen {
                return g;
            }
            // Checked before anything else: there may be no request to send this round.
            if self.needs_reset(&mut g) {
                return g;
            }
            if self.platform.freezing() {
                break Err(Stop::Freezing);
            }
            if g.unplug_all_required {
                match self.request(&mut g, RequestType::UnplugAll, 0, 0) {
                    Some(Response::Ack) => {
                        g.unplug_all_required = false;
                        self.config_changed.store(true, Ordering::Release);
                    }
                    Some(Response::Busy) => break Err(Stop::Busy),
                    other => {
                        self.mark_broken(&mut g, RequestType::UnplugAll, other);
                        return g;
                    }
                }
            }
            if self.config_changed.swap(false, Ordering::AcqRel) && !self.refresh(&mut g) {
                return g;
            }

            // Blocks whose adding and undoing both failed: give them back first.
            if let Err(stop) = M::unplug_pending(self, &mut g) {
                break Err(stop);
            }
            // Blocks emptied earlier whose removal failed: try again.
            let (ng, removed_all) = M::remove_leftovers(self, g);
            g = ng;

            let requested = g.sizes.requested;
            let (ng, result) = if requested > g.plugged && g.nacked_at != Some(requested) {
                let diff = requested - g.plugged;
                g.state = State::Plugging;
                M::plug(self, g, diff)
            } else if requested < g.plugged {
                let diff = g.plugged - requested;
                g.state = State::Unplugging;
                M::unplug(self, g, diff)
            } else {
                (g, Ok(()))
            };
            g = ng;
            match result {
                Err(Stop::Again) => continue,
                Ok(()) if !removed_all => break Err(Stop::RetryLater),
                r => break r,
            }
        };

        let requested = g.sizes.requested;
        self.platform.trace_round(
            requested,
            start_plugged,
            g.plugged,
            match &result {
                Ok(()) => c"done",
                Err(stop) => stop.name(),
            },
        );
        g.state = match &result {
            Ok(()) | Err(Stop::Again) => State::Idle,
            Err(Stop::Nack) => State::Refused,
            Err(Stop::RetryLater | Stop::Busy | Stop::Pressure(_)) => State::Retrying,
            Err(Stop::WaitForOnline) => State::WaitingForOnline,
            Err(Stop::NoRoom) => State::NoRoom,
            Err(Stop::Broken) => State::Broken,
            Err(Stop::Freezing) => State::Suspended,
        };
        g.blocked = match &result {
            Err(Stop::Busy) => Blocked::DeviceBusy,
            Err(Stop::Pressure(_)) => Blocked::GuestNeedsMemory,
            Err(Stop::RetryLater) => match g.last_busy {
                Some((pfn, nr)) => Blocked::Range {
                    start: pfn << self.page_shift,
                    end: (pfn + nr) << self.page_shift,
                    holder: self.platform.find_holder(pfn, nr),
                },
                // A removal that failed (set by `remove_unlocked`), or nothing known.
                None => g.blocked,
            },
            _ => Blocked::None,
        };
        if g.plugged != start_plugged {
            dev_info!(
                self.dev,
                "plugged {:#x} of requested {:#x}\n",
                g.plugged,
                requested
            );
        }
        if !matches!(result, Err(Stop::Pressure(_) | Stop::Freezing))
            && g.stall.released() == Say::Ends
        {
            g.pressure = None;
            if requested < start_plugged {
                dev_info!(
                    self.dev,
                    "guest memory available again: resuming the unplug\n"
                );
            } else {
                dev_info!(
                    self.dev,
                    "no longer waiting for the guest's memory: requested size {:#x}\n",
                    requested
                );
            }
        }
        match result {
            Ok(()) | Err(Stop::Again) => g.backoff.reset(),
            Err(Stop::Nack) => {
                g.nacked_at = Some(requested);
                dev_warn!(
                    self.dev,
                    "device refused to plug beyond {:#x} (requested {:#x}); waiting for a \
                     config change\n",
                    g.plugged,
                    requested
                );
            }
            Err(Stop::RetryLater | Stop::Busy) => {
                if g.plugged != start_plugged {
                    g.backoff.reset();
                }
                self.retry_later(&mut g)
            }
            Err(Stop::Pressure(info)) => {
                if g.plugged != start_plugged {
                    g.backoff.reset();
                }
                self.wait_for_guest(&mut g, info)
            }
            Err(Stop::WaitForOnline) => {
                dev_dbg!(self.dev, "waiting for added memory to be onlined\n");
            }
            Err(Stop::NoRoom) => {
                dev_warn!(
                    self.dev,
                    "no usable memory block left: plugged {:#x} of requested {:#x}\n",
                    g.plugged,
                    requested
                );
            }
            Err(Stop::Broken) => g.broken = true,
            Err(Stop::Freezing) => {
                // Nothing is lost: the worker runs again once thawed (it freezes first).
                dev_dbg!(self.dev, "round stopped for system sleep\n");
                self.platform.queue_work(0);
            }
        }
        // No retry is scheduled after these: one more round watches the onlining.
        let idle = matches!(
            result,
            Ok(()) | Err(Stop::Again | Stop::WaitForOnline | Stop::Nack | Stop::NoRoom)
        );
        self.watch_onlining(&mut g, idle);
        g
    }

    /// Tells the operator, once, when memory added [`ONLINE_GRACE_MS`] ago is still
    /// offline: nothing onlines hot-plugged memory in this guest. `idle`: no round is
    /// scheduled, so one is, to look again when the grace time is over.
    fn watch_onlining<M: Worker<P>>(&self, g: &mut Inner<P::Transport, M>, idle: bool) {
        if g.mode.added_offline() == 0 {
            g.offline_since_ms = None;
            return;
        }
        if g.offline_told {
            return;
        }
        let now = self.now_ms();
        let Some(since) = g.offline_since_ms else {
            // First seen offline: one more round when the grace time is over, unless one
            // is scheduled anyway.
            g.offline_since_ms = Some(now);
            if idle {
                self.platform.queue_work(ONLINE_GRACE_MS as u32);
            }
            return;
        };
        if now.saturating_sub(since) < ONLINE_GRACE_MS {
            return;
        }
        g.offline_told = true;
        let u = g.mode.usage(&self.geo);
        dev_warn!(
            self.dev,
            "{} MiB added {} s ago is still offline: nothing onlines hot-plugged memory in \
             this guest. Boot with memhp_default_state=online (or online_movable), build \
             with CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO, or online it from user space \
             (udev: /sys/devices/system/memory/memoryN/state)\n",
            u.offline >> 20,
            now.saturating_sub(since) / 1000
        );
    }

    /// Re-reads the config. `false` if it is invalid (logged; nothing is done until the
    /// next change).
    fn refresh<M: Worker<P>>(&self, g: &mut Inner<P::Transport, M>) -> bool {
        let raw = g.chan.read_config();
        let sizes = match Sizes::new(&raw, &self.geo) {
            Ok(s) => s,
            Err(e) => {
                config_err(&self.dev, e);
                dev_err!(self.dev, "ignoring this config change\n");
                return false;
            }
        };
        // The usable region may only shrink with UNPLUG_ALL, which leaves nothing plugged.
        // Shrunk below plugged memory, it would leave that memory impossible to unplug
        // (requests outside the usable region are invalid).
        if let Some(end) = g.mode.plugged_end(&self.geo) {
            if sizes.usable < end - self.geo.addr {
                dev_err!(
                    self.dev,
                    "invalid device config: usable_region_size = {:#x} shrank below plugged \
                     memory (up to {:#x}) without UNPLUG_ALL; ignoring this config change\n",
                    sizes.usable,
                    end - 1
                );
                return false;
            }
        }
        // Shrunk without UNPLUG_ALL (sent only at probe, before anything is plugged), but
        // above the plugged memory: against the spec, yet harmless as long as nothing is
        // plugged beyond it (see `Sbm::next_plug`).
        if sizes.usable < g.sizes.usable && g.plugged != 0 {
            dev_warn!(
                self.dev,
                "usable_region_size shrank from {:#x} to {:#x} without UNPLUG_ALL; nothing \
                 will be plugged beyond it\n",
                g.sizes.usable,
                sizes.usable
            );
        }
        // Any change may make a refused plug possible (the requested size may even have
        // gone and come back between two reads).
        g.nacked_at = None;
        dev_info!(
            self.dev,
            "requested size {:#x}, plugged size {:#x}, usable region {:#x}\n",
            sizes.requested,
            sizes.plugged,
            sizes.usable
        );
        if sizes.plugged != g.plugged && !g.unplug_all_required {
            dev_warn!(
                self.dev,
                "device reports plugged size {:#x}, but this driver plugged {:#x}\n",
                sizes.plugged,
                g.plugged
            );
        }
        g.sizes = sizes;
        g.device_plugged = sizes.plugged;
        g.mode.set_usable(&self.geo, sizes.usable);
        true
    }

    /// Schedules the next round after one that stopped because the guest needs its memory,
    /// soon (it costs a look at core mm's counters), and tells the operator at the start
    /// of the stall and then at the backoff's pace. No slab is dropped: that would squeeze
    /// a guest that has nothing to spare.
    fn wait_for_guest<M>(&self, g: &mut Inner<P::Transport, M>, info: MemInfo) {
        let r = g.backoff.failed();
        let delay = r.delay_ms.min(headroom::POLL_MS);
        g.retry_at_ms = Some(self.now_ms() + u64::from(delay));
        g.pressure = Some(info);
        let asked = g.plugged.saturating_sub(g.sizes.requested) >> 20;
        let (avail, margin) = (info.counted() >> 20, info.margin() >> 20);
        match g.stall.pressed() {
            Say::Begins => dev_warn!(
                self.dev,
                "guest needs its memory: {} MiB available, {} MiB more asked; waiting ({} MiB \
                 stay the guest's)\n",
                avail,
                asked,
                margin
            ),
            Say::GoesOn(rounds) => dev_info!(
                self.dev,
                "guest needs its memory: {} MiB available, {} MiB more asked; waiting ({} MiB \
                 stay the guest's; {} rounds so far)\n",
                avail,
                asked,
                margin,
                rounds
            ),
            Say::Nothing | Say::Ends => {}
        }
        self.platform.queue_work(delay);
    }

    /// Schedules the next round after a failed one (see `retry.rs`).
    fn retry_later<M>(&self, g: &mut Inner<P::Transport, M>) {
        let r = g.backoff.failed();
        g.retry_at_ms = Some(self.now_ms() + u64::from(r.delay_ms));
        if r.failed_rounds > 1 {
            dev_info!(
                self.dev,
                "still {:#x} plugged of requested {:#x} after {} tries; next try in {} s\n",
                g.plugged,
                g.sizes.requested,
                r.failed_rounds,
                r.delay_ms / 1000
            );
        }
        // Now and then (rounds 2, 4, 8, ...) say what holds the memory.
        if r.failed_rounds.is_power_of_two() && r.failed_rounds > 1 {
            if let Some((pfn, nr)) = g.last_busy {
                self.platform.explain_busy(pfn, nr);
            }
        }
        // Only when it can help: reclaimable slab there is, and the guest can spare memory
        // (dropping slab is no way to squeeze a guest that has none).
        if r.drop_slab && g.plugged > g.sizes.requested {
            let info = self.platform.mem_info();
            if info.slab_worth_dropping() && info.spare() > 0 && self.platform.drop_slab() {
                g.counters.drop_slab_calls += 1;
                dev_dbg!(
                    self.dev,
                    "dropped reclaimable slab objects ({} KiB were reclaimable)\n",
                    info.slab_reclaimable >> 10
                );
            }
        }
        self.platform.queue_work(r.delay_ms);
    }

    /// Whether the device asked to be reset (`VIRTIO_CONFIG_S_NEEDS_RESET`, QEMU's
    /// `virtio_error()`): it answers no request any more, so none is sent, rather than each
    /// one waiting for the timeout. Marks the device broken, and says so once.
    fn needs_reset<M>(&self, g: &mut Inner<P::Transport, M>) -> bool {
        if !g.chan.needs_reset() {
            return false;
        }
        if !g.broken {
            dev_err!(
                self.dev,
                "device needs a reset (VIRTIO_CONFIG_S_NEEDS_RESET): device marked broken, no \
                 more (un)plugging\n"
            );
            g.broken = true;
        }
        true
    }

    fn mark_broken<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        ty: RequestType,
        resp: Option<Response>,
    ) {
        if let Some(r) = resp {
            dev_err!(
                self.dev,
                "device answered {} with {:?}: device marked broken, no more (un)plugging\n",
                ty.name(),
                r
            );
        }
        g.broken = true;
    }

    /// Counts and traces the answer to a request sent at `sent_ns`.
    fn answered<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        ty: RequestType,
        addr: u64,
        nb_blocks: u16,
        answer: Answer,
        sent_ns: u64,
    ) {
        g.counters.answer(answer);
        let ns = self.platform.now_ns().saturating_sub(sent_ns);
        self.platform.trace_request(ty, addr, nb_blocks, answer, ns);
    }

    /// Sends one request and waits for the answer: `Some((used length, when it was sent))`,
    /// with the answer in `g.resp`, or `None` if it was not sent or not answered in time
    /// (logged): the device's state is then unknown.
    fn exchange<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        ty: RequestType,
        addr: u64,
        nb_blocks: u16,
    ) -> Option<(u32, u64)> {
        // Nothing more goes to a device that answered ERROR, nothing or nonsense, or that
        // asked to be reset.
        if g.broken || self.needs_reset(g) {
            return None;
        }
        let req = protocol::encode_request(ty, addr, nb_blocks);
        g.counters.request(ty);
        let sent = self.platform.now_ns();
        let Inner { chan, resp, .. } = g;
        // Whatever the device leaves unwritten, or left from an earlier answer, is invalid.
        *resp = RESPONSE_POISON;
        let res = chan.request(&req, resp, REQUEST_TIMEOUT_MS);
        if res.is_err() {
            self.answered(g, ty, addr, nb_blocks, Answer::Timeout, sent);
        }
        match res {
            Ok(len) => Some((len, sent)),
            // It asked to be reset while the request waited: the transport stopped waiting.
            Err(_) if self.needs_reset(g) => None,
            Err(e) if e == ETIMEDOUT => {
                dev_err!(
                    self.dev,
                    "no answer to {} {:#x} ({} blocks) within {} ms: device marked broken\n",
                    ty.name(),
                    addr,
                    nb_blocks,
                    REQUEST_TIMEOUT_MS
                );
                None
            }
            Err(e) => {
                dev_err!(
                    self.dev,
                    "{} {:#x} ({} blocks) not sent: {:?}\n",
                    ty.name(),
                    addr,
                    nb_blocks,
                    e
                );
                None
            }
        }
    }

    /// Sends one request. `None` if the device did not answer in time or answered
    /// something invalid (logged): its state is then unknown.
    fn request<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        ty: RequestType,
        addr: u64,
        nb_blocks: u16,
    ) -> Option<Response> {
        let (used_len, sent) = self.exchange(g, ty, addr, nb_blocks)?;
        let r = Response::decode(&g.resp, used_len);
        let answer = match r {
            Ok(r) => Self::kind(r),
            Err(_) => Answer::Invalid,
        };
        self.answered(g, ty, addr, nb_blocks, answer, sent);
        match r {
            Ok(r) => Some(r),
            Err(e) => {
                self.bad_answer(ty, addr, e);
                None
            }
        }
    }

    /// The kind of a valid answer, for the counters.
    fn kind(r: Response) -> Answer {
        match r {
            Response::Ack => Answer::Ack,
            Response::Nack => Answer::Nack,
            Response::Busy => Answer::Busy,
            Response::Error => Answer::Error,
        }
    }

    /// Asks the device (in a crash kernel) whether the `nb_blocks` device blocks at `addr`
    /// are plugged. `None` if it gives no valid answer: ERROR (the range is valid), NACK
    /// or BUSY (not answers to STATE), MIXED for a single block, an invalid answer or
    /// none (logged). The device is then marked broken and asked nothing more.
    fn state<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        addr: u64,
        nb_blocks: u16,
    ) -> Option<BlockState> {
        let ty = RequestType::State;
        let answer = self
            .exchange(g, ty, addr, nb_blocks)
            .and_then(|(used_len, sent)| {
                let decoded = StateAnswer::decode(&g.resp, used_len);
                let kind = match decoded {
                    Ok(StateAnswer::Ack(_)) => Answer::Ack,
                    Ok(StateAnswer::Other(r)) => Self::kind(r),
                    Err(_) => Answer::Invalid,
                };
                self.answered(g, ty, addr, nb_blocks, kind, sent);
                match decoded {
                    Ok(StateAnswer::Ack(BlockState::Mixed)) if nb_blocks == 1 => {
                        dev_err!(
                            self.dev,
                            "invalid answer to STATE {:#x}: MIXED for a single device block: \
                             device marked broken\n",
                            addr
                        );
                        None
                    }
                    Ok(StateAnswer::Ack(state)) => Some(state),
                    Ok(StateAnswer::Other(r)) => {
                        dev_err!(
                            self.dev,
                            "device answered STATE {:#x} ({} blocks) with {:?}: device marked \
                             broken\n",
                            addr,
                            nb_blocks,
                            r
                        );
                        None
                    }
                    Err(e) => {
                        self.bad_answer(ty, addr, e);
                        None
                    }
                }
            });
        if answer.is_none() && !g.broken {
            dev_err!(
                self.dev,
                "none of the device's memory is read for /proc/vmcore from now on\n"
            );
            g.broken = true;
        }
        answer
    }

    /// Logs an invalid answer to `ty` at `addr`.
    fn bad_answer(&self, ty: RequestType, addr: u64, e: BadResponse) {
        match e {
            BadResponse::Length(len) => {
                dev_err!(
                    self.dev,
                    "invalid answer to {} {:#x}: {} bytes used (expected 2 to {}): device \
                     marked broken\n",
                    ty.name(),
                    addr,
                    len,
                    protocol::RESPONSE_SIZE
                );
            }
            BadResponse::Type(t) => {
                dev_err!(
                    self.dev,
                    "invalid answer to {} {:#x}: unknown type {:#x}: device marked broken\n",
                    ty.name(),
                    addr,
                    t
                );
            }
            BadResponse::NoState(len) => {
                dev_err!(
                    self.dev,
                    "invalid answer to {} {:#x}: ACK of {} bytes, without its state (expected \
                     {}): device marked broken\n",
                    ty.name(),
                    addr,
                    len,
                    protocol::RESPONSE_SIZE
                );
            }
            BadResponse::State(st) => {
                dev_err!(
                    self.dev,
                    "invalid answer to {} {:#x}: unknown state {:#x}: device marked broken\n",
                    ty.name(),
                    addr,
                    st
                );
            }
        }
    }

    /// Whether the round must stop between two steps: `Freezing` if the worker is asked to
    /// freeze (system sleep), `Again` if the config changed meanwhile.
    fn interrupted(&self) -> Result<(), Stop> {
        if self.platform.freezing() {
            return Err(Stop::Freezing);
        }
        if self.config_changed.load(Ordering::Acquire) {
            return Err(Stop::Again);
        }
        Ok(())
    }

    /// Sends PLUG or UNPLUG of `nb` device blocks at `addr` and counts an ACK in the
    /// plugged size. `Nack` or `Busy` (nothing changed), `Freezing` (not sent: the device
    /// has no queue), or `Broken` (no valid answer: what the device did is unknown).
    fn change_blocks<M>(
        &self,
        g: &mut Inner<P::Transport, M>,
        ty: RequestType,
        addr: u64,
        nb: u16,
    ) -> Result<(), Stop> {
        // The device has no queue (only if the worker was not frozen in time).
        if g.frozen {
            return Err(Stop::Freezing);
        }
        match self.request(g, ty, addr, nb) {
            Some(Response::Ack) => {
                let bytes = u64::from(nb) << self.geo.device_block_size.trailing_zeros();
                match ty {
                    RequestType::Plug => {
                        g.plugged += bytes;
                        g.counters.bytes_plugged += bytes;
                    }
                    RequestType::Unplug => {
                        g.plugged -= bytes;
                        g.counters.bytes_unplugged += bytes;
                    }
                    RequestType::UnplugAll => {
                        g.counters.bytes_unplugged += g.plugged;
                        g.plugged = 0;
                    }
                    RequestType::State => {}
                }
                Ok(())
            }
            Some(Response::Nack) => Err(Stop::Nack),
            Some(Response::Busy) => Err(Stop::Busy),
            other => {
                self.mark_broken(g, ty, other);
                Err(Stop::Broken)
            }
        }
    }

    /// Takes plugged online pages from the kernel, with a few tries on ZONE_MOVABLE.
    /// `RetryLater` if they cannot be freed now, `Again` if the config changed meanwhile,
    /// `Pressure` if the guest can no longer spare them, `Freezing` if the worker is asked
    /// to freeze.
    fn fake_offline(&self, counters: &mut Counters, pfn: u64, nr: u64) -> Result<(), Stop> {
        let tries = if self.platform.is_movable(pfn) {
            FAKE_OFFLINE_TRIES_MOVABLE
        } else {
            1
        };
        let bytes = nr << self.page_shift;
        for _ in 0..tries {
            self.interrupted()?;
            // Memory may have gone since the caller looked, and between tries.
            let info = self.platform.mem_info();
            if !info.may_take(bytes) {
                return Err(Stop::Pressure(info));
            }
            let (migrated, start) = (self.platform.pages_migrated(), self.platform.now_ns());
            let res = self.platform.fake_offline(pfn, nr);
            let ns = self.platform.now_ns().saturating_sub(start);
            let moved = self.platform.pages_migrated().saturating_sub(migrated);
            counters.bytes_migrated += moved << self.page_shift;
            self.platform
                .trace_unplug_online(pfn, nr, res.err().map_or(0, |e| e.to_errno()), ns);
            match res {
                Ok(()) => return Ok(()),
                Err(e) => {
                    counters.alloc_contig_range_failures += 1;
                    if e == ENOMEM {
                        return Err(Stop::RetryLater);
                    }
                }
            }
        }
        dev_dbg!(
            self.dev,
            "pfn {:#x}..{:#x} is busy: cannot unplug it now\n",
            pfn,
            pfn + nr - 1
        );
        Err(Stop::RetryLater)
    }
}
