"""traitloc review app: review a run's maps as a grid of thumbnails, with the keyboard; query concepts interactively.

Start it with ``traitloc app [RESULTS_DIR] [--port 8501]`` (binds to 127.0.0.1), or directly with
``streamlit run apps/review.py -- [RESULTS_DIR] [--images DIR] [--model NAME|CONFIG.json] [--pretrained TAG|FILE]``.
Pages (Review, Browse, Query), keys, files and configuration: ``docs/store.md`` ("Review decisions and the review
app") and the README ("Review and export").
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import importlib.util
import io
import json
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from traitloc.data.images import ImageLoadError, load_image
from traitloc.io import reviewkit as rk
from traitloc.io.decisions import STATUSES, PathSafetyError, ReviewStore, resolve_inside
from traitloc.io.files import map_to_unit, mask_from_map, overlay_array

PAGES = ("Review", "Browse", "Query")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")
UPLOAD_MAX_PIXELS = 100_000_000
WORK_MAX_SIDE = 2048
#: thumbnail side in pixels (the grid renders every map at this size, never full size)
THUMB_SIDE = 128
DETAIL_SIDE = 720
PAGE_SIZES = (24, 48, 96)
DEFAULT_PAGE_SIZE = 48
#: formats of an export by default (traitloc.pipelines.export)
DEFAULT_FORMATS = ("png", "tiff", "csv")
QUERY_CACHE_IMAGES = 4
FORWARD_COUNTER = "traitloc_forward_passes"
GRADIENT_COUNTER = "traitloc_gradient_passes"  # truncated backward passes (Grad-CAM, Layer-CAM weights)
MASKED_COUNTER = "traitloc_masked_passes"  # Score-CAM masked-feature runs (K masked forward passes each)
MODEL_LOADS = "traitloc_model_load_attempts"
QUERY_CACHE = "traitloc_query_cache"
#: the last Query map and its settings (for tests and scripts)
LAST_QUERY = "traitloc_last_query"
NO_BASE = "(none)"
ALL = "(all)"
REVIEW_FILTERS = ("all", "unreviewed", *STATUSES)
STATUS_MARK = {"accepted": "✓ accepted", "rejected": "✗ rejected", "needs-work": "~ needs work", None: "○ unreviewed"}
#: what a change of gamma (or of the base prompt) costs, per Query method: shown under the gamma slider
_RECOMBINE = ("a new gamma recombines the cached per-{} gradients: no model pass (a new base prompt: one "
              "text-tower pass and one truncated backward pass)")  # fmt: skip
GAMMA_COST = {
    "gradcam": _RECOMBINE.format("prompt"),
    "layercam": _RECOMBINE.format("cell"),
    "scorecam": "the first map of an image costs one masked forward pass per channel (64, with progress; "
    "cancellable); a new gamma or base prompt reuses those masked features: no model pass",
    **{
        m: "a new gamma or base prompt is a product on the cached per-patch embeddings: no model pass"
        for m in ("maskclip", "clearclip", "sclip", "naclip", "gem")
    },
    "legrad": _RECOMBINE.format("prompt attention"),
}
#: keyboard shortcuts: key -> (button key, what it does); the page lists them
SHORTCUTS: dict[str, tuple[str, str]] = {
    key: action
    for keys, action in (
        (("a",), ("kb_accept", "accept")), (("r", "x"), ("kb_reject", "reject")), (("w",), ("kb_needs", "needs work")),
        (("j", "ArrowRight"), ("kb_next", "next")), (("k", "ArrowLeft"), ("kb_prev", "previous")),
        (("u",), ("kb_undo", "undo")), (("s",), ("kb_select", "select / unselect")),
        (("PageDown",), ("kb_pgnext", "next page")), (("PageUp",), ("kb_pgprev", "previous page")),
    )
    for key in keys
}  # fmt: skip
#: the Review page's decision buttons: (label, button key, status)
DECISION_BUTTONS = (("Accept (a)", "kb_accept", "accepted"), ("Reject (r)", "kb_reject", "rejected"),
                    ("Needs work (w)", "kb_needs", "needs-work"))  # fmt: skip


# ---- configuration -------------------------------------------------------------------------------------------------
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
        """Folders that paths from uploads or query parameters may name (RESULTS_DIR, then ``--images``)."""
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
    results, images = (
        None if value is None or not Path(value).expanduser().is_dir() else Path(value).expanduser().resolve()
        for value in (args.results_dir, args.images)
    )
    for name, value, folder in (("RESULTS_DIR", args.results_dir, results), ("--images", args.images, images)):
        if value is not None and folder is None:
            errors.append(f"{name}: not a folder: {value}")
    pretrained = None if str(args.pretrained).lower() in ("", "none") else str(args.pretrained)
    return AppConfig(results, images, str(args.model), pretrained, str(args.device), args.user, tuple(errors))


# ---- safe file access (paths that come from uploads or query parameters) -------------------------------------------
def safe_file(cfg: AppConfig, path: str, *, roots: Sequence[Path] | None = None) -> Path | None:
    """``path`` (relative to RESULTS_DIR, or absolute) resolved inside one of the allowed roots, or ``None``.

    For paths that come from the browser (query parameters, uploads): relative paths are taken relative to
    RESULTS_DIR only; an absolute path is accepted inside RESULTS_DIR or the ``--images`` folder. Photos recorded by
    the run itself are found with :func:`photo_path` instead.
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


def _file_sig(path: Path, missing: Any = ...) -> Any:
    """``(path, mtime_ns, size)`` of a file; ``missing`` when it cannot be read (raises ``OSError`` if not given)."""
    try:
        st_ = path.stat()
    except OSError:
        if missing is ...:
            raise
        return missing
    return (str(path), st_.st_mtime_ns, st_.st_size)


# ---- the store, decisions, thumbnails (shared by all sessions, bounded) --------------------------------------------
@st.cache_resource(max_entries=4, show_spinner=False)
def _table_cached(out: str, sig: tuple[Any, ...]) -> rk.ReviewTable:
    return rk.load_table(out)


def load_table(cfg: AppConfig) -> rk.ReviewTable:
    """The run's results table (re-read when a part is added)."""
    assert cfg.results_dir is not None
    return _table_cached(str(cfg.results_dir), rk.store_signature(cfg.results_dir))


@st.cache_resource(show_spinner=False)
def _caches() -> dict[str, Any]:
    """Server-wide bounded caches: part grids, decoded photo thumbnails, drawn tiles, full-size detail renders."""
    return {"grids": rk.GridCache(max_parts=64), "photos": rk.LRU(3000), "tiles": rk.LRU(6000), "full": rk.LRU(4)}


def _db_sig(cfg: AppConfig) -> tuple[Any, ...]:
    db = cfg.results_dir / "review.sqlite"  # type: ignore[operator]
    return (_file_sig(db, None), _file_sig(db.with_name("review.sqlite-wal"), None))


@st.cache_resource(max_entries=4, show_spinner=False)
def _decisions_cached(root: str, sig: tuple[Any, ...]) -> dict[str, Any]:
    return ReviewStore(root, readonly=True).decisions()


def current_decisions(cfg: AppConfig) -> dict[str, Any]:
    """``result_id -> Decision`` of review.sqlite (re-read when the database changes; treat as read-only)."""
    return _decisions_cached(str(cfg.results_dir), _db_sig(cfg))


def photo_path(cfg: AppConfig, table: rk.ReviewTable, image: Any) -> Path | None:
    """A row's photo: where the run recorded it (read-only, anywhere on this disk), else under ``--images``."""
    cwd = table.run_info.get("cwd") if isinstance(table.run_info.get("cwd"), str) else None
    return rk.find_photo(str(image) if isinstance(image, str) else "", cfg.results_dir, cfg.images_dir, cwd)


