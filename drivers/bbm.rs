// SPDX-License-Identifier: GPL-2.0

//! Big Block Mode bookkeeping: the state of every big block of the region, which of its
//! memory blocks are online and in which zone, and the plan of what to plug or unplug next.
//!
//! In Big Block Mode a device block is not smaller than a Linux memory block, so memory is
//! plugged, added, removed and unplugged a whole big block at a time (one or more memory
//! blocks). The storage is one slice of words handed in by the caller (allocated once at
//! probe): per big block, one word of state followed by two bitmaps of its memory blocks,
//! online and online in ZONE_MOVABLE.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

use core::ops::DerefMut;

/// The state of one big block, as the C driver keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum BbState {
    /// Not plugged, not added to Linux.
    Unused = 0,
    /// Plugged, not added to Linux: adding failed and so did unplugging, or it was removed
    /// and its UNPLUG failed. Unplugged again before anything else.
    Plugged = 1,
    /// Plugged and added to Linux (its memory blocks online or offline).
    Added = 2,
    /// Added, and being unplugged: its online memory is being taken from the kernel
    /// (fake-offline) and no memory block of it may go online.
    FakeOffline = 3,
}

impl BbState {
    const fn from_bits(v: u8) -> Self {
        match v {
            1 => Self::Plugged,
            2 => Self::Added,
            3 => Self::FakeOffline,
            _ => Self::Unused,
        }
    }

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Unused => "unused",
            Self::Plugged => "plugged",
            Self::Added => "added",
            Self::FakeOffline => "fake-offline",
        }
    }
}

/// In a big block's state word: how many of its memory blocks core mm is onlining or
/// offlining right now (from MEM_GOING_ONLINE or MEM_GOING_OFFLINE to the matching end or
/// cancel event). A big block in transition is neither unplugged nor removed.
const TRANSITION_SHIFT: u32 = 16;
const STATE_MASK: u64 = 0xff;

/// Which added big blocks an unplug pass takes, in the C driver's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UnplugPass {
    /// Every memory block offline: nothing to migrate.
    Offline,
    /// Every online memory block in ZONE_MOVABLE: migration should succeed.
    Movable,
    /// Any.
    Any,
}

impl UnplugPass {
    /// The passes, in order.
    pub(crate) const ALL: [Self; 3] = [Self::Offline, Self::Movable, Self::Any];
}

/// What a memory block's GOING_OFFLINE or CANCEL_OFFLINE means for its fake-offline pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FakeOffline {
    /// The big block is being unplugged: drop (GOING_OFFLINE) or take back
    /// (CANCEL_OFFLINE) the references of the memory block's fake-offline pages.
    Yes,
    /// Nothing of it is fake-offline.
    No,
}

/// A notifier event that does not fit the big block's state: the state it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) BbState);

/// The bookkeeping of Big Block Mode.
///
/// # Invariants
///
/// `words.len() == nr_bbs * (1 + 2 * words_per_map)`; `mbs_per_bb <= 64 * words_per_map`
/// and `mbs_per_bb >= 1`; the movable bitmap of a big block is a subset of its online
/// bitmap.
pub(crate) struct Bbm<W: DerefMut<Target = [u64]>> {
    words: W,
    nr_bbs: usize,
    mbs_per_bb: usize,
    words_per_map: usize,
    /// Big blocks `0 .. usable_bbs` lie fully inside the usable region; the device refuses
    /// (ERROR) to plug anything beyond.
    usable_bbs: usize,
}

impl<W: DerefMut<Target = [u64]>> Bbm<W> {
    /// Words of storage for `nr_bbs` big blocks of `mbs_per_bb` memory blocks each.
    pub(crate) fn words_needed(nr_bbs: usize, mbs_per_bb: usize) -> Option<usize> {
        let per_map = mbs_per_bb.div_ceil(64);
        nr_bbs.checked_mul(per_map.checked_mul(2)?.checked_add(1)?)
    }

    /// Takes zeroed storage of [`Self::words_needed`] words: every big block starts unused.
    pub(crate) fn new(words: W, nr_bbs: usize, mbs_per_bb: usize) -> Option<Self> {
        if mbs_per_bb == 0
            || Some(words.len()) != Self::words_needed(nr_bbs, mbs_per_bb)
            || words.iter().any(|w| *w != 0)
        {
            return None;
        }
        // INVARIANT: checked just above; zeroed bitmaps are empty.
        Some(Self {
            words,
            nr_bbs,
            mbs_per_bb,
            words_per_map: mbs_per_bb.div_ceil(64),
            usable_bbs: 0,
        })
    }

    pub(crate) fn nr_bbs(&self) -> usize {
        self.nr_bbs
    }

    pub(crate) fn mbs_per_bb(&self) -> usize {
        self.mbs_per_bb
    }

