"""The results store of a run folder: a Parquet dataset of signed grid maps, and rendering on demand.

A run writes ``OUT/results/part-*.parquet``, one part per batch (written atomically, uniquely named, so many writers
can share a store), one row per (image, concept) or (image, target) with its keys, scores, ``status`` and the
**signed pre-ReLU grid map**; full-size maps, masks and overlays are renderings of the grid with the engine's own
upsampling (:func:`render_map`). What a row holds, rendering, size, writing and resume: ``docs/store.md``.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from traitloc.io.files import atomic_path, map_to_unit, mask_from_map, overlay_array, slugify

__all__ = [
    "GRID_DTYPES",
    "INTERPOLATION",
    "ResultStore",
    "StoreError",
    "grid_of",
    "read_results",
    "render_map",
    "render_mask",
    "render_overlay",
    "render_unit_map",
    "result_id",
    "results_dir",
    "rows_of",
]

PathLike = str | os.PathLike[str]

#: the storage types of a grid map; float32 renders exactly, float16 halves the store (error in docs/store.md)
GRID_DTYPES = ("float32", "float16")
#: how every grid is brought to the original image size
INTERPOLATION = "bilinear"
#: column types a job may declare; ``grid`` is added by the store
COLUMN_TYPES = ("str", "int", "float", "bool")
#: columns every row of every store has
BASE_COLUMNS: dict[str, str] = {
    "image": "str",  # the absolute path of the photo
    "image_key": "str",
    "result_id": "str",  # "<image_key>/<slug of the concept or target>": the review app's and export's id
    "status": "str",
    "notes": "str",
    "width": "int",  # of the original image as displayed (EXIF orientation applied)
    "height": "int",
    "resize": "str",
    "interpolation": "str",
    "grid_h": "int",
    "grid_w": "int",
    "raw_max": "float",  # max of the ReLU grid (= of the rendered ReLU map up to interpolation)
    "grid_scale": "float",  # float16 grids are stored divided by this (their max |value|); empty: 1
    "run_id": "str",
}
PART_GLOB = "part-*.parquet"


class StoreError(ValueError):
    """A results store that cannot be read or written as asked (the message says what to do)."""


def results_dir(out_dir: PathLike) -> Path:
    """The Parquet dataset folder of a run folder: ``OUT/results``."""
    return Path(out_dir) / "results"


def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    return {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}[kind]


def _cell(kind: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == "" and kind != "str"):
        return None
    if kind == "str":
        return str(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return bool(value)


class ResultStore:
    """Append-only Parquet store of one run folder.

    Parameters
    ----------
    out_dir : path
        The run folder; parts go to ``out_dir/results/``.
    columns : mapping of column name -> ``"str" | "int" | "float" | "bool"``
        The job's columns (keys, scores, settings) in addition to :data:`BASE_COLUMNS` and the grid.
    key_columns : sequence of str
        The columns that identify a row (e.g. ``("image_key", "concept")``); a finished run has each key once.
    grid_dtype : ``"float32"`` (default, exact) or ``"float16"``
        How grid maps are stored.

    Examples
    --------
    >>> store = ResultStore(out, {"concept": "str", "score": "float"}, ["image_key", "concept"])  # doctest: +SKIP
    >>> store.write([{"image_key": "a", "concept": "red wing", "grid": g, "status": "ok", ...}])  # doctest: +SKIP
    >>> read_results(out)                                                                          # doctest: +SKIP
    """

    def __init__(
        self,
        out_dir: PathLike,
        columns: Mapping[str, str],
        key_columns: Sequence[str],
        grid_dtype: str = "float32",
    ) -> None:
        if grid_dtype not in GRID_DTYPES:
            raise StoreError(f"grid_dtype must be one of {', '.join(GRID_DTYPES)}, got {grid_dtype!r}")
        self.out = Path(out_dir)
        self.dir = results_dir(self.out)
        self.columns: dict[str, str] = {**BASE_COLUMNS, **dict(columns)}
        for name, kind in self.columns.items():
            if kind not in COLUMN_TYPES:
                raise StoreError(f"column {name!r}: unknown type {kind!r} (one of {', '.join(COLUMN_TYPES)})")
            if name in ("grid",):
                raise StoreError("'grid' is the store's own column")
        missing = [k for k in key_columns if k not in self.columns]
        if missing:
            raise StoreError(f"key columns not among the columns: {', '.join(missing)}")
        self.key_columns = tuple(key_columns)
        self.grid_dtype = grid_dtype
        self.bytes_written = 0
        self.parts_written = 0

    # ---- schema --------------------------------------------------------------------------------------------
    def schema(self) -> Any:
        """The Arrow schema of a part: the declared columns, ``grid`` and the store's metadata (its keys)."""
        import pyarrow as pa

        grid_t = pa.float32() if self.grid_dtype == "float32" else pa.float16()
        fields = [pa.field(n, _arrow_type(k)) for n, k in self.columns.items()]
        fields.append(pa.field("grid", pa.list_(grid_t)))
        return pa.schema(
            fields, metadata={b"traitloc.store": b"1", b"traitloc.keys": ",".join(self.key_columns).encode()}
        )

    def table(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        """The Arrow table of ``rows`` (dicts with the columns; ``grid``: a 2-D array or None for an error row)."""
        import pyarrow as pa

        schema = self.schema()
        if self.grid_dtype == "float16":
            rows = [_unit_scaled(r) for r in rows]
        arrays = []
        for name, kind in self.columns.items():
            values = [r.get(name) for r in rows]
            try:  # the common case: values already of the column's type (or None)
                arrays.append(pa.array(values, type=_arrow_type(kind)))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                arrays.append(pa.array([_cell(kind, v) for v in values], type=_arrow_type(kind)))
        np_dtype = np.float32 if self.grid_dtype == "float32" else np.float16
        flats, offsets, valid = [], [0], []
        for r in rows:
            g = r.get("grid")
            if g is None:
                valid.append(False)
                offsets.append(offsets[-1])
                continue
            a = np.asarray(g, dtype=np.float32).reshape(-1)
            flats.append(a)
            offsets.append(offsets[-1] + a.size)
            valid.append(True)
        grid_values = np.concatenate(flats).astype(np_dtype) if flats else np.zeros(0, np_dtype)
        mask = pa.array([not v for v in valid], type=pa.bool_())
        grid = pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(grid_values), mask=mask)
        arrays.append(grid.cast(schema.field("grid").type))
        return pa.Table.from_arrays(arrays, schema=schema)

    # ---- writing -------------------------------------------------------------------------------------------
    def write(self, rows: Sequence[Mapping[str, Any]], name: str | None = None) -> Path | None:
        """Write ``rows`` as one part, atomically; returns its path (None for no rows).

        ``name`` (``part-*.parquet``) gives the part a chosen name instead of a new unique one; a part of that name
        is then replaced atomically. A writer that may run a batch twice (a retried task) uses a name determined by
        the batch, so that the retry replaces its own part instead of adding a second copy of its rows.
        """
        if not rows:
            return None
        import pyarrow.parquet as pq

        rows = [r if r.get("result_id") else {**r, "result_id": result_id(r)} for r in rows]
        table = self.table(rows)
        self.dir.mkdir(parents=True, exist_ok=True)
        if name is not None:
            if Path(name).name != name or not Path(name).match(PART_GLOB):
                raise StoreError(f"a part name must look like part-*.parquet (no folder), got {name!r}")
            path = self.dir / name
        else:
            ns = time.time_ns()  # to the ns: a rerun's parts sort after the earlier ones (dedupe keeps the last)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}"
            host = "".join(c for c in socket.gethostname() if c.isalnum())[:16] or "host"
            path = self.dir / f"part-{stamp}-{host}-{os.getpid()}-{secrets.token_hex(4)}.parquet"
        with atomic_path(path, keep_suffix=False) as tmp:  # ".part-....tmp": not matched by '*.parquet' globs
            # no dictionary for the grid (random floats); zstd keeps the text columns small
            pq.write_table(table, tmp, compression="zstd", use_dictionary=[n for n in self.columns])
        self.bytes_written += path.stat().st_size
        self.parts_written += 1
        return path

    # ---- reading -------------------------------------------------------------------------------------------
    def done_keys(self) -> set[tuple[Any, ...]]:
        """Keys of the rows already in the store (any status)."""
        df = read_results(self.out, columns=list(self.key_columns))
        if df.empty:
            return set()
        return set(df.itertuples(index=False, name=None))


