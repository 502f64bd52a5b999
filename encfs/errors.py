"""The exception hierarchy of encfs-gw and its exit codes (layer L0: imports nothing
from encfs).

Every user-facing error carries a stable exit code and a one-line message; the CLI
prints the message and exits with the code, never a traceback. This module is the one
table of exit codes: every class that sets its own code (`class X(EncfsError, code=N)`,
which becomes `X.exit_code`) is defined here (a test checks that no other module sets
one, and that no two classes share a code), and `exit_codes()` lists them with the
codes no exception stands for. docs/EXITCODES.md is generated from it
(`scripts/exitcodes.py`); codes are never reused for another meaning.
"""

from __future__ import annotations

SUCCESS = 0
INTERRUPTED = 130  # the shell's code for SIGINT: a Ctrl-C ends a command with it
# Codes no exception class stands for, with their meaning.
OTHER_EXIT_CODES = {
    SUCCESS: "success",
    INTERRUPTED: "interrupted (Ctrl-C)",
}


class EncfsError(Exception):
    """An unexpected internal error (its traceback is printed), an error reply of a
    daemon that named no code, or `rotate` left DEKs under older KEK versions (see its
    warnings; run it again)."""

    exit_code = 1

    def __init_subclass__(cls, code: int | None = None, **kwargs: object) -> None:
        # The code is a class keyword, so a class states its code on its first line.
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.exit_code = code


class UsageError(EncfsError, code=2):
    """The command line is wrong (bad arguments, a bad block size, a non-empty directory
    for `init`)."""


class NotAVolume(EncfsError, code=10):
    """The backing directory is missing or holds no encfs-gw volume."""


class UnsupportedFormat(EncfsError, code=11):
    """The volume has a newer/unknown format version or an unknown feature flag."""


class ConfigError(EncfsError, code=12):
    """The volume config is unreadable or corrupt."""


class ConfigAuthError(EncfsError, code=19):
    """The volume config failed authentication, is older than one already seen (rolled
    back), belongs to another volume than the one known at this path (replaced), holds a
    volume key other than the one the operator pinned, or predates config authentication
    (`encfs-gw upgrade` first). Nothing the config names was run, loaded or contacted."""


class VolumeExists(EncfsError, code=13):
    """`init` refuses to overwrite an existing volume or key file."""


class VolumeBusy(EncfsError, code=14):
    """The volume is already in use (its lock is held by another process: mounted), or
    its lock cannot be taken (ENOLCK, e.g. NFS without a lock manager); a directory
    `convert` has not finished; a volume whose `reencrypt` pass is not finished (run
    encfs-gw reencrypt BACKING, or mount it)."""


class MountpointError(EncfsError, code=15):
    """The mountpoint is missing, not a directory, not empty or already mounted."""


class MountFailed(EncfsError, code=16):
    """The kernel refused the FUSE mount, the daemon could not be started (fork), it
    died before the mount was live, or `-o request_loop=accelerated` was asked for on a
    trio or pyfuse3 version the accelerated request loop was not validated on."""


class NotMounted(EncfsError, code=17):
    """`unmount` was given a path that is not an encfs-gw mount, or no daemon answers
    for the volume."""


class ControlSocketError(EncfsError, code=27):
    """The control channel to a daemon is not safe or was refused: its runtime directory
    cannot be made private, the socket is not served by the volume's daemon (peer
    credentials), the daemon refused this user, or its reply was malformed."""


class KeyAccessError(EncfsError, code=20):
    """Any other failure to obtain a KEK from a key provider (the base class of codes
    21-26; never shadow the builtin KeyError)."""


class WrongKey(KeyAccessError, code=21):
    """The key (or passphrase) does not open this volume."""


class KeyMissing(KeyAccessError, code=22):
    """The key material is not where the volume says (key file or credential missing)."""


class KeyPermissions(KeyAccessError, code=23):
    """A key file is readable by group or others; refused like ssh does."""


class KeyRevoked(KeyAccessError, code=24):
    """The provider says the key is revoked, disabled, destroyed or access is denied."""


class ProviderUnavailable(KeyAccessError, code=25):
    """The provider could not be reached within its timeout (transient)."""


class ProviderConfigError(KeyAccessError, code=26):
    """The provider spec or its configuration is wrong, or its extra is not installed."""


def key_source_error(
    exc: OSError, source: str, allowed: str, *, failed: str = "", not_found: str | None = None
) -> KeyAccessError:
    """The one-line error for `exc`, raised on opening or starting what a key comes from
    (`source`: "key file /etc/k", "command /usr/bin/x"): not there is KeyMissing
    (`not_found` when given), not `allowed` ("readable") to this user KeyPermissions,
    anything else KeyMissing with the system's reason (after `failed`)."""
    if isinstance(exc, FileNotFoundError):
        return KeyMissing(not_found or f"{source} not found")
    if isinstance(exc, PermissionError):
        return KeyPermissions(f"{source} is not {allowed} by this user")
    return KeyMissing(f"{source}{failed}: {exc.strerror}")


class NotVouched(EncfsError, code=29):
    """No key provider for this volume is vouched for by the operator: none named on the
    command line (--keyfile, --provider) and none in the trust store for this volume; or
    an operation needs a keyslot the operator has not vouched for on this host."""


class TrustStoreError(EncfsError, code=28):
    """The operator's trust store cannot be read or written safely (ownership, mode)."""


class AuditError(EncfsError, code=18):
    """The audit log cannot be written and `-o audit_required` was given."""


class NotEnoughSpace(EncfsError, code=32):
    """`convert` refused: the filesystem lacks the free space (or inodes) the conversion
    needs (the format's overhead for the tree, the largest file in flight, a margin), or
    it filled up while converting (what was in flight stays plaintext)."""


class CannotConvert(EncfsError, code=33):
    """`convert` refused: the tree holds something a volume cannot keep (the xattrs of a
    FIFO, socket or device over 3,584 bytes as a sealed set, a POSIX ACL without
    --drop-acls, an entry this user cannot read or give its owner, a tree nested deeper
    than the open-file limit allows), or the directory cannot hold a volume (no user
    xattrs, no O_TMPFILE)."""


class IntegrityError(EncfsError, code=30):
    """Ciphertext, a key record or a header failed authentication or validation.

    Reads give EIO for the affected block; never other data.
    """


class FsckProblems(EncfsError, code=31):
    """fsck found problems that remain (not repaired, or not repairable)."""


def _error_classes(base: type[EncfsError] = EncfsError) -> list[type[EncfsError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found


def _meaning(cls: type) -> str:
    """A class's docstring as one paragraph of text."""
    return " ".join((cls.__doc__ or "").split())


def exit_codes() -> dict[int, tuple[str, str]]:
    """code -> (exception class name, or "" for none; meaning), in code order: the
    classes of this module that set their own `exit_code`, and OTHER_EXIT_CODES."""
    table: dict[int, tuple[str, str]] = {
        code: ("", meaning) for code, meaning in OTHER_EXIT_CODES.items()
    }
    for cls in _error_classes():
        if "exit_code" in vars(cls) and cls.__module__ == __name__:
            table[cls.exit_code] = (cls.__name__, _meaning(cls))
    return dict(sorted(table.items()))
