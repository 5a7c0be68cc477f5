"""Tests for traitloc.data.images: every image is generated in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from traitloc.data.images import IMAGE_EXTENSIONS, ImageLoadError, LoadedImage, find_images, image_keys, load_image

REPO = Path(__file__).resolve().parents[1]


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, im: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def _rgb(result: LoadedImage) -> np.ndarray:
    assert result.image.mode == "RGB"
    return np.asarray(result.image)


# ---------------------------------------------------------------------------------------------------------------
# find_images
# ---------------------------------------------------------------------------------------------------------------
def test_find_images_recursive_sorted_skips_hidden(tmp_path: Path) -> None:
    tiny = Image.new("RGB", (4, 4))
    for rel in ["b/2.png", "b/1.JPG", "a/z.tif", "a/sub/y.jpeg", ".hidden/x.png", "a/.h.png", "a/notes.txt"]:
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            target.write_text("hello")
        else:
            fmt = {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".jpeg": "JPEG"}[target.suffix.lower()]
            tiny.save(target, format=fmt)
    found = find_images([tmp_path])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/sub/y.jpeg", "a/z.tif", "b/1.JPG", "b/2.png"]
    assert find_images(tmp_path) == found  # a single path is accepted as is
    assert find_images([tmp_path]) == found  # deterministic


def test_find_images_explicit_files_kept_in_order_and_deduplicated(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    a = _save(folder / "a.png", Image.new("RGB", (4, 4)))
    odd = tmp_path / "photo.data"
    odd.write_bytes(b"not checked here")
    found = find_images([odd, folder, a, str(a)])
    assert found == [odd, a]


def test_find_images_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        find_images([missing])
    empty = tmp_path / "empty_folder"
    (empty / ".git").mkdir(parents=True)
    _save(empty / ".git" / "x.png", Image.new("RGB", (4, 4)))
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="empty_folder"):
        find_images([empty])
    with pytest.raises(ValueError, match="no input paths"):
        find_images([])
    with pytest.raises(TypeError, match="path"):
        find_images([3])  # type: ignore[list-item]


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# image_keys
# ---------------------------------------------------------------------------------------------------------------
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_image_keys_unique_stems_are_bare(tmp_path: Path) -> None:
    paths = [_touch(tmp_path / "x" / "IMG_0001.jpg"), _touch(tmp_path / "y" / "IMG_0002.jpg")]
    assert image_keys(paths) == {paths[0]: "IMG_0001", paths[1]: "IMG_0002"}


def test_image_keys_one_folder_level_and_same_folder_numbering(tmp_path: Path) -> None:
    paths = [_touch(tmp_path / d / "IMG_0001.jpg") for d in ("day1", "day2")]
    paths += [_touch(tmp_path / "p" / "IMG.jpg"), _touch(tmp_path / "p" / "IMG.png")]
    assert list(image_keys(paths).values()) == ["day1_IMG_0001", "day2_IMG_0001", "IMG", "IMG-2"]


def test_image_keys_collisions_unique_safe_and_order_independent(tmp_path: Path) -> None:
    paths = [
        _touch(tmp_path / "day1" / "IMG_0001.JPG"),
        _touch(tmp_path / "day2" / "IMG_0001.jpg"),
        _touch(tmp_path / "day2" / "img_0001.png"),  # same stem up to case, same folder
        _touch(tmp_path / "day2" / "IMG_0001.tif"),  # same stem, same folder
        _touch(tmp_path / "a" / "same" / "IMG_0001.jpg"),  # same parent name as the next one
        _touch(tmp_path / "b" / "same" / "IMG_0001.jpg"),
        _touch(tmp_path / "day1_IMG_0001.jpg"),  # a real stem equal to a generated key
        _touch(tmp_path / "Grüne Spechte? (1).jpg"),
        _touch(tmp_path / "z" / "unique.jpg"),
    ]
    keys = image_keys(paths)
    assert set(keys) == set(paths)
    values = list(keys.values())
    assert len({v.casefold() for v in values}) == len(values), values
    assert all(v and all(c.isascii() and (c.isalnum() or c in "._-") for c in v) for v in values), values
    assert keys[paths[-1]] == "unique"
    assert keys[paths[-2]] == "Grune_Spechte_1"
    assert keys[paths[6]] == "day1_IMG_0001"  # a real stem keeps its name over a generated key
    assert keys[paths[1]].endswith("day2_IMG_0001") and keys[paths[0]].endswith("day1_IMG_0001")
    assert keys[paths[4]] == "a_same_IMG_0001" and keys[paths[5]] == "b_same_IMG_0001"  # as many levels as needed
    same_folder = sorted(keys[p] for p in paths[1:4])  # cannot be told apart by folder: numbered
    assert same_folder[0].endswith("day2_IMG_0001") and {k[-2:] for k in same_folder[1:]} == {"-2", "-3"}
    # the same set of files gives the same keys whatever the order
    for seed in range(3):
        order = list(np.random.default_rng(seed).permutation(len(paths)))
        assert image_keys([paths[i] for i in order]) == keys


def test_image_keys_windows_reserved_and_empty(tmp_path: Path) -> None:
    paths = [_touch(tmp_path / "con.jpg"), _touch(tmp_path / "???.png")]
    keys = image_keys(paths)
    assert keys[paths[0]].lower() != "con"
    assert keys[paths[1]]  # never empty
    assert image_keys([]) == {}


# ---------------------------------------------------------------------------------------------------------------
# load_image: errors
# ---------------------------------------------------------------------------------------------------------------
def test_truncated_jpeg_is_an_error_naming_file_and_reason(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.jpg", Image.fromarray(_noise(64, 64)), quality=95)
    data = good.read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*truncated or corrupt JPEG") as info:
        load_image(bad)
    assert info.value.path == bad
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never set globally
    assert load_image(good).image.size == (64, 64)


def test_text_file_named_png_and_empty_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match=r"fake\.png.*not an image file"):
        load_image(fake)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.jpg")


def test_min_side_and_tiny_images(tmp_path: Path) -> None:
    path = _save(tmp_path / "tiny.png", Image.fromarray(_noise(10, 10)))
    result = load_image(path)  # loads by default
    assert result.orig_size == (10, 10)
    assert np.array_equal(_rgb(result), _noise(10, 10))
    with pytest.raises(ImageLoadError, match=r"image too small \(10x10 < 16 px\)"):
        load_image(path, min_side=16)


def test_argument_validation(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="max_side"):
        load_image(path, max_side=0)
    with pytest.raises(TypeError, match="min_side"):
        load_image(path, min_side=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path"):
        load_image(123)  # type: ignore[arg-type]


def test_max_pixels_cap_and_pillow_bomb_limit_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "big.png", Image.fromarray(_noise(100, 120)))
    with pytest.raises(ImageLoadError, match="image too large"):
        load_image(path, max_pixels=10_000)
    # A Pillow limit far below the image (Pillow alone would raise DecompressionBombError) does not stop us ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).orig_size == (120, 100)
    # ... and the global setting is restored afterwards
    assert Image.MAX_IMAGE_PIXELS == 1000


# ---------------------------------------------------------------------------------------------------------------
# load_image: modes
# ---------------------------------------------------------------------------------------------------------------
def test_rgb_png_is_lossless(tmp_path: Path) -> None:
    pixels = _noise(33, 47, seed=3)
    result = load_image(_save(tmp_path / "rgb.png", Image.fromarray(pixels)))
    assert result.mode == "RGB" and result.orig_size == (47, 33) and result.warnings == []
    assert np.array_equal(_rgb(result), pixels)


def test_grayscale_and_1bit(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    result = load_image(_save(tmp_path / "gray.png", Image.fromarray(gray)))
    assert result.mode == "L"
    out = _rgb(result)
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 1], gray) and np.array_equal(out[..., 2], gray)

    bits = np.zeros((8, 8), dtype=bool)
    bits[:, 4:] = True
    result = load_image(_save(tmp_path / "bits.png", Image.fromarray(bits)))
    assert result.mode == "1"
    assert set(np.unique(_rgb(result))) == {0, 255}
    assert np.array_equal(_rgb(result)[..., 0] == 255, bits)


def test_rgba_and_la_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), dtype=np.uint8)
    rgba[0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[1] = (0, 0, 255, 255)  # opaque blue
    rgba[2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    rgba[3] = (0, 255, 0, 255)
    out = _rgb(load_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba))))
    assert (out[0] == 255).all()
    assert (out[1] == (0, 0, 255)).all()
    assert (np.abs(out[2].astype(int) - 127) <= 1).all()
    assert (out[3] == (0, 255, 0)).all()

    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[0] = (0, 0)  # transparent black -> white
    la[1] = (50, 255)
    result = load_image(_save(tmp_path / "la.png", Image.fromarray(la)))
    assert result.mode == "LA"
    out = _rgb(result)
    assert (out[0] == 255).all() and (out[1] == 50).all()


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    im = Image.new("P", (2, 2))
    im.putdata(index.ravel().tolist())
    im.putpalette(palette)
    result = load_image(_save(tmp_path / "pal.png", im))
    assert result.mode == "P"
    out = _rgb(result)
    assert (out[0, 0] == (255, 0, 0)).all() and (out[0, 1] == (0, 255, 0)).all() and (out[1, 0] == (0, 0, 255)).all()

    result = load_image(_save(tmp_path / "pal_t.png", im, transparency=1))  # index 1 (green) is transparent
    out = _rgb(result)
    assert (out[0, 1] == 255).all() and (out[1, 1] == 255).all() and (out[0, 0] == (255, 0, 0)).all()

    gif = load_image(_save(tmp_path / "pal.gif", im, transparency=0))
    assert (_rgb(gif)[0, 0] == 255).all() and (_rgb(gif)[1, 0] == (0, 0, 255)).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    result = load_image(_save(tmp_path / "cmyk.jpg", cmyk, quality=95))
    assert result.mode == "CMYK"
    out = _rgb(result).astype(int)
    assert (np.abs(out - np.array([255, 0, 0])) <= 8).all()


def test_16bit_png_keeps_dynamic_range(tmp_path: Path) -> None:
    # A 12-bit-style ramp stored in 16 bits: clipping would give all 255, plain >> 8 would give 0..15.
    ramp = np.linspace(100, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    result = load_image(_save(tmp_path / "deep.png", im))
    assert result.mode.startswith("I")
    out = _rgb(result)[..., 0].astype(int).ravel()
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200
    assert (np.diff(out) >= 0).all()  # monotonic: order of intensities preserved
    assert any("8 bit" in w for w in result.warnings)

    full = np.linspace(0, 65535, 256 * 4).reshape(32, 32).astype(np.uint16)
    out = _rgb(load_image(_save(tmp_path / "full.png", Image.fromarray(full))))[..., 0].astype(int)
    assert np.abs(out - np.rint(full / 257.0)).max() <= 1  # full-range data: same as the standard 16->8 scaling


def test_float_tiff_with_nan(tmp_path: Path) -> None:
    data = np.linspace(-1.0, 3.0, 100, dtype=np.float32).reshape(10, 10)
    data[0, 0] = np.nan
    result = load_image(_save(tmp_path / "f.tif", Image.fromarray(data)))
    out = _rgb(result)[..., 0].astype(int)
    assert out.max() == 255 and out[0, 1] == 0 and out[0, 0] == 0
    assert any("non-finite" in w for w in result.warnings)


def test_multiframe_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = load_image(path)
    assert (_rgb(result) == (255, 0, 0)).all()
    assert any("first" in w for w in result.warnings)


def _two_colour(w: int, h: int) -> np.ndarray:
    """Stored image: left half red, right half blue."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, : w // 2] = (255, 0, 0)
    pixels[:, w // 2 :] = (0, 0, 255)
    return pixels


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_6_rotates_content_and_size(tmp_path: Path) -> None:
    path = _save(tmp_path / "rot.jpg", Image.fromarray(_two_colour(40, 20)), quality=95, exif=_exif(6))
    result = load_image(path)
    assert result.orig_size == (20, 40)  # displayed: width 20, height 40
    assert result.image.size == (20, 40)
    out = _rgb(result).astype(int)
    # orientation 6 = rotate 90 degrees clockwise for display: the stored left (red) half ends at the top.
    assert out[:15, :, 0].mean() > 200 and out[:15, :, 2].mean() < 60
    assert out[25:, :, 2].mean() > 200 and out[25:, :, 0].mean() < 60


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientations_match_pillow_exif_transpose(tmp_path: Path, orientation: int) -> None:
    from PIL import ImageOps

    pixels = _noise(6, 10, seed=orientation)
    path = _save(tmp_path / f"o{orientation}.png", Image.fromarray(pixels), exif=_exif(orientation))
    result = load_image(path)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(_rgb(result), expected)
    assert result.orig_size == (expected.shape[1], expected.shape[0])


def test_large_png_is_reduced_to_max_side(tmp_path: Path) -> None:
    path = _save(tmp_path / "wide.png", Image.fromarray(_noise(50, 300)))
    result = load_image(path, max_side=100)
    assert result.orig_size == (300, 50)
    assert result.image.size == (100, 17)
    assert any("reduced" in w for w in result.warnings)


_HUGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, warnings
    from PIL import Image
    from traitloc.data.images import load_image

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        result = load_image(sys.argv[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "size": result.image.size, "orig_size": result.orig_size, "mode": result.image.mode,
        "pixel": result.image.getpixel((10, 10)), "base_mib": base / 1024, "peak_mib": peak / 1024,
        "bomb_limit": Image.MAX_IMAGE_PIXELS,
    }))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="uses resource.getrusage")
