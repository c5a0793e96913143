// SPDX-License-Identifier: GPL-2.0

use crate::config::{Geometry, Limits, ModeParams, RawConfig, Sizes};
use crate::headroom::{MemInfo, Say, Stall, DROP_SLAB_MIN, MARGIN_SHIFT, MIN_MARGIN};
use crate::protocol::{
    encode_request, split_run, BadResponse, BlockState, RequestType, Response, StateAnswer,
    MAX_BLOCKS_PER_REQUEST,
};
use crate::retry::{Backoff, DROP_SLAB_AFTER, MAX_MS, MIN_MS};
use crate::sbm::{MbState, OnlineCursor, PlugStep, Plugged, Sbm, UnplugStep};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const GIB: u64 = 1 << 30;

pub(crate) fn limits() -> Limits {
    Limits {
        page_size: 4096,
        memory_block_size: 128 * MIB,
        pageblock_size: 2 * MIB,
        pluggable_start: 0,
        pluggable_end: (1 << 46) - 1,
    }
}

/// QEMU's device of the boot tests: 8 GiB at 4 GiB, 2 MiB blocks.
fn qemu() -> RawConfig {
    RawConfig {
        block_size: 2 * MIB,
        addr: 4 * GIB,
        region_size: 8 * GIB,
        usable_region_size: 8 * GIB,
        plugged_size: 0,
        requested_size: 0,
        node_id: 0,
    }
}

fn refused(raw: RawConfig, field: &str) {
    let e = Geometry::new(&raw, &limits(), &ModeParams::default())
        .and_then(|g| Sizes::new(&raw, &g))
        .expect_err("accepted a bad config");
    assert_eq!(e.field, field, "{e:?}");
}

#[test]
fn hostile_configs_are_refused_naming_the_field() {
    refused(
        RawConfig {
            block_size: 0,
            ..qemu()
        },
        "block_size",
    );
    refused(
        RawConfig {
            block_size: 3 * MIB,
            ..qemu()
        },
        "block_size",
    );
    // A power of two, but nothing in the region can be aligned to it: addr is the first to fail.
    refused(
        RawConfig {
            block_size: 1 << 63,
            ..qemu()
        },
        "addr",
    );
    refused(
        RawConfig {
            block_size: 16 * GIB,
            addr: 16 * GIB,
            ..qemu()
        },
        "region_size",
    ); // a device block larger than the region
    refused(
        RawConfig {
            block_size: 16,
            ..qemu()
        },
        "block_size",
    ); // > 65535 blocks per subblock
    refused(
        RawConfig {
            addr: 4 * GIB + MIB,
            ..qemu()
        },
        "addr",
    );
    refused(
        RawConfig {
            addr: u64::MAX - GIB + 1,
            region_size: 2 * GIB,
            ..qemu()
        },
        "region_size",
    );
    refused(
        RawConfig {
            addr: 1 << 46,
            ..qemu()
        },
        "region_size",
    ); // beyond the pluggable range
    refused(
        RawConfig {
            usable_region_size: 9 * GIB,
            ..qemu()
        },
        "usable_region_size",
    );
    refused(
        RawConfig {
            usable_region_size: GIB,
            requested_size: 2 * GIB,
            ..qemu()
        },
        "requested_size",
    );
    refused(
        RawConfig {
            requested_size: GIB + MIB,
            ..qemu()
        },
        "requested_size",
    );
    refused(
        RawConfig {
            plugged_size: 9 * GIB,
            ..qemu()
        },
        "plugged_size",
    );
    refused(
        RawConfig {
            region_size: 64 * MIB,
            ..qemu()
        },
        "region_size",
    ); // no whole memory block
    assert!(Geometry::new(&qemu(), &limits(), &ModeParams::default()).is_ok());
}

