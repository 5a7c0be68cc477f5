"""Export formats: COCO RLE, polygons, mask PNGs, COCO and GeoJSON documents, paper figures.

The building blocks of ``traitloc export`` (:mod:`traitloc.pipelines.export`) and the review app; map TIFFs are
:func:`traitloc.io.files.map_tiff_bytes` and every JSON text is :func:`traitloc.io.files.to_json`. The conventions
(RLE order, polygon coordinates with the origin at the top-left pixel's corner, ring orientation, COCO boxes):
``docs/store.md`` ("Exports").
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from traitloc.io.files import as_mask, mask_from_map, to_json

__all__ = [
    "COLORBAR_GID",
    "COLORBAR_LABEL",
    "CONVENTIONS",
    "FIGURE_FORMATS",
    "UNIFORM_CMAPS",
    "FormatError",
    "bbox_area",
    "check_cmap",
    "check_dpi",
    "coco_annotation",
    "figure_bytes",
    "figure_panel",
    "geojson_collection",
    "geojson_feature",
    "mask_png_bytes",
    "mask_to_polygons",
    "polygons_to_mask",
    "rle_decode",
    "rle_encode",
    "rle_from_string",
    "rle_to_string",
    "write_coco",
]

FIGURE_FORMATS: tuple[str, ...] = ("svg", "pdf", "png")
#: matplotlib's perceptually uniform sequential colormaps (and their reverses) allowed for figures
UNIFORM_CMAPS: tuple[str, ...] = tuple(
    name + rev for name in ("viridis", "cividis", "magma", "inferno", "plasma") for rev in ("", "_r")
)
COLORBAR_GID = "traitloc-colorbar"
COLORBAR_LABEL = "relative importance (map / max)"
#: the conventions of the exported files, as recorded in an export's manifest
CONVENTIONS: dict[str, str] = {
    "result_id": "<image-key>/<slug>: the store's result_id (the review app's id)",
    "rle": "COCO: column-major, counts start with the run of zeros, size [height, width]",
    "polygons": "pixel coordinates: x = column, y = row (down), origin at the top-left corner of the image; "
    "pixel (i, j) covers [j, j+1] x [i, i+1]; exterior rings positive signed area, holes negative",
    "maps": "float32, map / its maximum, values in [0, 1], rendered from the store's grid map",
    "masks": "map > threshold (the threshold is in each result's settings)",
}
_RC_LOCK = threading.Lock()
_MAX_DPI = 2400


class FormatError(ValueError):
    """Bad export input (a results folder, selection or option); the message is one line."""


# ------------------------------------------------------------------------------------------------------------------
# COCO run-length encoding
# ------------------------------------------------------------------------------------------------------------------
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
    array = as_mask(mask)
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


def bbox_area(mask: np.ndarray) -> tuple[list[int], int]:
    """COCO ``[x, y, width, height]`` of the set pixels of a boolean mask (zeros when empty) and their count."""
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

    array = as_mask(mask)
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
        ring = np.round(ring[::-1], 3) if simplify > 0 else ring[::-1]
        if exterior:
            polygons[owner] = [ring]
        else:
            holes.append((owner, ring))
    for owner, ring in holes:  # a hole is bordered by the pixels of the one component around it
        if owner in polygons:
            polygons[owner].append(ring)
    return [[[[float(x), float(y)] for x, y in ring] for ring in polygons[k]] for k in sorted(polygons)]


def _contour_component(vertex: np.ndarray, components: np.ndarray) -> int:
    """Label of the foreground pixel beside a contour vertex (vertices sit halfway between two pixel centres)."""
    r, c = float(vertex[0]), float(vertex[1])
    if abs(r - round(r)) < 1e-6:
        pixels = [(round(r), math.floor(c)), (round(r), math.ceil(c))]
    else:
        pixels = [(math.floor(r), round(c)), (math.ceil(r), round(c))]
    return max(int(components[p]) for p in pixels)


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
        kind, coords = polygons.get("type"), polygons.get("coordinates", [])
        if kind not in ("Polygon", "MultiPolygon"):
            raise ValueError(f"expected a Polygon or MultiPolygon geometry, got {kind!r}")
        polygons = [coords] if kind == "Polygon" else coords
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
# PNG masks, COCO and GeoJSON documents
# ------------------------------------------------------------------------------------------------------------------
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

    array = as_mask(mask)
    info = PngInfo()
    info.add_text("Software", "traitloc")
    if settings:
        info.add_itxt("traitloc", to_json(dict(settings), sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def coco_annotation(
    ann_id: int, image_id: int, category_id: int, mask: np.ndarray, settings: Mapping[str, Any],
    score: object = None, compressed: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One COCO annotation of a mask: ``iscrowd = 1``, RLE segmentation, area, bbox, the settings and a finite score."""
    bbox, area = bbox_area(mask)
    annotation = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 1, "area": area,
                  "bbox": bbox, "segmentation": rle_encode(mask, compressed=compressed),
                  "traitloc": dict(settings)}  # fmt: skip
    if isinstance(score, float) and math.isfinite(score):
        annotation["score"] = score
    return annotation


