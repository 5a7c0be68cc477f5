"""Tests for traitloc.io.files."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from traitloc import __version__
from traitloc.io.files import (
    atomic_path,
    atomic_write,
    environment_info,
    map_to_unit,
    mask_from_map,
    read_map_tiff,
    read_run_json,
    save_map_tiff,
    save_mask_png,
    save_overlay_png,
    sha256_file,
    slugify,
    utc_now,
    write_run_json,
)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------------------------
def test_atomic_write_bytes_and_str_replace_existing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    atomic_write(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _listing(target.parent) == ["out.txt"]  # no temp litter
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # normal permissions, not mkstemp's 0600


def test_atomic_path_failure_leaves_no_final_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "map.tif"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".tif" and not tmp.exists()
            tmp.write_bytes(b"partial data")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_atomic_path_failure_keeps_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write(target, "old")
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("new but incomplete")
            raise KeyError("interrupted")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["results.json"]


def test_atomic_path_success_and_nothing_written(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
        assert not target.exists()  # invisible under the final name until the block ends
    assert target.read_bytes() == b"done"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "b.bin"):
            pass
    assert _listing(tmp_path) == ["a.bin"]


def test_atomic_write_validates(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="data"):
        atomic_write(tmp_path / "x", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path"):
        atomic_write(None, b"")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# slugify
# ---------------------------------------------------------------------------------------------------------------
def test_slugify_basic_and_stable() -> None:
    assert slugify("Red epaulets (male)") == "red-epaulets-male"
    assert slugify("  has_wing_color::blue  ") == "has-wing-color-blue"
    assert slugify("Mésange bleue") == "mesange-bleue"
    assert slugify("Red epaulets") == slugify("Red epaulets")


def test_slugify_long_prompts_never_collide_and_respect_max_len() -> None:
    base = "a photo of a bird with a bright red patch on the shoulder of the wing, seen from the side, "
    prompts = [base + f"variant {i}" for i in range(200)] + [base + "x" * 40, base + "x" * 41]
    slugs = [slugify(p) for p in prompts]
    assert len(set(slugs)) == len(prompts)
    assert all(len(s) <= 80 for s in slugs)
    assert all(s == slugify(p) for s, p in zip(slugs, prompts, strict=True))
    short = [slugify(p, max_len=20) for p in prompts]
    assert len(set(short)) == len(prompts) and all(len(s) <= 20 for s in short)


def test_slugify_is_filesystem_safe_and_handles_non_ascii() -> None:
    for text in ["赤い翼", "翼 wing", "../../etc/passwd", "CON", "a/b\\c:d*e?f", "ÆØÅ", "🐦"]:
        slug = slugify(text)
        assert slug and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in slug), slug
        assert not slug.startswith("-") and not slug.endswith("-")
    assert slugify("赤い翼") != slugify("青い翼")  # lossy slugs carry a hash
    assert slugify("CON").lower() != "con"


def test_slugify_errors() -> None:
    for bad in ["", "   "]:
        with pytest.raises(ValueError, match="empty"):
            slugify(bad)
    with pytest.raises(ValueError, match="max_len"):
        slugify("abc", max_len=5)
    with pytest.raises(TypeError, match="text"):
        slugify(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------------------------
def test_map_tiff_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((37, 53)).astype(np.float32)
    meta = {
        "concept": "red épaulets",
        "gamma": np.float64(0.6),
        "image_size": np.array([53, 37]),
        "model": "ViT-B-16",
        "nested": {"a": [1, 2]},
    }
    path = save_map_tiff(tmp_path / "maps" / "img" / "red.tif", values, meta)
    back, meta_back = read_map_tiff(path)
    assert back.dtype == np.float32 and np.array_equal(back, values)
    assert meta_back == {
        "concept": "red épaulets",
        "gamma": 0.6,
        "image_size": [53, 37],
        "model": "ViT-B-16",
        "nested": {"a": [1, 2]},
    }
    with tifffile.TiffFile(path) as tif:  # what other readers see
        page = tif.pages[0]
        assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
        assert page.dtype == np.float32 and page.shape == (37, 53)
        assert json.loads(page.description)["model"] == "ViT-B-16"
    with Image.open(path) as im:  # a second, independent TIFF reader
        assert im.mode == "F" and np.array_equal(np.asarray(im), values)
    assert _listing(path.parent) == ["red.tif"]


def test_map_tiff_compresses_and_validates(tmp_path: Path) -> None:
    smooth = np.zeros((256, 256), dtype=np.float32)
    path = save_map_tiff(tmp_path / "zero.tif", smooth, {})
    assert path.stat().st_size < smooth.nbytes / 20
    assert read_map_tiff(path)[1] == {}
    with pytest.raises(ValueError, match="2-D"):
        save_map_tiff(tmp_path / "x.tif", np.zeros((2, 2, 2)), {})
    with pytest.raises(ValueError, match="NaN"):
        save_map_tiff(tmp_path / "x.tif", smooth, {"raw_max": float("nan")})
    with pytest.raises(TypeError, match="JSON"):
        save_map_tiff(tmp_path / "x.tif", smooth, {"obj": object()})
    assert _listing(tmp_path) == ["zero.tif"]


def test_map_to_unit_properties() -> None:
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((20, 30)) * 7.0
    unit = map_to_unit(raw)
    assert unit.dtype == np.float32 and unit.shape == raw.shape
    assert unit.min() >= 0.0 and unit.max() == 1.0
    positive = raw > 0
    np.testing.assert_allclose(unit[positive], raw[positive] / raw.max(), rtol=1e-6)
    assert (unit[~positive] == 0).all()
    np.testing.assert_array_equal(map_to_unit(raw * 3.5), unit)  # scale invariant
    assert not map_to_unit(np.zeros((4, 4))).any()
    assert not map_to_unit(-np.ones((4, 4))).any()
    bad = raw.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        map_to_unit(bad)
    with pytest.raises(ValueError, match="2-D"):
        map_to_unit(np.ones(5))


def test_mask_from_map_threshold_and_otsu() -> None:
    rng = np.random.default_rng(2)
    m = np.zeros((40, 40), dtype=np.float32)
    m[10:20, 5:25] = 0.9
    m += rng.uniform(0, 0.1, m.shape).astype(np.float32)
    m = map_to_unit(m)
    fixed = mask_from_map(m, 0.5)
    assert fixed.dtype == bool and np.array_equal(fixed, m > 0.5)
    from skimage.filters import threshold_otsu

    otsu = mask_from_map(m, "otsu")
    assert np.array_equal(otsu, m > threshold_otsu(m))
    inside = np.zeros_like(otsu)
    inside[10:20, 5:25] = True
    assert otsu[inside].all() and otsu[~inside].mean() < 0.01  # finds the bright block, not the noise
    assert not mask_from_map(np.zeros((5, 5)), "otsu").any()
    assert not mask_from_map(np.zeros((5, 5)), 0.0).any()
    assert mask_from_map(np.ones((5, 5)), "otsu").all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_from_map(m * 2.0)
    with pytest.raises(ValueError, match="threshold"):
        mask_from_map(m, 1.5)
    with pytest.raises(ValueError, match="otsu"):
        mask_from_map(m, "mean")


# ---------------------------------------------------------------------------------------------------------------
# PNGs
# ---------------------------------------------------------------------------------------------------------------
def test_mask_png_values(tmp_path: Path) -> None:
    mask = np.random.default_rng(3).random((17, 23)) > 0.5
    path = save_mask_png(tmp_path / "masks" / "k" / "c.png", mask)
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (23, 17)
        data = np.asarray(im)
    assert set(np.unique(data)) <= {0, 255}
    assert np.array_equal(data == 255, mask)
    save_mask_png(tmp_path / "int.png", mask.astype(np.uint8))
    with pytest.raises(ValueError, match="0 and 1"):
        save_mask_png(tmp_path / "bad.png", mask.astype(np.uint8) * 2)
    with pytest.raises(ValueError, match="2-D"):
        save_mask_png(tmp_path / "bad.png", np.zeros((2, 2, 2), dtype=bool))


def test_overlay_png_blend_and_resize(tmp_path: Path) -> None:
    from matplotlib import colormaps

    image = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heat = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    out = save_overlay_png(tmp_path / "o.png", image, heat, alpha=0.4)
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "RGB" and im.size == (40, 30)
        assert np.array_equal(np.asarray(im), out)
    expected = 0.6 * image + 0.4 * 255 * colormaps["inferno"](heat)[..., :3]
    assert np.abs(out.astype(float) - expected).max() <= 0.501
    # alpha 0 gives the image back, alpha 1 the colour map alone
    assert np.array_equal(save_overlay_png(tmp_path / "a0.png", Image.fromarray(image), heat, alpha=0.0), image)
    pure = save_overlay_png(tmp_path / "a1.png", image, heat, alpha=1.0, cmap="viridis")
    assert np.abs(pure.astype(float) - 255 * colormaps["viridis"](heat)[..., :3]).max() <= 0.501
    # a coarse map is resized to the image
    coarse = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    out = save_overlay_png(tmp_path / "c.png", np.zeros((30, 40), dtype=np.uint8), coarse, alpha=1.0)
    assert out.shape == (30, 40, 3)
    assert out[:, :5].sum() < out[:, -5:].sum()  # the hot column stays on the right
    with pytest.raises(ValueError, match="colormap"):
        save_overlay_png(tmp_path / "x.png", image, heat, cmap="no-such-map")
    with pytest.raises(ValueError, match="alpha"):
        save_overlay_png(tmp_path / "x.png", image, heat, alpha=2.0)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# the file writers on rows of a results store (what `localize --save` and `traitloc export` write)
# ---------------------------------------------------------------------------------------------------------------
def test_writers_on_store_rows(tmp_path: Path) -> None:
    from traitloc.io.store import (
        ResultStore,
        read_results,
        render_map,
        render_mask,
        render_overlay,
        render_unit_map,
        rows_of,
    )

    rng = np.random.default_rng(7)
    grid = rng.standard_normal((5, 7)).astype(np.float32)
    grid[2, 3] = 4.0  # a clear maximum
    store = ResultStore(tmp_path / "run", {"concept": "str", "score": "float"}, ("image_key", "concept"))
    store.write([
        {"image": str(tmp_path / "a.png"), "image_key": "a", "concept": "red wing", "status": "ok", "score": 0.5,
         "width": 41, "height": 29, "resize": "stretch", "interpolation": "bilinear", "grid": grid, "grid_h": 5,
         "grid_w": 7, "raw_max": 4.0},
        {"image": str(tmp_path / "b.png"), "image_key": "b", "concept": "red wing", "status": "error: unreadable"},
    ])  # fmt: skip
    rows = {r["image_key"]: r for r in rows_of(read_results(tmp_path / "run"))}
    assert rows["a"]["result_id"] == "a/red-wing" and rows["b"]["status"].startswith("error")
    row = rows["a"]
    # TIFF: the rendered unit map round-trips bit for bit, at the original size
    unit = render_unit_map(row)
    assert unit.shape == (29, 41) and unit.max() == 1.0 and unit.min() == 0.0
    np.testing.assert_array_equal(unit, map_to_unit(render_map(row)))
    save_map_tiff(tmp_path / "m.tif", unit, {"concept": row["concept"]})
    back, meta = read_map_tiff(tmp_path / "m.tif")
    np.testing.assert_array_equal(back, unit)
    assert meta["concept"] == "red wing"
    # PNG mask: the rendered mask, 0/255
    save_mask_png(tmp_path / "m.png", render_mask(row, 0.5))
    with Image.open(tmp_path / "m.png") as im:
        np.testing.assert_array_equal(np.asarray(im) == 255, unit > 0.5)
    # overlay: the writer and render_overlay agree, at the photo's size (a reduced copy works too)
    photo = rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)
    written = save_overlay_png(tmp_path / "o.png", photo, unit)
    np.testing.assert_array_equal(written, render_overlay(row, photo))
    small = render_overlay(row, Image.fromarray(photo).resize((20, 14)))
    assert small.shape == (14, 20, 3)
    with pytest.raises(ValueError, match="no map"):
        render_unit_map(rows["b"])


# ---------------------------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------------------------
def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * 1024 + 7)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=100) == hashlib.sha256(data).hexdigest()


def test_environment_info_and_utc_now() -> None:
    info = environment_info()
    assert info["traitloc"] == __version__
    assert info["numpy"] == np.__version__
    for key in ("torch", "open_clip", "python", "platform"):
        assert key in info
    stamp = utc_now()
    assert stamp.endswith("Z")
    parsed = datetime.fromisoformat(stamp[:-1] + "+00:00")
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 60


def test_read_run_json_is_lenient_and_reads_what_write_run_json_wrote(tmp_path: Path) -> None:
    """The export and the review app show a run's settings: a missing or damaged run.json gives {}, not an error."""
    path = tmp_path / "run.json"
    assert read_run_json(path) == {}  # missing
    path.write_text('{"gamma": 1.0,', encoding="utf-8")
    assert read_run_json(path) == {}  # truncated
    path.write_text("[1, 2]", encoding="utf-8")
    assert read_run_json(path) == {}  # not an object
    path.write_text('{"raw_max": NaN, "hi": Infinity, "ok": 2}', encoding="utf-8")
    assert read_run_json(path) == {"raw_max": None, "hi": None, "ok": 2}  # not JSON: read as missing
    write_run_json(path, {"gamma": 0.5, "start_utc": utc_now()})
    got = read_run_json(path)
    assert got["gamma"] == 0.5 and "environment" in got


def test_write_run_json(tmp_path: Path) -> None:
    start = utc_now()
    info = {
        "argv": ["traitloc", "localize", "x.jpg"],
        "gamma": np.float32(1.0),
        "pretrained": tmp_path / "w.safetensors",
        "start_utc": start,
        "end_utc": utc_now(),
    }
    path = write_run_json(tmp_path / "run.json", info)
    data = json.loads(path.read_text())
    assert data["argv"] == info["argv"] and data["gamma"] == 1.0 and data["start_utc"] == start
    assert data["pretrained"] == str(tmp_path / "w.safetensors")
    assert data["environment"]["traitloc"] == __version__
    assert "environment" not in info  # the caller's mapping is not modified
    with pytest.raises(ValueError, match="start_utc"):
        write_run_json(tmp_path / "bad.json", {"start_utc": "yesterday"})
    with pytest.raises(ValueError, match="UTC"):
        write_run_json(tmp_path / "bad.json", {"end_utc": "2025-01-01T10:00:00+02:00"})
    with pytest.raises(ValueError, match="NaN"):
        write_run_json(tmp_path / "bad.json", {"raw_max": float("inf")})
    assert _listing(tmp_path) == ["run.json"]
