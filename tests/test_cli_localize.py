"""End-to-end tests of ``traitloc localize`` through ``traitloc.cli.commands.main`` and the console script.

The result of a run is its store (``OUT/results/part-*.parquet``, read with :func:`traitloc.io.store.read_results`
and rendered with the ``render_*`` functions); ``results.csv`` summarizes it; ``--save`` also writes files.
Every run uses the tiny random open_clip ViT of ``conftest.py`` (64 px input, 4 x 4 patch grid) on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from traitloc.cli.commands import build_parser, main
from traitloc.io.files import map_to_unit, read_map_tiff, slugify
from traitloc.io.store import (
    grid_of,
    read_results,
    render_map,
    render_mask,
    render_overlay,
    render_unit_map,
    results_dir,
    rows_of,
)
from traitloc.pipelines.localize import NO_BASE

REQUIRED_COLUMNS = ["image", "image_key", "concept", "base", "gamma", "method", "raw_max", "map", "mask", "status"]
RUN_JSON_KEYS = [
    "argv", "model", "pretrained", "pretrained_sha256", "device", "dtype", "image_size", "prompts", "gamma",
    "method", "target_layer", "seed", "start_utc", "end_utc", "environment", "truncated_prompts", "cwd", "inputs",
    "text_cache", "store", "timing", "status", "counts",
]  # fmt: skip
CONCEPTS = ["red wing", "Blue tail (male)"]
ALL_SAVE = "maps,masks,overlays,signed"


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def model_args(tiny_clip_config: Path, tiny_clip_weights: Path) -> list[str]:
    return ["--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu"]


def concept_args(concepts: Sequence[str]) -> list[str]:
    return [a for c in concepts for a in ("--concept", c)]


def run(
    capsys: pytest.CaptureFixture[str], args: Sequence[str], model_args: Sequence[str], quiet: bool = True
) -> tuple[int, str]:
    """``traitloc localize ARGS`` in this process; returns (exit status, stderr)."""
    argv = ["localize", *args, *model_args, *(["--quiet"] if quiet else [])]
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def read_rows(out: Path) -> list[dict[str, str]]:
    """results.csv, the spreadsheet summary."""
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def store_rows(out: Path) -> list[dict[str, Any]]:
    """Every row of the run's store (not deduplicated: a key stored twice would show up)."""
    return list(rows_of(read_results(out, dedupe=False)))


def rows_by(rows: list[dict[str, Any]], image_name: str) -> list[dict[str, Any]]:
    return [r for r in rows if Path(r["image"]).name == image_name]


