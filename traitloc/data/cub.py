"""CUB-200-2011 reader for the official folder layout.

::

    ROOT/
      attributes.txt                    # 312 'has_<part>_<property>::<value>' names (or inside CUB_200_2011/)
      CUB_200_2011/
        classes.txt images.txt image_class_labels.txt train_test_split.txt bounding_boxes.txt
        attributes/class_attribute_labels_continuous.txt attributes/certainties.txt
        parts/parts.txt parts/part_locs.txt
        images/<class folder>/<file>.jpg

Every table is read once, on first use, with pandas; the reader never writes, so ``ROOT`` may be read-only.
Image rows whose file is absent are kept in :attr:`CUB.images` (``exists`` is False) and left out of
:meth:`CUB.split`; a class with no image present simply has no rows there (:meth:`CUB.classes_with_images`).

Ids follow CUB: ``image_id``, ``class_id``, ``part_id``, ``attribute_id`` and ``certainty_id`` are 1-based.
Row ``class_id - 1`` of :attr:`CUB.class_attributes` belongs to ``class_id``; :meth:`CUB.class_index` returns
that 0-based row index and :meth:`CUB.class_id` the 1-based id.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["CUB", "readable_class_name"]

BASE_DIR = "CUB_200_2011"
_REQUIRED = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
_SPLITS = ("train", "test", "all")
#: the per-image tables merged into :attr:`CUB.images`: file, columns, dtypes
_IMAGE_TABLES = (
    ("images.txt", "image_id path", "int64 str"),
    ("image_class_labels.txt", "image_id class_id", "int64 int64"),
    ("train_test_split.txt", "image_id is_train", "int64 int64"),
    ("bounding_boxes.txt", "image_id x y width height", "int64 float64 float64 float64 float64"),
)


def readable_class_name(folder_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"``."""
    if not isinstance(folder_name, str):
        raise TypeError(f"folder_name must be a str, got {type(folder_name).__name__}")
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ").strip()


def _norm_name(name: str) -> str:
    """Key for case- and punctuation-insensitive class matching (``Black-footed albatross`` == folder name)."""
    return re.sub(r"[\s_\-]+", " ", re.sub(r"^\d+\.", "", name).replace("'", "")).strip().lower()


