// SPDX-License-Identifier: GPL-2.0

//! One virtio-mem device: its validated geometry, its state behind one mutex, the worker
//! that follows the requested size, and the answers to core mm's memory notifier and
//! online page callback, to system sleep (freeze, restore, the PM notifier) and, in a crash
//! kernel, to `/proc/vmcore` (which of the region's memory is RAM to dump).
//!
//! # Locking
//!
//! `inner` is taken by the worker, the memory notifier and the online page callback. Core
//! mm calls the latter two with the memory hotplug lock held, so the worker never holds
//! `inner` while it calls into memory hotplug (`add_memory`): it drops the lock around it.
//! The worker does hold it across device requests, which are bounded by a timeout.

use crate::{
    config::{ConfigError, Geometry, Sizes},
    headroom::{self, MemInfo, Say, Stall},
    platform::{Platform, Transport},
    protocol::{
        self, BadResponse, BlockState, RequestType, Response, StateAnswer, RESPONSE_POISON,
        RESPONSE_SIZE,
    },
    retry::Backoff,
    sbm::{MbState, OnlineCursor, PlugStep, Plugged, Sbm, UnplugStep},
};
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::{
    alloc::{KVVec, KVec},
    device::Device,
    new_mutex,
    prelude::*,
    sync::aref::ARef,
    sync::{Arc, Mutex, MutexGuard},
};

/// How long the worker waits for the device to answer one request.
const REQUEST_TIMEOUT_MS: u32 = 30_000;
/// Tries of `alloc_contig_range` for one range: ZONE_MOVABLE promises more, so more.
const FAKE_OFFLINE_TRIES_MOVABLE: u32 = 5;
/// Stop adding memory while at least this much is added but offline (or two blocks).
const OFFLINE_THRESHOLD: u64 = 1 << 30;

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

/// How the device's memory is managed. Big Block Mode will be a second variant.
enum Mode {
    Sbm(Sbm<KVVec<u64>>),
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

struct Inner<T> {
    chan: T,
    /// The response buffer, poisoned before each request.
    resp: [u8; RESPONSE_SIZE as usize],
    mode: Mode,
    /// The last valid sizes the device reported.
    sizes: Sizes,
    /// What this driver has plugged (the device's `plugged_size` is only compared to it).
    plugged: u64,
    /// Memory was plugged at probe: UNPLUG_ALL before anything else.
    unplug_all_required: bool,
    broken: bool,
    /// The memory block of the request that got no valid answer (which made the device
    /// broken): what the device did with it is unknown.
    unknown_mb: Option<usize>,
    removing: bool,
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
}

/// One virtio-mem device, on platform `P` (the glue, or a mock in the KUnit suites).
#[pin_data]
pub(crate) struct VirtioMem<P: Platform> {
    dev: ARef<Device>,
    platform: P,
    geo: Geometry,
    /// log2 of the page size.
    page_shift: u32,
    nid: i32,
    offline_threshold_mbs: usize,
    /// A crash kernel (`is_kdump_kernel()`): nothing is plugged, unplugged or added; the
    /// device is only asked what is plugged.
    kdump: bool,
    /// Set by the config change callback (any context), consumed by the worker.
    config_changed: AtomicBool,
    #[pin]
    inner: Mutex<Inner<P::Transport>>,
}

/// The state the tests check, as [`VirtioMem::view`] shows it.
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
// Not `expect`: the host tests read every field, KUnit only some.
#[allow(dead_code)]
pub(crate) struct View<'a> {
    pub(crate) sbm: &'a Sbm<KVVec<u64>>,
    pub(crate) plugged: u64,
    /// The requested size of the last valid config.
    pub(crate) requested: u64,
    pub(crate) broken: bool,
    pub(crate) unplug_all_required: bool,
    pub(crate) waiting_for_online: bool,
    pub(crate) nacked_at: Option<u64>,
    pub(crate) frozen: bool,
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
        let geo = Geometry::new(&raw, &limits).map_err(|e| config_err(&dev, e))?;
        let sizes = Sizes::new(&raw, &geo).map_err(|e| config_err(&dev, e))?;
        let nid = platform.node(raw.node_id, geo.addr);