def one(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    (row,) = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return row


def temp_files(out: Path) -> list[Path]:
    """Hidden or temporary files left in the output folder (atomic writers use hidden ``.name.xxx.tmp[.ext]``)."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def file_state(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every output file except run.json (rewritten on every run, by design)."""
    return {
        p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def check_store_row(row: dict[str, Any], size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Check one ``ok`` store row against the contract; return its full-size [0, 1] map (rendered)."""
    assert row["status"] == "ok", row
    assert row["result_id"] == f"{row['image_key']}/{slugify(row['concept'])}"
    assert row["interpolation"] == "bilinear" and row["resize"] in ("stretch", "aspect")
    g = grid_of(row)
    assert g.shape == (row["grid_h"], row["grid_w"]) and np.isfinite(g).all()
    assert row["raw_max"] == pytest.approx(float(np.maximum(g, 0).max()), rel=1e-6)
    if size_hw is not None:
        assert (row["height"], row["width"]) == size_hw
    m = render_unit_map(row)
    assert m.shape == (row["height"], row["width"]) and m.dtype == np.float32
    assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
    assert m.max() == pytest.approx(1.0) or m.max() == 0.0
    return m


def check_saved_files(out: Path, row: dict[str, str], store_row: dict[str, Any], threshold: float = 0.5) -> np.ndarray:
    """``--save maps,masks,overlays``: the files of one ``ok`` row follow the contract and equal the renderings."""
    assert row["status"] == "ok", row
    key, slug = row["image_key"], slugify(row["concept"])
    assert row["map"] == f"maps/{key}/{slug}.tif"
    assert row["mask"] == f"masks/{key}/{slug}.png"
    assert row["overlay"] == f"overlays/{key}/{slug}.png"
    with tifffile.TiffFile(out / row["map"]) as tif:
        assert len(tif.pages) == 1 and tif.pages[0].dtype == np.float32
    m, meta = read_map_tiff(out / row["map"])
    np.testing.assert_array_equal(m, render_unit_map(store_row))  # the file is a rendering of the store row
    for k in ("concept", "base", "gamma", "method", "model", "pretrained", "target_layer", "raw_max"):
        assert k in meta, k
    assert meta["concept"] == row["concept"] and meta["method"] == row["method"]
    assert float(row["raw_max"]) == pytest.approx(meta["raw_max"])
    with Image.open(out / row["mask"]) as im:
        assert im.mode == "L"
        mask = np.asarray(im)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, render_mask(store_row, threshold))
    np.testing.assert_array_equal(mask == 255, m > threshold)
    with Image.open(out / row["overlay"]) as im:
        assert im.mode == "RGB"
        im.load()
    return m


def check_csv_matches_store(out: Path) -> list[dict[str, str]]:
    """results.csv lists every stored (image, concept) exactly once, with the store's values."""
    rows = read_rows(out)
    store = {(r["image_key"], r["concept"]): r for r in store_rows(out)}
    keys = Counter((r["image_key"], r["concept"]) for r in rows)
    assert set(keys.values()) == {1} and set(keys) == set(store)
    for r in rows:
        s = store[(r["image_key"], r["concept"])]
        assert r["status"] == s["status"] and r["image"] == s["image"] and r["base"] == s["base"]
        if s["status"] == "ok":
            assert float(r["raw_max"]) == s["raw_max"] and float(r["gamma"]) == s["gamma"]
            assert (int(r["width"]), int(r["height"])) == (s["width"], s["height"])
    return rows


# ------------------------------------------------------------------------------------------------------------------
# the output contract
# ------------------------------------------------------------------------------------------------------------------
def test_outputs_follow_the_contract(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], tiny_clip_weights: Path, capsys
) -> None:
    folder = tmp_path / "images"
    image_factory("native.png", (64, 64), seed=1)
    image_factory("wide.jpg", (120, 90), seed=2)
    image_factory("native.jpg", (50, 70), folder=folder / "sub", seed=3)  # same stem: keys must differ
    out = tmp_path / "out"
    args = [str(folder), *concept_args(CONCEPTS), "--base", "bird", "--gamma", "1.0", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err

    # the store only, by default: no per-file outputs
    assert not any((out / d).exists() for d in ("maps", "masks", "overlays", "signed"))
    assert sorted(p.name for p in out.iterdir()) == ["results", "results.csv", "run.json"]
    srows = store_rows(out)
    assert len(srows) == 3 * len(CONCEPTS)
    keys = {Path(r["image"]).as_posix().split("images/", 1)[1]: r["image_key"] for r in srows}
    assert keys["wide.jpg"] == "wide"
    assert len(set(keys.values())) == 3 and all("native" in k for k in (keys["native.png"], keys["sub/native.jpg"]))
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).exists() for r in srows)
    sizes = {"native.png": (64, 64), "wide.jpg": (90, 120), "sub/native.jpg": (70, 50)}
    for r in srows:
        rel = Path(r["image"]).as_posix().split("images/", 1)[1]
        assert (r["concept"] in CONCEPTS, r["base"], r["gamma"], r["method"]) == (True, "bird", 1.0, "gradcam")
        assert (r["grid_h"], r["grid_w"]) == (4, 4) and r["resize"] == "stretch"
        check_store_row(r, sizes[rel])
        assert render_mask(r).shape == sizes[rel]
        assert r["score"] == pytest.approx(r["concept_score"] - 1.0 * r["base_score"], abs=1e-5)

    with open(out / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert set(REQUIRED_COLUMNS) <= set(header) and "overlay" in header
    rows = check_csv_matches_store(out)
    assert all(r["map"] == r["mask"] == r["overlay"] == "" for r in rows)  # filled only with --save

    info = json.loads((out / "run.json").read_text())
    for k in RUN_JSON_KEYS:
        assert k in info, k
    for k in ("traitloc", "torch", "open_clip"):
        assert info["environment"][k], k
    assert info["argv"][0] == "localize" and str(out) in info["argv"]
    assert info["pretrained_sha256"] == hashlib.sha256(tiny_clip_weights.read_bytes()).hexdigest()
    assert Path(info["pretrained"]).name == tiny_clip_weights.name
    assert "traitloc_tiny_vit" in info["model"]
    assert (info["device"], info["dtype"], info["image_size"]) == ("cpu", "fp32", [64, 64])
    assert info["prompts"][: len(CONCEPTS)] == CONCEPTS and info["base"] == "bird"
    assert (info["gamma"], info["method"], info["seed"]) == (1.0, "gradcam", 0)
    assert "resblocks" in info["target_layer"]
    start, end = (datetime.fromisoformat(info[k].replace("Z", "+00:00")) for k in ("start_utc", "end_utc"))
    assert start <= end
    assert info["truncated_prompts"] == []
    assert info["cwd"] == os.getcwd() and info["inputs"] == [str(folder.resolve())]
    assert info["status"] == "finished" and info["counts"] == {"ok": 3, "failed": 0, "skipped": 0}
    assert info["store"]["path"] == "results/" and info["store"]["grid_dtype"] == "float32"
    assert info["store_bytes_written"] == sum(p.stat().st_size for p in results_dir(out).glob("part-*.parquet"))
    assert set(info["timing"]) >= {"compute_s", "write_s"}
    assert info["text_cache"]["encoded"] == len(CONCEPTS) + 1  # the concepts and the base, encoded once
    assert temp_files(out) == []


def test_save_writes_files_that_are_renderings_of_the_store(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    image_factory("native.png", (64, 64), seed=1)
    image_factory("wide.jpg", (120, 90), seed=2)
    out = tmp_path / "out"
    args = [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", "--save", "maps,masks,overlays",
            "--threshold", "0.3", "--out", str(out)]  # fmt: skip
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    rows = check_csv_matches_store(out)
    srows = store_rows(out)
    for r in rows:
        s = one(srows, image_key=r["image_key"], concept=r["concept"])
        assert (s["map"], s["mask"], s["overlay"]) == (r["map"], r["mask"], r["overlay"])  # paths in the store too
        m = check_saved_files(out, r, s, threshold=0.3)
        _, meta = read_map_tiff(out / r["map"])
        assert (meta["base"], meta["gamma"]) == ("bird", 1.0)
        with Image.open(out / r["overlay"]) as ov:
            assert ov.size == (s["width"], s["height"])
            with Image.open(r["image"]) as photo:
                expected = render_overlay(s, photo.convert("RGB"))
            np.testing.assert_array_equal(np.asarray(ov), expected)
        assert m.shape == (s["height"], s["width"])
    assert {r["map"] for r in rows} == {p.relative_to(out).as_posix() for p in (out / "maps").rglob("*.tif")}
    assert not (out / "signed").exists()
    assert json.loads((out / "run.json").read_text())["save"] == ["maps", "masks", "overlays"]
    assert temp_files(out) == []


@pytest.mark.parametrize("bad", ["tifs", "maps,jpegs", ""])
def test_save_with_an_unknown_kind_exits_2(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, bad: str
) -> None:
    path = image_factory("a.png")
    args = [str(path), "--concept", "x", "--save", bad, "--out", str(tmp_path / "o")]
    if bad == "":  # nothing to save: the store only
        rc, err = run(capsys, args, model_args)
        assert rc == 0, err
        assert not (tmp_path / "o" / "maps").exists()
        return
    with pytest.raises(SystemExit) as exc:  # an argument error: one line from the parser, exit 2
        run(capsys, args, model_args)
    line = one_line_error(exc.value.code, capsys.readouterr().err, prefix="traitloc localize: error: argument --save")
    assert "choose from maps, masks, overlays, signed" in line
    assert not (tmp_path / "o").exists()


def test_native_size_square_image_is_used_as_is(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], tiny_bundle: Any, capsys
) -> None:
    import torch

    from traitloc.models.localize import ConceptLocalizer

    path = image_factory("square.png", (64, 64), seed=5)
    out = tmp_path / "out"
    rc, err = run(capsys, [str(path), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)], model_args)
    assert rc == 0, err
    rows = store_rows(out)

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    mean = np.asarray(tiny_bundle.mean, dtype=np.float32)
    std = np.asarray(tiny_bundle.std, dtype=np.float32)
    x = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())[None]  # no resize, no crop
    res = ConceptLocalizer(tiny_bundle).explain_tensor(x, CONCEPTS, base="bird", gamma=1.0)[0]
    for q, concept in enumerate(CONCEPTS):
        row = one(rows, concept=concept)
        raw = res.map(q, (64, 64))
        # raw_max: the grid's max, which the full-size map reaches only where a pixel centre meets a cell centre
        assert row["raw_max"] == pytest.approx(float(res.signed[q].clamp_min(0).max()), rel=1e-5)
        assert float(raw.max()) <= row["raw_max"] * (1 + 1e-5)
        np.testing.assert_allclose(render_map(row), raw, rtol=1e-4, atol=1e-6 * float(raw.max()))
        np.testing.assert_allclose(render_unit_map(row), map_to_unit(raw), atol=1e-5)


