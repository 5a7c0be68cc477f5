r"""The Finer-CAM engine: one engine explains any embedding-space vector.

For an image :math:`x` with target-layer activations :math:`A \in \mathbb{R}^{N \times C}` (N grid cells) and
explained vectors :math:`v_p` (text embeddings or classifier rows), every score is linear in the vector,
:math:`s_p(x) = \langle f(e(x)), v_p \rangle`. A *query* combines vectors with coefficients :math:`W`:

.. math::

    s_q = \sum_p W_{qp}\, s_p, \qquad \text{Finer: } s_q = s_c - \gamma \frac{1}{T}\sum_{t=1}^{T} s_{d_t}

(aggregation **before** the ReLU). The methods:

- Grad-CAM:  :math:`\alpha_{qk} = \frac{1}{N}\sum_i \partial s_q / \partial A_{ik}`,
  :math:`M_q = \mathrm{ReLU}(\sum_k \alpha_{qk} A_{\cdot k})`. Since :math:`\alpha` is linear in the vector,
  per-vector weights are computed once and any gamma/base/reference set is a matrix product
  (:class:`GradCache`).
- Layer-CAM: :math:`w_{qik} = \mathrm{ReLU}(\partial s_q / \partial A_{ik})`,
  :math:`M_q = \mathrm{ReLU}(\sum_k w_{qik} A_{ik})`.
- Score-CAM: channel masks :math:`H_k = \mathrm{minmax}(\mathrm{up}(A_{\cdot k}))`, scores
  :math:`S_{qk} = s_q(x \odot H_k)` from masked forward passes, weights :math:`\mathrm{softmax}_k(\tau S_{qk})`,
  :math:`M_q = \mathrm{ReLU}(\sum_k w_{qk} A_{\cdot k})`. ``tau`` is the model's logit scale for CLIP (so the
  softmax sees CLIP logits) and 1 for classifier logits.

``signed`` maps (before the final ReLU) are kept: negative values speak for the references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from traitloc.engine.adapters import Prefix, TargetAdapter, _check_vectors
from traitloc.engine.methods import CAM_METHODS

__all__ = [
    "METHODS",
    "CamOutput",
    "GradCache",
    "FinerCAM",
    "finer_coefficients",
    "upsample_maps",
]

#: the target-layer CAM methods, read from the method registry (:mod:`traitloc.engine.methods`)
METHODS = CAM_METHODS


def finer_coefficients(
    n_vectors: int,
    targets: Sequence[int],
    references: Sequence[Sequence[int]],
    gamma: float | Sequence[float],
) -> Tensor:
    """Coefficient matrix ``W`` (Q, P) for queries ``s_q = s_{target_q} - gamma_q * mean(s_{references_q})``.

    Parameters
    ----------
    n_vectors : number P of explained vectors.
    targets : index of the target vector of each query.
    references : reference vector indices of each query (may be empty: plain CAM of the target).
    gamma : comparison strength, one value or one per query. ``gamma = 0`` gives the plain CAM of the target.
    """
    if len(targets) != len(references):
        raise ValueError(f"got {len(targets)} targets but {len(references)} reference lists")
    gammas = [float(gamma)] * len(targets) if isinstance(gamma, (int, float)) else [float(g) for g in gamma]
    if len(gammas) != len(targets):
        raise ValueError(f"got {len(gammas)} gamma values for {len(targets)} queries")
    W = torch.zeros(len(targets), n_vectors)
    for q, (t, refs, g) in enumerate(zip(targets, references, gammas, strict=True)):
        if not 0 <= int(t) < n_vectors:
            raise ValueError(f"target index {t} out of range for {n_vectors} vectors")
        if g != g or abs(g) == float("inf"):
            raise ValueError(f"gamma must be finite, got {g}")
        W[q, int(t)] += 1.0
        refs = [int(r) for r in refs]
        for r in refs:
            if not 0 <= r < n_vectors:
                raise ValueError(f"reference index {r} out of range for {n_vectors} vectors")
            W[q, r] -= g / len(refs)
    return W


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of grid maps ``(..., h, w)`` to ``size`` = (H, W)."""
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    m = F.interpolate(m, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return m.reshape(*lead, *m.shape[-2:])


@dataclass
class CamOutput:
    """Maps of a batch of queries on the activation grid.

    Attributes
    ----------
    signed : (B, Q, h, w) pre-ReLU maps (negative = evidence for the references).
    scores : (B, Q) the explained objective ``s_q`` for each image and query.
    """

    signed: Tensor
    scores: Tensor
    method: str
    grid: tuple[int, int]
    input_size: tuple[int, int]
    features: Tensor | None = None  # (B, D) f(e): per-vector scores are ``features @ v``

    @property
    def maps(self) -> Tensor:
        """(B, Q, h, w) ReLU maps."""
        return self.signed.clamp_min(0)

    def upsampled(self, size: tuple[int, int] | None = None, signed: bool = False) -> Tensor:
        """Maps brought to ``size`` (default: the model input size) by bilinear interpolation."""
        return upsample_maps(self.signed if signed else self.maps, size or self.input_size)


@dataclass
class GradCache:
    """Per-vector Grad-CAM weights of a batch: new gammas, bases or references need no new backward pass."""

    prefix: Prefix
    alphas: Tensor  # (B, P, C)
    features: Tensor  # (B, D): f(e), scores are features @ v

    def combine(self, coeffs: Tensor, vectors: Tensor | None = None) -> CamOutput:
        """Maps for queries ``coeffs`` (Q, P) or (B, Q, P)."""
        W = _coeffs(coeffs, self.alphas.shape[0], self.alphas.shape[1], self.alphas)
        a = _mix(W, self.alphas)
        signed = torch.einsum("bnc,bqc->bqn", self.prefix.acts.to(a.dtype), a)
        h, w = self.prefix.grid
        scores = torch.full(signed.shape[:2], float("nan"), device=signed.device)
        if vectors is not None:
            V = _check_vectors(vectors, self.alphas.shape[0]).to(self.features.dtype)
            scores = torch.einsum("bqp,bp->bq", W.to(V.dtype), torch.einsum("bd,bpd->bp", self.features, V))
        signed = signed.reshape(*signed.shape[:2], h, w)
        return CamOutput(signed, scores, "gradcam", self.prefix.grid, self.prefix.input_size, self.features)


def _mix(W: Tensor, alphas: Tensor) -> Tensor:
    """``einsum('bqp,bpc->bqc')``; Finer queries touch 1 + T of P vectors, so a sparse product keeps this linear
    in P instead of Q x P (which would pass a forward pass in cost at a few thousand prompts)."""
    B, Q, P = W.shape
    if Q * P < 4096 or (W != 0).sum() > 0.05 * W.numel():
        return torch.einsum("bqp,bpc->bqc", W, alphas)
    return torch.stack([torch.sparse.mm(W[b].to_sparse(), alphas[b]) for b in range(B)])


def _coeffs(coeffs: Tensor, B: int, P: int, like: Tensor) -> Tensor:
    W = torch.as_tensor(coeffs)
    if W.ndim == 2:
        W = W.unsqueeze(0).expand(B, -1, -1)
    if W.ndim != 3 or W.shape[0] != B or W.shape[2] != P:
        raise ValueError(f"coefficients must be (Q, P={P}) or (B={B}, Q, P={P}), got {tuple(W.shape)}")
    return W.to(device=like.device, dtype=like.dtype)


class FinerCAM:
    """Finer-CAM over a :class:`~traitloc.engine.adapters.TargetAdapter`.

    Parameters
    ----------
    adapter : splits the model at its target layer and gives gradients.
    method : ``"gradcam"`` (default), ``"layercam"`` or ``"scorecam"``.
    score_temperature : Score-CAM softmax temperature ``tau`` (CLIP: the model's logit scale).
    scorecam_channels : Score-CAM channel budget: only the ``k`` channels with the largest spatial variance of
        activation are used as masks (``None``: all channels, as in the original method).
    scorecam_batch : masked images per forward pass.
    amp_dtype : autocast dtype on CUDA (e.g. ``torch.bfloat16``); ``None`` for full precision.

    Examples
    --------
    >>> cam = FinerCAM(clip_adapter(model.visual))                    # doctest: +SKIP
    >>> W = finer_coefficients(2, targets=[0], references=[[1]], gamma=1.0)
    >>> out = cam(x, torch.stack([v_red_epaulets, v_bird]), W)         # doctest: +SKIP
    >>> out.upsampled().shape                                         # (B, 1, H, W)
    """

    def __init__(
        self,
        adapter: TargetAdapter,
        method: str = "gradcam",
        *,
        score_temperature: float = 1.0,
        scorecam_channels: int | None = None,
        scorecam_batch: int = 32,
        amp_dtype: torch.dtype | None = None,
    ):
        if not isinstance(adapter, TargetAdapter):
            raise TypeError(f"adapter must be a TargetAdapter, got {type(adapter).__name__}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if scorecam_channels is not None and scorecam_channels < 1:
            raise ValueError(f"scorecam_channels must be >= 1 or None, got {scorecam_channels}")
        if scorecam_batch < 1:
            raise ValueError(f"scorecam_batch must be >= 1, got {scorecam_batch}")
        self.adapter = adapter
        self.method = method
        self.score_temperature = float(score_temperature)
        self.scorecam_channels = scorecam_channels
        self.scorecam_batch = scorecam_batch
        self.amp_dtype = amp_dtype

    def _autocast(self, device: torch.device):
        enabled = self.amp_dtype is not None and device.type == "cuda"
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=enabled)

    def prefix(self, x: Tensor) -> Prefix:
        """Run the model up to the target layer (no gradients)."""
        with self._autocast(x.device):
            pre = self.adapter.prefix(x)
        if pre.acts.dtype != torch.float32 and self.amp_dtype is None:
            pre.acts = pre.acts.float()
        return pre

    def gradients(self, x: Tensor | Prefix, vectors: Tensor) -> GradCache:
        """Per-vector Grad-CAM weights for a batch (cache them to try many gammas/bases cheaply)."""
        pre = x if isinstance(x, Prefix) else self.prefix(x)
        vectors = _check_vectors(vectors, pre.batch)
        with self._autocast(pre.acts.device):
            alphas = self.adapter.grad_mean(pre, vectors.to(pre.acts.dtype))
            feats = self.adapter.features(pre)
        return GradCache(prefix=pre, alphas=alphas.float(), features=feats.float())

    def __call__(
        self, x: Tensor, vectors: Tensor, coeffs: Tensor | None = None, *, prefix: Prefix | None = None
    ) -> CamOutput:
        """Maps for queries ``coeffs`` (Q, P) over explained ``vectors`` (P, D) or (B, P, D).

        ``coeffs=None`` explains each vector alone (plain CAM, ``W = I``). ``prefix``: reuse a prefix of ``x``.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be an image batch (B, 3, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        vectors = _check_vectors(vectors, B)
        P = vectors.shape[1]
        if P == 0:
            raise ValueError("no explained vectors given")
        if coeffs is None:
            coeffs = torch.eye(P)
        pre = prefix if prefix is not None else self.prefix(x)
        if self.method == "gradcam":
            return self.gradients(pre, vectors).combine(coeffs, vectors)
        W = _coeffs(coeffs, B, P, vectors)
        U = torch.einsum("bqp,bpd->bqd", W, vectors.float())  # the explained query vectors
        with self._autocast(x.device):
            feats = self.adapter.features(pre).float()
        scores = torch.einsum("bd,bqd->bq", feats, U)
        h, w = pre.grid
        if self.method == "layercam":
            with self._autocast(x.device):
                g = self.adapter.grad_cells(pre, U.to(pre.acts.dtype)).float()  # (B, Q, N, C)
            signed = (g.clamp_min(0) * pre.acts.float().unsqueeze(1)).sum(-1)
        else:
            signed = self._scorecam(x, pre, U)
        return CamOutput(signed.reshape(B, -1, h, w), scores, self.method, pre.grid, pre.input_size, feats)

    def _scorecam(self, x: Tensor, pre: Prefix, U: Tensor) -> Tensor:
        acts = pre.acts.float()  # (B, N, C)
        B, N, C = acts.shape
        h, w = pre.grid
        if self.scorecam_channels is not None and self.scorecam_channels < C:
            chans = acts.var(1).topk(self.scorecam_channels, dim=-1).indices  # (B, K)
        else:
            chans = torch.arange(C, device=acts.device).unsqueeze(0).expand(B, -1)
        K = chans.shape[1]
        sel = torch.gather(acts, 2, chans.unsqueeze(1).expand(-1, N, -1))  # (B, N, K)
        out = torch.empty(B, U.shape[1], N, device=acts.device)
        for b in range(B):
            masks = upsample_maps(sel[b].t().reshape(K, h, w), pre.input_size)  # (K, H, W)
            lo = masks.flatten(1).min(1).values[:, None, None]
            hi = masks.flatten(1).max(1).values[:, None, None]
            masks = torch.where(hi > lo, (masks - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(masks))
            feats = []
            for i in range(0, K, self.scorecam_batch):
                xm = x[b : b + 1] * masks[i : i + self.scorecam_batch].unsqueeze(1).to(x.dtype)
                with torch.no_grad(), self._autocast(x.device):
                    feats.append(self.adapter.score_features(self.adapter.embed(xm)).float())
            S = torch.cat(feats) @ U[b].t()  # (K, Q)
            wts = (self.score_temperature * S).softmax(0)  # softmax over channels
            out[b] = wts.t() @ sel[b].t()  # (Q, N)
        return out
