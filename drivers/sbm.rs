// SPDX-License-Identifier: GPL-2.0

//! Sub Block Mode bookkeeping: the state of every memory block of the region and which of
//! its subblocks are plugged, and the plan of what to plug next.
//!
//! The storage is one slice of words handed in by the caller (allocated once at probe):
//! per memory block, one word of state followed by the subblock bitmap.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

use core::{cmp::Ordering, ops::DerefMut};

/// The state of one memory block, as the C driver keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum MbState {
    /// Nothing plugged, not added to Linux.
    Unused = 0,
    /// Some subblocks plugged, not added to Linux (adding failed and so did unplugging).
    Plugged = 1,
    /// Fully plugged, added, offline.
    Offline = 2,
    /// Partially plugged, added, offline.
    OfflinePartial = 3,
    /// Fully plugged, online in a kernel zone.
    Kernel = 4,
    /// Partially plugged, online in a kernel zone.
    KernelPartial = 5,
    /// Fully plugged, online in ZONE_MOVABLE.
    Movable = 6,
    /// Partially plugged, online in ZONE_MOVABLE.
    MovablePartial = 7,
}

impl MbState {
    const fn from_bits(v: u8) -> Self {
        match v {
            1 => Self::Plugged,
            2 => Self::Offline,
            3 => Self::OfflinePartial,
            4 => Self::Kernel,
            5 => Self::KernelPartial,
            6 => Self::Movable,
            7 => Self::MovablePartial,
            _ => Self::Unused,
        }
    }

    /// Online, in any zone.
    pub(crate) const fn is_online(self) -> bool {
        matches!(
            self,
            Self::Kernel | Self::KernelPartial | Self::Movable | Self::MovablePartial
        )
    }

    /// The same state with every subblock plugged.
    const fn full(self) -> Self {
        match self {
            Self::OfflinePartial => Self::Offline,
            Self::KernelPartial => Self::Kernel,
            Self::MovablePartial => Self::Movable,
            s => s,
        }
    }

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Unused => "unused",
            Self::Plugged => "plugged",
            Self::Offline => "offline",
            Self::OfflinePartial => "offline-partial",
            Self::Kernel => "kernel",
            Self::KernelPartial => "kernel-partial",
            Self::Movable => "movable",
            Self::MovablePartial => "movable-partial",
        }
    }
}

/// Set in a block's state word while core mm onlines or offlines it (from MEM_GOING_ONLINE
/// or MEM_GOING_OFFLINE to the matching end or cancel event): its subblocks must not
/// change then.
const IN_TRANSITION: u64 = 1 << 8;

/// The next thing to plug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlugStep {
    /// Plug subblocks `first .. first + count` of a block already added to Linux.
    Added {
        mb: usize,
        first: usize,
        count: usize,
    },
    /// Plug subblocks `0 .. count` of an unused block, then add it to Linux.
    New { mb: usize, count: usize },
}

/// The next thing to unplug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnplugStep {
    /// Unplug plugged subblocks `first .. first + count` of an offline block: nothing to
    /// migrate.
    Offline {
        mb: usize,
        first: usize,
        count: usize,
    },
    /// Give back up to `nb_sb` subblocks of an online block: fake-offline (migrating what
    /// is there), then unplug; see [`OnlineCursor`].
    Online { mb: usize },
}

/// Walks the runs of an online block to give back: the whole block first, then aligned
/// halves, quarters and so on down to single subblocks, highest address first at each
/// size, fully plugged runs of at most `nb_sb` subblocks only. A run that cannot be freed
/// leaves its smaller parts to be tried after it; no run is offered twice. The cursor
/// holds no borrow, so the block may change between two calls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OnlineCursor {
    size: usize,
    index: usize,
}

impl OnlineCursor {
    pub(crate) fn new<W: DerefMut<Target = [u64]>>(sbm: &Sbm<W>) -> Self {
        let n = sbm.sbs_per_mb;
        let size = if n.is_power_of_two() { n } else { 1 };
        Self {
            size,
            index: n / size,
        }
    }

