// SPDX-License-Identifier: GPL-2.0

//! The Rust side of the C glue (`virtio_mem_glue.c`): the only place that calls C.
//!
//! The glue owns the C objects (the virtio device and its queue, the worker thread, the memory
//! notifier); the Rust state ([`VirtioMem`]) lives in an [`Arc`] whose raw pointer the glue
//! keeps from probe to release. This file also keeps the devices the online page callback
//! serves ([`DEVICES`]) and the worker's retry timer ([`RetryTimer`]).
//!
//! # Invariants
//!
//! A [`Glue`] points to a live `struct vmr_glue`: the glue frees it only after
//! `vmr_rs_release`, which drops its reference to the [`VirtioMem`] holding the [`Glue`].
//! The online page callback may hold another reference a little longer (it cloned it from
//! [`DEVICES`] just before the device left the list); it only calls
//! [`Platform::online_pages`] and [`Platform::keep_fake_offline`], which do not use the
//! `struct vmr_glue`. Requests use the glue's single request and response buffers, so
//! [`Channel`] (the only way to send one) lives inside the device's mutex.
//!
//! # Lock order
//!
//! [`CALLBACK_OWNER`] → memory hotplug lock (`set_online_page_callback` and
//! `restore_online_page_callback` take it) → [`DEVICES`] (the online page callback runs
//! under it) → the device's mutex. [`DEVICES`] is never held while calling into mm or into a
//! device. [`RetryTimer::armed`] is a leaf: nothing is called with it held but
//! `hrtimer_start`.

use crate::{
    config::{Limits, ModeParams, RawConfig},
    device::{MemEvent, NotifyAnswer, PmEvent},
    headroom::MemInfo,
    platform::{Platform, Transport},
    protocol::{RequestType, REQUEST_SIZE, RESPONSE_SIZE},
    status::{Answer, Attr, Holder},
};
use core::{fmt, ptr::NonNull};
use kernel::{
    bindings,
    debugfs::{Dir, File},
    device::Device,
    error::{from_result, to_result},
    ffi::{c_char, c_int, c_uint, c_ulong, c_void},
    impl_has_hr_timer, new_mutex,
    page::{PAGE_SHIFT, PAGE_SIZE},
    prelude::*,
    sync::{Arc, ArcBorrow, Mutex},
    time::{
        hrtimer::{
            ArcHrTimerHandle, HrTimer, HrTimerCallback, HrTimerCallbackContext, HrTimerPointer,
            HrTimerRestart, RelativeMode,
        },
        Delta, Monotonic,
    },
};

/// A device driven through the glue.
type VirtioMem = crate::device::VirtioMem<Glue>;

/// `struct vmr_glue`, opaque.
#[repr(C)]
pub(crate) struct RawGlue {
    _opaque: [u8; 0],
}

