"""``traitloc explain``: Finer-CAM maps of a species classifier for images or folders.

Each image's target class (``--target``; ``auto`` = the predicted class) is explained against references (default:
the ``--num-references`` classes whose logits are closest) with ``s = z_c - gamma * mean_t z_{d_t}``, aggregated
before the ReLU (:class:`traitloc.models.classifier.ClassifierExplainer`), as a job of the pipeline runner
(:class:`ExplainJob`, built elsewhere from the picklable :class:`ExplainSpec`). Objective, outputs, resume and
building the job: ``docs/engine.md`` ("traitloc explain").
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from traitloc.pipelines.runner import Job, SettingsMismatchError, bool_text, load_or_error, run_job

if TYPE_CHECKING:
    from traitloc.models.classifier import ClassifierBundle, ClassifierExplainer

__all__ = [
    "EXPLAIN_COLUMNS",
    "EXPLAIN_KEY",
    "ExplainJob",
    "ExplainSettings",
    "ExplainSpec",
    "ExplainSpecError",
    "SettingsMismatchError",
    "add_parser",
    "build_explain_job",
    "explain_items",
    "load_classifier",
    "resolve_settings",
    "run",
    "run_explain",
]

log = logging.getLogger(__name__)

EXPLAIN_COLUMNS = [
    "image", "image_key", "target", "predicted", "references", "gamma", "method", "reverse", "raw_max", "score",
    "target_logit", "predicted_logit", "target_index", "predicted_index", "reference_indices", "mask_fraction",
    "map", "mask", "overlay", "width", "height", "target_spec", "reference_spec", "classifier", "status", "notes",
]  # fmt: skip
#: the keys of a row in the store (settings that must match are checked apart: :attr:`ExplainJob.map_settings`)
EXPLAIN_KEY = ["image_key", "target_spec", "reference_spec"]
#: separator of class names in the ``references`` column
REF_SEP = "; "
#: how the classifier's preprocess is assumed to bring the image to the model input (the whole image, no crop)
RESIZE = "stretch"


class ExplainSpecError(ValueError):
    """A target or reference that the classifier cannot explain (one line, naming the option)."""


@dataclass
class ExplainSpec:
    """What ``traitloc explain`` explains, as given on the command line (picklable; no model inside).

    Attributes
    ----------
    classifier, probe : exactly one: ``MODULE:FUNCTION`` or a probe folder (:func:`load_classifier`).
    device : ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
    target : ``"auto"`` (the predicted class), a class name or a 0-based index (as text or int).
    references : class names or indices, or None (the ``num_references`` classes with the closest logits).
    num_references, gamma, method, reverse, scorecam_channels : the explanation, ``docs/engine.md`` "traitloc explain".
    threshold : mask threshold (``--save masks`` and ``mask_fraction``).
    save : files written beside the store, a subset of :data:`traitloc.pipelines.localize.SAVE_KINDS`.
    grid_dtype : ``float32`` or ``float16`` grids in the store.
    batch_size, quiet : batching and progress bar.
    """

    classifier: str | None = None
    probe: str | None = None
    device: str = "auto"
    target: str | int = "auto"
    references: list[str | int] | None = None
    num_references: int = 3
    gamma: float = 0.6
    method: str = "gradcam"
    reverse: bool = False
    scorecam_channels: int | None = None
    threshold: float | str = 0.5
    save: tuple[str, ...] = ()
    grid_dtype: str = "float32"
    batch_size: int = 8
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExplainSpec:
        """The spec of parsed ``traitloc explain`` arguments."""
        return cls(
            classifier=args.classifier, probe=args.probe, device=args.device, target=args.target,
            references=list(args.reference) if args.reference else None, num_references=args.num_references,
            gamma=args.gamma, method=args.method, reverse=args.reverse, scorecam_channels=args.scorecam_channels,
            threshold=args.threshold, save=tuple(args.save), grid_dtype=args.grid_dtype, batch_size=args.batch_size,
            quiet=args.quiet,
        )  # fmt: skip


@dataclass
class ExplainSettings:
    """What ``traitloc explain`` explains for every image, resolved against the classifier's classes."""

    target: int | str  # a class index, or "auto" (the predicted class)
    references: list[int] | None  # None: the num_references classes with the closest logits
    num_references: int = 3
    gamma: float = 0.6
    reverse: bool = False
    batch_size: int = 8
    threshold: float | str = 0.5
    save: Sequence[str] = ()
    grid_dtype: str = "float32"
    quiet: bool = False

    def __post_init__(self) -> None:
        from traitloc.pipelines.localize import SAVE_KINDS

        bad = [k for k in self.save if k not in SAVE_KINDS]
        if bad:
            raise ValueError(f"--save: unknown kind(s) {', '.join(bad)}; choose from {', '.join(SAVE_KINDS)}")

    def target_spec(self, names: Sequence[str]) -> str:
        """The target as recorded in the store key: ``auto`` or the class name."""
        return "auto" if self.target == "auto" else names[int(self.target)]

    def reference_spec(self, names: Sequence[str]) -> str:
        """The references as recorded in the store key: ``auto:T``, the class names, or ``(none)``."""
        if self.references is None:
            return f"auto:{self.num_references}"
        return REF_SEP.join(names[r] for r in self.references) or "(none)"


