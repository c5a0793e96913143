# SPDX-License-Identifier: GPL-2.0
# Shared settings of the vm-scripts: pinned versions, the cache and the build outputs.
# Sourced, never run.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Everything downloaded or built outside the clone lives here and is reused when present.
CACHE=${VMR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtio-mem-rust}
BUILD=$REPO/build

# Pinned versions. A Debian pin that has left the archive falls back to the newest
# version of the same series, with a warning (see pick_version).
LINUX_SERIES=7.2
LINUX_PIN=7.2.12-1~bpo13+1
QEMU_PIN=1:10.0.2+ds-2+deb13u1~bpo12+1
QEMU_SERIES='1:10\.0\.'
RUST_SRC_SUFFIX=+dfsg1-2~bpo13+1
BINDGEN_PIN=0.73.2
LIBCLANG_PIN=18.1.1
QEMU_QMP_PIN=0.0.6
PYTEST_PIN=8.3.5
# kexec and its crash-kernel loader in the guest's initramfs (from this machine's suite).
KEXEC_TOOLS_PIN=1:2.0.25-3+deb12u3

# Debian's own cloud kernel of that source: its configuration is the rust kernel's base; the
# kernel binary and its virtio_mem.ko are the C driver's reference, exactly as users run it.
DEBIAN_FLAVOUR=cloud-amd64
DEBIAN_KABI=7.2.12+deb13-$DEBIAN_FLAVOUR

KSRC=$CACHE/linux-$LINUX_SERIES
# Debian's configuration (linux-config-$LINUX_SERIES) and kernel (linux-binary, linux-modules).
DEBIAN_KERNEL=$CACHE/debian-kernel
DEBIAN_CONFIG=$DEBIAN_KERNEL/config.amd64_none_$DEBIAN_FLAVOUR
KBUILD_RUST=$CACHE/kbuild-debian-rust
KBUILD_DEBUG=$CACHE/kbuild-debug
# The small kernel with the C driver built in (make mutants loads the driver into it).
KBUILD_TINY=$CACHE/kbuild-upstream
VENV=$CACHE/venv
KEXEC_TOOLS=$CACHE/kexec-tools
JOBS=${JOBS:-$(( $(nproc) + 1 ))}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# The environment the kernel's Rust support needs (see make rustavailable).
rust_env() {
	export RUST_LIB_SRC=$CACHE/rust-src/usr/lib/rustlib/src/rust/library
	export LIBCLANG_PATH=$CACHE/libclang/libclang-$LIBCLANG_PIN.data/platlib/clang/native
	export PATH=$CACHE/cargo/bin:$HOME/.cargo/bin:$PATH
}

# Joins the project to the cached kernel tree (idempotent): our files under
# drivers/virtio/virtio_mem_rust/ and one line each in drivers/virtio/{Kconfig,Makefile}.
# Only files whose content changed are copied, and they get the time of the copy, not of
# the edit: an object built from an older copy after the edit must still be rebuilt.
join_tree() {
	local dst=$KSRC/drivers/virtio/virtio_mem_rust
	mkdir -p "$dst"
	rsync -rlp --delete --checksum "$REPO/Kbuild" "$REPO/Kconfig" "$REPO/drivers" \
		"$REPO/include-uapi" "$REPO/kunit" "$dst/"
	grep -q 'virtio_mem_rust/Kconfig' "$KSRC/drivers/virtio/Kconfig" ||
		echo 'source "drivers/virtio/virtio_mem_rust/Kconfig"' >> "$KSRC/drivers/virtio/Kconfig"
	grep -q 'virtio_mem_rust/' "$KSRC/drivers/virtio/Makefile" ||
		echo 'obj-y += virtio_mem_rust/' >> "$KSRC/drivers/virtio/Makefile"
}
