// SPDX-License-Identifier: GPL-2.0

//! Big Block Mode's bookkeeping (`drivers/bbm.rs`) against a model of big blocks, memory
//! blocks and core mm's notifier events.

use crate::bbm::{BbState, Bbm, FakeOffline, Refused, UnplugPass};
use crate::tests::counted;
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Cases the property's body ran.
static BBM_CASES: AtomicU64 = AtomicU64::new(0);

fn bbm(nr_bbs: usize, mbs_per_bb: usize) -> Bbm<Vec<u64>> {
    let words = Bbm::<Vec<u64>>::words_needed(nr_bbs, mbs_per_bb).unwrap();
    let mut b = Bbm::new(vec![0u64; words], nr_bbs, mbs_per_bb).unwrap();
    b.set_usable_bbs(nr_bbs);
    b
}

#[test]
fn storage_must_fit_and_be_zeroed() {
    let words = Bbm::<Vec<u64>>::words_needed(3, 8).unwrap();
    assert_eq!(words, 3 * 3);
    assert!(Bbm::new(vec![0u64; words - 1], 3, 8).is_none());
    assert!(Bbm::new(vec![1u64; words], 3, 8).is_none());
    assert!(Bbm::new(vec![0u64; 0], 0, 0).is_none());
    // More than 64 memory blocks in a big block: two words per bitmap.
    assert_eq!(Bbm::<Vec<u64>>::words_needed(2, 65), Some(2 * 5));
    assert_eq!(Bbm::<Vec<u64>>::words_needed(usize::MAX, 8), None);
}

/// A big block's life as the C driver leads it: plugged and added, onlined, fake-offlined,
/// offlined and removed, unplugged.
#[test]
fn a_big_block_from_plug_to_unplug() {
    let mut b = bbm(2, 8);
    assert_eq!(b.next_plug(), Some(0));
    b.plugged_new(0);
    assert_eq!(b.state(0), BbState::Added);
    assert_eq!(b.offline_bbs(), 1);
    for mb in 0..8 {
        b.going_online(0).unwrap();
        b.online(0, mb, mb % 2 == 0).unwrap();
    }
    assert!(!b.all_offline(0) && !b.all_movable(0));
    assert_eq!(b.offline_bbs(), 0);
    assert_eq!(b.next_plug(), Some(1));
    // Not offline, not all movable: only the last pass takes it.
    assert_eq!(b.next_unplug(UnplugPass::Offline, |_| false), None);
    assert_eq!(b.next_unplug(UnplugPass::Movable, |_| false), None);
    assert_eq!(b.next_unplug(UnplugPass::Any, |_| false), Some(0));
    assert!(b.start_unplug(0));
    assert!(!b.start_unplug(0), "unplugged twice at once");
    // Being unplugged: nothing of it goes online, its fake-offline pages lose their
    // references as each memory block goes offline.
    assert_eq!(b.going_online(0), Err(Refused(BbState::FakeOffline)));
    for mb in 0..8 {
        assert_eq!(b.going_offline(0, mb), Ok(FakeOffline::Yes));
        b.offline(0, mb).unwrap();
    }
    assert!(b.all_offline(0) && !b.in_transition(0));
    b.removed(0);
    assert_eq!(b.state(0), BbState::Plugged);
    assert_eq!(b.next_pending(), Some(0));
    b.unplugged(0);
    assert_eq!(b.state(0), BbState::Unused);
    assert_eq!(b.next_pending(), None);
}

/// A failed offline (CANCEL_OFFLINE) takes the references back; an aborted unplug leaves
/// the big block added and onlinable again.
#[test]
fn an_aborted_unplug_leaves_the_big_block_as_it_was() {
    let mut b = bbm(1, 4);
    b.plugged_new(0);
    for mb in 0..4 {
        b.going_online(0).unwrap();
        b.online(0, mb, true).unwrap();
    }
    assert_eq!(b.next_unplug(UnplugPass::Movable, |_| false), Some(0));
    assert!(b.start_unplug(0));
    assert_eq!(b.going_offline(0, 3), Ok(FakeOffline::Yes));
    assert_eq!(b.cancel_offline(0), FakeOffline::Yes);
    b.abort_unplug(0);
    assert_eq!(b.state(0), BbState::Added);
    assert!(b.all_movable(0) && b.online_mbs(0).count() == 4);
    assert_eq!(b.going_offline(0, 3), Ok(FakeOffline::No));
    assert_eq!(b.cancel_offline(0), FakeOffline::No);
    assert!(!b.in_transition(0));
}

