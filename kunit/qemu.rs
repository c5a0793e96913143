// SPDX-License-Identifier: GPL-2.0

//! QEMU's virtio-mem device (`hw/virtio/virtio-mem.c`), reduced to its rules: how it
//! answers a request and how its usable region follows the requested size.
//!
//! Both device models use this one description: the KUnit mock (`kunit/mock.rs`, a block
//! bitmap) and the host property tests' model (`host-tests/src/model.rs`, block
//! intervals). Each keeps its own record of plugged blocks behind [`Blocks`] and its config
//! space as [`RawConfig`]; what QEMU would do to them is decided here. Plain `core` Rust.

use crate::config::RawConfig;

/// `VIRTIO_MEM_REQ_*`.
pub(crate) const PLUG: u16 = 0;
pub(crate) const UNPLUG: u16 = 1;
pub(crate) const UNPLUG_ALL: u16 = 2;
pub(crate) const STATE: u16 = 3;
/// `VIRTIO_MEM_RESP_*`.
pub(crate) const ACK: u16 = 0;
pub(crate) const NACK: u16 = 1;
pub(crate) const BUSY: u16 = 2;
pub(crate) const ERROR: u16 = 3;
/// `VIRTIO_MEM_STATE_*`.
pub(crate) const STATE_PLUGGED: u16 = 0;
pub(crate) const STATE_UNPLUGGED: u16 = 1;
pub(crate) const STATE_MIXED: u16 = 2;

/// A device model's record of its plugged device blocks, by index from the region's start.
pub(crate) trait Blocks {
    /// How many of blocks `first .. end` are plugged.
    fn plugged_in(&self, first: u64, end: u64) -> u64;
    /// Marks blocks `first .. end` plugged or unplugged.
    fn set(&mut self, first: u64, end: u64, plugged: bool);
    /// Marks every block unplugged.
    fn clear(&mut self);
}

/// Why QEMU answers ERROR to a PLUG or UNPLUG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// The address is not a multiple of the block size.
    Misaligned,
    /// No blocks, or the range wraps around.
    Empty,
    /// Not entirely inside the usable region.
    OutsideUsable,
    /// A PLUG of blocks of which some are plugged.
    PluggingPlugged,
    /// An UNPLUG of blocks of which some are unplugged.
    UnpluggingUnplugged,
}

impl Invalid {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Invalid::Misaligned => "misaligned",
            Invalid::Empty => "of no blocks",
            Invalid::OutsideUsable => "outside the usable region",
            Invalid::PluggingPlugged => "plugging plugged blocks",
            Invalid::UnpluggingUnplugged => "unplugging unplugged blocks",
        }
    }
}

/// `virtio_mem_valid_range`: the blocks `first .. end` of a request for `nb` blocks at
/// `gpa`, if it is aligned, not empty and inside the usable region.
pub(crate) fn valid_range(cfg: &RawConfig, gpa: u64, nb: u16) -> Result<(u64, u64), Invalid> {
    let bs = cfg.block_size;
    let size = u64::from(nb) * bs;
    if bs == 0 || !gpa.is_multiple_of(bs) {
        return Err(Invalid::Misaligned);
    }
    let end = gpa.checked_add(size).ok_or(Invalid::Empty)?;
    if size == 0 {
        return Err(Invalid::Empty);
    }
    let usable_end = cfg.addr.saturating_add(cfg.usable_region_size);
    if gpa < cfg.addr || gpa >= usable_end || end > usable_end {
        return Err(Invalid::OutsideUsable);
    }
    let first = (gpa - cfg.addr) / bs;
    Ok((first, first + u64::from(nb)))
}

/// Why QEMU would answer ERROR to this (un)plug, whatever the requested size.
pub(crate) fn invalid(
    cfg: &RawConfig,
    blocks: &impl Blocks,
    gpa: u64,
    nb: u16,
    plug: bool,
) -> Option<Invalid> {
    match valid_range(cfg, gpa, nb) {
        Err(e) => Some(e),
        Ok((a, b)) => {
            let n = blocks.plugged_in(a, b);
            if plug && n != 0 {
                Some(Invalid::PluggingPlugged)
            } else if !plug && n != b - a {
                Some(Invalid::UnpluggingUnplugged)
            } else {
                None
            }
        }
    }
}

/// `virtio_mem_state_change_request`, in QEMU's order of checks: ACK (done: `blocks` and
/// `cfg.plugged_size` follow) or NACK (a plug beyond the requested size), or why it is
/// ERROR.
pub(crate) fn state_change(
    cfg: &mut RawConfig,
    blocks: &mut impl Blocks,
    gpa: u64,
    nb: u16,
    plug: bool,
) -> Result<u16, Invalid> {
    let (a, b) = valid_range(cfg, gpa, nb)?;
    let size = u64::from(nb) * cfg.block_size;
    if plug && cfg.plugged_size + size > cfg.requested_size {
        return Ok(NACK);
    }
    if let Some(why) = invalid(cfg, blocks, gpa, nb, plug) {
        return Err(why);
    }
    blocks.set(a, b, plug);
    if plug {
        cfg.plugged_size += size;
    } else {
        cfg.plugged_size -= size;
    }
    Ok(ACK)
}

/// `virtio_mem_state_request`: the `VIRTIO_MEM_STATE_*` of the blocks of a valid range,
/// or why it is ERROR. Changes nothing.
pub(crate) fn state(
    cfg: &RawConfig,
    blocks: &impl Blocks,
    gpa: u64,
    nb: u16,
) -> Result<u16, Invalid> {
    let (a, b) = valid_range(cfg, gpa, nb)?;
    Ok(match blocks.plugged_in(a, b) {
        n if n == b - a => STATE_PLUGGED,
        0 => STATE_UNPLUGGED,
        _ => STATE_MIXED,
    })
}

/// `virtio_mem_unplug_all`: nothing plugged any more. With `extent` (QEMU's
/// `VIRTIO_MEM_USABLE_EXTENT`), the usable region shrinks to what the requested size needs.
pub(crate) fn unplug_all(cfg: &mut RawConfig, blocks: &mut impl Blocks, extent: Option<u64>) {
    blocks.clear();
    cfg.plugged_size = 0;
    if let Some(extent) = extent {
        resize_usable_region(cfg, extent, true);
    }
}

/// `virtio_mem_resize_usable_region`: the usable region covers the requested size plus
/// `extent`, in whole blocks, and grows only (`can_shrink` only at UNPLUG_ALL and reset).
pub(crate) fn resize_usable_region(cfg: &mut RawConfig, extent: u64, can_shrink: bool) {
    let bs = cfg.block_size;
    let mut new = cfg
        .region_size
        .min(cfg.requested_size.saturating_add(extent));
    new = new.div_ceil(bs) * bs;
    if cfg.requested_size == 0 {
        new = 0;
    }
    if new < cfg.usable_region_size && !can_shrink {
        return;
    }
    cfg.usable_region_size = new;
}
