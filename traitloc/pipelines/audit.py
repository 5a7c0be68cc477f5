"""Faithfulness audit (``traitloc audit``): does a species classifier look at the traits that separate the species?

For every image of a CUB-layout split, the classifier's Finer-CAM map (true class against its most similar class)
is compared with maps of the attributes that differ between the two classes in CUB's class-attribute matrix, beside
a randomized-classifier and a shuffled-attribute control. The protocol (similar class, attribute differences and
maps, scores, verdict, controls) and the outputs (``audit.csv``, ``controls.csv``, ``audit_summary.csv``,
``run.json``): ``docs/audit.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from traitloc.data.traits import attribute_parts, load_trait_list, parse_attribute
from traitloc.io.files import to_json
from traitloc.metrics.attributes import (
    AttributeDifference,
    AttributeMap,
    attribute_differences,
    box_attribute_map,
    parts_attribute_map,
)
from traitloc.metrics.maps import ScoredMap, box_mask, energy_inside, overlap_scores, top_fraction_mask
from traitloc.models.probes import ProbeClassifier, load_probe_classifier  # the classifier (re-exported)
from traitloc.pipelines.runner import CsvSpec, Job, load_or_error, run_job

if TYPE_CHECKING:  # torch, pandas and PIL load on first use: `traitloc --help` stays fast
    import pandas as pd
    from PIL import Image
    from torch import Tensor

__all__ = [
    "AUDIT_COLUMNS",
    "CONTROL_COLUMNS",
    "SOURCES",
    "SUMMARY_COLUMNS",
    "AuditSettings",
    "ProbeClassifier",
    "add_parser",
    "clip_attribute_maps",
    "classifier_maps",
    "load_probe_classifier",
    "random_head_rows",
    "run",
    "run_audit",
    "shuffled_partner",
    "summarize",
]

log = logging.getLogger(__name__)

SOURCES = ("clip", "parts")
SIMILAR_RULES = ("logits", "weights")
CONTROLS = ("random_classifier", "shuffled_attribute")
SCORE_COLUMNS = ["iou_top10", "dice_top10", "pearson", "spearman", "energy_inside", "pointing_hit"]
AUDIT_COLUMNS = [
    "image_id", "image", "true_class", "predicted_class", "similar_class", "attribute", "attribute_difference",
    "source", *SCORE_COLUMNS, "status", "sign", "prompt", "parts",
    "rank", "n_attributes", "attribute_id", "true_value", "similar_value", "correct", "similar_by", "gamma",
    "area_share", "lift", "bird_lift", "visible_parts", "sigma_px", "classifier_score", "width", "height",
]  # fmt: skip
AUDIT_KEY = ["image_id", "source", "rank"]
CONTROL_COLUMNS = [
    "image_id", "true_class", "similar_class", "attribute", "source", "rank", "control", "control_attribute",
    *SCORE_COLUMNS, "area_share", "lift", "bird_lift", "status", "correct",
]  # fmt: skip
CONTROL_KEY = ["image_id", "source", "rank", "control"]
SUMMARY_SCORES = [*SCORE_COLUMNS, "area_share", "lift", "bird_lift"]
SUMMARY_COLUMNS = [
    "level", "source", "true_class", "similar_class", "n_images", "n_rows", "n_scored", "accuracy",
    *SUMMARY_SCORES,
    *[f"{c}_{s}" for c in CONTROLS for s in [*SCORE_COLUMNS, "lift", "bird_lift"]],
    "verdict", "looks_at", "ignores",
]  # fmt: skip
NO_VISIBLE = "no visible part"
EMPTY_CLASSIFIER = "empty classifier map"
EMPTY_ATTRIBUTE = "empty attribute map"


# ------------------------------------------------------------------------------------------------------------------
# attribute maps of the clip source (those of the parts source: traitloc.metrics.attributes)
# ------------------------------------------------------------------------------------------------------------------
def clip_attribute_maps(
    localizer: Any,
    image: Image.Image,
    prompts: Sequence[str],
    size: tuple[int, int] | None = None,
    *,
    base: str = "bird",
    gamma: float = 1.0,
    fraction: float = 0.10,
) -> list[AttributeMap]:
    """Text-engine attribute maps: each prompt against ``base`` (Finer-CAM concept query), at the original size.

    Parameters
    ----------
    localizer : a :class:`~traitloc.models.localize.ConceptLocalizer`.
    image : the RGB image.
    prompts : attribute prompts ("blue wings"); duplicates are computed once.
    size : (H, W) of the maps (default: the image's own size).
    base, gamma : the base prompt and the comparison strength of the concept query.
    fraction : the region is the map's top ``fraction`` (:func:`~traitloc.metrics.maps.top_fraction_mask`).
    """
    if not prompts:
        return []
    size = size or (image.size[1], image.size[0])
    unique = list(dict.fromkeys(prompts))
    res = localizer.explain([image], unique, base=base, gamma=gamma)[0]
    maps = {}
    for q, p in enumerate(unique):
        values = res.map(q, size).astype(np.float64)
        maps[p] = AttributeMap(values, top_fraction_mask(values, fraction), "clip", {"prompt": p})
    return [maps[p] for p in prompts]


def random_head_rows(weight: Tensor, n: int, seed: int) -> Tensor:
    """``n`` rows of a re-initialized head: i.i.d. normal with the trained ``weight``'s mean and std, seeded.

    Returns an (n, D) tensor on ``weight``'s device; the same ``seed`` always gives the same rows.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    w = weight.detach().float()
    mu, sd = float(w.mean()), float(w.std()) if w.numel() > 1 else 1.0
    r = torch.randn(int(n), w.shape[1], generator=g) * (sd if sd > 0 else 1.0) + mu
    return r.to(weight.device)


def classifier_maps(
    clf: ProbeClassifier,
    x: Tensor,
    targets: Sequence[int] | None,
    similar: str | Sequence[int] = "logits",
    gamma: float = 0.6,
    random_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Finer-CAM maps (target vs its most similar class) of a batch, plus the random-head control, in one pass.

    One prefix pass and one batched backward give both the real map (rows ``c``, ``d`` of the head) and the
    control map (rows of a re-initialized head, :func:`random_head_rows` seeded by ``random_seeds[b]``).

    Parameters
    ----------
    clf : the classifier.
    x : (B, 3, H, W) preprocessed images.
    targets : the class explained per image (the true class); ``None``: the predicted class.
    similar : ``"logits"``, ``"weights"`` or one similar class index per image.
    gamma : Finer comparison strength.
    random_seeds : one seed per image for the control (``None``: no control).

    Returns
    -------
    dict with ``logits`` (B, K), ``predicted``, ``targets``, ``similar`` (lists), ``maps`` (B, h, w) ReLU maps,
    ``signed`` (B, h, w) the same maps before the ReLU, ``random_maps`` (B, h, w) or None, ``scores`` (B,) Finer
    objective, ``grid`` and ``input_size``.
    """
    import torch

    from traitloc.models.classifier import similar_by_weights, similar_classes

    ex = clf.explainer
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    x = x.to(clf.device)
    B = int(x.shape[0])
    pre = ex.cam.prefix(x)
    logits = ex.logits(pre)
    W = ex.weight.to(logits.device, torch.float32)
    predicted = logits.argmax(1).tolist()
    tgt = list(predicted) if targets is None else [int(t) for t in targets]
    if len(tgt) != B:
        raise ValueError(f"got {len(tgt)} targets for {B} images")
    if isinstance(similar, str):
        if similar == "logits":
            sim = similar_classes(logits, torch.tensor(tgt), 1)[:, 0].tolist()
        elif similar == "weights":
            sim = similar_by_weights(W, torch.tensor(tgt), 1)[:, 0].tolist()
        else:
            raise ValueError(f"similar must be one of {', '.join(SIMILAR_RULES)} or class indices, got {similar!r}")
    else:
        sim = [int(s) for s in similar]
        if len(sim) != B or any(s == t for s, t in zip(sim, tgt, strict=True)):
            raise ValueError("give one similar class per image, different from its target")
    rows = [W[tgt], W[sim]]
    if random_seeds is not None:
        if len(random_seeds) != B:
            raise ValueError(f"got {len(random_seeds)} random seeds for {B} images")
        R = torch.stack([random_head_rows(W, 2, s) for s in random_seeds]).to(W.device)
        rows += [R[:, 0], R[:, 1]]
    V = torch.stack(rows, 1)  # (B, P, D)
    P = V.shape[1]
    C = torch.zeros(B, P // 2, P, device=W.device)
    for q in range(P // 2):
        C[:, q, 2 * q] = 1.0
        C[:, q, 2 * q + 1] = -float(gamma)
    out = ex.cam.gradients(pre, V).combine(C, V)
    maps = out.maps.detach()
    return {
        "logits": logits.detach(),
        "predicted": predicted,
        "targets": tgt,
        "similar": sim,
        "maps": maps[:, 0],
        "signed": out.signed[:, 0].detach(),
        "random_maps": maps[:, 1] if random_seeds is not None else None,
        "scores": out.scores[:, 0].detach(),
        "grid": out.grid,
        "input_size": out.input_size,
    }


# ------------------------------------------------------------------------------------------------------------------
# the shuffled-attribute control
# ------------------------------------------------------------------------------------------------------------------
def _groups(attribute_names: Sequence[str]) -> list[tuple[str, tuple[str, ...], list[int]]]:
    groups: dict[str, tuple[tuple[str, ...], list[int]]] = {}
    for j, name in enumerate(attribute_names):
        try:
            g = parse_attribute(name)[0]
            parts = attribute_parts(g)
        except ValueError:
            continue
        groups.setdefault(g, (parts, []))[1].append(j)
    return [(g, p, idx) for g, (p, idx) in groups.items()]


def shuffled_partner(
    attribute_names: Sequence[str],
    index: int,
    rng: np.random.Generator,
    visible_parts: set[str] | None = None,
) -> int | None:
    """A random other attribute for the shuffled-attribute control.

    A group (``has_<part>_<property>``) is drawn uniformly among the groups whose parts are non-empty and disjoint
    from the attribute's parts (and, with ``visible_parts``, include a visible part), then one of its values.
    Returns the 0-based attribute index, or None when no group qualifies.
    """
    try:
        own = set(attribute_parts(attribute_names[index]))
        own_group = parse_attribute(attribute_names[index])[0]
    except ValueError:
        own, own_group = set(), ""
    cands = [
        (g, idx)
        for g, parts, idx in _groups(attribute_names)
        if parts and g != own_group and not own & set(parts) and (visible_parts is None or visible_parts & set(parts))
    ]
    if not cands:
        return None
    _, idx = cands[int(rng.integers(len(cands)))]
    return int(idx[int(rng.integers(len(idx)))])


# ------------------------------------------------------------------------------------------------------------------
# the audit run
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class AuditSettings:
    """Settings of an audit run (recorded in ``run.json``; a rerun into the same folder must use the same).

    Attributes
    ----------
    split : CUB split (``test``, ``train``, ``all``).
    top_attributes : attributes per image (top-k differences).
    sources : attribute-map sources, a subset of ``("clip", "parts")``.
    similar : ``"logits"`` or ``"weights"``.
    gamma : classifier Finer gamma.
    clip_gamma, base : the concept query of clip maps (prompt vs ``base``).
    sigma_scale, region_radius : parts maps (see :func:`~traitloc.metrics.attributes.parts_attribute_map`).
    fraction : top fraction for IoU/Dice and clip regions.
    pointing_tolerance : pointing-game tolerance in pixels.
    verdict_lift : a pair "looks at" an attribute when its mean bird_lift (whole-bird attributes: lift) exceeds this.
    controls : compute the two sanity controls.
    limit : audit at most this many images (in image-id order), None for all.
    batch_size, seed, quiet : batching, control seed, progress bar.
    """

    split: str = "test"
    top_attributes: int = 3
    sources: tuple[str, ...] = ("parts",)
    similar: str = "logits"
    gamma: float = 0.6
    clip_gamma: float = 1.0
    base: str = "bird"
    sigma_scale: float = 0.1
    region_radius: float = 1.0
    fraction: float = 0.10
    pointing_tolerance: float = 15.0
    verdict_lift: float = 1.0
    controls: bool = True
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = tuple(s.strip() for s in self.sources.split(",") if s.strip())
        self.sources = tuple(dict.fromkeys(self.sources))
        bad = [s for s in self.sources if s not in SOURCES]
        if not self.sources or bad:
            raise ValueError(f"attribute-map sources must be among {', '.join(SOURCES)}, got {list(self.sources)}")
        if self.similar not in SIMILAR_RULES:
            raise ValueError(f"similar must be one of {', '.join(SIMILAR_RULES)}, got {self.similar!r}")
        if self.split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {self.split!r}")
        for name in ("top_attributes", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        lim = self.limit
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        for name in ("gamma", "clip_gamma", "sigma_scale", "region_radius", "fraction", "pointing_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.sigma_scale <= 0 or self.region_radius <= 0 or not 0 < self.fraction <= 1:
            raise ValueError("sigma_scale and region_radius must be > 0 and fraction in (0, 1]")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the rows (everything but limit, batch size and progress)."""
        d = asdict(self)
        for k in ("limit", "batch_size", "quiet"):
            d.pop(k)
        d["sources"] = sorted(d["sources"])
        return d


@dataclass
class AuditItem:
    """One image of an audit (an item of :class:`AuditJob`; picklable)."""

    image_id: int
    path: Path
    rel: str  # the path as in CUB's images.txt (the ``image`` column of audit.csv)
    true_cub: int  # CUB class row index
    true_k: int  # probe class index
    box: tuple[float, float, float, float]
    sources: list[str]


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.6g}"
    return v


@dataclass
class _Decoded:
    """An image decoded and preprocessed in the prefetch thread."""

    im: Any  # traitloc.data.images.LoadedImage
    x: Tensor  # (C, H, W) classifier input


class _Auditor:
    """State shared by the per-image work of :func:`run_audit`."""

    def __init__(self, cub: Any, clf: ProbeClassifier, settings: AuditSettings, localizer: Any) -> None:
        self.cub = cub
        self.clf = clf
        self.s = settings
        self.localizer = localizer
        self.names = list(cub.attribute_names)
        self.attrs = np.asarray(cub.class_attributes)
        traits = {t.name: t for t in load_trait_list("cub200")}
        self.prompts = [
            traits[n].prompt if n in traits else n.replace("has_", "").replace("::", " ").replace("_", " ")
            for n in self.names
        ]
        self.parts: list[tuple[str, ...] | None] = []
        for n in self.names:
            try:
                self.parts.append(tuple(traits[n].parts) if n in traits else attribute_parts(n))
            except ValueError:
                self.parts.append(None)
        self.cub_of_class = [cub.class_index(n) for n in clf.class_names]
        self.prompts_by_name = dict(zip(self.names, self.prompts, strict=True))
        self.class_label = {i: cub.classes["name"].iloc[i] for i in range(len(cub.classes))}
        self.split_ids = [int(i) for i in cub.split(settings.split)["image_id"]]
        self.boxes = cub.images.set_index("image_id")[["x", "y", "width", "height"]]

    # -- per image ------------------------------------------------------------------------------------------------
    def image_rows(
        self, job: AuditItem, image: Image.Image, size: tuple[int, int], cmap: Tensor, rmap: Tensor | None, info: dict
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from traitloc.engine.cam import upsample_maps

        s = self.s
        H, W = size
        true_cub, sim_k = job.true_cub, info["similar"]
        sim_cub = self.cub_of_class[sim_k]
        pred_cub = self.cub_of_class[info["predicted"]]
        diffs = attribute_differences(self.attrs, true_cub, sim_cub, s.top_attributes)
        cm = ScoredMap(upsample_maps(cmap, (H, W)).cpu().numpy(), s.fraction)
        rm = ScoredMap(upsample_maps(rmap, (H, W)).cpu().numpy(), s.fraction) if rmap is not None else None
        kp = self.cub.part_locs(job.image_id)
        visible = set(kp.loc[kp["visible"], "part"])
        rng = np.random.default_rng([s.seed, job.image_id])
        partners = [shuffled_partner(self.names, d.index, rng, visible) if s.controls else None for d in diffs]
        common = {
            "image_id": job.image_id,
            "image": job.rel,
            "true_class": self.class_label[true_cub],
            "predicted_class": self.class_label[pred_cub],
            "similar_class": self.class_label[sim_cub],
            "correct": int(pred_cub == true_cub),
            "similar_by": s.similar,
            "gamma": s.gamma,
            "n_attributes": len(diffs),
            "classifier_score": float(info["score"]),
            "width": W,
            "height": H,
        }
        rows: list[dict[str, Any]] = []
        controls: list[dict[str, Any]] = []
        kw = {"fraction": s.fraction, "pointing_tolerance": s.pointing_tolerance}
        bird = box_mask((H, W), *job.box)
        bird_lift = {"real": _box_lift(cm, bird), "random": _box_lift(rm, bird) if rm is not None else math.nan}
        for source in job.sources:
            amaps, pmaps = self._attribute_maps(source, image, (H, W), kp, job, diffs, partners)
            for rank, (d, am, (pm, plabel)) in enumerate(zip(diffs, amaps, pmaps, strict=True), start=1):
                row = {
                    **dict.fromkeys(AUDIT_COLUMNS, ""),
                    **common,
                    "source": source,
                    "rank": rank,
                    "attribute": self.names[d.index],
                    "attribute_id": d.index + 1,
                    "attribute_difference": d.difference,
                    "sign": d.sign,
                    "true_value": float(self.attrs[true_cub, d.index]),
                    "similar_value": float(self.attrs[sim_cub, d.index]),
                    "prompt": self.prompts[d.index],
                    "parts": ";".join(self.parts[d.index] or ()) or "whole bird",
                }
                ctrl = {k: common[k] for k in ("image_id", "true_class", "similar_class", "correct")}
                ctrl.update(attribute=row["attribute"], source=source, rank=rank)
                if am is None:
                    row["status"] = NO_VISIBLE
                    rows.append(row)
                    continue
                am_s = ScoredMap(am.values, s.fraction)
                row.update(_scores(cm, am_s, am.region, bird_lift["real"], kw))
                row["visible_parts"] = ";".join(am.info.get("visible_parts") or [])
                row["sigma_px"] = am.info.get("sigma_px")
                row["status"] = EMPTY_CLASSIFIER if cm.constant else (EMPTY_ATTRIBUTE if am_s.constant else "ok")
                rows.append(row)
                if rm is not None:
                    sc = _scores(rm, am_s, am.region, bird_lift["random"], kw)
                    st = EMPTY_CLASSIFIER if rm.constant else row["status"]
                    controls.append(
                        {
                            **ctrl,
                            **sc,
                            "control": "random_classifier",
                            "control_attribute": row["attribute"],
                            "status": st,
                        }
                    )
                if pm is not None:
                    pm_s = ScoredMap(pm.values, s.fraction)
                    sc = _scores(cm, pm_s, pm.region, bird_lift["real"], kw)
                    st = EMPTY_CLASSIFIER if cm.constant else (EMPTY_ATTRIBUTE if pm_s.constant else "ok")
                    controls.append(
                        {**ctrl, **sc, "control": "shuffled_attribute", "control_attribute": plabel, "status": st}
                    )
        return rows, controls

    def _moved_box(self, job: AuditItem, size: tuple[int, int], rng: np.random.Generator) -> tuple[str, AttributeMap]:
        """The bird box of a random other image of the split, placed at the same relative position in this one."""
        from PIL import Image

        others = [i for i in self.split_ids if i != job.image_id]
        if not others:
            return "", None  # type: ignore[return-value]
        other = int(others[int(rng.integers(len(others)))])
        row = self.boxes.loc[other]
        with Image.open(self.cub.image_path(other)) as im:
            ow, oh = im.size
        H, W = size
        box = (row.x / ow * W, row.y / oh * H, row.width / ow * W, row.height / oh * H)
        return f"bird box of image {other}", box_attribute_map((H, W), box)

    def _attribute_maps(
        self,
        source: str,
        image: Image.Image,
        size: tuple[int, int],
        kp: pd.DataFrame,
        job: AuditItem,
        diffs: list[AttributeDifference],
        partners: list[int | None],
    ) -> tuple[list[AttributeMap | None], list[tuple[AttributeMap | None, str]]]:
        """Maps of the attributes and of their shuffled-control partners (map, label) for one source."""
        s = self.s
        if source == "parts":

            def one(j: int) -> AttributeMap | None:
                parts = self.parts[j]
                if parts is None:
                    return None
                return parts_attribute_map(
                    size, kp, parts, job.box, sigma_scale=s.sigma_scale, region_radius=s.region_radius
                )

            pmaps: list[tuple[AttributeMap | None, str]] = []
            for d, p in zip(diffs, partners, strict=True):
                if not s.controls:
                    pmaps.append((None, ""))
                elif self.parts[d.index] == ():  # whole bird: the box of a random other photo, an equal-area region
                    label, m = self._moved_box(job, size, np.random.default_rng([s.seed, job.image_id, d.index]))
                    pmaps.append((m, label))
                else:
                    pmaps.append((one(p), self.names[p]) if p is not None else (None, ""))
            return [one(d.index) for d in diffs], pmaps
        prompts = [self.prompts[d.index] for d in diffs] + [self.prompts[p] for p in partners if p is not None]
        maps = clip_attribute_maps(
            self.localizer, image, prompts, size, base=s.base, gamma=s.clip_gamma, fraction=s.fraction
        )
        real, rest = maps[: len(diffs)], iter(maps[len(diffs) :])
        return list(real), [(next(rest), self.names[p]) if p is not None else (None, "") for p in partners]


def _box_lift(m: ScoredMap, bird: NDArray[np.bool_]) -> float:
    """Energy share of the bird's box over its area share (how much the map favours the bird over the image)."""

    if not bird.any() or m.constant:
        return math.nan
    return energy_inside(m.values, bird) / float(bird.mean())


def _scores(
    m: ScoredMap, a: ScoredMap, region: NDArray[np.bool_], bird_lift: float, kw: Mapping[str, float]
) -> dict[str, float]:
    sc = overlap_scores(m, a, region, **kw)
    sc["bird_lift"] = sc["lift"] / bird_lift if bird_lift > 0 else math.nan
    return sc


def _error_row(job: AuditItem, source: str, label: str, reason: str) -> dict[str, Any]:
    """The row of a failed image: keyed as its first attribute row, which replaces it when a rerun succeeds."""
    return {
        **dict.fromkeys(AUDIT_COLUMNS, ""),
        "image_id": job.image_id, "image": job.rel, "true_class": label, "source": source, "rank": 1,
        "attribute": "-", "status": f"error: {reason}".splitlines()[0],
    }  # fmt: skip


#: the float columns that a scored row always has: NaN there is a computed value ("nan" in the CSV), not a gap
_SCORED_FLOATS = frozenset([*SCORE_COLUMNS, "area_share", "lift", "bird_lift"])


class AuditJob(Job):
    """The audit of a classifier on CUB images: store rows per image x attribute x source (``kind = audit``) and
    per control (``kind = control``).

    Keys are ``image_id, source, rank, control`` (``control`` empty for audit rows); an image is done when its
    first audit row of a source is in the store (a part holds all the rows of its images). Audit rows keep the
    classifier's signed Finer map on its grid (``grid``; render with :func:`traitloc.io.store.render_map`). The
    summaries are ``audit.csv`` and ``controls.csv`` (the same columns and values as ever); :meth:`summarize`
    writes ``audit_summary.csv`` from them at the end of a run.
    """

    name = "audit"
    key_columns = ("image_id", "source", "rank", "control")
    retry_errors = True
    columns = {
        "kind": "str", "image_id": "int", "cub_image": "str", "true_class": "str", "predicted_class": "str",
        "similar_class": "str", "attribute": "str", "attribute_difference": "float", "source": "str",
        **dict.fromkeys(SCORE_COLUMNS, "float"), "sign": "int", "prompt": "str", "parts": "str", "rank": "int",
        "n_attributes": "int", "attribute_id": "int", "true_value": "float", "similar_value": "float",
        "correct": "int", "similar_by": "str", "gamma": "float", "area_share": "float", "lift": "float",
        "bird_lift": "float", "visible_parts": "str", "sigma_px": "float", "classifier_score": "float",
        "control": "str", "control_attribute": "str",
    }  # fmt: skip

    def __init__(self, auditor: _Auditor, fingerprint: dict[str, Any]) -> None:
        from traitloc.io.store import INTERPOLATION

        self.auditor = auditor
        self.s = auditor.s
        self.clf = auditor.clf
        self.fingerprint = fingerprint
        self.map_settings = json.loads(to_json(fingerprint))  # as run.json keeps them (lists, not tuples)
        self.common = {"resize": "stretch", "interpolation": INTERPOLATION, "notes": ""}
        self.summary: pd.DataFrame | None = None
        self.headline: dict[str, Any] = {}

    def csv_specs(self) -> list[CsvSpec]:
        """``audit.csv`` (the audit rows) and ``controls.csv`` (the control rows)."""
        return [
            CsvSpec("audit.csv", tuple(AUDIT_COLUMNS), tuple(AUDIT_KEY), {"kind": "audit"}),
            CsvSpec("controls.csv", tuple(CONTROL_COLUMNS), tuple(CONTROL_KEY), {"kind": "control"}),
        ]

    # -- items ----------------------------------------------------------------------------------------------------
    def item_keys(self, item: AuditItem) -> list[tuple[Any, ...]]:
        """An image is done per source when its first audit row is stored."""
        return [(item.image_id, src, 1, "") for src in item.sources]

    def load(self, item: AuditItem) -> Any:
        """The decoded image and the classifier's input (prefetch thread), or the :class:`ImageLoadError`."""
        from traitloc.data.images import ImageLoadError

        im = load_or_error(item.path)
        if isinstance(im, ImageLoadError):
            return im
        try:
            x = self.clf.preprocess(im.image)
        except Exception as err:  # noqa: BLE001 - a per-image error
            return ImageLoadError(item.path, f"preprocess failed: {type(err).__name__}: {err}".splitlines()[0])
        return _Decoded(im, x)

    def _wanted(self, item: AuditItem) -> list[str]:
        """The item's sources not in the store yet (the runner keeps the set of stored keys)."""
        done = self.done_keys
        return [src for src in item.sources if (item.image_id, src, 1, "") not in done]

    def _stored(self, item: AuditItem, row: dict[str, Any], kind: str) -> dict[str, Any]:
        """A row of ``audit.csv`` or ``controls.csv`` as a store row (``image``: the absolute path)."""
        key, control = Path(item.rel).stem, row.get("control", "")
        rid = f"{key}/{row['source']}-{row['rank']}" + (f"-{control.replace('_', '-')}" if control else "")
        return {
            **self.common, **row, "kind": kind, "image": str(Path(item.path).resolve()), "cub_image": item.rel,
            "image_key": key, "control": control, "result_id": rid,
        }  # fmt: skip

    def error_rows(self, item: AuditItem, reason: str) -> list[dict[str, Any]]:
        """One error row per source not done yet (keyed as the first attribute row: a rerun replaces it)."""
        label = self.auditor.class_label[item.true_cub]
        srcs = self._wanted(item) or item.sources
        return [self._stored(item, _error_row(item, src, label, reason), "audit") for src in srcs]

    # -- compute --------------------------------------------------------------------------------------------------
    def compute(self, batch: list[tuple[AuditItem, _Decoded]]) -> list[list[dict[str, Any]] | str]:
        """Rows of each image; images of one input shape share the classifier's passes."""
        import dataclasses

        out: list[list[dict[str, Any]] | str | None] = [None] * len(batch)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, dec) in enumerate(batch):
            groups.setdefault(tuple(dec.x.shape), []).append(i)
        for idx in groups.values():
            results = _explain_group(self.clf, [(batch[i][0], batch[i][1].im, batch[i][1].x) for i in idx], self.s)
            for i, res in zip(idx, results, strict=True):
                item, dec = batch[i]
                job = dataclasses.replace(item, sources=self._wanted(item) or list(item.sources))
                W0, H0 = dec.im.orig_size
                if not _all_finite(res["signed"]):
                    out[i] = "the map is not finite (NaN or infinite values)"  # as in every command
                    continue
                try:
                    rows, crows = self.auditor.image_rows(
                        job, dec.im.image, (H0, W0), res["map"], res["random_map"], res
                    )
                except Exception as err:  # noqa: BLE001 - recorded for this image; the run goes on
                    log.warning("image %d: %s: %s", item.image_id, type(err).__name__, err)
                    out[i] = f"{type(err).__name__}: {err}"
                    continue
                signed = res["signed"]
                grid = {"grid": signed.numpy(), "grid_h": int(signed.shape[0]), "grid_w": int(signed.shape[1])}
                out[i] = [self._stored(item, {**r, **grid}, "audit") for r in rows] + [
                    self._stored(item, {**c, "width": W0, "height": H0}, "control") for c in crows
                ]
        return [r if r is not None else "not audited" for r in out]

    def rows_ok(self, rows: list[dict[str, Any]]) -> bool:
        """An image is done well unless it failed (``no visible part`` and empty maps are results)."""
        return not any(str(r.get("status", "")).startswith("error") for r in rows)

    # -- summaries ------------------------------------------------------------------------------------------------
    def csv_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A store row as a line of ``audit.csv``/``controls.csv`` (no grid; ``image`` as in CUB's images.txt)."""
        scored = _is_scored(row.get("status"))
        out = {k: _csv_text(self._kind(k), k, row.get(k), scored) for k in row if k != "grid"}
        out["image"] = row.get("cub_image", "")
        return out

    def csv_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """:meth:`csv_row` for a frame of store rows (rewriting the summaries from the store)."""
        import pandas as pd

        scored = [_is_scored(s) for s in df["status"]]
        cols = {
            c: [_csv_text(self._kind(c), c, v, sc) for v, sc in zip(df[c].tolist(), scored, strict=True)]
            for c in df.columns
        }
        out = pd.DataFrame(cols, index=df.index, dtype=object)
        out["image"] = out["cub_image"]
        return out

    def _kind(self, column: str) -> str:
        from traitloc.io.store import BASE_COLUMNS

        return self.columns.get(column) or BASE_COLUMNS.get(column, "str")

    def run_info(self) -> dict[str, Any]:
        """What ``run.json`` records of the audit: settings, method and the headline figures."""
        return {"settings": self.fingerprint, "method": "gradcam", "headline": self.headline}

    def summarize(self, out: Path, info: dict[str, Any]) -> None:
        """``audit_summary.csv`` from ``audit.csv`` and ``controls.csv``, and the headline in ``run.json``."""
        import csv

        from traitloc.io.files import atomic_write, write_run_json

        def rows(name: str) -> list[dict[str, str]]:
            path = out / name
            if not path.is_file():
                return []
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))

        names = self.auditor.prompts_by_name
        summary = summarize(rows("audit.csv"), rows("controls.csv"), verdict_lift=self.s.verdict_lift, names=names)
        atomic_write(out / "audit_summary.csv", summary.to_csv(index=False, float_format="%.4g", lineterminator="\n"))
        self.summary = summary
        self.headline = _headline(summary)
        info["headline"] = self.headline
        write_run_json(out / "run.json", info)