def test_huge_jpeg_12000x9000_loads_within_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    # Created in a child process so that this process does not keep the 430 MB of the full-size image.
    make = (
        "import sys; from PIL import Image; ex = Image.Exif(); ex[0x0112] = 6; "
        "Image.new('RGB', (12000, 9000), (30, 120, 200)).save(sys.argv[1], quality=85, exif=ex)"
    )
    subprocess.run([sys.executable, "-c", make, str(path)], check=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, str(path)], check=True, capture_output=True, text=True, env=env
    )
    import json

    info = json.loads(out.stdout)
    assert tuple(info["orig_size"]) == (9000, 12000)  # full displayed size (orientation 6 swaps)
    assert tuple(info["size"]) == (3072, 4096)  # longer side = max_side, aspect ratio kept
    assert info["mode"] == "RGB"
    assert np.abs(np.array(info["pixel"]) - (30, 120, 200)).max() <= 4
    # A full-size decode alone needs 12000 * 9000 * 4 bytes = 412 MiB; JPEG draft mode decodes at 1/2 scale.
    assert info["peak_mib"] - info["base_mib"] < 330, info
    assert info["bomb_limit"] == Image.MAX_IMAGE_PIXELS  # restored in the child


def test_concurrent_loads_restore_pillow_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths = [_save(tmp_path / f"{i}.png", Image.fromarray(_noise(40, 50, seed=i))) for i in range(8)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # every image is a "bomb" for Pillow alone
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(load_image, paths * 3))
    assert all(r.orig_size == (50, 40) for r in results)
    assert Image.MAX_IMAGE_PIXELS == 500


def test_rgb_png_with_transparent_colour(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30)  # the transparent colour
    pixels[1, 1] = (200, 100, 50)
    result = load_image(_save(tmp_path / "trns.png", Image.fromarray(pixels), transparency=(10, 20, 30)))
    out = _rgb(result)
    assert (out[0, 0] == 255).all() and (out[1, 1] == (200, 100, 50)).all()
