"""``traitloc evaluate``: the Finer-CAM paper's faithfulness metrics of a probe's maps on CUB.

For every image of a CUB split whose class the probe knows and every method of ``--methods``, the map is computed on
the model input and scored with RD@5%/10%, deletion/insertion AUC and the energy pointing game
(:mod:`traitloc.metrics.maps`); :class:`FaithfulnessBatch` runs each distinct perturbed image once. Protocol,
outputs (results store, ``per_image.csv``, ``metrics.csv``, ``run.json``), resume and costs: ``docs/evaluate.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from traitloc.engine.methods import CAM_METHODS
from traitloc.pipelines.runner import Job, bool_text, load_or_error, run_job

if TYPE_CHECKING:
    from traitloc.models.classifier import ClassifierBundle

__all__ = [
    "METHOD_NAMES",
    "METRICS_COLUMNS",
    "PER_IMAGE_COLUMNS",
    "EvalItem",
    "EvaluateJob",
    "EvaluateSettings",
    "FaithfulnessBatch",
    "add_parser",
    "evaluation_items",
    "evaluation_subset",
    "parse_methods",
    "run",
    "run_evaluate",
    "summarize",
]

log = logging.getLogger(__name__)

#: every CAM method of the registry (:data:`traitloc.engine.methods.CAM_METHODS`), plain then its Finer variant
METHOD_NAMES = tuple(name for base in CAM_METHODS for name in (base, f"finer-{base}"))
FRACTIONS = (0.05, 0.10)
PER_IMAGE_COLUMNS = [
    "image_id", "image", "method", "class_id", "true_class", "predicted_class", "correct", "target", "similar_class",
    "references", "gamma", "rd_05", "rd_10", "deletion_auc", "insertion_auc", "energy_pointing", "p_target",
    "p_similar", "map_max", "seconds", "settings", "status",
]  # fmt: skip
METRICS_COLUMNS = [
    "method", "rd_05", "rd_10", "deletion_auc", "insertion_auc", "energy_pointing", "n_images", "n_failed",
    "n_zero_maps", "rd_05_se", "rd_10_se", "deletion_auc_se", "insertion_auc_se", "energy_pointing_se", "seconds",
    "seconds_per_image", "subset", "steps", "gamma", "num_references", "scorecam_channels",
]  # fmt: skip


def parse_methods(text: str) -> list[str]:
    """``"gradcam,finer-gradcam"`` -> the list of methods, validated (order kept, no duplicates)."""
    methods = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty; choose from " + ", ".join(METHOD_NAMES))
    for m in methods:
        if m not in METHOD_NAMES:
            raise ValueError(f"unknown method {m!r} in --methods; choose from {', '.join(METHOD_NAMES)}")
    dup = next((m for m in methods if methods.count(m) > 1), None)
    if dup is not None:
        raise ValueError(f"method {dup!r} is listed twice in --methods")
    return methods


def evaluation_subset(n: int, k: int | None) -> np.ndarray:
    """Indices of ``k`` items evenly spaced over ``n`` (all when ``k`` is None or >= n), ascending and unique.

    ``round(linspace(0, n - 1, k))``: deterministic, and it covers the whole (class-sorted) list.
    """
    if k is None or k >= n:
        return np.arange(n)
    if k <= 0:
        return np.arange(0)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


# ------------------------------------------------------------------------------------------------------------------
# faithfulness, sharing perturbed images
# ------------------------------------------------------------------------------------------------------------------
class FaithfulnessBatch:
    r"""RD@k, deletion and insertion AUC of several maps per image, each distinct perturbed image run once.

    Same protocol and numbers as :func:`traitloc.metrics.maps.relative_confidence_drop` (``baseline="zero"``),
    :func:`traitloc.metrics.maps.deletion_auc` (``"zero"``) and :func:`traitloc.metrics.maps.insertion_auc`
    (``"blur"``): ranking highest first with ties in raster order (RD never removes pixels at the map's minimum),
    deletion step ``i`` removes ``round(i n / S)`` pixels, softmax over all logits in float64, trapezoid over
    ``f = i / S``.

    Parameters
    ----------
    model : normalized batch (B, C, H, W) -> logits (B, K), in eval mode.
    x : (N, C, H, W) normalized images.
    c, d : (N,) target and most similar class per image.
    steps : deletion/insertion steps S.
    fractions : RD fractions.
    batch_size : images per model call.
    blur_sigma : sigma (px) of the insertion baseline's Gaussian blur.
    channels_last : hand the model NHWC (``torch.channels_last``) batches: the same numbers up to float rounding,
        and faster for CNNs whose weights are in that format too.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        x: Tensor,
        c: Sequence[int],
        d: Sequence[int],
        *,
        steps: int = 20,
        fractions: Sequence[float] = FRACTIONS,
        batch_size: int = 64,
        blur_sigma: float = 5.0,
        channels_last: bool = False,
    ):
        from traitloc.metrics.maps import gaussian_blur

        if x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
        self.model = model
        self.x = x
        self.N, _, self.H, self.W = (int(s) for s in x.shape)
        self.n = self.H * self.W
        self.c = np.asarray(c, dtype=np.int64)
        self.d = np.asarray(d, dtype=np.int64)
        if self.c.shape != (self.N,) or self.d.shape != (self.N,):
            raise ValueError(f"c and d need one class per image ({self.N})")
        if np.any(self.c == self.d):
            raise ValueError("d must differ from c for every image")
        self.steps = int(steps)
        self.fractions = tuple(float(f) for f in fractions)
        self.batch_size = int(batch_size)
        self.channels_last = bool(channels_last)
        self.blur = gaussian_blur(x, blur_sigma)
        self.zero = torch.zeros((), dtype=x.dtype, device=x.device)
        k = np.arange(self.steps + 1, dtype=np.int64)
        self.step_k = (2 * k * self.n + self.steps) // (2 * self.steps)  # round(i n / S), halves up
        self._shared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.forward_passes = 0

    def _probs(self, inputs: Tensor) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, inputs.shape[0], self.batch_size):
                xb = inputs[i : i + self.batch_size]
                if self.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                logits = self.model(xb)
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    raise ValueError(f"model must return logits (B, K), got {getattr(logits, 'shape', logits)}")
                out.append(torch.softmax(logits.detach().double(), dim=1).cpu().numpy())
        self.forward_passes += int(inputs.shape[0])
        return np.concatenate(out)

    def shared(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Softmax of the map-independent images, run once: unperturbed, blurred (insertion start), all removed
        (deletion end)."""
        if self._shared is None:
            p = self._probs(torch.cat([self.x, self.blur, self.zero.expand(1, *self.x.shape[1:])]))
            self._shared = p[: self.N], p[self.N : 2 * self.N], p[2 * self.N :]
        return self._shared

    @property
    def p_orig(self) -> np.ndarray:
        """(N, K) softmax of the unperturbed images."""
        return self.shared()[0]

    def score(self, maps: Tensor | np.ndarray, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Scores of one map per image.

        Parameters
        ----------
        maps : (R, H, W) maps at input resolution, for the images ``rows`` (default: all N, in order).

        Returns
        -------
        dict of (R,) arrays: ``rd_05``, ``rd_10`` (one per fraction, named ``rd_`` + two digits of percent),
        ``deletion_auc``, ``insertion_auc``.
        """
        from traitloc.metrics.maps import _top_count

        p_orig, p_blur, p_zero = self.shared()
        sel = np.arange(self.N) if rows is None else np.asarray(rows, dtype=np.int64)
        m = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
        if m.shape != (len(sel), self.H, self.W):
            raise ValueError(f"maps must be ({len(sel)}, {self.H}, {self.W}), got {m.shape}")
        m = m.astype(np.float64).reshape(len(sel), -1)
        if not np.all(np.isfinite(m)):
            raise ValueError("maps contain NaN or infinite values")
        order = np.argsort(-m, axis=1, kind="stable")
        ranks_np = np.empty_like(order)
        np.put_along_axis(ranks_np, order, np.broadcast_to(np.arange(self.n), m.shape), axis=1)
        ranks = torch.from_numpy(ranks_np.astype(np.int64)).to(self.x.device)
        above = np.count_nonzero(m > m.min(axis=1, keepdims=True), axis=1)
        n, S = self.n, self.steps
        # job -> (map row r, kind, k); kind "del" = first k ranked pixels set to 0, "ins" = pasted into the blur
        jobs: dict[tuple[int, str, int], int] = {}

        def job(r: int, kind: str, k: int) -> tuple[str, int] | tuple[int, str, int]:
            if k == 0:
                return ("orig", r) if kind == "del" else ("blur", r)
            if k == n:
                return ("zero", 0) if kind == "del" else ("orig", r)
            key = (r, kind, int(k))
            jobs.setdefault(key, len(jobs))
            return key

        rd_jobs = [
            [job(r, "del", min(_top_count(f, n), int(above[r]))) for f in self.fractions] for r in range(len(sel))
        ]
        del_jobs = [[job(r, "del", int(k)) for k in self.step_k] for r in range(len(sel))]
        ins_jobs = [[job(r, "ins", int(k)) for k in self.step_k] for r in range(len(sel))]
        keys = list(jobs)
        probs = np.empty((len(keys), p_orig.shape[1]))
        for i in range(0, len(keys), self.batch_size):
            chunk = keys[i : i + self.batch_size]
            r_idx = torch.tensor([k[0] for k in chunk], device=self.x.device)
            img = torch.from_numpy(sel[[k[0] for k in chunk]]).to(self.x.device)
            kk = torch.tensor([k[2] for k in chunk], device=self.x.device)
            is_del = torch.tensor([k[1] == "del" for k in chunk], device=self.x.device).view(-1, 1, 1, 1)
            mask = (ranks[r_idx] < kk[:, None]).view(-1, 1, self.H, self.W)
            deleted = torch.where(mask, self.zero, self.x[img])
            inserted = torch.where(mask, self.x[img], self.blur[img])
            probs[i : i + len(chunk)] = self._probs(torch.where(is_del, deleted, inserted))

        fixed = {"orig": p_orig[sel], "blur": p_blur[sel], "zero": p_zero}

        def p(key: Any) -> np.ndarray:
            return fixed[key[0]][key[1]] if len(key) == 2 else probs[jobs[key]]

        out: dict[str, np.ndarray] = {}
        c, d = self.c[sel], self.d[sel]
        p0 = p_orig[sel]
        pc0, pd0 = p0[np.arange(len(sel)), c], p0[np.arange(len(sel)), d]
        fx = np.arange(S + 1, dtype=np.float64) / S
        for j, f in enumerate(self.fractions):
            pc = np.array([p(rd_jobs[r][j])[c[r]] for r in range(len(sel))])
            pd = np.array([p(rd_jobs[r][j])[d[r]] for r in range(len(sel))])
            out[f"rd_{round(f * 100):02d}"] = (pc0 - pc) - (pd0 - pd)
        for name, js in (("deletion_auc", del_jobs), ("insertion_auc", ins_jobs)):
            curves = np.array([[p(key)[c[r]] for key in js[r]] for r in range(len(sel))])
            out[name] = ((curves[:, 1:] + curves[:, :-1]) * 0.5 * np.diff(fx)).sum(axis=1)
        out["p_target"], out["p_similar"] = pc0, pd0
        return out


# ------------------------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class EvaluateSettings:
    """What ``traitloc evaluate`` computes (the command-line options; :meth:`fingerprint` keys the stored rows)."""

    methods: list[str]
    split: str = "test"
    target: str = "true"  # or "predicted"
    gamma: float = 0.6
    num_references: int = 3
    steps: int = 20
    scorecam_channels: int | None = 128
    scorecam_images: int | None = 50
    limit: int | None = None
    batch_size: int = 16
    forward_batch: int = 64
    channels_last: bool = True
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, probe_sha256: str | None) -> str:
        """A short hash of everything that changes a per-image number (for resume keys)."""
        d = {
            "target": self.target, "gamma": self.gamma, "num_references": self.num_references, "steps": self.steps,
            "scorecam_channels": self.scorecam_channels, "probe": probe_sha256, "fractions": FRACTIONS,
            "baselines": ["zero", "zero", "blur5"],
        }  # fmt: skip
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _explain_maps(
    cam: Any,
    x: Tensor,
    pre: Any,
    V: Tensor,
    finer: Tensor,
    methods: list[str],
) -> dict[str, Tensor]:
    """(B, H, W) input-resolution ReLU maps of ``methods`` (one CAM base) for the batch ``x``."""
    plain = torch.zeros(x.shape[0], V.shape[1], device=V.device)
    plain[:, 0] = 1.0
    C = torch.stack([finer if m.startswith("finer-") else plain for m in methods], 1)  # (B, Q, P)
    out = cam(x, V, C, prefix=pre)
    maps = out.upsampled(tuple(int(s) for s in x.shape[-2:]))  # (B, Q, H, W)
    return {m: maps[:, q] for q, m in enumerate(methods)}


