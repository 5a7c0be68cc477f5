"""Metrics for saliency maps: overlap with regions and other maps, and faithfulness to a classifier.

*Overlap* (``traitloc audit``): :func:`top_fraction_mask`, :func:`iou`, :func:`dice`, :func:`iou_top`,
:func:`dice_top`, :func:`pearson`, :func:`spearman`, :func:`energy_inside`, :func:`pointing_hit`, :func:`box_mask`,
:func:`overlap_scores`. *Faithfulness* (``traitloc evaluate``): :func:`remove_top_pixels`,
:func:`relative_confidence_drop`, :func:`deletion_auc`, :func:`insertion_auc` and their curves. The protocol (pixel
ranking, top fraction, removed pixels, confidences, RD, deletion/insertion) and the references:
``docs/evaluate.md`` ("The metric functions").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

__all__ = [
    "box_mask",
    "deletion_auc",
    "deletion_curve",
    "dice",
    "dice_top",
    "energy_inside",
    "gaussian_blur",
    "insertion_auc",
    "insertion_curve",
    "iou",
    "iou_top",
    "overlap_scores",
    "pearson",
    "pointing_hit",
    "relative_confidence_drop",
    "remove_top_pixels",
    "ScoredMap",
    "spearman",
    "top_fraction_mask",
]

ArrayOrTensor: TypeAlias = "np.ndarray | torch.Tensor"
Baseline: TypeAlias = "Literal['zero', 'blur'] | float | torch.Tensor"
Model: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
Classes: TypeAlias = "int | Sequence[int] | np.ndarray | torch.Tensor"


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _to_numpy(a: object, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")


def _map2d(a: object, name: str = "map2d") -> NDArray[np.float64]:
    arr = _to_numpy(a, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real-valued (bool, int or float), got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _mask2d(a: object, name: str) -> NDArray[np.bool_]:
    arr = _to_numpy(a, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D boolean mask (H, W), got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must have a boolean dtype, got {arr.dtype}")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _check_fraction(fraction: float, name: str = "fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {fraction!r}")
    f = float(fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
    return f


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _top_count(fraction: float, n: int) -> int:
    """Number of pixels in the top ``fraction`` of ``n``: ``floor(fraction * n + 0.5)``."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def _ranking(values: NDArray[np.float64]) -> NDArray[np.intp]:
    """Pixel order, highest value first, ties in raster order; ``values`` is (..., n)."""
    return np.argsort(-values, axis=-1, kind="stable")


