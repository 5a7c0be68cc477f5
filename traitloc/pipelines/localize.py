"""``traitloc localize`` as a job of the pipeline runner: concept maps of many images into the results store.

Each (image, concept) becomes one row of the run's Parquet store (:mod:`traitloc.io.store`) with its scores
and its signed grid map; ``results.csv`` summarizes the rows for spreadsheets. Full-size maps, masks and overlays
are renderings of the grid (:func:`traitloc.io.store.render_map`), written as files only with ``--save``.
The runner (:func:`traitloc.pipelines.runner.run_job`) brings prefetching, OOM splitting, per-image errors, resume and
run.json.

The command line (:func:`add_parser`, :func:`run`) is ``traitloc localize``; from Python, build a
:class:`traitloc.models.localize.ConceptLocalizer` and call :func:`run_localize`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from traitloc import __version__
from traitloc.data.images import find_images, image_keys
from traitloc.io.files import map_to_unit, mask_from_map, save_map_tiff, save_mask_png, save_overlay_png, slugify
from traitloc.io.store import INTERPOLATION, render_map
from traitloc.models.localize import ConceptLocalizer, ConceptMaps
from traitloc.pipelines.runner import Job, SettingsMismatchError, run_job, split_on_oom

__all__ = [
    "LOCALIZE_COLUMNS",
    "NO_BASE",
    "SAVE_KINDS",
    "LocalizeJob",
    "LocalizeSettings",
    "SettingsMismatchError",
    "add_parser",
    "run",
    "run_localize",
    "save_files",
    "split_on_oom",
]

LOCALIZE_COLUMNS = [
    "image", "image_key", "concept", "trait", "base", "gamma", "method", "model", "raw_max", "score",
    "concept_score", "base_score", "mask_fraction", "map", "mask", "overlay", "width", "height", "status", "notes",
]  # fmt: skip
#: ``base`` for plain CAM (no base prompt)
NO_BASE = "(none)"
#: what ``--save`` can write as files beside the store
SAVE_KINDS = ("maps", "masks", "overlays", "signed")


@dataclass
class LocalizeSettings:
    """What a localize run computes and writes, beside the localizer: prompts, base, gamma, batching and files."""

    concepts: list[str]
    traits: list[str | None]  # trait names (from a trait list) beside each concept, or None
    base: str | None
    gamma: float
    batch_size: int = 8
    threshold: float | str = 0.5
    save: Sequence[str] = ()
    quiet: bool = False
    grid_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.save if s not in SAVE_KINDS]
        if bad:
            raise ValueError(f"--save: unknown kind(s) {', '.join(bad)}; choose from {', '.join(SAVE_KINDS)}")


class LocalizeJob(Job):
    """Concept maps of images: one store row per (image, concept)."""

    name = "localize"
    key_columns = ("image_key", "concept")
    csv_columns = tuple(LOCALIZE_COLUMNS)
    columns = {
        "concept": "str", "trait": "str", "base": "str", "gamma": "float", "method": "str", "model": "str",
        "score": "float", "concept_score": "float", "base_score": "float", "mask_fraction": "float",
        "threshold": "str", "map": "str", "mask": "str", "overlay": "str",
    }  # fmt: skip

    def __init__(
        self,
        localizer: ConceptLocalizer,
        settings: LocalizeSettings,
        keys: dict[Path, str],
        run_info: dict[str, Any],
        out: str | Path,
    ) -> None:
        self.loc = localizer
        self.out = Path(out)
        self.s = settings
        self.keys = keys
        self.grid_dtype = settings.grid_dtype
        self.base = settings.base or NO_BASE
        self.map_settings = {
            **{k: run_info.get(k) for k in ("model", "pretrained", "pretrained_sha256")},
            "base": settings.base, "gamma": settings.gamma, "method": localizer.method, "resize": localizer.resize,
            "threshold": settings.threshold, "templates": list(localizer.text.templates),
            "grid_dtype": settings.grid_dtype,
        }  # fmt: skip
        self.common = {
            "base": self.base, "gamma": float(settings.gamma), "method": localizer.method,
            "model": localizer.bundle.name, "resize": localizer.resize, "interpolation": INTERPOLATION,
            "threshold": str(settings.threshold), "run_id": run_info.get("start_utc", ""),
        }  # fmt: skip

    def item_keys(self, item: Path) -> list[tuple[Any, ...]]:
        """One key ``(image_key, concept)`` per concept."""
        k = self.keys[item]
        return [(k, c) for c in self.s.concepts]

    def _row(self, item: Path, concept: str, trait: str | None) -> dict[str, Any]:
        return {**self.common, "image": str(Path(item).resolve()), "image_key": self.keys[item], "concept": concept,
                "trait": trait or "", "notes": ""}  # fmt: skip

    def error_rows(self, item: Path, reason: str) -> list[dict[str, Any]]:
        """One row per concept with ``status = "error: <reason>"``."""
        return [{**self._row(item, c, t), "status": f"error: {reason}"}
                for c, t in zip(self.s.concepts, self.s.traits, strict=True)]  # fmt: skip

    def compute(self, batch: list[tuple[Path, Any]]) -> list[list[dict[str, Any]] | str]:
        """Maps of every concept for the batch's images (one localizer call); rows per image, or why it failed."""
        results = self.loc.explain([im.image for _, im in batch], self.s.concepts, self.s.base, self.s.gamma)
        return [self._rows(item, im, res) for (item, im), res in zip(batch, results, strict=True)]

    def _rows(self, item: Path, im: Any, res: ConceptMaps) -> list[dict[str, Any]] | str:
        signed = res.signed.detach().float().cpu()  # (Q, h, w): maps leave the device as grids
        if not torch.isfinite(signed).all():
            return "the map is not finite (NaN or infinite values)"
        W0, H0 = im.orig_size
        raw_max = signed.clamp_min(0).flatten(1).amax(1).tolist()
        scores, cscores = res.scores.float().tolist(), res.concept_scores.float().tolist()
        bscore = None if res.base_score is None else float(res.base_score)
        h, w = signed.shape[-2:]
        grids = signed.numpy()
        same = {
            **self.common, "image": str(Path(item).resolve()), "image_key": self.keys[item], "grid_h": h,
            "grid_w": w, "width": W0, "height": H0, "base_score": bscore, "status": "ok",
            "notes": "; ".join(im.warnings),
        }  # fmt: skip
        return [
            {
                **same,
                "concept": c,
                "trait": t or "",
                "grid": grids[q],
                "raw_max": raw_max[q],
                "score": scores[q],
                "concept_score": cscores[q],
            }  # fmt: skip
            for q, (c, t) in enumerate(zip(self.s.concepts, self.s.traits, strict=True))
        ]

    def finish(self, rows: list[dict[str, Any]], item: Path, loaded: Any) -> list[dict[str, Any]]:
        """``--save``: write the rows' files (in the writer thread); a row whose files fail records the error."""
        if not self.s.save:
            return rows
        out = self.out
        work = np.asarray(loaded.image)
        for row in rows:
            if row["status"] != "ok":
                continue
            try:
                _save_files(out, row, work, self.s, self.loc)
            except Exception as err:  # noqa: BLE001 - recorded for this (image, concept); the batch goes on
                row["status"] = f"error: saving files: {type(err).__name__}: {err}".splitlines()[0]
        return rows

    def run_info(self) -> dict[str, Any]:
        """The prompts, base, gamma, method, target layer and the other settings for ``run.json``."""
        return {
            "prompts": self.s.concepts, "base": self.s.base, "gamma": self.s.gamma, "method": self.loc.method,
            "target_layer": self.loc.target_layer, "resize": self.loc.resize, "threshold": self.s.threshold,
            "templates": list(self.loc.text.templates), "save": list(self.s.save),
            "truncated_prompts": list(self.loc.text.truncated), "text_cache": self.loc.text.cache_info(),
        }  # fmt: skip