/// The memory block of a range the online page callback hands over: only a range inside
/// one of the region's memory blocks has one (a range across two blocks, or outside the
/// region on either side, is kept from the buddy). (`||` for `&&` in these checks survived
/// `make mutants-host` before this test.)
#[test]
fn memory_block_of_a_range_is_one_of_the_region() {
    let geo = Geometry::new(&qemu(), &limits(), &ModeParams::default()).unwrap();
    let mb = 128 * MIB;
    let first = 4 * GIB;
    assert_eq!(geo.mb_of(first, mb), Some(0));
    assert_eq!(geo.mb_of(first + 3 * mb + 4096, 4096), Some(3));
    assert_eq!(geo.mb_of(first + 63 * mb, mb), Some(63));
    // Across two blocks of the region.
    assert_eq!(geo.mb_of(first + mb - 4096, 2 * 4096), None);
    // Whole blocks just outside the region, below and above.
    assert_eq!(geo.mb_of(first - mb, mb), None);
    assert_eq!(geo.mb_of(first + 64 * mb, mb), None);
    // Empty, and wrapping around.
    assert_eq!(geo.mb_of(first, 0), None);
    assert_eq!(geo.mb_of(u64::MAX - 4095, 8192), None);
}

/// The memory block a notifier event names exactly, and the subblocks of a block the usable
/// region ends in. (Mutants of these checks survived `make mutants-host` before this test.)
#[test]
fn exact_blocks_and_the_usable_tail() {
    let geo = Geometry::new(&qemu(), &limits(), &ModeParams::default()).unwrap();
    let (mb, first) = (128 * MIB, 4 * GIB);
    assert_eq!(geo.mb_exactly(first + mb, mb), Some(1));
    // Aligned but not a whole block, or a whole block's size but not aligned.
    assert_eq!(geo.mb_exactly(first, 4096), None);
    assert_eq!(geo.mb_exactly(first + 2 * MIB, mb), None);
    // 2 MiB subblocks: a usable region ending 64 MiB into the first block has 32 of them
    // there; one ending at a block's end has none in the next.
    assert_eq!(geo.usable_tail(64 * MIB), 32);
    assert_eq!(geo.usable_tail(3 * mb + 10 * MIB), 5);
    assert_eq!(geo.usable_tail(3 * mb), 0);
    // A region with 64 MiB after its last whole block: the usable end there is in no block
    // of the region.
    let raw = RawConfig {
        region_size: 8 * GIB + 64 * MIB,
        usable_region_size: 8 * GIB + 64 * MIB,
        ..qemu()
    };
    let geo = Geometry::new(&raw, &limits(), &ModeParams::default()).unwrap();
    assert_eq!(geo.usable_tail(8 * GIB + 64 * MIB), 0);
}

/// A block left plugged but not added (adding failed, and so did the undo) is forgotten only
/// once all of it is unplugged: an UNPLUG with nothing done (BUSY, NACK) or one that gave
/// back only part of it leaves it pending with what is still plugged, or the device would
/// keep memory Linux no longer knows of and a later PLUG of the block would meet plugged
/// subblocks. (Both checks survived `make mutants-host` before this test.)
#[test]
fn pending_block_stays_pending_until_empty() {
    let words = Sbm::<Vec<u64>>::words_needed(2, 8).unwrap();
    let mut sbm = Sbm::new(vec![0u64; words], 2, 8).unwrap();
    sbm.set_usable_mbs(2);
    sbm.plugged_new(0, 8);
    sbm.add_failed(0, false);
    assert_eq!(sbm.state(0), MbState::Plugged);
    assert_eq!(sbm.next_pending(), Some((0, 0, 8)));
    // Nothing done: still pending, and not empty.
    assert!(!sbm.unplugged(0, 0, 0));
    assert_eq!(sbm.next_pending(), Some((0, 0, 8)));
    // The upper half given back: the lower half is still pending.
    assert!(!sbm.unplugged(0, 4, 4));
    assert_eq!(sbm.state(0), MbState::Plugged);
    assert_eq!(sbm.next_pending(), Some((0, 0, 4)));
    // The rest: the block is unused again, nothing pending.
    assert!(sbm.unplugged(0, 0, 4));
    assert_eq!(sbm.state(0), MbState::Unused);
    assert_eq!(sbm.next_pending(), None);
}