#[test]
fn notifier_events_that_do_not_fit_are_refused() {
    let mut b = bbm(2, 2);
    // Not added by this driver.
    assert_eq!(b.going_online(0), Err(Refused(BbState::Unused)));
    assert_eq!(b.online(0, 0, false), Err(Refused(BbState::Unused)));
    assert_eq!(b.going_offline(0, 0), Err(Refused(BbState::Unused)));
    assert_eq!(b.offline(0, 0), Err(Refused(BbState::Unused)));
    // Left plugged by a failed add and a failed undo.
    b.plugged_new(1);
    b.add_failed(1, false);
    assert_eq!(b.going_online(1), Err(Refused(BbState::Plugged)));
    // An offline memory block does not go offline.
    b.plugged_new(0);
    assert_eq!(b.going_offline(0, 1), Err(Refused(BbState::Added)));
    // Refused events leave no transition behind.
    assert!(!b.in_transition(0) && !b.in_transition(1));
}

#[test]
fn a_big_block_in_transition_is_not_unplugged() {
    let mut b = bbm(1, 2);
    b.plugged_new(0);
    b.going_online(0).unwrap();
    assert_eq!(b.next_unplug(UnplugPass::Any, |_| false), None);
    assert!(!b.start_unplug(0));
    b.cancel_online(0);
    assert_eq!(b.next_unplug(UnplugPass::Offline, |_| false), Some(0));
    // Skipped (tried this round).
    assert_eq!(b.next_unplug(UnplugPass::Any, |bb| bb == 0), None);
}

#[test]
fn plugs_stay_inside_the_usable_region() {
    let mut b = bbm(4, 1);
    b.set_usable_bbs(2);
    b.plugged_new(0);
    b.plugged_new(1);
    assert_eq!(b.next_plug(), None);
    b.set_usable_bbs(9);
    assert_eq!(b.next_plug(), Some(2));
}

const NR_BBS: usize = 4;
const MBS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// Plug and add the next big block; the add fails with the given undo result.
    Plug(Option<bool>),
    /// Unplug the next big block left plugged; the UNPLUG succeeds or not.
    Pending(bool),
    /// A memory block goes online (or the onlining is cancelled).
    Online(usize, usize, bool, bool),
    /// A memory block goes offline (or the offlining is cancelled).
    Offline(usize, usize, bool),
    /// Unplug the next big block of a pass: its removal succeeds or not, then its UNPLUG.
    Unplug(usize, bool, bool),
    Usable(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::option::of(any::<bool>()).prop_map(Op::Plug),
        any::<bool>().prop_map(Op::Pending),
        (0..NR_BBS, 0..MBS, any::<bool>(), any::<bool>())
            .prop_map(|(b, m, z, c)| Op::Online(b, m, z, c)),
        (0..NR_BBS, 0..MBS, any::<bool>()).prop_map(|(b, m, c)| Op::Offline(b, m, c)),
        (0..3usize, any::<bool>(), any::<bool>()).prop_map(|(p, r, u)| Op::Unplug(p, r, u)),
        (0..=NR_BBS + 1).prop_map(Op::Usable),
    ]
}

/// The model: what Linux and the device have of each big block.
#[derive(Clone, Debug, Default)]
struct Model {
    plugged: [bool; NR_BBS],
    added: [bool; NR_BBS],
    online: [[bool; MBS]; NR_BBS],
    movable: [[bool; MBS]; NR_BBS],
    usable: usize,
}

