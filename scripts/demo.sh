#!/usr/bin/env bash
# The Strata demo on a fresh Debian 12 machine: install what is missing, build, start the
# daemons with embedded defaults, boot a guest on them, print what happened.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi
echo "[demo] installing what is missing (QEMU, busybox, the guest kernel)..."
bash scripts/setup.sh
echo "[demo] building the daemons (release; the first build takes a few minutes)..."
# Only what the demo runs: the two daemons and the demo program (the benches are not needed).
cargo build --release -p vhost-blk -p vhost-fs -p demo --bins --features vhost-blk/rbd
exec target/release/strata-demo "$@"