extern "C" {
    fn vmr_glue_read_config(glue: *mut RawGlue, cfg: *mut RawConfig);
    fn vmr_glue_has_feature(glue: *mut RawGlue, fbit: c_uint) -> bool;
    fn vmr_glue_needs_reset(glue: *mut RawGlue) -> bool;
    fn vmr_glue_request(
        glue: *mut RawGlue,
        req: *const c_void,
        resp: *mut c_void,
        timeout_ms: c_uint,
        used_len: *mut u32,
    ) -> c_int;
    fn vmr_glue_kick(glue: *mut RawGlue);
    fn vmr_glue_memory_block_size() -> u64;
    fn vmr_glue_pageblock_size() -> u64;
    fn vmr_glue_pluggable_range(start: *mut u64, end: *mut u64);
    fn vmr_glue_node(glue: *mut RawGlue, node_id: u16, addr: u64) -> c_int;
    fn vmr_glue_hotplug_init(
        glue: *mut RawGlue,
        addr: u64,
        size: u64,
        nid: c_int,
        unit_bytes: u64,
    ) -> c_int;
    fn vmr_glue_add_memory(glue: *mut RawGlue, addr: u64, size: u64) -> c_int;
    fn vmr_glue_online_pages(pfn: c_ulong, order: c_uint);
    fn vmr_glue_keep_fake_offline(pfn: c_ulong, nr_pages: c_ulong);
    fn vmr_glue_fake_online(pfn: c_ulong, nr_pages: c_ulong);
    fn vmr_glue_going_offline(pfn: c_ulong, nr_pages: c_ulong);
    fn vmr_glue_cancel_offline(pfn: c_ulong, nr_pages: c_ulong);
    fn vmr_glue_fake_offline(pfn: c_ulong, nr_pages: c_ulong) -> c_int;
    fn vmr_glue_is_movable(pfn: c_ulong) -> bool;
    fn vmr_glue_explain_busy(glue: *mut RawGlue, pfn: c_ulong, nr_pages: c_ulong);
    fn vmr_glue_find_holder(pfn: c_ulong, nr_pages: c_ulong) -> c_int;
    fn vmr_glue_pages_migrated() -> u64;
    fn vmr_glue_now_ns() -> u64;
    fn vmr_glue_auto_online() -> c_int;
    fn vmr_glue_trace_request(
        glue: *mut RawGlue,
        ty: u16,
        addr: u64,
        nb_blocks: u16,
        answer: u32,
        ns: u64,
    );
    fn vmr_glue_trace_round(
        glue: *mut RawGlue,
        requested: u64,
        before: u64,
        after: u64,
        stop: *const c_char,
    );
    fn vmr_glue_trace_unplug_online(
        glue: *mut RawGlue,
        pfn: c_ulong,
        nr_pages: c_ulong,
        result: c_int,
        ns: u64,
    );
    fn vmr_glue_offline_and_remove(addr: u64, size: u64) -> c_int;
    fn vmr_glue_drop_slab() -> bool;
    fn vmr_glue_mem_info(
        available: *mut u64,
        total: *mut u64,
        slab_reclaimable: *mut u64,
        active_file: *mut u64,
    );
    fn vmr_glue_unplug_online() -> bool;
    fn vmr_glue_mode_params(force: *mut bool, block_size: *mut u64);
    fn vmr_glue_in_kdump(glue: *mut RawGlue) -> bool;
    fn vmr_glue_has_vmcore() -> bool;
    fn vmr_glue_freezing() -> bool;
    fn vmr_glue_vmcore_add_range(list: *mut c_void, start: u64, size: u64) -> c_int;
    fn vmr_glue_page_to_pfn(page: *const c_void) -> c_ulong;
    fn vmr_glue_register_driver() -> c_int;
    fn vmr_glue_unregister_driver();
}

/// `VIRTIO_MEM_F_ACPI_PXM`.
const F_ACPI_PXM: c_uint = 0;
/// `VIRTIO_MEM_F_PERSISTENT_SUSPEND`.
const F_PERSISTENT_SUSPEND: c_uint = 2;

/// A device whose region the online page callback serves: `start..end`, in bytes.
struct Served {
    start: u64,
    end: u64,
    vm: Arc<VirtioMem>,
}

kernel::sync::global_lock! {
    // SAFETY: initialised in `register_driver`, before any device can probe.
    unsafe(uninit) static CALLBACK_OWNER: Mutex<()> = ();
}

kernel::sync::global_lock! {
    // SAFETY: initialised in `register_driver`, before any device can probe.
    unsafe(uninit) static DEVICES: Mutex<KVec<Served>> = KVec::new();
}

/// Registers the virtio driver.
pub(crate) fn register_driver() -> Result {
    // SAFETY: called once, from module init, before any device can probe (which is the first
    // use of the locks).
    unsafe {
        CALLBACK_OWNER.init();
        DEVICES.init();
        DEBUGFS.init();
    }
    // SAFETY: no precondition; called once from module init.
    to_result(unsafe { vmr_glue_register_driver() })
}

/// The online page callback.
const ONLINE_PAGE_CB: bindings::online_page_callback_t = Some(online_page_cb);

/// Puts `vm` on the list the online page callback serves, for `start..end`. The first device
/// installs the callback; it fails if another driver has one.
fn serve_online_pages(vm: Arc<VirtioMem>, start: u64, end: u64) -> Result {
    // Held across the (un)installing of the callback: a first device and a last one cannot
    // cross.
    let _owner = CALLBACK_OWNER.lock();
    let first = DEVICES.lock().is_empty();
    if first {
        // SAFETY: the callback is a function of this module; the last device restores it
        // (`stop_serving_online_pages`) before the module can go.
        to_result(unsafe { bindings::set_online_page_callback(ONLINE_PAGE_CB) })?;
    }
    let pushed = DEVICES.lock().push(Served { start, end, vm }, GFP_KERNEL);
    if pushed.is_err() && first {
        // SAFETY: installed just above; no device is on the list.
        unsafe { bindings::restore_online_page_callback(ONLINE_PAGE_CB) };
    }
    Ok(pushed?)
}