fn check(b: &Bbm<Vec<u64>>, m: &Model) -> Result<(), TestCaseError> {
    for bb in 0..NR_BBS {
        let want = match (m.plugged[bb], m.added[bb]) {
            (false, false) => BbState::Unused,
            (true, false) => BbState::Plugged,
            (true, true) => BbState::Added,
            (false, true) => return Err(TestCaseError::fail("model: added, not plugged")),
        };
        prop_assert_eq!(b.state(bb), want, "big block {}", bb);
        prop_assert!(!b.in_transition(bb), "big block {} left in transition", bb);
        for mb in 0..MBS {
            prop_assert_eq!(b.is_online(bb, mb), m.online[bb][mb]);
        }
        prop_assert_eq!(b.all_offline(bb), !m.online[bb].iter().any(|o| *o));
        let movable = (0..MBS).all(|mb| !m.online[bb][mb] || m.movable[bb][mb]);
        prop_assert_eq!(b.all_movable(bb), movable);
    }
    let offline = (0..NR_BBS)
        .filter(|&bb| m.added[bb] && !m.online[bb].iter().any(|o| *o))
        .count();
    prop_assert_eq!(b.offline_bbs(), offline);
    Ok(())
}

#[test]
fn bbm_matches_the_model() {
    counted(
        "bbm_matches_the_model",
        &BBM_CASES,
        bbm_matches_the_model_prop,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::scaled(10_000)))]

    /// Random plugs, failed adds, onlining and offlining (some cancelled), unplug passes
    /// with failed removals and failed UNPLUGs, and usable-region changes: the bookkeeping
    /// and the model never disagree; plugs only take unused big blocks inside the usable
    /// region; each pass offers only what it should, highest first; nothing goes online
    /// while its big block is unplugged; a big block is removed only with every memory
    /// block offline.
    fn bbm_matches_the_model_prop(ops in prop::collection::vec(op(), 1..60)) {
        BBM_CASES.fetch_add(1, Ordering::Relaxed);
        let mut b = bbm(NR_BBS, MBS);
        let mut m = Model { usable: NR_BBS, ..Model::default() };
        for op in ops {
            match op {
                Op::Usable(n) => {
                    b.set_usable_bbs(n);
                    m.usable = n.min(NR_BBS);
                }
                Op::Plug(fails) => {
                    let want = (0..m.usable).find(|&bb| !m.plugged[bb]);
                    prop_assert_eq!(b.next_plug(), want);
                    if let Some(bb) = want {
                        b.plugged_new(bb);
                        m.plugged[bb] = true;
                        m.added[bb] = true;
                        if let Some(undone) = fails {
                            b.add_failed(bb, undone);
                            m.added[bb] = false;
                            m.plugged[bb] = !undone;
                        }
                    }
                }
                Op::Pending(ok) => {
                    let want = (0..NR_BBS).find(|&bb| m.plugged[bb] && !m.added[bb]);
                    prop_assert_eq!(b.next_pending(), want);
                    if let (Some(bb), true) = (want, ok) {
                        b.unplugged(bb);
                        m.plugged[bb] = false;
                    }
                }
                Op::Online(bb, mb, movable, cancel) => {
                    if m.online[bb][mb] {
                        continue; // core mm onlines offline memory blocks only
                    }
                    let r = b.going_online(bb);
                    prop_assert_eq!(r.is_ok(), m.added[bb]);
                    if r.is_err() {
                        continue;
                    }
                    if cancel {
                        b.cancel_online(bb);
                    } else {
                        b.online(bb, mb, movable).unwrap();
                        m.online[bb][mb] = true;
                        m.movable[bb][mb] = movable;
                    }
                }
                Op::Offline(bb, mb, cancel) => {
                    let r = b.going_offline(bb, mb);
                    prop_assert_eq!(r.is_ok(), m.added[bb] && m.online[bb][mb]);
                    match r {
                        Err(_) => continue,
                        Ok(f) => prop_assert_eq!(f, FakeOffline::No),
                    }
                    if cancel {
                        prop_assert_eq!(b.cancel_offline(bb), FakeOffline::No);
                    } else {
                        b.offline(bb, mb).unwrap();
                        m.online[bb][mb] = false;
                        m.movable[bb][mb] = false;
                    }
                }
                Op::Unplug(pass, removed, unplugged) => {
                    let pass = UnplugPass::ALL[pass];
                    let fits = |bb: usize| {
                        let any = m.online[bb].iter().any(|o| *o);
                        match pass {
                            UnplugPass::Offline => !any,
                            UnplugPass::Movable => (0..MBS).all(|mb| !m.online[bb][mb] || m.movable[bb][mb]),
                            UnplugPass::Any => true,
                        }
                    };
                    let want = (0..NR_BBS).rev().find(|&bb| m.added[bb] && fits(bb));
                    prop_assert_eq!(b.next_unplug(pass, |_| false), want);
                    let Some(bb) = want else { continue };
                    prop_assert!(b.start_unplug(bb));
                    prop_assert_eq!(b.going_online(bb), Err(Refused(BbState::FakeOffline)));
                    // offline_and_remove_memory offlines each online memory block; a
                    // failure cancels the one it was at and stops.
                    let mut failed = false;
                    for mb in 0..MBS {
                        if !m.online[bb][mb] {
                            continue;
                        }
                        prop_assert_eq!(b.going_offline(bb, mb), Ok(FakeOffline::Yes));
                        if !removed {
                            prop_assert_eq!(b.cancel_offline(bb), FakeOffline::Yes);
                            failed = true;
                            break;
                        }
                        b.offline(bb, mb).unwrap();
                        m.online[bb][mb] = false;
                        m.movable[bb][mb] = false;
                    }
                    if failed {
                        b.abort_unplug(bb);
                        continue;
                    }
                    prop_assert!(b.all_offline(bb), "big block {} removed with memory online", bb);
                    b.removed(bb);
                    m.added[bb] = false;
                    if unplugged {
                        b.unplugged(bb);
                        m.plugged[bb] = false;
                    }
                }
            }
            check(&b, &m)?;
        }
    }
}

