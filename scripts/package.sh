#!/usr/bin/env bash
# Builds Strata's Debian package (target/debian/strata_*.deb) with cargo-deb: vhost-blk
# (with the Ceph RBD leaf), vhost-fs and strata in /usr/bin, the systemd units, man pages
# generated from the command-line definitions, the example config as
# /etc/strata/vhost-blk.toml. Installs cargo-deb if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "package: installing cargo-deb"
    cargo install --locked --quiet cargo-deb@^3 --no-default-features
fi

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release --features vhost-blk/rbd -p vhost-blk -p vhost-fs -p strata -p packaging --bins
rm -rf "$TARGET/release/man" "$TARGET/release/deb"
"$TARGET/release/strata-manpages" "$TARGET/release/man"
gzip -9n "$TARGET"/release/man/*.1
# The release profile keeps line tables for perf; the package ships stripped binaries.
mkdir -p "$TARGET/release/deb"
for bin in vhost-blk vhost-fs strata; do
    objcopy --strip-debug "$TARGET/release/$bin" "$TARGET/release/deb/$bin"
done
cargo deb --no-build -p strata --output "$TARGET/debian/"
ls -1 "$TARGET"/debian/strata_*.deb
