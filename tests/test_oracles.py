"""Oracle tests: traitloc's Finer-CAM engine against two independent CAM libraries (dev-only dependencies).

The oracles are pytorch-grad-cam (pip ``grad-cam``, module ``pytorch_grad_cam``, read at 1.5.7) and torchcam (read
at 0.5.0). Each runs the model's own forward with hooks and one backward per objective (pytorch-grad-cam's
``loss.backward()`` runs through the whole network down to the input; torchcam's ``autograd.grad`` stops at the
target layer); traitloc runs its prefix once and differentiates only the suffix (closed form for open_clip ViTs).
Models: a tiny random open_clip ViT (64 px, 4 x 4 patch grid) and a random open_clip RN50 (224 px,
``visual.layer4``, 7 x 7, marked slow).

Conventions of the oracles, read from their source, and how the comparison lines them up:

pytorch-grad-cam 1.5.7
  - Activations: forward hook on the target layer; gradients: a tensor hook registered in that forward hook only
    when the output ``requires_grad``. With frozen parameters (``requires_grad_(False)``) nothing before the
    target layer requires grad, so the *input* must require grad, else no gradient is recorded and ``backward``
    fails. The same holds for torchcam.
  - ``reshape_transform`` is applied to activations and gradients; for ViT tokens we drop CLS and lay the patch
    tokens out (B, C, h, w) in raster order, as traitloc does.
  - A target is a callable on one image's output (here the normalized embedding or the cosine logits); the loss
    is their sum over the batch.
  - GradCAM weights: spatial mean of the raw gradients (no ReLU on gradients); ``get_cam_image`` returns the
    *signed* map ``sum_k alpha_k A_k`` on the grid. ``__call__`` then applies ReLU, per-image min-max
    ``(m - min) / (1e-7 + max)``, ``cv2.resize`` (bilinear, half-pixel centres = ``align_corners=False``) to the
    input size, and min-max again across layers. We compare the signed grid maps (exact) and the final output
    against traitloc's ReLU maps put through the same min-max and a torch bilinear resize.
  - LayerCAM: ``sum_k ReLU(dS/dA_k) A_k`` (signed, before the final ReLU), same post-processing.
  - Its own ``FinerCAM`` / ``FinerWeightedTarget`` is *not* the reference objective (``docs/engine.md``,
    "Reference definition"; "the reference" below): references are weighted by the model's softmax probabilities,
    ``sum_t p_t (s_c - alpha s_t) / sum_t p_t``, with gradients flowing through the weights too; the default target
    is the argmax class and ``comparison_categories`` are ranks in the order of ``|logit - target logit|`` (rank 0
    is the target), not class ids. With one reference the weights cancel (up to its ``1e-9``) and it equals the
    reference (tested). With several references it differs (tested to differ). Measured on the tiny ViT,
    3 references, alpha 1: with raw cosine logits (near-uniform softmax) Pearson with the reference 0.997-0.998 and
    a max difference of 7 % of the map scale; with CLIP's logit scale 100 applied to the logits (peaked softmax)
    Pearson 0.90-0.94 and a 42 % max difference. Its objective also depends on the logit scale; the reference maps
    only scale with it.
torchcam 0.5.0
  - Gradients by ``torch.autograd.grad(loss, hooked_output)``; ``reshape_transform`` on both.
  - GradCAM: weights = spatial mean of gradients; map = ``nansum(w * A, 1)``, then ReLU, then (``normalized=True``)
    min-max ``(m - min) / (max + eps)``; no upsampling. We call ``normalized=False`` and compare the ReLU grid maps.
  - ``FinerCAM(model, layer, base_method=GradCAM|LayerCAM, gamma=..)`` with ``class_idx=`` and explicit
    ``comparison_idx=`` (class ids) builds ``s_c - gamma * mean_t s_t`` from the scores *before* the base method's
    ReLU: exactly the reference. It rejects ``gamma < 0`` (traitloc accepts any finite gamma).
  - LayerCAM: ``ReLU(grad) * A`` summed over channels, then ReLU (its ``fuse_cams`` tanh scaling is not used).

Both libraries return only ReLU maps from their public calls; traitloc also returns the signed maps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

open_clip = pytest.importorskip("open_clip")

from traitloc.engine.adapters import clip_adapter  # noqa: E402
from traitloc.engine.cam import FinerCAM, finer_coefficients  # noqa: E402

GAMMAS = (0.0, 0.6, 1.0)
PROMPTS = ("red wings", "a long curved bill", "a striped tail", "bird")  # the base prompt last
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Pearson correlation of two maps (flattened, float64)."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-300))


def per_image_pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> list[float]:
    """Pearson per image; images where both maps are constant (e.g. an all-zero ReLU map) are left out."""
    pairs = zip(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), strict=True)
    return [pearson(ai, bi) for ai, bi in pairs if ai.std() > 0 or bi.std() > 0]


def assert_maps_equal(
    ours: Tensor, theirs: Tensor | np.ndarray, min_pearson: float = 0.9999, scale: Tensor | float | None = None
) -> tuple[float, float]:
    """Same maps up to float32 rounding: max error relative to the map scale, and per-image Pearson.

    ``scale`` (default: the largest magnitude in ``theirs``) sets the absolute tolerance; pass the signed map's
    magnitude when comparing ReLU maps whose few positive cells are a near-cancellation of larger terms.
    Returns (max relative error, min Pearson) for reporting.
    """
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float32)
    ours = ours.detach().float().reshape(theirs.shape)
    scale = torch.as_tensor(theirs.abs().max() if scale is None else scale).clamp_min(1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(scale))
    corr = per_image_pearson(ours, theirs)
    for r in corr:
        assert r > min_pearson, f"Pearson {r:.6f} <= {min_pearson}"
    return float((ours - theirs).abs().max() / scale), min(corr, default=float("nan"))


def minmax_like_pgc(maps: Tensor) -> Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` normalization, per image."""
    m = maps - maps.flatten(1).min(1).values[:, None, None]
    return m / (1e-7 + m.flatten(1).max(1).values[:, None, None])