@dataclass(frozen=True)
class EvalItem:
    """One image of an evaluation (an item of :class:`EvaluateJob`; picklable)."""

    image_id: int
    path: str  # absolute
    key: str  # the image's key in the store: its CUB file stem
    class_id: int  # CUB class id (1-based)
    box: tuple[float, float, float, float]  # CUB bounding box x, y, width, height in original pixels
    methods: tuple[str, ...]  # the methods that apply to it (Score-CAM only on its image subset)


class EvaluateJob(Job):
    """The paper's metrics of a probe's maps: one store row per (image, method) (no map: ``grid`` is empty).

    The summary ``per_image.csv`` lists the rows; :meth:`summarize` aggregates ``metrics.csv`` at the end of a run
    (only the rows of this run's settings and images count).
    """

    name = "evaluate"
    key_columns = ("image_id", "method", "settings")
    csv_columns = tuple(PER_IMAGE_COLUMNS)
    csv_name = "per_image.csv"
    retry_errors = True
    columns = {
        "image_id": "int", "method": "str", "settings": "str", "class_id": "int", "true_class": "str",
        "predicted_class": "str", "correct": "bool", "target": "str", "similar_class": "str", "references": "str",
        "gamma": "float", "rd_05": "float", "rd_10": "float", "deletion_auc": "float", "insertion_auc": "float",
        "energy_pointing": "float", "p_target": "float", "p_similar": "float", "map_max": "float",
        "seconds": "float",
    }  # fmt: skip

    def __init__(
        self,
        clf: ClassifierBundle,
        settings: EvaluateSettings,
        k_of_cub: dict[int, int],
        image_ids: Sequence[int],
        scorecam_ids: Sequence[int],
    ) -> None:
        from traitloc.engine.cam import FinerCAM
        from traitloc.io.store import INTERPOLATION

        self.clf = clf
        self.s = settings
        self.names = clf.class_names
        self.k_of_cub = dict(k_of_cub)
        self.image_ids = [int(i) for i in image_ids]
        self.scorecam_ids = [int(i) for i in scorecam_ids]
        self.fp = settings.fingerprint(clf.describe.get("probe_sha256"))
        sc: dict[str, Any] = {"scorecam_channels": settings.scorecam_channels, "scorecam_batch": settings.forward_batch}
        self.cams = {m: FinerCAM(clf.adapter, m, **(sc if m == "scorecam" else {})) for m in CAM_METHODS}
        self.W = clf.weight.to(clf.device, torch.float32)
        if clf.model is None:
            raise ValueError("evaluate needs the classifier's logits model (ProbeClassifier.model)")
        self.model = clf.model.eval()
        if settings.channels_last:  # NHWC convolutions: same numbers up to float rounding, faster on CPUs
            self.model.to(memory_format=torch.channels_last)
        self.seconds: dict[str, float] = dict.fromkeys(settings.methods, 0.0)
        self.common = {"settings": self.fp, "resize": "stretch", "interpolation": INTERPOLATION, "notes": ""}
        self.metrics: list[dict[str, Any]] = []

    # -- items ----------------------------------------------------------------------------------------------------
    def item_keys(self, item: EvalItem) -> list[tuple[Any, ...]]:
        """One store key per method of the image: ``(image id, method, settings fingerprint)``."""
        return [(item.image_id, m, self.fp) for m in item.methods]

    def load(self, item: EvalItem) -> Any:
        """Decode the image (in the prefetch thread)."""
        return load_or_error(Path(item.path))

    def _wants(self, item: EvalItem) -> list[str]:
        """The item's methods not in the store yet (the runner keeps the set of stored keys)."""
        done = self.done_keys
        return [m for m in item.methods if (item.image_id, m, self.fp) not in done]

    def _base_row(self, item: EvalItem, method: str) -> dict[str, Any]:
        return {
            **self.common, "image_id": item.image_id, "method": method, "image": item.path, "image_key": item.key,
            "result_id": f"{item.key}/{method}", "class_id": item.class_id,
            "true_class": self.names[self.k_of_cub[item.class_id]],
            "gamma": float(self.s.gamma) if method.startswith("finer-") else 0.0,
        }  # fmt: skip

    def error_rows(self, item: EvalItem, reason: str) -> list[dict[str, Any]]:
        """One ``error: <reason>`` row per method the image still needs."""
        status = f"error: {reason}".splitlines()[0]
        return [{**self._base_row(item, m), "status": status} for m in self._wants(item) or item.methods]

    # -- compute --------------------------------------------------------------------------------------------------
    def compute(self, batch: list[tuple[EvalItem, Any]]) -> list[list[dict[str, Any]] | str]:
        """Rows of one batch of decoded images (raises on failure: the runner retries image by image)."""
        from traitloc.metrics.maps import box_mask, energy_inside
        from traitloc.models.classifier import similar_classes

        s, clf, W, names = self.s, self.clf, self.W, self.names
        items = [it for it, _ in batch]
        t0 = time.perf_counter()
        x = torch.stack([clf.preprocess(im.image) for _, im in batch]).to(clf.device)
        B, (Hin, Win) = x.shape[0], x.shape[-2:]
        pre = self.cams["gradcam"].prefix(x)
        logits = clf.explainer.logits(pre)
        pred = logits.argmax(1)
        true = torch.tensor([self.k_of_cub[it.class_id] for it in items], device=logits.device)
        tgt = true if s.target == "true" else pred
        T = min(s.num_references, len(names) - 1)
        refs = similar_classes(logits, tgt, T)  # (B, T), closest first
        V = torch.cat([W[tgt].unsqueeze(1), W[refs]], 1)  # (B, 1 + T, D)
        finer = torch.zeros(B, 1 + T, device=V.device)
        finer[:, 0] = 1.0
        finer[:, 1:] = -s.gamma / T
        want = [self._wants(it) for it in items]
        shared = time.perf_counter() - t0
        maps: dict[str, Tensor] = {}
        rows_of: dict[str, list[int]] = {}
        own: dict[str, float] = {}
        for base in dict.fromkeys(m.removeprefix("finer-") for m in s.methods):  # plain and finer maps in one pass
            ms = [m for m in s.methods if m.removeprefix("finer-") == base and any(m in w for w in want)]
            if not ms:
                continue
            sel = [b for b in range(B) if any(m in want[b] for m in ms)]
            t1 = time.perf_counter()
            whole = len(sel) == B  # the target layer's prefix of the batch serves only the whole batch
            got = _explain_maps(self.cams[base], x[sel], pre if whole else None, V[sel], finer[sel], ms)
            dt = (time.perf_counter() - t1) / len(ms)
            for m in ms:
                maps[m], rows_of[m], own[m] = got[m], sel, dt
        # an image with a non-finite map fails as a whole (as in every command), the others are scored
        bad = {rows_of[m][j] for m in maps for j in range(len(rows_of[m])) if not bool(maps[m][j].isfinite().all())}
        if bad:
            for m in list(maps):
                keep = [j for j, b in enumerate(rows_of[m]) if b not in bad]
                maps[m], rows_of[m] = maps[m][keep], [rows_of[m][j] for j in keep]
                if not keep:
                    del maps[m], rows_of[m], own[m]
        t2 = time.perf_counter()
        fb = FaithfulnessBatch(self.model, x, tgt.tolist(), refs[:, 0].tolist(), steps=s.steps,
                               batch_size=s.forward_batch, channels_last=s.channels_last)  # fmt: skip
        fb.shared()
        shared += time.perf_counter() - t2
        scores: dict[str, dict[str, np.ndarray]] = {}
        for m in maps:
            t3 = time.perf_counter()
            scores[m] = fb.score(maps[m], rows_of[m])
            own[m] += time.perf_counter() - t3
        n_pairs = sum(len(v) for v in rows_of.values()) or 1
        out: list[list[dict[str, Any]]] = [[] for _ in range(B)]
        p0 = fb.p_orig
        for m in maps:
            per_img = own[m] / len(rows_of[m]) + shared / n_pairs
            self.seconds[m] += per_img * len(rows_of[m])
            for j, b in enumerate(rows_of[m]):
                it, im = batch[b]
                if m not in want[b]:
                    continue
                mp = maps[m][j].detach().float().cpu()
                W0, H0 = im.orig_size
                sx, sy = Win / W0, Hin / H0
                bx, by, bw, bh = it.box
                box = box_mask((int(Hin), int(Win)), bx * sx, by * sy, bw * sx, bh * sy)
                energy = energy_inside(mp.numpy(), box) if box.any() else float("nan")
                row = self._base_row(it, m)
                row.update(
                    predicted_class=names[int(pred[b])], correct=bool(pred[b] == true[b]), target=names[int(tgt[b])],
                    similar_class=names[int(refs[b, 0])], references="; ".join(names[int(r)] for r in refs[b]),
                    rd_05=float(scores[m]["rd_05"][j]), rd_10=float(scores[m]["rd_10"][j]),
                    deletion_auc=float(scores[m]["deletion_auc"][j]),
                    insertion_auc=float(scores[m]["insertion_auc"][j]), energy_pointing=energy,
                    p_target=float(p0[b, int(tgt[b])]), p_similar=float(p0[b, int(refs[b, 0])]),
                    map_max=float(mp.max()), seconds=round(per_img, 4), width=W0, height=H0, status="ok",
                )  # fmt: skip
                out[b].append(row)
        return ["the map is not finite (NaN or infinite values)" if b in bad else rows for b, rows in enumerate(out)]

    # -- summaries ------------------------------------------------------------------------------------------------
    def csv_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``per_image.csv`` row (``correct`` as ``true``/``false``, gamma as written before the store)."""
        out = super().csv_row(row)
        out["correct"] = bool_text(row.get("correct"))
        out["gamma"] = _gamma_text(row.get("gamma"))
        return out

    def csv_frame(self, df: Any) -> Any:
        """``per_image.csv`` rows from the store (as :meth:`csv_row`)."""
        return df.assign(correct=[bool_text(v) for v in df["correct"]], gamma=[_gamma_text(v) for v in df["gamma"]])

    def run_info(self) -> dict[str, Any]:
        """The settings fingerprint, the Score-CAM image ids and this run's seconds per method, for ``run.json``."""
        return {
            "settings_fingerprint": self.fp,
            "scorecam_image_ids": self.scorecam_ids,
            "seconds_this_run": {m: round(v, 3) for m, v in self.seconds.items()},
        }

    def summarize(self, out: Path, info: dict[str, Any]) -> None:
        """``metrics.csv``: one row per method, over this run's settings and images (from the store)."""
        import csv
        import io

        from traitloc.io.files import atomic_write
        from traitloc.io.store import read_results

        cols = [c for c in PER_IMAGE_COLUMNS if c in self.columns or c == "status"]
        self.metrics = summarize(read_results(out, columns=cols), self.s, self.fp, self.image_ids, self.scorecam_ids)
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
                         for r in self.metrics)  # fmt: skip
        atomic_write(out / "metrics.csv", buf.getvalue())


