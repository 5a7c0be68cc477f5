r"""Target-layer adapters: split a model at its target layer into a prefix (run once, no gradients) and a
differentiable suffix, and give the gradients of linear scores :math:`s_v = \langle f(e), v\rangle` with respect to
the target-layer activations.

Every adapter presents the target-layer activations as ``acts`` of shape ``(B, N, C)``: ``N = h * w`` grid cells
in raster order and ``C`` channels. ``f`` is L2 normalization for CLIP embeddings (cosine similarity with a
normalized text vector) and the identity for classifier features (a linear head's logit, up to its bias).

Two gradient queries are served, both batched over many explained vectors ``V`` of shape ``(B, P, D)``:

``grad_mean``   ``(B, P, C)``   ``alpha_k = (1/N) sum_cells d s / d A_k``        (Grad-CAM weights)
``grad_cells``  ``(B, P, N, C)`` ``d s / d A_k[cell]``                             (Layer-CAM weights)

The generic implementation differentiates the suffix with autograd, vectorized over the explained vectors
(:func:`batched_vjp`); Grad-CAM differentiates with respect to one shift vector added to every cell
(``d s / d shift = sum_cells d s / d A``). :class:`OpenClipViT` adds an exact closed form for CLS-pooled open_clip
ViTs: after the last block's ``ln_1`` only the CLS token's path reaches the embedding, so the backward is a handful
of ``(P, C) x (C, C)`` products per image. The derivations are in ``docs/engine.md`` ("Closed-form head
derivative").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Adapter",
    "Prefix",
    "TargetAdapter",
    "batched_vjp",
    "OpenClipViT",
    "OpenClipResNet",
    "clip_adapter",
    "resize_pos_embed",
    "vit_tokens",
]


@dataclass
class Prefix:
    """Target-layer activations of a batch and what the suffix needs to go on from there.

    Attributes
    ----------
    acts : Tensor
        ``(B, N, C)`` target-layer activations, ``N = h * w`` grid cells in raster order.
    grid : tuple of int
        The activation grid ``(h, w)``.
    input_size : tuple of int
        The model input size ``(H, W)`` the grid covers.
    extra : dict
        Adapter-specific tensors the suffix needs (e.g. a ViT's CLS token), and caches of the fast paths.
    """

    acts: Tensor
    grid: tuple[int, int]
    input_size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """The number of images ``B``."""
        return int(self.acts.shape[0])


@runtime_checkable
class Adapter(Protocol):
    """What the engine needs from a model split at its target layer (:class:`TargetAdapter` implements it).

    Attributes
    ----------
    normalize : bool
        Whether scores use the L2-normalized embedding (CLIP cosine) or the raw one (classifier logits).
    target_layer : str
        A readable name of the target layer (recorded in ``run.json``).
    """

    normalize: bool
    target_layer: str

    def prefix(self, x: Tensor) -> Prefix:
        """Run the model up to the target layer (no gradients)."""

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """Embedding ``(B, D)`` from the target layer on (differentiable)."""

    def score_features(self, e: Tensor) -> Tensor:
        """``f(e)``: the features whose dot product with a vector is its score."""

    def embed(self, x: Tensor) -> Tensor:
        """Plain forward to the embedding (no gradients)."""

    def features(self, pre: Prefix) -> Tensor:
        """``f(e)`` ``(B, D)`` for a prefix (no gradients)."""

    def grad_mean(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Grad-CAM channel weights ``(B, P, C)``."""

    def grad_cells(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Per-cell gradients ``(B, P, N, C)``."""


class TargetAdapter(Adapter):
    """Base class of the adapters: subclasses implement :meth:`prefix` and :meth:`suffix`; fast paths override
    :meth:`grad_mean` and :meth:`grad_cells`.

    The gradients default to batched autograd through :meth:`suffix` (exact for any suffix).

    Attributes
    ----------
    normalize : bool
        ``f`` is L2 normalization (``True``, CLIP) or the identity (``False``, classifier features).
    target_layer : str
        A readable name of the target layer.
    vector_chunk : int
        Explained vectors differentiated at once (bounds memory).
    """

    normalize: bool = True
    target_layer: str = ""
    vector_chunk: int = 512

    def prefix(self, x: Tensor) -> Prefix:  # pragma: no cover - abstract
        """Run the model up to the target layer under ``no_grad``.

        Parameters
        ----------
        x : Tensor
            Normalized image batch ``(B, 3, H, W)``.

        Returns
        -------
        Prefix
            The target-layer activations ``(B, N, C)`` and what :meth:`suffix` needs.
        """
        raise NotImplementedError

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """The model from the target layer to the embedding (differentiable).

        Parameters
        ----------
        pre : Prefix
            The batch's prefix.
        acts : Tensor, optional
            ``(B, N, C)`` activations replacing ``pre.acts`` (e.g. a leaf that requires grad).
        shift : Tensor, optional
            ``(B, C)`` vector added to every cell's activation (its gradient is the sum over cells).

        Returns
        -------
        Tensor
            The embedding ``e`` ``(B, D)``.
        """
        raise NotImplementedError  # pragma: no cover

    def score_features(self, e: Tensor) -> Tensor:
        """``f(e)``: L2-normalized if :attr:`normalize`, else ``e`` itself; scores are ``f(e) @ v``."""
        return F.normalize(e, dim=-1) if self.normalize else e

    def embed(self, x: Tensor) -> Tensor:
        """Plain forward to the embedding ``(B, D)`` (no gradients)."""
        with torch.no_grad():
            return self.suffix(self.prefix(x))

    def features(self, pre: Prefix) -> Tensor:
        """``f(e)`` ``(B, D)`` for a prefix (no gradients): scores are ``features @ v``."""
        with torch.no_grad():
            return self.score_features(self.suffix(pre))

    def grad_mean(self, pre: Prefix, vectors: Tensor) -> Tensor:
        r"""Grad-CAM channel weights :math:`\alpha_{pk} = \frac1N \sum_i \partial \langle f(e), v_p\rangle /
        \partial A_{ik}`.

        Parameters
        ----------
        pre : Prefix
            The batch's prefix.
        vectors : Tensor
            Explained vectors ``(P, D)`` (shared by the batch) or ``(B, P, D)``.

        Returns
        -------
        Tensor
            ``(B, P, C)``.
        """
        g = self._autograd(pre, vectors, wrt="shift")
        return g / pre.acts.shape[1]

    def grad_cells(self, pre: Prefix, vectors: Tensor) -> Tensor:
        r"""Per-cell gradients :math:`\partial \langle f(e), v_p\rangle / \partial A_{ik}` (Layer-CAM).

        Parameters
        ----------
        pre : Prefix
            The batch's prefix.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)``.

        Returns
        -------
        Tensor
            ``(B, P, N, C)``.
        """
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


#: How torch's vmap (behind ``is_grads_batched=True``) reports an op it cannot vectorize: an op without a batching
#: rule ("Batching rule not implemented for aten::item. We could not generate a fallback.", "... for aten::mul.out;
#: the fallback path doesn't work on out= or view ops."), a limit of its fallback ("The fallback path does not
#: support ...") or an in-place op on an unbatched tensor ("vmap: aten::mul_(self, *extra_args) is not possible ...").
_NO_BATCHING_RULE = ("Batching rule not implemented for ", "The fallback path does not support", "vmap: ")


def _no_batching_rule(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap's "cannot vectorize this op" error (never out-of-memory or any other error)."""
    return type(err) is RuntimeError and any(m in str(err) for m in _NO_BATCHING_RULE)


def batched_vjp(out: Tensor, wrt: Tensor, vectors: Tensor, chunk: int = 512) -> Tensor:
    """Vector-Jacobian products of ``out`` for many cotangents at once.

    Vectorized over the cotangents (``torch.autograd.grad(..., is_grads_batched=True)``), ``chunk`` at a time. The
    graph is kept, so that when an op of the graph has no batching rule the chunk falls back to a plain loop with
    the same result. Every other error (out of memory included) propagates.

    Parameters
    ----------
    out : Tensor
        ``(B, D)`` outputs, on the autograd tape.
    wrt : Tensor
        The tensor differentiated against, ``(B, ...)``.
    vectors : Tensor
        ``(B, P, D)`` cotangents.
    chunk : int
        Cotangents per vectorized call (bounds memory).

    Returns
    -------
    Tensor
        ``(B, P, *wrt.shape[1:])``: ``result[b, p] = d <out[b], vectors[b, p]> / d wrt[b]`` (images are independent).

    Examples
    --------
    >>> w = torch.ones(2, 3, requires_grad=True)
    >>> out = w * torch.tensor([1.0, 2.0, 3.0])
    >>> batched_vjp(out, w, torch.eye(3).expand(2, 3, 3))[0]
    tensor([[1., 0., 0.],
            [0., 2., 0.],
            [0., 0., 3.]])
    """
    cot = vectors.to(out.dtype).transpose(0, 1)  # (P, B, D)
    chunks = []
    for i in range(0, cot.shape[0], chunk):
        c = cot[i : i + chunk]
        try:
            (g,) = torch.autograd.grad(out, wrt, grad_outputs=c, retain_graph=True, is_grads_batched=True)
        except RuntimeError as err:
            if not _no_batching_rule(err):
                raise
            g = torch.stack([torch.autograd.grad(out, wrt, grad_outputs=cj, retain_graph=True)[0] for cj in c])
        chunks.append(g)
    return torch.cat(chunks, 0).transpose(0, 1).contiguous()


def _check_vectors(vectors: Tensor, batch: int) -> Tensor:
    """Explained vectors as ``(B, P, D)`` (a ``(P, D)`` tensor is shared by the batch), with a clear error."""
    if not isinstance(vectors, Tensor):
        raise TypeError(f"explained vectors must be a tensor, got {type(vectors).__name__}")
    if vectors.ndim == 2:
        vectors = vectors.unsqueeze(0).expand(batch, -1, -1)
    if vectors.ndim != 3 or vectors.shape[0] != batch:
        raise ValueError(f"explained vectors must be (P, D) or (B={batch}, P, D), got {tuple(vectors.shape)}")
    return vectors


def _chunked(fn: Callable[[Prefix, Tensor], Tensor], pre: Prefix, vectors: Tensor, chunk: int) -> Tensor:
    """``fn(pre, vectors[:, i:i+chunk])`` over chunks of the explained vectors, concatenated (bounds memory)."""
    return torch.cat([fn(pre, vectors[:, i : i + chunk]) for i in range(0, vectors.shape[1], chunk)], 1)


def _check_images(x: Tensor) -> tuple[int, int]:
    """``(H, W)`` of an image batch ``(B, 3, H, W)``, with a clear error for anything else."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image batch (B, 3, H, W), got {tuple(x.shape)}")
    return int(x.shape[-2]), int(x.shape[-1])


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], n_prefix: int = 1) -> Tensor:
    """Bicubic interpolation of a ViT positional embedding to a new patch grid.

    Parameters
    ----------
    pos : Tensor
        ``(n_prefix + h * w, C)`` positional embedding, prefix tokens (CLS) first.
    old_grid, new_grid : tuple of int
        The embedding's grid ``(h, w)`` and the wanted one.
    n_prefix : int
        Leading tokens that are not on the grid (kept as they are).

    Returns
    -------
    Tensor
        ``(n_prefix + h' * w', C)``; ``pos`` itself when the grids are equal.

    Examples
    --------
    >>> resize_pos_embed(torch.zeros(1 + 4, 8), (2, 2), (3, 4)).shape
    torch.Size([13, 8])
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid_pos = pos[:n_prefix], pos[n_prefix:]
    C = pos.shape[-1]
    g = grid_pos.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], C).to(pos.dtype)
    return torch.cat([prefix, g], 0)


