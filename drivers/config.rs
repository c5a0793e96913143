// SPDX-License-Identifier: GPL-2.0

//! The device's configuration, validated.
//!
//! Everything in the config space is untrusted. [`Geometry::new`] checks the fields that
//! never change (block size, region) once at probe; [`Sizes::new`] checks the fields that
//! change (usable, plugged and requested size) on every read. A failed check names the
//! field, its value and what is wrong with it.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

/// The config space as read from the device, field by field, in CPU byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct RawConfig {
    pub(crate) block_size: u64,
    pub(crate) addr: u64,
    pub(crate) region_size: u64,
    pub(crate) usable_region_size: u64,
    pub(crate) plugged_size: u64,
    pub(crate) requested_size: u64,
    pub(crate) node_id: u16,
}

/// What the kernel imposes on the device's memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Size of a page.
    pub(crate) page_size: u64,
    /// Size of a Linux memory block (a power of two).
    pub(crate) memory_block_size: u64,
    /// Size of a pageblock (a power of two).
    pub(crate) pageblock_size: u64,
    /// First and last byte of the physical range that memory hotplug can use.
    pub(crate) pluggable_start: u64,
    pub(crate) pluggable_end: u64,
}

/// A config field the driver refuses, with its value and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConfigError {
    pub(crate) field: &'static str,
    pub(crate) value: u64,
    pub(crate) reason: &'static str,
}

impl ConfigError {
    const fn new(field: &'static str, value: u64, reason: &'static str) -> Self {
        Self {
            field,
            value,
            reason,
        }
    }
}

/// How the driver manages the device's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModeKind {
    /// Sub Block Mode: subblocks smaller than a Linux memory block, (un)plugged and
    /// (fake) onlined one by one inside added memory blocks.
    Sbm,
    /// Big Block Mode: big blocks of one or more whole memory blocks, each plugged, added,
    /// removed and unplugged as a whole.
    Bbm,
}

impl ModeKind {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Sbm => "Sub Block Mode",
            Self::Bbm => "Big Block Mode",
        }
    }
}

/// The module parameters that choose the mode (`force_bbm`, `bbm_block_size`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Big Block Mode even where Sub Block Mode would do.
    pub(crate) force_bbm: bool,
    /// The big block size wanted, 0 for the smallest possible.
    pub(crate) bbm_block_size: u64,
}

/// Why `bbm_block_size` was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BbmSizeIgnored {
    NotPowerOfTwo,
    TooSmall,
}

/// The mode of a device and the size of its unit: the subblock in Sub Block Mode, the big
/// block in Big Block Mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModeChoice {
    pub(crate) kind: ModeKind,
    pub(crate) unit: u64,
    /// `bbm_block_size` was set but could not be used (the caller warns).
    pub(crate) ignored: Option<BbmSizeIgnored>,
}

/// Chooses the mode as the C driver does (`virtio_mem_init_hotplug`): the subblock is the
/// larger of the device block and the pageblock; if it is smaller than a memory block and
/// Big Block Mode is not forced, Sub Block Mode. Otherwise Big Block Mode with the larger
/// of the device block and the memory block, or `bbm_block_size` if it is a power of two
/// and not smaller. `bs`, the pageblock and the memory block size are powers of two.
pub(crate) fn choose_mode(bs: u64, limits: &Limits, params: &ModeParams) -> ModeChoice {
    let subblock = bs.max(limits.pageblock_size);
    if subblock < limits.memory_block_size && !params.force_bbm {
        return ModeChoice {
            kind: ModeKind::Sbm,
            unit: subblock,
            ignored: None,
        };
    }
    let smallest = bs.max(limits.memory_block_size);
    let (unit, ignored) = match params.bbm_block_size {
        0 => (smallest, None),
        s if !s.is_power_of_two() => (smallest, Some(BbmSizeIgnored::NotPowerOfTwo)),
        s if s < smallest => (smallest, Some(BbmSizeIgnored::TooSmall)),
        s => (s, None),
    };
    ModeChoice {
        kind: ModeKind::Bbm,
        unit,
        ignored,
    }
}