def _all_finite(t: Tensor) -> bool:
    """Whether a tensor has no NaN or infinite value."""
    import torch

    return bool(torch.isfinite(t).all())


def _is_scored(status: Any) -> bool:
    s = "" if status is None else str(status)
    return s != NO_VISIBLE and not s.startswith("error")


def _csv_text(kind: str, column: str, v: Any, scored: bool) -> str:
    """A store value as ``audit.csv``/``controls.csv`` have always written it (floats to 6 significant digits)."""
    import pandas as pd

    if isinstance(v, str) and v == "":
        return ""
    if v is None or v is pd.NA:
        return "nan" if kind == "float" and scored and column in _SCORED_FLOATS else ""
    if kind == "float":
        f = float(v)
        if f != f:
            return "nan" if scored and column in _SCORED_FLOATS else ""
        return str(_fmt(f))
    if kind == "int":
        return str(int(v))
    return str(v)


def audit_items(cub: Any, clf: ProbeClassifier, settings: AuditSettings) -> tuple[list[AuditItem], list[int], int]:
    """The images of an audit: items (split, probe classes only, ``limit``), CUB class ids not in the probe, count."""
    in_probe = {c: k for k, c in enumerate(clf_cub_classes(cub, clf))}
    df = cub.split(settings.split)
    skipped_classes = sorted({int(c) for c in df["class_id"] if int(c) - 1 not in in_probe})
    if skipped_classes:
        warnings.warn(
            f"{len(skipped_classes)} class(es) of the {settings.split} split are not in the probe and are skipped "
            f"(class ids {skipped_classes[:8]}{'...' if len(skipped_classes) > 8 else ''})",
            UserWarning,
            stacklevel=3,
        )
        df = df[(df["class_id"] - 1).isin(list(in_probe))]
    if settings.limit is not None:
        df = df.iloc[: settings.limit]
    items = [
        AuditItem(int(r.image_id), Path(cub.image_path(int(r.image_id))), str(r.path), int(r.class_id) - 1,
                  in_probe[int(r.class_id) - 1], (float(r.x), float(r.y), float(r.width), float(r.height)),
                  list(settings.sources))
        for r in df.itertuples(index=False)
    ]  # fmt: skip
    return items, skipped_classes, len(df)