#[test]
fn runtime_changes_of_fixed_fields_are_refused() {
    let geo = Geometry::new(&qemu(), &limits(), &ModeParams::default()).unwrap();
    assert_eq!(
        Sizes::new(
            &RawConfig {
                block_size: 4 * MIB,
                ..qemu()
            },
            &geo
        )
        .unwrap_err()
        .field,
        "block_size"
    );
    assert_eq!(
        Sizes::new(
            &RawConfig {
                addr: 8 * GIB,
                ..qemu()
            },
            &geo
        )
        .unwrap_err()
        .field,
        "addr"
    );
}

#[test]
fn responses_are_checked() {
    assert_eq!(Response::parse(0, 10), Ok(Response::Ack));
    assert_eq!(Response::parse(1, 2), Ok(Response::Nack));
    assert_eq!(Response::parse(2, 10), Ok(Response::Busy));
    assert_eq!(Response::parse(3, 10), Ok(Response::Error));
    assert_eq!(Response::parse(0, 0), Err(BadResponse::Length(0)));
    assert_eq!(Response::parse(0, 1), Err(BadResponse::Length(1)));
    assert_eq!(Response::parse(0, 11), Err(BadResponse::Length(11)));
    assert_eq!(Response::parse(0xffff, 10), Err(BadResponse::Type(0xffff)));
    assert_eq!(Response::parse(4, 10), Err(BadResponse::Type(4)));
}

/// An answer to STATE as the device writes it: type, state, used length.
fn state_answer(ty: u16, state: u16, used_len: u32) -> Result<StateAnswer, BadResponse> {
    let mut buf = crate::protocol::RESPONSE_POISON;
    buf[0..2].copy_from_slice(&ty.to_le_bytes());
    buf[8..10].copy_from_slice(&state.to_le_bytes());
    StateAnswer::decode(&buf, used_len)
}

/// STATE is request type 3 (`VIRTIO_MEM_REQ_STATE`) with the address and block count of
/// PLUG; its answer is untrusted: an ACK must hold the state field (all 10 bytes) and a
/// known state; other valid types are handed to the caller, invalid ones refused as for
/// every request.
#[test]
fn state_requests_and_answers_are_checked() {
    let req = encode_request(RequestType::State, 0x1_2345_6000, 0x1234);
    let mut want = [0u8; 24];
    want[0] = 3;
    want[8..16].copy_from_slice(&0x1_2345_6000u64.to_le_bytes());
    want[16..18].copy_from_slice(&0x1234u16.to_le_bytes());
    assert_eq!(req, want);
    assert_eq!(RequestType::State.name(), "STATE");

    assert_eq!(
        state_answer(0, 0, 10),
        Ok(StateAnswer::Ack(BlockState::Plugged))
    );
    assert_eq!(
        state_answer(0, 1, 10),
        Ok(StateAnswer::Ack(BlockState::Unplugged))
    );
    assert_eq!(
        state_answer(0, 2, 10),
        Ok(StateAnswer::Ack(BlockState::Mixed))
    );
    // Unknown states, in both bytes of the field.
    assert_eq!(state_answer(0, 3, 10), Err(BadResponse::State(3)));
    assert_eq!(state_answer(0, 0x100, 10), Err(BadResponse::State(0x100)));
    // An ACK that does not reach the state field (what is there is poison, or stale).
    for len in 2..10 {
        assert_eq!(state_answer(0, 0, len), Err(BadResponse::NoState(len)));
    }
    assert_eq!(state_answer(0, 0, 11), Err(BadResponse::Length(11)));
    assert_eq!(state_answer(0, 0, 1), Err(BadResponse::Length(1)));
    // Other types need no state: the caller decides (ERROR: invalid request).
    assert_eq!(
        state_answer(3, 0xffff, 2),
        Ok(StateAnswer::Other(Response::Error))
    );
    assert_eq!(
        state_answer(2, 0, 10),
        Ok(StateAnswer::Other(Response::Busy))
    );
    assert_eq!(state_answer(9, 0, 10), Err(BadResponse::Type(9)));
    // Nothing written: the poison is an unknown type.
    let poison = crate::protocol::RESPONSE_POISON;
    assert_eq!(
        StateAnswer::decode(&poison, 10),
        Err(BadResponse::Type(0xffff))
    );
}

