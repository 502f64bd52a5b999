"""A Debian 12 container booted by systemd-nspawn with systemd as its PID 1, driven from
the host: the test tier in tests/container.

How (docs/systemd.md, "Tested under systemd"):

* The root is made once by `make setup` (scripts/container-root.sh: debootstrap minbase
  plus systemd, dbus, fuse3, python3) and cached in /var/cache/encfs-gw-test. Each test
  session boots a writable overlay of it (upper layer in a temporary directory), so the
  cached root never changes and nothing is copied.
* encfs-gw is installed the way `make install` does it, with no network inside: the host
  builds this work tree's wheel next to the cached dependency wheels, and inside the
  container `WHEELHOUSE=... sh systemd/install.sh install` (a first, non-booting
  `systemd-nspawn --pipe` run) makes the venv, the unit and the mount helper.
* `systemd-nspawn --boot --register=no --keep-unit --private-network --bind=/dev/fuse`:
  no machined or host systemd is needed (PID 1 here is not systemd), the container has
  only a loopback network, and FUSE works inside.
* Every command runs in the container through `nsenter --target <its PID 1> --all`, with
  a clean environment: `systemctl`, `journalctl`, `systemd-run`, `systemd-creds` and
  `encfs-gw` speak to the container's systemd as they would on a real machine.
* Stopping: SIGTERM to systemd-nspawn is a clean poweroff of the container (bounded),
  then the overlay is unmounted and its directory removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ENCFS_GW_TEST_CACHE", "/var/cache/encfs-gw-test"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 90.0
COMMAND_TIMEOUT = 120.0
SOURCE_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build",
                                       ".pytest_cache", ".ruff_cache", ".hypothesis", "results")


def cached_root() -> Path | None:
    """The Debian 12 root made by scripts/container-root.sh, if it is there."""
    roots = sorted(CACHE.glob("debian12-*/root"))
    return roots[-1] if roots else None


def cached_wheels() -> Path | None:
    """The dependency wheels made by scripts/container-root.sh for this pyproject.toml."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest().encode())
    digest.update(b"  pyproject.toml\n")
    digest.update(f"{tuple(sys.version_info[:2])}\n".encode())
    wheels = CACHE / f"wheels-{digest.hexdigest()[:12]}"
    return wheels if wheels.is_dir() else None


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something true; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class Container:
    def __init__(self, work: Path, root: Path, wheels: Path) -> None:
        self.work = work
        self.lower = root
        self.wheels = wheels
        self.merged = work / "root"
        self.name = f"encfs-gw-test-{os.getpid()}"
        self.nspawn: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.console = work / "console.log"

    # --- lifecycle ---------------------------------------------------------------------------

    def _nspawn(self, *extra: str) -> list[str]:
        return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                f"--directory={self.merged}", f"--machine={self.name}", "--bind=/dev/fuse",
                "--private-network", "--resolv-conf=off", "--timezone=off",
                "--link-journal=no", *extra]

    def create(self, before_boot: str = "") -> None:
        """The overlay over the cached root, encfs-gw installed in it, then the shell
        script `before_boot` run in it (all in one non-booting systemd-nspawn)."""
        for name in ("upper", "overlay-work", "root"):
            (self.work / name).mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.lower},upperdir={self.work / 'upper'},"
             f"workdir={self.work / 'overlay-work'}", str(self.merged)],
            check=True,
        )
        source = self.work / "src"
        shutil.copytree(REPO, source, ignore=SOURCE_IGNORE, symlinks=True)
        wheels = self.work / "wheels"
        shutil.copytree(self.wheels, wheels)
        subprocess.run(  # this work tree's encfs wheel, built offline
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
             "--find-links", str(self.wheels), "-w", str(wheels), str(source)],
            check=True, capture_output=True, timeout=COMMAND_TIMEOUT,
        )
        shutil.rmtree(source / "build", ignore_errors=True)
        done = subprocess.run(
            [*self._nspawn("--pipe", f"--bind-ro={source}:/usr/src/encfs-gw",
                           f"--bind-ro={wheels}:/opt/encfs-gw-wheels"),
             "/bin/sh", "-ec",
             "export PATH=" + PATH + "\n"
             "WHEELHOUSE=/opt/encfs-gw-wheels sh /usr/src/encfs-gw/systemd/install.sh install\n"
             "encfs-gw --version\n" + before_boot],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"installing encfs-gw in the container failed:\n{done.stdout}"
                               f"{done.stderr}")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """A file in the container's root, written from the host (before or after boot)."""
        target = self.merged / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def boot(self) -> None:
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                [*self._nspawn("--boot", "--console=pipe")],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            )
        self.pid1 = wait_until(self._find_pid1, BOOT_TIMEOUT, "the container's systemd")
        state = wait_until(self._booted, BOOT_TIMEOUT, "the container's boot")
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"the container booted {state}: {failed}")

    def _find_pid1(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}: "
                               f"{self.console.read_text(errors='replace')[-2000:]}")
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def _booted(self) -> str | None:
        done = self.run("systemctl", "is-system-running", check=False, timeout=10)
        state = done.stdout.strip()
        return state if state in ("running", "degraded") else None

    def stop(self) -> None:
        """Clean poweroff (SIGTERM to systemd-nspawn), bounded; then the overlay goes."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(30)
        if os.path.ismount(self.merged):
            subprocess.run(["umount", "--lazy", str(self.merged)], check=False)

    # --- commands inside ---------------------------------------------------------------------

    def command(self, *argv: str, env: dict[str, str] | None = None) -> list[str]:
        assert self.pid1 is not None, "the container is not booted"
        environment = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0", **(env or {})}
        return ["nsenter", f"--target={self.pid1}", "--all", "--root", "--wd",
                "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]

    def run(self, *argv: str, check: bool = True, input: str | None = None,
            timeout: float = COMMAND_TIMEOUT, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*argv, env=env), capture_output=True, text=True,
                              input=input, timeout=timeout, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"in the container, {' '.join(argv)} exited "
                                 f"{done.returncode}: {done.stdout}{done.stderr}")
        return done

    def sh(self, script: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return self.run("/bin/sh", "-ec", script, check=check, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*argv), **kwargs)

    # --- what systemd says -------------------------------------------------------------------

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        done = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def wait_for_unit(self, unit: str, timeout: float, **expected: str) -> dict[str, str]:
        """Poll `systemctl show` until every expected property has its value."""
        def matches() -> dict[str, str] | None:
            found = self.show(unit, *expected)
            return found if all(found.get(k) == v for k, v in expected.items()) else None

        try:
            return wait_until(matches, timeout, f"{unit} with {expected}", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; now {self.show(unit, *expected)}; journal:\n"
                                 f"{self.journal(unit)[-3000:]}") from None

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit,
                        check=False).stdout