class CUB:
    """Read CUB-200-2011 metadata, part keypoints and class attributes.

    Parameters
    ----------
    root : str or os.PathLike
        The folder that contains ``CUB_200_2011/``, or the ``CUB_200_2011`` folder itself. ``attributes.txt``
        may lie beside ``CUB_200_2011/``, inside it, or in ``CUB_200_2011/attributes/``.

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist, holds no CUB layout, or lacks one of the required files (``classes.txt``,
        ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``bounding_boxes.txt``). Other
        files (parts, attributes) are checked when first used; the message names the file and the root.

    Examples
    --------
    >>> cub = CUB("../shared/cub")  # doctest: +SKIP
    >>> test = cub.split("test")  # doctest: +SKIP
    >>> cub.part_locs(int(test.image_id.iloc[0]))  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a str or os.PathLike, got {type(root).__name__}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"CUB root not found or not a folder: {root}")
        if (root / BASE_DIR / "images.txt").is_file():
            base = root / BASE_DIR
        elif (root / "images.txt").is_file():
            base, root = root, root.parent
        else:
            raise FileNotFoundError(
                f"no CUB-200-2011 layout at {root}: expected {root / BASE_DIR / 'images.txt'} "
                f"(or give the {BASE_DIR} folder itself)"
            )
        self.root: Path = root
        """Folder that contains ``CUB_200_2011/``."""
        self.base: Path = base
        """The ``CUB_200_2011`` folder."""
        for name in _REQUIRED:
            self._file(name)
        self._warned_missing = False

    def __repr__(self) -> str:
        return f"CUB(root={str(self.root)!r})"

    # ------------------------------------------------------------------ files
    def _file(self, relative: str) -> Path:
        path = self.base / relative
        if not path.is_file():
            raise FileNotFoundError(f"CUB file {BASE_DIR}/{relative} is missing under {self.root}")
        return path

    @cached_property
    def attributes_file(self) -> Path:
        """Where ``attributes.txt`` was found (beside ``CUB_200_2011/``, inside it, or in ``attributes/``)."""
        for path in (
            self.root / "attributes.txt",
            self.base / "attributes.txt",
            self.base / "attributes" / "attributes.txt",
        ):
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"CUB file attributes.txt is missing under {self.root} (looked beside and inside {BASE_DIR}/)"
        )

    def _read(self, relative: str, columns: str, dtypes: str) -> pd.DataFrame:
        """Read the space-separated CUB table ``relative`` with these (space-separated) columns and dtypes; errors
        name the file and the root."""
        path, names = self._file(relative), columns.split()
        dtype = dict(zip(names, dtypes.split(), strict=True))
        try:
            df = pd.read_csv(path, sep=r"\s+", header=None, names=names, dtype=dtype, engine="c")
        except (ValueError, pd.errors.ParserError) as exc:
            raise ValueError(f"cannot parse {path} (CUB root {self.root}): {exc}") from None
        if df.isna().any().any():
            bad = int(df.isna().any(axis=1).to_numpy().argmax()) + 1
            raise ValueError(f"cannot parse {path} (CUB root {self.root}): line {bad} has missing fields")
        return df

    def _read_names(self, path: Path) -> pd.DataFrame:
        """``<id> <name with spaces>`` lines -> DataFrame (id, name); ids must be 1..N in order."""
        ids, names = [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            first, _, rest = line.strip().partition(" ")
            if not first.isdigit() or not rest.strip():
                raise ValueError(f"cannot parse {path} (CUB root {self.root}), line {lineno}: {line!r}")
            ids.append(int(first))
            names.append(rest.strip())
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"{path} (CUB root {self.root}): ids are not 1..{len(ids)} in order")
        return pd.DataFrame({"id": np.asarray(ids, dtype=np.int64), "name": names})

    # ------------------------------------------------------------------ tables
    @cached_property
    def classes(self) -> pd.DataFrame:
        """Classes: ``class_id`` (1-based), ``name`` (folder name, e.g. ``001.Black_footed_Albatross``),
        ``readable_name`` (``Black footed Albatross``)."""
        df = self._read_names(self._file("classes.txt")).rename(columns={"id": "class_id"})
        df["readable_name"] = [readable_class_name(n) for n in df["name"]]
        return df

    @cached_property
    def images(self) -> pd.DataFrame:
        """All image rows of ``images.txt``: ``image_id, path`` (relative to ``images/``), ``class_id``,
        ``is_train`` (bool), bounding box ``x, y, width, height`` and ``exists`` (the file is present)."""
        df, *tables = (self._read(*table) for table in _IMAGE_TABLES)
        if df["image_id"].duplicated().any():
            raise ValueError(f"{self.base / 'images.txt'} (CUB root {self.root}) repeats image ids")
        for (name, _, _), table in zip(_IMAGE_TABLES[1:], tables, strict=True):
            absent = np.setdiff1d(df["image_id"].to_numpy(), table["image_id"].to_numpy())
            if absent.size:
                raise ValueError(
                    f"{self.base / name} (CUB root {self.root}) lacks {absent.size} image id(s) listed in "
                    f"images.txt, e.g. {absent[:5].tolist()}"
                )
            df = df.merge(table.drop_duplicates("image_id"), on="image_id", how="left", validate="one_to_one")
        unknown = np.setdiff1d(df["class_id"].to_numpy(), self.classes["class_id"].to_numpy())
        if unknown.size:
            raise ValueError(
                f"{self.base / 'image_class_labels.txt'} (CUB root {self.root}) uses class ids missing from "
                f"classes.txt: {unknown[:5].tolist()}"
            )
        df["is_train"] = df["is_train"].astype(bool)
        present = self._present_files()
        df["exists"] = np.fromiter((p in present for p in df["path"]), dtype=bool, count=len(df))
        return df.sort_values("image_id", ignore_index=True)

    def _present_files(self) -> set[str]:
        """Relative paths (``folder/file``) of the files under ``images/``, from one listing per folder."""
        folder = self.base / "images"
        present: set[str] = set()
        if not folder.is_dir():
            return present
        with os.scandir(folder) as classes:
            for entry in classes:
                if entry.is_dir():
                    with os.scandir(entry.path) as files:
                        present.update(f"{entry.name}/{f.name}" for f in files if f.is_file())
        return present

    @property
    def missing_images(self) -> int:
        """How many rows of ``images.txt`` have no file under ``images/``."""
        return int((~self.images["exists"]).sum())

    @cached_property
    def parts(self) -> tuple[str, ...]:
        """The 15 part names of ``parts/parts.txt`` (``part_id`` = index + 1), e.g. ``"left wing"``."""
        return tuple(self._read_names(self._file("parts/parts.txt"))["name"])

    @cached_property
    def part_locations(self) -> pd.DataFrame:
        """Every keypoint: ``image_id, part_id, part, x, y, visible`` (bool), sorted by image then part."""
        df = self._read("parts/part_locs.txt", "image_id part_id x y visible", "int64 int64 float64 float64 int64")
        n_parts = len(self.parts)
        bad = ~df["part_id"].between(1, n_parts)
        if bad.any():
            raise ValueError(
                f"{self.base / 'parts/part_locs.txt'} (CUB root {self.root}) has part id "
                f"{int(df.loc[bad, 'part_id'].iloc[0])} outside 1..{n_parts}"
            )
        df["visible"] = df["visible"].astype(bool)
        df.insert(2, "part", np.asarray(self.parts, dtype=object)[df["part_id"].to_numpy() - 1])
        return df.sort_values(["image_id", "part_id"], ignore_index=True, kind="stable")

    @cached_property
    def _part_image_ids(self) -> np.ndarray:
        return self.part_locations["image_id"].to_numpy()

    def part_locs(self, image_id: int) -> pd.DataFrame:
        """Keypoints of one image: ``part, x, y, visible`` (one row per part; invisible parts are at 0, 0).

        Parameters
        ----------
        image_id : int
            1-based CUB image id.
        """
        image_id = self._check_image_id(image_id)
        ids = self._part_image_ids
        lo, hi = np.searchsorted(ids, image_id, side="left"), np.searchsorted(ids, image_id, side="right")
        if lo == hi:
            raise ValueError(f"image {image_id} has no keypoints in {self.base / 'parts/part_locs.txt'}")
        return self.part_locations.iloc[lo:hi][["part", "x", "y", "visible"]].reset_index(drop=True)

    @cached_property
    def attribute_names(self) -> list[str]:
        """The attribute names of ``attributes.txt`` (312 for CUB), ``attribute_id`` = index + 1."""
        return list(self._read_names(self.attributes_file)["name"])

    @cached_property
    def class_attributes(self) -> np.ndarray:
        """Per-class attribute percentages, float64 ``(n_classes, n_attributes)`` (200 x 312), in [0, 100]."""
        path = self._file("attributes/class_attribute_labels_continuous.txt")
        values = pd.read_csv(path, sep=r"\s+", header=None, dtype="float64", engine="c").to_numpy()
        expected = (len(self.classes), len(self.attribute_names))
        if values.shape != expected:
            raise ValueError(
                f"{path} (CUB root {self.root}) has shape {values.shape}, expected {expected} "
                "(classes.txt x attributes.txt)"
            )
        values.setflags(write=False)
        return values

    @cached_property
    def certainties(self) -> dict[int, str]:
        """``certainty_id -> name`` of ``attributes/certainties.txt``: ``{1: "not visible", ..., 4: "definitely"}``."""
        df = self._read_names(self._file("attributes/certainties.txt"))
        return dict(zip(df["id"].tolist(), df["name"].tolist(), strict=True))

    # ------------------------------------------------------------------ lookups
    def _check_image_id(self, image_id: int) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise TypeError(f"image_id must be an int, got {type(image_id).__name__}")
        image_id = int(image_id)
        if image_id not in self._image_rows:
            raise ValueError(f"unknown CUB image id {image_id} (images.txt under {self.root})")
        return image_id

    @cached_property
    def _image_rows(self) -> dict[int, int]:
        return {int(i): row for row, i in enumerate(self.images["image_id"].to_numpy())}

    def image_path(self, image_id: int) -> Path:
        """Absolute path of an image file (whether or not it exists; see ``images.exists``).

        Parameters
        ----------
        image_id : int
            1-based CUB image id.
        """
        row = self._image_rows[self._check_image_id(image_id)]
        return self.base / "images" / self.images["path"].iat[row]

    def class_id(self, name_or_id: int | str) -> int:
        """1-based ``class_id`` of a class given by id, folder name or readable name (case-insensitive).

        Parameters
        ----------
        name_or_id : int or str
            ``17``, ``"017.Cardinal"``, ``"Cardinal"``, ``"black footed albatross"`` or ``"Black-footed Albatross"``.

        Raises
        ------
        ValueError
            No such class; the message lists close matches.
        """
        classes = self.classes
        n = len(classes)
        if isinstance(name_or_id, bool) or not isinstance(name_or_id, (int, np.integer, str)):
            raise TypeError(f"class must be given by int id or str name, got {type(name_or_id).__name__}")
        if not isinstance(name_or_id, str):
            if not 1 <= int(name_or_id) <= n:
                raise ValueError(f"class id {int(name_or_id)} outside 1..{n} (classes.txt under {self.root})")
            return int(name_or_id)
        text = name_or_id.strip()
        if text.isdigit():
            return self.class_id(int(text))
        by_folder = {name.lower(): cid for cid, name in zip(classes["class_id"], classes["name"], strict=True)}
        if text.lower() in by_folder:
            return int(by_folder[text.lower()])
        by_readable: dict[str, int] = {}
        for cid, name in zip(classes["class_id"], classes["name"], strict=True):
            by_readable.setdefault(_norm_name(name), int(cid))
        key = _norm_name(text)
        if key and key in by_readable:
            return by_readable[key]
        close = difflib.get_close_matches(key, list(by_readable), n=5, cutoff=0.6)
        names = {_norm_name(name): name for name in classes["name"]}
        hint = f"close matches: {', '.join(names[c] for c in close)}" if close else "see CUB.classes for the names"
        raise ValueError(f"unknown CUB class {name_or_id!r}; {hint}")

    def class_index(self, name_or_id: int | str) -> int:
        """0-based row index (``class_id - 1``) into :attr:`classes` and :attr:`class_attributes`.

        Accepts the same inputs as :meth:`class_id`: a 1-based class id, the folder name or a readable name.
        """
        return self.class_id(name_or_id) - 1

    # ------------------------------------------------------------------ subsets
    def split(self, name: str = "all", classes: Iterable[int | str] | None = None) -> pd.DataFrame:
        """Image rows of a split whose file is present, as in :attr:`images` (fresh index).

        Parameters
        ----------
        name : {"train", "test", "all"}
            CUB's train/test split (``train_test_split.txt``) or everything.
        classes : iterable of int or str, optional
            Keep only these classes (ids or names, as :meth:`class_id` accepts).

        Warns
        -----
        UserWarning
            Once per reader, when some listed images are missing (:attr:`missing_images`).
        """
        if not isinstance(name, str) or name not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {name!r}")
        df = self.images
        missing = self.missing_images
        if missing and not self._warned_missing:
            self._warned_missing = True
            warnings.warn(
                f"{missing} of {len(df)} images listed in images.txt are missing under {self.base / 'images'}; "
                "splits contain only the present ones",
                UserWarning,
                stacklevel=2,
            )
        keep = df["exists"].to_numpy().copy()
        if name != "all":
            keep &= df["is_train"].to_numpy() == (name == "train")
        if classes is not None:
            if isinstance(classes, (str, int, np.integer)):
                classes = [classes]
            ids = [self.class_id(c) for c in classes]
            keep &= df["class_id"].isin(ids).to_numpy()
        return df[keep].reset_index(drop=True)

    def classes_with_images(self) -> pd.DataFrame:
        """Rows of :attr:`classes` with at least one image file present, plus ``n_images`` (present files)."""
        counts = self.images.loc[self.images["exists"], "class_id"].value_counts()
        df = self.classes[self.classes["class_id"].isin(counts.index)].copy()
        df["n_images"] = df["class_id"].map(counts).astype("int64")
        return df.reset_index(drop=True)