# ------------------------------------------------------------------------------------------------------------------
# the classifier
# ------------------------------------------------------------------------------------------------------------------
def load_classifier(
    *, classifier: str | None = None, probe: str | None = None, device: str | torch.device = "auto"
) -> ClassifierBundle:
    """A :class:`traitloc.models.probes.ProbeClassifier` from ``--classifier MODULE:FUNCTION`` or ``--probe PROBE_DIR``.

    A ``--classifier`` model gives logits: its head is the identity (``weight = I``, no bias).

    Raises
    ------
    ValueError, traitloc.models.backbones.CallableError, traitloc.models.probes.ProbeError
        One line: import failure, wrong shapes, missing probe files...
    """
    from traitloc.models.backbones import load_callable, make_adapter
    from traitloc.models.classifier import ClassifierExplainer
    from traitloc.models.clip import resolve_device
    from traitloc.models.probes import ProbeClassifier, load_probe_classifier

    if (classifier is None) == (probe is None):
        raise ValueError("give exactly one of --classifier MODULE:FUNCTION or --probe PROBE_DIR")
    dev = resolve_device(device)
    if probe is not None:
        return load_probe_classifier(probe, device=dev)
    spec = load_callable(str(classifier).strip(), "classifier")
    model = spec["model"].to(dev)
    adapter = make_adapter(spec)
    names = list(spec["class_names"])
    describe = {
        "classifier": spec.get("callable"),
        "target_layer": getattr(adapter, "target_layer", None),
        "num_classes": len(names),
        "spec": spec.get("spec") if isinstance(spec.get("spec"), (str, dict)) else str(spec.get("spec")),
    }
    explainer = ClassifierExplainer(adapter, torch.eye(len(names), device=dev), None, names)
    return ProbeClassifier(explainer, spec["preprocess"], names, {}, describe, model=model, device=dev)


def _classifier_id(clf: ClassifierBundle) -> str:
    """A short stable id of the classifier for ``results.csv`` keys."""
    d = clf.describe
    if d.get("probe_sha256"):
        return f"probe:{d['probe_sha256'][:12]}"
    return str(d.get("classifier") or "classifier")


