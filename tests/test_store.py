"""The SQLite experiments store: write-once runs, atomic transactions, exports, clear errors."""

from __future__ import annotations

import csv
import json
import multiprocessing
import multiprocessing as mp
import time

import pytest

from sharpness.harness import Store, run_key

CONFIG = {"dataset": "mnist1d", "optimizer": "sam", "rho": 0.05, "seed": 0}


def test_run_key_ignores_key_order_and_changes_with_values():
    assert run_key(CONFIG) == run_key(dict(reversed(list(CONFIG.items()))))
    assert run_key(CONFIG) != run_key({**CONFIG, "seed": 1})
    assert len(run_key(CONFIG)) == 16


def test_write_once_and_read_back(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        key, inserted = store.write_run(CONFIG, {"test_acc": 0.9}, [{"epoch": 1}, {"epoch": 2}], {"torch": "x"})
        assert inserted and store.has(key) and len(store) == 1
        again, inserted = store.write_run(CONFIG, {"test_acc": 0.1}, [{"epoch": 1}], {})
        assert again == key and not inserted
    with Store(tmp_path / "r.sqlite") as store:  # persisted, and the second write changed nothing
        (run,) = store.runs()
        assert run.summary == {"test_acc": 0.9} and run.epochs == ({"epoch": 1}, {"epoch": 2})
        assert run.config == CONFIG


def test_failed_write_leaves_nothing(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(TypeError):
            store.write_run(CONFIG, {"ok": 1}, [{"epoch": 1}, {"bad": object()}], {})
        assert len(store) == 0 and not store.has(run_key(CONFIG))


def _race(path, barrier):
    barrier.wait()
    with Store(path) as store:
        store.write_run(CONFIG, {"pid": mp.current_process().name}, [{"epoch": 1}], {})


def test_concurrent_writers_store_the_run_once(tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path).close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_race, args=(path, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(path) as store:
        (run,) = store.runs()
        assert len(run.epochs) == 1


def test_exports(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        store.write_run(CONFIG, {"test_acc": 0.9, "curve": [1, 2]}, [{"epoch": 1}], {})
        store.write_run({**CONFIG, "seed": 1}, {"test_acc": 0.8}, [], {})
        store.export_json(tmp_path / "r.json")
        store.export_csv(tmp_path / "r.csv")
    payload = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["config"]["seed"] for r in payload) == [0, 1]
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 2 and rows[0]["run_key"] and "summary.test_acc" in rows[0]
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob(".*.tmp-*"))


def test_foreign_file_and_missing_directory(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="Not a sharpness results store"):
        Store(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Store(tmp_path / "missing" / "r.sqlite")


def _open_at(path: str, start: float, results) -> None:
    while time.time() < start:  # all processes open together
        pass
    try:
        with Store(path) as store:
            store.has("x")
        results.put("ok")
    except Exception as error:  # noqa: BLE001 - reported to the parent
        results.put(repr(error))


def test_processes_opening_a_new_store_together_all_succeed(tmp_path):
    """torchrun ranks and sweep workers open the same new store at once. SQLite answers the losers of the
    switch to WAL with "database is locked" without waiting (before the retry, ~60% of such rounds failed)."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        results = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_at, args=(str(tmp_path / f"{round_}.sqlite"), start, results))
                 for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        assert outcomes == ["ok"] * 3, outcomes


def test_atomic_writes_into_a_missing_folder_name_the_folder(tmp_path):
    """Exports, reports and measures write through ``atomic_open``: a missing folder is named, not the temporary
    file beside the target (``.x.csv.tmp-PID``), and nothing is left behind."""
    from sharpness._io import atomic_open

    with pytest.raises(FileNotFoundError, match=r"Output directory does not exist: .*nowhere$"):
        with atomic_open(tmp_path / "nowhere" / "x.csv"):
            pass
    assert list(tmp_path.iterdir()) == []
