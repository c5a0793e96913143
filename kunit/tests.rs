// SPDX-License-Identifier: GPL-2.0

//! KUnit suites of virtio_mem_rust (`CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST`).
//!
//! The driver's logic ([`VirtioMem`]) runs on the scripted mock device of `mock.rs`; each
//! test drives it as the glue would (config change, worker run, memory notifier, online
//! page callback) and checks what the device and the memory model saw. Each test proves one
//! check of the driver: without that check it fails.
//!
//! - `virtio_mem_rust_config`: configs a device may present, at probe and at runtime;
//! - `virtio_mem_rust_responses`: answers a device may give, and failures of core mm;
//! - `virtio_mem_rust_headroom`: a guest that needs its memory keeps it;
//! - `virtio_mem_rust_sleep`: suspend (freeze, restore, a round stopped by the freezer),
//!   hibernation, and memory left plugged by a kexec;
//! - `virtio_mem_rust_kdump`: a crash kernel changes nothing and tells `/proc/vmcore` what
//!   is plugged;
//! - `virtio_mem_rust_status`: what sysfs shows (state, sizes, `blocked_by`, counters) and
//!   the trace events, under the mock's faults.

use crate::{
    config::RawConfig,
    device::{MemEvent, NotifyAnswer, PmEvent, VirtioMem},
    headroom::{MIN_MARGIN, POLL_MS},
    mock::{
        new_mock, qemu_config, Answer, Chunk, MockPlatform, Shared, State, ACK, BUSY, CHUNK, ERROR,
        MEMORY_BLOCK, NACK, PAGE, PLUG, STATE, STATE_MIXED, STATE_PLUGGED, UNPLUG, UNPLUG_ALL,
    },
};
use kernel::{
    device::Device,
    faux,
    prelude::*,
    str::CStr,
    sync::{aref::ARef, Arc},
};

const MIB: u64 = 1 << 20;
/// The largest order core mm onlines at once on x86-64 (`MAX_PAGE_ORDER`).
const ONLINE_ORDER: u32 = 10;

/// A whole response of type `ty`, written by the device without changing anything.
fn answer(ty: u16) -> Answer {
    Answer::Raw { ty, used_len: 10 }
}

/// Probes the driver's logic on a mock device with config `cfg`. `Err` if it refuses the
/// device.
fn probe(name: &CStr, cfg: RawConfig, tweak: impl FnOnce(&mut State)) -> Result<Fixture> {
    let (platform, transport) = new_mock(cfg)?;
    let mock = platform.0.clone();
    tweak(&mut mock.state.lock());
    let reg = faux::Registration::new(name, None)?;
    let dev: ARef<Device> = reg.as_ref().into();
    let vm = VirtioMem::new(platform, transport, dev)?;
    vm.start()?;
    Ok(Fixture {
        vm,
        mock,
        onlined: 0,
        _reg: reg,
    })
}

/// Whether the driver refuses a device with config `cfg`, and how many requests it sent.
fn refused(name: &CStr, cfg: RawConfig) -> Result<(bool, usize)> {
    refused_with(name, cfg, |_| {})
}

/// [`refused`], with the mock changed by `tweak` first.
fn refused_with(
    name: &CStr,
    cfg: RawConfig,
    tweak: impl FnOnce(&mut State),
) -> Result<(bool, usize)> {
    let (platform, transport) = new_mock(cfg)?;
    let mock = platform.0.clone();
    tweak(&mut mock.state.lock());
    let reg = faux::Registration::new(name, None)?;
    let res = VirtioMem::new(platform, transport, reg.as_ref().into());
    let refused = matches!(res, Err(e) if e == EINVAL);
    let requests = mock.state.lock().requests.len();
    Ok((refused, requests))
}

/// One mock device driven by the driver's logic.
struct Fixture {
    vm: Arc<VirtioMem<MockPlatform>>,
    mock: Arc<Shared>,
    /// Added memory blocks onlined so far.
    onlined: usize,
    _reg: faux::Registration,
}

/// What the device, the memory model and the driver show, at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snap {
    requests: usize,
    plugs: usize,
    unplugs: usize,
    unplug_alls: usize,
    /// Bytes plugged, by the device's blocks.
    device: u64,
    /// Bytes plugged, by the driver's count.
    driver: u64,
    broken: bool,
    /// ERRORs the device gave to invalid requests.
    invalid: u32,
    /// Kernel bugs the driver would have caused.
    violations: u32,
    buddy: usize,
    fake_offline: usize,
    /// Fake-offline chunks the device has plugged.
    held: usize,
    added: usize,
    removed: usize,
    /// Worker runs queued, and the last delay.
    queued: usize,
    last_delay: Option<u32>,
}

impl Fixture {
    fn snap(&self) -> Snap {
        let (driver, broken) = self.vm.status();
        let s = self.mock.state.lock();
        Snap {
            requests: s.requests.len(),
            plugs: s.nr_requests(PLUG),
            unplugs: s.nr_requests(UNPLUG),
            unplug_alls: s.nr_requests(UNPLUG_ALL),
            device: s.device_plugged(),
            driver,
            broken,
            invalid: s.invalid_requests,
            violations: s.violations,
            buddy: s.count(Chunk::Buddy),
            fake_offline: s.fake_offline(),
            held: s.held_plugged(),
            added: s.added.len(),
            removed: s.removed.len(),
            queued: s.queued.len(),
            last_delay: s.queued.last().copied(),
        }
    }

    /// Changes the config as the device would, and tells the driver.
    fn set(&self, f: impl FnOnce(&mut RawConfig)) {
        f(&mut self.mock.state.lock().cfg);
        self.vm.config_changed();
    }

    /// The operator asks for `requested` bytes; the worker runs once.
    fn resize(&self, requested: u64) {
        self.set(|c| c.requested_size = requested);
        self.vm.run();
    }

    /// The device's next answers.
    fn script(&self, answers: &[Answer]) -> Result {
        let mut s = self.mock.state.lock();
        for a in answers {
            s.script.push(*a, GFP_KERNEL)?;
        }
        Ok(())
    }

    /// Every worker run queued so far, by delay in ms.
    fn delays(&self) -> Result<KVec<u32>> {
        let s = self.mock.state.lock();
        let mut v = KVec::new();
        for d in s.queued.iter() {
            v.push(*d, GFP_KERNEL)?;
        }
        Ok(v)
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.mock.state.lock());
    }

    /// Onlines every memory block added since the last call, as core mm does, memory
    /// block by memory block: the memory notifier, then the online page callback in
    /// `MAX_PAGE_ORDER` pieces.
    fn online_added(&mut self) -> Result {
        loop {
            let (start, size) = {
                let s = self.mock.state.lock();
                match (s.added.get(self.onlined), s.added_sizes.get(self.onlined)) {
                    (Some(&a), Some(&n)) => (a, n),
                    _ => return Ok(()),
                }
            };
            self.onlined += 1;
            for addr in (start..start + size).step_by(MEMORY_BLOCK as usize) {
                let ev = |e| self.vm.memory_event(e, addr, MEMORY_BLOCK, false);
                if ev(MemEvent::GoingOnline) != NotifyAnswer::Ok {
                    return Err(EINVAL);
                }
                let step = PAGE << ONLINE_ORDER;
                for off in (0..MEMORY_BLOCK).step_by(step as usize) {
                    self.vm.online_pages((addr + off) / PAGE, ONLINE_ORDER);
                }
                ev(MemEvent::Online);
            }
        }
    }

    /// System sleep ends as the glue restores the device: restore, then the kicked worker
    /// runs.
    fn restore(&self) {
        self.vm.restore();
        self.vm.run();
    }

    /// Grows to `size` with the device answering as QEMU and onlines what was added.
    fn grow_online(&mut self, size: u64) -> Result<Snap> {
        self.resize(size);
        self.online_added()?;
        Ok(self.snap())
    }
}

#[kunit_tests(virtio_mem_rust_config)]
mod config_suite {
    use super::*;

