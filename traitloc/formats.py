"""Exports of a results folder for other tools and for papers: ``traitloc export`` (DESIGN.md §6, issue #5).

A results folder of ``traitloc localize`` or ``traitloc explain`` (``maps/``, ``masks/``, ``results.csv``,
``run.json``; also ``audit.csv`` and friends of ``traitloc audit``) is exported to a folder or a zip file:

================  ==================================================================================================
format            files (paths inside the export; ``<id>`` is the result id ``<image-key>/<slug>``)
================  ==================================================================================================
``png``           ``masks/<id>.png``: binary masks, 8-bit grayscale 0/255, settings as a PNG ``iTXt`` chunk
``tiff``          ``maps/<id>.tif``: float32 maps in [0, 1], uncompressed ImageJ TIFF (Fiji, napari, tifffile),
                  display range 0..1, the concept as slice label and the settings as JSON in ImageJ's ``Info``
``coco``          ``coco.json``: COCO instance annotations with RLE masks (``iscrowd = 1``), one per result
``geojson``       ``polygons/<image-key>.geojson``: one ``MultiPolygon`` feature per result, in pixel coordinates
``csv``           ``tables/results.csv`` (the selected rows plus ``result_id, review_status, review_note``) and
                  the audit/evaluate tables present (``audit.csv``, ``controls.csv``, ``audit_summary.csv``,
                  ``metrics.csv``)
``parquet``       the same tables as Parquet (needs pyarrow or fastparquet)
``figure``        ``figures/<id>.svg|pdf|png``: image | overlay with colorbar | mask contour, for papers
================  ==================================================================================================

Every export has a ``manifest.json`` (written last): versions, argv, the options, the selection, the results
folder's ``run.json`` and, per result, its settings and files.

Conventions
-----------
Result ids
    ``<image-key>/<slug>``: the map path in ``results.csv`` without ``maps/`` and ``.tif``. The review app
    stores its decisions under these ids in ``RESULTS_DIR/review.sqlite``, table
    ``decisions(result_id TEXT PRIMARY KEY, status TEXT, note TEXT, updated_utc TEXT)``.
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

Security
--------
Paths of maps and masks in ``results.csv`` must stay inside the results folder: absolute paths, ``..`` and
symbolic links that lead out are rejected (the whole export stops). Nothing is written outside the chosen output:
a folder export is assembled in a hidden temporary folder beside it and renamed into place, a zip is written to a
temporary file and renamed, and no path inside an export leaves it. Source images (figures only) are read from
the ``image`` column, restricted to ``image_roots`` when given (the review app passes its allowed folders).
Nothing is unpickled.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from .export import (
    atomic_path,
    atomic_write,
    environment_info,
    mask_from_map,
    read_map_tiff,
    utc_now,
)

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
FORMATS: tuple[str, ...] = ("png", "tiff", "coco", "geojson", "csv", "parquet", "figure")
#: formats that need the maps of a ``localize``/``explain`` folder (``results.csv``)
MAP_FORMATS = frozenset({"png", "tiff", "coco", "geojson", "figure"})
FIGURE_FORMATS: tuple[str, ...] = ("svg", "pdf", "png")
#: matplotlib's perceptually uniform sequential colormaps (and their reverses) allowed for figures
UNIFORM_CMAPS: tuple[str, ...] = tuple(
    name + rev for name in ("viridis", "cividis", "magma", "inferno", "plasma") for rev in ("", "_r")
)
#: tables of a results folder exported by ``csv``/``parquet`` besides ``results.csv``
EXTRA_TABLES: tuple[str, ...] = ("audit.csv", "controls.csv", "audit_summary.csv", "metrics.csv")
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
    """One exportable result (an ``ok`` row of ``results.csv``).

    Attributes
    ----------
    result_id : ``<image-key>/<slug>`` (the map path without ``maps/`` and ``.tif``).
    image_key : the map's folder (``<image-key>``).
    label : the concept (``localize``) or target class (``explain``).
    kind : ``"concept"`` or ``"target"``.
    row : the row of ``results.csv`` (strings).
    map_path, mask_path : checked paths inside the results folder (``mask_path`` None when the row has none).
    line : the row's line number in ``results.csv`` (header = 1).
    """

    result_id: str
    image_key: str
    label: str
    kind: str
    row: Mapping[str, str]
    map_path: Path
    mask_path: Path | None
    line: int


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


def list_results(results_dir: PathLike) -> tuple[list[Result], list[dict[str, Any]]]:
    """The exportable results of a ``localize``/``explain`` folder and the rows that cannot be exported.

    Rows whose ``status`` is not ``ok`` or that have no map are skipped (listed with a reason); when a map path
    appears on several rows (a rerun into the same folder), the last row wins.

    Parameters
    ----------
    results_dir : path
        A folder with ``results.csv``.

    Returns
    -------
    results : list of Result
        In file order.
    skipped : list of dict
        ``{"line", "image_key", "label", "reason"}`` per row left out.

    Raises
    ------
    FormatError
        If ``results.csv`` is missing, has neither a ``concept`` nor a ``target`` column, or a map/mask path leaves
        the results folder (absolute, ``..``, or a symbolic link out).
    """
    root = _results_dir(results_dir)
    table = _root_file(root, "results.csv")
    if table is None:
        raise FormatError(f"{root} has no results.csv (export reads the folder written by traitloc localize/explain)")
    header, rows = _read_csv_rows(table)
    kind = "concept" if "concept" in header else "target" if "target" in header else None
    if kind is None or "map" not in header:
        raise FormatError(f"{table} has no concept/target and map columns")
    by_id: dict[str, Result] = {}
    skipped: list[dict[str, Any]] = []
    for line, row in enumerate(rows, start=2):
        label = row.get(kind) or ""
        status = (row.get("status") or "").strip()
        map_text = (row.get("map") or "").strip()
        if status != "ok" or not map_text:
            reason = status if status != "ok" else "no map"
            skipped.append({"line": line, "image_key": row.get("image_key", ""), "label": label, "reason": reason})
            continue
        map_path, rel = _inside(root, map_text, f"results.csv line {line}, map")
        if rel.parts[0] != "maps" or len(rel.parts) < 3 or rel.suffix.lower() not in (".tif", ".tiff"):
            raise FormatError(f"results.csv line {line}: map path {map_text!r} is not maps/<image-key>/<name>.tif")
        mask_text = (row.get("mask") or "").strip()
        mask_path = _inside(root, mask_text, f"results.csv line {line}, mask")[0] if mask_text else None
        result_id = str(rel.relative_to("maps").with_suffix(""))
        by_id.pop(result_id, None)  # keep file order of the winning (last) row
        by_id[result_id] = Result(
            result_id=result_id, image_key="/".join(rel.parts[1:-1]), label=label, kind=kind, row=row,
            map_path=map_path, mask_path=mask_path, line=line,
        )  # fmt: skip
    return list(by_id.values()), skipped


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

    Uses ``traitloc.store.ReviewStore(results_dir, readonly=True).decisions()`` when that module exists, else reads
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
        from .store import ReviewStore  # the review app's store (issue #5); absent in older checkouts
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


def _select(
    results: list[Result], decisions: Mapping[str, Decision], selection: object
) -> tuple[list[Result], dict[str, Any]]:
    if selection is None or (isinstance(selection, str) and selection.strip().lower() == "all"):
        return results, {"status": "all"}
    if isinstance(selection, str):
        status = _normalize_status(selection)
        if status not in REVIEW_STATUSES:
            raise FormatError(f"selection must be 'all', one of {', '.join(REVIEW_STATUSES)} or result ids, "
                              f"got {selection!r}")  # fmt: skip
        chosen = [r for r in results if r.result_id in decisions and decisions[r.result_id].status == status]
        return chosen, {"status": status}
    if isinstance(selection, Iterable):
        wanted = [str(s) for s in selection]
        known = {r.result_id for r in results}
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise FormatError(f"unknown result id {unknown[0]!r} ({len(unknown)} not among the ok results)")
        keep = set(wanted)
        return [r for r in results if r.result_id in keep], {"result_ids": sorted(keep)}
    raise TypeError(f"selection must be None, a status or result ids, got {type(selection).__name__}")


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

    def write(self, rel: str, data: bytes) -> None:
        folder = self.root
        parts = rel.split("/")
        for part in parts[:-1]:
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise FormatError(f"refusing to write through {folder}: not a plain folder")
            folder.mkdir(exist_ok=True)
        atomic_write(folder / parts[-1], data)
        self.names.append(rel)


class _ZipSink:
    """Writes entries into an open zip file (PNG/PDF stored, the rest deflated)."""

    def __init__(self, handle: Any) -> None:
        self.zip = zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self.names: list[str] = []
        self._seen: set[str] = set()
        now = utc_now()
        self._date = (int(now[0:4]), int(now[5:7]), int(now[8:10]), int(now[11:13]), int(now[14:16]),
                      int(now[17:19]))  # fmt: skip

    def write(self, rel: str, data: bytes) -> None:
        if rel in self._seen:
            raise FormatError(f"duplicate zip entry {rel!r}")
        self._seen.add(rel)
        info = zipfile.ZipInfo(rel, date_time=self._date)
        info.compress_type = zipfile.ZIP_STORED if rel.endswith((".png", ".pdf")) else zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, data)
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


def _settings_for(result: Result, tiff_meta: Mapping[str, Any], run_info: Mapping[str, Any],
                  threshold: float | str | None, decision: Decision | None) -> dict[str, Any]:  # fmt: skip
    row = result.row
    settings: dict[str, Any] = {"result_id": result.result_id, "image_key": result.image_key}
    for key in ("image", "concept", "trait", "base", "target", "predicted", "references", "gamma", "method",
                "reverse", "model", "classifier", "raw_max", "score"):  # fmt: skip
        value = row.get(key)
        if value not in (None, ""):
            settings[key] = _number(value) if key in ("gamma", "raw_max", "score") else value
    for key, value in tiff_meta.items():
        if key not in ("values", "interpolation") and value not in (None, ""):
            settings[key] = value
    for key in ("model", "pretrained", "pretrained_sha256", "target_layer", "resize", "command"):
        if key not in settings and run_info.get(key) not in (None, ""):
            settings[key] = run_info[key]
    if threshold is not None:
        settings["threshold"] = threshold
        settings["mask_source"] = "map > threshold (re-derived at export)"
    else:
        run_thr = run_info.get("threshold", (run_info.get("settings") or {}).get("threshold"))
        if run_thr not in (None, ""):
            settings["threshold"] = run_thr
        settings["mask_source"] = "results folder"
    if decision is not None:
        settings["review_status"] = decision.status
        if decision.note:
            settings["review_note"] = decision.note
    return settings


def _load_mask(result: Result, unit: np.ndarray, threshold: float | str | None,
               run_info: Mapping[str, Any]) -> np.ndarray:  # fmt: skip
    from PIL import Image

    if threshold is None and result.mask_path is not None and result.mask_path.is_file():
        with Image.open(result.mask_path) as im:
            array = np.asarray(im.convert("L"))
        mask = array > 127
        if mask.shape != unit.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the map's {unit.shape}")
        return mask
    thr = threshold if threshold is not None else run_info.get("threshold", 0.5)
    return mask_from_map(np.clip(unit, 0.0, 1.0), 0.5 if thr in (None, "") else thr)


def _load_image(text: str, roots: list[Path] | None) -> tuple[Any, str | None]:
    """The source image for a figure, or (None, reason) when it is not available or not allowed."""
    from .imageio import ImageLoadError, load_image

    if not text:
        return None, "no image path in results.csv"
    candidate = Path(text)
    if roots is None:
        paths = [candidate]
    elif candidate.is_absolute():
        paths = [candidate]
    else:
        paths = [root / candidate for root in roots]
    for path in paths:
        resolved = path.resolve()
        if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
            return None, f"image {text!r} is outside the allowed image folders"
        if resolved.is_file():
            try:
                return load_image(resolved).image, None
            except ImageLoadError as err:
                return None, str(err)
    return None, f"image {text!r} not found"


def _prepare_destination(out: Path, as_zip: bool, root: Path, overwrite: bool) -> None:
    resolved_root = root.resolve()
    target = out.resolve()
    if target == resolved_root:
        raise FormatError("the export must not go into the results folder itself (choose a new folder or a zip)")
    for sub in ("maps", "masks", "overlays", "signed"):
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
    progress: bool = False,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export the results of a ``localize``/``explain``/``audit`` folder to a folder or a zip file.

    Used by ``traitloc export`` and by the review app ("export accepted results as a zip"). Results whose files
    cannot be read are left out and listed under ``skipped`` in the manifest; a path in ``results.csv`` that leaves
    the results folder stops the export.

    Parameters
    ----------
    results_dir : path
        The results folder.
    formats : str or iterable of str
        Among :data:`FORMATS` (a comma-separated string is split; ``"all"`` is every format).
    out : path
        Output folder (must not exist, or be empty unless ``overwrite``) or zip file (written to a temporary
        file and renamed).
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
        Re-derive masks (png, coco, geojson, figure) as ``map > threshold``; None uses the results' masks.
    image_roots : iterable of paths, optional
        Folders the source images of figures may be read from (relative ``image`` paths are resolved against
        them); None reads the ``image`` paths of ``results.csv`` as they are (the command line's default).
    coco_compressed : bool, default False
        COCO RLE ``counts`` as pycocotools' compressed string instead of a list of ints.
    simplify : float, default 0
        Douglas-Peucker tolerance of the GeoJSON polygons, in pixels (0: exact pixel boundaries).
    overwrite : bool, default False
        Allow a non-empty output folder (files are replaced one by one) or replacing a non-zip file.
    progress : bool, default False
        Show a progress bar on stderr.
    argv : sequence of str, optional
        Recorded in the manifest.

    Returns
    -------
    dict
        The manifest (also written as ``manifest.json``): ``formats``, ``selection``, ``options``, ``run``
        (the results folder's ``run.json``), ``counts``, ``results`` (per result: settings and files), ``tables``,
        ``skipped``, ``files`` and ``environment``.

    Raises
    ------
    FormatError
        Bad options, an unsafe path in the results, or nothing to export.
    """
    root = _results_dir(results_dir)
    fmts = _parse_formats(formats)
    fig_fmts = _parse_figure_formats(figure_formats) if "figure" in fmts else []
    dpi = _check_dpi(dpi)
    cmap = _check_cmap(cmap)
    threshold = _parse_threshold(threshold)
    if not isinstance(simplify, (int, float)) or isinstance(simplify, bool) or not 0 <= simplify < 1e6:
        raise FormatError(f"simplify must be a number >= 0, got {simplify!r}")
    engine = _parquet_engine() if "parquet" in fmts else None
    roots = None if image_roots is None else [Path(p).resolve() for p in image_roots]
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a str or os.PathLike, got {type(out).__name__}")
    out_path = Path(out)
    zipped = out_path.suffix.lower() == ".zip" if as_zip is None else bool(as_zip)
    _prepare_destination(out_path, zipped, root, overwrite)

    has_results = _root_file(root, "results.csv") is not None
    extra_tables = [name for name in EXTRA_TABLES if _root_file(root, name) is not None]
    needs_maps = bool(MAP_FORMATS.intersection(fmts))
    if needs_maps and not has_results:
        raise FormatError(f"{root} has no results.csv: formats {', '.join(sorted(MAP_FORMATS & set(fmts)))} "
                          "need the maps of traitloc localize/explain")  # fmt: skip
    if not has_results and not extra_tables:
        raise FormatError(f"{root} has no results.csv nor audit/evaluate tables to export")
    results, skipped = list_results(root) if has_results else ([], [])
    decisions = read_decisions(root)
    chosen, selection_info = _select(results, decisions, selection)
    if (
        has_results
        and not chosen
        and isinstance(selection, str)
        and selection.strip().lower() != "all"
        and not decisions
    ):
        raise FormatError(
            f"no review decisions in {root / 'review.sqlite'} (review the results with traitloc app first)"
        )
    if has_results and not chosen:
        what = selection_info.get("status", "selected")
        raise FormatError(f"nothing to export: no ok results with review status {what!r}"
                          if what not in ("all", "selected") else "nothing to export: no ok results")  # fmt: skip
    run_file = _root_file(root, "run.json")
    run_info = _read_json(run_file) if run_file is not None else {}
    options = {"dpi": dpi, "figure_formats": fig_fmts, "cmap": cmap, "threshold": threshold,
               "coco_compressed": bool(coco_compressed), "simplify": float(simplify),
               "image_roots": None if roots is None else [str(r) for r in roots]}  # fmt: skip
    manifest: dict[str, Any] = {
        "traitloc_export": MANIFEST_VERSION, "created_utc": utc_now(), "argv": list(argv or []),
        "results_dir": str(root.resolve()), "formats": fmts, "selection": selection_info, "options": options,
        "conventions": {
            "result_id": "<image-key>/<slug>: the map path without maps/ and .tif",
            "rle": "COCO: column-major, counts start with the run of zeros, size [height, width]",
            "polygons": "pixel coordinates: x = column, y = row (down), origin at the top-left corner of the image; "
            "pixel (i, j) covers [j, j+1] x [i, i+1]; exterior rings positive signed area, holes negative",
            "maps": "float32, map / its maximum, values in [0, 1]",
        },
        "run": run_info,
    }  # fmt: skip

    if zipped:
        with atomic_path(out_path) as tmp:
            with open(tmp, "xb") as handle:
                sink = _ZipSink(handle)
                try:
                    _write_all(sink, root, chosen, skipped, decisions, fmts, fig_fmts, options, threshold, roots,
                               run_info, extra_tables, engine, manifest, progress)  # fmt: skip
                finally:
                    sink.close()
    elif out_path.exists():
        _write_all(_DirSink(out_path), root, chosen, skipped, decisions, fmts, fig_fmts, options, threshold, roots,
                   run_info, extra_tables, engine, manifest, progress)  # fmt: skip
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.tmp")
        staging.mkdir()
        try:
            _write_all(_DirSink(staging), root, chosen, skipped, decisions, fmts, fig_fmts, options, threshold,
                       roots, run_info, extra_tables, engine, manifest, progress)  # fmt: skip
            os.rename(staging, out_path)  # fails if someone created out meanwhile: nothing is overwritten
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest


