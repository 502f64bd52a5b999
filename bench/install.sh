#!/usr/bin/env bash
# Install what `make bench` compares against and drives, idempotently, on Debian 12:
#   gocryptfs (the reference peer), fio (data workloads), sqlite3 (SQLite workload),
#   fuse3 (fusermount3), coreutils/findutils (cp, du, stat, ls, find, xargs, nproc).
# apt-get update runs only when something is missing. Needs root only in that case.
set -euo pipefail

packages=(gocryptfs fio sqlite3 fuse3 coreutils findutils)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bench/install.sh: missing Debian packages (run as root): ${missing[*]}" >&2
        exit 1
    fi
    echo "bench/install.sh: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in gocryptfs fio sqlite3 fusermount3 cp du stat ls find xargs; do
    command -v "$tool" >/dev/null || { echo "bench/install.sh: $tool not found after install" >&2; exit 1; }
done
if [[ ! -e /dev/fuse ]]; then
    echo "bench/install.sh: /dev/fuse is missing: the benchmark needs FUSE" >&2
    exit 1
fi
