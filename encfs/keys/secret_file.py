"""Files that hold a provider's secret (a key, a passphrase, a PIN, a token): opened so
that a planted FIFO cannot hang us, and refused unless private to their owner, as ssh
refuses a private key. Shared by the providers that read such files or hand one to a
library (a TLS client key).
"""

from __future__ import annotations

import os
import stat

from encfs.errors import KeyMissing, KeyPermissions, ProviderConfigError, key_source_error


def open_secret_file(
    path: str,
    what: str,
    *,
    blocking: bool = False,
    follow: bool = True,
    not_found: str | None = None,
) -> int:
    """Open a file that holds a secret, read-only; `what` names it in errors ("key
    file"). Not found or unreadable: KeyMissing (`not_found` when given says what to do)
    or KeyPermissions, in one line. `follow=False`: a symbolic link there is refused.

    Opened with O_NONBLOCK unless `blocking`, so a FIFO planted there cannot hang the
    open; the caller checks what it is (fstat) before reading a byte.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (0 if blocking else os.O_NONBLOCK)
    try:
        return os.open(path, flags | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        raise key_source_error(exc, f"{what} {path}", "readable", not_found=not_found) from None


def check_private(st: os.stat_result, path: str, what: str, *, owner: bool = True) -> None:
    """ssh's rule for a secret file: no access by group or others, and (`owner`) owned
    by this user or root. Raises KeyPermissions."""
    if st.st_mode & 0o077:
        raise KeyPermissions(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"it must not be accessible by group or others (chmod 600 {path})"
        )
    if owner and st.st_uid not in (os.geteuid(), 0):
        raise KeyPermissions(f"{what} {path} is owned by uid {st.st_uid}, not by this user")


def check_private_file(path: str, what: str) -> None:
    """A secret file that a library opens itself (a TLS client key): it can be opened
    (KeyMissing or KeyPermissions, as open_secret_file) and, when it is a regular file,
    no group or other may access it (check_private; any owner)."""
    fd = open_secret_file(path, what)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_ISREG(st.st_mode):
        check_private(st, path, what, owner=False)


def read_secret_file(path: str, what: str) -> str:
    """First line of a 0600 file (like ssh insists for private keys); no trailing newline.

    Opened with O_NONBLOCK, so a FIFO nobody writes to reads as empty instead of hanging.
    """
    fd = open_secret_file(path, f"{what} file")
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            check_private(st, path, f"{what} file", owner=False)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
            os.set_blocking(fd, True)  # a writer is there (else EOF at once): wait for it
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProviderConfigError(f"{what} file {path} is not UTF-8 text") from None
    line = text.split("\n", 1)[0].removesuffix("\r")
    if not line:
        raise KeyMissing(f"{what} file {path} is empty")
    return line
