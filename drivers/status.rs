// SPDX-License-Identifier: GPL-2.0

//! What the driver tells an operator: the device's state in one word, its sizes, what
//! stands in the way of the requested size, and counters since probe. The worker keeps a
//! [`Counters`] beside its state and publishes a [`Snapshot`] whenever its lock is free
//! (`device.rs`). Each sysfs attribute (documented in `ABI-virtio_mem_rust` beside this
//! driver) shows one field of the last snapshot ([`show`]): a reader sees values taken
//! together and never waits on a device request.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

use crate::protocol::RequestType;
use core::fmt::{self, Write};

/// What the driver is doing, in one word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum State {
    /// The plugged size is the requested size (as far as whole units allow), or nothing
    /// has been asked yet.
    #[default]
    Idle,
    /// A round is plugging and adding memory.
    Plugging,
    /// A round is unplugging (and removing) memory.
    Unplugging,
    /// A round stopped short (the device was BUSY, memory could not be freed or removed,
    /// the guest needs its memory): the next one is scheduled (`next_retry_ms`).
    Retrying,
    /// Too much added memory is offline: nothing is added until some of it is onlined.
    WaitingForOnline,
    /// The device refused to plug more (NACK): nothing is tried until the requested size
    /// changes.
    Refused,
    /// Every usable memory block is in use: the requested size cannot be reached.
    NoRoom,
    /// The device answered ERROR, nonsense or nothing, or asked to be reset: no more
    /// requests.
    Broken,
    /// System sleep: the device has no queue until it resumes.
    Suspended,
    /// A crash kernel: the crashed kernel's memory is only read, never changed.
    Kdump,
}

impl State {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Plugging => "plugging",
            Self::Unplugging => "unplugging",
            Self::Retrying => "retrying",
            Self::WaitingForOnline => "waiting_for_online",
            Self::Refused => "refused",
            Self::NoRoom => "no_room",
            Self::Broken => "broken",
            Self::Suspended => "suspended",
            Self::Kdump => "kdump",
        }
    }
}

/// What keeps a page from being freed, as the glue classifies it (`enum vmr_holder` in
/// `virtio_mem_glue.h`, same order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    Slab,
    LargeKmalloc,
    PinnedUserPage,
    UserPageWithExtraReferences,
    PageTable,
    ReservedPage,
    MappedPage,
    KernelAllocation,
}

impl Holder {
    /// The glue's code, if it is one.
    pub(crate) const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Slab,
            1 => Self::LargeKmalloc,
            2 => Self::PinnedUserPage,
            3 => Self::UserPageWithExtraReferences,
            4 => Self::PageTable,
            5 => Self::ReservedPage,
            6 => Self::MappedPage,
            7 => Self::KernelAllocation,
            _ => return None,
        })
    }

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Slab => "slab",
            Self::LargeKmalloc => "large kmalloc",
            Self::PinnedUserPage => "pinned user page",
            Self::UserPageWithExtraReferences => "user page with extra references",
            Self::PageTable => "page table",
            Self::ReservedPage => "reserved page",
            Self::MappedPage => "mapped page not on an LRU list",
            Self::KernelAllocation => "kernel allocation",
        }
    }
}

/// What kept the last round from reaching the requested size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// Nothing: the last round reached it, or had nothing to give back.
    #[default]
    None,
    /// Bytes `start .. end` could not be freed; `holder` is the first page in use there
    /// that is not movable, if one was found (`None`: every page in use was movable, the
    /// migration failed anyway, e.g. for lack of memory to move them to).
    Range {
        start: u64,
        end: u64,
        holder: Option<Holder>,
    },
    /// The guest needs its memory: taking more would leave it less than its margin.
    GuestNeedsMemory,
    /// The device answered BUSY (e.g. while the VM migrates).
    DeviceBusy,
    /// An emptied memory block could not be removed yet.
    Removal { start: u64, end: u64 },
}

/// Answers the driver counts, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    Ack,
    Nack,
    Busy,
    Error,
    /// A response that is not a valid one (length, type, state).
    Invalid,
    /// No answer within the timeout, or the request could not be sent.
    Timeout,
}

/// Counters since probe. Only the worker (and, for `blocks_*`, the paths that add and
/// remove memory, under the same lock) changes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Requests sent: PLUG, UNPLUG, UNPLUG_ALL, STATE.
    pub(crate) requests: [u64; 4],
    /// Answers: ACK, NACK, BUSY, ERROR, invalid, timeout.
    pub(crate) answers: [u64; 6],
    /// Bytes the device ACKed to PLUG, to UNPLUG (UNPLUG_ALL counts what it unplugged).
    pub(crate) bytes_plugged: u64,
    pub(crate) bytes_unplugged: u64,
    /// Bytes of pages migrated while the driver took online memory (core mm's
    /// `pgmigrate_success` over the driver's `alloc_contig_range` calls).
    pub(crate) bytes_migrated: u64,
    /// Calls of `alloc_contig_range` that failed (each try counts).
    pub(crate) alloc_contig_range_failures: u64,
    /// Times reclaimable slab objects were dropped.
    pub(crate) drop_slab_calls: u64,
    /// Linux memory blocks added and removed.
    pub(crate) memory_blocks_added: u64,
    pub(crate) memory_blocks_removed: u64,
}

