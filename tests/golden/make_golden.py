"""Generate a golden example volume. Run by hand ONCE per format version; never
regenerate an existing one in place (a format change adds a new directory/tarball).

    .venv/bin/python tests/golden/make_golden.py tests/golden/volumes/v1-keyfile
    .venv/bin/python tests/golden/make_golden.py tests/golden/volumes/v1-long-symlinks
    .venv/bin/python tests/golden/make_golden.py tests/golden/volumes/v1-bound-names
    .venv/bin/python tests/golden/make_golden.py tests/golden/volumes/v1-xattr-sets   (as root)
    .venv/bin/python tests/golden/make_golden.py tests/golden/volumes/v1-vk-epochs    (as root)

A volume gets the default features of the encfs-gw that runs this (each golden volume
was made when its newest feature was the newest default); what a feature adds to the
tree is added only when the volume has it, so older volumes keep their manifests.
A NAME starting with `v1-vk-epochs` is then re-encrypted (encfs-gw reencrypt, without
--purge-old): feature volume-key-epochs, KEK version 1 (epoch 1, retired) and version 2
(epoch 2, current), every name, target, set and binding under the epoch-2 volume key.

Writes NAME.tar (the backing tree), NAME.key (test-only key file) and NAME.json (the
plaintext manifest the tests compare against); for volumes whose backing objects carry
xattrs (tarfile keeps none), NAME.xattrs.json: backing path -> {xattr name: hex value}.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tarfile
import tempfile

from encfs.admin.reencrypt import reencrypt_offline
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.format import FEATURE_BOUND_NAMES, FEATURE_LONG_SYMLINKS, FEATURE_XATTR_SETS
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted

FIXED_NS = 1_700_000_000_123_456_789


def content_of(name: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


def main(prefix: str) -> None:
    os.umask(0)
    work = tempfile.mkdtemp()
    # The operator's trust entry of a throwaway volume goes to a throwaway store.
    os.environ["ENCFS_GW_TRUST_DIR"] = os.path.join(work, "trust")
    backing = os.path.join(work, "backing")
    key = prefix + ".key"
    create_volume(backing, KeyfileProvider({"path": os.path.abspath(key)}), 16384, trusted())
    vol = Volume.unlock(backing, trusted())
    manifest: dict[str, dict] = {}

    def add_file(parent: int, path: str, name: bytes, data: bytes, mode: int = 0o644) -> None:
        fh, attr = vol.create(parent, name, stat.S_IFREG | mode, os.O_RDWR, 0, 0)
        if data:
            vol.write(fh, 0, data)
        vol.release(fh)
        vol.setattr(attr.ino, atime_ns=FIXED_NS, mtime_ns=FIXED_NS)
        manifest[path] = {
            "type": "file",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "mode": mode,
        }

    add_file(ROOT_INODE, "status.txt", b"status.txt", b"It works!\n")
    add_file(ROOT_INODE, "empty", b"empty", b"")
    add_file(ROOT_INODE, "one-block", b"one-block", content_of("one", 16384))
    add_file(ROOT_INODE, "block-plus-one", b"block-plus-one", content_of("bp1", 16385), 0o600)
    add_file(ROOT_INODE, "two-groups", b"two-groups", content_of("groups", 33 * 16384 + 7))
    long_name = "L" * 255
    add_file(ROOT_INODE, long_name, long_name.encode(), b"long name\n")
    d1 = vol.mkdir(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, 0)
    manifest["dir"] = {"type": "dir", "mode": 0o755}
    d2 = vol.mkdir(d1.ino, b"sub dir \xc3\xa9", stat.S_IFDIR | 0o700, 0, 0)
    manifest["dir/sub dir \u00e9"] = {"type": "dir", "mode": 0o700}
    add_file(d2.ino, "dir/sub dir \u00e9/nested.txt", b"nested.txt", b"nested\n")
    fh, _ = vol.create(ROOT_INODE, b"sparse", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    vol.write(fh, 5 * 16384 + 3, b"after the hole")
    vol.release(fh)
    data = bytes(5 * 16384 + 3) + b"after the hole"
    manifest["sparse"] = {
        "type": "file",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "mode": 0o644,
    }
    vol.symlink(ROOT_INODE, b"rel-link", b"dir/sub dir \xc3\xa9/nested.txt", 0, 0)
    manifest["rel-link"] = {"type": "symlink", "target": "dir/sub dir \u00e9/nested.txt"}
    vol.symlink(ROOT_INODE, b"abs-link", b"/etc/hostname", 0, 0)
    manifest["abs-link"] = {"type": "symlink", "target": "/etc/hostname"}
    if FEATURE_LONG_SYMLINKS in vol.config.features:  # v1-long-symlinks and later
        for name, target in (
            ("long-link", "d/" * 1528),  # 3,056 bytes: the shortest target stored apart
            ("longest-link", "/" + "t" * 4094),  # PATH_MAX - 1 bytes
        ):
            vol.symlink(ROOT_INODE, name.encode(), target.encode(), 0, 0)
            manifest[name] = {"type": "symlink", "target": target}
    if FEATURE_BOUND_NAMES in vol.config.features:  # v1-bound-names and later
        # Renamed objects carry bindings rewritten by the rename protocols (FORMAT.md 4).
        moved = vol.mkdir(ROOT_INODE, b"to-move", stat.S_IFDIR | 0o755, 0, 0)
        add_file(moved.ino, "moved dir/inside", b"inside", b"inside a renamed directory\n")
        read_only = vol.mkdir(moved.ino, b"read-only", stat.S_IFDIR | 0o755, 0, 0)
        add_file(read_only.ino, "moved dir/read-only/kept", b"kept", b"kept\n")
        vol.setattr(read_only.ino, mode=stat.S_IFDIR | 0o555)
        vol.rename(ROOT_INODE, b"to-move", d1.ino, b"moved dir")
        vol.rename(d1.ino, b"moved dir", ROOT_INODE, b"moved dir")
        manifest["moved dir"] = {"type": "dir", "mode": 0o755}
        manifest["moved dir/read-only"] = {"type": "dir", "mode": 0o555}
        for name, target in (("short-moved", "short target"), ("long-moved", "m/" * 1600)):
            vol.symlink(ROOT_INODE, b"before-" + name.encode(), target.encode(), 0, 0)
            vol.rename(ROOT_INODE, b"before-" + name.encode(), ROOT_INODE, name.encode())
            manifest[name] = {"type": "symlink", "target": target}
    if FEATURE_XATTR_SETS in vol.config.features:  # v1-xattr-sets and later
        # A small set (inline), a large one (the xattr store), trusted.* on a symlink.
        def add_xattrs(path: str, attributes: dict[bytes, bytes]) -> None:
            ino = ROOT_INODE
            for part in path.encode().split(b"/"):
                ino = vol.lookup(ino, part).ino
            for name, value in attributes.items():
                vol.setxattr(ino, name, value)
            manifest[path]["xattrs"] = {n.decode(): v.hex() for n, v in attributes.items()}

        add_xattrs("status.txt", {b"user.mime_type": b"text/plain", b"user.a": b"1"})
        add_xattrs("dir", {b"user.big": content_of("xattr", 5000), b"trusted.t": b"\0\1"})
        add_xattrs("rel-link", {b"trusted.link": b"on the link itself"})
    vol.close()
    if os.path.basename(prefix).startswith("v1-vk-epochs"):
        vol = Volume.unlock(backing, trusted(), reencrypting=True)
        try:
            assert reencrypt_offline(vol)["done"]
        finally:
            vol.close()
    os.unlink(os.path.join(backing, "encfs-gw.lock"))
    backing_xattrs: dict[str, dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(backing):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found = {
                n: os.getxattr(path, n, follow_symlinks=False).hex()
                for n in os.listxattr(path, follow_symlinks=False)
            }
            if found:
                backing_xattrs[os.path.relpath(path, backing)] = found
    if backing_xattrs:
        with open(prefix + ".xattrs.json", "w") as f:
            json.dump(backing_xattrs, f, indent=2, sort_keys=True)
            f.write("\n")
    with tarfile.open(prefix + ".tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(backing, arcname="backing")
    with open(prefix + ".json", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