def test_float16_grids(tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys) -> None:
    import pyarrow.parquet as pq

    image_factory("a.png", (64, 64), seed=1)
    image_factory("b.jpg", (90, 60), seed=2)
    maps = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / dtype
        args = [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)]
        rc, err = run(capsys, [*args, "--grid-dtype", dtype], model_args)
        assert rc == 0, err
        (part,) = results_dir(out).glob("part-*.parquet")
        assert ("halffloat" in str(pq.read_schema(part).field("grid").type)) == (dtype == "float16")
        assert json.loads((out / "run.json").read_text())["store"]["grid_dtype"] == dtype
        maps[dtype] = {(r["image_key"], r["concept"]): render_map(r) for r in store_rows(out)}
    for k, m32 in maps["float32"].items():
        assert np.abs(maps["float16"][k] - m32).max() <= 1e-3 * m32.max()


# ------------------------------------------------------------------------------------------------------------------
# robust input
# ------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_reported_per_image_and_the_rest_succeeds(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    folder = tmp_path / "images"
    image_factory("good.png", (64, 64))
    full = image_factory("truncated.jpg", (200, 150), seed=7)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    image_factory("gray.png", (80, 60), mode="L", seed=8)
    image_factory("rgba.png", (70, 70), mode="RGBA", seed=9)
    image_factory("palette.png", (64, 48), mode="P", seed=10)
    image_factory("cmyk.jpg", (60, 80), mode="CMYK", seed=11)
    image_factory("deep16.png", (72, 54), mode="I;16", seed=12)
    image_factory("tiny10.png", (10, 10), seed=13)
    # EXIF orientation 6: stored 96 wide x 64 high, displayed rotated 90 degrees clockwise (64 wide x 96 high)
    rotated = image_factory("rotated.jpg", (96, 64), seed=14, exif_orientation=6)
    with Image.open(rotated) as im:
        upright = ImageOps.exif_transpose(im)
    upright.save(folder / "upright.png")  # the same pixels as displayed, no EXIF
    assert upright.size == (64, 96)

    out = tmp_path / "out"
    rc, err = run(capsys, [str(folder), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)], model_args)
    assert rc == 0, err
    srows = store_rows(out)
    assert len(srows) == 11 * len(CONCEPTS)
    assert Counter(Path(r["image"]).name for r in srows) == dict.fromkeys(
        ["good.png", "truncated.jpg", "notes.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg",
         "deep16.png", "tiny10.png", "rotated.jpg", "upright.png"], len(CONCEPTS)
    )  # fmt: skip
    for r in rows_by(srows, "truncated.jpg"):
        assert r["status"].startswith("error:") and "truncated" in r["status"], r["status"]
        assert r["grid"] is None and pd_isna(r["width"]) and pd_isna(r["raw_max"])
    for r in rows_by(srows, "notes.png"):
        assert r["status"].startswith("error:") and "not an image" in r["status"], r["status"]
        assert r["result_id"] == f"notes/{slugify(r['concept'])}"  # error rows have ids too (the app lists them)
    df = read_results(out)
    assert str(df["width"].dtype) == "Int64" and str(df["grid_h"].dtype) == "Int64"  # ints stay ints

    rows = check_csv_matches_store(out)
    for r in rows_by(rows, "truncated.jpg") + rows_by(rows, "notes.png"):
        assert r["status"].startswith("error:") and r["map"] == r["mask"] == r["raw_max"] == ""

    sizes = {"good.png": (64, 64), "gray.png": (60, 80), "rgba.png": (70, 70), "palette.png": (48, 64),
             "cmyk.jpg": (80, 60), "deep16.png": (54, 72), "tiny10.png": (10, 10), "rotated.jpg": (96, 64),
             "upright.png": (96, 64)}  # fmt: skip
    for name, hw in sizes.items():
        for r in rows_by(srows, name):
            check_store_row(r, hw)
    assert all("16" in r["notes"] or "scaled" in r["notes"] for r in rows_by(srows, "deep16.png"))
    # the EXIF-rotated photo is explained as displayed: its maps equal those of the physically rotated copy
    for concept in CONCEPTS:
        a = one(rows_by(srows, "rotated.jpg"), concept=concept)
        b = one(rows_by(srows, "upright.png"), concept=concept)
        np.testing.assert_allclose(render_unit_map(a), render_unit_map(b), atol=1e-5)
        np.testing.assert_allclose(render_map(a, signed=True), render_map(b, signed=True), atol=1e-5 * a["raw_max"])
        assert a["raw_max"] == pytest.approx(b["raw_max"], rel=1e-4)
    assert temp_files(out) == []


