"""The results store (traitloc.io.store): rendering reproduces the engine, round trip, schema, readers, writers.

Rendering a stored row must give the engine's own full-size map: bit for bit from float32 grids, and within 1e-3 of
the map's maximum from float16 grids (the measured figure is printed; run with ``-s`` to see it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from traitloc.io.files import map_to_unit, mask_from_map
from traitloc.io.store import (
    GRID_DTYPES,
    ResultStore,
    StoreError,
    grid_of,
    read_results,
    render_map,
    render_mask,
    render_overlay,
    render_unit_map,
    result_id,
    results_dir,
    rows_of,
)

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = ["red wing", "Blue tail (male)", "yellow bill"]
COLUMNS = {"concept": "str", "score": "float", "n": "int", "flag": "bool"}
KEYS = ("image_key", "concept")


def _row(key: str, concept: str, grid: np.ndarray | None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"image": f"/imgs/{key}.png", "image_key": key, "concept": concept, "status": "ok"}
    if grid is not None:
        h, w = grid.shape
        row.update(grid=grid, grid_h=h, grid_w=w, width=4 * w, height=4 * h, raw_max=float(np.maximum(grid, 0).max()))
    row.update(extra)
    return row


def _engine_rows(res: Any, key: str) -> list[dict[str, Any]]:
    """Store rows of one image's :class:`~traitloc.models.localize.ConceptMaps` (as the localize job builds them)."""
    signed = res.signed.detach().float().cpu().numpy()
    H, W = res.size
    return [
        {"image": f"/imgs/{key}.png", "image_key": key, "concept": c, "status": "ok", "grid": signed[q],
         "grid_h": signed.shape[1], "grid_w": signed.shape[2], "width": W, "height": H, "resize": "stretch",
         "interpolation": "bilinear", "raw_max": float(np.maximum(signed[q], 0).max())}
        for q, c in enumerate(res.concepts)
    ]  # fmt: skip


def _images(n: int, seed0: int = 0) -> list[Image.Image]:
    from conftest import make_image_array

    sizes = [(64, 64), (120, 90), (50, 70), (201, 33), (17, 111), (300, 200)]
    return [Image.fromarray(make_image_array(sizes[i % len(sizes)], seed=seed0 + i)) for i in range(n)]


def _by_key(df: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["image_key"], r["concept"]): r for r in rows_of(df)}


# ------------------------------------------------------------------------------------------------------------------
# rendering reproduces the engine
# ------------------------------------------------------------------------------------------------------------------
def test_float32_store_renders_the_engines_maps_exactly(tmp_path: Path, tiny_bundle: Any) -> None:
    from traitloc.models.localize import ConceptLocalizer

    images = _images(6)
    results = ConceptLocalizer(tiny_bundle).explain(images, CONCEPTS, "bird", 1.0)
    store = ResultStore(tmp_path, {"concept": "str"}, KEYS, "float32")
    for i, res in enumerate(results):
        store.write(_engine_rows(res, f"im{i}"))
    rows = _by_key(read_results(tmp_path))
    assert len(rows) == len(images) * len(CONCEPTS)
    n_negative = 0
    for i, (im, res) in enumerate(zip(images, results, strict=True)):
        for q, c in enumerate(CONCEPTS):
            row = rows[(f"im{i}", c)]
            full = render_map(row)
            assert full.shape == (im.height, im.width) and full.dtype == np.float32
            np.testing.assert_array_equal(full, res.map(q))
            np.testing.assert_array_equal(render_map(row, signed=True), res.map(q, signed=True))
            np.testing.assert_array_equal(render_map(row, (31, 47)), res.map(q, (31, 47)))
            np.testing.assert_array_equal(render_unit_map(row), map_to_unit(res.map(q)))
            np.testing.assert_array_equal(render_mask(row), mask_from_map(map_to_unit(res.map(q)), 0.5))
            np.testing.assert_array_equal(render_mask(row, "otsu"), mask_from_map(map_to_unit(res.map(q)), "otsu"))
            # raw_max is the grid's max; the full-size map reaches it only where a pixel centre meets a cell centre
            assert row["raw_max"] == float(res.signed[q].clamp_min(0).max())
            assert full.max() <= row["raw_max"] * (1 + 1e-6)
            assert row["interpolation"] == "bilinear"
            n_negative += int((res.map(q, signed=True) < 0).any())
    assert n_negative > 0  # the signed maps carry evidence for the base: a ReLU'd grid would not pass