# ----------------------------------------------------------------------------------------------------------
# overlap metrics
# ----------------------------------------------------------------------------------------------------------
def top_fraction_mask(map2d: ArrayOrTensor, fraction: float = 0.10) -> NDArray[np.bool_]:
    r"""Mask of the top ``fraction`` of a map's pixels.

    .. math:: M = \{\text{first } \min(k, n_{>\min}) \text{ pixels of the ranking}\},\quad
              k = \lfloor f n + 0.5 \rfloor

    Pixels are ranked by value, highest first, ties in raster (row-major) order. Pixels equal to the map's
    minimum are never selected, so a constant map gives an empty mask (not an arbitrary block), and a map
    with fewer than k pixels above its minimum gives exactly those pixels.

    Parameters
    ----------
    map2d : ndarray or Tensor, shape (H, W)
        Saliency map (finite values).
    fraction : float, default 0.10
        Fraction f in [0, 1] of the H*W pixels to select.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    values = _map2d(map2d)
    f = _check_fraction(fraction)
    flat = values.ravel()
    k = min(_top_count(f, flat.size), int(np.count_nonzero(flat > flat.min())))
    mask = np.zeros(flat.size, dtype=bool)
    if k > 0:  # the ranking's first k pixels in O(n): the k-th largest value by a partition, its ties in raster order
        thr = np.partition(flat, flat.size - k)[flat.size - k]
        mask = flat > thr
        mask[np.flatnonzero(flat == thr)[: k - int(np.count_nonzero(mask))]] = True
    return mask.reshape(values.shape)


def iou(a: ArrayOrTensor, b: ArrayOrTensor) -> float:
    r"""Intersection over union (Jaccard index) of two boolean masks.

    .. math:: \mathrm{IoU}(A, B) = \frac{|A \cap B|}{|A \cup B|}

    Returns ``nan`` when both masks are empty (the ratio is 0/0); 0.0 when exactly one is empty.

    Parameters
    ----------
    a, b : ndarray or Tensor of bool, shape (H, W)

    Returns
    -------
    float
    """
    ma, mb = _mask2d(a, "a"), _mask2d(b, "b")
    _same_shape(ma, mb, "a", "b")
    union = int(np.count_nonzero(ma | mb))
    if union == 0:
        return float("nan")
    return int(np.count_nonzero(ma & mb)) / union


def dice(a: ArrayOrTensor, b: ArrayOrTensor) -> float:
    r"""Dice coefficient (F1 overlap) of two boolean masks.

    .. math:: \mathrm{Dice}(A, B) = \frac{2 |A \cap B|}{|A| + |B|} = \frac{2\,\mathrm{IoU}}{1 + \mathrm{IoU}}

    Returns ``nan`` when both masks are empty (0/0); 0.0 when exactly one is empty.

    Parameters
    ----------
    a, b : ndarray or Tensor of bool, shape (H, W)

    Returns
    -------
    float
    """
    ma, mb = _mask2d(a, "a"), _mask2d(b, "b")
    _same_shape(ma, mb, "a", "b")
    total = int(np.count_nonzero(ma)) + int(np.count_nonzero(mb))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(ma & mb)) / total


def iou_top(map_a: ArrayOrTensor, map_b: ArrayOrTensor, fraction: float = 0.10) -> float:
    """IoU of the top-``fraction`` masks of two maps (:func:`top_fraction_mask`, then :func:`iou`).

    Two constant maps give ``nan``; one constant map gives 0.0.

    Parameters
    ----------
    map_a, map_b : ndarray or Tensor, shape (H, W)
    fraction : float, default 0.10

    Returns
    -------
    float
    """
    a, b = _map2d(map_a, "map_a"), _map2d(map_b, "map_b")
    _same_shape(a, b, "map_a", "map_b")
    return iou(top_fraction_mask(a, fraction), top_fraction_mask(b, fraction))


def dice_top(map_a: ArrayOrTensor, map_b: ArrayOrTensor, fraction: float = 0.10) -> float:
    """Dice of the top-``fraction`` masks of two maps (:func:`top_fraction_mask`, then :func:`dice`).

    Two constant maps give ``nan``; one constant map gives 0.0.

    Parameters
    ----------
    map_a, map_b : ndarray or Tensor, shape (H, W)
    fraction : float, default 0.10

    Returns
    -------
    float
    """
    a, b = _map2d(map_a, "map_a"), _map2d(map_b, "map_b")
    _same_shape(a, b, "map_a", "map_b")
    return dice(top_fraction_mask(a, fraction), top_fraction_mask(b, fraction))


def _pearson_flat(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    da, db = a - a.mean(), b - b.mean()
    na, nb = math.sqrt(float(np.dot(da, da))), math.sqrt(float(np.dot(db, db)))
    if na == 0.0 or nb == 0.0:
        return float("nan")
    r = float(np.dot(da, db)) / (na * nb)
    return max(-1.0, min(1.0, r))


def _rank_average(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ranks 1..n of a 1-D array, tied values sharing the mean of their ranks."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(a: ArrayOrTensor, b: ArrayOrTensor) -> float:
    r"""Pearson correlation of two maps over all pixels.

    .. math:: r = \frac{\sum_i (a_i - \bar a)(b_i - \bar b)}
                       {\sqrt{\sum_i (a_i - \bar a)^2}\sqrt{\sum_i (b_i - \bar b)^2}}

    Returns ``nan`` when either map is constant.

    Parameters
    ----------
    a, b : ndarray or Tensor, shape (H, W)

    Returns
    -------
    float
    """
    xa, xb = _map2d(a, "a"), _map2d(b, "b")
    _same_shape(xa, xb, "a", "b")
    return _pearson_flat(xa.ravel(), xb.ravel())


def spearman(a: ArrayOrTensor, b: ArrayOrTensor) -> float:
    r"""Spearman rank correlation of two maps over all pixels.

    .. math:: \rho = r\big(\operatorname{rank}(a), \operatorname{rank}(b)\big)

    the Pearson correlation of the ranks, tied values receiving the average of their ranks (as
    ``scipy.stats.spearmanr``). Returns ``nan`` when either map is constant.

    Parameters
    ----------
    a, b : ndarray or Tensor, shape (H, W)

    Returns
    -------
    float
    """
    xa, xb = _map2d(a, "a"), _map2d(b, "b")
    _same_shape(xa, xb, "a", "b")
    return _pearson_flat(_rank_average(xa.ravel()), _rank_average(xb.ravel()))


def energy_inside(map2d: ArrayOrTensor, region: ArrayOrTensor) -> float:
    r"""Share of a map's positive energy that falls inside a region (energy-based pointing game).

    .. math:: E = \frac{\sum_{i \in R} \max(m_i, 0)}{\sum_i \max(m_i, 0)}

    From Score-CAM (Wang et al., CVPR-W 2020). Negative values (of a signed map) are ignored. Returns
    ``nan`` when the map has no positive value (0/0).

    Parameters
    ----------
    map2d : ndarray or Tensor, shape (H, W)
    region : ndarray or Tensor of bool, shape (H, W)
        The region R, e.g. a bounding box from :func:`box_mask`.

    Returns
    -------
    float in [0, 1] or nan
    """
    values = _map2d(map2d)
    mask = _mask2d(region, "region")
    _same_shape(values, mask, "map2d", "region")
    positive = np.maximum(values, 0.0)
    total = float(positive.sum())
    if total == 0.0:
        return float("nan")
    return min(1.0, float(positive[mask].sum()) / total)


def pointing_hit(map2d: ArrayOrTensor, region: ArrayOrTensor, tolerance_px: float = 15.0) -> bool:
    r"""Whether the map's maximum falls in the region dilated by ``tolerance_px`` (pointing game).

    .. math:: \mathrm{hit} = \min_{q \in R} \lVert p^* - q \rVert_2 \le \tau,\quad
              p^* = \text{first } \arg\max_p m_p \text{ in raster order}

    Pointing game of Zhang et al. (ECCV 2016, 15 px tolerance). Distances are Euclidean between pixel
    indices, i.e. the region is dilated by a disk of radius tau. A constant map points nowhere and gives
    ``False``.

    Parameters
    ----------
    map2d : ndarray or Tensor, shape (H, W)
    region : ndarray or Tensor of bool, shape (H, W)
        The region R; must not be empty.
    tolerance_px : float, default 15
        Tolerance tau in pixels, >= 0.

    Returns
    -------
    bool
    """
    values = _map2d(map2d)
    mask = _mask2d(region, "region")
    _same_shape(values, mask, "map2d", "region")
    if isinstance(tolerance_px, bool) or not isinstance(tolerance_px, (int, float, np.integer, np.floating)):
        raise TypeError(f"tolerance_px must be a number >= 0, got {tolerance_px!r}")
    if not (tolerance_px >= 0 and math.isfinite(tolerance_px)):
        raise ValueError(f"tolerance_px must be a finite number >= 0, got {tolerance_px!r}")
    if not mask.any():
        raise ValueError("region is empty: the pointing game is undefined")
    if values.max() == values.min():
        return False
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    rows, cols = np.nonzero(mask)
    dist2 = (rows - row) ** 2 + (cols - col) ** 2
    return bool(dist2.min() <= float(tolerance_px) ** 2)


class ScoredMap:
    """A map prepared once for many comparisons: its top-fraction mask and its centred, normalized values and ranks.

    Comparisons give exactly :func:`iou_top`, :func:`dice_top`, :func:`pearson` and :func:`spearman` (up to float
    rounding) without sorting a map again for every pair it takes part in (``traitloc audit`` compares each map
    with several others).

    Parameters
    ----------
    values : ndarray or Tensor, shape (H, W)
        The map (finite values).
    fraction : float, default 0.10
        The top fraction of :attr:`top` (:func:`top_fraction_mask`).
    """

    def __init__(self, values: ArrayOrTensor, fraction: float = 0.10):
        v = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
        if v.ndim != 2 or v.size == 0:
            raise ValueError(f"a map must be a non-empty 2-D array, got shape {v.shape}")
        self.values = v.astype(np.float64, copy=False)
        if not np.isfinite(self.values).all():
            raise ValueError("map contains NaN or infinite values")
        self.top = top_fraction_mask(self.values, fraction)
        self.constant = bool(self.values.max() == self.values.min())
        self._v = self._unit(self.values.ravel())
        self._r = None if self.constant else self._unit(_rank_average(self.values.ravel()))

    @staticmethod
    def _unit(a: NDArray[np.float64]) -> NDArray[np.float64] | None:
        d = a - a.mean()
        n = math.sqrt(float(np.dot(d, d)))
        return None if n == 0.0 else d / n

    @staticmethod
    def _corr(a: NDArray[np.float64] | None, b: NDArray[np.float64] | None) -> float:
        if a is None or b is None:
            return float("nan")
        return max(-1.0, min(1.0, float(np.dot(a, b))))

    def pearson(self, other: ScoredMap) -> float:
        """:func:`pearson` of the two maps (``nan`` when either is constant)."""
        return self._corr(self._v, other._v)

    def spearman(self, other: ScoredMap) -> float:
        """:func:`spearman` of the two maps (``nan`` when either is constant)."""
        return self._corr(self._r, other._r)


def overlap_scores(
    map_a: ScoredMap | ArrayOrTensor,
    map_b: ScoredMap | ArrayOrTensor,
    region: NDArray[np.bool_],
    *,
    fraction: float = 0.10,
    pointing_tolerance: float = 15.0,
) -> dict[str, float]:
    """All overlap scores of a map (e.g. a classifier's) against a reference map and the reference's region.

    Parameters
    ----------
    map_a, map_b : (H, W) maps (or :class:`ScoredMap` prepared with the same ``fraction``); ``energy_inside`` and
        ``pointing_hit`` are those of ``map_a``.
    region : (H, W) bool region of ``map_b`` (for ``energy_inside`` and ``pointing_hit``).
    fraction : top fraction for ``iou_top10`` / ``dice_top10``.
    pointing_tolerance : pointing-game tolerance in pixels.

    Returns
    -------
    dict
        ``iou_top10, dice_top10, pearson, spearman, energy_inside, pointing_hit`` (1.0 / 0.0; NaN for an empty
        region), ``area_share`` (region pixels / image pixels) and ``lift`` (``energy_inside / area_share``).
        Undefined values (a constant map, an empty region) are NaN.
    """
    c = map_a if isinstance(map_a, ScoredMap) else ScoredMap(map_a, fraction)
    a = map_b if isinstance(map_b, ScoredMap) else ScoredMap(map_b, fraction)
    r = np.asarray(region)
    if r.dtype != np.bool_ or r.shape != c.values.shape or a.values.shape != c.values.shape:
        raise ValueError(
            f"maps and region must share one (H, W) shape (region boolean): map_a {c.values.shape}, "
            f"map_b {a.values.shape}, region {r.shape} {r.dtype}"
        )
    area = float(r.mean())
    e = energy_inside(c.values, r) if r.any() else float("nan")
    hit = float(pointing_hit(c.values, r, pointing_tolerance)) if r.any() else float("nan")
    return {
        "iou_top10": iou(c.top, a.top),
        "dice_top10": dice(c.top, a.top),
        "pearson": c.pearson(a),
        "spearman": c.spearman(a),
        "energy_inside": e,
        "pointing_hit": hit,
        "area_share": area,
        "lift": e / area if area > 0 and math.isfinite(e) else float("nan"),
    }


def box_mask(shape: tuple[int, int], x: float, y: float, w: float, h: float) -> NDArray[np.bool_]:
    """Boolean mask of a CUB-style bounding box.

    CUB-200-2011 ``bounding_boxes.txt`` gives ``x, y, width, height`` in pixels of the original image, with
    0-based x (column) and y (row) of the top-left corner. The box covers the continuous rectangle
    ``[x, x + w) x [y, y + h)``; every pixel it overlaps is set, i.e. columns ``floor(x) .. ceil(x + w) - 1``
    and rows ``floor(y) .. ceil(y + h) - 1``, clipped to the image (a box outside the image gives an empty
    mask; a zero-width box gives an empty mask).

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the image.
    x, y, w, h : float
        Box position and size in pixels; w, h >= 0.

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise ValueError(f"shape must be a pair of positive integers (H, W), got {shape!r}")
    for name, v in (("x", x), ("y", y), ("w", w), ("h", h)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if w < 0 or h < 0:
        raise ValueError(f"box width and height must be >= 0, got w={w!r}, h={h!r}")
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), dtype=bool)
    if w == 0 or h == 0:
        return mask
    c0, c1 = max(0, math.floor(x)), min(width, math.ceil(x + w))
    r0, r1 = max(0, math.floor(y)), min(height, math.ceil(y + h))
    if c0 < c1 and r0 < r1:
        mask[r0:r1, c0:c1] = True
    return mask


