"""Every CLI verb on a table of broken inputs: exactly one line on stderr, an exit code
from the documented table (README.md "Exit codes"), no traceback, no hang (issue 20,
finding 8).

The table is the cross product of every verb with every broken path (in each of the
verb's path arguments), plus broken values of each verb's other arguments. A case is
not assigned its exact code here (test_cli_errors.py does that for the ones that
matter): whatever refuses the input, the user sees one line and a code they can look up.
A good volume stays untouched by all of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.mount import TIMEOUT, Volume, init_volume, is_mounted, run_cli

pytestmark = pytest.mark.fuse

README = Path(__file__).resolve().parents[2] / "README.md"
ERROR_PREFIX = "encfs-gw: error: "


def documented_exit_codes() -> set[int]:
    """The codes of README.md's "Exit codes" table."""
    text = README.read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}


# name -> how to make the broken path in `base`
BROKEN_PATHS = {
    "missing": lambda base, good: base / "absent",
    "regular-file": lambda base, good: _file(base / "file"),
    "fifo": lambda base, good: _fifo(base / "fifo"),
    "device": lambda base, good: Path("/dev/null"),
    "symlink-to-volume": lambda base, good: _link(base / "link", good.backing),
    "dangling-symlink": lambda base, good: _link(base / "dangling", base / "nowhere"),
    "not-a-volume": lambda base, good: _dir(base / "plain", "keep.txt"),
    "newline-in-name": lambda base, good: _dir(base / "new\nline", "keep.txt"),
    "in-proc": lambda base, good: Path("/proc/self/fdinfo"),
    "under-proc": lambda base, good: Path("/proc/encfs-gw-bad-input/x"),
    "corrupt-config": lambda base, good: _dir(base / "corrupt", "encfs-gw.conf", b"{garbage"),
    "unreadable-config": lambda base, good: _dir(base / "noconf", "encfs-gw.conf", None),
}


def _file(path: Path) -> Path:
    path.write_text("not a directory\n")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    return path


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _dir(path: Path, name: str, data: bytes | None = b"x") -> Path:
    path.mkdir()
    if data is None:
        (path / name).mkdir()  # a directory where the config should be
    else:
        (path / name).write_bytes(data)
    return path


# Each verb with its path argument as {} (and {K}, {M}, {N}: the good key file, a fresh
# mountpoint, a fresh key file path; {V}: the good volume).
VERBS = {
    "init": "init {} --keyfile {N}",
    "mount-backing": "mount {} {M} --keyfile {K}",
    "mount-mountpoint": "mount {V} {} --keyfile {K}",
    "unmount": "unmount {}",
    "umount": "umount {}",
    "fsck": "fsck {} --keyfile {K}",
    "status": "status {} --keyfile {K}",
    "rotate": "rotate {} --keyfile {K}",
    "rotate-every": "rotate-every {} 30d",
    "rewrap-kek": "rewrap-kek {} --keyfile {K}",
    "reencrypt": "reencrypt {} --keyfile {K}",
    "provider-list": "provider list {}",
    "provider-add": "provider add {} keyfile:{N} --keyfile {K}",
    "provider-remove": "provider remove {} 1",
    "destroy": "destroy {} --yes-destroy-all-data 0123456789abcdef0123456789abcdef",
    "provider-check": "provider check {}",
    "trust": "trust {} --keyfile {K}",
    "upgrade": "upgrade {} --keyfile {K}",
    "mount-keyfile": "mount {V} {M} --keyfile {}",
    "fsck-keyfile": "fsck {V} --keyfile {}",
    "trust-keyfile": "trust {V} --keyfile {}",
}
# Combinations that are not broken input: init makes a volume in a missing or empty
# directory, and any empty directory is a fine mountpoint.
VALID = {("init", "missing"), ("mount-mountpoint", "not-a-volume")}

