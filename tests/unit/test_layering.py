"""Imports point one way, layer by layer (docs/dev/ARCHITECTURE.md):

L0 errors, hygiene -> L1 crypto, secmem -> L2 format/, keys/ -> L3 backing, config_store,
keyring, audit, trust -> L4 engine/ -> L5 admin/, fuse/ -> L6 daemon/ -> L7 cli/, client.

An import within one layer is allowed only where SAME_LAYER declares it, so the layers
cannot grow into a staircase again (each module leaning on the one beside it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "encfs"

# top-level module or package -> layer number
LAYERS = {
    "encfs": 0,  # encfs/__init__.py (the version)
    "errors": 0,
    "hygiene": 0,
    "crypto": 1,
    "secmem": 1,
    "format": 2,
    "keys": 2,
    "backing": 3,
    "keyring": 3,
    "audit": 3,
    "trust": 3,
    "config_store": 3,
    "engine": 4,
    "admin": 5,
    "convert": 5,  # in-place conversion, over the engine
    "fuse": 5,
    "daemon": 6,
    "client": 7,  # reaching a daemon from outside (where it lives: daemon.runtime)
    "cli": 7,
    "__main__": 7,
}

# importer -> the modules of its own layer it may import (dotted, without "encfs.").
SAME_LAYER: dict[str, set[str]] = {
    "crypto": {"secmem"},  # key bytes live in locked pages
    # format/: the package holds the feature flags; records build on blocks and names
    "format.blocks": {"format"},
    "format.volume": {"format", "format.blocks", "format.config_fields"},
    "format.keyarea": {"format.blocks"},
    "format.places": {"format.names"},
    "format.xattrs": {"format.names"},  # the attribute record's names
    # keys/: every provider implements the interface; the registry names them lazily;
    # those that read a secret from a file share secret_file
    **{
        f"keys.{name}": {"keys.provider"}
        for name in ("aws_kms", "command", "registry", "tpm2")
    },
    **{
        f"keys.{name}": {"keys.provider", "keys.secret_file"}
        for name in ("keyfile", "kmip", "passphrase", "pkcs11", "systemd_credential", "vault")
    },
    # a provider that is a package reaches its service through its own module
    "keys.azure_keyvault": {"keys.azure_keyvault.connection", "keys.provider"},
    "keys.azure_keyvault.connection": {"keys.provider", "keys.secret_file"},
    # L3: the keyring and the config store record key events and consult the operator
    "keyring": {"audit", "trust"},
    "config_store": {"audit", "backing", "keyring", "trust"},
    # engine/: the facade composes the collaborators; each knows only those below it
    # (and exports what its callers hand it: a RenameRequest, from engine.rename)
    "engine": {
        "engine.bindings", "engine.create", "engine.inode", "engine.rename", "engine.volume"
    },
    "engine.volume": {
        "engine.bindings", "engine.entries", "engine.files", "engine.gate", "engine.inode",
        "engine.inodes", "engine.names", "engine.namespace", "engine.orphans", "engine.rename",
        "engine.symlinks", "engine.xattrs",
        "engine.follow",  # what follows an online reencrypt's name pass
    },
    "engine.follow": {"engine.inode", "engine.inodes"},
    "engine.inode": {"engine.contents", "engine.inodes"},  # (types only)
    "engine.inodes": {"engine.inode"},
    "engine.bindings": {"engine.inode"},
    "engine.names": {"engine.bindings", "engine.inode"},
    "engine.symlinks": {"engine.bindings", "engine.inode", "engine.inodes", "engine.names"},
    "engine.xattrs": {"engine.inode", "engine.inodes", "engine.names", "engine.xattr_sets"},
    "engine.files": {"engine.bindings", "engine.contents", "engine.inode", "engine.inodes"},
    # what making, removing and moving entries all work on: one Namespace
    "engine.orphans": {
        "engine.inode", "engine.inodes", "engine.names", "engine.symlinks", "engine.xattrs"
    },
    "engine.namespace": {
        "engine.bindings", "engine.inodes", "engine.names", "engine.orphans", "engine.symlinks",
        "engine.xattrs",  # an object's attribute set goes with its last name
    },
    "engine.entries": {
        "engine.bindings", "engine.files", "engine.inode", "engine.names", "engine.namespace",
    },
    "engine.rename": {
        "engine.bindings", "engine.inode", "engine.names", "engine.namespace", "engine.symlinks",
    },
    "engine.create": {"engine.bindings", "engine.names"},
    # admin/: fsck keeps evidence in the quarantine; the status report reads rotation
    # and keyslots
    "admin.fsck": {"admin.quarantine"},
    "admin.rotation": {"admin.rewrap"},  # the pass it drives
    # reencrypt drives its passes: the census, and a new KEK version made as rotate does
    "admin.reencrypt": {
        "admin.rewrap", "admin.rotation", "admin.reencrypt_data", "admin.reencrypt_journal",
        "admin.reencrypt_names",
    },
    # timing; journal; the sealing of one group
    "admin.reencrypt_data": {
        "admin.rewrap", "admin.reencrypt_journal", "admin.reencrypt_seal",
    },
    "admin.reencrypt_seal": {"admin.reencrypt_journal"},  # its entries
    # the crash hook; the quarantine's record format (its records are moved too)
    "admin.reencrypt_names": {"admin.reencrypt_journal", "admin.quarantine"},
    "admin.status": {"admin.keyslots", "admin.rotation"},
    # fuse/: the handlers translate errors through the table and hand fsync to the
    # syncer (test_fuse_adapter_imports_only_the_engine_and_errors)
    "fuse.operations": {"fuse.errno_map", "fuse.syncer"},
    # fuse/accel/: the accelerated loop feeds its CPU warmer; cpu_policy switches the
    # warmer and the loop's busy-poll; session runs the three for the daemon
    "fuse.accel.loop": {"fuse.accel.warm"},
    "fuse.accel.warm": {"fuse.accel.spinner"},  # (runs it as a script)
    "fuse.accel.cpu_policy": {"fuse.accel.loop", "fuse.accel.warm"},
    "fuse.accel.session": {"fuse.accel.cpu_policy", "fuse.accel.loop"},
    # daemon/: mount is the composition root of a mounted volume
    "daemon.mount": {
        "daemon.control", "daemon.health", "daemon.mountpoint", "daemon.request_loop",
        "daemon.supervisor", "daemon.systemd",
    },
    "daemon.supervisor": {"daemon.health"},
    "daemon.control": {"daemon.runtime", "daemon.supervisor"},
    "daemon.mountpoint": {"daemon.runtime"},  # the mount table, the volume lock's holder
    # convert/: the package names its entry points; the driver runs the phases over its
    # collaborators, the walk drives the transfer over the two sides; all read the tree
    "convert": {
        "convert.driver", "convert.in_use", "convert.plan", "convert.records", "convert.report",
    },
    "convert.driver": {
        "convert.in_use", "convert.plan", "convert.records", "convert.report", "convert.sides",
        "convert.staging", "convert.transfer", "convert.tree", "convert.walk",
    },
    "convert.walk": {
        "convert.plan", "convert.records", "convert.report", "convert.sides",
        "convert.transfer", "convert.tree",
    },
    "convert.transfer": {"convert.records", "convert.sides", "convert.tree"},
    "convert.sides": {"convert.records", "convert.tree"},
    "convert.staging": {"convert.records", "convert.tree"},
    "convert.records": {"convert.tree"},
    "convert.plan": {"convert.tree"},
    "convert.in_use": {"convert.tree"},
    "convert.report": {"convert.tree"},
    # cli/: app dispatches to the command modules, which share common; mount(8)'s helper
    # calls app.main (a lazy import)
    "cli": {"cli.app"},
    "cli.app": {
        "cli.checking", "cli.common", "cli.convert", "cli.keys", "cli.mounting",
        "cli.reencrypting", "cli.rotating",
    },
    "cli.common": {"client"},  # reaching a daemon (status, rotate, policy)
    "cli.checking": {"cli.common"},
    "cli.convert": {"cli.common"},
    "cli.keys": {"cli.common"},
    "cli.mounting": {"cli.app", "cli.common"},
    "cli.reencrypting": {"cli.common"},
    "cli.rotating": {"cli.common"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "encfs"


def module_key(path: Path) -> str:
    return module_name(path).split(".")[0]


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _is_module(dotted: str) -> bool:
    rel = PACKAGE.joinpath(*dotted.split("."))
    return rel.with_suffix(".py").exists() or rel.is_dir()


def encfs_modules_imported(path: Path) -> set[str]:
    """The encfs modules a file imports (dotted, without "encfs."): `from encfs.x import
    y` counts as encfs.x.y where y is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            inner = [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [n for n in inner if _is_module(n.removeprefix("encfs."))]
            targets = targets or [node.module]
        else:
            continue
        for name in targets:
            if name == "encfs" or name.startswith("encfs."):
                found.add(name.removeprefix("encfs").lstrip(".") or "encfs")
    return found


def all_modules():
    return [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]


def test_every_module_has_a_layer():
    for path in all_modules():
        assert module_key(path) in LAYERS, path


def test_imports_point_down_or_are_declared():
    for path in all_modules():
        here = module_name(path)
        for target in encfs_modules_imported(path):
            if target == here:
                continue
            assert layer(target) <= layer(here), f"{here} imports {target}, a higher layer"
            if layer(target) == layer(here):
                assert target in SAME_LAYER.get(here, set()), (
                    f"{here} imports {target} of its own layer: declare it in SAME_LAYER "
                    "(and say why), or move one of them"
                )


def test_declared_same_layer_imports_exist_and_stay_in_their_layer():
    """No stale declarations: each one is an import that exists, within one layer."""
    actual = {module_name(p): encfs_modules_imported(p) for p in all_modules()}
    for importer, targets in SAME_LAYER.items():
        assert importer in actual, importer
        for target in targets:
            assert layer(target) == layer(importer), (importer, target)
            assert target in actual[importer], f"{importer} no longer imports {target}"


def test_format_and_keys_never_import_each_other_and_providers_are_independent():
    for path in all_modules():
        here = module_key(path)
        for name in imports_of(path):
            if here == "format":
                assert not name.startswith("encfs.keys"), path
            if here == "keys":
                assert not name.startswith("encfs.format"), path
                if name.startswith("encfs.keys."):
                    # its own package's modules (a provider split in parts), the
                    # interface, the registry, secret files: never another provider
                    own = "encfs." + ".".join(module_name(path).split(".")[:2]) + "."
                    allowed = {
                        "encfs.keys.provider", "encfs.keys.registry", "encfs.keys.secret_file"
                    }
                    assert name in allowed or name.startswith(own), (
                        f"{path.name} imports provider {name}"
                    )


def test_only_fuse_and_mount_import_pyfuse3():
    for path in all_modules():
        if any(n == "pyfuse3" or n.startswith("pyfuse3.") for n in imports_of(path)):
            assert module_key(path) in ("fuse", "daemon"), path


def test_only_crypto_and_providers_import_cryptography():
    for path in all_modules():
        if any(n.startswith("cryptography") for n in imports_of(path)):
            assert module_key(path) in ("crypto", "keys"), path


def test_fuse_adapter_knows_no_providers_crypto_or_format():
    for path in (PACKAGE / "fuse").rglob("*.py"):
        for name in imports_of(path):
            assert not name.startswith(("encfs.keys", "encfs.crypto", "encfs.format")), path


def test_only_the_composition_roots_use_the_provider_registry():
    """Everything else gets providers through an injected factory (trust.Operator): the
    CLI makes the operator (for offline commands and for the daemon it starts)."""
    for path in all_modules():
        if "keys.registry" in encfs_modules_imported(path):
            assert module_key(path) == "cli", path


def test_backing_imports_only_errors():
    """The OS layer knows no format: the caller names temporary entries."""
    names = [n for n in imports_of(PACKAGE / "backing.py") if n.startswith("encfs")]
    assert set(names) <= {"encfs.errors"}, names


def test_fuse_adapter_imports_only_the_engine_and_errors():
    """fuse/'s own modules (operations, errno_map, syncer) import the engine, errors and
    each other: nothing of the accelerated loop (fuse/accel/, switched on by the daemon)."""
    for path in (PACKAGE / "fuse").glob("*.py"):
        here = module_name(path)
        for target in encfs_modules_imported(path):
            assert target.startswith("engine") or target in (
                "errors", "fuse.errno_map", "fuse.syncer"
            ), f"{here} imports {target}"


def test_only_the_daemons_loop_choice_switches_the_accelerated_loop_on():
    """encfs.fuse.accel is imported by itself and by encfs.daemon.request_loop alone
    (which checks the versions first), and trio's internals are read only there."""
    for path in all_modules():
        here = module_name(path)
        if here.startswith("fuse.accel"):
            continue
        accel = {t for t in encfs_modules_imported(path) if t.startswith("fuse.accel")}
        if here == "daemon.request_loop":
            assert accel == {"fuse.accel", "fuse.accel.session"}, accel
        else:
            assert not accel, f"{here} imports {accel}"
        assert "trio._core" not in path.read_text(), here


def test_importing_the_adapter_or_choosing_the_stock_loop_imports_no_accelerated_loop():
    """In a fresh interpreter: the FUSE adapter, the daemon's mount module and the stock
    loop's choice leave encfs.fuse.accel unimported."""
    probe = (
        "import sys, logging\n"
        "import encfs.fuse.operations, encfs.fuse.syncer, encfs.daemon.mount\n"
        "from encfs.daemon import request_loop\n"
        "choice = request_loop.choose('stock', '-o request_loop=stock')\n"
        "request_loop.open_loop(choice, 'auto', 'auto')\n"
        "print(sorted(m for m in sys.modules if m.startswith('encfs.fuse.accel')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
