// SPDX-License-Identifier: GPL-2.0

//! What the guest keeps for itself while its memory is unplugged.
//!
//! Unplugging online memory takes it from the guest: its pages are migrated away (into free
//! memory elsewhere) and the range is removed from the kernel. Taken too far, that leaves
//! the guest without memory for its own data and ends in the OOM killer. So before every
//! attempt to take online memory, the worker asks core mm what the guest has
//! ([`MemInfo`]) and takes at most what it can spare: what is available (as `MemAvailable`
//! counts it: free memory above the zones' watermarks, plus the page cache and slab the
//! kernel can reclaim cheaply), less the active page cache, beyond a margin of
//! [`MIN_MARGIN`] or 1/32 of the guest's memory, whichever is larger. The margin is the guest's, not the requested size's: it
//! holds even when the requested size can never be reached. A round that cannot take what
//! it needs stops ([`Stall`] says when to tell the operator) and is tried again soon, so
//! that memory freed meanwhile (data deleted, a process that exits) is given back.
//!
//! Page cache: the inactive part counts as `MemAvailable` counts it, so an unplug may shrink
//! it, but the active part (pages used more than once lately: the working set) never
//! counts, so an unplug does not push out what the guest is using. The margin stays free
//! for the guest's own allocations and for the cache to grow back.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

/// The smallest margin the guest keeps available, in bytes.
pub(crate) const MIN_MARGIN: u64 = 128 << 20;
/// The margin is at least the guest's memory shifted right by this (1/32).
pub(crate) const MARGIN_SHIFT: u32 = 5;
/// Reclaimable slab, in bytes, below which dropping slab objects is not worth it.
pub(crate) const DROP_SLAB_MIN: u64 = 1 << 20;
/// How often a round stopped by the guest's need for memory is tried again at most (it
/// costs a look at core mm's counters unless memory was freed).
pub(crate) const POLL_MS: u32 = 10_000;

/// What the guest has now, in bytes, as core mm counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MemInfo {
    /// What can be allocated without swapping or the OOM killer: `MemAvailable`.
    pub(crate) available: u64,
    /// The memory the kernel manages: `MemTotal`.
    pub(crate) total: u64,
    /// Reclaimable slab: `SReclaimable`.
    pub(crate) slab_reclaimable: u64,
    /// The active page cache: `Active(file)`.
    pub(crate) active_file: u64,
}

impl MemInfo {
    /// What stays available for the guest, whatever is asked.
    pub(crate) fn margin(&self) -> u64 {
        MIN_MARGIN.max(self.total >> MARGIN_SHIFT)
    }

    /// What is available without touching the guest's working set: `MemAvailable` less
    /// the active page cache.
    pub(crate) fn counted(&self) -> u64 {
        self.available.saturating_sub(self.active_file)
    }

    /// What may be taken from the guest now.
    pub(crate) fn spare(&self) -> u64 {
        self.counted().saturating_sub(self.margin())
    }

    /// Whether `bytes` may be taken from the guest now.
    pub(crate) fn may_take(&self, bytes: u64) -> bool {
        bytes <= self.spare()
    }

    /// Whether dropping reclaimable slab objects can free anything worth it.
    pub(crate) fn slab_worth_dropping(&self) -> bool {
        self.slab_reclaimable >= DROP_SLAB_MIN
    }
}

/// A stall: rounds in a row that stopped because the guest needs its memory. Says when to
/// tell the operator: at the first such round, then at the 2nd, 4th, 8th, ... (the
/// backoff's pace), and once when the stall ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stall {
    rounds: u32,
}

/// What to say after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Say {
    /// Nothing.
    Nothing,
    /// A stall begins.
    Begins,
    /// The stall goes on (round number).
    GoesOn(u32),
    /// The stall is over.
    Ends,
}

impl Stall {
    /// A round stopped because the guest needs its memory.
    pub(crate) fn pressed(&mut self) -> Say {
        self.rounds = self.rounds.saturating_add(1);
        match self.rounds {
            1 => Say::Begins,
            n if n.is_power_of_two() => Say::GoesOn(n),
            _ => Say::Nothing,
        }
    }

    /// A round ended otherwise (done, or stopped for another reason).
    pub(crate) fn released(&mut self) -> Say {
        let was = self.rounds > 0;
        self.rounds = 0;
        if was {
            Say::Ends
        } else {
            Say::Nothing
        }
    }
}
