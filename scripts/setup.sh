#!/usr/bin/env bash
# Installs everything Strata's test suite needs on a fresh Debian 12 machine (run as root),
# and unpacks a Debian cloud kernel into .cache/guest/ for the Linux-guest tests.
# Idempotent: a second run only checks and prints what it found.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="${STRATA_GUEST_DIR:-$ROOT/.cache/guest}"

log() { printf 'setup: %s\n' "$*"; }

# Debian packages the tests run as real clients and peers (see shared/REAL-CLIENTS.md):
# QEMU and its storage daemon, busybox for the guest initramfs, firmware for boot tests,
# qemu-img as the image oracle, xz for compressed kernel modules, nasm for the BIOS boot
# program firmware-tests assembles, e2fsprogs for e2fsck on the file systems guests make.
# libseccomp-dev and libcap-ng-dev build virtiofsd, the reference server for vhost-fs.
# librbd-dev and librados-dev build the RBD leaf (cargo feature rbd); ceph-mon, ceph-osd and
# ceph-common run the one-node Ceph cluster its tests start (testkit::ceph); qemu-block-extra
# gives qemu-storage-daemon its rbd driver, the peer in rbd-compare. openssl checks that the
# API over TCP refuses anything older than TLS 1.3. chromium loads the health dashboard in
# its test (headless). cryptsetup-bin is the LUKS oracle (luksFormat, luksDump,
# --test-passphrase: none needs device-mapper).
PACKAGES=(openssl chromium qemu-system-x86 busybox-static cpio seabios ovmf nasm e2fsprogs qemu-utils xz-utils libseccomp-dev libcap-ng-dev librbd-dev librados-dev ceph-mon ceph-osd ceph-common qemu-block-extra cryptsetup-bin)

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
apt_updated=0
apt_update() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq
        apt_updated=1
    fi
}
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update
    log "installing ${missing[*]} (this can take a few minutes)"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "packages present: ${PACKAGES[*]}"
fi

# The guest kernel: downloaded and unpacked, never installed on the host.
if [[ -e "$GUEST_DIR/vmlinuz" ]] && compgen -G "$GUEST_DIR/lib/modules/*/kernel" >/dev/null; then
    log "guest kernel present in $GUEST_DIR"
else
    mkdir -p "$GUEST_DIR"
    dl="$GUEST_DIR/.download"
    rm -rf "$dl"
    mkdir -p "$dl"
    # apt-get download drops privileges to _apt when it can write there; let it.
    chmod 0777 "$dl"
    fetch() {
        # A package index older than the archive gives a 404: refresh once and retry.
        if ! (cd "$dl" && apt-get download -q "$1"); then
            apt_update
            (cd "$dl" && apt-get download -q "$1")
        fi
    }
    log "downloading linux-image-cloud-amd64 metapackage"
    fetch linux-image-cloud-amd64
    meta=$(ls "$dl"/linux-image-cloud-amd64_*.deb)
    versioned=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed 's/[[:space:]]*(.*//; s/^[[:space:]]*//' |
        grep -E '^linux-image-[0-9].*-cloud-amd64(-unsigned)?$' | head -n1)
    if [[ -z "$versioned" ]]; then
        echo "setup: could not find a versioned kernel in the Depends of $meta" >&2
        exit 1
    fi
    log "downloading $versioned"
    fetch "$versioned"
    kdeb=$(ls "$dl"/"$versioned"_*.deb)
    log "unpacking $(basename "$kdeb") into $GUEST_DIR"
    dpkg -x "$kdeb" "$GUEST_DIR"
    kernel=$(ls "$GUEST_DIR"/boot/vmlinuz-* | head -n1)
    ln -sfn "boot/$(basename "$kernel")" "$GUEST_DIR/vmlinuz"
    rm -rf "$dl"
    log "guest kernel ready: $GUEST_DIR/vmlinuz -> $(basename "$kernel")"
fi
# virtiofsd: the peer vhost-fs is compared with (firmware-tests, benches). Built once from
# crates.io into ~/.cargo/bin; one job, so it leaves the second core to whatever else runs.
if command -v virtiofsd >/dev/null 2>&1 || [[ -x "$HOME/.cargo/bin/virtiofsd" ]]; then
    log "virtiofsd present: $(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")"
else
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        source "$HOME/.cargo/env"
    fi
    log "building virtiofsd (about 2 minutes, once)"
    cargo install --locked -q -j 1 virtiofsd
fi
# The suite checks formatting and lints first: both come with rustup's default profile.
for tool in fmt clippy; do
    if ! cargo "$tool" --version >/dev/null 2>&1; then
        echo "setup: cargo $tool is missing: install it with 'rustup component add ${tool/fmt/rustfmt}'" >&2
        exit 1
    fi
done
log "done"
