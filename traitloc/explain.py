r"""``traitloc explain``: Finer-CAM maps of a species classifier for images or folders (DESIGN.md §6).

For each image the classifier's target class :math:`c` (``--target``; ``auto`` = the predicted class) is explained
against references :math:`d_1..d_T` (``--reference``; default: the ``--num-references`` classes whose logits are
closest to the target's, target excluded) with the objective

.. math:: s = z_c - \gamma \frac{1}{T}\sum_t z_{d_t}
          \qquad (\texttt{--reverse}: s = \frac{1}{T}\sum_t z_{d_t} - \gamma z_c)

aggregated before the ReLU, with a Grad-CAM, Layer-CAM or Score-CAM base
(:class:`traitloc.classify.ClassifierExplainer`).
``--gamma 0`` gives the plain CAM of the target; ``--gamma`` above 1 extrapolates.

Outputs under ``--out`` (paths in the table are relative to it), one row per image:

- ``maps/<image-key>/<target-slug>.tif``: float32 at the original image's height x width, map / its max (values in
  [0, 1]; an all-zero map stays zero), the settings in the TIFF description;
- ``masks/<image-key>/<target-slug>.png`` (0/255, map > ``--threshold``), ``overlays/<image-key>/<target-slug>.png``;
- ``results.csv``: ``image, image_key, target, predicted, references, gamma, method, raw_max, map, status`` and more
  (:data:`EXPLAIN_COLUMNS`); ``status`` is ``ok`` or ``error: <reason>`` for that image;
- ``run.json``.

Images are decoded one batch ahead in a background thread; each image's files are written atomically before its
row is appended, so a killed run resumes: rerunning into the same folder skips the rows already ``ok`` for the same
classifier and settings. The map covers the whole image: the classifier's ``preprocess`` is expected to resize the
whole image (as :class:`traitloc.backbones.ImagePreprocess` does); one that crops would misalign the map.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EXPLAIN_COLUMNS", "EXPLAIN_KEY", "ExplainSettings", "add_parser", "load_classifier", "run", "run_explain"]

log = logging.getLogger(__name__)

EXPLAIN_COLUMNS = [
    "image", "image_key", "target", "predicted", "references", "gamma", "method", "reverse", "raw_max", "score",
    "target_logit", "predicted_logit", "target_index", "predicted_index", "reference_indices", "mask_fraction",
    "map", "mask", "overlay", "width", "height", "target_spec", "reference_spec", "classifier", "status", "notes",
]  # fmt: skip
EXPLAIN_KEY = ["image_key", "target_spec", "reference_spec", "gamma", "method", "reverse", "classifier"]
#: separator of class names in the ``references`` column
REF_SEP = "; "


@dataclass
class ExplainSettings:
    """What ``traitloc explain`` explains for every image."""

    target: int | str  # a class index, or "auto" (the predicted class)
    references: list[int] | None  # None: the num_references classes with the closest logits
    num_references: int = 3
    gamma: float = 0.6
    reverse: bool = False
    batch_size: int = 8
    threshold: float | str = 0.5
    save_signed: bool = False
    quiet: bool = False

    def target_spec(self, names: Sequence[str]) -> str:
        return "auto" if self.target == "auto" else names[int(self.target)]

    def reference_spec(self, names: Sequence[str]) -> str:
        if self.references is None:
            return f"auto:{self.num_references}"
        return REF_SEP.join(names[r] for r in self.references) or "(none)"


# ------------------------------------------------------------------------------------------------------------------
# the classifier
# ------------------------------------------------------------------------------------------------------------------
def load_classifier(
    *, classifier: str | None = None, probe: str | None = None, device: str | torch.device = "auto"
) -> Any:
    """A :class:`traitloc.train.ProbeModel` from ``--classifier MODULE:FUNCTION`` or ``--probe PROBE_DIR``.

    A ``--classifier`` model gives logits: its head is the identity (``weight = I``, no bias).

    Raises
    ------
    ValueError, traitloc.backbones.CallableError, traitloc.classify.ProbeError
        One line: import failure, wrong shapes, missing probe files...
    """
    from .backbones import load_callable, make_adapter
    from .models import resolve_device
    from .train import ProbeModel, load_probe_model

    if (classifier is None) == (probe is None):
        raise ValueError("give exactly one of --classifier MODULE:FUNCTION or --probe PROBE_DIR")
    dev = resolve_device(device)
    if probe is not None:
        return load_probe_model(probe, dev)
    spec = load_callable(str(classifier).strip(), "classifier")
    model = spec["model"]
    model.to(dev)
    adapter = make_adapter(spec)
    K = len(spec["class_names"])
    return ProbeModel(
        adapter=adapter,
        weight=torch.eye(K, device=dev),
        bias=None,
        class_names=list(spec["class_names"]),
        preprocess=spec["preprocess"],
        model=model,
        device=dev,
        meta={},
        describe={
            "classifier": spec.get("callable"),
            "target_layer": getattr(adapter, "target_layer", None),
            "num_classes": K,
            "spec": spec.get("spec") if isinstance(spec.get("spec"), (str, dict)) else str(spec.get("spec")),
        },
    )


def _classifier_id(clf: Any) -> str:
    """A short stable id of the classifier for ``results.csv`` keys."""
    d = clf.describe
    if d.get("probe_sha256"):
        return f"probe:{d['probe_sha256'][:12]}"
    return str(d.get("classifier") or "classifier")


# ------------------------------------------------------------------------------------------------------------------
# the batch run
# ------------------------------------------------------------------------------------------------------------------
def run_explain(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    clf: Any,
    explainer: Any,
    settings: ExplainSettings,
    run_info: dict[str, Any],
) -> dict[str, int]:
    """Explain every image under ``inputs`` into ``out_dir``; returns counts (ok, failed, skipped)."""
    from .batch import _prefetched, _progress, refuse_other_settings, remove_stale_temp_files, split_on_oom
    from .export import utc_now, write_run_json
    from .imageio import ImageLoadError, LoadedImage, find_images, image_keys
    from .results import ResultsTable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # left by a killed run; one process writes an output folder at a time
    paths = find_images(inputs)
    keys = image_keys(paths)
    names = clf.class_names
    table = ResultsTable(out / "results.csv", EXPLAIN_COLUMNS, EXPLAIN_KEY)
    base_row = {
        "target_spec": settings.target_spec(names),
        "reference_spec": settings.reference_spec(names),
        "gamma": f"{settings.gamma:g}",
        "method": explainer.method,
        "reverse": str(settings.reverse).lower(),
        "classifier": _classifier_id(clf),
    }
    map_settings = {**base_row, "threshold": settings.threshold}
    refuse_other_settings(out / "run.json", map_settings)
    done = table.done_keys()
    todo = [p for p in paths if table.key_of({**base_row, "image_key": keys[p]}) not in done]
    skipped = len(paths) - len(todo)
    info = dict(run_info)
    info["map_settings"] = map_settings
    info.update(
        start_utc=info.get("start_utc") or utc_now(),
        end_utc=None,
        n_images=len(paths),
        n_images_todo=len(todo),
        n_images_skipped_done=skipped,
        status="running",
    )
    write_run_json(out / "run.json", info)
    counts = {"ok": 0, "failed": 0, "skipped": skipped}
    bar = _progress(len(todo), settings.quiet, "explain")
    writer = ThreadPoolExecutor(max_workers=2)
    t0 = time.perf_counter()

    def error_row(p: Path, reason: str) -> dict[str, Any]:
        return {**dict.fromkeys(EXPLAIN_COLUMNS, ""), **base_row, "image": str(p), "image_key": keys[p],
                "status": f"error: {reason}".splitlines()[0]}  # fmt: skip

    try:
        for chunk in _prefetched(todo, settings.batch_size):
            good: list[tuple[Path, Any, Tensor]] = []
            for p, im in chunk:
                if isinstance(im, ImageLoadError):
                    table.append([error_row(p, im.reason)])
                    counts["failed"] += 1
                    bar.update(1)
                    continue
                assert isinstance(im, LoadedImage)
                try:
                    x = clf.preprocess(im.image)
                    if not isinstance(x, Tensor) or x.ndim != 3:
                        raise ValueError(f"preprocess returned {getattr(x, 'shape', type(x).__name__)}, not (C, H, W)")
                except Exception as err:  # noqa: BLE001 - a per-image error
                    table.append([error_row(p, f"preprocess failed: {type(err).__name__}: {err}")])
                    counts["failed"] += 1
                    bar.update(1)
                    continue
                good.append((p, im, x))
            for group in _same_shape_groups(good):
                results = _explain_group(group, clf, explainer, settings, split_on_oom)
                futures = []
                for (p, im, _), res in zip(group, results, strict=True):
                    if isinstance(res, str):
                        table.append([error_row(p, res)])
                        counts["failed"] += 1
                        bar.update(1)
                        continue
                    futures.append(writer.submit(_write_outputs, p, im, keys[p], res, out, settings, clf, base_row))
                for f in futures:
                    row = f.result()
                    table.append([row])
                    counts["ok" if row["status"] == "ok" else "failed"] += 1
                    bar.update(1)
    finally:
        writer.shutdown(wait=True)
        bar.close()
        info.update(end_utc=utc_now(), status="finished", counts=counts, seconds=round(time.perf_counter() - t0, 3))
        write_run_json(out / "run.json", info)
    return counts


def _same_shape_groups(items: list[tuple[Path, Any, Tensor]]) -> list[list[tuple[Path, Any, Tensor]]]:
    groups: dict[tuple[int, ...], list[tuple[Path, Any, Tensor]]] = {}
    for it in items:
        groups.setdefault(tuple(it[2].shape), []).append(it)
    return list(groups.values())


@dataclass
class _One:
    """One image's explanation, on the CPU."""

    grid_map: Tensor  # (h, w) ReLU map
    grid_signed: Tensor
    score: float
    target: int
    predicted: int
    references: list[int]
    logits: Tensor


