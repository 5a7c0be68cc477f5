"""traitloc review app: query concepts interactively, browse results folders, review and export maps.

Start it with ``traitloc app [RESULTS_DIR] [--port 8501]`` (binds to 127.0.0.1), or directly with
``streamlit run apps/review.py -- [RESULTS_DIR] [--model NAME|CONFIG.json] [--pretrained TAG|FILE]``.

Pages
-----
Query
    Pick an image (from the results folder, or ``--images DIR``) or upload one (kept in memory, never written),
    type a concept and a base prompt, move the gamma slider, pick the method. The image's forward pass to the
    target layer and the per-prompt gradients are cached in the session, so a new gamma (or a new base prompt:
    text tower only) recombines cached weights without touching the image again. The model is loaded once per
    server (``st.cache_resource``). Session counters: ``traitloc_forward_passes`` (image forward passes to the
    target layer), ``traitloc_gradient_passes`` (truncated backward passes), ``traitloc_masked_passes``
    (Score-CAM's masked forward passes, cached per prompts and gamma).
Browse
    A ``traitloc localize`` / ``explain`` / ``audit`` results folder: image | overlay | mask side by side,
    filtered by concept or target class, class pair, score range and review status; the audit verdict of each
    class pair when the folder has ``audit_summary.csv``.
Review
    Accept / reject / needs-work with a note per result, stored in ``RESULTS_DIR/review.sqlite``
    (:class:`traitloc.store.ReviewStore`); the accepted results download as a zip.

Security: every file the app reads or writes is resolved inside RESULTS_DIR (or the read-only ``--images`` folder):
``..``, absolute paths and symlinks leaving it are refused (:func:`traitloc.store.resolve_inside`). Uploads are
decoded in memory. Nothing is unpickled: tables are CSV, maps TIFF, weights come from the command line only.

Configuration (environment, set by ``traitloc app``): ``TRAITLOC_APP_RESULTS_DIR``, ``TRAITLOC_APP_IMAGES``,
``TRAITLOC_APP_MODEL``, ``TRAITLOC_APP_PRETRAINED``, ``TRAITLOC_APP_DEVICE``, ``TRAITLOC_APP_USER``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import secrets
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, ImageOps

from traitloc.store import STATUSES, PathSafetyError, ReviewStore, resolve_inside, result_id_from_map

PAGES = ("Query", "Browse", "Review")
METHODS = ("gradcam", "layercam", "scorecam")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
#: folders of a results folder that hold outputs, not input images
OUTPUT_DIRS = frozenset({"maps", "masks", "overlays", "signed", "exports", "figures"})
UPLOAD_MAX_PIXELS = 100_000_000
WORK_MAX_SIDE = 2048
THUMB_SIDE = 384
PAGE_SIZE = 10
#: formats of the review zip by default (traitloc.formats)
DEFAULT_FORMATS = ("png", "tiff", "csv")
QUERY_CACHE_IMAGES = 4
FORWARD_COUNTER = "traitloc_forward_passes"
GRADIENT_COUNTER = "traitloc_gradient_passes"  # truncated backward passes (Grad-CAM, Layer-CAM weights)
MASKED_COUNTER = "traitloc_masked_passes"  # Score-CAM runs (masked forward passes)
QUERY_CACHE = "traitloc_query_cache"
#: the last Query map and its settings (for tests and scripts)
LAST_QUERY = "traitloc_last_query"
NO_BASE = "(none)"
ALL = "(all)"
REVIEW_FILTERS = ("all", "unreviewed", *STATUSES)
STATUS_BADGE = {"accepted": ":green[accepted]", "rejected": ":red[rejected]", "needs-work": ":orange[needs work]"}


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppConfig:
    """What the app works on (from ``traitloc app`` through the environment, or from ``streamlit run -- ...``)."""

    results_dir: Path | None
    images_dir: Path | None = None
    model: str = "ViT-B-16"
    pretrained: str | None = "laion400m_e32"
    device: str = "auto"
    user: str | None = None
    errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def roots(self) -> list[Path]:
        """Folders images may be read from."""
        return [p for p in (self.results_dir, self.images_dir) if p is not None]


def _script_args() -> list[str]:
    """Arguments after ``--`` of ``streamlit run apps/review.py -- ...`` (none under AppTest or ``traitloc app``)."""
    if sys.argv and Path(sys.argv[0]).name == Path(__file__).name:
        return list(sys.argv[1:])
    return []


def load_config(environ: dict[str, str] | None = None, argv: Sequence[str] | None = None) -> AppConfig:
    """Settings from command-line arguments (``streamlit run ... -- ARGS``) over ``TRAITLOC_APP_*`` variables."""
    env = dict(os.environ if environ is None else environ)
    p = argparse.ArgumentParser(prog="review.py", add_help=False)
    p.add_argument("results_dir", nargs="?", default=env.get("TRAITLOC_APP_RESULTS_DIR") or None)
    p.add_argument("--images", default=env.get("TRAITLOC_APP_IMAGES") or None)
    p.add_argument("--model", default=env.get("TRAITLOC_APP_MODEL") or "ViT-B-16")
    p.add_argument("--pretrained", default=env.get("TRAITLOC_APP_PRETRAINED", "laion400m_e32"))
    p.add_argument("--device", default=env.get("TRAITLOC_APP_DEVICE") or "auto")
    p.add_argument("--user", default=env.get("TRAITLOC_APP_USER") or None)
    args, _unknown = p.parse_known_args(list(_script_args() if argv is None else argv))
    errors = []
    results = images = None
    for name, value in (("RESULTS_DIR", args.results_dir), ("--images", args.images)):
        if value is None:
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            errors.append(f"{name}: not a folder: {value}")
            continue
        if name == "RESULTS_DIR":
            results = folder.resolve()
        else:
            images = folder.resolve()
    pretrained = None if str(args.pretrained).lower() in ("", "none") else str(args.pretrained)
    return AppConfig(results, images, str(args.model), pretrained, str(args.device), args.user, tuple(errors))


# ----------------------------------------------------------------------------------------------------------------
# safe file access
# ----------------------------------------------------------------------------------------------------------------
def safe_file(cfg: AppConfig, path: str, *, roots: Sequence[Path] | None = None) -> Path | None:
    """``path`` (relative to RESULTS_DIR, or absolute) resolved inside one of the allowed roots, or ``None``.

    Relative paths are taken relative to RESULTS_DIR only; an absolute path is accepted inside any root (so an
    image recorded with its absolute path shows when it lies in RESULTS_DIR or the ``--images`` folder).
    """
    if not path or not isinstance(path, str):
        return None
    allowed = list(roots if roots is not None else cfg.roots)
    candidates = allowed if os.path.isabs(path) else allowed[:1] if cfg.results_dir is not None else []
    for root in candidates:
        try:
            p = resolve_inside(root, path)
        except (PathSafetyError, OSError, ValueError):
            continue
        if p.is_file():
            return p
    return None


def _file_sig(path: Path) -> tuple[str, int, int]:
    st_ = path.stat()
    return (str(path), st_.st_mtime_ns, st_.st_size)


@st.cache_resource(max_entries=1024, show_spinner=False)
def _thumb_cached(sig: tuple[str, int, int], kind: str, side: int) -> np.ndarray:
    """A display copy of an image or mask file (uint8, longer side at most ``side``); cached without pickling."""
    from traitloc.imageio import load_image

    im = load_image(Path(sig[0]), max_side=max(side, 64)).image
    im.thumbnail((side, side), Image.Resampling.BILINEAR if kind != "mask" else Image.Resampling.NEAREST)
    out = np.asarray(im.convert("RGB") if kind != "mask" else im.convert("L"))
    out.setflags(write=False)
    return out


def thumbnail(path: Path | None, kind: str = "image", side: int = THUMB_SIDE) -> np.ndarray | None:
    """Display copy of a file that :func:`safe_file` returned, or ``None`` when it cannot be read."""
    if path is None:
        return None
    try:
        return _thumb_cached(_file_sig(path), kind, side)
    except Exception:  # noqa: BLE001 - a broken file shows as missing, the page goes on
        return None


def _colorize(map01: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.clip(map01, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> np.ndarray:
    """``(1 - alpha) * image + alpha * cmap(map)``: what ``traitloc localize`` writes to ``overlays/``."""
    heat = _colorize(map01, cmap).astype(np.float32)
    out = (1.0 - alpha) * image[..., :3].astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# results folders
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Folder:
    """A results folder as the pages see it."""

    kind: str  # "localize", "explain", "audit" or "empty"
    results: pd.DataFrame  # rows with status ok and a map: result_id, label, pairs, score_f, ...
    failed: pd.DataFrame
    audit: pd.DataFrame | None  # audit.csv
    summary: pd.DataFrame | None  # audit_summary.csv, level == "pair" rows
    label_name: str = "Concept"


def _read_csv(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def _sig_or_none(cfg: AppConfig, name: str) -> tuple[str, int, int] | None:
    p = safe_file(cfg, name, roots=[cfg.results_dir] if cfg.results_dir else [])
    return _file_sig(p) if p is not None else None


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_folder_cached(
    results_sig: tuple[str, int, int] | None,
    audit_sig: tuple[str, int, int] | None,
    summary_sig: tuple[str, int, int] | None,
) -> Folder:
    df = _read_csv(Path(results_sig[0]) if results_sig else None)
    audit = _read_csv(Path(audit_sig[0]) if audit_sig else None)
    summary = _read_csv(Path(summary_sig[0]) if summary_sig else None)
    if summary is not None and "level" in summary.columns:
        summary = summary[summary["level"] == "pair"].reset_index(drop=True)
    kind = "empty"
    label_name = "Concept"
    results = failed = pd.DataFrame()
    if df is not None and "map" in df.columns:
        if "target" in df.columns:
            kind, label_name = "explain", "Target class"
        else:
            kind = "localize"
        ok = df["status"].eq("ok") if "status" in df.columns else pd.Series(True, index=df.index)
        failed = df[~ok].reset_index(drop=True)
        results = df[ok & df["map"].ne("")].copy()
        ids, labels, pairs, scores = [], [], [], []
        for row in results.to_dict("records"):
            try:
                ids.append(result_id_from_map(row["map"]))
            except ValueError:
                ids.append("")
            if kind == "explain":
                refs = [r.strip() for r in str(row.get("references", "")).split(";") if r.strip()]
                labels.append(str(row.get("target", "")))
                pairs.append([f"{row.get('target', '')} vs {r}" for r in refs] or [f"{row.get('target', '')}"])
            else:
                labels.append(str(row.get("concept", "")))
                pairs.append([f"{row.get('concept', '')} vs {row.get('base', '') or NO_BASE}"])
            try:
                scores.append(float(row.get("score", "nan")))
            except ValueError:
                scores.append(float("nan"))
        results["result_id"] = ids
        results["label"] = labels
        results["pairs"] = pairs
        results["score_f"] = scores
        results = results[results["result_id"] != ""].drop_duplicates("result_id", keep="last").reset_index(drop=True)
    elif audit is not None or summary is not None:
        kind, label_name = "audit", "Attribute"
    return Folder(kind, results, failed, audit, summary, label_name)


def load_folder(cfg: AppConfig) -> Folder:
    """The results folder's tables (re-read when a file changes)."""
    if cfg.results_dir is None:
        return Folder("empty", pd.DataFrame(), pd.DataFrame(), None, None)
    return _load_folder_cached(
        _sig_or_none(cfg, "results.csv"), _sig_or_none(cfg, "audit.csv"), _sig_or_none(cfg, "audit_summary.csv")
    )