    #[test]
    fn qemu_config_with_the_real_mm_limits() -> Result {
        // The running kernel's page, pageblock and memory block sizes and pluggable range.
        let mut f = probe(c"vmr-kunit-real-limits", qemu_config(), |s| {
            s.real_limits = true
        })?;
        let s = f.grow_online(256 * MIB)?;
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.driver, 256 * MIB);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn block_size_zero() -> Result {
        let cfg = RawConfig {
            block_size: 0,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-bs0", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn block_size_not_a_power_of_two() -> Result {
        let cfg = RawConfig {
            block_size: 3 * MIB,
            region_size: 3 << 30,
            usable_region_size: 3 << 30,
            addr: 3 << 32,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-bs3m", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn block_size_2_pow_63() -> Result {
        let cfg = RawConfig {
            block_size: 1 << 63,
            addr: 1 << 63,
            region_size: 1 << 63,
            usable_region_size: 1 << 63,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-bs2p63", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn addr_not_aligned() -> Result {
        let cfg = RawConfig {
            addr: (4 << 30) + MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-addr", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn region_end_overflows() -> Result {
        let cfg = RawConfig {
            addr: u64::MAX - (2 * MIB - 1),
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-overflow", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn region_size_zero() -> Result {
        let cfg = RawConfig {
            addr: 0,
            region_size: 0,
            usable_region_size: 0,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-region0", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn region_size_not_a_block_multiple() -> Result {
        let cfg = RawConfig {
            region_size: (1 << 30) + MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-region-align", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn region_below_the_pluggable_range() -> Result {
        let cfg = qemu_config();
        let res = refused_with(c"vmr-kunit-below", cfg, |s| {
            s.limits.pluggable_start = cfg.addr + cfg.region_size;
        })?;
        assert_eq!(res, (true, 0));
        Ok(())
    }

    #[test]
    fn region_beyond_the_pluggable_range() -> Result {
        let cfg = qemu_config();
        let res = refused_with(c"vmr-kunit-beyond", cfg, |s| {
            s.limits.pluggable_end = cfg.addr + cfg.region_size / 2;
        })?;
        assert_eq!(res, (true, 0));
        Ok(())
    }

    #[test]
    fn region_without_a_whole_memory_block() -> Result {
        // 64 MiB at 4 GiB + 96 MiB: no aligned 128 MiB block inside.
        let cfg = RawConfig {
            addr: (4 << 30) + 96 * MIB,
            region_size: 64 * MIB,
            usable_region_size: 64 * MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-no-block", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn device_block_larger_than_the_region() -> Result {
        let cfg = RawConfig {
            block_size: 2 << 30,
            addr: 4 << 30,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-bs-region", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn region_without_a_whole_big_block() -> Result {
        // 256 MiB big blocks, a region of 256 MiB starting 128 MiB into one.
        let cfg = RawConfig {
            block_size: 128 * MIB,
            addr: (4 << 30) + 128 * MIB,
            region_size: 256 * MIB,
            usable_region_size: 256 * MIB,
            ..qemu_config()
        };
        let res = refused_with(c"vmr-kunit-no-bb", cfg, |s| {
            s.mode_params.bbm_block_size = 256 * MIB
        })?;
        assert_eq!(res, (true, 0));
        Ok(())
    }

    #[test]
    fn usable_larger_than_region() -> Result {
        let cfg = RawConfig {
            usable_region_size: 2 << 30,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-usable", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn requested_larger_than_usable() -> Result {
        let cfg = RawConfig {
            usable_region_size: 512 * MIB,
            requested_size: 768 * MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-req", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn requested_not_a_block_multiple() -> Result {
        let cfg = RawConfig {
            requested_size: 3 * MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-req-align", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn subblock_needs_more_than_65535_blocks() -> Result {
        // 16-byte blocks: a 2 MiB subblock is 131072 of them, more than one request holds.
        let cfg = RawConfig {
            block_size: 16,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-tiny", cfg)?, (true, 0));
        Ok(())
    }

    #[test]
    fn plug_of_more_than_65535_blocks_is_split() -> Result {
        // 1 KiB blocks: a 128 MiB memory block is 131072 of them.
        let cfg = RawConfig {
            block_size: 1024,
            region_size: 256 * MIB,
            usable_region_size: 256 * MIB,
            ..qemu_config()
        };
        let f = probe(c"vmr-kunit-split", cfg, |_| {})?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.invalid, 0);
        assert!(s.plugs >= 3);
        let st = f.mock.state.lock();
        let total: u64 = st.requests.iter().map(|r| u64::from(r.nb_blocks)).sum();
        let aligned = st.requests.iter().all(|r| r.addr % (2 * MIB) == 0);
        drop(st);
        assert_eq!(total, 131072);
        assert!(aligned);
        Ok(())
    }

    #[test]
    fn requested_beyond_usable_at_runtime_is_ignored() -> Result {
        let mut f = probe(c"vmr-kunit-rt-req", qemu_config(), |_| {})?;
        f.set(|c| c.usable_region_size = 512 * MIB);
        let before = f.grow_online(256 * MIB)?;
        f.resize(768 * MIB);
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.driver, 256 * MIB);
        assert!(!s.broken);
        Ok(())
    }

    #[test]
    fn requested_not_a_block_multiple_at_runtime_is_ignored() -> Result {
        let mut f = probe(c"vmr-kunit-rt-align", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.resize(256 * MIB + MIB);
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.device, 256 * MIB);
        Ok(())
    }

    #[test]
    fn usable_shrinking_without_unplug_all_is_ignored() -> Result {
        let mut f = probe(c"vmr-kunit-rt-usable", qemu_config(), |_| {})?;
        let before = f.grow_online(512 * MIB)?;
        assert_eq!(before.device, 512 * MIB);
        // The device shrinks its usable region below the plugged memory and says nothing is
        // plugged, as after an UNPLUG_ALL, which was never sent.
        f.set(|c| {
            c.usable_region_size = 256 * MIB;
            c.plugged_size = 0;
            c.requested_size = 0;
        });
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.invalid, 0);
        assert!(!s.broken);
        assert_eq!(s.driver, 512 * MIB);
        Ok(())
    }

    #[test]
    fn usable_shrunk_above_plugged_memory_is_respected() -> Result {
        let mut f = probe(c"vmr-kunit-rt-usable-above", qemu_config(), |_| {})?;
        f.grow_online(384 * MIB)?;
        // Back to 128 MiB: block 2 is emptied but its removal fails, block 1 is removed.
        // Block 2 stays added with nothing plugged, its removal failing from now on.
        f.with(|s| s.fail_remove = 1);
        f.resize(128 * MIB);
        let before = f.snap();
        assert_eq!(before.device, 128 * MIB);
        assert_eq!(before.removed, 1);
        f.with(|s| s.fail_remove = u32::MAX);
        // The device shrinks its usable region to 256 MiB without UNPLUG_ALL, above the
        // plugged memory, and asks for all of it: block 2 is beyond it.
        f.set(|c| {
            c.usable_region_size = 256 * MIB;
            c.requested_size = 256 * MIB;
        });
        f.vm.run();
        let s = f.snap();
        assert!(!s.broken);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.driver, 256 * MIB);
        // Block 1 was added again; block 2 still waits to be removed.
        assert_eq!(s.added, before.added + 1);
        assert_eq!(
            f.mock.state.lock().added.last(),
            Some(&(qemu_config().addr + MEMORY_BLOCK))
        );
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn partially_usable_block_is_plugged_up_to_the_usable_end() -> Result {
        let mut f = probe(c"vmr-kunit-rt-usable-part", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        // Back to 0: block 1 is emptied but its removal fails, block 0 is removed. Block 1
        // stays added with nothing plugged, its removal failing from now on.
        f.with(|s| s.fail_remove = 1);
        f.resize(0);
        assert_eq!(f.snap().removed, 1);
        f.with(|s| s.fail_remove = u32::MAX);
        // The usable region shrinks to 192 MiB without UNPLUG_ALL (nothing is plugged): half
        // of block 1 is usable. All of it is asked for.
        f.set(|c| {
            c.usable_region_size = 192 * MIB;
            c.requested_size = 192 * MIB;
        });
        f.vm.run();
        let s = f.snap();
        assert!(!s.broken);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.device, 192 * MIB);
        assert_eq!(s.driver, 192 * MIB);
        // The usable half of block 1 is plugged (and online: in the buddy), then block 0.
        assert_eq!(s.buddy, 32);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn plugged_larger_than_usable() -> Result {
        let cfg = RawConfig {
            usable_region_size: 512 * MIB,
            plugged_size: 768 * MIB,
            ..qemu_config()
        };
        assert_eq!(refused(c"vmr-kunit-plugged", cfg)?, (true, 0));
        // At runtime: the config change is ignored, the requested size with it.
        let mut f = probe(c"vmr-kunit-rt-plugged-usable", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.set(|c| {
            c.usable_region_size = 512 * MIB;
            c.plugged_size = 768 * MIB;
            c.requested_size = 384 * MIB;
        });
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.device, 256 * MIB);
        assert!(!s.broken);
        Ok(())
    }

    #[test]
    fn plugged_size_disagreeing_is_not_trusted() -> Result {
        let mut f = probe(c"vmr-kunit-rt-plugged", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        // The device claims more plugged than this driver plugged.
        f.set(|c| c.plugged_size = 768 * MIB);
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.driver, 256 * MIB);
        // Its own count is what it gives back.
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.driver, 0);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn memory_plugged_at_probe_is_unplugged_first() -> Result {
        let cfg = RawConfig {
            plugged_size: 256 * MIB,
            ..qemu_config()
        };
        let f = probe(c"vmr-kunit-probe-plugged", cfg, |_| {})?;
        f.resize(128 * MIB);
        let first = f.mock.state.lock().requests.first().map(|r| r.ty);
        let s = f.snap();
        assert_eq!(first, Some(UNPLUG_ALL));
        assert_eq!(s.unplug_alls, 1);
        assert_eq!(s.device, 128 * MIB);
        Ok(())
    }
}

#[kunit_tests(virtio_mem_rust_responses)]
mod responses_suite {
    use super::*;

    #[test]
    fn qemu_device_grow_and_shrink() -> Result {
        let mut f = probe(c"vmr-kunit-model", qemu_config(), |_| {})?;
        let s = f.grow_online(512 * MIB)?;
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.added, 4);
        assert_eq!(s.buddy, 256);
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.driver, 128 * MIB);
        assert_eq!(s.removed, 3);
        assert_eq!(s.buddy, 64);
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 4);
        assert_eq!(s.buddy + s.fake_offline, 0);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn nack_to_plug_waits_for_a_config_change() -> Result {
        let f = probe(c"vmr-kunit-nack-plug", qemu_config(), |_| {})?;
        f.script(&[answer(NACK)])?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert_eq!(s.requests, 1);
        assert_eq!(s.driver, 0);
        // Woken again without a change: no new try (the C driver retries at once, for ever).
        f.vm.run();
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, 1);
        assert_eq!(s.queued, 0);
        assert!(!s.broken);
        // A new requested size: plug.
        f.resize(258 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 258 * MIB);
        assert_eq!(s.driver, 258 * MIB);
        Ok(())
    }

    #[test]
    fn nack_to_unplug_hands_the_pages_back() -> Result {
        let mut f = probe(c"vmr-kunit-nack-unplug", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        f.script(&[answer(NACK)])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert!(!s.broken);
        // Whatever was NACKed is plugged and back in the buddy, not held.
        assert_eq!(s.held, 0);
        assert_eq!(s.violations, 0);
        assert_eq!(s.invalid, 0);
        // And it converges.
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.driver, 128 * MIB);
        assert_eq!(s.held, 0);
        Ok(())
    }

    #[test]
    fn busy_backs_off_then_resets() -> Result {
        let f = probe(c"vmr-kunit-busy", qemu_config(), |_| {})?;
        let busy = answer(BUSY);
        f.script(&[busy; 5])?;
        f.resize(256 * MIB);
        for _ in 0..4 {
            f.vm.run();
        }
        let delays = f.delays()?;
        assert_eq!(&delays[..], &[1000, 2000, 4000, 8000, 16000][..]);
        assert_eq!(f.snap().device, 0);
        // The timer fires: the device answers again.
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 256 * MIB);
        assert!(!s.broken);
        // The next BUSY starts the schedule over.
        f.script(&[busy])?;
        f.resize(512 * MIB);
        let s = f.snap();
        assert_eq!(s.last_delay, Some(1000));
        Ok(())
    }

    #[test]
    fn error_to_plug_marks_the_device_broken() -> Result {
        let f = probe(c"vmr-kunit-error-plug", qemu_config(), |_| {})?;
        f.script(&[answer(ERROR)])?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.requests, 1);
        assert_eq!(s.added, 0);
        // No further request, whatever is asked.
        f.resize(512 * MIB);
        f.resize(0);
        assert_eq!(f.snap().requests, 1);
        Ok(())
    }

    #[test]
    fn broken_device_takes_no_memory_from_the_kernel() -> Result {
        let mut f = probe(c"vmr-kunit-broken-shrink", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        f.script(&[answer(ERROR)])?;
        f.resize(512 * MIB);
        let before = f.snap();
        assert!(before.broken);
        // A shrink asked of a broken device: no online page is taken from the kernel (it
        // could never be unplugged), nothing is sent.
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.buddy, before.buddy);
        assert_eq!(s.held, before.held);
        assert_eq!(s.fake_offline, before.fake_offline);
        Ok(())
    }

    #[test]
    fn error_to_unplug_keeps_the_memory_offline() -> Result {
        let mut f = probe(c"vmr-kunit-error-unplug", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.script(&[answer(ERROR)])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.requests, before.requests + 1);
        // The range of the failed UNPLUG (a whole memory block) stays fake-offline: its
        // state in the device is unknown (the C driver hands it back to the buddy).
        assert_eq!(s.held, 64);
        assert_eq!(s.violations, 0);
        f.resize(0);
        assert_eq!(f.snap().requests, before.requests + 1);
        f.vm.remove();
        assert_eq!(f.snap().held, 64);
        Ok(())
    }

    #[test]
    fn unknown_response_type_marks_the_device_broken() -> Result {
        let mut f = probe(c"vmr-kunit-unknown", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.script(&[answer(7)])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.held, 64);
        assert_eq!(s.violations, 0);
        f.resize(0);
        assert_eq!(f.snap().requests, before.requests + 1);
        Ok(())
    }

    #[test]
    fn short_used_length_is_not_an_answer() -> Result {
        let f = probe(c"vmr-kunit-short", qemu_config(), |_| {})?;
        // An ACK in the buffer, but the device says it wrote one byte.
        f.script(&[Answer::Raw {
            ty: ACK,
            used_len: 1,
        }])?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.driver, 0);
        assert_eq!(s.added, 0);
        Ok(())
    }

    #[test]
    fn stale_buffer_is_not_an_answer() -> Result {
        let f = probe(c"vmr-kunit-stale", qemu_config(), |_| {})?;
        // The first PLUG is ACKed; the device claims to answer the second without writing.
        f.script(&[Answer::Model, Answer::Stale])?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.requests, 2);
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.driver, 128 * MIB);
        assert_eq!(s.added, 1);
        Ok(())
    }

    #[test]
    fn silent_device_times_out_and_unbind_completes() -> Result {
        let f = probe(c"vmr-kunit-silent", qemu_config(), |_| {})?;
        f.script(&[Answer::Silent])?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.requests, 1);
        assert_eq!(s.added, 0);
        f.resize(512 * MIB);
        assert_eq!(f.snap().requests, 1);
        // Unbind: returns, nothing waits on the device.
        f.vm.remove();
        assert_eq!(f.snap().requests, 1);
        Ok(())
    }

    #[test]
    fn offline_block_of_unknown_state_is_removed_at_unbind() -> Result {
        // Two blocks added and left offline (`memhp_default_state=offline`).
        let f = probe(c"vmr-kunit-unbind-unknown", qemu_config(), |_| {})?;
        f.resize(256 * MIB);
        // The device unplugs block 1, but its answer never comes.
        f.script(&[Answer::Lost])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.removed, 0);
        // Unbind: without the notifier, user space could online block 1 and hand memory
        // the device unplugged to the buddy. It is removed; block 0, plugged, stays.
        f.vm.remove();
        let s = f.snap();
        let st = f.mock.state.lock();
        let block1 = qemu_config().addr + MEMORY_BLOCK;
        assert_eq!(&st.removed[..], &[block1][..]);
        let per_block = (MEMORY_BLOCK / CHUNK) as usize;
        assert!(st.chunks[per_block..2 * per_block]
            .iter()
            .all(|&c| c == Chunk::Absent));
        assert!(st.chunks[..per_block].iter().all(|&c| c == Chunk::Offline));
        drop(st);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn needs_reset_stops_requests_at_once() -> Result {
        let mut f = probe(c"vmr-kunit-needs-reset", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        // The device fails (QEMU's `virtio_error()`): NEEDS_RESET and a config change, the
        // sizes unchanged. Broken at once, before any request would wait for an answer.
        f.with(|s| s.needs_reset = true);
        f.set(|_| {});
        f.vm.run();
        assert!(f.snap().broken);
        f.resize(512 * MIB);
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.requests, before.requests);
        assert_eq!(s.buddy, before.buddy);
        assert_eq!(s.held, 0);
        // It fails while the driver waits for an answer to an UNPLUG: the pages stay
        // fake-offline (what the device did is unknown) and nothing more is sent.
        let mut f = probe(c"vmr-kunit-needs-reset-wait", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.script(&[Answer::NeedsReset])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert!(s.broken);
        assert_eq!(s.unplugs, before.unplugs + 1);
        assert_eq!(s.held, 64);
        f.resize(0);
        assert_eq!(f.snap().requests, before.requests + 1);
        assert_eq!(f.snap().violations, 0);
        Ok(())
    }

    #[test]
    fn fake_offline_failure_retries_later() -> Result {
        let mut f = probe(c"vmr-kunit-busy-pages", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.with(|s| s.fail_fake_offline = 1000);
        f.resize(0);
        let s = f.snap();
        // Nothing could be freed: nothing is unplugged, a retry is queued.
        assert_eq!(s.unplugs, 0);
        assert_eq!(s.buddy, before.buddy);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        assert!(!s.broken);
        f.with(|s| s.fail_fake_offline = 0);
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 2);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn add_memory_failure_unplugs_again() -> Result {
        let f = probe(c"vmr-kunit-add-fail", qemu_config(), |s| s.fail_add = 1)?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.plugs, 1);
        assert_eq!(s.unplugs, 1);
        assert_eq!(s.device, 0);
        assert_eq!(s.driver, 0);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.added, 1);
        assert_eq!(s.invalid, 0);
        Ok(())
    }

    #[test]
    fn block_left_plugged_by_a_failed_add_is_unplugged_next_round() -> Result {
        let f = probe(c"vmr-kunit-add-undo-fail", qemu_config(), |s| {
            s.fail_add = 1
        })?;
        // The PLUG is ACKed, adding fails, the undo UNPLUG is answered BUSY.
        f.script(&[Answer::Model, answer(BUSY)])?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.added, 0);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        // The operator takes the memory back: the block, never added, is unplugged.
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.driver, 0);
        assert_eq!(s.added, 0);
        assert_eq!(s.invalid, 0);
        // And plugging starts over with a block that is added.
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.added, 1);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn busy_device_ends_the_online_unplug_round() -> Result {
        let mut f = probe(c"vmr-kunit-busy-online", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        f.script(&[answer(BUSY)])?;
        f.resize(0);
        let s = f.snap();
        // One UNPLUG, answered BUSY: no smaller runs are tried, the pages are back.
        assert_eq!(s.unplugs, before.unplugs + 1);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.buddy, before.buddy);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 2);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn removal_failure_is_retried() -> Result {
        let mut f = probe(c"vmr-kunit-remove-fail", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        f.with(|s| s.fail_remove = 1);
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 1);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.removed, 2);
        assert_eq!(s.violations, 0);
        Ok(())
    }
}

