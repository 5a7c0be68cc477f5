"""Tests for traitloc.data.cub on the synthetic CUB (tests/cubfake.py) and, marked ``cub``, on ../shared/cub."""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cubfake import (
    COLOR_RGB,
    WING_COLORS,
    cub_attribute_names,
    fake_class_attributes,
    fake_class_name,
    make_fake_cub,
)
from PIL import Image

from traitloc.data.cub import CUB, readable_class_name
from traitloc.data.traits import CUB_PARTS

CUB_ROOT = Path(os.environ.get("TRAITLOC_CUB_ROOT", Path(__file__).resolve().parents[2] / "shared" / "cub"))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return make_fake_cub(tmp_path_factory.mktemp("cub"), n_classes=3, images_per_class=4, extra_classes=2)


@pytest.fixture(scope="module")
def fake(fake_root) -> CUB:
    return CUB(fake_root)


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- the fake itself
def test_fake_cub_files_follow_the_layout(fake_root):
    base = fake_root / "CUB_200_2011"
    assert (fake_root / "attributes.txt").is_file() and not (base / "attributes.txt").exists()
    assert [r[1:] for r in _lines(base / "parts" / "parts.txt")] == [p.split() for p in CUB_PARTS]
    assert len(_lines(base / "images.txt")) == 12
    assert len(_lines(base / "parts" / "part_locs.txt")) == 12 * 15
    assert len(_lines(base / "classes.txt")) == 5
    assert len(list((base / "images").rglob("*.jpg"))) == 12


def test_fake_cub_is_deterministic(tmp_path):
    a = make_fake_cub(tmp_path / "a", seed=3)
    b = make_fake_cub(tmp_path / "b", seed=3)
    c = make_fake_cub(tmp_path / "c", seed=4)
    for rel in ("CUB_200_2011/parts/part_locs.txt", "CUB_200_2011/bounding_boxes.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()


def test_fake_cub_wings_show_the_class_color(fake):
    for _, row in fake.split("all").iterrows():
        locs = fake.part_locs(int(row.image_id)).set_index("part")
        with Image.open(fake.image_path(int(row.image_id))) as im:
            assert im.size == (64, 48)
            pixels = np.asarray(im.convert("RGB"), dtype=float)
        x, y = locs.loc["left wing", ["x", "y"]].astype(int)
        seen = pixels[y, x]
        distances = {c: np.abs(seen - np.array(rgb)).sum() for c, rgb in COLOR_RGB.items()}
        assert min(distances, key=distances.get) == WING_COLORS[int(row.class_id) - 1]


def test_fake_cub_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="omit: unknown file"):
        make_fake_cub(tmp_path, omit=["nope.txt"])
    with pytest.raises(ValueError, match="empty_classes must be within 1..3"):
        make_fake_cub(tmp_path, empty_classes=[4])
    with pytest.raises(ValueError, match="n_classes"):
        make_fake_cub(tmp_path, n_classes=0)
    with pytest.raises(ValueError, match="size"):
        make_fake_cub(tmp_path, size=(8, 8))


# ---------------------------------------------------------------- reader on the fake
def test_classes(fake):
    classes = fake.classes
    assert list(classes.columns) == ["class_id", "name", "readable_name"]
    assert classes["class_id"].tolist() == [1, 2, 3, 4, 5]
    assert classes["name"].tolist() == [fake_class_name(c) for c in range(1, 6)]
    assert classes["readable_name"].iloc[0] == "Blue winged Testbird"
    assert fake.classes_with_images()["class_id"].tolist() == [1, 2, 3]
    assert fake.classes_with_images()["n_images"].tolist() == [4, 4, 4]


def test_images_table(fake, fake_root):
    images = fake.images
    assert list(images.columns) == ["image_id", "path", "class_id", "is_train", "x", "y", "width", "height", "exists"]
    raw = _lines(fake_root / "CUB_200_2011" / "images.txt")
    assert images["image_id"].tolist() == [int(r[0]) for r in raw]
    assert images["path"].tolist() == [r[1] for r in raw]
    labels = dict((int(a), int(b)) for a, b in _lines(fake_root / "CUB_200_2011" / "image_class_labels.txt"))
    assert images["class_id"].tolist() == [labels[i] for i in images["image_id"]]
    boxes = {int(r[0]): [float(v) for v in r[1:]] for r in _lines(fake_root / "CUB_200_2011" / "bounding_boxes.txt")}
    assert images[["x", "y", "width", "height"]].to_numpy().tolist() == [boxes[i] for i in images["image_id"]]
    assert images["exists"].all() and fake.missing_images == 0
    assert images["is_train"].dtype == bool


