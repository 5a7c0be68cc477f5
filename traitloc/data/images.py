"""Robust image input for batch tools that must never die on one bad file.

Three jobs:

- :func:`find_images` expands the ``PATH...`` arguments of the command line into a sorted, deterministic list
  of image files (folders are searched recursively, hidden files and folders are skipped).
- :func:`image_keys` gives every image a short, unique, filesystem-safe key (its file stem, disambiguated
  when stems collide) used to name the per-image output folders.
- :func:`load_image` decodes one image into an 8-bit RGB working image for the model and reports the size of
  the image *as displayed* (after EXIF orientation), so that a map computed on the working image can be
  resized to cover the original exactly. Every per-file failure is an :class:`ImageLoadError` whose message
  names the file and the reason, so a batch can record it and carry on.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "LoadedImage",
    "find_images",
    "image_keys",
    "load_image",
]

#: File extensions (lower case) picked up when searching a folder. Explicitly named files are accepted whatever
#: their extension.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm"}
)

#: Largest image (in pixels, width x height as stored) that :func:`load_image` accepts by default: 300 MP.
DEFAULT_MAX_PIXELS: int = 300_000_000

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# The transposition that makes a stored image upright, per EXIF orientation (as in ``ImageOps.exif_transpose``).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
)
_MAX_KEY_LEN = 100
_MAX_PARENT_LEVELS = 3
_WHITE = (255, 255, 255)

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------------------
# finding images
# --------------------------------------------------------------------------------------------------------------
def _as_path_list(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        items: list[object] = [paths]
    else:
        try:
            items = list(paths)
        except TypeError:
            raise TypeError(f"paths must be a path or an iterable of paths, got {type(paths).__name__}") from None
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"each path must be a str or os.PathLike, got {type(item).__name__}: {item!r}")
        if isinstance(item, str) and not item.strip():
            raise ValueError("an input path is empty")
        out.append(Path(item))
    if not out:
        raise ValueError("no input paths given")
    return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted by their relative path (folder names compared part by part)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        for name in files:
            if _is_hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root) / name
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def find_images(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand image files and folders into a deterministic list of image files.

    Parameters
    ----------
    paths : path or iterable of paths
        Each an image file or a folder. Folders are searched recursively for files whose extension is in
        :data:`IMAGE_EXTENSIONS` (case-insensitive); hidden files and folders (name starting with ``.``) are
        skipped and symbolic links to folders are not followed. An explicitly named file is kept whatever its
        extension, so a broken or mislabelled file becomes a per-image :class:`ImageLoadError` later instead of
        being dropped silently.

    Returns
    -------
    list of pathlib.Path
        Files in argument order, each folder's files sorted by relative path (compared folder by folder, by code
        point); a file reached twice is listed once (first place).

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    ValueError
        If no paths are given, a folder holds no image, or a path is neither a file nor a folder.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for path in _as_path_list(paths):
        if not path.exists():
            raise FileNotFoundError(f"input path does not exist: {path}")
        if path.is_dir():
            candidates = _walk_images(path)
            if not candidates:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise ValueError(f"no image files ({exts}) found in folder: {path}")
        elif path.is_file():
            candidates = [path]
        else:
            raise ValueError(f"input path is neither a file nor a folder: {path}")
        for candidate in candidates:
            ident = candidate.resolve()
            if ident not in seen:
                seen.add(ident)
                found.append(candidate)
    return found


# --------------------------------------------------------------------------------------------------------------
# image keys
# --------------------------------------------------------------------------------------------------------------
def _safe_component(text: str) -> str:
    """Return an ASCII, filesystem-safe version of ``text`` (letters, digits, ``_``, ``-``, ``.``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._ -")
    safe = re.sub(r"_{2,}", "_", safe)[:_MAX_KEY_LEN].rstrip("._ -")
    if not safe:
        safe = "image"
    if safe.split(".")[0].lower() in _WINDOWS_RESERVED:
        safe = f"{safe}_"
    return safe


def image_keys(paths: Iterable[PathLike]) -> dict[Path, str]:
    """Give every image a unique, filesystem-safe key derived from its file stem.

    The key is the stem made ASCII and filesystem-safe (other characters become ``_``). Keys are compared
    case-insensitively, so they stay distinct on case-insensitive filesystems. Collisions are resolved in two
    steps:

    1. Images whose stems collide but which lie in different folders are prefixed with the names of their
       parent folders, with as few levels as tell the folders apart (at most three): ``day1/IMG_0001.jpg`` and
       ``day2/IMG_0001.jpg`` become ``day1_IMG_0001`` and ``day2_IMG_0001``. An image whose stem is unique
       keeps its bare stem.
    2. Keys that still collide (``IMG.jpg`` and ``IMG.png`` in one folder, or a generated key equal to another
       file's stem) get ``-2``, ``-3``...; bare stems keep their key first, then the order is that of the
       resolved paths.

    The result depends only on the set of files, not on the order in which they are given.

    Parameters
    ----------
    paths : iterable of path
        Image files (typically the output of :func:`find_images`).

    Returns
    -------
    dict
        ``{path: key}`` in the order of ``paths``.
    """
    if not isinstance(paths, (str, os.PathLike)):
        paths = list(paths)
        if not paths:
            return {}
    unique = list(dict.fromkeys(_as_path_list(paths)))
    resolved = {p: p.resolve() for p in unique}
    stems = {p: _safe_component(p.stem) for p in unique}
    # parent folder names, nearest first (the filesystem root is not a name)
    parents = {p: [_safe_component(part) for part in reversed(resolved[p].parent.parts[1:])] for p in unique}
    levels = dict.fromkeys(unique, 0)

    def key_at(p: Path, level: int) -> str:
        return "_".join([*parents[p][:level][::-1], stems[p]])

    # Step 1: folder prefixes for stems shared across folders.
    groups: dict[str, list[Path]] = {}
    for p in unique:
        groups.setdefault(stems[p].casefold(), []).append(p)
    for members in groups.values():
        n_dirs = len({resolved[p].parent for p in members})
        if n_dirs < 2:
            continue
        level = 1
        while level < _MAX_PARENT_LEVELS and len({key_at(p, level).casefold() for p in members}) < n_dirs:
            level += 1
        for p in members:
            levels[p] = level

    # Step 2: numeric suffixes for what still collides.
    keys = {p: key_at(p, levels[p]) for p in unique}
    groups = {}
    for p in unique:
        groups.setdefault(keys[p].casefold(), []).append(p)
    taken = set(groups)
    for folded in sorted(groups):
        members = sorted(groups[folded], key=lambda q: (levels[q], str(resolved[q]), str(q)))
        for p in members[1:]:
            n = 2
            while f"{keys[p]}-{n}".casefold() in taken:
                n += 1
            keys[p] = f"{keys[p]}-{n}"
            taken.add(keys[p].casefold())
    return keys


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------
class ImageLoadError(Exception):
    """An image file that cannot be used; the message names the file and the reason.

    Parameters
    ----------
    path : path
        The offending file.
    reason : str
        Why it cannot be used, e.g. ``"truncated or corrupt JPEG"``.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class LoadedImage:
    """A decoded image ready for the model.

    Attributes
    ----------
    image : PIL.Image.Image
        8-bit RGB working image, upright (EXIF orientation applied), transparency composited onto white, longer
        side at most ``max_side``.
    orig_size : tuple of int
        ``(width, height)`` of the full-resolution image as displayed, i.e. after EXIF orientation. Maps are
        resized to this size.
    mode : str
        The PIL mode of the file before conversion (``"RGB"``, ``"L"``, ``"I;16"``, ``"CMYK"``, ``"P"``...).
    warnings : list of str
        Non-fatal notes (rescaled bit depth, first frame used, image reduced, ...).
    """

    image: Image.Image
    orig_size: tuple[int, int]
    mode: str
    warnings: list[str] = field(default_factory=list)


# Pillow's decompression-bomb guard reads the module global ``Image.MAX_IMAGE_PIXELS``. Legit photos can exceed it
# (12000 x 9000 = 108 MP > 89 MP), so while an image is opened and decoded we raise it to at least our own cap and
# enforce that cap ourselves. A reference count makes concurrent loads safe without serializing them; the previous
# value is restored when the last load finishes. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched.
_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved: int | None = None
_limit_current: int | None = None


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    global _limit_users, _limit_saved, _limit_current
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            _limit_current = _limit_saved
        _limit_users += 1
        if _limit_current is not None and _limit_current < max_pixels:
            _limit_current = max_pixels
            Image.MAX_IMAGE_PIXELS = max_pixels
    # No warnings.catch_warnings() here: it is not thread-safe. Pillow only warns for images above the raised limit,
    # which load_image rejects anyway.
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, MemoryError)


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _stretch_to_uint8(array: np.ndarray, notes: list[str], mode: str) -> Image.Image:
    """Linearly map the finite data range of a high-bit-depth / float grayscale image onto 0..255."""
    data = np.asarray(array, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        notes.append(f"{int((~finite).sum())} non-finite pixel values in {mode} image set to the minimum")
    if finite.any():
        lo, hi = float(data[finite].min()), float(data[finite].max())
    else:
        lo = hi = 0.0
    data = np.where(finite, data, lo)
    if hi > lo:
        out = np.rint((data - lo) * (255.0 / (hi - lo)))
        notes.append(f"{mode} image scaled from its range [{lo:g}, {hi:g}] to 8 bit [0, 255]")
    else:
        out = np.zeros_like(data)
        notes.append(f"{mode} image is constant ({lo:g}); converted to black")
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as exc:  # noqa: BLE001 - any colour-management failure falls back to a plain conversion
            notes.append(f"CMYK ICC profile could not be applied ({exc}); converted without colour management")
    return im.convert("RGB")


def _normalize_mode(im: Image.Image, notes: list[str]) -> Image.Image:
    """Convert any PIL mode to ``RGB``, ``RGBA`` (has transparency) or ``L`` without losing dynamic range."""
    mode = im.mode
    if mode in ("RGB", "L", "RGBA"):
        if "transparency" in im.info and mode != "RGBA":
            return im.convert("RGBA")
        return im
    if mode in ("LA", "La", "PA", "RGBa", "RGBX"):
        return im.convert("RGBA") if mode != "RGBX" else im.convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        return im.convert("RGBA") if has_alpha else im.convert("RGB")
    if mode == "1":
        return im.convert("L")
    if mode == "CMYK":
        return _cmyk_to_rgb(im, notes)
    if mode.startswith("I") or mode == "F":
        return _stretch_to_uint8(np.asarray(im), notes, mode)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported image mode {mode!r}") from exc


def _composite_on_white(im: Image.Image) -> Image.Image:
    if im.mode != "RGBA":
        return im.convert("RGB")
    background = Image.new("RGBA", im.size, (*_WHITE, 255))
    return Image.alpha_composite(background, im).convert("RGB")


def _decode_reason(exc: BaseException, fmt: str | None) -> str:
    text = str(exc) or type(exc).__name__
    kind = fmt or "image"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding the image"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({text})"
    if "truncated" in text.lower() or isinstance(exc, (EOFError, SyntaxError)):
        return f"truncated or corrupt {kind} ({text})"
    return f"corrupt or unsupported {kind} ({text})"


def load_image(
    path: PathLike | bytes,
    *,
    max_side: int = 4096,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode an image file into an upright 8-bit RGB working image.

    - EXIF orientation is applied (the transposition of ``ImageOps.exif_transpose``), so the working image
      and ``orig_size`` match the image as viewers display it.
    - Grayscale ``L``/``1`` becomes gray RGB. High-bit-depth and float grayscale (``I;16``, ``I``, ``F``) are
      stretched linearly from their data range to 0..255 (not clipped), with a note in ``warnings``.
    - Transparency (``RGBA``, ``LA``, ``P`` or ``RGB``/``L`` with a transparent colour) is composited onto white;
      palette and ``CMYK`` images are converted to RGB (through the embedded ICC profile when there is one).
    - Multi-frame files (GIF, TIFF stacks) use their first frame.
    - Images up to ``max_pixels`` load although they exceed Pillow's decompression-bomb limit. JPEGs are decoded
      with DCT scaling (draft mode), other formats are reduced after decoding, so that the working image's
      longer side is at most ``max_side``; ``orig_size`` keeps the full displayed size.
    - Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is not set.

    Parameters
    ----------
    path : path or bytes
        The image file, or its bytes (an upload, decoded in memory and never written; messages call it
        ``<upload>``).
    max_side : int, default 4096
        Longest side of the working image; larger images are downscaled (aspect ratio kept).
    min_side : int, default 1
        Smallest accepted side of the displayed image. Tiny images load by default (the model upsamples).
    max_pixels : int, default 300_000_000
        Largest accepted ``width * height``.

    Returns
    -------
    LoadedImage

    Raises
    ------
    ImageLoadError
        If the file is missing, unreadable, not an image, truncated or corrupt, too small or too large.
    """
    max_side = _check_positive_int("max_side", max_side)
    min_side = _check_positive_int("min_side", min_side)
    max_pixels = _check_positive_int("max_pixels", max_pixels)
    if isinstance(path, (bytes, bytearray)):
        upload = BytesIO(path)
        source: Path | BytesIO = upload
        path = Path("<upload>")
        if not upload.getbuffer().nbytes:
            raise ImageLoadError(path, "empty file")
    elif not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, os.PathLike or bytes, got {type(path).__name__}")
    else:
        path = source = Path(path)
        if not path.exists():
            raise ImageLoadError(path, "file not found")
        if not path.is_file():
            raise ImageLoadError(path, "not a file")
        try:
            if path.stat().st_size == 0:
                raise ImageLoadError(path, "empty file")
        except OSError as exc:
            raise ImageLoadError(path, f"cannot read file ({exc})") from exc

    notes: list[str] = []
    with _pillow_pixel_limit(max_pixels):
        try:
            im_file = Image.open(source)
        except UnidentifiedImageError:
            raise ImageLoadError(path, "not an image file (format not recognized)") from None
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(path, f"image too large ({exc})") from None
        except PermissionError as exc:
            raise ImageLoadError(path, f"cannot read file ({exc})") from None
        except _DECODE_ERRORS as exc:
            raise ImageLoadError(path, f"not an image file or corrupt header ({exc})") from None

        with im_file:
            fmt = im_file.format
            mode = im_file.mode
            width, height = im_file.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"image too large ({width}x{height} = {width * height / 1e6:.0f} MP > {max_pixels / 1e6:g} MP)",
                )
            n_frames = int(getattr(im_file, "n_frames", 1))
            if n_frames > 1:
                notes.append(f"{n_frames} frames: only the first is used")
            try:
                orientation = int(im_file.getexif().get(_EXIF_ORIENTATION, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
                orientation = 1
                notes.append("unreadable EXIF data ignored")
            displayed = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
            if min(displayed) < min_side:
                raise ImageLoadError(path, f"image too small ({displayed[0]}x{displayed[1]} < {min_side} px)")

            try:
                longer = max(width, height)
                if fmt == "JPEG" and longer > max_side:
                    # DCT scaling by 1/2, 1/4 or 1/8 while keeping the longer side >= max_side.
                    request = (
                        max(1, -(-width * max_side // longer)),
                        max(1, -(-height * max_side // longer)),
                    )
                    im_file.draft(im_file.mode, request)
                im_file.load()
                im = _normalize_mode(im_file, notes)
                if max(im.size) > max_side:
                    # Reduce in the stored orientation first: transposing the small image costs less memory.
                    decoded = im.size
                    scale = max_side / max(decoded)
                    target = (max(1, round(decoded[0] * scale)), max(1, round(decoded[1] * scale)))
                    im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
                    shown = target[::-1] if orientation in _SWAPPING_ORIENTATIONS else target
                    notes.append(
                        f"working image reduced from {displayed[0]}x{displayed[1]} to {shown[0]}x{shown[1]}"
                        + (f" (JPEG decoded at {decoded[0]}x{decoded[1]})" if decoded != (width, height) else "")
                    )
                rgb = _composite_on_white(im)  # always a new image, independent of the file
                transpose = _ORIENTATION_TRANSPOSE.get(orientation)
                if transpose is not None:
                    rgb = rgb.transpose(transpose)
            except ImageLoadError:
                raise
            except _DECODE_ERRORS as exc:
                raise ImageLoadError(path, _decode_reason(exc, fmt)) from None
    return LoadedImage(image=rgb, orig_size=displayed, mode=mode, warnings=notes)
