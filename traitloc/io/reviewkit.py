"""What the review app needs from a run's results store, without Streamlit: a fast table, grids on demand, thumbnails.

The review app (``traitloc app``, ``apps/review.py``) shows tens of thousands of results as a grid of thumbnails.
This module does the work behind it, in plain functions that the tests call directly:

* :func:`load_table` reads every column of the store **but the grid** (fast: Parquet is columnar), remembers for
  each row in which part file and at which row its grid lies, and sets apart the rows that cannot be shown (an
  error status, no map, a bad size) with the reason, so that the page can say how many and why.
* :class:`GridCache` reads the grid column of a part only when one of its rows is drawn, and keeps the last parts.
* :func:`find_photo` finds a row's photo: the absolute ``image`` path the run recorded (read-only, wherever it is),
  then the ``--images`` folder.
* :func:`photo_thumbnail` decodes a photo at thumbnail size (JPEG draft mode: a fraction of a full decode) and
  :func:`tile` draws the map over it, rendered from the grid **at the thumbnail's size** (never full size), as a
  heat-map overlay or a mask outline, encoded as JPEG bytes.
* :func:`order_rows` sorts and groups a filtered table (per photo, per trait, or flat; by score or by name).
* :func:`apply_decision`, :func:`undo` record review decisions (one or many, in one transaction) and undo them.

Decoded thumbnails and tiles are kept in bounded LRU caches (:class:`LRU`), so a grid page that was drawn once is
redrawn from memory.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from traitloc.io.files import read_run_json

__all__ = [
    "DISPLAY_MODES",
    "GROUPINGS",
    "SORTS",
    "LRU",
    "GridCache",
    "ReviewTable",
    "UndoEntry",
    "apply_decision",
    "draw",
    "find_photo",
    "load_table",
    "mask_outline",
    "order_rows",
    "photo_thumbnail",
    "store_signature",
    "tile",
    "undo",
    "unit_map",
    "upsample_bilinear",
]

PathLike = str | os.PathLike[str]

#: how a map is drawn on its photo
DISPLAY_MODES = ("outline", "overlay")
#: how the grid is grouped: all traits of a photo side by side, one trait across photos, or not at all
GROUPINGS = ("photo", "trait", "none")
#: the order inside a group (and of the groups)
SORTS = ("score", "name")
#: columns every row needs to be drawn
_NEEDED = ("result_id", "image", "image_key", "width", "height", "grid_h", "grid_w")


# --------------------------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------------------------
class LRU:
    """A thread-safe least-recently-used cache of at most ``max_entries`` values.

    Parameters
    ----------
    max_entries : int
        How many values are kept; the least recently used one is dropped first.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made by ``make()`` (outside the lock) on a miss."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = make()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every value."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------
def store_signature(out_dir: PathLike) -> tuple[tuple[str, int, int], ...]:
    """``(name, size, mtime_ns)`` of every finished part: changes when a run adds a part (the table is re-read)."""
    from traitloc.io.store import part_files

    sig = []
    for p in part_files(out_dir):
        try:
            st = p.stat()
        except OSError:
            continue
        sig.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)


@dataclass
class ReviewTable:
    """A run's results as the review app sees them.

    Attributes
    ----------
    out : the run folder.
    kind : ``"localize"`` (a ``concept`` column), ``"explain"`` (``target``) or ``"empty"``.
    rows : the rows that can be drawn, one per ``result_id``, with ``label`` (concept or target), ``score_f``
        (float score, NaN when absent), ``_part`` (index into ``parts``) and ``_row`` (row inside that part).
    bad : the rows that cannot be drawn: ``result_id``, ``image``, ``label``, ``reason``.
    parts : the part files, as read.
    label_name : what a label is called on the page (``Concept`` or ``Target class``).
    run_info : the run's ``run.json`` (``{}`` when absent or unreadable).
    """

    out: Path
    kind: str
    rows: Any  # pandas.DataFrame
    bad: Any  # pandas.DataFrame
    parts: tuple[Path, ...] = ()
    label_name: str = "Concept"
    run_info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def index_of(self) -> dict[str, int]:
        """``result_id -> row position`` in :attr:`rows` (built once)."""
        index = self.__dict__.get("_index")
        if index is None:
            index = {r: i for i, r in enumerate(self.rows["result_id"].tolist())}
            self.__dict__["_index"] = index
        return index

    def positions(self, result_ids: Sequence[str]) -> list[int]:
        """Row positions of ``result_ids`` in :attr:`rows`."""
        index = self.index_of()
        return [index[r] for r in result_ids]


