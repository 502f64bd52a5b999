"""Mutation fuzzing of the volume config (issue 19).

Random edits of a valid config, at the JSON level (values replaced by values of other
types and ranges, keys removed or added, lists shuffled, keyslots inserted naming a
canary program, library and server) and at the byte level (flips, cuts, insertions).
Each mutated config is either refused with an EncfsError (a documented exit code, one
line) or opens the identical volume: never another exception, never a canary run.
Seeded, so every run checks the same mutations; in-process for the bulk, through the
real CLI for a sample (one line on stderr, no traceback).
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest

from encfs import config_store
from encfs.errors import EncfsError
from encfs.format.volume import VolumeConfig, body_digest
from tests.defense.test_config_trust import ALLOWED_CODES, Canaries
from tests.helpers.config import operator_for
from tests.helpers.mount import init_volume, run_cli

CONFIG = "encfs-gw.conf"
IN_PROCESS_MUTATIONS = 600
CLI_MUTATIONS = 16

VALUES = [
    0, 1, -1, 2**16, 2**63, 10**100, 0.5, 1e308, True, False, None, "", "x" * 5000,
    "2026-12-06T21:00:00Z", "2026-13-40T99:99:99Z", "yesterday", "00" * 16, "ff" * 92,
    "ZZ" * 16, [], [1, 2], {}, {"a": {"b": {"c": {"d": {"e": [1]}}}}}, "../../bin/sh",
    "active", "retired", "keyfile", "command", "pkcs11", "authenticated-config",
]  # fmt: skip


def paths(doc, prefix=()):
    """Every (container, key) in a JSON document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield doc, key
            yield from paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield doc, index
            yield from paths(value, (*prefix, index))


def mutate_doc(doc: dict, rng: random.Random, canaries: Canaries, backing: Path) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        spots = list(paths(doc))
        container, key = rng.choice(spots)
        action = rng.randrange(7)
        if action == 0:
            container[key] = rng.choice(VALUES)
        elif action == 1 and isinstance(container, dict):
            del container[key]
        elif action == 2 and isinstance(container, dict):
            container[rng.choice(["extra", "options", "provider", "config_mac", "x"])] = (
                rng.choice(VALUES)
            )
        elif action == 3 and isinstance(container[key], list):
            rng.shuffle(container[key])
            if container[key]:
                container[key].append(copy.deepcopy(rng.choice(container[key])))
        elif action == 4:  # a keyslot naming a canary, in either format
            slot = rng.choice(canaries.legacy_protectors(backing))
            if rng.random() < 0.5:
                slot = {"id": os.urandom(8).hex(), "kind": slot["provider"],
                        "record": slot["record"]}  # fmt: skip
            version = rng.choice(doc.get("kek", {}).get("versions", [{}]) or [{}])
            if isinstance(version, dict) and isinstance(version.get("protectors"), list):
                version["protectors"].insert(rng.randrange(2), slot)
        elif action == 5 and isinstance(container[key], str) and container[key]:
            text = container[key]
            at = rng.randrange(len(text))
            container[key] = text[:at] + rng.choice("0af") + text[at + 1 :]
        elif action == 6 and "features" in doc and isinstance(doc["features"], list):
            doc["features"] = [f for f in doc["features"] if rng.random() < 0.8]
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    action = rng.randrange(3)
    at = rng.randrange(len(raw))
    if action == 0:
        raw[at] ^= 1 << rng.randrange(8)
    elif action == 1:
        del raw[at:]
    else:
        raw[at:at] = rng.choice([b"\x00", b"{", b'"', b"\xff\xfe", b",", b"]" * 3])
    return bytes(raw)


@pytest.fixture
def target(tmp_path, canaries):
    volume = init_volume(tmp_path)
    original = (volume.backing / CONFIG).read_bytes()
    return volume, original


@pytest.fixture
def canaries(tmp_path):
    found = Canaries(tmp_path)
    yield found
    found.close()


def test_mutated_configs_are_refused_or_identical_in_process(target, canaries):
    volume, original = target
    config, _ = VolumeConfig.from_json(original)
    identical = body_digest(config.body())
    doc = json.loads(original)
    rng = random.Random(19)
    outcomes = {"refused": 0, "identical": 0}
    for iteration in range(IN_PROCESS_MUTATIONS):
        if iteration % 3 == 2:
            data = mutate_bytes(original, rng)
        else:
            data = json.dumps(mutate_doc(doc, rng, canaries, volume.backing)).encode()
        (volume.backing / CONFIG).write_bytes(data)
        operator = operator_for(volume.keyfile)
        try:
            opened, _ = config_store.unlock(str(volume.backing), operator)
        except EncfsError as exc:
            assert exc.exit_code in ALLOWED_CODES, (exc.exit_code, exc)
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
        else:
            assert body_digest(opened.body()) == identical, data
            outcomes["identical"] += 1
        canaries.assert_untouched()
    (volume.backing / CONFIG).write_bytes(original)
    # Most mutations must be refusals (the fuzzer changes what matters); the share depends
    # on the document's shape (537 of 600 with the bound-names feature in the list).
    assert outcomes["refused"] > IN_PROCESS_MUTATIONS * 0.85, outcomes


def test_mutated_configs_through_the_cli(target, canaries):
    volume, original = target
    doc = json.loads(original)
    rng = random.Random(20)
    for iteration in range(CLI_MUTATIONS):
        if iteration % 2:
            data = mutate_bytes(original, rng)
        else:
            data = json.dumps(mutate_doc(doc, rng, canaries, volume.backing)).encode()
        (volume.backing / CONFIG).write_bytes(data)
        verb = ["status", "fsck", "rotate", "rewrap-kek"][iteration % 4]
        for key in ([], ["--keyfile", volume.keyfile]):
            result = run_cli(verb, volume.backing, *key)
            assert result.returncode in ALLOWED_CODES, result
            assert "Traceback" not in result.stderr
            if result.returncode:
                assert result.stderr.count("\n") == 1, result.stderr
        canaries.assert_untouched()
