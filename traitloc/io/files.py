"""Outputs: float TIFF maps, PNG masks and overlays, slugs and ``run.json``, all written atomically.

Every writer goes through :func:`atomic_path` / :func:`atomic_write`: the data is written to a hidden temporary
file in the destination folder, flushed and fsynced, then renamed over the final name with :func:`os.replace`.
A reader (or a resumed run) therefore sees either the previous file or the complete new one, never a partial
file, even if the process is killed mid-write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import secrets
import sys
import unicodedata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime, timezone
from importlib import metadata as importlib_metadata
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

__all__ = [
    "as_mask",
    "atomic_path",
    "atomic_write",
    "environment_info",
    "fsync_dir",
    "is_temp_name",
    "map_tiff_bytes",
    "map_to_unit",
    "mask_from_map",
    "read_map_tiff",
    "save_map_tiff",
    "save_mask_png",
    "overlay_array",
    "png_bytes",
    "read_run_json",
    "save_overlay_png",
    "sha256_file",
    "slugify",
    "to_json",
    "utc_now",
    "write_run_json",
]

PathLike = str | os.PathLike[str]

_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
)
_HASH_LEN = 10
_MIN_SLUG_LEN = 16


# --------------------------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------------------------
def _as_path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}")
    path = Path(value)
    if not path.name:
        raise ValueError(f"{name} must name a file, got {str(value)!r}")
    return path


_TEMP_NAME = re.compile(r"^\..*\.[0-9a-f]{12}\.tmp(\.[^.]+)?$")


def _temp_name(path: Path, keep_suffix: bool = True) -> Path:
    # Hidden (skipped by find_images), unique, and with the final suffix so that writers that infer the format
    # from the extension still work (``keep_suffix=False``: no suffix, for folders read by a ``*.ext`` glob).
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix if keep_suffix else ''}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_path`'s temporary names (``.{stem}.{12 hex}.tmp[.ext]``)."""
    return _TEMP_NAME.match(name) is not None


def fsync_dir(folder: PathLike) -> None:
    """Make the creation or rename of a file in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; it replaces ``path`` only if the block succeeds.

    The temporary file is hidden and lives in the same folder as ``path`` (created if needed), so the final
    :func:`os.replace` is atomic. On success the file is fsynced, renamed over ``path`` and the folder fsynced.
    If the block raises, the temporary file is removed, ``path`` is left untouched and the error propagates.

    Parameters
    ----------
    path : path
        The final file name.
    keep_suffix : bool, default True
        Give the temporary file the final suffix (for writers that infer the format from it). ``False`` for files
        in folders that readers glob by suffix (DuckDB's ``'results/*.parquet'`` matches hidden files too).

    Yields
    ------
    pathlib.Path
        A path that does not exist yet, with the same suffix as ``path`` (unless ``keep_suffix`` is False).

    Raises
    ------
    FileNotFoundError
        If the block finished without creating the temporary file.

    Examples
    --------
    >>> with atomic_path(tmp / "map.tif") as tmp_file:  # doctest: +SKIP
    ...     tifffile.imwrite(tmp_file, array)
    """
    final = _as_path("path", path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final, keep_suffix)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(final.parent)


def atomic_write(path: PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, :func:`os.replace`).

    Parameters
    ----------
    path : path
        The final file name; its folder is created if needed.
    data : bytes or str
        The content; ``str`` is encoded as UTF-8 (newlines are written as given).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
    else:
        raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
    final = _as_path("path", path)
    with atomic_path(final) as tmp:
        # O_EXCL: never follow or reuse an existing file; 0o666 lets the umask decide the final permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
    return final