class NormalizedEmbedding(nn.Module):
    """CLIP image tower -> L2-normalized embedding (what a concept score reads)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(x), dim=-1)


class CosineClassifier(nn.Module):
    """CLIP as a 'classifier': logits are cosine similarities with fixed text vectors (no logit scale, no softmax)."""

    def __init__(self, model: nn.Module, text: Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("text", text)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(x), dim=-1) @ self.text.t()


class LinearTarget:
    """pytorch-grad-cam target ``<f(e), u>`` (the Finer objective with ``u = v_c - gamma * mean v_refs``)."""

    def __init__(self, u: Tensor):
        self.u = u

    def __call__(self, output: Tensor) -> Tensor:
        return (output * self.u).sum(-1)


def vit_reshape(grid: tuple[int, int]):
    def reshape(t: Tensor) -> Tensor:
        B, _, C = t.shape
        return t[:, 1:].reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)

    return reshape


def photos(size: int) -> Tensor:
    """Two real photos (scikit-image), resized and CLIP-normalized; random images if scikit-image is missing."""
    try:
        from skimage import data

        resized = []
        for im in (data.chelsea(), data.astronaut()):
            side = min(im.shape[:2])  # top-left square crop
            t = torch.from_numpy(np.ascontiguousarray(im[:side, :side])).permute(2, 0, 1)[None].float() / 255.0
            resized.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
        t = torch.cat(resized)
    except ImportError:
        t = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    return (t - mean) / std


class Setup:
    """A frozen random open_clip model, its target layer, text vectors and a batch of two images."""

    def __init__(self, name: str, size: int, target: str):
        torch.manual_seed(0)
        self.model = open_clip.create_model(name, pretrained=None).eval().requires_grad_(False)
        self.adapter = clip_adapter(self.model.visual)
        self.target = self.model.get_submodule(target)
        self.vit = hasattr(self.model.visual, "transformer")
        with torch.no_grad():
            text = self.model.encode_text(open_clip.get_tokenizer(name)(list(PROMPTS)))
        self.text = F.normalize(text.float(), dim=-1)
        self.x = photos(size)
        self.grid = self.adapter.prefix(self.x[:1]).grid
        self.reshape = vit_reshape(self.grid) if self.vit else None

    def x_req(self) -> Tensor:
        """The input requiring grad: with frozen parameters the oracles see no gradient otherwise."""
        return self.x.clone().requires_grad_(True)

    def ours(self, refs: list[int], gammas=GAMMAS, method: str = "gradcam", fast: bool = True):
        """traitloc maps (B, len(gammas), h, w) for target 0 vs ``refs``, one query per gamma, one call."""
        K = len(PROMPTS)
        W = finer_coefficients(K, [0] * len(gammas), [refs] * len(gammas), list(gammas))
        fast_before = getattr(self.adapter, "fast", None)
        if fast_before is not None:
            self.adapter.fast = fast
        try:
            return FinerCAM(self.adapter, method=method)(self.x, self.text, W), W
        finally:
            if fast_before is not None:
                self.adapter.fast = fast_before


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Setup:
    path = tmp_path_factory.mktemp("open_clip_cfg") / "traitloc-oracle-tiny-vit.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return Setup(path.stem, 64, "visual.transformer.resblocks.1.ln_1")


@pytest.fixture(scope="module")
def rn50() -> Setup:
    return Setup("RN50", 224, "visual.layer4")


# ----------------------------------------------------------------------------------------------------------
# pytorch-grad-cam
# ----------------------------------------------------------------------------------------------------------
def pgc_maps(s: Setup, cam_cls, u: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(signed grid maps from ``get_cam_image``, the library's final normalized, resized output)."""
    with cam_cls(model=NormalizedEmbedding(s.model), target_layers=[s.target], reshape_transform=s.reshape) as cam:
        targets = [LinearTarget(u)] * s.x.shape[0]
        final = cam(input_tensor=s.x_req(), targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        signed = cam.get_cam_image(s.x, s.target, targets, acts, grads, False)
    return signed, final


def check_pgc(s: Setup, method: str) -> dict[float, dict[str, float]]:
    """traitloc vs pytorch-grad-cam for every gamma: signed grid maps and the library's final output."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    cam_cls = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM}[method]
    out, W = s.ours([3], method=method)
    stats = {}
    for q, g in enumerate(GAMMAS):
        signed, final = pgc_maps(s, cam_cls, W[q] @ s.text)
        err, r = assert_maps_equal(out.signed[:, q], signed)
        ours_final = F.interpolate(
            minmax_like_pgc(out.maps[:, q]).unsqueeze(1), size=s.x.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        ours_final = minmax_like_pgc(ours_final)  # its aggregate_multi_layers normalizes once more
        final_err = float(np.abs(ours_final.numpy() - final).max())
        assert final_err < 2e-3, f"final maps differ by {final_err}"
        final_r = per_image_pearson(ours_final, final)
        assert all(r > 0.999 for r in final_r)
        final_min = min(final_r, default=float("nan"))
        stats[g] = {"signed_rel_err": err, "signed_pearson": r, "final_abs_err": final_err, "final_pearson": final_min}
    return stats


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_vit_matches_pytorch_grad_cam(tiny_vit: Setup, method: str):
    check_pgc(tiny_vit, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_rn50_matches_pytorch_grad_cam(rn50: Setup, method: str):
    check_pgc(rn50, method)


def pgc_finer_weighted(s: Setup, refs: list[int], alpha: float) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    clf = CosineClassifier(s.model, s.text)
    with pgc.GradCAM(model=clf, target_layers=[s.target], reshape_transform=s.reshape) as cam:
        targets = [FinerWeightedTarget(0, refs, alpha)] * s.x.shape[0]
        cam(input_tensor=s.x_req(), targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return cam.get_cam_image(s.x, s.target, targets, acts, grads, False)


def test_vit_pytorch_grad_cam_finer_target_one_reference_is_finer(tiny_vit: Setup):
    """pytorch-grad-cam's FinerWeightedTarget with one reference: its softmax weight cancels, the reference holds."""
    out, _ = tiny_vit.ours([3], gammas=(0.6, 1.0))
    for q, alpha in enumerate((0.6, 1.0)):
        assert_maps_equal(out.signed[:, q], pgc_finer_weighted(tiny_vit, [3], alpha))


def test_vit_pytorch_grad_cam_finer_target_several_references_differs(tiny_vit: Setup):
    """With several references it is a softmax-weighted objective (gradients through the weights): not the reference."""
    out, _ = tiny_vit.ours([1, 2, 3], gammas=(1.0,))
    theirs = pgc_finer_weighted(tiny_vit, [1, 2, 3], 1.0)
    diff = (out.signed[:, 0] - torch.as_tensor(theirs)).abs().max() / out.signed.abs().max()
    assert diff > 1e-3, "pytorch-grad-cam's multi-reference FinerWeightedTarget unexpectedly equals the reference"


# ----------------------------------------------------------------------------------------------------------
# torchcam
# ----------------------------------------------------------------------------------------------------------
def torchcam_finer(s: Setup, refs: list[int], gammas=GAMMAS, base: str = "GradCAM") -> list[Tensor]:
    """torchcam FinerCAM ReLU grid maps (B, h, w) for target 0 vs ``refs``: one forward, one backward per gamma."""
    methods = pytest.importorskip("torchcam.methods")
    clf = CosineClassifier(s.model, s.text)
    maps = []
    extractor = methods.FinerCAM(
        clf,
        s.target,
        input_shape=tuple(s.x.shape[1:]),
        base_method=getattr(methods, base),
        reshape_transform=s.reshape,
        gamma=gammas[0],
        num_references=len(refs),
    )
    with extractor:
        scores = clf(s.x_req())
        for i, g in enumerate(gammas):
            extractor.gamma = float(g)
            last = i == len(gammas) - 1
            (m,) = extractor(class_idx=0, scores=scores, comparison_idx=refs, normalized=False, retain_graph=not last)
            maps.append(m.detach())
    return maps


def check_torchcam(s: Setup, method: str, refs: list[int], fast: bool = True) -> dict[float, dict[str, float]]:
    """traitloc vs torchcam's FinerCAM (ReLU grid maps) for every gamma."""
    out, _ = s.ours(refs, method=method, fast=fast)
    theirs = torchcam_finer(s, refs, base={"gradcam": "GradCAM", "layercam": "LayerCAM"}[method])
    stats = {}
    for q, g in enumerate(GAMMAS):
        err, r = assert_maps_equal(out.maps[:, q], theirs[q], scale=out.signed[:, q].abs().max())
        stats[g] = {"relu_rel_err": err, "relu_pearson": r}  # error relative to the signed map's magnitude
    return stats


@pytest.mark.parametrize("path", ["closed-form", "autograd"])
@pytest.mark.parametrize("refs", [[3], [1, 2, 3]], ids=["base", "3refs"])
def test_vit_gradcam_matches_torchcam_finercam(tiny_vit: Setup, refs: list[int], path: str):
    check_torchcam(tiny_vit, "gradcam", refs, fast=path == "closed-form")


@pytest.mark.parametrize("refs", [[3], [1, 2, 3]], ids=["base", "3refs"])
def test_vit_layercam_matches_torchcam_finercam(tiny_vit: Setup, refs: list[int]):
    check_torchcam(tiny_vit, "layercam", refs)


def test_vit_gamma0_matches_torchcam_plain_cams(tiny_vit: Setup):
    """gamma = 0 is the plain CAM of the target: compare with torchcam's GradCAM / LayerCAM themselves."""
    methods = pytest.importorskip("torchcam.methods")
    s = tiny_vit
    clf = CosineClassifier(s.model, s.text)
    for method, cls in (("gradcam", methods.GradCAM), ("layercam", methods.LayerCAM)):
        out, _ = s.ours([3], gammas=(0.0,), method=method)
        with cls(clf, s.target, input_shape=tuple(s.x.shape[1:]), reshape_transform=s.reshape) as extractor:
            (m,) = extractor(class_idx=0, scores=clf(s.x_req()), normalized=False)
        assert_maps_equal(out.maps[:, 0], m.detach())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_rn50_matches_torchcam_finercam(rn50: Setup, method: str):
    check_torchcam(rn50, method, [1, 2, 3])