def pair_verdicts(folder: Folder) -> dict[str, list[str]]:
    """``"true vs similar" -> ["source: verdict", ...]`` from ``audit_summary.csv``."""
    out: dict[str, list[str]] = {}
    if folder.summary is None or folder.summary.empty:
        return out
    for r in folder.summary.to_dict("records"):
        key = f"{r.get('true_class', '')} vs {r.get('similar_class', '')}"
        out.setdefault(key, []).append(f"{r.get('source', '')}: {r.get('verdict', '')}")
    return out


def filter_results(
    results: pd.DataFrame,
    *,
    labels: Sequence[str] = (),
    pair: str = ALL,
    score_range: tuple[float, float] | None = None,
    review: str = "all",
    decisions: dict[str, Any] | None = None,
    text: str = "",
) -> pd.DataFrame:
    """Rows of ``results`` that pass the filters (labels: any of; pair: one class pair; review status)."""
    if results.empty:
        return results
    keep = pd.Series(True, index=results.index)
    if labels:
        keep &= results["label"].isin(list(labels))
    if pair != ALL:
        keep &= results["pairs"].map(lambda ps: pair in ps)
    if score_range is not None:
        lo, hi = score_range
        s = results["score_f"]
        keep &= s.isna() | ((s >= lo - 1e-9) & (s <= hi + 1e-9))
    if review != "all":
        d = decisions or {}
        status = results["result_id"].map(lambda r: d[r].status if r in d else "unreviewed")
        keep &= status == review
    if text:
        keep &= results["image_key"].str.contains(text, case=False, regex=False)
    return results[keep]


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------
def accepted_ids(cfg: AppConfig) -> list[str]:
    """Accepted result ids of the results folder."""
    if cfg.results_dir is None or not (cfg.results_dir / "review.sqlite").exists():
        return []
    return ReviewStore(cfg.results_dir, readonly=True).accepted()