def test_splits(fake):
    train, test, every = fake.split("train"), fake.split("test"), fake.split("all")
    assert len(train) == len(test) == 6 and len(every) == 12
    assert train["is_train"].all() and not test["is_train"].any()
    assert set(train["image_id"]).isdisjoint(test["image_id"])
    assert train.groupby("class_id").size().tolist() == [2, 2, 2]
    assert train.index.tolist() == list(range(6))
    only = fake.split("test", classes=["red winged testbird", 3])
    assert set(only["class_id"]) == {2, 3} and len(only) == 4
    assert fake.split("all", classes=4).empty
    with pytest.raises(ValueError, match="split must be one of train, test, all"):
        fake.split("val")


def test_parts_and_keypoints(fake, fake_root):
    assert fake.parts == CUB_PARTS
    raw = _lines(fake_root / "CUB_200_2011" / "parts" / "part_locs.txt")
    assert len(fake.part_locations) == len(raw)
    for image_id in (1, 7, 12):
        locs = fake.part_locs(image_id)
        assert list(locs.columns) == ["part", "x", "y", "visible"]
        assert locs["part"].tolist() == list(CUB_PARTS)
        rows = [r for r in raw if int(r[0]) == image_id]
        assert locs[["x", "y"]].to_numpy().tolist() == [[float(r[2]), float(r[3])] for r in rows]
        assert locs["visible"].tolist() == [r[4] == "1" for r in rows]
        assert locs["visible"].sum() == 14
        box = fake.images.set_index("image_id").loc[image_id]
        seen = locs[locs["visible"]]
        assert (seen["x"] >= box.x).all() and (seen["x"] < box.x + box.width).all()
        assert (seen["y"] >= box.y).all() and (seen["y"] < box.y + box.height).all()
        assert (locs.loc[~locs["visible"], ["x", "y"]].to_numpy() == 0).all()
    with pytest.raises(ValueError, match="unknown CUB image id 99"):
        fake.part_locs(99)
    with pytest.raises(TypeError, match="image_id must be an int"):
        fake.part_locs("1")


def test_attributes(fake):
    assert fake.attribute_names == cub_attribute_names()
    values = fake.class_attributes
    assert values.shape == (5, 312)
    np.testing.assert_allclose(values, fake_class_attributes(5, 312))
    assert not values.flags.writeable
    wing = [i for i, n in enumerate(fake.attribute_names) if n.startswith("has_wing_color::")]
    for c in range(5):
        assert fake.attribute_names[wing[int(values[c, wing].argmax())]] == f"has_wing_color::{WING_COLORS[c]}"
    assert fake.certainties == {1: "not visible", 2: "guessing", 3: "probably", 4: "definitely"}


def test_image_path(fake):
    path = fake.image_path(5)
    assert path.is_file() and path.parent.name == fake_class_name(2)
    assert fake.image_path(np.int64(5)) == path
    with pytest.raises(ValueError, match="unknown CUB image id 0"):
        fake.image_path(0)
    with pytest.raises(TypeError, match="image_id must be an int"):
        fake.image_path(True)


def test_class_lookup(fake):
    assert fake.class_id(2) == 2 and fake.class_index(2) == 1
    assert fake.class_index(np.int64(3)) == 2
    assert fake.class_id("002") == 2
    assert fake.class_id("002.Red_winged_Testbird") == 2
    assert fake.class_id("002.red_WINGED_testbird") == 2
    assert fake.class_id("Red winged Testbird") == 2
    assert fake.class_id("red-winged testbird") == 2
    assert fake.class_id("  Red_winged_Testbird ") == 2
    with pytest.raises(ValueError, match=r"unknown CUB class 'Red wingd Testbrd'; close matches: 002.Red_winged"):
        fake.class_id("Red wingd Testbrd")
    with pytest.raises(ValueError, match="see CUB.classes"):
        fake.class_index("Albatross")
    with pytest.raises(ValueError, match=r"class id 6 outside 1..5"):
        fake.class_index(6)
    with pytest.raises(TypeError, match="class must be given"):
        fake.class_index(2.0)
    with pytest.raises(TypeError, match="class must be given"):
        fake.class_index(True)