mod mode {
    use crate::config::{choose_mode, BbmSizeIgnored, ModeChoice, ModeKind, ModeParams};
    use crate::tests::{limits, GIB, MIB};

    fn choose(bs: u64, force_bbm: bool, bbm_block_size: u64) -> ModeChoice {
        choose_mode(
            bs,
            &limits(),
            &ModeParams {
                force_bbm,
                bbm_block_size,
            },
        )
    }

    fn mode(kind: ModeKind, unit: u64) -> ModeChoice {
        ModeChoice {
            kind,
            unit,
            ignored: None,
        }
    }

    /// The C driver's choice, case by case (`virtio_mem_init_hotplug`).
    #[test]
    fn the_mode_is_chosen_as_upstream() {
        // Subblocks: at least a pageblock.
        assert_eq!(choose(4096, false, 0), mode(ModeKind::Sbm, 2 * MIB));
        assert_eq!(choose(2 * MIB, false, 0), mode(ModeKind::Sbm, 2 * MIB));
        assert_eq!(choose(64 * MIB, false, 0), mode(ModeKind::Sbm, 64 * MIB));
        // A device block of a memory block or more: Big Block Mode.
        assert_eq!(choose(128 * MIB, false, 0), mode(ModeKind::Bbm, 128 * MIB));
        assert_eq!(choose(256 * MIB, false, 0), mode(ModeKind::Bbm, 256 * MIB));
        assert_eq!(choose(GIB, false, 0), mode(ModeKind::Bbm, GIB));
        // Forced: the big block is at least a memory block.
        assert_eq!(choose(2 * MIB, true, 0), mode(ModeKind::Bbm, 128 * MIB));
        // bbm_block_size only counts in Big Block Mode.
        assert_eq!(
            choose(2 * MIB, false, 256 * MIB),
            mode(ModeKind::Sbm, 2 * MIB)
        );
        assert_eq!(
            choose(2 * MIB, true, 256 * MIB),
            mode(ModeKind::Bbm, 256 * MIB)
        );
        assert_eq!(choose(GIB, false, 4 * GIB), mode(ModeKind::Bbm, 4 * GIB));
    }

