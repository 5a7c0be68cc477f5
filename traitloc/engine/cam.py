"""The Finer-CAM engine: Grad-CAM, Layer-CAM and Score-CAM of any embedding-space vector, with the Finer contrast.

Every score is linear in the explained vector (a text embedding or a classifier row), so a query is a combination of
vectors, the Finer contrast ``s_q = s_c - gamma * mean_t s_{d_t}`` aggregated **before** the ReLU, and per-vector
Grad-CAM weights are cached for any gamma, base or reference set (:class:`GradCache`). ``signed`` maps (before the
final ReLU) are kept: negative values speak for the references. Definitions, and why each fast path is exact:
``docs/engine.md`` ("Reference definition" onwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from traitloc.engine.adapters import Adapter, Prefix, _check_vectors
from traitloc.engine.methods import CAM_METHODS

__all__ = [
    "METHODS",
    "CamOutput",
    "GradCache",
    "FinerCAM",
    "finer_coefficients",
    "layercam_maps",
    "scorecam_maps",
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
    n_vectors : int
        Number P of explained vectors.
    targets : sequence of int
        Index of the target vector of each query.
    references : sequence of sequences of int
        Reference vector indices of each query (may be empty: plain CAM of the target).
    gamma : float or sequence of float
        Comparison strength, one value or one per query (any finite value). ``gamma = 0`` gives the plain CAM of the
        target.

    Returns
    -------
    Tensor
        ``(Q, P)`` float32; row ``q`` is ``+1`` at the target and ``-gamma_q / T_q`` at each of its ``T_q``
        references.

    Raises
    ------
    ValueError
        For an index out of range, a gamma that is not finite, or lists of different lengths.

    Examples
    --------
    >>> finer_coefficients(4, targets=[0, 1], references=[[2, 3], []], gamma=0.6)
    tensor([[ 1.0000,  0.0000, -0.3000, -0.3000],
            [ 0.0000,  1.0000,  0.0000,  0.0000]])
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
    """Bilinear upsampling (``align_corners=False``) of grid maps to an image size.

    Parameters
    ----------
    maps : Tensor
        ``(..., h, w)`` grid maps (any leading dimensions).
    size : tuple of int
        The wanted ``(H, W)``.

    Returns
    -------
    Tensor
        ``(..., H, W)`` float32.

    Examples
    --------
    >>> upsample_maps(torch.tensor([[0.0, 1.0]]), (1, 4))
    tensor([[0.0000, 0.2500, 0.7500, 1.0000]])
    """
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    m = F.interpolate(m, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return m.reshape(*lead, *m.shape[-2:])


def layercam_maps(grads: Tensor, acts: Tensor) -> Tensor:
    """Layer-CAM's signed maps ``sum_k ReLU(d s_q / d A_ik) A_ik``, (B, Q, N), from per-cell gradients (B, Q, N, C)
    and activations (B, N, C).

    The gradients are linear in the explained vector, so per-vector gradients can be cached and combined with the
    Finer coefficients before this ReLU (the review app's Query page does: a new gamma needs no backward pass).
    """
    return (grads.float().clamp_min(0) * acts.float().unsqueeze(1)).sum(-1)


def scorecam_maps(sel: Tensor, feats: Tensor, U: Tensor, temperature: float) -> Tensor:
    """Score-CAM's signed maps (B, Q, N) of query vectors ``U`` (B, Q, D) from the masked passes of
    :meth:`FinerCAM.scorecam_features`: ``sel`` (B, N, K) channels and ``feats`` (B, K, D) masked features.

    Each map is the softmax over the K channels of ``temperature * feats @ u`` weighting the channels' activations.
    """
    out = torch.empty(sel.shape[0], U.shape[1], sel.shape[1], device=sel.device)
    for b in range(sel.shape[0]):
        wts = (temperature * (feats[b] @ U[b].t())).softmax(0)  # (K, Q), softmax over channels
        out[b] = wts.t() @ sel[b].t()  # (Q, N)
    return out


@dataclass
class CamOutput:
    """Maps of a batch of queries on the activation grid.

    Attributes
    ----------
    signed : Tensor
        ``(B, Q, h, w)`` pre-ReLU maps (negative = evidence for the references).
    scores : Tensor
        ``(B, Q)`` the explained objective ``s_q`` for each image and query (NaN where it was not computed).
    method : str
        The method's registry name.
    grid : tuple of int
        The activation grid ``(h, w)``.
    input_size : tuple of int
        The model input size ``(H, W)`` the grid covers.
    features : Tensor or None
        ``(B, D)`` ``f(e)``: per-vector scores are ``features @ v``.
    """

    signed: Tensor
    scores: Tensor
    method: str
    grid: tuple[int, int]
    input_size: tuple[int, int]
    features: Tensor | None = None

    @property
    def maps(self) -> Tensor:
        """(B, Q, h, w) ReLU maps."""
        return self.signed.clamp_min(0)

    def upsampled(self, size: tuple[int, int] | None = None, signed: bool = False) -> Tensor:
        """Maps brought to ``size`` (default: the model input size) by bilinear interpolation (:func:`upsample_maps`).

        Parameters
        ----------
        size : tuple of int, optional
            ``(H, W)``; default :attr:`input_size`.
        signed : bool
            Upsample the signed maps instead of the ReLU maps.

        Returns
        -------
        Tensor
            ``(B, Q, H, W)``.
        """
        return upsample_maps(self.signed if signed else self.maps, size or self.input_size)


@dataclass
class GradCache:
    """Per-vector Grad-CAM weights of a batch: new gammas, bases or references need no new backward pass.

    Grad-CAM weights are linear in the explained vector, so the weights of any query are ``W @ alphas``
    (``docs/engine.md``, "Re-gamma without a forward pass").

    Attributes
    ----------
    prefix : Prefix
        The batch's target-layer activations.
    alphas : Tensor
        ``(B, P, C)`` per-vector Grad-CAM weights.
    features : Tensor
        ``(B, D)`` ``f(e)``: per-vector scores are ``features @ v``.
    """

    prefix: Prefix
    alphas: Tensor
    features: Tensor

    def combine(self, coeffs: Tensor, vectors: Tensor | None = None) -> CamOutput:
        """Maps for queries, from the cached weights (no forward or backward pass).

        Parameters
        ----------
        coeffs : Tensor
            Query coefficients ``(Q, P)`` or ``(B, Q, P)`` (e.g. :func:`finer_coefficients`).
        vectors : Tensor, optional
            The explained vectors ``(P, D)`` or ``(B, P, D)``, for the scores (NaN without them).

        Returns
        -------
        CamOutput
        """
        W = _coeffs(coeffs, self.alphas.shape[0], self.alphas.shape[1], self.alphas)
        a = _mix(W, self.alphas)
        signed = torch.einsum("bnc,bqc->bqn", self.prefix.acts.to(a.dtype), a)
        scores = _query_scores(W, self.features, vectors)
        signed = signed.reshape(*signed.shape[:2], *self.prefix.grid)
        return CamOutput(signed, scores, "gradcam", self.prefix.grid, self.prefix.input_size, self.features)


def _query_scores(W: Tensor, features: Tensor, vectors: Tensor | None) -> Tensor:
    """Scores ``(B, Q)`` of queries ``W`` (B, Q, P) as the same combination of the per-vector scores ``f(e) . v_p``;
    NaN without the vectors."""
    if vectors is None:
        return torch.full(W.shape[:2], float("nan"), device=features.device)
    V = _check_vectors(vectors, W.shape[0]).to(features.dtype)
    return torch.einsum("bqp,bp->bq", W.to(V.dtype), torch.einsum("bd,bpd->bp", features, V))


def _mix(W: Tensor, alphas: Tensor) -> Tensor:
    """``einsum('bqp,bpc->bqc')``; Finer queries touch 1 + T of P vectors, so a sparse product keeps this linear
    in P instead of Q x P (which would pass a forward pass in cost at a few thousand prompts)."""
    B, Q, P = W.shape
    if Q * P < 4096 or (W != 0).sum() > 0.05 * W.numel():
        return torch.einsum("bqp,bpc->bqc", W, alphas)
    return torch.stack([torch.sparse.mm(W[b].to_sparse(), alphas[b]) for b in range(B)])


def _coeffs(coeffs: Tensor, B: int, P: int, like: Tensor) -> Tensor:
    """Query coefficients as ``(B, Q, P)`` on ``like``'s device and dtype, with a clear error."""
    W = torch.as_tensor(coeffs)
    if W.ndim == 2:
        W = W.unsqueeze(0).expand(B, -1, -1)
    if W.ndim != 3 or W.shape[0] != B or W.shape[2] != P:
        raise ValueError(f"coefficients must be (Q, P={P}) or (B={B}, Q, P={P}), got {tuple(W.shape)}")
    return W.to(device=like.device, dtype=like.dtype)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype`` on CUDA; a disabled one on other devices or for ``amp_dtype=None``."""
    enabled = amp_dtype is not None and device.type == "cuda"
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=enabled)


class FinerCAM:
    """Finer-CAM over an :class:`~traitloc.engine.adapters.Adapter` (e.g. a ``TargetAdapter``).

    Parameters
    ----------
    adapter : Adapter
        Splits the model at its target layer and gives gradients.
    method : str
        ``"gradcam"`` (default), ``"layercam"`` or ``"scorecam"``.
    score_temperature : float
        Score-CAM softmax temperature ``tau`` (CLIP: the model's logit scale).
    scorecam_channels : int, optional
        Score-CAM channel budget: only the ``k`` channels with the largest spatial variance of activation are used
        as masks (``None``: all channels, as in the original method).
    scorecam_batch : int
        Masked images per forward pass.
    amp_dtype : torch.dtype, optional
        Autocast dtype on CUDA (e.g. ``torch.bfloat16``); ``None`` for full precision.

    Examples
    --------
    A tiny random open_clip ViT (32 px, 2 x 2 patches); ``V`` stands for the text embeddings of a concept and a
    base prompt:

    >>> from open_clip.transformer import VisionTransformer
    >>> from traitloc.engine.adapters import clip_adapter
    >>> _ = torch.manual_seed(0)
    >>> visual = VisionTransformer(32, 16, width=32, layers=1, heads=2, mlp_ratio=2, output_dim=8).eval()
    >>> cam = FinerCAM(clip_adapter(visual))
    >>> V = F.normalize(torch.randn(2, 8), dim=-1)
    >>> W = finer_coefficients(2, targets=[0], references=[[1]], gamma=1.0)
    >>> out = cam(torch.randn(1, 3, 32, 32), V, W)
    >>> out.signed.shape, out.upsampled().shape
    (torch.Size([1, 1, 2, 2]), torch.Size([1, 1, 32, 32]))
    """

    def __init__(
        self,
        adapter: Adapter,
        method: str = "gradcam",
        *,
        score_temperature: float = 1.0,
        scorecam_channels: int | None = None,
        scorecam_batch: int = 32,
        amp_dtype: torch.dtype | None = None,
    ):
        if not isinstance(adapter, Adapter):
            raise TypeError(f"adapter must implement traitloc.engine.adapters.Adapter, got {type(adapter).__name__}")
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

    def prefix(self, x: Tensor) -> Prefix:
        """Run the model up to the target layer (no gradients); reuse it with ``prefix=`` or :meth:`gradients`."""
        with _autocast(x.device, self.amp_dtype):
            pre = self.adapter.prefix(x)
        if pre.acts.dtype != torch.float32 and self.amp_dtype is None:
            pre.acts = pre.acts.float()
        return pre

    def gradients(self, x: Tensor | Prefix, vectors: Tensor) -> GradCache:
        """Per-vector Grad-CAM weights of a batch: cache them to try many gammas, bases or references cheaply.

        Parameters
        ----------
        x : Tensor or Prefix
            Image batch ``(B, 3, H, W)`` or its :meth:`prefix`.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)``.

        Returns
        -------
        GradCache
            Its :meth:`GradCache.combine` gives the maps of any queries over these vectors.
        """
        pre = x if isinstance(x, Prefix) else self.prefix(x)
        vectors = _check_vectors(vectors, pre.batch)
        with _autocast(pre.acts.device, self.amp_dtype):
            alphas = self.adapter.grad_mean(pre, vectors.to(pre.acts.dtype))
            feats = self.adapter.features(pre)
        return GradCache(prefix=pre, alphas=alphas.float(), features=feats.float())

    def __call__(
        self, x: Tensor, vectors: Tensor, coeffs: Tensor | None = None, *, prefix: Prefix | None = None
    ) -> CamOutput:
        """Maps of queries over explained vectors.

        Parameters
        ----------
        x : Tensor
            Normalized image batch ``(B, 3, H, W)``.
        vectors : Tensor
            Explained vectors ``(P, D)`` or ``(B, P, D)`` (text embeddings, classifier rows).
        coeffs : Tensor, optional
            Query coefficients ``(Q, P)`` or ``(B, Q, P)`` (:func:`finer_coefficients`); ``None`` explains each
            vector alone (plain CAM, ``W = I``).
        prefix : Prefix, optional
            A prefix of ``x`` already computed (:meth:`prefix`).

        Returns
        -------
        CamOutput
            Signed maps ``(B, Q, h, w)`` and scores ``(B, Q)``.
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
        with _autocast(x.device, self.amp_dtype):
            feats = self.adapter.features(pre).float()
        scores = torch.einsum("bd,bqd->bq", feats, U)
        h, w = pre.grid
        if self.method == "layercam":
            with _autocast(x.device, self.amp_dtype):
                g = self.adapter.grad_cells(pre, U.to(pre.acts.dtype))  # (B, Q, N, C)
            signed = layercam_maps(g, pre.acts)
        else:
            signed = self._scorecam(x, pre, U)
        return CamOutput(signed.reshape(B, -1, h, w), scores, self.method, pre.grid, pre.input_size, feats)

    def scorecam_features(
        self, x: Tensor, pre: Prefix, progress: Callable[[int, int], None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Score-CAM's masked forward passes of a batch; they do not depend on the explained vectors.

        Returns ``sel`` (B, N, K), the K channels used as masks (the ``scorecam_channels`` of largest spatial
        variance of activation), and ``feats`` (B, K, D), the features of the image times each channel's upsampled,
        min-max normalized map: the scores of any vector ``u`` are ``feats @ u``, so the features serve every gamma
        and base prompt (the review app caches them per image). ``progress(done, K)`` after each batch of passes.
        """
        acts = pre.acts.float()  # (B, N, C)
        B, N, C = acts.shape
        h, w = pre.grid
        if self.scorecam_channels is not None and self.scorecam_channels < C:
            chans = acts.var(1).topk(self.scorecam_channels, dim=-1).indices  # (B, K)
        else:
            chans = torch.arange(C, device=acts.device).unsqueeze(0).expand(B, -1)
        K = chans.shape[1]
        sel = torch.gather(acts, 2, chans.unsqueeze(1).expand(-1, N, -1))  # (B, N, K)
        out = []
        for b in range(B):
            masks = upsample_maps(sel[b].t().reshape(K, h, w), pre.input_size)  # (K, H, W)
            lo = masks.flatten(1).min(1).values[:, None, None]
            hi = masks.flatten(1).max(1).values[:, None, None]
            masks = torch.where(hi > lo, (masks - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(masks))
            feats = []
            for i in range(0, K, self.scorecam_batch):
                xm = x[b : b + 1] * masks[i : i + self.scorecam_batch].unsqueeze(1).to(x.dtype)
                with torch.no_grad(), _autocast(x.device, self.amp_dtype):
                    feats.append(self.adapter.score_features(self.adapter.embed(xm)).float())
                if progress is not None:
                    progress(min(i + self.scorecam_batch, K), K)
            out.append(torch.cat(feats))
        return sel, torch.stack(out)

    def _scorecam(self, x: Tensor, pre: Prefix, U: Tensor) -> Tensor:
        sel, feats = self.scorecam_features(x, pre)
        return scorecam_maps(sel, feats, U, self.score_temperature)
