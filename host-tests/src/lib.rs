// SPDX-License-Identifier: GPL-2.0

//! The driver's plain `core` modules, compiled on the host exactly as the kernel compiles
//! them, with unit and property tests (`cargo test`).

#![allow(dead_code)]

#[path = "../../drivers/bbm.rs"]
pub(crate) mod bbm;
#[path = "../../drivers/config.rs"]
pub(crate) mod config;
#[path = "../../drivers/device.rs"]
pub(crate) mod device;
#[path = "../../drivers/headroom.rs"]
pub(crate) mod headroom;
#[path = "../../drivers/platform.rs"]
pub(crate) mod platform;
#[path = "../../drivers/protocol.rs"]
pub(crate) mod protocol;
#[path = "../../drivers/retry.rs"]
pub(crate) mod retry;
#[path = "../../drivers/sbm.rs"]
pub(crate) mod sbm;
#[path = "../../drivers/status.rs"]
pub(crate) mod status;

// The KUnit suites and their mock device, run as host tests too, and QEMU's and core mm's
// rules, which the mock and the property tests' model share.
#[cfg(test)]
#[path = "../../kunit/tests.rs"]
mod kunit;
#[cfg(test)]
#[path = "../../kunit/mock.rs"]
mod mock;
#[cfg(test)]
#[path = "../../kunit/pages.rs"]
mod pages;
#[cfg(test)]
#[path = "../../kunit/qemu.rs"]
mod qemu;

#[cfg(test)]
mod bbm_tests;
#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

/// `n` property cases, or `VMR_HOST_CASES_PERCENT` percent of them (`make mutants-host`
/// runs fewer per mutant; CI runs all).
#[cfg(test)]
pub(crate) fn scaled(n: u32) -> u32 {
    let pct = std::env::var("VMR_HOST_CASES_PERCENT")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(100);
    (n * pct / 100).max(1)
}

/// What the KUnit mock asks of the glue when a test wants the running kernel's limits: on
/// the host, x86-64's (4 KiB pages, 128 MiB memory blocks, 2 MiB pageblocks, 46 bits of
/// physical address space).
#[cfg(test)]
mod glue {
    use crate::config::Limits;

    pub(crate) fn mm_limits() -> Limits {
        Limits {
            page_size: 4096,
            memory_block_size: 128 << 20,
            pageblock_size: 2 << 20,
            pluggable_start: 0,
            pluggable_end: (1 << 46) - 1,
        }
    }
}
