#!/usr/bin/env bash
# The one command that runs Strata's whole test suite on a fresh Debian 12 machine:
# install the real clients and the guest kernel, build our daemons, run every test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A non-login shell (CI) may not have rustup's directory on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi

step() { printf '\n==> %s\n' "$*"; }
start=$SECONDS

step "scripts/setup.sh"
bash scripts/setup.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# The Ceph RBD leaf is a cargo feature (it links librbd); the suite builds and tests it.
FEATURES=(--features vhost-blk/rbd)

step "cargo clippy --workspace --all-targets ${FEATURES[*]} -- -D warnings"
cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings

# Tests start the daemons as processes, so the binaries must exist before the tests run.
step "cargo build --workspace --bins ${FEATURES[*]}"
cargo build --workspace --bins "${FEATURES[@]}"

step "cargo test --workspace --no-fail-fast ${FEATURES[*]}"
cargo test --workspace --no-fail-fast "${FEATURES[@]}"

# The Debian package: built with cargo-deb, installed with dpkg, run from its own config.
step "scripts/package.sh"
bash scripts/package.sh
step "scripts/package-test.sh"
bash scripts/package-test.sh

step "all tests passed in $((SECONDS - start)) s"