def _explain_group(
    group: list[tuple[Path, Any, Tensor]], clf: Any, explainer: Any, settings: ExplainSettings, split_on_oom: Any
) -> list[_One | str]:
    """Explain images of one input size; per-image failures come back as their reason (str)."""
    names = clf.class_names
    results: list[_One | str | None] = [None] * len(group)
    idx = list(range(len(group)))
    if settings.target == "auto" and settings.references:
        # the predicted class is the target: an image predicted as one of the references cannot be explained
        x = torch.stack([group[i][2] for i in idx]).to(clf.device)
        pred = explainer.logits(x).argmax(1).tolist()
        keep = []
        for i, c in zip(idx, pred, strict=True):
            if c in settings.references:
                results[i] = (
                    f"reference {names[c]!r} equals the predicted class (--target auto); give another --reference "
                    f"or an explicit --target"
                )
            else:
                keep.append(i)
        idx = keep

    def run_items(items: list[int]) -> list[_One]:
        x = torch.stack([group[i][2] for i in items]).to(clf.device)
        res = explainer.explain(
            x, target=settings.target, references=settings.references, num_references=settings.num_references,
            gamma=settings.gamma, reverse=settings.reverse,
        )  # fmt: skip
        maps, signed = res.maps.detach().float().cpu(), res.signed.detach().float().cpu()
        scores = res.cam.scores[:, 0].detach().float().cpu()
        logits = res.logits.detach().float().cpu()
        return [
            _One(
                maps[b],
                signed[b],
                float(scores[b]),
                res.targets[b],
                res.predicted[b],
                list(res.references[b]),
                logits[b],
            )
            for b in range(len(items))
        ]

    if idx:
        try:
            outs: list[_One] = split_on_oom(run_items, idx)
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        except Exception as err:  # noqa: BLE001 - retry image by image so one bad image does not sink the batch
            log.debug("batch failed (%s); retrying image by image", err)
            for i in idx:
                try:
                    results[i] = run_items([i])[0]
                except Exception as e1:  # noqa: BLE001
                    log.warning("%s: %s: %s", group[i][0], type(e1).__name__, e1)
                    results[i] = f"{type(e1).__name__}: {e1}"
    return [r if r is not None else "not explained" for r in results]


