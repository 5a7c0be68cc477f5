"""Tests of the export formats (traitloc/io/formats.py) and ``traitloc export`` (traitloc/pipelines/export.py).

Round trips: TIFF values and ImageJ metadata, COCO RLE (against pycocotools when installed), polygons back to
masks, figures (SVG parsed as XML, PDF text, PNG dpi). Exports render from the run's results store: hand-made
stores (:class:`traitloc.io.store.ResultStore`, no model) for selection, safety and streaming, and a folder made
by ``traitloc localize --save maps,masks,overlays`` with the tiny random open_clip model of ``conftest.py``, whose
files must equal the export's renderings of the same rows.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import sqlite3
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import make_image_array
from PIL import Image

from traitloc.io.files import map_tiff_bytes, read_map_tiff
from traitloc.io.formats import (
    COLORBAR_GID,
    COLORBAR_LABEL,
    FormatError,
    bbox_area,
    figure_bytes,
    figure_panel,
    mask_png_bytes,
    mask_to_polygons,
    polygons_to_mask,
    rle_decode,
    rle_encode,
    rle_from_string,
    rle_to_string,
)
from traitloc.io.store import ResultStore, read_results, render_mask, render_unit_map, rows_of
from traitloc.pipelines import export as formats
from traitloc.pipelines.export import export_results, export_zip_bytes, list_results, read_decisions

SVG = "{http://www.w3.org/2000/svg}"
#: Parquet is optional (pyarrow comes with streamlit in the app extra); its checks are skipped without an engine
HAS_PARQUET = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))
CONCEPTS = ["red wing", "Blue tail (male)"]
#: the store columns of a localize run (LocalizeJob's) and of an explain run
LOCALIZE_COLUMNS = {
    "concept": "str", "trait": "str", "base": "str", "gamma": "float", "method": "str", "model": "str",
    "score": "float", "concept_score": "float", "base_score": "float", "mask_fraction": "float",
    "threshold": "str", "map": "str", "mask": "str", "overlay": "str",
}  # fmt: skip
EXPLAIN_COLUMNS = {
    "target": "str", "predicted": "str", "references": "str", "gamma": "float", "method": "str", "score": "float",
    "threshold": "str",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def blob_mask(shape: tuple[int, int], seed: int, level: float = 0.55) -> np.ndarray:
    """A random mask of smooth blobs (components, holes, touching edges), deterministic per seed."""
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    noise = gaussian(rng.random(shape), sigma=max(1.0, min(shape) / 12))
    return noise > np.quantile(noise, level)


def rasterize(polygons: list[Any], shape: tuple[int, int]) -> np.ndarray:
    """Independent rasterizer: skimage.draw.polygon on pixel centres (x - 0.5, y - 0.5), holes subtracted."""
    from skimage.draw import polygon

    out = np.zeros(shape, dtype=bool)
    for poly in polygons:
        layer = np.zeros(shape, dtype=bool)
        for k, ring in enumerate(poly):
            pts = np.asarray(ring)
            rr, cc = polygon(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape=shape)
            sub = np.zeros(shape, dtype=bool)
            sub[rr, cc] = True
            layer = sub if k == 0 else layer & ~sub
        out |= layer
    return out


def boundary_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance (pixels) between the boundaries of two masks (0 when both are empty)."""
    from skimage.metrics import hausdorff_distance
    from skimage.segmentation import find_boundaries

    if not a.any() and not b.any():
        return 0.0
    return float(hausdorff_distance(find_boundaries(a, mode="inner"), find_boundaries(b, mode="inner")))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def signed_area(ring: Sequence[Sequence[float]]) -> float:
    pts = np.asarray(ring)
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def blob_grid(seed: int, shape: tuple[int, int] = (6, 8)) -> np.ndarray:
    """A signed grid map with a positive blob somewhere and negative values elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cy, cx = rng.uniform(1, shape[0] - 2), rng.uniform(1, shape[1] - 2)
    return (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3.0) - 0.3 + 0.05 * rng.standard_normal(shape)).astype(
        np.float32
    )


def make_results(
    root: Path, *, kind: str = "concept", n_images: int = 2, labels: Sequence[str] = ("red wing", "blue tail"),
    images_dir: Path | None = None, threshold: float | str = 0.5, extra_rows: Sequence[dict[str, Any]] = (),
) -> Path:  # fmt: skip
    """A run folder with a hand-made results store, laid out as localize (``kind="concept"``) or explain
    (``"target"``) writes it: two photos (absolute paths) x ``labels``, plus a failed row."""
    root.mkdir(parents=True, exist_ok=True)
    images_dir = images_dir or root.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    columns = LOCALIZE_COLUMNS if kind == "concept" else EXPLAIN_COLUMNS
    store = ResultStore(root, columns, ("image_key", kind))
    rows = []
    for i in range(n_images):
        h, w = 24 + 4 * i, 32 - 2 * i
        img = images_dir / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img)
        for j, label in enumerate(labels):
            grid = blob_grid(10 * i + j)
            row = {"image": str(img.resolve()), "image_key": f"img{i}", kind: label, "gamma": 0.6,
                   "method": "gradcam", "score": 0.1 * j, "status": "ok", "notes": "", "width": w, "height": h,
                   "resize": "stretch", "interpolation": "bilinear", "grid": grid, "grid_h": grid.shape[0],
                   "grid_w": grid.shape[1], "raw_max": float(grid.clip(0).max()), "threshold": str(threshold),
                   "run_id": "2025-01-01T00:00:00Z"}  # fmt: skip
            if kind == "concept":
                row.update(base="bird", model="tiny")
            else:
                row.update(predicted=label, references="Tiger cat; Egyptian cat")
            rows.append(row)
    rows.append({"image": str(images_dir / "broken.png"), "image_key": "broken", kind: labels[0],
                 "status": "error: cannot decode"})  # fmt: skip
    store.write(rows[: len(rows) // 2])  # two parts, as two batches write them
    store.write(rows[len(rows) // 2 :] + list(extra_rows))
    (root / "run.json").write_text(json.dumps({"command": "localize", "threshold": threshold, "model": "tiny"}))
    return root


def store_rows(root: Path) -> dict[str, dict[str, Any]]:
    """The ok rows of a run's store, by result id (with their grids)."""
    df = read_results(root)
    return {r["result_id"]: r for r in rows_of(df) if r["status"] == "ok"}


