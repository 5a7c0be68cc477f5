r"""Classifier explanation: similar-class selection, the Finer-CAM classifier explainer and
:class:`ClassifierBundle`, what the pipelines consume (``docs/engine.md``; ``traitloc explain``, ``evaluate``,
``audit``). Linear probes and their loader are :mod:`traitloc.models.probes`; the hook adapter for any PyTorch
model is :mod:`traitloc.engine.hooks`.

A classifier's logit for class :math:`c` is :math:`z_c = \langle f(e(x)), w_c\rangle + b_c` where :math:`e` is the
model output at the explained layer (the features a linear head reads, or the logits themselves with
:math:`W = I`). The bias does not change gradients, so class :math:`c` against references :math:`d_1..d_T` is
explained with the engine's vectors :math:`v = w` and the Finer objective

.. math::

    s = z_c - \gamma \frac{1}{T} \sum_{t=1}^{T} z_{d_t}
    \qquad (\text{reverse: } s = \frac{1}{T}\sum_t z_{d_t} - \gamma z_c).

Default references are the :math:`T = 3` classes whose logits are closest to the target's (target excluded), as in
Finer-CAM and torchcam's ``FinerCAM``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitloc.engine.adapters import Adapter, Prefix
from traitloc.engine.cam import CamOutput, FinerCAM
from traitloc.engine.hooks import HookAdapter

__all__ = ["ClassifierBundle", "similar_classes", "similar_by_weights", "Explanation", "ClassifierExplainer"]


class ClassifierBundle(Protocol):
    """A loaded classifier as the pipelines use it (``explain``, ``evaluate``, ``audit``).

    :func:`traitloc.models.probes.load_probe_classifier` and ``traitloc.pipelines.explain.load_classifier`` return one
    (a :class:`~traitloc.models.probes.ProbeClassifier`), built from a probe folder or from the ``MODULE:FUNCTION``
    mapping of :mod:`traitloc.models.backbones` (``model``, ``target_layer``, ``preprocess``, ``class_names``).
    """

    explainer: ClassifierExplainer  #: Grad-CAM explainer over the target layer and the head
    class_names: list[str]
    meta: dict[str, Any]  #: the probe's JSON (empty for a ``--classifier``)
    describe: dict[str, Any]  #: what ``run.json`` records
    model: nn.Module | None  #: normalized image batch -> logits (B, K)
    device: torch.device

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """PIL image -> normalized (3, H, W) tensor."""

    @property
    def adapter(self) -> Adapter:
        """The target-layer adapter."""

    @property
    def weight(self) -> Tensor:
        """(K, D) head weight."""

    @property
    def bias(self) -> Tensor | None:
        """(K,) head bias or ``None``."""

    @property
    def target_layer(self) -> str:
        """The explained layer's name."""


# ------------------------------------------------------------------------------------------------------------------
# similar classes
# ------------------------------------------------------------------------------------------------------------------
def _as_targets(target: Tensor | Sequence[int] | int, B: int, K: int) -> Tensor:
    t = torch.as_tensor(target)
    if t.ndim == 0:
        t = t.expand(B)
    if t.ndim != 1 or t.shape[0] != B or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"target must be an int or {B} class indices, got {tuple(t.shape)} {t.dtype}")
    if (t < 0).any() or (t >= K).any():
        raise ValueError(f"target index out of range for {K} classes: {t.tolist()}")
    return t.long()