def write_coco(handle: IO[bytes], head: Mapping[str, Any], annotations: Iterable[bytes]) -> None:
    """Write a COCO document: ``head`` (info, licenses, images, categories) and the annotations streamed after it.

    ``annotations`` are the JSON texts of the annotations, one per item (a trailing newline is dropped): the file
    is the same as one :func:`to_json` of ``{**head, "annotations": [...]}`` with sorted head keys, without ever
    holding all annotations in memory.
    """
    text = to_json(head, sort_keys=True)
    handle.write((text[:-1] + ', "annotations": [').encode("utf-8"))
    for n, line in enumerate(annotations):
        handle.write((b", " if n else b"") + line.rstrip(b"\n"))
    handle.write(b"]}\n")


def geojson_feature(
    feature_id: str, label: str, mask: np.ndarray, settings: Mapping[str, Any], simplify: float = 0.0
) -> dict[str, Any]:
    """A GeoJSON ``Feature`` with the mask's ``MultiPolygon`` (:func:`mask_to_polygons`) and its settings."""
    return {
        "type": "Feature", "id": feature_id,
        "geometry": {"type": "MultiPolygon", "coordinates": mask_to_polygons(mask, simplify)},
        "properties": {**settings, "label": label, "area_px": int(mask.sum())},
    }  # fmt: skip


def geojson_collection(
    features: list[dict[str, Any]], image: str, image_key: str, width: int, height: int
) -> dict[str, Any]:
    """The ``FeatureCollection`` of one image's features, with the image and the coordinate convention."""
    return {
        "type": "FeatureCollection",
        "traitloc": {"image": image, "image_key": image_key, "width": width, "height": height,
                     "coordinates": CONVENTIONS["polygons"]},
        "features": features,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# figure panels
# ------------------------------------------------------------------------------------------------------------------
def check_cmap(cmap: str) -> str:
    """``cmap`` if it is one of :data:`UNIFORM_CMAPS`, else :class:`FormatError`."""
    if not isinstance(cmap, str) or cmap not in UNIFORM_CMAPS:
        raise FormatError(f"cmap must be a perceptually uniform colormap ({', '.join(UNIFORM_CMAPS)}), got {cmap!r}")
    return cmap


def _settings_line(settings: Mapping[str, Any]) -> str:
    method, gamma, threshold = settings.get("method"), settings.get("gamma"), settings.get("threshold")
    model = settings.get("model") or settings.get("classifier")
    parts = [f"Finer-CAM ({method})" if method else "",
             f"γ = {_fmt_number(gamma)}" if gamma not in (None, "") else "",
             f"mask: map > {_fmt_number(threshold)}" if threshold not in (None, "") else "",
             f"model: {Path(str(model)).name}" if model else ""]  # fmt: skip
    return "   ".join(part for part in parts if part)


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
    colormap = colormaps[check_cmap(cmap)]
    heat = np.asarray(map01, dtype=np.float32)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"map01 must be a non-empty 2-D array, got shape {heat.shape}")
    height, width = heat.shape
    if mask is None:
        threshold = settings.get("threshold", 0.5)
        mask = mask_from_map(np.clip(heat, 0.0, 1.0), 0.5 if threshold in (None, "") else threshold)
    mask_array = as_mask(mask)
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
    threshold = settings.get("threshold")
    mask_title = "mask" if threshold in (None, "") else f"mask (map > {_fmt_number(threshold)})"
    for ax, title in zip(axes, ("image", "map", mask_title), strict=True):
        ax.set(xticks=[], yticks=[])
        ax.set_title(title, fontsize=9)
        if rgb is not None:
            ax.imshow(rgb, extent=extent, interpolation="antialiased")
        else:
            ax.set_facecolor("0.8")
        ax.set(xlim=(0, width), ylim=(height, 0))
    if rgb is None:
        axes[0].text(0.5, 0.5, "image not available", ha="center", va="center", fontsize=8,
                     transform=axes[0].transAxes)  # fmt: skip
    axes[1].imshow(heat, cmap=colormap, vmin=0.0, vmax=1.0, alpha=alpha if rgb is not None else 1.0,
                   extent=extent, interpolation="bilinear")  # fmt: skip
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
    text = to_json(dict(settings), sort_keys=True)
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
    dpi = check_dpi(dpi)
    rc: dict[Any, Any] = {"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42, "svg.hashsalt": "traitloc",
                            "savefig.dpi": dpi, "image.composite_image": False}  # fmt: skip
    # Vector files embed each image at its own resolution (the viewer scales it); PNG resamples with antialiasing.
    images = [im for ax in fig.axes for im in ax.get_images()]
    for im in images:
        im.set_interpolation("antialiased" if fmt == "png" else "none")
    buffer = io.BytesIO()
    with _RC_LOCK, matplotlib.rc_context(rc):  # rcParams are global: one save at a time (the app has threads)
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=_figure_metadata(fmt, settings or {}))
    return buffer.getvalue()


def check_dpi(dpi: object) -> int:
    """``dpi`` as an int in [10, 2400], else :class:`FormatError`."""
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or not 10 <= int(dpi) <= _MAX_DPI:
        raise FormatError(f"dpi must be an int in [10, {_MAX_DPI}], got {dpi!r}")
    return int(dpi)