/// A device of 128 MiB blocks (a memory block each): Big Block Mode, a 1 GiB region at
/// 4 GiB, 8 big blocks.
fn bbm_config() -> RawConfig {
    RawConfig {
        block_size: MEMORY_BLOCK,
        ..qemu_config()
    }
}

/// [`probe`] for Big Block Mode, where a big block is removed before it is unplugged.
fn bbm_probe(name: &CStr, cfg: RawConfig, tweak: impl FnOnce(&mut State)) -> Result<Fixture> {
    probe(name, cfg, |s| {
        s.removes_plugged = true;
        tweak(s)
    })
}

#[kunit_tests(virtio_mem_rust_bbm)]
mod bbm_suite {
    use super::*;
    use crate::bbm::BbState;

    /// The state of big block `bb`, if the device is in Big Block Mode.
    fn bb_state(f: &Fixture, bb: usize) -> Option<BbState> {
        f.vm.view(|v| v.bbm.map(|b| b.state(bb)))
    }

    /// What an unplug of big block `bb` that could not go through left: UNPLUGs sent, big
    /// blocks removed, chunks in the buddy and fake-offline, its state, whether a retry is
    /// queued, whether the device is broken.
    type Undone = (usize, usize, usize, usize, Option<BbState>, bool, bool);

    fn undone(f: &Fixture, bb: usize) -> Undone {
        let s = f.snap();
        let retry = s.last_delay.is_some_and(|d| d > 0);
        let state = bb_state(f, bb);
        (
            s.unplugs,
            s.removed,
            s.buddy,
            s.fake_offline,
            state,
            retry,
            s.broken,
        )
    }

    /// Nothing unplugged or removed, every page back in the buddy, the big block added as
    /// before, a retry queued.
    fn as_before(before: &Snap) -> Undone {
        (0, 0, before.buddy, 0, Some(BbState::Added), true, false)
    }

    /// Once the failure is gone, the next round unplugs and removes the big block: (bytes
    /// plugged, big blocks removed, violations, invalid requests).
    fn retried(f: &Fixture) -> (u64, usize, u32, u32) {
        f.vm.run();
        let s = f.snap();
        (s.device, s.removed, s.violations, s.invalid)
    }

