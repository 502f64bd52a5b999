"""Imports point one way: crypto -> format / providers -> engine -> FUSE -> mount -> CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "encfs"

# module (relative path prefix) -> layer number
LAYERS = {
    "errors": 0,
    "hygiene": 0,
    "__init__": 0,
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
    "fuse": 5,
    "daemon": 6,
    "client": 6,
    "cli": 7,
    "__main__": 8,
}


def module_key(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def all_modules():
    return [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]


def test_every_module_has_a_layer():
    for path in all_modules():
        assert module_key(path) in LAYERS, path


def test_imports_point_down():
    for path in all_modules():
        here = module_key(path)
        for name in imports_of(path):
            if not name.startswith("encfs"):
                continue
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            assert LAYERS[target] <= LAYERS[here], f"{path.name} imports {name}"


def test_format_and_keys_never_import_each_other_and_providers_are_independent():
    for path in all_modules():
        here = module_key(path)
        for name in imports_of(path):
            if here == "format":
                assert not name.startswith("encfs.keys"), path
            if here == "keys":
                assert not name.startswith("encfs.format"), path
                if name.startswith("encfs.keys."):
                    allowed = {"encfs.keys.provider", "encfs.keys.registry"}
                    assert name in allowed, f"{path.name} imports provider {name}"


def test_only_fuse_and_mount_import_pyfuse3():
    for path in all_modules():
        if any(n == "pyfuse3" or n.startswith("pyfuse3.") for n in imports_of(path)):
            assert module_key(path) in ("fuse", "daemon"), path


def test_only_crypto_and_providers_import_cryptography():
    for path in all_modules():
        if any(n.startswith("cryptography") for n in imports_of(path)):
            assert module_key(path) in ("crypto", "keys"), path


def test_fuse_adapter_knows_no_providers_crypto_or_format():
    for path in (PACKAGE / "fuse").glob("*.py"):
        for name in imports_of(path):
            assert not name.startswith(("encfs.keys", "encfs.crypto", "encfs.format")), path


def test_only_the_composition_roots_use_the_provider_registry():
    """Everything else gets providers through an injected factory (trust.Operator)."""
    for path in all_modules():
        if any(n.startswith("encfs.keys.registry") for n in imports_of(path)):
            assert module_key(path) in ("cli", "keys"), path


def test_backing_imports_only_errors():
    """The OS layer knows no format: the caller names temporary entries."""
    names = [n for n in imports_of(PACKAGE / "backing.py") if n.startswith("encfs")]
    assert set(names) <= {"encfs.errors"}, names