#[test]
fn backoff_doubles_caps_resets_and_drops_slab() {
    let mut b = Backoff::new();
    let mut expect = MIN_MS;
    for round in 1..=20u32 {
        let r = b.failed();
        assert_eq!(r.delay_ms, expect);
        assert_eq!(r.failed_rounds, round);
        assert_eq!(r.drop_slab, round >= DROP_SLAB_AFTER);
        expect = (expect * 2).min(MAX_MS);
    }
    b.reset();
    assert_eq!(b.failed().delay_ms, MIN_MS);
}

#[test]
fn the_guest_keeps_its_margin() {
    let info = |available, total| MemInfo {
        available,
        total,
        slab_reclaimable: 0,
        active_file: 0,
    };
    // Small guests keep 128 MiB, large ones 1/32 of their memory.
    assert_eq!(info(0, GIB).margin(), 128 * MIB);
    assert_eq!(info(0, 4 * GIB).margin(), 128 * MIB);
    assert_eq!(info(0, 7 * GIB).margin(), 224 * MIB);
    assert_eq!(info(0, 64 * GIB).margin(), 2 * GIB);
    // What is spare is what is available beyond it, never less than nothing.
    assert_eq!(info(100 * MIB, 3 * GIB).spare(), 0);
    assert_eq!(info(128 * MIB, 3 * GIB).spare(), 0);
    assert_eq!(info(1000 * MIB, 3 * GIB).spare(), 872 * MIB);
    assert!(info(1000 * MIB, 3 * GIB).may_take(872 * MIB));
    assert!(!info(1000 * MIB, 3 * GIB).may_take(872 * MIB + 4096));
    assert!(info(0, GIB).may_take(0));
    // The active page cache is the guest's working set: never counted as spare.
    let cached = MemInfo {
        active_file: 500 * MIB,
        ..info(1000 * MIB, 3 * GIB)
    };
    assert_eq!(cached.spare(), 372 * MIB);
    let all_cached = MemInfo {
        active_file: 2 * GIB,
        ..info(1000 * MIB, 3 * GIB)
    };
    assert_eq!(all_cached.spare(), 0);
    let slab = |slab_reclaimable| MemInfo {
        slab_reclaimable,
        ..info(GIB, GIB)
    };
    assert!(!slab(0).slab_worth_dropping());
    assert!(!slab(DROP_SLAB_MIN - 1).slab_worth_dropping());
    assert!(slab(DROP_SLAB_MIN).slab_worth_dropping());
}

#[test]
fn a_stall_is_told_at_its_start_then_at_the_backoff_pace_then_at_its_end() {
    let mut s = Stall::default();
    assert_eq!(s.released(), Say::Nothing);
    let said: Vec<Say> = (0..20).map(|_| s.pressed()).collect();
    let told: Vec<(usize, Say)> = said
        .into_iter()
        .enumerate()
        .filter(|(_, x)| *x != Say::Nothing)
        .collect();
    assert_eq!(
        told,
        [
            (0, Say::Begins),
            (1, Say::GoesOn(2)),
            (3, Say::GoesOn(4)),
            (7, Say::GoesOn(8)),
            (15, Say::GoesOn(16))
        ]
    );
    assert_eq!(s.released(), Say::Ends);
    assert_eq!(s.released(), Say::Nothing);
    assert_eq!(s.pressed(), Say::Begins);
}

/// Cases each property test's body actually ran (`generated cases: N` at its end).
static HEADROOM_CASES: AtomicU64 = AtomicU64::new(0);
static ANY_CONFIG_CASES: AtomicU64 = AtomicU64::new(0);
static SPLIT_CASES: AtomicU64 = AtomicU64::new(0);
static BOOKKEEPING_CASES: AtomicU64 = AtomicU64::new(0);

/// Runs a property (a `proptest!` function without `#[test]`) and prints how many cases
/// its body ran: `generated cases: N` (shown with `cargo test -- --show-output`, summed up
/// by `vm-scripts/test-all`).
pub(crate) fn counted(name: &str, counter: &AtomicU64, property: fn()) {
    property();
    println!(
        "{name}: generated cases: {}",
        counter.load(Ordering::Relaxed)
    );
}

#[test]
fn taking_what_is_spare_never_goes_below_the_margin() {
    counted(
        "taking_what_is_spare_never_goes_below_the_margin",
        &HEADROOM_CASES,
        taking_what_is_spare_never_goes_below_the_margin_prop,
    );
}

