"""Review decisions in SQLite (traitloc.io.decisions): schema, validation, concurrent writers, crash and path safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from traitloc.io.decisions import (
    DB_NAME,
    STATUSES,
    PathSafetyError,
    ReviewStore,
    check_result_id,
    resolve_inside,
    result_id_from_map,
)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_schema_is_the_agreed_one(tmp_path: Path) -> None:
    ReviewStore(tmp_path)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(decisions)")]
        hist = [r[1] for r in conn.execute("PRAGMA table_info(history)")]
        pk = [r[1] for r in conn.execute("PRAGMA table_info(decisions)") if r[5]]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        with pytest.raises(sqlite3.IntegrityError):  # the CHECK constraint is in the database itself
            conn.execute("INSERT INTO decisions VALUES ('a/b', 'maybe', '', 'now')")
    assert cols == ["result_id", "status", "note", "updated_utc"]
    assert pk == ["result_id"]
    assert {"result_id", "action", "status", "note", "who", "updated_utc"} <= set(hist)
    assert mode == "wal"


def test_set_get_overwrite_history_and_clear(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path, who="ana")
    assert store.get("img/red-epaulets") is None and store.decisions() == {}
    d = store.set("img/red-epaulets", "needs-work", "too diffuse")
    assert d.status == "needs-work" and d.updated_utc.endswith("Z")
    store.set("img/red-epaulets", "accepted", "ok after all")
    store.set("img2/bill", "rejected")
    got = store.get("img/red-epaulets")
    assert got is not None and (got.status, got.note) == ("accepted", "ok after all")
    assert set(store.decisions()) == {"img/red-epaulets", "img2/bill"}
    assert store.accepted() == ["img/red-epaulets"]
    assert store.counts() == {"accepted": 1, "rejected": 1, "needs-work": 0}
    hist = store.history("img/red-epaulets")
    assert [h.status for h in hist] == ["needs-work", "accepted"] and {h.who for h in hist} == {"ana"}
    assert store.clear("img2/bill") and not store.clear("img2/bill")
    assert store.get("img2/bill") is None
    assert [h.action for h in store.history("img2/bill")] == ["set", "clear"]
    # a new store (a restart) reads the same
    assert ReviewStore(tmp_path).get("img/red-epaulets") == got
    assert ReviewStore(tmp_path, readonly=True).decisions() == store.decisions()


def test_readonly_store_of_absent_database_writes_nothing(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path, readonly=True)
    assert store.decisions() == {} and not (tmp_path / DB_NAME).exists()
    with pytest.raises(PermissionError):
        store.set("a/b", "accepted")


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../x/y", "a/../../b", "a\\b", "a/b\x00", "a//b", "./a/b", "C:/x", "a\nb"]
)
def test_bad_result_ids_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        check_result_id(bad)
    with pytest.raises(ValueError):
        ReviewStore(tmp_path).set(bad, "accepted")


def test_bad_status_and_note(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path)
    for s in STATUSES:
        store.set("a/b", s)
    with pytest.raises(ValueError, match="status"):
        store.set("a/b", "Accepted")
    with pytest.raises(ValueError, match="note"):
        store.set("a/b", "accepted", "x" * 10_001)


def test_result_id_from_map() -> None:
    assert result_id_from_map("maps/chelsea/red-epaulets.tif") == "chelsea/red-epaulets"
    assert result_id_from_map("maps/a/b/c.tif") == "a/b/c"
    for bad in ["masks/a/b.png", "maps/b.tif", "maps/../x/b.tif", "/maps/a/b.tif"]:
        with pytest.raises(ValueError):
            result_id_from_map(bad)


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path / "res"
    (root / "maps" / "a").mkdir(parents=True)
    (root / "maps" / "a" / "b.tif").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    (root / "link_out").symlink_to(outside)
    (root / "link_in").symlink_to(root / "maps")
    assert resolve_inside(root, "maps/a/b.tif", must_exist=True) == (root / "maps/a/b.tif").resolve()
    assert resolve_inside(root, str(root / "maps/a/b.tif")) == (root / "maps/a/b.tif").resolve()
    assert resolve_inside(root, "link_in/a/b.tif").is_file()  # a symlink that stays inside is fine
    for bad in ["../secret.txt", "maps/../../secret.txt", str(outside), "link_out", "/etc/passwd", "~/x", "a\\b"]:
        with pytest.raises(PathSafetyError):
            resolve_inside(root, bad)
    with pytest.raises(FileNotFoundError):
        resolve_inside(root, "maps/none.tif", must_exist=True)


def test_database_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "res"
    root.mkdir()
    (root / DB_NAME).symlink_to(tmp_path / "elsewhere.sqlite")
    with pytest.raises(PathSafetyError):
        ReviewStore(root)


def test_two_threads_1000_decisions_lose_none(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path, synchronous="NORMAL")
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(500):
                store.set(f"img{i:04d}/t{k}", STATUSES[i % 3], f"note {k} {i}")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = ReviewStore(tmp_path).decisions()
    assert len(got) == 1000
    assert got["img0499/t1"].note == "note 1 499" and got["img0001/t0"].status == STATUSES[1]
    assert len(store.history()) == 1000


_WRITER = textwrap.dedent(
    """
    import sys
    from traitloc.io.decisions import ReviewStore, STATUSES
    root, tag, n, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = ReviewStore(root, who=tag, synchronous=sync, timeout=60)
    print("ready", flush=True)
    for i in range(n):
        store.set(f"img{i:04d}/{tag}", STATUSES[i % 3], f"{tag} {i}")
        # a second writer also updates the same ids: last writer wins, history keeps both
        store.set(f"shared/{i:04d}", "accepted", tag)
        print(i, flush=True)
    """
)


def _run_writers(root: Path, n: int, sync: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(root), f"p{k}", str(n), sync], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(2)
    ]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.splitlines()[-1] == str(n - 1)


def test_two_processes_1000_decisions_lose_none(tmp_path: Path) -> None:
    ReviewStore(tmp_path)
    _run_writers(tmp_path, 500, "NORMAL")
    store = ReviewStore(tmp_path)
    got = store.decisions()
    assert sum(k.startswith("img") for k in got) == 1000
    assert {got[f"shared/{i:04d}"].note for i in range(500)} <= {"p0", "p1"}
    assert len(store.history()) == 2000
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_two_processes_1000_decisions_full_sync(tmp_path: Path) -> None:
    """The default durability (fsync per commit) under two writers."""
    _run_writers(tmp_path, 500, "FULL")
    assert sum(k.startswith("img") for k in ReviewStore(tmp_path).decisions()) == 1000


def test_killed_writer_loses_nothing_committed(tmp_path: Path) -> None:
    ReviewStore(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "k", "100000", "FULL"], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    committed = -1
    try:
        assert p.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        while committed < 40 and time.monotonic() - t0 < 60:
            committed = int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)  # mid-run: no cleanup, no checkpoint
    finally:
        p.kill()
        p.wait()
    for line in p.stdout.read().split():  # commits printed after our last read
        committed = max(committed, int(line))
    assert committed >= 40
    store = ReviewStore(tmp_path)
    got = store.decisions()
    for i in range(committed + 1):  # every set() that returned is there
        assert got[f"img{i:04d}/k"].note == f"k {i}"
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
