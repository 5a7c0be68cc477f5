"""Target-layer adapters: split a model at its target layer into a prefix (run once, no gradients) and a
differentiable suffix, and give the gradients of linear scores ``s_v = <f(e), v>`` with respect to the
target-layer activations.

Every adapter presents the target-layer activations as ``acts`` of shape ``(B, N, C)``: ``N = h * w`` grid cells
in raster order and ``C`` channels. ``f`` is L2 normalization for CLIP embeddings (cosine similarity with a
normalized text vector) and the identity for classifier features (a linear head's logit, up to its bias).

Two gradient queries are served, both batched over many explained vectors ``V`` of shape ``(B, P, D)``:

``grad_mean``   ``(B, P, C)``   ``alpha_k = (1/N) sum_cells d s / d A_k``        (Grad-CAM weights)
``grad_cells``  ``(B, P, N, C)`` ``d s / d A_k[cell]``                             (Layer-CAM weights)

The generic implementation differentiates the suffix with autograd, vectorized over the explained vectors
(``torch.autograd.grad(..., is_grads_batched=True)``); Grad-CAM differentiates with respect to one shift vector
added to every cell (``d s / d shift = sum_cells d s / d A``). :class:`OpenClipViT` adds an exact closed form for
CLS-pooled open_clip ViTs (DESIGN.md §1.5): after the last block's ``ln_1`` only the CLS token's path reaches
the embedding, so the backward is a handful of ``(P, C) x (C, C)`` products per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Prefix",
    "TargetAdapter",
    "batched_vjp",
    "OpenClipViT",
    "OpenClipResNet",
    "clip_adapter",
    "resize_pos_embed",
]


@dataclass
class Prefix:
    """Target-layer activations of a batch and what the suffix needs to go on from there."""

    acts: Tensor  # (B, N, C)
    grid: tuple[int, int]
    input_size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.acts.shape[0])


class TargetAdapter:
    """Base class: subclasses implement :meth:`prefix` and :meth:`suffix`; fast paths override the gradients."""

    normalize: bool = True
    target_layer: str = ""
    #: chunk of explained vectors differentiated at once (bounds memory)
    vector_chunk: int = 512

    def prefix(self, x: Tensor) -> Prefix:  # pragma: no cover - abstract
        raise NotImplementedError

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """Embedding ``e`` (B, D) from target-layer activations (``acts`` replaces ``pre.acts``; ``shift`` (B, C)
        is added to every cell)."""
        raise NotImplementedError  # pragma: no cover

    # -- helpers -------------------------------------------------------------------------------------------------
    def score_features(self, e: Tensor) -> Tensor:
        return F.normalize(e, dim=-1) if self.normalize else e

    def embed(self, x: Tensor) -> Tensor:
        """Plain forward to the embedding (no gradients)."""
        with torch.no_grad():
            return self.suffix(self.prefix(x))

    def features(self, pre: Prefix) -> Tensor:
        """``f(e)`` for a prefix (no gradients): scores are ``features @ v``."""
        with torch.no_grad():
            return self.score_features(self.suffix(pre))

    # -- gradients -------------------------------------------------------------------------------------------------
    def grad_mean(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Grad-CAM channel weights ``(B, P, C)``: mean over cells of ``d <f(e), v_p> / d A``."""
        g = self._autograd(pre, vectors, wrt="shift")
        return g / pre.acts.shape[1]

    def grad_cells(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Per-cell gradients ``(B, P, N, C)`` of ``<f(e), v_p>`` with respect to the activations."""
        return self._autograd(pre, vectors, wrt="acts")

    def _autograd(self, pre: Prefix, vectors: Tensor, wrt: str) -> Tensor:
        vectors = _check_vectors(vectors, pre.batch)
        B = vectors.shape[0]
        with torch.enable_grad():
            if wrt == "shift":
                t = torch.zeros(B, pre.acts.shape[-1], dtype=pre.acts.dtype, device=pre.acts.device)
                t.requires_grad_(True)
                out = self.score_features(self.suffix(pre, shift=t))
            else:
                t = pre.acts.detach().clone().requires_grad_(True)
                out = self.score_features(self.suffix(pre, acts=t))
            return batched_vjp(out, t, vectors, self.vector_chunk)


def batched_vjp(out: Tensor, wrt: Tensor, vectors: Tensor, chunk: int = 512) -> Tensor:
    """Vector-Jacobian products of ``out`` (B, D) for cotangents ``vectors`` (B, P, D): ``(B, P, *wrt.shape[1:])``.

    Vectorized over the P cotangents (``is_grads_batched``), ``chunk`` at a time; the graph is kept so that an op
    without a batching rule can fall back to a plain loop with the same result.
    """
    cot = vectors.to(out.dtype).transpose(0, 1)  # (P, B, D)
    chunks = []
    for i in range(0, cot.shape[0], chunk):
        c = cot[i : i + chunk]
        try:
            (g,) = torch.autograd.grad(out, wrt, grad_outputs=c, retain_graph=True, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: plain loop, same result
            g = torch.stack([torch.autograd.grad(out, wrt, grad_outputs=cj, retain_graph=True)[0] for cj in c])
        chunks.append(g)
    return torch.cat(chunks, 0).transpose(0, 1).contiguous()


def _check_vectors(vectors: Tensor, batch: int) -> Tensor:
    if not isinstance(vectors, Tensor):
        raise TypeError(f"explained vectors must be a tensor, got {type(vectors).__name__}")
    if vectors.ndim == 2:
        vectors = vectors.unsqueeze(0).expand(batch, -1, -1)
    if vectors.ndim != 3 or vectors.shape[0] != batch:
        raise ValueError(f"explained vectors must be (P, D) or (B={batch}, P, D), got {tuple(vectors.shape)}")
    return vectors


def _chunked(fn: Any, pre: Prefix, vectors: Tensor, chunk: int) -> Tensor:
    """``fn(pre, vectors[:, i:i+chunk])`` over chunks of the explained vectors, concatenated (bounds memory)."""
    return torch.cat([fn(pre, vectors[:, i : i + chunk]) for i in range(0, vectors.shape[1], chunk)], 1)


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], n_prefix: int = 1) -> Tensor:
    """Bicubic interpolation of a ViT positional embedding ``(n_prefix + h*w, C)`` to a new grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid_pos = pos[:n_prefix], pos[n_prefix:]
    C = pos.shape[-1]
    g = grid_pos.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], C).to(pos.dtype)
    return torch.cat([prefix, g], 0)


