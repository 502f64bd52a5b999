#!/usr/bin/env bash
# What tests/container needs, made once and cached outside the work tree (`make setup`
# runs this; a second run finds everything and takes no time):
#   $CACHE/debian12-<key>/root   a Debian 12 root (debootstrap, minbase + systemd, fuse3,
#                                python3) that systemd-nspawn boots with systemd as PID 1;
#   $CACHE/wheels-<key>/         encfs-gw's dependencies and build backend as wheels, so
#                                the tests install it inside the container without network.
# CACHE is $ENCFS_GW_TEST_CACHE, default /var/cache/encfs-gw-test. The Debian mirror is
# the one this machine's apt uses (ENCFS_GW_TEST_MIRROR overrides it). Nothing is pruned
# (other work trees may use other keys): remove the cache directory to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${ENCFS_GW_TEST_CACHE:-/var/cache/encfs-gw-test}
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,fuse3,python3,python3-venv
PY=.venv/bin/python

if [[ $(id -u) -ne 0 ]]; then
    echo "container-root: not root: the container tier (tests/container) needs root" >&2
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"  # one setup at a time (several work trees share the cache)
flock 9

# --- the root ---------------------------------------------------------------------------------
key=$(printf '%s\n' "$SUITE" "$PACKAGES" minbase 1 | sha256sum | cut -c1-12)
root_dir=$CACHE/debian12-$key
if [[ ! -d $root_dir/root ]]; then
    mirror=${ENCFS_GW_TEST_MIRROR:-$(apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT) $(IDENTIFIER)' \
        | awk -v suite="$SUITE" '$2 == suite && $3 == "main" && $4 == "Packages" { print $1; exit }')}
    if [[ -z $mirror ]]; then
        echo "container-root: no apt source for Debian $SUITE main; set ENCFS_GW_TEST_MIRROR" >&2
        exit 1
    fi
    echo "setup: debootstrap of Debian $SUITE for tests/container into $root_dir (once, ~1-2 min)"
    tmp=$(mktemp -d "$CACHE/.debian12-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$mirror" \
            >"$tmp/debootstrap.log" 2>&1; then
        tail -n 20 "$tmp/debootstrap.log" >&2
        echo "container-root: debootstrap failed (log above)" >&2
        exit 1
    fi
    rm -f "$tmp"/root/var/cache/apt/archives/*.deb
    rm -rf "$tmp"/root/var/lib/apt/lists/*
    # No login prompt on the container's console: the tests drive it with nsenter.
    ln -sfn /dev/null "$tmp/root/etc/systemd/system/console-getty.service"
    mv -T "$tmp" "$root_dir"
    trap - EXIT
fi

# --- the wheelhouse ---------------------------------------------------------------------------
wkey=$( { sha256sum pyproject.toml; "$PY" -c 'import sys; print(sys.version_info[:2])'; } \
    | sha256sum | cut -c1-12)
wheels=$CACHE/wheels-$wkey
if [[ ! -d $wheels ]]; then
    echo "setup: wheels of encfs-gw's dependencies for tests/container into $wheels"
    tmp=$(mktemp -d "$CACHE/.wheels-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mapfile -t backend < <("$PY" -c 'import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]: print(r)')
    if ! { "$PY" -m pip wheel -q -w "$tmp" . &&
           "$PY" -m pip download -q --only-binary :all: -d "$tmp" "${backend[@]}"; } \
            >"$CACHE/.wheels.log" 2>&1; then
        cat "$CACHE/.wheels.log" >&2
        echo "container-root: building the wheelhouse failed (log above)" >&2
        exit 1
    fi
    rm -f "$tmp"/encfs-*.whl  # built fresh from the work tree by each test session
    mv -T "$tmp" "$wheels"
    trap - EXIT
fi