        let nr_mbs = usize::try_from(geo.nr_mbs).map_err(|_| ENOMEM)?;
        let sbs_per_mb = geo.sbs_per_mb() as usize;
        let words = Sbm::<KVVec<u64>>::words_needed(nr_mbs, sbs_per_mb).ok_or(ENOMEM)?;
        let storage = KVVec::from_elem(0u64, words, GFP_KERNEL).inspect_err(|_| {
            dev_err!(dev, "no memory for the state of {} memory blocks\n", nr_mbs)
        })?;
        let mut sbm = Sbm::new(storage, nr_mbs, sbs_per_mb).ok_or(EINVAL)?;
        sbm.set_usable_mbs(geo.usable_mbs(sizes.usable));
        sbm.set_usable_tail(geo.usable_tail(sizes.usable));

        dev_info!(
            dev,
            "address {:#x}, region {:#x} (usable {:#x}), device block {:#x}, subblock {:#x}, \
             memory block {:#x}, node {}{}, {}\n",
            geo.addr,
            geo.region_size,
            sizes.usable,
            geo.device_block_size,
            geo.subblock_size,
            geo.memory_block_size,
            nid,
            if platform.has_acpi_pxm() {
                " (ACPI PXM)"
            } else {
                ""
            },
            geo.mode.name()
        );
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
        let offline_threshold_mbs =
            (OFFLINE_THRESHOLD >> geo.memory_block_size.trailing_zeros()).max(2) as usize;

