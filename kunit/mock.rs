// SPDX-License-Identifier: GPL-2.0

//! A scripted mock virtio-mem device and a model of the memory it provides, for the KUnit
//! suites: the driver's logic ([`crate::device`]) runs on [`MockPlatform`] and
//! [`MockTransport`] exactly as it runs on the glue.
//!
//! The device answers like QEMU's virtio-mem (`hw/virtio/virtio-mem.c`): PLUG of a range
//! outside the usable region, misaligned, or of a plugged block is ERROR, PLUG beyond the
//! requested size is NACK, UNPLUG of a block not plugged is ERROR, UNPLUG_ALL empties it.
//! STATE says whether a range is plugged (only a crash kernel asks).
//! [`State::script`] overrides its answers one request at a time with whatever a hostile
//! or broken device could do; [`State::needs_reset`] makes it a device that asks to be reset
//! and processes no request any more. Every ERROR the model has to give on its own is counted in
//! [`State::invalid_requests`]: a correct driver never causes one.
//!
//! The memory model follows each pageblock-sized chunk of the region through core mm
//! (absent, added but offline, in the buddy, fake-offline with or without the driver's
//! reference) by the rules of `kunit/pages.rs`, and counts in [`State::violations`] every
//! operation that would be a bug in the real kernel: memory the device has not plugged
//! handed to the buddy, fake-offlining pages not in the buddy, references dropped or taken
//! back twice, removing memory that is still plugged (in Sub Block Mode, which unplugs
//! before it removes; in Big Block Mode the driver removes a big block first and unplugs it
//! after, as the C driver does: [`State::removes_plugged`]).
//!
//! What the guest has ([`Platform::mem_info`]) is [`State::available`]: taking online
//! memory (fake-offline) lowers it, handing memory to the buddy raises it; `MemTotal` is
//! [`State::other_memory`] plus the device's memory in the buddy.

use crate::{
    config::{Limits, ModeParams, RawConfig},
    headroom::MemInfo,
    pages::{self, Move},
    platform::{Platform, Transport},
    protocol::{RequestType, REQUEST_SIZE, RESPONSE_SIZE},
    qemu::{self, Blocks, Invalid},
    status::{self, Holder},
};
use kernel::{
    alloc::{KVVec, KVec},
    new_mutex,
    prelude::*,
    str::CStr,
    sync::{Arc, Mutex},
};

/// A trace event the driver fired, as the mock recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trace {
    Request {
        ty: RequestType,
        addr: u64,
        nb: u16,
        answer: status::Answer,
    },
    Round {
        requested: u64,
        before: u64,
        after: u64,
        why: &'static CStr,
    },
    UnplugOnline {
        pfn: u64,
        nr: u64,
        result: i32,
    },
}

/// Size of the mock's memory chunks: the pageblock size of [`mock_limits`].
pub(crate) const CHUNK: u64 = 2 << 20;
/// The mock's page size.
pub(crate) const PAGE: u64 = 4096;
/// The mock's memory block size.
pub(crate) const MEMORY_BLOCK: u64 = 128 << 20;
pub(crate) use crate::qemu::{
    ACK, BUSY, ERROR, NACK, PLUG, STATE, STATE_MIXED, STATE_PLUGGED, UNPLUG, UNPLUG_ALL,
};

/// The kernel limits the mock pretends: x86-64's with 2 MiB pageblocks.
pub(crate) fn mock_limits() -> Limits {
    Limits {
        page_size: PAGE,
        memory_block_size: MEMORY_BLOCK,
        pageblock_size: CHUNK,
        pluggable_start: 0,
        pluggable_end: (1 << 46) - 1,
    }
}

/// A QEMU-like config: 2 MiB blocks, a 1 GiB region at 4 GiB (8 memory blocks), all of it
/// usable, nothing requested or plugged.
pub(crate) fn qemu_config() -> RawConfig {
    RawConfig {
        block_size: 2 << 20,
        addr: 4 << 30,
        region_size: 1 << 30,
        usable_region_size: 1 << 30,
        plugged_size: 0,
        requested_size: 0,
        node_id: 0,
    }
}