/// Takes the device at `rust` off the list; the last device restores the callback, which
/// waits for onlining under way to finish.
fn stop_serving_online_pages(rust: *const c_void) {
    let _owner = CALLBACK_OWNER.lock();
    let (gone, last) = {
        let mut devices = DEVICES.lock();
        let gone = devices
            .iter()
            .position(|d| core::ptr::eq(Arc::as_ptr(&d.vm).cast(), rust))
            .and_then(|i| devices.remove(i).ok());
        (gone, devices.is_empty())
    };
    if gone.is_some() && last {
        // SAFETY: installed by the first device (`serve_online_pages`), with this value.
        let rc = unsafe { bindings::restore_online_page_callback(ONLINE_PAGE_CB) };
        if rc != 0 {
            pr_warn!("cannot restore the online page callback: {}\n", rc);
        }
    }
    // The reference goes after the locks (it is not the last one: the glue has another).
    drop(gone);
}

/// Unregisters the virtio driver (removing every bound device first).
pub(crate) fn unregister_driver() {
    // SAFETY: called once from module exit, after a successful `register_driver`.
    unsafe { vmr_glue_unregister_driver() }
}

/// The kernel's page size, memory block size, pageblock size and pluggable range.
pub(crate) fn mm_limits() -> Limits {
    let (mut start, mut end) = (0, 0);
    // SAFETY: both pointers are valid for writes.
    unsafe { vmr_glue_pluggable_range(&mut start, &mut end) };
    Limits {
        page_size: PAGE_SIZE as u64,
        // SAFETY: these read constants.
        memory_block_size: unsafe { vmr_glue_memory_block_size() },
        // SAFETY: as above.
        pageblock_size: unsafe { vmr_glue_pageblock_size() },
        pluggable_start: start,
        pluggable_end: end,
    }
}

/// The worker's retry timer: it kicks the worker thread after a delay.
///
/// The thread, its kick and its wait stay in the glue (`vmr_glue_kick`, `vmr_thread_fn`):
/// a config change and this timer kick it in hard interrupt context, and 7.2's `kernel`
/// crate has no lock that interrupt context may take, so a `CondVar`'s flag could only
/// be set without the lock, and a kick between the thread's check and its sleep would be
/// lost. `wait_event_freezable` sets the task state before it checks the flag, and
/// `wake_up` may be called from any context.
#[pin_data]
pub(crate) struct RetryTimer {
    #[pin]
    timer: HrTimer<RetryTimer>,
    /// The armed timer, if any (its handle holds a reference to `self`), and whether the
    /// device is going away, after which it is never armed again.
    #[pin]
    armed: Mutex<(Option<ArcHrTimerHandle<RetryTimer>>, bool)>,
    raw: RawPtr,
}

impl_has_hr_timer! {
    impl HasHrTimer<Self> for RetryTimer {
        mode: RelativeMode<Monotonic>,
        field: self.timer
    }
}

impl HrTimerCallback for RetryTimer {
    type Pointer<'a> = Arc<Self>;

    /// Hard interrupt context.
    fn run(this: ArcBorrow<'_, Self>, _ctx: HrTimerCallbackContext<'_, Self>) -> HrTimerRestart {
        // SAFETY: `this.raw` is live: `RetryTimer::stop` cancels the timer before the glue
        // frees it, and the timer is not armed again.
        unsafe { vmr_glue_kick(this.raw.get()) };
        HrTimerRestart::NoRestart
    }
}

impl RetryTimer {
    fn new(raw: RawPtr) -> Result<Arc<Self>> {
        Arc::pin_init(
            try_pin_init!(Self {
                timer <- HrTimer::new(),
                armed <- new_mutex!((None, false), "RetryTimer::armed"),
                raw,
            }),
            GFP_KERNEL,
        )
    }

    /// Kicks the worker in `delay_ms`, replacing an earlier delay, unless the device is going
    /// away. Process context.
    fn start(this: &Arc<Self>, delay_ms: u32) {
        loop {
            let earlier = {
                let mut armed = this.armed.lock();
                if armed.1 {
                    return;
                }
                match armed.0.take() {
                    None => {
                        let delay = Delta::from_millis(delay_ms.into());
                        armed.0 = Some(this.clone().start(delay));
                        return;
                    }
                    Some(earlier) => earlier,
                }
            };
            // Dropping the handle cancels the timer and waits for its callback: without the
            // lock, and before the timer is armed again.
            drop(earlier);
        }
    }

