// SPDX-License-Identifier: GPL-2.0

//! The boundary between the driver's logic ([`crate::device`]) and the world around it.
//!
//! [`Transport`] is the device: its config space and its request queue. [`Platform`] is the
//! rest of the kernel the logic acts on: core mm (adding, removing, onlining and
//! offlining memory) and the worker's scheduling. The glue (`glue.rs`) implements both for
//! a real virtio device; the KUnit suites (`kunit/mock.rs`) implement them with a scripted
//! mock device and a model of the memory, so that the same logic can be fed every hostile
//! input a device can produce.
//!
//! Everything that comes through [`Transport`] is untrusted: the logic validates it.

use crate::{
    config::{Limits, ModeParams, RawConfig},
    headroom::MemInfo,
    protocol::{RequestType, REQUEST_SIZE, RESPONSE_SIZE},
    status::{Answer, Holder},
};
use kernel::{prelude::*, str::CStr};

/// A virtio-mem device's config space and request queue. One request at a time: the
/// transport lives inside the device's mutex.
pub(crate) trait Transport: Send + Unpin {
    /// Reads the whole config space (as the device has it now; validated by the caller).
    fn read_config(&mut self) -> RawConfig;

    /// Whether the device has set `VIRTIO_CONFIG_S_NEEDS_RESET`: it answers no request any
    /// more, until it is reset (which only unbinding does). A transport that cannot tell
    /// says no.
    fn needs_reset(&self) -> bool {
        false
    }

    /// Hands `req` to the device with `resp` as its response buffer and waits at most
    /// `timeout_ms` for the answer. `resp` reaches the device as the caller filled it and
    /// comes back with whatever the device wrote into it. Returns the length the device
    /// says it wrote (unchecked).
    ///
    /// `ETIMEDOUT` if the device did not answer in time: the buffers then stay the
    /// device's, so every later request fails (`EIO`). Fails at once, without waiting any
    /// longer, when the device needs a reset ([`Self::needs_reset`] then says so).
    fn request(
        &mut self,
        req: &[u8; REQUEST_SIZE],
        resp: &mut [u8; RESPONSE_SIZE as usize],
        timeout_ms: u32,
    ) -> Result<u32>;
}

/// Core mm and scheduling, as the driver's logic uses them. Page ranges are given by page
/// frame number and always lie in the device's region.
pub(crate) trait Platform: Send + Sync + Sized + 'static {
    /// The device's request channel.
    type Transport: Transport;

    /// The kernel's page size, memory block size, pageblock size and pluggable range.
    fn mm_limits(&self) -> Limits;
    /// The module parameters that choose the mode (`force_bbm`, `bbm_block_size`).
    fn mode_params(&self) -> ModeParams;
    /// The NUMA node of the device's memory.
    fn node(&self, node_id: u16, addr: u64) -> i32;
    /// Whether the device negotiated `VIRTIO_MEM_F_ACPI_PXM`.
    fn has_acpi_pxm(&self) -> bool;
    /// Whether the device negotiated `VIRTIO_MEM_F_PERSISTENT_SUSPEND`: it keeps its plugged
    /// memory while the guest is suspended.
    fn has_persistent_suspend(&self) -> bool;
    /// Whether this is a crash kernel (`is_kdump_kernel()`): the memory of the crashed
    /// kernel is to be dumped, not changed.
    fn is_kdump_kernel(&self) -> bool;
    /// Whether the kernel has `/proc/vmcore` (`CONFIG_PROC_VMCORE`), through which a crash
    /// kernel asks the driver what of its region is RAM.
    fn has_vmcore(&self) -> bool;
    /// Whether the worker is asked to freeze (system sleep is on its way): its round stops
    /// between requests. Only asked from the worker.
    fn freezing(&self) -> bool;
    /// Reserves the region and registers the memory group, the memory notifier and the
    /// online page callback.
    fn hotplug_init(&self, addr: u64, size: u64, nid: i32, unit: u64) -> Result;
    /// Runs the worker after `delay_ms` (at once for 0), replacing an earlier delay; a no-op
    /// once the device is going away. Process context (the worker, the memory notifier).
    fn queue_work(&self, delay_ms: u32);
    /// Adds a plugged memory block to Linux (driver-managed, in the memory group). May call
    /// back into the memory notifier and the online page callback.
    fn add_memory(&self, addr: u64, size: u64) -> Result;
    /// Offlines (if online) and removes a memory block with nothing plugged.
    fn offline_and_remove(&self, addr: u64, size: u64) -> Result;
    /// The `unplug_online` module parameter.
    fn unplug_online(&self) -> bool;
    /// Frees reclaimable slab objects; `false` if that is not possible here.
    fn drop_slab(&self) -> bool;
    /// What the guest has now: `MemAvailable`, `MemTotal`, `SReclaimable`, `Active(file)`.
    fn mem_info(&self) -> MemInfo;
    /// Logs what keeps pages from being freed.
    fn explain_busy(&self, pfn: u64, nr: u64);
    /// What keeps pages `pfn .. pfn + nr` from being freed: the first page in use there
    /// that is not movable, classified; `None` if every page in use is movable. Nothing is
    /// logged.
    fn find_holder(&self, _pfn: u64, _nr: u64) -> Option<Holder> {
        None
    }
    /// Pages migrated by core mm since boot (`pgmigrate_success`), to count what the
    /// driver's `alloc_contig_range` calls moved.
    fn pages_migrated(&self) -> u64 {
        0
    }
    /// A monotonic clock, in nanoseconds.
    fn now_ns(&self) -> u64 {
        0
    }
    /// Whether core mm onlines hot-added memory by itself (`memhp_default_state`);
    /// `None` if this kernel does not say (a module cannot ask).
    fn auto_online(&self) -> Option<bool> {
        None
    }

    /// Trace events (`virtio_mem_rust:*` in tracefs; the glue defines them). A request and
    /// its answer, with the time it was in flight.
    fn trace_request(&self, _ty: RequestType, _addr: u64, _nb: u16, _answer: Answer, _ns: u64) {}
    /// A worker round: the requested size, what was plugged before and after, why it
    /// stopped.
    fn trace_round(&self, _requested: u64, _before: u64, _after: u64, _why: &'static CStr) {}
    /// One try to take online pages `pfn .. pfn + nr` (`alloc_contig_range`): its result
    /// (0 or a negative errno) and how long it took.
    fn trace_unplug_online(&self, _pfn: u64, _nr: u64, _result: i32, _ns: u64) {}

    /// From the online page callback: plugged pages go to the buddy.
    fn online_pages(&self, pfn: u64, order: u32);
    /// From the online page callback: unplugged pages stay fake-offline.
    fn keep_fake_offline(&self, pfn: u64, nr: u64);
    /// Fake-offline pages, now plugged, go to the buddy.
    fn fake_online(&self, pfn: u64, nr: u64);
    /// One try to take plugged online pages from the kernel and keep them fake-offline,
    /// without the OOM killer and without allocation failure reports. `EBUSY` (or another
    /// error) if some could not be freed, `ENOMEM` if it is pointless to try again soon.
    fn fake_offline(&self, pfn: u64, nr: u64) -> Result;
    /// Whether the (online) page is in ZONE_MOVABLE.
    fn is_movable(&self, pfn: u64) -> bool;
    /// A block goes offline: drop the references on its fake-offline pages.
    fn going_offline(&self, pfn: u64, nr: u64);
    /// Offlining was cancelled: take them back.
    fn cancel_offline(&self, pfn: u64, nr: u64);
}
