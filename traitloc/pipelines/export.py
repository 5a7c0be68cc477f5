"""Exports of a run for other tools and for papers: ``traitloc export``.

The results of ``traitloc localize`` or ``traitloc explain`` live in the run's **results store**
(``OUT/results/part-*.parquet``, :mod:`traitloc.io.store`): one row per (image, concept) or (image, target) with
its scores and its grid map. The export renders the selected rows from the store, one at a time, into a folder or
a zip file (the tables of ``traitloc audit``/``evaluate`` are exported too):

================  ==================================================================================================
format            files (paths inside the export; ``<id>`` is the result id ``<image-key>/<slug>``)
================  ==================================================================================================
``png``           ``masks/<id>.png``: binary masks, 8-bit grayscale 0/255, settings as a PNG ``iTXt`` chunk
``tiff``          ``maps/<id>.tif``: float32 maps in [0, 1], uncompressed ImageJ TIFF (Fiji, napari, tifffile),
                  display range 0..1, the concept as slice label and the settings as JSON in ImageJ's ``Info``
``overlay``       ``overlays/<id>.png``: the map (inferno, alpha 0.5) over the photo, as ``localize --save``
``coco``          ``coco.json``: COCO instance annotations with RLE masks (``iscrowd = 1``), one per result
``geojson``       ``polygons/<image-key>.geojson``: one ``MultiPolygon`` feature per result, in pixel coordinates
``csv``           ``tables/results.csv`` (the selected rows of the store without the grid, plus ``result_id,
                  review_status, review_note``) and the audit/evaluate tables present (``audit.csv``,
                  ``controls.csv``, ``audit_summary.csv``, ``metrics.csv``)
``parquet``       the same tables as Parquet (needs pyarrow or fastparquet)
``figure``        ``figures/<id>.svg|pdf|png``: image | overlay with colorbar | mask contour, for papers
================  ==================================================================================================

Maps and masks are exactly what ``localize --save maps,masks`` writes for the same rows: the map is
:func:`traitloc.io.store.render_unit_map` (bilinear from the grid to the photo's size, ReLU, divided by its
max) and the mask is ``map > threshold`` with the run's threshold unless the export gives another. Every export has
a ``manifest.json`` (written last): versions, argv, the options, the selection, the run's ``run.json`` and, per
result, its settings and files; rows the store marks as failed and results that could not be rendered are listed
under ``skipped`` with their reason.

Selection: by review status (``RESULTS_DIR/review.sqlite`` of the review app, :mod:`traitloc.io.decisions`), concept or
target, a score range, or explicit result ids (Python).

Conventions
-----------
Result ids
    ``<image-key>/<slug>``: the store's ``result_id``. The review app stores its decisions under these ids in
    ``RESULTS_DIR/review.sqlite``, table ``decisions(result_id TEXT PRIMARY KEY, status TEXT, note TEXT,
    updated_utc TEXT)``.
RLE (COCO)
    The mask is flattened in column-major (Fortran) order, and ``counts`` are the lengths of alternating runs
    starting with a run of zeros (0 when the first pixel is set); ``size`` is ``[height, width]``. The compressed
    string form is pycocotools' (``rleToString``).
Polygon coordinates (GeoJSON)
    ``x`` is the column and ``y`` the row, in pixels, with the origin at the top-left *corner* of the top-left
    pixel and ``y`` pointing down: pixel ``(row i, column j)`` covers the square ``[j, j+1] x [i, i+1]`` and its
    centre is ``(j + 0.5, i + 0.5)`` (GDAL's pixel/line convention). Boundaries run through the midpoints
    between foreground and background pixel centres (marching squares at level 0.5); foreground pixels are
    4-connected (two pixels touching only at a corner are two polygons) and holes 8-connected. Rings are closed
    and follow RFC 7946's right-hand rule in the numeric coordinates: exterior rings have a positive signed
    (shoelace) area, holes a negative one; as ``y`` points down, exteriors look clockwise on screen. Subtract
    0.5 to get coordinates with pixel centres at integers (scikit-image's, for ``skimage.draw.polygon``); see
    :func:`polygons_to_mask`.
COCO bounding boxes
    ``[x, y, width, height]`` of the set pixels in the same corner convention (COCO's).

Memory
------
The export is streamed: grid maps are read one store part at a time, each photo is decoded once for all its
results, each file is written as soon as it is rendered, COCO annotations are spooled to an unnamed temporary
file, and a zip is written to a temporary file beside the destination and renamed at the end. Peak memory does not
grow with the number of results (``benchmarks/memory_export.py``).

Security
--------
Result ids and image keys from the store become paths inside the export only when they are safe relative paths
(no ``..``, no absolute path, no backslash); otherwise the whole export stops before writing. Nothing is written
outside the chosen output: a folder export is assembled in a hidden temporary folder beside it and renamed into
place, a zip is written to a temporary file and renamed, and no path inside an export leaves it. Photos (figures
and overlays only) are read, never written, at the absolute path the run recorded, wherever it is; when that path
does not exist they are looked for inside ``image_roots`` and the results folder (by relative path, then by file
name, never leaving those folders). Symbolic links that lead ``run.json``, ``review.sqlite`` or the audit tables
out of the results folder are rejected. Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import secrets
import shutil
import sqlite3
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from traitloc.io.files import (
    atomic_path,
    atomic_write,
    environment_info,
    mask_from_map,
    overlay_array,
    utc_now,
)
from traitloc.io.store import part_files

__all__ = [
    "FIGURE_FORMATS",
    "FORMATS",
    "UNIFORM_CMAPS",
    "Decision",
    "FormatError",
    "Result",
    "add_parser",
    "export_results",
    "export_zip_bytes",
    "figure_bytes",
    "figure_panel",
    "list_results",
    "map_tiff_bytes",
    "mask_png_bytes",
    "mask_to_polygons",
    "polygons_to_mask",
    "read_decisions",
    "read_export_tiff",
    "rle_decode",
    "rle_encode",
    "rle_from_string",
    "rle_to_string",
    "run",
]

PathLike = str | os.PathLike[str]

#: every export format, in the order they are written
FORMATS: tuple[str, ...] = ("png", "tiff", "overlay", "coco", "geojson", "csv", "parquet", "figure")
#: formats that need the maps of a ``localize``/``explain`` run (its results store)
MAP_FORMATS = frozenset({"png", "tiff", "overlay", "coco", "geojson", "figure"})
FIGURE_FORMATS: tuple[str, ...] = ("svg", "pdf", "png")
#: matplotlib's perceptually uniform sequential colormaps (and their reverses) allowed for figures
UNIFORM_CMAPS: tuple[str, ...] = tuple(
    name + rev for name in ("viridis", "cividis", "magma", "inferno", "plasma") for rev in ("", "_r")
)
#: tables of a results folder exported by ``csv``/``parquet`` besides ``results.csv``
EXTRA_TABLES: tuple[str, ...] = ("audit.csv", "controls.csv", "audit_summary.csv", "metrics.csv", "per_image.csv")
#: review statuses (the app's accept / reject / needs-work) and the spellings read as them
REVIEW_STATUSES: tuple[str, ...] = ("accepted", "rejected", "needs-work")
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
COLORBAR_GID = "traitloc-colorbar"
COLORBAR_LABEL = "relative importance (map / max)"
MANIFEST_VERSION = 1
_RC_LOCK = threading.Lock()
_MAX_DPI = 2400


class FormatError(ValueError):
    """Bad export input (a results folder, selection or option); the message is one line."""


# ------------------------------------------------------------------------------------------------------------------
# COCO run-length encoding
# ------------------------------------------------------------------------------------------------------------------
def _as_mask(mask: object, name: str = "mask") -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (H, W), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise TypeError(f"{name} must be boolean (or 0/1 numbers), got dtype {array.dtype}")
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or hold only 0 and 1")
        array = array.astype(bool)
    return array


def rle_encode(mask: object, compressed: bool = False) -> dict[str, Any]:
    """COCO run-length encoding of a binary mask.

    The mask is flattened in column-major order; ``counts`` alternate runs of 0s and 1s, starting with 0s (a
    leading 0 when the first pixel is set). ``sum(counts) == height * width``.

    Parameters
    ----------
    mask : array_like of bool, shape (H, W)
        Boolean mask or 0/1 numbers.
    compressed : bool, default False
        Give ``counts`` as pycocotools' compressed ASCII string (:func:`rle_to_string`) instead of a list of ints.

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": [...] or "..."}``.

    Examples
    --------
    >>> rle_encode([[0, 1], [0, 1]])
    {'size': [2, 2], 'counts': [2, 2]}
    """
    array = _as_mask(mask)
    flat = array.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)
    counts: list[int] | str = rle_to_string(runs) if compressed else [int(r) for r in runs]
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": counts}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (``counts`` as a list of ints or a compressed string) into a boolean mask.

    Parameters
    ----------
    rle : mapping
        ``{"size": [H, W], "counts": list[int] | str | bytes}``.

    Returns
    -------
    numpy.ndarray
        bool, shape (H, W).

    Raises
    ------
    ValueError
        If ``size`` is not two positive ints, a count is negative, or the counts do not add up to ``H * W``.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError("rle must be a mapping with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size)
    ):
        raise ValueError(f"rle size must be [height, width] of positive ints, got {size!r}")
    height, width = int(size[0]), int(size[1])
    raw = rle["counts"]
    counts = rle_from_string(raw) if isinstance(raw, (str, bytes)) else list(raw)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
        raise ValueError("rle counts must be non-negative ints")
    total = int(sum(int(c) for c in counts))
    if total != height * width:
        raise ValueError(f"rle counts add up to {total}, expected height * width = {height * width}")
    values = (np.arange(len(counts)) % 2).astype(bool)
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape((height, width), order="F")


def rle_to_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed form of RLE counts (``rleToString`` of its ``maskApi.c``).

    Each count (from the third on, as the difference to the count two places before) is written as a
    little-endian sequence of 5-bit groups, each as ``chr(48 + group)`` with bit 6 (``0x20``) set on all but the
    last group; the sign lives in bit 5 (``0x10``) of the last group.

    Parameters
    ----------
    counts : sequence of int
        Uncompressed RLE counts.

    Returns
    -------
    str
        ASCII text (characters 48..111).
    """
    out: list[str] = []
    values = [int(c) for c in counts]
    for i, count in enumerate(values):
        x = count - values[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative numbers stay negative
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_from_string(text: str | bytes) -> list[int]:
    """Inverse of :func:`rle_to_string` (pycocotools' ``rleFrString``).

    Parameters
    ----------
    text : str or bytes
        Compressed counts.

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        If the text holds characters outside 48..111 or ends inside a count.
    """
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("compressed rle counts end inside a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed rle counts hold an invalid character {chr(data[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _bbox_area(mask: np.ndarray) -> tuple[list[int], int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0], 0
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return [c0, r0, c1 - c0 + 1, r1 - r0 + 1], int(mask.sum())


# ------------------------------------------------------------------------------------------------------------------
# polygons
# ------------------------------------------------------------------------------------------------------------------
def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def mask_to_polygons(mask: object, simplify: float = 0.0) -> list[list[list[list[float]]]]:
    """Polygons (with holes) of the set pixels of a binary mask, in pixel coordinates.

    See the module's "Polygon coordinates" for the convention: ``[x, y]`` = (column, row) with the origin at the
    top-left corner of the image, exterior rings with positive signed area, holes negative, rings closed.

    Parameters
    ----------
    mask : array_like of bool, shape (H, W)
    simplify : float, default 0
        Douglas-Peucker tolerance in pixels (``skimage.measure.approximate_polygon``); 0 keeps the exact
        pixel-edge boundaries. Simplified rings may no longer rasterize to the exact mask.

    Returns
    -------
    list
        GeoJSON ``MultiPolygon`` coordinates: a list of polygons, each a list of rings (exterior first, then its
        holes), each ring a list of ``[x, y]``. Empty for an empty mask.
    """
    from skimage.measure import approximate_polygon, find_contours, label

    array = _as_mask(mask)
    if not isinstance(simplify, (int, float)) or isinstance(simplify, bool) or not simplify >= 0:
        raise ValueError(f"simplify must be a number >= 0, got {simplify!r}")
    if not array.any():
        return []
    padded = np.pad(array, 1)
    # 4-connected foreground components, the same connectivity as the contours (fully_connected="low")
    components = label(padded, connectivity=1)
    # positive_orientation="high": exteriors wind one way around the set pixels, holes the other way
    contours = find_contours(padded.astype(np.float32), 0.5, fully_connected="low", positive_orientation="high")
    polygons: dict[int, list[np.ndarray]] = {}
    holes: list[tuple[int, np.ndarray]] = []
    for contour in contours:
        if len(contour) < 4:
            continue
        owner = _contour_component(contour[0], components)
        # (row, col) in the padded array -> (x, y) in the corner convention of the original image
        ring = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
        exterior = _signed_area(ring) < 0  # find_contours' exteriors; reversed below to positive area
        if simplify > 0:
            ring = approximate_polygon(ring, tolerance=float(simplify))
            if not np.array_equal(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            if len(ring) < 4 or _signed_area(ring) == 0:
                continue
        ring = ring[::-1].copy()
        if exterior:
            polygons[owner] = [ring]
        else:
            holes.append((owner, ring))
    for owner, ring in holes:  # a hole is bordered by the pixels of the one component around it
        if owner in polygons:
            polygons[owner].append(ring)
    digits = 3 if simplify > 0 else None

    def as_list(ring: np.ndarray) -> list[list[float]]:
        values = np.round(ring, digits) if digits is not None else ring
        return [[float(x), float(y)] for x, y in values]

    return [[as_list(r) for r in polygons[k]] for k in sorted(polygons)]


def _contour_component(vertex: np.ndarray, components: np.ndarray) -> int:
    """Label of the foreground pixel beside a contour vertex (vertices sit halfway between two pixel centres)."""
    r, c = float(vertex[0]), float(vertex[1])
    if abs(r - round(r)) < 1e-6:
        pixels = [(round(r), math.floor(c)), (round(r), math.ceil(c))]
    else:
        pixels = [(math.floor(r), round(c)), (math.ceil(r), round(c))]
    labels = [int(components[p]) for p in pixels]
    return max(labels)


def polygons_to_mask(polygons: Sequence[Any], shape: tuple[int, int]) -> np.ndarray:
    """Rasterize polygons of :func:`mask_to_polygons` (or a GeoJSON geometry) back into a boolean mask.

    A pixel is set when its centre lies inside a polygon's exterior and outside its holes
    (``skimage.draw.polygon`` on the coordinates minus 0.5).

    Parameters
    ----------
    polygons : list or mapping
        ``MultiPolygon`` coordinates, or a GeoJSON ``Polygon``/``MultiPolygon`` geometry mapping.
    shape : (int, int)
        ``(height, width)`` of the mask.

    Returns
    -------
    numpy.ndarray
        bool, shape ``shape``.
    """
    from skimage.draw import polygon as draw_polygon

    if isinstance(polygons, Mapping):
        kind = polygons.get("type")
        coords = polygons.get("coordinates", [])
        if kind == "Polygon":
            polygons = [coords]
        elif kind == "MultiPolygon":
            polygons = coords
        else:
            raise ValueError(f"expected a Polygon or MultiPolygon geometry, got {kind!r}")
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype=bool)

    def fill(ring: Sequence[Sequence[float]]) -> np.ndarray:
        pts = np.asarray(ring, dtype=np.float64)
        layer = np.zeros((height, width), dtype=bool)
        if len(pts) >= 3:
            rr, cc = draw_polygon(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape=(height, width))
            layer[rr, cc] = True
        return layer

    for poly in polygons:
        if not poly:
            continue
        layer = fill(poly[0])
        for hole in poly[1:]:
            layer &= ~fill(hole)
        out |= layer
    return out


# ------------------------------------------------------------------------------------------------------------------
# TIFF and PNG
# ------------------------------------------------------------------------------------------------------------------
def _json(obj: Any, indent: int | None = None) -> str:
    def default(value: object) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return str(value)

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), default=default, indent=indent, ensure_ascii=False, sort_keys=indent is None)