def export_formats() -> tuple[str, ...]:
    """Formats of :mod:`traitloc.formats` this installation can write (Parquet only with pyarrow/fastparquet)."""
    from traitloc.formats import FORMATS

    has_parquet = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))
    return tuple(f for f in FORMATS if f != "parquet" or has_parquet)


@st.cache_resource(max_entries=8, show_spinner=False)
def _export_problem_cached(results_sig: tuple[str, int, int] | None) -> str | None:
    if results_sig is None:
        return None
    from traitloc.formats import FormatError, list_results

    try:
        list_results(Path(results_sig[0]).parent)
    except FormatError as err:
        return str(err)
    return None


def export_problem(cfg: AppConfig) -> str | None:
    """Why the results folder cannot be exported (an unsafe path in results.csv...), or ``None``."""
    return _export_problem_cached(_sig_or_none(cfg, "results.csv")) if cfg.results_dir else None


def build_export_zip(
    results_dir: Path, formats: Sequence[str] = DEFAULT_FORMATS, image_roots: Sequence[Path] | None = None
) -> bytes:
    """The accepted results as a zip in ``formats``: :func:`traitloc.formats.export_results` (``traitloc export``)
    with the selection ``"accepted"`` (read from review.sqlite when called).

    The zip is written to a temporary file in ``RESULTS_DIR/exports/`` (the app writes nowhere else), read back and
    removed. A refused export (nothing accepted any more, an unsafe path) gives a zip holding ``export_error.txt``:
    the download runs after the page was drawn, so this is the only way left to tell the user.
    """
    from traitloc.formats import FormatError, export_results

    root = Path(results_dir).resolve()
    (root / "exports").mkdir(exist_ok=True)
    target = resolve_inside(root, f"exports/.review-download-{secrets.token_hex(6)}.zip")
    try:
        export_results(root, list(formats), target, "accepted", image_roots=image_roots, argv=["traitloc app"])
        return target.read_bytes()
    except FormatError as err:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("export_error.txt", f"traitloc export of the accepted results failed: {err}\n")
        return buf.getvalue()
    finally:
        target.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (root / "exports").rmdir()  # only when empty


