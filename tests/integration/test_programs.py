"""Real programs against the mount: tar, cp -a, diff -r, git, sqlite3.

Each test works on its own fresh volume, checks the result with the programs' own
verifiers (diff -r, git fsck, PRAGMA integrity_check) and a Python manifest (types,
modes, sizes, nanosecond mtimes, link targets, hard-link structure, SHA-256), then
unmounts, remounts the same volume and checks again. All inputs are deterministic.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.mount import mounted

pytestmark = pytest.mark.fuse

TIMEOUT = 120
MB = 1024 * 1024
SOURCE_PACKAGE = Path(__file__).resolve().parents[2] / "encfs"


def run(*args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    )
    return result.stdout


# --- a deterministic source tree ----------------------------------------------------------

LONG_ASCII = "n" * 255
LONG_UTF8 = "é" * 127 + "x"  # 255 bytes
FIXED_MTIME_NS = 1_700_000_000_123_456_789


def build_tree(root: Path) -> None:
    rng = random.Random(42)
    shutil.copytree(
        SOURCE_PACKAGE,
        root / "encfs",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    gen = root / "gen"
    (gen / "a" / "b" / "c" / "d" / "e" / "f").mkdir(parents=True)
    (gen / "a" / "b" / "c" / "d" / "e" / "f" / "deep.txt").write_text("deep\n")
    (gen / "empty-dir").mkdir()
    (gen / "empty-file").write_bytes(b"")
    (gen / "big.bin").write_bytes(rng.randbytes(5 * MB))
    for size in (16383, 16384, 16385, 524288, 524289):
        (gen / f"size-{size}").write_bytes(rng.randbytes(size))
    with open(gen / "sparse", "wb") as f:  # 3 MB with a hole in the middle
        f.write(b"start")
        f.seek(3 * MB - 3)
        f.write(b"end")
    (gen / "with space").mkdir()
    (gen / "with space" / " lead and trail .txt ").write_text("spaces\n")
    (gen / "ünïcödé 日本語").mkdir()
    (gen / "ünïcödé 日本語" / "ファイル 🎉.txt").write_text("unicode ✓\n")
    (gen / "quote'\"and\\back").write_text("quotes\n")
    (gen / "tab\tand\nnewline").write_text("control chars\n")
    (gen / LONG_ASCII).write_text("255 ascii bytes\n")
    (gen / LONG_UTF8).mkdir()
    (gen / LONG_UTF8 / LONG_ASCII).write_bytes(rng.randbytes(20000))
    (gen / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(gen / "exec.sh", 0o755)
    (gen / "private").write_text("0600\n")
    os.chmod(gen / "private", 0o600)
    (gen / "private-dir").mkdir(mode=0o700)
    (gen / "hard1").write_bytes(rng.randbytes(70000))
    os.link(gen / "hard1", gen / "private-dir" / "hard2")
    os.symlink("a/b/c/d/e/f/deep.txt", gen / "link-rel")
    os.symlink("a/b", gen / "link-dir")
    os.symlink("/nonexistent/absolute/target", gen / "link-abs-dangling")
    os.symlink("missing-" + "m" * 200, gen / "link-dangling-long")
    os.symlink("../" + LONG_ASCII, gen / "a" / "link-up")
    # Fixed times everywhere (children before parents), so ns mtimes can be compared.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(
                os.path.join(dirpath, name),
                ns=(FIXED_MTIME_NS, FIXED_MTIME_NS),
                follow_symlinks=False,
            )
    os.utime(root, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("programs-src") / "tree"
    root.mkdir()
    build_tree(root)
    return root


def manifest(root: Path, mtimes: bool = True, modes: bool = True) -> dict[str, tuple]:
    """Everything diff -r does not compare: types, modes, times, link structure."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            detail: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    detail = hashlib.sha256(f.read()).hexdigest()
                # Hard links: name the first path of the inode (walk order is sorted).
                detail = (detail, inodes.setdefault(st.st_ino, rel), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            mtime = st.st_mtime_ns if mtimes and not stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            mode = st.st_mode if modes else stat.S_IFMT(st.st_mode)
            out[rel] = (stat.filemode(mode), st.st_uid, st.st_gid, size, mtime, detail)
    return out


def assert_same_tree(a: Path, b: Path, mtimes: bool = True, modes: bool = True) -> None:
    run("diff", "-r", "--no-dereference", a, b)
    left, right = manifest(a, mtimes, modes), manifest(b, mtimes, modes)
    assert sorted(left) == sorted(right)
    for rel in left:
        assert left[rel] == right[rel], rel


# --- tar and cp -a ------------------------------------------------------------------------


def test_tar_extract_then_diff(tmp_path, volume, source_tree):
    archive = tmp_path / "tree.tar"
    run("tar", "--format=posix", "-cf", archive, "-C", source_tree, ".")
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "x").mkdir()
        run("tar", "-xpf", archive, "-C", mnt / "x")
        assert_same_tree(source_tree, mnt / "x")
        # And back out of the mount: an archive of the mounted copy extracts the same.
        run("tar", "--format=posix", "-cf", tmp_path / "again.tar", "-C", mnt / "x", ".")
    (tmp_path / "again").mkdir()
    run("tar", "-xpf", tmp_path / "again.tar", "-C", tmp_path / "again")
    assert_same_tree(source_tree, tmp_path / "again")
    with mounted(volume, tmp_path / "mnt") as mnt:
        assert_same_tree(source_tree, mnt / "x")


