"""Text queries on open_clip ViTs with the dense CLIP family and LeGrad, each with the Finer contrast.

:class:`DenseCLIP`: the forward-only methods ``maskclip``, ``clearclip``, ``sclip``, ``naclip``, ``gem`` (one forward
pass gives the normalized patch embeddings for any number of prompts, cached in :class:`DenseCache`);
:class:`LeGrad`: ``legrad``, its backward in closed form and batched over prompts (per-vector gradients cached in
:class:`LeGradCache`). The contrast is formed before the ReLU, so a new gamma or base is one product on the cache.
Derivations and the tests that prove each path exact: ``docs/engine.md`` ("Dense CLIP methods: one forward pass",
"LeGrad: batched backward"); equations: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitloc.engine.adapters import (
    OpenClipViT,
    Prefix,
    _check_vectors,
    _layer_norm_backward,
    _layer_norm_parts,
    _layer_scale,
    _normalize_backward,
    activation_and_derivative,
    vit_tokens,
)
from traitloc.engine.cam import CamOutput, _autocast, _coeffs, _query_scores
from traitloc.engine.methods import DENSE_METHODS

__all__ = ["DenseCache", "DenseCLIP", "LeGrad", "LeGradCache", "naclip_neighbourhood", "vit_tokens"]


def _qkv(blk: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head q, k, v (B, H, L, dh) of the block's attention for normalized tokens ``a`` (B, L, C)."""
    attn = cast(nn.MultiheadAttention, blk.attn)
    B, L, C = a.shape
    nh = attn.num_heads
    qkv = F.linear(a, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, nh, C // nh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _heads_out(blk: nn.Module, o: Tensor) -> Tensor:
    """(B, H, L, dh) -> out_proj -> (B, L, C)."""
    B, nh, L, dh = o.shape
    return cast(nn.MultiheadAttention, blk.attn).out_proj(o.transpose(1, 2).reshape(B, L, nh * dh))


def _cls_output(blk: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The block's ordinary output for the CLS token only (B, C), from its q, k, v."""
    dh = q.shape[-1]
    p = (q[:, :, :1] @ k.transpose(-1, -2) * dh**-0.5).softmax(-1)  # (B, H, 1, L)
    z = x[:, 0] + blk.ls_1(_heads_out(blk, p @ v)[:, 0])
    return z + blk.ls_2(blk.mlp(blk.ln_2(z)))


def _head(visual: Any, z: Tensor) -> Tensor:
    """``ln_post`` then ``proj`` on tokens (..., C) -> (..., D)."""
    return visual.ln_post(z) @ visual.proj


def naclip_neighbourhood(grid: tuple[int, int], sigma: float, device: torch.device | None = None) -> Tensor:
    r"""NACLIP's Gaussian neighbourhood :math:`\Omega_{ab} = \exp(-\|p_a - p_b\|^2 / (2\sigma^2))` over patch
    positions, padded with a zero row and column for the CLS token.

    Parameters
    ----------
    grid : tuple of int
        The patch grid ``(h, w)``.
    sigma : float
        Standard deviation in patches.
    device : torch.device, optional
        Where to put the result.

    Returns
    -------
    Tensor
        ``(1 + h*w, 1 + h*w)`` float32.

    Examples
    --------
    >>> naclip_neighbourhood((1, 2), sigma=1.0)
    tensor([[0.0000, 0.0000, 0.0000],
            [0.0000, 1.0000, 0.6065],
            [0.0000, 0.6065, 1.0000]])
    """
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1)
    om = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma**2))
    return F.pad(om, (1, 0, 1, 0)).to(device)


