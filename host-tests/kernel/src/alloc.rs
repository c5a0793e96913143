// SPDX-License-Identifier: GPL-2.0

//! `kernel::alloc`: allocation flags and the kernel's `Vec`, on `std`.

use core::{
    marker::PhantomData,
    ops::{Deref, DerefMut},
};

/// `kernel::alloc::Flags`: ignored on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags(u32);

/// `kernel::alloc::flags`.
pub mod flags {
    use super::Flags;

    /// `GFP_KERNEL`.
    pub const GFP_KERNEL: Flags = Flags(0);
}

/// `kernel::alloc::AllocError`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocError;

/// `kernel::alloc::kvec::RemoveError`: the index was out of bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoveError;

/// The kernel's allocators, as type markers.
pub mod allocator {
    /// `kmalloc`.
    pub struct Kmalloc;
    /// `kvmalloc`.
    pub struct KVmalloc;
}

/// `kernel::alloc::kbox::Box`: an owned value on the heap.
pub struct Box<T, A>(std::boxed::Box<T>, PhantomData<A>);

/// `kernel::alloc::KBox`.
pub type KBox<T> = Box<T, allocator::Kmalloc>;

impl<T, A> Deref for Box<T, A> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T, A> crate::init::InPlaceInit<T> for Box<T, A> {
    type PinnedSelf = core::pin::Pin<Self>;

    fn try_pin_init<E>(
        init: impl pinned_init::PinInit<T, E>,
        _flags: Flags,
    ) -> Result<Self::PinnedSelf, E>
    where
        E: From<AllocError>,
    {
        let mut this: std::boxed::Box<core::mem::MaybeUninit<T>> = std::boxed::Box::new_uninit();
        // SAFETY: the slot is valid for writes and never moves: the box is pinned below and
        // never handed out unpinned. A failed initialiser leaves nothing to drop.
        unsafe { init.__pinned_init(this.as_mut_ptr())? };
        // SAFETY: initialised just above; the value stays in its box from now on.
        Ok(unsafe { core::pin::Pin::new_unchecked(Box(this.assume_init(), PhantomData)) })
    }
}

/// `kernel::alloc::kvec::Vec`: a vector that allocates fallibly with the given allocator.
pub struct Vec<T, A>(std::vec::Vec<T>, PhantomData<A>);

/// `kernel::alloc::KVec`.
pub type KVec<T> = Vec<T, allocator::Kmalloc>;
/// `kernel::alloc::KVVec`.
pub type KVVec<T> = Vec<T, allocator::KVmalloc>;

impl<T, A> Vec<T, A> {
    /// `Vec::new`: empty, nothing allocated.
    pub const fn new() -> Self {
        Vec(std::vec::Vec::new(), PhantomData)
    }

    /// `Vec::push`: appends `v`, allocating as needed.
    pub fn push(&mut self, v: T, _flags: Flags) -> Result<(), AllocError> {
        self.0.try_reserve(1).map_err(|_| AllocError)?;
        self.0.push(v);
        Ok(())
    }

    /// `Vec::remove`: takes out element `i`, moving the rest down.
    pub fn remove(&mut self, i: usize) -> Result<T, RemoveError> {
        if i < self.0.len() {
            Ok(self.0.remove(i))
        } else {
            Err(RemoveError)
        }
    }

    /// `Vec::from_elem`: `n` clones of `value`.
    pub fn from_elem(value: T, n: usize, _flags: Flags) -> Result<Self, AllocError>
    where
        T: Clone,
    {
        let mut v = std::vec::Vec::new();
        v.try_reserve_exact(n).map_err(|_| AllocError)?;
        v.resize(n, value);
        Ok(Vec(v, PhantomData))
    }
}

impl<T, A> Default for Vec<T, A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, A> Deref for Vec<T, A> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T, A> DerefMut for Vec<T, A> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T, A> AsRef<[T]> for Vec<T, A> {
    fn as_ref(&self) -> &[T] {
        &self.0
    }
}

impl<T, A> AsMut<[T]> for Vec<T, A> {
    fn as_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}