    /// The device goes away: the timer is cancelled (its callback has run) and not armed
    /// again. Process context.
    fn stop(&self) {
        let earlier = {
            let mut armed = self.armed.lock();
            armed.1 = true;
            armed.0.take()
        };
        drop(earlier);
    }
}

/// `struct vmr_glue`, by pointer.
#[derive(Clone, Copy)]
struct RawPtr(NonNull<RawGlue>);

// SAFETY: the functions reachable through `RawPtr` may be called from any thread; the one
// that may not run concurrently (a request) is only reachable through `Channel`.
unsafe impl Send for RawPtr {}
// SAFETY: as above.
unsafe impl Sync for RawPtr {}

impl RawPtr {
    fn get(self) -> *mut RawGlue {
        self.0.as_ptr()
    }
}

/// A handle on the glue of one device, and its worker's retry timer.
pub(crate) struct Glue {
    raw: RawPtr,
    retry: Arc<RetryTimer>,
}

impl Drop for Glue {
    /// An armed timer holds a reference to itself: cancel it (a no-op after removal).
    fn drop(&mut self) {
        self.retry.stop();
    }
}

impl Platform for Glue {
    type Transport = Channel;

    fn mm_limits(&self) -> Limits {
        mm_limits()
    }

    fn mode_params(&self) -> ModeParams {
        let (mut force_bbm, mut bbm_block_size) = (false, 0);
        // SAFETY: both pointers are valid for writes; reads two module parameters.
        unsafe { vmr_glue_mode_params(&mut force_bbm, &mut bbm_block_size) };
        ModeParams {
            force_bbm,
            bbm_block_size,
        }
    }

    fn node(&self, node_id: u16, addr: u64) -> i32 {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe { vmr_glue_node(self.raw.get(), node_id, addr) }
    }

    fn has_acpi_pxm(&self) -> bool {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe { vmr_glue_has_feature(self.raw.get(), F_ACPI_PXM) }
    }

    fn has_persistent_suspend(&self) -> bool {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe { vmr_glue_has_feature(self.raw.get(), F_PERSISTENT_SUSPEND) }
    }

    fn is_kdump_kernel(&self) -> bool {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe { vmr_glue_in_kdump(self.raw.get()) }
    }

    fn has_vmcore(&self) -> bool {
        // SAFETY: reads a build-time constant.
        unsafe { vmr_glue_has_vmcore() }
    }

    /// Of the calling thread: the worker calls it.
    fn freezing(&self) -> bool {
        // SAFETY: no precondition: reads the freezer's state of the current task.
        unsafe { vmr_glue_freezing() }
    }

    /// Undone by the glue on remove.
    fn hotplug_init(&self, addr: u64, size: u64, nid: i32, unit: u64) -> Result {
        // SAFETY: `self.raw` is live (type invariant).
        let rc = unsafe { vmr_glue_hotplug_init(self.raw.get(), addr, size, nid, unit) };
        to_result(rc.min(0))
    }

    /// A no-op while removing.
    fn queue_work(&self, delay_ms: u32) {
        if delay_ms == 0 {
            // SAFETY: `self.raw` is live (type invariant).
            unsafe { vmr_glue_kick(self.raw.get()) }
        } else {
            RetryTimer::start(&self.retry, delay_ms);
        }
    }

    /// As "System RAM (virtio_mem)". Must not be called with the device's mutex held:
    /// onlining (which may happen right away) takes it.
    fn add_memory(&self, addr: u64, size: u64) -> Result {
        // SAFETY: `self.raw` is live (type invariant); the range is the caller's plugged block.
        to_result(unsafe { vmr_glue_add_memory(self.raw.get(), addr, size) })
    }

    /// Must not be called with the device's mutex held: offlining calls the memory
    /// notifier, which takes it.
    fn offline_and_remove(&self, addr: u64, size: u64) -> Result {
        // SAFETY: no precondition beyond the locking above.
        to_result(unsafe { vmr_glue_offline_and_remove(addr, size) })
    }

    fn unplug_online(&self) -> bool {
        // SAFETY: reads a module parameter.
        unsafe { vmr_glue_unplug_online() }
    }