/// How the device answers one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// As QEMU would.
    Model,
    /// Writes this response type and says it wrote `used_len` bytes; changes nothing.
    Raw { ty: u16, used_len: u32 },
    /// Writes this response type and this state (an answer to STATE) and says it wrote
    /// `used_len` bytes.
    RawState { ty: u16, state: u16, used_len: u32 },
    /// Writes nothing but says it wrote a whole response.
    Stale,
    /// Never answers: the transport times out.
    Silent,
    /// Carries the request out as QEMU would, but the answer never arrives: the transport
    /// times out, and the driver cannot know what the device did.
    Lost,
    /// Sets `VIRTIO_CONFIG_S_NEEDS_RESET` instead of answering (QEMU's `virtio_error()`, on
    /// a request it cannot parse): the transport gives up at once.
    NeedsReset,
}

/// One request as the device saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) ty: u16,
    pub(crate) addr: u64,
    pub(crate) nb_blocks: u16,
    /// The answer's type, if one was written.
    pub(crate) answer: Option<u16>,
}

/// Where a chunk of the region is in core mm (`kunit/pages.rs`).
pub(crate) use crate::pages::Page as Chunk;

/// The mock's state: the device, its script, the memory model and what happened.
pub(crate) struct State {
    /// The config space as the device shows it (tests change it at will).
    pub(crate) cfg: RawConfig,
    /// Answers for the next requests, first one first; [`Answer::Model`] when empty.
    pub(crate) script: KVec<Answer>,
    /// Every request received.
    pub(crate) requests: KVec<Request>,
    /// ERRORs the model had to give because a request was invalid.
    pub(crate) invalid_requests: u32,
    /// Device blocks plugged, as the device sees them.
    plugged: KVVec<bool>,
    /// A request timed out: the device has the buffers, later requests fail.
    lost: bool,
    /// The device set `VIRTIO_CONFIG_S_NEEDS_RESET`: it processes no request any more.
    pub(crate) needs_reset: bool,
    /// Each pageblock-sized chunk of the region.
    pub(crate) chunks: KVec<Chunk>,
    /// Kernel bugs the driver would have caused (see the module documentation).
    pub(crate) violations: u32,
    /// Memory added and removed (addresses), in order, and the size of each addition.
    pub(crate) added: KVec<u64>,
    pub(crate) added_sizes: KVec<u64>,
    pub(crate) removed: KVec<u64>,
    /// Worker runs asked for, by delay in ms.
    pub(crate) queued: KVec<u32>,
    /// Fail the next this many fake-offline tries (`EBUSY`), additions (`ENOMEM`) and
    /// removals (`EBUSY`).
    pub(crate) fail_fake_offline: u32,
    /// Let this many fake-offline tries succeed before `fail_fake_offline` counts.
    pub(crate) fail_fake_offline_after: u32,
    pub(crate) fail_add: u32,
    pub(crate) fail_remove: u32,
    /// The `unplug_online` parameter; whether memory is in ZONE_MOVABLE.
    pub(crate) unplug_online: bool,
    pub(crate) movable: bool,
    /// The kernel limits the driver is told of, unless `real_limits`.
    pub(crate) limits: Limits,
    /// Use the running kernel's real limits instead.
    pub(crate) real_limits: bool,
    /// Removing plugged memory is no violation: the tests of Big Block Mode set this.
    pub(crate) removes_plugged: bool,
    /// The `force_bbm` and `bbm_block_size` parameters.
    pub(crate) mode_params: ModeParams,
    pub(crate) drop_slab_calls: u32,
    /// `MemAvailable`, in bytes.
    pub(crate) available: u64,
    /// `MemTotal` without the device's memory, in bytes.
    pub(crate) other_memory: u64,
    /// `SReclaimable`, in bytes.
    pub(crate) slab_reclaimable: u64,
    /// `Active(file)`, in bytes.
    pub(crate) active_file: u64,
    /// After a failed fake-offline try, `available` becomes this (memory taken meanwhile
    /// by someone else).
    pub(crate) available_after_failure: Option<u64>,
    /// Fake-offline tries, failed or not.
    pub(crate) fake_offline_tries: u32,
    /// `VIRTIO_MEM_F_PERSISTENT_SUSPEND` negotiated.
    pub(crate) persistent_suspend: bool,
    /// A crash kernel, and whether it has `/proc/vmcore`.
    pub(crate) kdump: bool,
    pub(crate) vmcore: bool,
    /// The worker is asked to freeze; or it will be once this many requests were received,
    /// or this many fake-offline tries made.
    pub(crate) freezing: bool,
    pub(crate) freeze_after_requests: Option<usize>,
    pub(crate) freeze_after_tries: Option<u32>,
    /// Times the worker asked whether it must freeze.
    pub(crate) freezing_asked: u32,
    /// Calls of `hotplug_init`.
    pub(crate) hotplug_inits: u32,
    /// The clock the driver reads, in ms (tests move it).
    pub(crate) now_ms: u64,
    /// What `find_holder` answers.
    pub(crate) holder: Option<Holder>,
    /// Pages "migrated" so far: each fake-offline that succeeds moves the pages it takes.
    pub(crate) migrated: u64,
    /// Every trace event fired, in order.
    pub(crate) traces: KVec<Trace>,
}