# ----------------------------------------------------------------------------------------------------------
# faithfulness metrics
# ----------------------------------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    r"""Separable Gaussian blur of an image or batch, with replicated edges.

    .. math:: g(t) \propto \exp\!\left(-\frac{t^2}{2\sigma^2}\right),\quad
              |t| \le \lfloor \mathrm{truncate}\,\sigma + 0.5 \rfloor,\ \sum_t g(t) = 1

    applied along rows then columns of every channel; equal to
    ``scipy.ndimage.gaussian_filter(x, (0, sigma, sigma), mode="nearest", truncate=truncate)`` per image.

    Parameters
    ----------
    x : Tensor, shape (C, H, W) or (N, C, H, W), floating
    sigma : float
        Standard deviation in pixels, > 0.
    truncate : float, default 4.0
        Kernel radius in units of sigma.

    Returns
    -------
    Tensor, same shape, dtype and device as ``x``
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        raise ValueError("x must be a floating tensor of shape (C, H, W) or (N, C, H, W)")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(truncate, bool) or not isinstance(truncate, (int, float)) or not truncate > 0:
        raise ValueError(f"truncate must be a number > 0, got {truncate!r}")
    single = x.dim() == 3
    xb = x.unsqueeze(0) if single else x
    n, c, hh, ww = xb.shape
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    kernel = (kernel / kernel.sum()).to(dtype=xb.dtype, device=xb.device)
    flat = xb.reshape(n * c, 1, hh, ww)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    out = flat.reshape(n, c, hh, ww)
    return out[0] if single else out