    #[test]
    fn memory_block_sized_device_grows_and_shrinks() -> Result {
        let mut f = bbm_probe(c"vmr-kunit-bbm-128m", bbm_config(), |_| {})?;
        let s = f.grow_online(512 * MIB)?;
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.driver, 512 * MIB);
        assert_eq!(s.added, 4);
        // One PLUG per big block, the whole block at once.
        assert_eq!(s.plugs, 4);
        assert_eq!(s.buddy, 256);
        assert_eq!(bb_state(&f, 3), Some(BbState::Added));
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.driver, 128 * MIB);
        assert_eq!(s.removed, 3);
        assert_eq!(s.buddy, 64);
        // Highest first.
        assert_eq!(
            f.mock.state.lock().removed.first().copied(),
            Some((4 << 30) + 384 * MIB)
        );
        assert_eq!(bb_state(&f, 3), Some(BbState::Unused));
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 4);
        assert_eq!(s.buddy + s.fake_offline, 0);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn requested_size_is_followed_in_whole_big_blocks() -> Result {
        // 2 MiB device blocks in 256 MiB big blocks.
        let mut f = bbm_probe(c"vmr-kunit-bbm-whole", qemu_config(), |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 256 * MIB;
        })?;
        // 600 MiB: two big blocks, as the C driver (never more than asked).
        let s = f.grow_online(600 * MIB)?;
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.added, 2);
        // 300 MiB: less than a big block too many, nothing goes (as the C driver: the
        // guest keeps what it was given rather than less than asked).
        // (The grow's round saw the blocks offline before the test onlined them, and
        // scheduled one look at the onlining: not a retry.)
        let queued = f.delays()?.len();
        f.resize(300 * MIB);
        assert_eq!(f.snap().device, 512 * MIB);
        assert_eq!(f.delays()?.len(), queued);
        // 200 MiB: one big block goes.
        f.resize(200 * MIB);
        assert_eq!(f.snap().device, 256 * MIB);
        assert_eq!(f.snap().violations, 0);
        Ok(())
    }

    #[test]
    fn force_bbm_with_a_big_block_size() -> Result {
        // 2 MiB device blocks would be Sub Block Mode; forced, with 256 MiB big blocks.
        let mut f = bbm_probe(c"vmr-kunit-bbm-force", qemu_config(), |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 256 * MIB;
        })?;
        assert!(bb_state(&f, 0).is_some());
        let s = f.grow_online(512 * MIB)?;
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.added, 2);
        assert_eq!(s.plugs, 2);
        assert_eq!(f.mock.state.lock().requests[0].nb_blocks, 128);
        assert_eq!(s.buddy, 256);
        f.resize(256 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.removed, 1);
        assert_eq!(s.buddy, 128);
        assert_eq!(s.violations, 0);
        assert_eq!(s.invalid, 0);
        Ok(())
    }

    #[test]
    fn unusable_big_block_size_is_ignored() -> Result {
        // Not a power of two: the smallest big block (a memory block) is used.
        let mut f = bbm_probe(c"vmr-kunit-bbm-ignored", bbm_config(), |s| {
            s.mode_params.bbm_block_size = 200 * MIB;
        })?;
        let s = f.grow_online(256 * MIB)?;
        assert_eq!(s.added, 2);
        assert_eq!(s.device, 256 * MIB);
        Ok(())
    }

    #[test]
    fn offline_big_blocks_go_first() -> Result {
        let mut f = bbm_probe(c"vmr-kunit-bbm-offline-first", bbm_config(), |_| {})?;
        // Big blocks 0 and 1 stay offline, 2 and 3 go online.
        f.resize(256 * MIB);
        f.onlined = 2;
        f.grow_online(512 * MIB)?;
        let before = f.snap();
        assert_eq!(before.buddy, 128);
        f.resize(256 * MIB);
        let s = f.snap();
        // Both offline big blocks, highest first; nothing taken from the kernel.
        {
            let st = f.mock.state.lock();
            assert_eq!(&st.removed[..], &[(4 << 30) + 128 * MIB, 4 << 30][..]);
        }
        assert_eq!(s.buddy, before.buddy);
        assert_eq!(f.mock.state.lock().fake_offline_tries, 0);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn offline_only_without_unplug_online() -> Result {
        let mut f = bbm_probe(c"vmr-kunit-bbm-no-online", bbm_config(), |s| {
            s.unplug_online = false
        })?;
        f.grow_online(256 * MIB)?;
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.unplugs, 0);
        assert_eq!(f.mock.state.lock().fake_offline_tries, 0);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        Ok(())
    }

    #[test]
    fn failed_fake_offline_hands_every_page_back() -> Result {
        // 256 MiB big blocks of two memory blocks: the first is taken, the second is busy.
        let mut f = bbm_probe(c"vmr-kunit-bbm-rollback", qemu_config(), |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 256 * MIB;
        })?;
        let before = f.grow_online(256 * MIB)?;
        f.with(|s| {
            s.fail_fake_offline_after = 1;
            s.fail_fake_offline = 1000;
        });
        f.resize(0);
        assert_eq!(f.mock.state.lock().fake_offline_tries, 2);
        assert_eq!(undone(&f, 0), as_before(&before));
        // Free again: unplugged and removed.
        f.with(|s| s.fail_fake_offline = 0);
        assert_eq!(retried(&f), (0, 1, 0, 0));
        Ok(())
    }

    #[test]
    fn failed_removal_hands_every_page_back() -> Result {
        let mut f = bbm_probe(c"vmr-kunit-bbm-remove-fail", bbm_config(), |_| {})?;
        let before = f.grow_online(128 * MIB)?;
        f.with(|s| s.fail_remove = 1);
        f.resize(0);
        assert_eq!(undone(&f, 0), as_before(&before));
        assert_eq!(f.snap().device, 128 * MIB);
        assert_eq!(retried(&f), (0, 1, 0, 0));
        Ok(())
    }

    #[test]
    fn guest_without_spare_memory_keeps_the_big_block() -> Result {
        // 256 MiB big blocks of two memory blocks.
        let mut f = bbm_probe(c"vmr-kunit-bbm-pressure", qemu_config(), |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 256 * MIB;
        })?;
        let before = f.grow_online(256 * MIB)?;
        // 200 MiB to spare beyond the margin: one memory block, not the big block. Not a
        // page is taken (rather than one memory block taken and handed back).
        f.with(|s| s.available = MIN_MARGIN + 200 * MIB);
        f.resize(0);
        let s = f.snap();
        assert_eq!(f.mock.state.lock().fake_offline_tries, 0);
        assert_eq!(s.buddy, before.buddy);
        assert!(f.vm.waiting_for_guest().is_some());
        Ok(())
    }

    #[test]
    fn add_failure_unplugs_the_big_block_again() -> Result {
        let f = bbm_probe(c"vmr-kunit-bbm-add-fail", bbm_config(), |s| s.fail_add = 1)?;
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!((s.plugs, s.unplugs, s.device, s.driver), (1, 1, 0, 0));
        assert_eq!(bb_state(&f, 0), Some(BbState::Unused));
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.added, 1);
        assert_eq!(s.invalid, 0);
        Ok(())
    }

    #[test]
    fn big_block_left_plugged_is_unplugged_first() -> Result {
        let f = bbm_probe(c"vmr-kunit-bbm-pending", bbm_config(), |s| s.fail_add = 1)?;
        // PLUG ACKed, adding fails, the undo is answered BUSY.
        f.script(&[Answer::Model, answer(BUSY)])?;
        f.resize(128 * MIB);
        assert_eq!(bb_state(&f, 0), Some(BbState::Plugged));
        assert_eq!(f.snap().device, 128 * MIB);
        f.vm.run();
        let s = f.snap();
        // Unplugged again, then plugged and added anew.
        assert_eq!(s.unplugs, 2);
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.added, 1);
        assert_eq!(bb_state(&f, 0), Some(BbState::Added));
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn big_block_of_more_than_65535_blocks_is_split() -> Result {
        // 4 KiB device blocks, 512 MiB big blocks: 131072 blocks each.
        let cfg = RawConfig {
            block_size: 4096,
            ..qemu_config()
        };
        let f = bbm_probe(c"vmr-kunit-bbm-split", cfg, |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 512 * MIB;
        })?;
        f.resize(512 * MIB);
        let s = f.snap();
        assert_eq!(s.plugs, 3);
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.driver, 512 * MIB);
        {
            let st = f.mock.state.lock();
            let nbs = [
                st.requests[0].nb_blocks,
                st.requests[1].nb_blocks,
                st.requests[2].nb_blocks,
            ];
            assert_eq!(nbs, [u16::MAX, u16::MAX, 2]);
            assert_eq!(st.requests[1].addr, (4 << 30) + 65535 * 4096);
        }
        // A plug stopped half way, and its undo too: the part left plugged is unplugged
        // first next round, no more and no less.
        f.script(&[Answer::Model, answer(BUSY), answer(BUSY)])?;
        f.resize(1 << 30);
        let s = f.snap();
        assert_eq!(s.device, 512 * MIB + 65535 * 4096);
        assert_eq!(bb_state(&f, 1), Some(BbState::Plugged));
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 1 << 30);
        assert_eq!(s.driver, 1 << 30);
        assert_eq!(s.added, 2);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn onlining_is_refused_outside_added_big_blocks() -> Result {
        let mut f = bbm_probe(c"vmr-kunit-bbm-notifier", bbm_config(), |_| {})?;
        f.grow_online(128 * MIB)?;
        let ev = |e, addr| f.vm.memory_event(e, addr, MEMORY_BLOCK, false);
        // Not added by this driver.
        assert_eq!(
            ev(MemEvent::GoingOnline, (4 << 30) + 128 * MIB),
            NotifyAnswer::Bad
        );
        // Not a memory block (half of one), or outside the region.
        assert_eq!(
            f.vm.memory_event(MemEvent::GoingOnline, 4 << 30, MEMORY_BLOCK / 2, false),
            NotifyAnswer::Bad
        );
        assert_eq!(
            ev(MemEvent::GoingOnline, (4 << 30) + (1 << 30)),
            NotifyAnswer::Bad
        );
        // The added one goes offline and online again as the user likes.
        assert_eq!(ev(MemEvent::GoingOffline, 4 << 30), NotifyAnswer::Ok);
        assert_eq!(ev(MemEvent::Offline, 4 << 30), NotifyAnswer::Ok);
        assert_eq!(ev(MemEvent::GoingOnline, 4 << 30), NotifyAnswer::Ok);
        assert_eq!(ev(MemEvent::CancelOnline, 4 << 30), NotifyAnswer::Ok);
        // Once unbound, nothing changes any more.
        f.vm.remove();
        assert_eq!(ev(MemEvent::GoingOnline, 4 << 30), NotifyAnswer::Bad);
        Ok(())
    }
}