impl State {
    /// QEMU's answer to a request, applied to the device's state (`kunit/qemu.rs`): the
    /// response type and, for STATE, the state.
    fn model(&mut self, ty: u16, addr: u64, nb: u16) -> (u16, Option<u16>) {
        let State { cfg, plugged, .. } = self;
        let res = match ty {
            PLUG | UNPLUG => {
                qemu::state_change(cfg, &mut DeviceBlocks(plugged), addr, nb, ty == PLUG)
                    .map(|t| (t, None))
            }
            UNPLUG_ALL => {
                qemu::unplug_all(cfg, &mut DeviceBlocks(plugged), None);
                Ok((ACK, None))
            }
            STATE => qemu::state(cfg, &DeviceBlocks(plugged), addr, nb).map(|st| (ACK, Some(st))),
            _ => Err(Invalid::Empty),
        };
        res.unwrap_or_else(|why| {
            pr_info!(
                "mock: request {} {:#x} ({} blocks) is invalid: {}\n",
                ty,
                addr,
                nb,
                why.name()
            );
            self.invalid_requests += 1;
            (ERROR, None)
        })
    }

    /// The device has `size` bytes at `addr` plugged (as before a kexec or a crash), with
    /// its plugged size following.
    pub(crate) fn plug_device(&mut self, addr: u64, size: u64) {
        let bs = self.cfg.block_size;
        let first = (addr - self.cfg.addr) / bs;
        let mut blocks = DeviceBlocks(&mut self.plugged);
        let before = blocks.plugged_in(first, first + size / bs);
        blocks.set(first, first + size / bs, true);
        self.cfg.plugged_size += size - before * bs;
    }

    /// Whether the device has all of chunk `c` plugged.
    pub(crate) fn chunk_plugged(&self, c: usize) -> bool {
        let per = (CHUNK >> self.cfg.block_size.trailing_zeros()).max(1) as usize;
        let first = ((c as u64 * CHUNK) >> self.cfg.block_size.trailing_zeros()) as usize;
        self.plugged
            .get(first..first + per)
            .is_some_and(|b| b.iter().all(|&p| p))
    }

