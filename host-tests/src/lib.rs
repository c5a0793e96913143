// SPDX-License-Identifier: GPL-2.0

//! The driver's plain `core` modules, compiled on the host exactly as the kernel compiles
//! them, with unit and property tests (`cargo test`).

#![allow(dead_code)]

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

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
