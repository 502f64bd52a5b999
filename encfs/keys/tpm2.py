"""The `tpm2` provider: a TPM 2.0 seals the secret that protects the KEK.

SPEC: `tpm2[:OPTION,...]` with options
    tcti=TCTI        how to reach the TPM, as for tpm2-tools (TPM2TOOLS_TCTI); e.g.
                     device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321. Default: the
                     TPM2TOOLS_TCTI environment variable, else tpm2-tools' own default.
    pcrs=N[+N...]    bind to the current values of these SHA-256 PCRs (e.g. pcrs=7 or
                     pcrs=0+7, as systemd-cryptenroll writes them). Default: no PCRs.
    timeout=SECONDS  bound on one protect/recover (default 30).
Commas inside the tcti value are fine: a piece that does not start with a known
`option=` continues the previous value (so `pcrs=0,7` works as well).

protect() makes a random 256-bit secret, seals it to the TPM as a keyedhash object
under the owner hierarchy's primary ECC key (re-derived on each use from the TPM's
seed, so nothing is made persistent), with a PolicyPCR policy when PCRs are chosen, and
seals the KEK under that secret with AES-256-GCM (binding as AAD). The record holds the
sealed object's public and private blobs: not secret, only this TPM can load them.

It drives the tpm2-tools CLI (Debian: tpm2-tools; libtss2-tcti-swtpm0 for swtpm). There
may be no resource manager (swtpm, /dev/tpm0), so every transient object and session
is flushed after each tool call; do not share such a TPM with other users at once.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import tempfile
import time
from typing import Any

from encfs import crypto, hygiene
from encfs.errors import (
    KeyAccessError,
    KeyPermissions,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 3600.0
PCR_BANK = "sha256"
MAX_PCR = 23
# An explicit primary template so a tpm2-tools upgrade that changes its defaults cannot
# change the primary key (and make old records unloadable).
PRIMARY = {
    "hierarchy": "o",
    "alg": "ecc256:aes128cfb",
    "attributes": "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
}
SEAL_ATTRS_POLICY = "fixedtpm|fixedparent"  # no userwithauth: only the PCR policy unseals
_KEYS = ("tcti", "pcrs", "timeout")
_USAGE = "tpm2[:tcti=TCTI][,pcrs=N+N...][,timeout=SECONDS]"

# TPM 2.0 response codes (TCG Part 2, 6.6), format-1 codes without handle/param bits.
RC_INITIALIZE = 0x100
RC_AUTH_UNAVAILABLE = 0x12F
RC_PCR = 0x127
RC_AUTH_FAIL = 0x08E
RC_BAD_AUTH = 0x0A2
RC_POLICY_FAIL = 0x09D
RC_OBJECT_MEMORY = 0x902
RC_SESSION_MEMORY = 0x903
RC_LOCKOUT = 0x921
RC_PCR_CHANGED = 0x928
_TRANSIENT = {0x908, 0x909, 0x90A, 0x920, 0x922, 0x923, RC_PCR_CHANGED}  # yielded..retry
TCTI_LAYER = 0x0A
_ERRCODE = re.compile(r"ErrorCode \(0x([0-9a-fA-F]+)\)|\(0x([0-9a-fA-F]+)\) - ")


def _tpm_code(rc: int) -> int:
    """Strip the handle/parameter/session number from a format-1 response code."""
    return 0x080 | (rc & 0x3F) if rc & 0x080 else rc & 0xFFF


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    described = [ln for ln in lines if ln.startswith("ERROR:") and " - " in ln]
    line = (described or [ln for ln in lines if ln.startswith("ERROR")] or lines or [""])[-1]
    return line.removeprefix("ERROR:").strip()[:200]


def classify(tool: str, stderr: str, default: type[KeyAccessError]) -> KeyAccessError:
    """Map a failed tpm2-tools call to the provider's error classes."""
    detail = _error_line(stderr)
    if "Could not load tcti" in stderr or "ERROR:tcti:" in stderr:
        return ProviderUnavailable(f"TPM not reachable ({tool}): {detail}")
    codes = [int(a or b, 16) for a, b in _ERRCODE.findall(stderr)]
    if not codes:
        return default(f"{tool} failed: {detail or 'no error message'}")
    rc = codes[-1]
    if rc >> 16 == TCTI_LAYER:
        return ProviderUnavailable(f"TPM connection failed ({tool}): {detail}")
    if rc >> 16:  # an error of the TSS software stack itself
        return default(f"{tool} failed: {detail}")
    code = _tpm_code(rc)
    if code in (RC_POLICY_FAIL, RC_PCR):
        return KeyRevoked(
            "the TPM refuses to unseal: its PCR values changed since the key was sealed "
            f"(boot chain or firmware changed?): {detail}"
        )
    if code in (RC_OBJECT_MEMORY, RC_SESSION_MEMORY):
        return ProviderUnavailable(
            f"TPM out of object/session slots (no resource manager? use "
            f"tcti=device:/dev/tpmrm0): {detail}"
        )
    if code == RC_LOCKOUT:
        return ProviderUnavailable(f"TPM is in dictionary-attack lockout: {detail}")
    if code == RC_INITIALIZE:
        return ProviderUnavailable(f"TPM is not started (TPM2_Startup not run): {detail}")
    if code in _TRANSIENT:
        return ProviderUnavailable(f"TPM busy, try again: {detail}")
    if code in (RC_AUTH_FAIL, RC_BAD_AUTH):
        return KeyPermissions(
            f"TPM refused authorization ({tool}; owner hierarchy password set?): {detail}"
        )
    if code == RC_AUTH_UNAVAILABLE:
        return WrongKey(f"record does not match the TPM object's policy: {detail}")
    return default(f"{tool} failed: {detail}")