def vit_tokens(visual: nn.Module, x: Tensor, patch: tuple[int, int], native_grid: tuple[int, int]) -> Tensor:
    """Tokens of an open_clip ViT after ``ln_pre``: patch embedding, CLS, positional embedding (bicubic to the grid).

    Parameters
    ----------
    visual : nn.Module
        An open_clip ``VisionTransformer``.
    x : Tensor
        ``(B, 3, H, W)``, sides multiples of ``patch``.
    patch, native_grid : tuple of int
        The patch size and the grid of the model's positional embedding.

    Returns
    -------
    Tensor
        ``(B, 1 + h * w, C)``, CLS first.
    """
    H, W = int(x.shape[-2]), int(x.shape[-1])
    grid = (H // patch[0], W // patch[1])
    v: Any = visual  # open_clip's submodules and parameters, read by attribute (untyped)
    t = v.conv1(x)
    t = t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding.view(1, 1, -1).expand(t.shape[0], -1, -1).to(t.dtype)
    t = torch.cat([cls, t], 1)
    t = t + resize_pos_embed(v.positional_embedding, native_grid, grid).to(t.dtype)
    return v.ln_pre(t)


def activation_and_derivative(act: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """``act(h)`` and its exact elementwise derivative ``act'(h)``, both detached.

    Autograd on one elementwise op (GELU, QuickGELU, ...), so no closed form per activation is needed.

    Examples
    --------
    >>> g, d = activation_and_derivative(nn.ReLU(), torch.tensor([-1.0, 2.0]))
    >>> g, d
    (tensor([0., 2.]), tensor([0., 1.]))
    """
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
    """Backward of LayerNorm for a batch of cotangents ``gy`` (B, P, ..., C); ``xhat``, ``rstd`` are (B, ..., C),
    (B, ..., 1)."""
    gx = gy * ln.weight if ln.weight is not None else gy
    xh = xhat.unsqueeze(1)
    return (gx - gx.mean(-1, keepdim=True) - xh * (gx * xh).mean(-1, keepdim=True)) * rstd.unsqueeze(1)


def _normalize_backward(g: Tensor, e: Tensor) -> Tensor:
    """Backward of ``e / |e|`` for cotangents ``g`` (B, P, D) at ``e`` (B, D): ``(I - e^ e^T) g / |e|``."""
    n = e.norm(dim=-1, keepdim=True)
    eh = (e / n).unsqueeze(1)
    return (g - (g * eh).sum(-1, keepdim=True) * eh) / n.unsqueeze(1)


def _layer_scale(m: nn.Module) -> Tensor | float:
    """The factor of an open_clip ``LayerScale`` (1 for ``nn.Identity``)."""
    return cast(Tensor, m.gamma) if hasattr(m, "gamma") else 1.0


class OpenClipViT(TargetAdapter):
    """Adapter of an open_clip ``VisionTransformer``; target layer ``transformer.resblocks[-1].ln_1`` (patch
    tokens, CLS dropped).

    Any input size whose sides are multiples of the patch size works: the positional embedding is interpolated
    (bicubic) to the input's patch grid, so the map covers the whole input. For CLS-pooled towers with a
    projection (:attr:`fast`), :meth:`grad_mean` and :meth:`grad_cells` are exact closed forms of the last block's
    backward (``docs/engine.md``, "Closed-form head derivative"); otherwise batched autograd.

    Parameters
    ----------
    visual : nn.Module
        ``model.visual`` of an open_clip ViT model.
    normalize : bool
        Score with the L2-normalized embedding (cosine similarity, CLIP's own score).
    """

    def __init__(self, visual: nn.Module, normalize: bool = True):
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise TypeError("OpenClipViT needs an open_clip VisionTransformer (model.visual)")
        v: Any = visual  # an open_clip VisionTransformer: its submodules are read by attribute (untyped)
        self.visual: Any = v
        self.normalize = normalize
        self.block: Any = v.transformer.resblocks[-1]
        self.target_layer = "visual.transformer.resblocks[-1].ln_1"
        ps = v.patch_size
        self.patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        gs = v.grid_size
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

    def input_grid(self, x: Tensor) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of an image batch ``(B, 3, H, W)``; a clear error unless the sides are
        multiples of the patch size."""
        H, W = _check_images(x)
        if H % self.patch[0] or W % self.patch[1]:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {self.patch[0]}x{self.patch[1]}")
        return (H // self.patch[0], W // self.patch[1])

    def tokens_until(self, x: Tensor, n_last: int) -> Tensor:
        """The input tokens ``(B, 1 + h*w, C)`` of the last ``n_last`` blocks (call under ``no_grad``)."""
        t = vit_tokens(self.visual, x, self.patch, self.native_grid)
        for blk in self.visual.transformer.resblocks[:-n_last]:
            t = blk(t)
        return t

    def prefix(self, x: Tensor) -> Prefix:
        """Tokens through all blocks but the last, then the last block's ``ln_1`` (no gradients)."""
        grid = self.input_grid(x)
        with torch.no_grad():
            t = self.tokens_until(x, 1)
            a = self.block.ln_1(t)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        return Prefix(acts=a[:, 1:], grid=grid, input_size=size, extra={"x_in": t, "a_cls": a[:, :1]})

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """The last block after ``ln_1``, CLS pooling and the projection (see :meth:`TargetAdapter.suffix`)."""
        v, b = self.visual, self.block
        ap = pre.acts if acts is None else acts
        if shift is not None:
            ap = ap + shift.unsqueeze(1)
        a = torch.cat([pre.extra["a_cls"], ap], 1)
        x = pre.extra["x_in"] + b.ls_1(b.attention(q_x=a))
        x = x + b.ls_2(b.mlp(b.ln_2(x)))
        pooled, _ = v._pool(x)
        return pooled @ v.proj

    # -- exact closed-form gradients of the CLS path (docs/engine.md, "Closed-form head derivative") ---------------
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
        """``f(e)`` ``(B, D)`` from the CLS path alone (the fast path), else the full suffix."""
        if not self.fast:
            return super().features(pre)
        return self.score_features(self._cls_path(pre)["e"])

    def _grad_cls_out(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Cotangent of the attention's CLS output before ``out_proj``, i.e. ``d s / d o`` (B, P, C)."""
        v, b = self.visual, self.block
        c = self._cls_path(pre)
        g = vectors.to(c["e"].dtype)
        if self.normalize:
            g = _normalize_backward(g, c["e"])
        gp = g @ v.proj.t()  # (B, P, C)
        gz2 = _layer_norm_backward(gp, v.ln_post, c["xhatp"], c["rstdp"])
        gy = gz2 * _layer_scale(b.ls_2)
        gh = (gy @ b.mlp[2].weight) * c["dact"].unsqueeze(1)
        gm = gh @ b.mlp[0].weight
        gz1 = gz2 + _layer_norm_backward(gm, b.ln_2, c["xhat2"], c["rstd2"])
        ga = gz1 * _layer_scale(b.ls_1)
        return ga @ b.attn.out_proj.weight  # (B, P, C)

    def grad_mean(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Grad-CAM weights ``(B, P, C)`` in closed form (see :meth:`TargetAdapter.grad_mean`).

        For more vectors than embedding dimensions the whole ``(D, C)`` Jacobian is computed once and multiplied.
        """
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

    def _grad_heads(self, pre: Prefix, vectors: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The CLS path's cache and ``d s / d o`` per head, ``(B, P, heads, head width)``."""
        nh = self.block.attn.num_heads
        go = self._grad_cls_out(pre, vectors)
        return self._cls_path(pre), go.view(*go.shape[:2], nh, go.shape[-1] // nh)

    def _grad_mean_chunk(self, pre: Prefix, vectors: Tensor) -> Tensor:
        with torch.no_grad():
            c, go = self._grad_heads(pre, vectors)
            B, P, nh, dh = go.shape
            C = nh * dh
            # value path: every patch value moves by the projected shift; CLS output moves by P_patch times it
            dwv = go * c["p_patch"][:, None, :, None]
            # key path: patch logits move by scale * q0_h . (shift W_k)_h; softmax backward restricted to patches
            r = (go * (c["c_patch"] - c["p_patch"][..., None] * c["o"]).unsqueeze(1)).sum(-1)  # (B, P, nh)
            dwk = (dh**-0.5) * r.unsqueeze(-1) * c["q0"].view(B, 1, nh, dh)
            w = self.block.attn.in_proj_weight
            g = dwk.reshape(B, P, C) @ w[C : 2 * C] + dwv.reshape(B, P, C) @ w[2 * C :]
        return g / pre.acts.shape[1]

    def grad_cells(self, pre: Prefix, vectors: Tensor) -> Tensor:
        """Per-cell gradients ``(B, P, N, C)`` in closed form (see :meth:`TargetAdapter.grad_cells`)."""
        if not self.fast:
            return super().grad_cells(pre, vectors)
        vectors = _check_vectors(vectors, pre.batch)
        return _chunked(self._grad_cells_chunk, pre, vectors, max(1, self.vector_chunk // 8))

    def _grad_cells_chunk(self, pre: Prefix, vectors: Tensor) -> Tensor:
        with torch.no_grad():
            c, go = self._grad_heads(pre, vectors)
            B, P, nh, dh = go.shape
            w = self.block.attn.in_proj_weight
            wk, wv = w[nh * dh :].view(2, nh, dh, nh * dh).unbind(0)
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
    """Adapter of an open_clip ``ModifiedResNet`` (RN50, ...); target layer ``layer4`` (before the attention pool).

    The suffix is the attention pool with the mean-token query only (the only output used); its positional
    embedding is interpolated for non-native grids. Grad-CAM projects the shift through q/k/v once per vector.

    Parameters
    ----------
    visual : nn.Module
        ``model.visual`` of an open_clip ResNet model.
    normalize : bool
        Score with the L2-normalized embedding (cosine similarity).
    """

    def __init__(self, visual: nn.Module, normalize: bool = True):
        if not hasattr(visual, "attnpool") or not hasattr(visual, "layer4"):
            raise TypeError("OpenClipResNet needs an open_clip ModifiedResNet (model.visual)")
        v: Any = visual  # an open_clip ModifiedResNet: its submodules are read by attribute (untyped)
        self.visual: Any = v
        self.normalize = normalize
        self.target_layer = "visual.layer4"
        s = int(round(math.sqrt(v.attnpool.positional_embedding.shape[0] - 1)))
        self.native_grid = (s, s)

    def prefix(self, x: Tensor) -> Prefix:
        """Stem and ``layer1`` to ``layer4`` (no gradients); ``acts`` are ``layer4``'s cells."""
        v = self.visual
        size = _check_images(x)
        with torch.no_grad():
            t = v.stem(x)
            t = v.layer4(v.layer3(v.layer2(v.layer1(t))))
        return Prefix(acts=t.flatten(2).transpose(1, 2), grid=(int(t.shape[-2]), int(t.shape[-1])), input_size=size)

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """The attention pool's mean-token output (see :meth:`TargetAdapter.suffix`)."""
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
    """The adapter for an open_clip visual tower.

    Parameters
    ----------
    visual : nn.Module
        ``model.visual``: a ``VisionTransformer`` or a ``ModifiedResNet``.
    normalize : bool
        Score with the L2-normalized embedding (cosine similarity with a normalized text vector).

    Returns
    -------
    TargetAdapter
        An :class:`OpenClipViT` or :class:`OpenClipResNet`.

    Raises
    ------
    TypeError
        For any other module, naming the supported towers.
    """
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return OpenClipViT(visual, normalize=normalize)
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        return OpenClipResNet(visual, normalize=normalize)
    raise TypeError(
        f"no Finer-CAM adapter for visual tower {type(visual).__name__}; supported: open_clip VisionTransformer "
        f"(CLS pooling) and ModifiedResNet; for other models use the generic classifier adapter"
    )