    #[test]
    fn an_unusable_bbm_block_size_is_ignored_and_said() {
        let c = choose(2 * MIB, true, 3 * 128 * MIB);
        assert_eq!((c.kind, c.unit), (ModeKind::Bbm, 128 * MIB));
        assert_eq!(c.ignored, Some(BbmSizeIgnored::NotPowerOfTwo));
        let c = choose(GIB, false, 256 * MIB);
        assert_eq!((c.kind, c.unit), (ModeKind::Bbm, GIB));
        assert_eq!(c.ignored, Some(BbmSizeIgnored::TooSmall));
        let c = choose(GIB, false, u64::MAX);
        assert_eq!(c.ignored, Some(BbmSizeIgnored::NotPowerOfTwo));
    }
}

/// The Big Block Mode worker (`drivers/device_bbm.rs`) on the KUnit suites' mock device
/// (`kunit/mock.rs`: QEMU's rules and core mm's page rules), under random resizes, onlining
/// and faults of the device and of core mm.
mod worker {
    use super::*;
    use crate::device::{MemEvent, NotifyAnswer, VirtioMem};
    use crate::mock::{
        new_mock, qemu_config, Answer, Chunk, MockPlatform, Shared, BUSY, CHUNK, NACK, PAGE,
    };
    use kernel::{device::Device, faux, sync::aref::ARef, sync::Arc};

    /// Cases the property's body ran.
    static CASES: AtomicU64 = AtomicU64::new(0);

    const MIB: u64 = 1 << 20;
    /// 2 MiB device blocks in big blocks of 256 MiB (two memory blocks): a 1 GiB region of
    /// four big blocks.
    const BB: u64 = 256 * MIB;
    const MB: u64 = 128 * MIB;