def write_decisions(root: Path, decisions: dict[str, str]) -> None:
    """review.sqlite with the agreed schema, in WAL mode like the review app's store."""
    con = sqlite3.connect(root / "review.sqlite")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(
        "CREATE TABLE IF NOT EXISTS decisions(result_id TEXT PRIMARY KEY, status TEXT, note TEXT, updated_utc TEXT)"
    )
    con.executemany(
        "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, '2025-01-01T00:00:00.000Z')",
        [(rid, status, f"note {rid}") for rid, status in decisions.items()],
    )
    con.commit()
    con.close()


def export_cli(argv: list[str]) -> int:
    """``traitloc export ARGV`` through the command line (bad input -> one line on stderr, exit 2)."""
    from traitloc.cli import main

    return main(["export", *argv])


def zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def png_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        array = np.asarray(im)
    assert set(np.unique(array).tolist()) <= {0, 255}
    return array == 255


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------------------------
# COCO RLE
# ------------------------------------------------------------------------------------------------------------------
RLE_SHAPES = [(1, 1), (1, 9), (9, 1), (2, 3), (7, 5), (17, 31), (64, 64), (33, 100)]


def rle_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    cases = []
    for shape in RLE_SHAPES:
        for density in (0.1, 0.5, 0.9):
            cases.append(rng.random(shape) < density)
        cases.append(np.zeros(shape, dtype=bool))
        cases.append(np.ones(shape, dtype=bool))
    checker = (np.indices((11, 13)).sum(axis=0) % 2).astype(bool)
    return [*cases, checker, ~checker, blob_mask((40, 50), 3)]


def test_rle_known_example() -> None:
    # column-major: column 0 is [0, 0], column 1 is [1, 1] -> 2 zeros then 2 ones
    assert rle_encode([[0, 1], [0, 1]]) == {"size": [2, 2], "counts": [2, 2]}
    # a set first pixel starts with an empty run of zeros
    assert rle_encode([[1, 0], [0, 0]])["counts"] == [0, 1, 3]
    assert rle_encode(np.zeros((3, 2), bool))["counts"] == [6]
    assert rle_encode(np.ones((3, 2), bool))["counts"] == [0, 6]


@pytest.mark.parametrize("index", range(len(rle_cases())))
def test_rle_round_trip(index: int) -> None:
    mask = rle_cases()[index]
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    assert sum(rle["counts"]) == mask.size
    assert all(c > 0 for c in rle["counts"][1:])
    np.testing.assert_array_equal(rle_decode(rle), mask)
    packed = rle_encode(mask, compressed=True)
    assert isinstance(packed["counts"], str)
    np.testing.assert_array_equal(rle_decode(packed), mask)
    assert rle_from_string(packed["counts"]) == rle["counts"]
    # JSON round trip (what coco.json holds)
    np.testing.assert_array_equal(rle_decode(json.loads(json.dumps(rle))), mask)


def test_rle_string_codec_handles_large_and_negative_differences() -> None:
    counts = [0, 1, 100000, 3, 5, 2**20, 1, 7, 1]
    assert rle_from_string(rle_to_string(counts)) == counts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy 2 warning
def test_rle_matches_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    for mask in rle_cases():
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = rle_encode(mask, compressed=True)
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(rle_decode({"size": theirs["size"], "counts": theirs["counts"]}), mask)
        # pycocotools decodes our uncompressed form too (frPyObjects)
        plain = rle_encode(mask)
        again = mask_api.frPyObjects(plain, *plain["size"])
        np.testing.assert_array_equal(mask_api.decode(again).astype(bool), mask)
        assert int(mask_api.area(theirs)) == int(mask.sum())
        if mask.any():
            assert bbox_area(mask)[0] == [int(v) for v in mask_api.toBbox(theirs)]