    /// Chunks of pages `pfn .. pfn + nr`, or `None` (a violation) if they are not whole
    /// chunks of the region.
    fn chunks_of(&self, pfn: u64, nr: u64) -> Option<core::ops::Range<usize>> {
        let addr = pfn * PAGE;
        let size = nr * PAGE;
        let off = addr.checked_sub(self.cfg.addr)?;
        if off % CHUNK != 0 || size % CHUNK != 0 || size == 0 {
            return None;
        }
        let first = (off / CHUNK) as usize;
        let last = first + (size / CHUNK) as usize;
        (last <= self.chunks.len()).then_some(first..last)
    }

    /// Moves chunks by `m`; a violation if core mm's rules (`kunit/pages.rs`) refuse it.
    fn move_chunks(&mut self, pfn: u64, nr: u64, m: Move) {
        let Some(range) = self.chunks_of(pfn, nr) else {
            pr_err!(
                "mock: pages {:#x} + {:#x} are not whole chunks of the region\n",
                pfn,
                nr
            );
            self.violations += 1;
            return;
        };
        for c in range {
            match pages::next(self.chunks[c], m, self.chunk_plugged(c)) {
                Ok(to) => self.chunks[c] = to,
                Err(why) => {
                    pr_err!(
                        "mock: {:?} of chunk {} ({:?}): {}\n",
                        m,
                        c,
                        self.chunks[c],
                        why
                    );
                    self.violations += 1;
                }
            }
        }
    }

    /// How many chunks are in state `s`.
    pub(crate) fn count(&self, s: Chunk) -> usize {
        self.chunks.iter().filter(|&&c| c == s).count()
    }

    /// How many chunks the driver holds fake-offline.
    pub(crate) fn fake_offline(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| matches!(c, Chunk::FakeOffline { .. }))
            .count()
    }

    /// Chunks the driver holds fake-offline although the device has them plugged: memory
    /// kept from the kernel (right only while the device's state is unknown).
    pub(crate) fn held_plugged(&self) -> usize {
        (0..self.chunks.len())
            .filter(|&c| {
                matches!(self.chunks[c], Chunk::FakeOffline { .. }) && self.chunk_plugged(c)
            })
            .count()
    }

    /// Bytes the device has plugged, counted block by block.
    pub(crate) fn device_plugged(&self) -> u64 {
        self.plugged.iter().filter(|&&p| p).count() as u64 * self.cfg.block_size
    }

    /// Requests of type `ty` received.
    pub(crate) fn nr_requests(&self, ty: u16) -> usize {
        self.requests.iter().filter(|r| r.ty == ty).count()
    }
}

/// The device's blocks, one flag each, as QEMU's bitmap.
struct DeviceBlocks<'a>(&'a mut KVVec<bool>);

impl Blocks for DeviceBlocks<'_> {
    fn plugged_in(&self, first: u64, end: u64) -> u64 {
        let (a, b) = (first as usize, end as usize);
        self.0
            .get(a..b)
            .map_or(0, |r| r.iter().filter(|&&p| p).count() as u64)
    }

    fn set(&mut self, first: u64, end: u64, plugged: bool) {
        if let Some(r) = self.0.get_mut(first as usize..end as usize) {
            r.iter_mut().for_each(|p| *p = plugged);
        }
    }

    fn clear(&mut self) {
        self.0.iter_mut().for_each(|p| *p = false);
    }
}

/// The state shared by the platform and the transport of one mock device.
#[pin_data]
pub(crate) struct Shared {
    #[pin]
    pub(crate) state: Mutex<State>,
}