def _unit_scaled(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A row whose grid is divided by its max |value| (kept in ``grid_scale``), for float16 storage.

    float16 has 11 significant bits only for values above 6.1e-5; CAM grids of CLIP models are about that small
    (a random ViT-B-16 gives maxima of 5e-5 to 2e-4), so stored as they are they would lose precision relative to
    their own maximum. Scaled to [-1, 1], every map keeps a relative error below 2**-11 of its max.
    """
    g = row.get("grid")
    if g is None:
        return row
    a = np.asarray(g, dtype=np.float32)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if not (peak > 0 and np.isfinite(peak)):
        return row
    return {**row, "grid": a / np.float32(peak), "grid_scale": peak}


def part_files(out_dir: PathLike) -> list[Path]:
    """The finished parts of a run's store, oldest name first (temporary files are hidden and skipped)."""
    d = results_dir(out_dir)
    return sorted(d.glob(PART_GLOB)) if d.is_dir() else []


def read_results(
    out_dir: PathLike,
    columns: Sequence[str] | None = None,
    *,
    filters: Any = None,
    dedupe: bool = True,
    locate: bool = False,
) -> Any:
    """Read a run's store as a pandas DataFrame (an empty one when the run wrote nothing yet).

    Parameters
    ----------
    out_dir : path
        The run folder (the one given to ``--out``), or its ``results`` folder.
    columns : list of str, optional
        Read only these columns (fast: Parquet is columnar; leave out ``grid`` for tables of scores).
    filters : optional
        pyarrow filters, e.g. ``[("concept", "=", "red crown"), ("score", ">", 0.1)]``.
    dedupe : bool, default True
        Keep one row per key (the last written) should two writers ever have written the same key.
    locate : bool, default False
        Add the columns ``_part`` (the row's part, in :func:`part_files` order) and ``_row`` (its row in that part),
        to read its grid later one part at a time (``traitloc export``). Not with ``filters``.
    """
    import pandas as pd
    import pyarrow.dataset as ds

    root = Path(out_dir)
    if results_dir(root).is_dir():  # a run folder (even one named "results", as in `--out results`)
        root = results_dir(root)
    files = sorted(root.glob(PART_GLOB)) if root.is_dir() else []
    if not files:
        return pd.DataFrame(columns=list(columns) if columns else [])
    try:
        dataset = ds.dataset([str(f) for f in files], format="parquet")
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file
        raise StoreError(_unreadable(root, files, err)) from err
    meta = dataset.schema.metadata or {}
    keys = [k for k in meta.get(b"traitloc.keys", b"").decode().split(",") if k]
    want = list(columns) if columns else None
    read_cols = None if want is None else list(dict.fromkeys([*want, *(keys if dedupe else [])]))
    expr = None
    if filters is not None:
        import pyarrow.parquet as pq

        expr = pq.filters_to_expression(filters)
    try:
        table = dataset.to_table(columns=read_cols, filter=expr)
    except Exception as err:  # noqa: BLE001 - any part is opened only here: a damaged one fails here
        raise StoreError(_unreadable(root, files, err)) from err
    import pyarrow as pa

    if locate:
        if expr is not None:
            raise ValueError("read_results: locate cannot be combined with filters (rows would be miscounted)")
        counts = [fragment.count_rows() for fragment in dataset.get_fragments()]
        table = table.append_column("_part", pa.array(np.repeat(np.arange(len(counts), dtype=np.int64), counts)))
        table = table.append_column("_row", pa.array(np.concatenate([np.arange(n, dtype=np.int64) for n in counts])))
        want = None if want is None else [*want, "_part", "_row"]
    # integers stay integers where error rows leave them empty (pandas' nullable Int64, not float64)
    df = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    if dedupe and keys and len(df) and all(k in df.columns for k in keys):
        df = df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)
    if want is not None:
        df = df[want]
    return df