def load_table(out_dir: PathLike) -> ReviewTable:
    """Read a run's store without its grids: the rows that can be drawn and, set apart, those that cannot.

    Parameters
    ----------
    out_dir : path
        The run folder (with ``results/part-*.parquet``).

    Returns
    -------
    ReviewTable
        ``kind == "empty"`` when the folder has no store.

    Raises
    ------
    traitloc.io.store.StoreError
        When a part is not a readable Parquet file of a traitloc store.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from traitloc.io.store import StoreError, part_files

    out = Path(out_dir)
    files = part_files(out)
    empty = pd.DataFrame(columns=[*_NEEDED, "label", "score_f", "_part", "_row"])
    if not files:
        return ReviewTable(out, "empty", empty, pd.DataFrame(columns=["result_id", "image", "label", "reason"]))
    frames = []
    keys: list[str] = []
    for i, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
            names = [n for n in pf.schema_arrow.names if n != "grid"]
            table = pf.read(columns=names)
            meta = pf.schema_arrow.metadata or {}
            # the grid's length per row (the grid itself is read again only when drawn)
            if "grid" in pf.schema_arrow.names:
                grid = pf.read(columns=["grid"]).column("grid")
                glen = pc.list_value_length(grid).fill_null(-1).to_numpy(zero_copy_only=False)
                del grid
            else:
                glen = np.full(table.num_rows, -1)
        except Exception as err:  # noqa: BLE001 - a foreign or damaged file
            raise StoreError(f"{f}: not a readable part of a traitloc store ({type(err).__name__}: {err})") from err
        keys = keys or [k for k in meta.get(b"traitloc.keys", b"").decode().split(",") if k]
        df = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        df["_part"] = i
        df["_row"] = np.arange(len(df))
        df["_glen"] = np.asarray(glen, dtype=np.int64)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if keys and all(k in df.columns for k in keys):
        df = df.drop_duplicates(subset=keys, keep="last")
    kind, label_name, label_col = "localize", "Concept", "concept"
    if "target" in df.columns and "concept" not in df.columns:
        kind, label_name, label_col = "explain", "Target class", "target"
    for c in (*_NEEDED, label_col, "status"):
        if c not in df.columns:
            df[c] = pd.NA
    df["label"] = df[label_col].astype("string").fillna("")
    df["score_f"] = pd.to_numeric(df["score"], errors="coerce").astype(float) if "score" in df else np.nan
    reason = pd.Series("", index=df.index, dtype=object)
    status = df["status"].astype("string").fillna("")
    reason[status != "ok"] = "status: " + status[status != "ok"].replace("", "(none)")
    for c in ("width", "height", "grid_h", "grid_w"):
        v = pd.to_numeric(df[c], errors="coerce")
        bad = (reason == "") & (v.isna() | (v <= 0))
        reason[bad] = f"no usable {c}"
    glen = df["_glen"].to_numpy()
    gh = pd.to_numeric(df["grid_h"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
    gw = pd.to_numeric(df["grid_w"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
    no_map = (reason == "").to_numpy() & (glen < 0)
    reason[no_map] = "no map stored"
    mismatch = (reason == "").to_numpy() & (glen != gh * gw)
    reason[mismatch] = [f"map of {n} values does not match its grid of {h} x {w}"
                        for n, h, w in zip(glen[mismatch], gh[mismatch], gw[mismatch], strict=True)]  # fmt: skip
    rid = df["result_id"].astype("string").fillna("")
    reason[(reason == "") & (rid == "")] = "no result_id"
    dup = (reason == "") & rid.duplicated(keep="last")
    reason[dup] = "duplicate result_id (an older row with the same id)"
    df = df.assign(_reason=reason)
    bad_rows = df[df["_reason"] != ""]
    bad = pd.DataFrame(
        {
            "result_id": bad_rows["result_id"].astype("string").fillna(""),
            "image": bad_rows["image"].astype("string").fillna(""),
            "label": bad_rows["label"],
            "reason": bad_rows["_reason"],
        }
    ).reset_index(drop=True)
    rows = df[df["_reason"] == ""].drop(columns=["_reason", "_glen"]).reset_index(drop=True)
    for c in ("result_id", "image", "image_key", "label"):  # plain Python strings: fast to iterate and to map
        rows[c] = rows[c].astype(object)
    for c in ("width", "height", "grid_h", "grid_w"):
        rows[c] = rows[c].astype(int)
    return ReviewTable(out, kind, rows, bad, tuple(files), label_name, read_run_json(out / "run.json"))


class GridCache:
    """The grid maps of a table's rows, read one part at a time when a row of the part is drawn.

    Parameters
    ----------
    max_parts : int
        How many parts' grid columns are kept in memory (least recently used dropped first).
    """

    def __init__(self, max_parts: int = 64) -> None:
        self._parts = LRU(max_parts)

    def _part(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import pyarrow.parquet as pq

        def read() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            col = pq.read_table(path, columns=["grid"]).column("grid").combine_chunks()
            offsets = np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
            values = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32)
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            return offsets, values, valid

        st = path.stat()
        return self._parts.get((str(path), st.st_size, st.st_mtime_ns), read)

    def grid(self, table: ReviewTable, row: Any) -> np.ndarray:
        """The signed grid ``(grid_h, grid_w)`` of ``row`` (a row of ``table.rows``, as a mapping).

        Raises
        ------
        traitloc.io.store.StoreError
            When the part is gone or the grid is missing or does not match ``grid_h x grid_w``.
        """
        from traitloc.io.store import StoreError

        path = table.parts[int(row["_part"])]
        try:
            offsets, values, valid = self._part(path)
        except OSError as err:
            raise StoreError(f"{path.name}: {err.strerror or err} (re-open the page after a rerun)") from err
        i = int(row["_row"])
        if i >= len(valid) or not valid[i]:
            raise StoreError("no map stored for this result")
        a = values[offsets[i] : offsets[i + 1]]
        h, w = int(row["grid_h"]), int(row["grid_w"])
        if a.size != h * w:
            raise StoreError(f"a map of {a.size} values does not match its grid of {h} x {w}")
        if not np.isfinite(a).all():
            raise StoreError("the stored map has non-finite values")
        return a.reshape(h, w)

    def row_with_grid(self, table: ReviewTable, row: Any) -> dict[str, Any]:
        """``row`` as a dict with its ``grid``: what :mod:`traitloc.io.store`'s render functions take."""
        return {**dict(row), "grid": self.grid(table, row)}


