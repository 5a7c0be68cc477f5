"""Tests for traitloc.io.csvlog.ResultsTable."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from traitloc.io.csvlog import ResultsTable

COLUMNS = ["image", "image_key", "concept", "gamma", "raw_max", "status"]
KEYS = ["image_key", "concept"]
REPO = Path(__file__).resolve().parents[1]


def _row(key: str, concept: str = "red wing", status: str = "ok", **extra: object) -> dict[str, object]:
    return {
        "image": f"imgs/{key}.jpg",
        "image_key": key,
        "concept": concept,
        "gamma": 1.0,
        "raw_max": 0.25,
        "status": status,
        **extra,
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_new_table_does_not_create_file_until_append(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.csv"
    table = ResultsTable(path, COLUMNS, KEYS)
    assert len(table) == 0 and table.done_keys() == set() and not path.exists()
    table.append([])
    assert not path.exists()
    table.append([_row("a"), _row("b", status="error: truncated or corrupt JPEG")])
    assert path.exists()
    rows = _read_csv(path)
    assert [r["image_key"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == COLUMNS


def test_resume_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    first = ResultsTable(path, COLUMNS, KEYS)
    first.append([_row("a"), _row("a", "blue crown")])
    first.append([_row("b", status="error: not an image file")])
    again = ResultsTable(path, COLUMNS, KEYS)
    assert again.done_keys() == {("a", "red wing"), ("a", "blue crown")}
    assert again.done_keys("error: not an image file") == {("b", "red wing")}
    assert again.done_keys(None) == first.done_keys(None)
    assert again.rows() == first.rows()
    assert again.key_of(_row("a")) in again.done_keys()
    assert again.get(("a", "red wing"))["gamma"] == "1.0"
    # values come back as the text written: float repr round-trips
    assert float(again.get(("a", "red wing"))["raw_max"]) == 0.25


def test_truncated_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    table = ResultsTable(path, COLUMNS, KEYS)
    table.append([_row("a"), _row("b")])
    complete = path.read_bytes()
    # a run killed while writing row "c": part of the line, no newline
    with open(path, "ab") as handle:
        handle.write(b"imgs/c.jpg,c,red wing,1.0,0.2")
    resumed = ResultsTable(path, COLUMNS, KEYS)
    assert resumed.dropped_partial_line
    assert resumed.done_keys() == {("a", "red wing"), ("b", "red wing")}
    assert path.read_bytes().startswith(complete)  # reading never modifies the file
    resumed.append([_row("c")])
    rows = _read_csv(path)
    assert [r["image_key"] for r in rows] == ["a", "b", "c"]
    assert all(len(r) == len(COLUMNS) and None not in r for r in rows)
    assert ResultsTable(path, COLUMNS, KEYS).done_keys() == {(k, "red wing") for k in "abc"}


def test_partial_header_only(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(b"image,image_k")  # killed while writing the header
    table = ResultsTable(path, COLUMNS, KEYS)
    assert len(table) == 0 and table.dropped_partial_line
    table.append([_row("a")])
    assert [r["image_key"] for r in _read_csv(path)] == ["a"]


def test_duplicates_keep_last_and_rewrite_compacts(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    table = ResultsTable(path, COLUMNS, KEYS)
    table.append([_row("a", status="error: out of memory"), _row("b")])
    table.append([_row("a", raw_max=0.75)])  # retried, now ok
    assert len(_read_csv(path)) == 3
    loaded = ResultsTable(path, COLUMNS, KEYS)
    assert loaded.duplicates == 1 and len(loaded) == 2
    assert loaded.done_keys() == {("a", "red wing"), ("b", "red wing")}
    assert loaded.get(("a", "red wing"))["raw_max"] == "0.75"
    loaded.rewrite()
    rows = _read_csv(path)
    assert [(r["image_key"], r["raw_max"]) for r in rows] == [("b", "0.25"), ("a", "0.75")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp litter
    assert ResultsTable(path, COLUMNS, KEYS).rows() == loaded.rows()


def test_rewrite_creates_header_only_file(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    ResultsTable(path, COLUMNS, KEYS).rewrite()
    assert path.read_text() == ",".join(COLUMNS) + "\n"


def test_extra_columns_and_special_values(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write("status,image_key,note,image,concept,gamma,raw_max\n")  # other order, one extra column
        handle.write('ok,old,"kept, with comma",imgs/old.jpg,red wing,1.0,0.5\n')
    table = ResultsTable(path, COLUMNS, KEYS)
    assert table.header[2] == "note"
    table.append(
        [
            _row("x", concept='say "hi", then\nleave', note=None),
            _row("y", status="error: line one\r\nline two", note="n"),
        ]
    )
    back = ResultsTable(path, COLUMNS, KEYS)
    assert back.get(("old", "red wing"))["note"] == "kept, with comma"
    assert back.get(("x", 'say "hi", then leave'))["note"] == ""
    assert back.get(("y", "red wing"))["status"] == "error: line one line two"
    assert len(path.read_text().splitlines()) == 4  # one line per row
    assert back.key_of(_row("x", concept='say "hi", then\nleave')) in back.done_keys()


def test_column_errors(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    table = ResultsTable(path, COLUMNS, KEYS)
    with pytest.raises(ValueError, match="unknown columns bogus"):
        table.append([_row("a", bogus=1)])
    incomplete = _row("a")
    del incomplete["raw_max"]
    with pytest.raises(ValueError, match="lacks columns: raw_max"):
        table.append([_row("b"), incomplete])
    assert not path.exists()  # a bad batch writes nothing
    with pytest.raises(ValueError, match="empty key"):
        table.append([_row("")])
    with pytest.raises(TypeError, match="single mapping"):
        table.append(_row("a"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_columns not in columns: nope"):
        ResultsTable(path, COLUMNS, ["nope"])
    with pytest.raises(ValueError, match="duplicate"):
        ResultsTable(path, ["a", "a"], ["a"])
    with pytest.raises(TypeError, match="columns"):
        ResultsTable(path, "image", ["image"])
    path.write_text("image,image_key,status\nx,y,ok\n")
    with pytest.raises(ValueError, match="lacks columns concept, gamma, raw_max"):
        ResultsTable(path, COLUMNS, KEYS)
    no_status = tmp_path / "plain.csv"
    plain = ResultsTable(no_status, ["k", "v"], ["k"])
    plain.append([{"k": 1, "v": 2}])
    assert plain.done_keys(None) == {("1",)}
    with pytest.raises(ValueError, match="status"):
        plain.done_keys()


def test_malformed_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("image,image_key,concept,gamma,raw_max,status\na,b\nc,d,e,f,g,ok\n")
    with pytest.raises(ValueError, match="line 2: 2 fields, expected 6"):
        ResultsTable(path, COLUMNS, KEYS)


_KILLED_WRITER = """
import os, sys
from traitloc.io.csvlog import ResultsTable
columns = ["image_key", "concept", "status"]
table = ResultsTable(sys.argv[1], columns, ["image_key", "concept"])
done = table.done_keys()
for i in range(200):
    row = {"image_key": f"img{i:04d}", "concept": "c", "status": "ok"}
    if table.key_of(row) in done:
        continue
    table.append([row])
    if i == int(sys.argv[2]):
        with open(sys.argv[1], "ab") as handle:  # simulate the kill in the middle of the next append
            handle.write(b"img9999,c,o")
        os._exit(9)
"""


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), "6"], env=env)
    assert first.returncode == 9
    assert ResultsTable(path, ["image_key", "concept", "status"], ["image_key", "concept"]).done_keys() == {
        (f"img{i:04d}", "c") for i in range(7)
    }
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), "-1"], env=env, check=True)
    rows = _read_csv(path)
    assert [r["image_key"] for r in rows] == [f"img{i:04d}" for i in range(200)]
    assert all(r["status"] == "ok" for r in rows)