def photo_thumb(path: Path | None, side: int = THUMB_SIDE) -> np.ndarray | None:
    """A decoded thumbnail of a photo (cached), or ``None`` when it cannot be read."""
    sig = None if path is None else _file_sig(path, None)
    if sig is None:
        return None

    def make() -> np.ndarray | None:
        try:
            return rk.photo_thumbnail(path, side)
        except Exception:  # noqa: BLE001 - an unreadable photo shows as missing, the page goes on
            return None

    return _caches()["photos"].get((sig, side), make)


@dataclass(frozen=True)
class View:
    """How maps are drawn: mode (outline / overlay), opacity, mask threshold."""

    mode: str = "outline"
    alpha: float = 0.6
    threshold: float = 0.5


def tile_bytes(cfg: AppConfig, table: rk.ReviewTable, row: dict[str, Any], view: View) -> tuple[bytes | None, str]:
    """JPEG bytes of a row's thumbnail tile and a problem ('' when none); cached per row, store and view."""
    caches = _caches()
    photo = photo_path(cfg, table, row.get("image"))
    key = (str(table.out), row["result_id"], int(row["_part"]), int(row["_row"]), str(table.parts[int(row["_part"])]),
           view, photo is not None)  # fmt: skip

    def make() -> tuple[bytes | None, str]:
        try:
            full = caches["grids"].row_with_grid(table, row)
        except Exception as err:  # noqa: BLE001 - a bad row is reported on the page, not fatal
            return None, f"map unreadable: {err}"
        thumb = photo_thumb(photo)
        data = rk.tile(full, thumb, THUMB_SIDE, view.mode, view.alpha, view.threshold)
        return data, "" if thumb is not None else "photo not found"

    return caches["tiles"].get(key, make)


# ---- filters and the frozen list -----------------------------------------------------------------------------------
def pairs_of(table: rk.ReviewTable) -> pd.Series:
    """Per row, its class pairs ``"target vs reference"`` (explain) or ``"concept vs base"`` (localize)."""
    rows = table.rows
    if rows.empty:
        return pd.Series([], dtype=object)
    if table.kind == "explain":
        refs = rows["references"].astype("string").fillna("") if "references" in rows else pd.Series("", rows.index)
        return pd.Series(
            [
                [f"{t} vs {r.strip()}" for r in str(rs).split(";") if r.strip()] or [str(t)]
                for t, rs in zip(rows["label"], refs, strict=True)
            ],
            index=rows.index,
        )
    base = rows["base"].astype("string").fillna("") if "base" in rows else pd.Series("", index=rows.index)
    return pd.Series([[f"{c} vs {b or NO_BASE}"] for c, b in zip(rows["label"], base, strict=True)], index=rows.index)


def status_of(rows: pd.DataFrame, decisions: dict[str, Any]) -> pd.Series:
    """The review status of each row: a decision's status, or ``"unreviewed"``."""
    m = {r: d.status for r, d in decisions.items()}
    return pd.Series([m.get(r, "unreviewed") for r in rows["result_id"]], index=rows.index, dtype=object)


def filter_rows(
    table: rk.ReviewTable,
    *,
    labels: Sequence[str] = (),
    pair: str = ALL,
    score_range: tuple[float, float] | None = None,
    review: str = "all",
    decisions: dict[str, Any] | None = None,
    text: str = "",
) -> pd.DataFrame:
    """Rows of the table that pass the filters (labels: any of; pair: one class pair; review status; image text)."""
    rows = table.rows
    if rows.empty:
        return rows
    keep = pd.Series(True, index=rows.index)
    if labels:
        keep &= rows["label"].isin(list(labels))
    if pair != ALL:
        keep &= pairs_of(table).map(lambda ps: pair in ps)
    if score_range is not None:
        lo, hi = score_range
        s = rows["score_f"]
        keep &= s.isna() | ((s >= lo - 1e-9) & (s <= hi + 1e-9))
    if review != "all":
        keep &= status_of(rows, decisions or {}) == review
    if text:
        keep &= rows["image_key"].astype(str).str.contains(text, case=False, regex=False)
    return rows[keep]


@dataclass
class Frozen:
    """The order of the grid, frozen for the session and filter: decisions never move items."""

    sig: tuple[Any, ...]
    ids: list[str]
    groups: list[str]
    made: str
    pos: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pos = {r: i for i, r in enumerate(self.ids)}


# ---- decisions (callbacks of the buttons and shortcuts) ------------------------------------------------------------
def _who(cfg: AppConfig) -> str:
    return str(st.session_state.get("reviewer") or cfg.user or "reviewer").strip() or "reviewer"


def _writable(cfg: AppConfig) -> ReviewStore:
    return ReviewStore(cfg.results_dir, who=_who(cfg))  # type: ignore[arg-type]


def _readonly(cfg: AppConfig) -> ReviewStore:
    return ReviewStore(cfg.results_dir, readonly=True)  # type: ignore[arg-type]


def _next_undecided(ids: list[str], start: int, decisions: dict[str, Any]) -> int:
    """The first undecided item after ``start`` (wrapping around), else the item after ``start``."""
    n = len(ids)
    for k in range(1, n + 1):
        i = (start + k) % n
        if ids[i] not in decisions:
            return i
    return min(start + 1, n - 1)


def decide(cfg: AppConfig, key: str, status: str) -> None:
    """Record ``status`` for the current item and move to the next undecided one (button/shortcut callback)."""
    fr: Frozen | None = st.session_state.get(f"{key}_frozen")
    if fr is None or not fr.ids:
        return
    cur = min(int(st.session_state.get(f"{key}_cursor", 0)), len(fr.ids) - 1)
    rid = fr.ids[cur]
    store = _writable(cfg)
    prev = store.get(rid)
    pending = st.session_state.setdefault("rv_pending_notes", {})
    notes = {rid: pending[rid]} if rid in pending else None
    entry = rk.apply_decision(store, [rid], status, {rid: prev} if prev else {}, notes)
    pending.pop(rid, None)
    st.session_state.setdefault("rv_undo", []).append(entry)
    after = {**current_decisions(cfg), rid: True}
    st.session_state[f"{key}_cursor"] = _next_undecided(fr.ids, cur, after)
    st.session_state["rv_last"] = f"saved: {rid} {status}"


def undo_last(cfg: AppConfig, key: str) -> None:
    """Undo the last change of this session (one decision or one bulk decision) and go back to it."""
    stack: list[rk.UndoEntry] = st.session_state.get("rv_undo", [])
    if not stack:
        st.session_state["rv_last"] = "nothing to undo"
        return
    entry = stack.pop()
    rk.undo(_writable(cfg), entry)
    fr: Frozen | None = st.session_state.get(f"{key}_frozen")
    if fr is not None and entry.before and entry.before[0][0] in fr.pos:
        st.session_state[f"{key}_cursor"] = fr.pos[entry.before[0][0]]
    st.session_state["rv_last"] = f"undone: {entry.label}"