/// Creates a mock device with config `cfg`.
pub(crate) fn new_mock(cfg: RawConfig) -> Result<(MockPlatform, MockTransport)> {
    // Size the models for any config a test may hand out; a hostile one gets small ones.
    let sane = cfg.block_size.is_power_of_two()
        && cfg.region_size % cfg.block_size == 0
        && cfg.region_size <= 1 << 30
        && cfg.region_size / cfg.block_size <= 1 << 20;
    let (blocks, chunks) = if sane {
        (
            (cfg.region_size / cfg.block_size) as usize,
            (cfg.region_size / CHUNK) as usize,
        )
    } else {
        (0, 0)
    };
    let state = State {
        cfg,
        script: KVec::new(),
        requests: KVec::new(),
        invalid_requests: 0,
        plugged: KVVec::from_elem(false, blocks, GFP_KERNEL)?,
        lost: false,
        needs_reset: false,
        chunks: KVec::from_elem(Chunk::Absent, chunks, GFP_KERNEL)?,
        violations: 0,
        added: KVec::new(),
        added_sizes: KVec::new(),
        removed: KVec::new(),
        queued: KVec::new(),
        fail_fake_offline: 0,
        fail_fake_offline_after: 0,
        fail_add: 0,
        fail_remove: 0,
        unplug_online: true,
        movable: false,
        limits: mock_limits(),
        real_limits: false,
        removes_plugged: false,
        mode_params: ModeParams::default(),
        drop_slab_calls: 0,
        available: 16 << 30,
        other_memory: 1 << 30,
        slab_reclaimable: 16 << 20,
        active_file: 0,
        available_after_failure: None,
        fake_offline_tries: 0,
        persistent_suspend: false,
        kdump: false,
        vmcore: true,
        freezing: false,
        freeze_after_requests: None,
        freeze_after_tries: None,
        freezing_asked: 0,
        hotplug_inits: 0,
        now_ms: 0,
        holder: None,
        migrated: 0,
        traces: KVec::new(),
    };
    let shared = Arc::pin_init(
        pin_init!(Shared {
            state <- new_mutex!(state, "vmr_mock::state"),
        }),
        GFP_KERNEL,
    )?;
    Ok((MockPlatform(shared.clone()), MockTransport(shared)))
}

/// The mock's side of [`Platform`]: the memory model and the worker's scheduling.
pub(crate) struct MockPlatform(pub(crate) Arc<Shared>);

impl MockPlatform {
    /// Records a trace event (out of memory only loses the record).
    fn trace(&self, t: Trace) {
        let _ = self.0.state.lock().traces.push(t, GFP_KERNEL);
    }
}

/// The mock's side of [`Transport`]: the device.
pub(crate) struct MockTransport(Arc<Shared>);

impl Transport for MockTransport {
    fn read_config(&mut self) -> RawConfig {
        self.0.state.lock().cfg
    }

    fn needs_reset(&self) -> bool {
        self.0.state.lock().needs_reset
    }

    /// As the glue: a device that needs a reset fails the request at once. The glue's errno
    /// for that (`ECONNRESET`) has no name in the `kernel` crate; the driver asks
    /// [`Transport::needs_reset`] rather than looking at the errno.
    fn request(
        &mut self,
        req: &[u8; REQUEST_SIZE],
        resp: &mut [u8; RESPONSE_SIZE as usize],
        _timeout_ms: u32,
    ) -> Result<u32> {
        let mut s = self.0.state.lock();
        if s.lost {
            return Err(EIO);
        }
        let ty = u16::from_le_bytes([req[0], req[1]]);
        let addr = u64::from_le_bytes([
            req[8], req[9], req[10], req[11], req[12], req[13], req[14], req[15],
        ]);
        let nb_blocks = u16::from_le_bytes([req[16], req[17]]);
        let answer = if s.needs_reset {
            // Queued, never processed: QEMU ignores the queue of a device that needs a reset.
            Answer::NeedsReset
        } else if s.script.is_empty() {
            Answer::Model
        } else {
            s.script.remove(0)?
        };
        let (written, state, len) = match answer {
            Answer::Model => {
                let (t, st) = s.model(ty, addr, nb_blocks);
                (Some(t), st, RESPONSE_SIZE)
            }
            Answer::Raw { ty: t, used_len } => (Some(t), None, used_len),
            Answer::RawState {
                ty: t,
                state,
                used_len,
            } => (Some(t), Some(state), used_len),
            Answer::Stale => (None, None, RESPONSE_SIZE),
            Answer::Silent => (None, None, 0),
            Answer::Lost => {
                s.model(ty, addr, nb_blocks);
                (None, None, 0)
            }
            Answer::NeedsReset => {
                s.needs_reset = true;
                (None, None, 0)
            }
        };
        s.requests.push(
            Request {
                ty,
                addr,
                nb_blocks,
                answer: written,
            },
            GFP_KERNEL,
        )?;
        match answer {
            // The device keeps the buffers: every later request fails.
            Answer::Silent | Answer::Lost => {
                s.lost = true;
                return Err(ETIMEDOUT);
            }
            Answer::NeedsReset => {
                s.lost = true;
                return Err(EIO);
            }
            _ => {}
        }
        if let Some(t) = written {
            resp[0..2].copy_from_slice(&t.to_le_bytes());
        }
        if let Some(st) = state {
            resp[8..10].copy_from_slice(&st.to_le_bytes());
        }
        Ok(len)
    }
}