def _save_files(out: Path, row: dict[str, Any], work: np.ndarray, s: LocalizeSettings, loc: ConceptLocalizer) -> None:
    """``--save``: the row's full-size map (TIFF), mask, overlay and signed map as files (each atomically)."""
    meta = {
        "traitloc": __version__, "image": row["image"], "concept": row["concept"], "base": s.base,
        "gamma": s.gamma, "method": loc.method, "model": loc.bundle.name, "pretrained": loc.bundle.pretrained,
        "target_layer": loc.target_layer, "raw_max": row["raw_max"],
        "values": "map / max (ReLU map; all-zero stays zero)", "resize": loc.resize,
        "interpolation": "bilinear, align_corners=False",
    }  # fmt: skip
    save_files(out, row, work, s.save, s.threshold, meta, row["concept"])


def save_files(
    out: Path,
    row: dict[str, Any],
    work: np.ndarray,
    kinds: Sequence[str],
    threshold: float | str,
    meta: dict[str, Any],
    label: str,
) -> None:
    """``--save`` of localize and explain: a store row's files, each written atomically; fills the row's paths.

    Parameters
    ----------
    out : the run folder; files go to ``maps/``, ``masks/``, ``overlays/`` and ``signed/`` under it, as
        ``<image_key>/<slug of label>.tif|png``, and ``row["map"]``, ``row["mask"]``, ``row["overlay"]`` get their
        paths relative to ``out``.
    row : a store row (its grid, ``width``, ``height``, ``image_key``).
    work : the working image (uint8 RGB, possibly reduced) that overlays are drawn on.
    kinds : a subset of :data:`SAVE_KINDS`.
    threshold : the mask threshold (a fraction of the max, or ``"otsu"``).
    meta : the TIFF description (settings); ``values`` is replaced for signed maps.
    label : the concept or target whose slug names the files.
    """
    img_key, slug = row["image_key"], slugify(label)
    H0, W0 = int(row["height"]), int(row["width"])
    unit = map_to_unit(render_map(row))
    if "maps" in kinds:
        rel = Path("maps") / img_key / f"{slug}.tif"
        save_map_tiff(out / rel, unit, meta)
        row["map"] = rel.as_posix()
    if "masks" in kinds:
        rel = Path("masks") / img_key / f"{slug}.png"
        mask = mask_from_map(unit, threshold)
        save_mask_png(out / rel, mask)
        row["mask"] = rel.as_posix()
        row["mask_fraction"] = float(mask.mean())  # exact, at full size: filled where masks are saved
    if "overlays" in kinds:
        rel = Path("overlays") / img_key / f"{slug}.png"
        wh, ww = work.shape[:2]
        ov = unit if (wh, ww) == (H0, W0) else map_to_unit(render_map(row, (wh, ww)))
        save_overlay_png(out / rel, work, ov)
        row["overlay"] = rel.as_posix()
    if "signed" in kinds:
        signed = render_map(row, signed=True)
        save_map_tiff(out / "signed" / img_key / f"{slug}.tif", signed, {**meta, "values": "signed, raw"})