# --------------------------------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------------------------------
def find_photo(image: str, out_dir: PathLike | None = None, images_dir: PathLike | None = None,
               cwd: str | None = None) -> Path | None:  # fmt: skip
    """The photo of a row: the path the run recorded, else a file of the same name under ``images_dir``.

    Parameters
    ----------
    image : the row's ``image`` (absolute since the results store; a relative one is taken relative to the run's
        ``cwd`` from run.json, then to the run folder).
    out_dir : the run folder.
    images_dir : the app's ``--images`` folder (photos moved since the run), searched by the end of the recorded
        path (its last 4, 3, 2 components), then by file name.
    cwd : the folder the run was started from.

    Returns
    -------
    The photo's path when it is a file, else ``None``. Photos are only read, never written.
    """
    if not image or not isinstance(image, str) or "\x00" in image:
        return None
    p = Path(image)
    candidates: list[Path] = []
    if p.is_absolute():
        candidates.append(p)
    else:
        candidates += [Path(d) / p for d in (cwd, out_dir) if d]
    if images_dir is not None:
        root = Path(images_dir)
        parts = p.parts
        n = len(parts) - (1 if p.is_absolute() else 0)
        for k in range(min(n, 4), 0, -1):  # the last 4..1 components: moved with its folder tree
            candidates.append(root.joinpath(*parts[-k:]))
    for c in candidates:
        try:
            if c.is_file():
                return c
        except OSError:
            continue
    return None