/// The fixed geometry of a device, validated.
///
/// # Invariants
///
/// `device_block_size`, `subblock_size`, `memory_block_size` and `bb_size` are powers of
/// two; `addr + region_size` does not overflow and lies inside the pluggable range; memory
/// blocks `first_mb .. first_mb + nr_mbs` lie fully inside the region, and there is at least
/// one. In Sub Block Mode `device_block_size <= subblock_size < memory_block_size`, a
/// subblock is at least a page and at most 65535 device blocks. In Big Block Mode
/// `device_block_size <= bb_size`, `memory_block_size <= bb_size`, `subblock_size ==
/// memory_block_size`, and big blocks `first_bb .. first_bb + nr_bbs` (aligned to their
/// size) lie fully inside the region, at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) addr: u64,
    pub(crate) region_size: u64,
    pub(crate) device_block_size: u64,
    pub(crate) subblock_size: u64,
    pub(crate) memory_block_size: u64,
    /// log2 of `memory_block_size` and `subblock_size`: divisions become shifts.
    mb_shift: u32,
    sb_shift: u32,
    pub(crate) mode: ModeKind,
    /// Id (physical address / memory block size) of the first memory block in the region.
    pub(crate) first_mb: u64,
    /// Number of memory blocks fully inside the region.
    pub(crate) nr_mbs: u64,
    /// Big Block Mode: the size of a big block and its log2 (in Sub Block Mode, a memory
    /// block's).
    pub(crate) bb_size: u64,
    bb_shift: u32,
    /// Id (physical address / big block size) of the first big block fully inside the
    /// region, and how many there are.
    pub(crate) first_bb: u64,
    pub(crate) nr_bbs: u64,
    /// `bbm_block_size` was given but could not be used.
    pub(crate) bbm_size_ignored: Option<BbmSizeIgnored>,
}

impl Geometry {
    /// Validates the fields of `raw` that never change, and chooses the mode by `params`.
    pub(crate) fn new(
        raw: &RawConfig,
        limits: &Limits,
        params: &ModeParams,
    ) -> Result<Self, ConfigError> {
        let bs = raw.block_size;
        if bs == 0 || !bs.is_power_of_two() {
            return Err(ConfigError::new(
                "block_size",
                bs,
                "is not a non-zero power of two",
            ));
        }
        let bs_mask = bs - 1;
        if raw.addr & bs_mask != 0 {
            return Err(ConfigError::new(
                "addr",
                raw.addr,
                "is not aligned to block_size",
            ));
        }
        if raw.region_size < bs {
            return Err(ConfigError::new(
                "region_size",
                raw.region_size,
                "is smaller than one device block (block_size)",
            ));
        }
        if raw.region_size & bs_mask != 0 {
            return Err(ConfigError::new(
                "region_size",
                raw.region_size,
                "is zero or not a multiple of block_size",
            ));
        }
        let end = raw
            .addr
            .checked_add(raw.region_size)
            .ok_or(ConfigError::new(
                "region_size",
                raw.region_size,
                "makes addr + region_size overflow",
            ))?;
        if raw.addr < limits.pluggable_start {
            return Err(ConfigError::new(
                "addr",
                raw.addr,
                "is below the pluggable physical range",
            ));
        }
        if end - 1 > limits.pluggable_end {
            return Err(ConfigError::new(
                "region_size",
                raw.region_size,
                "makes the region end beyond the pluggable physical range",
            ));
        }
        let mb = limits.memory_block_size;
        if !mb.is_power_of_two()
            || !limits.pageblock_size.is_power_of_two()
            || !limits.page_size.is_power_of_two()
            || limits.page_size > limits.pageblock_size
        {
            return Err(ConfigError::new(
                "block_size",
                bs,
                "cannot be used: the kernel's page, pageblock or memory block size is not a power of two",
            ));
        }
        let mb_shift = mb.trailing_zeros();
        let choice = choose_mode(bs, limits, params);
        // Only memory blocks fully inside the region can be added.
        // `raw.addr + mb - 1` cannot overflow: `end` did not and `end >= raw.addr + bs`.
        let first_mb = raw.addr.saturating_add(mb - 1) >> mb_shift;
        let end_mb = end >> mb_shift;
        if end_mb <= first_mb {
            return Err(ConfigError::new(
                "region_size",
                raw.region_size,
                "does not hold a single aligned memory block",
            ));
        }
        let mut geo = Self {
            addr: raw.addr,
            region_size: raw.region_size,
            device_block_size: bs,
            subblock_size: choice.unit,
            memory_block_size: mb,
            mb_shift,
            sb_shift: choice.unit.trailing_zeros(),
            mode: choice.kind,
            first_mb,
            nr_mbs: end_mb - first_mb,
            bb_size: mb,
            bb_shift: mb_shift,
            first_bb: first_mb,
            nr_bbs: end_mb - first_mb,
            bbm_size_ignored: choice.ignored,
        };
        match choice.kind {
            ModeKind::Sbm => {
                if (choice.unit >> bs.trailing_zeros()) > u64::from(u16::MAX) {
                    return Err(ConfigError::new(
                        "block_size",
                        bs,
                        "is so small that one subblock needs more than 65535 blocks in a request",
                    ));
                }
            }
            ModeKind::Bbm => {
                // Big blocks aligned to their size, fully inside the region (the C driver's
                // ids: address / big block size).
                let bb = choice.unit;
                let bb_shift = bb.trailing_zeros();
                let first_bb = raw.addr.div_ceil(bb);
                let end_bb = end >> bb_shift;
                if end_bb <= first_bb {
                    return Err(ConfigError::new(
                        "region_size",
                        raw.region_size,
                        "does not hold a single big block aligned to its size",
                    ));
                }
                geo.subblock_size = mb;
                geo.sb_shift = mb_shift;
                geo.bb_size = bb;
                geo.bb_shift = bb_shift;
                geo.first_bb = first_bb;
                geo.nr_bbs = end_bb - first_bb;
            }
        }
        Ok(geo)
    }