# ----------------------------------------------------------------------------------------------------------------
# query engine (model once per server, per-image prefix and per-prompt gradients once per session)
# ----------------------------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the model (once per server)...")
def load_localizer(model: str, pretrained: str | None, device: str) -> Any:
    """The :class:`traitloc.localize.ConceptLocalizer` of the configured model (shared by all sessions)."""
    from traitloc.localize import ConceptLocalizer
    from traitloc.models import load_clip

    return ConceptLocalizer(load_clip(model, pretrained, device))


@dataclass
class QueryEntry:
    """What one image costs once: the model input, the prefix (forward to the target layer), cached gradients."""

    x: Any  # (1, 3, H, W) tensor
    prefix: Any  # traitloc.adapters.Prefix
    features: Any = None  # (1, D)
    alphas: dict[str, Any] = field(default_factory=dict)  # prompt -> (C,) Grad-CAM weights
    cells: dict[str, Any] = field(default_factory=dict)  # prompt -> (N, C) per-cell gradients (Layer-CAM)
    scorecam: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # (prompts, gamma, k) -> signed map


@dataclass
class QueryResult:
    map01: np.ndarray  # (H, W) in [0, 1] at the image's size
    raw_max: float
    score: float  # s_concept - gamma * s_base
    concept_score: float
    base_score: float | None


def _bump(counter: str, n: int = 1) -> None:
    st.session_state[counter] = int(st.session_state.get(counter, 0)) + n


def _entry(loc: Any, image: Image.Image, image_id: str) -> QueryEntry:
    cache: OrderedDict[str, QueryEntry] = st.session_state.setdefault(QUERY_CACHE, OrderedDict())
    key = f"{image_id}|{loc.bundle.name}|{loc.resize}"
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    x = loc.to_tensor(image).unsqueeze(0).to(loc.bundle.device)
    entry = QueryEntry(x=x, prefix=loc.prefix(x))
    _bump(FORWARD_COUNTER)
    cache[key] = entry
    while len(cache) > QUERY_CACHE_IMAGES:
        cache.popitem(last=False)
    return entry


