// SPDX-License-Identifier: GPL-2.0

//! `kernel::device::Device`, reduced to its log.

use std::sync::{Arc, Mutex};

/// The level of a `dev_*!` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Err,
    Warn,
    Info,
    Debug,
}

/// `kernel::device::Device`: what the driver logs through it is kept, in order.
pub struct Device {
    log: Arc<Mutex<Vec<(Level, String)>>>,
}

impl Device {
    /// A device with an empty log.
    pub fn new() -> crate::sync::aref::ARef<Self> {
        crate::sync::aref::ARef::new(Device {
            log: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Appends a line (what `dev_*!` do).
    pub fn print(&self, level: Level, args: core::fmt::Arguments<'_>) {
        let line = args.to_string();
        self.log.lock().unwrap().push((level, line));
    }

    /// Takes the lines logged so far.
    pub fn take_log(&self) -> Vec<(Level, String)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl AsRef<Device> for Device {
    fn as_ref(&self) -> &Device {
        self
    }
}

/// A new reference to the device (the kernel's takes a reference count; here the copy
/// shares the log).
impl From<&Device> for crate::sync::aref::ARef<Device> {
    fn from(dev: &Device) -> Self {
        crate::sync::aref::ARef::new(Device {
            log: dev.log.clone(),
        })
    }
}