    #[derive(Clone, Debug)]
    enum Op {
        /// The operator asks for this many 64 MiB (not always whole big blocks).
        Resize(u64),
        /// Core mm onlines what was added, in ZONE_MOVABLE or not.
        Online(bool),
        /// The worker runs (its timer, or a config change).
        Run,
        /// The device answers the next request BUSY or NACK.
        Answer(bool),
        /// The next addition, removal, or `n` fake-offline tries fail.
        FailAdd,
        FailRemove,
        FailFakeOffline(u32),
        /// What the guest has available, in MiB.
        Available(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..=16u64).prop_map(Op::Resize),
            2 => any::<bool>().prop_map(Op::Online),
            3 => Just(Op::Run),
            1 => any::<bool>().prop_map(Op::Answer),
            1 => Just(Op::FailAdd),
            1 => Just(Op::FailRemove),
            1 => (1..8u32).prop_map(Op::FailFakeOffline),
            1 => prop_oneof![Just(64u64), Just(2048u64), Just(16384u64)].prop_map(Op::Available),
        ]
    }

    struct Fixture {
        vm: Arc<VirtioMem<MockPlatform>>,
        mock: Arc<Shared>,
        _reg: faux::Registration,
    }

    impl Fixture {
        fn new() -> Self {
            let (platform, transport) = new_mock(qemu_config()).unwrap();
            let mock = platform.0.clone();
            {
                let mut s = mock.state.lock();
                s.removes_plugged = true;
                s.mode_params.force_bbm = true;
                s.mode_params.bbm_block_size = BB;
            }
            let reg = faux::Registration::new(c"vmr-host-bbm", None).unwrap();
            let dev: ARef<Device> = reg.as_ref().into();
            let vm = VirtioMem::new(platform, transport, dev).unwrap();
            vm.start().unwrap();
            Self {
                vm,
                mock,
                _reg: reg,
            }
        }

        /// Onlines every memory block that is added and offline, as auto-onlining does.
        fn online(&mut self, movable: bool) {
            let (base, chunks_per_mb) = (qemu_config().addr, (MB / CHUNK) as usize);
            for i in 0..(qemu_config().region_size / MB) as usize {
                if self.mock.state.lock().chunks[i * chunks_per_mb] != Chunk::Offline {
                    continue;
                }
                let addr = base + i as u64 * MB;
                let ev = |e| self.vm.memory_event(e, addr, MB, movable);
                if ev(MemEvent::GoingOnline) != NotifyAnswer::Ok {
                    continue;
                }
                for off in (0..MB).step_by((PAGE << 10) as usize) {
                    self.vm.online_pages((addr + off) / PAGE, 10);
                }
                ev(MemEvent::Online);
            }
        }
    }

    #[test]
    fn bbm_worker_keeps_its_invariants() {
        counted(
            "bbm_worker_keeps_its_invariants",
            &CASES,
            bbm_worker_keeps_its_invariants_prop,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::scaled(3000)))]

        /// After every step: the device never saw an invalid request, core mm's rules were
        /// never broken, the driver counts what the device has plugged, no page stays
        /// fake-offline between rounds (a failed unplug hands every page back), nothing is
        /// plugged beyond the usable region, only whole big blocks are plugged, and the
        /// device is never given up. In the end, without faults, the driver is less than a
        /// big block from the requested size (as the C driver, it plugs and unplugs only
        /// while a whole big block is missing or too much).
        fn bbm_worker_keeps_its_invariants_prop(ops in prop::collection::vec(op(), 1..40)) {
            CASES.fetch_add(1, Ordering::Relaxed);
            let mut f = Fixture::new();
            let mut requested = 0;
            for op in ops {
                match op {
                    Op::Resize(n) => {
                        requested = n * 64 * MIB;
                        f.mock.state.lock().cfg.requested_size = requested;
                        f.vm.config_changed();
                        f.vm.run();
                    }
                    Op::Online(movable) => f.online(movable),
                    Op::Run => f.vm.run(),
                    Op::Answer(busy) => {
                        let ty = if busy { BUSY } else { NACK };
                        f.mock
                            .state
                            .lock()
                            .script
                            .push(Answer::Raw { ty, used_len: 10 }, kernel::alloc::flags::GFP_KERNEL)
                            .unwrap();
                    }
                    Op::FailAdd => f.mock.state.lock().fail_add = 1,
                    Op::FailRemove => f.mock.state.lock().fail_remove = 1,
                    Op::FailFakeOffline(n) => f.mock.state.lock().fail_fake_offline = n,
                    Op::Available(mib) => f.mock.state.lock().available = mib * MIB,
                }
                let (driver, broken) = f.vm.status();
                let s = f.mock.state.lock();
                prop_assert!(!broken);
                prop_assert_eq!(s.invalid_requests, 0);
                prop_assert_eq!(s.violations, 0);
                prop_assert_eq!(driver, s.device_plugged());
                prop_assert_eq!(driver % BB, 0, "not whole big blocks: {:#x}", driver);
                prop_assert_eq!(s.fake_offline(), 0);
                prop_assert!(driver <= s.cfg.usable_region_size);
                drop(s);
                // What sysfs shows: the driver's count, and a snapshot that agrees with
                // itself.
                let snap = f.vm.snapshot();
                let c = &snap.counters;
                prop_assert_eq!(snap.plugged, driver);
                prop_assert_eq!(snap.usage.online + snap.usage.offline, driver, "{:?}", snap);
                prop_assert!(snap.usage.movable <= snap.usage.online);
                prop_assert_eq!(c.bytes_plugged - c.bytes_unplugged, driver);
                prop_assert_eq!(
                    c.answers.iter().sum::<u64>(),
                    c.requests.iter().sum::<u64>()
                );
            }
            // No more faults: the requested size, rounded down to whole big blocks.
            {
                let mut s = f.mock.state.lock();
                s.script = kernel::alloc::KVec::new();
                s.fail_add = 0;
                s.fail_remove = 0;
                s.fail_fake_offline = 0;
                s.available = 16 << 30;
            }
            f.online(false);
            for _ in 0..3 {
                f.vm.config_changed();
                f.vm.run();
                f.online(false);
            }
            let (driver, _) = f.vm.status();
            let plugged = f.mock.state.lock().device_plugged();
            prop_assert_eq!(plugged, driver);
            prop_assert!(driver.abs_diff(requested) < BB,
                "{:#x} plugged for {:#x} requested", driver, requested);
        }
    }
}