def run_localize(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    localizer: ConceptLocalizer,
    settings: LocalizeSettings,
    run_info: dict[str, Any],
) -> dict[str, int]:
    """Localize every concept in every image under ``inputs``; returns image counts (ok, failed, skipped)."""
    paths = find_images(inputs)
    keys = image_keys(paths)
    job = LocalizeJob(localizer, settings, keys, run_info, out_dir)
    info = {
        **run_info,
        "cwd": os.getcwd(),
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "n_images": len(paths),
    }
    return run_job(job, paths, out_dir, info, batch_size=settings.batch_size, quiet=settings.quiet)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``localize`` to an ``argparse`` subparsers object and return its parser."""
    from traitloc.engine.methods import TEXT_METHODS
    from traitloc.pipelines.distributed import add_ray_arguments
    from traitloc.pipelines.options import add_model_arguments, add_shared, add_store_arguments, gamma_arg

    p = subparsers.add_parser(
        "localize",
        help="where is a trait, by text: concept vs base prompt maps, masks and scores",
        description="Finer-CAM maps of text concepts (compared against a base prompt) for images or folders. "
        "Writes the results store results/part-*.parquet (one row per image and concept: scores and the signed grid "
        "map, rendered to full-size maps, masks and overlays on demand), results.csv and run.json under --out; "
        "rerunning into the same --out skips finished rows.",
    )
    add_shared(p, "paths")
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="TEXT",
        help="a concept prompt, e.g. 'red epaulets' (repeat for several)",
    )
    p.add_argument(
        "--traits",
        metavar="FILE|NAME",
        help="a trait list: built-in name (cub200) or a .csv (prompt column) / .txt (one per line)",
    )
    p.add_argument(
        "--base",
        metavar="TEXT",
        default=None,
        help="base prompt the concept is compared against, e.g. 'bird' (default: none = plain CAM)",
    )
    p.add_argument(
        "--gamma",
        type=gamma_arg,
        default=1.0,
        help="comparison strength: s = s_concept - gamma * s_base (default: 1.0; 0 = plain CAM)",
    )
    p.add_argument(
        "--method",
        choices=TEXT_METHODS,
        default="gradcam",
        help="localization method (default: gradcam); forward-only dense methods and LeGrad for open_clip ViTs: "
        "see docs/methods.md",
    )
    p.add_argument(
        "--template",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt template with {} (repeat to ensemble), e.g. 'a photo of a bird with {}.'",
    )
    p.add_argument(
        "--resize",
        choices=["stretch", "aspect"],
        default="stretch",
        help="stretch: whole image to the model's square input; aspect: keep the aspect ratio "
        "(positional embedding interpolated) (default: stretch)",
    )
    add_shared(p, "--threshold", "--scorecam-channels")
    add_store_arguments(p, "(image, concept)")
    add_shared(p, "--out", "--quiet")
    add_model_arguments(p)
    add_ray_arguments(p)
    return p


def _concepts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """The checked, de-duplicated concept prompts of ``--concept`` and ``--traits``, and their trait names."""
    from traitloc.data.traits import load_trait_list
    from traitloc.models.text import PromptError, check_prompt
    from traitloc.pipelines.options import CliError, cli_errors

    concepts: list[str] = []
    traits: list[str | None] = []
    for c in args.concept:
        with cli_errors(PromptError, prefix="--concept: "):
            concepts.append(check_prompt(c))
        traits.append(None)
    if args.traits:
        with cli_errors(ValueError, FileNotFoundError, OSError, prefix="--traits: "):
            tl = load_trait_list(args.traits)
        for trait in tl:
            concepts.append(check_prompt(trait.prompt))
            traits.append(trait.name)
    if not concepts:
        raise CliError("give at least one --concept TEXT or --traits FILE|NAME")
    seen: set[str] = set()
    uc: list[str] = []
    ut: list[str | None] = []
    for c, t in zip(concepts, traits, strict=True):
        if c not in seen:
            seen.add(c)
            uc.append(c)
            ut.append(t)
    return uc, ut


def _run_info(args: argparse.Namespace, argv: Sequence[str], bundle: Any) -> dict[str, Any]:
    """The command's part of ``run.json``: the command line, the model's description, dtype, seed, start time."""
    from traitloc.io.files import utc_now

    return {
        "command": args.command,
        "argv": list(argv),
        **bundle.describe(),
        "dtype": args.dtype,
        "seed": args.seed,
        "start_utc": utc_now(),
    }


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``traitloc localize``; bad input raises :class:`traitloc.pipelines.options.CliError` (one line)."""
    from traitloc.models.clip import load_clip
    from traitloc.models.text import PromptError, check_prompt
    from traitloc.pipelines.distributed import ray_requested
    from traitloc.pipelines.options import cli_errors, pretrained_tag, report_counts

    concepts, traits = _concepts(args)
    if args.base is not None:
        with cli_errors(PromptError, prefix="--base: "):
            args.base = check_prompt(args.base)
    with cli_errors(FileNotFoundError, ValueError):
        find_images(args.paths)  # fail fast, before loading a model
    torch.manual_seed(args.seed)
    pretrained = pretrained_tag(args.pretrained)
    on_ray = ray_requested(args)  # fail fast, before loading a model
    bundle = load_clip(args.model, pretrained, "cpu" if on_ray else args.device)  # with --ray: the actors compute
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    loc = ConceptLocalizer(
        bundle, args.method, templates=args.template or None, resize=args.resize, amp_dtype=amp,
        scorecam_channels=args.scorecam_channels,
    )  # fmt: skip
    settings = LocalizeSettings(
        concepts=concepts, traits=traits, base=args.base, gamma=args.gamma, batch_size=args.batch_size,
        threshold=args.threshold, save=args.save, quiet=args.quiet, grid_dtype=args.grid_dtype,
    )  # fmt: skip
    with cli_errors(SettingsMismatchError):
        if on_ray:
            from traitloc.pipelines.distributed import run_localize_ray

            counts = run_localize_ray(args, pretrained, loc, settings, _run_info(args, argv, bundle))
        else:
            counts = run_localize(args.paths, args.out, loc, settings, _run_info(args, argv, bundle))
    return report_counts("localize", counts, args.out, args.quiet)