    /// The next run (first, count) of block `mb` to try.
    pub(crate) fn next<W: DerefMut<Target = [u64]>>(
        &mut self,
        sbm: &Sbm<W>,
        mb: usize,
        nb_sb: usize,
    ) -> Option<(usize, usize)> {
        while self.size > 0 {
            if self.index == 0 {
                self.size /= 2;
                self.index = sbm.sbs_per_mb.checked_div(self.size).unwrap_or(0);
                continue;
            }
            self.index -= 1;
            let first = self.index * self.size;
            if self.size <= nb_sb && sbm.plugged(mb, first, self.size) == Plugged::All {
                return Some((first, self.size));
            }
        }
        None
    }
}

/// Whether a range of subblocks is plugged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plugged {
    All,
    None,
    Mixed,
}

/// The bookkeeping of Sub Block Mode.
///
/// # Invariants
///
/// `words.len() == nr_mbs * (1 + words_per_mb)`; `sbs_per_mb <= 64 * words_per_mb`.
pub(crate) struct Sbm<W: DerefMut<Target = [u64]>> {
    words: W,
    nr_mbs: usize,
    sbs_per_mb: usize,
    words_per_mb: usize,
    /// Memory blocks `0 .. usable_mbs` lie inside the usable region, and so do subblocks
    /// `0 .. usable_tail` of block `usable_mbs` if the region ends inside it. The device
    /// refuses (ERROR) to plug anything beyond.
    usable_mbs: usize,
    usable_tail: usize,
}

impl<W: DerefMut<Target = [u64]>> Sbm<W> {
    /// Words of storage for `nr_mbs` memory blocks of `sbs_per_mb` subblocks each.
    pub(crate) fn words_needed(nr_mbs: usize, sbs_per_mb: usize) -> Option<usize> {
        nr_mbs.checked_mul(1 + sbs_per_mb.div_ceil(64))
    }

    /// Takes zeroed storage of [`Self::words_needed`] words: every block starts unused.
    pub(crate) fn new(words: W, nr_mbs: usize, sbs_per_mb: usize) -> Option<Self> {
        let words_per_mb = sbs_per_mb.div_ceil(64);
        if sbs_per_mb == 0
            || Some(words.len()) != Self::words_needed(nr_mbs, sbs_per_mb)
            || words.iter().any(|w| *w != 0)
        {
            return None;
        }
        // INVARIANT: checked just above.
        Some(Self {
            words,
            nr_mbs,
            sbs_per_mb,
            words_per_mb,
            usable_mbs: 0,
            usable_tail: 0,
        })
    }

    pub(crate) fn nr_mbs(&self) -> usize {
        self.nr_mbs
    }

    pub(crate) fn sbs_per_mb(&self) -> usize {
        self.sbs_per_mb
    }

    /// The usable region now covers memory blocks `0 .. usable_mbs`, and nothing of the
    /// next one until [`Self::set_usable_tail`] says otherwise.
    pub(crate) fn set_usable_mbs(&mut self, usable_mbs: usize) {
        self.usable_mbs = usable_mbs.min(self.nr_mbs);
        self.usable_tail = 0;
    }

    /// The usable region also covers subblocks `0 .. tail` of block `usable_mbs` (see
    /// `Geometry::usable_tail`). Called after [`Self::set_usable_mbs`].
    pub(crate) fn set_usable_tail(&mut self, tail: usize) {
        self.usable_tail = if self.usable_mbs < self.nr_mbs {
            tail.min(self.sbs_per_mb)
        } else {
            0
        };
    }

    /// How many subblocks of block `mb`, from its first, lie inside the usable region.
    fn usable_in(&self, mb: usize) -> usize {
        match mb.cmp(&self.usable_mbs) {
            Ordering::Less => self.sbs_per_mb,
            Ordering::Equal => self.usable_tail,
            Ordering::Greater => 0,
        }
    }

    fn base(&self, mb: usize) -> usize {
        mb * (1 + self.words_per_mb)
    }

    pub(crate) fn state(&self, mb: usize) -> MbState {
        MbState::from_bits(self.words[self.base(mb)] as u8)
    }

