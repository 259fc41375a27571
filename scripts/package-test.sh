#!/usr/bin/env bash
# Installs the package scripts/package.sh built, as a user would (dpkg -i), and checks it:
# systemd-analyze verify accepts the units, the installed daemon runs from the installed
# config, the installed strata talks to it, the man pages are there; then purges it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
deb=$(realpath "$(ls -1t "$TARGET"/debian/strata_*.deb | head -1)")
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "needs root (it installs the package with dpkg)"

# This installs, runs and purges the package, and removes what it leaves: never on a
# machine that has Strata installed or its directories in use.
if dpkg-query -W strata >/dev/null 2>&1 || [[ -e /etc/strata || -e /var/lib/strata || -e /var/log/strata ]]; then
    if [[ ${STRATA_PACKAGE_TEST_FORCE:-} != 1 ]]; then
        fail "Strata is installed here (or /etc/strata, /var/lib/strata or /var/log/strata exists): \
not touching it; STRATA_PACKAGE_TEST_FORCE=1 to purge and test anyway"
    fi
fi
logs=$(mktemp -d)
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    dpkg --purge strata >/dev/null 2>&1 || true
    rm -rf /run/strata /var/lib/strata /var/log/strata /etc/strata "$logs"
}
trap cleanup EXIT
dpkg --purge strata >/dev/null 2>&1 || true
echo "package-test: installing $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >/dev/null || dpkg -i "$deb"

for f in /usr/bin/vhost-blk /usr/bin/vhost-fs /usr/bin/strata /etc/strata/vhost-blk.toml \
    /usr/share/doc/strata/examples/vhost-blk.toml \
    /lib/systemd/system/strata-blk.service /lib/systemd/system/strata-fs@.service \
    /usr/share/man/man1/vhost-blk.1.gz /usr/share/man/man1/vhost-fs.1.gz /usr/share/man/man1/strata.1.gz \
    /usr/share/man/man1/strata-disk.1.gz; do
    [[ -e $f ]] || fail "$f is not installed"
done
[[ -d /var/lib/strata/images ]] || fail "postinst made no /var/lib/strata/images"

# The units: systemd's own checker (a unit for one share needs its instance name).
status=0
systemd-analyze verify /lib/systemd/system/strata-blk.service "/lib/systemd/system/strata-fs@share.service" \
    >"$logs/analyze.log" 2>&1 || status=$?
cat "$logs/analyze.log"
if [[ $status -ne 0 ]] || grep -v -e '^$' "$logs/analyze.log" | grep -q .; then
    fail "systemd-analyze verify complained (exit $status)"
fi

# The installed daemon from the installed config (what the unit starts; systemd makes
# /run/strata, here we do).
mkdir -p /run/strata/operator
/usr/bin/vhost-blk --config /etc/strata/vhost-blk.toml 2>"$logs/daemon.log" &
daemon=$!
for _ in $(seq 100); do [[ -S /run/strata/blk-api.sock ]] && break; sleep 0.1; done
[[ -S /run/strata/blk-api.sock ]] || { cat "$logs/daemon.log"; fail "no API socket"; }
# (Shown with `echo >&2`, not `tee /dev/stderr`: tee would reopen, and truncate, a log file
# that stderr is redirected to.)
show() { echo "$1" >&2; }
out=$(/usr/bin/strata health) || fail "strata health"
show "$out"
grep -q '^status: ok' <<<"$out" || fail "strata health says: $out"
truncate -s 64M /var/lib/strata/images/pkg.img
/usr/bin/strata disk add pkg --socket /run/strata/operator/pkg.sock --disk path=/var/lib/strata/images/pkg.img \
    | grep -q 'added disk pkg' || fail "strata disk add"
out=$(/usr/bin/strata disk list) || fail "strata disk list"
show "$out"
grep -q '^pkg ' <<<"$out" || fail "strata disk list has no pkg: $out"
grep -q 'id = "pkg"' /etc/strata/vhost-blk.toml || fail "the added disk was not written to the config"
/usr/bin/strata audit verify /var/log/strata/audit.log | grep -q intact || fail "strata audit verify"
kill "$daemon"; wait "$daemon" || fail "the daemon did not exit 0 on SIGTERM"
daemon=
echo "package-test: ok"
