// SPDX-License-Identifier: GPL-2.0

//! `kernel::sync`: `Arc`, `Mutex`, `ARef`, on `std`.

use crate::{
    alloc::{AllocError, Flags},
    init::InPlaceInit,
};
use core::{
    mem::MaybeUninit,
    ops::{Deref, DerefMut},
};
use pinned_init::PinInit;

/// `kernel::sync::Arc`: a reference-counted value that never moves.
pub struct Arc<T>(std::sync::Arc<T>);

impl<T> Arc<T> {
    /// `Arc::new`.
    pub fn new(value: T, _flags: Flags) -> Result<Self, AllocError> {
        Ok(Arc(std::sync::Arc::new(value)))
    }
}

impl<T> Clone for Arc<T> {
    fn clone(&self) -> Self {
        Arc(self.0.clone())
    }
}

impl<T> Deref for Arc<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> InPlaceInit<T> for Arc<T> {
    type PinnedSelf = Self;

    fn try_pin_init<E>(init: impl PinInit<T, E>, _flags: Flags) -> Result<Self, E>
    where
        E: From<AllocError>,
    {
        let mut this: std::sync::Arc<MaybeUninit<T>> = std::sync::Arc::new_uninit();
        let slot = std::sync::Arc::get_mut(&mut this)
            .expect("a new Arc is not shared")
            .as_mut_ptr();
        // SAFETY: `slot` is valid for writes and stays where it is: the `Arc` never moves its
        // value. If the initialiser fails, it has left nothing to drop, and `MaybeUninit`
        // drops nothing either.
        unsafe { init.__pinned_init(slot)? };
        // SAFETY: initialised just above.
        Ok(Arc(unsafe { this.assume_init() }))
    }
}

/// `kernel::sync::Mutex`.
pub struct Mutex<T>(std::sync::Mutex<T>);

/// `kernel::sync::MutexGuard`: the guard and the mutex it locks.
pub struct MutexGuard<'a, T>(std::sync::MutexGuard<'a, T>, &'a Mutex<T>);

impl<T> Mutex<T> {
    /// `Mutex::new`, as `new_mutex!` calls it.
    pub fn new(value: T) -> impl PinInit<Self> {
        Mutex(std::sync::Mutex::new(value))
    }

    /// `Mutex::lock`.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard(self.0.lock().unwrap_or_else(|e| e.into_inner()), self)
    }

    /// `Mutex::try_lock`: `None` if someone holds it.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.0.try_lock().ok().map(|g| MutexGuard(g, self))
    }
}

impl<'a, T> MutexGuard<'a, T> {
    /// `Guard::lock_ref`: the mutex this guard locks.
    pub fn lock_ref(&self) -> &'a Mutex<T> {
        self.1
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// `kernel::sync::aref`.
pub mod aref {
    use core::ops::Deref;

    /// `kernel::sync::aref::ARef`: a counted reference to a kernel object.
    pub struct ARef<T>(std::sync::Arc<T>);

    impl<T> ARef<T> {
        /// A new object with one reference.
        pub fn new(value: T) -> Self {
            ARef(std::sync::Arc::new(value))
        }
    }

    impl<T> Clone for ARef<T> {
        fn clone(&self) -> Self {
            ARef(self.0.clone())
        }
    }

    impl<T> Deref for ARef<T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.0
        }
    }
}