def _gamma_text(v: Any) -> str:
    """Gamma as ``per_image.csv`` has always written it: ``0.6``, ``0``."""
    import pandas as pd

    return "" if v is None or v == "" or pd.isna(v) else f"{float(v):g}"


def evaluation_items(
    cub: Any, clf: ClassifierBundle, settings: EvaluateSettings
) -> tuple[list[EvalItem], dict[int, int], list[int], list[int], list[str]]:
    """The images of an evaluation: items, probe class of each CUB class, image ids, Score-CAM image ids, notes.

    Raises
    ------
    ValueError
        A probe class that is not a class of the CUB root, or no images of the probe's classes in the split.
    """
    names = clf.class_names
    k_of_cub: dict[int, int] = {}
    for k, name in enumerate(names):
        try:
            k_of_cub[cub.class_id(name)] = k
        except ValueError as err:
            raise ValueError(f"probe class {name!r} is not a class of the CUB root {cub.root} ({err})") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # counted below
        df = cub.split(settings.split)
    listed = cub.images[cub.images["class_id"].isin(list(k_of_cub))]
    if settings.split != "all":
        listed = listed[listed["is_train"] == (settings.split == "train")]
    known = df["class_id"].isin(list(k_of_cub))
    n_missing, n_other = int((~listed["exists"]).sum()), int((~known).sum())
    df = df[known].sort_values("image_id").reset_index(drop=True)
    empty = [names[k] for c, k in k_of_cub.items() if not (df["class_id"] == c).any()]
    notes = [note for n, note in (
        (n_missing, f"{n_missing} listed {settings.split} image(s) of the probe's classes are missing and skipped"),
        (n_other, f"{n_other} {settings.split} image(s) of classes the probe does not know are skipped"),
        (len(empty), f"{len(empty)} probe class(es) have no {settings.split} images: {', '.join(empty[:5])}"),
    ) if n]  # fmt: skip
    if df.empty:
        raise ValueError(f"no {settings.split} images of the probe's classes are present under {cub.base / 'images'}")
    df = df.iloc[evaluation_subset(len(df), settings.limit)].reset_index(drop=True)
    sc_rows = set(evaluation_subset(len(df), settings.scorecam_images).tolist())
    items = []
    for i, r in enumerate(df.itertuples(index=False)):
        methods = tuple(m for m in settings.methods if not (m.endswith("scorecam") and i not in sc_rows))
        if not methods:
            continue
        path = Path(cub.image_path(int(r.image_id))).resolve()
        items.append(
            EvalItem(int(r.image_id), str(path), path.stem, int(r.class_id),
                     (float(r.x), float(r.y), float(r.width), float(r.height)), methods)
        )  # fmt: skip
    ids = [int(i) for i in df["image_id"]]
    return items, k_of_cub, ids, [ids[i] for i in sorted(sc_rows)], notes


