// SPDX-License-Identifier: GPL-2.0

//! Sub Block Mode: the worker's plug and unplug, the memory notifier and the online page
//! callback for devices whose blocks are smaller than a Linux memory block. Memory blocks
//! are added whole and their subblocks plugged, (fake) onlined, fake-offlined and unplugged
//! one by one (the bookkeeping is `sbm.rs`).

use super::{unplug_stop, Inner, MemEvent, NotifyAnswer, Stop, VirtioMem, Worker};
use crate::{
    config::Geometry,
    platform::Platform,
    protocol::{self, RequestType},
    sbm::{MbState, OnlineCursor, PlugStep, Plugged, Sbm, UnplugStep},
    status::Usage,
};
use core::fmt::{self, Write};
use kernel::{
    alloc::{KVVec, KVec},
    device::Device,
    prelude::*,
    sync::MutexGuard,
};

/// The state of a device in Sub Block Mode.
pub(super) type SbmState = Sbm<KVVec<u64>>;
type SbmInner<P> = Inner<<P as Platform>::Transport, SbmState>;
type SbmGuard<'a, P> = MutexGuard<'a, SbmInner<P>>;

/// The bookkeeping of a device in Sub Block Mode, every memory block unused.
pub(super) fn new_state(dev: &Device, geo: &Geometry, usable: u64) -> Result<SbmState> {
    let nr_mbs = usize::try_from(geo.nr_mbs).map_err(|_| ENOMEM)?;
    let sbs_per_mb = geo.sbs_per_mb() as usize;
    let words = SbmState::words_needed(nr_mbs, sbs_per_mb).ok_or(ENOMEM)?;
    let storage = KVVec::from_elem(0u64, words, GFP_KERNEL)
        .inspect_err(|_| dev_err!(dev, "no memory for the state of {} memory blocks\n", nr_mbs))?;
    let mut sbm = Sbm::new(storage, nr_mbs, sbs_per_mb).ok_or(EINVAL)?;
    sbm.set_usable_mbs(geo.usable_mbs(usable));
    sbm.set_usable_tail(geo.usable_tail(usable));
    Ok(sbm)
}

impl<P: Platform> Worker<P> for SbmState {
    fn unplug_pending(vm: &VirtioMem<P>, g: &mut SbmInner<P>) -> Result<(), Stop> {
        vm.sbm_unplug_pending(g)
    }