def photo_thumbnail(path: Path, side: int) -> np.ndarray:
    """The photo decoded at most ``side`` pixels on its longer side (upright, RGB uint8, read-only array).

    :func:`traitloc.data.images.load_image` with ``max_side=side``: JPEGs are decoded in draft mode (DCT scaling),
    so a thumbnail of a 12-megapixel photo costs a fraction of a full decode, and odd photos (16-bit, transparent,
    CMYK, rotated by EXIF) look as in the detail view and every export.
    """
    from traitloc.data.images import load_image

    arr = np.asarray(load_image(path, max_side=side).image)
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------------------
# Why a NumPy bilinear resize next to traitloc.engine.cam.upsample_maps (the one the store's render_map uses): this
# module must not import torch (the app's pages start in a fraction of a second without it, and a grid draws
# thousands of thumbnails through it). It is the same interpolation (align_corners=False); tests/test_app.py checks
# unit_map and upsample_bilinear against traitloc.io.store.render_unit_map / render_map to 1e-5. The colours come
# from the library (overlay_array); the outline is the only drawing the app has of its own.
def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` interpolation matrix of a bilinear resize with ``align_corners=False`` (PyTorch's rule)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - lam)
    np.add.at(w, (rows, i1), lam)
    return w


def upsample_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a 2-D grid to ``size`` = (H, W) with ``align_corners=False``, in NumPy.

    The same interpolation as :func:`traitloc.engine.cam.upsample_maps` (``torch.nn.functional.interpolate``, bilinear,
    ``align_corners=False``; equal up to float rounding, tested), without importing torch: the review app draws
    thousands of thumbnails with it.
    """
    g = np.asarray(grid, dtype=np.float64)
    wy = _bilinear_weights(g.shape[0], int(size[0]))
    wx = _bilinear_weights(g.shape[1], int(size[1]))
    return (wy @ g @ wx.T).astype(np.float32)


def unit_map(row_with_grid: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """The row's ReLU map at ``size``, divided by its max (in [0, 1]): :func:`traitloc.io.store.render_unit_map`
    computed in NumPy (``up(ReLU(G)) / max``)."""
    from traitloc.io.files import map_to_unit
    from traitloc.io.store import grid_of

    return map_to_unit(upsample_bilinear(np.maximum(grid_of(row_with_grid), 0.0), size))


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a binary mask (inside pixels with an outside 4-neighbour), ``width`` pixels thick."""
    m = np.asarray(mask, dtype=bool)
    edge = np.zeros_like(m)
    inner = m.copy()
    for _ in range(max(1, int(width))):
        er = inner.copy()
        er[1:, :] &= inner[:-1, :]
        er[:-1, :] &= inner[1:, :]
        er[:, 1:] &= inner[:, :-1]
        er[:, :-1] &= inner[:, 1:]
        er[0, :] = er[-1, :] = False
        er[:, 0] = er[:, -1] = False
        edge |= inner & ~er
        inner = er
    return edge


OUTLINE_RGB = np.array([0, 255, 255], dtype=np.float32)


def draw(
    photo: np.ndarray | None,
    unit: np.ndarray,
    mode: str = "outline",
    alpha: float = 0.6,
    threshold: float = 0.5,
    outline_width: int = 2,
) -> np.ndarray:
    """A map drawn on a photo (uint8 RGB at the photo's size).

    Parameters
    ----------
    photo : RGB uint8 array, or ``None`` (the map is drawn on grey: the photo was not found).
    unit : the map divided by its max, in [0, 1], at the photo's size.
    mode : ``"overlay"`` (``(1 - alpha) * photo + alpha * inferno(map)``) or ``"outline"`` (the mask
        ``unit > threshold`` outlined in cyan, blended with opacity ``alpha``, the photo untouched elsewhere).
    """
    from traitloc.io.files import overlay_array

    if mode not in DISPLAY_MODES:
        raise ValueError(f"mode must be one of {', '.join(DISPLAY_MODES)}, got {mode!r}")
    if photo is None:
        photo = np.full((*unit.shape, 3), 128, dtype=np.uint8)
    if mode == "overlay":
        return overlay_array(photo, unit, alpha=float(alpha))
    edge = mask_outline(unit > float(threshold), outline_width)
    out = photo[..., :3].astype(np.float32)
    out[edge] = (1.0 - alpha) * out[edge] + alpha * OUTLINE_RGB
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tile(
    row_with_grid: dict[str, Any],
    photo: np.ndarray | None,
    side: int,
    mode: str = "outline",
    alpha: float = 0.6,
    threshold: float = 0.5,
    quality: int = 85,
) -> bytes:
    """A thumbnail tile as JPEG bytes: the map rendered from the grid at the thumbnail's size, drawn on the photo.

    ``photo`` is the thumbnail from :func:`photo_thumbnail` (or ``None``: the map on grey at the image's aspect).
    """
    from PIL import Image

    if photo is not None:
        size = photo.shape[:2]
    else:
        h, w = int(row_with_grid["height"]), int(row_with_grid["width"])
        s = side / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
    unit = unit_map(row_with_grid, size)
    rgb = draw(photo, unit, mode, alpha, threshold, outline_width=2 if max(size) >= 128 else 1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# order
# --------------------------------------------------------------------------------------------------------------
def order_rows(rows: Any, group: str = "trait", sort: str = "score") -> tuple[list[str], list[str]]:
    """The order in which a grid shows ``rows``: ``(result_ids, group labels)``.

    Parameters
    ----------
    rows : a (filtered) ``ReviewTable.rows``.
    group : ``"photo"`` (all traits of a photo side by side; photos by name, or by their best score),
        ``"trait"`` (one trait across photos; traits by name) or ``"none"``.
    sort : ``"score"`` (highest first, missing scores last) or ``"name"`` (photo, then trait).
    """
    if group not in GROUPINGS:
        raise ValueError(f"group must be one of {', '.join(GROUPINGS)}, got {group!r}")
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if len(rows) == 0:
        return [], []
    df = rows[["result_id", "image_key", "label", "score_f"]].copy()
    df["_neg"] = -df["score_f"].fillna(-np.inf)
    if group == "photo":
        df["_group"] = df["image_key"].astype(str)
        if sort == "score":
            df["_gkey"] = df.groupby("_group")["_neg"].transform("min")
            cols = ["_gkey", "_group", "_neg", "label"]
        else:
            cols = ["_group", "label"]
    elif group == "trait":
        df["_group"] = df["label"].astype(str)
        cols = ["_group", "_neg", "image_key"] if sort == "score" else ["_group", "image_key"]
    else:
        df["_group"] = ""
        cols = ["_neg", "image_key", "label"] if sort == "score" else ["image_key", "label"]
    df = df.sort_values([*cols, "result_id"], kind="stable")
    return df["result_id"].astype(str).tolist(), df["_group"].astype(str).tolist()


# --------------------------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UndoEntry:
    """One undoable change: the ids it touched and their decisions before it (``None``: undecided)."""

    label: str
    before: tuple[tuple[str, str | None, str], ...]  # (result_id, status or None, note)


def apply_decision(
    store: Any, ids: Sequence[str], status: str, decisions: dict[str, Any], notes: dict[str, str] | None = None
) -> UndoEntry:
    """Set ``status`` for ``ids`` (one transaction), keeping each result's note; returns what undoes it.

    Parameters
    ----------
    store : a writable :class:`traitloc.io.decisions.ReviewStore`.
    ids : the result ids.
    status : one of :data:`traitloc.io.decisions.STATUSES`.
    decisions : the current decisions (``result_id -> Decision``), for the undo record and the notes kept.
    notes : notes to record instead of the stored ones (a note typed before the first decision).
    """
    notes = notes or {}
    before = []
    items = []
    for r in ids:
        d = decisions.get(r)
        before.append((r, None if d is None else d.status, "" if d is None else d.note))
        items.append((r, status, notes.get(r, "" if d is None else d.note)))
    if len(items) == 1:
        store.set(*items[0])
    else:
        store.set_many(items)
    label = f"{status} {ids[0]}" if len(ids) == 1 else f"{status} x {len(ids)}"
    return UndoEntry(label, tuple(before))


def undo(store: Any, entry: UndoEntry) -> None:
    """Put back the decisions recorded in ``entry`` (cleared where there was none); logged in the history."""
    to_clear = [r for r, s, _ in entry.before if s is None]
    to_set = [(r, s, n) for r, s, n in entry.before if s is not None]
    if to_set:
        store.set_many(to_set)
    if to_clear:
        store.clear_many(to_clear)