def _as_batch(x: torch.Tensor, saliency: ArrayOrTensor) -> tuple[torch.Tensor, NDArray[np.float64], bool]:
    """Validate an image (C,H,W) + map (H,W) or a batch (N,C,H,W) + maps (N,H,W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (normalized image), got dtype {x.dtype}")
    single = x.dim() == 3
    xb = x.unsqueeze(0) if single else x
    if xb.shape[0] == 0:
        raise ValueError("x must contain at least one image")
    maps = _to_numpy(saliency, "saliency")
    expected = tuple(xb.shape[-2:]) if single else (xb.shape[0], *xb.shape[-2:])
    if tuple(maps.shape) != expected:
        raise ValueError(f"saliency must have shape {expected} to match x {tuple(x.shape)}, got {tuple(maps.shape)}")
    if maps.dtype.kind not in "biuf":
        raise TypeError(f"saliency must be real-valued, got dtype {maps.dtype}")
    maps = maps.astype(np.float64).reshape(xb.shape[0], -1)
    if not np.all(np.isfinite(maps)):
        raise ValueError("saliency contains NaN or infinite values")
    return xb, maps, single


def _as_classes(c: Classes, n: int, single: bool, name: str) -> NDArray[np.int64]:
    """Per-image class indices: an int (broadcast), or a sequence of n ints for a batch."""
    if isinstance(c, torch.Tensor):
        c = c.detach().cpu().numpy()
    arr = np.asarray(c)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer class index or a sequence of them, got {c!r}")
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    elif single:
        raise ValueError(f"{name} must be a single integer for a single image, got shape {arr.shape}")
    elif arr.shape != (n,):
        raise ValueError(f"{name} must be an int or have length {n} (one per image), got shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative class indices, got {arr.tolist()}")
    return arr.astype(np.int64)


def _fill_values(baseline: Baseline, xb: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """The values a replaced pixel takes, expanded to ``xb``'s shape (a view where possible)."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros((), dtype=xb.dtype, device=xb.device).expand_as(xb)
        if baseline == "blur":
            return gaussian_blur(xb, blur_sigma)
        raise ValueError(f"baseline must be 'zero', 'blur', a number or a tensor, got {baseline!r}")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise ValueError(f"baseline must be finite, got {baseline!r}")
        return torch.full((), float(baseline), dtype=xb.dtype, device=xb.device).expand_as(xb)
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"baseline must be 'zero', 'blur', a number or a tensor, got {type(baseline).__name__}")
    b = baseline.to(dtype=xb.dtype, device=xb.device)
    if b.dim() == 1:
        b = b.view(1, -1, 1, 1)  # one value per channel
    try:
        return b.expand_as(xb)
    except RuntimeError:
        raise ValueError(
            f"baseline tensor of shape {tuple(baseline.shape)} cannot be broadcast to the images {tuple(xb.shape)}"
        ) from None


