// SPDX-License-Identifier: GPL-2.0

//! virtio_mem_rust: a driver for virtio-mem paravirtualized memory devices.
//!
//! The hypervisor resizes the guest's memory by changing the device's requested size; the
//! driver follows by plugging device blocks and adding them to Linux. The crate root only
//! wires the pieces together:
//!
//! - [`config`]: the device's configuration, validated;
//! - [`protocol`]: requests and responses;
//! - [`sbm`]: Sub Block Mode bookkeeping, plug and unplug planning;
//! - [`bbm`]: Big Block Mode bookkeeping: big block states, online memory blocks, unplug passes;
//! - [`retry`]: the retry schedule;
//! - [`headroom`]: what the guest keeps for itself while memory is unplugged;
//! - [`status`]: what the driver tells an operator (sysfs, debugfs): state, sizes, counters;
//! - [`device`]: one device: the worker, the memory notifier, the online page callback;
//! - [`platform`]: what [`device`] needs from the device and from core mm;
//! - [`glue`]: the only place that calls C (`virtio_mem_glue.c`): [`platform`] for real.
//!
//! The KUnit suites (`kunit/`, `CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST`) run [`device`] against a
//! scripted mock device.

use kernel::prelude::*;

mod bbm;
mod config;
mod device;
mod glue;
mod headroom;
mod platform;
mod protocol;
mod retry;
mod sbm;
mod status;

#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
#[path = "../kunit/mock.rs"]
mod mock;
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
#[path = "../kunit/pages.rs"]
mod pages;
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
#[path = "../kunit/qemu.rs"]
mod qemu;
#[cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)]
#[path = "../kunit/tests.rs"]
mod tests;

module! {
    type: VirtioMemModule,
    name: "virtio_mem_rust",
    authors: ["The virtio_mem_rust developers"],
    description: "Virtio-mem driver (Rust)",
    license: "GPL",
}

struct VirtioMemModule;

impl kernel::Module for VirtioMemModule {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        glue::register_driver()?;
        Ok(Self)
    }
}

impl Drop for VirtioMemModule {
    fn drop(&mut self) {
        glue::unregister_driver();
    }
}