def test_readable_class_name():
    assert readable_class_name("022.Chuck_will_Widow") == "Chuck will Widow"
    with pytest.raises(TypeError):
        readable_class_name(22)


# ---------------------------------------------------------------- layout options
def test_root_may_be_the_cub_folder_itself(fake_root):
    cub = CUB(fake_root / "CUB_200_2011")
    assert cub.root == fake_root and cub.attributes_file == fake_root / "attributes.txt"
    assert len(cub.attribute_names) == 312


def test_attributes_inside(tmp_path):
    root = make_fake_cub(tmp_path, attributes_inside=True, n_attributes=40)
    cub = CUB(str(root))
    assert cub.attributes_file == root / "CUB_200_2011" / "attributes.txt"
    assert cub.attribute_names == cub_attribute_names()[:40]
    assert cub.class_attributes.shape == (3, 40)
    nested = root / "CUB_200_2011" / "attributes" / "attributes.txt"
    shutil.move(cub.attributes_file, nested)
    assert CUB(root).attributes_file == nested


def test_class_without_image_files(tmp_path):
    root = make_fake_cub(tmp_path, n_classes=3, images_per_class=4, empty_classes=[2], missing_images=[1])
    cub = CUB(root)
    assert len(cub.images) == 12 and cub.missing_images == 5
    assert not cub.images.loc[cub.images["class_id"] == 2, "exists"].any()
    with pytest.warns(UserWarning, match="5 of 12 images listed in images.txt are missing"):
        every = cub.split("all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cub.split("train")  # warned once only
    assert len(every) == 7 and 2 not in set(every["class_id"]) and 1 not in set(every["image_id"])
    assert cub.classes_with_images()["class_id"].tolist() == [1, 3]
    assert cub.classes_with_images()["n_images"].tolist() == [3, 4]
    assert cub.split("test", classes=[2]).empty
    assert not cub.image_path(1).exists()
    assert cub.part_locs(5)["visible"].sum() == 14


def test_missing_images_folder(tmp_path):
    root = make_fake_cub(tmp_path)
    shutil.rmtree(root / "CUB_200_2011" / "images")
    cub = CUB(root)
    assert cub.missing_images == 12
    with pytest.warns(UserWarning):
        assert cub.split("all").empty
    assert cub.classes_with_images().empty


@pytest.mark.parametrize(
    "name", ["classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"]
)
def test_missing_required_file(tmp_path, name):
    root = make_fake_cub(tmp_path, omit=[name])
    if name == "images.txt":
        with pytest.raises(FileNotFoundError, match="no CUB-200-2011 layout"):
            CUB(root)
        return
    with pytest.raises(FileNotFoundError, match=rf"CUB file CUB_200_2011/{name} is missing under {root}"):
        CUB(root)


@pytest.mark.parametrize(
    ("name", "access"),
    [
        ("parts/parts.txt", lambda c: c.parts),
        ("parts/part_locs.txt", lambda c: c.part_locs(1)),
        ("attributes/class_attribute_labels_continuous.txt", lambda c: c.class_attributes),
        ("attributes/certainties.txt", lambda c: c.certainties),
        ("attributes.txt", lambda c: c.attribute_names),
    ],
)
def test_missing_file_is_reported_when_used(tmp_path, name, access):
    root = make_fake_cub(tmp_path, omit=[name])
    cub = CUB(root)  # lazy: opening works
    assert len(cub.split("all")) == 12
    with pytest.raises(FileNotFoundError, match=rf"{Path(name).name} is missing under {root}"):
        access(cub)


def test_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB root not found"):
        CUB(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no CUB-200-2011 layout at .*CUB_200_2011/images.txt"):
        CUB(tmp_path)
    with pytest.raises(TypeError, match="root must be"):
        CUB(3)


def test_inconsistent_files(tmp_path):
    root = make_fake_cub(tmp_path)
    base = root / "CUB_200_2011"
    boxes = (base / "bounding_boxes.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (base / "bounding_boxes.txt").write_text("".join(boxes[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt .* lacks 1 image id\(s\) .* \[12\]"):
        _ = CUB(root).images
    (base / "bounding_boxes.txt").write_text("".join(boxes), encoding="utf-8")
    labels = (base / "image_class_labels.txt").read_text(encoding="utf-8")
    (base / "image_class_labels.txt").write_text("".join(f"{i} 9\n" for i in range(1, 13)), encoding="utf-8")
    with pytest.raises(ValueError, match="class ids missing from classes.txt: \\[9\\]"):
        _ = CUB(root).images
    (base / "image_class_labels.txt").write_text(labels, encoding="utf-8")
    matrix = base / "attributes" / "class_attribute_labels_continuous.txt"
    matrix.write_text("1 2 3\n4 5 6\n7 8 9\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), expected \(3, 312\)"):
        _ = CUB(root).class_attributes
    locs = base / "parts" / "part_locs.txt"
    kept = [line for line in locs.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("4 ")]
    locs.write_text("".join(kept), encoding="utf-8")
    with pytest.raises(ValueError, match="image 4 has no keypoints"):
        CUB(root).part_locs(4)
    locs.write_text("1 16 0.0 0.0 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="part id 16 outside 1..15"):
        _ = CUB(root).part_locations
    (base / "images.txt").write_text("1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot parse"):
        _ = CUB(root).images


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_read_only_root_is_never_written(tmp_path):
    root = make_fake_cub(tmp_path / "ro", empty_classes=[3])
    before = _snapshot(root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cub = CUB(root)
        with pytest.warns(UserWarning):
            cub.split("train")
        cub.part_locs(1), cub.class_attributes, cub.attribute_names, cub.certainties, cub.classes_with_images()
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert _snapshot(root) == before


# ---------------------------------------------------------------- the real CUB subset
@pytest.fixture(scope="module")
def real() -> CUB:
    if not (CUB_ROOT / "CUB_200_2011" / "images.txt").is_file():
        pytest.skip(f"CUB-200-2011 not found at {CUB_ROOT} (set TRAITLOC_CUB_ROOT)")
    return CUB(CUB_ROOT)


@pytest.mark.cub
def test_real_cub_tables(real):
    assert len(real.classes) == 200
    assert real.classes["name"].iloc[0] == "001.Black_footed_Albatross"
    assert real.classes["name"].iloc[-1] == "200.Common_Yellowthroat"
    assert len(real.attribute_names) == 312
    assert real.attribute_names[0] == "has_bill_shape::curved_(up_or_down)"
    assert real.attribute_names[-1] == "has_wing_pattern::multi-colored"
    assert real.parts == CUB_PARTS
    assert real.class_attributes.shape == (200, 312)
    assert real.class_attributes[0, 4] == pytest.approx(59.8540145985)
    assert real.class_attributes.min() >= 0 and real.class_attributes.max() <= 100
    assert real.certainties[4] == "definitely"


@pytest.mark.cub
def test_real_cub_images(real):
    raw = _lines(real.base / "images.txt")
    # This copy lists only the images of classes 001-025 (the full dataset has 11788 rows).
    assert len(real.images) == len(raw) == 1402
    assert real.missing_images == 0
    assert len(real.split("all")) == 1402
    assert len(real.split("train")) + len(real.split("test")) == 1402
    n_test = sum(r[1] == "0" for r in _lines(real.base / "train_test_split.txt"))
    assert len(real.split("test")) == n_test
    with_images = real.classes_with_images()
    assert with_images["class_id"].tolist() == list(range(1, 26))
    assert with_images["n_images"].sum() == 1402
    assert real.split("all", classes="Cardinal")["class_id"].eq(17).all()
    first = real.images.iloc[0]
    assert first.path == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert (first.x, first.y, first.width, first.height) == (60.0, 27.0, 325.0, 304.0)
    with Image.open(real.image_path(1)) as im:
        assert im.width >= first.x + first.width - 1 and im.height >= first.y + first.height - 1


@pytest.mark.cub
def test_real_cub_keypoints_and_lookup(real):
    locs = real.part_locs(1).set_index("part")
    assert tuple(locs.loc["beak"]) == (312.0, 182.0, True)
    assert tuple(locs.loc["back"]) == (0.0, 0.0, False)
    assert locs["visible"].sum() == 6
    assert len(real.part_locations) == 1402 * 15
    assert real.class_index("Cardinal") == 16
    assert real.class_id("black-footed albatross") == 1
    assert real.class_id("200.common_yellowthroat") == 200
    with pytest.raises(ValueError, match="close matches: 017.Cardinal"):
        real.class_id("Cardnal")
    alt = CUB(real.base)
    assert alt.attributes_file == real.attributes_file
    pd.testing.assert_frame_equal(alt.classes, real.classes)
