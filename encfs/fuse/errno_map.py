"""One table from domain exceptions to errno, applied at one boundary (every handler).

Anything not in the table is logged with a traceback and becomes EIO: an exception
other than FUSEError escaping a pyfuse3 handler would kill the whole mount.
"""

from __future__ import annotations

import errno
import logging

from encfs.errors import (
    IntegrityError,
    KeyAccessError,
    KeyRevoked,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)

# Checked in order; the first matching class wins.
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (IntegrityError, errno.EIO),  # tampered/corrupt: EIO, never other data
    (KeyRevoked, errno.EKEYREVOKED),  # key revoked/disabled/destroyed
    (ProviderUnavailable, errno.ENOKEY),  # key provider unreachable
    (KeyAccessError, errno.ENOKEY),  # no key available for this volume
)


def errno_for(exc: BaseException) -> int:
    if isinstance(exc, OSError):
        # The daemon's own descriptor table is full (its cached handles and open files'
        # data descriptors already given back): the program's is not, so EMFILE would
        # tell it to close its own files.
        # ENFILE says a limit outside the program was reached, as the system-wide file
        # table's is (what ext4 gives when there is no room to open a file).
        if exc.errno == errno.EMFILE:
            return errno.ENFILE
        return exc.errno or errno.EIO
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    log.error("unexpected error in a filesystem handler", exc_info=exc)
    return errno.EIO