def test_rle_errors() -> None:
    with pytest.raises(ValueError, match="add up"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="non-negative"):
        rle_decode({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(ValueError, match="size"):
        rle_decode({"size": [0, 2], "counts": []})
    with pytest.raises(ValueError, match="invalid character"):
        rle_from_string("0 1")
    with pytest.raises(ValueError, match="end inside"):
        rle_from_string("P")  # continuation bit set on the last character
    with pytest.raises(ValueError, match="only 0 and 1"):
        rle_encode(np.full((2, 2), 3))
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros(4, bool))


# ------------------------------------------------------------------------------------------------------------------
# polygons
# ------------------------------------------------------------------------------------------------------------------
def polygon_cases() -> list[np.ndarray]:
    donut = np.zeros((12, 12), bool)
    donut[2:10, 2:10] = True
    donut[4:8, 4:8] = False
    nested = donut.copy()
    nested[5:7, 5:7] = True  # an island inside the hole
    diagonal = np.zeros((5, 5), bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[3, 1] = True
    single = np.zeros((3, 4), bool)
    single[1, 2] = True
    edges = np.zeros((6, 7), bool)
    edges[0, :] = edges[:, -1] = True
    cases = [donut, nested, diagonal, single, edges, np.ones((4, 5), bool), np.ones((1, 1), bool)]
    cases += [blob_mask((40, 56), seed) for seed in range(6)]
    cases += [np.random.default_rng(s).random((15, 19)) < 0.5 for s in range(3)]  # many pixels touching diagonally
    return cases


@pytest.mark.parametrize("index", range(len(polygon_cases())))
def test_polygons_rasterize_back(index: int) -> None:
    mask = polygon_cases()[index]
    polygons = mask_to_polygons(mask)
    back = rasterize(polygons, mask.shape)
    assert iou(back, mask) >= 0.99
    assert boundary_distance(back, mask) <= 1.0
    np.testing.assert_array_equal(back, mask)  # exact without simplification
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    for poly in polygons:
        assert signed_area(poly[0]) > 0  # exterior: right-hand rule in the numeric coordinates
        assert all(signed_area(hole) < 0 for hole in poly[1:])
        for ring in poly:
            assert ring[0] == ring[-1] and len(ring) >= 4
            xs, ys = np.asarray(ring).T
            assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= mask.shape[1] and ys.max() <= mask.shape[0]


def test_polygon_holes_and_islands() -> None:
    cases = polygon_cases()
    donut, nested = cases[0], cases[1]
    polys = mask_to_polygons(donut)
    assert len(polys) == 1 and len(polys[0]) == 2  # one exterior, one hole
    polys = mask_to_polygons(nested)
    assert len(polys) == 2 and sorted(len(p) for p in polys) == [1, 2]  # the island is its own polygon
    assert mask_to_polygons(np.zeros((3, 3), bool)) == []
    diag = mask_to_polygons(cases[2])
    assert len(diag) == 3  # 4-connected foreground: corner-touching pixels are separate polygons


def test_polygon_coordinates_are_pixel_corners() -> None:
    mask = np.zeros((4, 6), bool)
    mask[1, 2] = True  # pixel (row 1, col 2) covers x in [2, 3], y in [1, 2]
    ring = np.asarray(mask_to_polygons(mask)[0][0])
    assert ring[:, 0].min() == 2.0 and ring[:, 0].max() == 3.0
    assert ring[:, 1].min() == 1.0 and ring[:, 1].max() == 2.0
    np.testing.assert_allclose(ring[:-1].mean(axis=0), [2.5, 1.5])  # centred on the pixel centre


def test_simplified_polygons_stay_close() -> None:
    mask = blob_mask((60, 80), 11)
    simple = mask_to_polygons(mask, simplify=0.5)
    exact = mask_to_polygons(mask)
    assert sum(len(r) for p in simple for r in p) < sum(len(r) for p in exact for r in p)
    back = polygons_to_mask(simple, mask.shape)
    assert iou(back, mask) > 0.9
    assert boundary_distance(back, mask) <= 2.0
    with pytest.raises(ValueError, match="simplify"):
        mask_to_polygons(mask, simplify=-1)


# ------------------------------------------------------------------------------------------------------------------
# TIFF, PNG
# ------------------------------------------------------------------------------------------------------------------
def test_tiff_round_trip_values_and_imagej_metadata() -> None:
    rng = np.random.default_rng(1)
    unit = rng.random((13, 21)).astype(np.float32)
    unit[0, 0] = 0.0
    unit[-1, -1] = 1.0
    settings = {"concept": "rote Flügel", "gamma": 0.6, "base": "bird", "method": "gradcam"}
    data = map_tiff_bytes(unit, settings, imagej=True, label="rote Flügel")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.is_imagej
        assert len(tif.pages) == 1
        page = tif.pages[0]
        assert page.dtype == np.float32
        assert page.compression == 1  # uncompressed: ImageJ's own reader opens it without Bio-Formats
        np.testing.assert_array_equal(page.asarray(), unit)
        ij = tif.imagej_metadata
        assert ij["min"] == 0.0 and ij["max"] == 1.0
        assert ij["Labels"] in ("rote Flügel", ["rote Flügel"])
        assert json.loads(ij["Info"]) == settings
        assert page.description.startswith("ImageJ=")
    array, meta = read_map_tiff(data)
    np.testing.assert_array_equal(array, unit)
    assert meta == settings
    with pytest.raises(ValueError, match="2-D"):
        map_tiff_bytes(np.zeros((2, 2, 2)), imagej=True)


def test_mask_png_is_binary_with_settings() -> None:
    mask = blob_mask((20, 30), 2)
    data = mask_png_bytes(mask, {"concept": "red wing", "threshold": 0.5})
    np.testing.assert_array_equal(png_mask(data), mask)
    with Image.open(io.BytesIO(data)) as im:
        assert json.loads(im.text["traitloc"]) == {"concept": "red wing", "threshold": 0.5}


# ------------------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------------------
FIG_SETTINGS = {"concept": "red wing", "base": "bird", "gamma": 0.6, "method": "gradcam", "threshold": 0.5,
                "model": "ViT-B-16", "result_id": "img0/red-wing"}  # fmt: skip


@pytest.fixture(scope="module")
def figure() -> Any:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:30, 0:40]
    unit = np.exp(-((yy - 12) ** 2 + (xx - 25) ** 2) / 40.0).astype(np.float32)
    return figure_panel(image, unit, unit > 0.5, FIG_SETTINGS, cmap="viridis")


def test_svg_figure_has_editable_text_colorbar_and_settings(figure: Any) -> None:
    data = figure_bytes(figure, "svg", FIG_SETTINGS)
    root = ET.fromstring(data)
    assert root.tag == f"{SVG}svg"
    ids = {el.get("id") for el in root.iter()}
    assert COLORBAR_GID in ids
    assert "traitloc-mask-contour" in ids
    texts = " ".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))
    assert COLORBAR_LABEL in texts  # text stays text (svg.fonttype = none)
    assert "red wing" in texts and "bird" in texts and "γ = 0.6" in texts
    colorbar = next(el for el in root.iter() if el.get("id") == COLORBAR_GID)
    assert any("1.0" in "".join(t.itertext()) for t in colorbar.iter(f"{SVG}text"))  # the colorbar's ticks
    title = root.find(f"{SVG}title")
    assert title is not None and "red wing" in title.text
    desc = next(el for el in root.iter() if el.tag.endswith("}description"))
    assert json.loads(desc.text) == FIG_SETTINGS


def test_pdf_figure_has_text_fonts_and_metadata(figure: Any) -> None:
    data = figure_bytes(figure, "pdf", FIG_SETTINGS)
    assert data.startswith(b"%PDF-")
    assert b"/FontFile2" in data  # TrueType embedded (pdf.fonttype 42): editable text
    pypdf = pytest.importorskip("pypdf")
    reader = pypdf.PdfReader(io.BytesIO(data))
    text = reader.pages[0].extract_text()
    assert COLORBAR_LABEL in text
    assert "red wing" in text and "1.0" in text
    assert "red wing" in reader.metadata.title
    assert json.loads(reader.metadata.subject) == FIG_SETTINGS


@pytest.mark.parametrize("dpi", [72, 200])
def test_png_figure_dpi_and_metadata(figure: Any, dpi: int) -> None:
    data = figure_bytes(figure, "png", FIG_SETTINGS, dpi=dpi)
    with Image.open(io.BytesIO(data)) as im:
        assert im.info["dpi"] == pytest.approx((dpi, dpi), abs=0.5)
        width_in = figure.get_size_inches()[0]
        assert im.size[0] == pytest.approx(width_in * dpi, abs=2)
        assert json.loads(im.text["traitloc"]) == FIG_SETTINGS
        assert "red wing" in im.text["Title"]