def run_query(
    loc: Any, image: Image.Image, image_id: str, concept: str, base: str | None, gamma: float, method: str,
    scorecam_channels: int | None = 64,
) -> QueryResult:  # fmt: skip
    """Map of ``concept`` vs ``base`` at ``gamma``: cached forward pass and gradients, recombined.

    Grad-CAM and Layer-CAM gradients are linear in the explained vector, so per-prompt gradients are cached and
    ``s_concept - gamma * s_base`` is their linear combination (the engine's :meth:`GradCache.combine`); a new
    gamma costs no model pass, a new base prompt one text-tower pass and one truncated backward. Score-CAM needs
    masked forward passes; they are cached per (prompts, gamma).
    """
    import torch

    from traitloc.cam import FinerCAM, GradCache, finer_coefficients, upsample_maps
    from traitloc.export import map_to_unit

    entry = _entry(loc, image, image_id)
    prompts = list(dict.fromkeys([concept, *([base] if base else [])]))
    V = loc.text.encode(prompts)  # (P, D), cached per prompt by the text encoder
    refs = [[1]] if len(prompts) == 2 else [[]]
    g = float(gamma) if len(prompts) == 2 else 0.0
    W = finer_coefficients(len(prompts), [0], refs, g)  # (1, P)
    pre = entry.prefix
    if method == "gradcam":
        missing = [p for p in prompts if p not in entry.alphas]
        if missing:
            gc = loc.cam.gradients(pre, loc.text.encode(missing))
            _bump(GRADIENT_COUNTER)
            entry.features = gc.features
            for i, p in enumerate(missing):
                entry.alphas[p] = gc.alphas[0, i]
        gc = GradCache(pre, torch.stack([entry.alphas[p] for p in prompts])[None], entry.features)
        signed = gc.combine(W, V).signed[0, 0]
    elif method == "layercam":
        missing = [p for p in prompts if p not in entry.cells]
        if missing:
            cells = loc.adapter.grad_cells(pre, loc.text.encode(missing).to(pre.acts.dtype))  # (1, P, N, C)
            _bump(GRADIENT_COUNTER)
            for i, p in enumerate(missing):
                entry.cells[p] = cells[0, i].float()
        if entry.features is None:
            entry.features = loc.adapter.features(pre).float()
        gsum = torch.einsum("p,pnc->nc", W[0].to(pre.acts.device), torch.stack([entry.cells[p] for p in prompts]))
        signed = (gsum.clamp_min(0) * pre.acts[0].float()).sum(-1).reshape(pre.grid)
    elif method == "scorecam":
        k = (tuple(prompts), g, scorecam_channels)
        if k not in entry.scorecam:
            tau = loc.cam.score_temperature
            cam = FinerCAM(loc.adapter, "scorecam", score_temperature=tau, scorecam_channels=scorecam_channels)
            out = cam(entry.x, V, W, prefix=pre)
            _bump(MASKED_COUNTER)
            entry.scorecam[k] = out.signed[0, 0]
            entry.features = out.features
        signed = entry.scorecam[k]
    else:
        raise ValueError(f"unknown method {method!r}")
    if entry.features is None:
        entry.features = loc.adapter.features(pre).float()
    per_prompt = (entry.features.float() @ V.t().to(entry.features.device))[0]
    score = float((W[0].to(per_prompt.device) * per_prompt).sum())
    raw = upsample_maps(signed.clamp_min(0), (image.height, image.width)).cpu().numpy().astype(np.float32)
    return QueryResult(
        map01=map_to_unit(raw),
        raw_max=float(raw.max()) if raw.size else 0.0,
        score=score,
        concept_score=float(per_prompt[0]),
        base_score=float(per_prompt[1]) if len(prompts) == 2 else None,
    )


def decode_upload(data: bytes, max_side: int = WORK_MAX_SIDE) -> Image.Image:
    """Uploaded bytes -> upright 8-bit RGB image, in memory (transparency on white, first frame, bounded size)."""
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = UPLOAD_MAX_PIXELS  # decompression bombs raise instead of eating memory
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max_side, max_side))
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            if im.mode in ("I;16", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
                im = Image.fromarray(arr.astype(np.uint8))
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            im.load()
            return im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def candidate_images(cfg: AppConfig, limit: int = 500) -> list[tuple[str, Path]]:
    """Images under RESULTS_DIR (outside its output folders) and ``--images``: ``(label, path)`` pairs."""
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for root in cfg.roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not (here == root and d in OUTPUT_DIRS)
            )
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                try:
                    p = resolve_inside(root, str(here / name))
                except (PathSafetyError, OSError):
                    continue
                if p in seen or not p.is_file():
                    continue
                seen.add(p)
                prefix = "" if root == cfg.results_dir else "images: "
                out.append((prefix + (here / name).relative_to(root).as_posix(), p))
                if len(out) >= limit:
                    return out
    return out