#[test]
fn any_config_is_safe() {
    counted(
        "any_config_is_safe",
        &ANY_CONFIG_CASES,
        any_config_is_safe_prop,
    );
}

#[test]
fn split_requests_fit_16_bits() {
    counted(
        "split_requests_fit_16_bits",
        &SPLIT_CASES,
        split_requests_fit_16_bits_prop,
    );
}

#[test]
fn bookkeeping_matches_the_model() {
    counted(
        "bookkeeping_matches_the_model",
        &BOOKKEEPING_CASES,
        bookkeeping_matches_the_model_prop,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::scaled(3000)))]

    /// Whatever the guest has: what may be taken leaves at least the margin available, the
    /// margin is never below its floor nor below 1/32 of the guest, and more available
    /// memory never means less to spare.
    fn taking_what_is_spare_never_goes_below_the_margin_prop(available in any::<u64>(), total in any::<u64>(),
                                                            active_file in any::<u64>(), take in any::<u64>(),
                                                            more in any::<u64>()) {
        HEADROOM_CASES.fetch_add(1, Ordering::Relaxed);
        let info = MemInfo { available, total, slab_reclaimable: 0, active_file };
        let m = info.margin();
        prop_assert!(m >= MIN_MARGIN && m >= total >> MARGIN_SHIFT);
        prop_assert!(m == MIN_MARGIN || m == total >> MARGIN_SHIFT);
        let counted = available.saturating_sub(active_file);
        if info.may_take(take) {
            prop_assert!(counted - take >= m);
        } else {
            prop_assert!(counted.checked_sub(take).is_none_or(|left| left < m));
        }
        prop_assert!(info.may_take(info.spare()));
        let richer = MemInfo { available: available.saturating_add(more), ..info };
        prop_assert!(richer.spare() >= info.spare());
    }

    /// Any config: never a panic; an accepted one keeps the geometry's invariants.
    fn any_config_is_safe_prop(bs_shift in 0u32..64, bs_raw in any::<u64>(), use_raw in any::<bool>(),
                          addr in any::<u64>(), region in any::<u64>(), usable in any::<u64>(),
                          plugged in any::<u64>(), requested in any::<u64>()) {
        ANY_CONFIG_CASES.fetch_add(1, Ordering::Relaxed);
        let raw = RawConfig {
            block_size: if use_raw { bs_raw } else { 1 << bs_shift },
            addr, region_size: region, usable_region_size: usable,
            plugged_size: plugged, requested_size: requested, node_id: 0,
        };
        if let Ok(g) = Geometry::new(&raw, &limits(), &ModeParams::default()) {
            prop_assert!(g.device_block_size.is_power_of_two());
            prop_assert!(g.device_block_size <= g.subblock_size && g.subblock_size < g.memory_block_size);
            prop_assert!(g.nr_mbs >= 1);
            let end = g.addr.checked_add(g.region_size).unwrap();
            prop_assert!(g.mb_addr(0) >= g.addr);
            prop_assert!(g.mb_addr(g.nr_mbs as usize - 1) + g.memory_block_size <= end);
            if let Ok(s) = Sizes::new(&raw, &g) {
                prop_assert!(s.requested <= s.usable && s.usable <= g.region_size);
                prop_assert!(g.usable_mbs(s.usable) as u64 <= g.nr_mbs);
            }
        }
    }

    /// Requests cover a run exactly, in order, each within 16 bits and whole subblocks.
    fn split_requests_fit_16_bits_prop(count in 0usize..100_000, bpsb_shift in 0u32..16) {
        SPLIT_CASES.fetch_add(1, Ordering::Relaxed);
        let bpsb = 1u64 << bpsb_shift;
        let mut next = 0;
        for (off, n) in split_run(count, bpsb) {
            prop_assert_eq!(off, next);
            prop_assert!(n >= 1);
            prop_assert!(n as u64 * bpsb <= MAX_BLOCKS_PER_REQUEST);
            next += n;
        }
        prop_assert_eq!(next, count);
    }
}