def move(key: str, step: int, page_size: int | None = None) -> None:
    """Move the cursor by ``step`` items (or to the first item of the next/previous page)."""
    fr: Frozen | None = st.session_state.get(f"{key}_frozen")
    if fr is None or not fr.ids:
        return
    cur = int(st.session_state.get(f"{key}_cursor", 0))
    if page_size:
        cur = (cur // page_size + step) * page_size
    else:
        cur += step
    st.session_state[f"{key}_cursor"] = max(0, min(cur, len(fr.ids) - 1))


def toggle_select(key: str) -> None:
    """Add the current item to the selection of bulk decisions, or take it out (button/shortcut callback)."""
    fr: Frozen | None = st.session_state.get(f"{key}_frozen")
    if fr is None or not fr.ids:
        return
    rid = fr.ids[min(int(st.session_state.get(f"{key}_cursor", 0)), len(fr.ids) - 1)]
    sel: set[str] = st.session_state.setdefault("rv_selected", set())
    sel.symmetric_difference_update({rid})
    st.session_state["rv_bulk_scope"] = "selection" if sel else "filter"


def save_note(cfg: AppConfig, rid: str, widget: str) -> None:
    """Save a note as it is edited: at once when the result has a decision, else kept for the decision."""
    note = str(st.session_state.get(widget, "") or "")
    d = _readonly(cfg).get(rid)
    if d is not None:
        _writable(cfg).set(rid, d.status, note)
        st.session_state["rv_note_status"] = (rid, f"note saved {time.strftime('%H:%M:%S')}")
    else:
        st.session_state.setdefault("rv_pending_notes", {})[rid] = note
        st.session_state["rv_note_status"] = (rid, "note kept: it is saved with your decision")


def bulk_apply(cfg: AppConfig) -> None:
    """Apply the confirmed bulk decision (one transaction), undoable as one change."""
    pending = st.session_state.pop("rv_bulk", None)
    if not pending:
        return
    status, ids = pending["status"], pending["ids"]
    entry = rk.apply_decision(_writable(cfg), ids, status, _readonly(cfg).decisions())
    st.session_state.setdefault("rv_undo", []).append(entry)
    st.session_state["rv_last"] = f"saved: {status} for {len(ids)} results"
    st.session_state["rv_selected"] = set()
    st.session_state["rv_bulk_scope"] = "filter"


# ---- export --------------------------------------------------------------------------------------------------------
def export_formats() -> tuple[str, ...]:
    """Formats of :mod:`traitloc.pipelines.export` this installation writes (Parquet only with pyarrow/fastparquet)."""
    from traitloc.pipelines.export import FORMATS

    has_parquet = any(importlib.util.find_spec(m) is not None for m in ("pyarrow", "fastparquet"))
    return tuple(f for f in FORMATS if f != "parquet" or has_parquet)


def write_export(
    results_dir: Path,
    formats: Sequence[str],
    selection: str | Sequence[str],
    name: str,
    progress: Callable[[int, int], None] | None = None,
    image_roots: Sequence[Path] | None = None,
) -> Path:
    """Export ``selection`` (a status such as ``"accepted"`` or result ids) to ``RESULTS_DIR/exports/NAME.zip``.

    :func:`traitloc.pipelines.export.export_results` streams the zip to a temporary file and renames it when complete;
    ``progress(done, total)`` is called as results are written. Returns the zip's path.

    Raises
    ------
    traitloc.pipelines.export.FormatError
        With the reason (nothing selected, an unsafe path...).
    """
    from traitloc.pipelines.export import export_results

    root = Path(results_dir).resolve()
    (root / "exports").mkdir(exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "export"
    target = resolve_inside(root, f"exports/{safe}.zip")
    sel = selection if isinstance(selection, str) else list(selection)
    export_results(root, list(formats), target, sel, as_zip=True, image_roots=image_roots,
                   argv=["traitloc app"], progress=progress or False)  # fmt: skip
    return target


# ---- keyboard ------------------------------------------------------------------------------------------------------
_KEY_SCRIPT = """
<script>
(function () {
  const win = window.parent;
  if (win.__traitlocKeys) return;
  win.__traitlocKeys = true;
  const s = win.document.createElement('script');
  s.textContent = `(function () {
    const MAP = %MAP%;
    document.addEventListener('keydown', function (e) {
      const t = e.target || {};
      const tag = (t.tagName || '').toLowerCase();
      if (tag === 'input' || tag === 'textarea' || tag === 'select' || t.isContentEditable ||
          (t.getAttribute && t.getAttribute('role') === 'slider')) {
        if (e.key === 'Escape' && t.blur) t.blur();
        return;
      }
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      if (e.key === 'n') {
        const note = document.querySelector('.st-key-note_box input');
        if (note) { e.preventDefault(); note.focus(); }
        return;
      }
      const key = MAP[e.key];
      if (!key) return;
      const btn = document.querySelector('.st-key-' + key + ' button');
      if (btn && !btn.disabled) { e.preventDefault(); e.stopPropagation(); btn.click(); }
    }, true);
  })();`;
  win.document.head.appendChild(s);
})();
</script>
"""


def keyboard() -> None:
    """Install the page's keyboard shortcuts once per browser tab: keys click the (visible) shortcut buttons."""
    with st.container(key="kb_script", height=1, border=False):
        st.iframe(_KEY_SCRIPT.replace("%MAP%", json.dumps({k: v[0] for k, v in SHORTCUTS.items()})), height=1)


_CSS = """
<style>
[class*="st-key-grid_"] [data-testid="stImageCaption"] { font-size: 0.72rem; line-height: 1.2; }
</style>
"""


# ---- the grid pages ------------------------------------------------------------------------------------------------
def _filters(table: rk.ReviewTable, key: str, decisions: dict[str, Any]) -> tuple[pd.DataFrame, tuple[Any, ...]]:
    """Filter widgets (in the sidebar) and the rows that pass them, with a signature of the filter values."""
    rows = table.rows
    labels = sorted(rows["label"].unique().tolist()) if not rows.empty else []
    chosen = st.multiselect(table.label_name, labels, key=f"{key}_labels")
    pair = ALL
    if table.kind == "explain":
        pairs = sorted({p for ps in pairs_of(table) for p in ps})
        pair = st.selectbox("Class pair", [ALL, *pairs], key=f"{key}_pair")
    c1, c2 = st.columns(2)
    review = c1.selectbox("Review status", REVIEW_FILTERS, key=f"{key}_review")
    text = c2.text_input("Image contains", key=f"{key}_text")
    scores = rows["score_f"].dropna() if not rows.empty else pd.Series(dtype=float)
    score_range = None
    if len(scores) and float(scores.min()) < float(scores.max()):
        lo, hi = float(scores.min()), float(scores.max())
        step = max((hi - lo) / 200, 1e-6)
        score_range = st.slider("Score range", lo, hi, (lo, hi), step, format="%.4f", key=f"{key}_score")
    out = filter_rows(table, labels=chosen, pair=pair, score_range=score_range, review=review,
                      decisions=decisions, text=text)  # fmt: skip
    return out, (tuple(chosen), pair, score_range, review, text)


def _view_controls(key: str, per_photo: int = 2) -> tuple[str, str, View, int]:
    c1, c2 = st.columns(2)
    group = c1.selectbox("Group by", rk.GROUPINGS, key=f"{key}_group", format_func=lambda g: f"per {g}",
                         index=0 if per_photo > 1 else 2)  # fmt: skip
    sort = c2.selectbox("Sort by", rk.SORTS, key=f"{key}_sort")
    c3, c4 = st.columns(2)
    mode = c3.selectbox("Show map as", rk.DISPLAY_MODES, key=f"{key}_mode")
    page_size = c4.selectbox("Per page", PAGE_SIZES, index=PAGE_SIZES.index(DEFAULT_PAGE_SIZE), key=f"{key}_psize")
    alpha = st.slider("Opacity", 0.1, 1.0, 0.6, 0.05, key=f"{key}_alpha")
    threshold = st.slider("Mask threshold", 0.05, 0.95, 0.5, 0.05, key=f"{key}_threshold",
                          help="the outline is the border of map / max > threshold")  # fmt: skip
    return group, sort, View(mode, float(alpha), float(threshold)), int(page_size)


@st.cache_resource(show_spinner=False)
def _orders() -> rk.LRU:
    """Server-wide cache of grid orders (sorting 48,000 rows once per filter, not once per session)."""
    return rk.LRU(32)


def _frozen(cfg: AppConfig, table: rk.ReviewTable, key: str, rows: pd.DataFrame, sig: tuple[Any, ...],
            refresh: bool) -> Frozen:  # fmt: skip
    fr: Frozen | None = st.session_state.get(f"{key}_frozen")
    full_sig = (str(table.out), len(table.parts), *sig)
    if fr is None or fr.sig != full_sig or refresh:
        needs_db = sig[3] != "all"  # the review-status filter depends on the decisions of now
        order_key = (str(table.out), rk.store_signature(table.out), sig, _db_sig(cfg) if needs_db else None)
        ids, groups = _orders().get(order_key, lambda: rk.order_rows(rows, *sig[-2:]))  # group, sort
        cur = int(st.session_state.get(f"{key}_cursor", 0))
        keep_rid = fr.ids[min(cur, len(fr.ids) - 1)] if fr and fr.ids else None
        fr = Frozen(full_sig, ids, groups, time.strftime("%H:%M:%S"))
        st.session_state[f"{key}_frozen"] = fr
        st.session_state[f"{key}_cursor"] = fr.pos.get(keep_rid, 0) if keep_rid else 0
    return fr


def _tile_caption(row: dict[str, Any], pos: int, decision: Any, selected: bool, group: str) -> str:
    score = row.get("score_f")
    image, label = str(row["image_key"]), str(row["label"])
    what = {"trait": image, "none": f"{image} · {label}"}.get(group, label)
    s = f"{score:.3f}" if score is not None and score == score else "-"
    mark = STATUS_MARK[decision.status if decision is not None else None]
    return f"#{pos + 1} {what} · {s} · {mark}" + (" · selected" if selected else "")


def _placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (THUMB_SIDE, THUMB_SIDE * 3 // 4), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _goto_number(key: str) -> None:
    st.session_state[f"{key}_cursor"] = max(0, int(st.session_state.get(f"{key}_goto", 1)) - 1)


def _grid(cfg: AppConfig, table: rk.ReviewTable, key: str, fr: Frozen, view: View, page_size: int,
          decisions: dict[str, Any], group: str) -> None:  # fmt: skip
    """One page of thumbnails: one image list per group (cheap to draw), the current item framed by CSS."""
    n = len(fr.ids)
    cur = min(int(st.session_state.get(f"{key}_cursor", 0)), n - 1)
    page = cur // page_size
    n_pages = -(-n // page_size)
    first = page * page_size
    ids = fr.ids[first : first + page_size]
    sel: set[str] = st.session_state.get("rv_selected", set())
    records = table.rows.iloc[table.positions(ids)].to_dict("records")
    problems = st.session_state.setdefault(f"{key}_tile_problems", {})
    c1, c2, c3, c4 = st.columns([1, 1, 1.2, 3], vertical_alignment="bottom")
    c1.button("◀ Page", key="kb_pgprev", on_click=move, args=(key, -1, page_size), disabled=page == 0,
              help="PageUp")  # fmt: skip
    c2.button("Page ▶", key="kb_pgnext", on_click=move, args=(key, 1, page_size), disabled=page >= n_pages - 1,
              help="PageDown")  # fmt: skip
    st.session_state[f"{key}_goto"] = cur + 1
    c3.number_input("Go to item", 1, n, key=f"{key}_goto", on_change=_goto_number, args=(key,))
    c4.caption(f"items {first + 1}–{first + len(ids)} of {n} · page {page + 1} of {n_pages} · list frozen at "
               f"{fr.made}: decided items stay until Refresh list")  # fmt: skip
    segments = groupby(enumerate(records, first), key=lambda item: fr.groups[item[0]])
    css = []
    for s_i, (g, group_items) in enumerate(segments):
        items = list(group_items)
        if group != "none":
            st.text(f"{'photo' if group == 'photo' else table.label_name.lower()}: {g}  ({len(items)} on this page)")
        images, captions = [], []
        for j, (pos, rec) in enumerate(items):
            rid = rec["result_id"]
            data, problem = tile_bytes(cfg, table, rec, view)
            if problem:
                problems[rid] = problem
            images.append(data if data is not None else _placeholder())
            caption = _tile_caption(rec, pos, decisions.get(rid), rid in sel, group)
            captions.append(caption + (f" · {problem}" if problem else ""))
            if pos == cur:
                css.append(f".st-key-grid_{s_i} [data-testid='stImageContainer']:nth-child({j + 1}) img")
        with st.container(key=f"grid_{s_i}"):
            st.image(images, caption=captions, width=THUMB_SIDE)
    if css:  # our own static selector: the frame of the current item
        st.markdown(f"<style>{css[0]} {{ outline: 4px solid #ff4b4b; outline-offset: -4px; }}</style>",
                    unsafe_allow_html=True)  # fmt: skip


def _describe(row: dict[str, Any], table: rk.ReviewTable, decision: Any) -> list[str]:
    """Plain-text lines describing a result (shown with ``st.text``: no Markdown, no links)."""
    lines = [f"{row['label']}  ·  image {row['image_key']}"]
    if table.kind == "explain":
        lines.append(f"vs {row.get('references') or '-'}  ·  predicted {row.get('predicted', '')}")
    else:
        lines.append(f"vs {row.get('base') or NO_BASE}")
    score = row.get("score_f")
    bits = [f"gamma {row.get('gamma', '')}", str(row.get("method", ""))]
    if score is not None and score == score:
        bits.append(f"score {score:.4f}")
    lines.append("  ·  ".join(bits))
    lines.append(STATUS_MARK[decision.status if decision is not None else None]
                 + (f"  ·  note: {decision.note}" if decision is not None and decision.note else ""))  # fmt: skip
    return lines


def _detail(cfg: AppConfig, table: rk.ReviewTable, key: str, fr: Frozen, view: View, decisions: dict[str, Any],
            review: bool) -> None:  # fmt: skip
    n = len(fr.ids)
    cur = min(int(st.session_state.get(f"{key}_cursor", 0)), n - 1)
    rid = fr.ids[cur]
    row = table.rows.iloc[table.positions([rid])[0]].to_dict()
    d = decisions.get(rid)
    st.subheader(f"Item {cur + 1} of {n}")
    st.text("\n".join(_describe(row, table, d)))
    photo = photo_path(cfg, table, row.get("image"))
    z1, z2, z3 = st.columns(3)
    zoom = z1.select_slider("Zoom", [1, 2, 4, 8], value=1, key=f"{key}_zoom")
    cx = z2.slider("Pan x", 0.0, 1.0, 0.5, 0.05, key=f"{key}_panx", disabled=zoom == 1)
    cy = z3.slider("Pan y", 0.0, 1.0, 0.5, 0.05, key=f"{key}_pany", disabled=zoom == 1)
    try:
        img = detail_image(cfg, table, row, photo, view, int(zoom), float(cx), float(cy))
        st.image(img, width="stretch", caption=f"{'zoom ' + str(zoom) + 'x of the ' if zoom > 1 else ''}full-size "
                 f"photo, {row['width']} x {row['height']} px")  # fmt: skip
    except Exception as err:  # noqa: BLE001 - shown, the page goes on
        st.error(f"cannot draw this result: {err}")
    if photo is None:
        st.warning("photo not found (moved or deleted?): start the app with --images FOLDER to show it")
        st.text(f"recorded path: {row.get('image', '')}")
    else:
        st.caption("photo (read-only):")
        st.text(str(photo))
    if review:
        note_key = "note_" + hashlib.sha1(rid.encode()).hexdigest()[:16]
        if note_key not in st.session_state:
            pending = st.session_state.get("rv_pending_notes", {})
            st.session_state[note_key] = pending.get(rid, d.note if d is not None else "")
        with st.container(key="note_box"):
            st.text_input("Note (n; Enter saves)", key=note_key, on_change=save_note, args=(cfg, rid, note_key),
                          placeholder="what is right or wrong with this map")  # fmt: skip
        ns = st.session_state.get("rv_note_status")
        if ns and ns[0] == rid:
            st.caption(ns[1])


def detail_image(cfg: AppConfig, table: rk.ReviewTable, row: dict[str, Any], photo: Path | None, view: View,
                 zoom: int, cx: float, cy: float) -> np.ndarray:  # fmt: skip
    """The detail view: the map rendered at the photo's full size over the full-size photo, cropped by the zoom."""
    caches = _caches()
    H, W = int(row["height"]), int(row["width"])

    def make() -> tuple[np.ndarray | None, np.ndarray]:
        full = caches["grids"].row_with_grid(table, row)
        unit = rk.unit_map(full, (H, W))  # the map at the original size, as exported (render_unit_map)
        img = None
        if photo is not None:
            try:
                im = load_image(photo).image  # upright RGB
                img = np.asarray(im) if im.size == (W, H) else np.asarray(im.resize((W, H), Image.Resampling.BILINEAR))
            except Exception:  # noqa: BLE001 - drawn on grey
                img = None
        return img, unit

    img, unit = caches["full"].get((row["result_id"], str(table.parts[int(row["_part"])]), str(photo)), make)
    ch, cw = max(1, round(H / zoom)), max(1, round(W / zoom))
    y0 = int(round(min(max(cy * H - ch / 2, 0), H - ch)))
    x0 = int(round(min(max(cx * W - cw / 2, 0), W - cw)))
    crop_u = unit[y0 : y0 + ch, x0 : x0 + cw]
    crop_i = None if img is None else img[y0 : y0 + ch, x0 : x0 + cw]
    rgb = rk.draw(crop_i, crop_u, view.mode, view.alpha, view.threshold, outline_width=max(1, round(max(ch, cw) / 300)))
    out = Image.fromarray(rgb)
    if max(out.size) > DETAIL_SIDE * 2:
        out.thumbnail((DETAIL_SIDE * 2, DETAIL_SIDE * 2), Image.Resampling.LANCZOS)
    return np.asarray(out)


def _bad_rows(table: rk.ReviewTable, key: str) -> None:
    problems: dict[str, str] = st.session_state.get(f"{key}_tile_problems", {})
    unreadable = {r: p for r, p in problems.items() if p.startswith("map unreadable")}
    n_bad = len(table.bad) + len(unreadable)
    if not n_bad:
        return
    st.warning(f"{n_bad} result{'s' if n_bad != 1 else ''} of this run cannot be shown (not counted above): "
               "see the list below")  # fmt: skip
    with st.expander(f"{n_bad} results not shown, and why"):
        extra = pd.DataFrame([{"result_id": r, "image": "", "label": "", "reason": p} for r, p in unreadable.items()])
        st.dataframe(pd.concat([table.bad, extra], ignore_index=True) if len(extra) else table.bad,
                     hide_index=True, key=f"{key}_bad_table")  # fmt: skip


def _progress(cfg: AppConfig, table: rk.ReviewTable, decisions: dict[str, Any]) -> None:
    rows = table.rows
    n = len(rows)
    status = status_of(rows, decisions)
    reviewed = int((status != "unreviewed").sum())
    counts = status.value_counts()
    st.progress(reviewed / n if n else 0.0, text=f"{reviewed} of {n} reviewed · " + " · ".join(
        f"{s} {int(counts.get(s, 0))}" for s in STATUSES))  # fmt: skip
    if st.toggle("Progress per trait and per reviewer", key="rv_show_progress"):
        per = pd.crosstab(rows["label"], status).reindex(columns=[*STATUSES, "unreviewed"], fill_value=0)
        per.insert(0, "total", per.sum(axis=1))
        per.insert(1, "reviewed %", (100 * (per["total"] - per["unreviewed"]) / per["total"]).round(1))
        st.dataframe(per.reset_index().rename(columns={"label": table.label_name}), hide_index=True,
                     key="rv_progress_trait")  # fmt: skip
        who = _readonly(cfg).reviewer_counts() if decisions else {}
        if who:
            dfw = pd.DataFrame.from_dict(who, orient="index")[list(STATUSES)]
            dfw.insert(0, "decisions", dfw.sum(axis=1))
            st.dataframe(dfw.rename_axis("reviewer").reset_index(), hide_index=True, key="rv_progress_who")


def _shortcut_bar(cfg: AppConfig, key: str, review: bool) -> None:
    if review:
        for col, (label, kb, status) in zip(st.columns([1, 1, 1.35]), DECISION_BUTTONS, strict=True):
            col.button(label, key=kb, on_click=decide, args=(cfg, key, status), width="stretch",
                       type="primary" if status == "accepted" else "secondary")  # fmt: skip
        b = st.columns([0.8, 0.8, 1.1, 1.2])
    else:
        b = st.columns(4)
    b[0].button("◀ (k)", key="kb_prev", on_click=move, args=(key, -1), width="stretch")
    b[1].button("▶ (j)", key="kb_next", on_click=move, args=(key, 1), width="stretch")
    if review:
        b[2].button("Undo (u)", key="kb_undo", on_click=undo_last, args=(cfg, key), width="stretch",
                    disabled=not st.session_state.get("rv_undo"))  # fmt: skip
        b[3].button("Select (s)", key="kb_select", on_click=toggle_select, args=(key,), width="stretch")
        st.caption("Keys: a accept · r/x reject · w needs work · j/→ next · k/← previous · u undo · s select · "
                   "n note (Enter saves, Esc leaves) · PageDown/PageUp pages. A decision moves to the next "
                   "undecided item.")  # fmt: skip
        if st.session_state.get("rv_last"):
            st.caption(str(st.session_state["rv_last"]))
    else:
        st.caption("Keys: j/→ next · k/← previous · PageDown/PageUp pages")


def _bulk(cfg: AppConfig, key: str, fr: Frozen) -> None:
    sel: set[str] = st.session_state.get("rv_selected", set())
    with st.expander("Bulk decision", expanded="rv_bulk" in st.session_state):
        scopes = {"filter": list(fr.ids), "selection": [r for r in fr.ids if r in sel]}
        names = {"filter": "the current filter", "selection": "the selection"}
        c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
        if st.session_state.get("rv_bulk_scope") not in scopes:
            st.session_state["rv_bulk_scope"] = "selection" if scopes["selection"] else "filter"
        scope = c1.selectbox("Apply to", list(scopes), key="rv_bulk_scope",
                             format_func=lambda s: f"{names[s]} ({len(scopes[s])} results)")  # fmt: skip
        status = c2.selectbox("Decision", STATUSES, key="rv_bulk_status")
        if c3.button("Apply…", key="rv_bulk_ask", disabled=not scopes[scope]):
            st.session_state["rv_bulk"] = {"status": status, "ids": scopes[scope], "scope": names[scope]}
        pending = st.session_state.get("rv_bulk")
        if pending:
            decided = sum(1 for r in pending["ids"] if r in current_decisions(cfg))
            st.warning(f"Set '{pending['status']}' for {len(pending['ids'])} results ({pending['scope']})? "
                       f"{decided} of them already have a decision, which this replaces (notes are kept). "
                       "Undo (u) reverts the whole bulk decision.")  # fmt: skip
            d1, d2, _ = st.columns([1, 1, 3])
            d1.button(f"Confirm: {pending['status']} {len(pending['ids'])}", key="rv_bulk_confirm",
                      on_click=bulk_apply, args=(cfg,), type="primary")  # fmt: skip
            d2.button("Cancel", key="rv_bulk_cancel", on_click=lambda: st.session_state.pop("rv_bulk", None))


def _export(cfg: AppConfig, table: rk.ReviewTable, fr: Frozen, decisions: dict[str, Any]) -> None:
    assert cfg.results_dir is not None
    with st.expander("Export", expanded="rv_export_path" in st.session_state):
        known = table.index_of()
        n_accepted = sum(1 for r, d in decisions.items() if d.status == "accepted" and r in known)
        acc_in = [r for r in fr.ids if r in decisions and decisions[r].status == "accepted"]
        scopes: dict[str, tuple[str, str | list[str], int]] = {  # scope -> (name, selection, count)
            "accepted": ("accepted", "accepted", n_accepted),
            "filter": ("current filter", list(fr.ids), len(fr.ids)),
            "accepted-in-filter": ("accepted in the current filter", acc_in, len(acc_in)),
        }
        try:
            available = export_formats()
        except Exception as err:  # noqa: BLE001 - export module missing or broken: say so, review goes on
            st.error(f"Export unavailable: {err}")
            return
        c1, c2, c3 = st.columns([2, 3, 1], vertical_alignment="bottom")
        scope = c1.selectbox("Results to export", list(scopes), key="rv_export_scope",
                             format_func=lambda s: f"{scopes[s][0]} ({scopes[s][2]})")  # fmt: skip
        fmts = c2.multiselect("Formats", available, default=[f for f in DEFAULT_FORMATS if f in available],
                              key="rv_formats")  # fmt: skip
        _name, sel, n = scopes[scope]
        if c3.button("Write export", key="rv_export_go", disabled=not n or not fmts):
            from traitloc.pipelines.export import FormatError

            bar = st.progress(0.0, text="exporting…")
            last = [0.0]

            def progress(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] > 0.2 or done >= total:
                    last[0] = now
                    bar.progress(min(1.0, done / max(total, 1)), text=f"exporting: {done} of {total}")

            name = f"{cfg.results_dir.name}-{scope}-{time.strftime('%Y%m%dT%H%M%S')}"
            try:
                path = write_export(cfg.results_dir, fmts, sel, name, progress)
            except FormatError as err:
                st.session_state.pop("rv_export_path", None)
                st.error(f"Export failed: {err}")
            else:
                bar.progress(1.0, text="export written")
                st.session_state["rv_export_path"] = str(path)
        path_s = st.session_state.get("rv_export_path")
        if path_s and Path(path_s).is_file():
            p = Path(path_s)
            st.caption(f"written ({p.stat().st_size / 1e6:.1f} MB):")
            st.text(str(p))
            st.download_button(f"Download {p.name}", data=lambda: p.read_bytes(), file_name=p.name,
                               mime="application/zip", key="rv_download")  # fmt: skip


def page_grid(cfg: AppConfig, review: bool) -> None:
    """The Review page (``review=True``) or the Browse page: filters, grid, detail view."""
    key = "r" if review else "b"
    st.header("Review" if review else "Browse")
    if cfg.results_dir is None:
        st.info("No results folder: start the app with `traitloc app RESULTS_DIR` to browse and review results.")
        return
    try:
        table = load_table(cfg)
    except Exception as err:  # noqa: BLE001 - a damaged store: say why
        st.error(f"Cannot read the results store of {cfg.results_dir}: {err}")
        return
    decisions = current_decisions(cfg)
    if table.kind == "empty":
        if review or not _audit(cfg):
            st.warning(f"{cfg.results_dir} has no results store (results/part-*.parquet): run traitloc localize or "
                       "traitloc explain with --out there" + ("" if review else ", or add audit.csv"))  # fmt: skip
        return
    st.markdown(_CSS, unsafe_allow_html=True)  # our own static CSS: the current tile's frame
    keyboard()
    with st.sidebar:
        st.subheader("Filter")
        rows, sig = _filters(table, key, decisions)
        refresh = st.button("Refresh list", key=f"{key}_refresh", help="re-apply the filter to the current decisions")
        st.subheader("View")
        per_photo = int(table.rows["image_key"].value_counts().max()) if len(table.rows) else 1
        group, sort, view, page_size = _view_controls(key, per_photo)
    fr = _frozen(cfg, table, key, rows, (*sig, group, sort), refresh)
    _bad_rows(table, key)
    st.text(f"{len(fr.ids)} of {len(table.rows)} results ({table.kind})")
    if fr.ids:
        _work_area(cfg, table, key, fr, view, page_size, group, review)
    else:
        st.info("No result passes the filter.")
    if not review:
        _audit(cfg)


@st.fragment
def _work_area(cfg: AppConfig, table: rk.ReviewTable, key: str, fr: Frozen, view: View, page_size: int, group: str,
               review: bool) -> None:  # fmt: skip
    """Progress, grid, detail, decisions: a fragment, so a key press reruns only this part of the page."""
    decisions = current_decisions(cfg)
    if review:
        _progress(cfg, table, decisions)
    left, right = st.columns([3, 2], gap="medium")
    with right:
        _shortcut_bar(cfg, key, review)
    with left:  # the grid first: it is what the reviewer looks at
        _grid(cfg, table, key, fr, view, page_size, decisions, group)
    with right:
        _detail(cfg, table, key, fr, view, decisions, review)
        if review:
            _bulk(cfg, key, fr)
            _export(cfg, table, fr, decisions)


# ---- audit tables (Browse) -----------------------------------------------------------------------------------------
def _read_csv(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def _audit(cfg: AppConfig) -> bool:
    """The audit verdicts per class pair and audit.csv, when the folder has them; ``True`` if it does."""
    summary = _read_csv(safe_file(cfg, "audit_summary.csv", roots=[cfg.results_dir]))  # type: ignore[list-item]
    audit = _read_csv(safe_file(cfg, "audit.csv", roots=[cfg.results_dir]))  # type: ignore[list-item]
    if summary is not None and "level" in summary.columns:
        summary = summary[summary["level"] == "pair"].reset_index(drop=True)
    if summary is not None and not summary.empty:
        st.subheader("Audit verdict per class pair")
        pairs = sorted(f"{t} vs {d}" for t, d in zip(summary["true_class"], summary["similar_class"], strict=True))
        pick = st.selectbox("Audit class pair", [ALL, *dict.fromkeys(pairs)], key="b_audit_pair")
        if pick != ALL:
            summary = summary[(summary["true_class"] + " vs " + summary["similar_class"]) == pick]
        cols = [c for c in ("source", "true_class", "similar_class", "n_images", "accuracy", "lift", "verdict")
                if c in summary.columns]  # fmt: skip
        st.dataframe(summary[cols], hide_index=True, key="b_audit_table")
    if audit is not None and not audit.empty:
        with st.expander(f"audit.csv ({len(audit)} rows)"):
            st.dataframe(audit, hide_index=True)
    return summary is not None or audit is not None


# ---- query engine (model once per server, failures remembered; per-image work once per session) --------------------
def query_methods() -> tuple[str, ...]:
    """Methods the Query page offers: those of :mod:`traitloc.engine.methods` that :func:`run_query` can compute."""
    from traitloc.engine.methods import REGISTRY

    return tuple(m for m in REGISTRY if m in GAMMA_COST)


@st.cache_resource(show_spinner="Loading the model (once per server)...")
def load_localizer(model: str, pretrained: str | None, device: str) -> Any:
    """The :class:`traitloc.models.localize.ConceptLocalizer` of the configured model (shared by all sessions)."""
    from traitloc.models.clip import load_clip
    from traitloc.models.localize import ConceptLocalizer

    return ConceptLocalizer(load_clip(model, pretrained, device))


@st.cache_resource(show_spinner=False)
def _load_failures() -> dict[tuple[Any, ...], str]:
    """Server-wide memory of weights that failed to load: ``(model, pretrained, device) -> reason``."""
    return {}


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_problem(model: str, pretrained: str | None) -> str | None:
    """Why named (not local) weights cannot load here, found in seconds: not cached and the hub is unreachable.

    A local file, random weights (``None``), weights already in the Hugging Face or open_clip cache, or a reachable
    hub give ``None`` (the load is attempted).
    """
    if not pretrained or os.sep in pretrained or Path(pretrained).suffix in (".safetensors", ".bin", ".pt"):
        return None
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model.removesuffix(".json"), pretrained) or {}
    except Exception:  # noqa: BLE001 - unknown names are for load_clip to report
        cfg = {}
    hub = str(cfg.get("hf_hub", "") or "")
    url = str(cfg.get("url", "") or "")
    try:
        from huggingface_hub import try_to_load_from_cache

        files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if hub and any(isinstance(try_to_load_from_cache(hub.rstrip("/"), f), str) for f in files):
            return None
    except Exception:  # noqa: BLE001
        pass
    if url and (Path.home() / ".cache" / "clip" / Path(url).name).is_file():
        return None
    if (model.startswith("hf-hub:") or hub or url) and not _hub_reachable():
        from traitloc.models.clip import _offline_hint

        return _offline_hint(model, pretrained)
    return None


def get_localizer(cfg: AppConfig) -> Any:
    """The localizer, or :class:`traitloc.models.clip.ModelLoadError` with the reason; a failure is not retried until
    the user asks (it is remembered per server: offline hub weights fail in seconds, once)."""
    from traitloc.models.clip import ModelLoadError

    key = (cfg.model, cfg.pretrained, cfg.device)
    failures = _load_failures()
    if key in failures:
        raise ModelLoadError(failures[key])
    st.session_state[MODEL_LOADS] = int(st.session_state.get(MODEL_LOADS, 0)) + 1
    problem = weights_problem(cfg.model, cfg.pretrained)
    if problem:
        failures[key] = problem
        raise ModelLoadError(problem)
    try:
        return load_localizer(cfg.model, cfg.pretrained, cfg.device)
    except ModelLoadError as err:
        failures[key] = str(err)
        raise
    except Exception as err:  # noqa: BLE001 - anything else is remembered too, with its type
        failures[key] = f"{type(err).__name__}: {err}"
        raise ModelLoadError(failures[key]) from err


def _retry_load(cfg: AppConfig) -> None:
    _load_failures().pop((cfg.model, cfg.pretrained, cfg.device), None)


@dataclass
class QueryEntry:
    """What one image costs once: the model input, the prefix (forward to the target layer), cached gradients."""

    x: Any  # (1, 3, H, W) tensor
    prefix: Any  # traitloc.engine.adapters.Prefix
    features: Any = None  # (1, D)
    alphas: dict[str, Any] = field(default_factory=dict)  # prompt -> (C,) Grad-CAM weights
    cells: dict[str, Any] = field(default_factory=dict)  # prompt -> (N, C) per-cell gradients (Layer-CAM)
    masked: dict[Any, Any] = field(default_factory=dict)  # channels -> ((N, K) masks' channels, (K, D) features)
    dense: dict[str, Any] = field(default_factory=dict)  # dense method -> DenseCache; "legrad" -> per-prompt grads


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


def scorecam_features(loc: Any, entry: QueryEntry, channels: int | None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[Any, Any]:  # fmt: skip
    """Score-CAM's masked forward passes for one image (:meth:`traitloc.engine.cam.FinerCAM.scorecam_features`):
    ``(sel, feats)``, cached; they serve every gamma and base prompt. ``progress(done, total)`` after each batch."""
    from traitloc.engine.cam import FinerCAM

    if channels not in entry.masked:
        cam = FinerCAM(loc.adapter, "scorecam", scorecam_channels=channels, scorecam_batch=loc.cam.scorecam_batch,
                       amp_dtype=loc.cam.amp_dtype)  # fmt: skip
        sel, feats = cam.scorecam_features(entry.x, entry.prefix, progress)
        entry.masked[channels] = (sel[0], feats[0])
        _bump(MASKED_COUNTER)
    return entry.masked[channels]


def _dense_query(loc: Any, entry: QueryEntry, method: str, prompts: list[str], V: Any, W: Any) -> Any:
    """Signed grid map for the dense methods (one cached forward from the prefix) and LeGrad (per-prompt cached
    gradients); a new gamma or base is a product on the cache (traitloc.engine.dense)."""
    import torch

    from traitloc.engine.dense import DenseCLIP, LeGrad, LeGradCache

    if method == "legrad":
        grads = entry.dense.setdefault("legrad", {})
        missing = [p for p in prompts if p not in grads]
        if missing:
            lc = LeGrad(loc.adapter).gradients(entry.x, loc.text.encode(missing))
            _bump(GRADIENT_COUNTER)
            grads.update({p: lc.grads[0, i] for i, p in enumerate(missing)})
            entry.dense["legrad:rest"] = (lc.values, lc.features, lc.grid, lc.input_size)
        lc = LeGradCache(torch.stack([grads[p] for p in prompts])[None], *entry.dense["legrad:rest"])
        return lc.combine(W).signed[0, 0]
    if method not in entry.dense:
        entry.dense[method] = DenseCLIP(loc.adapter, method).features(entry.x if method == "gem" else entry.prefix)
        _bump(FORWARD_COUNTER)
    return entry.dense[method].combine(W, V).signed[0, 0]


def run_query(
    loc: Any, image: Image.Image, image_id: str, concept: str, base: str | None, gamma: float, method: str,
    scorecam_channels: int | None = 64, progress: Callable[[int, int], None] | None = None,
) -> Any:  # fmt: skip
    """Map of ``concept`` vs ``base`` at ``gamma`` (a :class:`~traitloc.models.localize.ConceptMaps` of one query).

    The per-image work (:class:`QueryEntry`) is cached; the maps are linear in ``s_concept - gamma * s_base``, so a
    new gamma or base prompt recombines the cache (what it costs per method: :data:`GAMMA_COST`).
    """
    import torch

    from traitloc.engine.cam import GradCache, finer_coefficients, layercam_maps, scorecam_maps
    from traitloc.models.localize import ConceptMaps

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
            entry.alphas.update({p: gc.alphas[0, i] for i, p in enumerate(missing)})
        gc = GradCache(pre, torch.stack([entry.alphas[p] for p in prompts])[None], entry.features)
        signed = gc.combine(W, V).signed[0, 0]
    elif method == "layercam":
        missing = [p for p in prompts if p not in entry.cells]
        if missing:
            cells = loc.adapter.grad_cells(pre, loc.text.encode(missing).to(pre.acts.dtype))  # (1, P, N, C)
            _bump(GRADIENT_COUNTER)
            entry.cells.update({p: cells[0, i].float() for i, p in enumerate(missing)})
        gsum = torch.einsum("p,pnc->nc", W[0].to(pre.acts.device), torch.stack([entry.cells[p] for p in prompts]))
        signed = layercam_maps(gsum[None, None], pre.acts)[0, 0].reshape(pre.grid)  # the engine's Layer-CAM
    elif method == "scorecam":
        sel, feats = scorecam_features(loc, entry, scorecam_channels, progress)
        U = (W.to(V.device).float() @ V.float()).to(feats.device)  # (1, D): the explained query vector
        signed = scorecam_maps(sel[None], feats[None], U[None], loc.cam.score_temperature)[0, 0].reshape(pre.grid)
    elif method in GAMMA_COST:
        signed = _dense_query(loc, entry, method, prompts, V, W)
    else:
        raise ValueError(f"unknown method {method!r}")
    if entry.features is None:
        entry.features = loc.adapter.features(pre).float()
    per_prompt = (entry.features.float() @ V.t().to(entry.features.device))[0]
    return ConceptMaps(
        signed=signed[None].detach(), concepts=[concept], base=base if len(prompts) == 2 else None, gamma=g,
        method=method, scores=(W[0].to(per_prompt.device) * per_prompt).sum()[None].cpu(),
        concept_scores=per_prompt[:1].cpu(), base_score=float(per_prompt[1]) if len(prompts) == 2 else None,
        size=(image.height, image.width),
    )  # fmt: skip


def candidate_images(cfg: AppConfig, limit: int = 500) -> list[tuple[str, Path]]:
    """Photos to query: those of the run's store (where they are), then images under ``--images``."""

    def candidates() -> Iterator[tuple[str, Path | None]]:
        if cfg.results_dir is not None:
            try:
                table = load_table(cfg)
            except Exception:  # noqa: BLE001 - the Review page reports a damaged store
                table = None
            if table is not None and not table.rows.empty:
                firsts = table.rows.drop_duplicates("image_key")[["image_key", "image"]]
                for key, image in firsts.itertuples(index=False, name=None):
                    yield str(key), photo_path(cfg, table, image)
        root = cfg.images_dir
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False) if root is not None else ():
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                try:
                    p = resolve_inside(root, str(here / name))
                except (PathSafetyError, OSError):
                    continue
                yield "images: " + (here / name).relative_to(root).as_posix(), p if p.is_file() else None

    out: dict[Path, str] = {}
    for key, p in candidates():
        if p is not None and p not in out:
            out[p] = key
            if len(out) >= limit:
                break
    return [(key, p) for p, key in out.items()]


def _cancel_query(token: str) -> None:
    st.session_state["q_cancelled"] = token


def page_query(cfg: AppConfig) -> None:
    """The Query page: an image (picked or uploaded), a concept, a base prompt and gamma -> map, mask and scores."""
    st.header("Query: where is this trait?")
    st.caption("Finer-CAM of a text concept against a base prompt: s = s_concept - gamma * s_base.")
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
            try:  # decoded in memory, never written
                image = load_image(data, max_side=WORK_MAX_SIDE, max_pixels=UPLOAD_MAX_PIXELS).image
            except Exception as err:  # noqa: BLE001 - any decode failure is the user's file
                st.error(f"Cannot read the uploaded file: {type(err).__name__}: {err}")
                st.text(f"file name: {up.name}")
            image_id = "upload:" + hashlib.sha256(data).hexdigest()
    else:
        pick = st.selectbox("Pick an image", [c[0] for c in choices], key="q_pick")
        path = dict(choices).get(pick) if pick else None
        if path is not None:
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
    method = c4.selectbox("Method", query_methods(), key="q_method")
    threshold = c5.slider("Mask threshold", 0.0, 0.95, 0.5, 0.05, key="q_threshold")
    st.caption(f"Cost of a gamma change with {method}: {GAMMA_COST.get(method, 'see docs/methods.md')}.")
    if image is None or not concept:
        st.info("Pick or upload an image and type a concept.")
        return
    from traitloc.models.clip import ModelLoadError
    from traitloc.models.text import PromptError, check_prompt

    try:
        concept = check_prompt(concept)
        base_p = check_prompt(base) if base else None
    except PromptError as err:
        st.error(str(err))
        return
    try:
        loc = get_localizer(cfg)
    except ModelLoadError as err:
        st.error(f"Model could not be loaded: {err}")
        st.caption("This failure is remembered: nothing is retried until you press the button (restart the app "
                   "with --model/--pretrained FILE to use other weights).")  # fmt: skip
        st.button("Retry loading the model", key="q_retry", on_click=_retry_load, args=(cfg,))
        return
    token = f"{image_id}|{method}"
    progress_cb = None
    if method == "scorecam":
        cached = st.session_state.get(QUERY_CACHE, {}).get(f"{image_id}|{loc.bundle.name}|{loc.resize}")
        if cached is None or 64 not in cached.masked:
            if st.session_state.get("q_cancelled") == token:
                st.info("Score-CAM was cancelled for this image.")
                if st.button("Compute Score-CAM", key="q_resume"):
                    st.session_state.pop("q_cancelled", None)
                    st.rerun()
                return
            working = st.empty()
            with working.container():
                bar = st.progress(0.0, text="Score-CAM: masked forward passes…")
                st.button("Cancel", key="q_cancel", on_click=_cancel_query, args=(token,))

            def progress_cb(done: int, total: int) -> None:
                bar.progress(done / max(total, 1), text=f"Score-CAM: masked forward passes {done} of {total}")

    with st.spinner("Computing the map..."):
        res = run_query(loc, image, image_id, concept, base_p, gamma, method, progress=progress_cb)
    if progress_cb is not None:
        working.empty()  # done: no stale Cancel button
    raw = res.map(0)
    map01, score = map_to_unit(raw), float(res.scores[0])
    st.session_state[LAST_QUERY] = {"map01": map01, "score": score, "method": method, "gamma": gamma}
    work = np.asarray(image)
    i1, i2, i3 = st.columns(3)
    i1.image(work, caption="image", width="stretch")
    i2.image(overlay_array(work, map01, 0.5), caption="overlay", width="stretch")
    i3.image(mask_from_map(map01, threshold).astype(np.uint8) * 255, caption=f"mask (map > {threshold:g})",
             width="stretch")  # fmt: skip
    m1, m2, m3 = st.columns(3)
    m1.metric("objective s", f"{score:.4f}")
    m2.metric("cos(concept)", f"{float(res.concept_scores[0]):.4f}")
    m3.metric("cos(base)", "-" if res.base_score is None else f"{res.base_score:.4f}")
    st.caption(
        f"method {method} · gamma {gamma if base_p else 0:g} · raw max {float(raw.max()) if raw.size else 0.0:.4g} · "
        f"image forward passes this session: {st.session_state.get(FORWARD_COUNTER, 0)} · "
        f"gradient passes: {st.session_state.get(GRADIENT_COUNTER, 0)} · "
        f"Score-CAM masked runs: {st.session_state.get(MASKED_COUNTER, 0)}"
    )
    st.text(f"model {loc.bundle.name}")


def main() -> None:
    """The app: configuration, sidebar page choice (also ``?page=Review`` in the URL), the chosen page."""
    st.set_page_config(page_title="traitloc review", layout="wide")
    cfg = load_config()
    for err in cfg.errors:
        st.error(err)
    for counter in (FORWARD_COUNTER, GRADIENT_COUNTER, MASKED_COUNTER):
        st.session_state.setdefault(counter, 0)
    if "page" not in st.session_state:
        wanted = st.query_params.get("page", "")
        st.session_state["page"] = wanted if wanted in PAGES else ("Review" if cfg.results_dir else "Query")
    with st.sidebar:
        st.title("traitloc")
        page = st.radio("Page", PAGES, key="page")
        if cfg.results_dir:
            st.caption("results:")
            st.text(cfg.results_dir.name)
        else:
            st.caption("no results folder")
        st.session_state.setdefault("reviewer", cfg.user or _os_user())
        st.text_input("Reviewer", key="reviewer")
        weights = Path(cfg.pretrained).name if cfg.pretrained else "random weights"
        st.caption("Query model:")
        st.text(f"{Path(cfg.model).stem} ({weights})")
    if st.query_params.get("page") != page:
        st.query_params["page"] = page
    if page == "Query":
        page_query(cfg)
    else:
        page_grid(cfg, review=page == "Review")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


if __name__ == "__main__":
    main()