def map_tiff_bytes(map01: object, settings: Mapping[str, Any] | None = None, label: str | None = None) -> bytes:
    """A float32 map as an uncompressed ImageJ TIFF that Fiji, napari and tifffile open.

    ImageJ metadata: display range 0..1 (``min``/``max``), ``label`` as the slice label, and ``settings`` as JSON
    in ``Info`` (Fiji: Image > Show Info; tifffile: ``TiffFile.imagej_metadata["Info"]``).

    Parameters
    ----------
    map01 : array_like, shape (H, W)
        The map, stored as float32 (values are not changed).
    settings : mapping, optional
        JSON-serializable settings.
    label : str, optional
        Slice label (e.g. the concept).

    Returns
    -------
    bytes
    """
    import tifffile

    array = np.ascontiguousarray(np.asarray(map01), dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"map01 must be a non-empty 2-D array, got shape {array.shape}")
    meta: dict[str, Any] = {"axes": "YX", "min": 0.0, "max": 1.0, "Info": _json(dict(settings or {}), indent=1)}
    if label:
        meta["Labels"] = [str(label)]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, imagej=True, metadata=meta, photometric="minisblack")
    return buffer.getvalue()


def read_export_tiff(path: PathLike | bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a map written by :func:`map_tiff_bytes`: the float32 array and the settings from ImageJ ``Info``.

    Parameters
    ----------
    path : path or bytes

    Returns
    -------
    array : numpy.ndarray
        float32, shape (H, W).
    settings : dict
        The JSON of ``Info`` (empty when absent).
    """
    import tifffile

    source: Any = io.BytesIO(path) if isinstance(path, bytes) else path
    with tifffile.TiffFile(source) as tif:
        array = tif.pages[0].asarray()
        info = (tif.imagej_metadata or {}).get("Info", "")
    settings = json.loads(info) if info else {}
    return np.asarray(array, dtype=np.float32), settings if isinstance(settings, dict) else {}


def mask_png_bytes(mask: object, settings: Mapping[str, Any] | None = None) -> bytes:
    """A binary mask as an 8-bit grayscale PNG (0 / 255) with the settings as JSON in an ``iTXt`` chunk.

    Parameters
    ----------
    mask : array_like of bool, shape (H, W)
    settings : mapping, optional
        Stored under the key ``traitloc`` (Pillow: ``Image.open(f).text["traitloc"]``).

    Returns
    -------
    bytes
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    array = _as_mask(mask)
    info = PngInfo()
    info.add_text("Software", "traitloc")
    if settings:
        info.add_itxt("traitloc", _json(dict(settings)))
    buffer = io.BytesIO()
    Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# figure panels
# ------------------------------------------------------------------------------------------------------------------
def _check_cmap(cmap: str) -> str:
    if not isinstance(cmap, str) or cmap not in UNIFORM_CMAPS:
        raise FormatError(f"cmap must be a perceptually uniform colormap ({', '.join(UNIFORM_CMAPS)}), got {cmap!r}")
    return cmap


def _settings_line(settings: Mapping[str, Any]) -> str:
    parts = []
    method = settings.get("method")
    if method:
        parts.append(f"Finer-CAM ({method})")
    gamma = settings.get("gamma")
    if gamma not in (None, ""):
        parts.append(f"γ = {_fmt_number(gamma)}")
    threshold = settings.get("threshold")
    if threshold not in (None, ""):
        parts.append(f"mask: map > {_fmt_number(threshold)}")
    model = settings.get("model") or settings.get("classifier")
    if model:
        parts.append(f"model: {Path(str(model)).name}")
    return "   ".join(parts)


def _fmt_number(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _figure_title(settings: Mapping[str, Any]) -> str:
    if settings.get("target"):
        refs = settings.get("references")
        if isinstance(refs, (list, tuple)):
            refs = ", ".join(str(r) for r in refs)
        return f"{settings['target']}  vs  {refs}" if refs else str(settings["target"])
    concept = settings.get("concept") or settings.get("label")
    if not concept:
        return "traitloc map"
    base = settings.get("base")
    return f"“{concept}”  vs  “{base}”" if base and base != "(none)" else f"“{concept}”"


def figure_panel(
    image: object | None,
    map01: object,
    mask: object | None = None,
    settings: Mapping[str, Any] | None = None,
    cmap: str = "viridis",
    alpha: float = 0.55,
    panel_width: float = 2.4,
) -> Any:
    """A paper figure: image | overlay of the map with a colorbar | mask contour.

    Built on a bare :class:`matplotlib.figure.Figure` (no pyplot state, safe in the review app). The colorbar's
    axes has the gid :data:`COLORBAR_GID` (an SVG ``<g id="traitloc-colorbar">``) and the label
    :data:`COLORBAR_LABEL`; the title names the concept (or target) and its base (or references), the subtitle
    the method, gamma, threshold and model from ``settings``.

    Parameters
    ----------
    image : PIL image, uint8 array (H, W[, 3|4]) or None
        The source image, drawn under the overlay and the contour; None draws a neutral grey background. It is
        stretched onto the map's extent when sizes differ (a downscaled working image).
    map01 : array_like, shape (H, W)
        The map in [0, 1] (colorbar 0..1).
    mask : array_like of bool, shape (H, W), optional
        Its outline (:func:`mask_to_polygons`) is drawn in the third panel; default ``map01 > threshold`` with
        ``settings["threshold"]`` or 0.5.
    settings : mapping, optional
        ``concept``/``target``, ``base``/``references``, ``gamma``, ``method``, ``model``, ``threshold``...
    cmap : str, default "viridis"
        A perceptually uniform colormap (:data:`UNIFORM_CMAPS`).
    alpha : float, default 0.55
        Opacity of the map over the image.
    panel_width : float, default 2.4
        Width of each panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import colormaps, patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    settings = dict(settings or {})
    colormap = colormaps[_check_cmap(cmap)]
    heat = np.asarray(map01, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"map01 must be a non-empty 2-D array, got shape {heat.shape}")
    height, width = heat.shape
    if mask is None:
        threshold = settings.get("threshold", 0.5)
        mask = mask_from_map(np.clip(heat, 0.0, 1.0), 0.5 if threshold in (None, "") else threshold)
    mask_array = _as_mask(mask)
    if mask_array.shape != heat.shape:
        raise ValueError(f"mask shape {mask_array.shape} differs from the map's {heat.shape}")
    rgb: np.ndarray | None = None
    if image is not None:
        from PIL import Image

        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if rgb.ndim == 3 and rgb.shape[2] == 4:
            rgb = rgb[:, :, :3]
    extent = (0.0, float(width), float(height), 0.0)
    aspect = height / width
    panel_h = min(max(panel_width * aspect, 0.8), 3 * panel_width)
    fig = Figure(figsize=(3 * panel_width + 0.9, panel_h + 0.95), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, title in zip(axes, ("image", "map", "mask"), strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        if rgb is not None:
            ax.imshow(rgb, extent=extent, interpolation="antialiased")
        else:
            ax.set_facecolor("0.8")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    if rgb is None:
        axes[0].text(0.5, 0.5, "image not available", ha="center", va="center", fontsize=8,
                     transform=axes[0].transAxes)  # fmt: skip
    axes[1].imshow(heat, cmap=colormap, vmin=0.0, vmax=1.0, alpha=alpha if rgb is not None else 1.0,
                   extent=extent, interpolation="bilinear")  # fmt: skip
    threshold = settings.get("threshold")
    axes[2].set_title("mask" if threshold in (None, "") else f"mask (map > {_fmt_number(threshold)})", fontsize=9)
    rings = [np.asarray(r) for poly in mask_to_polygons(mask_array) for r in poly]
    if rings:
        lines = LineCollection(rings, colors="#ffffff", linewidths=1.2)
        lines.set_path_effects([patheffects.Stroke(linewidth=2.4, foreground="black"), patheffects.Normal()])
        lines.set_gid("traitloc-mask-contour")
        axes[2].add_collection(lines)
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormap)
    cbar = fig.colorbar(mappable, ax=axes[1], fraction=0.046, pad=0.03)
    cbar.set_label(COLORBAR_LABEL, fontsize=7)
    cbar.ax.tick_params(labelsize=7)
    cbar.ax.set_gid(COLORBAR_GID)
    fig.suptitle(_figure_title(settings), fontsize=10)
    line = _settings_line(settings)
    if line:
        fig.supxlabel(line, fontsize=7)
    return fig


def _figure_metadata(fmt: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    title = _figure_title(settings) or "traitloc figure"
    text = _json(dict(settings))
    if fmt == "svg":
        return {"Title": title, "Description": text, "Creator": "traitloc", "Date": None}
    if fmt == "pdf":
        return {"Title": title, "Subject": text, "Keywords": "traitloc; Finer-CAM", "Creator": "traitloc",
                "CreationDate": None}  # fmt: skip
    return {"Title": title, "Description": text, "Software": "traitloc", "traitloc": text}


def figure_bytes(fig: Any, fmt: str, settings: Mapping[str, Any] | None = None, dpi: int = 300) -> bytes:
    """Save a figure of :func:`figure_panel` as SVG, PDF or PNG bytes, with editable text and its settings.

    SVG text stays text (``svg.fonttype = 'none'``), PDF fonts are embedded as TrueType (``pdf.fonttype = 42``,
    editable in Illustrator/Inkscape), PNG is rasterized at ``dpi`` (stored in its ``pHYs`` chunk). The settings
    go into the file's metadata: SVG ``<title>`` and ``<metadata>`` (Dublin Core ``description``), the PDF info
    dictionary (``Title``, ``Subject``), PNG text chunks (``Title``, ``Description``, ``traitloc``).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    fmt : {"svg", "pdf", "png"}
    settings : mapping, optional
    dpi : int, default 300

    Returns
    -------
    bytes
    """
    import matplotlib

    if fmt not in FIGURE_FORMATS:
        raise FormatError(f"figure format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    dpi = _check_dpi(dpi)
    rc = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "traitloc",
          "savefig.dpi": dpi, "image.composite_image": False}  # fmt: skip
    # Vector files embed each image at its own resolution (the viewer scales it); PNG resamples with antialiasing.
    images = [im for ax in fig.axes for im in ax.get_images()]
    for im in images:
        im.set_interpolation("antialiased" if fmt == "png" else "none")
    buffer = io.BytesIO()
    with _RC_LOCK, matplotlib.rc_context(rc):  # rcParams are global: one save at a time (the app has threads)
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_figure_metadata(fmt, settings or {}))
    return buffer.getvalue()


def _check_dpi(dpi: object) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or not 10 <= int(dpi) <= _MAX_DPI:
        raise FormatError(f"dpi must be an int in [10, {_MAX_DPI}], got {dpi!r}")
    return int(dpi)


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


@dataclass(frozen=True)
class Decision:
    """A review decision of the app (``review.sqlite``)."""

    status: str
    note: str = ""
    updated_utc: str = ""


def _results_dir(value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"results_dir must be a str or os.PathLike, got {type(value).__name__}")
    path = Path(value)
    if not path.is_dir():
        raise FormatError(f"results folder not found: {path}")
    return path


def _inside(root: Path, text: str, what: str) -> tuple[Path, PurePosixPath]:
    """Check a path from a table: relative, no ``..``, resolving (symlinks followed) inside ``root``."""
    if not text or "\x00" in text or "\\" in text:
        raise FormatError(f"{what}: invalid path {text!r}")
    rel = PurePosixPath(text)
    if rel.is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise FormatError(f"{what}: absolute path {text!r} is not allowed (paths must be inside the results folder)")
    if any(part in ("..", "") for part in rel.parts) or rel.parts[:1] == (".",):
        raise FormatError(f"{what}: path {text!r} leaves the results folder")
    full = root / Path(*rel.parts)
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise FormatError(f"{what}: {text!r} resolves outside the results folder (symbolic link?)") from None
    return full, rel


def _root_file(root: Path, name: str) -> Path | None:
    """A fixed file of the results folder (``results.csv``, ``run.json``...), None when absent; a symbolic link
    that leads out of the folder is rejected."""
    path = root / name
    if not path.exists() and not path.is_symlink():
        return None
    _inside(root, name, name)
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


def _read_index(root: Path) -> tuple[Any, list[Path], str]:
    """The store's rows without the grid maps, deduplicated like :func:`traitloc.io.store.read_results` (last
    written wins), in store order, with their location (``_part``, ``_row``); the part files; the label column."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = part_files(root)
    if not files:
        raise _no_store(root)
    tables, keys = [], []
    for i, path in enumerate(files):
        try:
            handle = pq.ParquetFile(path)
            schema = handle.schema_arrow
            table = handle.read(columns=[n for n in schema.names if n != "grid"])
        except Exception as err:  # noqa: BLE001 - a foreign or damaged file
            raise FormatError(
                f"{path}: not a readable part of a traitloc store ({type(err).__name__}: {err})"
            ) from None
        if not keys:
            keys = [k for k in (schema.metadata or {}).get(b"traitloc.keys", b"").decode().split(",") if k]
        n = table.num_rows
        table = table.append_column("_part", pa.array(np.full(n, i, dtype=np.int64)))
        tables.append(table.append_column("_row", pa.array(np.arange(n, dtype=np.int64))))
    try:
        merged = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise FormatError(f"{root / 'results'}: parts with incompatible columns ({err})") from None
    df = merged.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    for column in ("result_id", "image_key", "status"):
        if column not in df.columns:
            raise FormatError(f"{root / 'results'} is not a traitloc store: no {column!r} column")
    kind = "concept" if "concept" in df.columns else "target" if "target" in df.columns else ""
    if not kind:
        raise FormatError(f"{root / 'results'} has neither a concept nor a target column")
    keys = [k for k in keys if k in df.columns] or ["result_id"]
    df = df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)
    return df, files, kind