# --------------------------------------------------------------------------------------------------------------
# slugs
# --------------------------------------------------------------------------------------------------------------
def slugify(text: str, max_len: int = 80) -> str:
    """Turn a prompt or class name into a stable, filesystem-safe file name.

    Lower case ASCII letters and digits separated by single ``-`` (accents are transliterated: ``"Mésange"``
    gives ``"mesange"``). A short hash of the exact text (10 hex digits of its SHA-256) is appended when the
    slug would be lossy beyond case and punctuation: when it is truncated to ``max_len``, when characters with
    no ASCII form were dropped (``"赤い翼"``), or when it is a reserved Windows device name. Distinct long
    prompts therefore never share a slug. The result is the same on every run, machine and Python version.

    Parameters
    ----------
    text : str
        Non-blank text.
    max_len : int, default 80
        Maximum length of the slug, at least 16.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If ``text`` is empty or blank, or ``max_len`` < 16.

    Examples
    --------
    >>> slugify("Red epaulets (male)")
    'red-epaulets-male'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
    if max_len < _MIN_SLUG_LEN:
        raise ValueError(f"max_len must be >= {_MIN_SLUG_LEN}, got {max_len}")
    if not text.strip():
        raise ValueError("cannot slugify an empty or blank text")
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    ascii_text = kept.encode("ascii", "ignore").decode("ascii")
    lossy = any(c.isalnum() for c in kept if not c.isascii())
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_LEN]
    if lossy or not slug or len(slug) > max_len or slug in _WINDOWS_RESERVED:
        head = slug[: max_len - _HASH_LEN - 1].rstrip("-")
        slug = f"{head}-{digest}" if head else digest
    return slug


# --------------------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------------------
def _as_map(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (H, W), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _as_unit_map(name: str, values: object) -> np.ndarray:
    array = _as_map(name, values).astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0 + 1e-6:
        raise ValueError(f"{name} must have values in [0, 1] (see map_to_unit), got range [{lo:g}, {hi:g}]")
    return array


def map_to_unit(map2d: object) -> np.ndarray:
    """Scale a map to [0, 1] by dividing by its maximum.

    ``out = clip(map / max(map), 0, 1)``; negative values (a signed map's evidence for the reference) become 0.
    A map whose maximum is <= 0 (all zero, all negative) gives an all-zero map rather than dividing by zero.

    Parameters
    ----------
    map2d : array_like, shape (H, W)
        Real-valued map.

    Returns
    -------
    numpy.ndarray
        float32, shape (H, W); the maximum is exactly 1 unless the map is all zero.

    Raises
    ------
    ValueError
        If the map is not 2-D, is empty, or contains NaN or infinite values.
    """
    # no full-size float64 copy: a 12000 x 9000 map is 432 MB in float32 and twice that in float64
    array = np.asarray(_as_map("map2d", map2d))
    peak, low = float(array.max()), float(array.min())  # NaN propagates through max and min
    if not (math.isfinite(peak) and math.isfinite(low)):
        raise ValueError(f"map2d contains {'NaN' if math.isnan(peak) else 'infinite'} values")
    if peak <= 0.0:
        return np.zeros(array.shape, dtype=np.float32)
    out = np.empty(array.shape, dtype=np.float32)
    step = max(1, (1 << 22) // max(1, array.shape[1]))  # divide in float64, a few MB of rows at a time
    for i in range(0, array.shape[0], step):
        out[i : i + step] = np.clip(array[i : i + step].astype(np.float64) / peak, 0.0, 1.0)
    return out


def mask_from_map(map01: object, threshold: float | str = 0.5) -> np.ndarray:
    """Binary mask of the cells of a [0, 1] map above a threshold.

    ``mask = map01 > t`` with ``t = threshold`` or, for ``"otsu"``, ``t = skimage.filters.threshold_otsu(map01)``.
    A map without contrast (constant) gives ``mask = map01 > 0``: empty for an all-zero map.

    Parameters
    ----------
    map01 : array_like, shape (H, W)
        Map with values in [0, 1] (see :func:`map_to_unit`).
    threshold : float in [0, 1] or "otsu", default 0.5

    Returns
    -------
    numpy.ndarray
        bool, shape (H, W).
    """
    array = _as_unit_map("map01", map01)
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold must be a number in [0, 1] or 'otsu', got {threshold!r}")
        if float(array.min()) == float(array.max()):
            return array > 0.0
        from skimage.filters import threshold_otsu

        cut = float(threshold_otsu(array))
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
            raise TypeError(f"threshold must be a number or 'otsu', got {type(threshold).__name__}")
        cut = float(threshold)
        if not 0.0 <= cut <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {cut:g}")
    return array > cut


def map_tiff_bytes(
    map2d: object, metadata: Mapping[str, Any] | None = None, *, imagej: bool = False, label: str | None = None
) -> bytes:
    """A map as a float32 single-page TIFF with its settings as JSON (:func:`to_json`): the one TIFF writer.

    Two layouts, both plain float32 grayscale that any TIFF reader opens:

    * default (``localize --save maps``): zlib (deflate) compressed, no predictor, the JSON object in the
      ImageDescription tag (ASCII, non-ASCII text ``\\u``-escaped), which Fiji (Image > Show Info), napari and
      tifffile display;
    * ``imagej=True`` (``traitloc export``): an uncompressed ImageJ TIFF (ImageJ's own reader opens it without
      Bio-Formats) with display range 0..1, ``label`` as the slice label and the JSON (indent 1) in ImageJ's
      ``Info`` (tifffile: ``TiffFile.imagej_metadata["Info"]``).

    Parameters
    ----------
    map2d : array_like, shape (H, W)
        Real-valued map; stored as float32 (values are not changed).
    metadata : mapping, optional
        JSON-serializable settings (see :func:`to_json`: NaN and infinities are rejected).
    imagej : bool, default False
    label : str, optional
        Slice label (ImageJ layout only), e.g. the concept.

    Returns
    -------
    bytes
    """
    import tifffile

    array = np.ascontiguousarray(_as_map("map2d", map2d), dtype=np.float32)
    if not isinstance(metadata, Mapping | None):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    buffer = BytesIO()
    if imagej:
        meta: dict[str, Any] = {"axes": "YX", "min": 0.0, "max": 1.0,
                                "Info": to_json(dict(metadata or {}), indent=1, name="metadata")}  # fmt: skip
        if label:
            meta["Labels"] = [str(label)]
        tifffile.imwrite(buffer, array, imagej=True, metadata=meta, photometric="minisblack")
    else:
        # TIFF ASCII tags must be 7-bit: non-ASCII text is \u-escaped, which JSON readers undo.
        description = to_json(dict(metadata or {}), ascii_only=True, name="metadata")
        tifffile.imwrite(buffer, array, photometric="minisblack", compression="zlib", description=description,
                         metadata=None, software="traitloc")  # fmt: skip
    return buffer.getvalue()


def save_map_tiff(path: PathLike, map2d: object, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`map_tiff_bytes` (the default, compressed layout) to ``path`` atomically; returns ``path``."""
    return atomic_write(_as_path("path", path), map_tiff_bytes(map2d, metadata))


def read_map_tiff(source: PathLike | bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a map written by :func:`map_tiff_bytes` (either layout) or :func:`save_map_tiff`.

    Parameters
    ----------
    source : path or bytes

    Returns
    -------
    array : numpy.ndarray
        float32, shape (H, W).
    metadata : dict
        The JSON object of the ImageDescription (ImageJ: of ``Info``); empty when the file has none.

    Raises
    ------
    ValueError
        If the file holds more than one 2-D page or its JSON is not an object.
    """
    import tifffile

    name = "TIFF bytes" if isinstance(source, bytes) else _as_path("source", source)
    with tifffile.TiffFile(BytesIO(source) if isinstance(source, bytes) else name) as tif:
        if len(tif.pages) != 1:
            raise ValueError(f"{name}: expected a single-page map TIFF, found {len(tif.pages)} pages")
        page = cast("tifffile.TiffPage", tif.pages[0])  # the first page is always a TiffPage, never a TiffFrame
        array = page.asarray()
        text = (tif.imagej_metadata or {}).get("Info", "") if tif.is_imagej else page.description
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D map, got shape {array.shape}")
    try:
        meta = json.loads(text) if (text or "").strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: TIFF description is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: TIFF description is JSON but not an object")
    return array.astype(np.float32, copy=False), meta


# --------------------------------------------------------------------------------------------------------------
# PNGs
# --------------------------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A PIL image or uint8 array as PNG bytes, compression level 1 (3x faster than the default, a few % larger)."""
    buffer = BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _save_png(path: PathLike, image: Image.Image) -> Path:
    return atomic_write(_as_path("path", path), png_bytes(image))


def save_mask_png(path: PathLike, mask: object) -> Path:
    """Write a binary mask as an 8-bit grayscale PNG with values 0 and 255.

    Parameters
    ----------
    path : path
        Output file; written atomically, folder created if needed.
    mask : array_like of bool, shape (H, W)
        Boolean mask, or numbers that are all 0 or 1.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _save_png(path, Image.fromarray(np.where(as_mask(mask), 255, 0).astype(np.uint8)))


def as_mask(mask: object, name: str = "mask") -> np.ndarray:
    """``mask`` as a boolean 2-D array; numbers must all be 0 or 1 (``ValueError``/``TypeError`` otherwise)."""
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


def _as_rgb_uint8(image: object) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image must be a PIL image or a uint8 array, got dtype {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[:, :, :3]
    raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")


def overlay_array(image: object, map01: object, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """Blend a colour-mapped [0, 1] map over an RGB image.

    ``out = (1 - alpha) * image + alpha * cmap(map01)`` per pixel, with a perceptually uniform matplotlib
    colormap. A map whose size differs from the image's is resized (bilinear) to cover the whole image.

    Parameters
    ----------
    image : PIL.Image.Image or uint8 array of shape (H, W), (H, W, 3) or (H, W, 4)
        The image the map refers to (alpha channel ignored).
    map01 : array_like, shape (h, w)
        Map with values in [0, 1].
    alpha : float in [0, 1], default 0.5
        Weight of the colour-mapped map.
    cmap : str, default "inferno"
        Name of a matplotlib colormap (``inferno``, ``viridis``, ``magma``, ``cividis``...).

    Returns
    -------
    numpy.ndarray
        uint8, shape (H, W, 3).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a colormap name, got {type(cmap).__name__}")
    from matplotlib import colormaps

    try:
        colormap = colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    rgb = _as_rgb_uint8(image)
    heat = _as_unit_map("map01", map01)
    height, width = rgb.shape[:2]
    if heat.shape != (height, width):
        resized = Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR)
        heat = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    colour = colormap(heat)[..., :3]  # float in [0, 1]
    blended = (1.0 - float(alpha)) * rgb.astype(np.float32) + float(alpha) * 255.0 * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_overlay_png(
    path: PathLike,
    image: object,
    map01: object,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> np.ndarray:
    """Write :func:`overlay_array` of ``image`` and ``map01`` as a PNG (atomically); returns the overlay."""
    out = overlay_array(image, map01, alpha=alpha, cmap=cmap)
    _save_png(path, Image.fromarray(out))
    return out


# --------------------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------------------
def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks (weights files can be large).

    Parameters
    ----------
    path : path
    chunk_size : int, default 1 MiB

    Returns
    -------
    str
        64 lower-case hex digits.
    """
    source = _as_path("path", path)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _dist_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions and platform for ``run.json``, without importing heavy packages.

    Returns
    -------
    dict
        ``traitloc``, ``torch``, ``open_clip``, ``numpy``, ``pillow``, ``tifffile`` versions (``None`` when not
        installed), ``python``, ``platform`` and ``machine``. If torch is already imported its own version (with
        the CUDA build tag) and CUDA version are reported.
    """
    from traitloc import __version__

    torch_version = _dist_version("torch")
    cuda = None
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        torch_version = str(getattr(torch_module, "__version__", torch_version))
        cuda = getattr(getattr(torch_module, "version", None), "cuda", None)
    return {
        "traitloc": __version__,
        "torch": torch_version,
        "torch_cuda": cuda,
        "open_clip": _dist_version("open_clip_torch"),
        "numpy": np.__version__,
        "pillow": _dist_version("pillow"),
        "tifffile": _dist_version("tifffile"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def utc_now() -> str:
    """Current time as an ISO-8601 UTC string with milliseconds, e.g. ``"2025-06-01T12:00:00.000Z"``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_utc(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be an ISO-8601 UTC string (see utc_now), got {type(value).__name__}")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} is not an ISO-8601 timestamp: {value!r}") from None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError(f"{name} must be in UTC (ending in 'Z' or '+00:00'): {value!r}")


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise ValueError(f"{where} is {value}; NaN and infinities are not valid JSON (store None for a missing value)")
    if isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist() if isinstance(value, np.ndarray) else value.item(), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{where} is not JSON serializable: value of type {type(value).__name__}: {value!r}")


def to_json(
    obj: Any, *, indent: int | None = None, sort_keys: bool = False, ascii_only: bool = False, name: str = "value"
) -> str:
    """``obj`` as strict JSON text: traitloc's one JSON policy (run.json, TIFF metadata, export manifests, COCO...).

    numpy scalars and arrays become numbers and lists, paths strings, datetimes ISO-8601 strings, sets sorted lists,
    tuples lists, mapping keys ``str(key)``; any other type raises ``TypeError``. NaN and infinities raise
    ``ValueError`` naming where they are: they are not JSON, and writing ``null`` would silently lose them (a caller
    that means "missing" stores ``None``). ``indent`` and ``sort_keys`` are :func:`json.dumps`'s; ``ascii_only``
    ``\\u``-escapes non-ASCII text (TIFF ASCII tags); ``name`` starts the location in error messages.
    """
    return json.dumps(_jsonable(obj, name), indent=indent, sort_keys=sort_keys, ensure_ascii=ascii_only,
                      allow_nan=False)  # fmt: skip


def write_run_json(path: PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``run.json`` atomically, adding :func:`environment_info` under ``"environment"``.

    Parameters
    ----------
    path : path
        Output file (usually ``OUT/run.json``).
    info : mapping
        The run's settings (argv, model, pretrained + sha256, device, dtype, prompts, gamma, method, ...).
        ``start_utc`` and ``end_utc``, when present, must be ISO-8601 UTC strings (use :func:`utc_now`). An
        ``environment`` entry given by the caller is kept as is.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, got {type(info).__name__}")
    record = dict(info)
    for key in ("start_utc", "end_utc"):
        if key in record and record[key] is not None:
            _parse_utc(key, record[key])
    record.setdefault("environment", environment_info())
    return atomic_write(path, to_json(record, indent=2, name="info") + "\n")


def read_run_json(path: PathLike) -> dict[str, Any]:
    """A run's ``run.json`` for display and export: ``{}`` when it is missing, unreadable or not a JSON object.

    ``NaN``/``Infinity`` tokens (not JSON, but Python's :mod:`json` reads them) become ``None``, as the export
    writes missing values.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