    /// Bytes of the region outside the big blocks (Big Block Mode: never used).
    pub(crate) fn outside_bbs(&self) -> u64 {
        self.region_size - (self.nr_bbs << self.bb_shift)
    }

    /// Memory blocks in one big block.
    pub(crate) const fn mbs_per_bb(&self) -> u64 {
        1 << (self.bb_shift - self.mb_shift)
    }

    /// Device blocks in one big block.
    pub(crate) const fn blocks_per_bb(&self) -> u64 {
        self.bb_size >> self.device_block_size.trailing_zeros()
    }

    /// Physical address of big block `bb` (0-based inside the region).
    pub(crate) const fn bb_addr(&self, bb: usize) -> u64 {
        (self.first_bb + bb as u64) << self.bb_shift
    }

    /// The big block (0-based) and its memory block (0-based inside it) whose whole range
    /// is exactly `[start, start + size)`.
    pub(crate) fn bb_mb_exactly(&self, start: u64, size: u64) -> Option<(usize, usize)> {
        if size != self.memory_block_size || start & (self.memory_block_size - 1) != 0 {
            return None;
        }
        let id = start >> self.bb_shift;
        if id < self.first_bb || id - self.first_bb >= self.nr_bbs {
            return None;
        }
        let mb = (start & (self.bb_size - 1)) >> self.mb_shift;
        Some((usize::try_from(id - self.first_bb).ok()?, mb as usize))
    }

    /// The big block (0-based) that holds `[start, start + size)`, if one does.
    pub(crate) fn bb_of(&self, start: u64, size: u64) -> Option<usize> {
        let id = start >> self.bb_shift;
        let last = start.checked_add(size)?.checked_sub(1)? >> self.bb_shift;
        if size == 0 || id != last || id < self.first_bb || id - self.first_bb >= self.nr_bbs {
            return None;
        }
        usize::try_from(id - self.first_bb).ok()
    }

    /// Big blocks fully inside the first `usable` bytes of the region.
    pub(crate) fn usable_bbs(&self, usable: u64) -> usize {
        // `addr + usable <= addr + region_size` does not overflow (invariant).
        let end_bb = (self.addr + usable) >> self.bb_shift;
        end_bb.saturating_sub(self.first_bb).min(self.nr_bbs) as usize
    }

    /// Subblocks in one memory block (at least two).
    pub(crate) const fn sbs_per_mb(&self) -> u64 {
        1 << (self.mb_shift - self.sb_shift)
    }

    /// Device blocks in one subblock.
    pub(crate) const fn blocks_per_sb(&self) -> u64 {
        self.subblock_size >> self.device_block_size.trailing_zeros()
    }

    /// log2 of the subblock size.
    pub(crate) const fn sb_shift(&self) -> u32 {
        self.sb_shift
    }

    /// Physical address of memory block `index` (0-based inside the region).
    pub(crate) const fn mb_addr(&self, index: usize) -> u64 {
        (self.first_mb + index as u64) << self.mb_shift
    }