def _map_store(part: Path) -> bool:
    """Whether a store's part has the columns of concept or target maps (``localize``/``explain``)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(part).names
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file
        raise FormatError(f"{part}: not a readable part of a traitloc store ({type(err).__name__}: {err})") from None
    return "grid" in names and ("concept" in names or "target" in names)


def _plain(value: Any) -> Any:
    """A cell of the index as a plain Python value (``None`` for missing)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _check_id(rid: str, what: str) -> str:
    """A result id or image key used as a path inside the export: relative, no ``..``, no backslash."""
    try:
        _safe_rel(rid)
    except FormatError:
        raise FormatError(
            f"{what} {rid!r} is not a safe relative path (the store was not written by traitloc?)"
        ) from None
    return rid


def _results_of(df: Any, kind: str) -> tuple[list[Result], list[dict[str, Any]]]:
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
        _check_id(rid, "result id")
        _check_id(key, "image key")
        if not rid.startswith(key + "/"):
            raise FormatError(f"result id {rid!r} does not start with its image key {key!r}")
        if status != "ok" or row.get("grid_h") is None or row.get("grid_w") is None:
            reason = status if status != "ok" else "no map"
            skipped.append({"result_id": rid, "image_key": key, "label": label, "reason": reason or "no status"})
            continue
        results.append(Result(rid, key, label, kind, row, int(part), int(index)))
    return results, skipped


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
    df, _, kind = _read_index(root)
    return _results_of(df, kind)


