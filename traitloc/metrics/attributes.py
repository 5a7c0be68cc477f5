r"""Reference maps of CUB attributes: which attributes separate two classes, and where they are on a photo.

``traitloc audit`` compares a classifier's map with maps of the attributes that differ most between the true class
and its most similar class; ``traitloc evaluate-text`` scores text queries against the same part regions. Both
are built here from CUB's annotations alone (the class-attribute matrix, the part keypoints and the bird's box):

* :func:`attribute_differences`: the top-k attributes by ``|a_c - a_d|`` (signed) of the class-attribute matrix.
* :func:`parts_attribute_map`: an isotropic Gaussian on the visible keypoints of the attribute's parts
  (:math:`\sigma = 0.1 \sqrt{w h}` of the bird's box, :func:`parts_sigma`), with the discs of radius sigma around
  them as region; :func:`box_attribute_map` for whole-bird attributes (no part): a Gaussian bump on the box.

The maps are the *references* the overlap metrics of :mod:`traitloc.metrics.maps` score against, so they live in
``metrics`` (NumPy only; they use :func:`~traitloc.metrics.maps.box_mask`, which ``data`` may not import).
The protocol is in ``docs/audit.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from traitloc.metrics.maps import box_mask

__all__ = [
    "AttributeDifference",
    "AttributeMap",
    "attribute_differences",
    "box_attribute_map",
    "parts_attribute_map",
    "parts_sigma",
]


class AttributeDifference(NamedTuple):
    """One attribute that separates two classes.

    Attributes
    ----------
    index : 0-based column of the class-attribute matrix (CUB ``attribute_id - 1``).
    difference : ``a[target] - a[similar]`` in the matrix's units (percent for CUB).
    sign : ``+1`` when the target has the attribute more, ``-1`` when the similar class does.
    """

    index: int  # type: ignore[assignment]  # a public field name that shadows tuple.index on purpose
    difference: float
    sign: int


def attribute_differences(class_attributes: Any, target: int, similar: int, k: int = 3) -> list[AttributeDifference]:
    """The ``k`` attributes whose values differ most between two classes, signed.

    Parameters
    ----------
    class_attributes : (n_classes, n_attributes) array, e.g. :attr:`traitloc.data.cub.CUB.class_attributes` (percent).
    target, similar : 0-based row indices (:meth:`traitloc.data.cub.CUB.class_index`).
    k : how many attributes, >= 1. Fewer come back when fewer attributes differ at all.

    Returns
    -------
    list of AttributeDifference
        By decreasing ``|difference|``; ties in attribute order (stable).
    """
    a = np.asarray(class_attributes.detach().cpu() if hasattr(class_attributes, "detach") else class_attributes)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"class_attributes must be a numeric (n_classes, n_attributes) array, got shape {a.shape}")
    for name, v in (("target", target), ("similar", similar)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < a.shape[0]:
            raise ValueError(f"{name} must be a class row index in [0, {a.shape[0]}), got {v!r}")
    if int(target) == int(similar):
        raise ValueError(f"target and similar are the same class ({int(target)})")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    diff = a[int(target)].astype(np.float64) - a[int(similar)].astype(np.float64)
    if not np.isfinite(diff).all():
        raise ValueError("class_attributes contains NaN or infinite values for these classes")
    order = np.argsort(-np.abs(diff), kind="stable")
    out = []
    for j in order[: int(k)]:
        if diff[j] == 0:
            break
        out.append(AttributeDifference(int(j), float(diff[j]), 1 if diff[j] > 0 else -1))
    return out


@dataclass
class AttributeMap:
    """An attribute map on the original image, with the region its energy is measured in.

    Attributes
    ----------
    values : (H, W) float64 map.
    region : (H, W) bool attribute region (discs around the keypoints, the box, or the map's top-10%).
    source : ``"parts"`` or ``"clip"``.
    info : ``visible_parts`` (names), ``sigma_px`` for parts maps; ``prompt`` for clip maps.
    """

    values: NDArray[np.float64]
    region: NDArray[np.bool_]
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"shape must be a pair of positive integers (H, W), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4 or not all(isinstance(v, (int, float, np.integer, np.floating)) for v in box):
        raise ValueError(f"box must be (x, y, width, height), got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"box must be finite with positive width and height, got {box!r}")
    return x, y, w, h


def parts_sigma(box: Sequence[float], scale: float = 0.1) -> float:
    r"""Gaussian width of a parts map: :math:`\sigma = \mathrm{scale}\cdot\sqrt{w h}` of the bounding box (pixels)."""
    _, _, w, h = _check_box(box)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"sigma scale must be a positive number, got {scale!r}")
    return float(scale) * math.sqrt(w * h)


def box_attribute_map(shape: tuple[int, int], box: Sequence[float]) -> AttributeMap:
    """Map of a whole-bird attribute: a Gaussian bump centred on the box (sigmas w/4, h/4), zero outside it.

    The region is the box (:func:`~traitloc.metrics.maps.box_mask`).
    """
    H, W = _check_shape(shape)
    x, y, w, h = _check_box(box)
    region = box_mask((H, W), x, y, w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    gx = np.exp(-0.5 * ((np.arange(W) - cx) / (w / 4.0)) ** 2)  # pixel (i, j) at (x, y) = (j, i), as keypoints
    gy = np.exp(-0.5 * ((np.arange(H) - cy) / (h / 4.0)) ** 2)
    values = np.where(region, gy[:, None] * gx[None, :], 0.0)
    return AttributeMap(values, region, "parts", {"visible_parts": [], "sigma_px": None, "whole_bird": True})


def _keypoints(part_locs: Any) -> dict[str, tuple[float, float, bool]]:
    """``part -> (x, y, visible)`` from a :meth:`CUB.part_locs` frame or a mapping."""
    if hasattr(part_locs, "columns"):  # a pandas DataFrame (metrics does not import pandas)
        missing = {"part", "x", "y", "visible"} - set(part_locs.columns)
        if missing:
            raise ValueError(f"part_locs lacks columns {sorted(missing)}")
        return {
            str(p): (float(x), float(y), bool(v))
            for p, x, y, v in zip(part_locs["part"], part_locs["x"], part_locs["y"], part_locs["visible"], strict=True)
        }
    if isinstance(part_locs, Mapping):
        out = {}
        for p, t in part_locs.items():
            if len(t) != 3:
                raise ValueError(f"keypoint {p!r} must be (x, y, visible), got {t!r}")
            out[str(p)] = (float(t[0]), float(t[1]), bool(t[2]))
        return out
    raise TypeError(f"part_locs must be a DataFrame (CUB.part_locs) or a mapping, got {type(part_locs).__name__}")


def parts_attribute_map(
    shape: tuple[int, int],
    part_locs: Any,
    parts: Sequence[str],
    box: Sequence[float],
    *,
    sigma_scale: float = 0.1,
    region_radius: float = 1.0,
) -> AttributeMap | None:
    r"""Expert-grounded attribute map from CUB part keypoints.

    .. math:: M(p) = \max_{k \in K_{vis}} \exp\!\Big(-\frac{\lVert p - k\rVert^2}{2\sigma^2}\Big),
              \qquad \sigma = \mathrm{sigma\_scale}\,\sqrt{w_{box} h_{box}}

    over the visible keypoints :math:`K_{vis}` of ``parts``; pixel ``(row i, column j)`` sits at ``(x, y) = (j, i)``
    in CUB's keypoint coordinates. The region is the union of the discs of radius ``region_radius * sigma``
    around those keypoints. ``parts == ()`` (a whole-bird attribute) gives :func:`box_attribute_map`.

    Parameters
    ----------
    shape : (H, W) of the original image.
    part_locs : :meth:`traitloc.data.cub.CUB.part_locs` of the image, or a mapping ``part -> (x, y, visible)``.
    parts : the attribute's parts (:func:`traitloc.data.traits.attribute_parts`).
    box : the bird's bounding box ``(x, y, width, height)``.
    sigma_scale : sigma as a fraction of ``sqrt(box area)``.
    region_radius : radius of the region's discs, in sigmas.

    Returns
    -------
    AttributeMap, or None when no keypoint of ``parts`` is visible.
    """
    H, W = _check_shape(shape)
    if isinstance(parts, str):
        parts = (parts,)
    if not parts:
        return box_attribute_map((H, W), box)
    if not (isinstance(region_radius, (int, float)) and math.isfinite(region_radius) and region_radius > 0):
        raise ValueError(f"region_radius must be a positive number, got {region_radius!r}")
    sigma = parts_sigma(box, sigma_scale)
    kp = _keypoints(part_locs)
    unknown = [p for p in parts if p not in kp]
    if unknown:
        raise ValueError(f"no keypoint for part(s) {unknown}; known parts: {', '.join(sorted(kp))}")
    visible = [p for p in parts if kp[p][2]]
    if not visible:
        return None
    xs = np.arange(W, dtype=np.float64)
    ys = np.arange(H, dtype=np.float64)
    d2 = np.full((H, W), np.inf)
    for p in visible:
        x, y, _ = kp[p]
        d2 = np.minimum(d2, (ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2)
    values = np.exp(-d2 / (2.0 * sigma**2))
    region = d2 <= (region_radius * sigma) ** 2
    if not region.any():  # keypoint(s) far outside the image: keep the nearest pixel so the region is defined
        region = d2 <= d2.min()
    return AttributeMap(values, region, "parts", {"visible_parts": visible, "sigma_px": sigma, "whole_bird": False})