#[kunit_tests(virtio_mem_rust_headroom)]
mod headroom_suite {
    use super::*;

    #[test]
    fn guest_without_spare_memory_keeps_it() -> Result {
        let mut f = probe(c"vmr-kunit-pressure", qemu_config(), |_| {})?;
        let before = f.grow_online(256 * MIB)?;
        // The grow's round saw its block offline (the test onlines it after the round) and
        // scheduled a look at the onlining: not part of the schedule checked here.
        let grown = f.delays()?.len();
        // 1 GiB + 256 MiB of guest memory: the margin is 128 MiB, and only 100 MiB are
        // available.
        f.with(|s| s.available = 100 * MIB);
        f.resize(0);
        for _ in 0..5 {
            f.vm.run();
        }
        let s = f.snap();
        // Nothing was taken, not even tried; the device keeps its memory.
        assert_eq!(f.mock.state.lock().fake_offline_tries, 0);
        assert_eq!(s.unplugs, before.unplugs);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.buddy, before.buddy);
        assert!(!s.broken);
        let info = f.vm.waiting_for_guest().ok_or(EINVAL)?;
        assert_eq!(info.available, 100 * MIB);
        assert_eq!(info.margin(), MIN_MARGIN);
        // Retried soon, never later than the poll interval; no slab dropped to squeeze it.
        let d = f.delays()?;
        assert_eq!(&d[grown..], &[1000, 2000, 4000, 8000, POLL_MS, POLL_MS][..]);
        assert_eq!(f.mock.state.lock().drop_slab_calls, 0);
        // The guest frees memory: the next round gives everything back.
        f.with(|s| s.available = 2 << 30);
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 2);
        assert!(f.vm.waiting_for_guest().is_none());
        assert_eq!(s.violations, 0);
        assert_eq!(s.invalid, 0);
        Ok(())
    }

    #[test]
    fn guest_keeps_its_margin_and_gives_the_rest() -> Result {
        let mut f = probe(c"vmr-kunit-margin", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        // 64 MiB and a page beyond the margin: 32 subblocks can go, not 33.
        f.with(|s| s.available = MIN_MARGIN + 64 * MIB + PAGE);
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 192 * MIB);
        assert_eq!(s.driver, 192 * MIB);
        assert_eq!(f.mock.state.lock().available, MIN_MARGIN + PAGE);
        assert!(f.vm.waiting_for_guest().is_some());
        // A config change is looked at, but the guest still has nothing to spare.
        f.resize(64 * MIB);
        assert_eq!(f.snap().device, 192 * MIB);
        // Memory freed, a config change: the rest goes.
        f.with(|s| s.available += 128 * MIB);
        f.resize(64 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 64 * MIB);
        assert_eq!(f.mock.state.lock().available, MIN_MARGIN + PAGE);
        assert!(f.vm.waiting_for_guest().is_none());
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn active_page_cache_is_the_guests() -> Result {
        let mut f = probe(c"vmr-kunit-active-file", qemu_config(), |_| {})?;
        f.grow_online(128 * MIB)?;
        // Plenty available, but most of it is page cache in use.
        f.with(|s| {
            s.available = 2 << 30;
            s.active_file = (2 << 30) - 100 * MIB;
        });
        f.resize(0);
        assert_eq!(f.mock.state.lock().fake_offline_tries, 0);
        assert_eq!(f.snap().device, 128 * MIB);
        assert!(f.vm.waiting_for_guest().is_some());
        // The cache goes inactive: it counts.
        f.with(|s| s.active_file = 0);
        f.vm.run();
        assert_eq!(f.snap().device, 0);
        Ok(())
    }

    #[test]
    fn memory_gone_between_tries_stops_the_round() -> Result {
        let mut f = probe(c"vmr-kunit-pressure-tries", qemu_config(), |s| {
            s.movable = true
        })?;
        f.grow_online(128 * MIB)?;
        // The first try fails, and meanwhile something else took the guest's memory.
        f.with(|s| {
            s.fail_fake_offline = 1;
            s.available_after_failure = Some(64 * MIB);
        });
        f.resize(0);
        let s = f.snap();
        // ZONE_MOVABLE would get 5 tries; the second is not made.
        assert_eq!(f.mock.state.lock().fake_offline_tries, 1);
        assert_eq!(s.device, 128 * MIB);
        assert!(f
            .vm
            .waiting_for_guest()
            .is_some_and(|i| i.available == 64 * MIB));
        assert!(s.last_delay.is_some_and(|d| d <= POLL_MS));
        Ok(())
    }

    #[test]
    fn slab_is_dropped_only_when_it_can_help() -> Result {
        let mut f = probe(c"vmr-kunit-drop-slab", qemu_config(), |_| {})?;
        f.grow_online(128 * MIB)?;
        // Busy memory, nothing reclaimable in slab: rounds fail, no drop_slab.
        f.with(|s| {
            s.fail_fake_offline = u32::MAX;
            s.slab_reclaimable = 0;
        });
        f.resize(0);
        for _ in 0..4 {
            f.vm.run();
        }
        assert_eq!(f.mock.state.lock().drop_slab_calls, 0);
        // Reclaimable slab present: dropped before the next retry.
        f.with(|s| s.slab_reclaimable = 16 * MIB);
        f.vm.run();
        assert_eq!(f.mock.state.lock().drop_slab_calls, 1);
        assert!(f.vm.waiting_for_guest().is_none());
        assert_eq!(f.snap().device, 128 * MIB);
        Ok(())
    }
}

/// Page frame number of the mock region's byte `off`.
fn pfn_at(off: u64) -> u64 {
    (qemu_config().addr + off) / PAGE
}

#[kunit_tests(virtio_mem_rust_sleep)]
mod sleep_suite {
    use super::*;