    /// Physical address of subblock `sb` of memory block `index`.
    pub(crate) const fn sb_addr(&self, index: usize, sb: usize) -> u64 {
        self.mb_addr(index) + ((sb as u64) << self.sb_shift)
    }

    /// The memory block (0-based inside the region) that holds `[start, start + size)`,
    /// if that range lies inside one of the region's memory blocks.
    pub(crate) fn mb_of(&self, start: u64, size: u64) -> Option<usize> {
        let id = start >> self.mb_shift;
        let last = start.checked_add(size)?.checked_sub(1)? >> self.mb_shift;
        if size == 0 || id != last || id < self.first_mb || id - self.first_mb >= self.nr_mbs {
            return None;
        }
        usize::try_from(id - self.first_mb).ok()
    }

    /// The memory block whose whole range is exactly `[start, start + size)`.
    pub(crate) fn mb_exactly(&self, start: u64, size: u64) -> Option<usize> {
        if size != self.memory_block_size || start & (self.memory_block_size - 1) != 0 {
            return None;
        }
        self.mb_of(start, size)
    }

    /// Subblocks (first, count) of memory block `index` covered by `[start, start + size)`.
    pub(crate) fn sb_span(&self, index: usize, start: u64, size: u64) -> (usize, usize) {
        let base = self.mb_addr(index);
        let first = (start - base) >> self.sb_shift;
        let last = (start + size - 1 - base) >> self.sb_shift;
        (first as usize, (last - first + 1) as usize)
    }

    /// Memory blocks fully inside the first `usable` bytes of the region.
    pub(crate) fn usable_mbs(&self, usable: u64) -> usize {
        // `addr + usable <= addr + region_size` does not overflow (invariant).
        let end_mb = (self.addr + usable) >> self.mb_shift;
        end_mb.saturating_sub(self.first_mb).min(self.nr_mbs) as usize
    }

    /// Subblocks of memory block `usable_mbs(usable)` (if the region has it) fully inside the
    /// first `usable` bytes of the region. The usable region need not end at a memory
    /// block's end (QEMU keeps it 256 MiB above the requested size, rounded to the device
    /// block), nor at a subblock's.
    pub(crate) fn usable_tail(&self, usable: u64) -> usize {
        // `addr + usable <= addr + region_size` does not overflow (invariant).
        let end = self.addr + usable;
        let end_mb = end >> self.mb_shift;
        if end_mb < self.first_mb || end_mb - self.first_mb >= self.nr_mbs {
            return 0;
        }
        ((end & (self.memory_block_size - 1)) >> self.sb_shift) as usize
    }
}

/// The sizes that change while the device runs, validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub(crate) usable: u64,
    pub(crate) plugged: u64,
    pub(crate) requested: u64,
}

impl Sizes {
    /// Validates the changing fields of `raw` against the geometry.
    pub(crate) fn new(raw: &RawConfig, geo: &Geometry) -> Result<Self, ConfigError> {
        let bs = geo.device_block_size;
        let bs_mask = bs - 1;
        if raw.block_size != bs {
            return Err(ConfigError::new(
                "block_size",
                raw.block_size,
                "changed while the device runs",
            ));
        }
        if raw.addr != geo.addr || raw.region_size != geo.region_size {
            return Err(ConfigError::new(
                "addr",
                raw.addr,
                "or region_size changed while the device runs",
            ));
        }
        // A multiple of the block size, at most `max`.
        let check = |field, value: u64, max: u64, reason| {
            if value > max || value & bs_mask != 0 {
                Err(ConfigError::new(field, value, reason))
            } else {
                Ok(value)
            }
        };
        check(
            "usable_region_size",
            raw.usable_region_size,
            geo.region_size,
            "is larger than region_size or not a multiple of block_size",
        )?;
        // Only the usable region can be plugged: more plugged than that is nonsense.
        check(
            "plugged_size",
            raw.plugged_size,
            raw.usable_region_size,
            "is larger than usable_region_size or not a multiple of block_size",
        )?;
        check(
            "requested_size",
            raw.requested_size,
            raw.usable_region_size,
            "is larger than usable_region_size or not a multiple of block_size",
        )?;
        Ok(Self {
            usable: raw.usable_region_size,
            plugged: raw.plugged_size,
            requested: raw.requested_size,
        })
    }
}
