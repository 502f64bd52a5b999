"""The data pass of `reencrypt` with its batches written on the caller's thread
(`ReencryptPass(..., overlap=False)`: the journal and the writes in place where the pass
runs, only the fdatasyncs and the journal's removal on the Settler's thread; what the
daemon's pass beside requests does, in 1 MiB batches), here offline in 8 MiB batches, on
a real volume written through a real mount, run in-process through the engine. The model
and its checks are those of test_reencrypt.py; the overlapped pass is what every test
there runs."""

from __future__ import annotations

import functools

from encfs.admin import reencrypt
from encfs.admin.reencrypt_data import ReencryptPass
from encfs.engine import Volume
from tests.helpers.config import operator_for
from tests.helpers.mount import mounted, run_cli
from tests.integration.test_reencrypt import MIB, check, make_volume, slot_versions


def test_batches_written_on_the_callers_thread_give_the_same_volume(tmp_path, monkeypatch):
    volume, files = make_volume(tmp_path, seed=4, big_mib=20)  # three batches of 8 MiB
    blocks = sum(slot_versions(volume.backing).values())
    made: list[ReencryptPass] = []

    def pass_in_order(*args: object, **options: object) -> ReencryptPass:
        options["overlap"] = False
        made.append(ReencryptPass(*args, **options))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(reencrypt, "ReencryptPass", functools.wraps(ReencryptPass)(pass_in_order))
    engine = Volume.unlock(str(volume.backing), operator_for(volume.keyfile), reencrypting=True)
    try:
        result = reencrypt.reencrypt_offline(engine, purge_old=True)
    finally:
        engine.close()
    assert [run.overlap for run in made] == [False]
    assert result["done"] and result["unreadable_blocks"] == 0 and result["batches"] >= 3
    assert result["blocks_reencrypted"] == blocks  # hard links: each block once
    assert 0 < result["journal_peak_bytes"] <= 8 * MIB + 52
    assert slot_versions(volume.backing) == {2: blocks}
    assert not (volume.backing / ".egw-reencrypt").exists()
    with mounted(volume, tmp_path / "mnt") as mnt:
        check(mnt, files)
    fsck = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
