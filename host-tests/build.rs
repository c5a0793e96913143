// SPDX-License-Identifier: GPL-2.0

//! The host tests are the driver's tests: they see what the KUnit build sees
//! (`CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST`, the kernel's own option, not a host switch).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST)");
    println!("cargo::rustc-cfg=CONFIG_VIRTIO_MEM_RUST_KUNIT_TEST");
}
