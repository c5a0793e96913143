// SPDX-License-Identifier: GPL-2.0

//! Big Block Mode: the worker's plug and unplug, the memory notifier and the online page
//! callback for devices whose blocks are not smaller than a Linux memory block (or when
//! `force_bbm` asks for it). Memory is plugged, added, removed and unplugged a whole big
//! block at a time (the bookkeeping is `bbm.rs`); online memory is given back by taking
//! every online memory block of a big block from the kernel (fake-offline), then offlining
//! and removing the big block, then UNPLUG.

use super::{unplug_stop, Inner, MemEvent, NotifyAnswer, Stop, VirtioMem, Worker};
use crate::{
    bbm::{BbState, Bbm, FakeOffline, Refused, UnplugPass},
    config::Geometry,
    platform::Platform,
    protocol::{self, RequestType},
    status::Usage,
};
use core::fmt::{self, Write};
use kernel::{
    alloc::{KVVec, KVec},
    device::Device,
    prelude::*,
    sync::MutexGuard,
};

/// The state of a device in Big Block Mode.
pub(super) struct BbmState {
    /// Every big block's state and its online memory blocks.
    pub(super) bbm: Bbm<KVVec<u64>>,
    /// A big block in state plugged of which only device blocks `first .. first + nb` are
    /// plugged: a plug or unplug of more than 65535 device blocks (several requests) that
    /// stopped half way. There is at most one: the round stops there, and the next one
    /// unplugs it before anything else.
    partial: Option<Partial>,
}

#[derive(Clone, Copy)]
struct Partial {
    bb: usize,
    first: u64,
    nb: u64,
}

type BbmInner<P> = Inner<<P as Platform>::Transport, BbmState>;
type BbmGuard<'a, P> = MutexGuard<'a, BbmInner<P>>;

/// The bookkeeping of a device in Big Block Mode, every big block unused.
pub(super) fn new_state(dev: &Device, geo: &Geometry, usable: u64) -> Result<BbmState> {
    let nr_bbs = usize::try_from(geo.nr_bbs).map_err(|_| ENOMEM)?;
    let mbs_per_bb = usize::try_from(geo.mbs_per_bb()).map_err(|_| ENOMEM)?;
    let words = Bbm::<KVVec<u64>>::words_needed(nr_bbs, mbs_per_bb).ok_or(ENOMEM)?;
    let storage = KVVec::from_elem(0u64, words, GFP_KERNEL)
        .inspect_err(|_| dev_err!(dev, "no memory for the state of {} big blocks\n", nr_bbs))?;
    let mut bbm = Bbm::new(storage, nr_bbs, mbs_per_bb).ok_or(EINVAL)?;
    bbm.set_usable_bbs(geo.usable_bbs(usable));
    Ok(BbmState { bbm, partial: None })
}

impl<P: Platform> Worker<P> for BbmState {
    fn unplug_pending(vm: &VirtioMem<P>, g: &mut BbmInner<P>) -> Result<(), Stop> {
        vm.bbm_unplug_pending(g)
    }

