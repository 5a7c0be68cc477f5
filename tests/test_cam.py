"""The engine against the plain full-autograd definition (docs/engine.md, "Reference definition"), for ViT and
ResNet open_clip towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traitloc.engine.adapters import Adapter, OpenClipResNet, OpenClipViT, TargetAdapter, batched_vjp, clip_adapter
from traitloc.engine.cam import FinerCAM, finer_coefficients, upsample_maps
from traitloc.engine.reference import capture_activation, reference_cam, vit_input_grid

open_clip = pytest.importorskip("open_clip")

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RN = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: dict, seed: int) -> torch.nn.Module:
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _build(tmp_path_factory, "camtest_tiny_vit", TINY_VIT, 0)


@pytest.fixture(scope="module")
def rn(tmp_path_factory):
    return _build(tmp_path_factory, "camtest_tiny_rn", TINY_RN, 1)


def _vectors(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _image(b: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _ref_vit(model, x, V, W, method="gradcam"):
    grid = (x.shape[-2] // 16, x.shape[-1] // 16)
    with vit_input_grid(model.visual, grid):
        return reference_cam(
            model.encode_image, model.visual.transformer.resblocks[-1].ln_1, x, V, W,
            normalize=True, layout="vit", grid=grid, method=method,
        )  # fmt: skip


def _ref_rn(model, x, V, W, method="gradcam"):
    return reference_cam(model.encode_image, model.visual.layer4, x, V, W, normalize=True, layout="cnn", method=method)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- adapters -------------------------------------------------------------------------------------------------------


def test_clip_adapter_picks_the_right_adapter(vit, rn):
    assert isinstance(clip_adapter(vit.visual), OpenClipViT)
    assert isinstance(clip_adapter(rn.visual), OpenClipResNet)
    assert isinstance(clip_adapter(vit.visual), Adapter) and isinstance(clip_adapter(rn.visual), Adapter)
    with pytest.raises(TypeError, match="no Finer-CAM adapter"):
        clip_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Adapter"):
        FinerCAM(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# -- batched vector-Jacobian products -------------------------------------------------------------------------------


class _ItemInBackward(torch.autograd.Function):
    """Doubles its input; its backward calls ``.item()``, which vmap has no batching rule for."""

    @staticmethod
    def forward(ctx, t):
        return 2 * t

    @staticmethod
    def backward(ctx, g):
        return g * (2.0 + 0.0 * g.sum().item())


def _vjp_case(item_in_backward: bool = False):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 5, generator=g).requires_grad_(True)
    h = _ItemInBackward.apply(w) if item_in_backward else 2 * w
    out = torch.tanh(h @ torch.randn(5, 4, generator=g))
    V = torch.randn(2, 3, 4, generator=g)
    loop = torch.stack(
        [torch.autograd.grad(out, w, grad_outputs=V[:, p], retain_graph=True)[0] for p in range(3)], 1
    )  # one plain backward per cotangent
    return out, w, V, loop


def test_batched_vjp_equals_one_backward_per_vector():
    out, w, V, loop = _vjp_case()
    torch.testing.assert_close(batched_vjp(out, w, V), loop)
    torch.testing.assert_close(batched_vjp(out, w, V, chunk=2), loop)


def test_batched_vjp_falls_back_for_an_op_without_a_batching_rule():
    out, w, V, loop = _vjp_case(item_in_backward=True)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):  # what torch raises here
        torch.autograd.grad(out, w, grad_outputs=V.transpose(0, 1), retain_graph=True, is_grads_batched=True)
    torch.testing.assert_close(batched_vjp(out, w, V), loop)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError("not a RuntimeError"),
    ],
    ids=["OutOfMemoryError", "cuda-error-oom", "other-runtime-error", "value-error"],
)
def test_batched_vjp_lets_out_of_memory_and_other_errors_through(monkeypatch, error):
    """Only vmap's no-batching-rule error falls back: out of memory must reach the runner's batch splitter."""
    out, w, V, loop = _vjp_case()
    plain_grad = torch.autograd.grad

    def grad(*args, raise_=error, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise raise_
        return plain_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    with pytest.raises(type(error)) as info:
        batched_vjp(out, w, V)
    assert info.value is error
    no_rule = RuntimeError("Batching rule not implemented for aten::item. We could not generate a fallback.")
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grad(*a, raise_=no_rule, **k))
    torch.testing.assert_close(batched_vjp(out, w, V), loop)


@pytest.mark.parametrize("which", ["vit", "rn"])
def test_suffix_of_prefix_is_the_model_embedding(which, vit, rn):
    model = vit if which == "vit" else rn
    ad = clip_adapter(model.visual)
    x = _image(2)
    torch.testing.assert_close(ad.suffix(ad.prefix(x)), model.encode_image(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.features(ad.prefix(x)), F.normalize(model.encode_image(x), dim=-1))


def test_vit_closed_form_equals_generic_autograd(vit):
    ad = clip_adapter(vit.visual)
    assert ad.fast
    pre = ad.prefix(_image(3, 64, 96))
    V = _vectors(7).unsqueeze(0).repeat(3, 1, 1) + 0.1 * torch.randn(3, 7, 32)
    fast_mean, slow_mean = ad.grad_mean(pre, V), TargetAdapter.grad_mean(ad, pre, V)
    fast_cells, slow_cells = ad.grad_cells(pre, V), TargetAdapter.grad_cells(ad, pre, V)
    assert fast_mean.shape == (3, 7, 64)
    assert fast_cells.shape == (3, 7, 4 * 6, 64)
    assert _rel(fast_mean, slow_mean) < 1e-5
    assert _rel(fast_cells, slow_cells) < 1e-5
    # Grad-CAM weights are the mean of the per-cell gradients
    assert _rel(fast_cells.mean(2), fast_mean) < 1e-5


def test_vit_jacobian_path_for_many_vectors(vit):
    """More vectors than embedding dims switches to the (D x C) Jacobian: same numbers."""
    ad = clip_adapter(vit.visual)
    pre = ad.prefix(_image(2))
    V = _vectors(100)  # D = 32 < 100
    many = ad.grad_mean(pre, V)
    ad.vector_chunk = 7
    chunked = torch.cat([ad.grad_mean(pre, V[i : i + 20]) for i in range(0, 100, 20)], 1)
    assert _rel(many, chunked) < 1e-5
    assert _rel(many, TargetAdapter.grad_mean(ad, pre, V)) < 1e-5


def test_resnet_shift_gradients_equal_per_cell_mean(rn):
    ad = clip_adapter(rn.visual)
    pre = ad.prefix(_image(2))
    V = _vectors(5)
    assert _rel(ad.grad_mean(pre, V), ad.grad_cells(pre, V).mean(2)) < 1e-5


def test_bad_vector_shapes(vit):
    ad = clip_adapter(vit.visual)
    pre = ad.prefix(_image(2))
    with pytest.raises(ValueError, match="explained vectors"):
        ad.grad_mean(pre, torch.randn(3, 4, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ad.prefix(_image(1, 60, 64))


# -- engine vs the full-autograd reference ------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("n_prompts", [1, 320])
def test_vit_gradcam_matches_reference(vit, gamma, n_prompts):
    P = n_prompts + 1  # the last vector is the base prompt
    V = _vectors(P)
    qs = sorted({0, n_prompts // 2, n_prompts - 1})
    W = finer_coefficients(P, qs, [[P - 1]] * len(qs), gamma)
    x = _image(2)
    out = FinerCAM(clip_adapter(vit.visual))(x, V, W)
    ref = _ref_vit(vit, x, V, W)
    assert out.signed.shape == ref.shape == (2, len(qs), 4, 4)
    assert _rel(out.signed, ref) < 1e-4
    # batched == unbatched
    one = FinerCAM(clip_adapter(vit.visual))(x[1:], V, W)
    assert _rel(one.signed[0], out.signed[1]) < 1e-5


@pytest.mark.parametrize("size", [(64, 96), (96, 48)])
def test_vit_any_grid_matches_reference(vit, size):
    V = _vectors(3)
    W = finer_coefficients(3, [0, 1], [[2], [2]], 0.6)
    x = _image(1, *size)
    out = FinerCAM(clip_adapter(vit.visual))(x, V, W)
    ref = _ref_vit(vit, x, V, W)
    assert out.grid == (size[0] // 16, size[1] // 16)
    assert _rel(out.signed, ref) < 1e-4
    assert out.upsampled().shape[-2:] == size


@pytest.mark.parametrize("gamma", [0.0, 0.6])
def test_resnet_gradcam_matches_reference(rn, gamma):
    V = _vectors(310)
    W = finer_coefficients(310, [0, 5], [[300, 301, 302], [309]], gamma)
    x = _image(2)
    out = FinerCAM(clip_adapter(rn.visual))(x, V, W)
    ref = _ref_rn(rn, x, V, W)
    assert _rel(out.signed, ref) < 1e-4


@pytest.mark.parametrize("which", ["vit", "rn"])
def test_layercam_matches_reference(which, vit, rn):
    model = vit if which == "vit" else rn
    V = _vectors(4)
    W = finer_coefficients(4, [0, 1], [[3], [2, 3]], 0.6)
    x = _image(2)
    out = FinerCAM(clip_adapter(model.visual), "layercam")(x, V, W)
    ref = (_ref_vit if which == "vit" else _ref_rn)(model, x, V, W, method="layercam")
    assert _rel(out.signed, ref) < 1e-4


def test_gamma_zero_is_plain_gradcam_and_cache_recombines(vit):
    V = _vectors(3)
    x = _image(1)
    cam = FinerCAM(clip_adapter(vit.visual))
    plain = cam(x, V[:1])
    finer0 = cam(x, V, finer_coefficients(3, [0], [[1, 2]], 0.0))
    torch.testing.assert_close(plain.signed, finer0.signed)
    cache = cam.gradients(x, V)
    for g in (0.3, 1.0, 2.5):  # a new gamma is a matrix product, no backward pass
        W = finer_coefficients(3, [0], [[1, 2]], g)
        torch.testing.assert_close(cache.combine(W, V).signed, cam(x, V, W).signed)
    # the explained objective's value is linear too
    W = finer_coefficients(3, [0], [[1]], 1.0)
    out = cam(x, V, W)
    f = F.normalize(vit.encode_image(x), dim=-1)
    torch.testing.assert_close(out.scores[0, 0], (f[0] @ V[0]) - (f[0] @ V[1]), rtol=1e-5, atol=1e-6)


def test_scorecam_matches_direct_masked_forwards(vit):
    V = _vectors(2)
    W = finer_coefficients(2, [0], [[1]], 1.0)
    x = _image(1)
    cam = FinerCAM(clip_adapter(vit.visual), "scorecam", score_temperature=10.0, scorecam_batch=5)
    out = cam(x, V, W)
    # direct: mask the image with every channel of the target activation and run the model's own forward
    with capture_activation(vit.visual.transformer.resblocks[-1].ln_1) as store:
        vit.encode_image(x)
    acts = store["act"][0, 1:].reshape(4, 4, -1).permute(2, 0, 1)  # (C, h, w)
    masks = upsample_maps(acts, (64, 64))
    lo = masks.amin(dim=(1, 2), keepdim=True)
    hi = masks.amax(dim=(1, 2), keepdim=True)
    masks = (masks - lo) / (hi - lo)
    f = F.normalize(vit.encode_image(x * masks.unsqueeze(1)), dim=-1)
    s = f @ (V[0] - V[1])
    w = (10.0 * s).softmax(0)
    expected = (w[:, None, None] * acts).sum(0)
    assert _rel(out.signed[0, 0], expected) < 1e-4
    budget = FinerCAM(clip_adapter(vit.visual), "scorecam", scorecam_channels=8)(x, V, W)
    assert budget.signed.shape == out.signed.shape and torch.isfinite(budget.signed).all()


def test_finer_coefficients_validation():
    W = finer_coefficients(4, [0, 1], [[2, 3], []], [0.5, 1.0])
    np.testing.assert_allclose(W.numpy(), [[1, 0, -0.25, -0.25], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="out of range"):
        finer_coefficients(2, [2], [[0]], 1.0)
    with pytest.raises(ValueError, match="finite"):
        finer_coefficients(2, [0], [[1]], float("nan"))
    with pytest.raises(ValueError, match="gamma values"):
        finer_coefficients(2, [0], [[1]], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown method"):
        FinerCAM(_DummyAdapter(), "gradcam++")


class _DummyAdapter(TargetAdapter):
    pass


def test_hooks_removed_even_when_body_raises():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"), capture_activation(lin) as store:
        lin(torch.zeros(1, 2))
        assert "act" in store
        raise RuntimeError("boom")
    assert not lin._forward_hooks


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_vit_b16_exported_map_pearson(gamma):
    """Done-when of the text-concept issue: random ViT-B-16, 224 px; the map brought to the image size correlates
    > 0.99 with the full-autograd reference brought to the image size with the same interpolation."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    V = _vectors(4, 512)
    W = finer_coefficients(4, [0], [[3]], gamma)
    x = _image(1, 224, 224)
    out = FinerCAM(clip_adapter(model.visual))(x, V, W)
    ref = reference_cam(
        model.encode_image, model.visual.transformer.resblocks[-1].ln_1, x, V, W,
        normalize=True, layout="vit", grid=(14, 14),
    )  # fmt: skip
    a = out.upsampled((224, 224))[0, 0].flatten().numpy()
    b = upsample_maps(ref.clamp_min(0), (224, 224))[0, 0].flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert _rel(out.signed, ref) < 1e-4