    /// Built in only: `drop_slab` is not exported to modules.
    fn drop_slab(&self) -> bool {
        // SAFETY: no precondition; may sleep, and the worker may.
        unsafe { vmr_glue_drop_slab() }
    }

    fn mem_info(&self) -> MemInfo {
        let mut info = MemInfo::default();
        // SAFETY: the four pointers are valid for writes.
        unsafe {
            vmr_glue_mem_info(
                &mut info.available,
                &mut info.total,
                &mut info.slab_reclaimable,
                &mut info.active_file,
            )
        };
        info
    }

    fn explain_busy(&self, pfn: u64, nr: u64) {
        // SAFETY: `self.raw` is live (type invariant); the caller passes pages of an online
        // block of the device (they have a memmap).
        unsafe { vmr_glue_explain_busy(self.raw.get(), pfn as c_ulong, nr as c_ulong) }
    }

    fn find_holder(&self, pfn: u64, nr: u64) -> Option<Holder> {
        // SAFETY: the caller passes pages of an online block of the device (they have a
        // memmap).
        let code = unsafe { vmr_glue_find_holder(pfn as c_ulong, nr as c_ulong) };
        u32::try_from(code).ok().and_then(Holder::from_code)
    }

    fn pages_migrated(&self) -> u64 {
        // SAFETY: no precondition.
        unsafe { vmr_glue_pages_migrated() }
    }

    fn now_ns(&self) -> u64 {
        // SAFETY: no precondition.
        unsafe { vmr_glue_now_ns() }
    }

