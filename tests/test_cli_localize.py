"""End-to-end tests of ``traitloc localize`` (DESIGN.md §6) through ``traitloc.cli.main`` and the console script.

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

from traitloc.batch import NO_BASE
from traitloc.cli import build_parser, main
from traitloc.export import map_to_unit, read_map_tiff, slugify

REQUIRED_COLUMNS = ["image", "image_key", "concept", "base", "gamma", "method", "raw_max", "map", "mask", "status"]
RUN_JSON_KEYS = [
    "argv", "model", "pretrained", "pretrained_sha256", "device", "dtype", "image_size", "prompts", "gamma",
    "method", "target_layer", "seed", "start_utc", "end_utc", "environment", "truncated_prompts",
]  # fmt: skip
CONCEPTS = ["red wing", "Blue tail (male)"]


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
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rows_by(rows: list[dict[str, str]], image_name: str) -> list[dict[str, str]]:
    return [r for r in rows if Path(r["image"]).name == image_name]


def read_map(out: Path, row: dict[str, str]) -> np.ndarray:
    return read_map_tiff(out / row["map"])[0]


def temp_files(out: Path) -> list[Path]:
    """Hidden or temporary files left in the output folder (atomic writers use hidden ``.name.xxx.tmp.ext``)."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def file_state(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every output file except run.json (rewritten on every run, by design)."""
    return {
        p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def check_row_outputs(out: Path, row: dict[str, str], size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Check the files of one ``ok`` row against the contract; return its map."""
    assert row["status"] == "ok", row
    key, slug = row["image_key"], slugify(row["concept"])
    assert row["map"] == f"maps/{key}/{slug}.tif"
    assert row["mask"] == f"masks/{key}/{slug}.png"
    with tifffile.TiffFile(out / row["map"]) as tif:
        assert len(tif.pages) == 1
        assert tif.pages[0].dtype == np.float32
    m, meta = read_map_tiff(out / row["map"])
    if size_hw is not None:
        assert m.shape == size_hw
    assert m.dtype == np.float32
    assert np.isfinite(m).all()
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert m.max() == pytest.approx(1.0) or m.max() == 0.0
    for k in ("concept", "base", "gamma", "method", "model", "pretrained", "target_layer", "raw_max"):
        assert k in meta, k
    assert meta["concept"] == row["concept"]
    assert meta["method"] == row["method"]
    assert float(row["raw_max"]) == pytest.approx(meta["raw_max"])
    with Image.open(out / row["mask"]) as im:
        assert im.mode == "L"
        mask = np.asarray(im)
    assert mask.shape == m.shape
    assert set(np.unique(mask).tolist()) <= {0, 255}
    with Image.open(out / f"overlays/{key}/{slug}.png") as im:
        assert im.mode == "RGB"
        im.load()
    return m


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

    rows = read_rows(out)
    with open(out / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert set(REQUIRED_COLUMNS) <= set(header)
    assert len(rows) == 3 * len(CONCEPTS)
    assert all(r["status"] == "ok" for r in rows)
    keys = {Path(r["image"]).as_posix().split("images/", 1)[1]: r["image_key"] for r in rows}
    assert keys["wide.jpg"] == "wide"
    assert len(set(keys.values())) == 3 and all("native" in k for k in (keys["native.png"], keys["sub/native.jpg"]))

    sizes = {"native.png": (64, 64), "wide.jpg": (90, 120), "sub/native.jpg": (70, 50)}
    for r in rows:
        rel = Path(r["image"]).as_posix().split("images/", 1)[1]
        assert (r["concept"] in CONCEPTS, r["base"], r["gamma"], r["method"]) == (True, "bird", "1", "gradcam")
        m = check_row_outputs(out, r, sizes[rel])
        _, meta = read_map_tiff(out / r["map"])
        assert (meta["base"], meta["gamma"]) == ("bird", 1.0)
        mask = np.asarray(Image.open(out / r["mask"]))
        np.testing.assert_array_equal(mask == 255, m > 0.5)  # default threshold 0.5 on the [0, 1] map
        with Image.open(out / r["overlay"]) as ov:
            assert ov.size == sizes[rel][::-1]
    assert {r["map"] for r in rows} == {p.relative_to(out).as_posix() for p in (out / "maps").rglob("*.tif")}

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
    assert temp_files(out) == []


def test_native_size_square_image_is_used_as_is(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], tiny_bundle: Any, capsys
) -> None:
    import torch

    from traitloc.localize import ConceptLocalizer

    path = image_factory("square.png", (64, 64), seed=5)
    out = tmp_path / "out"
    rc, err = run(capsys, [str(path), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)], model_args)
    assert rc == 0, err
    rows = read_rows(out)

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    mean = np.asarray(tiny_bundle.mean, dtype=np.float32)
    std = np.asarray(tiny_bundle.std, dtype=np.float32)
    x = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())[None]  # no resize, no crop
    res = ConceptLocalizer(tiny_bundle).explain_tensor(x, CONCEPTS, base="bird", gamma=1.0)[0]
    for q, concept in enumerate(CONCEPTS):
        (row,) = [r for r in rows if r["concept"] == concept]
        raw = res.map(q, (64, 64))
        assert float(row["raw_max"]) == pytest.approx(float(raw.max()), rel=1e-4)
        np.testing.assert_allclose(read_map(out, row), map_to_unit(raw), atol=1e-5)


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
    rows = read_rows(out)
    assert len(rows) == 11 * len(CONCEPTS)
    assert Counter(Path(r["image"]).name for r in rows) == dict.fromkeys(
        ["good.png", "truncated.jpg", "notes.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg",
         "deep16.png", "tiny10.png", "rotated.jpg", "upright.png"], len(CONCEPTS)
    )  # fmt: skip
    for r in rows_by(rows, "truncated.jpg"):
        assert r["status"].startswith("error:") and "truncated" in r["status"], r["status"]
        assert r["map"] == r["mask"] == ""
    for r in rows_by(rows, "notes.png"):
        assert r["status"].startswith("error:") and "not an image" in r["status"], r["status"]
    assert not (out / "maps" / "truncated").exists() and not (out / "maps" / "notes").exists()

    sizes = {"good.png": (64, 64), "gray.png": (60, 80), "rgba.png": (70, 70), "palette.png": (48, 64),
             "cmyk.jpg": (80, 60), "deep16.png": (54, 72), "tiny10.png": (10, 10), "rotated.jpg": (96, 64),
             "upright.png": (96, 64)}  # fmt: skip
    for name, hw in sizes.items():
        for r in rows_by(rows, name):
            check_row_outputs(out, r, hw)
            assert (int(r["height"]), int(r["width"])) == hw
    assert all("16" in r["notes"] or "scaled" in r["notes"] for r in rows_by(rows, "deep16.png"))
    # the EXIF-rotated photo is explained as displayed: its maps equal those of the physically rotated copy
    for concept in CONCEPTS:
        (a,) = [r for r in rows_by(rows, "rotated.jpg") if r["concept"] == concept]
        (b,) = [r for r in rows_by(rows, "upright.png") if r["concept"] == concept]
        np.testing.assert_allclose(read_map(out, a), read_map(out, b), atol=1e-5)
        assert float(a["raw_max"]) == pytest.approx(float(b["raw_max"]), rel=1e-4)
    assert temp_files(out) == []


@pytest.mark.slow
def test_huge_jpeg_map_is_written_at_full_size(
    tmp_path: Path, model_args: list[str], capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    W, H = 12000, 9000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000_000)  # this test opens the 108-MP mask PNG itself
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
    rc, err = run(capsys, [str(folder), "--concept", "white disc", "--base", "photo", "--out", str(out)], model_args)
    assert rc == 0, err
    (row,) = read_rows(out)
    m = check_row_outputs(out, row, (H, W))
    assert (int(row["width"]), int(row["height"])) == (W, H)
    assert "reduced" in row["notes"]
    del m
    with Image.open(out / row["overlay"]) as ov:
        assert max(ov.size) <= 4096  # the overlay is drawn on the working image


# ------------------------------------------------------------------------------------------------------------------
# prompts and arguments
# ------------------------------------------------------------------------------------------------------------------
def one_line_error(rc: int, err: str) -> str:
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("traitloc localize: error:")
    return lines[0]


@pytest.mark.parametrize("concept", ["", "   "])
def test_empty_prompt_exits_2_with_one_line(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, concept: str
) -> None:
    path = image_factory("a.png")
    out = tmp_path / "out"
    line = one_line_error(*run(capsys, [str(path), "--concept", concept, "--out", str(out)], model_args))
    assert "empty" in line
    assert not (out / "results.csv").exists()


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
    ],
    ids=["weights", "config", "traits"],
)
def test_bad_model_or_trait_arguments_exit_2_with_one_line(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys, bad: list[str], expected: str
) -> None:
    path = image_factory("a.png")
    args = [str(path), "--concept", "x", "--out", str(tmp_path / "o")]
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
    with pytest.warns(UserWarning, match="truncated"):
        rc, err = run(capsys, [str(path), "--concept", long_prompt, "--concept", "bill", "--out", str(out)], model_args)
    assert rc == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["truncated_prompts"] == [long_prompt]
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    (row,) = [r for r in rows if r["concept"] == long_prompt]
    assert len(Path(row["map"]).name) <= 80 + len(".tif")
    check_row_outputs(out, row, (64, 64))


@pytest.mark.slow  # 2-8 s on a shared 2-core machine: 936 files written and fsynced
def test_cub200_trait_list_on_one_image(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    from traitloc.traits import load_trait_list

    traits = load_trait_list("cub200")
    path = image_factory("bird.png", (64, 64))
    out = tmp_path / "out"
    rc, err = run(capsys, [str(path), "--traits", "cub200", "--base", "bird", "--out", str(out)], model_args)
    assert rc == 0, err
    rows = read_rows(out)
    assert len(rows) == len({t.prompt for t in traits}) == 312
    assert all(r["status"] == "ok" for r in rows)
    assert {r["trait"] for r in rows} == {t.name for t in traits}
    assert len({r["map"] for r in rows}) == 312  # distinct slugs
    for r in rows[::31]:
        check_row_outputs(out, r, (64, 64))
    assert len(json.loads((out / "run.json").read_text())["prompts"]) == 312


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
    args = [str(folder), *concept_args(CONCEPTS), "--base", "bird", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    csv_before = (out / "results.csv").read_bytes()
    state = file_state(out)
    assert len(state) == 1 + 3 * 3 * len(CONCEPTS)
    # what a run killed mid-write leaves behind: a hidden temporary file (removed by the next run)
    stale = out / "maps" / "im0" / f".{slugify(CONCEPTS[0])}.0123456789ab.tmp.tif"
    stale.write_bytes(b"partial")
    time.sleep(0.05)  # so that a rewritten file would get a new mtime even on coarse clocks

    rc, err = run(capsys, args, model_args, quiet=False)
    assert rc == 0, err
    assert "3 already done" in err
    assert not stale.exists()
    assert (out / "results.csv").read_bytes() == csv_before
    assert file_state(out) == state
    info = json.loads((out / "run.json").read_text())
    assert info["n_images_todo"] == 0 and info["counts"]["skipped"] == 3

    # one more concept: only its files are new, the finished rows stay as they are
    rc, err = run(capsys, [*args, "--concept", "yellow bill"], model_args)
    assert rc == 0, err
    assert (out / "results.csv").read_bytes().startswith(csv_before)
    after = file_state(out)
    assert {k: v for k, v in after.items() if k in state and k != "results.csv"} == {
        k: v for k, v in state.items() if k != "results.csv"
    }
    rows = read_rows(out)
    assert len(rows) == 3 * 3
    assert Counter((r["image_key"], r["concept"]) for r in rows).most_common(1)[0][1] == 1


def console_script() -> str:
    exe = Path(sys.executable).with_name("traitloc")
    return str(exe) if exe.exists() else (shutil.which("traitloc") or "traitloc")


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_partial_files(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    folder = tmp_path / "images"
    n_images = 12
    for i in range(n_images):
        image_factory(f"photo{i:02d}.jpg", (320, 240), seed=100 + i)
    concepts = [f"trait number {k}" for k in range(4)]
    out = tmp_path / "out"
    args = [str(folder), *concept_args(concepts), "--base", "bird", "--batch-size", "1", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [console_script(), "localize", *args, *model_args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    csv_path = out / "results.csv"
    deadline = time.monotonic() + 120
    n_rows = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.exists():
                n_rows = csv_path.read_bytes().count(b"\n") - 1
                if n_rows >= len(concepts):
                    break
            time.sleep(0.005)
        time.sleep(0.03)  # land somewhere inside the next image's writes
    finally:
        finished_early = proc.poll() is not None
        if not finished_early:
            proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
    assert not finished_early, f"the run ended before it could be killed (rc {proc.returncode}): {stderr[-2000:]}"
    killed_rows = read_rows(out)
    with capsys.disabled():  # shown with -s
        print(f"\nkilled after {len(killed_rows)} rows; temporary files left: {[p.name for p in temp_files(out)]}")
    assert 0 < len(killed_rows) < n_images * len(concepts), "kill did not land half-way"

    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    rows = read_rows(out)
    counts = Counter((r["image_key"], r["concept"]) for r in rows)
    assert len(counts) == n_images * len(concepts)
    assert set(counts.values()) == {1}
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        check_row_outputs(out, r, (240, 320))
    assert temp_files(out) == []
    # the rows finished before the kill were not redone
    before = {(r["image_key"], r["concept"]): r["raw_max"] for r in killed_rows}
    assert all(r["raw_max"] == before[k] for r in rows if (k := (r["image_key"], r["concept"])) in before)


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
    rows = read_rows(out)
    assert len(rows) == 2 * len(CONCEPTS)
    for r in rows:
        assert r["method"] == method_args[1]
        check_row_outputs(out, r, (64, 64) if r["image_key"] == "a" else (60, 90))
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
    for r in read_rows(out):
        check_row_outputs(out, r, (60, 90))


def test_resize_aspect_keeps_original_size(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], capsys
) -> None:
    path = image_factory("wide.png", (160, 64), seed=4)
    maps = {}
    for mode in ("stretch", "aspect"):
        out = tmp_path / mode
        rc, err = run(capsys, [str(path), "--concept", "red wing", "--resize", mode, "--out", str(out)], model_args)
        assert rc == 0, err
        (row,) = read_rows(out)
        maps[mode] = check_row_outputs(out, row, (64, 160))
        assert json.loads((out / "run.json").read_text())["resize"] == mode
        assert read_map_tiff(out / row["map"])[1]["resize"] == mode
    assert not np.allclose(maps["stretch"], maps["aspect"])  # a different input grid (about 2 x 6 patches)


def test_save_signed(
    tmp_path: Path, image_factory: Callable[..., Path], model_args: list[str], tiny_bundle: Any, capsys
) -> None:
    from traitloc.localize import ConceptLocalizer

    a = image_factory("a.png", (64, 64), seed=1)
    image_factory("b.png", (100, 40), seed=2)
    out = tmp_path / "out"
    args = [str(tmp_path / "images"), *concept_args(CONCEPTS), "--base", "bird", "--save-signed", "--out", str(out)]
    rc, err = run(capsys, args, model_args)
    assert rc == 0, err
    engine = ConceptLocalizer(tiny_bundle).explain([Image.open(a).convert("RGB")], CONCEPTS, "bird", 1.0)[0]
    n_negative = 0
    for r in read_rows(out):
        m = check_row_outputs(out, r, None)
        signed_path = out / "signed" / r["image_key"] / f"{slugify(r['concept'])}.tif"
        with tifffile.TiffFile(signed_path) as tif:
            assert tif.pages[0].dtype == np.float32
        signed, meta = read_map_tiff(signed_path)
        assert signed.shape == m.shape and np.isfinite(signed).all()
        assert meta["concept"] == r["concept"]
        raw = m * float(r["raw_max"])
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
        rows = read_rows(out)
        assert all(r["base"] == ("bird" if "base" in name else NO_BASE) for r in rows)
        maps[name] = {(r["image_key"], r["concept"]): check_row_outputs(out, r) for r in rows}
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
