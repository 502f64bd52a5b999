"""The accelerated request loop (layer L5), fenced off from the FUSE adapter.

pyfuse3's own request loop (`pyfuse3.main()`, "the stock loop") is correct on any trio
and pyfuse3 it installs with. The accelerated loop is faster (loop.py: getxattr round
trip 34-39 -> 25-31 us, half the daemon CPU) because it replaces pyfuse3's module
attribute `trio` with a facade and reads trio's private run state
(`GLOBAL_RUN_CONTEXT`, `io_manager._epoll`, `task._next_send_fn`). A trio release may
change what those mean without an error, so this package runs only on the versions it
was validated on (VALIDATED): `unvalidated()` says why it must not run here, and the
daemon (encfs.daemon.request_loop) then serves with the stock loop.

Nothing in encfs.fuse imports this package: the daemon switches it on (`-o
request_loop=auto|accelerated|stock`). This module imports only pyfuse3 and trio (for
their versions); `session.AcceleratedLoop` brings in the rest:
- `loop`: the facade (RequestLock, the ReadyWaiter with its idle wait and busy-poll),
  and `run_in_thread`, which tells the busy-poll a worker thread is in flight;
- `warm`, `spinner`: the CPU warmer, fed by the ReadyWaiter before every request;
- `cpu_policy`: when the warmer and the busy-poll may spin;
- `session`: the three together, as the daemon runs them.
"""

from __future__ import annotations

from collections.abc import Mapping

# The versions the accelerated loop was validated on: the test suite (tests/unit,
# tests/fs, tests/integration) and `make bench` ran on them. Add a version here only
# after the same on it.
VALIDATED: dict[str, tuple[str, ...]] = {
    "trio": ("0.35.0",),
    "pyfuse3": ("3.5.0",),
}


def installed_versions() -> dict[str, str]:
    """The versions of trio and pyfuse3 this process runs with (their own `__version__`:
    what is imported, whatever the package metadata says)."""
    import pyfuse3
    import trio

    return {
        "trio": str(getattr(trio, "__version__", "unknown")),
        "pyfuse3": str(getattr(pyfuse3, "__version__", "unknown")),
    }


def validated_versions() -> str:
    """The validated versions, for messages: "trio 0.35.0, pyfuse3 3.5.0"."""
    return ", ".join(f"{name} {' or '.join(versions)}" for name, versions in VALIDATED.items())


def unvalidated(versions: Mapping[str, str] | None = None) -> str | None:
    """Why the accelerated loop must not run with `versions` (default: the installed
    ones), or None when every one of them was validated."""
    versions = installed_versions() if versions is None else versions
    wrong = [
        f"{name} {versions.get(name, 'unknown')}"
        for name, allowed in VALIDATED.items()
        if versions.get(name) not in allowed
    ]
    if not wrong:
        return None
    return (
        f"{' and '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not validated for the "
        f"accelerated request loop (validated: {validated_versions()})"
    )
