#!/usr/bin/env bash
# Builds (once) the Debian root file system the container-host tests boot with
# `systemd-nspawn -b`, and prints its path.
#
#   tests/hosts/rootfs.sh            # build if missing, print the path
#
# The root is cached under ${XDG_CACHE_HOME:-~/.cache}/rollwave/hosts-root-<key>,
# where <key> hashes this script (suite, package list, setup steps) and the
# Debian mirror: change either and the next run builds a new root (about two
# minutes) and removes the old ones. The tests never write to the cached root:
# each instance boots from an overlay over it.
#
# Needs: debootstrap (Debian package `debootstrap`), root.
set -euo pipefail

SUITE=bookworm
# systemd as PID 1 (with dbus, as on a real server), what the bootstrap script
# uses to fetch a package (curl, ca-certificates), and busybox, whose httpd is
# the sample app the tests deploy.
PACKAGES=systemd,systemd-sysv,dbus,init-system-helpers,curl,ca-certificates,busybox

log() { printf 'rootfs: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (debootstrap and the tests need it)"
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    log "debootstrap is missing: apt-get install -y --no-install-recommends debootstrap systemd-container"
    exit 1
fi

# The mirror this machine's apt uses (a deb822 URIs: line or a sources.list line),
# unless ROLLWAVE_DEBIAN_MIRROR names one.
mirror=${ROLLWAVE_DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '$1 == "URIs:" && $2 !~ /security/ { print $2; exit }')
fi
if [[ -z $mirror ]]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
        /etc/apt/sources.list 2>/dev/null || true)
fi
if [[ -z $mirror ]]; then
    log "cannot find a Debian mirror in /etc/apt; set ROLLWAVE_DEBIAN_MIRROR"
    exit 1
fi

cache=${XDG_CACHE_HOME:-$HOME/.cache}/rollwave
key=$( (cat "$0"; echo "$mirror") | sha256sum | cut -c1-16)
root="$cache/hosts-root-$key"
if [[ -f $root/.rollwave-root-complete ]]; then
    echo "$root"
    exit 0
fi

mkdir -p "$cache"
staging=$(mktemp -d "$cache/hosts-root-staging.XXXXXX")
trap 'rm -rf --one-file-system "$staging"' EXIT
log "building a $SUITE root in $staging (about two minutes; cached afterwards as $root)"
started=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$staging" "$mirror" >"$staging.log" 2>&1 || {
    log "debootstrap failed; its log:"
    tail -n 50 "$staging.log" >&2
    rm -f "$staging.log"
    exit 1
}
rm -f "$staging.log"

# Boot quickly and quietly inside a container: nothing else should touch the
# network the tests set up from outside, and nobody logs in on a console.
for unit in systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    getty@.service console-getty.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$staging/etc/systemd/system/$unit"
done
# The journal in memory: instances are thrown away after the test.
mkdir -p "$staging/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$staging/etc/systemd/journald.conf.d/rollwave-tests.conf"
# Let apt and dpkg leave caches empty: the root is copied (overlaid) per instance.
apt-get -o RootDir="$staging" clean 2>/dev/null || rm -rf "$staging/var/cache/apt/archives/"*.deb
# Each instance gets its own machine id from systemd-nspawn.
: >"$staging/etc/machine-id"
touch "$staging/.rollwave-root-complete"

# Replace older roots only once the new one is complete.
for old in "$cache"/hosts-root-*; do
    if [[ $old != "$root" && $old != "$staging" && -d $old ]]; then
        rm -rf --one-file-system "$old"
    fi
done
mv "$staging" "$root"
trap - EXIT
log "built in $(( $(date +%s) - started )) s: $root"
echo "$root"