impl Platform for MockPlatform {
    type Transport = MockTransport;

    fn mm_limits(&self) -> Limits {
        let s = self.0.state.lock();
        if s.real_limits {
            crate::glue::mm_limits()
        } else {
            s.limits
        }
    }

    fn mode_params(&self) -> ModeParams {
        self.0.state.lock().mode_params
    }

    fn node(&self, _node_id: u16, _addr: u64) -> i32 {
        0
    }

    fn has_acpi_pxm(&self) -> bool {
        false
    }

    fn has_persistent_suspend(&self) -> bool {
        self.0.state.lock().persistent_suspend
    }

    fn is_kdump_kernel(&self) -> bool {
        self.0.state.lock().kdump
    }

    fn has_vmcore(&self) -> bool {
        self.0.state.lock().vmcore
    }

    fn freezing(&self) -> bool {
        let mut s = self.0.state.lock();
        s.freezing_asked += 1;
        let (after, tries) = (s.freeze_after_requests, s.freeze_after_tries);
        if after.is_some_and(|n| s.requests.len() >= n)
            || tries.is_some_and(|n| s.fake_offline_tries >= n)
        {
            s.freezing = true;
        }
        s.freezing
    }

    fn hotplug_init(&self, _addr: u64, _size: u64, _nid: i32, _unit: u64) -> Result {
        self.0.state.lock().hotplug_inits += 1;
        Ok(())
    }

    fn queue_work(&self, delay_ms: u32) {
        // Out of memory only loses the record; the tests see it as a missing entry.
        let _ = self.0.state.lock().queued.push(delay_ms, GFP_KERNEL);
    }

    fn add_memory(&self, addr: u64, size: u64) -> Result {
        let mut s = self.0.state.lock();
        if s.fail_add > 0 {
            s.fail_add -= 1;
            return Err(ENOMEM);
        }
        let pfn = addr / PAGE;
        s.move_chunks(pfn, size / PAGE, Move::Add);
        s.added.push(addr, GFP_KERNEL)?;
        s.added_sizes.push(size, GFP_KERNEL)?;
        Ok(())
    }

    fn offline_and_remove(&self, addr: u64, size: u64) -> Result {
        let mut s = self.0.state.lock();
        if s.fail_remove > 0 {
            s.fail_remove -= 1;
            return Err(EBUSY);
        }
        let Some(range) = s.chunks_of(addr / PAGE, size / PAGE) else {
            s.violations += 1;
            return Err(EINVAL);
        };
        for c in range {
            // An online block goes offline first: the memory notifier has the driver drop
            // its references (not modelled here), then the pages leave the buddy.
            let plugged = s.chunk_plugged(c) && !s.removes_plugged;
            let moves: &[Move] = match s.chunks[c] {
                Chunk::FakeOffline { ref_held: true } => {
                    &[Move::GoingOffline, Move::Offline, Move::Remove]
                }
                Chunk::FakeOffline { .. } | Chunk::Buddy => &[Move::Offline, Move::Remove],
                _ => &[Move::Remove],
            };
            let res = moves
                .iter()
                .try_fold(s.chunks[c], |chunk, &m| pages::next(chunk, m, plugged));
            match res {
                Ok(to) => s.chunks[c] = to,
                Err(why) => {
                    pr_err!("mock: removing chunk {} ({:?}): {}\n", c, s.chunks[c], why);
                    s.violations += 1;
                }
            }
        }
        s.removed.push(addr, GFP_KERNEL)?;
        Ok(())
    }