def _rank_positions(maps: NDArray[np.float64], device: torch.device) -> torch.Tensor:
    """(N, n) rank position of each pixel (0 = highest), ties in raster order."""
    order = _ranking(maps)
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(maps.shape[1]), maps.shape), axis=1)
    return torch.from_numpy(pos.astype(np.int64)).to(device)


def _masked_probs(
    model: Model,
    replaced: torch.Tensor,
    kept: torch.Tensor,
    ranks: torch.Tensor,
    job_image: NDArray[np.int64],
    job_k: NDArray[np.int64],
    batch_size: int,
) -> NDArray[np.float64]:
    """Softmax probabilities (J, K) for the jobs: image i with its first k ranked pixels from ``replaced``."""
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn("model is in training mode; call model.eval() for deterministic metrics", stacklevel=3)
    _, _, hh, ww = kept.shape
    device = kept.device
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(job_image), batch_size):
            img = torch.from_numpy(job_image[start : start + batch_size]).to(device)
            k = torch.from_numpy(job_k[start : start + batch_size]).to(device)
            mask = (ranks[img] < k[:, None]).view(-1, 1, hh, ww)
            inputs = torch.where(mask, replaced[img], kept[img])
            logits = model(inputs)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"model must return logits of shape ({inputs.shape[0]}, K), got {shape}")
            out.append(torch.softmax(logits.detach().double(), dim=1).cpu().numpy())
    return np.concatenate(out, axis=0)