# ----------------------------------------------------------------------------------------------------------------
# pages
# ----------------------------------------------------------------------------------------------------------------
def page_query(cfg: AppConfig) -> None:
    st.header("Query: where is this trait?")
    st.caption(
        "Finer-CAM of a text concept against a base prompt: s = s_concept - gamma * s_base. The image's forward "
        "pass and the per-prompt gradients are cached, so moving gamma recomputes nothing."
    )
    choices = candidate_images(cfg)
    sources = (["Results folder"] if choices else []) + ["Upload"]
    source = st.radio("Image", sources, horizontal=True, key="q_source")
    image: Image.Image | None = None
    image_id = ""
    if source == "Upload":
        up = st.file_uploader("Upload an image (kept in memory)", type=[s.lstrip(".") for s in IMAGE_SUFFIXES],
                              key="q_upload")  # fmt: skip
        if up is not None:
            data = up.getvalue()
            try:
                image = decode_upload(data)
            except Exception as err:  # noqa: BLE001 - any decode failure is the user's file
                st.error(f"Cannot read {up.name}: {type(err).__name__}: {err}")
            image_id = "upload:" + hashlib.sha256(data).hexdigest()
    else:
        labels = [c[0] for c in choices]
        pick = st.selectbox("Pick an image", labels, key="q_pick")
        path = dict(choices).get(pick) if pick else None
        if path is not None:
            from traitloc.imageio import ImageLoadError, load_image

            try:
                image = load_image(path, max_side=WORK_MAX_SIDE).image
            except ImageLoadError as err:
                st.error(str(err))
            sig = _file_sig(path)
            image_id = "file:" + hashlib.sha256(repr(sig).encode()).hexdigest()
    c1, c2 = st.columns(2)
    concept = c1.text_input("Concept", key="q_concept", placeholder="red epaulets").strip()
    base = c2.text_input("Base prompt (empty: plain CAM)", key="q_base", placeholder="bird").strip()
    c3, c4, c5 = st.columns([2, 1, 1])
    gamma = c3.slider("gamma (comparison strength)", 0.0, 3.0, 1.0, 0.05, key="q_gamma", disabled=not base)
    method = c4.selectbox("Method", METHODS, key="q_method")
    threshold = c5.slider("Mask threshold", 0.0, 0.95, 0.5, 0.05, key="q_threshold")
    if image is None or not concept:
        st.info("Pick or upload an image and type a concept.")
        return
    from traitloc.concepts import PromptError, check_prompt
    from traitloc.models import ModelLoadError

    try:
        concept = check_prompt(concept)
        base_p = check_prompt(base) if base else None
    except PromptError as err:
        st.error(str(err))
        return
    try:
        loc = load_localizer(cfg.model, cfg.pretrained, cfg.device)
    except ModelLoadError as err:
        st.error(f"Model could not be loaded: {err}. Start the app with --model/--pretrained.")
        return
    with st.spinner("Computing the map..."):
        res = run_query(loc, image, image_id, concept, base_p, gamma, method)
    from traitloc.export import mask_from_map

    st.session_state[LAST_QUERY] = {"map01": res.map01, "score": res.score, "method": method, "gamma": gamma}
    work = np.asarray(image)
    mask = mask_from_map(res.map01, threshold)
    i1, i2, i3 = st.columns(3)
    i1.image(work, caption="image", width="stretch")
    i2.image(overlay_rgb(work, res.map01), caption=f"overlay: {concept}", width="stretch")
    i3.image((mask.astype(np.uint8) * 255), caption=f"mask (map > {threshold:g})", width="stretch")
    m1, m2, m3 = st.columns(3)
    m1.metric("objective s", f"{res.score:.4f}")
    m2.metric(f"cos({concept[:24]})", f"{res.concept_score:.4f}")
    m3.metric("cos(base)", "-" if res.base_score is None else f"{res.base_score:.4f}")
    st.caption(
        f"model {loc.bundle.name} · method {method} · gamma {gamma if base_p else 0:g} · raw max {res.raw_max:.4g} · "
        f"image forward passes this session: {st.session_state.get(FORWARD_COUNTER, 0)} · "
        f"gradient passes: {st.session_state.get(GRADIENT_COUNTER, 0)} · "
        f"Score-CAM runs: {st.session_state.get(MASKED_COUNTER, 0)}"
    )


def _filters(folder: Folder, key: str, decisions: dict[str, Any]) -> pd.DataFrame:
    """Filter widgets (label, class pair, score range, review status, image) and the rows that pass them."""
    res = folder.results
    labels = sorted(res["label"].unique().tolist()) if not res.empty else []
    pairs = sorted({p for ps in res["pairs"] for p in ps}) if not res.empty else []
    c1, c2, c3 = st.columns([2, 2, 1])
    chosen = c1.multiselect(folder.label_name, labels, key=f"{key}_labels")
    pair = c2.selectbox("Class pair", [ALL, *pairs], key=f"{key}_pair")
    review = c3.selectbox("Review", REVIEW_FILTERS, key=f"{key}_review")
    c4, c5 = st.columns([3, 2])
    scores = res["score_f"].dropna() if not res.empty else pd.Series(dtype=float)
    score_range = None
    if len(scores) and float(scores.min()) < float(scores.max()):
        lo, hi = float(scores.min()), float(scores.max())
        step = max((hi - lo) / 200, 1e-6)
        score_range = c4.slider("Score range", lo, hi, (lo, hi), step, format="%.4f", key=f"{key}_score")
    text = c5.text_input("Image contains", key=f"{key}_text")
    return filter_results(res, labels=chosen, pair=pair, score_range=score_range, review=review,
                          decisions=decisions, text=text)  # fmt: skip


