// SPDX-License-Identifier: GPL-2.0

//! Core mm's rules for the pages of the device's region: where a page may go from where,
//! as memory hotplug and the driver's page calls (`Platform::online_pages` to
//! `Platform::cancel_offline`) move it.
//!
//! Both memory models use this one description: the KUnit mock (`kunit/mock.rs`, one state
//! per pageblock) and the host property tests' model (`host-tests/src/model.rs`, one state
//! per page, with blocks, zones and transitions around it). A move these rules refuse is a
//! bug the driver would cause in the real kernel. Plain `core` Rust.

/// Where a page of the device's region is in core mm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Page {
    /// Not added to Linux.
    Absent,
    /// Added; its memory block is offline.
    Offline,
    /// Online, in the buddy: the kernel may use it.
    Buddy,
    /// Online but `PageOffline`, owned by the driver; `ref_held` unless the driver dropped
    /// its reference for an offlining in progress.
    FakeOffline { ref_held: bool },
}

/// What happens to a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Move {
    /// `add_memory_driver_managed` adds its block.
    Add,
    /// The online page callback hands it to the buddy (`Platform::online_pages`).
    Online,
    /// The online page callback keeps it (`Platform::keep_fake_offline`).
    KeepFakeOffline,
    /// Plugged again, the driver hands it to the buddy (`Platform::fake_online`).
    FakeOnline,
    /// `alloc_contig_range` gives it to the driver (`Platform::fake_offline`).
    FakeOffline,
    /// Its block is going offline: the driver drops its reference
    /// (`Platform::going_offline`).
    GoingOffline,
    /// That offlining was cancelled: the driver takes it back (`Platform::cancel_offline`).
    CancelOffline,
    /// Its block went offline.
    Offline,
    /// Its block is removed.
    Remove,
}

/// The page's state after `m`, or the rule `m` breaks. `plugged`: whether the device has the
/// page plugged.
pub(crate) fn next(page: Page, m: Move, plugged: bool) -> Result<Page, &'static str> {
    use Page::*;
    let held = FakeOffline { ref_held: true };
    let dropped = FakeOffline { ref_held: false };
    match (m, page) {
        (Move::Online | Move::FakeOnline, _) if !plugged => {
            Err("memory the device has not plugged goes to the buddy")
        }
        (Move::Remove, Offline) if plugged => Err("plugged memory is removed"),
        (Move::Add, Absent) => Ok(Offline),
        (Move::Online, Offline) => Ok(Buddy),
        (Move::KeepFakeOffline, Offline) => Ok(held),
        (Move::FakeOnline, p) if p == held => Ok(Buddy),
        (Move::FakeOffline, Buddy) => Ok(held),
        (Move::GoingOffline, p) if p == held => Ok(dropped),
        (Move::CancelOffline, p) if p == dropped => Ok(held),
        (Move::Offline, Buddy) => Ok(Offline),
        (Move::Offline, p) if p == dropped => Ok(Offline),
        (Move::Remove, Offline) => Ok(Absent),
        (Move::Add, _) => Err("memory added twice"),
        (Move::Online | Move::KeepFakeOffline, _) => {
            Err("the online page callback sees a page that is not being onlined")
        }
        (Move::FakeOnline, _) => Err("a page the driver does not hold goes to the buddy"),
        (Move::FakeOffline, _) => Err("alloc_contig_range on a page not in the buddy"),
        (Move::GoingOffline, _) => Err("a reference dropped that the driver does not hold"),
        (Move::CancelOffline, _) => Err("a reference taken back that was never dropped"),
        (Move::Offline, _) => Err("a block goes offline with a page still referenced"),
        (Move::Remove, _) => Err("memory removed that is not added and offline"),
    }
}