# ------------------------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------------------------
def resolve_settings(spec: ExplainSpec, explainer: ClassifierExplainer) -> ExplainSettings:
    """Resolve a spec's target and references against the classifier's classes.

    Raises
    ------
    ExplainSpecError
        An unknown or ambiguous class, a reference equal to the target or given twice, ``--reverse`` without a
        reference class, a negative gamma (one line, naming the option).
    """
    names = explainer.class_names

    def index(value: str | int, flag: str) -> int:
        try:
            return int(explainer.class_index(value))
        except (ValueError, TypeError) as err:
            raise ExplainSpecError(f"{flag}: {err}") from err

    if spec.gamma < 0:
        raise ExplainSpecError(f"--gamma must be >= 0 (got {spec.gamma:g}); use --reverse to explain the references")
    auto = isinstance(spec.target, str) and spec.target.strip().lower() == "auto"
    target: int | str = "auto" if auto else index(spec.target, "--target")
    refs: list[int] | None = None
    if spec.references:
        refs = [index(r, "--reference") for r in spec.references]
        if target != "auto" and target in refs:
            raise ExplainSpecError(
                f"--reference {names[int(target)]!r} equals the --target; a class cannot be its own reference"
            )
        dup = next((names[r] for r in refs if refs.count(r) > 1), None)
        if dup is not None:
            raise ExplainSpecError(f"--reference {dup!r} is given twice")
    if spec.reverse and refs is None and len(names) < 2:
        raise ExplainSpecError("--reverse needs at least one reference class")
    return ExplainSettings(
        target=target, references=refs, num_references=spec.num_references, gamma=float(spec.gamma),
        reverse=bool(spec.reverse), batch_size=spec.batch_size, threshold=spec.threshold, save=tuple(spec.save),
        grid_dtype=spec.grid_dtype, quiet=spec.quiet,
    )  # fmt: skip


def build_explain_job(spec: ExplainSpec, out_dir: str | Path, clf: ClassifierBundle | None = None) -> ExplainJob:
    """Load the classifier of ``spec`` (unless ``clf`` is given) and return the :class:`ExplainJob` into ``out_dir``.

    Raises
    ------
    ExplainSpecError
        A bad target or reference (:func:`resolve_settings`).
    ValueError, traitloc.models.backbones.CallableError, traitloc.models.probes.ProbeError,
    traitloc.models.clip.ModelLoadError
        The classifier cannot be loaded (:func:`load_classifier`).
    """
    if clf is None:
        clf = load_classifier(classifier=spec.classifier, probe=spec.probe, device=spec.device)
    explainer = clf.explainer.with_method(spec.method, scorecam_channels=spec.scorecam_channels)
    settings = resolve_settings(spec, explainer)
    return ExplainJob(clf, explainer, settings, out_dir, scorecam_channels=spec.scorecam_channels)