def test_localize_run_renders_the_engines_maps_exactly(
    tmp_path: Path,
    image_factory: Callable[..., Path],
    tiny_clip_config: Path,
    tiny_clip_weights: Path,
    tiny_bundle: Any,
) -> None:
    """End to end: ``traitloc localize`` (float32 grids) then render == ``ConceptLocalizer.explain`` at full size."""
    from traitloc.cli.commands import main
    from traitloc.data.images import load_image
    from traitloc.models.localize import ConceptLocalizer

    paths = [image_factory(f"im{i}.png", size, seed=i) for i, size in enumerate([(64, 64), (120, 90), (50, 70)])]
    out = tmp_path / "out"
    argv = ["localize", str(tmp_path / "images"), *[a for c in CONCEPTS for a in ("--concept", c)], "--base", "bird",
            "--batch-size", "1", "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights),
            "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = _by_key(read_results(out))
    loc = ConceptLocalizer(tiny_bundle)
    for p in paths:
        (res,) = loc.explain([load_image(p).image], CONCEPTS, "bird", 1.0)
        for q, c in enumerate(CONCEPTS):
            row = rows[(p.stem, c)]
            assert (row["width"], row["height"]) == Image.open(p).size
            np.testing.assert_array_equal(render_map(row), res.map(q))
            np.testing.assert_array_equal(render_map(row, signed=True), res.map(q, signed=True))


def _f16_error(full32: np.ndarray, full16: np.ndarray) -> float:
    peak = float(np.abs(full32).max())
    return 0.0 if peak == 0 else float(np.abs(full16.astype(np.float64) - full32).max() / peak)


@pytest.mark.slow
def test_float16_rendering_error_is_within_1e_3_of_the_maps_max(
    tmp_path: Path, tiny_bundle: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Max abs error of maps rendered from float16 grids, relative to each map's max, over many engine maps."""
    from traitloc.models.localize import ConceptLocalizer

    loc = ConceptLocalizer(tiny_bundle)
    concepts = [f"trait {k}" for k in range(8)]
    images = _images(24, seed0=100)
    stores = {d: ResultStore(tmp_path / d, {"concept": "str"}, KEYS, d) for d in GRID_DTYPES}
    engine = {}
    for i in range(0, len(images), 6):
        for j, res in enumerate(loc.explain(images[i : i + 6], concepts, "bird", 1.0), start=i):
            engine[f"im{j}"] = res
            for store in stores.values():
                store.write(_engine_rows(res, f"im{j}"))
    r32, r16 = (_by_key(read_results(tmp_path / d)) for d in GRID_DTYPES)
    assert r32.keys() == r16.keys() and len(r32) == len(images) * len(concepts)
    worst = {"relu": 0.0, "signed": 0.0}
    peaks = []
    for (key, c), row in r32.items():
        q = concepts.index(c)
        np.testing.assert_array_equal(render_map(row), engine[key].map(q))  # float32: exact
        for kind, signed in (("relu", False), ("signed", True)):
            full32 = render_map(row, signed=signed)
            full16 = render_map(r16[(key, c)], signed=signed)
            assert full16.shape == full32.shape
            worst[kind] = max(worst[kind], _f16_error(full32, full16))
        peaks.append(float(render_map(row).max()))
    # and random grids of other shapes and scales, as other models and methods give: this tiny model's maps peak at
    # about 1e-2, a random ViT-B-16's at 5e-5..2e-4, below float16's smallest normal number (6.1e-5)
    rng = np.random.default_rng(0)
    synth = ResultStore(tmp_path / "synth", {"concept": "str"}, KEYS, "float16")
    grids = []
    for k in range(200):
        h, w = int(rng.integers(2, 17)), int(rng.integers(2, 17))
        scale = 10.0 ** rng.uniform(-7, 3)
        g = (rng.standard_normal((h, w)) * scale).astype(np.float32)
        grids.append(g)
        synth.write([_row(f"s{k}", "x", g)])
    for row in rows_of(read_results(tmp_path / "synth")):
        g = grids[int(row["image_key"][1:])]
        size = (int(row["height"]) * 3 + 1, int(row["width"]) * 3 + 2)
        row32 = {**row, "grid": g, "grid_scale": None}
        for kind, signed in (("relu", False), ("signed", True)):
            worst[kind] = max(worst[kind], _f16_error(render_map(row32, size, signed), render_map(row, size, signed)))
    with capsys.disabled():
        print(
            f"\nfloat16 grids: max abs error / map max = {worst['relu']:.3g} (ReLU maps), {worst['signed']:.3g} "
            f"(signed maps) over {len(r32)} engine maps (raw max {min(peaks):.2g}..{max(peaks):.2g}) and "
            f"{len(grids)} random grids"
        )
    assert 0 < worst["relu"] <= 1e-3
    assert 0 < worst["signed"] <= 1e-3
    sizes = {d: sum(p.stat().st_size for p in results_dir(tmp_path / d).glob("*.parquet")) for d in GRID_DTYPES}
    assert sizes["float16"] < sizes["float32"]


# ------------------------------------------------------------------------------------------------------------------
# round trip and schema
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid_dtype", GRID_DTYPES)
def test_round_trip_keeps_values_and_types(tmp_path: Path, grid_dtype: str) -> None:
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    g1 = rng.standard_normal((4, 5)).astype(np.float32)
    g2 = rng.standard_normal((7, 3)).astype(np.float32)
    store = ResultStore(tmp_path, COLUMNS, KEYS, grid_dtype)
    path = store.write(
        [
            _row("a", "red wing", g1, score=0.25, n=3, flag=True, resize="stretch", interpolation="bilinear"),
            _row("b", "red wing", g2, score=-1.5, n=-7, flag=False),
            _row("c", "red wing", None, status="error: cannot identify image file"),  # no grid, no size, no score
        ]
    )
    assert path is not None and path.parent == results_dir(tmp_path) and path.name.startswith("part-")
    assert store.write([]) is None
    assert store.parts_written == 1 and store.bytes_written == path.stat().st_size

    schema = pq.read_schema(path)
    assert str(schema.field("grid").type) == f"list<element: {'float' if grid_dtype == 'float32' else 'halffloat'}>"
    assert str(schema.field("width").type) == "int64" and str(schema.field("n").type) == "int64"
    assert str(schema.field("score").type) == "double" and str(schema.field("flag").type) == "bool"
    assert schema.metadata[b"traitloc.keys"] == b"image_key,concept"

    df = read_results(tmp_path)
    assert list(df["image_key"]) == ["a", "b", "c"]
    # integers stay integers although the error row leaves them empty
    for col in ("width", "height", "grid_h", "grid_w", "n"):
        assert str(df[col].dtype) == "Int64", col
    assert df["n"].tolist()[:2] == [3, -7] and df["n"].isna().tolist() == [False, False, True]
    assert df["score"].dtype == np.float64 and df["score"].tolist()[:2] == [0.25, -1.5]
    assert df["flag"].tolist()[:2] == [True, False]
    a, b, c = rows_of(df)
    assert (a["width"], a["height"], a["grid_h"], a["grid_w"]) == (20, 16, 4, 5)
    assert a["result_id"] == "a/red-wing" == result_id(a)
    assert c["status"] == "error: cannot identify image file"
    if grid_dtype == "float32":
        np.testing.assert_array_equal(grid_of(a), g1)
        np.testing.assert_array_equal(grid_of(b), g2)
    else:  # within float16's precision relative to the grid's max, whatever the grid's scale
        np.testing.assert_allclose(grid_of(a), g1, rtol=0, atol=float(np.abs(g1).max()) * 2**-11)
        assert a["grid_scale"] == pytest.approx(float(np.abs(g1).max()))
    assert grid_of(b).shape == (7, 3) and grid_of(b).dtype == np.float32
    with pytest.raises(StoreError, match="has no map"):
        grid_of(c)
    with pytest.raises(StoreError, match="has no map"):
        render_map(c)
    with pytest.raises(StoreError, match="does not match"):
        grid_of({**a, "grid_h": 3})
    # reading a few columns, with filters, and the results folder itself
    part = read_results(tmp_path / "results", columns=["concept", "score"])
    assert list(part.columns) == ["concept", "score"] and len(part) == 3
    assert read_results(tmp_path, filters=[("score", ">", 0)])["image_key"].tolist() == ["a"]


@pytest.mark.parametrize("scale", [1e-7, 1e-5, 1.0, 1e4])
def test_float16_grids_keep_their_precision_at_any_scale(tmp_path: Path, scale: float) -> None:
    """CLIP maps peak at 1e-5..1e-2: float16 values as they are would keep only a few bits of the small ones."""
    g = (np.random.default_rng(5).standard_normal((14, 14)) * scale).astype(np.float32)
    ResultStore(tmp_path, COLUMNS, KEYS, "float16").write([_row("a", "x", g), _row("z", "x", np.zeros((2, 2)))])
    a, z = rows_of(read_results(tmp_path))
    np.testing.assert_allclose(grid_of(a), g, rtol=0, atol=float(np.abs(g).max()) * 2**-11)
    full = render_map({**a, "grid": g, "grid_scale": None}, (200, 300))
    assert np.abs(render_map(a, (200, 300)) - full).max() <= 1e-3 * full.max()
    assert not grid_of(z).any()  # an all-zero grid stays zero


def test_empty_store_reads_as_an_empty_table(tmp_path: Path) -> None:
    assert read_results(tmp_path).empty
    assert list(read_results(tmp_path, columns=["image_key", "concept"]).columns) == ["image_key", "concept"]
    assert ResultStore(tmp_path, COLUMNS, KEYS).done_keys() == set()


def test_bad_store_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="grid_dtype"):
        ResultStore(tmp_path, COLUMNS, KEYS, "float64")
    with pytest.raises(StoreError, match="unknown type"):
        ResultStore(tmp_path, {"x": "complex"}, KEYS)
    with pytest.raises(StoreError, match="'grid'"):
        ResultStore(tmp_path, {"grid": "str"}, KEYS)
    with pytest.raises(StoreError, match="key columns"):
        ResultStore(tmp_path, COLUMNS, ("image_key", "nope"))


def test_render_overlay_and_custom_sizes(tmp_path: Path) -> None:
    g = np.zeros((4, 4), np.float32)
    g[1, 2] = 2.0
    g[3, 0] = -5.0
    row = {**_row("a", "x", g), "width": 40, "height": 30}
    assert render_map(row).shape == (30, 40)
    assert render_map(row, (7, 9)).shape == (7, 9)
    unit = render_unit_map(row)
    assert unit.max() == pytest.approx(1.0) and unit.min() == 0.0
    image = Image.new("RGB", (20, 15), (10, 200, 30))  # a reduced copy of the photo: the overlay follows its size
    ov = render_overlay(row, image)
    assert ov.shape == (15, 20, 3) and ov.dtype == np.uint8
    assert render_overlay(row, np.asarray(image)).shape == (15, 20, 3)
    zero = {**row, "grid": np.full((4, 4), -1.0, np.float32)}  # all negative: an all-zero map stays zero
    assert not render_unit_map(zero).any() and not render_mask(zero).any()
    with pytest.raises(StoreError, match="interpolation"):
        render_map({**row, "interpolation": "nearest"})


# ------------------------------------------------------------------------------------------------------------------
# dedupe, readers, temporary files, damaged parts
# ------------------------------------------------------------------------------------------------------------------
def test_dedupe_keeps_the_last_written_row_per_key(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, COLUMNS, KEYS)
    g = np.ones((2, 2), np.float32)
    for i in range(12):  # many parts within the same second: the order of writing must still decide
        store.write([_row("a", "red wing", g * (i + 1), score=float(i)), _row(f"b{i}", "red wing", g, score=0.0)])
    df = read_results(tmp_path)
    assert len(df) == 1 + 12
    (a,) = [r for r in rows_of(df) if r["image_key"] == "a"]
    assert a["score"] == 11.0 and grid_of(a)[0, 0] == 12.0
    assert len(read_results(tmp_path, dedupe=False)) == 2 * 12
    assert ResultStore(tmp_path, COLUMNS, KEYS).done_keys() == {("a", "red wing")} | {
        (f"b{i}", "red wing") for i in range(12)
    }


def _store_with_parts(out: Path, n_parts: int = 3, per_part: int = 4) -> int:
    store = ResultStore(out, COLUMNS, KEYS, "float16")
    rng = np.random.default_rng(3)
    for p in range(n_parts):
        store.write(
            [_row(f"im{p}_{k}", c, rng.standard_normal((3, 3)).astype(np.float32), score=float(k)) for k in
             range(per_part) for c in ("red wing", "bill")]
        )  # fmt: skip
    return n_parts * per_part * 2


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow.parquet as pq
    from traitloc.io.store import ResultStore

    def half_then_killed(table, where, **kw):  # a writer killed half-way through a part
        pq.__dict__["_real_write_table"](table, where, **kw)
        data = open(where, "rb").read()
        open(where, "wb").write(data[: len(data) // 2])
        os._exit(137)

    pq._real_write_table = pq.write_table
    pq.write_table = half_then_killed
    ResultStore(sys.argv[1], {"concept": "str"}, ["image_key", "concept"]).write(
        [{"image_key": "killed", "concept": "bill", "status": "ok"}]
    )
    """
)


def _hidden_temp_part(out: Path) -> Path:
    """What a writer killed during a write leaves (and any writer leaves while it writes): a partial temporary part."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=env, capture_output=True, timeout=120)
    assert res.returncode == 137, res.stderr.decode(errors="replace")[-2000:]
    (tmp,) = [p for p in results_dir(out).iterdir() if p.name.startswith(".")]
    assert tmp.stat().st_size > 0
    return tmp


def test_pandas_and_pyarrow_read_a_run_in_one_call_and_skip_temporary_files(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow.dataset as ds

    n = _store_with_parts(tmp_path)
    _hidden_temp_part(tmp_path)
    df = pd.read_parquet(tmp_path / "results")
    assert len(df) == n and {"image_key", "concept", "score", "grid", "width"} <= set(df.columns)
    assert len(ds.dataset(tmp_path / "results", format="parquet").to_table()) == n
    assert len(read_results(tmp_path)) == n


def test_duckdb_reads_a_run_in_one_call_and_skips_temporary_files(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    n = _store_with_parts(tmp_path)
    _hidden_temp_part(tmp_path)
    glob = (tmp_path / "results" / "*.parquet").as_posix()
    assert duckdb.sql(f"select count(*) from '{glob}'").fetchall()[0][0] == n
    per = duckdb.sql(f"select concept, count(*), avg(score) from '{glob}' group by concept order by concept").fetchall()
    assert [(c, k) for c, k, _ in per] == [("bill", n // 2), ("red wing", n // 2)]
    assert duckdb.sql(f"select len(grid) from '{glob}' limit 1").fetchall()[0][0] == 9


def test_a_damaged_part_gives_a_clear_store_error(tmp_path: Path) -> None:
    _store_with_parts(tmp_path)
    parts = sorted(results_dir(tmp_path).glob("part-*.parquet"))
    data = parts[-1].read_bytes()
    parts[-1].write_bytes(data[: len(data) // 2])  # truncated: not what the store writes, but a disk can do it
    with pytest.raises(StoreError, match="not a readable traitloc store"):
        read_results(tmp_path)
    with pytest.raises(StoreError):
        ResultStore(tmp_path, COLUMNS, KEYS).done_keys()
    parts[-1].write_text("not parquet at all\n")
    with pytest.raises(StoreError, match="not a readable traitloc store"):
        read_results(tmp_path, columns=["image_key"])
    # the damaged part in the middle of the list, not the first one that is opened
    parts[-1].write_bytes(data)
    data0 = parts[1].read_bytes()
    parts[1].write_bytes(data0[:-10])
    with pytest.raises(StoreError, match=parts[1].name):
        read_results(tmp_path)


def test_a_failed_write_leaves_no_part_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    _store_with_parts(tmp_path, 1)
    before = sorted(p.name for p in results_dir(tmp_path).iterdir())

    def broken(table: Any, where: Any, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a part")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        ResultStore(tmp_path, COLUMNS, KEYS).write([_row("z", "bill", np.ones((2, 2), np.float32))])
    assert sorted(p.name for p in results_dir(tmp_path).iterdir()) == before


# ------------------------------------------------------------------------------------------------------------------
# many writers at once
# ------------------------------------------------------------------------------------------------------------------
def test_writer_threads_writing_at_once_never_collide(tmp_path: Path) -> None:
    n_threads, n_parts = 8, 6
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            store = ResultStore(tmp_path, COLUMNS, KEYS, "float16")
            barrier.wait()
            for p in range(n_parts):
                store.write([_row(f"t{t}p{p}", c, np.full((2, 3), t, np.float32)) for c in ("red wing", "bill")])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(list(results_dir(tmp_path).glob("part-*.parquet"))) == n_threads * n_parts
    assert not [p for p in results_dir(tmp_path).iterdir() if p.name.startswith(".")]
    df = read_results(tmp_path, dedupe=False)
    assert len(df) == n_threads * n_parts * 2 and not df.duplicated(["image_key", "concept"]).any()


WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from traitloc.io.store import ResultStore
    out, w, n_parts, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    store = ResultStore(out, {"concept": "str"}, ["image_key", "concept"])
    while time.time() < start:
        time.sleep(0.001)
    for p in range(n_parts):
        store.write([{"image_key": f"w{w}p{p}", "concept": c, "status": "ok", "grid": np.full((3, 3), w, np.float32),
                      "grid_h": 3, "grid_w": 3, "width": 9, "height": 9} for c in ("red wing", "bill")])
    """
)


@pytest.mark.slow
def test_writer_processes_writing_at_once_never_collide(tmp_path: Path) -> None:
    import time

    n_procs, n_parts = 4, 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 4.0  # every process starts writing at the same moment, after importing
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), str(n_parts), str(start)], env=env)
        for w in range(n_procs)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * n_procs
    assert len(list(results_dir(tmp_path).glob("part-*.parquet"))) == n_procs * n_parts
    df = read_results(tmp_path, dedupe=False)
    assert len(df) == n_procs * n_parts * 2 and not df.duplicated(["image_key", "concept"]).any()
    for row in rows_of(df):
        assert grid_of(row)[0, 0] == float(row["image_key"][1])