def clf_cub_classes(cub: Any, clf: ProbeClassifier) -> list[int]:
    """The CUB class row index of each of the classifier's classes."""
    return [cub.class_index(n) for n in clf.class_names]


def run_audit(
    cub: Any,
    clf: ProbeClassifier,
    out_dir: str | Path,
    settings: AuditSettings,
    *,
    localizer: Any = None,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Audit a classifier on a CUB split; write ``audit.csv``, ``controls.csv``, ``audit_summary.csv``, ``run.json``.

    A job of the pipeline runner (:func:`traitloc.pipelines.runner.run_job`): the rows go to the run's results store
    (``results/part-*.parquet``), the CSVs are its summaries.

    Parameters
    ----------
    cub : a :class:`~traitloc.data.cub.CUB` reader.
    clf : the classifier (:func:`load_probe_classifier`); its class names must be CUB class names.
    out_dir : output folder; a rerun into it skips images already done and retries failed ones (same settings
        required: other settings raise :class:`traitloc.pipelines.runner.SettingsMismatchError`, a ``ValueError``).
    settings : :class:`AuditSettings`.
    localizer : a :class:`~traitloc.models.localize.ConceptLocalizer`, needed for the ``clip`` source.
    run_info : extra entries for ``run.json`` (argv, model descriptions...).

    Returns
    -------
    dict with ``counts`` (``ok``, ``failed``, ``skipped`` images), ``seconds`` and ``headline`` (mean real vs control
    scores per source, from the summary's ``overall`` rows).
    """
    s = settings
    if "clip" in s.sources and localizer is None:
        raise ValueError("the clip source needs a ConceptLocalizer (localizer=...)")
    fingerprint = {**s.fingerprint(), "probe_sha256": clf.describe.get("probe_sha256")}
    auditor = _Auditor(cub, clf, s, localizer)
    items, skipped_classes, n_images = audit_items(cub, clf, s)
    job = AuditJob(auditor, fingerprint)
    info: dict[str, Any] = dict(run_info or {})
    info.update(
        command=info.get("command", "audit"),
        cub_root=str(cub.root),
        classifier=clf.describe,
        n_images=n_images,
        classes_not_in_probe=skipped_classes,
    )
    t0 = time.perf_counter()
    counts = run_job(job, items, out_dir, info, batch_size=s.batch_size, quiet=s.quiet)
    seconds = round(time.perf_counter() - t0, 3)
    return {"counts": counts, "seconds": seconds, "headline": job.headline}


def _explain_group(clf: ProbeClassifier, group: list[tuple[AuditItem, Any, Tensor]], s: AuditSettings) -> list[dict]:
    import torch

    from traitloc.pipelines.runner import split_on_oom

    def fn(items: list[tuple[AuditItem, Any, Tensor]]) -> list[dict]:
        x = torch.stack([t for _, _, t in items])
        seeds = [s.seed * 1_000_003 + j.image_id for j, _, _ in items] if s.controls else None
        res = classifier_maps(clf, x, [j.true_k for j, _, _ in items], s.similar, s.gamma, seeds)
        signed = res["signed"].detach().float().cpu()
        return [
            {
                "map": res["maps"][b].cpu(),
                "signed": signed[b],
                "random_map": res["random_maps"][b].cpu() if res["random_maps"] is not None else None,
                "predicted": res["predicted"][b],
                "similar": res["similar"][b],
                "score": float(res["scores"][b]),
            }
            for b in range(len(items))
        ]

    return split_on_oom(fn, group)


# ------------------------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------------------------
def _num(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    for c in cols:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _group_label(name: str, prompt: str) -> str:
    try:
        g = parse_attribute(name)[0]
    except ValueError:
        return prompt
    return g.removeprefix("has_").replace("_", " ").replace("color", "colour")


def _verdict(per_attr: pd.DataFrame, threshold: float) -> tuple[str, list[str], list[str]]:
    """``looks at: ...; ignores: ...`` from a frame with ``label``, ``whole`` and mean ``score`` per attribute.

    Part attributes come first, by decreasing score (x the bird's mean evidence density); whole-bird attributes
    follow, marked, with their score against the whole image.
    """
    looks: list[str] = []
    ignores: list[str] = []
    rows = per_attr.assign(order=-per_attr["score"]).sort_values(["whole", "order"], kind="stable")
    for label, whole, score in rows[["label", "whole", "score"]].itertuples(index=False):
        if not math.isfinite(score):
            continue
        text = f"{label} (whole bird, {score:.1f}x image)" if whole else f"{label} ({score:.1f}x)"
        (looks if score > threshold else ignores).append(text)
    text = "; ".join(p for p in (
        f"looks at: {', '.join(looks)}" if looks else "", f"ignores: {', '.join(ignores)}" if ignores else ""
    ) if p) or "no scored attribute"  # fmt: skip
    return text, looks, ignores


def summarize(
    audit_rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
    control_rows: Sequence[Mapping[str, Any]] | pd.DataFrame = (),
    *,
    verdict_lift: float = 1.0,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per class pair and overall summary of an audit (the rows of ``audit_summary.csv``).

    Parameters
    ----------
    audit_rows, control_rows : the rows of ``audit.csv`` and ``controls.csv`` (dicts or frames).
    verdict_lift : an attribute is "looked at" when its mean ``bird_lift`` (whole-bird attributes: ``lift``) exceeds
        this (1 = chance).
    names : attribute name -> readable prompt for the per-pair verdicts (default: the attribute name).

    Returns
    -------
    DataFrame with :data:`SUMMARY_COLUMNS`: ``level`` = ``pair`` rows (one per source, true class and similar
    class), then ``overall`` and ``overall_correct`` rows per source. Means are over rows with ``status = ok``;
    the verdict of a pair lists its attributes, that of an overall row the attribute groups (e.g. "wing colour").
    """
    import pandas as pd

    a = audit_rows.copy() if isinstance(audit_rows, pd.DataFrame) else pd.DataFrame(list(audit_rows))
    c = control_rows.copy() if isinstance(control_rows, pd.DataFrame) else pd.DataFrame(list(control_rows))
    if a.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    a = _num(a, [*SUMMARY_SCORES, "correct", "rank"])
    a = a[~a["status"].astype(str).str.startswith("error")]  # failed images have no pair
    if a.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    names = dict(names or {})
    a["label"] = [names.get(n, n) for n in a["attribute"]]
    a["group_label"] = [_group_label(n, names.get(n, n)) for n in a["attribute"]]
    # parts are judged against the bird (bird_lift), whole-bird attributes against the image (lift)
    a["whole"] = a["parts"] == "whole bird"
    a["verdict_score"] = np.where(a["whole"], a["lift"], a["bird_lift"])
    if not c.empty:
        c = _num(c, [*SCORE_COLUMNS, "lift", "bird_lift", "correct"])
        c = c[c["status"] == "ok"]
    out = []

    def block(level: str, src: str, t: str, d: str, rows: pd.DataFrame, label_col: str) -> dict[str, Any]:
        scored = rows[rows["status"] == "ok"]
        rec: dict[str, Any] = {
            "level": level, "source": src, "true_class": t, "similar_class": d,
            "n_images": rows["image_id"].nunique(), "n_rows": len(rows), "n_scored": len(scored),
            "accuracy": rows.drop_duplicates("image_id")["correct"].mean(),
        }  # fmt: skip
        for col in SUMMARY_SCORES:
            rec[col] = scored[col].mean() if len(scored) else float("nan")
        if not c.empty:
            keys = set(zip(rows["image_id"], rows["rank"].astype(int).astype(str), strict=True))
            sub = c[c["source"] == src]
            sub = sub[[(i, r) in keys for i, r in zip(sub["image_id"], sub["rank"].astype(str), strict=True)]]
            for ctl in CONTROLS:
                cs = sub[sub["control"] == ctl]
                for col in [*SCORE_COLUMNS, "lift", "bird_lift"]:
                    rec[f"{ctl}_{col}"] = cs[col].mean() if len(cs) else float("nan")
        per_attr = scored.groupby([label_col, "whole"], sort=False)["verdict_score"].mean().reset_index()
        per_attr = per_attr.rename(columns={label_col: "label", "verdict_score": "score"})
        if level != "pair":  # overall verdicts: only groups seen often enough to mean something
            counts = scored.groupby(label_col, sort=False).size()
            per_attr = per_attr[per_attr["label"].map(counts) >= 5]
        rec["verdict"], looks, ignores = _verdict(per_attr, verdict_lift)
        rec["looks_at"] = "; ".join(looks)
        rec["ignores"] = "; ".join(ignores)
        return rec

    for (src, t, d), rows in a.groupby(["source", "true_class", "similar_class"], sort=True):
        out.append(block("pair", src, t, d, rows, "label"))
    for src, rows in a.groupby("source", sort=True):
        out.append(block("overall", src, "all", "all", rows, "group_label"))
        right = rows[rows["correct"] == 1]
        if len(right):
            out.append(block("overall_correct", src, "all", "all", right, "group_label"))
    return pd.DataFrame(out).reindex(columns=SUMMARY_COLUMNS)


def _headline(summary: pd.DataFrame) -> dict[str, Any]:
    """Mean real vs control scores of the ``overall`` rows, per source (for ``run.json`` and the console)."""
    scores = ("energy_inside", "pointing_hit", "lift", "bird_lift")
    keys = ["n_images", "accuracy"] + [f"{p}{k}" for p in ("", *(f"{c}_" for c in CONTROLS)) for k in scores]
    out: dict[str, Any] = {}
    for r in summary[summary["level"].isin(["overall", "overall_correct"])].itertuples(index=False):
        d = r._asdict()
        out[f"{d['source']}/{d['level']}"] = {
            k: None if not isinstance(d.get(k), (int, float)) or not math.isfinite(d[k]) else round(float(d[k]), 4)
            for k in keys
        }
    return out


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def _sources(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in SOURCES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"--attribute-maps takes a comma-separated subset of clip,parts, got {text!r}")
    return items


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``) and return it."""
    from traitloc.pipelines.options import add_shared, nonneg_float, positive_int

    p = subparsers.add_parser(
        "audit",
        help="faithfulness audit: does a classifier look at the traits that separate the species?",
        description="For each image of a CUB split, compare the classifier's Finer-CAM map (true class vs its most "
        "similar class) with maps of the attributes that differ most between the two species (CUB part keypoints "
        "and/or CLIP text queries). Writes audit.csv (per image x attribute x source), controls.csv (randomized "
        "classifier and shuffled attributes), audit_summary.csv (per class pair, with a verdict) and run.json "
        "under --out; rerunning into the same --out skips finished images.",
    )
    add_shared(p, "--cub-root")
    p.add_argument("--probe", required=True, metavar="PROBE_DIR", help="probe folder written by traitloc train-probe")
    add_shared(p, "--split")
    p.add_argument(
        "--top-attributes", type=positive_int, default=3, metavar="K",
        help="attributes per image: the K that differ most between the two classes (default: 3)",
    )  # fmt: skip
    p.add_argument(
        "--attribute-maps", type=_sources, default=("clip", "parts"), metavar="LIST",
        help="attribute-map sources, comma-separated: parts (Gaussians on the CUB keypoints of the attribute's "
        "parts), clip (the attribute's prompt vs --base with the text engine) (default: clip,parts)",
    )  # fmt: skip
    p.add_argument(
        "--similar", choices=list(SIMILAR_RULES), default="logits",
        help="most similar class: closest logit to the true class's on each image, or most cosine-similar "
        "classifier weights (default: logits)",
    )  # fmt: skip
    p.add_argument("--gamma", type=nonneg_float, default=0.6, help="classifier Finer-CAM gamma (default: 0.6)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="audit only the first N images")
    p.add_argument(
        "--backbone", metavar="MODULE:FUNCTION", default=None,
        help="backbone the probe was trained on: efficientnet-lite0 or MODULE:FUNCTION (default: the one recorded "
        "in the probe)",
    )  # fmt: skip
    g = p.add_argument_group("clip attribute maps")
    g.add_argument(
        "--model", default="ViT-B-16",
        help="open_clip model name, hf-hub:org/repo, or a model config .json (default: ViT-B-16)",
    )  # fmt: skip
    g.add_argument(
        "--pretrained", default="laion400m_e32",
        help="pretrained tag or a local weights file (.safetensors/.bin/.pt); 'none' for random weights "
        "(default: laion400m_e32)",
    )  # fmt: skip
    g.add_argument("--base", default="bird", help="base prompt of the clip maps (default: bird)")
    g.add_argument("--clip-gamma", type=nonneg_float, default=1.0, help="gamma of the clip maps (default: 1.0)")
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--sigma-scale", type=nonneg_float, default=0.1,
        help="parts maps: Gaussian sigma = this x sqrt(bounding-box area); the region is the discs of radius "
        "sigma (default: 0.1)",
    )  # fmt: skip
    g.add_argument(
        "--pointing-tolerance", type=nonneg_float, default=15.0, help="pointing-game tolerance in pixels (default: 15)"
    )
    g.add_argument("--no-controls", action="store_true", help="skip the randomized-classifier and shuffled controls")
    g.add_argument("--seed", type=int, default=0, help="seed of the controls (default: 0)")
    g = p.add_argument_group("run")
    add_shared(g, "--device")
    g.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: 16)")
    add_shared(p, "--quiet", "--out")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``traitloc audit`` from parsed arguments; returns the exit status.

    Bad input raises :class:`traitloc.pipelines.options.CliError` (one line; ``traitloc`` prints it and exits with 2).
    """
    from traitloc.data.cub import CUB
    from traitloc.io.files import utc_now
    from traitloc.models.backbones import CallableError
    from traitloc.models.probes import ProbeError
    from traitloc.pipelines.options import cli_errors, pretrained_tag, report_counts

    start = utc_now()
    with cli_errors(ValueError, FileNotFoundError):
        settings = AuditSettings(
            split=args.split, top_attributes=args.top_attributes, sources=tuple(args.attribute_maps),
            similar=args.similar, gamma=args.gamma, clip_gamma=args.clip_gamma, base=args.base,
            sigma_scale=args.sigma_scale, pointing_tolerance=args.pointing_tolerance, controls=not args.no_controls,
            limit=args.limit, batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
        )  # fmt: skip
        if settings.sigma_scale <= 0:
            raise ValueError("--sigma-scale must be > 0")
        cub = CUB(args.cub_root)
        cub.attribute_names, cub.class_attributes  # noqa: B018 - fail fast on missing attribute files
        cub.part_locations  # noqa: B018
    with cli_errors(ProbeError, CallableError, ValueError, FileNotFoundError, prefix=f"--probe {args.probe}: "):
        clf = load_probe_classifier(args.probe, args.backbone, args.device)
    with cli_errors(ValueError, prefix=f"--probe {args.probe}: its classes must be CUB classes: "):
        [cub.class_id(n) for n in clf.class_names]
    localizer = None
    run_info: dict[str, Any] = {"command": "audit", "argv": list(argv), "start_utc": start, "device": str(clf.device)}
    if "clip" in settings.sources:
        from traitloc.models.clip import load_clip
        from traitloc.models.localize import ConceptLocalizer

        pretrained = pretrained_tag(args.pretrained)
        bundle = load_clip(args.model, pretrained, args.device)
        localizer = ConceptLocalizer(bundle)
        run_info["clip"] = {**bundle.describe(), "base": settings.base, "gamma": settings.clip_gamma}
    with cli_errors(ValueError):
        res = run_audit(cub, clf, args.out, settings, localizer=localizer, run_info=run_info)
    status = report_counts("audit", res["counts"], args.out, args.quiet, seconds=res["seconds"])
    if not args.quiet:
        for key, h in res["headline"].items():
            print(
                f"  {key}: real / random classifier / shuffled attribute: energy_inside {h['energy_inside']} / "
                f"{h['random_classifier_energy_inside']} / {h['shuffled_attribute_energy_inside']}; pointing_hit "
                f"{h['pointing_hit']} / {h['random_classifier_pointing_hit']} / {h['shuffled_attribute_pointing_hit']}"
                f"; bird_lift {h['bird_lift']} / {h['random_classifier_bird_lift']} / "
                f"{h['shuffled_attribute_bird_lift']}",
                file=sys.stderr,
            )
    return status