def activation_and_derivative(act: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """``act(h)`` and its exact elementwise derivative ``act'(h)`` (any elementwise activation: GELU, QuickGELU...),
    both detached; autograd on one elementwise op, so no closed form per activation is needed."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_(True)
        g = act(hh)
        (d,) = torch.autograd.grad(g.sum(), hh)
    return g.detach(), d


def _layer_norm_parts(ln: nn.LayerNorm, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Output, normalized input and 1/sigma of a LayerNorm over the last dim (for its exact backward)."""
    zf = z.float()
    mu = zf.mean(-1, keepdim=True)
    var = zf.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + ln.eps)
    xhat = (zf - mu) * rstd
    y = xhat * ln.weight.float() + ln.bias.float() if ln.weight is not None else xhat
    return y.to(z.dtype), xhat.to(z.dtype), rstd.to(z.dtype)


def _layer_norm_backward(gy: Tensor, ln: nn.LayerNorm, xhat: Tensor, rstd: Tensor) -> Tensor:
    """Backward of LayerNorm for a batch of cotangents ``gy`` (B, P, C); ``xhat``, ``rstd`` are (B, C), (B, 1)."""
    gx = gy * ln.weight if ln.weight is not None else gy
    xh = xhat.unsqueeze(1)
    return (gx - gx.mean(-1, keepdim=True) - xh * (gx * xh).mean(-1, keepdim=True)) * rstd.unsqueeze(1)


def _layer_scale(m: nn.Module) -> Tensor | float:
    return m.gamma if hasattr(m, "gamma") else 1.0