def test_figure_without_image_and_bad_options() -> None:
    unit = np.linspace(0, 1, 60, dtype=np.float32).reshape(6, 10)
    fig = figure_panel(None, unit, None, {"target": "Tabby cat", "references": ["Tiger cat"]}, cmap="cividis")
    root = ET.fromstring(figure_bytes(fig, "svg"))
    texts = " ".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))
    assert "image not available" in texts and "Tabby cat" in texts and "Tiger cat" in texts
    with pytest.raises(FormatError, match="perceptually uniform"):
        figure_panel(None, unit, cmap="jet")
    with pytest.raises(FormatError, match="figure format"):
        figure_bytes(fig, "eps")
    with pytest.raises(FormatError, match="dpi"):
        figure_bytes(fig, "png", dpi=5)


# ------------------------------------------------------------------------------------------------------------------
# a results folder from traitloc localize
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def localized(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path, tiny_clip_weights: Path) -> Path:
    """``traitloc localize --save maps,masks,overlays`` with the tiny random model: 2 images (one not square)
    x 2 concepts, started from the images' folder with relative paths (as the README does)."""
    import torch

    from traitloc.cli.commands import main

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("localized")
    images = base / "images"
    images.mkdir()
    Image.fromarray(make_image_array((64, 64), 0)).save(images / "sparrow.png")
    Image.fromarray(make_image_array((80, 50), 1)).save(images / "finch.jpg")
    out = base / "results"
    argv = ["localize", "sparrow.png", "finch.jpg", *[a for c in CONCEPTS for a in ("--concept", c)], "--base",
            "bird", "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu",
            "--save", "maps,masks,overlays", "--out", str(out), "--quiet"]  # fmt: skip
    cwd = os.getcwd()
    try:
        os.chdir(images)
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    df = read_results(out, columns=["status", "map", "mask", "overlay"])
    assert len(df) == 4 and (df["status"] == "ok").all() and (df["map"] != "").all()
    return out