    fn auto_online(&self) -> Option<bool> {
        // SAFETY: no precondition.
        match unsafe { vmr_glue_auto_online() } {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn trace_request(&self, ty: RequestType, addr: u64, nb: u16, answer: Answer, ns: u64) {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe { vmr_glue_trace_request(self.raw.get(), ty as u16, addr, nb, answer as u32, ns) }
    }

    fn trace_round(&self, requested: u64, before: u64, after: u64, why: &'static CStr) {
        // SAFETY: `self.raw` is live (type invariant); `why` is a NUL-terminated string the
        // event copies.
        unsafe { vmr_glue_trace_round(self.raw.get(), requested, before, after, why.as_char_ptr()) }
    }

    fn trace_unplug_online(&self, pfn: u64, nr: u64, result: i32, ns: u64) {
        // SAFETY: `self.raw` is live (type invariant).
        unsafe {
            vmr_glue_trace_unplug_online(self.raw.get(), pfn as c_ulong, nr as c_ulong, result, ns)
        }
    }

    fn online_pages(&self, pfn: u64, order: u32) {
        // SAFETY: called from the online page callback for pages core mm is onlining.
        unsafe { vmr_glue_online_pages(pfn as c_ulong, order) }
    }

    fn keep_fake_offline(&self, pfn: u64, nr: u64) {
        // SAFETY: called from the online page callback for pages core mm is onlining.
        unsafe { vmr_glue_keep_fake_offline(pfn as c_ulong, nr as c_ulong) }
    }

    fn fake_online(&self, pfn: u64, nr: u64) {
        // SAFETY: the caller passes fake-offline pages of an online block it just plugged.
        unsafe { vmr_glue_fake_online(pfn as c_ulong, nr as c_ulong) }
    }

    /// `alloc_contig_range`, then PageOffline and the managed page count.
    fn fake_offline(&self, pfn: u64, nr: u64) -> Result {
        // SAFETY: the caller passes plugged pages of an online block of its region.
        to_result(unsafe { vmr_glue_fake_offline(pfn as c_ulong, nr as c_ulong) })
    }

    fn is_movable(&self, pfn: u64) -> bool {
        // SAFETY: the caller passes a page of an online block.
        unsafe { vmr_glue_is_movable(pfn as c_ulong) }
    }

    fn going_offline(&self, pfn: u64, nr: u64) {
        // SAFETY: the caller passes fake-offline pages of a block going offline.
        unsafe { vmr_glue_going_offline(pfn as c_ulong, nr as c_ulong) }
    }

    fn cancel_offline(&self, pfn: u64, nr: u64) {
        // SAFETY: the caller passes the pages it gave up in `going_offline`.
        unsafe { vmr_glue_cancel_offline(pfn as c_ulong, nr as c_ulong) }
    }
}

/// The device's request channel. Lives inside the device's mutex: one request at a time.
pub(crate) struct Channel(RawPtr);

impl Transport for Channel {
    fn read_config(&mut self) -> RawConfig {
        let mut cfg = RawConfig::default();
        // SAFETY: `self.0` is live; `cfg` is valid for writes and laid out as
        // `struct vmr_raw_config`.
        unsafe { vmr_glue_read_config(self.0.get(), &mut cfg) };
        cfg
    }

    fn needs_reset(&self) -> bool {
        // SAFETY: `self.0` is live (type invariant).
        unsafe { vmr_glue_needs_reset(self.0.get()) }
    }

    fn request(
        &mut self,
        req: &[u8; REQUEST_SIZE],
        resp: &mut [u8; RESPONSE_SIZE as usize],
        timeout_ms: u32,
    ) -> Result<u32> {
        let mut len = 0;
        // SAFETY: `self.0` is live; `&mut self` makes this the only request under way; `req`
        // and `resp` have the sizes of `struct virtio_mem_req` and `struct virtio_mem_resp`
        // (the glue checks them at build time), `len` is valid for writes.
        let rc = unsafe {
            vmr_glue_request(
                self.0.get(),
                req.as_ptr().cast(),
                resp.as_mut_ptr().cast(),
                timeout_ms,
                &mut len,
            )
        };
        to_result(rc)?;
        Ok(len)
    }
}

// The callbacks of the glue. Each gets the pointer `vmr_rs_probe` stored.

/// Probe: builds the device's state and hands it to the glue through `out`.
///
/// # Safety
///
/// `glue` is the caller's live `struct vmr_glue`, `dev` its device, `out` valid for writes.
#[no_mangle]
unsafe extern "C" fn vmr_rs_probe(
    glue: *mut RawGlue,
    dev: *mut bindings::device,
    out: *mut *const c_void,
) -> c_int {
    from_result(|| {
        let raw = RawPtr(NonNull::new(glue).ok_or(EINVAL)?);
        // SAFETY: `dev` is the bound device, valid during probe (function safety).
        let dev = unsafe { Device::get_device(dev) };
        let retry = RetryTimer::new(raw)?;
        let vm = VirtioMem::new(Glue { raw, retry }, Channel(raw), dev)?;
        let ptr = Arc::into_raw(vm.clone());
        // SAFETY: `out` is valid for writes (function safety). The glue keeps the pointer
        // before hotplug_init can call back with it.
        unsafe { *out = ptr.cast() };
        if let Err(e) = vm.start() {
            // SAFETY: as above.
            unsafe { *out = core::ptr::null() };
            // SAFETY: `ptr` came from `Arc::into_raw` above and was not handed out.
            drop(unsafe { Arc::from_raw(ptr) });
            return Err(e);
        }
        Ok(0)
    })
}

/// Turns the glue's pointer back into a borrow of the device.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe` and `vmr_rs_release` has not run yet.
unsafe fn borrow<'a>(rust: *const c_void) -> ArcBorrow<'a, VirtioMem> {
    // SAFETY: function safety; the glue holds the reference until `vmr_rs_release`.
    unsafe { ArcBorrow::from_raw(rust.cast()) }
}

/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_config_changed(rust: *const c_void) {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.config_changed();
}

/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_work(rust: *const c_void) {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.run();
}

/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_memory_event(
    rust: *const c_void,
    event: c_uint,
    start: u64,
    size: u64,
    movable: bool,
) -> c_int {
    let event = match event {
        0 => MemEvent::GoingOnline,
        1 => MemEvent::Online,
        2 => MemEvent::CancelOnline,
        3 => MemEvent::GoingOffline,
        4 => MemEvent::Offline,
        5 => MemEvent::CancelOffline,
        _ => return NotifyAnswer::Done as c_int,
    };
    // SAFETY: function safety.
    unsafe { borrow(rust) }.memory_event(event, start, size, movable) as c_int
}

/// The online page callback: the `2^order` pages at `page`, being onlined, go to the device
/// whose region holds them; pages of no device (a DIMM, another driver's) go online.
///
/// # Safety
///
/// Called by core mm, under the memory hotplug lock, for pages it is onlining.
unsafe extern "C" fn online_page_cb(page: *mut bindings::page, order: c_uint) {
    // SAFETY: `page` is a page of the memory map (function safety).
    let pfn = unsafe { vmr_glue_page_to_pfn(page.cast()) } as u64;
    let start = pfn << PAGE_SHIFT;
    let end = start + (1u64 << (PAGE_SHIFT as u32 + order));
    // Cloned out: the device's own lock is taken without `DEVICES`.
    let vm = DEVICES
        .lock()
        .iter()
        .find(|d| d.start <= start && end <= d.end)
        .map(|d| d.vm.clone());
    match vm {
        Some(vm) => vm.online_pages(pfn, order),
        // SAFETY: pages core mm is onlining (function safety), which no device of ours keeps.
        None => unsafe { bindings::generic_online_page(page, order) },
    }
}

/// The device at `rust` serves the online page callback for `addr .. addr + size`.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_serve_online_pages(rust: *const c_void, addr: u64, size: u64) -> c_int {
    // SAFETY: function safety.
    let vm: Arc<VirtioMem> = unsafe { borrow(rust) }.into();
    from_result(|| {
        let end = addr.checked_add(size).ok_or(EINVAL)?;
        serve_online_pages(vm, addr, end)?;
        Ok(0)
    })
}

/// The device at `rust` no longer serves the online page callback.
#[no_mangle]
extern "C" fn vmr_rs_stop_serving_online_pages(rust: *const c_void) {
    stop_serving_online_pages(rust);
}

/// Removal, before the worker thread stops: the retry timer is cancelled and not armed again.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_stop_retry(rust: *const c_void) {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.platform().retry.stop();
}