def run_evaluate(
    cub_root: str | Path,
    out_dir: str | Path,
    clf: ClassifierBundle,
    settings: EvaluateSettings,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate ``settings.methods`` on a CUB split into ``out_dir`` (a job of
    :func:`traitloc.pipelines.runner.run_job`).

    Returns
    -------
    dict with ``counts`` (images ``ok``, ``failed``, ``skipped``: already done), ``seconds`` (per method, this
    run), ``metrics`` (the rows of ``metrics.csv``), ``notes`` and ``wall_seconds``.
    """
    from traitloc.data.cub import CUB

    cub = CUB(cub_root)
    items, k_of_cub, ids, sc_ids, notes = evaluation_items(cub, clf, settings)
    job = EvaluateJob(clf, settings, k_of_cub, ids, sc_ids)
    info = {**run_info, "split": settings.split, "n_images": len(ids), "notes": notes}
    t0 = time.perf_counter()
    counts = run_job(job, items, out_dir, info, batch_size=settings.batch_size, quiet=settings.quiet)
    wall = time.perf_counter() - t0
    return {"counts": counts, "seconds": job.seconds, "metrics": job.metrics, "notes": notes, "wall_seconds": wall}


def _se(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def summarize(
    rows: Any,
    settings: EvaluateSettings,
    fingerprint: str,
    image_ids: Sequence[int],
    scorecam_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """``metrics.csv`` rows (one per method, in ``settings.methods`` order) from per-image rows.

    ``rows``: a DataFrame of the store (:func:`traitloc.io.store.read_results`) or dicts as in ``per_image.csv``
    (text or numbers). Only rows of this run's settings (``fingerprint``) and images count: ``image_ids`` for the
    gradient methods, ``scorecam_ids`` for Score-CAM (a folder may hold rows of other ``--limit`` or
    ``--scorecam-images`` runs). Images are aggregated in image-id order.
    """
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=PER_IMAGE_COLUMNS)
    if len(df):
        df = df.assign(image_id=pd.to_numeric(df["image_id"]).astype("int64")).sort_values("image_id", kind="stable")
    out = []
    n_images, n_scorecam = len(image_ids), len(scorecam_ids)
    for m in settings.methods:
        wanted = {int(i) for i in (scorecam_ids if m.endswith("scorecam") else image_ids)}
        mine = df[(df["method"] == m) & (df["settings"] == fingerprint) & df["image_id"].isin(wanted)]
        ok = mine[mine["status"] == "ok"]

        def col(name: str, ok: Any = ok) -> np.ndarray:
            return pd.to_numeric(ok[name].replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)

        row: dict[str, Any] = {"method": m, "n_images": len(ok), "n_failed": len(mine) - len(ok)}
        for name in ("rd_05", "rd_10", "deletion_auc", "insertion_auc", "energy_pointing"):
            v = col(name)
            row[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"{name}_se"] = _se(v)
        row["n_zero_maps"] = int(np.count_nonzero(~np.isfinite(col("energy_pointing"))))
        secs = col("seconds")
        row["seconds"] = round(float(np.nansum(secs)), 3) if len(secs) else 0.0
        row["seconds_per_image"] = round(float(np.nanmean(secs)), 4) if len(secs) else float("nan")
        scorecam, finer = m.endswith("scorecam"), m.startswith("finer-")
        row.update(subset=f"{n_scorecam} of {n_images} images" if scorecam and n_scorecam < n_images else "all",
                   steps=settings.steps, gamma=settings.gamma if finer else 0.0,
                   num_references=settings.num_references if finer else 0,
                   scorecam_channels=(settings.scorecam_channels or "all") if scorecam else "")  # fmt: skip
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate`` to a ``argparse`` subparsers object and return its parser."""
    from traitloc.pipelines.options import add_shared, gamma_arg, nonneg_int, positive_int

    p = subparsers.add_parser(
        "evaluate",
        help="the Finer-CAM paper's metrics of a probe's maps on CUB: RD@5%%/10%%, deletion/insertion AUC, "
        "energy pointing game",
        description="Score Grad-CAM, Layer-CAM and Score-CAM maps and their Finer variants for a probe on a CUB "
        "split: relative confidence drop RD@k (target = the true class, d = the class with the closest logit), "
        "deletion and insertion AUC and the energy pointing game against the bounding box, all on the model input. "
        "Writes per_image.csv (resumable), metrics.csv (one row per method) and run.json; the protocol is in "
        "docs/evaluate.md.",
    )
    add_shared(p, "--cub-root")
    p.add_argument("--probe", required=True, metavar="PROBE_DIR", help="a probe from traitloc train-probe")
    add_shared(p, "--split")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), metavar="LIST",
                   help=f"comma-separated methods (default: {','.join(METHOD_NAMES)})")  # fmt: skip
    p.add_argument("--target", choices=["true", "predicted"], default="true",
                   help="the explained class c: the true CUB class or the predicted one (default: true)")  # fmt: skip
    for flag, kind, default, text in (
        ("--gamma", gamma_arg, 0.6, "gamma of the finer-* methods (default: 0.6)"),
        ("--num-references", positive_int, 3, "references of the finer-* methods (default: 3)"),
        ("--scorecam-channels", positive_int, 128,
         "Score-CAM channel budget per image: the k channels of largest spatial variance (default: 128)"),
        ("--scorecam-images", nonneg_int, 50,
         "Score-CAM runs on this many images, evenly spaced over the evaluated ones (default: 50; 0 = none)"),
        ("--limit", positive_int, None,
         "evaluate only N images, evenly spaced over the split sorted by image id (default: all)"),
        ("--steps", positive_int, 20, "deletion/insertion steps (default: 20)"),
        ("--batch-size", positive_int, 16, "images per batch (default: 16)"),
        ("--forward-batch", positive_int, 64, "perturbed images per model call (default: 64)"),
    ):  # fmt: skip
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="layout of the model's convolution weights and perturbed batches: a speed setting, the numbers "
                   "agree up to float rounding (default: channels_last, about 1.8x faster for EfficientNet-Lite0 on "
                   "CPU)")  # fmt: skip
    add_shared(p, "--device", "--quiet", "--out", quiet="no progress bar or summary")
    return p


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``traitloc evaluate``; bad input raises :class:`traitloc.pipelines.options.CliError` (one line)."""
    from traitloc.data.cub import CUB
    from traitloc.io.files import utc_now
    from traitloc.models.clip import ModelLoadError
    from traitloc.models.probes import ProbeError, classifier_info, load_probe_classifier
    from traitloc.pipelines.options import CliError, cli_errors, report_counts
    from traitloc.pipelines.train import keep_freed_memory

    start = utc_now()
    with cli_errors(ValueError):
        methods = parse_methods(args.methods)
    if args.gamma < 0:
        raise CliError(f"--gamma must be >= 0, got {args.gamma:g}")
    with cli_errors(FileNotFoundError, ValueError, prefix="--cub-root: "):
        CUB(args.cub_root)
    with cli_errors(ProbeError, ModelLoadError, ValueError, first_line=True):
        clf = load_probe_classifier(args.probe, device=args.device)
    allocator = keep_freed_memory()
    if len(clf.class_names) < 2:
        raise CliError("the probe has fewer than 2 classes")
    names = ("gamma", "num_references", "steps", "scorecam_channels", "scorecam_images", "limit")
    settings = EvaluateSettings(
        methods=methods, split=args.split, target=args.target, batch_size=args.batch_size, quiet=args.quiet,
        forward_batch=args.forward_batch, channels_last=args.memory_format == "channels_last",
        **{k: getattr(args, k) for k in names},
    )  # fmt: skip
    info = {
        "command": "evaluate",
        "argv": list(argv),
        "cub_root": str(Path(args.cub_root).resolve()),
        **classifier_info(clf),
        "probe_test_accuracy": clf.describe.get("probe_test_accuracy"),
        "methods": methods,
        "targets": f"{args.target} class",
        **{k: getattr(args, k) for k in (*names, "memory_format")},
        "allocator": allocator,
        "seed": None,
        "protocol": {
            "similar_class": "the class whose logit is closest to the target's (target excluded)",
            "references": f"the {args.num_references} classes with the closest logits (target excluded)",
            "maps": "ReLU map on the target layer's grid, bilinearly upsampled to the model input",
            "confidence": "softmax over the probe's classes, float64",
            "rd": "top 5%/10% of map pixels set to 0 in normalized space (mean colour); ties in raster order; "
            "pixels at the map's minimum never removed",
            "deletion": f"{args.steps} steps, removed pixels -> 0 (mean colour)",
            "insertion": f"{args.steps} steps, pixels pasted into a Gaussian blur (sigma 5 px) of the image",
            "energy_pointing": "share of the map's sum inside the CUB box scaled to the model input",
        },
        "start_utc": start,
    }
    with cli_errors(FileNotFoundError, ValueError, first_line=True):
        res = run_evaluate(args.cub_root, args.out, clf, settings, info)
    if not args.quiet:
        for note in res["notes"]:
            print(f"traitloc evaluate: note: {note}", file=sys.stderr)
        print(f"{'method':<16}{'RD@5%':>9}{'RD@10%':>9}{'del':>8}{'ins':>8}{'energy':>8}{'n':>6}{'s/img':>8}",
              file=sys.stderr)  # fmt: skip
        for r in res["metrics"]:
            print(
                f"{r['method']:<16}{r['rd_05']:>9.4f}{r['rd_10']:>9.4f}{r['deletion_auc']:>8.4f}"
                f"{r['insertion_auc']:>8.4f}{r['energy_pointing']:>8.4f}{r['n_images']:>6}{r['seconds_per_image']:>8.3f}",
                file=sys.stderr,
            )
    report_counts("evaluate", res["counts"], args.out, args.quiet)
    failed_all = res["counts"]["failed"] and not res["counts"]["ok"]
    return 1 if failed_all and not any(r["n_images"] for r in res["metrics"]) else 0
