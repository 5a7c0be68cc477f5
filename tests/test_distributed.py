"""The parts of :mod:`traitloc.pipelines.distributed` that need no Ray: part names, duplicate compaction, item
encoding, errors.

The runs on a Ray instance are in ``test_ray.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from traitloc.io.store import ResultStore, StoreError, part_files, read_results
from traitloc.pipelines.distributed import (
    RayUnavailableError,
    _actor_resources,
    batch_part_name,
    compact_duplicates,
    decode_item,
    encode_item,
)

COLUMNS = {"concept": "str", "score": "float"}
KEYS = ("image_key", "concept")


def rows(image: str, concepts: list[str], value: float) -> list[dict[str, Any]]:
    return [
        {"image": f"/x/{image}.png", "image_key": image, "concept": c, "score": value, "status": "ok",
         "grid": np.full((2, 2), value, np.float32), "grid_h": 2, "grid_w": 2, "width": 4, "height": 4}
        for c in concepts
    ]  # fmt: skip


def test_batch_part_name_is_fixed_by_the_batch() -> None:
    a = batch_part_name("20260101T000000-rayabc", [("b", "red"), ("a", "red"), ("a", "blue")])
    b = batch_part_name("20260101T000000-rayabc", [("a", "blue"), ("b", "red"), ("a", "red")])
    assert a == b and a.startswith("part-20260101T000000-rayabc-") and a.endswith(".parquet")
    assert batch_part_name("20260101T000000-rayabc", [("a", "blue")]) != a
    assert batch_part_name("20260101T000000-raydef", [("b", "red"), ("a", "red"), ("a", "blue")]) != a


def test_named_part_is_replaced_not_added(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, COLUMNS, KEYS)
    store.write(rows("a", ["red", "blue"], 1.0), name="part-run-x.parquet")
    store.write(rows("a", ["red", "blue"], 2.0), name="part-run-x.parquet")  # a retried batch
    assert [p.name for p in part_files(tmp_path)] == ["part-run-x.parquet"]
    df = read_results(tmp_path, dedupe=False)
    assert len(df) == 2 and (df["score"] == 2.0).all()
    for bad in ("../part-x.parquet", "x.parquet", "sub/part-x.parquet"):
        with pytest.raises(StoreError, match="part name"):
            store.write(rows("a", ["red"], 1.0), name=bad)


def test_compact_duplicates_keeps_the_last_copy_of_each_key(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, COLUMNS, KEYS)
    store.write(rows("a", ["red", "blue"], 1.0), name="part-1.parquet")
    store.write(rows("b", ["red"], 1.0), name="part-2.parquet")
    store.write(rows("a", ["red"], 3.0) + rows("c", ["red"], 3.0), name="part-3.parquet")
    store.write(rows("b", ["red"], 4.0), name="part-4.parquet")
    assert compact_duplicates(tmp_path, KEYS) == 2
    df = read_results(tmp_path, dedupe=False)
    assert not df.duplicated(list(KEYS)).any() and len(df) == 4
    got = {(k, c): s for k, c, s in df[["image_key", "concept", "score"]].itertuples(index=False)}
    assert got == {("a", "red"): 3.0, ("a", "blue"): 1.0, ("b", "red"): 4.0, ("c", "red"): 3.0}
    assert [p.name for p in part_files(tmp_path)] == ["part-1.parquet", "part-3.parquet", "part-4.parquet"]
    grid = df.loc[df["image_key"] == "a"].set_index("concept").loc["red", "grid"]
    np.testing.assert_array_equal(np.asarray(grid), np.full(4, 3.0, np.float32))  # the rows keep their maps
    assert compact_duplicates(tmp_path, KEYS) == 0


@pytest.mark.parametrize("item", [Path("/a/b c.png"), ("/a/b.png", "b"), "plain"])
def test_items_survive_the_trip_to_the_actors(item: Any) -> None:
    back = decode_item(encode_item(item))
    assert back == item and type(back) is type(item)


def test_unknown_item_type_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot send"):
        encode_item(3.5)


def test_ray_missing_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> None:
    """``--ray`` without the extra installed: exit status 2 and one line naming the extra (before any model work)."""
    import traitloc.pipelines.distributed as dist
    from traitloc.cli.commands import main

    def no_ray() -> Any:
        raise RayUnavailableError('running on Ray needs the ray extra: pip install "traitloc[ray]" (ray[data])')

    monkeypatch.setattr(dist, "_ray", no_ray)
    (tmp_path / "img.png").write_bytes(b"")
    rc = main(["localize", str(tmp_path / "img.png"), "--concept", "red", "--model", "/no/such/config.json",
               "--pretrained", "none", "--out", str(tmp_path / "o"), "--ray"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "traitloc[ray]" in err


@pytest.mark.parametrize(
    ("gpus", "cpus", "actors", "device", "expected"),
    [
        (2, 16, 2, "auto", (1.0, 8.0)),  # one GPU per actor, CPUs split (at most 8 decode threads)
        (2, 16, 3, "auto", (0.5, 5.0)),  # more actors than GPUs: equal shares that pack (2 per GPU)
        (1, 16, 4, "cuda", (0.25, 4.0)),
        (2, 16, 2, "cpu", (0.0, 8.0)),  # --device cpu: CPU actors even on a GPU cluster
        (0, 2, 1, "auto", (0.0, 2.0)),  # CPU actors: torch threads = CPUs per actor
        (0, 2, 2, "auto", (0.0, 1.0)),
    ],
)
def test_actor_resources(gpus: int, cpus: int, actors: int, device: str, expected: tuple[float, float]) -> None:
    assert _actor_resources({"gpus": gpus, "cpus": cpus}, actors, device) == expected


def test_actor_resources_refuses_what_the_cluster_cannot_hold() -> None:
    with pytest.raises(RayUnavailableError, match="has no GPUs"):
        _actor_resources({"gpus": 0, "cpus": 8}, 1, "cuda")
    with pytest.raises(RayUnavailableError, match="only 2 CPUs"):
        _actor_resources({"gpus": 0, "cpus": 2}, 3, "auto")