    fn set_state(&mut self, mb: usize, state: MbState) {
        let b = self.base(mb);
        self.words[b] = (self.words[b] & !0xff) | state as u64;
    }

    /// Whether core mm is onlining or offlining block `mb` right now.
    pub(crate) fn in_transition(&self, mb: usize) -> bool {
        self.words[self.base(mb)] & IN_TRANSITION != 0
    }

    fn set_in_transition(&mut self, mb: usize, on: bool) {
        let b = self.base(mb);
        if on {
            self.words[b] |= IN_TRANSITION;
        } else {
            self.words[b] &= !IN_TRANSITION;
        }
    }

    fn bit(&self, mb: usize, sb: usize) -> bool {
        self.words[self.base(mb) + 1 + sb / 64] & (1 << (sb % 64)) != 0
    }

    fn set_bits(&mut self, mb: usize, first: usize, count: usize, plugged: bool) {
        let b = self.base(mb) + 1;
        for sb in first..first + count {
            let w = &mut self.words[b + sb / 64];
            if plugged {
                *w |= 1 << (sb % 64);
            } else {
                *w &= !(1 << (sb % 64));
            }
        }
    }

    /// Whether subblocks `first .. first + count` of block `mb` are plugged.
    pub(crate) fn plugged(&self, mb: usize, first: usize, count: usize) -> Plugged {
        let n = (first..first + count)
            .filter(|&sb| self.bit(mb, sb))
            .count();
        match n {
            0 => Plugged::None,
            n if n == count => Plugged::All,
            _ => Plugged::Mixed,
        }
    }

    /// The subblock bitmap of block `mb`, lowest subblock first (bit 0 of word 0).
    pub(crate) fn plugged_words(&self, mb: usize) -> &[u64] {
        let b = self.base(mb) + 1;
        &self.words[b..b + self.words_per_mb]
    }