def explain_items(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """The items of an explain run: ``(absolute image path, image key)`` for every image under ``inputs``.

    Keys (:func:`traitloc.data.images.image_keys`) depend on the whole list (colliding file names get folder prefixes),
    so make the items once and split the list among workers.
    """
    from traitloc.data.images import find_images, image_keys

    paths = find_images(inputs)
    keys = image_keys(paths)
    return [(str(Path(p).resolve()), keys[p]) for p in paths]


@dataclass
class _Decoded:
    """An image decoded and preprocessed in the prefetch thread."""

    im: Any  # traitloc.data.images.LoadedImage
    x: Tensor  # (C, H, W) model input


class ExplainJob(Job):
    """Finer-CAM maps of a classifier: one store row per image (its target against its references).

    Items are ``(absolute image path, image key)`` pairs (:func:`explain_items`). Build one with
    :func:`build_explain_job`; run it with :func:`traitloc.pipelines.runner.run_job`.
    """

    name = "explain"
    key_columns = tuple(EXPLAIN_KEY)
    csv_columns = tuple(EXPLAIN_COLUMNS)
    retry_errors = True
    columns = {
        "target_spec": "str", "reference_spec": "str", "target": "str", "predicted": "str", "references": "str",
        "target_index": "int", "predicted_index": "int", "reference_indices": "str", "target_logit": "float",
        "predicted_logit": "float", "score": "float", "gamma": "float", "method": "str", "reverse": "bool",
        "classifier": "str", "threshold": "str", "mask_fraction": "float", "map": "str", "mask": "str",
        "overlay": "str",
    }  # fmt: skip

    def __init__(
        self,
        clf: ClassifierBundle,
        explainer: ClassifierExplainer,
        settings: ExplainSettings,
        out_dir: str | Path,
        *,
        scorecam_channels: int | None = None,
    ) -> None:
        from traitloc.io.store import INTERPOLATION

        self.clf = clf
        self.explainer = explainer
        self.s = settings
        self.out = Path(out_dir)
        self.grid_dtype = settings.grid_dtype
        self.scorecam_channels = scorecam_channels
        names = clf.class_names
        self.names = names
        self.common = {
            "target_spec": settings.target_spec(names), "reference_spec": settings.reference_spec(names),
            "gamma": float(settings.gamma), "method": explainer.method, "reverse": bool(settings.reverse),
            "classifier": _classifier_id(clf),
        }  # fmt: skip
        self.map_settings = {
            **self.common, "threshold": settings.threshold, "scorecam_channels": scorecam_channels,
            "grid_dtype": settings.grid_dtype,
        }  # fmt: skip
        self.fixed = {
            **self.common, "threshold": str(settings.threshold), "resize": RESIZE, "interpolation": INTERPOLATION,
            "map": "", "mask": "", "overlay": "", "notes": "",
        }  # fmt: skip

    # -- items ----------------------------------------------------------------------------------------------------
    def item_keys(self, item: tuple[str, str]) -> list[tuple[Any, ...]]:
        """The one store key of an image: ``(image key, target spec, reference spec)``."""
        return [(item[1], self.common["target_spec"], self.common["reference_spec"])]

    def load(self, item: tuple[str, str]) -> Any:
        """Decode and preprocess (in the prefetch thread); a failure of either is this image's error."""
        from traitloc.data.images import ImageLoadError

        im = load_or_error(Path(item[0]))
        if isinstance(im, ImageLoadError):
            return im
        try:
            x = self.clf.preprocess(im.image)
            if not isinstance(x, Tensor) or x.ndim != 3:
                raise ValueError(f"preprocess returned {getattr(x, 'shape', type(x).__name__)}, not (C, H, W)")
        except Exception as err:  # noqa: BLE001 - a per-image error
            return ImageLoadError(item[0], f"preprocess failed: {type(err).__name__}: {err}".splitlines()[0])
        return _Decoded(im, x)

    def _row(self, item: tuple[str, str]) -> dict[str, Any]:
        return {**self.fixed, "image": item[0], "image_key": item[1]}

    def error_rows(self, item: tuple[str, str], reason: str) -> list[dict[str, Any]]:
        """The store row of an image that failed (``status = error: <reason>``)."""
        from traitloc.io.files import slugify

        row = self._row(item)
        explicit = self.s.target != "auto"
        row["target"] = self.names[int(self.s.target)] if explicit else ""
        row["result_id"] = f"{item[1]}/{slugify(row['target'] or 'auto')}"
        row["status"] = f"error: {reason}".splitlines()[0]
        return [row]

    # -- compute --------------------------------------------------------------------------------------------------
    def compute(self, batch: list[tuple[tuple[str, str], _Decoded]]) -> list[list[dict[str, Any]] | str]:
        """One row per image; images of one input shape are explained together (a batch must be rectangular)."""
        s, names = self.s, self.names
        results: list[list[dict[str, Any]] | str | None] = [None] * len(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, dec) in enumerate(batch):
            groups.setdefault(tuple(dec.x.shape), []).append(i)
        dev = self.clf.device
        for idx in groups.values():
            x = torch.stack([batch[i][1].x for i in idx]).to(dev)
            pre = self.explainer.cam.prefix(x)  # the batch's one forward pass
            bad: dict[int, str] = {}
            if s.target == "auto" and s.references:
                # the predicted class is the target: an image predicted as one of the references cannot be explained
                pred = self.explainer.logits(pre).argmax(1).tolist()
                bad = {i: names[c] for i, c in zip(idx, pred, strict=True) if c in s.references}
                for i, name in bad.items():
                    results[i] = (
                        f"reference {name!r} equals the predicted class (--target auto); give another "
                        f"--reference or an explicit --target"
                    )
                if bad:  # the others are explained on their own (a prefix cannot be cut)
                    keep = [j for j, i in enumerate(idx) if i not in bad]
                    idx, x = [idx[j] for j in keep], x[keep]
            if not idx:
                continue
            res = self.explainer.explain(
                x, target=s.target, references=s.references, num_references=s.num_references, gamma=s.gamma,
                reverse=s.reverse, prefix=None if bad else pre,
            )  # fmt: skip
            signed = res.signed.detach().float().cpu()  # (B, h, w): maps leave the device as grids
            scores = res.cam.scores[:, 0].detach().float().cpu().tolist()
            logits = res.logits.detach().float().cpu()
            for b, i in enumerate(idx):
                item, dec = batch[i]
                results[i] = self._rows(item, dec, signed[b], scores[b], logits[b], res, b)
        return [r if r is not None else "not explained" for r in results]

    def _rows(
        self, item: tuple[str, str], dec: _Decoded, signed: Tensor, score: float, logits: Tensor, res: Any, b: int
    ) -> list[dict[str, Any]] | str:
        if not torch.isfinite(signed).all():
            return "the map is not finite (NaN or infinite values)"
        names = self.names
        W0, H0 = dec.im.orig_size
        relu = signed.clamp_min(0)
        t, p, refs = int(res.targets[b]), int(res.predicted[b]), [int(r) for r in res.references[b]]
        row = self._row(item)
        row.update(
            target=names[t], predicted=names[p], references=REF_SEP.join(names[r] for r in refs), target_index=t,
            predicted_index=p, reference_indices=" ".join(str(r) for r in refs), target_logit=float(logits[t]),
            predicted_logit=float(logits[p]), score=float(score), grid=signed.numpy(), grid_h=int(signed.shape[0]),
            grid_w=int(signed.shape[1]), width=W0, height=H0, raw_max=float(relu.max()), status="ok",
            notes="; ".join(dec.im.warnings),
        )  # fmt: skip
        return [row]

    # -- outputs --------------------------------------------------------------------------------------------------
    def finish(self, rows: list[dict[str, Any]], item: tuple[str, str], loaded: _Decoded) -> list[dict[str, Any]]:
        """``--save``: the files of each ok row (the shared writer of localize,
        :func:`traitloc.pipelines.localize.save_files`)."""
        if not self.s.save:
            return rows
        from traitloc import __version__
        from traitloc.pipelines.localize import save_files

        work = np.asarray(loaded.im.image)
        for row in rows:
            if row["status"] != "ok":
                continue
            meta = {
                "traitloc": __version__, "image": row["image"], "target": row["target"],
                "predicted": row["predicted"], "references": [r for r in row["references"].split(REF_SEP) if r],
                "gamma": self.s.gamma, "reverse": self.s.reverse, "method": row["method"],
                "classifier": row["classifier"], "target_layer": self.clf.describe.get("target_layer"),
                "raw_max": row["raw_max"], "values": "map / max (ReLU map; all-zero stays zero)",
                "interpolation": "bilinear, align_corners=False, from the target layer's grid to the original size",
            }  # fmt: skip
            try:
                save_files(self.out, row, work, self.s.save, self.s.threshold, meta, row["target"])
            except Exception as err:  # noqa: BLE001 - recorded for this image; the batch goes on
                row["status"] = f"error: saving files: {type(err).__name__}: {err}".splitlines()[0]
        return rows

    def csv_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``results.csv`` row (``reverse`` as ``true``/``false``)."""
        out = super().csv_row(row)
        out["reverse"] = bool_text(row.get("reverse"))
        return out

    def csv_frame(self, df: Any) -> Any:
        """``results.csv`` rows from the store (``reverse`` as ``true``/``false``)."""
        if "reverse" in df.columns:
            df = df.assign(reverse=[bool_text(v) for v in df["reverse"]])
        return df

    def run_info(self) -> dict[str, Any]:
        """The classifier (:func:`traitloc.models.probes.classifier_info`) and settings for ``run.json``."""
        from traitloc.models.probes import classifier_info

        clf, s, names = self.clf, self.s, self.names
        return {
            "classifier": clf.describe.get("classifier") or clf.describe.get("probe"),
            **classifier_info(clf),
            "num_classes": len(names),
            "targets": s.target_spec(names),
            "references": s.reference_spec(names),
            "num_references": s.num_references,
            "gamma": s.gamma,
            "reverse": s.reverse,
            "method": self.explainer.method,
            "scorecam_channels": self.scorecam_channels,
            "threshold": s.threshold,
            "save": list(s.save),
        }


def run_explain(
    inputs: Sequence[str | Path], out_dir: str | Path, job: ExplainJob, run_info: dict[str, Any]
) -> dict[str, int]:
    """Explain every image under ``inputs`` into ``out_dir`` with ``job``; returns counts (ok, failed, skipped).

    Raises
    ------
    traitloc.pipelines.runner.SettingsMismatchError
        ``out_dir`` holds results made with other settings.
    """
    items = explain_items(inputs)
    info = {
        **run_info,
        "cwd": os.getcwd(),
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "n_images": len(items),
    }
    return run_job(job, items, out_dir, info, batch_size=job.s.batch_size, quiet=job.s.quiet)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``explain`` to a ``argparse`` subparsers object and return its parser."""
    from traitloc.engine.methods import method_names
    from traitloc.pipelines.options import add_shared, add_store_arguments, gamma_arg, positive_int

    p = subparsers.add_parser(
        "explain",
        help="why is this image species c rather than similar species: Finer-CAM maps of a classifier",
        description="Finer-CAM maps of a species classifier: the target class (default: the predicted one) against "
        "references (default: the classes whose logits are closest to the target's). Writes the results store "
        "results/part-*.parquet (one row per image: target, prediction, references, scores and the signed grid map, "
        "rendered to full-size maps, masks and overlays on demand), results.csv and run.json under --out; "
        "rerunning into the same --out skips finished rows.",
    )
    add_shared(p, "paths")
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
    p.add_argument("--num-references", type=positive_int, default=3, help="number of automatic references (default: 3)")
    p.add_argument(
        "--gamma",
        type=gamma_arg,
        default=0.6,
        help="comparison strength: s = z_target - gamma * mean(z_refs) (default: 0.6; 0 = plain CAM; > 1 extrapolates)",
    )
    p.add_argument(
        "--method", choices=method_names(classifier=True), default="gradcam", help="CAM base (default: gradcam)"
    )
    p.add_argument(
        "--reverse",
        action="store_true",
        help="explain what speaks for the references instead: s = mean(z_refs) - gamma * z_target",
    )
    add_shared(p, "--scorecam-channels", "--threshold")
    add_store_arguments(p, "image")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    add_shared(p, "--device", "--quiet", "--out", quiet="no progress bar or summary")
    from traitloc.pipelines.distributed import add_ray_arguments

    add_ray_arguments(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``traitloc explain``; bad input raises :class:`traitloc.pipelines.options.CliError` (one line)."""
    from traitloc.data.images import find_images
    from traitloc.io.files import utc_now
    from traitloc.models.backbones import CallableError
    from traitloc.models.clip import ModelLoadError
    from traitloc.models.probes import ProbeError
    from traitloc.pipelines.distributed import ray_requested
    from traitloc.pipelines.options import CliError, cli_errors, report_counts
    from traitloc.pipelines.train import keep_freed_memory

    start = utc_now()
    if args.gamma < 0:
        raise CliError(f"--gamma must be >= 0 (got {args.gamma:g}); use --reverse to explain the references")
    with cli_errors(FileNotFoundError, ValueError):
        find_images(args.paths)  # fail fast, before loading a model
    spec = ExplainSpec.from_args(args)
    on_ray = ray_requested(args)  # fail fast, before loading a model
    try:  # with --ray the actors compute: the driver's job (settings, run.json) stays on the CPU
        job = build_explain_job(dataclasses.replace(spec, device="cpu") if on_ray else spec, args.out)
    except ExplainSpecError as err:
        raise CliError(str(err)) from err
    except (CallableError, ProbeError, ModelLoadError, ValueError) as err:
        raise CliError(str(err).splitlines()[0]) from err
    info = {
        "command": "explain",
        "argv": list(argv),
        "allocator": keep_freed_memory(),
        "seed": None,
        "start_utc": start,
    }
    with cli_errors(SettingsMismatchError):
        if on_ray:
            from traitloc.pipelines.distributed import run_explain_ray

            counts = run_explain_ray(args, spec, job, info)
        else:
            counts = run_explain(args.paths, args.out, job, info)
    return report_counts("explain", counts, args.out, args.quiet)