def _unreadable(root: Path, files: Sequence[Path], err: BaseException) -> str:
    """The message for a store that cannot be read: names the damaged parts when their footers are unreadable."""
    import pyarrow.parquet as pq

    bad = []
    for f in files:
        try:
            pq.read_metadata(f)
        except Exception:  # noqa: BLE001 - damaged or not Parquet
            bad.append(f.name)
    if not bad:
        return f"{root}: not a readable traitloc store ({type(err).__name__}: {err})".splitlines()[0]
    return (
        f"{root}: not a readable traitloc store: damaged part(s) {', '.join(bad)}; move them out of {root.name}/ "
        "and rerun the command to recompute their rows"
    )


def result_id(row: Mapping[str, Any]) -> str:
    """``<image_key>/<slug>``: the id of a row in the review app and in exports (slug of the concept or target)."""
    label = row.get("concept")
    if label is None or label == "":
        label = row.get("target", "")
    return f"{row['image_key']}/{_slug(str(label))}"


_slug = functools.lru_cache(maxsize=65536)(slugify)  # a study has few labels; ids are made per row


# --------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------
def grid_of(row: Mapping[str, Any]) -> np.ndarray:
    """The signed grid map of a row, float32 ``(grid_h, grid_w)``."""
    g = row.get("grid")
    if g is None or (isinstance(g, float) and g != g):
        raise StoreError(f"row {row.get('image_key')!r}/{_label(row)!r} has no map (status: {row.get('status')})")
    h, w = int(row["grid_h"]), int(row["grid_w"])
    a = np.asarray(g, dtype=np.float32)
    if a.size != h * w:
        raise StoreError(f"grid of {a.size} values does not match grid_h x grid_w = {h} x {w}")
    scale = row.get("grid_scale")
    if scale is not None and scale == scale:  # NaN or None: stored as is (float32 grids)
        a = a * np.float32(scale)
    return a.reshape(h, w)