def test_cp_a_then_diff_and_back(tmp_path, volume, source_tree):
    """cp -a in and out: contents, times, owners, links."""
    with mounted(volume, tmp_path / "mnt") as mnt:
        run("cp", "-a", source_tree, mnt / "copy")
        assert_same_tree(source_tree, mnt / "copy", modes=False)
        run("cp", "-a", mnt / "copy", tmp_path / "back")
        assert_same_tree(source_tree, tmp_path / "back", modes=False)
        # A second cp -a over the existing copy (overwrites in place, same result).
        run("cp", "-a", f"{source_tree}/.", mnt / "copy")
        assert_same_tree(source_tree, mnt / "copy", modes=False)


def test_cp_a_preserves_modes(tmp_path, mnt):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True, mode=0o755)
    os.chmod(src / "dir", 0o755)
    (src / "dir" / "file").write_text("x")
    os.chmod(src / "dir" / "file", 0o644)
    (src / "exec").write_text("#!/bin/sh\n")
    os.chmod(src / "exec", 0o755)
    run("cp", "-a", src, mnt / "copy")
    got = {
        rel: oct(os.stat(mnt / "copy" / rel).st_mode & 0o7777)
        for rel in ("dir", "dir/file", "exec")
    }
    assert got == {"dir": "0o755", "dir/file": "0o644", "exec": "0o755"}


# --- git ----------------------------------------------------------------------------------


def git_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.invalid",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.invalid",
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+00:00",
        "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+00:00",
        "LC_ALL": "C",
    }


def git(env: dict[str, str], cwd: Path, *args: str | os.PathLike) -> str:
    config = [
        "-c",
        "init.defaultBranch=main",
        "-c",
        "gc.auto=0",
        "-c",
        "protocol.file.allow=always",
        "-c",
        "commit.gpgSign=false",
    ]
    return run("git", *config, *args, cwd=cwd, env=env)