        Arc::pin_init(
            try_pin_init!(Self {
                dev,
                platform,
                geo,
                page_shift: limits.page_size.trailing_zeros(),
                nid,
                offline_threshold_mbs,
                kdump,
                config_changed: AtomicBool::new(true),
                inner <- new_mutex!(
                    Inner {
                        chan,
                        resp: RESPONSE_POISON,
                        mode: Mode::Sbm(sbm),
                        sizes,
                        plugged: 0,
                        unplug_all_required,
                        broken: false,
                        unknown_mb: None,
                        removing: false,
                        backoff: Backoff::new(),
                        waiting_for_online: false,
                        nacked_at: None,
                        last_busy: None,
                        stall: Stall::default(),
                        pressure: None,
                        frozen: false,
                        last_state: None,
                    },
                    "VirtioMem::inner"
                ),
            }),
            GFP_KERNEL,
        )
    }

    /// The platform the device runs on.
    pub(crate) fn platform(&self) -> &P {
        &self.platform
    }

    /// Takes the region for Linux: resource, memory group, notifier, online page callback.
    /// Not in a crash kernel, which adds none of the region's memory.
    pub(crate) fn start(&self) -> Result {
        if self.kdump {
            return Ok(());
        }
        let g = &self.geo;
        self.platform
            .hotplug_init(g.addr, g.region_size, self.nid, g.memory_block_size)
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
        let mut g = self.inner.lock();
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
        Ok(())
    }

    /// System sleep ends (the virtio core's `restore`): the glue has a new queue and the
    /// device is ready. The next round re-reads the config and follows it (the glue kicks
    /// the worker).
    pub(crate) fn restore(&self) {
        let mut g = self.inner.lock();
        g.frozen = false;
        g.last_state = None;
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
        let mut g = self.inner.lock();
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
        let ram = self.state(&mut g, start, nb) == Some(BlockState::Plugged);
        g.last_state = Some((start, ram));
        ram
    }

    /// `/proc/vmcore` in a crash kernel (`CONFIG_PROC_VMCORE_DEVICE_RAM`): hands the
    /// plugged ranges of the usable region to `add` (start, size), merged, lowest first,
    /// whole pages. Each range asked with STATE is at most a memory block (and 32768 device
    /// blocks); a MIXED one is asked again in aligned halves, down to a device block (or a
    /// page, if larger: one not wholly plugged is left out, `pfn_is_ram` would say so too).
    /// `EIO` if the device gives no valid answer (it is then broken).
    pub(crate) fn device_ram(&self, mut add: impl FnMut(u64, u64) -> Result) -> Result {
        let geo = &self.geo;
        let mut g = self.inner.lock();
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
                match self.state(&mut g, pos, nb) {
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
    /// can be removed: offline blocks with unplugged subblocks (without the online page
    /// callback, onlining them would hand unplugged memory to the kernel), the offline
    /// block whose last request got no valid answer (for the same reason: subblocks marked
    /// plugged may not be), and emptied blocks, but not an online one whose last request got
    /// no valid answer (the device may have plugged what looks empty). What stays added
    /// stays safe: online memory keeps its fake-offline pages.
    ///
    /// The glue has cancelled the worker already. `removing` is set last: until then the
    /// memory notifier must let this removal offline its own blocks.
    pub(crate) fn remove(&self) {
        let g = self.inner.lock();
        let Mode::Sbm(sbm) = &g.mode;
        let unknown = g
            .unknown_mb
            .filter(|&mb| matches!(sbm.state(mb), MbState::Offline | MbState::OfflinePartial));
        // An online block of unknown state stays: the device may have plugged what looks
        // empty here, and its fake-offline pages keep it from being offlined.
        let unknown_online = g.unknown_mb.filter(|&mb| sbm.state(mb).is_online());
        if let Some(mb) = unknown_online {
            dev_warn!(
                self.dev,
                "memory block {:#x}, online, of unknown state in the device, stays added \
                 after removal, its pages not known to be plugged fake-offline\n",
                self.geo.mb_addr(mb)
            );
        }
        let (mut g, _) = self.remove_blocks(
            g,
            |sbm, mb| {
                sbm.state(mb) == MbState::OfflinePartial
                    || (sbm.is_empty_added(mb) && unknown_online != Some(mb))
                    || unknown == Some(mb)
            },
            |mb| {
                if unknown == Some(mb) {
                    dev_err!(
                        self.dev,
                        "memory block {:#x}, offline, of unknown state in the device, stays \
                         added after removal: onlining it may hand unplugged memory to the \
                         kernel\n",
                        self.geo.mb_addr(mb)
                    )
                } else {
                    dev_warn!(
                        self.dev,
                        "memory block {:#x} stays added after removal\n",
                        self.geo.mb_addr(mb)
                    )
                }
            },
        );
        if let Some(mb) = unknown {
            let Mode::Sbm(sbm) = &g.mode;
            if sbm.state(mb) == MbState::Unused {
                dev_warn!(
                    self.dev,
                    "memory block {:#x}, offline, of unknown state in the device, removed: \
                     once the driver is gone nothing would keep it from being onlined\n",
                    self.geo.mb_addr(mb)
                );
            }
        }
        g.removing = true;
        if g.plugged != 0 {
            dev_warn!(self.dev, "removed with {:#x} still plugged\n", g.plugged);
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
        let g = self.inner.lock();
        let Mode::Sbm(sbm) = &g.mode;
        f(&View {
            sbm,
            plugged: g.plugged,
            requested: g.sizes.requested,
            broken: g.broken,
            unplug_all_required: g.unplug_all_required,
            waiting_for_online: g.waiting_for_online,
            nacked_at: g.nacked_at,
            frozen: g.frozen,
        })
    }

    /// What the guest had when the last round stopped because it needs its memory; `None`
    /// if the last round did not stop for that.
    #[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
    pub(crate) fn waiting_for_guest(&self) -> Option<MemInfo> {
        self.inner.lock().pressure
    }

    /// The worker: follows the requested size. Nothing in a crash kernel, nothing while
    /// frozen (restore kicks it again).
    pub(crate) fn run(&self) {
        if self.kdump {
            return;
        }
        let mut g = self.inner.lock();
        let start_plugged = g.plugged;
        let result = loop {
            if g.broken || g.removing || g.frozen {
                return;
            }
            // Checked before anything else: there may be no request to send this round.
            if self.needs_reset(&mut g) {
                return;
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
                    other => return self.mark_broken(&mut g, RequestType::UnplugAll, other),
                }
            }
            if self.config_changed.swap(false, Ordering::AcqRel) && !self.refresh(&mut g) {
                return;
            }

            // Blocks whose adding and undoing both failed: give them back first.
            if let Err(stop) = self.unplug_pending(&mut g) {
                break Err(stop);
            }
            // Blocks emptied earlier whose removal failed: try again.
            let (ng, removed_all) = self.remove_empty_blocks(g);
            g = ng;

            let requested = g.sizes.requested;
            let (ng, result) = if requested > g.plugged && g.nacked_at != Some(requested) {
                let diff = requested - g.plugged;
                self.plug(g, diff)
            } else if requested < g.plugged {
                let diff = g.plugged - requested;
                self.unplug(g, diff)
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
    }

    /// Re-reads the config. `false` if it is invalid (logged; nothing is done until the
    /// next change).
    fn refresh(&self, g: &mut Inner<P::Transport>) -> bool {
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
        let Mode::Sbm(sbm) = &g.mode;
        if let Some((mb, sb)) = sbm.plugged_end() {
            let end = self.geo.sb_addr(mb, sb);
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
        let (usable_mbs, tail) = (
            self.geo.usable_mbs(sizes.usable),
            self.geo.usable_tail(sizes.usable),
        );
        let Mode::Sbm(sbm) = &mut g.mode;
        sbm.set_usable_mbs(usable_mbs);
        sbm.set_usable_tail(tail);
        true
    }

    /// Schedules the next round after one that stopped because the guest needs its memory,
    /// soon (it costs a look at core mm's counters), and tells the operator at the start
    /// of the stall and then at the backoff's pace. No slab is dropped: that would squeeze
    /// a guest that has nothing to spare.
    fn wait_for_guest(&self, g: &mut Inner<P::Transport>, info: MemInfo) {
        let r = g.backoff.failed();
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
        self.platform.queue_work(r.delay_ms.min(headroom::POLL_MS));
    }

    /// Schedules the next round after a failed one (see `retry.rs`).
    fn retry_later(&self, g: &mut Inner<P::Transport>) {
        let r = g.backoff.failed();
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
    fn needs_reset(&self, g: &mut Inner<P::Transport>) -> bool {
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

    fn mark_broken(&self, g: &mut Inner<P::Transport>, ty: RequestType, resp: Option<Response>) {
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

    /// Sends one request and waits for the answer: `Some(used length)`, with the answer in
    /// `g.resp`, or `None` if it was not sent or not answered in time (logged): the
    /// device's state is then unknown.
    fn exchange(
        &self,
        g: &mut Inner<P::Transport>,
        ty: RequestType,
        addr: u64,
        nb_blocks: u16,
    ) -> Option<u32> {
        // Nothing more goes to a device that answered ERROR, nothing or nonsense, or that
        // asked to be reset.
        if g.broken || self.needs_reset(g) {
            return None;
        }
        let req = protocol::encode_request(ty, addr, nb_blocks);
        let Inner { chan, resp, .. } = g;
        // Whatever the device leaves unwritten, or left from an earlier answer, is invalid.
        *resp = RESPONSE_POISON;
        let res = chan.request(&req, resp, REQUEST_TIMEOUT_MS);
        match res {
            Ok(len) => Some(len),
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
    fn request(
        &self,
        g: &mut Inner<P::Transport>,
        ty: RequestType,
        addr: u64,
        nb_blocks: u16,
    ) -> Option<Response> {
        let used_len = self.exchange(g, ty, addr, nb_blocks)?;
        match Response::decode(&g.resp, used_len) {
            Ok(r) => Some(r),
            Err(e) => {
                self.bad_answer(ty, addr, e);
                None
            }
        }
    }

    /// Asks the device (in a crash kernel) whether the `nb_blocks` device blocks at `addr`
    /// are plugged. `None` if it gives no valid answer: ERROR (the range is valid), NACK
    /// or BUSY (not answers to STATE), MIXED for a single block, an invalid answer or
    /// none (logged). The device is then marked broken and asked nothing more.
    fn state(&self, g: &mut Inner<P::Transport>, addr: u64, nb_blocks: u16) -> Option<BlockState> {
        let ty = RequestType::State;
        let answer = self.exchange(g, ty, addr, nb_blocks).and_then(|used_len| {
            match StateAnswer::decode(&g.resp, used_len) {
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

    /// Sends `ty` for subblocks `first .. first + count` of block `mb`, split into requests
    /// the 16-bit block count can hold, and counts what the device ACKed in the plugged
    /// size. Returns how many subblocks were done, and why it stopped early.
    fn request_sbs(
        &self,
        g: &mut Inner<P::Transport>,
        ty: RequestType,
        mb: usize,
        first: usize,
        count: usize,
    ) -> (usize, Result<(), Stop>) {
        let bpsb = self.geo.blocks_per_sb();
        let mut done = 0;
        for (off, n) in protocol::split_run(count, bpsb) {
            // The device has no queue (only if the worker was not frozen in time).
            if g.frozen {
                return (done, Err(Stop::Freezing));
            }
            let addr = self.geo.sb_addr(mb, first + off);
            // `split_run` keeps every request within `u16::MAX` blocks.
            let nb = (n as u64 * bpsb) as u16;
            let stop = match self.request(g, ty, addr, nb) {
                Some(Response::Ack) => {
                    done += n;
                    let bytes = (n as u64) << self.geo.sb_shift();
                    match ty {
                        RequestType::Plug => g.plugged += bytes,
                        RequestType::Unplug => g.plugged -= bytes,
                        RequestType::UnplugAll => g.plugged = 0,
                        RequestType::State => {}
                    }
                    continue;
                }
                Some(Response::Nack) => Stop::Nack,
                Some(Response::Busy) => Stop::Busy,
                other => {
                    self.mark_broken(g, ty, other);
                    // The first such request is the one that broke the device: none is
                    // sent after it.
                    g.unknown_mb.get_or_insert(mb);
                    Stop::Broken
                }
            };
            return (done, Err(stop));
        }
        (done, Ok(()))
    }

    /// Plugs `diff` bytes. Drops and retakes the lock around adding memory.
    fn plug<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner<P::Transport>>,
        diff: u64,
    ) -> (MutexGuard<'a, Inner<P::Transport>>, Result<(), Stop>) {
        let target = g.plugged + diff;
        loop {
            if self.platform.freezing() {
                return (g, Err(Stop::Freezing));
            }
            if self.config_changed.load(Ordering::Acquire) {
                return (g, Err(Stop::Again));
            }
            let nb_sb = ((target - g.plugged) >> self.geo.sb_shift()) as usize;
            if nb_sb == 0 {
                return (g, Ok(()));
            }
            let Mode::Sbm(sbm) = &g.mode;
            let Some(step) = sbm.next_plug(nb_sb) else {
                return (g, Err(Stop::NoRoom));
            };
            match step {
                PlugStep::Added { mb, first, count } => {
                    let (done, res) = self.request_sbs(&mut g, RequestType::Plug, mb, first, count);
                    let Mode::Sbm(sbm) = &mut g.mode;
                    if done > 0 && sbm.plugged_added(mb, first, done) {
                        self.platform
                            .fake_online(self.sb_pfn(mb, first), self.sb_pages(done));
                    }
                    if let Err(stop) = res {
                        return (g, Err(stop));
                    }
                }
                PlugStep::New { mb, count } => {
                    if sbm.offline_mbs() >= self.offline_threshold_mbs {
                        g.waiting_for_online = true;
                        return (g, Err(Stop::WaitForOnline));
                    }
                    let (done, res) = self.request_sbs(&mut g, RequestType::Plug, mb, 0, count);
                    if done == 0 {
                        return (g, res);
                    }
                    let Mode::Sbm(sbm) = &mut g.mode;
                    sbm.plugged_new(mb, done);

                    let addr = self.geo.mb_addr(mb);
                    let size = self.geo.memory_block_size;
                    drop(g);
                    let added = self.platform.add_memory(addr, size);
                    g = self.inner.lock();

                    if let Err(e) = added {
                        dev_warn!(
                            self.dev,
                            "adding memory {:#x}..{:#x} failed: {:?}\n",
                            addr,
                            addr + size - 1,
                            e
                        );
                        let (undone, _) =
                            self.request_sbs(&mut g, RequestType::Unplug, mb, 0, done);
                        let Mode::Sbm(sbm) = &mut g.mode;
                        sbm.unplugged(mb, 0, undone);
                        sbm.add_failed(mb, undone == done);
                        let stop = if g.broken {
                            Stop::Broken
                        } else {
                            Stop::RetryLater
                        };
                        return (g, Err(stop));
                    }
                    if let Err(stop) = res {
                        return (g, Err(stop));
                    }
                }
            }
        }
    }

    /// Unplugs `diff` bytes: offline blocks first (nothing to migrate), then online ones
    /// (if `unplug_online`), in the C driver's order. Drops and retakes the lock to remove
    /// emptied blocks.
    fn unplug<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner<P::Transport>>,
        diff: u64,
    ) -> (MutexGuard<'a, Inner<P::Transport>>, Result<(), Stop>) {
        let sb_shift = self.geo.sb_shift();
        let target = g.plugged - diff;
        // Only what this round could not free is worth explaining.
        g.last_busy = None;
        let Mode::Sbm(sbm) = &g.mode;
        let Ok(mut tried) = KVec::from_elem(false, sbm.nr_mbs(), GFP_KERNEL) else {
            return (g, Err(Stop::RetryLater));
        };
        // A block left with nothing plugged could not be removed: retry it later.
        let mut removal_failed = false;
        // The guest could not spare all that was asked (what it had then).
        let mut pressure = None;
        loop {
            // Between steps (a block emptied is removed first). Within an online block,
            // `fake_offline` looks before each run is taken.
            if self.platform.freezing() {
                return (g, Err(Stop::Freezing));
            }
            if self.config_changed.load(Ordering::Acquire) {
                return (g, Err(Stop::Again));
            }
            let nb_sb = ((g.plugged - target) >> sb_shift) as usize;
            let Mode::Sbm(sbm) = &g.mode;
            let step = sbm.next_unplug(nb_sb, self.platform.unplug_online(), |mb| tried[mb]);
            let Some(step) = step else {
                // Nothing more to try this round; what is left waits for the next one.
                let res = match pressure {
                    Some(info) if nb_sb > 0 => Err(Stop::Pressure(info)),
                    _ if nb_sb > 0 || removal_failed => Err(Stop::RetryLater),
                    _ => Ok(()),
                };
                return (g, res);
            };
            let mb = match step {
                UnplugStep::Offline { mb, first, count } => {
                    let (done, res) =
                        self.request_sbs(&mut g, RequestType::Unplug, mb, first, count);
                    let Mode::Sbm(sbm) = &mut g.mode;
                    sbm.unplugged(mb, first, done);
                    if let Err(stop) = res {
                        return (g, Err(unplug_stop(stop)));
                    }
                    mb
                }
                UnplugStep::Online { mb } => {
                    let Mode::Sbm(sbm) = &g.mode;
                    let mut cursor = OnlineCursor::new(sbm);
                    loop {
                        let nb_sb = ((g.plugged - target) >> sb_shift) as usize;
                        // Never more than the guest can spare now.
                        let info = self.platform.mem_info();
                        let spare = (info.spare() >> sb_shift).min(nb_sb as u64) as usize;
                        if spare < nb_sb {
                            if spare == 0 {
                                return (g, Err(Stop::Pressure(info)));
                            }
                            pressure = Some(info);
                        }
                        let Mode::Sbm(sbm) = &g.mode;
                        let Some((first, count)) = cursor.next(sbm, mb, spare) else {
                            break;
                        };
                        match self.unplug_online(&mut g, mb, first, count) {
                            // Busy memory: smaller runs of it come next. A busy device
                            // ends the round.
                            Ok(()) | Err(Stop::RetryLater) => {}
                            Err(stop) => return (g, Err(stop)),
                        }
                    }
                    tried[mb] = true;
                    mb
                }
            };
            let Mode::Sbm(sbm) = &g.mode;
            if sbm.plugged(mb, 0, sbm.sbs_per_mb()) == Plugged::None {
                let (ng, removed) = self.remove_block(g, mb);
                g = ng;
                removal_failed |= !removed;
                tried[mb] = true;
            }
        }
    }

    /// Unplugs the blocks left plugged but not added (adding failed, and so did the undo
    /// UNPLUG), whatever the requested size, as the C driver's
    /// `virtio_mem_cleanup_pending_mb` does: plugging starts over from unused blocks.
    fn unplug_pending(&self, g: &mut Inner<P::Transport>) -> Result<(), Stop> {
        loop {
            let Mode::Sbm(sbm) = &g.mode;
            let Some((mb, first, count)) = sbm.next_pending() else {
                return Ok(());
            };
            let (done, res) = self.request_sbs(g, RequestType::Unplug, mb, first, count);
            let Mode::Sbm(sbm) = &mut g.mode;
            if sbm.unplugged(mb, first, done) {
                dev_info!(
                    self.dev,
                    "memory block {:#x}, never added, is unplugged again\n",
                    self.geo.mb_addr(mb)
                );
            }
            res.map_err(unplug_stop)?;
        }
    }

    /// Gives back subblocks `first .. first + count` of online block `mb`: fake-offline
    /// them, then UNPLUG. Pages return to the kernel only if the device surely kept them
    /// (NACK, BUSY); after ERROR or no valid answer they stay fake-offline.
    fn unplug_online(
        &self,
        g: &mut Inner<P::Transport>,
        mb: usize,
        first: usize,
        count: usize,
    ) -> Result<(), Stop> {
        let pfn = self.sb_pfn(mb, first);
        let nr = self.sb_pages(count);
        if let Err(stop) = self.fake_offline(pfn, nr) {
            if matches!(stop, Stop::RetryLater) {
                g.last_busy = Some((pfn, nr));
            }
            return Err(stop);
        }
        let (done, res) = self.request_sbs(g, RequestType::Unplug, mb, first, count);
        let Mode::Sbm(sbm) = &mut g.mode;
        sbm.unplugged(mb, first, done);
        match res {
            Ok(()) => Ok(()),
            Err(Stop::Broken) => {
                dev_err!(
                    self.dev,
                    "{:#x}..{:#x} stays fake-offline: its state in the device is unknown\n",
                    self.geo.sb_addr(mb, first + done),
                    self.geo.sb_addr(mb, first + count) - 1
                );
                Err(Stop::Broken)
            }
            Err(stop) => {
                // Still plugged for certain: back to the kernel.
                self.platform
                    .fake_online(self.sb_pfn(mb, first + done), self.sb_pages(count - done));
                Err(unplug_stop(stop))
            }
        }
    }

    /// Takes plugged online pages from the kernel, with a few tries on ZONE_MOVABLE.
    /// `RetryLater` if they cannot be freed now, `Again` if the config changed meanwhile,
    /// `Pressure` if the guest can no longer spare them, `Freezing` if the worker is asked
    /// to freeze.
    fn fake_offline(&self, pfn: u64, nr: u64) -> Result<(), Stop> {
        let tries = if self.platform.is_movable(pfn) {
            FAKE_OFFLINE_TRIES_MOVABLE
        } else {
            1
        };
        let bytes = nr << self.page_shift;
        for _ in 0..tries {
            if self.platform.freezing() {
                return Err(Stop::Freezing);
            }
            if self.config_changed.load(Ordering::Acquire) {
                return Err(Stop::Again);
            }
            // Memory may have gone since the caller looked, and between tries.
            let info = self.platform.mem_info();
            if !info.may_take(bytes) {
                return Err(Stop::Pressure(info));
            }
            match self.platform.fake_offline(pfn, nr) {
                Ok(()) => return Ok(()),
                Err(e) if e == ENOMEM => return Err(Stop::RetryLater),
                Err(_) => continue,
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

    /// Offlines and removes memory block `mb`, which has nothing plugged any more. Drops
    /// the lock meanwhile. `false` if that failed (it is tried again later).
    fn remove_block<'a>(
        &'a self,
        g: MutexGuard<'a, Inner<P::Transport>>,
        mb: usize,
    ) -> (MutexGuard<'a, Inner<P::Transport>>, bool) {
        let addr = self.geo.mb_addr(mb);
        let size = self.geo.memory_block_size;
        drop(g);
        let res = self.platform.offline_and_remove(addr, size);
        let mut g = self.inner.lock();
        match res {
            Ok(()) => {
                let Mode::Sbm(sbm) = &mut g.mode;
                sbm.removed(mb);
                (g, true)
            }
            Err(e) => {
                dev_dbg!(
                    self.dev,
                    "removing memory block {:#x} failed ({:?}); will retry\n",
                    addr,
                    e
                );
                (g, false)
            }
        }
    }

    /// Removes every block for which `wanted` holds, lowest first; `on_failure` hears of
    /// those that could not be removed. `true` if all were removed.
    fn remove_blocks<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner<P::Transport>>,
        wanted: impl Fn(&Sbm<KVVec<u64>>, usize) -> bool,
        on_failure: impl Fn(usize),
    ) -> (MutexGuard<'a, Inner<P::Transport>>, bool) {
        let mut all = true;
        let mut from = 0;
        loop {
            let Mode::Sbm(sbm) = &g.mode;
            let Some(mb) = (from..sbm.nr_mbs()).find(|&mb| wanted(sbm, mb)) else {
                return (g, all);
            };
            from = mb + 1;
            let (ng, removed) = self.remove_block(g, mb);
            g = ng;
            if !removed {
                on_failure(mb);
                all = false;
            }
        }
    }

    /// Tries to remove every added block with nothing plugged. `true` if none is left.
    fn remove_empty_blocks<'a>(
        &'a self,
        g: MutexGuard<'a, Inner<P::Transport>>,
    ) -> (MutexGuard<'a, Inner<P::Transport>>, bool) {
        self.remove_blocks(g, |sbm, mb| sbm.is_empty_added(mb), |_| {})
    }

    /// Page frame number of subblock `sb` of block `mb`.
    fn sb_pfn(&self, mb: usize, sb: usize) -> u64 {
        self.geo.sb_addr(mb, sb) >> self.page_shift
    }

    /// Pages in `count` subblocks.
    fn sb_pages(&self, count: usize) -> u64 {
        (count as u64) << (self.geo.sb_shift() - self.page_shift)
    }

    /// The memory notifier, for a range overlapping the device's region.
    pub(crate) fn memory_event(
        &self,
        event: MemEvent,
        start: u64,
        size: u64,
        movable: bool,
    ) -> NotifyAnswer {
        let mut g = self.inner.lock();
        let (removing, broken) = (g.removing, g.broken);
        let Some(mb) = self.geo.mb_exactly(start, size) else {
            if matches!(event, MemEvent::GoingOnline | MemEvent::GoingOffline) {
                dev_warn!(
                    self.dev,
                    "refusing to change {:#x}..{:#x}: not a memory block of this device\n",
                    start,
                    start + size - 1
                );
                return NotifyAnswer::Bad;
            }
            return NotifyAnswer::Done;
        };
        let Mode::Sbm(sbm) = &mut g.mode;
        let refuse = |what: &str, state: MbState| {
            dev_warn!(
                self.dev,
                "refusing to {} memory block {:#x}: it is {}\n",
                what,
                start,
                state.name()
            );
            NotifyAnswer::Bad
        };
        match event {
            MemEvent::GoingOnline if removing => return refuse("online", sbm.state(mb)),
            // After a lost or invalid answer, subblocks marked plugged may not be: nothing
            // of a broken device goes online any more.
            MemEvent::GoingOnline if broken => {
                dev_warn!(
                    self.dev,
                    "refusing to online memory block {:#x}: the device is broken, the state of \
                     its memory unknown\n",
                    start
                );
                return NotifyAnswer::Bad;
            }
            MemEvent::GoingOffline if removing => return refuse("offline", sbm.state(mb)),
            MemEvent::GoingOnline => {
                if let Err(s) = sbm.going_online(mb) {
                    return refuse("online", s);
                }
            }
            MemEvent::Online => {
                if let Err(s) = sbm.online(mb, movable) {
                    dev_err!(
                        self.dev,
                        "memory block {:#x} went online while {}\n",
                        start,
                        s.name()
                    );
                }
                if g.waiting_for_online {
                    g.waiting_for_online = false;
                    self.platform.queue_work(0);
                }
            }
            MemEvent::CancelOnline => sbm.cancel_online(mb),
            MemEvent::GoingOffline => {
                if let Err(s) = sbm.going_offline(mb) {
                    return refuse("offline", s);
                }
                for (first, count) in sbm.unplugged_runs(mb) {
                    self.platform
                        .going_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
            }
            // Core mm cancels for every notifier, also when ours refused or was never asked
            // (an earlier one refused): only undo what our GOING_OFFLINE did.
            MemEvent::CancelOffline if !(sbm.in_transition(mb) && sbm.state(mb).is_online()) => {}
            MemEvent::CancelOffline => {
                for (first, count) in sbm.unplugged_runs(mb) {
                    self.platform
                        .cancel_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
                sbm.cancel_offline(mb);
            }
            MemEvent::Offline => {
                if let Err(s) = sbm.offline(mb) {
                    dev_err!(
                        self.dev,
                        "memory block {:#x} went offline while {}\n",
                        start,
                        s.name()
                    );
                }
            }
        }
        NotifyAnswer::Ok
    }

    /// The online page callback: pages `pfn .. pfn + 2^order` of the region go online.
    /// Plugged subblocks go to the buddy, unplugged ones stay fake-offline.
    pub(crate) fn online_pages(&self, pfn: u64, mut order: u32) {
        let g = self.inner.lock();
        let Mode::Sbm(sbm) = &g.mode;
        let shift = self.page_shift;
        let sb_order = self.geo.sb_shift() - shift;
        let end = (pfn + (1 << order)) << shift;
        let mut addr = pfn << shift;
        while addr < end {
            let size = 1 << (shift + order);
            let online = match self.geo.mb_of(addr, size) {
                Some(mb) => {
                    let (first, count) = self.geo.sb_span(mb, addr, size);
                    match sbm.plugged(mb, first, count) {
                        Plugged::All => true,
                        Plugged::None => false,
                        Plugged::Mixed => {
                            // Larger than a subblock: go subblock by subblock.
                            order = sb_order;
                            continue;
                        }
                    }
                }
                // Not a block of this device (onlining it was refused): keep it away.
                None => false,
            };
            if online {
                self.platform.online_pages(addr >> shift, order);
            } else {
                self.platform.keep_fake_offline(addr >> shift, 1 << order);
            }
            addr += size;
        }
    }
}
