"""Process hygiene (layer L0: stdlib only): how processes that hold secrets protect them,
and what the processes they start are given.

* `protect_secrets()`: every encfs-gw process that unwraps a key or reads a secret (the
  daemon, and every CLI verb) is not dumpable and has a core limit of 0 (soft and hard).
  Not dumpable means another process of the same uid cannot ptrace it or read its
  /proc/PID/mem, environ, maps or fds: the kernel then owns those files as root. Only
  root (CAP_SYS_PTRACE) still can.
* Helpers (the unmount guard, the CPU warmer's spinner) need nothing from our
  environment: they get `helper_environment()`, a fixed PATH and locale, and make
  themselves not dumpable first thing (exec resets the flag).
* Key-provider children (`command`, tpm2-tools) get `provider_environment()`: ours less
  every secret encfs-gw knows of (SECRET_ENV_NAMES, the AWS credential variables and the
  variables a `passphrase:env:VAR` spec reads), and run with umask CHILD_UMASK.
"""

from __future__ import annotations

import ctypes
import os
import resource

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

# Files a provider child creates are its own: private to its uid (0o077), never the
# daemon's umask 0 (which the daemon needs so backing objects get exactly the modes the
# kernel passes it).
CHILD_UMASK = 0o077

# Secrets the providers read from the environment (pkcs11: the PIN; vault: the token).
SECRET_ENV_NAMES = frozenset({"ENCFS_PKCS11_PIN", "VAULT_TOKEN"})
# Everything of the AWS credential chain that is or carries a credential.
SECRET_ENV_PREFIXES = ("AWS_SECRET", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                       "AWS_ACCESS_KEY", "AWS_CONTAINER_AUTHORIZATION_TOKEN")
HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_registered: set[str] = set()


def register_secret_env(name: str) -> None:
    """One more variable never passed to a child (a passphrase:env:VAR variable)."""
    _registered.add(name)


def is_secret_env(name: str) -> bool:
    return name in SECRET_ENV_NAMES or name in _registered or name.startswith(
        SECRET_ENV_PREFIXES
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def protect_secrets() -> None:
    """Not dumpable and no core files, for this process from now on.

    Kept across fork (the daemon is a fork of the CLI); exec resets it, so a program we
    start must do it itself if it holds anything (our helpers do).
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def is_dumpable() -> bool:
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def helper_environment() -> dict[str, str]:
    """All a helper of ours needs: where programs are and a UTF-8 locale."""
    return {"PATH": HELPER_PATH, "LC_ALL": "C.UTF-8"}


def provider_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment less every secret we know of, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not is_secret_env(name)}
    env.update(extra or {})
    return env


# Python source run first by helper interpreters (`python -I -c`): not dumpable before
# anything else (a helper holds no secret, but its fds and memory are the daemon's
# business), and no core files.
HELPER_PRELUDE = (
    "import ctypes, resource\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    f"ctypes.CDLL(None).prctl({PR_SET_DUMPABLE}, 0, 0, 0, 0)\n"
)