def _check_class_range(classes: NDArray[np.int64], k: int, name: str) -> None:
    if classes.size and int(classes.max()) >= k:
        raise ValueError(f"{name} has class index {int(classes.max())} but the model returns only {k} logits")


def remove_top_pixels(
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    fraction: float,
    baseline: Baseline = "zero",
    *,
    blur_sigma: float = 5.0,
) -> torch.Tensor:
    r"""Replace the top ``fraction`` of a map's pixels by a baseline.

    .. math:: x^*_{:,p} = \begin{cases} b_{:,p} & p \in \mathrm{top}_f(m) \\ x_{:,p} & \text{otherwise}\end{cases}

    with :math:`\mathrm{top}_f` the rule of :func:`top_fraction_mask` (ties in raster order, pixels at the
    map's minimum never removed, so a constant map removes nothing).

    Parameters
    ----------
    x : Tensor, shape (C, H, W) or (N, C, H, W)
        Normalized image(s).
    saliency : ndarray or Tensor, shape (H, W) or (N, H, W)
        Map(s) at input resolution.
    fraction : float
        Fraction f in [0, 1] of the pixels to remove.
    baseline : {'zero', 'blur'}, float or Tensor, default 'zero'
        What a removed pixel becomes: 'zero' is the dataset mean in normalized space, 'blur' a Gaussian blur
        of the image (``blur_sigma``), a float a constant, a tensor (C,), (C,H,W) or (N,C,H,W) explicit values.
    blur_sigma : float, default 5.0
        Sigma in pixels of the 'blur' baseline.

    Returns
    -------
    Tensor, same shape, dtype and device as ``x``
    """
    xb, maps, single = _as_batch(x, saliency)
    f = _check_fraction(fraction)
    fill = _fill_values(baseline, xb, blur_sigma)
    n_pix = maps.shape[1]
    k = np.minimum(_top_count(f, n_pix), np.count_nonzero(maps > maps.min(axis=1, keepdims=True), axis=1))
    ranks = _rank_positions(maps, xb.device)
    mask = (ranks < torch.from_numpy(k.astype(np.int64)).to(xb.device)[:, None]).view(-1, 1, *xb.shape[-2:])
    out = torch.where(mask, fill, xb)
    return out[0] if single else out


