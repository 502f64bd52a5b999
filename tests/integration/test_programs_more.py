"""More real programs on the mount (issue 3), beyond tests/integration/test_programs.py.

git (local clone with history, worktree, repack, gc --aggressive, fsck --full, mirror
clone back out), rsync -aHAX round trips (hard links, symlinks, user/trusted xattrs, odd
modes, sparse files, nanosecond times), SQLite in WAL mode with one writer and several
reader *processes*, a large SQLite database with chunk_size (fallocate path) and mmap
reads, `python -m venv` created and used on the mount (pip installs a local package),
`make` of a small C program (incremental rebuilds rely on mtimes), `cp --reflink`,
copy_file_range, `tar --xattrs`, fallocate(1) / posix_fallocate, and an fio verify job.

All inputs are deterministic; every test checks the result with the program's own
verifier and with a Python manifest. Limits met here are listed in docs/LIMITS.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mount import Volume, init_volume, mounted

pytestmark = pytest.mark.fuse

TIMEOUT = 120
MB = 1024 * 1024


def run(*args, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, args))} exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[tuple[Volume, Path]]:
    base = tmp_path_factory.mktemp("programs-more")
    volume = init_volume(base)
    with mounted(volume, base / "mnt") as mnt:
        yield volume, mnt


@pytest.fixture
def d(shared, request) -> Path:
    """A fresh directory on the shared mount, named after the test."""
    path = shared[1] / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:100]
    path.mkdir()
    return path


# --- manifests ----------------------------------------------------------------------------


def xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def manifest(root: Path, times: bool = True) -> dict[str, tuple]:
    """Everything rsync -aHAX / tar preserve, per relative path."""
    result: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            first = inodes.setdefault(st.st_ino, rel)
            entry: list = [oct(st.st_mode), st.st_uid, st.st_gid, first, xattrs(path)]
            if times and not stat.S_ISLNK(st.st_mode):
                entry.append(st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                entry += [st.st_size, st.st_nlink, hashlib.sha256(path.read_bytes()).hexdigest()]
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            result[rel] = tuple(entry)
    return result


def assert_same(a: dict, b: dict) -> None:
    diffs = [
        f"{k}: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    assert not diffs, "\n".join(diffs[:20])


# --- git ----------------------------------------------------------------------------------


def git_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "A",
        "GIT_AUTHOR_EMAIL": "a@example.invalid",
        "GIT_COMMITTER_NAME": "C",
        "GIT_COMMITTER_EMAIL": "c@example.invalid",
        "GIT_AUTHOR_DATE": "2024-02-02T00:00:00+00:00",
        "GIT_COMMITTER_DATE": "2024-02-02T00:00:00+00:00",
        "LC_ALL": "C",
    }


def git(env, cwd, *args) -> str:
    config = ["-c", "init.defaultBranch=main", "-c", "gc.auto=0", "-c", "core.fsync=all",
              "-c", "protocol.file.allow=always", "-c", "commit.gpgSign=false",
              "-c", "advice.detachedHead=false"]
    return run("git", *config, *args, cwd=cwd, env=env).stdout


def build_history(env, repo: Path) -> None:
    """30 commits on two branches with a merge, tags, renames, binaries, modes, symlinks."""
    rng = random.Random(3)
    git(env, repo, "init", "-q")
    (repo / "src").mkdir()
    for i in range(30):
        (repo / "src" / f"mod{i % 7}.py").write_text(f"# revision {i}\n" + "x = 1\n" * (i * 13))
        (repo / "blob.bin").write_bytes(rng.randbytes(40_000 + i * 1000))
        if i == 5:
            (repo / "tool.sh").write_text("#!/bin/sh\necho tool\n")
            os.chmod(repo / "tool.sh", 0o755)
            os.symlink("src/mod1.py", repo / "link")
        if i == 12:
            git(env, repo, "mv", "src/mod3.py", "src/renamed.py")
        git(env, repo, "add", "-A")
        git(env, repo, "commit", "-q", "--allow-empty", "-m", f"commit {i}")
        if i == 15:
            git(env, repo, "checkout", "-q", "-b", "side")
        if i == 20:
            git(env, repo, "checkout", "-q", "main")
            git(env, repo, "merge", "-q", "--no-ff", "-X", "theirs", "-m", "merge side", "side")
        if i % 10 == 9:
            git(env, repo, "tag", "-a", f"v{i}", "-m", f"tag {i}")


def refs(env, repo: Path) -> str:
    return git(env, repo, "for-each-ref", "--format=%(objectname) %(refname)")


def test_git_local_clone_worktree_repack_gc_fsck(tmp_path, d):
    env = git_env(tmp_path)
    plain = tmp_path / "origin"
    plain.mkdir()
    build_history(env, plain)
    # A local clone (object files copied, not packed: the mount is another filesystem).
    git(env, tmp_path, "clone", "-q", plain, d / "clone")
    clone = d / "clone"
    git(env, clone, "fsck", "--full", "--strict", "--no-progress")
    assert git(env, clone, "rev-parse", "origin/side") == git(env, plain, "rev-parse", "side")
    # A worktree on the mount, a commit in it, then history rewriting tools.
    git(env, clone, "worktree", "add", "-q", d / "wt", "origin/side")
    (d / "wt" / "new.txt").write_text("from the worktree\n")
    git(env, d / "wt", "add", "new.txt")
    git(env, d / "wt", "commit", "-q", "-m", "worktree commit")
    wt_head = git(env, d / "wt", "rev-parse", "HEAD")
    git(env, clone, "repack", "-q", "-a", "-d", "-f", "--depth=20", "--window=20")
    git(env, clone, "gc", "-q", "--aggressive", "--prune=now")
    git(env, clone, "fsck", "--full", "--strict", "--no-progress")
    for pack in (clone / ".git" / "objects" / "pack").glob("*.idx"):
        git(env, clone, "verify-pack", pack)
    assert git(env, clone, "status", "--porcelain") == ""
    assert git(env, d / "wt", "status", "--porcelain") == ""
    assert git(env, clone, "rev-parse", wt_head.strip()) == wt_head  # reachable via worktree
    # Every file of every commit reads back as git stored it (git archive == git's own bytes).
    for tag in ("v9", "v19", "v29"):
        archive, expected = (
            subprocess.run(["git", "archive", "--format=tar", tag], cwd=repo, env=env,
                           capture_output=True, check=True, timeout=TIMEOUT).stdout
            for repo in (clone, plain)
        )
        assert archive == expected
    # And a mirror clone back out of the mount.
    git(env, tmp_path, "clone", "-q", "--mirror", clone, tmp_path / "mirror.git")
    git(env, tmp_path / "mirror.git", "fsck", "--full", "--strict", "--no-progress")
    origin_refs = {
        line.split()[1].replace("refs/remotes/origin/", "refs/heads/"): line.split()[0]
        for line in refs(env, clone).splitlines()
    }
    for line in refs(env, plain).splitlines():
        sha, name = line.split()
        assert origin_refs.get(name) == sha, name


# --- rsync --------------------------------------------------------------------------------


def build_rsync_tree(root: Path, special_files: bool = False) -> None:
    rng = random.Random(11)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big.bin").write_bytes(rng.randbytes(3 * MB + 17))
    (root / "f1").write_text("hard linked\n")
    os.link(root / "f1", root / "f1-link")
    os.link(root / "f1", root / "sub" / "f1-link2")
    os.symlink("f1", root / "rel-link")
    os.symlink("/nonexistent-egw/abs", root / "dangling")
    os.symlink("sub/deeper", root / "dir-link")
    (root / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:
        f.seek(5 * MB)
        f.write(b"end of sparse")
    (root / ("x" * 255)).write_text("long name\n")
    (root / "ünï 日本").write_text("unicode\n")
    modes = {"m000": 0o000, "m4755": 0o4755, "m2755": 0o2755, "m6711": 0o6711, "m007": 0o007,
             "m444": 0o444, "m1644": 0o1644}
    for name, mode in modes.items():
        (root / name).write_text(name)
        os.chmod(root / name, mode)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "sgid-dir").mkdir()
    os.chmod(root / "sgid-dir", 0o2750)
    os.setxattr(root / "f1", "user.note", b"hello")
    os.setxattr(root / "f1", "user.empty", b"")
    os.setxattr(root / "big.bin", "user.binary", bytes(range(256)))
    os.setxattr(root / "big.bin", "trusted.root-only", b"t")
    os.setxattr(root / "sub", "user.on-dir", b"dir value")
    os.chmod(root / "sub" / "deeper", 0o700)
    if special_files:
        os.mkfifo(root / "fifo", 0o640)
    stamp = 1_234_567_890_123_456_789
    for i, path in enumerate(sorted(root.rglob("*"))):
        os.utime(path, ns=(stamp + i, stamp + 7 * i), follow_symlinks=False)
    os.utime(root / "sub", ns=(stamp, stamp))


RSYNC = ("rsync", "-aHAXS", "--numeric-ids")  # -S: keep holes


def itemize(src: Path, dst: Path) -> list[str]:
    out = run(*RSYNC, "-n", "-i", "--checksum", f"{src}/", f"{dst}/").stdout
    return [line for line in out.splitlines() if line.strip()]


def test_rsync_aHAX_into_mount_and_back(tmp_path, d):
    """One pass in (rsync writes temp files and renames them: the renames must keep the
    mtimes it set), nothing left to do, then back out: data, hard links, symlinks, FIFOs,
    user/trusted xattrs, odd modes, nanosecond times and holes all survive."""
    src = tmp_path / "src"
    build_rsync_tree(src, special_files=True)
    run(*RSYNC, f"{src}/", f"{d / 'dst'}/")
    assert itemize(src, d / "dst") == []
    assert_same(manifest(src), manifest(d / "dst"))
    run(*RSYNC, f"{d / 'dst'}/", f"{tmp_path / 'back'}/")
    assert itemize(src, tmp_path / "back") == []
    assert_same(manifest(src), manifest(tmp_path / "back"))
    run("diff", "-r", "--no-dereference", "--exclude=fifo", src, tmp_path / "back")  # diff
    # reports any two FIFOs as different; the manifests above compared them
    # The sparse file stays sparse on the mount's backing store (holes cost nothing).
    assert os.stat(d / "dst" / "sparse").st_blocks * 512 < MB


# --- SQLite -------------------------------------------------------------------------------

ACCOUNTS = 50
TOTAL = ACCOUNTS * 1000
WRITER_TX = 300
READERS = 3

WRITER = textwrap.dedent(
    """
    import random, sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    db.execute("PRAGMA busy_timeout=60000")
    db.execute("PRAGMA synchronous=NORMAL")
    rng = random.Random(9)
    for seq in range(1, int(sys.argv[2]) + 1):
        a, b = rng.sample(range(ACCOUNTS), 2)
        amount = rng.randrange(1, 50)
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE acct SET balance = balance - ? WHERE id = ?", (amount, a))
        db.execute("UPDATE acct SET balance = balance + ? WHERE id = ?", (amount, b))
        db.execute("INSERT INTO log(seq, payload) VALUES (?, ?)", (seq, rng.randbytes(300)))
        db.execute("COMMIT")
        if seq % 100 == 0:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    db.execute("UPDATE status SET done = 1")
    db.close()
    """
).replace("ACCOUNTS", str(ACCOUNTS))

READER = textwrap.dedent(
    """
    import json, sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
    db.execute("PRAGMA busy_timeout=60000")
    db.execute("PRAGMA query_only=1")
    db.execute("PRAGMA mmap_size=" + str(int(sys.argv[2])))
    reads, last = 0, 0
    while True:
        db.execute("BEGIN")
        total = db.execute("SELECT sum(balance) FROM acct").fetchone()[0]
        count, top = db.execute("SELECT count(*), coalesce(max(seq), 0) FROM log").fetchone()
        done = db.execute("SELECT done FROM status").fetchone()[0]
        db.execute("COMMIT")
        reads += 1
        if total != TOTAL or count != top or count < last:
            print(json.dumps({"error": [total, count, top, last]}))
            sys.exit(1)
        last = count
        if done:
            break
    print(json.dumps({"reads": reads, "last": last}))
    """
).replace("TOTAL", str(TOTAL))


def test_sqlite_wal_writer_and_reader_processes(d):
    db = d / "bank.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, balance INTEGER)")
        conn.execute("CREATE TABLE log(seq INTEGER PRIMARY KEY, payload BLOB)")
        conn.execute("CREATE TABLE status(done INTEGER)")
        conn.execute("INSERT INTO status VALUES (0)")
        conn.executemany("INSERT INTO acct VALUES (?, 1000)", [(i,) for i in range(ACCOUNTS)])
    finally:
        conn.close()
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(db), str(64 * MB if i == 0 else 0)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(READERS)
    ]
    try:
        run(sys.executable, "-c", WRITER, db, WRITER_TX)
        results = [reader.communicate(timeout=TIMEOUT) for reader in readers]
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    for reader, (out, err) in zip(readers, results, strict=True):
        assert reader.returncode == 0, f"reader saw an inconsistent snapshot: {out} {err}"
        assert json.loads(out)["last"] == WRITER_TX
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        totals = conn.execute("SELECT sum(balance), count(*) FROM acct").fetchone()
        assert totals == (TOTAL, ACCOUNTS)
        assert conn.execute("SELECT count(*) FROM log").fetchone()[0] == WRITER_TX
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    assert not (d / "bank.db-wal").exists() or os.stat(d / "bank.db-wal").st_size == 0


def test_sqlite_large_database_chunk_size_and_mmap(d, tmp_path):
    """~24 MB database grown in 4 MiB chunks (SQLite's fallocate/size-hint path) and read
    through mmap; VACUUM INTO a plain file gives the same content."""
    db = d / "large.db"
    conn = sqlite3.connect(db, isolation_level=None)
    rng = random.Random(4)
    try:
        conn.execute("PRAGMA page_size=65536")
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("PRAGMA mmap_size=268435456")
        conn.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB)")
        conn.execute("CREATE INDEX big_v ON big(substr(v, 1, 16))")
        conn.execute("PRAGMA chunk_size=4194304")  # SQLITE_FCNTL_CHUNK_SIZE: size hints
        for _ in range(6):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO big(v) VALUES (?)", [(rng.randbytes(40_000),) for _ in range(100)]
            )
            conn.execute("COMMIT")
        conn.execute("DELETE FROM big WHERE id % 3 = 0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        digest = conn.execute("SELECT count(*), sum(length(v)), total(id) FROM big").fetchone()
        hashes = hashlib.sha256(
            b"".join(row[0] for row in conn.execute("SELECT v FROM big ORDER BY id"))
        ).hexdigest()
        conn.execute(f"VACUUM INTO '{tmp_path / 'copy.db'}'")
    finally:
        conn.close()
    assert os.stat(db).st_size > 16 * MB
    copy = sqlite3.connect(tmp_path / "copy.db")
    try:
        copied = copy.execute("SELECT count(*), sum(length(v)), total(id) FROM big").fetchone()
        assert copied == digest
        got = hashlib.sha256(
            b"".join(row[0] for row in copy.execute("SELECT v FROM big ORDER BY id"))
        ).hexdigest()
        assert got == hashes
    finally:
        copy.close()


# --- python -m venv -----------------------------------------------------------------------

def build_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel (zip + dist-info), built without setuptools/wheel."""
    files = {
        "egwdemo/__init__.py": b"def main():\n    print('egw demo ok')\n",
        "egwdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: egwdemo\nVersion: 1.0\n",
        "egwdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        "egwdemo-1.0.dist-info/entry_points.txt": b"[console_scripts]\negw-demo = egwdemo:main\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("egwdemo-1.0.dist-info/RECORD,,")
    files["egwdemo-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / "egwdemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def test_python_venv_created_and_used_on_the_mount(d):
    venv = d / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    out = run(python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix != sys.prefix)")
    assert out.stdout.split() == [str(venv), "True"]
    # pip installs a local wheel into the venv on the mount (offline), with a console script.
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    wheel = build_wheel(d)
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", wheel,
        env=env)
    assert run(venv / "bin" / "egw-demo", env=env).stdout == "egw demo ok\n"
    # Byte-compiled files are written to the mount, then used.
    run(python, "-m", "compileall", "-q", venv / "lib", env=env)
    assert list((venv / "lib").rglob("egwdemo/__pycache__/*.pyc"))
    out = run(python, "-c", "import egwdemo; print(egwdemo.__file__, egwdemo.__cached__)", env=env)
    assert out.stdout.startswith(str(venv))
    run(sys.executable, "-m", "pip", "--python", python, "uninstall", "-q", "-y", "egwdemo",
        env=env)
    assert not (venv / "bin" / "egw-demo").exists()


# --- make ---------------------------------------------------------------------------------

MAKEFILE = """\
CFLAGS = -O2 -Wall -MMD
OBJS = main.o util.o
hello: $(OBJS)
\t$(CC) -o $@ $(OBJS)
-include $(OBJS:.o=.d)
clean:
\trm -f hello $(OBJS) $(OBJS:.o=.d)
"""


def test_make_c_program_and_incremental_rebuild(d):
    (d / "util.h").write_text("int answer(void);\n")
    (d / "util.c").write_text('#include "util.h"\nint answer(void) { return 42; }\n')
    (d / "main.c").write_text(
        '#include <stdio.h>\n#include "util.h"\n'
        'int main(void) { printf("answer %d\\n", answer()); return 0; }\n'
    )
    (d / "Makefile").write_text(MAKEFILE)
    run("make", "-j2", cwd=d)
    assert run(d / "hello").stdout == "answer 42\n"
    # Up to date: make decides from nanosecond mtimes read through the mount.
    assert run("make", "-q", "hello", cwd=d, check=False).returncode == 0
    (d / "util.c").write_text('#include "util.h"\nint answer(void) { return 43; }\n')
    out = run("make", cwd=d).stdout
    assert "util.c" in out and "main.c" not in out
    assert run(d / "hello").stdout == "answer 43\n"
    # A header change rebuilds both objects (dependency files written by gcc -MMD).
    os.utime(d / "util.h", ns=(os.stat(d / "util.o").st_mtime_ns + 10**9,) * 2)
    out = run("make", cwd=d).stdout
    assert "util.c" in out and "main.c" in out
    run("make", "clean", cwd=d)
    assert not (d / "hello").exists()


# --- copies -------------------------------------------------------------------------------


def test_cp_reflink_and_copy_file_range(tmp_path, d):
    data = random.Random(6).randbytes(3 * MB + 123)
    (tmp_path / "src").write_bytes(data)
    run("cp", "--reflink=auto", tmp_path / "src", d / "a")  # plain -> mount
    run("cp", "--reflink=auto", d / "a", d / "b")  # within the mount
    run("cp", "--reflink=auto", d / "b", tmp_path / "back")  # mount -> plain
    for path in (d / "a", d / "b", tmp_path / "back"):
        assert path.read_bytes() == data
    # A clone proper is impossible through FUSE (no FICLONE): it fails cleanly.
    result = run("cp", "--reflink=always", d / "a", d / "c", check=False)
    assert result.returncode != 0
    assert "not supported" in result.stderr.lower()
    assert (d / "a").read_bytes() == data
    # copy_file_range(2) works (the kernel falls back to a page-cache copy).
    src_fd = os.open(d / "a", os.O_RDONLY)
    dst_fd = os.open(d / "cfr", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        copied = 0
        while copied < len(data):
            n = os.copy_file_range(src_fd, dst_fd, len(data) - copied)
            assert n > 0
            copied += n
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert (d / "cfr").read_bytes() == data


def test_tar_xattrs_create_and_extract(tmp_path, d):
    tree = d / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "file").write_text("with xattrs\n")
    (tree / "plain-file").write_text("none\n")
    os.setxattr(tree / "dir" / "file", "user.mime_type", b"text/plain")
    os.setxattr(tree / "dir" / "file", "user.binary", bytes(range(1, 200)))
    os.setxattr(tree / "dir", "user.on-dir", b"d")
    os.setxattr(tree / "plain-file", "trusted.only-root", b"t")
    archive = tmp_path / "x.tar"
    run("tar", "--xattrs", "--xattrs-include=*", "--format=posix", "-cf", archive, "-C", tree, ".")
    for target in (tmp_path / "out", d / "out"):
        target.mkdir()
        run("tar", "--xattrs", "--xattrs-include=*", "-xpf", archive, "-C", target)
        assert_same(manifest(tree), manifest(target))
    assert xattrs(d / "out" / "dir" / "file")["user.mime_type"] == b"text/plain"


# --- fallocate ----------------------------------------------------------------------------


def test_fallocate_fails_cleanly_posix_fallocate_works(d):
    """pyfuse3 has no fallocate handler (docs/LIMITS.md): fallocate(1) gets EOPNOTSUPP
    and leaves the file intact; glibc's posix_fallocate falls back to writing zeros."""
    result = run("fallocate", "-l", "1M", d / "fa", check=False)
    assert result.returncode != 0 and "not supported" in result.stderr.lower()
    assert os.stat(d / "fa").st_size == 0
    (d / "keep").write_bytes(b"k" * 5000)
    result = run("fallocate", "--punch-hole", "-o", "0", "-l", "4096", d / "keep", check=False)
    assert result.returncode != 0
    assert (d / "keep").read_bytes() == b"k" * 5000
    fd = os.open(d / "pf", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"existing data", 70_000)
        os.posix_fallocate(fd, 0, 3 * MB + 5)
        assert os.fstat(fd).st_size == 3 * MB + 5
        os.posix_fallocate(fd, MB, 10)  # inside the file: no size change, no data change
        assert os.fstat(fd).st_size == 3 * MB + 5
        data = os.pread(fd, 4 * MB, 0)
    finally:
        os.close(fd)
    assert data[70_000:70_013] == b"existing data"
    assert data.count(0) == len(data) - 13


def test_fio_verify_jobs(d):
    """fio writes with verification headers (psync and mmap engines), then re-reads."""
    job = textwrap.dedent(
        f"""
        [global]
        directory={d}
        size=6m
        bs=4k
        verify=crc32c
        verify_fatal=1
        do_verify=1
        randrepeat=1
        randseed=1234
        fallocate=posix
        verify_state_save=0
        [psync-randwrite]
        ioengine=psync
        rw=randwrite
        [mmap-write]
        ioengine=mmap
        rw=write
        bs=64k
        """
    )
    (d / "job.fio").write_text(job)
    result = run("fio", "--output-format=json", d / "job.fio", cwd=d)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for jobres in report["jobs"]:
        assert jobres["error"] == 0, jobres["jobname"]
        assert jobres["write"]["io_bytes"] == 6 * MB