impl Counters {
    pub(crate) fn request(&mut self, ty: RequestType) {
        let i = match ty {
            RequestType::Plug => 0,
            RequestType::Unplug => 1,
            RequestType::UnplugAll => 2,
            RequestType::State => 3,
        };
        self.requests[i] = self.requests[i].saturating_add(1);
    }

    pub(crate) fn answer(&mut self, a: Answer) {
        let i = a as usize;
        self.answers[i] = self.answers[i].saturating_add(1);
    }
}

/// How the plugged memory is used, from the mode's bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Plugged memory in online memory blocks (fake-offline pages of them included: they
    /// are unplugged, so not plugged memory).
    pub(crate) online: u64,
    /// Plugged memory not online: in offline memory blocks, or not added.
    pub(crate) offline: u64,
    /// The part of `online` in ZONE_MOVABLE.
    pub(crate) movable: u64,
}

/// The published state of a device: every value taken at the same moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) state: State,
    /// The requested size and usable region of the last valid config.
    pub(crate) requested: u64,
    pub(crate) usable: u64,
    /// What this driver has plugged.
    pub(crate) plugged: u64,
    /// The plugged size the device last reported.
    pub(crate) device_plugged: u64,
    pub(crate) usage: Usage,
    /// Failed rounds in a row.
    pub(crate) failed_rounds: u32,
    /// When the next round is due (the platform's clock, ms), if one is scheduled.
    pub(crate) retry_at_ms: Option<u64>,
    pub(crate) blocked: Blocked,
    pub(crate) counters: Counters,
}

/// The device's geometry as the attributes show it (fixed at probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fixed {
    pub(crate) region_start: u64,
    pub(crate) region_size: u64,
    pub(crate) block_size: u64,
    /// The subblock size (Sub Block Mode) or the big block size (Big Block Mode).
    pub(crate) subblock_size: u64,
    pub(crate) memory_block_size: u64,
    pub(crate) mode: &'static str,
    pub(crate) node: i32,
}

/// The attributes of the `virtio_mem` sysfs group (the glue makes a file of each of
/// [`ATTRS`] and asks for it by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attr {
    RegionStart,
    RegionSize,
    UsableRegionSize,
    BlockSize,
    SubblockSize,
    MemoryBlockSize,
    Mode,
    Node,
    RequestedSize,
    PluggedSize,
    DevicePluggedSize,
    OnlineSize,
    OfflineSize,
    MovableSize,
    State,
    FailedRounds,
    NextRetryMs,
    BlockedBy,
    RequestsPlug,
    RequestsUnplug,
    RequestsUnplugAll,
    RequestsState,
    AnswersAck,
    AnswersNack,
    AnswersBusy,
    AnswersError,
    AnswersInvalid,
    AnswersTimeout,
    BytesPlugged,
    BytesUnplugged,
    BytesMigrated,
    AllocContigRangeFailures,
    DropSlabCalls,
    MemoryBlocksAdded,
    MemoryBlocksRemoved,
}

impl Attr {
    /// The attribute whose file is named `name`.
    pub(crate) fn from_name(name: &[u8]) -> Option<Self> {
        ATTRS
            .iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(a, _)| *a)
    }
}

/// Every attribute and its file's name, in the order `debugfs` `status` lists them (the
/// glue's `vmr_attrs` makes the same files; the boot tests compare both with the ABI
/// document).
pub(crate) const ATTRS: [(Attr, &str); 35] = [
    (Attr::RegionStart, "region_start"),
    (Attr::RegionSize, "region_size"),
    (Attr::UsableRegionSize, "usable_region_size"),
    (Attr::BlockSize, "block_size"),
    (Attr::SubblockSize, "subblock_size"),
    (Attr::MemoryBlockSize, "memory_block_size"),
    (Attr::Mode, "mode"),
    (Attr::Node, "node"),
    (Attr::RequestedSize, "requested_size"),
    (Attr::PluggedSize, "plugged_size"),
    (Attr::DevicePluggedSize, "device_plugged_size"),
    (Attr::OnlineSize, "online_size"),
    (Attr::OfflineSize, "offline_size"),
    (Attr::MovableSize, "movable_size"),
    (Attr::State, "state"),
    (Attr::FailedRounds, "failed_rounds"),
    (Attr::NextRetryMs, "next_retry_ms"),
    (Attr::BlockedBy, "blocked_by"),
    (Attr::RequestsPlug, "requests_plug"),
    (Attr::RequestsUnplug, "requests_unplug"),
    (Attr::RequestsUnplugAll, "requests_unplug_all"),
    (Attr::RequestsState, "requests_state"),
    (Attr::AnswersAck, "answers_ack"),
    (Attr::AnswersNack, "answers_nack"),
    (Attr::AnswersBusy, "answers_busy"),
    (Attr::AnswersError, "answers_error"),
    (Attr::AnswersInvalid, "answers_invalid"),
    (Attr::AnswersTimeout, "answers_timeout"),
    (Attr::BytesPlugged, "bytes_plugged"),
    (Attr::BytesUnplugged, "bytes_unplugged"),
    (Attr::BytesMigrated, "bytes_migrated"),
    (
        Attr::AllocContigRangeFailures,
        "alloc_contig_range_failures",
    ),
    (Attr::DropSlabCalls, "drop_slab_calls"),
    (Attr::MemoryBlocksAdded, "memory_blocks_added"),
    (Attr::MemoryBlocksRemoved, "memory_blocks_removed"),
];

