"""Tests for traitloc.metrics.maps: hand-computed cases, independent implementations, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from traitloc.metrics import maps as M

RNG_SEED = 1234


# ----------------------------------------------------------------------------------------------------------
# top_fraction_mask
# ----------------------------------------------------------------------------------------------------------
def test_top_fraction_is_known_square():
    # 10 x 16 = 160 pixels; the top 10 % is 16 pixels: exactly the 4 x 4 square of high values.
    m = np.zeros((10, 16))
    m[3:7, 5:9] = np.arange(16).reshape(4, 4) + 10.0
    m[0, 0] = 1.0  # above the minimum, but below the square
    expected = np.zeros_like(m, dtype=bool)
    expected[3:7, 5:9] = True
    np.testing.assert_array_equal(M.top_fraction_mask(m, 0.10), expected)
    np.testing.assert_array_equal(M.top_fraction_mask(torch.from_numpy(m), 0.10), expected)


def test_top_fraction_ties_break_in_raster_order():
    m = np.zeros((4, 5))
    m[1, :] = 2.0  # five tied pixels; top 20 % of 20 = 4 -> first four in raster order
    m[3, 4] = 1.0
    mask = M.top_fraction_mask(m, 0.20)
    expected = np.zeros_like(mask)
    expected[1, :4] = True
    np.testing.assert_array_equal(mask, expected)
    # with 30 % (k = 6) all five tied pixels plus the next value
    expected = np.zeros_like(mask)
    expected[1, :] = True
    expected[3, 4] = True
    np.testing.assert_array_equal(M.top_fraction_mask(m, 0.30), expected)


def test_top_fraction_constant_map_is_empty_and_minimum_never_selected():
    assert not M.top_fraction_mask(np.full((8, 8), 3.5), 0.5).any()
    m = np.zeros((10, 10))
    m[2, 3] = 1.0
    m[7, 7] = 0.5
    mask = M.top_fraction_mask(m, 0.10)  # k = 10, but only 2 pixels are above the minimum
    assert mask.sum() == 2 and mask[2, 3] and mask[7, 7]
    assert not M.top_fraction_mask(m, 0.0).any()


def test_top_fraction_properties_random():
    rng = np.random.default_rng(RNG_SEED)
    m = rng.normal(size=(23, 31))
    for f in (0.01, 0.1, 0.37, 1.0):
        mask = M.top_fraction_mask(m, f)
        k = math.floor(f * m.size + 0.5)
        assert mask.sum() == min(k, m.size - 1)  # the single minimum pixel is excluded
        if 0 < mask.sum() < m.size:
            assert m[mask].min() > m[~mask].max()
        # invariant under strictly increasing transforms
        np.testing.assert_array_equal(M.top_fraction_mask(np.exp(m) * 3 + 1, f), mask)


# ----------------------------------------------------------------------------------------------------------
# iou / dice
# ----------------------------------------------------------------------------------------------------------
def test_iou_dice_known_masks():
    a = np.zeros((6, 6), dtype=bool)
    b = np.zeros((6, 6), dtype=bool)
    a[0:2, 0:2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert M.iou(a, b) == pytest.approx(1 / 7)
    assert M.dice(a, b) == pytest.approx(2 * 1 / 8)
    assert M.iou(a, a) == 1.0 and M.dice(a, a) == 1.0
    empty = np.zeros_like(a)
    assert M.iou(a, empty) == 0.0 and M.dice(a, empty) == 0.0
    assert math.isnan(M.iou(empty, empty)) and math.isnan(M.dice(empty, empty))


def test_iou_dice_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(5):
        a = rng.random((12, 9)) < 0.3
        b = rng.random((12, 9)) < 0.5
        assert M.iou(a, b) == pytest.approx(skm.jaccard_score(a.ravel(), b.ravel()))
        assert M.dice(a, b) == pytest.approx(skm.f1_score(a.ravel(), b.ravel()))
        j = M.iou(a, b)
        assert M.dice(a, b) == pytest.approx(2 * j / (1 + j))


def test_iou_top_dice_top():
    m1 = np.zeros((10, 16))
    m1[3:7, 5:9] = 5.0
    m2 = np.zeros((10, 16))
    m2[3:7, 7:11] = 5.0  # half of the square shifted: 8 of 16 shared
    assert M.iou_top(m1, m2) == pytest.approx(8 / 24)
    assert M.dice_top(m1, m2) == pytest.approx(0.5)
    assert M.iou_top(m1, np.zeros_like(m1)) == 0.0
    assert math.isnan(M.dice_top(np.zeros_like(m1), np.ones_like(m1)))


# ----------------------------------------------------------------------------------------------------------
# correlations
# ----------------------------------------------------------------------------------------------------------
def test_pearson_spearman_match_scipy():
    rng = np.random.default_rng(RNG_SEED)
    a = rng.normal(size=(15, 11))
    b = a + rng.normal(size=a.shape)
    assert M.pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    # many ties: integer-valued maps
    ai = rng.integers(0, 4, size=(9, 9))
    bi = rng.integers(0, 3, size=(9, 9))
    assert M.spearman(ai, bi) == pytest.approx(stats.spearmanr(ai.ravel(), bi.ravel())[0], abs=1e-12)
    assert M.pearson(ai, bi) == pytest.approx(np.corrcoef(ai.ravel(), bi.ravel())[0, 1], abs=1e-12)


def test_correlation_invariances_and_constant():
    rng = np.random.default_rng(RNG_SEED)
    a = rng.random((7, 13))
    b = rng.random((7, 13))
    assert M.spearman(a, b) == pytest.approx(M.spearman(np.exp(5 * a), b**3), abs=1e-12)
    assert M.pearson(a, b) == pytest.approx(M.pearson(2 * a + 7, 0.5 * b - 1), abs=1e-12)
    assert M.pearson(a, a) == pytest.approx(1.0) and M.spearman(a, -a) == pytest.approx(-1.0)
    const = np.ones((7, 13))
    assert math.isnan(M.pearson(a, const)) and math.isnan(M.spearman(const, b))


# ----------------------------------------------------------------------------------------------------------
# energy / pointing / boxes
# ----------------------------------------------------------------------------------------------------------
def test_energy_inside():
    box = M.box_mask((20, 30), 5, 4, 10, 8)
    m = np.zeros((20, 30))
    m[6:10, 7:12] = np.arange(20).reshape(4, 5)
    assert M.energy_inside(m, box) == 1.0
    m2 = m.copy()
    m2[0, 0] = m.sum()  # as much energy outside as inside
    assert M.energy_inside(m2, box) == pytest.approx(0.5)
    m3 = m.copy()
    m3[15:, 20:] = -100.0  # negative values are ignored
    assert M.energy_inside(m3, box) == 1.0
    assert math.isnan(M.energy_inside(-np.ones((20, 30)), box))
    assert M.energy_inside(torch.from_numpy(m2), torch.from_numpy(box)) == pytest.approx(0.5)


def test_pointing_hit_with_tolerance():
    region = np.zeros((60, 60), dtype=bool)
    region[10:20, 10:20] = True
    m = np.zeros((60, 60))
    m[19 + 10, 15] = 1.0  # 10 px below the region's last row
    assert M.pointing_hit(m, region, tolerance_px=15)
    assert M.pointing_hit(m, region, tolerance_px=10)  # distance exactly 10 counts
    assert not M.pointing_hit(m, region, tolerance_px=9.99)
    assert not M.pointing_hit(m, region, tolerance_px=0)
    m[15, 15] = 1.0  # a tie inside the region, earlier in raster order than (29, 15)
    assert M.pointing_hit(m, region, tolerance_px=0)
    tie_outside_first = np.zeros((60, 60))
    tie_outside_first[0, 59] = 1.0
    tie_outside_first[15, 15] = 1.0
    assert not M.pointing_hit(tie_outside_first, region, tolerance_px=0)
    assert not M.pointing_hit(np.zeros((60, 60)), region)  # a constant map points nowhere


def test_pointing_hit_matches_distance_transform():
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(20):
        region = np.zeros((40, 50), dtype=bool)
        r, c = rng.integers(0, 35), rng.integers(0, 45)
        region[r : r + rng.integers(1, 6), c : c + rng.integers(1, 6)] = True
        m = rng.random((40, 50))
        tol = float(rng.uniform(0, 20))
        p = np.unravel_index(np.argmax(m), m.shape)
        expected = ndimage.distance_transform_edt(~region)[p] <= tol
        assert M.pointing_hit(m, region, tolerance_px=tol) == expected


def test_box_mask():
    mask = M.box_mask((10, 12), 2, 3, 4, 5)
    expected = np.zeros((10, 12), dtype=bool)
    expected[3:8, 2:6] = True
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 20
    # fractional coordinates: every overlapped pixel
    np.testing.assert_array_equal(M.box_mask((10, 12), 1.5, 2.2, 2.0, 0.5)[2], [False, True, True, True] + [False] * 8)
    # clipped to the image
    clipped = M.box_mask((10, 12), -3, 8, 5, 10)
    assert clipped[8:, :2].all() and clipped.sum() == 4
    assert not M.box_mask((10, 12), 20, 20, 5, 5).any()
    assert not M.box_mask((10, 12), 2, 2, 0, 5).any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: M.top_fraction_mask(np.zeros(5)), "2-D"),
        (lambda: M.top_fraction_mask(np.zeros((3, 3)), 1.5), r"\[0, 1\]"),
        (lambda: M.top_fraction_mask(np.array([[np.nan, 1.0]])), "NaN"),
        (lambda: M.iou(np.zeros((2, 2), bool), np.zeros((3, 3), bool)), "same shape"),
        (lambda: M.iou(np.zeros((2, 2)), np.zeros((2, 2), bool)), "boolean"),
        (lambda: M.pointing_hit(np.ones((3, 3)), np.zeros((3, 3), bool)), "empty"),
        (lambda: M.pointing_hit(np.ones((3, 3)), np.ones((3, 3), bool), -1), "tolerance_px"),
        (lambda: M.box_mask((10,), 0, 0, 1, 1), "shape"),
        (lambda: M.box_mask((10, 10), 0, 0, -1, 1), "width"),
    ],
)
def test_overlap_validation(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ----------------------------------------------------------------------------------------------------------
# a tiny linear classifier whose logit for class 0 depends only on a known region
# ----------------------------------------------------------------------------------------------------------
H = W = 10
REGION_C = (slice(1, 4), slice(1, 4))  # class 0 reads only these pixels
REGION_D = (slice(6, 9), slice(6, 9))  # class 1 reads only these pixels
ELSEWHERE = (slice(0, 4), slice(5, 9))  # no class reads these 16 pixels


def _checkerboard() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return (((yy + xx) % 2) * 2 - 1).to(torch.float64)  # +-1


class RegionModel(torch.nn.Module):
    """logit_0 = a <w, x> over REGION_C, logit_1 = a <w, x> over REGION_D, logit_2 = 1; w = checkerboard."""

    def __init__(self, scale: float = 0.25) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * H * W, 3, dtype=torch.float64)
        weight = torch.zeros(3, 3, H, W, dtype=torch.float64)
        board = _checkerboard()
        weight[0][:, REGION_C[0], REGION_C[1]] = scale * board[REGION_C]
        weight[1][:, REGION_D[0], REGION_D[1]] = scale * board[REGION_D]
        with torch.no_grad():
            self.linear.weight.copy_(weight.reshape(3, -1))
            self.linear.bias.copy_(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def _image() -> torch.Tensor:
    return _checkerboard().expand(3, H, W).clone()  # maximal logits for both classes


def _map_on(region: tuple[slice, slice], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((H, W)) * 0.1
    m[region] += 1.0 + rng.random(m[region].shape)
    return m


def test_remove_top_pixels_mask_matches_top_fraction_mask():
    rng = np.random.default_rng(RNG_SEED)
    x = torch.from_numpy(rng.normal(size=(3, H, W)))
    m = np.round(rng.random((H, W)), 1)  # many ties
    for f in (0.05, 0.1, 0.33):
        out = M.remove_top_pixels(x, m, f)
        removed = (out != x).any(dim=0).numpy()
        np.testing.assert_array_equal(removed, M.top_fraction_mask(m, f))
        assert torch.all(out[:, torch.from_numpy(removed)] == 0)
    assert torch.equal(M.remove_top_pixels(x, np.ones((H, W)), 0.5), x)  # constant map removes nothing


def test_remove_top_pixels_baselines():
    x = torch.arange(3 * H * W, dtype=torch.float64).reshape(3, H, W)
    m = np.zeros((H, W))
    m[REGION_C] = 1.0
    sel = torch.from_numpy(M.top_fraction_mask(m, 0.09))
    color = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    out = M.remove_top_pixels(x, m, 0.09, baseline=color)
    np.testing.assert_array_equal(out[:, sel].numpy(), np.repeat(color.numpy()[:, None], 9, axis=1))
    assert torch.equal(out[:, ~sel], x[:, ~sel])
    out = M.remove_top_pixels(x, m, 0.09, baseline=-1.5)
    assert torch.all(out[:, sel] == -1.5)
    out = M.remove_top_pixels(x, m, 0.09, baseline="blur", blur_sigma=1.0)
    assert torch.allclose(out[:, sel], M.gaussian_blur(x, 1.0)[:, sel])
    with pytest.raises(ValueError, match="baseline"):
        M.remove_top_pixels(x, m, 0.1, baseline="mean")
    with pytest.raises(ValueError, match="broadcast"):
        M.remove_top_pixels(x, m, 0.1, baseline=torch.zeros(4))


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(2, 3, 9, 14))
    for sigma in (0.7, 2.0, 5.0):  # 5.0: kernel radius 20 is larger than the image
        ours = M.gaussian_blur(torch.from_numpy(x), sigma).numpy()
        ref = ndimage.gaussian_filter(x, (0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_relative_drop_exact_for_linear_model():
    model = RegionModel()
    x = _image()
    m = _map_on(REGION_C)
    rd = M.relative_confidence_drop(model, x, m, 0, 1, fractions=(0.05, 0.09))
    assert set(rd) == {0.05, 0.09}

    def probs(img: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(img[None]), dim=1)[0]

    p = probs(x)
    for f, k in ((0.05, 5), (0.09, 9)):
        # hand-derived removal: the k highest pixels of m in REGION_C (values are distinct)
        flat = np.argsort(-m.ravel())[:k]
        xs = x.clone().reshape(3, -1)
        xs[:, flat] = 0.0
        ps = probs(xs.reshape(3, H, W))
        expected = float((p[0] - ps[0]) - (p[1] - ps[1]))
        assert rd[f] == pytest.approx(expected, abs=1e-12)
    # removing the whole class-0 region: logit_0 -> 0 exactly
    logits = torch.tensor([0.0, 0.25 * 27, 1.0], dtype=torch.float64)
    ps = torch.softmax(logits, 0)
    assert rd[0.09] == pytest.approx(float((p[0] - ps[0]) - (p[1] - ps[1])), abs=1e-12)


def test_relative_drop_ranks_maps():
    model = RegionModel()
    x = _image()
    on_c = M.relative_confidence_drop(model, x, _map_on(REGION_C), 0, 1)
    on_d = M.relative_confidence_drop(model, x, _map_on(REGION_D), 0, 1)
    off = M.relative_confidence_drop(model, x, _map_on(ELSEWHERE), 0, 1)
    for f in (0.05, 0.10):
        assert on_c[f] > 0.05
        assert off[f] == pytest.approx(0.0, abs=1e-12)  # the model ignores those pixels
        assert on_d[f] < 0  # removes evidence for the reference instead
        assert on_c[f] > off[f] > on_d[f]
    const = M.relative_confidence_drop(model, x, np.zeros((H, W)), 0, 1)
    assert const == {0.05: 0.0, 0.10: 0.0}


def test_deletion_insertion_rank_maps():
    model = RegionModel()
    x = _image()
    good, bad = _map_on(REGION_C), _map_on(ELSEWHERE)
    assert M.deletion_auc(model, x, good, 0) < M.deletion_auc(model, x, bad, 0) - 0.1
    assert M.insertion_auc(model, x, good, 0, blur_sigma=1.0) > M.insertion_auc(model, x, bad, 0, blur_sigma=1.0) + 0.1


def test_deletion_curve_hand_computed_and_sklearn_auc():
    model = RegionModel()
    x = _image()
    m = _map_on(REGION_C, seed=3)
    steps = 8  # 100 pixels: k_i = round(12.5 i), halves up -> 0, 13, 25, 38, 50, 63, 75, 88, 100
    f, curve = M.deletion_curve(model, x, m, 0, steps=steps)
    np.testing.assert_allclose(f, np.arange(9) / 8)
    order = np.argsort(-m.ravel(), kind="stable")
    expected = []
    for k in (0, 13, 25, 38, 50, 63, 75, 88, 100):
        xs = x.clone().reshape(3, -1)
        xs[:, order[:k]] = 0.0
        with torch.no_grad():
            expected.append(float(torch.softmax(model(xs.reshape(1, 3, H, W)), 1)[0, 0]))
    np.testing.assert_allclose(curve, expected, atol=1e-12)
    auc = M.deletion_auc(model, x, m, 0, steps=steps)
    skm = pytest.importorskip("sklearn.metrics")
    assert auc == pytest.approx(skm.auc(f, np.asarray(expected)), abs=1e-12)


def test_insertion_curve_endpoints():
    model = RegionModel()
    x = _image()
    f, curve = M.insertion_curve(model, x, _map_on(REGION_C), 0, steps=5, blur_sigma=1.0)
    with torch.no_grad():
        p_full = float(torch.softmax(model(x[None]), 1)[0, 0])
        p_blur = float(torch.softmax(model(M.gaussian_blur(x, 1.0)[None]), 1)[0, 0])
    assert curve[0] == pytest.approx(p_blur, abs=1e-12)
    assert curve[-1] == pytest.approx(p_full, abs=1e-12)
    assert f[0] == 0 and f[-1] == 1


def _batch(n: int = 4):
    rng = np.random.default_rng(RNG_SEED)
    x = torch.from_numpy(rng.normal(size=(n, 3, H, W)))
    maps = np.round(rng.random((n, H, W)), 1)  # with ties
    maps[1] = 0.0  # a constant map in the batch
    c = rng.integers(0, 3, size=n)
    d = (c + 1 + rng.integers(0, 2, size=n)) % 3
    return x, maps, c, d


def test_batch_equals_per_image():
    model = RegionModel()
    x, maps, c, d = _batch()
    rd = M.relative_confidence_drop(model, x, maps, c, d, fractions=(0.05, 0.1, 0.5), batch_size=5)
    dele = M.deletion_auc(model, x, torch.from_numpy(maps), torch.from_numpy(c), steps=7, batch_size=3)
    ins = M.insertion_auc(model, x, maps, list(c), steps=7, blur_sigma=1.5, batch_size=100)
    assert isinstance(dele, np.ndarray) and dele.shape == (4,)
    for i in range(4):
        single = M.relative_confidence_drop(model, x[i], maps[i], int(c[i]), int(d[i]), fractions=(0.05, 0.1, 0.5))
        for f in (0.05, 0.1, 0.5):
            assert rd[f][i] == pytest.approx(single[f], abs=1e-12)
        assert dele[i] == pytest.approx(M.deletion_auc(model, x[i], maps[i], int(c[i]), steps=7), abs=1e-12)
        assert ins[i] == pytest.approx(
            M.insertion_auc(model, x[i], maps[i], int(c[i]), steps=7, blur_sigma=1.5), abs=1e-12
        )
    # an int class is broadcast to the batch
    np.testing.assert_allclose(
        M.deletion_auc(model, x, maps, 2, steps=4), M.deletion_auc(model, x, maps, [2] * 4, steps=4)
    )


def test_rd_uses_one_forward_pass():
    calls: list[int] = []
    model = RegionModel()

    def counting(inp: torch.Tensor) -> torch.Tensor:
        calls.append(inp.shape[0])
        return model(inp)

    x, maps, c, d = _batch(3)
    M.relative_confidence_drop(counting, x, maps, c, d)
    assert calls == [9]  # 3 images x (original + 2 fractions)
    calls.clear()
    M.deletion_auc(counting, x, maps, c, steps=20, batch_size=32)
    assert calls == [32, 31]


def test_training_mode_warns():
    model = RegionModel().train()
    with pytest.warns(UserWarning, match="training mode"):
        M.deletion_auc(model, _image(), _map_on(REGION_C), 0, steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"saliency": np.zeros((H, W + 1))}, "saliency must have shape"),
        ({"c": 1, "d": 1}, "differ"),
        ({"c": [0, 1]}, "single integer"),
        ({"c": 0.5}, "integer"),
        ({"c": 7}, "only 3 logits"),
        ({"fractions": (0.0, 0.1)}, r"\(0, 1\]"),
        ({"fractions": ()}, "non-empty"),
        ({"batch_size": 0}, "batch_size"),
        ({"x": torch.zeros(3, H, W, dtype=torch.long)}, "floating"),
    ],
)
def test_rd_validation(kwargs, message):
    args = {"x": _image(), "saliency": _map_on(REGION_C), "c": 0, "d": 1}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        M.relative_confidence_drop(RegionModel(), **args)


def test_curve_validation():
    x, maps, c, _ = _batch(2)
    with pytest.raises(ValueError, match="length 2"):
        M.deletion_auc(RegionModel(), x, maps, [0, 1, 2])
    with pytest.raises(ValueError, match="steps"):
        M.insertion_auc(RegionModel(), x, maps, c, steps=0)
    with pytest.raises(ValueError, match="logits of shape"):
        M.deletion_auc(lambda t: t.sum(dim=(1, 2, 3)), x, maps, c)


def test_remove_top_pixels_batch_equals_per_image():
    x, maps, _, _ = _batch()
    x32 = x.float()
    out = M.remove_top_pixels(x32, maps, 0.2, baseline="blur", blur_sigma=1.0)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i in range(len(x)):
        assert torch.equal(out[i], M.remove_top_pixels(x32[i], maps[i], 0.2, baseline="blur", blur_sigma=1.0))