def export_zip_bytes(
    results_dir: PathLike, formats: str | Iterable[str], selection: str | Iterable[str] | None = None, **opts: Any
) -> tuple[bytes, dict[str, Any]]:
    """Like :func:`export_results` into a zip, but in memory (for a download button).

    Parameters
    ----------
    results_dir, formats, selection
        As for :func:`export_results`.
    **opts
        The keyword options of :func:`export_results` (``dpi``, ``figure_formats``, ``cmap``, ``threshold``,
        ``image_roots``, ...; not ``out``/``as_zip``/``overwrite``).

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


def _write_all(
    sink: Any, root: Path, chosen: list[Result], skipped: list[dict[str, Any]], decisions: Mapping[str, Decision],
    fmts: list[str], fig_fmts: list[str], options: Mapping[str, Any], threshold: float | str | None,
    roots: list[Path] | None, run_info: Mapping[str, Any], extra_tables: list[str], engine: str | None,
    manifest: dict[str, Any], progress: bool,
) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    entries: list[dict[str, Any]] = []
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco_images: dict[str, int] = {}
    coco_cats: dict[str, int] = {}
    features: dict[str, list[dict[str, Any]]] = {}
    image_sizes: dict[str, tuple[int, int, str]] = {}
    left_out = [dict(s) for s in skipped]
    exported: list[Result] = []
    bar = tqdm(total=len(chosen), desc="export", unit="result", disable=not progress, file=sys.stderr)
    try:
        for result in chosen:
            try:
                entry = _export_one(sink, result, decisions.get(result.result_id), fmts, fig_fmts, options,
                                    threshold, roots, run_info, coco, coco_images, coco_cats, features,
                                    image_sizes)  # fmt: skip
            except FormatError:
                raise
            except (OSError, ValueError) as err:
                reason = f"{type(err).__name__}: {err}".splitlines()[0]
                left_out.append({"result_id": result.result_id, "line": result.line, "reason": reason})
                continue
            finally:
                bar.update(1)
            entries.append(entry)
            exported.append(result)
    finally:
        bar.close()
    if chosen and not exported:
        raise FormatError(f"nothing exported: every selected result failed ({left_out[-1]['reason']})")
    if "coco" in fmts and exported:
        coco_doc = {
            "info": {"description": "traitloc export", "date_created": manifest["created_utc"],
                     "traitloc": {k: run_info.get(k) for k in ("command", "model", "pretrained", "method", "gamma",
                                                               "base", "target_layer", "threshold") if k in run_info}},
            "licenses": [], **coco,
        }  # fmt: skip
        sink.write("coco.json", (_json(coco_doc) + "\n").encode("utf-8"))
    if "geojson" in fmts:
        for key, feats in features.items():
            height, width, image = image_sizes[key]
            doc = {
                "type": "FeatureCollection",
                "traitloc": {"image": image, "image_key": key, "width": width, "height": height,
                             "coordinates": manifest["conventions"]["polygons"]},
                "features": feats,
            }  # fmt: skip
            sink.write(_safe_rel("polygons", key + ".geojson"), (_json(doc) + "\n").encode("utf-8"))
    tables = _write_tables(sink, root, exported, decisions, fmts, extra_tables, engine)
    manifest["counts"] = {"selected": len(chosen), "exported": len(exported), "skipped": len(left_out)}
    manifest["results"] = entries
    manifest["tables"] = tables
    manifest["skipped"] = left_out
    manifest["environment"] = environment_info()
    manifest["files"] = sorted(sink.names)
    sink.write("manifest.json", (_json(manifest, indent=2) + "\n").encode("utf-8"))


def _export_one(
    sink: Any, result: Result, decision: Decision | None, fmts: list[str], fig_fmts: list[str],
    options: Mapping[str, Any], threshold: float | str | None, roots: list[Path] | None,
    run_info: Mapping[str, Any], coco: dict[str, Any], coco_images: dict[str, int], coco_cats: dict[str, int],
    features: dict[str, list[dict[str, Any]]], image_sizes: dict[str, tuple[int, int, str]],
) -> dict[str, Any]:  # fmt: skip
    unit, tiff_meta = read_map_tiff(result.map_path)
    settings = _settings_for(result, tiff_meta, run_info, threshold, decision)
    need_mask = bool({"png", "coco", "geojson", "figure"} & set(fmts))
    mask = _load_mask(result, unit, threshold, run_info) if need_mask else None
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
    polygons = mask_to_polygons(mask, options["simplify"]) if "geojson" in fmts else None
    if "coco" in fmts:
        image = result.row.get("image") or result.image_key
        if result.image_key not in coco_images:
            coco_images[result.image_key] = len(coco_images) + 1
            coco["images"].append({"id": coco_images[result.image_key], "file_name": Path(image).name,
                                   "width": width, "height": height, "traitloc_image": image,
                                   "traitloc_image_key": result.image_key})  # fmt: skip
        if result.label not in coco_cats:
            coco_cats[result.label] = len(coco_cats) + 1
            coco["categories"].append({"id": coco_cats[result.label], "name": result.label,
                                       "supercategory": result.kind})  # fmt: skip
        bbox, area = _bbox_area(mask)
        annotation = {"id": len(coco["annotations"]) + 1, "image_id": coco_images[result.image_key],
                      "category_id": coco_cats[result.label], "iscrowd": 1, "area": area, "bbox": bbox,
                      "segmentation": rle_encode(mask, compressed=bool(options["coco_compressed"])),
                      "traitloc": settings}  # fmt: skip
        score = _number(result.row.get("score", ""))
        if isinstance(score, float):
            annotation["score"] = score
        coco["annotations"].append(annotation)
    if polygons is not None:
        image_sizes.setdefault(result.image_key, (height, width, result.row.get("image", "")))
        features.setdefault(result.image_key, []).append({
            "type": "Feature", "id": rid,
            "geometry": {"type": "MultiPolygon", "coordinates": polygons},
            "properties": {**settings, "label": result.label, "area_px": int(mask.sum())},
        })  # fmt: skip
    if "figure" in fmts:
        image, why = _load_image(result.row.get("image", ""), roots)
        if why:
            warnings.append(f"figure drawn without the image: {why}")
        fig = figure_panel(image, unit, mask, settings, cmap=options["cmap"])
        for fmt in fig_fmts:
            put(_safe_rel("figures", f"{rid}.{fmt}"), figure_bytes(fig, fmt, settings, dpi=options["dpi"]))
    entry: dict[str, Any] = {"result_id": rid, "label": result.label, "settings": settings, "files": files}
    if warnings:
        entry["warnings"] = warnings
    if "coco" in fmts or "geojson" in fmts:
        entry["shared_files"] = [
            f
            for f, on in (("coco.json", "coco" in fmts), (f"polygons/{result.image_key}.geojson", "geojson" in fmts))
            if on
        ]
    return entry


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


def _write_tables(
    sink: Any, root: Path, exported: list[Result], decisions: Mapping[str, Decision], fmts: list[str],
    extra_tables: list[str], engine: str | None,
) -> list[str]:  # fmt: skip
    if "csv" not in fmts and "parquet" not in fmts:
        return []
    frames: list[tuple[str, list[str], list[dict[str, Any]]]] = []
    if exported:
        header, _ = _read_csv_rows(root / "results.csv")
        header = ["result_id", *header, "review_status", "review_note"]
        rows = []
        for r in exported:
            d = decisions.get(r.result_id)
            rows.append({**r.row, "result_id": r.result_id, "review_status": d.status if d else "",
                         "review_note": d.note if d else ""})  # fmt: skip
        frames.append(("results", header, rows))
    for name in extra_tables:
        header, rows = _read_csv_rows(root / name)
        frames.append((Path(name).stem, header, rows))
    written: list[str] = []
    for stem, header, rows in frames:
        frame = _table_frame(header, rows)
        if "csv" in fmts:
            text = frame.to_csv(index=False, lineterminator="\n")
            sink.write(_safe_rel("tables", stem + ".csv"), text.encode("utf-8"))
            written.append(f"tables/{stem}.csv")
        if "parquet" in fmts:
            buffer = io.BytesIO()
            frame.to_parquet(buffer, engine=engine, index=False)
            sink.write(_safe_rel("tables", stem + ".parquet"), buffer.getvalue())
            written.append(f"tables/{stem}.parquet")
    return written


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``traitloc export`` to the ``traitloc`` command's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a results folder: masks, maps, COCO, GeoJSON, tables, paper figures",
        description="Export the results of traitloc localize/explain (and audit tables) to a folder or a zip: "
        "binary PNG masks, float32 ImageJ TIFF maps, COCO RLE JSON, GeoJSON polygons (pixel coordinates, "
        "origin at the image's top-left corner), CSV/Parquet tables and figure panels (SVG/PDF with editable "
        "text, PNG at --dpi), each with the settings that made it; manifest.json lists everything.",
    )
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="folder written by traitloc localize/explain/audit")
    p.add_argument("--format", dest="formats", default="png,tiff,coco,geojson,csv,figure", metavar="LIST",
                   help=f"comma-separated formats among {','.join(FORMATS)}, or all "
                   "(default: png,tiff,coco,geojson,csv,figure)")  # fmt: skip
    p.add_argument("--status", choices=["all", *REVIEW_STATUSES], default="all",
                   help="which results: all ok ones, or those with this review decision in "
                   "RESULTS_DIR/review.sqlite (default: all)")  # fmt: skip
    p.add_argument("--dpi", type=int, default=300, help="resolution of PNG figures (default: 300)")
    p.add_argument("--figure-format", default="svg,pdf,png", metavar="LIST",
                   help="figure files among svg,pdf,png (default: svg,pdf,png)")  # fmt: skip
    p.add_argument("--cmap", default="viridis", choices=UNIFORM_CMAPS, metavar="NAME",
                   help=f"figure colormap, perceptually uniform: {', '.join(UNIFORM_CMAPS[::2])} "
                   "(_r reverses) (default: viridis)")  # fmt: skip
    p.add_argument(
        "--threshold",
        default=None,
        metavar="T",
        help="re-derive masks as map > T (a number in [0, 1) or otsu) (default: the results' masks)",
    )
    p.add_argument("--image-root", action="append", default=None, metavar="DIR",
                   help="read source images for figures only from these folders (repeat; default: the image "
                   "paths in results.csv)")  # fmt: skip
    p.add_argument(
        "--coco-compressed",
        action="store_true",
        help="COCO RLE counts as pycocotools' compressed strings (default: lists of ints)",
    )
    p.add_argument(
        "--simplify",
        type=float,
        default=0.0,
        metavar="PX",
        help="simplify GeoJSON polygons with this tolerance in pixels (default: 0 = exact)",
    )
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="DIR", help="output folder (new or empty)")
    dest.add_argument("--zip", metavar="FILE", help="output zip file (written atomically)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder, replacing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``traitloc export`` (bad input raises :class:`traitloc.cli.CliError`)."""
    from .cli import CliError

    out = args.zip if args.zip is not None else args.out
    try:
        manifest = export_results(
            args.results_dir, args.formats, out, args.status, as_zip=args.zip is not None, dpi=args.dpi,
            figure_formats=args.figure_format, cmap=args.cmap, threshold=args.threshold,
            image_roots=args.image_root, coco_compressed=args.coco_compressed, simplify=args.simplify,
            overwrite=args.force, progress=not args.quiet, argv=list(argv),
        )  # fmt: skip
    except FormatError as err:
        raise CliError(str(err)) from err
    if not args.quiet:
        counts = manifest["counts"]
        print(f"traitloc export: {counts['exported']} results exported, {counts['skipped']} left out "
              f"({', '.join(manifest['formats'])}) -> {out}", file=sys.stderr)  # fmt: skip
    return 0 if manifest["counts"]["exported"] or not manifest["counts"]["selected"] else 1