@dataclass
class DenseCache:
    """Normalized per-patch embeddings of a batch: any query (gamma, base) is one matrix product, no forward pass.

    Attributes
    ----------
    patches : Tensor
        ``(B, N, D)`` L2-normalized patch embeddings :math:`\\hat f` in raster order.
    features : Tensor
        ``(B, D)`` the model's own normalized CLS embedding (image-level scores).
    grid, input_size : tuple of int
        The patch grid ``(h, w)`` and the model input size ``(H, W)``.
    method : str
        The dense method that made the patch embeddings.
    """

    patches: Tensor
    features: Tensor
    grid: tuple[int, int]
    input_size: tuple[int, int]
    method: str

    def similarities(self, vectors: Tensor) -> Tensor:
        """Per-prompt patch similarities (cosine) ``(B, P, h, w)`` for vectors ``(P, D)`` or ``(B, P, D)``."""
        V = _check_vectors(vectors, self.patches.shape[0]).to(self.patches.dtype)
        return torch.einsum("bnd,bpd->bpn", self.patches, V).reshape(V.shape[0], V.shape[1], *self.grid)

    def combine(self, coeffs: Tensor, vectors: Tensor) -> CamOutput:
        """Maps of queries from the cached patch embeddings (no forward pass).

        Parameters
        ----------
        coeffs : Tensor
            Query coefficients ``(Q, P)`` or ``(B, Q, P)`` (e.g. :func:`~traitloc.engine.cam.finer_coefficients`).
        vectors : Tensor
            The explained vectors ``(P, D)`` or ``(B, P, D)``.

        Returns
        -------
        CamOutput
            ``signed[b, q, i] = <f_i, u_q>`` with ``u_q = sum_p W_qp v_p``, and the CLS scores.
        """
        B = self.patches.shape[0]
        V = _check_vectors(vectors, B).to(self.patches.dtype)
        W = _coeffs(coeffs, B, V.shape[1], V)
        U = torch.einsum("bqp,bpd->bqd", W, V)
        signed = torch.einsum("bnd,bqd->bqn", self.patches, U).reshape(B, U.shape[1], *self.grid)
        scores = torch.einsum("bd,bqd->bq", self.features, U)
        return CamOutput(signed, scores, self.method, self.grid, self.input_size, self.features)


class _ViTMethod:
    """Shared set-up of the open_clip ViT methods (an :class:`OpenClipViT` adapter with a CLS-pooled tower)."""

    def __init__(self, adapter: OpenClipViT, method: str, amp_dtype: torch.dtype | None = None):
        if not isinstance(adapter, OpenClipViT) or not adapter.fast:
            raise ValueError(
                f"method {method!r} needs an open_clip ViT with CLS pooling and a projection (ViT-B-16, BioCLIP ...); "
                f"for ResNets use one of gradcam, layercam, scorecam"
            )
        self.adapter = adapter
        self.visual = adapter.visual
        self.method = method
        self.amp_dtype = amp_dtype