    fn remove_leftovers<'a>(vm: &'a VirtioMem<P>, g: SbmGuard<'a, P>) -> (SbmGuard<'a, P>, bool) {
        vm.sbm_remove_empty_blocks(g)
    }

    fn plug<'a>(
        vm: &'a VirtioMem<P>,
        g: SbmGuard<'a, P>,
        diff: u64,
    ) -> (SbmGuard<'a, P>, Result<(), Stop>) {
        vm.sbm_plug(g, diff)
    }

    fn unplug<'a>(
        vm: &'a VirtioMem<P>,
        g: SbmGuard<'a, P>,
        diff: u64,
    ) -> (SbmGuard<'a, P>, Result<(), Stop>) {
        vm.sbm_unplug(g, diff)
    }

    fn plugged_end(&self, geo: &Geometry) -> Option<u64> {
        self.plugged_end().map(|(mb, sb)| geo.sb_addr(mb, sb))
    }

    fn usage(&self, geo: &Geometry) -> Usage {
        let mut u = Usage::default();
        for mb in 0..self.nr_mbs() {
            let bytes = (self.nr_plugged(mb) as u64) << geo.sb_shift();
            match self.state(mb) {
                MbState::Movable | MbState::MovablePartial => {
                    u.online += bytes;
                    u.movable += bytes;
                }
                MbState::Kernel | MbState::KernelPartial => u.online += bytes,
                MbState::Unused | MbState::Plugged | MbState::Offline | MbState::OfflinePartial => {
                    u.offline += bytes
                }
            }
        }
        u
    }

    fn added_offline(&self) -> usize {
        self.offline_mbs()
    }

    fn write_blocks(&self, geo: &Geometry, w: &mut impl Write) -> fmt::Result {
        for mb in 0..self.nr_mbs() {
            let state = self.state(mb);
            let (what, zone) = match state {
                MbState::Unused => continue,
                MbState::Plugged => ("plugged", "-"),
                MbState::Offline | MbState::OfflinePartial => ("offline", "-"),
                MbState::Kernel | MbState::KernelPartial => ("online", "kernel"),
                MbState::Movable | MbState::MovablePartial => ("online", "movable"),
            };
            write!(
                w,
                "{:#x} {} {} {}/{} ",
                geo.mb_addr(mb),
                what,
                zone,
                self.nr_plugged(mb),
                self.sbs_per_mb()
            )?;
            // The subblock bitmap in hex, highest subblock first.
            for word in self.plugged_words(mb).iter().rev() {
                write!(w, "{:016x}", word)?;
            }
            writeln!(
                w,
                "{}",
                if self.in_transition(mb) {
                    " in_transition"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }

    fn set_usable(&mut self, geo: &Geometry, usable: u64) {
        self.set_usable_mbs(geo.usable_mbs(usable));
        self.set_usable_tail(geo.usable_tail(usable));
    }
}

impl<P: Platform> VirtioMem<P> {
    /// Sends `ty` for subblocks `first .. first + count` of block `mb`, split into requests
    /// the 16-bit block count can hold, and counts what the device ACKed in the plugged
    /// size. Returns how many subblocks were done, and why it stopped early.
    fn request_sbs(
        &self,
        g: &mut SbmInner<P>,
        ty: RequestType,
        mb: usize,
        first: usize,
        count: usize,
    ) -> (usize, Result<(), Stop>) {
        let bpsb = self.geo.blocks_per_sb();
        let mut done = 0;
        for (off, n) in protocol::split_run(count, bpsb) {
            let addr = self.geo.sb_addr(mb, first + off);
            // `split_run` keeps every request within `u16::MAX` blocks.
            let nb = (n as u64 * bpsb) as u16;
            if let Err(stop) = self.change_blocks(g, ty, addr, nb) {
                if matches!(stop, Stop::Broken) {
                    // The first such request is the one that broke the device: none is
                    // sent after it.
                    g.unknown_mb.get_or_insert(mb);
                }
                return (done, Err(stop));
            }
            done += n;
        }
        (done, Ok(()))
    }

    /// Plugs `diff` bytes. Drops and retakes the lock around adding memory.
    fn sbm_plug<'a>(
        &'a self,
        mut g: SbmGuard<'a, P>,
        diff: u64,
    ) -> (SbmGuard<'a, P>, Result<(), Stop>) {
        let target = g.plugged + diff;
        loop {
            if let Err(stop) = self.interrupted() {
                return (g, Err(stop));
            }
            let nb_sb = ((target - g.plugged) >> self.geo.sb_shift()) as usize;
            if nb_sb == 0 {
                return (g, Ok(()));
            }

            let Some(step) = g.mode.next_plug(nb_sb) else {
                return (g, Err(Stop::NoRoom));
            };
            match step {
                PlugStep::Added { mb, first, count } => {
                    let (done, res) = self.request_sbs(&mut g, RequestType::Plug, mb, first, count);

                    if done > 0 && g.mode.plugged_added(mb, first, done) {
                        self.platform
                            .fake_online(self.sb_pfn(mb, first), self.sb_pages(done));
                    }
                    if let Err(stop) = res {
                        return (g, Err(stop));
                    }
                }
                PlugStep::New { mb, count } => {
                    if g.mode.offline_mbs() >= self.offline_threshold {
                        g.waiting_for_online = true;
                        return (g, Err(Stop::WaitForOnline));
                    }
                    let (done, res) = self.request_sbs(&mut g, RequestType::Plug, mb, 0, count);
                    if done == 0 {
                        return (g, res);
                    }

                    g.mode.plugged_new(mb, done);

                    let addr = self.geo.mb_addr(mb);
                    let size = self.geo.memory_block_size;
                    let (ng, added) = self.add_unlocked(g, addr, size);
                    g = ng;

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

                        g.mode.unplugged(mb, 0, undone);
                        g.mode.add_failed(mb, undone == done);
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
    fn sbm_unplug<'a>(
        &'a self,
        mut g: SbmGuard<'a, P>,
        diff: u64,
    ) -> (SbmGuard<'a, P>, Result<(), Stop>) {
        let sb_shift = self.geo.sb_shift();
        let target = g.plugged - diff;
        // Only what this round could not free is worth explaining.
        g.last_busy = None;

        let Ok(mut tried) = KVec::from_elem(false, g.mode.nr_mbs(), GFP_KERNEL) else {
            return (g, Err(Stop::RetryLater));
        };
        // A block left with nothing plugged could not be removed: retry it later.
        let mut removal_failed = false;
        // The guest could not spare all that was asked (what it had then).
        let mut pressure = None;
        loop {
            // Between steps (a block emptied is removed first). Within an online block,
            // `fake_offline` looks before each run is taken.
            if let Err(stop) = self.interrupted() {
                return (g, Err(stop));
            }
            let nb_sb = ((g.plugged - target) >> sb_shift) as usize;

            let step = g
                .mode
                .next_unplug(nb_sb, self.platform.unplug_online(), |mb| tried[mb]);
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

                    g.mode.unplugged(mb, first, done);
                    if let Err(stop) = res {
                        return (g, Err(unplug_stop(stop)));
                    }
                    mb
                }
                UnplugStep::Online { mb } => {
                    let mut cursor = OnlineCursor::new(&g.mode);
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

                        let Some((first, count)) = cursor.next(&g.mode, mb, spare) else {
                            break;
                        };
                        match self.sbm_unplug_online(&mut g, mb, first, count) {
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

            if g.mode.plugged(mb, 0, g.mode.sbs_per_mb()) == Plugged::None {
                let (ng, removed) = self.sbm_remove_block(g, mb);
                g = ng;
                removal_failed |= !removed;
                tried[mb] = true;
            }
        }
    }

    /// Unplugs the blocks left plugged but not added (adding failed, and so did the undo
    /// UNPLUG), whatever the requested size, as the C driver's
    /// `virtio_mem_cleanup_pending_mb` does: plugging starts over from unused blocks.
    fn sbm_unplug_pending(&self, g: &mut SbmInner<P>) -> Result<(), Stop> {
        loop {
            let Some((mb, first, count)) = g.mode.next_pending() else {
                return Ok(());
            };
            let (done, res) = self.request_sbs(g, RequestType::Unplug, mb, first, count);

            if g.mode.unplugged(mb, first, done) {
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
    fn sbm_unplug_online(
        &self,
        g: &mut SbmInner<P>,
        mb: usize,
        first: usize,
        count: usize,
    ) -> Result<(), Stop> {
        let pfn = self.sb_pfn(mb, first);
        let nr = self.sb_pages(count);
        if let Err(stop) = self.fake_offline(&mut g.counters, pfn, nr) {
            if matches!(stop, Stop::RetryLater) {
                g.last_busy = Some((pfn, nr));
            }
            return Err(stop);
        }
        let (done, res) = self.request_sbs(g, RequestType::Unplug, mb, first, count);

        g.mode.unplugged(mb, first, done);
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

    /// Offlines and removes memory block `mb`, which has nothing plugged any more. Drops
    /// the lock meanwhile. `false` if that failed (it is tried again later).
    fn sbm_remove_block<'a>(&'a self, g: SbmGuard<'a, P>, mb: usize) -> (SbmGuard<'a, P>, bool) {
        let addr = self.geo.mb_addr(mb);
        let size = self.geo.memory_block_size;
        let (mut g, res) = self.remove_unlocked(g, addr, size);
        match res {
            Ok(()) => {
                g.mode.removed(mb);
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
    fn sbm_remove_blocks<'a>(
        &'a self,
        mut g: SbmGuard<'a, P>,
        wanted: impl Fn(&SbmState, usize) -> bool,
        on_failure: impl Fn(usize),
    ) -> (SbmGuard<'a, P>, bool) {
        let mut all = true;
        let mut from = 0;
        loop {
            let Some(mb) = (from..g.mode.nr_mbs()).find(|&mb| wanted(&g.mode, mb)) else {
                return (g, all);
            };
            from = mb + 1;
            let (ng, removed) = self.sbm_remove_block(g, mb);
            g = ng;
            if !removed {
                on_failure(mb);
                all = false;
            }
        }
    }

    /// Tries to remove every added block with nothing plugged. `true` if none is left.
    fn sbm_remove_empty_blocks<'a>(&'a self, g: SbmGuard<'a, P>) -> (SbmGuard<'a, P>, bool) {
        self.sbm_remove_blocks(g, |sbm, mb| sbm.is_empty_added(mb), |_| {})
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
    pub(super) fn sbm_memory_event(
        &self,
        g: &mut SbmInner<P>,
        event: MemEvent,
        start: u64,
        size: u64,
        movable: bool,
    ) -> NotifyAnswer {
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
            MemEvent::GoingOnline if removing => return refuse("online", g.mode.state(mb)),
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
            MemEvent::GoingOffline if removing => return refuse("offline", g.mode.state(mb)),
            MemEvent::GoingOnline => {
                if let Err(s) = g.mode.going_online(mb) {
                    return refuse("online", s);
                }
            }
            MemEvent::Online => {
                if let Err(s) = g.mode.online(mb, movable) {
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
            MemEvent::CancelOnline => g.mode.cancel_online(mb),
            MemEvent::GoingOffline => {
                if let Err(s) = g.mode.going_offline(mb) {
                    return refuse("offline", s);
                }
                for (first, count) in g.mode.unplugged_runs(mb) {
                    self.platform
                        .going_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
            }
            // Core mm cancels for every notifier, also when ours refused or was never asked
            // (an earlier one refused): only undo what our GOING_OFFLINE did.
            MemEvent::CancelOffline
                if !(g.mode.in_transition(mb) && g.mode.state(mb).is_online()) => {}
            MemEvent::CancelOffline => {
                for (first, count) in g.mode.unplugged_runs(mb) {
                    self.platform
                        .cancel_offline(self.sb_pfn(mb, first), self.sb_pages(count));
                }
                g.mode.cancel_offline(mb);
            }
            MemEvent::Offline => {
                if let Err(s) = g.mode.offline(mb) {
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
    pub(super) fn sbm_online_pages(&self, g: &SbmInner<P>, pfn: u64, mut order: u32) {
        let shift = self.page_shift;
        let sb_order = self.geo.sb_shift() - shift;
        let end = (pfn + (1 << order)) << shift;
        let mut addr = pfn << shift;
        while addr < end {
            let size = 1 << (shift + order);
            let online = match self.geo.mb_of(addr, size) {
                Some(mb) => {
                    let (first, count) = self.geo.sb_span(mb, addr, size);
                    match g.mode.plugged(mb, first, count) {
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
    pub(super) fn sbm_remove(&self, g: SbmGuard<'_, P>) {
        let unknown = g
            .unknown_mb
            .filter(|&mb| matches!(g.mode.state(mb), MbState::Offline | MbState::OfflinePartial));
        // An online block of unknown state stays: the device may have plugged what looks
        // empty here, and its fake-offline pages keep it from being offlined.
        let unknown_online = g.unknown_mb.filter(|&mb| g.mode.state(mb).is_online());
        if let Some(mb) = unknown_online {
            dev_warn!(
                self.dev,
                "memory block {:#x}, online, of unknown state in the device, stays added \
                 after removal, its pages not known to be plugged fake-offline\n",
                self.geo.mb_addr(mb)
            );
        }
        let (mut g, _) = self.sbm_remove_blocks(
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
            if g.mode.state(mb) == MbState::Unused {
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
}