    /// Nothing: a big block is unplugged right after its removal, and one whose UNPLUG
    /// failed is pending.
    fn remove_leftovers<'a>(_vm: &'a VirtioMem<P>, g: BbmGuard<'a, P>) -> (BbmGuard<'a, P>, bool) {
        (g, true)
    }

    fn plug<'a>(
        vm: &'a VirtioMem<P>,
        g: BbmGuard<'a, P>,
        diff: u64,
    ) -> (BbmGuard<'a, P>, Result<(), Stop>) {
        vm.bbm_plug(g, diff)
    }

    fn unplug<'a>(
        vm: &'a VirtioMem<P>,
        g: BbmGuard<'a, P>,
        diff: u64,
    ) -> (BbmGuard<'a, P>, Result<(), Stop>) {
        vm.bbm_unplug(g, diff)
    }

    fn plugged_end(&self, geo: &Geometry) -> Option<u64> {
        (0..self.bbm.nr_bbs())
            .rev()
            .find(|&bb| self.bbm.state(bb) != BbState::Unused)
            .map(|bb| geo.bb_addr(bb) + geo.bb_size)
    }

    fn set_usable(&mut self, geo: &Geometry, usable: u64) {
        self.bbm.set_usable_bbs(geo.usable_bbs(usable));
    }

    fn usage(&self, geo: &Geometry) -> Usage {
        let mut u = Usage::default();
        let mb_size = geo.memory_block_size;
        for bb in 0..self.bbm.nr_bbs() {
            match self.bbm.state(bb) {
                BbState::Unused => {}
                // Plugged, not added: offline; maybe only partly plugged.
                BbState::Plugged => {
                    u.offline += match self.partial {
                        Some(p) if p.bb == bb => p.nb << geo.device_block_size.trailing_zeros(),
                        _ => geo.bb_size,
                    }
                }
                // Being unplugged: taken from the kernel.
                BbState::FakeOffline => u.offline += geo.bb_size,
                BbState::Added => {
                    let online = self.bbm.online_mbs(bb).count() as u64 * mb_size;
                    let movable = self.bbm.movable_mbs(bb) as u64 * mb_size;
                    u.online += online;
                    u.movable += movable;
                    u.offline += geo.bb_size - online;
                }
            }
        }
        u
    }

    fn added_offline(&self) -> usize {
        self.bbm.offline_bbs()
    }

    fn write_blocks(&self, geo: &Geometry, w: &mut impl Write) -> fmt::Result {
        let mbs = self.bbm.mbs_per_bb();
        for bb in 0..self.bbm.nr_bbs() {
            let state = self.bbm.state(bb);
            if state == BbState::Unused {
                continue;
            }
            let online = self.bbm.online_mbs(bb).count();
            let movable = self.bbm.movable_mbs(bb);
            let zone = match (online, movable) {
                (0, _) => "-",
                (o, m) if o == m => "movable",
                (_, 0) => "kernel",
                _ => "mixed",
            };
            write!(
                w,
                "{:#x} {} {} online {}/{} movable {}",
                geo.bb_addr(bb),
                state.name(),
                zone,
                online,
                mbs,
                movable
            )?;
            match self.partial {
                Some(p) if p.bb == bb => writeln!(
                    w,
                    " partly plugged: device blocks {}..{}",
                    p.first,
                    p.first + p.nb
                )?,
                _ => writeln!(w)?,
            }
        }
        Ok(())
    }
}

impl<P: Platform> VirtioMem<P> {
    /// Sends `ty` for device blocks `first .. first + nb` of big block `bb`, in requests of
    /// at most 65535 blocks, and counts what the device ACKed in the plugged size. Returns
    /// how many blocks were done, and why it stopped early.
    fn bbm_request(
        &self,
        g: &mut BbmInner<P>,
        ty: RequestType,
        bb: usize,
        first: u64,
        nb: u64,
    ) -> (u64, Result<(), Stop>) {
        let shift = self.geo.device_block_size.trailing_zeros();
        let base = self.geo.bb_addr(bb);
        let mut done = 0;
        for (off, n) in protocol::split_run(nb as usize, 1) {
            let addr = base + ((first + off as u64) << shift);
            // `split_run` keeps every request within `u16::MAX` blocks.
            if let Err(stop) = self.change_blocks(g, ty, addr, n as u16) {
                if matches!(stop, Stop::Broken) {
                    // What the device did with this big block is unknown.
                    g.unknown_mb.get_or_insert(bb);
                }
                return (done, Err(stop));
            }
            done += n as u64;
        }
        (done, Ok(()))
    }

    /// Big block `bb` (plugged, not added) has device blocks `first .. first + nb`
    /// plugged after a request stopped half way; `false` if another big block is partly
    /// plugged already (then the device is marked broken: this driver cannot say what of
    /// it is plugged any more).
    fn bbm_left_partial(&self, g: &mut BbmInner<P>, bb: usize, first: u64, nb: u64) -> bool {
        match g.mode.partial {
            Some(p) if p.bb != bb => {
                dev_err!(
                    self.dev,
                    "big blocks {:#x} and {:#x} are both partly plugged: device marked broken\n",
                    self.geo.bb_addr(p.bb),
                    self.geo.bb_addr(bb)
                );
                g.broken = true;
                false
            }
            _ => {
                g.mode.partial = (nb > 0).then_some(Partial { bb, first, nb });
                true
            }
        }
    }