/// Remove: the work is cancelled and will not be queued again.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_remove(rust: *const c_void) {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.remove();
}

/// System sleep begins: `0`, or `-EPERM` if memory is plugged that the device would not
/// keep. After `0`, no request is sent until `vmr_rs_restore`.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_freeze(rust: *const c_void, to_idle: bool) -> c_int {
    // SAFETY: function safety.
    let vm = unsafe { borrow(rust) };
    from_result(|| {
        vm.freeze(to_idle)?;
        Ok(0)
    })
}

/// System sleep ends: the glue has a new queue and the device is ready.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_restore(rust: *const c_void) {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.restore();
}

/// The PM notifier, as `enum vmr_pm_event`; answers as `enum vmr_mem_answer`.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_pm_event(rust: *const c_void, event: c_uint) -> c_int {
    let event = match event {
        0 => PmEvent::HibernationPrepare,
        1 => PmEvent::RestorePrepare,
        _ => PmEvent::Other,
    };
    // SAFETY: function safety.
    unsafe { borrow(rust) }.pm_event(event) as c_int
}

/// `/proc/vmcore` in a crash kernel: whether page `pfn` is RAM to read.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released.
#[no_mangle]
unsafe extern "C" fn vmr_rs_pfn_is_ram(rust: *const c_void, pfn: c_ulong) -> bool {
    // SAFETY: function safety.
    unsafe { borrow(rust) }.pfn_is_ram(pfn as u64)
}

/// `/proc/vmcore` in a crash kernel: adds the region's plugged ranges to `list`; on an
/// error some may be added already (the caller frees them).
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released; `list` is a `struct list_head` of
/// `struct vmcore_range`, the caller's during the call.
#[no_mangle]
unsafe extern "C" fn vmr_rs_device_ram(rust: *const c_void, list: *mut c_void) -> c_int {
    // SAFETY: function safety.
    let vm = unsafe { borrow(rust) };
    from_result(|| {
        vm.device_ram(|start, size| {
            // SAFETY: `list` is the caller's list (function safety); one range is added.
            to_result(unsafe { vmr_glue_vmcore_add_range(list, start, size) })
        })?;
        Ok(0)
    })
}

/// Writes into a buffer of the glue's, cutting what does not fit.
struct BufWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for BufWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            return Err(fmt::Error);
        }
        Ok(())
    }
}

/// A sysfs attribute of the `virtio_mem` group, by file name, into `buf` (`size` bytes):
/// the length written, or `-EINVAL` for a name the driver does not know.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released; `name` is a NUL-terminated string
/// and `buf` is valid for writes of `size` bytes, both the caller's during the call.
#[no_mangle]
unsafe extern "C" fn vmr_rs_show(
    rust: *const c_void,
    name: *const c_char,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: function safety.
    let vm = unsafe { borrow(rust) };
    // SAFETY: `name` is NUL-terminated and lives during the call (function safety).
    let name = unsafe { CStr::from_char_ptr(name) };
    let Some(attr) = Attr::from_name(name.to_bytes()) else {
        return EINVAL.to_errno() as isize;
    };
    let mut w = BufWriter {
        // SAFETY: `buf` is valid for writes of `size` bytes during the call (function
        // safety), and nothing else uses it meanwhile.
        buf: unsafe { core::slice::from_raw_parts_mut(buf, size) },
        len: 0,
    };
    // A value cut at the page's end is shown cut (none is near that long).
    let _ = vm.show(attr, &mut w);
    w.len as isize
}

