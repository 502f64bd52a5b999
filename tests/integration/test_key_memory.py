"""What a memory scan of the daemon finds, before and after INACCESSIBLE and at unmount.

The test knows every key of its volume: it wrote the key file's key (it reads it back),
unwraps the KEK and the volume key from the config as docs/FORMAT.md says, derives the
keys the volume key yields, and unwraps the DEK of every block it wrote from the backing
files. All of it with pyca directly, not with encfs's code. As root it then reads every
readable mapping of the real daemon through /proc/PID/mem and counts each key's bytes.

Keys that only feed a cipher object (AES-SIV halves, HMAC and DEK-wrap keys, DEKs) are
counted too: OpenSSL's AES key schedule starts with the key itself, so a live cipher
context shows up as a copy. The figures of each phase are printed (pytest -s) for the
threat model; the assertions are what the design promises:

* READY, after reads and writes: exactly one copy of the KEK and of the volume key (the
  keyring's locked arena), none of the key file's key or its hex text, none of any DEK
  (they are unwrapped into one buffer that is zeroed after each request);
* INACCESSIBLE (the key file gone, `status --check`): none of any key;
* at exit after unmount (ENCFS_GW_TEST_STOP_AT_EXIT stops the daemon once its volume is
  closed): none of any key;
* the helpers (unmount guard, CPU warmer) never hold any.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.helpers.mount import daemon_pid, init_volume, is_mounted, run_cli

pytestmark = pytest.mark.fuse

FILES = {"small": 5000, "three-blocks": 3 * 16384 + 100, "big": 40 * 16384}
KEY_RECORD_OFFSET = 64
GROUP_BLOCKS = 32
WAIT = 30.0


# --- the keys, as docs/FORMAT.md derives them ------------------------------------------------


def hkdf(key: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def volume_keys(backing: Path, keyfile: Path) -> dict[str, bytes]:
    """Every key of KEK version 1 and the volume key, by name."""
    conf = json.loads((backing / "encfs-gw.conf").read_bytes())
    volume_id = bytes.fromhex(conf["volume_id"])
    file_key_hex = keyfile.read_bytes().strip()
    file_key = bytes.fromhex(file_key_hex.decode())
    (version,) = conf["kek"]["versions"]
    sealed_kek = bytes.fromhex(version["protectors"][0]["record"]["sealed_kek"])
    binding = b"encfs-gw KEK binding v1|" + volume_id + struct.pack(">H", 1)
    kek = AESGCM(file_key).decrypt(sealed_kek[:12], sealed_kek[12:], binding)
    params = json.dumps(
        {
            "format_version": conf["format_version"],
            "features": sorted(conf["features"]),
            "volume_id": conf["volume_id"],
            "block_size": conf["block_size"],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    aad = b"EGWV" + hashlib.sha256(params).digest() + struct.pack(">H", 1)
    wrapped = bytes.fromhex(version["wrapped_volume_key"])
    volume_key = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad)
    keys = {
        "key file key": file_key,
        "key file text": file_key_hex,
        "KEK": kek,
        "volume key": volume_key,
        "xattr value key": hkdf(volume_key, b"encfs-gw v1: AES-GCM key for xattr values", 32),
        "binding key": hkdf(
            volume_key, b"encfs-gw v1: HMAC key binding file headers to their names", 32
        ),
    }
    for what, info in (
        ("name key", b"encfs-gw v1: AES-SIV key for file names"),
        ("symlink key", b"encfs-gw v1: AES-SIV key for symlink targets"),
        ("xattr name key", b"encfs-gw v1: AES-SIV key for xattr names"),
    ):
        siv = hkdf(volume_key, info, 64)  # AES-SIV: two AES-256 keys
        keys[f"{what} (1st half)"], keys[f"{what} (2nd half)"] = siv[:32], siv[32:]
    return keys


def file_keys(backing: Path, volume_id: bytes, kek: bytes) -> dict[str, bytes]:
    """The DEK-wrap key and the live DEKs of every backing data file (group 0)."""
    keys: dict[str, bytes] = {}
    for path in backing.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if not data.startswith(b"EGWF"):
            continue
        file_id = data[8:24]
        info = b"encfs-gw v1: AES-GCM key wrapping the DEKs of one file, file id follows"
        wrap_key = hkdf(kek, info + file_id, 32, salt=volume_id)
        keys[f"DEK-wrap key {file_id.hex()[:8]}"] = wrap_key
        for block in range(GROUP_BLOCKS):
            for slot in range(2):
                at = KEY_RECORD_OFFSET + block * 128 + slot * 64
                version, generation, _, nonce, sealed = struct.unpack(
                    ">HBB12s48s", data[at : at + 64]
                )
                if not version:
                    continue
                aad = (
                    b"EGWK" + struct.pack(">H", 1) + volume_id + file_id
                    + struct.pack(">QHB", block, version, generation)
                )
                dek = AESGCM(wrap_key).decrypt(nonce, sealed, aad)
                keys[f"DEK {file_id.hex()[:8]}/{block}"] = dek
    assert keys, "no data file found in the backing store"
    return keys


# --- reading a process's memory --------------------------------------------------------------

CHUNK = 16 << 20
SKIP_MAPPINGS = ("[vvar]", "[vvar_vclock]", "[vsyscall]")


def scan(pid: int, needles: dict[str, bytes]) -> dict[str, int]:
    """How often each needle occurs in the readable memory of `pid` (root reads any)."""
    longest = max(map(len, needles.values()))
    counts = dict.fromkeys(needles, 0)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in SKIP_MAPPINGS):
                continue
            tail = b""
            for start in range(low, high, CHUNK):
                try:
                    mem.seek(start)
                    data = mem.read(min(CHUNK, high - start))
                except OSError:
                    break
                window = tail + data
                for name, needle in needles.items():
                    # A needle that straddles two chunks is in `window` once; one wholly
                    # inside `tail` was counted with the previous chunk.
                    counts[name] += window.count(needle) - tail.count(needle)
                tail = data[-(longest - 1) :]
    return counts


def locked_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck line")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def report(phase: str, counts: dict[str, int]) -> None:
    found = {name: n for name, n in counts.items() if n}
    print(f"\n[key memory] {phase}: {sum(counts.values())} copies of {len(counts)} keys; "
          f"found: {json.dumps(found) if found else 'none'}")


# --- the test --------------------------------------------------------------------------------


@pytest.mark.expected_log(r"key state \w+ -> \w+")
# (the stock-loop pass of make test: the warmer this test asks for is ignored, and said so)
@pytest.mark.expected_log(r"-o cpu_warmer=on is ignored: stock request loop")
def test_memory_scan_before_and_after_inaccessible_and_at_exit(tmp_path):
    volume = init_volume(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, ENCFS_GW_TEST_STOP_AT_EXIT="1")
    # auto_unmount and cpu_warmer=on: its unmount guard and CPU warmer are scanned too.
    run_cli("mount", volume.backing, mnt, "--keyfile", volume.keyfile, "-o",
            "auto_unmount,cpu_warmer=on", check=True, env=env)
    pid = daemon_pid(volume.backing)
    assert pid is not None
    try:
        for name, size in FILES.items():
            (mnt / name).write_bytes(os.urandom(size))
        (mnt / "a-name").mkdir()
        os.symlink("target", mnt / "a-link")
        os.setxattr(mnt / "small", "user.tag", b"value")
        for name in FILES:
            (mnt / name).read_bytes()
        keys = volume_keys(volume.backing, volume.keyfile)
        conf = json.loads((volume.backing / "encfs-gw.conf").read_bytes())
        keys |= file_keys(volume.backing, bytes.fromhex(conf["volume_id"]), keys["KEK"])
        helpers = children(pid)

        ready = scan(pid, keys)
        report("READY, after I/O", ready)
        assert ready["KEK"] == 1 and ready["volume key"] == 1, ready  # the locked arena
        assert ready["key file key"] == ready["key file text"] == 0, ready
        assert not any(n for name, n in ready.items() if name.startswith("DEK ")), ready
        assert max(ready.values()) <= 2, ready  # derived keys: in their live cipher contexts
        assert locked_kib(pid) > 0  # the arena's pages are locked in RAM
        for helper in helpers:
            assert not any(scan(helper, keys).values()), f"helper {helper} holds a key"

        moved = volume.keyfile.with_suffix(".away")
        os.rename(volume.keyfile, moved)
        result = run_cli("status", mnt, "--check", "--json")
        assert json.loads(result.stdout)["state"] == "INACCESSIBLE", result.stdout
        wiped = scan(pid, keys)
        report("INACCESSIBLE", wiped)
        assert not any(wiped.values()), wiped

        os.rename(moved, volume.keyfile)
        result = run_cli("status", mnt, "--check", "--json")
        assert json.loads(result.stdout)["state"] == "READY", result.stdout
        assert (mnt / "small").stat().st_size == FILES["small"]
        restored = scan(pid, keys)
        report("READY again (restored)", restored)
        assert restored["KEK"] == 1 and restored["volume key"] == 1, restored

        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=WAIT)
        wait_for(lambda: state(pid) == "T", "the daemon to stop itself after unmount")
        at_exit = scan(pid, keys)
        report("unmounted, volume closed, before exit", at_exit)
        assert not any(at_exit.values()), at_exit
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: state(pid) in (None, "Z"), "the daemon to exit")
