#!/usr/bin/env bash
# `make demo`: the main job on the embedded default, end to end and unattended.
# Creates a volume with a generated local key file, mounts it, copies a real directory
# tree into it, shows that the backing directory holds only ciphertext and encrypted
# names, reads everything back and compares it, and unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
ENCFS_GW=.venv/bin/encfs-gw
WORK=$(mktemp -d /tmp/encfs-gw-demo.XXXXXX)
BACKING=$WORK/backing
MNT=$WORK/mnt
KEY=$WORK/demo.key
SOURCE=${DEMO_SOURCE:-/usr/share/common-licenses}
mkdir -p "$MNT"

cleanup() {
    if mountpoint -q "$MNT" 2>/dev/null; then "$ENCFS_GW" unmount "$MNT" || fusermount3 -u -z "$MNT"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. create a volume (key file provider, a fresh 256-bit key file)"
"$ENCFS_GW" init "$BACKING" --keyfile "$KEY"
ls -l "$KEY"

step "2. mount it (returns once the mount is live)"
"$ENCFS_GW" mount "$BACKING" "$MNT"
grep " $MNT " /proc/mounts

step "3. copy a real directory tree into the mount: $SOURCE and this project's source"
cp -a "$SOURCE" "$MNT/licenses"
cp -a encfs "$MNT/encfs-source"
echo "the secret plan: meet at dawn" > "$MNT/secret-plan.txt"
ln -s secret-plan.txt "$MNT/plan-link"
find "$MNT" | sed -n "1,8p"
echo "... $(find "$MNT" | wc -l) entries, $(du -sh "$MNT" | cut -f1) through the mount"

step "4. the backing directory holds only ciphertext and encrypted names"
ls -la "$BACKING" | sed -n "1,8p"
victim=$(find "$BACKING" -type f -size +1k ! -name 'encfs-gw.*' | sed -n "1p")
echo "first 96 bytes of $(basename "$victim"):"
od -A d -t x1 -N 96 "$victim"
for marker in "secret plan" "meet at dawn" "GNU GENERAL PUBLIC LICENSE" "secret-plan.txt" "licenses" "def main"; do
    if grep -r -a -q -F "$marker" "$BACKING"; then
        echo "LEAK: '$marker' found in the backing directory" >&2
        exit 1
    fi
    if find "$BACKING" -name "*${marker}*" | grep -q .; then
        echo "LEAK: a backing name contains '$marker'" >&2
        exit 1
    fi
    echo "not in the backing store (contents or names): '$marker'"
done

step "5. read everything back through the mount and compare"
diff -r "$SOURCE" "$MNT/licenses"
diff -r encfs "$MNT/encfs-source"
[ "$(cat "$MNT/plan-link")" = "the secret plan: meet at dawn" ]
echo "identical"

step "6. unmount (flushes, waits for the daemon to exit)"
"$ENCFS_GW" unmount "$MNT"
! mountpoint -q "$MNT"
echo "demo OK"
