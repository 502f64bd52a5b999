"""Key bytes kept out of Python's heap (layer L1: memory and the kernel's random
source only, no files).

Python cannot zero an immutable `bytes`, and the heap reuses freed blocks without
clearing them, so a key that ever was a `bytes` object may stay in memory long after its
last use. The keyring therefore keeps its keys in a `SecretArena`: anonymous private
mappings of its own that are

* locked in RAM (mlock) where the memlock limit allows, so they are never swapped out
  (`locked` says whether it worked; unprivileged users get 8 MiB by default);
* excluded from core dumps (MADV_DONTDUMP), though encfs-gw processes dump no core;
* zeroed in a child after fork (MADV_WIPEONFORK), so the background daemon's parent and
  any forked helper never carry copies;
* zeroed by `wipe()` (revocation, unmount).

Keys live there as memoryview slices, which pyca/cryptography takes wherever it takes a
key. What pyca and OpenSSL copy from them (key schedules in cipher contexts) lives until
the cipher object is freed; OpenSSL clears it then (OPENSSL_clear_free), which is why the
keyring drops its cipher objects when it wipes (measured in
tests/integration/test_key_memory.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

PAGE_SIZE = mmap.PAGESIZE
MADV_WIPEONFORK = 18  # <linux/mman.h>; Python's mmap module lacks the constant

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def zero(buffer: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer with zeros, in place (a slice assignment of the same
    length writes into the existing buffer; it costs 0.5 us where a ctypes memset costs
    9 us, and it is on the data path)."""
    if isinstance(buffer, bytearray):
        buffer[:] = bytes(len(buffer))
        return
    view = buffer.cast("B") if buffer.format != "B" else buffer
    view[:] = bytes(len(view))


_urandom_fd: int | None = None


def random_into(buffer: bytearray | memoryview) -> None:
    """Fill a mutable buffer from the kernel's CSPRNG with no copy: read from
    /dev/urandom straight into it (os.urandom would hand back an immutable `bytes`)."""
    global _urandom_fd
    if _urandom_fd is None:
        _urandom_fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    got = os.readv(_urandom_fd, [buffer])
    if got != len(buffer):  # /dev/urandom never returns short for reads this size
        view = memoryview(buffer).cast("B")
        while got < len(view):
            more = os.readv(_urandom_fd, [view[got:]])
            if more <= 0:
                raise OSError("short read from /dev/urandom")
            got += more


class _Chunk:
    __slots__ = ("address", "locked", "map", "size", "used", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for advice in (mmap.MADV_DONTDUMP, MADV_WIPEONFORK):
            with contextlib.suppress(OSError):  # an older kernel: still zeroed on wipe
                self.map.madvise(advice)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.locked = _libc.mlock(self.address, size) == 0
        self.view = memoryview(self.map)
        self.used = 0


class SecretArena:
    """A growing set of locked private pages that hand out key buffers (memoryviews)."""

    def __init__(self, chunk_size: int = PAGE_SIZE) -> None:
        self._chunk_size = chunk_size
        self._chunks: list[_Chunk] = []
        self.wiped = False

    @property
    def locked(self) -> bool:
        """Every page is locked in RAM (False where the memlock limit refused)."""
        return all(chunk.locked for chunk in self._chunks)

    def take(self, size: int) -> memoryview:
        """A zeroed buffer of `size` bytes, valid until wipe() (then zeros)."""
        if self.wiped:
            raise ValueError("the secret arena was wiped")
        chunk = self._chunks[-1] if self._chunks else None
        if chunk is None or chunk.size - chunk.used < size:
            pages = -(-size // self._chunk_size)
            chunk = _Chunk(pages * self._chunk_size)
            self._chunks.append(chunk)
        view = chunk.view[chunk.used : chunk.used + size]
        chunk.used += size
        return view

    def store(self, key: bytes | bytearray | memoryview) -> memoryview:
        """A copy of `key` in the arena; a bytearray given is zeroed (the arena owns it)."""
        view = self.take(len(key))
        view[:] = key
        if isinstance(key, bytearray):
            zero(key)
        return view

    def wipe(self) -> None:
        """Zero every page and unlock it. Views handed out read zeros from now on."""
        for chunk in self._chunks:
            zero(chunk.view)
            if chunk.locked:
                _libc.munlock(chunk.address, chunk.size)
                chunk.locked = False
        self.wiped = True