    /// Unplugs the big blocks left plugged but not added (adding failed and so did the
    /// undo, or UNPLUG failed after the removal), whatever the requested size, as the C
    /// driver's `virtio_mem_bbm_unplug_request` does before anything else.
    fn bbm_unplug_pending(&self, g: &mut BbmInner<P>) -> Result<(), Stop> {
        loop {
            let Some(bb) = g.mode.bbm.next_pending() else {
                return Ok(());
            };
            let (first, nb) = match g.mode.partial {
                Some(p) if p.bb == bb => (p.first, p.nb),
                _ => (0, self.geo.blocks_per_bb()),
            };
            let (done, res) = self.bbm_request(g, RequestType::Unplug, bb, first, nb);
            if done == nb {
                g.mode.partial = None;
                g.mode.bbm.unplugged(bb);
                dev_info!(
                    self.dev,
                    "big block {:#x}, not added, is unplugged again\n",
                    self.geo.bb_addr(bb)
                );
            } else if done > 0 && !self.bbm_left_partial(g, bb, first + done, nb - done) {
                return Err(Stop::Broken);
            }
            res.map_err(unplug_stop)?;
        }
    }

    /// Plugs and adds whole big blocks while `diff` bytes hold one more, lowest address
    /// first. Drops and retakes the lock around adding memory.
    fn bbm_plug<'a>(
        &'a self,
        mut g: BbmGuard<'a, P>,
        diff: u64,
    ) -> (BbmGuard<'a, P>, Result<(), Stop>) {
        let target = g.plugged + diff;
        let nb = self.geo.blocks_per_bb();
        loop {
            if let Err(stop) = self.interrupted() {
                return (g, Err(stop));
            }
            if target - g.plugged < self.geo.bb_size {
                return (g, Ok(()));
            }
            let Some(bb) = g.mode.bbm.next_plug() else {
                return (g, Err(Stop::NoRoom));
            };
            if g.mode.bbm.offline_bbs() >= self.offline_threshold {
                g.waiting_for_online = true;
                return (g, Err(Stop::WaitForOnline));
            }
            let (done, res) = self.bbm_request(&mut g, RequestType::Plug, bb, 0, nb);
            if done < nb {
                // Stopped half way (only with more than 65535 blocks): give back what was
                // plugged.
                if done > 0 {
                    let (undone, _) = self.bbm_request(&mut g, RequestType::Unplug, bb, 0, done);
                    if undone < done {
                        g.mode.bbm.add_failed(bb, false);
                        if !self.bbm_left_partial(&mut g, bb, undone, done - undone) {
                            return (g, Err(Stop::Broken));
                        }
                    }
                }
                return (g, res);
            }
            // Added before it is: the memory notifier lets it go online.
            g.mode.bbm.plugged_new(bb);
            let (addr, size) = (self.geo.bb_addr(bb), self.geo.bb_size);
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
                let (undone, _) = self.bbm_request(&mut g, RequestType::Unplug, bb, 0, nb);
                g.mode.bbm.add_failed(bb, undone == nb);
                if undone > 0
                    && undone < nb
                    && !self.bbm_left_partial(&mut g, bb, undone, nb - undone)
                {
                    return (g, Err(Stop::Broken));
                }
                let stop = if g.broken {
                    Stop::Broken
                } else {
                    Stop::RetryLater
                };
                return (g, Err(stop));
            }
        }
    }

    /// Unplugs whole big blocks while `diff` bytes hold one more, in the C driver's three
    /// passes (all memory offline, all online memory in ZONE_MOVABLE, any; the last two
    /// only with `unplug_online`), highest address first. A big block whose memory cannot
    /// be taken or removed now is left as it was and the next one is tried.
    fn bbm_unplug<'a>(
        &'a self,
        mut g: BbmGuard<'a, P>,
        diff: u64,
    ) -> (BbmGuard<'a, P>, Result<(), Stop>) {
        let target = g.plugged - diff;
        // Only what this round could not free is worth explaining.
        g.last_busy = None;
        let Ok(mut tried) = KVec::from_elem(false, g.mode.bbm.nr_bbs(), GFP_KERNEL) else {
            return (g, Err(Stop::RetryLater));
        };
        for pass in UnplugPass::ALL {
            if pass != UnplugPass::Offline && !self.platform.unplug_online() {
                break;
            }
            loop {
                if let Err(stop) = self.interrupted() {
                    return (g, Err(stop));
                }
                if g.plugged - target < self.geo.bb_size {
                    return (g, Ok(()));
                }
                let Some(bb) = g.mode.bbm.next_unplug(pass, |bb| tried[bb]) else {
                    break;
                };
                tried[bb] = true;
                let (ng, res) = self.bbm_unplug_bb(g, bb);
                g = ng;
                match res {
                    // Busy memory, or the removal failed: the next big block.
                    Ok(()) | Err(Stop::RetryLater) => {}
                    Err(stop) => return (g, Err(unplug_stop(stop))),
                }
            }
        }
        // Nothing more to try this round; what is left waits for the next one.
        (g, Err(Stop::RetryLater))
    }

    /// Pages (first pfn, count) of memory block `mb` of big block `bb`.
    fn bbm_mb_pages(&self, bb: usize, mb: usize) -> (u64, u64) {
        let addr = self.geo.bb_addr(bb) + ((mb as u64) * self.geo.memory_block_size);
        (
            addr >> self.page_shift,
            self.geo.memory_block_size >> self.page_shift,
        )
    }

    /// Hands the online memory blocks of big block `bb` below `upto` back to the kernel
    /// (they were fake-offlined for an unplug that failed) and marks it added again.
    fn bbm_abort_unplug(&self, g: &mut BbmInner<P>, bb: usize, upto: usize) {
        for mb in 0..upto {
            // A memory block offlined meanwhile (and not onlined again: it may not be while
            // the big block is fake-offline) has its pages out of the buddy already.
            if g.mode.bbm.is_online(bb, mb) {
                let (pfn, nr) = self.bbm_mb_pages(bb, mb);
                self.platform.fake_online(pfn, nr);
            }
        }
        g.mode.bbm.abort_unplug(bb);
    }

    /// Unplugs added big block `bb`: marks it fake-offline (no memory block of it goes
    /// online from now on, and the memory notifier drops the page references as its memory
    /// blocks go offline), takes every online memory block of it from the kernel, offlines
    /// and removes it, and UNPLUGs it. Until it is removed, any failure hands the pages
    /// back and leaves it added as it was (`RetryLater`, `Pressure`, ...). After the
    /// removal it is plugged and not added: a failed UNPLUG is retried first thing next
    /// round.
    fn bbm_unplug_bb<'a>(
        &'a self,
        mut g: BbmGuard<'a, P>,
        bb: usize,
    ) -> (BbmGuard<'a, P>, Result<(), Stop>) {
        let mbs = g.mode.bbm.mbs_per_bb();
        let online = g.mode.bbm.online_mbs(bb).count() as u64;
        if online > 0 {
            // Not a single page unless the guest can spare them all.
            let info = self.platform.mem_info();
            if !info.may_take(online * self.geo.memory_block_size) {
                return (g, Err(Stop::Pressure(info)));
            }
        }
        if !g.mode.bbm.start_unplug(bb) {
            return (g, Err(Stop::RetryLater));
        }
        for mb in 0..mbs {
            if !g.mode.bbm.is_online(bb, mb) {
                continue;
            }
            let (pfn, nr) = self.bbm_mb_pages(bb, mb);
            if let Err(stop) = self.fake_offline(&mut g.counters, pfn, nr) {
                if matches!(stop, Stop::RetryLater) {
                    g.last_busy = Some((pfn, nr));
                }
                self.bbm_abort_unplug(&mut g, bb, mb);
                return (g, Err(stop));
            }
        }
        let (addr, size) = (self.geo.bb_addr(bb), self.geo.bb_size);
        let (ng, res) = self.remove_unlocked(g, addr, size);
        g = ng;
        if let Err(e) = res {
            dev_dbg!(
                self.dev,
                "removing big block {:#x} failed ({:?}); will retry\n",
                addr,
                e
            );
            self.bbm_abort_unplug(&mut g, bb, mbs);
            return (g, Err(Stop::RetryLater));
        }
        g.mode.bbm.removed(bb);
        let nb = self.geo.blocks_per_bb();
        let (done, res) = self.bbm_request(&mut g, RequestType::Unplug, bb, 0, nb);
        if done == nb {
            g.mode.bbm.unplugged(bb);
        } else if done > 0 && !self.bbm_left_partial(&mut g, bb, done, nb - done) {
            return (g, Err(Stop::Broken));
        }
        (g, res)
    }

    /// The memory notifier in Big Block Mode: events are per memory block, and each must
    /// lie in one big block of this device. Onlining is refused for a big block this driver
    /// did not add or is unplugging; GOING_OFFLINE of a memory block of a big block being
    /// unplugged drops the references of its fake-offline pages, CANCEL_OFFLINE takes them
    /// back.
    pub(super) fn bbm_memory_event(
        &self,
        g: &mut BbmInner<P>,
        event: MemEvent,
        start: u64,
        size: u64,
        movable: bool,
    ) -> NotifyAnswer {
        let removing = g.removing;
        let Some((bb, mb)) = self.geo.bb_mb_exactly(start, size) else {
            if matches!(event, MemEvent::GoingOnline | MemEvent::GoingOffline) {
                dev_warn!(
                    self.dev,
                    "refusing to change {:#x}..{:#x}: not a memory block of this device's big \
                     blocks\n",
                    start,
                    start + size - 1
                );
                return NotifyAnswer::Bad;
            }
            return NotifyAnswer::Done;
        };
        let bb_addr = self.geo.bb_addr(bb);
        let refuse = |what: &str, Refused(state): Refused| {
            dev_warn!(
                self.dev,
                "refusing to {} memory block {:#x}: its big block {:#x} is {}\n",
                what,
                start,
                bb_addr,
                state.name()
            );
            NotifyAnswer::Bad
        };
        let bbm = &mut g.mode.bbm;
        match event {
            MemEvent::GoingOnline if removing => return refuse("online", Refused(bbm.state(bb))),
            MemEvent::GoingOffline if removing => return refuse("offline", Refused(bbm.state(bb))),
            // A big block is added only once the device ACKed all of it: even after a lost
            // answer (a broken device) an added one is plugged for certain.
            MemEvent::GoingOnline => {
                if let Err(r) = bbm.going_online(bb) {
                    return refuse("online", r);
                }
            }
            MemEvent::Online => {
                if let Err(Refused(s)) = bbm.online(bb, mb, movable) {
                    dev_err!(
                        self.dev,
                        "memory block {:#x} went online while its big block was {}\n",
                        start,
                        s.name()
                    );
                }
                if g.waiting_for_online {
                    g.waiting_for_online = false;
                    self.platform.queue_work(0);
                }
            }
            MemEvent::CancelOnline => bbm.cancel_online(bb),
            MemEvent::GoingOffline => match bbm.going_offline(bb, mb) {
                Err(r) => return refuse("offline", r),
                Ok(FakeOffline::Yes) => {
                    let (pfn, nr) = self.bbm_mb_pages(bb, mb);
                    self.platform.going_offline(pfn, nr);
                }
                Ok(FakeOffline::No) => {}
            },
            // Core mm cancels for every notifier, also when ours refused or was never asked
            // (an earlier one refused): only undo what our GOING_OFFLINE did.
            MemEvent::CancelOffline if !(bbm.in_transition(bb) && bbm.is_online(bb, mb)) => {}
            MemEvent::CancelOffline => {
                if bbm.cancel_offline(bb) == FakeOffline::Yes {
                    let (pfn, nr) = self.bbm_mb_pages(bb, mb);
                    self.platform.cancel_offline(pfn, nr);
                }
            }
            MemEvent::Offline => {
                if let Err(Refused(s)) = bbm.offline(bb, mb) {
                    dev_err!(
                        self.dev,
                        "memory block {:#x} went offline while its big block was {}\n",
                        start,
                        s.name()
                    );
                }
            }
        }
        NotifyAnswer::Ok
    }

    /// The online page callback in Big Block Mode: pages of an added big block go to the
    /// buddy; those of a big block being unplugged (or not added) stay fake-offline.
    pub(super) fn bbm_online_pages(&self, g: &BbmInner<P>, pfn: u64, order: u32) {
        let shift = self.page_shift;
        let added = self
            .geo
            .bb_of(pfn << shift, 1 << (shift + order))
            .is_some_and(|bb| g.mode.bbm.state(bb) == BbState::Added);
        if added {
            self.platform.online_pages(pfn, order);
        } else {
            self.platform.keep_fake_offline(pfn, 1 << order);
        }
    }

    /// The device goes away in Big Block Mode. Every added big block is plugged as a whole
    /// (added only once the device ACKed all of it), so onlining it later is safe: all stay
    /// added, as with the C driver. Onlining and offlining are refused from now on.
    pub(super) fn bbm_remove(&self, mut g: BbmGuard<'_, P>) {
        g.removing = true;
        if g.plugged != 0 {
            dev_warn!(self.dev, "removed with {:#x} still plugged\n", g.plugged);
        }
    }
}