/// A reference model: per memory block, whether it is added, online (zone) and which
/// subblocks are plugged.
#[derive(Clone, Debug)]
enum Op {
    /// The device wants `n` more subblocks: plug what the planner says (the device ACKs).
    Plug(usize),
    /// Adding the next new block fails.
    AddFails,
    /// Give back `n` subblocks; `busy` marks runs that cannot be fake-offlined.
    Unplug(usize, u64),
    /// Core mm onlines block `mb` (movable or not).
    Online(usize, bool),
    /// Core mm offlines block `mb`.
    Offline(usize),
    /// The usable region changes: whole blocks, and subblocks of the next one.
    Usable(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..300).prop_map(Op::Plug),
        Just(Op::AddFails),
        ((1usize..300), any::<u64>()).prop_map(|(n, b)| Op::Unplug(n, b)),
        ((0usize..8), any::<bool>()).prop_map(|(m, z)| Op::Online(m, z)),
        (0usize..8).prop_map(Op::Offline),
        (0usize..=8, 0..SBS).prop_map(|(u, tail)| Op::Usable(u, tail)),
    ]
}

const NR_MBS: usize = 8;
const SBS: usize = 64;

struct Model {
    plugged: Vec<Vec<bool>>,
    added: Vec<bool>,
    online: Vec<bool>,
    usable: usize,
    /// Usable subblocks of block `usable`.
    tail: usize,
}