def _label(row: Mapping[str, Any]) -> Any:
    return row.get("concept", row.get("target"))


def _size(row: Mapping[str, Any], size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None:
        return (int(size[0]), int(size[1]))
    return (int(row["height"]), int(row["width"]))


def render_map(row: Mapping[str, Any], size: tuple[int, int] | None = None, signed: bool = False) -> np.ndarray:
    """Render a row's map at ``size`` = (H, W) (default: the original image), float32, raw units.

    The ReLU map is ``up(ReLU(G))`` and the signed map ``up(G)``: exactly what the engine returns for the image
    (:meth:`traitloc.models.localize.ConceptMaps.map`), bit for bit from a float32 grid.
    """
    import torch

    from traitloc.engine.cam import upsample_maps

    interpolation = row.get("interpolation")
    if interpolation is not None and interpolation == interpolation and interpolation != INTERPOLATION:  # NaN: unset
        raise StoreError(f"unknown interpolation {interpolation!r}")
    g = torch.from_numpy(np.array(grid_of(row), dtype=np.float32))  # a copy: Arrow buffers are read-only
    if not signed:
        g = g.clamp_min(0)
    return upsample_maps(g, _size(row, size)).numpy().astype(np.float32, copy=False)


def render_unit_map(row: Mapping[str, Any], size: tuple[int, int] | None = None) -> np.ndarray:
    """The ReLU map divided by its max, in [0, 1] (an all-zero map stays zero): the exported TIFF's values."""
    return map_to_unit(render_map(row, size))


def render_mask(
    row: Mapping[str, Any], threshold: float | str = 0.5, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Binary mask (bool, (H, W)): the unit map above ``threshold`` (a fraction of the max, or ``"otsu"``)."""
    return mask_from_map(render_unit_map(row, size), threshold)


def render_overlay(
    row: Mapping[str, Any], image: Any, alpha: float = 0.5, cmap: str = "inferno", unit: np.ndarray | None = None
) -> np.ndarray:
    """The unit map colour-mapped over ``image`` (PIL image or uint8 array), uint8 RGB at the image's size.

    ``image`` may be a reduced copy of the photo (the map is rendered at its size, not the original's); ``unit``, a
    unit map already rendered, is used as is when it has the image's size.
    """
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    heat = unit if unit is not None and unit.shape == arr.shape[:2] else render_unit_map(row, arr.shape[:2])
    return overlay_array(arr, heat, alpha=alpha, cmap=cmap)


def rows_of(df: Any) -> Iterable[dict[str, Any]]:
    """Iterate a DataFrame from :func:`read_results` as plain dicts (for the render functions)."""
    cols = list(df.columns)
    for values in df.itertuples(index=False, name=None):
        yield dict(zip(cols, values, strict=True))
