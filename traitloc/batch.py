"""Long batch runs: streamed images, per-image errors recorded, atomic outputs, resume, progress, run.json.

``run_localize`` is the engine of ``traitloc localize`` (DESIGN.md §6). Images are decoded one batch ahead in a
background thread and never all held in memory; each image's files are written atomically before its rows are
appended to ``results.csv``, so a run killed at any point resumes without redoing or corrupting finished work.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .export import (
    map_to_unit,
    mask_from_map,
    save_map_tiff,
    save_mask_png,
    save_overlay_png,
    slugify,
    utc_now,
    write_run_json,
)
from .imageio import ImageLoadError, LoadedImage, find_images, image_keys, load_image
from .localize import ConceptLocalizer, ConceptMaps
from .results import ResultsTable

__all__ = ["LOCALIZE_COLUMNS", "NO_BASE", "LocalizeSettings", "run_localize", "split_on_oom"]

log = logging.getLogger(__name__)

LOCALIZE_COLUMNS = [
    "image", "image_key", "concept", "trait", "base", "gamma", "method", "model", "raw_max", "score",
    "concept_score", "base_score", "mask_fraction", "map", "mask", "overlay", "width", "height", "status", "notes",
]  # fmt: skip
LOCALIZE_KEY = ["image_key", "concept", "base", "gamma", "method", "model"]
#: ``base`` in results.csv for plain CAM (no base prompt): key columns of a ResultsTable must not be empty.
NO_BASE = "(none)"


@dataclass
class LocalizeSettings:
    concepts: list[str]
    traits: list[str | None]  # trait names (from a trait list) beside each concept, or None
    base: str | None
    gamma: float
    batch_size: int = 8
    threshold: float | str = 0.5
    save_signed: bool = False
    quiet: bool = False


def split_on_oom(fn: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """Run ``fn(items)``; on CUDA out-of-memory, split the batch in halves and retry (down to one item)."""
    try:
        return fn(items)
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("CUDA out of memory for a batch of %d images: splitting it", len(items))
        return split_on_oom(fn, items[:half]) + split_on_oom(fn, items[half:])


def _progress(total: int, quiet: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _load(path: Path) -> LoadedImage | ImageLoadError:
    try:
        return load_image(path)
    except ImageLoadError as err:
        return err
    except Exception as err:  # noqa: BLE001 - any decoder failure is a per-image error, never fatal
        return ImageLoadError(path, f"{type(err).__name__}: {err}")


def _prefetched(
    items: Sequence[Any], batch: int, load: Callable[[Any], Any] | None = None
) -> Iterator[list[tuple[Any, Any]]]:
    """Batches of ``(item, load(item))``; the next batch loads in a background thread while this one computes.

    ``load`` defaults to decoding an image path (a failure is returned as an :class:`ImageLoadError`, never raised).
    """
    fn = load or _load
    chunks = [list(items[i : i + batch]) for i in range(0, len(items), batch)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(lambda c: [(p, fn(p)) for p in c], chunks[0])
        for i in range(len(chunks)):
            cur = fut.result()
            if i + 1 < len(chunks):
                fut = pool.submit(lambda c: [(p, fn(p)) for p in c], chunks[i + 1])
            yield cur


# The hidden temporary name of export.atomic_path: ".{stem}.{12 hex digits}.tmp{suffix}".
_TEMP_NAME = re.compile(r"^\..*\.[0-9a-f]{12}\.tmp(\.[^.]+)?$")


def remove_stale_temp_files(out: Path) -> int:
    """Delete temporary files that a killed run left behind in ``out`` (its output folders and top level).

    A run killed during an atomic write leaves a hidden ``.name.xxxxxxxxxxxx.tmp.ext`` file; the final file is
    never partial, but the temporary one stays unless removed. Returns the number of files removed.
    """
    n = 0
    tops = [out] + [out / d for d in ("maps", "masks", "overlays", "signed")]
    for top in tops:
        if not top.is_dir():
            continue
        for path in top.rglob(".*") if top is not out else top.glob(".*"):
            if path.is_file() and _TEMP_NAME.match(path.name):
                try:
                    path.unlink()
                    n += 1
                except OSError as err:
                    log.warning("could not remove a stale temporary file %s: %s", path, err)
    return n


def run_localize(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    localizer: ConceptLocalizer,
    settings: LocalizeSettings,
    run_info: dict[str, Any],
) -> dict[str, int]:
    """Localize every concept in every image under ``inputs``; returns counts (ok, failed, skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # left by a killed run; one process writes an output folder at a time
    paths = find_images(inputs)
    keys = image_keys(paths)
    map_settings = _map_settings(run_info, settings, localizer)
    previous = refuse_other_settings(out / "run.json", map_settings)
    table = ResultsTable(out / "results.csv", LOCALIZE_COLUMNS, LOCALIZE_KEY)
    model_id = localizer.bundle.name
    base = settings.base or NO_BASE
    gamma_s = f"{settings.gamma:g}"
    method = localizer.method
    done = table.done_keys()

    def key(img_key: str, concept: str) -> tuple[str, ...]:
        return (img_key, concept, base, gamma_s, method, model_id)

    todo = [p for p in paths if any(key(keys[p], c) not in done for c in settings.concepts)]
    skipped = len(paths) - len(todo)
    info = dict(run_info)
    if previous:  # a resumed run keeps the provenance of the runs before it
        info["previous_runs"] = [
            *previous.get("previous_runs", []),
            {k: previous.get(k) for k in ("argv", "start_utc", "end_utc", "status", "counts", "truncated_prompts")},
        ]
    info.update(
        start_utc=info.get("start_utc") or utc_now(),
        end_utc=None,
        n_images=len(paths),
        n_images_todo=len(todo),
        n_images_skipped_done=skipped,
        prompts=settings.concepts,
        base=settings.base,
        gamma=settings.gamma,
        method=method,
        target_layer=localizer.target_layer,
        resize=localizer.resize,
        threshold=settings.threshold,
        templates=list(localizer.text.templates),
        map_settings=map_settings,
        status="running",
    )
    write_run_json(out / "run.json", info)
    counts = {"ok": 0, "failed": 0, "skipped": skipped}
    bar = _progress(len(todo), settings.quiet, "localize")
    writer = ThreadPoolExecutor(max_workers=2)
    t0 = time.perf_counter()
    try:
        for chunk in _prefetched(todo, settings.batch_size):
            good = [(p, im) for p, im in chunk if isinstance(im, LoadedImage)]
            for p, err in chunk:
                if isinstance(err, ImageLoadError):
                    rows = [_error_row(p, out, keys[p], c, t, base, gamma_s, method, model_id, err.reason)
                            for c, t in zip(settings.concepts, settings.traits, strict=True)]  # fmt: skip
                    table.append(rows)
                    counts["failed"] += 1
                    bar.update(1)
            if not good:
                continue
            try:
                results = split_on_oom(
                    lambda items: localizer.explain(
                        [im.image for _, im in items], settings.concepts, settings.base, settings.gamma
                    ),
                    good,
                )
            except Exception as err:  # noqa: BLE001 - a failing batch is retried image by image
                results = []
                for p, im in good:
                    try:
                        results.extend(localizer.explain([im.image], settings.concepts, settings.base, settings.gamma))
                    except Exception as e1:  # noqa: BLE001
                        log.warning("%s: %s: %s", p, type(e1).__name__, e1)
                        results.append(e1)  # type: ignore[arg-type]
                del err
            futures = []
            for (p, im), res in zip(good, results, strict=True):
                if isinstance(res, Exception):
                    reason = f"{type(res).__name__}: {res}".splitlines()[0]
                    table.append(
                        [
                            _error_row(p, out, keys[p], c, t, base, gamma_s, method, model_id, reason)
                            for c, t in zip(settings.concepts, settings.traits, strict=True)
                        ]  # fmt: skip
                    )
                    counts["failed"] += 1
                    continue
                futures.append(
                    writer.submit(_write_image_outputs, p, im, keys[p], res, out, settings, localizer, done, key)
                )
            for f in futures:
                rows, ok = f.result()
                table.append(rows)
                counts["ok" if ok else "failed"] += 1
                bar.update(1)
    finally:
        writer.shutdown(wait=True)
        bar.close()
        info.update(
            end_utc=utc_now(),
            status="finished",
            counts=counts,
            seconds=round(time.perf_counter() - t0, 3),
            truncated_prompts=list(localizer.text.truncated),
        )
        write_run_json(out / "run.json", info)
    return counts


class SettingsMismatchError(ValueError):
    """An output folder holds results made with other settings (the map file names do not encode them)."""


def refuse_other_settings(run_json: Path, new: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse to mix runs with different map settings in one output folder; returns the earlier run.json.

    Map file names encode the concept or target, not gamma/base/method/model..., so a second run with other
    ``new`` settings would overwrite maps that earlier rows still point to. New images or concepts are fine.
    The settings are kept in run.json under ``map_settings``.
    """
    if not run_json.exists():
        return None
    try:
        old = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SettingsMismatchError(f"{run_json} is unreadable ({err}); use a new --out folder") from err
    before = old.get("map_settings", {})
    diff = [f"{k}={before[k]!r} (now {v!r})" for k, v in new.items() if k in before and before[k] != v]
    if diff:
        raise SettingsMismatchError(
            f"{run_json.parent} holds results made with {', '.join(diff)}; rerun with the same settings to "
            f"resume, or choose a new --out folder"
        )
    return old


def _map_settings(run_info: dict[str, Any], settings: LocalizeSettings, localizer: ConceptLocalizer) -> dict[str, Any]:
    return {
        **{k: run_info.get(k) for k in ("model", "pretrained", "pretrained_sha256")},
        "base": settings.base, "gamma": settings.gamma, "method": localizer.method, "resize": localizer.resize,
        "threshold": settings.threshold, "templates": list(localizer.text.templates),
    }  # fmt: skip


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _error_row(
    path: Path, out: Path, img_key: str, concept: str, trait: str | None, base: str, gamma: str, method: str,
    model: str, reason: str,
) -> dict[str, Any]:  # fmt: skip
    return {
        **dict.fromkeys(LOCALIZE_COLUMNS, ""),
        "image": str(path), "image_key": img_key, "concept": concept, "trait": trait or "", "base": base,
        "gamma": gamma, "method": method, "model": model, "status": f"error: {reason}",
    }  # fmt: skip


def _write_image_outputs(
    path: Path,
    im: LoadedImage,
    img_key: str,
    res: ConceptMaps,
    out: Path,
    settings: LocalizeSettings,
    localizer: ConceptLocalizer,
    done: set[tuple[str, ...]],
    key: Callable[[str, str], tuple[str, ...]],
) -> tuple[list[dict[str, Any]], bool]:
    """Write maps/masks/overlays of one image (each file atomically) and return its results rows."""
    W0, H0 = im.orig_size
    rows = []
    work = np.asarray(im.image)
    for q, (concept, trait) in enumerate(zip(settings.concepts, settings.traits, strict=True)):
        if key(img_key, concept) in done:
            continue
        slug = slugify(concept)
        rel_map = Path("maps") / img_key / f"{slug}.tif"
        rel_mask = Path("masks") / img_key / f"{slug}.png"
        rel_ov = Path("overlays") / img_key / f"{slug}.png"
        row = _error_row(path, out, img_key, concept, trait, settings.base or NO_BASE, f"{settings.gamma:g}",
                         localizer.method, localizer.bundle.name, "")  # fmt: skip
        try:
            raw = res.map(q, (H0, W0))
            raw_max = float(raw.max()) if raw.size else 0.0
            unit = map_to_unit(raw)
            meta = {
                "traitloc": __version__, "image": str(path), "concept": concept, "base": settings.base,
                "gamma": settings.gamma, "method": localizer.method, "model": localizer.bundle.name,
                "pretrained": localizer.bundle.pretrained, "target_layer": localizer.target_layer,
                "raw_max": raw_max, "values": "map / raw_max (ReLU map; all-zero stays zero)",
                "resize": localizer.resize, "interpolation": "bilinear, align_corners=False",
            }  # fmt: skip
            save_map_tiff(out / rel_map, unit, meta)
            mask = mask_from_map(unit, settings.threshold)
            save_mask_png(out / rel_mask, mask)
            wh, ww = work.shape[:2]
            ov_map = unit if (wh, ww) == (H0, W0) else res.map(q, (wh, ww))
            save_overlay_png(out / rel_ov, work, map_to_unit(ov_map))
            if settings.save_signed:
                signed = res.map(q, (H0, W0), signed=True)
                save_map_tiff(out / "signed" / img_key / f"{slug}.tif", signed, {**meta, "values": "signed, raw"})
            row.update(
                raw_max=raw_max,
                score=float(res.scores[q]),
                concept_score=float(res.concept_scores[q]),
                base_score="" if res.base_score is None else res.base_score,
                mask_fraction=float(mask.mean()),
                map=rel_map.as_posix(),
                mask=rel_mask.as_posix(),
                overlay=rel_ov.as_posix(),
                width=W0,
                height=H0,
                status="ok",
                notes="; ".join(im.warnings),
            )
        except Exception as err:  # noqa: BLE001 - recorded for this (image, concept); the batch goes on
            row["status"] = f"error: {type(err).__name__}: {err}".splitlines()[0]
        rows.append(row)
    return rows, all(r["status"] == "ok" for r in rows)