    #[test]
    fn suspend_with_memory_plugged_needs_persistent_suspend() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-refused", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        // Suspend to RAM, the device without VIRTIO_MEM_F_PERSISTENT_SUSPEND: refused.
        assert_eq!(f.vm.freeze(false), Err(EPERM));
        assert!(!f.vm.view(|v| v.frozen));
        // The PM core gives up and thaws: the device goes on as before.
        f.resize(512 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 512 * MIB);
        assert!(!s.broken);
        // Memory left plugged by the kernel before (a kexec), not unplugged yet: refused too.
        let f = probe(c"vmr-kunit-freeze-refused-kexec", qemu_config(), |s| {
            s.plug_device(qemu_config().addr, 64 * MIB)
        })?;
        assert_eq!(f.vm.freeze(false), Err(EPERM));
        // A request that got no valid answer: what the device did is unknown, refused.
        let f = probe(c"vmr-kunit-freeze-refused-lost", qemu_config(), |_| {})?;
        f.script(&[Answer::Lost])?;
        f.resize(128 * MIB);
        assert_eq!(f.snap().driver, 0);
        assert_eq!(f.vm.freeze(false), Err(EPERM));
        Ok(())
    }

    #[test]
    fn suspend_with_nothing_plugged_then_resize() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-empty", qemu_config(), |_| {})?;
        f.vm.run();
        f.vm.freeze(false)?;
        assert!(f.vm.view(|v| v.frozen));
        // The device changes while the guest sleeps (no notification reaches the driver),
        // and the worker is kicked (its retry timer): nothing is sent to the frozen device
        // (no queue), and it is not given up on.
        f.with(|s| s.cfg.requested_size = 256 * MIB);
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, 0);
        assert!(!s.broken);
        // Restore: the config is read again and followed.
        f.restore();
        f.online_added()?;
        let s = f.snap();
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.driver, 256 * MIB);
        assert_eq!(s.buddy, 128);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn persistent_suspend_keeps_the_memory_and_resizes_after() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-persistent", qemu_config(), |s| {
            s.persistent_suspend = true
        })?;
        let before = f.grow_online(256 * MIB)?;
        f.vm.freeze(false)?;
        // Asked to grow while asleep (the virtio core hands the change over at restore).
        f.resize(512 * MIB);
        assert_eq!(f.snap().requests, before.requests);
        f.restore();
        f.online_added()?;
        let s = f.snap();
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.added, 4);
        // And shrinks.
        f.resize(128 * MIB);
        let s = f.snap();
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.driver, 128 * MIB);
        assert_eq!(s.removed, 3);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        // Memory left by a kexec, the guest suspended before the first round: the kicked
        // worker sends nothing to the frozen device, not even UNPLUG_ALL; after restore,
        // UNPLUG_ALL, then the requested size.
        let cfg = RawConfig {
            requested_size: 128 * MIB,
            ..qemu_config()
        };
        let f = probe(c"vmr-kunit-freeze-persistent-kexec", cfg, |s| {
            s.persistent_suspend = true;
            s.plug_device(cfg.addr, 256 * MIB);
        })?;
        f.vm.freeze(false)?;
        f.vm.run();
        assert_eq!(f.snap().requests, 0);
        f.restore();
        let s = f.snap();
        assert_eq!(s.unplug_alls, 1);
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.invalid, 0);
        Ok(())
    }

    #[test]
    fn suspend_to_idle_is_exempt() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-idle", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        // Suspend-to-idle resets nothing: the memory stays plugged, no feature needed.
        f.vm.freeze(true)?;
        f.restore();
        assert_eq!(f.snap().device, 256 * MIB);
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn freezer_stops_a_growing_round_between_requests() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-mid-plug", qemu_config(), |s| {
            s.persistent_suspend = true;
            // The freezer asks once two requests were answered.
            s.freeze_after_requests = Some(2);
        })?;
        // Four memory blocks, one PLUG each.
        f.resize(512 * MIB);
        let s = f.snap();
        assert_eq!(s.plugs, 2);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.driver, 256 * MIB);
        assert_eq!(s.added, 2);
        assert!(!s.broken);
        // The worker asked for another round: after the thaw, not lost.
        assert_eq!(s.last_delay, Some(0));
        f.vm.freeze(false)?;
        f.with(|s| {
            s.freezing = false;
            s.freeze_after_requests = None;
        });
        f.restore();
        f.online_added()?;
        let s = f.snap();
        assert_eq!(s.device, 512 * MIB);
        assert_eq!(s.added, 4);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn freezer_stops_a_shrinking_round_between_requests() -> Result {
        let mut f = probe(c"vmr-kunit-freeze-mid-unplug", qemu_config(), |s| {
            s.persistent_suspend = true
        })?;
        let before = f.grow_online(512 * MIB)?;
        f.with(|s| s.freeze_after_requests = Some(before.requests + 1));
        f.resize(0);
        let s = f.snap();
        // One online block unplugged (and removed), then the round stopped: no page is
        // left fake-offline while plugged, none handed out unplugged.
        assert_eq!(s.unplugs, 1);
        assert_eq!(s.device, 384 * MIB);
        assert_eq!(s.driver, 384 * MIB);
        assert_eq!(s.held, 0);
        assert_eq!(s.buddy, 192);
        assert_eq!(s.removed, 1);
        assert_eq!(s.last_delay, Some(0));
        assert_eq!(s.violations, 0);
        f.vm.freeze(false)?;
        f.with(|s| {
            s.freezing = false;
            s.freeze_after_requests = None;
        });
        f.restore();
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.removed, 4);
        assert_eq!(s.buddy + s.fake_offline, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn freezer_asking_before_a_round_stops_it_at_once() -> Result {
        let f = probe(c"vmr-kunit-freeze-before", qemu_config(), |s| {
            s.freezing = true
        })?;
        f.resize(256 * MIB);
        let s = f.snap();
        assert_eq!(s.requests, 0);
        assert_eq!(s.last_delay, Some(0));
        assert!(f.mock.state.lock().freezing_asked > 0);
        // Suspend aborted elsewhere: thawed without a freeze of the device.
        f.with(|s| s.freezing = false);
        f.vm.run();
        assert_eq!(f.snap().device, 256 * MIB);
        // Memory left by a kexec: not even UNPLUG_ALL goes out once the freezer asked.
        let f = probe(c"vmr-kunit-freeze-before-kexec", qemu_config(), |s| {
            s.plug_device(qemu_config().addr, 64 * MIB);
            s.freezing = true;
        })?;
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.requests, 0);
        assert_eq!(s.last_delay, Some(0));
        f.with(|s| s.freezing = false);
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.unplug_alls, 1);
        assert_eq!(s.device, 0);
        Ok(())
    }

    #[test]
    fn freezer_stops_between_tries_and_runs_of_a_block() -> Result {
        // ZONE_MOVABLE: five tries to free a busy range; the freezer asks after the first.
        let mut f = probe(c"vmr-kunit-freeze-tries", qemu_config(), |s| {
            s.movable = true
        })?;
        let before = f.grow_online(128 * MIB)?;
        f.with(|s| {
            s.fail_fake_offline = u32::MAX;
            s.freeze_after_tries = Some(1);
        });
        f.resize(0);
        let s = f.snap();
        assert_eq!(f.mock.state.lock().fake_offline_tries, 1);
        assert_eq!(s.unplugs, before.unplugs);
        assert_eq!(s.device, 128 * MIB);
        assert_eq!(s.buddy, before.buddy);
        assert_eq!(s.last_delay, Some(0));
        // A busy block is given back in halves: the freezer asks after the first half's
        // UNPLUG, the second waits for the next round.
        let mut f = probe(c"vmr-kunit-freeze-halves", qemu_config(), |_| {})?;
        let before = f.grow_online(128 * MIB)?;
        f.with(|s| {
            s.fail_fake_offline = 1;
            s.freeze_after_requests = Some(before.requests + 1);
        });
        f.resize(0);
        let s = f.snap();
        assert_eq!(s.unplugs, before.unplugs + 1);
        assert_eq!(s.device, 64 * MIB);
        assert_eq!(s.driver, 64 * MIB);
        assert_eq!(s.held, 0);
        assert_eq!(s.last_delay, Some(0));
        f.with(|s| {
            s.freezing = false;
            s.freeze_after_requests = None;
        });
        f.vm.run();
        let s = f.snap();
        assert_eq!(s.device, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }

    #[test]
    fn hibernation_is_refused() -> Result {
        let f = probe(c"vmr-kunit-hibernate", qemu_config(), |_| {})?;
        // Whatever is plugged: an image restored after a reset of the machine would land
        // in memory the device took back.
        assert_eq!(
            f.vm.pm_event(PmEvent::HibernationPrepare),
            NotifyAnswer::Bad
        );
        assert_eq!(f.vm.pm_event(PmEvent::RestorePrepare), NotifyAnswer::Bad);
        assert_eq!(f.vm.pm_event(PmEvent::Other), NotifyAnswer::Ok);
        // The device goes on.
        f.resize(128 * MIB);
        assert_eq!(f.snap().device, 128 * MIB);
        Ok(())
    }

    #[test]
    fn after_kexec_unplug_all_then_the_requested_size() -> Result {
        // The kernel before a kexec left memory plugged, here and there.
        let cfg = RawConfig {
            requested_size: 384 * MIB,
            ..qemu_config()
        };
        let f = probe(c"vmr-kunit-kexec", cfg, |s| {
            s.plug_device(cfg.addr + 64 * MIB, 128 * MIB);
            s.plug_device(cfg.addr + 900 * MIB, 2 * MIB);
        })?;
        assert!(f.vm.view(|v| v.unplug_all_required));
        // UNPLUG_ALL answered BUSY: nothing else is sent, retried later.
        f.script(&[answer(BUSY)])?;
        f.vm.run();
        let s = f.snap();
        assert_eq!((s.requests, s.unplug_alls), (1, 1));
        assert_eq!(s.device, 130 * MIB);
        assert!(s.last_delay.is_some_and(|d| d > 0));
        // Then ACKed: all of it goes, and the requested size is plugged from scratch.
        f.vm.run();
        let s = f.snap();
        let st = f.mock.state.lock();
        let first_plug = st.requests.iter().position(|r| r.ty == PLUG);
        let unplug_alls: usize = st.requests.iter().filter(|r| r.ty == UNPLUG_ALL).count();
        drop(st);
        assert_eq!(first_plug, Some(2));
        assert_eq!(unplug_alls, 2);
        assert_eq!(s.device, 384 * MIB);
        assert_eq!(s.driver, 384 * MIB);
        assert_eq!(s.unplugs, 0);
        assert_eq!(s.invalid, 0);
        assert_eq!(s.violations, 0);
        Ok(())
    }
}

/// A crash kernel's driver on the mock, the device holding what the crashed kernel had
/// plugged: `plugged` (offset, size) ranges of the region.
fn crash(name: &CStr, cfg: RawConfig, plugged: &[(u64, u64)]) -> Result<Fixture> {
    probe(name, cfg, |s| {
        s.kdump = true;
        for &(off, size) in plugged {
            s.plug_device(cfg.addr + off, size);
        }
    })
}

#[kunit_tests(virtio_mem_rust_kdump)]
mod kdump_suite {
    use super::*;

    #[test]
    fn crash_kernel_never_plugs_or_unplugs() -> Result {
        let cfg = RawConfig {
            requested_size: 512 * MIB,
            ..qemu_config()
        };
        let f = crash(c"vmr-kunit-kdump", cfg, &[(0, 256 * MIB)])?;
        // No region taken for memory hotplug, no UNPLUG_ALL, no plug towards the
        // requested size.
        assert_eq!(f.mock.state.lock().hotplug_inits, 0);
        assert!(!f.vm.view(|v| v.unplug_all_required));
        f.vm.run();
        // Config changes are ignored.
        f.resize(0);
        f.resize(1 << 30);
        f.vm.remove();
        let s = f.snap();
        assert_eq!(s.requests, 0);
        assert_eq!(s.device, 256 * MIB);
        assert_eq!(s.added, 0);
        assert!(!s.broken);
        Ok(())
    }

    #[test]
    fn crash_kernel_without_vmcore_refuses_the_device() -> Result {
        let (platform, transport) = new_mock(qemu_config())?;
        let mock = platform.0.clone();
        {
            let mut s = mock.state.lock();
            s.kdump = true;
            s.vmcore = false;
            s.plug_device(qemu_config().addr, 128 * MIB);
        }
        let reg = faux::Registration::new(c"vmr-kunit-kdump-no-vmcore", None)?;
        let res = VirtioMem::new(platform, transport, reg.as_ref().into());
        assert!(matches!(res, Err(e) if e == EBUSY));
        let s = mock.state.lock();
        assert_eq!(s.requests.len(), 0);
        assert_eq!(s.device_plugged(), 128 * MIB);
        Ok(())
    }