/// A debugfs file showing something of a device (it holds a reference to it).
type DebugFile = Pin<KBox<File<Arc<VirtioMem>>>>;

/// A device's files in debugfs (`virtio_mem_rust/<device>/`): removed when dropped.
struct Debugfs {
    /// The device's `rust` pointer, as the glue knows it.
    rust: usize,
    _dir: Dir,
    _files: [DebugFile; 3],
}

/// The driver's debugfs directory, and each bound device's files in it.
struct DebugfsDevices {
    root: Option<Dir>,
    devices: KVec<Debugfs>,
}

kernel::sync::global_lock! {
    // SAFETY: initialised in `register_driver`, before any device can probe.
    unsafe(uninit) static DEBUGFS: Mutex<DebugfsDevices> =
        DebugfsDevices { root: None, devices: KVec::new() };
}

/// Makes the device's debugfs files: `status` (every attribute of one snapshot), `blocks`
/// (one line per block in use), `retry` (the retry schedule).
fn debugfs_files(dir: &Dir, vm: &Arc<VirtioMem>) -> Result<[DebugFile; 3]> {
    Ok([
        KBox::pin_init(
            dir.read_callback_file(c"status", vm.clone(), &|vm: &Arc<VirtioMem>, f| {
                vm.write_status(f)
            }),
            GFP_KERNEL,
        )?,
        KBox::pin_init(
            dir.read_callback_file(c"blocks", vm.clone(), &|vm: &Arc<VirtioMem>, f| {
                vm.write_blocks(f)
            }),
            GFP_KERNEL,
        )?,
        KBox::pin_init(
            dir.read_callback_file(c"retry", vm.clone(), &|vm: &Arc<VirtioMem>, f| {
                vm.write_retry(f)
            }),
            GFP_KERNEL,
        )?,
    ])
}

/// The device at `rust`, named `name`, gets its debugfs files. Without them (no debugfs,
/// no memory) the driver works the same: nothing is returned.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe`, not yet released; `name` is a NUL-terminated string,
/// the caller's during the call.
#[no_mangle]
unsafe extern "C" fn vmr_rs_debugfs_init(rust: *const c_void, name: *const c_char) {
    // SAFETY: function safety.
    let vm: Arc<VirtioMem> = unsafe { borrow(rust) }.into();
    // SAFETY: `name` is NUL-terminated and lives during the call (function safety).
    let name = unsafe { CStr::from_char_ptr(name) };
    let mut d = DEBUGFS.lock();
    let root = d.root.get_or_insert_with(|| Dir::new(c"virtio_mem_rust"));
    let dir = root.subdir(name);
    let Ok(files) = debugfs_files(&dir, &vm) else {
        return;
    };
    let entry = Debugfs {
        rust: rust as usize,
        _dir: dir,
        _files: files,
    };
    if d.devices.push(entry, GFP_KERNEL).is_err() {
        pr_warn!("no debugfs files for {:?}: out of memory\n", name);
    }
}

/// The device at `rust` loses its debugfs files (removing them waits for readers under
/// way); the last device takes the directory with it.
#[no_mangle]
extern "C" fn vmr_rs_debugfs_exit(rust: *const c_void) {
    let gone = {
        let mut d = DEBUGFS.lock();
        let gone = d
            .devices
            .iter()
            .position(|e| e.rust == rust as usize)
            .and_then(|i| d.devices.remove(i).ok());
        if d.devices.is_empty() {
            d.root = None;
        }
        gone
    };
    // The files go (and their references to the device) without the lock.
    drop(gone);
}

/// Drops the glue's reference: nothing calls back with `rust` any more.
///
/// # Safety
///
/// `rust` comes from `vmr_rs_probe` and is not used again.
#[no_mangle]
unsafe extern "C" fn vmr_rs_release(rust: *const c_void) {
    // SAFETY: function safety; this is the reference `vmr_rs_probe` made with `into_raw`.
    drop(unsafe { Arc::<VirtioMem>::from_raw(rust.cast()) });
}