fn check(sbm: &Sbm<Vec<u64>>, m: &Model) -> Result<(), TestCaseError> {
    for mb in 0..NR_MBS {
        let n = m.plugged[mb].iter().filter(|p| **p).count();
        let want = match n {
            0 => Plugged::None,
            n if n == SBS => Plugged::All,
            _ => Plugged::Mixed,
        };
        prop_assert_eq!(sbm.plugged(mb, 0, SBS), want, "block {}", mb);
        for sb in 0..SBS {
            let p = sbm.plugged(mb, sb, 1) == Plugged::All;
            prop_assert_eq!(p, m.plugged[mb][sb], "block {} subblock {}", mb, sb);
        }
        let s = sbm.state(mb);
        prop_assert_eq!(s.is_online(), m.online[mb], "block {} is {:?}", mb, s);
        let added = !matches!(s, MbState::Unused | MbState::Plugged);
        prop_assert_eq!(added, m.added[mb], "block {} is {:?}", mb, s);
        let full = matches!(s, MbState::Offline | MbState::Kernel | MbState::Movable);
        if added {
            prop_assert_eq!(full, n == SBS, "block {} is {:?} with {} plugged", mb, s, n);
        }
    }
    // Where plugged memory ends: the highest plugged subblock, plus one.
    let end = (0..NR_MBS)
        .flat_map(|mb| (0..SBS).map(move |sb| (mb, sb)))
        .filter(|&(mb, sb)| m.plugged[mb][sb])
        .last()
        .map(|(mb, sb)| (mb, sb + 1));
    prop_assert_eq!(sbm.plugged_end(), end);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::scaled(10_000)))]

    /// Random sequences of resizes, add failures, busy memory, onlining and offlining: the
    /// bookkeeping and the model never disagree, plugs stay inside the usable region and on
    /// unplugged subblocks, unplugs on plugged ones, and a block is emptied before removal.
    fn bookkeeping_matches_the_model_prop(ops in prop::collection::vec(op(), 1..40)) {
        BOOKKEEPING_CASES.fetch_add(1, Ordering::Relaxed);
        let words = Sbm::<Vec<u64>>::words_needed(NR_MBS, SBS).unwrap();
        let mut sbm = Sbm::new(vec![0u64; words], NR_MBS, SBS).unwrap();
        let mut m = Model {
            plugged: vec![vec![false; SBS]; NR_MBS],
            added: vec![false; NR_MBS],
            online: vec![false; NR_MBS],
            usable: NR_MBS,
            tail: 0,
        };
        sbm.set_usable_mbs(NR_MBS);
        let mut add_fails = false;
        for op in ops {
            match op {
                Op::Usable(u, tail) => {
                    sbm.set_usable_mbs(u);
                    sbm.set_usable_tail(tail);
                    m.usable = u;
                    m.tail = if u < NR_MBS { tail } else { 0 };
                }
                Op::AddFails => add_fails = true,
                Op::Plug(mut n) => {
                    while let Some(step) = sbm.next_plug(n) {
                        match step {
                            PlugStep::Added { mb, first, count } => {
                                prop_assert!(m.added[mb] && count >= 1 && count <= n);
                                let room = match mb.cmp(&m.usable) {
                                    core::cmp::Ordering::Less => SBS,
                                    core::cmp::Ordering::Equal => m.tail,
                                    core::cmp::Ordering::Greater => 0,
                                };
                                prop_assert!(first + count <= room, "plugs {}..{} of block {} beyond the usable end", first, first + count, mb);
                                for sb in first..first + count {
                                    prop_assert!(!m.plugged[mb][sb], "plugs a plugged subblock");
                                    m.plugged[mb][sb] = true;
                                }
                                sbm.plugged_added(mb, first, count);
                                n -= count;
                            }
                            PlugStep::New { mb, count } => {
                                prop_assert!(!m.added[mb] && mb < m.usable, "new block {} outside usable {}", mb, m.usable);
                                prop_assert!(m.plugged[mb].iter().all(|p| !p));
                                prop_assert!(count >= 1 && count <= n.min(SBS));
                                sbm.plugged_new(mb, count);
                                if add_fails {
                                    add_fails = false;
                                    sbm.add_failed(mb, true);
                                    break;
                                }
                                for sb in 0..count { m.plugged[mb][sb] = true; }
                                m.added[mb] = true;
                                n -= count;
                            }
                        }
                        check(&sbm, &m)?;
                    }
                }
                Op::Online(mb, movable) => {
                    let r = sbm.going_online(mb);
                    prop_assert_eq!(r.is_ok(), m.added[mb] && !m.online[mb]);
                    if r.is_ok() {
                        sbm.online(mb, movable).unwrap();
                        m.online[mb] = true;
                    }
                }
                Op::Offline(mb) => {
                    let r = sbm.going_offline(mb);
                    prop_assert_eq!(r.is_ok(), m.online[mb]);
                    if r.is_ok() {
                        sbm.offline(mb).unwrap();
                        m.online[mb] = false;
                    }
                }
                Op::Unplug(mut n, busy) => {
                    let mut tried = [false; NR_MBS];
                    while let Some(step) = sbm.next_unplug(n, true, |mb| tried[mb]) {
                        let mb = match step {
                            UnplugStep::Offline { mb, first, count } => {
                                prop_assert!(m.added[mb] && !m.online[mb] && count >= 1 && count <= n);
                                for sb in first..first + count {
                                    prop_assert!(m.plugged[mb][sb], "unplugs an unplugged subblock");
                                    m.plugged[mb][sb] = false;
                                }
                                sbm.unplugged(mb, first, count);
                                n -= count;
                                mb
                            }
                            UnplugStep::Online { mb } => {
                                prop_assert!(m.online[mb]);
                                let mut cur = OnlineCursor::new(&sbm);
                                while let Some((first, count)) = cur.next(&sbm, mb, n) {
                                    prop_assert!(count.is_power_of_two() && first % count == 0 && count <= n);
                                    // A run is busy if its hash bit says so.
                                    if busy >> ((mb * 7 + first) % 64) & 1 == 1 && count == 1 {
                                        continue;
                                    }
                                    if busy >> ((mb * 13 + first + count) % 64) & 1 == 1 && count > 1 {
                                        continue;
                                    }
                                    for sb in first..first + count {
                                        prop_assert!(m.plugged[mb][sb], "unplugs an unplugged subblock");
                                        m.plugged[mb][sb] = false;
                                    }
                                    sbm.unplugged(mb, first, count);
                                    n -= count;
                                }
                                tried[mb] = true;
                                mb
                            }
                        };
                        if sbm.is_empty_added(mb) {
                            prop_assert!(m.plugged[mb].iter().all(|p| !p), "removes a block with plugged subblocks");
                            sbm.removed(mb);
                            m.added[mb] = false;
                            m.online[mb] = false;
                            tried[mb] = true;
                        }
                        check(&sbm, &m)?;
                    }
                }
            }
            check(&sbm, &m)?;
        }
    }
}
