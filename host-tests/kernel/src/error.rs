// SPDX-License-Identifier: GPL-2.0

//! `kernel::error`: errno values as [`Error`].

use core::{convert::Infallible, fmt};

/// `kernel::error::Error`: a negative errno.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Error(i32);

/// `kernel::error::Result`.
pub type Result<T = (), E = Error> = core::result::Result<T, E>;

impl Error {
    /// `Error::to_errno`.
    pub fn to_errno(self) -> i32 {
        self.0
    }

    fn name(self) -> Option<&'static str> {
        code::NAMES
            .iter()
            .find(|(e, _)| *e == self)
            .map(|(_, n)| *n)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Error({})", self.0),
        }
    }
}

impl From<crate::alloc::AllocError> for Error {
    fn from(_: crate::alloc::AllocError) -> Self {
        code::ENOMEM
    }
}

impl From<crate::alloc::RemoveError> for Error {
    fn from(_: crate::alloc::RemoveError) -> Self {
        code::EINVAL
    }
}

impl From<Infallible> for Error {
    fn from(e: Infallible) -> Self {
        match e {}
    }
}

/// `kernel::error::code`.
pub mod code {
    use super::Error;

    macro_rules! codes {
        ($($name:ident = $n:literal),* $(,)?) => {
            $(
                #[doc = concat!("`-", stringify!($name), "`.")]
                pub const $name: Error = Error(-$n);
            )*
            pub(super) const NAMES: &[(Error, &str)] = &[$(($name, stringify!($name))),*];
        };
    }

    codes!(
        EPERM = 1,
        ENOENT = 2,
        EINTR = 4,
        EIO = 5,
        ENXIO = 6,
        EAGAIN = 11,
        ENOMEM = 12,
        EFAULT = 14,
        EBUSY = 16,
        EEXIST = 17,
        ENODEV = 19,
        EINVAL = 22,
        ENOSPC = 28,
        ERANGE = 34,
        ENOTSUPP = 524,
        ETIMEDOUT = 110,
    );
}