    /// The usable region now covers big blocks `0 .. usable_bbs`.
    pub(crate) fn set_usable_bbs(&mut self, usable_bbs: usize) {
        self.usable_bbs = usable_bbs.min(self.nr_bbs);
    }

    fn base(&self, bb: usize) -> usize {
        bb * (1 + 2 * self.words_per_map)
    }

    pub(crate) fn state(&self, bb: usize) -> BbState {
        BbState::from_bits((self.words[self.base(bb)] & STATE_MASK) as u8)
    }

    fn set_state(&mut self, bb: usize, state: BbState) {
        let b = self.base(bb);
        self.words[b] = (self.words[b] & !STATE_MASK) | state as u64;
    }

    /// How many memory blocks of big block `bb` core mm is onlining or offlining now.
    fn transitions(&self, bb: usize) -> u64 {
        self.words[self.base(bb)] >> TRANSITION_SHIFT
    }

    /// Whether core mm is onlining or offlining a memory block of big block `bb` now.
    pub(crate) fn in_transition(&self, bb: usize) -> bool {
        self.transitions(bb) != 0
    }

    fn begin_transition(&mut self, bb: usize) {
        let b = self.base(bb);
        self.words[b] = self.words[b].saturating_add(1 << TRANSITION_SHIFT);
    }

    fn end_transition(&mut self, bb: usize) {
        if self.in_transition(bb) {
            let b = self.base(bb);
            self.words[b] -= 1 << TRANSITION_SHIFT;
        }
    }

    /// Word and bit of memory block `mb` (0-based inside big block `bb`) in the online
    /// (`movable == false`) or movable bitmap.
    fn bit_pos(&self, bb: usize, mb: usize, movable: bool) -> (usize, u64) {
        let map = self.base(bb) + 1 + if movable { self.words_per_map } else { 0 };
        (map + mb / 64, 1 << (mb % 64))
    }

    fn bit(&self, bb: usize, mb: usize, movable: bool) -> bool {
        let (w, m) = self.bit_pos(bb, mb, movable);
        self.words[w] & m != 0
    }

    fn set_bit(&mut self, bb: usize, mb: usize, movable: bool, on: bool) {
        let (w, m) = self.bit_pos(bb, mb, movable);
        if on {
            self.words[w] |= m;
        } else {
            self.words[w] &= !m;
        }
    }

    /// Whether memory block `mb` of big block `bb` is online.
    pub(crate) fn is_online(&self, bb: usize, mb: usize) -> bool {
        self.bit(bb, mb, false)
    }