def _check_k(k: int, K: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K - 1:
        raise ValueError(f"k must be an int in [1, {K - 1}] (the other classes), got {k!r}")


def similar_classes(logits: Tensor, target: Tensor | Sequence[int] | int, k: int = 3) -> Tensor:
    """The ``k`` classes whose logits are closest to the target's logit, target excluded.

    Distance is ``|z_j - z_target|``; ties go to the lower class index. This is Finer-CAM's (and torchcam's) default
    reference choice.

    Parameters
    ----------
    logits : (B, K) scores.
    target : (B,) target classes (or one int for all images).
    k : number of references, ``1 <= k <= K - 1``.

    Returns
    -------
    (B, k) long tensor, closest first.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a (B, K) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    B, K = logits.shape
    _check_k(k, K)
    t = _as_targets(target, B, K).to(logits.device)
    z = logits.detach().double()
    d = (z - z.gather(1, t[:, None])).abs()
    d.scatter_(1, t[:, None], float("inf"))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def similar_by_weights(weight: Tensor, target: Tensor | Sequence[int] | int, k: int = 3) -> Tensor:
    """The ``k`` classifier rows most cosine-similar to the target's row, target excluded (ties: lower index).

    Parameters
    ----------
    weight : (K, D) classifier weight.
    target : one class index (returns (k,)) or several (returns (B, k)).
    """
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a (K, D) tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    K = weight.shape[0]
    _check_k(k, K)
    single = torch.as_tensor(target).ndim == 0
    t = torch.as_tensor(target).reshape(-1)
    t = _as_targets(t, t.shape[0], K).to(weight.device)
    wn = F.normalize(weight.detach().double(), dim=1)
    cos = wn[t] @ wn.t()  # (B, K)
    cos.scatter_(1, t[:, None], -float("inf"))
    out = torch.sort(-cos, dim=1, stable=True).indices[:, :k]
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------------------------
# the classifier explainer
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Explanation:
    """Finer-CAM explanations of a batch of images, one query per image.

    Attributes
    ----------
    cam : the engine's output; ``cam.signed`` is (B, 1, h, w) (negative = evidence for the references, or for the
        target with ``reverse=True``); ``cam.scores`` is the explained objective without the head's bias.
    logits : (B, K) classifier logits (with bias).
    predicted, targets : class index per image.
    references : reference class indices per image.
    """

    cam: CamOutput
    logits: Tensor
    predicted: list[int]
    targets: list[int]
    references: list[list[int]]
    gamma: float
    reverse: bool
    method: str
    class_names: list[str] = field(repr=False)

    @property
    def maps(self) -> Tensor:
        """(B, h, w) ReLU maps on the target layer's grid."""
        return self.cam.maps[:, 0]

    @property
    def signed(self) -> Tensor:
        """(B, h, w) signed maps."""
        return self.cam.signed[:, 0]

    def upsampled(self, size: tuple[int, int] | None = None, signed: bool = False) -> Tensor:
        """(B, H, W) maps bilinearly upsampled to ``size`` (default: the model input size)."""
        return self.cam.upsampled(size, signed=signed)[:, 0]

    @property
    def target_names(self) -> list[str]:
        """Target class name per image."""
        return [self.class_names[t] for t in self.targets]

    @property
    def predicted_names(self) -> list[str]:
        """Predicted class name per image."""
        return [self.class_names[p] for p in self.predicted]

    @property
    def reference_names(self) -> list[list[str]]:
        """Reference class names per image."""
        return [[self.class_names[r] for r in refs] for refs in self.references]


def _is_auto(t: Any) -> bool:
    return isinstance(t, str) and t == "auto"


