"""The spool's durable write and its group-committed directory fsync."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.gateway.store import spool as spool_mod
from services.gateway.store.durable import STALE_TMP_S
from services.gateway.store.results import ResultStore
from services.gateway.store.spool import DirSync, Spool, write_durably


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_put_stores_exactly_the_bytes_under_incoming_and_leaves_no_temporary(
    tmp_path: Path, kind: type,
) -> None:
    payload = os.urandom(300_001)
    path = Spool(tmp_path).put(kind(payload))
    assert path.parent == tmp_path / "incoming" and path.suffix == ".dcm"
    assert path.read_bytes() == payload
    assert not list((tmp_path / "incoming").glob("*.tmp"))


def test_concurrent_puts_share_directory_fsyncs_and_each_waits_for_one_begun_after_its_rename_with_slow_fake_fsync(  # noqa: E501
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every put returns only after a directory fsync that started after its own rename has
    finished (durable entry), yet eight concurrent puts need fewer than eight fsyncs."""
    spool = Spool(tmp_path)
    clock = iter(range(10**9)).__next__  # a total order of events across threads
    lock = threading.Lock()
    fsyncs: list[tuple[int, int]] = []
    renamed: dict[str, int] = {}
    real_fsync, real_replace = spool_mod.fsync_dir, os.replace

    def slow_fsync(path: Path) -> None:
        with lock:
            start = clock()
        time.sleep(0.05)  # a slow disk: others pile up behind this fsync
        real_fsync(path)
        with lock:
            fsyncs.append((start, clock()))

    def replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        with lock:
            renamed[Path(dst).name] = clock()

    monkeypatch.setattr(spool_mod, "fsync_dir", slow_fsync)
    monkeypatch.setattr(spool_mod.os, "replace", replace)
    returned: dict[str, int] = {}

    def put(k: int) -> None:
        path = spool.put(bytes([k]) * 1000)
        with lock:
            returned[path.name] = clock()

    threads = [threading.Thread(target=put, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(returned) == 8
    for name, done in returned.items():
        assert any(start > renamed[name] and end < done for start, end in fsyncs), name
    assert len(fsyncs) < 8, fsyncs


def test_a_failed_directory_fsync_fails_the_put_and_the_next_one_succeeds_with_fake_fsync_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = Spool(tmp_path)
    real = spool_mod.fsync_dir
    calls = {"n": 0}

    def flaky(path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_mod, "fsync_dir", flaky)
    with pytest.raises(OSError):
        spool.put(b"first")  # the caller (Ingestor) refuses: nothing acknowledged
    path = spool.put(b"second")
    assert path.read_bytes() == b"second"


def test_dir_sync_alone_fsyncs_every_time(tmp_path: Path) -> None:
    sync = DirSync(tmp_path)
    for _ in range(3):
        sync.sync()
    assert sync.fsyncs == 3


def test_concurrent_writers_of_one_path_leave_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "same.json"
    blobs = [bytes([k]) * 4096 for k in range(32)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda b: write_durably(target, b), blobs))
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]  # no temporary file left
    assert target.read_bytes() in blobs


def test_result_store_drops_temporaries_a_crashed_write_left_and_keeps_results(
        tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.save("1.2.3", "1.2.3.4", {"study_instance_uid": "1.2.3", "findings": []}, job="a.dcm")
    folder = next(store.root.iterdir())
    stale = folder / "abc.json.0123456789abcdef.tmp"  # what a write stopped by a crash leaves
    stale.write_bytes(b"{partial")
    old = time.time() - STALE_TMP_S - 1
    os.utime(stale, (old, old))
    # another gateway process of the pod writing the same store right now: left alone
    live = folder / "def.json.fedcba9876543210.tmp"
    live.write_bytes(b"{in progress")
    reopened = ResultStore(tmp_path)
    assert not stale.exists()
    assert live.exists()
    assert reopened.for_study("1.2.3") and reopened.for_study("1.2.3")[0]["findings"] == []