    /// How many subblocks of block `mb` are plugged.
    pub(crate) fn nr_plugged(&self, mb: usize) -> usize {
        self.plugged_words(mb)
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// Runs (first, count) of unplugged subblocks of block `mb`, lowest first.
    pub(crate) fn unplugged_runs(&self, mb: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.sbs_per_mb;
        let mut sb = 0;
        core::iter::from_fn(move || {
            while sb < n && self.bit(mb, sb) {
                sb += 1;
            }
            if sb >= n {
                return None;
            }
            let first = sb;
            while sb < n && !self.bit(mb, sb) {
                sb += 1;
            }
            Some((first, sb - first))
        })
    }

    /// Blocks added to Linux but offline (they count against the offline threshold).
    pub(crate) fn offline_mbs(&self) -> usize {
        (0..self.nr_mbs)
            .filter(|&mb| matches!(self.state(mb), MbState::Offline | MbState::OfflinePartial))
            .count()
    }

    /// Plans the next plug of at most `nb_sb` subblocks, in the C driver's order: partially
    /// plugged online blocks, then partially plugged offline ones, then unused blocks,
    /// lowest address first. Nothing beyond the usable region, which may end inside a block
    /// and may have shrunk below added ones (a device that shrinks it without UNPLUG_ALL,
    /// but above the plugged memory, is followed). Unused blocks are taken only if the
    /// whole block is usable, as the C driver does. `None` if there is no room left.
    pub(crate) fn next_plug(&self, nb_sb: usize) -> Option<PlugStep> {
        if nb_sb == 0 {
            return None;
        }
        let order = [
            MbState::KernelPartial,
            MbState::MovablePartial,
            MbState::OfflinePartial,
        ];
        for want in order {
            for mb in 0..self.nr_mbs {
                if self.state(mb) != want || self.in_transition(mb) {
                    continue;
                }
                // The lowest unplugged run, up to the usable end.
                let usable = self.usable_in(mb);
                let run = self.unplugged_runs(mb).next();
                if let Some((first, count)) = run.filter(|&(first, _)| first < usable) {
                    return Some(PlugStep::Added {
                        mb,
                        first,
                        count: count.min(usable - first).min(nb_sb),
                    });
                }
            }
        }
        (0..self.usable_mbs)
            .find(|&mb| self.state(mb) == MbState::Unused)
            .map(|mb| PlugStep::New {
                mb,
                count: self.sbs_per_mb.min(nb_sb),
            })
    }

    /// Subblocks `first .. first + count` of an added block were plugged. Returns whether
    /// the block is online (the caller then onlines the new subblocks).
    pub(crate) fn plugged_added(&mut self, mb: usize, first: usize, count: usize) -> bool {
        self.set_bits(mb, first, count, true);
        let state = self.state(mb);
        if self.plugged(mb, 0, self.sbs_per_mb) == Plugged::All {
            self.set_state(mb, state.full());
        }
        state.is_online()
    }

    /// Subblocks `0 .. count` of an unused block were plugged; it is about to be added.
    /// Marked offline first, so that the memory notifier finds it ready to online.
    pub(crate) fn plugged_new(&mut self, mb: usize, count: usize) {
        self.set_bits(mb, 0, count, true);
        let full = count == self.sbs_per_mb;
        self.set_state(
            mb,
            if full {
                MbState::Offline
            } else {
                MbState::OfflinePartial
            },
        );
    }

    /// Adding block `mb` failed. Its subblocks were unplugged again if `unplugged`; if
    /// not, the block stays plugged and not added.
    pub(crate) fn add_failed(&mut self, mb: usize, unplugged: bool) {
        if unplugged {
            self.set_bits(mb, 0, self.sbs_per_mb, false);
            self.set_state(mb, MbState::Unused);
        } else {
            self.set_state(mb, MbState::Plugged);
        }
    }

    /// Picks the block to unplug from next, in the C driver's order: offline-partial,
    /// offline, movable-partial, kernel-partial, movable, kernel; highest address first.
    /// Online blocks only if `online_too` (the `unplug_online` parameter). Blocks in
    /// `skip` (already tried this round) are passed over.
    pub(crate) fn next_unplug(
        &self,
        nb_sb: usize,
        online_too: bool,
        skip: impl Fn(usize) -> bool,
    ) -> Option<UnplugStep> {
        if nb_sb == 0 {
            return None;
        }
        let order = [
            MbState::OfflinePartial,
            MbState::Offline,
            MbState::MovablePartial,
            MbState::KernelPartial,
            MbState::Movable,
            MbState::Kernel,
        ];
        for want in order {
            if want.is_online() && !online_too {
                break;
            }
            for mb in (0..self.nr_mbs).rev() {
                if self.state(mb) != want || self.in_transition(mb) || skip(mb) {
                    continue;
                }
                if !want.is_online() {
                    // Highest plugged run first.
                    if let Some((first, count)) = self.plugged_runs_rev(mb).next() {
                        // The top of the run.
                        let take = count.min(nb_sb);
                        return Some(UnplugStep::Offline {
                            mb,
                            first: first + count - take,
                            count: take,
                        });
                    }
                    continue;
                }
                if self.plugged(mb, 0, self.sbs_per_mb) != Plugged::None {
                    return Some(UnplugStep::Online { mb });
                }
            }
        }
        None
    }

    /// Runs (first, count) of plugged subblocks of block `mb`, highest first.
    fn plugged_runs_rev(&self, mb: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut end = self.sbs_per_mb;
        core::iter::from_fn(move || {
            while end > 0 && !self.bit(mb, end - 1) {
                end -= 1;
            }
            if end == 0 {
                return None;
            }
            let last = end;
            while end > 0 && self.bit(mb, end - 1) {
                end -= 1;
            }
            Some((end, last - end))
        })
    }

    /// Subblocks `first .. first + count` of block `mb` were unplugged. Returns whether
    /// the block has no plugged subblock left (it can be removed).
    pub(crate) fn unplugged(&mut self, mb: usize, first: usize, count: usize) -> bool {
        if count == 0 {
            // Nothing changed (BUSY, NACK): the block keeps its state.
            return self.plugged(mb, 0, self.sbs_per_mb) == Plugged::None;
        }
        self.set_bits(mb, first, count, false);
        let empty = self.plugged(mb, 0, self.sbs_per_mb) == Plugged::None;
        let next = match self.state(mb) {
            MbState::Offline => MbState::OfflinePartial,
            MbState::Kernel => MbState::KernelPartial,
            MbState::Movable => MbState::MovablePartial,
            // Never added: nothing is left to remove.
            MbState::Plugged if empty => MbState::Unused,
            s => s,
        };
        self.set_state(mb, next);
        empty
    }

    /// Where plugged memory ends: the block of the highest plugged subblock and the
    /// subblock after it (possibly `sbs_per_mb`). `None` if nothing is plugged.
    pub(crate) fn plugged_end(&self) -> Option<(usize, usize)> {
        (0..self.nr_mbs).rev().find_map(|mb| {
            self.plugged_runs_rev(mb)
                .next()
                .map(|(first, count)| (mb, first + count))
        })
    }

    /// The highest plugged run (mb, first, count) of a block left plugged but not added,
    /// lowest such block first.
    pub(crate) fn next_pending(&self) -> Option<(usize, usize, usize)> {
        (0..self.nr_mbs)
            .filter(|&mb| self.state(mb) == MbState::Plugged)
            .find_map(|mb| {
                self.plugged_runs_rev(mb)
                    .next()
                    .map(|(first, count)| (mb, first, count))
            })
    }

    /// Whether block `mb` is added with no plugged subblock left: it waits to be removed.
    pub(crate) fn is_empty_added(&self, mb: usize) -> bool {
        let s = self.state(mb);
        s != MbState::Unused
            && s != MbState::Plugged
            && !self.in_transition(mb)
            && self.plugged(mb, 0, self.sbs_per_mb) == Plugged::None
    }

    /// Block `mb` was removed from Linux.
    pub(crate) fn removed(&mut self, mb: usize) {
        self.set_bits(mb, 0, self.sbs_per_mb, false);
        self.set_state(mb, MbState::Unused);
    }

    /// MEM_GOING_ONLINE: only blocks this driver added and that are offline may go online.
    pub(crate) fn going_online(&mut self, mb: usize) -> Result<(), MbState> {
        match self.state(mb) {
            MbState::Offline | MbState::OfflinePartial => {
                self.set_in_transition(mb, true);
                Ok(())
            }
            s => Err(s),
        }
    }

    /// MEM_ONLINE, in ZONE_MOVABLE or not.
    pub(crate) fn online(&mut self, mb: usize, movable: bool) -> Result<(), MbState> {
        self.set_in_transition(mb, false);
        let new = match (self.state(mb), movable) {
            (MbState::Offline, false) => MbState::Kernel,
            (MbState::Offline, true) => MbState::Movable,
            (MbState::OfflinePartial, false) => MbState::KernelPartial,
            (MbState::OfflinePartial, true) => MbState::MovablePartial,
            (s, _) => return Err(s),
        };
        self.set_state(mb, new);
        Ok(())
    }

    /// MEM_CANCEL_ONLINE.
    pub(crate) fn cancel_online(&mut self, mb: usize) {
        self.set_in_transition(mb, false);
    }

    /// MEM_GOING_OFFLINE: only online blocks go offline.
    pub(crate) fn going_offline(&mut self, mb: usize) -> Result<(), MbState> {
        match self.state(mb) {
            s if s.is_online() => {
                self.set_in_transition(mb, true);
                Ok(())
            }
            s => Err(s),
        }
    }

    /// MEM_CANCEL_OFFLINE.
    pub(crate) fn cancel_offline(&mut self, mb: usize) {
        self.set_in_transition(mb, false);
    }

    /// MEM_OFFLINE.
    pub(crate) fn offline(&mut self, mb: usize) -> Result<(), MbState> {
        self.set_in_transition(mb, false);
        let new = match self.state(mb) {
            MbState::Kernel | MbState::Movable => MbState::Offline,
            MbState::KernelPartial | MbState::MovablePartial => MbState::OfflinePartial,
            s => return Err(s),
        };
        self.set_state(mb, new);
        Ok(())
    }
}