class DenseCLIP(_ViTMethod):
    """Forward-only dense patch-text similarity for open_clip ViTs (``maskclip``, ``clearclip``, ``sclip``,
    ``naclip``, ``gem``); see ``docs/methods.md`` for the equations.

    Parameters
    ----------
    adapter : OpenClipViT
        The model's adapter (CLS pooling, ``adapter.fast``).
    method : str
        One of :data:`traitloc.engine.methods.DENSE_METHODS`.
    naclip_sigma : float
        NACLIP's Gaussian neighbourhood standard deviation in patches (authors: 5).
    gem_depth : int
        GEM's ``depth`` (authors: 7, i.e. the last 6 blocks get the self-self attention path).
    gem_iterations : int
        GEM's self-self attention iterations (authors: 1).
    amp_dtype : torch.dtype, optional
        Autocast dtype on CUDA (``torch.bfloat16``), or ``None``.

    Examples
    --------
    A tiny random open_clip ViT; ``V`` stands for the text embeddings of a concept and a base prompt:

    >>> from open_clip.transformer import VisionTransformer
    >>> from traitloc.engine.adapters import clip_adapter
    >>> from traitloc.engine.cam import finer_coefficients
    >>> _ = torch.manual_seed(0)
    >>> visual = VisionTransformer(32, 16, width=32, layers=1, heads=2, mlp_ratio=2, output_dim=8).eval()
    >>> dense = DenseCLIP(clip_adapter(visual), "clearclip")
    >>> V = F.normalize(torch.randn(2, 8), dim=-1)
    >>> cache = dense.features(torch.randn(1, 3, 32, 32))  # one forward pass for any number of prompts
    >>> maps = [cache.combine(finer_coefficients(2, [0], [[1]], g), V).signed for g in (0.0, 0.5, 1.0)]
    >>> maps[0].shape, dense.forward_count
    (torch.Size([1, 1, 2, 2]), 1)
    """

    def __init__(
        self,
        adapter: OpenClipViT,
        method: str,
        *,
        naclip_sigma: float = 5.0,
        gem_depth: int = 7,
        gem_iterations: int = 1,
        amp_dtype: torch.dtype | None = None,
    ):
        if method not in DENSE_METHODS:
            raise ValueError(f"unknown dense method {method!r}; choose one of {', '.join(DENSE_METHODS)}")
        super().__init__(adapter, method, amp_dtype)
        if not naclip_sigma > 0:
            raise ValueError(f"naclip_sigma must be > 0, got {naclip_sigma}")
        if gem_depth < 2:
            raise ValueError(f"gem_depth must be >= 2, got {gem_depth}")
        if gem_iterations < 0:
            raise ValueError(f"gem_iterations must be >= 0, got {gem_iterations}")
        self.naclip_sigma = float(naclip_sigma)
        self.gem_blocks = min(gem_depth - 1, len(self.visual.transformer.resblocks))
        self.gem_iterations = gem_iterations
        self._omega: dict[tuple[tuple[int, int], torch.device], Tensor] = {}
        #: forward passes run so far (a cached re-gamma must not add any)
        self.forward_count = 0

    def features(self, x: Tensor | Prefix) -> DenseCache:
        """One forward pass: normalized patch embeddings and the CLS embedding of a batch.

        Parameters
        ----------
        x : Tensor or Prefix
            Image batch ``(B, 3, H, W)``, or (not for ``gem``) its :meth:`OpenClipViT.prefix
            <traitloc.engine.adapters.OpenClipViT.prefix>`.

        Returns
        -------
        DenseCache
        """
        is_pre = isinstance(x, Prefix)
        if is_pre and self.method == "gem":
            raise ValueError("gem needs the image, not a last-block prefix")
        grid = x.grid if is_pre else self.adapter.input_grid(x)  # type: ignore[union-attr,arg-type]
        size = x.input_size if is_pre else (int(x.shape[-2]), int(x.shape[-1]))  # type: ignore[union-attr]
        self.forward_count += 1
        with torch.no_grad(), _autocast((x.acts if is_pre else x).device, self.amp_dtype):  # type: ignore[union-attr]
            if self.method == "gem":
                patches, e = self._gem(x)  # type: ignore[arg-type]
            else:
                patches, e = self._last_block(x if is_pre else self.adapter.prefix(x))  # type: ignore[arg-type]
        patches = F.normalize(patches.float(), dim=-1)
        return DenseCache(patches, F.normalize(e.float(), dim=-1), grid, size, self.method)

    def __call__(self, x: Tensor, vectors: Tensor, coeffs: Tensor | None = None) -> CamOutput:
        """Maps of queries over explained vectors: :meth:`features` then :meth:`DenseCache.combine`.

        Parameters
        ----------
        x : Tensor
            Image batch ``(B, 3, H, W)``.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)``.
        coeffs : Tensor, optional
            Query coefficients ``(Q, P)`` or ``(B, Q, P)``; ``None`` explains each vector alone.

        Returns
        -------
        CamOutput
        """
        cache = self.features(x)
        V = _check_vectors(vectors, cache.patches.shape[0])
        if V.shape[1] == 0:
            raise ValueError("no explained vectors given")
        return cache.combine(torch.eye(V.shape[1]) if coeffs is None else coeffs, V)

    # -- the last-block variants --------------------------------------------------------------------------------------
    def _last_block(self, pre: Prefix) -> tuple[Tensor, Tensor]:
        v, blk = self.visual, self.adapter.block
        x = pre.extra["x_in"]
        a = torch.cat([pre.extra["a_cls"], pre.acts], 1)  # ln_1 of the last block's input, CLS first
        q, k, val = _qkv(blk, a)
        e = _head(v, _cls_output(blk, x, q, k, val))
        dh = q.shape[-1]
        m = self.method
        if m == "maskclip":  # identity attention: each token keeps its own value; residual and MLP as usual
            z = x[:, 1:] + blk.ls_1(_heads_out(blk, val[:, :, 1:]))
            z = z + blk.ls_2(blk.mlp(blk.ln_2(z)))
            return _head(v, z), e
        if m == "clearclip":
            p = (q @ q.transpose(-1, -2) * dh**-0.5).softmax(-1)
        elif m == "sclip":
            p = (q @ q.transpose(-1, -2) * dh**-0.5).softmax(-1) + (k @ k.transpose(-1, -2) * dh**-0.5).softmax(-1)
        else:  # naclip
            om = self._neighbourhood(pre.grid, a.device).to(k.dtype)
            p = (k @ k.transpose(-1, -2) * dh**-0.5 + om).softmax(-1)
        o = _heads_out(blk, p[:, :, 1:] @ val)  # patch rows only
        if m == "sclip":
            z = x[:, 1:] + blk.ls_1(o)
            z = z + blk.ls_2(blk.mlp(blk.ln_2(z)))
        else:  # clearclip, naclip: the attention output alone (no residual, no MLP)
            z = o
        return _head(v, z), e

    def _neighbourhood(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        key = (tuple(grid), device)
        if key not in self._omega:
            self._omega[key] = naclip_neighbourhood(grid, self.naclip_sigma, device)  # type: ignore[index]
        return self._omega[key]  # type: ignore[index]

    def _gem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.visual
        blocks = list(v.transformer.resblocks)
        n = self.gem_blocks
        t = self.adapter.tokens_until(x, n)
        x_gem = t
        for j, blk in enumerate(blocks[-n:]):
            a = blk.ln_1(t)
            q, k, val = _qkv(blk, a)
            x_gem = x_gem + blk.ls_1(_heads_out(blk, self._self_self(a, q, k, val)))
            if j == n - 1:  # the last block: only the CLS token's ordinary output is needed
                e = _head(v, _cls_output(blk, t, q, k, val))
            else:
                o = F.scaled_dot_product_attention(q, k, val)
                t = t + blk.ls_1(_heads_out(blk, o))
                t = t + blk.ls_2(blk.mlp(blk.ln_2(t)))
        return _head(v, x_gem[:, 1:]), e

    def _self_self(self, a: Tensor, q: Tensor, k: Tensor, val: Tensor) -> Tensor:
        """GEM's self-self attention: v-v, k-k and q-q attention (L2-normalized, inverse temperature from the mean
        token norm), iterated, each then applied to the values; the three are averaged. The three run as one batch
        of fused attention calls."""
        dh = q.shape[-1]
        inv_temp = (a.norm(dim=-1).mean(-1) * dh**-0.5).view(-1, 1, 1, 1, 1)
        t = F.normalize(torch.stack([val, k, q], 1), dim=-1)  # (B, 3, H, L, dh)
        for _ in range(self.gem_iterations):
            t = F.normalize(F.scaled_dot_product_attention(t * inv_temp, t, t, scale=1.0), dim=-1)
        out = F.scaled_dot_product_attention(t * inv_temp, t, val.unsqueeze(1).expand_as(t), scale=1.0)
        return out.mean(1)


@dataclass
class LeGradCache:
    """Per-vector LeGrad gradients of a batch: a new gamma or base is the last product and ReLU, no backward.

    Attributes
    ----------
    grads : Tensor
        ``(B, P, Lyr, L, C)`` per explained vector, layer and token, ``d s^(l) / d o`` (attention output, heads
        concatenated, before ``out_proj``).
    values : Tensor
        ``(B, Lyr, H, L, dh)`` the layers' attention values.
    features : Tensor
        ``(B, D)`` normalized CLS embedding (image-level scores).
    grid, input_size : tuple of int
        The patch grid ``(h, w)`` and the model input size ``(H, W)``.
    """

    grads: Tensor
    values: Tensor
    features: Tensor
    grid: tuple[int, int]
    input_size: tuple[int, int]

    def combine(self, coeffs: Tensor, vectors: Tensor | None = None) -> CamOutput:
        """Maps of queries from the cached gradients (no forward or backward pass).

        Parameters
        ----------
        coeffs : Tensor
            Query coefficients ``(Q, P)`` or ``(B, Q, P)``.
        vectors : Tensor, optional
            The explained vectors ``(P, D)`` or ``(B, P, D)``, for the scores (NaN without them).

        Returns
        -------
        CamOutput
            Non-negative maps ``(B, Q, h, w)``.
        """
        B, P = self.grads.shape[:2]
        W = _coeffs(coeffs, B, P, self.grads)
        g = torch.einsum("bqp,bp...->bq...", W, self.grads)  # (B, Q, Lyr, L, C)
        maps = sum(_relevance(g[:, :, i], self.values[:, i]) for i in range(g.shape[2]))
        scores = _query_scores(W, self.features, vectors)
        signed = maps.reshape(B, -1, *self.grid)  # type: ignore[union-attr]
        return CamOutput(signed, scores, "legrad", self.grid, self.input_size, self.features)


def _relevance(go: Tensor, val: Tensor) -> Tensor:
    """LeGrad's per-layer relevance of patch columns: ``mean_{h,i} ReLU(<go_{i,h}, v_{j,h}>)`` for j >= 1.

    ``go`` (B, Q, L, C) gradients w.r.t. the attention output (heads concatenated), ``val`` (B, H, L, dh).
    """
    B, Q, L, C = go.shape
    nh, dh = val.shape[1], val.shape[-1]
    gh = go.view(B, Q, L, nh, dh).transpose(2, 3)  # (B, Q, H, L, dh)
    dA = torch.einsum("bqhid,bhjd->bqhij", gh, val[:, :, 1:].to(gh.dtype))  # d s / d Attn, patch columns
    return dA.clamp_min(0).mean(dim=(2, 3))  # (B, Q, N)


class LeGrad(_ViTMethod):
    """LeGrad for open_clip ViTs, batched over prompts (closed-form backward of the last layers; no autograd).

    Parameters
    ----------
    adapter : OpenClipViT
        The model's adapter (CLS pooling).
    layers : int
        Number of last layers whose attention maps are explained (authors: 2, ``layer_index=-2``).
    vector_chunk : int
        Explained vectors x images processed at once (bounds memory: about ``chunk x heads x tokens^2`` and
        ``chunk x tokens x 4 x width`` floats).
    amp_dtype : torch.dtype, optional
        Autocast dtype on CUDA, or ``None``.
    """

    def __init__(
        self, adapter: OpenClipViT, *, layers: int = 2, vector_chunk: int = 32, amp_dtype: torch.dtype | None = None
    ):
        super().__init__(adapter, "legrad", amp_dtype)
        n_blocks = len(self.visual.transformer.resblocks)
        if not 1 <= layers <= n_blocks:
            raise ValueError(f"layers must be in [1, {n_blocks}], got {layers}")
        if vector_chunk < 1:
            raise ValueError(f"vector_chunk must be >= 1, got {vector_chunk}")
        self.layers = layers
        self.vector_chunk = vector_chunk
        self.forward_count = 0

    def _forward(self, x: Tensor) -> tuple[list[dict], Tensor, tuple[int, int]]:
        """Forward through the last layers keeping what the closed-form backward needs."""
        grid = self.adapter.input_grid(x)
        self.forward_count += 1
        v = self.visual
        t = self.adapter.tokens_until(x, self.layers)
        saved = []
        for blk in list(v.transformer.resblocks)[-self.layers :]:
            a = blk.ln_1(t)
            q, k, val = _qkv(blk, a)
            o = F.scaled_dot_product_attention(q, k, val)
            z = t + blk.ls_1(_heads_out(blk, o))
            m, xhat2, rstd2 = _layer_norm_parts(blk.ln_2, z)
            fc, act, proj2 = blk.mlp[0], blk.mlp[1], blk.mlp[2]
            h1 = fc(m)
            g, dact = activation_and_derivative(act, h1)
            t = z + blk.ls_2(proj2(g))
            pooled, xhatp, rstdp = _layer_norm_parts(v.ln_post, t.mean(1))
            e = pooled @ v.proj
            saved.append(
                {"blk": blk, "v": val, "xhat2": xhat2, "rstd2": rstd2, "dact": dact, "xhatp": xhatp, "rstdp": rstdp,
                 "e": e}
            )  # fmt: skip
        e_cls = _head(v, t[:, 0])
        return saved, F.normalize(e_cls.float(), dim=-1), grid

    def _grad_out(self, c: dict, U: Tensor) -> Tensor:
        """``d s / d o`` (B, Q, L, C) for query vectors U (B, Q, D): closed-form backward of one layer's score."""
        v, blk = self.visual, c["blk"]
        g = _normalize_backward(U.to(c["e"].dtype), c["e"])
        gp = _layer_norm_backward(g @ v.proj.t(), v.ln_post, c["xhatp"], c["rstdp"])  # (B, Q, C) wrt the mean
        gy = gp / c["v"].shape[2]  # every token's output gets the same cotangent
        gh = (gy * _layer_scale(blk.ls_2)) @ blk.mlp[2].weight  # (B, Q, 4C)
        gm = (gh.unsqueeze(2) * c["dact"].unsqueeze(1)) @ blk.mlp[0].weight  # (B, Q, L, C)
        gz = _layer_norm_backward(gm, blk.ln_2, c["xhat2"], c["rstd2"]) + gy.unsqueeze(2)
        return (gz * _layer_scale(blk.ls_1)) @ blk.attn.out_proj.weight

    def gradients(self, x: Tensor, vectors: Tensor) -> LeGradCache:
        """Per-vector gradients of a batch: cache them to try many gammas and bases without a backward pass.

        Parameters
        ----------
        x : Tensor
            Image batch ``(B, 3, H, W)``.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)``.

        Returns
        -------
        LeGradCache
        """
        with torch.no_grad(), _autocast(x.device, self.amp_dtype):
            saved, feats, grid = self._forward(x)
            V = _check_vectors(vectors, x.shape[0]).to(saved[0]["e"].dtype)
            step = max(1, self.vector_chunk // x.shape[0])
            grads = torch.stack(
                [torch.cat([self._grad_out(c, V[:, i : i + step]) for i in range(0, V.shape[1], step)], 1)
                 for c in saved], 2
            )  # fmt: skip
            values = torch.stack([c["v"] for c in saved], 1)
        return LeGradCache(grads.float(), values.float(), feats, grid, (int(x.shape[-2]), int(x.shape[-1])))

    def __call__(self, x: Tensor, vectors: Tensor, coeffs: Tensor | None = None) -> CamOutput:
        """Maps of queries over explained vectors (the gradients of the query vectors only, not cached).

        Parameters
        ----------
        x : Tensor
            Image batch ``(B, 3, H, W)``.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)``.
        coeffs : Tensor, optional
            Query coefficients ``(Q, P)`` or ``(B, Q, P)``; ``None`` explains each vector alone.

        Returns
        -------
        CamOutput
            Non-negative maps ``(B, Q, h, w)`` and the CLS scores.
        """
        B = x.shape[0]
        V = _check_vectors(vectors, B)
        P = V.shape[1]
        if P == 0:
            raise ValueError("no explained vectors given")
        W = _coeffs(torch.eye(P) if coeffs is None else coeffs, B, P, V.float())
        U = torch.einsum("bqp,bpd->bqd", W, V.float())  # the explained query vectors
        with torch.no_grad(), _autocast(x.device, self.amp_dtype):
            saved, feats, grid = self._forward(x)
            U = U.to(saved[0]["e"].dtype)
            step = max(1, self.vector_chunk // B)  # bounds the (B, chunk, heads, tokens, patches) gradients
            maps = [
                sum(_relevance(self._grad_out(c, U[:, i : i + step]), c["v"]) for c in saved)
                for i in range(0, U.shape[1], step)
            ]
            signed = torch.cat(maps, 1).float()  # type: ignore[arg-type]
        scores = torch.einsum("bd,bqd->bq", feats, U.float())
        return CamOutput(
            signed.reshape(B, -1, *grid), scores, "legrad", grid, (int(x.shape[-2]), int(x.shape[-1])), feats
        )