def make_history(env: dict[str, str], repo: Path, commits: int) -> None:
    """A deterministic history: text edits, binaries, renames, deletions, a branch, a tag."""
    rng = random.Random(commits)
    git(env, repo, "init", "-q")
    for i in range(commits):
        (repo / "notes.txt").write_text("".join(f"line {j} of commit {i}\n" for j in range(i + 1)))
        (repo / "dir" / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        blob = rng.randbytes(rng.randint(0, 40000))
        (repo / "dir" / f"sub{i % 3}" / f"f{i}.bin").write_bytes(blob)
        moving = Path(f"dir/sub{(i - 3) % 3}/f{i - 3}.bin")
        if i % 4 == 3 and (repo / moving).exists():
            git(env, repo, "mv", moving, f"moved-{i}.bin")
        removing = Path(f"dir/sub{(i - 1) % 3}/f{i - 1}.bin")
        if i % 5 == 4 and (repo / removing).exists():
            git(env, repo, "rm", "-q", removing)
        git(env, repo, "add", "-A")
        git(env, repo, "commit", "-q", "-m", f"commit {i}")
        if i == commits // 2:
            git(env, repo, "tag", "-a", "-m", "halfway", "v0.5")
            git(env, repo, "branch", "side")
    git(env, repo, "checkout", "-q", "side")
    (repo / "side.txt").write_text("on the side branch\n")
    git(env, repo, "add", "side.txt")
    git(env, repo, "commit", "-q", "-m", "side work")
    git(env, repo, "checkout", "-q", "main")
    git(env, repo, "merge", "-q", "--no-ff", "-m", "merge side", "side")


def repo_state(env: dict[str, str], repo: Path) -> tuple[str, ...]:
    return (
        git(env, repo, "rev-parse", "HEAD", "side", "v0.5"),
        git(env, repo, "log", "--all", "--format=%H %s"),
        git(env, repo, "ls-tree", "-r", "HEAD"),
    )


def check_repo(env: dict[str, str], repo: Path) -> None:
    git(env, repo, "fsck", "--full", "--strict", "--no-progress")
    assert git(env, repo, "status", "--porcelain", "--untracked-files=all") == ""


COMMITS = 5


def test_git_init_commit_clone_gc_fsck(tmp_path, volume):
    env = git_env(tmp_path)
    plain = tmp_path / "plain-repo"
    plain.mkdir()
    make_history(env, plain, COMMITS)
    expected = repo_state(env, plain)
    with mounted(volume, tmp_path / "mnt") as mnt:
        # The same history made directly on the mount gives the very same hashes.
        (mnt / "repo").mkdir()
        make_history(env, mnt / "repo", COMMITS)
        assert repo_state(env, mnt / "repo") == expected
        check_repo(env, mnt / "repo")
        assert len(git(env, mnt / "repo", "log", "--oneline").splitlines()) == COMMITS + 2
        # Clone from the mount to a plain directory ...
        git(env, tmp_path, "clone", "-q", "--no-local", mnt / "repo", tmp_path / "out")
        check_repo(env, tmp_path / "out")
        assert git(env, tmp_path / "out", "rev-parse", "HEAD") == expected[0].split()[0] + "\n"
        # ... and that plain clone back into the mount.
        git(env, tmp_path, "clone", "-q", "--no-local", tmp_path / "out", mnt / "back")
        check_repo(env, mnt / "back")
        assert git(env, mnt / "back", "rev-parse", "HEAD") == expected[0].split()[0] + "\n"
        # ... and a plain repository with history into the mount, then gc and fsck.
        git(env, tmp_path, "clone", "-q", "--no-local", plain, mnt / "clone")
        git(env, mnt / "clone", "fetch", "-q", "origin", "side:side")
        git(env, mnt / "clone", "gc", "-q", "--prune=now")
        check_repo(env, mnt / "clone")
        assert repo_state(env, mnt / "clone") == expected
        git(env, mnt / "clone", "checkout", "-q", "v0.5")
        git(env, mnt / "clone", "checkout", "-q", "main")
        check_repo(env, mnt / "clone")
        git(env, mnt / "repo", "gc", "-q", "--prune=now")
        check_repo(env, mnt / "repo")
    with mounted(volume, tmp_path / "mnt") as mnt:
        for repo in ("repo", "clone"):
            check_repo(env, mnt / repo)
            assert repo_state(env, mnt / repo) == expected


# --- sqlite -------------------------------------------------------------------------------

ROWS_PER_TX = 300
TRANSACTIONS = 4


def sqlite_cli(db: Path, *commands: str) -> str:
    return run("sqlite3", "-batch", "-bail", db, *commands)


def insert_sql(tx: int) -> str:
    return (
        "BEGIN;"
        f"INSERT INTO t(k, v) SELECT 'key-' || x || '-' || {tx}, printf('%0300d', x * {tx + 1}) "
        "FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        f"WHERE x < {ROWS_PER_TX}) SELECT x FROM c);"
        "COMMIT;"
    )