    #[test]
    fn pfn_is_ram_asks_the_device_and_keeps_the_last_answer() -> Result {
        let cfg = RawConfig {
            usable_region_size: 512 * MIB,
            ..qemu_config()
        };
        let f = crash(
            c"vmr-kunit-pfn-is-ram",
            cfg,
            &[(0, 4 * MIB), (128 * MIB, 2 * MIB)],
        )?;
        let nr = |f: &Fixture| f.mock.state.lock().nr_requests(STATE);
        // Outside the region: not the driver's to judge, nothing asked.
        assert!(f.vm.pfn_is_ram(pfn_at(0) - 1));
        assert!(f.vm.pfn_is_ram(pfn_at(1 << 30)));
        assert_eq!(nr(&f), 0);
        // A plugged block: asked once, then from the kept answer, page by page.
        assert!(f.vm.pfn_is_ram(pfn_at(0)));
        assert!(f.vm.pfn_is_ram(pfn_at(2 * MIB - PAGE)));
        assert_eq!(nr(&f), 1);
        assert!(f.vm.pfn_is_ram(pfn_at(2 * MIB)));
        assert_eq!(nr(&f), 2);
        // An unplugged block: not RAM, also kept.
        assert!(!f.vm.pfn_is_ram(pfn_at(4 * MIB)));
        assert!(!f.vm.pfn_is_ram(pfn_at(6 * MIB - PAGE)));
        assert_eq!(nr(&f), 3);
        assert!(f.vm.pfn_is_ram(pfn_at(129 * MIB)));
        assert!(!f.vm.pfn_is_ram(pfn_at(130 * MIB)));
        assert_eq!(nr(&f), 5);
        // Beyond the usable region nothing can be plugged: not RAM, nothing asked.
        assert!(!f.vm.pfn_is_ram(pfn_at(768 * MIB)));
        assert_eq!(nr(&f), 5);
        let st = f.mock.state.lock();
        let one_block = st
            .requests
            .iter()
            .all(|r| r.ty == STATE && r.nb_blocks == 1 && r.addr % (2 * MIB) == 0);
        let addrs: KVec<u64> = {
            let mut v = KVec::new();
            for r in st.requests.iter() {
                v.push(r.addr - cfg.addr, GFP_KERNEL)?;
            }
            v
        };
        assert_eq!(st.invalid_requests, 0);
        drop(st);
        assert!(one_block);
        assert_eq!(&addrs[..], &[0, 2 * MIB, 4 * MIB, 128 * MIB, 130 * MIB][..]);
        assert!(!f.snap().broken);
        Ok(())
    }

    #[test]
    fn pfn_is_ram_with_nothing_plugged_asks_nothing() -> Result {
        let f = crash(c"vmr-kunit-pfn-empty", qemu_config(), &[])?;
        assert!(!f.vm.pfn_is_ram(pfn_at(0)));
        assert!(!f.vm.pfn_is_ram(pfn_at(512 * MIB)));
        assert_eq!(f.snap().requests, 0);
        Ok(())
    }

    #[test]
    fn hostile_state_answers_mean_not_ram() -> Result {
        let state = |ty, state, used_len| Answer::RawState {
            ty,
            state,
            used_len,
        };
        let hostile = [
            answer(ERROR),
            answer(NACK),
            answer(BUSY),
            answer(7),
            answer(ACK),
            // The state field left unwritten (poisoned), an unknown state, MIXED for a single block, an ACK without its state
            // field, more than a response.
            state(ACK, 3, 10),
            state(ACK, STATE_MIXED, 10),
            state(ACK, STATE_PLUGGED, 8),
            state(ACK, STATE_PLUGGED, 11),
            Answer::Stale,
            Answer::Silent,
            Answer::NeedsReset,
        ];
        for a in hostile {
            pr_info!("STATE answered with {:?}\n", a);
            // All of the device's memory is plugged: an honest answer would be RAM.
            let f = crash(c"vmr-kunit-pfn-hostile", qemu_config(), &[(0, 1 << 30)])?;
            f.script(&[a])?;
            assert!(!f.vm.pfn_is_ram(pfn_at(0)));
            assert!(!f.vm.pfn_is_ram(pfn_at(PAGE)));
            // Given up on: nothing more is asked, nothing more is RAM.
            assert!(f.snap().broken);
            assert!(!f.vm.pfn_is_ram(pfn_at(64 * MIB)));
            assert_eq!(f.snap().requests, 1);
        }
        Ok(())
    }

    #[test]
    fn device_ram_is_exactly_the_plugged_ranges() -> Result {
        let plugged = [
            (0, 128 * MIB),
            (130 * MIB, 4 * MIB),
            (254 * MIB, 4 * MIB),
            (1022 * MIB, 2 * MIB),
        ];
        let f = crash(c"vmr-kunit-device-ram", qemu_config(), &plugged)?;
        let mut ranges = KVec::new();
        f.vm.device_ram(|start, size| Ok(ranges.push((start, size), GFP_KERNEL)?))?;
        let mut want = KVec::new();
        for (off, size) in plugged {
            want.push((qemu_config().addr + off, size), GFP_KERNEL)?;
        }
        assert_eq!(&ranges[..], &want[..]);
        let s = f.snap();
        // Whole memory blocks asked at once, halved only where they are MIXED.
        assert!(s.requests < 100);
        assert_eq!(s.invalid, 0);
        // pfn_is_ram agrees, block by block.
        for b in 0..512 {
            let off = b * 2 * MIB;
            let inside = plugged.iter().any(|&(o, sz)| o <= off && off < o + sz);
            assert_eq!(f.vm.pfn_is_ram(pfn_at(off)), inside);
        }
        // Nothing plugged: no range, nothing asked.
        let f = crash(c"vmr-kunit-device-ram-empty", qemu_config(), &[])?;
        f.vm.device_ram(|_, _| Err(EINVAL))?;
        assert_eq!(f.snap().requests, 0);
        Ok(())
    }

    #[test]
    fn device_ram_fails_on_a_hostile_answer() -> Result {
        let f = crash(
            c"vmr-kunit-device-ram-error",
            qemu_config(),
            &[(0, 1 << 30)],
        )?;
        f.script(&[answer(ERROR)])?;
        assert_eq!(f.vm.device_ram(|_, _| Ok(())), Err(EIO));
        assert!(f.snap().broken);
        assert!(!f.vm.pfn_is_ram(pfn_at(0)));
        assert_eq!(f.snap().requests, 1);
        // MIXED all the way down: halved to a single block, where MIXED is no answer.
        let f = crash(
            c"vmr-kunit-device-ram-mixed",
            qemu_config(),
            &[(0, 1 << 30)],
        )?;
        let mixed = Answer::RawState {
            ty: ACK,
            state: STATE_MIXED,
            used_len: 10,
        };
        f.script(&[mixed; 7])?;
        assert_eq!(f.vm.device_ram(|_, _| Ok(())), Err(EIO));
        let st = f.mock.state.lock();
        let sizes: KVec<u16> = {
            let mut v = KVec::new();
            for r in st.requests.iter() {
                v.push(r.nb_blocks, GFP_KERNEL)?;
            }
            v
        };
        drop(st);
        assert_eq!(&sizes[..], &[64, 32, 16, 8, 4, 2, 1][..]);
        assert!(f.snap().broken);
        Ok(())
    }
}

#[kunit_tests(virtio_mem_rust_status)]
mod status_suite {
    use super::*;
    use crate::mock::Trace;
    use crate::status::{self, Attr, Blocked, Holder, Snapshot, State as St};
    use core::fmt::Write;

    /// An attribute as sysfs would show it.
    struct Shown {
        buf: [u8; 128],
        len: usize,
    }

    impl Write for Shown {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.len + s.len();
            if end > self.buf.len() {
                return Err(core::fmt::Error);
            }
            self.buf[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    fn shown(f: &Fixture, attr: Attr) -> Shown {
        let mut w = Shown {
            buf: [0; 128],
            len: 0,
        };
        // 128 bytes hold every value.
        let _ = f.vm.show(attr, &mut w);
        w
    }

    fn shows(f: &Fixture, attr: Attr, want: &str) -> bool {
        let w = shown(f, attr);
        &w.buf[..w.len] == want.as_bytes()
    }

    fn sum(v: &[u64]) -> u64 {
        v.iter().sum()
    }

    /// What every snapshot promises (`ABI-virtio_mem_rust`).
    fn consistent(s: &Snapshot) -> bool {
        let c = &s.counters;
        s.usage.online + s.usage.offline == s.plugged
            && s.usage.movable <= s.usage.online
            && c.bytes_plugged - c.bytes_unplugged == s.plugged
            && sum(&c.answers) == sum(&c.requests)
    }

    #[test]
    fn counters_and_sizes_follow_a_grow_and_a_shrink() -> Result {
        let mut f = probe(c"vmr-kunit-status-grow", qemu_config(), |_| {})?;
        let s = f.vm.snapshot();
        assert_eq!(s.state, St::Idle);
        assert_eq!(s.plugged, 0);
        f.grow_online(512 * MIB)?;
        // The memory notifier published the onlining.
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.plugged, 512 * MIB);
        assert_eq!(s.requested, 512 * MIB);
        assert_eq!(s.device_plugged, 512 * MIB);
        assert_eq!(s.usage.online, 512 * MIB);
        assert_eq!(s.counters.bytes_plugged, 512 * MIB);
        assert_eq!(s.counters.memory_blocks_added, 4);
        let plugs = f.snap().plugs as u64;
        assert_eq!(s.counters.requests[0], plugs);
        assert_eq!(s.counters.answers[status::Answer::Ack as usize], plugs);
        f.resize(256 * MIB);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.state, St::Idle);
        assert_eq!(s.plugged, 256 * MIB);
        assert_eq!(s.counters.bytes_unplugged, 256 * MIB);
        assert_eq!(s.counters.memory_blocks_removed, 2);
        assert_eq!(s.counters.bytes_migrated, 256 * MIB);
        assert_eq!(s.blocked, Blocked::None);
        assert!(shows(&f, Attr::PluggedSize, "268435456\n"));
        assert!(shows(&f, Attr::State, "idle\n"));
        assert!(shows(&f, Attr::NextRetryMs, "none\n"));
        assert!(shows(&f, Attr::Mode, "Sub Block Mode\n"));
        assert!(shows(&f, Attr::RegionStart, "0x100000000\n"));
        // The trace: one event per request, with its answer, and the round.
        let m = f.mock.state.lock();
        let requests = m
            .traces
            .iter()
            .filter(|t| matches!(t, Trace::Request { .. }))
            .count();
        assert_eq!(requests, m.requests.len());
        let mut rounds = m.traces.iter().filter_map(|t| match *t {
            Trace::Round {
                requested,
                before,
                after,
                why,
            } => Some((requested, before, after, why == c"done")),
            _ => None,
        });
        assert_eq!(
            rounds.next_back(),
            Some((256 * MIB, 512 * MIB, 256 * MIB, true))
        );
        assert!(m
            .traces
            .iter()
            .any(|t| matches!(t, Trace::UnplugOnline { result: 0, .. })));
        Ok(())
    }

