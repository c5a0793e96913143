// SPDX-License-Identifier: GPL-2.0

//! A host stand-in for the parts of Linux's `kernel` crate the driver's worker uses.
//!
//! `drivers/device.rs` compiles against this crate in the host tests exactly as it compiles
//! against the kernel's: the paths, names and signatures are the kernel's (Linux 7.2,
//! `rust/kernel/`), and the pinned-initialisation macros are the real ones, from the
//! `pinned-init` crate (Rust-for-Linux's pin-init). What differs is only below the API:
//! [`sync::Mutex`] is a `std` mutex, [`sync::Arc`] a `std` `Arc`, [`alloc::KVec`] a `std`
//! `Vec`, and the `dev_*!` macros append to the [`device::Device`]'s log, which the tests
//! read.

pub mod alloc;
pub mod device;
pub mod error;
pub mod sync;

/// `kernel::str`.
pub mod str {
    pub use core::ffi::CStr;
}

/// `kernel::faux`: a faux device, here one with its own log.
pub mod faux {
    use crate::{device::Device, error::Result, str::CStr, sync::aref::ARef};

    /// `kernel::faux::Registration`.
    pub struct Registration(ARef<Device>);

    impl Registration {
        /// `Registration::new`: a device named `name`.
        pub fn new(_name: &CStr, _parent: Option<&Device>) -> Result<Self> {
            Ok(Registration(Device::new()))
        }
    }

    impl AsRef<Device> for Registration {
        fn as_ref(&self) -> &Device {
            &self.0
        }
    }
}

/// `kernel::prelude`.
pub mod prelude {
    pub use crate::alloc::{flags::*, Flags, KBox, KVVec, KVec, Vec};
    pub use crate::error::{code::*, Error, Result};
    pub use crate::init::InPlaceInit;
    pub use crate::{dev_dbg, dev_err, dev_info, dev_warn, pr_err, pr_info, try_pin_init};
    pub use core::pin::Pin;
    pub use macros::kunit_tests;
    pub use pinned_init::{init, pin_data, pin_init, Init, PinInit};
}

/// `kernel::init`: in-place initialisation of the kernel's smart pointers.
pub mod init {
    use crate::{alloc::Flags, error::Error};
    use pinned_init::PinInit;

    /// `kernel::init::InPlaceInit`, for [`crate::sync::Arc`].
    pub trait InPlaceInit<T>: Sized {
        /// The pinned form of `Self` (`Self` for `Arc`, which never moves its value).
        type PinnedSelf;

        /// Allocates and initialises in place, with any error convertible from `AllocError`.
        fn try_pin_init<E>(init: impl PinInit<T, E>, flags: Flags) -> Result<Self::PinnedSelf, E>
        where
            E: From<crate::alloc::AllocError>;

        /// Allocates and initialises in place.
        fn pin_init<E>(init: impl PinInit<T, E>, flags: Flags) -> Result<Self::PinnedSelf, Error>
        where
            Error: From<E>,
        {
            // SAFETY: the closure initialises `slot` completely, or fails having left
            // nothing to drop, as `init` does.
            let init = unsafe {
                pinned_init::pin_init_from_closure(|slot| {
                    // `slot` is the uninitialised value's place, as `__pinned_init` asks.
                    init.__pinned_init(slot).map_err(Error::from)
                })
            };
            Self::try_pin_init(init, flags)
        }
    }
}

/// `kernel::try_pin_init!`: `pin_init!` with the kernel's [`error::Error`] as the error.
#[macro_export]
macro_rules! try_pin_init {
    ($t:ident $(::<$($generics:ty),* $(,)?>)? { $($fields:tt)* }) => {
        ::pinned_init::try_pin_init!($t $(::<$($generics),*>)? { $($fields)* }? $crate::error::Error)
    };
}

/// `kernel::new_mutex!`.
#[macro_export]
macro_rules! new_mutex {
    ($inner:expr $(, $name:literal)? $(,)?) => {
        $crate::sync::Mutex::new($inner)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! dev_printk {
    ($level:ident, $dev:expr, $($f:tt)*) => {
        $crate::device::Device::print(
            $dev.as_ref(),
            $crate::device::Level::$level,
            ::core::format_args!($($f)*),
        )
    };
}

/// `kernel::dev_err!`.
#[macro_export]
macro_rules! dev_err {
    ($($f:tt)*) => { $crate::dev_printk!(Err, $($f)*) };
}

/// `kernel::dev_warn!`.
#[macro_export]
macro_rules! dev_warn {
    ($($f:tt)*) => { $crate::dev_printk!(Warn, $($f)*) };
}

/// `kernel::dev_info!`.
#[macro_export]
macro_rules! dev_info {
    ($($f:tt)*) => { $crate::dev_printk!(Info, $($f)*) };
}

/// `kernel::dev_dbg!`.
#[macro_export]
macro_rules! dev_dbg {
    ($($f:tt)*) => { $crate::dev_printk!(Debug, $($f)*) };
}

/// `kernel::pr_err!`: to standard error.
#[macro_export]
macro_rules! pr_err {
    ($($f:tt)*) => { ::std::eprint!($($f)*) };
}

/// `kernel::pr_info!`: to standard error.
#[macro_export]
macro_rules! pr_info {
    ($($f:tt)*) => { ::std::eprint!($($f)*) };
}