/// Writes attribute `attr` (one value and a newline, as sysfs wants it). `now_ms` is the
/// platform's clock, for `next_retry_ms`.
pub(crate) fn show(
    attr: Attr,
    fixed: &Fixed,
    s: &Snapshot,
    now_ms: u64,
    w: &mut impl Write,
) -> fmt::Result {
    let c = &s.counters;
    let n = match attr {
        Attr::RegionStart => return writeln!(w, "{:#x}", fixed.region_start),
        Attr::RegionSize => fixed.region_size,
        Attr::UsableRegionSize => s.usable,
        Attr::BlockSize => fixed.block_size,
        Attr::SubblockSize => fixed.subblock_size,
        Attr::MemoryBlockSize => fixed.memory_block_size,
        Attr::Mode => return writeln!(w, "{}", fixed.mode),
        Attr::Node => return writeln!(w, "{}", fixed.node),
        Attr::RequestedSize => s.requested,
        Attr::PluggedSize => s.plugged,
        Attr::DevicePluggedSize => s.device_plugged,
        Attr::OnlineSize => s.usage.online,
        Attr::OfflineSize => s.usage.offline,
        Attr::MovableSize => s.usage.movable,
        Attr::State => return writeln!(w, "{}", s.state.name()),
        Attr::FailedRounds => u64::from(s.failed_rounds),
        Attr::NextRetryMs => match s.retry_at_ms {
            Some(at) => at.saturating_sub(now_ms),
            None => return writeln!(w, "none"),
        },
        Attr::BlockedBy => return show_blocked(&s.blocked, w),
        Attr::RequestsPlug => c.requests[0],
        Attr::RequestsUnplug => c.requests[1],
        Attr::RequestsUnplugAll => c.requests[2],
        Attr::RequestsState => c.requests[3],
        Attr::AnswersAck => c.answers[Answer::Ack as usize],
        Attr::AnswersNack => c.answers[Answer::Nack as usize],
        Attr::AnswersBusy => c.answers[Answer::Busy as usize],
        Attr::AnswersError => c.answers[Answer::Error as usize],
        Attr::AnswersInvalid => c.answers[Answer::Invalid as usize],
        Attr::AnswersTimeout => c.answers[Answer::Timeout as usize],
        Attr::BytesPlugged => c.bytes_plugged,
        Attr::BytesUnplugged => c.bytes_unplugged,
        Attr::BytesMigrated => c.bytes_migrated,
        Attr::AllocContigRangeFailures => c.alloc_contig_range_failures,
        Attr::DropSlabCalls => c.drop_slab_calls,
        Attr::MemoryBlocksAdded => c.memory_blocks_added,
        Attr::MemoryBlocksRemoved => c.memory_blocks_removed,
    };
    writeln!(w, "{}", n)
}

/// `blocked_by`: `none`, `0x<start>-0x<end> <holder>` (end inclusive), `guest needs its
/// memory`, `device busy`, or `0x<start>-0x<end> removal`.
pub(crate) fn show_blocked(b: &Blocked, w: &mut impl Write) -> fmt::Result {
    match *b {
        Blocked::None => writeln!(w, "none"),
        Blocked::Range { start, end, holder } => writeln!(
            w,
            "{:#x}-{:#x} {}",
            start,
            end - 1,
            holder.map_or("movable pages that did not move", Holder::name)
        ),
        Blocked::GuestNeedsMemory => writeln!(w, "guest needs its memory"),
        Blocked::DeviceBusy => writeln!(w, "device busy"),
        Blocked::Removal { start, end } => writeln!(w, "{:#x}-{:#x} removal", start, end - 1),
    }
}

/// Every attribute of `s`, one `name: value` line each (debugfs `status`: one snapshot, so
/// its lines agree with each other).
pub(crate) fn show_all(
    fixed: &Fixed,
    s: &Snapshot,
    now_ms: u64,
    w: &mut impl Write,
) -> fmt::Result {
    for (attr, name) in ATTRS {
        write!(w, "{}: ", name)?;
        show(attr, fixed, s, now_ms, w)?;
    }
    Ok(())
}