@pytest.mark.slow  # the localize fixture loads open_clip (several seconds on 2 cores)
def test_export_matches_localize_save_files(localized: Path, tmp_path: Path) -> None:
    """Rendering from the store reproduces the files of ``localize --save``: maps exactly (float32 grids), masks and
    overlays identical; every format round-trips to the same mask."""
    out = tmp_path / "export"
    fmts = ["png", "tiff", "overlay", "coco", "geojson", "csv", *(["parquet"] if HAS_PARQUET else [])]
    manifest = export_results(localized, fmts, out, argv=["test"])
    rows = store_rows(localized)
    ids = sorted(rows)
    assert sorted(e["result_id"] for e in manifest["results"]) == ids
    assert manifest["counts"] == {"selected": 4, "exported": 4, "skipped": 0}
    assert not any("warnings" in e for e in manifest["results"])  # the photos were found (relative argv paths)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["formats"] == fmts
    assert on_disk["run"]["command"] == "localize" and on_disk["argv"] == ["test"]
    assert sorted(on_disk["files"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert not leftovers(out) and not leftovers(tmp_path)
    coco = json.loads((out / "coco.json").read_text())
    assert {c["name"] for c in coco["categories"]} == set(CONCEPTS)
    anns = {a["traitloc"]["result_id"]: a for a in coco["annotations"]}
    assert sorted(anns) == ids and sorted(a["id"] for a in coco["annotations"]) == [1, 2, 3, 4]
    for rid, row in rows.items():
        assert row["map"] == f"maps/{rid}.tif" and row["mask"] == f"masks/{rid}.png"
        saved_map, saved_meta = read_map_tiff(localized / row["map"])
        saved_mask = np.asarray(Image.open(localized / row["mask"])) > 127
        # TIFF maps: bit for bit what localize --save wrote, settings in ImageJ Info
        values, settings = read_map_tiff(out / "maps" / f"{rid}.tif")
        assert values.dtype == np.float32 and values.shape == (row["height"], row["width"])
        np.testing.assert_array_equal(values, saved_map)
        np.testing.assert_array_equal(values, render_unit_map(row))
        assert settings["concept"] == row["concept"] and settings["base"] == "bird"
        assert settings["gamma"] == 1.0 and settings["method"] == "gradcam" and settings["threshold"] == 0.5
        assert settings["model"] == saved_meta["model"] and settings["image"] == row["image"]
        # PNG masks: identical to localize's
        mask = png_mask((out / "masks" / f"{rid}.png").read_bytes())
        np.testing.assert_array_equal(mask, saved_mask)
        np.testing.assert_array_equal(mask, render_mask(row, 0.5))
        # overlays: identical pixels to localize's (same working photo, same rendering)
        with Image.open(out / "overlays" / f"{rid}.png") as a, Image.open(localized / row["overlay"]) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # COCO RLE decodes to the mask
        ann = anns[rid]
        np.testing.assert_array_equal(rle_decode(ann["segmentation"]), saved_mask)
        assert ann["area"] == int(saved_mask.sum()) and ann["iscrowd"] == 1 and ann["score"] == row["score"]
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        assert (image["height"], image["width"]) == saved_mask.shape and image["traitloc_image"] == row["image"]
        # GeoJSON polygons rasterize back to the mask
        geo = json.loads((out / "polygons" / f"{row['image_key']}.geojson").read_text())
        feature = next(f for f in geo["features"] if f["id"] == rid)
        assert feature["geometry"]["type"] == "MultiPolygon"
        back = rasterize(feature["geometry"]["coordinates"], saved_mask.shape)
        np.testing.assert_array_equal(back, saved_mask)
        assert feature["properties"]["concept"] == row["concept"]
    import pandas as pd

    table = pd.read_csv(out / "tables" / "results.csv", keep_default_na=False)
    assert sorted(table["result_id"]) == ids and "grid" not in table.columns
    assert list(table.columns[:1]) == ["result_id"] and list(table.columns[-2:]) == ["review_status", "review_note"]
    if not HAS_PARQUET:
        return
    parquet = pd.read_parquet(out / "tables" / "results.parquet")
    assert sorted(table["result_id"]) == ids == sorted(parquet["result_id"])
    assert parquet["gamma"].dtype == np.float64 and parquet["image_key"].map(type).eq(str).all()
    assert str(parquet["width"].dtype) in ("int64", "Int64")
    np.testing.assert_allclose(parquet.sort_values("result_id")["raw_max"], table.sort_values("result_id")["raw_max"])


@pytest.mark.slow
def test_cli_zip_with_figures(localized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "paper.zip"
    rc = export_cli([str(localized), "--format", "figure,png", "--figure-format", "svg,png", "--dpi", "72",
                     "--cmap", "magma", "--zip", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    entries = zip_entries(out)
    for name in entries:
        assert not name.startswith("/") and ".." not in name.split("/")
    manifest = json.loads(entries["manifest.json"])
    assert manifest["options"]["dpi"] == 72 and manifest["options"]["cmap"] == "magma"
    figures = sorted(n for n in entries if n.startswith("figures/"))
    assert len(figures) == 8 and {Path(n).suffix for n in figures} == {".svg", ".png"}
    for name in figures:
        if name.endswith(".png"):
            with Image.open(io.BytesIO(entries[name])) as im:
                assert im.info["dpi"] == pytest.approx((72, 72), abs=0.5)
                settings = json.loads(im.text["traitloc"])
                assert settings["concept"] in CONCEPTS and settings["threshold"] == 0.5
        else:
            root = ET.fromstring(entries[name])
            assert any(el.get("id") == COLORBAR_GID for el in root.iter())
            texts = " ".join("".join(el.itertext()) for el in root.iter(f"{SVG}text"))
            assert "image not available" not in texts  # the photo was drawn
    assert not any("warnings" in e for e in manifest["results"])  # the source images were found
    assert not leftovers(tmp_path)


@pytest.mark.slow  # a tiny classifier, three images
def test_export_of_an_explain_run_matches_its_save_files(tmp_path: Path, image_factory: Any) -> None:
    """``traitloc explain --save maps,masks`` (tiny ViT classifier of tests/tiny_backbones.py): the export renders
    the same maps and masks from the store, labelled by the target class."""
    import torch

    from traitloc.cli.commands import main

    torch.set_num_threads(1)
    images = [image_factory(f"e{s}.png", size=(48, 40), seed=s) for s in range(3)]
    out = tmp_path / "ex"
    argv = ["explain", *map(str, images), "--classifier", "tiny_backbones:tiny_vit_classifier", "--device", "cpu",
            "--save", "maps,masks", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = store_rows(out)
    assert len(rows) == 3
    manifest = export_results(out, "png,tiff,coco", tmp_path / "export")
    assert sorted(e["result_id"] for e in manifest["results"]) == sorted(rows)
    coco = json.loads((tmp_path / "export" / "coco.json").read_text())
    assert {c["name"] for c in coco["categories"]} == {r["target"] for r in rows.values()}
    assert {c["supercategory"] for c in coco["categories"]} == {"target"}
    for rid, row in rows.items():
        values, settings = read_map_tiff(tmp_path / "export" / "maps" / f"{rid}.tif")
        np.testing.assert_array_equal(values, read_map_tiff(out / row["map"])[0])
        assert settings["target"] == row["target"] and settings["references"] == row["references"]
        saved_mask = np.asarray(Image.open(out / row["mask"])) > 127
        np.testing.assert_array_equal(png_mask((tmp_path / "export" / "masks" / f"{rid}.png").read_bytes()), saved_mask)
    target = next(iter(rows.values()))["target"]
    picked = export_results(out, "png", tmp_path / "one", concepts=[target])
    assert {e["label"] for e in picked["results"]} == {target}


# ------------------------------------------------------------------------------------------------------------------
# listing and selection
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    return make_results(tmp_path / "results")


def test_list_results_reads_the_store_and_lists_skipped_rows(handmade: Path) -> None:
    results, skipped = list_results(handmade)
    assert [r.result_id for r in results] == ["img0/red-wing", "img0/blue-tail", "img1/red-wing", "img1/blue-tail"]
    first = results[0]
    assert (first.image_key, first.label, first.kind) == ("img0", "red wing", "concept")
    assert first.row["image"] == str((handmade.parent / "images" / "img0.png").resolve())
    assert "grid" not in first.row and first.row["width"] == 32 and first.row["gamma"] == 0.6
    assert {r.part for r in results} == {0, 1}  # two parts
    # the failed row is not silently dropped: it is listed with its reason (the app shows the count)
    assert skipped == [{"result_id": "broken/red-wing", "image_key": "broken", "label": "red wing",
                        "reason": "error: cannot decode"}]  # fmt: skip


def test_list_results_last_written_row_wins(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", n_images=1, labels=("red wing",))
    store = ResultStore(root, LOCALIZE_COLUMNS, ("image_key", "concept"))
    again = store_rows(root)["img0/red-wing"]
    store.write([{**again, "score": 7.0, "grid": blob_grid(99)}])  # a second writer, same key
    results, _ = list_results(root)
    assert [r.row["score"] for r in results] == [7.0]
    manifest = export_results(root, "tiff", tmp_path / "o")
    values, _ = read_map_tiff(tmp_path / "o" / "maps" / "img0" / "red-wing.tif")
    np.testing.assert_array_equal(values, render_unit_map({**again, "grid": blob_grid(99)}))
    assert manifest["counts"]["exported"] == 1


def test_a_folder_without_a_store_names_localize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.csv").write_text("image,image_key,concept,map,status\n")
    with pytest.raises(FormatError, match=r"no results store .*traitloc localize"):
        list_results(tmp_path / "old")
    assert export_cli([str(tmp_path / "old"), "--format", "png", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "traitloc localize" in err and not (tmp_path / "o").exists()


def test_status_accepted(handmade: Path, tmp_path: Path) -> None:
    write_decisions(handmade, {"img0/red-wing": "accepted", "img1/blue-tail": "accepted", "img0/blue-tail": "rejected",
                               "img1/red-wing": "needs-work"})  # fmt: skip
    decisions = read_decisions(handmade)
    assert decisions["img0/red-wing"].status == "accepted" and decisions["img0/red-wing"].note == "note img0/red-wing"
    out = tmp_path / "accepted.zip"
    manifest = export_results(handmade, ["png", "csv"], out, "accepted")
    assert sorted(e["result_id"] for e in manifest["results"]) == ["img0/red-wing", "img1/blue-tail"]
    assert manifest["selection"] == {"status": "accepted"}
    entries = zip_entries(out)
    assert sorted(n for n in entries if n.startswith("masks/")) == [
        "masks/img0/red-wing.png",
        "masks/img1/blue-tail.png",
    ]
    table = list(csv.DictReader(io.StringIO(entries["tables/results.csv"].decode())))
    assert {r["review_status"] for r in table} == {"accepted"} and table[0]["review_note"].startswith("note")
    rc = export_cli([str(handmade), "--status", "needs-work", "--format", "png", "--out", str(tmp_path / "nw"),
                     "--quiet"])  # fmt: skip
    assert rc == 0 and [p.name for p in (tmp_path / "nw" / "masks").rglob("*.png")] == ["red-wing.png"]


def test_select_by_concept_and_score(handmade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # scores: red wing 0.0, blue tail 0.1 on both photos
    manifest = export_results(handmade, "png", tmp_path / "a", concepts=["blue tail"])
    assert sorted(e["result_id"] for e in manifest["results"]) == ["img0/blue-tail", "img1/blue-tail"]
    assert manifest["selection"] == {"status": "all", "concepts": ["blue tail"]}
    manifest = export_results(handmade, "png", tmp_path / "b", score_min=0.05)
    assert sorted(e["result_id"] for e in manifest["results"]) == ["img0/blue-tail", "img1/blue-tail"]
    manifest = export_results(handmade, "png", tmp_path / "c", score_max=0.05, concepts="red wing")
    assert sorted(e["result_id"] for e in manifest["results"]) == ["img0/red-wing", "img1/red-wing"]
    write_decisions(handmade, {"img0/red-wing": "accepted", "img1/blue-tail": "accepted"})
    manifest = export_results(handmade, "png", tmp_path / "d", "accepted", score_min=0.05)
    assert [e["result_id"] for e in manifest["results"]] == ["img1/blue-tail"]
    assert manifest["selection"] == {"status": "accepted", "score_min": 0.05, "score_max": None}
    rc = export_cli([str(handmade), "--concept", "red wing", "--concept", "blue tail", "--min-score", "0.05",
                     "--max-score", "1", "--format", "png", "--out", str(tmp_path / "e"), "--quiet"])  # fmt: skip
    assert rc == 0 and len(list((tmp_path / "e" / "masks").rglob("*.png"))) == 2
    with pytest.raises(FormatError, match="unknown concept 'red wings'.*'red wing'"):
        export_results(handmade, "png", tmp_path / "x", concepts=["red wings"])
    with pytest.raises(FormatError, match="nothing to export: no ok results and score_min 5"):
        export_results(handmade, "png", tmp_path / "x", score_min=5)
    with pytest.raises(FormatError, match="above score_max"):
        export_results(handmade, "png", tmp_path / "x", score_min=1, score_max=0)
    with pytest.raises(FormatError, match="score_min must be finite"):
        export_results(handmade, "png", tmp_path / "x", score_min=float("nan"))
    rc = export_cli([str(handmade), "--concept", "wing", "--format", "png", "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown concept 'wing'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_selection_errors_and_ids(handmade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = export_cli([str(handmade), "--status", "accepted", "--format", "png", "--zip", str(tmp_path / "a.zip")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no review decisions" in err and "traitloc app" in err
    assert not (tmp_path / "a.zip").exists() and not leftovers(tmp_path)
    write_decisions(handmade, {"img0/red-wing": "rejected"})
    with pytest.raises(FormatError, match="nothing to export: no ok results with review status 'accepted'"):
        export_results(handmade, "png", tmp_path / "a.zip", "accepted")
    manifest = export_results(handmade, "png", tmp_path / "ids", ["img1/red-wing"])
    assert [e["result_id"] for e in manifest["results"]] == ["img1/red-wing"]
    assert manifest["skipped"][0]["reason"] == "error: cannot decode"
    assert manifest["counts"] == {"selected": 1, "exported": 1, "skipped": 1}
    with pytest.raises(FormatError, match="unknown result id"):
        export_results(handmade, "png", tmp_path / "x", ["img9/nothing"])
    with pytest.raises(FormatError, match="unknown result id"):
        export_results(handmade, "png", tmp_path / "x", ["broken/red-wing"])  # a failed row is not exportable
    with pytest.raises(FormatError, match="unknown format"):
        export_results(handmade, "png,jpeg", tmp_path / "x")
    with pytest.raises(FormatError, match="threshold"):
        export_results(handmade, "png", tmp_path / "x", threshold=1.5)
    with pytest.raises(TypeError, match="progress"):
        export_results(handmade, "png", tmp_path / "x", progress="yes")  # type: ignore[arg-type]
    rc = export_cli([str(handmade), "--format", "png", "--figure-format", "eps", "--out", str(tmp_path / "y")])
    assert rc == 0  # figure formats are only checked when figures are asked for
    rc = export_cli([str(handmade), "--format", "figure", "--figure-format", "eps", "--out", str(tmp_path / "z")])
    assert rc == 2 and "figure formats" in capsys.readouterr().err


def test_threshold_and_explain_layout(tmp_path: Path) -> None:
    root = make_results(tmp_path / "explained", kind="target", labels=("Tabby cat",), threshold="otsu")
    rows = store_rows(root)
    # the run's threshold (otsu) by default, the export's when given
    manifest = export_results(root, "png", tmp_path / "run")
    for entry in manifest["results"]:
        mask = png_mask((tmp_path / "run" / "masks" / f"{entry['result_id']}.png").read_bytes())
        np.testing.assert_array_equal(mask, render_mask(rows[entry["result_id"]], "otsu"))
        assert entry["settings"]["threshold"] == "otsu"
    manifest = export_results(root, "png,coco,figure", tmp_path / "out", threshold=0.8, figure_formats="svg")
    for entry in manifest["results"]:
        unit = render_unit_map(rows[entry["result_id"]])
        mask = png_mask((tmp_path / "out" / "masks" / f"{entry['result_id']}.png").read_bytes())
        np.testing.assert_array_equal(mask, unit > 0.8)
        assert 0 < mask.sum() < mask.size
        assert entry["settings"]["threshold"] == 0.8 and entry["settings"]["target"] == "Tabby cat"
        svg = ET.parse(tmp_path / "out" / "figures" / f"{entry['result_id']}.svg").getroot()
        texts = " ".join("".join(el.itertext()) for el in svg.iter(f"{SVG}text"))
        assert "Tabby cat" in texts and "Tiger cat" in texts and "map > 0.8" in texts
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "Tabby cat", "supercategory": "target"}]
    assert export_results(root, "png", tmp_path / "t", concepts=["Tabby cat"])["counts"]["exported"] == 2


def test_float16_grids_render_close(tmp_path: Path) -> None:
    root = tmp_path / "f16"
    store = ResultStore(root, LOCALIZE_COLUMNS, ("image_key", "concept"), grid_dtype="float16")
    grid = blob_grid(3)
    row = {"image": str(tmp_path / "none.png"), "image_key": "a", "concept": "red wing", "status": "ok",
           "width": 40, "height": 30, "resize": "stretch", "interpolation": "bilinear", "grid": grid,
           "grid_h": 6, "grid_w": 8, "raw_max": 1.0}  # fmt: skip
    store.write([row])
    export_results(root, "tiff", tmp_path / "o")
    values, _ = read_map_tiff(tmp_path / "o" / "maps" / "a" / "red-wing.tif")
    assert np.abs(values - render_unit_map(row)).max() <= 1e-3


# ------------------------------------------------------------------------------------------------------------------
# photos: recorded absolute paths, image roots for moved photos
# ------------------------------------------------------------------------------------------------------------------
def test_photos_are_read_where_the_run_recorded_them(handmade: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the recorded absolute path is read wherever it is, image_roots or not (read-only)
    manifest = export_results(handmade, "figure,overlay", tmp_path / "a", ["img0/red-wing"], figure_formats="png",
                              dpi=30, image_roots=[elsewhere])  # fmt: skip
    assert "warnings" not in manifest["results"][0]
    photo = np.asarray(Image.open(handmade.parent / "images" / "img0.png").convert("RGB"))
    with Image.open(tmp_path / "a" / "overlays" / "img0" / "red-wing.png") as im:
        overlay = np.asarray(im)
    assert overlay.shape == photo.shape and not np.array_equal(overlay, photo)
    # moved photos are found in image_roots (by file name), else the export says so and draws without them
    (handmade.parent / "images").rename(tmp_path / "moved")
    manifest = export_results(handmade, "figure,overlay", tmp_path / "b", ["img0/red-wing"], figure_formats="png",
                              dpi=30)  # fmt: skip
    warnings = manifest["results"][0]["warnings"]
    assert any(w.startswith("no overlay: image") and "not found" in w for w in warnings)
    assert any(w.startswith("figure drawn without the image") for w in warnings)
    assert manifest["results"][0]["files"] == ["figures/img0/red-wing.png"]
    manifest = export_results(handmade, "overlay", tmp_path / "c", ["img0/red-wing"], image_roots=[tmp_path / "moved"])
    assert "warnings" not in manifest["results"][0]
    with Image.open(tmp_path / "c" / "overlays" / "img0" / "red-wing.png") as im:
        np.testing.assert_array_equal(np.asarray(im), overlay)


def test_relative_photo_paths_stay_inside_their_roots(tmp_path: Path) -> None:
    root = make_results(tmp_path / "r", n_images=1, labels=("red wing",))
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(secret)
    store = ResultStore(root, LOCALIZE_COLUMNS, ("image_key", "concept"))
    row = store_rows(root)["img0/red-wing"]
    store.write([{**row, "image": "../secret.png"}])  # a relative path that leaves the results folder
    manifest = export_results(root, "overlay", tmp_path / "o")
    assert "not found" in manifest["results"][0]["warnings"][0] and not (tmp_path / "o" / "overlays").exists()


# ------------------------------------------------------------------------------------------------------------------
# tables only, engines, zip bytes
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_PARQUET, reason="no parquet engine (pyarrow or fastparquet)")
def test_audit_tables_only(tmp_path: Path) -> None:
    root = tmp_path / "audit"
    root.mkdir()
    (root / "audit.csv").write_text("image_id,image,attribute,iou_top10,pointing_hit\n1,a/b.jpg,has_wing,0.25,1\n")
    (root / "audit_summary.csv").write_text("source,true_class,verdict\nparts,A,looks at\n")
    manifest = export_results(root, "csv,parquet", tmp_path / "t.zip")
    assert manifest["tables"] == ["tables/audit.csv", "tables/audit.parquet", "tables/audit_summary.csv",
                                  "tables/audit_summary.parquet"]  # fmt: skip
    entries = zip_entries(tmp_path / "t.zip")
    assert entries["tables/audit.csv"].decode().splitlines()[1] == "1,a/b.jpg,has_wing,0.25,1"
    with pytest.raises(FormatError, match="no results store.*traitloc localize"):
        export_results(root, "png", tmp_path / "u.zip")
    with pytest.raises(FormatError, match="no results store"):
        export_results(root, "csv", tmp_path / "u.zip", concepts=["x"])
    # audit keeps its per-image maps in a store without concepts or targets: its tables export as before
    audit_store = ResultStore(root, {"kind": "str", "image_id": "int", "source": "str"}, ("image_id", "source"))
    audit_store.write([{"image": "/x/1.jpg", "image_key": "1", "result_id": "1/parts", "kind": "audit",
                        "image_id": 1, "source": "parts", "status": "ok", "width": 8, "height": 8,
                        "grid": np.ones((2, 2), np.float32), "grid_h": 2, "grid_w": 2}])  # fmt: skip
    again = export_results(root, "csv", tmp_path / "t2.zip")
    assert again["tables"] == ["tables/audit.csv", "tables/audit_summary.csv"]
    with pytest.raises(FormatError, match="no concept or target maps.*--format csv,parquet"):
        export_results(root, "png", tmp_path / "u.zip")


def test_parquet_without_engine_is_a_clear_error(
    handmade: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("pyarrow", "fastparquet"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(FormatError, match="needs pyarrow or fastparquet"):
        export_results(handmade, "csv,parquet", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_zip_bytes(handmade: Path) -> None:
    data, manifest = export_zip_bytes(handmade, ["png", "coco"], None)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert "coco.json" in zf.namelist() and "manifest.json" in zf.namelist()
        coco = json.loads(zf.read("coco.json"))
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4] and len(coco["images"]) == 2
    assert manifest["counts"]["exported"] == 4
    with pytest.raises(TypeError, match="out"):
        export_zip_bytes(handmade, "png", out="x.zip")


# ------------------------------------------------------------------------------------------------------------------
# streaming: progress, the zip grows on disk beside its destination
# ------------------------------------------------------------------------------------------------------------------
def test_progress_callback_and_streamed_zip(handmade: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    seen: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        temps = [p for p in dest.iterdir() if p.name.startswith(".") and ".tmp" in p.name]
        assert len(temps) == 1 and not (dest / "e.zip").exists()  # a temporary file beside the destination
        seen.append((done, total, temps[0].stat().st_size))

    manifest = export_results(handmade, "png,tiff,coco", dest / "e.zip", progress=progress)
    assert [(d, t) for d, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    sizes = [s for _, _, s in seen]
    assert sizes[-1] > sizes[0] > 0  # entries go to disk as they are rendered, not at the end
    assert manifest["counts"]["exported"] == 4 and sorted(p.name for p in dest.iterdir()) == ["e.zip"]


def test_progress_bar_on_stderr(handmade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_cli([str(handmade), "--format", "png", "--zip", str(tmp_path / "p.zip")]) == 0
    err = capsys.readouterr().err
    assert "export" in err and "4/4" in err and "4 results exported, 1 left out" in err


# ------------------------------------------------------------------------------------------------------------------
# safety: ids from the store, fixed files, output locations, atomicity
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, rid",
    [
        ("img0", "img0/../../outside/x"),
        ("..", "../x"),
        ("img0", "/etc/passwd"),
        ("img0", "img0\\..\\x"),
        ("img0", "img0//x"),
        ("img0", "other/x"),  # the id must start with its image key
    ],
)
def test_unsafe_ids_in_the_store_stop_the_export(
    handmade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, rid: str
) -> None:
    store = ResultStore(handmade, LOCALIZE_COLUMNS, ("image_key", "concept"))
    row = store_rows(handmade)["img0/red-wing"]
    store.write([{**row, "image_key": key, "concept": "evil", "result_id": rid}])
    with pytest.raises(FormatError, match="result id|image key"):
        list_results(handmade)
    out = tmp_path / "out"
    assert export_cli([str(handmade), "--format", "png,tiff,geojson", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("result id" in err or "image key" in err)
    assert not out.exists() and not leftovers(tmp_path) and not (tmp_path / "outside").exists()


def test_symlinks_out_of_the_results_folder_are_rejected(handmade: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run.json").write_text('{"command": "secret"}')
    (handmade / "run.json").unlink()
    (handmade / "run.json").symlink_to(outside / "run.json")
    with pytest.raises(FormatError, match="run.json.*resolves outside"):
        export_results(handmade, "png", tmp_path / "out")
    (handmade / "run.json").unlink()
    write_decisions(outside, {"img0/red-wing": "accepted"})
    (handmade / "review.sqlite").symlink_to(outside / "review.sqlite")
    with pytest.raises(FormatError, match="review.sqlite.*resolves outside"):
        export_results(handmade, "png", tmp_path / "out", "accepted")
    assert not (tmp_path / "out").exists()


def test_output_location_guards(handmade: Path, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="results folder itself"):
        export_results(handmade, "png", handmade)
    with pytest.raises(FormatError, match="inside the results folder's results"):
        export_results(handmade, "png", handmade / "results" / "x.zip")
    with pytest.raises(FormatError, match="inside the results folder's masks"):
        export_results(handmade, "png", handmade / "masks" / "x")
    inside = export_results(handmade, "png", handmade / "exports" / "accepted.zip")  # allowed: the app's choice
    assert inside["counts"]["exported"] == 4
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FormatError, match="not empty"):
        export_results(handmade, "png", busy)
    notzip = tmp_path / "notes.zip"
    notzip.write_text("not a zip")
    with pytest.raises(FormatError, match="not a zip"):
        export_results(handmade, "png", notzip)
    assert notzip.read_text() == "not a zip"
    # --force into a folder whose subfolder is a link out: refused, nothing written outside
    victim = tmp_path / "victim"
    victim.mkdir()
    (busy / "masks").symlink_to(victim, target_is_directory=True)
    with pytest.raises(FormatError, match="not a plain folder"):
        export_results(handmade, "png", busy, overwrite=True)
    assert list(victim.iterdir()) == []
    (busy / "masks").unlink()
    manifest = export_results(handmade, "png", busy, overwrite=True)
    assert (busy / "keep.txt").read_text() == "mine" and manifest["counts"]["exported"] == 4


def test_zip_is_atomic(handmade: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "export.zip"
    export_results(handmade, "png", out)
    before = out.read_bytes()
    calls = {"n": 0}
    real = formats.map_tiff_bytes

    def failing(*args: Any, **kwargs: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(formats, "map_tiff_bytes", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_results(handmade, "png,tiff,coco", out)
    assert out.read_bytes() == before  # the old zip is untouched
    with pytest.raises(RuntimeError, match="disk on fire"):
        calls["n"] = 0
        export_results(handmade, "png,tiff", tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"grid": np.full((6, 8), np.nan, np.float32)},  # not finite
        {"grid_h": 5},  # grid size does not match its shape
        {"grid": None},  # an ok row without a grid
        {"interpolation": "nearest"},  # unknown rendering
    ],
)
def test_a_row_that_cannot_be_rendered_is_left_out_with_its_reason(tmp_path: Path, bad: dict[str, Any]) -> None:
    good = make_results(tmp_path / "r")
    row = store_rows(good)["img1/red-wing"]
    ResultStore(good, LOCALIZE_COLUMNS, ("image_key", "concept")).write([{**row, **bad}])
    manifest = export_results(good, "png,tiff", tmp_path / "out")
    assert manifest["counts"] == {"selected": 4, "exported": 3, "skipped": 2}
    left = next(s for s in manifest["skipped"] if s.get("result_id") == "img1/red-wing")
    assert left["reason"] and left["label"] == "red wing"
    assert not (tmp_path / "out" / "maps" / "img1" / "red-wing.tif").exists()


def test_help_and_missing_destination(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        export_cli(["--help"])
    help_text = capsys.readouterr().out
    assert exc.value.code == 0 and "--figure-format" in help_text
    assert "--concept" in help_text and "--min-score" in help_text and "overlay" in help_text
    with pytest.raises(SystemExit) as exc:
        export_cli([str(tmp_path)])  # neither --out nor --zip
    assert exc.value.code == 2
    assert export_cli([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "results folder not found" in capsys.readouterr().err


def test_os_fspath_inputs(handmade: Path, tmp_path: Path) -> None:
    manifest = export_results(os.fspath(handmade), ("png",), os.fspath(tmp_path / "o.zip"))
    assert manifest["counts"]["exported"] == 4