class OpenClipViT(TargetAdapter):
    """open_clip ``VisionTransformer``; target layer ``transformer.resblocks[-1].ln_1`` (patch tokens, CLS dropped).

    Any input size whose sides are multiples of the patch size works: the positional embedding is interpolated
    (bicubic) to the input's patch grid, so the map covers the whole input.
    """

    def __init__(self, visual: nn.Module, normalize: bool = True):
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise TypeError("OpenClipViT needs an open_clip VisionTransformer (model.visual)")
        self.visual = visual
        self.normalize = normalize
        self.block = visual.transformer.resblocks[-1]
        self.target_layer = "visual.transformer.resblocks[-1].ln_1"
        ps = visual.patch_size
        self.patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        gs = visual.grid_size
        self.native_grid = (gs, gs) if isinstance(gs, int) else tuple(gs)
        self.fast = self._fast_path_supported()

    def _fast_path_supported(self) -> bool:
        v, b = self.visual, self.block
        return (
            getattr(v, "attn_pool", None) is None
            and getattr(v, "pool_type", "tok") == "tok"
            and isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
            and not hasattr(b, "ln_1_kv")
            and b.attn.in_proj_weight is not None
            and b.attn.batch_first
            and v.proj is not None
        )

    # -- forward ----------------------------------------------------------------------------------------------------
    def prefix(self, x: Tensor) -> Prefix:
        v = self.visual
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got {tuple(x.shape)}")
        H, W = int(x.shape[-2]), int(x.shape[-1])
        if H % self.patch[0] or W % self.patch[1]:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {self.patch[0]}x{self.patch[1]}")
        grid = (H // self.patch[0], W // self.patch[1])
        with torch.no_grad():
            t = v.conv1(x)
            t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
            cls = v.class_embedding.view(1, 1, -1).expand(t.shape[0], -1, -1).to(t.dtype)
            t = torch.cat([cls, t], 1)
            t = t + resize_pos_embed(v.positional_embedding, self.native_grid, grid).to(t.dtype)
            t = v.ln_pre(t)
            for blk in v.transformer.resblocks[:-1]:
                t = blk(t)
            a = self.block.ln_1(t)
        return Prefix(acts=a[:, 1:], grid=grid, input_size=(H, W), extra={"x_in": t, "a_cls": a[:, :1]})

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        v, b = self.visual, self.block
        ap = pre.acts if acts is None else acts
        if shift is not None:
            ap = ap + shift.unsqueeze(1)
        a = torch.cat([pre.extra["a_cls"], ap], 1)
        x = pre.extra["x_in"] + b.ls_1(b.attention(q_x=a))
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
        pooled, _ = v._pool(x)
        return pooled @ v.proj

    # -- exact closed-form gradients of the CLS path (DESIGN.md §1.5) --------------------------------------------------
    def _cls_path(self, pre: Prefix) -> dict[str, Tensor]:
        """Forward of the CLS token through the last block, keeping what the closed-form backward needs."""
        cache = pre.extra.get("_cls")
        if cache is not None:
            return cache
        v, b = self.visual, self.block
        attn: nn.MultiheadAttention = b.attn
        C = pre.acts.shape[-1]
        nh = attn.num_heads
        dh = C // nh
        with torch.no_grad():
            a = torch.cat([pre.extra["a_cls"], pre.acts], 1)  # (B, L, C)
            B, L, _ = a.shape
            w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
            if b_in is None:
                b_in = torch.zeros(3 * C, dtype=a.dtype, device=a.device)
            q0 = F.linear(a[:, 0], w_in[:C], b_in[:C])  # (B, C)
            kv = F.linear(a, w_in[C:], b_in[C:])  # (B, L, 2C)
            k, val = kv[..., :C], kv[..., C:]
            qh = q0.view(B, nh, dh)
            kh = k.view(B, L, nh, dh)
            vh = val.view(B, L, nh, dh)
            scale = dh**-0.5
            logits = torch.einsum("bhd,blhd->bhl", qh, kh) * scale
            p = logits.float().softmax(-1).to(a.dtype)  # (B, nh, L)
            o = torch.einsum("bhl,blhd->bhd", p, vh)  # (B, nh, dh)
            p_patch = p[:, :, 1:].sum(-1)  # (B, nh)
            c_patch = torch.einsum("bhl,blhd->bhd", p[:, :, 1:], vh[:, 1:])
            att_out = F.linear(o.reshape(B, C), attn.out_proj.weight, attn.out_proj.bias)
            z1 = pre.extra["x_in"][:, 0] + b.ls_1(att_out)
            m, xhat2, rstd2 = _layer_norm_parts(b.ln_2, z1)
            fc, act, proj2 = b.mlp[0], b.mlp[1], b.mlp[2]
            h1 = fc(m)
        gact, dact = activation_and_derivative(act, h1)
        with torch.no_grad():
            z2 = z1 + b.ls_2(proj2(gact))
            # CLS pooling: ln_post before or after pooling gives the same CLS row
            pooled, xhatp, rstdp = _layer_norm_parts(v.ln_post, z2)
            e = pooled @ v.proj
        cache = {
            "q0": q0, "v": vh, "p": p, "o": o, "p_patch": p_patch, "c_patch": c_patch,
            "xhat2": xhat2, "rstd2": rstd2, "dact": dact, "xhatp": xhatp, "rstdp": rstdp, "e": e,
        }  # fmt: skip
        pre.extra["_cls"] = cache
        return cache

    def features(self, pre: Prefix) -> Tensor:
        if not self.fast:
            return super().features(pre)
        return self.score_features(self._cls_path(pre)["e"])

    def _grad_cls_out(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Cotangent of the attention's CLS output before ``out_proj`` ... i.e. ``d s / d o`` (B, P, C)."""
        v, b = self.visual, self.block
        c = self._cls_path(pre)
        e = c["e"]
        g = vectors.to(e.dtype)
        if self.normalize:
            n = e.norm(dim=-1, keepdim=True)
            eh = e / n
            g = (g - (g * eh.unsqueeze(1)).sum(-1, keepdim=True) * eh.unsqueeze(1)) / n.unsqueeze(1)
        gp = g @ v.proj.t()  # (B, P, C)
        gz2 = _layer_norm_backward(gp, v.ln_post, c["xhatp"], c["rstdp"])
        gy = gz2 * _layer_scale(b.ls_2)
        gh = (gy @ b.mlp[2].weight) * c["dact"].unsqueeze(1)
        gm = gh @ b.mlp[0].weight
        gz1 = gz2 + _layer_norm_backward(gm, b.ln_2, c["xhat2"], c["rstd2"])
        ga = gz1 * _layer_scale(b.ls_1)
        return ga @ b.attn.out_proj.weight  # (B, P, C)

    def grad_mean(self, pre: Prefix, vectors: Tensor) -> Tensor:
        if not self.fast:
            return super().grad_mean(pre, vectors)
        vectors = _check_vectors(vectors, pre.batch)
        D = vectors.shape[-1]
        if vectors.shape[1] > D:
            # more vectors than embedding dims: the whole (D x C) Jacobian is cheaper, then one matmul
            eye = torch.eye(D, dtype=vectors.dtype, device=vectors.device)
            jac = self.grad_mean(pre, eye.unsqueeze(0).expand(pre.batch, -1, -1))  # (B, D, C)
            return vectors.to(jac.dtype) @ jac
        return _chunked(self._grad_mean_chunk, pre, vectors, self.vector_chunk)

    def _grad_mean_chunk(self, pre: Prefix, vectors: Tensor) -> Tensor:
        c = self._cls_path(pre)
        attn = self.block.attn
        B, P = vectors.shape[:2]
        C = pre.acts.shape[-1]
        nh = attn.num_heads
        dh = C // nh
        with torch.no_grad():
            go = self._grad_cls_out(pre, vectors).view(B, P, nh, dh)
            # value path: every patch value moves by the projected shift; CLS output moves by P_patch times it
            dwv = go * c["p_patch"][:, None, :, None]
            # key path: patch logits move by scale * q0_h . (shift W_k)_h; softmax backward restricted to patches
            r = (go * (c["c_patch"] - c["p_patch"][..., None] * c["o"]).unsqueeze(1)).sum(-1)  # (B, P, nh)
            dwk = (dh**-0.5) * r.unsqueeze(-1) * c["q0"].view(B, 1, nh, dh)
            w = attn.in_proj_weight
            g = dwk.reshape(B, P, C) @ w[C : 2 * C] + dwv.reshape(B, P, C) @ w[2 * C :]
        return g / pre.acts.shape[1]

    def grad_cells(self, pre: Prefix, vectors: Tensor) -> Tensor:
        if not self.fast:
            return super().grad_cells(pre, vectors)
        vectors = _check_vectors(vectors, pre.batch)
        return _chunked(self._grad_cells_chunk, pre, vectors, max(1, self.vector_chunk // 8))

    def _grad_cells_chunk(self, pre: Prefix, vectors: Tensor) -> Tensor:
        c = self._cls_path(pre)
        attn = self.block.attn
        B, P = vectors.shape[:2]
        C = pre.acts.shape[-1]
        nh = attn.num_heads
        dh = C // nh
        w = attn.in_proj_weight
        wk = w[C : 2 * C].view(nh, dh, C)
        wv = w[2 * C :].view(nh, dh, C)
        with torch.no_grad():
            go = self._grad_cls_out(pre, vectors).view(B, P, nh, dh)
            pp = c["p"][:, :, 1:]  # (B, nh, N)
            vp = c["v"][:, 1:]  # (B, N, nh, dh)
            # value path: d s / d V_i,h = p_h,i * go_h
            gv = torch.einsum("bphd,hdc->bphc", go, wv)
            cells = torch.einsum("bhn,bphc->bpnc", pp, gv)
            # key path: d s / d logit_h,i = p_h,i (go_h . V_h,i - go_h . o_h); d logit / d K_h,i = scale * q0_h
            gov = torch.einsum("bphd,bnhd->bphn", go, vp)
            goo = (go * c["o"].unsqueeze(1)).sum(-1, keepdim=True)
            dlogit = pp.unsqueeze(1) * (gov - goo)  # (B, P, nh, N)
            qk = torch.einsum("bhd,hdc->bhc", c["q0"].view(B, nh, dh), wk) * (dh**-0.5)
            cells = cells + torch.einsum("bphn,bhc->bpnc", dlogit, qk)
        return cells


class OpenClipResNet(TargetAdapter):
    """open_clip ``ModifiedResNet`` (RN50, ...); target layer ``layer4`` (before the attention pool).

    The suffix is the attention pool with the mean-token query only (the only output used); its positional
    embedding is interpolated for non-native grids. Grad-CAM projects the shift through q/k/v once per vector.
    """

    def __init__(self, visual: nn.Module, normalize: bool = True):
        if not hasattr(visual, "attnpool") or not hasattr(visual, "layer4"):
            raise TypeError("OpenClipResNet needs an open_clip ModifiedResNet (model.visual)")
        self.visual = visual
        self.normalize = normalize
        self.target_layer = "visual.layer4"
        s = int(round(math.sqrt(visual.attnpool.positional_embedding.shape[0] - 1)))
        self.native_grid = (s, s)

    def prefix(self, x: Tensor) -> Prefix:
        v = self.visual
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got {tuple(x.shape)}")
        with torch.no_grad():
            t = v.stem(x)
            t = v.layer4(v.layer3(v.layer2(v.layer1(t))))
        B, C, h, w = t.shape
        return Prefix(acts=t.flatten(2).transpose(1, 2), grid=(h, w), input_size=tuple(x.shape[-2:]))  # type: ignore[arg-type]

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        ap = self.visual.attnpool
        a = pre.acts if acts is None else acts
        B, N, C = a.shape
        nh = ap.num_heads
        dh = C // nh
        pos = resize_pos_embed(ap.positional_embedding, self.native_grid, pre.grid).to(a.dtype)
        x = torch.cat([a.mean(1, keepdim=True), a], 1) + pos  # (B, N+1, C)
        q0 = F.linear(x[:, 0], ap.q_proj.weight, ap.q_proj.bias)
        k = F.linear(x, ap.k_proj.weight, ap.k_proj.bias)
        val = F.linear(x, ap.v_proj.weight, ap.v_proj.bias)
        if shift is not None:  # every token (the mean token too) moves by the shift: project it once
            q0 = q0 + shift @ ap.q_proj.weight.t()
            k = k + (shift @ ap.k_proj.weight.t()).unsqueeze(1)
            val = val + (shift @ ap.v_proj.weight.t()).unsqueeze(1)
        qh = q0.view(B, nh, dh) * dh**-0.5
        p = torch.einsum("bhd,blhd->bhl", qh, k.view(B, N + 1, nh, dh)).softmax(-1)
        o = torch.einsum("bhl,blhd->bhd", p, val.view(B, N + 1, nh, dh)).reshape(B, C)
        return ap.c_proj(o)


def clip_adapter(visual: nn.Module, normalize: bool = True) -> TargetAdapter:
    """The adapter for an open_clip visual tower (ViT or ModifiedResNet)."""
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return OpenClipViT(visual, normalize=normalize)
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        return OpenClipResNet(visual, normalize=normalize)
    raise TypeError(
        f"no Finer-CAM adapter for visual tower {type(visual).__name__}; supported: open_clip VisionTransformer "
        f"(CLS pooling) and ModifiedResNet; for other models use the generic classifier adapter"
    )