def relative_confidence_drop(
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    d: Classes,
    fractions: Sequence[float] = (0.05, 0.10),
    *,
    baseline: Baseline = "zero",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> dict[float, float] | dict[float, NDArray[np.float64]]:
    r"""Relative confidence drop RD@k of Finer-CAM (Zhang, Gu et al., CVPR 2025).

    .. math:: \mathrm{RD@}f = (p_c - p_c^*) - (p_d - p_d^*)

    with :math:`p = \mathrm{softmax}(\mathrm{model}(x))` over all logits before, and :math:`p^*` after,
    removing the top fraction f of the map (:func:`remove_top_pixels`). A map that points at what separates c
    from d lowers :math:`p_c` more than :math:`p_d`: higher is better. A constant map removes nothing: RD = 0.
    The unperturbed and perturbed images are evaluated together, ``batch_size`` per model call.

    Parameters
    ----------
    model : callable
        Normalized float batch (B, C, H, W) -> logits (B, K); in eval mode.
    x : Tensor, shape (C, H, W) or (N, C, H, W)
    saliency : ndarray or Tensor, shape (H, W) or (N, H, W)
    c, d : int or sequence of int
        Target class and most similar class; for a batch, one per image or an int for all. c != d.
    fractions : sequence of float, default (0.05, 0.10)
        Fractions f in (0, 1] to remove.
    baseline : {'zero', 'blur'}, float or Tensor, default 'zero'
        What a removed pixel becomes (see :func:`remove_top_pixels`).
    blur_sigma : float, default 5.0
    batch_size : int, default 64
        Images per model call.

    Returns
    -------
    dict
        ``{f: RD}``, a float per fraction for one image, an array (N,) per fraction for a batch.
    """
    xb, maps, single = _as_batch(x, saliency)
    n_img, n_pix = maps.shape
    cc = _as_classes(c, n_img, single, "c")
    dd = _as_classes(d, n_img, single, "d")
    if np.any(cc == dd):
        raise ValueError("d must differ from c for every image (RD of a class against itself is 0)")
    if isinstance(fractions, (int, float)) or len(fractions) == 0:
        raise ValueError(f"fractions must be a non-empty sequence of numbers in (0, 1], got {fractions!r}")
    fr = [_check_fraction(f, "fractions") for f in fractions]
    if any(f == 0.0 for f in fr):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)!r}")
    batch_size = _check_positive_int(batch_size, "batch_size")
    fill = _fill_values(baseline, xb, blur_sigma)
    above_min = np.count_nonzero(maps > maps.min(axis=1, keepdims=True), axis=1)
    ks = np.array([[0] + [min(_top_count(f, n_pix), int(a)) for f in fr] for a in above_min], dtype=np.int64)
    job_image = np.repeat(np.arange(n_img, dtype=np.int64), len(fr) + 1)
    probs = _masked_probs(model, fill, xb, _rank_positions(maps, xb.device), job_image, ks.ravel(), batch_size)
    _check_class_range(cc, probs.shape[1], "c")
    _check_class_range(dd, probs.shape[1], "d")
    probs = probs.reshape(n_img, len(fr) + 1, -1)
    rows = np.arange(n_img)
    pc, pd = probs[rows, :, cc], probs[rows, :, dd]  # (N, 1 + F)
    rd = (pc[:, :1] - pc[:, 1:]) - (pd[:, :1] - pd[:, 1:])
    if single:
        return {f: float(rd[0, j]) for j, f in enumerate(fractions)}
    return {f: rd[:, j].copy() for j, f in enumerate(fractions)}


def _curve(
    kind: Literal["deletion", "insertion"],
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    steps: int,
    baseline: Baseline,
    blur_sigma: float,
    batch_size: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64], bool]:
    xb, maps, single = _as_batch(x, saliency)
    n_img, n_pix = maps.shape
    cc = _as_classes(c, n_img, single, "c")
    steps = _check_positive_int(steps, "steps")
    batch_size = _check_positive_int(batch_size, "batch_size")
    fill = _fill_values(baseline, xb, blur_sigma)
    ks = (2 * np.arange(steps + 1, dtype=np.int64) * n_pix + steps) // (2 * steps)  # round(i n / steps)
    job_image = np.repeat(np.arange(n_img, dtype=np.int64), steps + 1)
    job_k = np.tile(ks, n_img)
    replaced, kept = (fill, xb) if kind == "deletion" else (xb, fill)
    probs = _masked_probs(model, replaced, kept, _rank_positions(maps, xb.device), job_image, job_k, batch_size)
    _check_class_range(cc, probs.shape[1], "c")
    curve = probs.reshape(n_img, steps + 1, -1)[np.arange(n_img), :, cc]
    return np.arange(steps + 1, dtype=np.float64) / steps, curve, single


def _auc(kind: Literal["deletion", "insertion"], *args: Any) -> float | NDArray[np.float64]:
    """Trapezoid integral over f in [0, 1] of :func:`_curve`: a float for one image, an array for a batch."""
    f, y, single = _curve(kind, *args)
    auc = ((y[..., 1:] + y[..., :-1]) * 0.5 * np.diff(f)).sum(axis=-1)
    return float(auc[0]) if single else auc


