"""Exports of a run for other tools and for papers: ``traitloc export``.

Renders the selected rows of a run's results store (:mod:`traitloc.io.store`; selected by review status, concept or
target, score range or result id), one at a time, into a folder or a zip file as PNG masks, ImageJ TIFF maps,
overlays, COCO, GeoJSON, CSV/Parquet tables or paper figures, with a ``manifest.json``; streamed, in bounded memory,
and never writing outside the chosen output. Formats, conventions, memory and security: ``docs/store.md``
("Exports").
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import secrets
import shutil
import sqlite3
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traitloc.io.decisions import DB_NAME, STATUSES, Decision, PathSafetyError, ReviewStore, resolve_inside
from traitloc.io.files import (
    atomic_path,
    atomic_write,
    environment_info,
    map_tiff_bytes,
    mask_from_map,
    png_bytes,
    read_run_json,
    to_json,
    utc_now,
)
from traitloc.io.formats import (
    CONVENTIONS,
    FIGURE_FORMATS,
    UNIFORM_CMAPS,
    FormatError,
    check_cmap,
    check_dpi,
    coco_annotation,
    figure_bytes,
    figure_panel,
    geojson_collection,
    geojson_feature,
    mask_png_bytes,
    write_coco,
)
from traitloc.io.store import StoreError, part_files, read_results, render_overlay, render_unit_map

__all__ = [
    "FORMATS",
    "FormatError",
    "Result",
    "add_parser",
    "export_results",
    "export_zip_bytes",
    "list_results",
    "read_decisions",
    "run",
]

PathLike = str | os.PathLike[str]

#: every export format, in the order they are written
FORMATS: tuple[str, ...] = ("png", "tiff", "overlay", "coco", "geojson", "csv", "parquet", "figure")
#: formats that need the maps of a ``localize``/``explain`` run (its results store)
MAP_FORMATS = frozenset({"png", "tiff", "overlay", "coco", "geojson", "figure"})
#: tables of a results folder exported by ``csv``/``parquet`` besides ``results.csv``
EXTRA_TABLES: tuple[str, ...] = ("audit.csv", "controls.csv", "audit_summary.csv", "metrics.csv", "per_image.csv")
#: the spellings read as the review statuses (the app's accepted / rejected / needs-work)
_STATUS_ALIASES = {
    "accept": "accepted", "accepted": "accepted", "reject": "rejected", "rejected": "rejected",
    "needs-work": "needs-work", "needs_work": "needs-work", "needs work": "needs-work", "needswork": "needs-work",
}  # fmt: skip
#: columns of results.csv kept as text in the tables (never turned into numbers)
_TEXT_COLUMNS = frozenset({
    "image", "image_key", "concept", "trait", "base", "target", "predicted", "references", "method", "model",
    "map", "mask", "overlay", "status", "notes", "target_spec", "reference_spec", "classifier", "result_id",
    "review_status", "review_note", "reference_indices",
})  # fmt: skip
#: numeric columns always stored as floats (a run's gamma of 1 and another's of 0.6 stay one type)
_FLOAT_COLUMNS = frozenset({"gamma", "raw_max", "score", "concept_score", "base_score", "mask_fraction"})
MANIFEST_VERSION = 1


# ------------------------------------------------------------------------------------------------------------------
# reading a results folder
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """One exportable result: an ``ok`` row of the run's results store (:mod:`traitloc.io.store`).

    Attributes
    ----------
    result_id : ``<image-key>/<slug>``, the store's ``result_id`` (the review app's id).
    image_key : the row's ``image_key``.
    label : the concept (``localize``) or target class (``explain``).
    kind : ``"concept"`` or ``"target"``.
    row : the row's columns except the grid map (Python values; ``None`` where empty).
    part, index : where the row is in the store (its part file, in :func:`traitloc.io.store.part_files`
        order, and its row in that part): the exporter reads each part's grid maps once.
    """

    result_id: str
    image_key: str
    label: str
    kind: str
    row: Mapping[str, Any]
    part: int = -1
    index: int = -1


def _results_dir(value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"results_dir must be a str or os.PathLike, got {type(value).__name__}")
    path = Path(value)
    if not path.is_dir():
        raise FormatError(f"results folder not found: {path}")
    return path


def _root_file(root: Path, name: str) -> Path | None:
    """A fixed file of the results folder (``results.csv``, ``run.json``...), None when absent; a symbolic link
    that leads out of the folder is rejected."""
    path = root / name
    if not path.exists() and not path.is_symlink():
        return None
    try:
        resolve_inside(root, name)
    except PathSafetyError:
        raise FormatError(f"{name}: {name!r} resolves outside the results folder (symbolic link?)") from None
    return path if path.is_file() else None


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a CSV written by ResultsTable, ignoring a partial last line (a run killed mid-append)."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [dict(r) for r in reader]
    return list(reader.fieldnames or []), rows


def _no_store(root: Path) -> FormatError:
    return FormatError(
        f"{root} has no results store (results/part-*.parquet): export reads the folder written by "
        "traitloc localize (or traitloc explain)"
    )


def _read_index(root: Path, files: list[Path]) -> tuple[Any, list[Result], list[dict[str, Any]]]:
    """The store's rows without the grid maps (:func:`traitloc.io.store.read_results`: last written wins), in store
    order, with their location (``_part``, ``_row``); and those rows as the results and the skipped rows of
    :func:`list_results`."""
    try:
        names = [n for n in _schema(files[0]).names if n != "grid"]
        df = read_results(root, columns=names, locate=True)
    except StoreError as err:
        raise FormatError(str(err)) from None
    for column in ("result_id", "image_key", "status"):
        if column not in df.columns:
            raise FormatError(f"{root / 'results'} is not a traitloc store: no {column!r} column")
    kind = "concept" if "concept" in df.columns else "target" if "target" in df.columns else ""
    if not kind:
        raise FormatError(f"{root / 'results'} has neither a concept nor a target column")
    results: list[Result] = []
    skipped: list[dict[str, Any]] = []
    columns = [c for c in df.columns if c not in ("_part", "_row")]
    records = df[columns].astype(object).where(df[columns].notna(), None).to_dict("records")
    for rec, part, index in zip(records, df["_part"].tolist(), df["_row"].tolist(), strict=True):
        row = {k: _plain(v) for k, v in rec.items()}
        rid = str(row.get("result_id") or "")
        key = str(row.get("image_key") or "")
        label = str(row.get(kind) or "")
        status = str(row.get("status") or "").strip()
        for text, what in ((rid, "result id"), (key, "image key")):  # used as paths inside the export
            try:
                _safe_rel(text)
            except FormatError:
                raise FormatError(f"{what} {text!r} is not a safe relative path (the store was not written by "
                                  "traitloc?)") from None  # fmt: skip
        if not rid.startswith(key + "/"):
            raise FormatError(f"result id {rid!r} does not start with its image key {key!r}")
        if status != "ok" or row.get("grid_h") is None or row.get("grid_w") is None:
            reason = status if status != "ok" else "no map"
            skipped.append({"result_id": rid, "image_key": key, "label": label, "reason": reason or "no status"})
            continue
        results.append(Result(rid, key, label, kind, row, int(part), int(index)))
    return df, results, skipped


def _schema(part: Path) -> Any:
    """The Arrow schema of a store's part (:class:`FormatError` for a foreign or damaged file)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(part)
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file
        raise FormatError(f"{part}: not a readable part of a traitloc store ({type(err).__name__}: {err})") from None