def pd_isna(v: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def test_an_image_that_fails_to_compute_is_an_error_row(
    tmp_path: Path,
    image_factory: Callable[..., Path],
    model_args: list[str],
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-finite map is that image's error (the batch goes on), recorded in the store and results.csv."""
    from traitloc.models.localize import ConceptLocalizer

    image_factory("a.png", (64, 64), seed=1)
    image_factory("nan.png", (80, 60), seed=2)
    image_factory("c.png", (70, 50), seed=3)
    real = ConceptLocalizer.explain

    def explain(self: Any, images: Any, *args: Any, **kw: Any) -> Any:
        res = real(self, images, *args, **kw)
        for im, r in zip(images, res, strict=True):
            if im.size == (80, 60):
                r.signed = r.signed * float("nan")
        return res

    monkeypatch.setattr(ConceptLocalizer, "explain", explain)
    out = tmp_path / "out"
    rc, err = run(capsys, [str(tmp_path / "images"), *concept_args(CONCEPTS), "--out", str(out)], model_args)
    assert rc == 0, err
    srows = store_rows(out)
    for r in srows:
        if r["image_key"] == "nan":
            assert r["status"] == "error: the map is not finite (NaN or infinite values)" and r["grid"] is None
        else:
            check_store_row(r)
    check_csv_matches_store(out)
    assert json.loads((out / "run.json").read_text())["counts"] == {"ok": 2, "failed": 1, "skipped": 0}


@pytest.mark.slow
def test_huge_jpeg_map_is_rendered_at_full_size(
    tmp_path: Path, model_args: list[str], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    W, H = 12000, 9000
    folder = tmp_path / "images"
    folder.mkdir()
    # built with Pillow only (no full-size numpy temporaries): gradients and a disc, 324 MB as RGB
    gx = Image.linear_gradient("L").rotate(90).resize((W, H))
    gy = Image.linear_gradient("L").resize((W, H))
    disc = Image.new("L", (W, H), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(disc).ellipse((7000, 1500, 10000, 4500), fill=255)
    Image.merge("RGB", (gx, gy, disc)).save(folder / "huge.jpg", quality=80)
    del gx, gy, disc
    out = tmp_path / "out"
    args = [str(folder), "--concept", "white disc", "--base", "photo", "--save", "overlays", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    (row,) = store_rows(out)
    assert (row["width"], row["height"]) == (W, H)
    assert "reduced" in row["notes"]
    assert sum(p.stat().st_size for p in results_dir(out).glob("*.parquet")) < 100_000  # a grid, not a picture
    m = check_store_row(row, (H, W))  # rendered at the original size
    del m
    (csv_row,) = read_rows(out)
    with Image.open(out / csv_row["overlay"]) as ov:
        assert max(ov.size) <= 4096  # the overlay is drawn on the working image
        assert ov.size[0] / ov.size[1] == pytest.approx(W / H, rel=1e-2)


# ------------------------------------------------------------------------------------------------------------------
# prompts and arguments
# ------------------------------------------------------------------------------------------------------------------
def one_line_error(rc: int, err: str, prefix: str = "traitloc localize: error:") -> str:
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.mark.parametrize("concept", ["", "   "])
def test_empty_prompt_exits_2_with_one_line(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, concept: str
) -> None:
    path = image_factory("a.png")
    out = tmp_path / "out"
    line = one_line_error(*run(capsys, [str(path), "--concept", concept, "--out", str(out)], model_args))
    assert "empty" in line
    assert not (out / "results.csv").exists() and not results_dir(out).exists()


def test_empty_base_exits_2(tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys) -> None:
    path = image_factory("a.png")
    line = one_line_error(
        *run(capsys, [str(path), "--concept", "x", "--base", " ", "--out", str(tmp_path / "o")], model_args)
    )
    assert "--base" in line


def test_missing_input_exits_2_with_one_line(tmp_path: Path, model_args: list[str], capsys) -> None:
    missing = tmp_path / "no_such_folder"
    line = one_line_error(*run(capsys, [str(missing), "--concept", "x", "--out", str(tmp_path / "out")], model_args))
    assert str(missing) in line


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (["--pretrained", "/no/such/weights.safetensors"], "weights file not found"),
        (["--model", "/no/such/config.json"], "model config file not found"),
        (["--traits", "no_such_trait_list"], "--traits"),
        (["--grid-dtype", "float64"], "--grid-dtype"),
    ],
    ids=["weights", "config", "traits", "grid-dtype"],
)
def test_bad_model_or_trait_arguments_exit_2_with_one_line(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, bad: list[str], expected: str
) -> None:
    path = image_factory("a.png")
    args = [str(path), "--concept", "x", "--out", str(tmp_path / "o")]
    if bad[0] == "--grid-dtype":  # an argparse error: raised as SystemExit(2) by the parser, one line
        with pytest.raises(SystemExit) as exc:
            run(capsys, [*args, *bad], model_args)
        line = one_line_error(exc.value.code, capsys.readouterr().err, prefix="traitloc localize: error:")
    else:
        line = one_line_error(*run(capsys, args, [*model_args, *bad]))  # the last --model/--pretrained wins
    assert expected in line


def test_no_concept_exits_2(tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys) -> None:
    path = image_factory("a.png")
    one_line_error(*run(capsys, [str(path), "--out", str(tmp_path / "out")], model_args))


def test_long_prompt_is_truncated_with_a_warning(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    path = image_factory("a.png")
    words = ["red", "wing", "bar", "with", "white", "edges", "on", "a", "small", "bird"]
    long_prompt = " ".join(words[i % len(words)] for i in range(200))
    out = tmp_path / "out"
    args = [str(path), "--concept", long_prompt, "--concept", "bill", "--save", "maps", "--out", str(out)]
    with pytest.warns(UserWarning, match="truncated"):
        rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["truncated_prompts"] == [long_prompt]
    srows = store_rows(out)
    assert len(srows) == 2 and all(r["status"] == "ok" for r in srows)
    row = one(srows, concept=long_prompt)  # the store keeps the whole prompt
    check_store_row(row, (64, 64))
    assert len(row["result_id"].split("/", 1)[1]) <= 80
    (csv_row,) = [r for r in read_rows(out) if r["concept"] == long_prompt]
    assert len(Path(csv_row["map"]).name) <= 80 + len(".tif")
    np.testing.assert_array_equal(read_map_tiff(out / csv_row["map"])[0], render_unit_map(row))


@pytest.mark.slow
def test_cub200_trait_list_on_one_image(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    from traitloc.data.traits import load_trait_list

    traits = load_trait_list("cub200")
    path = image_factory("bird.png", (64, 64))
    out = tmp_path / "out"
    rc, err = run(capsys, [str(path), "--traits", "cub200", "--base", "bird", "--out", str(out)], model_args)
    assert rc == 0, err
    srows = store_rows(out)
    assert len(srows) == len({t.prompt for t in traits}) == 312
    assert all(r["status"] == "ok" for r in srows)
    assert {r["trait"] for r in srows} == {t.name for t in traits}
    assert len({r["result_id"] for r in srows}) == 312  # distinct slugs
    for r in srows[::31]:
        check_store_row(r, (64, 64))
    assert len(check_csv_matches_store(out)) == 312
    assert len(json.loads((out / "run.json").read_text())["prompts"]) == 312
    assert len(list(out.rglob("*"))) <= 5  # run.json, results.csv, results/ and its part: no files per trait


# ------------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------------
def test_rerun_recomputes_nothing_and_adds_only_new_concepts(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    folder = tmp_path / "images"
    for i, size in enumerate([(64, 64), (80, 60), (50, 90)]):
        image_factory(f"im{i}.png", size, seed=i)
    out = tmp_path / "out"
    args = [str(folder), *concept_args(CONCEPTS), "--base", "bird", "--batch-size", "2", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    csv_before = (out / "results.csv").read_bytes()
    state = file_state(out)
    parts = sorted(results_dir(out).glob("part-*.parquet"))
    assert len(parts) == 2  # one per batch
    # what a run killed mid-write leaves behind: hidden temporary files (an old one is removed by the next run)
    stale = results_dir(out) / ".part-20260101T000000.000000000-host-1-00000000.0123456789ab.tmp"
    stale.write_bytes(b"PAR1 partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    time.sleep(0.05)  # so that a rewritten file would get a new mtime even on coarse clocks

    rc, err = run(capsys, args, model_args, quiet=False)
    assert rc == 0, err
    assert "3 already done" in err
    assert not stale.exists()
    assert (out / "results.csv").read_bytes() == csv_before  # rewritten from the store, the same
    assert {k: v for k, v in file_state(out).items() if k != "results.csv"} == {
        k: v for k, v in state.items() if k != "results.csv"
    }  # no part rewritten or added
    info = json.loads((out / "run.json").read_text())
    assert info["n_items_todo"] == 0 and info["counts"]["skipped"] == 3
    assert len(info["previous_runs"]) == 1 and info["previous_runs"][0]["status"] == "finished"

    # one more concept: only its rows are new, the finished parts stay as they are
    rc, err = run(capsys, [*args, "--concept", "yellow bill"], model_args)
    assert rc == 0, err
    assert (out / "results.csv").read_bytes().startswith(csv_before)
    after = file_state(out)
    assert {k: v for k, v in after.items() if k in state and k != "results.csv"} == {
        k: v for k, v in state.items() if k != "results.csv"
    }
    new_parts = sorted(set(results_dir(out).glob("part-*.parquet")) - set(parts))
    import pandas as pd

    assert set(pd.concat([pd.read_parquet(p) for p in new_parts])["concept"]) == {"yellow bill"}
    srows = store_rows(out)
    assert len(srows) == 3 * 3
    assert Counter((r["image_key"], r["concept"]) for r in srows).most_common(1)[0][1] == 1
    check_csv_matches_store(out)
    assert len(json.loads((out / "run.json").read_text())["previous_runs"]) == 2


def console_script() -> str:
    exe = Path(sys.executable).with_name("traitloc")
    return str(exe) if exe.exists() else (shutil.which("traitloc") or "traitloc")


def _readable_parts(out: Path) -> dict[str, int]:
    """Rows in each finished (non-hidden) part, each read on its own: a partial part would fail here."""
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p).num_rows for p in sorted(results_dir(out).glob("part-*.parquet"))}


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_partial_parts(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    """SIGKILL a run after its first parts, rerun: every (image, concept) exactly once, no partial part."""
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    n_images = 30
    for i in range(n_images):
        image_factory(f"photo{i:02d}.jpg", (96, 72), seed=100 + i)
    concepts = [f"trait number {k}" for k in range(3)]
    out = tmp_path / "out"
    args = [str(folder), *concept_args(concepts), "--base", "bird", "--batch-size", "2", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [console_script(), "localize", *args, *model_args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(results_dir(out).glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.002)
    finally:
        finished_early = proc.poll() is not None
        if not finished_early:
            proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
    assert not finished_early, f"the run ended before it could be killed (rc {proc.returncode}): {stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed_parts = _readable_parts(out)  # every non-hidden part reads as a whole part
    killed = store_rows(out)
    leftovers = temp_files(out)
    with capsys.disabled():  # shown with -s
        print(f"\nkilled after {len(killed_parts)} parts ({len(killed)} rows); left: {[p.name for p in leftovers]}")
    assert 0 < len(killed) < n_images * len(concepts), "kill did not land half-way"
    assert set(killed_parts.values()) == {2 * len(concepts)}  # whole batches only
    # a hidden temporary part (if the kill landed in a write) is never read as data
    assert len(read_results(out, dedupe=False)) == sum(killed_parts.values())
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running"  # the killed run could not record its end

    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    srows = store_rows(out)
    counts = Counter((r["image_key"], r["concept"]) for r in srows)
    assert len(counts) == n_images * len(concepts)
    assert set(counts.values()) == {1}  # exactly once, in the store ...
    assert all(r["status"] == "ok" for r in srows)
    check_csv_matches_store(out)  # ... and in results.csv
    for r in srows[::7]:
        check_store_row(r, (72, 96))
    parts = _readable_parts(out)
    assert {k: v for k, v in parts.items() if k in killed_parts} == killed_parts  # finished parts were not redone
    for p in results_dir(out).glob("part-*.parquet"):
        pq.read_metadata(p)
    assert [p for p in temp_files(out) if p not in leftovers] == []  # the rerun left no temporary file of its own
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["previous_runs"][-1]["status"] == "running"
    assert info["counts"]["skipped"] == len(killed) // len(concepts)


# ------------------------------------------------------------------------------------------------------------------
# one folder, one set of settings
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def other_weights(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path) -> Path:
    """The tiny ViT's config beside other random weights (the same model name, another sha256)."""
    from conftest import _write_weights

    folder = tmp_path_factory.mktemp("other_weights")
    cfg = folder / tiny_clip_config.name
    shutil.copy(tiny_clip_config, cfg)
    return _write_weights(cfg, seed=4321)


def test_a_folder_made_with_other_settings_is_refused(
    tmp_path: Path,
    image_factory: Callable[..., Path],
    model_args: list[str],
    other_weights: Path,
    tiny_rn_config: Path,
    tiny_rn_weights: Path,
    capsys,
) -> None:
    img = image_factory("a.png", size=(80, 60))
    out = tmp_path / "out"
    args = [str(img), "--concept", "red wing", "--base", "bird", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    state = file_state(out)
    refusals = {
        "gamma=1.0 (now 0.5)": ["--gamma", "0.5"],
        "base='bird' (now 'tree')": ["--base", "tree"],
        "method='gradcam' (now 'layercam')": ["--method", "layercam"],
        "grid_dtype='float32' (now 'float16')": ["--grid-dtype", "float16"],
        "pretrained_sha256=": ["--pretrained", str(other_weights)],
        "traitloc_tiny_rn.json": ["--model", str(tiny_rn_config), "--pretrained", str(tiny_rn_weights)],
        "templates=": ["--template", "a photo of a bird with {}."],
        "resize='stretch' (now 'aspect')": ["--resize", "aspect"],
    }
    for expected, extra in refusals.items():
        line = one_line_error(*run(capsys, args, [*model_args, *extra]))  # the last --pretrained wins
        assert expected in line and "new --out folder" in line, line
        assert file_state(out) == state  # nothing written, nothing overwritten
    # same settings, a new concept: fine, added beside the first
    rc, err = run(capsys, [*args, "--concept", "blue tail"], model_args)
    assert rc == 0, err
    assert {r["concept"] for r in store_rows(out)} == {"red wing", "blue tail"}
    assert json.loads((out / "run.json").read_text())["gamma"] == 1.0


def test_a_damaged_store_gives_a_one_line_error(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    img = image_factory("a.png")
    out = tmp_path / "out"
    args = [str(img), "--concept", "red wing", "--out", str(out)]
    assert run(capsys, args, model_args)[0] == 0
    (part,) = results_dir(out).glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[:100])
    line = one_line_error(*run(capsys, args, model_args))
    assert part.name in line


# ------------------------------------------------------------------------------------------------------------------
# text embeddings cached on disk
# ------------------------------------------------------------------------------------------------------------------
def test_a_second_run_with_the_same_traits_encodes_no_text(
    tmp_path: Path,
    image_factory: Callable[..., Path],
    model_args: list[str],
    other_weights: Path,
    tiny_clip_config: Path,
    _text_cache_dir: Path,
    capsys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = image_factory("a.png")
    traits = tmp_path / "traits.txt"
    traits.write_text("red wing\nblue tail\nyellow bill\nwhite eye ring\nblack crown\n")
    n_prompts = 5 + 1  # and the base

    def localize(name: str, *extra: str, models: Sequence[str] = model_args) -> dict[str, Any]:
        out = tmp_path / name
        rc, err = run(capsys, [str(img), "--traits", str(traits), "--base", "bird", *extra, "--out", str(out)], models)
        assert rc == 0, err
        assert all(r["status"] == "ok" for r in store_rows(out))
        return json.loads((out / "run.json").read_text())["text_cache"]

    first = localize("run1")
    assert first["encoded"] == n_prompts and first["disk_hits"] == 0
    assert Path(first["dir"]).is_relative_to(_text_cache_dir)
    second = localize("run2")  # a new folder, the same weights file: every prompt from the disk cache
    assert second == {**first, "encoded": 0, "disk_hits": n_prompts}
    assert localize("run3", "--concept", "orange leg") == {**first, "encoded": 1, "disk_hits": n_prompts}

    # another template set or other weights: other embeddings, encoded again (and cached apart)
    templated = localize("run4", "--template", "a photo of a bird with {}.")
    assert templated["encoded"] == n_prompts and templated["dir"] != first["dir"]
    other = ["--model", str(tiny_clip_config), "--pretrained", str(other_weights), "--device", "cpu"]
    reweighted = localize("run5", models=other)
    assert reweighted["encoded"] == n_prompts and reweighted["dir"] not in (first["dir"], templated["dir"])
    assert localize("run6", models=other)["encoded"] == 0

    # a damaged cache file is skipped with a warning, never fatal
    files = sorted(Path(first["dir"]).glob("*.safetensors"))
    assert files
    for f in files:
        f.write_bytes(b"\x00garbage")
    caplog.clear()
    with caplog.at_level("WARNING"):
        damaged = localize("run7")
    assert damaged["encoded"] == n_prompts
    assert any("text cache" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert localize("run8")["encoded"] == 0  # the re-encoded vectors were cached again

    # TRAITLOC_CACHE_DIR=off: no disk cache at all
    monkeypatch.setenv("TRAITLOC_CACHE_DIR", "off")
    before = sorted(_text_cache_dir.rglob("*"))
    for name in ("off1", "off2"):
        info = localize(name)
        assert info["dir"] is None and info["encoded"] == n_prompts and info["disk_hits"] == 0
    assert sorted(_text_cache_dir.rglob("*")) == before


def test_text_cache_keeps_the_same_vectors(tiny_bundle: Any, _text_cache_dir: Path) -> None:
    import torch

    from traitloc.models.text import TextEncoder

    prompts = ["red wing", "bill", "bird"]
    fresh = TextEncoder(tiny_bundle)
    v1 = fresh.encode(prompts)
    assert fresh.n_encoded == 3 and fresh.n_disk_hits == 0
    again = TextEncoder(tiny_bundle)
    v2 = again.encode(prompts)
    assert again.n_encoded == 0 and again.n_disk_hits == 3
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert TextEncoder(tiny_bundle, cache=False).cache_dir is None


# ------------------------------------------------------------------------------------------------------------------
# methods and options
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method_args", [["--method", "layercam"], ["--method", "scorecam", "--scorecam-channels", "8"]], ids=str
)
def test_other_methods(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, method_args: list[str]
) -> None:
    image_factory("a.png", (64, 64), seed=1)
    image_factory("b.jpg", (90, 60), seed=2)
    out = tmp_path / "out"
    rc, err = run(
        capsys, [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", *method_args, "--out", str(out)],
        model_args,
    )  # fmt: skip
    assert rc == 0, err
    srows = store_rows(out)
    assert len(srows) == 2 * len(CONCEPTS)
    for r in srows:
        assert r["method"] == method_args[1]
        check_store_row(r, (64, 64) if r["image_key"] == "a" else (60, 90))
    check_csv_matches_store(out)
    assert json.loads((out / "run.json").read_text())["method"] == method_args[1]


def test_resnet_model(
    tmp_path: Path, image_factory: Callable[..., Path], tiny_rn_config: Path, tiny_rn_weights: Path, capsys
) -> None:
    image_factory("a.jpg", (90, 60), seed=3)
    out = tmp_path / "out"
    rn_args = ["--model", str(tiny_rn_config), "--pretrained", str(tiny_rn_weights), "--device", "cpu"]
    rc, err = run(capsys, [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)],
                  rn_args)  # fmt: skip
    assert rc == 0, err
    for r in store_rows(out):
        check_store_row(r, (60, 90))
        assert (r["grid_h"], r["grid_w"]) == (2, 2)


def test_resize_aspect_keeps_original_size(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    path = image_factory("wide.png", (160, 64), seed=4)
    maps = {}
    for mode in ("stretch", "aspect"):
        out = tmp_path / mode
        rc, err = run(
            capsys, [str(path), "--concept", "red wing", "--resize", mode, "--save", "maps", "--out", str(out)],
            model_args,
        )  # fmt: skip
        assert rc == 0, err
        (row,) = store_rows(out)
        maps[mode] = check_store_row(row, (64, 160))
        assert row["resize"] == mode
        assert json.loads((out / "run.json").read_text())["resize"] == mode
        (csv_row,) = read_rows(out)
        assert read_map_tiff(out / csv_row["map"])[1]["resize"] == mode
    assert not np.allclose(maps["stretch"], maps["aspect"])  # a different input grid (about 2 x 6 patches)


def test_save_signed(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], tiny_bundle: Any, capsys
) -> None:
    from traitloc.models.localize import ConceptLocalizer

    a = image_factory("a.png", (64, 64), seed=1)
    image_factory("b.png", (100, 40), seed=2)
    out = tmp_path / "out"
    args = [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", "--save", ALL_SAVE, "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    engine = ConceptLocalizer(tiny_bundle).explain([Image.open(a).convert("RGB")], CONCEPTS, "bird", 1.0)[0]
    srows = store_rows(out)
    n_negative = 0
    for r in read_rows(out):
        s = one(srows, image_key=r["image_key"], concept=r["concept"])
        m = check_saved_files(out, r, s)
        signed_path = out / "signed" / r["image_key"] / f"{slugify(r['concept'])}.tif"
        with tifffile.TiffFile(signed_path) as tif:
            assert tif.pages[0].dtype == np.float32
        signed, meta = read_map_tiff(signed_path)
        assert signed.shape == m.shape and np.isfinite(signed).all()
        assert meta["concept"] == r["concept"]
        np.testing.assert_array_equal(signed, render_map(s, signed=True))  # a rendering of the store row
        raw = render_map(s)
        # the map is the upsampled ReLU of the signed grid map: never below the upsampled signed map ...
        assert (raw >= signed - 1e-6 * float(r["raw_max"])).all()
        n_negative += int((signed < 0).any())
        if r["image_key"] == "a":  # native size: compare with the engine's signed map in raw units
            q = CONCEPTS.index(r["concept"])
            np.testing.assert_allclose(signed, engine.map(q, (64, 64), signed=True), rtol=1e-4, atol=1e-6 * raw.max())
    assert n_negative > 0  # evidence for the base shows up somewhere


def test_no_base_is_plain_cam_and_ignores_gamma(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    image_factory("a.png", (64, 64), seed=1)
    image_factory("b.png", (80, 50), seed=2)
    folder = str(tmp_path / "images")
    maps: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    runs = {
        "g0": ["--gamma", "0"],
        "g5": ["--gamma", "5"],
        "base_g0": ["--base", "bird", "--gamma", "0"],
        "base_g1": ["--base", "bird"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        rc, err = run(capsys, [folder, *concept_args(CONCEPTS), *extra, "--out", str(out)], model_args)
        assert rc == 0, err
        srows = store_rows(out)
        assert all(r["base"] == ("bird" if "base" in name else NO_BASE) for r in srows)
        assert all(r["base"] == ("bird" if "base" in name else NO_BASE) for r in read_rows(out))
        if "base" not in name:
            assert all(pd_isna(r["base_score"]) for r in srows)
        maps[name] = {(r["image_key"], r["concept"]): check_store_row(r) for r in srows}
    assert json.loads((tmp_path / "g0" / "run.json").read_text())["base"] is None
    for k in maps["g0"]:
        np.testing.assert_allclose(maps["g0"][k], maps["g5"][k], atol=1e-6)
        np.testing.assert_allclose(maps["g0"][k], maps["base_g0"][k], atol=1e-5)  # gamma 0 = plain CAM of the concept
    assert any(not np.allclose(maps["g0"][k], maps["base_g1"][k], atol=1e-3) for k in maps["g0"])


# ------------------------------------------------------------------------------------------------------------------
# the console script
# ------------------------------------------------------------------------------------------------------------------
def subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_of_every_subcommand_in_process(capsys) -> None:
    commands = subcommands()
    assert "localize" in commands
    for command in commands:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: traitloc {command}")
    with pytest.raises(SystemExit):
        main(["localize", "--help"])
    text = capsys.readouterr().out
    for option in ("--concept", "--traits", "--base", "--gamma", "--model", "--pretrained", "--method", "--out"):
        assert option in text


@pytest.mark.slow  # one process per subcommand: each imports torch (~2 s)
def test_console_script_help_of_every_subcommand() -> None:
    commands = subcommands()
    exe = console_script()
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert all(c in res.stdout for c in commands)
    for command in commands:
        res = subprocess.run([exe, command, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: traitloc {command}"), res.stdout[:200]
