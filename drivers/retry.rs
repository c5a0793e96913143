// SPDX-License-Identifier: GPL-2.0

//! When to try again: the one place that defines the retry schedule.
//!
//! A round that cannot make progress (the device is BUSY, memory cannot be freed or
//! removed yet, or adding failed) is retried after a delay that starts at [`MIN_MS`] and
//! doubles up to [`MAX_MS`]; a round that makes progress resets it, and a config change
//! retries at once (the glue queues the worker with no delay).
//!
//! From the [`DROP_SLAB_AFTER`]th failed round in a row on, the worker drops reclaimable
//! slab objects before trying again: dentries and inodes are the usual unmovable
//! leftovers in hotplugged kernel memory. It does so only when that can help (some slab is
//! reclaimable) and the guest has memory to spare (`headroom.rs`); a round stopped because
//! the guest needs its memory is retried sooner (`headroom::POLL_MS` at most) and never
//! drops slab.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

/// First delay after a failed round.
pub(crate) const MIN_MS: u32 = 1_000;
/// Longest delay.
pub(crate) const MAX_MS: u32 = 300_000;
/// Failed rounds in a row before slab objects are dropped.
pub(crate) const DROP_SLAB_AFTER: u32 = 3;

/// What to do after a failed round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retry {
    /// Try again after this delay.
    pub(crate) delay_ms: u32,
    /// Failed rounds in a row, this one included.
    pub(crate) failed_rounds: u32,
    /// Drop slab objects first.
    pub(crate) drop_slab: bool,
}

/// The retry schedule of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    next_ms: u32,
    failed_rounds: u32,
}

impl Backoff {
    pub(crate) const fn new() -> Self {
        Self {
            next_ms: MIN_MS,
            failed_rounds: 0,
        }
    }

    /// Failed rounds in a row.
    pub(crate) const fn failed_rounds(&self) -> u32 {
        self.failed_rounds
    }

    /// A round made progress.
    pub(crate) fn reset(&mut self) {
        *self = Self::new();
    }

    /// A round could not make progress: when to retry.
    pub(crate) fn failed(&mut self) -> Retry {
        let delay_ms = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(MAX_MS);
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        Retry {
            delay_ms,
            failed_rounds: self.failed_rounds,
            drop_slab: self.failed_rounds >= DROP_SLAB_AFTER,
        }
    }
}