    fn unplug_online(&self) -> bool {
        self.0.state.lock().unplug_online
    }

    fn drop_slab(&self) -> bool {
        self.0.state.lock().drop_slab_calls += 1;
        true
    }

    fn mem_info(&self) -> MemInfo {
        let s = self.0.state.lock();
        MemInfo {
            available: s.available,
            total: s.other_memory + s.count(Chunk::Buddy) as u64 * CHUNK,
            slab_reclaimable: s.slab_reclaimable,
            active_file: s.active_file,
        }
    }

    fn explain_busy(&self, _pfn: u64, _nr: u64) {}

    fn online_pages(&self, pfn: u64, order: u32) {
        let mut s = self.0.state.lock();
        s.move_chunks(pfn, 1 << order, Move::Online);
        s.available += PAGE << order;
    }

    fn keep_fake_offline(&self, pfn: u64, nr: u64) {
        let mut s = self.0.state.lock();
        s.move_chunks(pfn, nr, Move::KeepFakeOffline);
    }

    fn fake_online(&self, pfn: u64, nr: u64) {
        let mut s = self.0.state.lock();
        s.move_chunks(pfn, nr, Move::FakeOnline);
        s.available += nr * PAGE;
    }

    fn fake_offline(&self, pfn: u64, nr: u64) -> Result {
        let mut s = self.0.state.lock();
        s.fake_offline_tries += 1;
        if s.fail_fake_offline_after > 0 {
            s.fail_fake_offline_after -= 1;
        } else if s.fail_fake_offline > 0 {
            s.fail_fake_offline -= 1;
            if let Some(a) = s.available_after_failure {
                s.available = a;
            }
            return Err(EBUSY);
        }
        s.move_chunks(pfn, nr, Move::FakeOffline);
        s.available = s.available.saturating_sub(nr * PAGE);
        s.migrated += nr;
        Ok(())
    }

    fn find_holder(&self, _pfn: u64, _nr: u64) -> Option<Holder> {
        self.0.state.lock().holder
    }

    fn pages_migrated(&self) -> u64 {
        self.0.state.lock().migrated
    }

    fn now_ns(&self) -> u64 {
        self.0.state.lock().now_ms * 1_000_000
    }

    fn trace_request(&self, ty: RequestType, addr: u64, nb: u16, answer: status::Answer, _ns: u64) {
        self.trace(Trace::Request {
            ty,
            addr,
            nb,
            answer,
        });
    }

    fn trace_round(&self, requested: u64, before: u64, after: u64, why: &'static CStr) {
        self.trace(Trace::Round {
            requested,
            before,
            after,
            why,
        });
    }

    fn trace_unplug_online(&self, pfn: u64, nr: u64, result: i32, _ns: u64) {
        self.trace(Trace::UnplugOnline { pfn, nr, result });
    }

    fn is_movable(&self, _pfn: u64) -> bool {
        self.0.state.lock().movable
    }

    fn going_offline(&self, pfn: u64, nr: u64) {
        self.0.state.lock().move_chunks(pfn, nr, Move::GoingOffline);
    }

    fn cancel_offline(&self, pfn: u64, nr: u64) {
        self.0
            .state
            .lock()
            .move_chunks(pfn, nr, Move::CancelOffline);
    }
}
