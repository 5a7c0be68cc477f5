"""A tiny synthetic CUB-200-2011 folder for tests (no real data needed).

``make_fake_cub(tmp_path)`` writes the official layout::

    ROOT/attributes.txt                               (or inside CUB_200_2011/ with attributes_inside=True)
    ROOT/CUB_200_2011/classes.txt images.txt image_class_labels.txt train_test_split.txt bounding_boxes.txt
    ROOT/CUB_200_2011/attributes/class_attribute_labels_continuous.txt attributes/certainties.txt
    ROOT/CUB_200_2011/parts/parts.txt parts/part_locs.txt
    ROOT/CUB_200_2011/images/<NNN.Name>/<Name>_<k>_<image_id>.jpg

What is known by construction (tests may rely on it):

- Class ``c`` (1-based) is ``f"{c:03d}.{Color}_winged_Testbird"`` where ``Color`` is ``WING_COLORS[(c - 1) % 15]``
  (a numbered suffix is added after the first 15 classes). Image ids run class by class: class ``c`` owns ids
  ``(c - 1) * images_per_class + 1 .. c * images_per_class``; classes after ``n_classes`` (``extra_classes``)
  are listed in ``classes.txt`` and the attribute matrix but have no image rows, like the shared subset.
- Each image shows a noisy background, a slate-grey ellipse (the bird) filling its bounding box and two discs of the
  class's wing color (:data:`COLOR_RGB`) centred on the ``left wing`` and ``right wing`` keypoints, so the
  class is decidable from the wings only. The 15 keypoints (official names, :data:`PART_LAYOUT` positions in
  the box, jittered) lie inside the box; exactly one non-wing part per image is invisible (x = y = 0, as CUB
  writes invisible parts).
- Per class, the first ``ceil(images_per_class / 2)`` of a seeded permutation are train, the rest test.
- ``class_attribute_labels_continuous.txt`` is :func:`fake_class_attributes`: class ``c`` has the
  ``has_wing_color::<its color>`` attribute at 100 and every other wing color at 0; every other attribute
  ``a`` (0-based column) is 90 when ``a % n_total_classes == c - 1`` and ``10 * ((a + c - 1) % 3)`` otherwise.
- Attribute names are the real CUB names (from ``trait_lists/cub200_attributes.csv``), the first
  ``n_attributes`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from traitloc.data.traits import CUB_PARTS, load_trait_list

__all__ = [
    "COLOR_RGB",
    "PART_LAYOUT",
    "WING_COLORS",
    "cub_attribute_names",
    "fake_class_attributes",
    "fake_class_name",
    "make_fake_cub",
]

#: CUB's 15 color values with an RGB to draw them.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "blue": (30, 60, 220),
    "red": (220, 30, 30),
    "yellow": (235, 220, 40),
    "green": (40, 170, 50),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "orange": (245, 140, 20),
    "purple": (130, 40, 160),
    "pink": (245, 150, 190),
    "grey": (128, 128, 128),
    "brown": (110, 70, 30),
    "olive": (110, 120, 40),
    "rufous": (170, 80, 40),
    "buff": (220, 190, 140),
    "iridescent": (40, 200, 200),
}
#: Wing color of class c (1-based) is WING_COLORS[(c - 1) % 15].
WING_COLORS: tuple[str, ...] = tuple(COLOR_RGB)

#: Keypoint position of each CUB part as a fraction (u, v) of the bounding box (bird facing left).
PART_LAYOUT: dict[str, tuple[float, float]] = {
    "back": (0.55, 0.30),
    "beak": (0.06, 0.35),
    "belly": (0.50, 0.72),
    "breast": (0.30, 0.60),
    "crown": (0.22, 0.14),
    "forehead": (0.12, 0.22),
    "left eye": (0.16, 0.28),
    "left leg": (0.45, 0.94),
    "left wing": (0.58, 0.45),
    "nape": (0.32, 0.20),
    "right eye": (0.19, 0.30),
    "right leg": (0.56, 0.94),
    "right wing": (0.68, 0.52),
    "tail": (0.94, 0.58),
    "throat": (0.20, 0.48),
}
_BODY_RGB = (95, 95, 110)
_CERTAINTIES = ("not visible", "guessing", "probably", "definitely")
_META_FILES = (
    "classes.txt",
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "attributes/class_attribute_labels_continuous.txt",
    "attributes/certainties.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
    "attributes.txt",
)


def cub_attribute_names() -> list[str]:
    """The 312 CUB attribute names in ``attributes.txt`` order (from the built-in ``cub200`` trait list)."""
    traits = sorted(load_trait_list("cub200"), key=lambda t: t.attribute_id or 0)
    return [t.name for t in traits]


def fake_class_name(class_id: int) -> str:
    """Folder name of fake class ``class_id`` (1-based), e.g. ``"001.Blue_winged_Testbird"``."""
    color = WING_COLORS[(class_id - 1) % len(WING_COLORS)]
    cycle = (class_id - 1) // len(WING_COLORS)
    suffix = f"_{cycle + 1}" if cycle else ""
    return f"{class_id:03d}.{color.capitalize()}_winged_Testbird{suffix}"


def fake_class_attributes(n_total_classes: int, n_attributes: int = 312) -> np.ndarray:
    """The fake ``class_attribute_labels_continuous`` matrix, ``(n_total_classes, n_attributes)`` percent.

    See the module docstring for the rule; wing colors follow :data:`WING_COLORS`.
    """
    names = cub_attribute_names()[:n_attributes]
    a = np.arange(n_attributes)[None, :]
    c = np.arange(n_total_classes)[:, None]
    values = np.where(a % n_total_classes == c, 90.0, 10.0 * ((a + c) % 3))
    for col, name in enumerate(names):
        if name.startswith("has_wing_color::"):
            color = name.split("::", 1)[1]
            values[:, col] = [100.0 if WING_COLORS[i % len(WING_COLORS)] == color else 0.0 for i in range(len(c))]
    return values


def _check_ids(values: Sequence[int], low: int, high: int, what: str) -> list[int]:
    ids = [int(v) for v in values]
    bad = [v for v in ids if not low <= v <= high]
    if bad:
        raise ValueError(f"{what} must be within {low}..{high}, got {bad}")
    return ids


def make_fake_cub(
    root: Path,
    n_classes: int = 3,
    images_per_class: int = 4,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    *,
    n_attributes: int = 312,
    attributes_inside: bool = False,
    extra_classes: int = 0,
    empty_classes: Sequence[int] = (),
    missing_images: Sequence[int] = (),
    omit: Sequence[str] = (),
) -> Path:
    """Write a tiny synthetic CUB-200-2011 folder and return ``root`` (the folder holding ``CUB_200_2011/``).

    Parameters
    ----------
    root : Path
        Folder to write into (created if needed).
    n_classes : int
        Classes with images.
    images_per_class : int
        Image rows per class (train/test split about half/half).
    size : tuple of int
        Image ``(width, height)`` in pixels; at least 16 x 16.
    seed : int
        Seed for boxes, keypoint jitter, noise and the split; same arguments give the same files.
    n_attributes : int
        Use the first ``n_attributes`` (1..312) CUB attribute names.
    attributes_inside : bool
        Put ``attributes.txt`` inside ``CUB_200_2011/`` instead of beside it.
    extra_classes : int
        Classes listed in ``classes.txt`` and the attribute matrix but without image rows (like classes
        026-200 of the shared subset).
    empty_classes : sequence of int
        Class ids (1..n_classes) whose image rows are written but whose image files are not.
    missing_images : sequence of int
        Image ids whose files are not written (rows stay in the metadata).
    omit : sequence of str
        Metadata files not to write, relative to ``CUB_200_2011/`` (e.g. ``"parts/part_locs.txt"``), or
        ``"attributes.txt"``.

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    for name, value, low in (("n_classes", n_classes, 1), ("images_per_class", images_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(extra_classes, bool) or not isinstance(extra_classes, int) or extra_classes < 0:
        raise ValueError(f"extra_classes must be an int >= 0, got {extra_classes!r}")
    if not (isinstance(n_attributes, int) and 1 <= n_attributes <= 312):
        raise ValueError(f"n_attributes must be an int in 1..312, got {n_attributes!r}")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be (width, height) with both >= 16, got {size!r}")
    unknown = sorted(set(omit) - set(_META_FILES))
    if unknown:
        raise ValueError(f"omit: unknown file(s) {unknown}; choose from {', '.join(_META_FILES)}")
    n_images = n_classes * images_per_class
    empty = set(_check_ids(empty_classes, 1, n_classes, "empty_classes"))
    missing = set(_check_ids(missing_images, 1, n_images, "missing_images"))
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    n_total = n_classes + extra_classes

    base = root / "CUB_200_2011"
    for sub in ("attributes", "parts", "images"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {name: [] for name in _META_FILES}
    files["classes.txt"] = [f"{c} {fake_class_name(c)}" for c in range(1, n_total + 1)]
    files["parts/parts.txt"] = [f"{i} {name}" for i, name in enumerate(CUB_PARTS, start=1)]
    files["attributes/certainties.txt"] = [f"{i} {name}" for i, name in enumerate(_CERTAINTIES, start=1)]
    files["attributes.txt"] = [f"{i} {name}" for i, name in enumerate(cub_attribute_names()[:n_attributes], 1)]
    matrix = fake_class_attributes(n_total, n_attributes)
    files["attributes/class_attribute_labels_continuous.txt"] = [" ".join(f"{v:.10g}" for v in row) for row in matrix]

    wing_parts = {"left wing", "right wing"}
    hideable = [i for i, p in enumerate(CUB_PARTS) if p not in wing_parts]
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = fake_class_name(c)
        (base / "images" / folder).mkdir(exist_ok=True)
        stem = folder.split(".", 1)[1]
        is_train = np.zeros(images_per_class, dtype=bool)
        is_train[rng.permutation(images_per_class)[: math.ceil(images_per_class / 2)]] = True
        wing_rgb = COLOR_RGB[WING_COLORS[(c - 1) % len(WING_COLORS)]]
        for k in range(images_per_class):
            image_id += 1
            rel = f"{folder}/{stem}_{k + 1:04d}_{image_id}.jpg"
            bw = int(rng.integers(int(0.6 * width), int(0.9 * width) + 1))
            bh = int(rng.integers(int(0.6 * height), int(0.9 * height) + 1))
            bx = int(rng.integers(0, width - bw + 1))
            by = int(rng.integers(0, height - bh + 1))
            files["images.txt"].append(f"{image_id} {rel}")
            files["image_class_labels.txt"].append(f"{image_id} {c}")
            files["train_test_split.txt"].append(f"{image_id} {int(is_train[k])}")
            files["bounding_boxes.txt"].append(f"{image_id} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
            hidden = hideable[int(rng.integers(len(hideable)))]
            points = {}
            for p, name in enumerate(CUB_PARTS):
                u, v = PART_LAYOUT[name]
                x = float(np.clip(round(bx + u * (bw - 1) + rng.uniform(-1, 1)), bx, bx + bw - 1))
                y = float(np.clip(round(by + v * (bh - 1) + rng.uniform(-1, 1)), by, by + bh - 1))
                visible = p != hidden
                points[name] = (x, y)
                xs, ys = (x, y) if visible else (0.0, 0.0)
                files["parts/part_locs.txt"].append(f"{image_id} {p + 1} {xs:.1f} {ys:.1f} {int(visible)}")
            if c in empty or image_id in missing:
                continue
            pixels = rng.normal(150, 25, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            draw.ellipse((bx, by, bx + bw - 1, by + bh - 1), fill=_BODY_RGB)
            radius = max(2, min(bw, bh) // 6)
            for name in ("left wing", "right wing"):
                x, y = points[name]
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=wing_rgb)
            image.save(base / "images" / rel, format="JPEG", quality=92)

    for name, lines in files.items():
        if name in omit:
            continue
        if name == "attributes.txt":
            path = base / name if attributes_inside else root / name
        else:
            path = base / name
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root
