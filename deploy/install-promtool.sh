#!/bin/sh
# Install promtool (used by tests/unit/test_observability_config.py to check and unit-test the
# Prometheus rules in deploy/prometheus/). Idempotent: does nothing when promtool is already on PATH.
# Debian/Ubuntu only: Debian's `prometheus` package ships /usr/bin/promtool. Must run as root.
# The package's service is not started: a policy-rc.d that denies all starts is in place during the
# install (and RUNLEVEL=1 for maintainer scripts that check it), then the previous policy is restored.
set -eu

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

fail() {
    echo "install-promtool: $*; install promtool 2.x by hand (Debian: apt-get install prometheus)" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (not a Debian-based system)"
[ "$(id -u)" -eq 0 ] || fail "must run as root to apt-get install"

POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [ -e "$POLICY" ]; then
    BACKUP="$(mktemp)"
    cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [ -n "$BACKUP" ]; then
        mv -f "$BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$POLICY"
chmod 755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive RUNLEVEL=1
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >/tmp/install-promtool.log 2>&1; then
    fail "apt-get install prometheus failed (log: /tmp/install-promtool.log)"
fi
command -v promtool >/dev/null 2>&1 || fail "prometheus package installed but promtool is not on PATH"