def _plain(value: Any) -> Any:
    """A cell of the index as a plain Python value (``None`` for missing and non-finite numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # a missing (or non-finite) cell: null in the export's JSON
    return value


def list_results(results_dir: PathLike) -> tuple[list[Result], list[dict[str, Any]]]:
    """The exportable results of a ``localize``/``explain`` run folder and the rows that cannot be exported.

    Reads the run's results store (``results/part-*.parquet``) without its grid maps. Rows whose ``status`` is not
    ``ok`` (or that have no map) are listed as skipped with their reason, so that a caller can say how many were
    left out and why; when a key was written twice (two writers), the last written row wins.

    Parameters
    ----------
    results_dir : path
        The run folder (the ``--out`` of ``traitloc localize``/``explain``).

    Returns
    -------
    results : list of Result
        In store order.
    skipped : list of dict
        ``{"result_id", "image_key", "label", "reason"}`` per row left out (``reason``: the row's status).

    Raises
    ------
    FormatError
        If the folder has no store (``traitloc localize`` writes one), a part is not readable, or a result id or
        image key is not a safe relative path.
    """
    root = _results_dir(results_dir)
    files = part_files(root)
    if not files:
        raise _no_store(root)
    return _read_index(root, files)[1:]


def _normalize_status(value: object) -> str:
    text = str(value or "").strip().lower()
    return _STATUS_ALIASES.get(text, text)


def read_decisions(results_dir: PathLike) -> dict[str, Decision]:
    """Review decisions of the app (:class:`traitloc.io.decisions.ReviewStore`, read-only), by result id.

    Empty when ``RESULTS_DIR/review.sqlite`` does not exist (nothing reviewed yet); a ``review.sqlite`` that is a
    symbolic link out of the results folder, or that cannot be read, is a :class:`FormatError`.

    Parameters
    ----------
    results_dir : path

    Returns
    -------
    dict
        ``{result_id: Decision}``.
    """
    root = _results_dir(results_dir)
    db = _root_file(root, DB_NAME)
    if db is None:
        return {}
    try:
        with ReviewStore(root, readonly=True) as store:
            return store.decisions()
    except (ValueError, sqlite3.Error) as err:  # PathSafetyError is a ValueError
        raise FormatError(f"cannot read review decisions from {db}: {err}") from None


def _bound(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FormatError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise FormatError(f"{name} must be finite, got {value!r}")
    return float(value)


def _select(
    results: list[Result],
    decisions: Mapping[str, Decision],
    selection: object,
    concepts: Iterable[str] | None = None,
    score_min: float | None = None,
    score_max: float | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """The results chosen by review status or ids, concept/target labels and a score range (all must hold)."""
    info: dict[str, Any] = {}
    chosen = results
    if selection is None or (isinstance(selection, str) and selection.strip().lower() == "all"):
        info["status"] = "all"
    elif isinstance(selection, str):
        status = _normalize_status(selection)
        if status not in STATUSES:
            raise FormatError(f"selection must be 'all', one of {', '.join(STATUSES)} or result ids, "
                              f"got {selection!r}")  # fmt: skip
        chosen = [r for r in chosen if _normalize_status(getattr(decisions.get(r.result_id), "status", "")) == status]
        info["status"] = status
    elif isinstance(selection, Iterable):
        wanted = [str(s) for s in selection]
        known = {r.result_id for r in results}
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise FormatError(f"unknown result id {unknown[0]!r} ({len(unknown)} not among the ok results)")
        keep = set(wanted)
        chosen = [r for r in chosen if r.result_id in keep]
        info["result_ids"] = sorted(keep)
    else:
        raise TypeError(f"selection must be None, a status or result ids, got {type(selection).__name__}")
    if concepts is not None:
        if isinstance(concepts, str):
            concepts = [concepts]
        labels = list(dict.fromkeys(str(c) for c in concepts))
        if not labels:
            raise FormatError("concepts is empty (give at least one concept or target, or None for all)")
        known_labels = list(dict.fromkeys(r.label for r in results))
        unknown = [c for c in labels if c not in known_labels]
        if unknown:
            shown = ", ".join(repr(c) for c in known_labels[:8]) + (", ..." if len(known_labels) > 8 else "")
            kind = results[0].kind if results else "concept"
            raise FormatError(f"unknown {kind} {unknown[0]!r} (the run's: {shown or 'none'})")
        keep_labels = set(labels)
        chosen = [r for r in chosen if r.label in keep_labels]
        info["concepts"] = labels
    low, high = _bound(score_min, "score_min"), _bound(score_max, "score_max")
    if low is not None and high is not None and low > high:
        raise FormatError(f"score_min {low:g} is above score_max {high:g}")
    if low is not None or high is not None:

        def inside(r: Result) -> bool:
            score = r.row.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                return False
            return (low is None or score >= low) and (high is None or score <= high)

        chosen = [r for r in chosen if inside(r)]
        info["score_min"], info["score_max"] = low, high
    return chosen, info


# ------------------------------------------------------------------------------------------------------------------
# output sinks
# ------------------------------------------------------------------------------------------------------------------
def _safe_rel(*parts: str) -> str:
    pieces: list[str] = []
    for part in parts:
        pieces.extend(str(part).split("/"))
    for piece in pieces:
        if piece in ("", ".", "..") or "\\" in piece or "\x00" in piece:
            raise FormatError(f"unsafe output path {'/'.join(parts)!r}")
    return "/".join(pieces)


class _DirSink:
    """Writes files under a folder, each atomically, never following a symbolic link out of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []

    def _path(self, rel: str) -> Path:
        folder = self.root
        parts = rel.split("/")
        for part in parts[:-1]:
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise FormatError(f"refusing to write through {folder}: not a plain folder")
            folder.mkdir(exist_ok=True)
        return folder / parts[-1]

    def write(self, rel: str, data: bytes) -> None:
        """Write the file ``rel`` atomically."""
        atomic_write(self._path(rel), data)
        self.names.append(rel)

    @contextmanager
    def open(self, rel: str) -> Iterator[Any]:
        """A binary file to stream an entry into (written atomically when the block ends)."""
        with atomic_path(self._path(rel)) as tmp, open(tmp, "xb") as handle:
            yield handle
        self.names.append(rel)


class _ZipSink:
    """Writes entries into an open zip file (PNG/PDF stored, the rest deflated at level 1)."""

    def __init__(self, handle: Any) -> None:
        self.zip = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.names: list[str] = []
        self._seen: set[str] = set()
        now = utc_now()
        self._date = (int(now[0:4]), int(now[5:7]), int(now[8:10]), int(now[11:13]), int(now[14:16]),
                      int(now[17:19]))  # fmt: skip

    def _info(self, rel: str) -> zipfile.ZipInfo:
        if rel in self._seen:
            raise FormatError(f"duplicate zip entry {rel!r}")
        self._seen.add(rel)
        info = zipfile.ZipInfo(rel, date_time=self._date)
        info.compress_type = zipfile.ZIP_STORED if rel.endswith((".png", ".pdf")) else zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        return info

    def write(self, rel: str, data: bytes) -> None:
        """Add the entry ``rel``."""
        # deflate level 1: float TIFFs compress about as well as at the default level 6, 1.5x faster
        self.zip.writestr(self._info(rel), data, compresslevel=1)
        self.names.append(rel)

    @contextmanager
    def open(self, rel: str) -> Iterator[Any]:
        """A binary handle to stream an entry into (large entries: coco.json, tables)."""
        with self.zip.open(self._info(rel), "w", force_zip64=True) as handle:
            yield handle
        self.names.append(rel)

    def close(self) -> None:
        """Write the zip's central directory (the handle stays open)."""
        self.zip.close()


# ------------------------------------------------------------------------------------------------------------------
# the export
# ------------------------------------------------------------------------------------------------------------------
def _parse_list(values: str | Iterable[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """Names among ``allowed`` (``all``: every one) from a comma-separated string or an iterable, in their order."""
    items = [str(v).strip().lower() for v in (values.split(",") if isinstance(values, str) else values)]
    names = [n for item in items if item for n in (allowed if item == "all" else (item,))]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        which = f"unknown {what[:-1]} {bad[0]!r}: " if bad else "none given: "
        raise FormatError(f"{which}{what} must be among {', '.join(allowed)} or all")
    return [f for f in allowed if f in names]


def _parse_threshold(value: object) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "otsu":
            return "otsu"
        try:
            value = float(value)
        except ValueError:
            raise FormatError(f"threshold must be a number in [0, 1) or 'otsu', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise FormatError(f"threshold must be a number in [0, 1) or 'otsu', got {value!r}")
    return float(value)


def _parquet_engine() -> str:
    for module in ("pyarrow", "fastparquet"):
        try:
            __import__(module)
        except ImportError:
            continue
        return module
    raise FormatError("parquet export needs pyarrow or fastparquet (pip install pyarrow)")


def _settings_for(result: Result, run_info: Mapping[str, Any], threshold: float | str,
                  decision: Decision | None) -> dict[str, Any]:  # fmt: skip
    row = result.row
    settings: dict[str, Any] = {"result_id": result.result_id, "image_key": result.image_key}
    for key in ("image", "concept", "trait", "base", "target", "predicted", "references", "gamma", "method",
                "reverse", "model", "classifier", "raw_max", "score", "width", "height", "resize",
                "interpolation", "run_id"):  # fmt: skip
        value = row.get(key)
        if value not in (None, ""):
            settings[key] = value
    for key in ("pretrained", "pretrained_sha256", "target_layer", "resize", "command", "traitloc"):
        if key not in settings and run_info.get(key) not in (None, ""):
            settings[key] = run_info[key]
    settings["values"] = "map / max of the ReLU map, bilinear from the grid (align_corners=False)"
    settings["threshold"] = threshold
    if decision is not None:
        settings["review_status"] = decision.status
        if decision.note:
            settings["review_note"] = decision.note
    return settings


def _row_threshold(result: Result, threshold: float | str | None, run_info: Mapping[str, Any]) -> float | str:
    """The mask threshold: the export's, else the row's (``localize --threshold``), else the run's, else 0.5."""
    if threshold is not None:
        return threshold
    for value in (result.row.get("threshold"), run_info.get("threshold")):
        try:
            parsed = _parse_threshold(value)
        except FormatError:
            continue
        if parsed is not None:
            return parsed
    return 0.5


def _find_image(text: str, roots: list[Path]) -> tuple[Path | None, str | None]:
    """The photo of a row: the path to read, or (None, reason). Looked for at its recorded absolute path (anywhere,
    read-only), then inside each root by its relative path and by its file name (each must resolve inside its root).
    """
    if not text:
        return None, "no image path in the store"
    path = Path(text)
    names = [Path(path.name)] if path.is_absolute() else [path, Path(path.name)]
    candidates: list[tuple[Path, Path | None]] = [(path, None)] if path.is_absolute() else []
    candidates += [(root / name, root) for root in roots for name in names]
    for candidate, root in [] if "\x00" in text else candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if root is not None and not resolved.is_relative_to(root):
            continue  # a relative path or a link that leaves its root
        if resolved.is_file():
            return resolved, None
    where = f" (also looked in {', '.join(str(r) for r in roots)})" if roots else ""
    return None, f"image {text!r} not found{where}"


class _Photos:
    """The photo of the current image key, decoded once for all its results (figures, overlays)."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots
        self.key: str | None = None
        self.value: tuple[Any, str | None] = (None, None)

    def get(self, result: Result) -> tuple[Any, str | None]:
        """The photo of ``result`` (PIL image) and None, or None and why it is not available."""
        from traitloc.data.images import ImageLoadError, load_image

        if result.image_key != self.key:
            self.key = result.image_key
            path, why = _find_image(str(result.row.get("image") or ""), self.roots)
            self.value = (None, why)
            if path is not None:
                try:
                    self.value = (load_image(path).image, None)
                except (ImageLoadError, OSError) as err:
                    self.value = (None, f"image {str(path)!r}: {err}".splitlines()[0])
        return self.value


class _Grids:
    """Grid maps read from the store one part at a time (a few parts cached): memory bounded by a part."""

    def __init__(self, files: list[Path], cache: int = 4) -> None:
        self.files = files
        self.cache: dict[int, Any] = {}
        self.size = cache

    def row(self, result: Result) -> dict[str, Any]:
        """The result's row with its ``grid`` (float32, flat), ready for the render functions."""
        import pyarrow.parquet as pq

        grids = self.cache.pop(result.part, None)
        if grids is None:
            grids = pq.read_table(self.files[result.part], columns=["grid"]).column("grid").combine_chunks()
            while len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
        self.cache[result.part] = grids  # most recently used last
        cell = grids[result.index]
        if not cell.is_valid:
            raise ValueError("the store holds no grid map for this row")
        values = cell.values.to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError("the grid map is not finite (NaN or infinite values)")
        return {**result.row, "grid": values}


def _prepare_destination(out: Path, as_zip: bool, root: Path, overwrite: bool) -> None:
    resolved_root = root.resolve()
    target = out.resolve()
    if target == resolved_root:
        raise FormatError("the export must not go into the results folder itself (choose a new folder or a zip)")
    for sub in ("results", "maps", "masks", "overlays", "signed"):
        if target.is_relative_to(resolved_root / sub):
            raise FormatError(f"the export must not go inside the results folder's {sub}/")
    if as_zip:
        if out.is_dir():
            raise FormatError(f"{out} is a folder, not a zip file name")
        if out.exists() and not overwrite and not zipfile.is_zipfile(out):
            raise FormatError(f"{out} exists and is not a zip file; refusing to replace it")
    elif out.exists():
        if not out.is_dir():
            raise FormatError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise FormatError(f"{out} exists and is not empty (choose a new folder, or overwrite)")


def _group_by_image(results: list[Result]) -> list[Result]:
    """Results grouped by image key (first appearance order; store order inside a group)."""
    rank = {key: n for n, key in enumerate(dict.fromkeys(r.image_key for r in results))}
    return sorted(results, key=lambda r: rank[r.image_key])  # stable: store order inside a group


def export_results(
    results_dir: PathLike,
    formats: str | Iterable[str],
    out: PathLike,
    selection: str | Iterable[str] | None = None,
    *,
    as_zip: bool | None = None,
    dpi: int = 300,
    figure_formats: str | Iterable[str] = FIGURE_FORMATS,
    cmap: str = "viridis",
    threshold: float | str | None = None,
    image_roots: Iterable[PathLike] | None = None,
    coco_compressed: bool = False,
    simplify: float = 0.0,
    overwrite: bool = False,
    progress: bool | Callable[[int, int], None] = False,
    argv: Sequence[str] | None = None,
    concepts: Iterable[str] | None = None,
    score_min: float | None = None,
    score_max: float | None = None,
) -> dict[str, Any]:
    """Export the results of a ``localize``/``explain`` run (and ``audit``/``evaluate`` tables) to a folder or zip.

    Used by ``traitloc export`` and by the review app. Everything is rendered from the run's results store
    (:mod:`traitloc.io.store`): maps, masks and overlays are exactly what ``localize --save`` writes for the
    same rows. The export is streamed: one result is rendered and written at a time (photos are decoded once per
    image, grid maps read one store part at a time), a zip is written to a temporary file beside ``out`` and
    renamed at the end, so memory does not grow with the number of results. Results that cannot be rendered are
    left out and listed under ``skipped`` in the manifest with the rows the store marks as failed.

    Parameters
    ----------
    results_dir : path
        The run folder (``--out`` of ``traitloc localize``/``explain``/``audit``).
    formats : str or iterable of str
        Among :data:`FORMATS` (a comma-separated string is split; ``"all"`` is every format).
    out : path
        Output folder (must not exist, or be empty unless ``overwrite``) or zip file.
    selection : None, "all", "accepted", "rejected", "needs-work" or iterable of result ids
        Which ``ok`` results: all (None), those with that review status in ``review.sqlite``, or exactly those ids.
    as_zip : bool, optional
        Write a zip; default: when ``out`` ends with ``.zip``.
    dpi : int, default 300
        Resolution of PNG figures (also the raster resolution inside SVG/PDF figures).
    figure_formats : str or iterable, default ("svg", "pdf", "png")
    cmap : str, default "viridis"
        Figure colormap, one of :data:`UNIFORM_CMAPS`.
    threshold : float in [0, 1), "otsu" or None
        Masks (png, coco, geojson, figure) are ``map > threshold``; None uses each row's threshold (the one
        ``localize --threshold`` used), else the run's, else 0.5.
    image_roots : iterable of paths, optional
        Folders to look for photos in when the recorded absolute path does not exist (moved photos, older runs
        with relative paths): by relative path, then by file name. Photos are only read, wherever they are.
    coco_compressed : bool, default False
        COCO RLE ``counts`` as pycocotools' compressed string instead of a list of ints.
    simplify : float, default 0
        Douglas-Peucker tolerance of the GeoJSON polygons, in pixels (0: exact pixel boundaries).
    overwrite : bool, default False
        Allow a non-empty output folder (files are replaced one by one) or replacing a non-zip file.
    progress : bool or callable, default False
        True shows a progress bar on stderr; a callable is called as ``progress(done, total)`` after each result.
    argv : sequence of str, optional
        Recorded in the manifest.
    concepts : iterable of str, optional
        Only these concepts (``localize``) or targets (``explain``); an unknown one is an error.
    score_min, score_max : float, optional
        Only results whose ``score`` lies in ``[score_min, score_max]`` (rows without a score are left out).

    Returns
    -------
    dict
        The manifest (also written as ``manifest.json``): ``formats``, ``selection``, ``options``, ``run``
        (the results folder's ``run.json``), ``counts``, ``results`` (per result: settings and files), ``tables``,
        ``skipped``, ``files`` and ``environment``.

    Raises
    ------
    FormatError
        Bad options, no store, an unsafe id in the store, or nothing to export.
    """
    root = _results_dir(results_dir)
    fmts = _parse_list(formats, FORMATS, "formats")
    fig_fmts = _parse_list(figure_formats, FIGURE_FORMATS, "figure formats") if "figure" in fmts else []
    options = {"dpi": check_dpi(dpi), "figure_formats": fig_fmts, "cmap": check_cmap(cmap),
               "threshold": _parse_threshold(threshold), "coco_compressed": bool(coco_compressed)}  # fmt: skip
    if not isinstance(simplify, (int, float)) or isinstance(simplify, bool) or not 0 <= simplify < 1e6:
        raise FormatError(f"simplify must be a number >= 0, got {simplify!r}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool or a callable(done, total), got {type(progress).__name__}")
    engine = _parquet_engine() if "parquet" in fmts else None
    options["simplify"] = float(simplify)
    options["image_roots"] = [str(Path(p).resolve()) for p in (image_roots or [])] or None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a str or os.PathLike, got {type(out).__name__}")
    out_path = Path(out)
    zipped = out_path.suffix.lower() == ".zip" if as_zip is None else bool(as_zip)
    _prepare_destination(out_path, zipped, root, overwrite)

    parts = part_files(root)
    # a store of concept or target maps (localize, explain); audit/evaluate stores only have tables to export
    names = _schema(parts[0]).names if parts else []
    has_store = "grid" in names and ("concept" in names or "target" in names)
    extra_tables = [name for name in EXTRA_TABLES if _root_file(root, name) is not None]
    needs_maps = bool(MAP_FORMATS.intersection(fmts))
    if needs_maps and not has_store:
        wanted = ", ".join(sorted(MAP_FORMATS & set(fmts)))
        if parts:
            raise FormatError(f"{root}'s results store holds no concept or target maps (a traitloc audit or evaluate "
                              f"run?): formats {wanted} need the store of traitloc localize/explain; export its "
                              "tables with --format csv,parquet")  # fmt: skip
        raise FormatError(f"{_no_store(root)} (formats {wanted} need its maps)")
    if not has_store and not extra_tables:
        raise FormatError(f"{_no_store(root)}; nor are there audit/evaluate tables to export")
    selecting = selection not in (None, "all") or concepts is not None or score_min is not None or score_max is not None
    if not has_store and selecting:
        raise _no_store(root)
    index, results, skipped = _read_index(root, parts) if has_store else (None, [], [])
    decisions = read_decisions(root)
    chosen, selection_info = _select(results, decisions, selection, concepts, score_min, score_max)
    status_asked = isinstance(selection, str) and selection.strip().lower() != "all"
    if has_store and not chosen and status_asked and not decisions:
        raise FormatError(
            f"no review decisions in {root / 'review.sqlite'} (review the results with traitloc app first)"
        )
    if has_store and not chosen:
        what = selection_info.get("status", "selected")
        more = [f"{k} {selection_info[k]!r}" for k in ("concepts", "score_min", "score_max")
                if selection_info.get(k) is not None]  # fmt: skip
        detail = (f" with review status {what!r}" if what not in ("all", "selected") else "") + (
            f" and {', '.join(more)}" if more else "")  # fmt: skip
        raise FormatError(f"nothing to export: no ok results{detail}")
    chosen = _group_by_image(chosen)
    run_file = _root_file(root, "run.json")
    run_info = read_run_json(run_file) if run_file is not None else {}
    manifest: dict[str, Any] = {
        "traitloc_export": MANIFEST_VERSION, "created_utc": utc_now(), "argv": list(argv or []),
        "results_dir": str(root.resolve()), "formats": fmts, "selection": selection_info, "options": options,
        "conventions": dict(CONVENTIONS), "run": run_info,
    }  # fmt: skip
    job = _Export(root, index, parts, chosen, skipped, decisions, extra_tables, engine, manifest, progress)
    if zipped:
        with atomic_path(out_path) as tmp, open(tmp, "xb") as handle:
            sink = _ZipSink(handle)
            try:
                job.write_all(sink, tmp.parent)
            finally:
                sink.close()
    elif out_path.exists():
        job.write_all(_DirSink(out_path), out_path)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.tmp")
        staging.mkdir()
        try:
            job.write_all(_DirSink(staging), staging)
            os.rename(staging, out_path)  # fails if someone created out meanwhile: nothing is overwritten
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest


def export_zip_bytes(
    results_dir: PathLike, formats: str | Iterable[str], selection: str | Iterable[str] | None = None, **opts: Any
) -> tuple[bytes, dict[str, Any]]:
    """Like :func:`export_results` into a zip, but returned as bytes (small exports only: the zip is in memory).

    Parameters
    ----------
    results_dir, formats, selection
        As for :func:`export_results`.
    **opts
        The keyword options of :func:`export_results` (``dpi``, ``figure_formats``, ``cmap``, ``threshold``,
        ``image_roots``, ``concepts``, ...; not ``out``/``as_zip``/``overwrite``).

    Returns
    -------
    data : bytes
        The zip file.
    manifest : dict
    """
    import tempfile

    for key in ("out", "as_zip", "overwrite"):
        if key in opts:
            raise TypeError(f"export_zip_bytes does not take {key!r}")
    with tempfile.TemporaryDirectory(prefix="traitloc-export-") as tmp:
        path = Path(tmp) / "export.zip"
        manifest = export_results(results_dir, formats, path, selection, as_zip=True, **opts)
        return path.read_bytes(), manifest


class _Export:
    """One export: renders the chosen results one at a time into a sink, then the shared files and the manifest
    (whose ``formats``, ``options`` and ``run`` say what to write)."""

    def __init__(
        self, root: Path, index: Any, files: list[Path], chosen: list[Result], skipped: list[dict[str, Any]],
        decisions: Mapping[str, Decision], extra_tables: list[str], engine: str | None, manifest: dict[str, Any],
        progress: bool | Callable[[int, int], None],
    ) -> None:  # fmt: skip
        self.root, self.index, self.chosen, self.skipped, self.decisions = root, index, chosen, skipped, decisions
        self.extra_tables, self.engine, self.manifest, self.progress = extra_tables, engine, manifest, progress
        self.fmts, self.options, self.run_info = manifest["formats"], manifest["options"], manifest["run"]
        self.grids = _Grids(files)
        self.photos = _Photos([*(Path(r) for r in self.options["image_roots"] or []), root.resolve()])
        self.coco_images: dict[str, dict[str, Any]] = {}  # COCO images and categories by image key and label
        self.coco_cats: dict[str, dict[str, Any]] = {}
        self.n_annotations = 0
        self.features: list[dict[str, Any]] = []
        self.feature_key: tuple[str, int, int, str] | None = None

    def write_all(self, sink: Any, scratch: Path) -> None:
        """Write every chosen result, the shared files, the tables and the manifest (last) into ``sink``."""
        import tempfile

        from tqdm.auto import tqdm

        entries: list[dict[str, Any]] = []
        left_out = [dict(s) for s in self.skipped]
        total = len(self.chosen)
        bar = tqdm(total=total, desc="export", unit="result", disable=self.progress is not True, file=sys.stderr)
        # COCO annotations go to an unnamed temporary file beside the output (never all in memory)
        spool = tempfile.TemporaryFile(dir=scratch) if "coco" in self.fmts else None
        try:
            for done, result in enumerate(self.chosen, start=1):
                try:
                    entry = self._one(sink, result, spool)
                except FormatError:
                    raise
                except (OSError, ValueError) as err:
                    reason = f"{type(err).__name__}: {err}".splitlines()[0]
                    left_out.append({"result_id": result.result_id, "image_key": result.image_key,
                                     "label": result.label, "reason": reason})  # fmt: skip
                else:
                    entries.append(entry)
                bar.update(1)
                if callable(self.progress):
                    self.progress(done, total)
            if total and not entries:
                raise FormatError(f"nothing exported: every selected result failed ({left_out[-1]['reason']})")
            self._flush_geojson(sink)
            if spool is not None and entries:
                self._write_coco(sink, spool)
        finally:
            bar.close()
            if spool is not None:
                spool.close()
        tables = self._write_tables(sink, [entry["result_id"] for entry in entries])
        self.manifest.update(counts={"selected": total, "exported": len(entries), "skipped": len(left_out)},
                             results=entries, tables=tables, skipped=left_out, environment=environment_info(),
                             files=sorted(sink.names))  # fmt: skip
        sink.write("manifest.json", (to_json(self.manifest, indent=2, name="manifest") + "\n").encode("utf-8"))

    # ---- one result --------------------------------------------------------------------------------------------
    def _one(self, sink: Any, result: Result, spool: Any) -> dict[str, Any]:
        fmts = self.fmts
        row = self.grids.row(result)
        unit = render_unit_map(row)
        threshold = _row_threshold(result, self.options["threshold"], self.run_info)
        settings = _settings_for(result, self.run_info, threshold, self.decisions.get(result.result_id))
        need_mask = bool({"png", "coco", "geojson", "figure"} & set(fmts))
        mask = mask_from_map(unit, threshold) if need_mask else None
        height, width = unit.shape
        files: list[str] = []
        warnings: list[str] = []

        def put(rel: str, data: bytes) -> None:
            sink.write(rel, data)
            files.append(rel)

        rid = result.result_id
        if "png" in fmts:
            put(_safe_rel("masks", rid + ".png"), mask_png_bytes(mask, settings))
        if "tiff" in fmts:
            put(_safe_rel("maps", rid + ".tif"), map_tiff_bytes(unit, settings, imagej=True, label=result.label))
        photo = None
        if "overlay" in fmts or "figure" in fmts:
            photo, why = self.photos.get(result)
            if why and "overlay" in fmts:
                warnings.append(f"no overlay: {why}")
            if why and "figure" in fmts:
                warnings.append(f"figure drawn without the image: {why}")
        if "overlay" in fmts and photo is not None:
            put(_safe_rel("overlays", rid + ".png"), png_bytes(render_overlay(row, photo, unit=unit)))
        image = str(result.row.get("image") or result.image_key)
        if "coco" in fmts:
            coco_image = self.coco_images.setdefault(result.image_key, {
                "id": len(self.coco_images) + 1, "file_name": Path(image).name, "width": width, "height": height,
                "traitloc_image": image, "traitloc_image_key": result.image_key})  # fmt: skip
            category = self.coco_cats.setdefault(result.label, {"id": len(self.coco_cats) + 1, "name": result.label,
                                                                "supercategory": result.kind})  # fmt: skip
            assert mask is not None  # need_mask covers coco
            self.n_annotations += 1
            annotation = coco_annotation(self.n_annotations, coco_image["id"], category["id"], mask, settings,
                                         result.row.get("score"), bool(self.options["coco_compressed"]))  # fmt: skip
            spool.write((to_json(annotation, sort_keys=True) + "\n").encode("utf-8"))
        if "geojson" in fmts:
            key = (result.image_key, height, width, image)
            if self.feature_key is not None and self.feature_key[0] != result.image_key:
                self._flush_geojson(sink)
            assert mask is not None  # need_mask covers geojson
            self.feature_key = key
            self.features.append(geojson_feature(rid, result.label, mask, settings, self.options["simplify"]))
        if "figure" in fmts:
            fig = figure_panel(photo, unit, mask, settings, cmap=self.options["cmap"])
            for fmt in self.options["figure_formats"]:
                put(_safe_rel("figures", f"{rid}.{fmt}"), figure_bytes(fig, fmt, settings, dpi=self.options["dpi"]))
        entry: dict[str, Any] = {"result_id": rid, "label": result.label, "settings": settings, "files": files}
        if warnings:
            entry["warnings"] = warnings
        shared = [f for f, on in (("coco.json", "coco" in fmts),
                                  (f"polygons/{result.image_key}.geojson", "geojson" in fmts)) if on]  # fmt: skip
        if shared:
            entry["shared_files"] = shared
        return entry

    # ---- shared files ------------------------------------------------------------------------------------------
    def _flush_geojson(self, sink: Any) -> None:
        if self.feature_key is None or not self.features:
            return
        key, height, width, image = self.feature_key
        doc = geojson_collection(self.features, image, key, width, height)
        sink.write(_safe_rel("polygons", key + ".geojson"), (to_json(doc, sort_keys=True) + "\n").encode("utf-8"))
        self.features, self.feature_key = [], None

    def _write_coco(self, sink: Any, spool: Any) -> None:
        info = {"description": "traitloc export", "date_created": self.manifest["created_utc"],
                "traitloc": {k: self.run_info.get(k) for k in ("command", "model", "pretrained", "method", "gamma",
                                                               "base", "target_layer", "threshold")
                             if k in self.run_info}}  # fmt: skip
        head = {"info": info, "licenses": [], "images": list(self.coco_images.values()),
                "categories": list(self.coco_cats.values())}  # fmt: skip
        spool.seek(0)
        with sink.open("coco.json") as handle:
            write_coco(handle, head, spool)

    def _write_tables(self, sink: Any, exported: list[str]) -> list[str]:
        if "csv" not in self.fmts and "parquet" not in self.fmts:
            return []
        frames: list[tuple[str, Any]] = []
        if exported and self.index is not None:
            frames.append(("results", self._results_frame(exported)))
        for name in self.extra_tables:
            header, rows = _read_csv_rows(self.root / name)
            frames.append((Path(name).stem, _table_frame(header, rows)))
        written: list[str] = []
        for stem, frame in frames:
            if "csv" in self.fmts:
                with sink.open(_safe_rel("tables", stem + ".csv")) as handle:
                    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
                    frame.to_csv(text, index=False, lineterminator="\n")
                    text.flush()
                    text.detach()  # the sink closes the handle
                written.append(f"tables/{stem}.csv")
            if "parquet" in self.fmts:
                buffer = io.BytesIO()
                frame.to_parquet(buffer, engine=self.engine, index=False)
                sink.write(_safe_rel("tables", stem + ".parquet"), buffer.getvalue())
                written.append(f"tables/{stem}.parquet")
        return written

    def _results_frame(self, exported: list[str]) -> Any:
        """The exported rows of the store (typed columns, no grid), in export order, with the review decisions."""
        df = self.index.drop(columns=["_part", "_row"]).set_index("result_id", drop=False)
        df = df.loc[exported].reset_index(drop=True)
        df.insert(0, "result_id", df.pop("result_id"))
        decisions = [self.decisions.get(rid) for rid in exported]
        df["review_status"] = [d.status if d else "" for d in decisions]
        df["review_note"] = [d.note if d else "" for d in decisions]
        return df


def _table_frame(header: list[str], rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=header)
    for column in frame.columns:
        values = frame[column].fillna("").astype(str)
        nonempty = values[values != ""]
        if column in _TEXT_COLUMNS or not pd.to_numeric(nonempty, errors="coerce").notna().all():
            frame[column] = values
        elif len(nonempty):  # numbers (a column without any value is left as it is)
            frame[column] = pd.to_numeric(values.replace("", np.nan), errors="coerce")
            if column in _FLOAT_COLUMNS:
                frame[column] = frame[column].astype("float64")
    return frame


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``traitloc export`` to the ``traitloc`` command's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a run's results: masks, maps, overlays, COCO, GeoJSON, tables, paper figures",
        description="Render the results of traitloc localize/explain from the run's results store (and export "
        "audit/evaluate tables) to a folder or a zip: binary PNG masks, float32 ImageJ TIFF maps, overlays, COCO "
        "RLE JSON, GeoJSON polygons (pixel coordinates, origin at the image's top-left corner), CSV/Parquet tables "
        "and figure panels (SVG/PDF with editable text, PNG at --dpi), each with the settings that made it; "
        "manifest.json lists everything. Select rows by review status, concept and score.",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="folder written by traitloc localize/explain/audit")
    p.add_argument("--format", dest="formats", default="png,tiff,coco,geojson,csv,figure", metavar="LIST",
                   help=f"comma-separated formats among {','.join(FORMATS)}, or all "
                   "(default: png,tiff,coco,geojson,csv,figure)")  # fmt: skip
    p.add_argument("--status", choices=["all", *STATUSES], default="all",
                   help="which results: all ok ones, or those with this review decision in "
                   "RESULTS_DIR/review.sqlite (default: all)")  # fmt: skip
    p.add_argument("--concept", action="append", default=None, metavar="TEXT",
                   help="only this concept (localize) or target class (explain); repeat for several")  # fmt: skip
    p.add_argument("--min-score", type=float, default=None, metavar="S", help="only results with score >= S")
    p.add_argument("--max-score", type=float, default=None, metavar="S", help="only results with score <= S")
    p.add_argument("--dpi", type=int, default=300, help="resolution of PNG figures (default: 300)")
    p.add_argument("--figure-format", default="svg,pdf,png", metavar="LIST",
                   help="figure files among svg,pdf,png (default: svg,pdf,png)")  # fmt: skip
    p.add_argument("--cmap", default="viridis", choices=UNIFORM_CMAPS, metavar="NAME",
                   help=f"figure colormap, perceptually uniform: {', '.join(UNIFORM_CMAPS[::2])} "
                   "(_r reverses) (default: viridis)")  # fmt: skip
    p.add_argument("--threshold", default=None, metavar="T",
                   help="masks are map > T (a number in [0, 1) or otsu) (default: the threshold of the run, "
                   "localize --threshold)")  # fmt: skip
    p.add_argument("--image-root", action="append", default=None, metavar="DIR",
                   help="where to look for photos (by relative path, then file name) whose recorded path does not "
                   "exist any more; repeat for several (photos are only read)")  # fmt: skip
    p.add_argument("--coco-compressed", action="store_true",
                   help="COCO RLE counts as pycocotools' compressed strings (default: lists of ints)")  # fmt: skip
    p.add_argument("--simplify", type=float, default=0.0, metavar="PX",
                   help="simplify GeoJSON polygons with this tolerance in pixels (default: 0 = exact)")  # fmt: skip
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="DIR", help="output folder (new or empty)")
    dest.add_argument("--zip", metavar="FILE", help="output zip file (streamed to a temporary file, then renamed)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder, replacing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``traitloc export`` (bad input raises :class:`traitloc.pipelines.options.CliError`)."""
    import torch

    from traitloc.pipelines.options import CliError

    # Rendering is one small bilinear upsampling per result: one thread is faster than several, which wait on
    # each other (several times slower on a busy machine); the command has nothing else for torch to do.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = args.zip if args.zip is not None else args.out
    try:
        manifest = export_results(
            args.results_dir, args.formats, out, args.status, as_zip=args.zip is not None, dpi=args.dpi,
            figure_formats=args.figure_format, cmap=args.cmap, threshold=args.threshold,
            image_roots=args.image_root, coco_compressed=args.coco_compressed, simplify=args.simplify,
            overwrite=args.force, progress=not args.quiet, argv=list(argv), concepts=args.concept,
            score_min=args.min_score, score_max=args.max_score,
        )  # fmt: skip
    except FormatError as err:
        raise CliError(str(err)) from err
    finally:
        torch.set_num_threads(threads)
    if not args.quiet:
        counts = manifest["counts"]
        print(f"traitloc export: {counts['exported']} results exported, {counts['skipped']} left out "
              f"({', '.join(manifest['formats'])}) -> {out}", file=sys.stderr)  # fmt: skip
    return 0 if manifest["counts"]["exported"] or not manifest["counts"]["selected"] else 1