def _normalize_status(value: object) -> str:
    text = str(value or "").strip().lower()
    return _STATUS_ALIASES.get(text, text)


def _decision_of(value: object) -> Decision:
    if isinstance(value, Decision):
        return value
    if isinstance(value, str):
        return Decision(_normalize_status(value))
    if isinstance(value, Mapping):
        get = value.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(value, key, default)

    return Decision(_normalize_status(get("status")), str(get("note") or ""), str(get("updated_utc") or ""))


def _normalize_decisions(raw: object) -> dict[str, Decision]:
    if isinstance(raw, Mapping):
        return {str(k): _decision_of(v) for k, v in raw.items()}
    out: dict[str, Decision] = {}
    for item in raw if isinstance(raw, Iterable) else ():
        rid = item.get("result_id") if isinstance(item, Mapping) else getattr(item, "result_id", None)
        if rid is None:
            raise FormatError("review decisions must carry a result_id")
        out[str(rid)] = _decision_of(item)
    return out


def read_decisions(results_dir: PathLike) -> dict[str, Decision]:
    """Review decisions of the app, by result id (empty when ``review.sqlite`` does not exist).

    Uses ``traitloc.io.decisions.ReviewStore(results_dir, readonly=True).decisions()`` when that module exists, else reads
    the table ``decisions(result_id, status, note, updated_utc)`` of ``RESULTS_DIR/review.sqlite`` read-only.
    Statuses are normalized to lower case (``accept`` -> ``accepted``, ``reject`` -> ``rejected``, ``needs work``
    -> ``needs-work``).

    Parameters
    ----------
    results_dir : path

    Returns
    -------
    dict
        ``{result_id: Decision}``.
    """
    root = _results_dir(results_dir)
    db = _root_file(root, "review.sqlite")
    if db is None:
        return {}
    try:
        from traitloc.io.decisions import ReviewStore  # the review app's store (issue #5); absent in older checkouts
    except ImportError:
        ReviewStore = None  # noqa: N806
    if ReviewStore is not None:
        try:
            with ReviewStore(root, readonly=True) as store:
                return _normalize_decisions(store.decisions())
        except (ValueError, sqlite3.Error) as err:  # PathSafetyError is a ValueError
            raise FormatError(f"cannot read review decisions from {db}: {err}") from None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as err:
        raise FormatError(f"cannot open {db}: {err}") from None
    try:
        rows = con.execute("SELECT result_id, status, note, updated_utc FROM decisions").fetchall()
    except sqlite3.Error as err:
        raise FormatError(f"cannot read review decisions from {db}: {err}") from None
    finally:
        con.close()
    return {str(r[0]): Decision(_normalize_status(r[1]), str(r[2] or ""), str(r[3] or "")) for r in rows}


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
        if status not in REVIEW_STATUSES:
            raise FormatError(f"selection must be 'all', one of {', '.join(REVIEW_STATUSES)} or result ids, "
                              f"got {selection!r}")  # fmt: skip
        chosen = [r for r in chosen if r.result_id in decisions and decisions[r.result_id].status == status]
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
        self.zip.close()