    #[test]
    fn busy_device_shows_retrying() -> Result {
        let f = probe(c"vmr-kunit-status-busy", qemu_config(), |s| s.now_ms = 5000)?;
        f.script(&[answer(BUSY)])?;
        f.resize(256 * MIB);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.state, St::Retrying);
        assert_eq!(s.blocked, Blocked::DeviceBusy);
        assert_eq!(s.failed_rounds, 1);
        assert_eq!(s.retry_at_ms, Some(6000));
        assert_eq!(s.counters.answers[status::Answer::Busy as usize], 1);
        assert!(shows(&f, Attr::NextRetryMs, "1000\n"));
        assert!(shows(&f, Attr::BlockedBy, "device busy\n"));
        f.with(|s| s.now_ms = 5400);
        assert!(shows(&f, Attr::NextRetryMs, "600\n"));
        // The retry gets there: idle, nothing in the way.
        f.vm.run();
        let s = f.vm.snapshot();
        assert_eq!(s.state, St::Idle);
        assert_eq!(s.failed_rounds, 0);
        assert_eq!(s.retry_at_ms, None);
        assert_eq!(s.blocked, Blocked::None);
        Ok(())
    }

    #[test]
    fn each_bad_answer_is_counted_and_breaks_the_device() -> Result {
        let cases = [
            (answer(NACK), status::Answer::Nack, St::Refused),
            (answer(ERROR), status::Answer::Error, St::Broken),
            (Answer::Silent, status::Answer::Timeout, St::Broken),
            (
                Answer::Raw {
                    ty: 99,
                    used_len: 10,
                },
                status::Answer::Invalid,
                St::Broken,
            ),
        ];
        for (a, kind, state) in cases {
            let f = probe(c"vmr-kunit-status-answers", qemu_config(), |_| {})?;
            f.script(&[a])?;
            f.resize(256 * MIB);
            let s = f.vm.snapshot();
            assert_eq!(s.state, state);
            assert_eq!(s.counters.answers[kind as usize], 1);
            assert_eq!(sum(&s.counters.answers), 1);
            assert_eq!(s.counters.requests[0], 1);
            assert_eq!(s.plugged, 0);
        }
        Ok(())
    }

    #[test]
    fn memory_that_cannot_be_freed_names_its_range_and_holder() -> Result {
        let mut f = probe(c"vmr-kunit-status-holder", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        f.with(|s| {
            s.fail_fake_offline = 1000;
            s.holder = Some(Holder::Slab);
        });
        f.resize(0);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.state, St::Retrying);
        assert!(s.counters.alloc_contig_range_failures > 0);
        let Blocked::Range { start, end, holder } = s.blocked else {
            panic!("blocked_by is {:?}", s.blocked);
        };
        assert_eq!(holder, Some(Holder::Slab));
        // Inside what was plugged.
        assert!((4 << 30) <= start && start < end && end <= (4 << 30) + 256 * MIB);
        let w = shown(&f, Attr::BlockedBy);
        let text = core::str::from_utf8(&w.buf[..w.len]).map_err(|_| EINVAL)?;
        assert!(text.starts_with("0x1") && text.ends_with(" slab\n"));
        // A second failed round: counted.
        f.vm.run();
        assert_eq!(f.vm.snapshot().failed_rounds, 2);
        // The memory comes free: all of it goes.
        f.with(|s| s.fail_fake_offline = 0);
        f.vm.run();
        let s = f.vm.snapshot();
        assert_eq!(
            (s.state, s.plugged, s.blocked),
            (St::Idle, 0, Blocked::None)
        );
        Ok(())
    }

    #[test]
    fn memory_nobody_onlines_waits_and_is_watched() -> Result {
        let f = probe(c"vmr-kunit-status-offline", qemu_config(), |_| {})?;
        // Nothing onlines what is added: adding stops at 1 GiB offline... of a 1 GiB region
        // here, so ask for less and never online it.
        f.resize(256 * MIB);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.usage.offline, 256 * MIB);
        assert_eq!(s.usage.online, 0);
        // One more round is scheduled for when the grace time is over, once.
        assert_eq!(f.snap().last_delay, Some(5000));
        let queued = f.delays()?.len();
        f.vm.run();
        assert_eq!(f.delays()?.len(), queued);
        f.with(|s| s.now_ms = 6000);
        f.vm.run();
        assert_eq!(f.delays()?.len(), queued);
        Ok(())
    }

    #[test]
    fn big_blocks_show_their_size_and_use() -> Result {
        // Big blocks of 256 MiB, added and left offline, then onlined.
        let mut f = bbm_probe(c"vmr-kunit-status-bbm", qemu_config(), |s| {
            s.mode_params.force_bbm = true;
            s.mode_params.bbm_block_size = 256 * MIB;
        })?;
        f.resize(512 * MIB);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!(s.plugged, 512 * MIB);
        assert_eq!(s.usage.offline, 512 * MIB);
        assert_eq!(s.counters.memory_blocks_added, 4);
        assert!(shows(&f, Attr::Mode, "Big Block Mode\n"));
        assert!(shows(&f, Attr::SubblockSize, "268435456\n"));
        f.online_added()?;
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!((s.usage.online, s.usage.offline), (512 * MIB, 0));
        f.resize(256 * MIB);
        let s = f.vm.snapshot();
        assert!(consistent(&s));
        assert_eq!((s.state, s.usage.online), (St::Idle, 256 * MIB));
        assert_eq!(s.counters.memory_blocks_removed, 2);
        Ok(())
    }

    #[test]
    fn sleep_shows_suspended() -> Result {
        let mut f = probe(c"vmr-kunit-status-sleep", qemu_config(), |s| {
            s.persistent_suspend = true
        })?;
        f.grow_online(128 * MIB)?;
        f.vm.freeze(false)?;
        assert_eq!(f.vm.snapshot().state, St::Suspended);
        f.vm.restore();
        f.vm.run();
        assert_eq!(f.vm.snapshot().state, St::Idle);
        Ok(())
    }

    /// Text written into a growing buffer (debugfs files are longer than a sysfs value).
    struct Text(KVec<u8>);

    impl Write for Text {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            for b in s.bytes() {
                self.0.push(b, GFP_KERNEL).map_err(|_| core::fmt::Error)?;
            }
            Ok(())
        }
    }

    #[test]
    fn holder_codes_are_the_glues() -> Result {
        // `enum vmr_holder` in virtio_mem_glue.h, in its order.
        let glue = [
            "slab",
            "large kmalloc",
            "pinned user page",
            "user page with extra references",
            "page table",
            "reserved page",
            "mapped page not on an LRU list",
            "kernel allocation",
        ];
        for (code, name) in glue.iter().enumerate() {
            let holder = Holder::from_code(code as u32).ok_or(EINVAL)?;
            assert_eq!(holder.name(), *name);
        }
        // -1 (nothing unmovable found) arrives as a huge code: no holder.
        assert_eq!(Holder::from_code(glue.len() as u32), None);
        assert_eq!(Holder::from_code(u32::MAX), None);
        Ok(())
    }

    #[test]
    fn debugfs_status_lists_every_attribute_of_one_snapshot() -> Result {
        let mut f = probe(c"vmr-kunit-status-debugfs", qemu_config(), |_| {})?;
        f.grow_online(256 * MIB)?;
        let mut t = Text(KVec::new());
        f.vm.write_status(&mut t).map_err(|_| ENOMEM)?;
        let text = core::str::from_utf8(&t.0).map_err(|_| EINVAL)?;
        let mut lines = 0;
        for (line, (_, name)) in text.lines().zip(status::ATTRS) {
            let (n, value) = line.split_once(": ").ok_or(EINVAL)?;
            assert_eq!(n, name);
            // The same value as the attribute's file shows.
            let w = shown(&f, Attr::from_name(n.as_bytes()).ok_or(EINVAL)?);
            assert_eq!(&w.buf[..w.len - 1], value.as_bytes());
            lines += 1;
        }
        assert_eq!(lines, status::ATTRS.len());
        assert_eq!(text.lines().count(), lines);
        assert!(text.contains("\nplugged_size: 268435456\n"));
        // One line per memory block in use, and the retry schedule.
        let mut t = Text(KVec::new());
        f.vm.write_blocks(&mut t).map_err(|_| ENOMEM)?;
        let blocks = core::str::from_utf8(&t.0).map_err(|_| EINVAL)?;
        assert_eq!(blocks.lines().count(), 2);
        assert!(blocks.starts_with("0x100000000 online kernel 64/64 ffffffffffffffff\n"));
        let mut t = Text(KVec::new());
        f.vm.write_retry(&mut t).map_err(|_| ENOMEM)?;
        let retry = core::str::from_utf8(&t.0).map_err(|_| EINVAL)?;
        assert!(retry.starts_with("failed_rounds: 0\nnext_retry_ms: none\n"));
        Ok(())
    }

    #[test]
    fn every_attribute_is_one_line_with_a_name() -> Result {
        let f = probe(c"vmr-kunit-status-attrs", qemu_config(), |_| {})?;
        for (i, (attr, name)) in status::ATTRS.iter().enumerate() {
            // Each name finds its own attribute (no name twice), each attribute once.
            assert_eq!(Attr::from_name(name.as_bytes()), Some(*attr));
            assert!(status::ATTRS[..i].iter().all(|(a, _)| a != attr));
            let w = shown(&f, *attr);
            let text = &w.buf[..w.len];
            assert!(text.len() >= 2 && text.ends_with(b"\n"));
            assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        assert_eq!(Attr::from_name(b"no_such_file"), None);
        Ok(())
    }
}