def build_db(db: Path, journal: str) -> None:
    assert sqlite_cli(db, f"PRAGMA journal_mode={journal};").strip() == journal
    # Many transactions in one process, then updates, a rollback and VACUUM (which
    # rewrites the whole database through a temp file) in a second one.
    sqlite_cli(
        db,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT UNIQUE, v TEXT);"
        + "".join(insert_sql(tx) for tx in range(TRANSACTIONS)),
    )
    sqlite_cli(
        db,
        "BEGIN; UPDATE t SET v = upper(k) WHERE id % 7 = 0;"
        "DELETE FROM t WHERE id % 11 = 0; COMMIT;"
        "BEGIN; INSERT INTO t(k, v) VALUES ('rolled back', 'x'); ROLLBACK;"
        "CREATE INDEX tv ON t(v); VACUUM;" + insert_sql(99),
    )


def db_state(db: Path) -> tuple[str, str]:
    """(integrity_check, summary + full dump) in one sqlite3 run."""
    out = sqlite_cli(
        db, "PRAGMA integrity_check; SELECT count(*), sum(length(v)), total(id) FROM t;", ".dump"
    )
    check, rest = out.split("\n", 1)
    return check, rest


def wal_with_concurrent_reader(path: Path) -> tuple:
    """WAL with its shared-memory index on the mount: a reader keeps its snapshot."""
    writer = sqlite3.connect(path, isolation_level=None)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
        writer.execute("PRAGMA synchronous=FULL")
        writer.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        rng = random.Random(5)
        for _ in range(10):
            writer.execute("BEGIN")
            writer.executemany(
                "INSERT INTO t(v) VALUES (?)", [(rng.randbytes(500),) for _ in range(100)]
            )
            writer.execute("COMMIT")
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
        writer.execute("DELETE FROM t WHERE id <= 500")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1000  # snapshot
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 500
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
        assert writer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return writer.execute("SELECT sum(length(v)), total(id) FROM t").fetchone()
    finally:
        reader.close()
        writer.close()


def test_sqlite_rollback_journal_wal_and_concurrent_reader(tmp_path, volume):
    journals = ("delete", "wal")
    expected = {}
    for journal in journals:  # the same work on a plain directory gives the reference
        plain = tmp_path / f"plain-{journal}.db"
        build_db(plain, journal)
        expected[journal] = db_state(plain)
        assert expected[journal][0] == "ok"
    with mounted(volume, tmp_path / "mnt") as mnt:
        for journal in journals:
            build_db(mnt / f"{journal}.db", journal)
            assert db_state(mnt / f"{journal}.db") == expected[journal]
        assert not (mnt / "delete.db-journal").exists()
        digest = wal_with_concurrent_reader(mnt / "py.db")
        assert not (mnt / "py.db-wal").exists()  # the last close checkpointed and removed it
    with mounted(volume, tmp_path / "mnt") as mnt:
        for journal in journals:
            assert db_state(mnt / f"{journal}.db") == expected[journal]
            assert sqlite_cli(mnt / f"{journal}.db", "PRAGMA journal_mode;").strip() == journal
        conn = sqlite3.connect(mnt / "py.db")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT sum(length(v)), total(id) FROM t").fetchone() == digest
        finally:
            conn.close()