    /// The online memory blocks of big block `bb`, lowest first.
    pub(crate) fn online_mbs(&self, bb: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.mbs_per_bb).filter(move |&mb| self.bit(bb, mb, false))
    }

    /// How many memory blocks of big block `bb` are online in ZONE_MOVABLE.
    pub(crate) fn movable_mbs(&self, bb: usize) -> usize {
        (0..self.mbs_per_bb)
            .filter(|&mb| self.bit(bb, mb, true))
            .count()
    }

    /// Whether every memory block of big block `bb` is offline.
    pub(crate) fn all_offline(&self, bb: usize) -> bool {
        self.online_mbs(bb).next().is_none()
    }

    /// Whether every online memory block of big block `bb` is in ZONE_MOVABLE.
    pub(crate) fn all_movable(&self, bb: usize) -> bool {
        self.online_mbs(bb).all(|mb| self.bit(bb, mb, true))
    }

    /// Big blocks added to Linux with every memory block offline (they count against the
    /// offline threshold).
    pub(crate) fn offline_bbs(&self) -> usize {
        (0..self.nr_bbs)
            .filter(|&bb| self.state(bb) == BbState::Added && self.all_offline(bb))
            .count()
    }

    /// The next big block to plug and add: the lowest unused one inside the usable region.
    /// `None` if there is no room left.
    pub(crate) fn next_plug(&self) -> Option<usize> {
        (0..self.usable_bbs).find(|&bb| self.state(bb) == BbState::Unused)
    }

    /// Big block `bb` was plugged and is about to be added: marked added first, so that
    /// the memory notifier lets it go online.
    pub(crate) fn plugged_new(&mut self, bb: usize) {
        self.set_state(bb, BbState::Added);
    }

    /// Adding big block `bb` failed. It was unplugged again if `unplugged`; if not, it
    /// stays plugged and not added.
    pub(crate) fn add_failed(&mut self, bb: usize, unplugged: bool) {
        self.clear_maps(bb);
        self.set_state(
            bb,
            if unplugged {
                BbState::Unused
            } else {
                BbState::Plugged
            },
        );
    }

    /// The lowest big block left plugged but not added, to be unplugged first.
    pub(crate) fn next_pending(&self) -> Option<usize> {
        (0..self.nr_bbs).find(|&bb| self.state(bb) == BbState::Plugged)
    }

    /// Big block `bb`, plugged and not added, was unplugged.
    pub(crate) fn unplugged(&mut self, bb: usize) {
        if self.state(bb) == BbState::Plugged {
            self.set_state(bb, BbState::Unused);
        }
    }

    /// The next added big block to unplug in `pass`, highest address first, not in
    /// transition and not in `skip` (already tried this round).
    pub(crate) fn next_unplug(
        &self,
        pass: UnplugPass,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        (0..self.nr_bbs).rev().find(|&bb| {
            self.state(bb) == BbState::Added
                && !self.in_transition(bb)
                && !skip(bb)
                && match pass {
                    UnplugPass::Offline => self.all_offline(bb),
                    UnplugPass::Movable => self.all_movable(bb),
                    UnplugPass::Any => true,
                }
        })
    }

    /// Unplugging big block `bb` starts: from now on none of its memory blocks may go
    /// online, and the online ones are fake-offlined. `false` (nothing changed) unless it
    /// is added and not in transition.
    pub(crate) fn start_unplug(&mut self, bb: usize) -> bool {
        if self.state(bb) != BbState::Added || self.in_transition(bb) {
            return false;
        }
        self.set_state(bb, BbState::FakeOffline);
        true
    }

    /// Unplugging big block `bb` failed before it was removed: it is added as before (the
    /// caller has handed its fake-offline pages back to the kernel).
    pub(crate) fn abort_unplug(&mut self, bb: usize) {
        if self.state(bb) == BbState::FakeOffline {
            self.set_state(bb, BbState::Added);
        }
    }

    /// Big block `bb` was offlined and removed from Linux; it is still plugged until its
    /// UNPLUG succeeds ([`Self::unplugged`]).
    pub(crate) fn removed(&mut self, bb: usize) {
        self.clear_maps(bb);
        self.set_state(bb, BbState::Plugged);
    }

    fn clear_maps(&mut self, bb: usize) {
        let b = self.base(bb) + 1;
        for w in &mut self.words[b..b + 2 * self.words_per_map] {
            *w = 0;
        }
    }

    /// MEM_GOING_ONLINE of memory block `mb` of big block `bb`: only big blocks this
    /// driver added and is not unplugging may go online.
    pub(crate) fn going_online(&mut self, bb: usize) -> Result<(), Refused> {
        match self.state(bb) {
            BbState::Added => {
                self.begin_transition(bb);
                Ok(())
            }
            s => Err(Refused(s)),
        }
    }

    /// MEM_ONLINE of memory block `mb` of big block `bb`, in ZONE_MOVABLE or not.
    pub(crate) fn online(&mut self, bb: usize, mb: usize, movable: bool) -> Result<(), Refused> {
        self.end_transition(bb);
        match self.state(bb) {
            BbState::Added => {
                self.set_bit(bb, mb, false, true);
                self.set_bit(bb, mb, true, movable);
                Ok(())
            }
            s => Err(Refused(s)),
        }
    }

    /// MEM_CANCEL_ONLINE.
    pub(crate) fn cancel_online(&mut self, bb: usize) {
        self.end_transition(bb);
    }

    /// MEM_GOING_OFFLINE of memory block `mb` of big block `bb`: it must be online. Says
    /// whether its pages are fake-offline (their references must be dropped).
    pub(crate) fn going_offline(&mut self, bb: usize, mb: usize) -> Result<FakeOffline, Refused> {
        let state = self.state(bb);
        if !matches!(state, BbState::Added | BbState::FakeOffline) || !self.is_online(bb, mb) {
            return Err(Refused(state));
        }
        self.begin_transition(bb);
        Ok(if state == BbState::FakeOffline {
            FakeOffline::Yes
        } else {
            FakeOffline::No
        })
    }

    /// MEM_CANCEL_OFFLINE of memory block `mb` of big block `bb`: says whether the
    /// references of its fake-offline pages must be taken back.
    pub(crate) fn cancel_offline(&mut self, bb: usize) -> FakeOffline {
        self.end_transition(bb);
        if self.state(bb) == BbState::FakeOffline {
            FakeOffline::Yes
        } else {
            FakeOffline::No
        }
    }

    /// MEM_OFFLINE of memory block `mb` of big block `bb`.
    pub(crate) fn offline(&mut self, bb: usize, mb: usize) -> Result<(), Refused> {
        self.end_transition(bb);
        let state = self.state(bb);
        if !matches!(state, BbState::Added | BbState::FakeOffline) {
            return Err(Refused(state));
        }
        self.set_bit(bb, mb, false, false);
        self.set_bit(bb, mb, true, false);
        Ok(())
    }
}