def _write_outputs(
    path: Path, im: Any, img_key: str, res: _One, out: Path, settings: ExplainSettings, clf: Any, base_row: dict
) -> dict[str, Any]:
    """Write map/mask/overlay of one image (each file atomically) and return its results row."""
    from . import __version__
    from .cam import upsample_maps
    from .export import map_to_unit, mask_from_map, save_map_tiff, save_mask_png, save_overlay_png, slugify

    names = clf.class_names
    row: dict[str, Any] = {**dict.fromkeys(EXPLAIN_COLUMNS, ""), **base_row, "image": str(path), "image_key": img_key}
    row.update(
        target=names[res.target],
        predicted=names[res.predicted],
        references=REF_SEP.join(names[r] for r in res.references),
        target_index=res.target,
        predicted_index=res.predicted,
        reference_indices=" ".join(str(r) for r in res.references),
        target_logit=float(res.logits[res.target]),
        predicted_logit=float(res.logits[res.predicted]),
        score=res.score,
    )
    try:
        W0, H0 = im.orig_size
        slug = slugify(names[res.target])
        rel_map = Path("maps") / img_key / f"{slug}.tif"
        rel_mask = Path("masks") / img_key / f"{slug}.png"
        rel_ov = Path("overlays") / img_key / f"{slug}.png"
        raw = upsample_maps(res.grid_map, (H0, W0)).numpy()
        raw_max = float(raw.max()) if raw.size else 0.0
        if not math.isfinite(raw_max):
            raise ValueError("the map is not finite")
        unit = map_to_unit(raw)
        meta = {
            "traitloc": __version__, "image": str(path), "target": names[res.target],
            "predicted": names[res.predicted], "references": [names[r] for r in res.references],
            "gamma": settings.gamma, "reverse": settings.reverse, "method": base_row["method"],
            "classifier": base_row["classifier"], "target_layer": clf.describe.get("target_layer"),
            "raw_max": raw_max, "values": "map / raw_max (ReLU map; all-zero stays zero)",
            "interpolation": "bilinear, align_corners=False, from the target layer's grid to the original size",
        }  # fmt: skip
        save_map_tiff(out / rel_map, unit, meta)
        mask = mask_from_map(unit, settings.threshold)
        save_mask_png(out / rel_mask, mask)
        work = np.asarray(im.image)
        wh, ww = work.shape[:2]
        ov = unit if (wh, ww) == (H0, W0) else map_to_unit(upsample_maps(res.grid_map, (wh, ww)).numpy())
        save_overlay_png(out / rel_ov, work, ov)
        if settings.save_signed:
            signed = upsample_maps(res.grid_signed, (H0, W0)).numpy()
            save_map_tiff(out / "signed" / img_key / f"{slug}.tif", signed, {**meta, "values": "signed, raw"})
        row.update(
            raw_max=raw_max, mask_fraction=float(mask.mean()), map=rel_map.as_posix(), mask=rel_mask.as_posix(),
            overlay=rel_ov.as_posix(), width=W0, height=H0, status="ok", notes="; ".join(im.warnings),
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - recorded for this image; the batch goes on
        row["status"] = f"error: {type(err).__name__}: {err}".splitlines()[0]
    return row


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``explain`` to a ``argparse`` subparsers object and return its parser."""
    from .cli import _gamma, _positive, _threshold

    p = subparsers.add_parser(
        "explain",
        help="why is this image species c rather than similar species: Finer-CAM maps of a classifier",
        description="Finer-CAM maps of a species classifier: the target class (default: the predicted one) against "
        "references (default: the classes whose logits are closest to the target's). Writes "
        "maps/<image-key>/<target>.tif (float32, original size, map / max), masks/, overlays/, results.csv and "
        "run.json under --out; rerunning into the same --out skips finished rows.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--classifier",
        metavar="MODULE:FUNCTION",
        help="a function returning model (normalized batch -> logits), target_layer, preprocess and class_names "
        "(the working directory is importable)",
    )
    src.add_argument(
        "--probe",
        metavar="PROBE_DIR",
        help="a probe from traitloc train-probe (its backbone is rebuilt from probe.json)",
    )
    p.add_argument(
        "--target",
        default="auto",
        metavar="auto|NAME|INDEX",
        help="class to explain: auto (the predicted class), a class name or a 0-based index (default: auto)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=None,
        metavar="NAME",
        help="a reference class the target is compared with (repeat for several; default: the --num-references "
        "classes whose logits are closest to the target's, target excluded)",
    )
    p.add_argument("--num-references", type=_positive, default=3, help="number of automatic references (default: 3)")
    p.add_argument(
        "--gamma",
        type=_gamma,
        default=0.6,
        help="comparison strength: s = z_target - gamma * mean(z_refs) (default: 0.6; 0 = plain CAM; > 1 extrapolates)",
    )
    p.add_argument(
        "--method", choices=["gradcam", "layercam", "scorecam"], default="gradcam", help="CAM base (default: gradcam)"
    )
    p.add_argument(
        "--reverse",
        action="store_true",
        help="explain what speaks for the references instead: s = mean(z_refs) - gamma * z_target",
    )
    p.add_argument(
        "--scorecam-channels",
        type=_positive,
        default=None,
        help="Score-CAM channel budget: the k channels of largest spatial variance (default: all)",
    )
    p.add_argument(
        "--threshold", type=_threshold, default=0.5, help="mask threshold on the [0,1] map, or 'otsu' (default: 0.5)"
    )
    p.add_argument("--save-signed", action="store_true", help="also write signed (pre-ReLU) maps to signed/")
    p.add_argument("--batch-size", type=_positive, default=8, help="images per batch (default: 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    return p


def _class_arg(explainer: Any, value: str, flag: str) -> int:
    from .cli import CliError

    try:
        return int(explainer.class_index(value))
    except (ValueError, TypeError) as err:
        raise CliError(f"{flag}: {err}") from err


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``traitloc explain``; bad input raises :class:`traitloc.cli.CliError` (one line)."""
    from .backbones import CallableError
    from .classify import ProbeError
    from .cli import CliError
    from .export import utc_now
    from .imageio import find_images
    from .models import ModelLoadError
    from .train import keep_freed_memory

    start = utc_now()
    if args.gamma < 0:
        raise CliError(f"--gamma must be >= 0 (got {args.gamma:g}); use --reverse to explain the references")
    try:
        find_images(args.paths)  # fail fast, before loading a model
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from err
    try:
        clf = load_classifier(classifier=args.classifier, probe=args.probe, device=args.device)
    except (CallableError, ProbeError, ModelLoadError, ValueError) as err:
        raise CliError(str(err).splitlines()[0]) from err
    explainer = clf.explainer(args.method, scorecam_channels=args.scorecam_channels)
    allocator = keep_freed_memory()
    names = clf.class_names
    target: int | str = (
        "auto" if args.target.strip().lower() == "auto" else _class_arg(explainer, args.target, "--target")
    )
    refs: list[int] | None = None
    if args.reference:
        refs = [_class_arg(explainer, r, "--reference") for r in args.reference]
        if target != "auto" and target in refs:
            raise CliError(
                f"--reference {names[int(target)]!r} equals the --target; a class cannot be its own reference"
            )
        dup = next((names[r] for r in refs if refs.count(r) > 1), None)
        if dup is not None:
            raise CliError(f"--reference {dup!r} is given twice")
    if args.reverse and refs is None and len(names) < 2:
        raise CliError("--reverse needs at least one reference class")
    settings = ExplainSettings(
        target=target, references=refs, num_references=args.num_references, gamma=args.gamma, reverse=args.reverse,
        batch_size=args.batch_size, threshold=args.threshold, save_signed=args.save_signed, quiet=args.quiet,
    )  # fmt: skip
    d = clf.describe
    backbone = d.get("backbone") if isinstance(d.get("backbone"), dict) else {}
    x0 = getattr(clf.preprocess, "size", None)
    info = {
        "command": "explain",
        "argv": list(argv),
        "classifier": d.get("classifier") or d.get("probe"),
        "probe": d.get("probe"),
        "probe_sha256": d.get("probe_sha256"),
        "model": backbone.get("model") or backbone.get("name") or backbone.get("callable") or d.get("classifier"),
        "pretrained": backbone.get("pretrained") or backbone.get("weights"),
        "pretrained_sha256": backbone.get("pretrained_sha256") or backbone.get("weights_sha256"),
        "backbone": backbone or None,
        "device": str(clf.device),
        "dtype": "fp32",
        "image_size": list(x0) if x0 is not None else None,
        "num_classes": len(names),
        "targets": settings.target_spec(names),
        "references": settings.reference_spec(names),
        "num_references": args.num_references,
        "gamma": args.gamma,
        "reverse": args.reverse,
        "method": args.method,
        "scorecam_channels": args.scorecam_channels,
        "target_layer": clf.target_layer,
        "threshold": args.threshold,
        "allocator": allocator,
        "seed": None,
        "start_utc": start,
    }
    from .batch import SettingsMismatchError

    try:
        counts = run_explain(args.paths, args.out, clf, explainer, settings, info)
    except SettingsMismatchError as err:
        raise CliError(str(err)) from err
    if not args.quiet:
        print(
            f"traitloc explain: {counts['ok']} images done, {counts['failed']} failed, "
            f"{counts['skipped']} already done -> {args.out}",
            file=sys.stderr,
        )
    return 1 if counts["failed"] and not counts["ok"] and not counts["skipped"] else 0
