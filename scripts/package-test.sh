#!/usr/bin/env bash
# Installs the package scripts/package.sh built, as a user would (dpkg -i), and checks it:
# systemd-analyze verify accepts the units, the installed daemon runs from the installed
# config, the installed strata talks to it, the man pages are there; then purges it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
deb=$(ls -1t "$TARGET"/debian/strata_*.deb | head -1)
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }

dpkg --purge strata >/dev/null 2>&1 || true
echo "package-test: installing $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb" >/dev/null || dpkg -i "$deb"
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    dpkg --purge strata >/dev/null 2>&1 || true
    rm -rf /run/strata /var/lib/strata /var/log/strata /etc/strata
}
trap cleanup EXIT

for f in /usr/bin/vhost-blk /usr/bin/vhost-fs /usr/bin/strata /etc/strata/vhost-blk.toml \
    /lib/systemd/system/strata-blk.service /lib/systemd/system/strata-fs@.service \
    /usr/share/man/man1/vhost-blk.1.gz /usr/share/man/man1/vhost-fs.1.gz /usr/share/man/man1/strata.1.gz \
    /usr/share/man/man1/strata-disk.1.gz; do
    [[ -e $f ]] || fail "$f is not installed"
done
dpkg -L strata | grep -q '^/var/lib/strata' || [[ -d /var/lib/strata/images ]] || fail "postinst made no /var/lib/strata/images"

# The units: systemd's own checker (a unit for one share needs its instance name).
systemd-analyze verify /lib/systemd/system/strata-blk.service "/lib/systemd/system/strata-fs@share.service" \
    2>&1 | tee /tmp/strata-analyze.log
if grep -v -e 'Failed to open /etc/strata/fs/share.env' -e '^$' /tmp/strata-analyze.log | grep -q .; then
    fail "systemd-analyze verify complained"
fi

# The installed daemon from the installed config (what the unit starts; systemd makes
# /run/strata, here we do).
mkdir -p /run/strata
/usr/bin/vhost-blk --config /etc/strata/vhost-blk.toml 2>/tmp/strata-daemon.log &
daemon=$!
for _ in $(seq 100); do [[ -S /run/strata/blk-api.sock ]] && break; sleep 0.1; done
[[ -S /run/strata/blk-api.sock ]] || { cat /tmp/strata-daemon.log; fail "no API socket"; }
/usr/bin/strata health | tee /dev/stderr | grep -q '^status: ok' || fail "strata health"
/usr/bin/strata disk list | tee /dev/stderr | grep -q '^vm1-root ' || fail "strata disk list"
truncate -s 64M /var/lib/strata/images/pkg.img
/usr/bin/strata disk add pkg --socket /run/strata/pkg.sock --disk path=/var/lib/strata/images/pkg.img \
    | grep -q 'added disk pkg' || fail "strata disk add"
grep -q 'id = "pkg"' /etc/strata/vhost-blk.toml || fail "the added disk was not written to the config"
/usr/bin/strata audit verify /var/log/strata/audit.log | grep -q intact || fail "strata audit verify"
man -w vhost-blk >/dev/null 2>&1 || [[ -e /usr/share/man/man1/vhost-blk.1.gz ]] || fail "man page"
kill "$daemon"; wait "$daemon" || fail "the daemon did not exit 0 on SIGTERM"
daemon=
echo "package-test: ok"