def deletion_curve(
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    steps: int = 20,
    *,
    baseline: Baseline = "zero",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    r"""Deletion curve (RISE): ``p_c`` as the top-ranked pixels are progressively replaced by a baseline.

    .. math:: y_i = \mathrm{softmax}\big(\mathrm{model}(x^{(i)})\big)_c,\quad
              x^{(i)} = x \text{ with its first } \mathrm{round}(i n / S) \text{ ranked pixels set to } b

    Parameters
    ----------
    model, x, saliency, c
        As in :func:`deletion_auc`.
    steps : int, default 20
        Number S of steps; the curve has S + 1 points at f = 0, 1/S, ..., 1.
    baseline, blur_sigma, batch_size
        As in :func:`deletion_auc`.

    Returns
    -------
    fractions : ndarray, shape (S + 1,)
    probabilities : ndarray, shape (S + 1,) for one image or (N, S + 1) for a batch
    """
    f, curve, single = _curve("deletion", model, x, saliency, c, steps, baseline, blur_sigma, batch_size)
    return f, (curve[0] if single else curve)


def insertion_curve(
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    steps: int = 20,
    *,
    baseline: Baseline = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    r"""Insertion curve (RISE): ``p_c`` as the top-ranked pixels are progressively pasted into a blurred copy.

    .. math:: y_i = \mathrm{softmax}\big(\mathrm{model}(x^{(i)})\big)_c,\quad
              x^{(i)} = b \text{ with its first } \mathrm{round}(i n / S) \text{ ranked pixels taken from } x

    Parameters and returns as in :func:`deletion_curve`; ``baseline`` (default ``'blur'``) as in
    :func:`insertion_auc`.
    """
    f, curve, single = _curve("insertion", model, x, saliency, c, steps, baseline, blur_sigma, batch_size)
    return f, (curve[0] if single else curve)


def deletion_auc(
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    steps: int = 20,
    *,
    baseline: Baseline = "zero",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> float | NDArray[np.float64]:
    r"""Deletion AUC (RISE, Petsiuk et al., BMVC 2018): lower is better.

    .. math:: \mathrm{AUC} = \sum_{i=1}^{S} \frac{y_{i-1} + y_i}{2} \cdot \frac{1}{S}

    the trapezoid integral over f in [0, 1] of :func:`deletion_curve`.

    Parameters
    ----------
    model : callable
        Normalized float batch (B, C, H, W) -> logits (B, K); in eval mode.
    x : Tensor, shape (C, H, W) or (N, C, H, W)
    saliency : ndarray or Tensor, shape (H, W) or (N, H, W)
    c : int or sequence of int
        Class whose probability is tracked; for a batch one per image or an int for all.
    steps : int, default 20
    baseline : {'zero', 'blur'}, float or Tensor, default 'zero'
        What a deleted pixel becomes (see :func:`remove_top_pixels`).
    blur_sigma : float, default 5.0
    batch_size : int, default 64
        Perturbed images per model call.

    Returns
    -------
    float for one image, ndarray (N,) for a batch
    """
    return _auc("deletion", model, x, saliency, c, steps, baseline, blur_sigma, batch_size)


def insertion_auc(
    model: Model,
    x: torch.Tensor,
    saliency: ArrayOrTensor,
    c: Classes,
    steps: int = 20,
    *,
    baseline: Baseline = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> float | NDArray[np.float64]:
    r"""Insertion AUC (RISE, Petsiuk et al., BMVC 2018): higher is better.

    The trapezoid integral of :func:`insertion_curve` (the formula of :func:`deletion_auc`), which starts from the
    baseline (default: the image blurred with ``blur_sigma``) and ends at the image.

    Parameters
    ----------
    model, x, saliency, c, steps, batch_size
        As in :func:`deletion_auc`.
    baseline : {'zero', 'blur'}, float or Tensor, default 'blur'
        The canvas the pixels are inserted into.
    blur_sigma : float, default 5.0
        Sigma in pixels of the 'blur' canvas (RISE: 5).

    Returns
    -------
    float for one image, ndarray (N,) for a batch
    """
    return _auc("insertion", model, x, saliency, c, steps, baseline, blur_sigma, batch_size)