def _parse_pcrs(text: str) -> list[int]:
    pcrs: list[int] = []
    for part in re.split(r"[+,]", text):
        if not part.strip().isdigit() or int(part) > MAX_PCR:
            raise ProviderConfigError(f"bad PCR list {text!r}; use e.g. pcrs=7 or pcrs=0+7")
        if int(part) not in pcrs:
            pcrs.append(int(part))
    return sorted(pcrs)


def _parse_timeout(value: Any) -> float:
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        timeout = -1.0
    if isinstance(value, bool) or not 0 < timeout <= MAX_TIMEOUT:
        raise ProviderConfigError(f"tpm2 timeout must be 0 < SECONDS <= {MAX_TIMEOUT:g}")
    return timeout


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise ProviderConfigError(f"tpm2 record is corrupt ({what} is not base64)") from None


class _Session:
    """One protect/recover: a private temp dir, a deadline and the flush discipline."""

    def __init__(self, tcti: str | None, timeout: float) -> None:
        self.env = hygiene.provider_environment()
        if tcti:
            self.env["TPM2TOOLS_TCTI"] = tcti
        active = self.env.get("TPM2TOOLS_TCTI", "")
        # A resource manager flushes for us; anything else (swtpm, /dev/tpm0) does not.
        self.flush = not active.startswith(("device:/dev/tpmrm", "tabrmd"))
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="encfs-tpm2-")
        self.dir = self._dir.name

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _exec(self, argv: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ProviderUnavailable(f"TPM did not answer within {self.timeout:g} s")
        try:
            return subprocess.run(
                argv, input=stdin, capture_output=True, env=self.env, cwd=self.dir,
                timeout=remaining, check=False, umask=hygiene.CHILD_UMASK,
            )
        except FileNotFoundError:
            raise ProviderConfigError(
                f"{argv[0]} not found: install tpm2-tools (apt install tpm2-tools)"
            ) from None
        except subprocess.TimeoutExpired:
            raise ProviderUnavailable(f"TPM did not answer within {self.timeout:g} s") from None

    def tool(
        self, tool: str, *args: str, stdin: bytes = b"",
        default: type[KeyAccessError] = WrongKey,
    ) -> bytes:
        try:
            done = self._exec([tool, *args], stdin)
        finally:
            if self.flush:
                self._flush()
        if done.returncode != 0:
            raise classify(tool, done.stderr.decode("utf-8", "replace"), default)
        return done.stdout

    def _flush(self) -> None:
        # Best effort: a failure here resurfaces as a clear error on the next call.
        for flag in ("-t", "-l"):
            if self.deadline - time.monotonic() <= 0:
                return
            try:
                self._exec(["tpm2_flushcontext", flag], b"")
            except KeyAccessError:
                return

    def create_primary(self) -> str:
        ctx = self.path("primary.ctx")
        self.tool(
            "tpm2_createprimary", "-Q", "-C", PRIMARY["hierarchy"], "-g", "sha256",
            "-G", PRIMARY["alg"], "-a", PRIMARY["attributes"], "-c", ctx,
            default=ProviderConfigError,
        )
        return ctx

    def close(self) -> None:
        self._dir.cleanup()


class Tpm2Provider(KeyProvider):
    name = "tpm2"

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        raw: dict[str, str] = {}
        last: str | None = None
        for piece in spec_args.split(",") if spec_args.strip() else []:
            key, eq, value = piece.partition("=")
            if eq and key.strip() in _KEYS:
                last = key.strip()
                if last in raw:
                    raise ProviderConfigError(f"tpm2 option {last!r} given twice")
                raw[last] = value
            elif last is not None:
                raw[last] += "," + piece  # a comma inside the previous value
            else:
                raise ProviderConfigError(f"bad tpm2 spec {spec_args!r}; use {_USAGE}")
        options: dict[str, Any] = {"pcrs": _parse_pcrs(raw["pcrs"]) if "pcrs" in raw else []}
        if "tcti" in raw:
            if not raw["tcti"].strip():
                raise ProviderConfigError("tpm2 option tcti is empty")
            options["tcti"] = raw["tcti"].strip()
        options["timeout"] = _parse_timeout(raw.get("timeout", DEFAULT_TIMEOUT))
        return options

    @property
    def tcti(self) -> str | None:
        tcti = self.options.get("tcti")
        if tcti is not None and not isinstance(tcti, str):
            raise ProviderConfigError("tpm2 option 'tcti' must be a string")
        return tcti

    @property
    def pcrs(self) -> list[int]:
        return self._check_pcrs(self.options.get("pcrs", []), "options")

    @staticmethod
    def _check_pcrs(pcrs: Any, where: str) -> list[int]:
        if not isinstance(pcrs, list) or not all(
            type(p) is int and 0 <= p <= MAX_PCR for p in pcrs
        ):
            raise ProviderConfigError(f"tpm2 {where}: 'pcrs' must be a list of PCR numbers")
        return pcrs

    def _session(self) -> _Session:
        return _Session(self.tcti, _parse_timeout(self.options.get("timeout", DEFAULT_TIMEOUT)))

    def protect(self, kek: bytes, binding: bytes) -> Record:
        pcrs = self.pcrs
        secret = crypto.random_key()
        session = self._session()
        try:
            primary = session.create_primary()
            create = ["-C", primary, "-g", "sha256", "-i", "-",
                      "-u", session.path("seal.pub"), "-r", session.path("seal.priv")]
            if pcrs:
                policy = session.path("pcr.policy")
                session.tool(
                    "tpm2_createpolicy", "--policy-pcr", "-l", _pcr_selection(pcrs),
                    "-L", policy, default=ProviderConfigError,
                )
                create += ["-L", policy, "-a", SEAL_ATTRS_POLICY]
            # The secret goes through a pipe, never through a file.
            session.tool("tpm2_create", "-Q", *create, stdin=secret, default=ProviderConfigError)
            with open(session.path("seal.pub"), "rb") as f:
                public = f.read()
            with open(session.path("seal.priv"), "rb") as f:
                private = f.read()
        finally:
            session.close()
        return {
            "primary": dict(PRIMARY),
            "pcr_bank": PCR_BANK,
            "pcrs": pcrs,
            "public": _b64(public),
            "private": _b64(private),
            "sealed_kek": seal_with_secret(secret, kek, binding),
        }

    def recover(self, record: Record, binding: bytes) -> bytes:
        pcrs = self._check_pcrs(record.get("pcrs"), "record")
        if pcrs != self.pcrs:  # the operator's PCR policy, never the record's choice
            raise WrongKey(
                f"this keyslot is sealed to PCRs {pcrs}, not to the configured PCRs {self.pcrs}"
            )
        if record.get("primary") != PRIMARY or record.get("pcr_bank") != PCR_BANK:
            raise ProviderConfigError("tpm2 record uses an unknown primary key or PCR bank")
        public = _unb64(record.get("public"), "public")
        private = _unb64(record.get("private"), "private")
        session = self._session()
        try:
            primary = session.create_primary()
            for name, blob in (("seal.pub", public), ("seal.priv", private)):
                with open(session.path(name), "wb") as f:
                    f.write(blob)
            sealed = session.path("seal.ctx")
            session.tool(
                "tpm2_load", "-Q", "-C", primary, "-u", session.path("seal.pub"),
                "-r", session.path("seal.priv"), "-c", sealed,
            )
            auth = ["-p", f"pcr:{_pcr_selection(pcrs)}"] if pcrs else []
            secret = session.tool("tpm2_unseal", "-c", sealed, *auth)
        finally:
            session.close()
        if len(secret) != crypto.KEY_SIZE:
            raise WrongKey("the TPM object in this record does not hold a 256-bit secret")
        return open_with_secret(
            secret, record.get("sealed_kek"), binding,
            "the TPM-sealed key does not open this volume",
        )

    def describe(self) -> str:
        parts = []
        if self.tcti:
            parts.append(f"tcti={self.tcti}")
        if self.pcrs:
            parts.append("pcrs=" + "+".join(map(str, self.pcrs)))
        return "tpm2" + (":" + ",".join(parts) if parts else "")


def _pcr_selection(pcrs: list[int]) -> str:
    return f"{PCR_BANK}:" + ",".join(map(str, pcrs))