# Other arguments, broken, with the good volume.
BROKEN_ARGUMENTS = {
    "init-block-size-text": "init {N}.vol --keyfile {N} --block-size big",
    "init-block-size-odd": "init {N}.vol --keyfile {N} --block-size 5000",
    "init-unknown-provider": "init {N}.vol --provider frobnicate:x",
    "init-empty-provider": "init {N}.vol --provider keyfile:",
    "init-missing-command": "init {N}.vol --provider command:/nonexistent/getkey",
    "init-both-key-options": "init {N}.vol --keyfile {N} --provider keyfile:{N}",
    "mount-max-read": "mount {V} {M} --keyfile {K} -o max_read=1",
    "mount-fsname": "mount {V} {M} --keyfile {K} -o fsname=/elsewhere",
    "mount-unknown-option": "mount {V} {M} --keyfile {K} -o frobnicate",
    "mount-health-interval": "mount {V} {M} --keyfile {K} -o health_interval=-1",
    "mount-health-nan": "mount {V} {M} --keyfile {K} -o health_grace=nan",
    "mount-audit-required-alone": "mount {V} {M} --keyfile {K} -o audit_required",
    "mount-empty-value": "mount {V} {M} --keyfile {K} -o audit_log=",
    "mount-wrong-key": "mount {V} {M} --keyfile {W}",
    "rotate-rate-negative": "rotate {V} --keyfile {K} --rate -5",
    "rotate-rate-nan": "rotate {V} --keyfile {K} --rate nan",
    "rotate-wrong-key": "rotate {V} --keyfile {W}",
    "reencrypt-rate-negative": "reencrypt {V} --keyfile {K} --rate -5",
    "reencrypt-rate-inf": "reencrypt {V} --keyfile {K} --rate inf",
    "reencrypt-wrong-key": "reencrypt {V} --keyfile {W}",
    "reencrypt-bad-new-provider": "reencrypt {V} --keyfile {K} --new-provider frobnicate",
    "reencrypt-empty-new-provider": "reencrypt {V} --keyfile {K} --new-provider keyfile:",
    "rotate-every-never": "rotate-every {V} never",
    "rotate-every-zero": "rotate-every {V} 0d",
    "rotate-every-negative": "rotate-every {V} -1h",
    "rotate-every-huge": "rotate-every {V} 1e30d",
    "provider-remove-text": "provider remove {V} first",
    "provider-remove-absent": "provider remove {V} 99",
    "provider-remove-last": "provider remove {V} 1",
    "provider-add-bad-spec": "provider add {V} frobnicate --keyfile {K}",
    "destroy-wrong-id": "destroy {V} --yes-destroy-all-data 0123456789abcdef0123456789abcdef",
    "destroy-no-id": "destroy {V}",
    "status-wrong-key": "status {V} --keyfile {W}",
    "fsck-wrong-key": "fsck {V} --keyfile {W}",
    "no-verb": "",
    "unknown-verb": "frobnicate {V}",
    "missing-argument": "mount {V}",
    "unknown-flag": "status {V} --frobnicate",
    "trust-forget-bad-id": "trust {V} --forget nothex",
    "upgrade-current-volume": "upgrade {V} --keyfile {K}",
    "provider-unknown-spec": "status {V} --provider frobnicate:x",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Volume, Path]:
    base = tmp_path_factory.mktemp("bad-input")
    good = init_volume(base, "good")
    wrong = init_volume(base, "wrong")
    return base, good, wrong.keyfile


def fingerprint(volume: Volume) -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(volume.backing):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, volume.backing)] = hashlib.sha256(f.read()).hexdigest()
    found["<key>"] = hashlib.sha256(volume.keyfile.read_bytes()).hexdigest()
    return found


def run_case(template: str, target: Path | None, world, tmp_path: Path) -> None:
    _, good, wrong_key = world
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fields = {"V": good.backing, "K": good.keyfile, "W": wrong_key, "M": mountpoint,
              "N": tmp_path / "new.key"}
    argv = [part.format(target, **fields) for part in template.split()]
    before = fingerprint(good)
    try:
        result = run_cli(*argv)
    except subprocess.TimeoutExpired:
        pytest.fail(f"encfs-gw {template} hung (more than {TIMEOUT} s)")
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
            pytest.fail(f"encfs-gw {template} mounted something")
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (argv, result.stderr)
    assert result.returncode in documented_exit_codes() - {0, 1}, (argv, result.returncode)
    assert fingerprint(good) == before, "the good volume changed"


CASES = [
    pytest.param(verb, broken, id=f"{verb}-{broken}")
    for verb in VERBS
    for broken in BROKEN_PATHS
    if (verb, broken) not in VALID
]


@pytest.mark.parametrize(("verb", "broken"), CASES)
def test_every_verb_on_broken_paths(world, tmp_path, verb, broken):
    base = tmp_path / "case"
    base.mkdir()
    target = BROKEN_PATHS[broken](base, world[1])
    run_case(VERBS[verb], target, world, tmp_path)


@pytest.mark.parametrize("case", list(BROKEN_ARGUMENTS))
def test_every_verb_on_broken_arguments(world, tmp_path, case):
    run_case(BROKEN_ARGUMENTS[case], None, world, tmp_path)