# ------------------------------------------------------------------------------------------------------------------
# the export
# ------------------------------------------------------------------------------------------------------------------
def _parse_formats(formats: str | Iterable[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name == "all":
            names.extend(FORMATS)
            continue
        if name not in FORMATS:
            raise FormatError(f"unknown format {name!r} (choose from {', '.join(FORMATS)} or all)")
        names.append(name)
    if not names:
        raise FormatError(f"give at least one format ({', '.join(FORMATS)})")
    return [f for f in FORMATS if f in names]


def _parse_figure_formats(values: str | Iterable[str]) -> list[str]:
    items = values.split(",") if isinstance(values, str) else list(values)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    bad = [n for n in names if n not in FIGURE_FORMATS]
    if bad or not names:
        raise FormatError(f"figure formats must be among {', '.join(FIGURE_FORMATS)}, got {','.join(names) or '-'}")
    return [f for f in FIGURE_FORMATS if f in names]


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


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return value if math.isfinite(value) else None


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
        if value in (None, ""):
            continue
        try:
            parsed = _parse_threshold(value)
        except FormatError:
            continue
        if parsed is not None:
            return parsed
    return 0.5


def _image_candidates(text: str, roots: list[Path]) -> list[tuple[Path, Path | None]]:
    """Where to look for a photo: its recorded absolute path (anywhere, read-only), then inside each root by its
    relative path and by its file name (each such candidate must resolve inside its root)."""
    if not text or "\x00" in text:
        return []
    path = Path(text)
    out: list[tuple[Path, Path | None]] = [(path, None)] if path.is_absolute() else []
    for root in roots:
        if not path.is_absolute():
            out.append((root / path, root))
        if path.name:
            out.append((root / path.name, root))
    return out


def _find_image(text: str, roots: list[Path]) -> tuple[Path | None, str | None]:
    """The photo of a row: the path to read, or (None, reason)."""
    if not text:
        return None, "no image path in the store"
    for candidate, root in _image_candidates(text, roots):
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
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.image_key, []).append(r)
    return [r for group in groups.values() for r in group]


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
    fmts = _parse_formats(formats)
    fig_fmts = _parse_figure_formats(figure_formats) if "figure" in fmts else []
    dpi = _check_dpi(dpi)
    cmap = _check_cmap(cmap)
    threshold = _parse_threshold(threshold)
    if not isinstance(simplify, (int, float)) or isinstance(simplify, bool) or not 0 <= simplify < 1e6:
        raise FormatError(f"simplify must be a number >= 0, got {simplify!r}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool or a callable(done, total), got {type(progress).__name__}")
    engine = _parquet_engine() if "parquet" in fmts else None
    roots = [Path(p).resolve() for p in (image_roots or [])]
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a str or os.PathLike, got {type(out).__name__}")
    out_path = Path(out)
    zipped = out_path.suffix.lower() == ".zip" if as_zip is None else bool(as_zip)
    _prepare_destination(out_path, zipped, root, overwrite)

    parts = part_files(root)
    # a store of concept or target maps (localize, explain); audit/evaluate stores only have tables to export
    has_store = bool(parts) and _map_store(parts[0])
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
    if has_store:
        index, files, kind = _read_index(root)
        results, skipped = _results_of(index, kind)
    else:
        index, files, kind, results, skipped = None, [], "concept", [], []
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
    run_info = _read_json(run_file) if run_file is not None else {}
    options = {"dpi": dpi, "figure_formats": fig_fmts, "cmap": cmap, "threshold": threshold,
               "coco_compressed": bool(coco_compressed), "simplify": float(simplify),
               "image_roots": [str(r) for r in roots] or None}  # fmt: skip
    manifest: dict[str, Any] = {
        "traitloc_export": MANIFEST_VERSION, "created_utc": utc_now(), "argv": list(argv or []),
        "results_dir": str(root.resolve()), "formats": fmts, "selection": selection_info, "options": options,
        "conventions": {
            "result_id": "<image-key>/<slug>: the store's result_id (the review app's id)",
            "rle": "COCO: column-major, counts start with the run of zeros, size [height, width]",
            "polygons": "pixel coordinates: x = column, y = row (down), origin at the top-left corner of the image; "
            "pixel (i, j) covers [j, j+1] x [i, i+1]; exterior rings positive signed area, holes negative",
            "maps": "float32, map / its maximum, values in [0, 1], rendered from the store's grid map",
            "masks": "map > threshold (the threshold is in each result's settings)",
        },
        "run": run_info,
    }  # fmt: skip
    job = _Export(root, index, files, chosen, skipped, decisions, fmts, fig_fmts, options, threshold, roots,
                  run_info, extra_tables, engine, manifest, progress)  # fmt: skip
    if zipped:
        with atomic_path(out_path) as tmp:
            with open(tmp, "xb") as handle:
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
    """One export: renders the chosen results one at a time into a sink, then the shared files and the manifest."""

    def __init__(
        self, root: Path, index: Any, files: list[Path], chosen: list[Result], skipped: list[dict[str, Any]],
        decisions: Mapping[str, Decision], fmts: list[str], fig_fmts: list[str], options: Mapping[str, Any],
        threshold: float | str | None, roots: list[Path], run_info: Mapping[str, Any], extra_tables: list[str],
        engine: str | None, manifest: dict[str, Any], progress: bool | Callable[[int, int], None],
    ) -> None:  # fmt: skip
        self.root, self.index, self.chosen, self.skipped = root, index, chosen, skipped
        self.decisions, self.fmts, self.fig_fmts, self.options = decisions, fmts, fig_fmts, options
        self.threshold, self.run_info, self.extra_tables, self.engine = threshold, run_info, extra_tables, engine
        self.manifest, self.progress = manifest, progress
        self.grids = _Grids(files)
        self.photos = _Photos([*roots, root.resolve()])
        self.coco_images: dict[str, int] = {}
        self.coco_cats: dict[str, int] = {}
        self.categories: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.n_annotations = 0
        self.features: list[dict[str, Any]] = []
        self.feature_key: tuple[str, int, int, str] | None = None

    def write_all(self, sink: Any, scratch: Path) -> None:
        import tempfile

        from tqdm.auto import tqdm

        entries: list[dict[str, Any]] = []
        left_out = [dict(s) for s in self.skipped]
        exported: list[str] = []
        total = len(self.chosen)
        callback = self.progress if callable(self.progress) else None
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
                    exported.append(result.result_id)
                bar.update(1)
                if callback is not None:
                    callback(done, total)
            if total and not exported:
                raise FormatError(f"nothing exported: every selected result failed ({left_out[-1]['reason']})")
            self._flush_geojson(sink)
            if spool is not None and exported:
                self._write_coco(sink, spool)
        finally:
            bar.close()
            if spool is not None:
                spool.close()
        tables = self._write_tables(sink, exported)
        manifest = self.manifest
        manifest["counts"] = {"selected": total, "exported": len(exported), "skipped": len(left_out)}
        manifest["results"] = entries
        manifest["tables"] = tables
        manifest["skipped"] = left_out
        manifest["environment"] = environment_info()
        manifest["files"] = sorted(sink.names)
        sink.write("manifest.json", (_json(manifest, indent=2) + "\n").encode("utf-8"))

    # ---- one result --------------------------------------------------------------------------------------------
    def _one(self, sink: Any, result: Result, spool: Any) -> dict[str, Any]:
        from traitloc.io.store import render_unit_map

        fmts = self.fmts
        row = self.grids.row(result)
        unit = render_unit_map(row)
        threshold = _row_threshold(result, self.threshold, self.run_info)
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
            put(_safe_rel("maps", rid + ".tif"), map_tiff_bytes(unit, settings, label=result.label))
        photo = None
        if "overlay" in fmts or "figure" in fmts:
            photo, why = self.photos.get(result)
            if why and "overlay" in fmts:
                warnings.append(f"no overlay: {why}")
            if why and "figure" in fmts:
                warnings.append(f"figure drawn without the image: {why}")
        if "overlay" in fmts and photo is not None:
            put(_safe_rel("overlays", rid + ".png"), _overlay_png(row, photo, unit))
        image = str(result.row.get("image") or result.image_key)
        if "coco" in fmts:
            if result.image_key not in self.coco_images:
                self.coco_images[result.image_key] = len(self.coco_images) + 1
                self.images.append({"id": self.coco_images[result.image_key], "file_name": Path(image).name,
                                    "width": width, "height": height, "traitloc_image": image,
                                    "traitloc_image_key": result.image_key})  # fmt: skip
            if result.label not in self.coco_cats:
                self.coco_cats[result.label] = len(self.coco_cats) + 1
                self.categories.append({"id": self.coco_cats[result.label], "name": result.label,
                                        "supercategory": result.kind})  # fmt: skip
            bbox, area = _bbox_area(mask)
            self.n_annotations += 1
            annotation = {"id": self.n_annotations, "image_id": self.coco_images[result.image_key],
                          "category_id": self.coco_cats[result.label], "iscrowd": 1, "area": area, "bbox": bbox,
                          "segmentation": rle_encode(mask, compressed=bool(self.options["coco_compressed"])),
                          "traitloc": settings}  # fmt: skip
            score = result.row.get("score")
            if isinstance(score, float) and math.isfinite(score):
                annotation["score"] = score
            spool.write((_json(annotation) + "\n").encode("utf-8"))
        if "geojson" in fmts:
            key = (result.image_key, height, width, image)
            if self.feature_key is not None and self.feature_key[0] != result.image_key:
                self._flush_geojson(sink)
            self.feature_key = key
            self.features.append({
                "type": "Feature", "id": rid,
                "geometry": {"type": "MultiPolygon", "coordinates": mask_to_polygons(mask, self.options["simplify"])},
                "properties": {**settings, "label": result.label, "area_px": int(mask.sum())},
            })  # fmt: skip
        if "figure" in fmts:
            fig = figure_panel(photo, unit, mask, settings, cmap=self.options["cmap"])
            for fmt in self.fig_fmts:
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
        doc = {
            "type": "FeatureCollection",
            "traitloc": {"image": image, "image_key": key, "width": width, "height": height,
                         "coordinates": self.manifest["conventions"]["polygons"]},
            "features": self.features,
        }  # fmt: skip
        sink.write(_safe_rel("polygons", key + ".geojson"), (_json(doc) + "\n").encode("utf-8"))
        self.features, self.feature_key = [], None

    def _write_coco(self, sink: Any, spool: Any) -> None:
        info = {"description": "traitloc export", "date_created": self.manifest["created_utc"],
                "traitloc": {k: self.run_info.get(k) for k in ("command", "model", "pretrained", "method", "gamma",
                                                               "base", "target_layer", "threshold")
                             if k in self.run_info}}  # fmt: skip
        head = {"info": info, "licenses": [], "images": self.images, "categories": self.categories}
        spool.seek(0)
        with sink.open("coco.json") as handle:
            # the same document as one json.dumps, with "annotations" streamed from the spool
            text = _json(head)
            handle.write((text[:-1] + ', "annotations": [').encode("utf-8"))
            for n, line in enumerate(spool):
                handle.write((b", " if n else b"") + line.rstrip(b"\n"))
            handle.write(b"]}\n")

    def _write_tables(self, sink: Any, exported: list[str]) -> list[str]:
        fmts = self.fmts
        if "csv" not in fmts and "parquet" not in fmts:
            return []
        frames: list[tuple[str, Any]] = []
        if exported and self.index is not None:
            frames.append(("results", self._results_frame(exported)))
        for name in self.extra_tables:
            header, rows = _read_csv_rows(self.root / name)
            frames.append((Path(name).stem, _table_frame(header, rows)))
        written: list[str] = []
        for stem, frame in frames:
            if "csv" in fmts:
                with sink.open(_safe_rel("tables", stem + ".csv")) as handle:
                    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
                    frame.to_csv(text, index=False, lineterminator="\n")
                    text.flush()
                    text.detach()  # the sink closes the handle
                written.append(f"tables/{stem}.csv")
            if "parquet" in fmts:
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
        status, note = [], []
        for rid in exported:
            d = self.decisions.get(rid)
            status.append(d.status if d else "")
            note.append(d.note if d else "")
        df["review_status"], df["review_note"] = status, note
        return df


def _overlay_png(row: Mapping[str, Any], photo: Any, unit: np.ndarray) -> bytes:
    """The overlay PNG as ``localize --save overlays`` writes it: the map rendered at the working photo's size,
    inferno at alpha 0.5 over it, PNG compression level 1."""
    from PIL import Image

    from traitloc.io.store import render_unit_map

    work = np.asarray(photo.convert("RGB")) if hasattr(photo, "convert") else np.asarray(photo)
    size = work.shape[:2]
    heat = unit if size == unit.shape else render_unit_map(row, size)
    buffer = io.BytesIO()
    Image.fromarray(overlay_array(work, heat)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _table_frame(header: list[str], rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=header)
    for column in frame.columns:
        if column in _TEXT_COLUMNS:
            frame[column] = frame[column].fillna("").astype(str)
            continue
        values = frame[column].fillna("").astype(str)
        nonempty = values[values != ""]
        if len(nonempty) == 0:
            continue
        converted = pd.to_numeric(nonempty, errors="coerce")
        if converted.notna().all():
            frame[column] = pd.to_numeric(values.replace("", np.nan), errors="coerce")
            if column in _FLOAT_COLUMNS:
                frame[column] = frame[column].astype("float64")
        else:
            frame[column] = values
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
    p.add_argument("--status", choices=["all", *REVIEW_STATUSES], default="all",
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
    """Run ``traitloc export`` (bad input raises :class:`traitloc.cli.commands.CliError`)."""
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