def _paged(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    n_pages = max(1, -(-len(rows) // PAGE_SIZE))
    page = 1
    if n_pages > 1:
        page = int(st.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key=f"{key}_page"))
    return rows.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]


def _triptych(cfg: AppConfig, row: dict[str, Any]) -> None:
    cols = st.columns(3)
    img = thumbnail(safe_file(cfg, str(row.get("image", ""))), "image")
    for col, (what, kind) in zip(cols, (("image", "image"), ("overlay", "image"), ("mask", "mask")), strict=True):
        arr = img if what == "image" else thumbnail(safe_file(cfg, str(row.get(what, ""))), kind)
        if arr is None:
            col.caption(f"{what}: not available" + (" (outside RESULTS_DIR)" if what == "image" else ""))
        else:
            col.image(arr, caption=what, width="stretch")


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()<>#+-.!|~:$"})


def md(text: object) -> str:
    """Text from a results file, escaped for Markdown (no links, images or formatting from file contents)."""
    return " ".join(str(text).split()).translate(_MD_SPECIAL)


def _describe(row: dict[str, Any], folder: Folder, verdicts: dict[str, list[str]], decision: Any) -> str:
    score = row.get("score_f")
    bits = [f"**{md(row['label'])}**", f"image {md(row['image_key'])}"]
    if folder.kind == "explain":
        bits.append(f"vs {md(row.get('references', '') or '-')} · predicted {md(row.get('predicted', ''))}")
    else:
        bits.append(f"vs {md(row.get('base', '') or NO_BASE)}")
    bits.append(f"gamma {md(row.get('gamma', ''))} · {md(row.get('method', ''))}")
    if score is not None and score == score:
        bits.append(f"score {score:.4f}")
    bits.append(STATUS_BADGE.get(decision.status, "") if decision is not None else "unreviewed")
    text = " · ".join(b for b in bits if b)
    found = [f"{md(p)}: {md(v)}" for p in row["pairs"] for v in verdicts.get(p, [])]
    if found:
        text += "  \naudit: " + " | ".join(found)
    return text


def _no_folder(cfg: AppConfig) -> bool:
    if cfg.results_dir is None:
        st.info("No results folder: start the app with `traitloc app RESULTS_DIR` to browse and review results.")
        return True
    return False


def page_browse(cfg: AppConfig) -> None:
    st.header("Browse")
    if _no_folder(cfg):
        return
    folder = load_folder(cfg)
    decisions = ReviewStore(cfg.results_dir, readonly=True).decisions()  # type: ignore[arg-type]
    verdicts = pair_verdicts(folder)
    if folder.kind == "empty":
        st.warning(f"{cfg.results_dir} has no results.csv, audit.csv or audit_summary.csv.")
        return
    if folder.kind in ("localize", "explain"):
        rows = _filters(folder, "b", decisions)
        st.markdown(f"**{len(rows)}** of {len(folder.results)} results ({folder.kind})")
        for row in _paged(rows, "b").to_dict("records"):
            with st.container(border=True):
                st.markdown(_describe(row, folder, verdicts, decisions.get(row["result_id"])))
                _triptych(cfg, row)
        if not folder.failed.empty:
            with st.expander(f"{len(folder.failed)} failed rows"):
                st.dataframe(folder.failed[[c for c in ("image", "status") if c in folder.failed.columns]])
    if folder.summary is not None and not folder.summary.empty:
        st.subheader("Audit verdict per class pair")
        summ = folder.summary
        pairs = sorted(f"{t} vs {d}" for t, d in zip(summ["true_class"], summ["similar_class"], strict=True))
        pick = st.selectbox("Audit class pair", [ALL, *dict.fromkeys(pairs)], key="b_audit_pair")
        if pick != ALL:
            summ = summ[(summ["true_class"] + " vs " + summ["similar_class"]) == pick]
        cols = [c for c in ("source", "true_class", "similar_class", "n_images", "accuracy", "lift", "verdict")
                if c in summ.columns]  # fmt: skip
        st.dataframe(summ[cols], hide_index=True, key="b_audit_table")
    if folder.audit is not None and not folder.audit.empty:
        with st.expander(f"audit.csv ({len(folder.audit)} rows)"):
            st.dataframe(folder.audit, hide_index=True)


def _decide(cfg: AppConfig, who: str, result_id: str, status: str, note_key: str) -> None:
    note = str(st.session_state.get(note_key, "") or "")
    ReviewStore(cfg.results_dir, who=who).set(result_id, status, note)  # type: ignore[arg-type]
    st.session_state["review_last"] = f"{result_id}: {status}"


def _widget_key(prefix: str, result_id: str) -> str:
    return f"{prefix}_{hashlib.sha1(result_id.encode()).hexdigest()[:16]}"


def page_review(cfg: AppConfig) -> None:
    st.header("Review")
    if _no_folder(cfg):
        return
    folder = load_folder(cfg)
    if folder.results.empty:
        st.warning("No maps to review here (a localize or explain results folder has them).")
        return
    who = str(st.session_state.get("reviewer") or cfg.user or "reviewer")
    store = ReviewStore(cfg.results_dir, who=who)  # type: ignore[arg-type]
    decisions = store.decisions()
    verdicts = pair_verdicts(folder)
    counts = store.counts()
    n = len(folder.results)
    reviewed = sum(1 for r in folder.results["result_id"] if r in decisions)
    st.progress(reviewed / n if n else 0.0, text=f"{reviewed} of {n} reviewed · " + " · ".join(
        f"{k} {v}" for k, v in counts.items()))  # fmt: skip
    _export_section(cfg, folder)
    if st.session_state.get("review_last"):
        st.caption(f"saved: {st.session_state['review_last']}")
    rows = _filters(folder, "r", decisions)
    st.markdown(f"**{len(rows)}** of {n} results")
    for row in _paged(rows, "r").to_dict("records"):
        rid = row["result_id"]
        d = decisions.get(rid)
        note_key = _widget_key("note", rid)
        if note_key not in st.session_state:
            st.session_state[note_key] = d.note if d is not None else ""
        with st.container(border=True, key=_widget_key("card", rid)):
            st.markdown(_describe(row, folder, verdicts, d))
            _triptych(cfg, row)
            st.text_input("Note", key=note_key, placeholder="what is right or wrong with this map")
            b1, b2, b3, _ = st.columns([1, 1, 1, 3])
            for col, status, label in zip((b1, b2, b3), STATUSES, ("Accept", "Reject", "Needs work"), strict=True):
                col.button(
                    label,
                    key=_widget_key(status, rid),
                    on_click=_decide,
                    args=(cfg, who, rid, status, note_key),
                    type="primary" if d is not None and d.status == status else "secondary",
                )


def _export_section(cfg: AppConfig, folder: Folder) -> None:
    results_dir = cfg.results_dir
    assert results_dir is not None
    known = set(folder.results["result_id"])
    n_accepted = sum(1 for i in accepted_ids(cfg) if i in known)
    problem = export_problem(cfg)
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    available = export_formats()
    fmts = c1.multiselect(
        "Export formats", available, default=[f for f in DEFAULT_FORMATS if f in available], key="r_formats"
    )
    roots = cfg.roots
    c2.download_button(
        f"Download accepted ({n_accepted}) as zip",
        data=lambda: build_export_zip(results_dir, fmts, roots),  # built on click, with the decisions of then
        file_name=f"{results_dir.name}-accepted.zip",
        mime="application/zip",
        disabled=not n_accepted or not fmts or problem is not None,
        key="r_download",
    )
    if problem is not None:
        st.error(f"Export unavailable: {problem}")


def main() -> None:
    """The app: configuration, sidebar page choice (also ``?page=Review`` in the URL), the chosen page."""
    st.set_page_config(page_title="traitloc review", layout="wide")
    cfg = load_config()
    for err in cfg.errors:
        st.error(err)
    st.session_state.setdefault(FORWARD_COUNTER, 0)
    st.session_state.setdefault(GRADIENT_COUNTER, 0)
    st.session_state.setdefault(MASKED_COUNTER, 0)
    if "page" not in st.session_state:
        wanted = st.query_params.get("page", "")
        st.session_state["page"] = wanted if wanted in PAGES else ("Browse" if cfg.results_dir else "Query")
    with st.sidebar:
        st.title("traitloc")
        page = st.radio("Page", PAGES, key="page")
        if cfg.results_dir:
            st.caption(f"results: `{cfg.results_dir.name}`", help=str(cfg.results_dir))
        else:
            st.caption("no results folder")
        weights = Path(cfg.pretrained).name if cfg.pretrained else "random weights"
        st.caption(f"model: `{Path(cfg.model).stem}` ({weights})", help=f"{cfg.model} · {cfg.pretrained}")
        if "reviewer" not in st.session_state:
            st.session_state["reviewer"] = cfg.user or _os_user()
        st.text_input("Reviewer", key="reviewer")
    if st.query_params.get("page") != page:
        st.query_params["page"] = page
    {"Query": page_query, "Browse": page_browse, "Review": page_review}[page](cfg)


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


if __name__ == "__main__":
    main()