class ClassifierExplainer:
    r"""Finer-CAM for a linear classifier on a model's output.

    The logits are ``z = f(e(x)) @ weight.T + bias`` with ``e`` the adapter's output and ``f`` its normalization.
    For image :math:`b` with target :math:`c_b` and references :math:`D_b`, the explained objective is
    :math:`z_{c_b} - \gamma\,\mathrm{mean}_{d\in D_b} z_d` (``reverse=True``:
    :math:`\mathrm{mean}_{d} z_d - \gamma z_{c_b}`), aggregated before the ReLU.

    Parameters
    ----------
    adapter : an :class:`~traitloc.engine.adapters.Adapter` (e.g. :class:`~traitloc.engine.hooks.HookAdapter`,
        ``clip_adapter``).
    weight : (K, D) head weight (``torch.eye(K)`` for a model that outputs logits).
    bias : (K,) head bias or ``None`` (only used to report logits and choose references).
    class_names : K names (``"--target NAME"`` lookups).
    method : ``"gradcam"``, ``"layercam"`` or ``"scorecam"``.
    **cam_kwargs : passed to :class:`~traitloc.engine.cam.FinerCAM` (``amp_dtype``, ``scorecam_channels``...).

    Examples
    --------
    >>> explainer = ClassifierExplainer.from_model(model, "layer4", class_names)   # doctest: +SKIP
    >>> res = explainer.explain(x, target="auto", gamma=0.6)                       # doctest: +SKIP
    >>> res.upsampled().shape  # (B, H, W)                                          # doctest: +SKIP
    """

    def __init__(
        self,
        adapter: Adapter,
        weight: Tensor,
        bias: Tensor | None,
        class_names: Sequence[str],
        method: str = "gradcam",
        **cam_kwargs: Any,
    ):
        if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a float (K, D) tensor, got {getattr(weight, 'shape', weight)!r}")
        K = int(weight.shape[0])
        if K < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {K}")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (K,)):
            raise ValueError(f"bias must be a ({K},) tensor or None, got {getattr(bias, 'shape', bias)!r}")
        if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names):
            raise ValueError("class_names must be a sequence of strings")
        if len(class_names) != K:
            raise ValueError(f"got {len(class_names)} class names for {K} classifier rows")
        self.cam = FinerCAM(adapter, method, **cam_kwargs)  # checks the adapter and the method
        self.adapter = adapter
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.class_names = list(class_names)
        self.method = method
        self._by_name: dict[str, list[int]] = {}
        for i, n in enumerate(self.class_names):
            self._by_name.setdefault(n, []).append(i)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        target_layer: nn.Module | str,
        class_names: Sequence[str],
        method: str = "gradcam",
        **kwargs: Any,
    ) -> ClassifierExplainer:
        """Explainer for a model that outputs logits (``weight = I``); ``kwargs`` go to
        :class:`~traitloc.engine.hooks.HookAdapter` (layout options) or :class:`~traitloc.engine.cam.FinerCAM`."""
        adapter_keys = {"n_prefix_tokens", "grid", "patch_size"}
        adapter = HookAdapter(model, target_layer, **{k: v for k, v in kwargs.items() if k in adapter_keys})
        K = len(class_names)
        cam_kwargs = {k: v for k, v in kwargs.items() if k not in adapter_keys}
        return cls(adapter, torch.eye(K), None, class_names, method, **cam_kwargs)

    def with_method(self, method: str, **cam_kwargs: Any) -> ClassifierExplainer:
        """The same classifier explained with another ``method`` (``cam_kwargs`` as in the constructor)."""
        return ClassifierExplainer(self.adapter, self.weight, self.bias, self.class_names, method, **cam_kwargs)

    @property
    def num_classes(self) -> int:
        """The number K of classes."""
        return len(self.class_names)

    # -- class lookup ---------------------------------------------------------------------------------------------
    def class_index(self, c: int | str) -> int:
        """Index of a class given by index or name (an exact name first; then a string of digits as an index)."""
        K = self.num_classes
        if isinstance(c, bool):
            raise TypeError(f"class must be an index or a name, got {c!r}")
        if isinstance(c, int) or (isinstance(c, Tensor) and c.ndim == 0 and not c.is_floating_point()):
            i = int(c)
            if not 0 <= i < K:
                raise ValueError(f"class index {i} out of range for {K} classes")
            return i
        if not isinstance(c, str):
            raise TypeError(f"class must be an index or a name, got {type(c).__name__}")
        hits = self._by_name.get(c)
        if hits is not None:
            if len(hits) > 1:
                raise ValueError(f"class name {c!r} is ambiguous (indices {', '.join(map(str, hits))}); use an index")
            return hits[0]
        if c.strip().isdigit():
            return self.class_index(int(c))
        lowered = {n.lower(): n for n in self._by_name}
        if c.lower() in lowered:
            return self.class_index(lowered[c.lower()])
        close = difflib.get_close_matches(c, self.class_names, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(repr(n) for n in close)}" if close else ""
        raise ValueError(f"unknown class {c!r}{hint}")

    def _targets(self, target: Any, B: int, predicted: list[int]) -> list[int]:
        if _is_auto(target):
            return list(predicted)
        if isinstance(target, Tensor):
            target = target.tolist() if target.ndim else int(target)
        if isinstance(target, (list, tuple)):
            if len(target) != B:
                raise ValueError(f"got {len(target)} targets for a batch of {B} images")
            return [predicted[b] if _is_auto(t) else self.class_index(t) for b, t in enumerate(target)]
        return [self.class_index(target)] * B

    def _references(
        self, references: Any, B: int, targets: list[int], logits: Tensor, num_references: int
    ) -> list[list[int]]:
        if isinstance(num_references, bool) or not isinstance(num_references, int) or num_references < 1:
            raise ValueError(f"num_references must be a positive int, got {num_references!r}")
        if references is None:
            k = min(num_references, self.num_classes - 1)
            return similar_classes(logits, torch.tensor(targets), k).tolist()
        if isinstance(references, (str, int)) or (isinstance(references, Tensor) and references.ndim == 0):
            references = [references]
        if isinstance(references, Tensor):
            references = references.tolist()
        if not isinstance(references, (list, tuple)):
            raise TypeError(f"references must be None, a list of classes or one list per image, got {references!r}")
        per_image = len(references) > 0 and all(isinstance(r, (list, tuple)) for r in references)
        if per_image:
            if len(references) != B:
                raise ValueError(f"got {len(references)} reference lists for a batch of {B} images")
            rows = [list(r) for r in references]
        else:
            rows = [list(references)] * B
        out = []
        for b, (t, row) in enumerate(zip(targets, rows, strict=True)):
            idx = [self.class_index(r) for r in row]
            if t in idx:
                raise ValueError(f"reference {self.class_names[t]!r} equals the target of image {b}")
            if len(set(idx)) != len(idx):
                raise ValueError(f"duplicate references for image {b}: {row}")
            out.append(idx)
        return out

    # -- explanation ----------------------------------------------------------------------------------------------
    def logits(self, x: Tensor | Prefix) -> Tensor:
        """(B, K) logits of an image batch, or of its prefix (``cam.prefix(x)``, reusable by :meth:`explain`)."""
        pre = x if isinstance(x, Prefix) else self.cam.prefix(x)
        return self._logits(self.adapter.features(pre).float())

    def _logits(self, feats: Tensor) -> Tensor:
        if feats.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"the model gives {feats.shape[-1]}-d outputs but the head expects {self.weight.shape[1]}")
        W = self.weight.to(feats.device, feats.dtype)
        z = feats @ W.t()
        return z + self.bias.to(z.device, z.dtype) if self.bias is not None else z

    def explain(
        self,
        x: Tensor,
        target: Any = "auto",
        references: Any = None,
        num_references: int = 3,
        gamma: float = 0.6,
        reverse: bool = False,
        prefix: Prefix | None = None,
    ) -> Explanation:
        """Explain why each image is ``target`` rather than its references.

        Parameters
        ----------
        x : (B, 3, H, W) normalized image batch.
        target : ``"auto"`` (the predicted class), a class index or name, or one of those per image.
        references : ``None`` (the ``num_references`` classes with logits closest to the target's), a list of
            classes shared by all images, or one list per image. An empty list gives the plain CAM of the target.
        num_references : the number of automatic references (capped at K - 1).
        gamma : comparison strength, ``>= 0``; ``0`` is plain Grad-CAM of the target, ``> 1`` extrapolates.
        reverse : explain what speaks for the references: ``mean(z_refs) - gamma * z_target``.
        prefix : the batch's forward pass, if already run (``explainer.cam.prefix(x)``); default: run it here.
        """
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"x must be an image batch (B, 3, H, W), got {getattr(x, 'shape', type(x).__name__)}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number, got {gamma!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (got {gamma}); use reverse=True to explain the references")
        if not isinstance(reverse, bool):
            raise TypeError(f"reverse must be True or False, got {reverse!r}")
        B = int(x.shape[0])
        pre = prefix if prefix is not None else self.cam.prefix(x)
        logits = self.logits(pre)
        predicted = logits.argmax(1).tolist()
        targets = self._targets(target, B, predicted)
        refs = self._references(references, B, targets, logits, num_references)
        if reverse and any(len(r) == 0 for r in refs):
            raise ValueError("reverse=True needs at least one reference per image")
        # per-image vectors (B, P, D): the target row then its references, zero-padded; coefficients (B, 1, P)
        P = 1 + max(len(r) for r in refs)
        W = self.weight.to(pre.acts.device, torch.float32)
        V = torch.zeros(B, P, W.shape[1], device=W.device)
        C = torch.zeros(B, 1, P, device=W.device)
        for b, (t, r) in enumerate(zip(targets, refs, strict=True)):
            V[b, 0] = W[t]
            if r:
                V[b, 1 : 1 + len(r)] = W[r]
            C[b, 0, 0] = -float(gamma) if reverse else 1.0
            if r:
                C[b, 0, 1 : 1 + len(r)] = (1.0 / len(r)) if reverse else (-float(gamma) / len(r))
        out = self.cam(x, V, C, prefix=pre)  # every method reuses this batch's one forward pass
        return Explanation(
            cam=out,
            logits=logits,
            predicted=predicted,
            targets=targets,
            references=refs,
            gamma=float(gamma),
            reverse=reverse,
            method=self.method,
            class_names=self.class_names,
        )
