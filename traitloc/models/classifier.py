r"""Classifier explanation: a generic hook adapter for any PyTorch model, linear probes on frozen features, a
feature cache, similar-class selection and the Finer-CAM classifier explainer (DESIGN.md §1, §6 ``explain`` and
``train-probe``).

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
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitloc.engine.adapters import Prefix, TargetAdapter, _check_vectors, batched_vjp
from traitloc.engine.cam import METHODS, CamOutput, FinerCAM

__all__ = [
    "HookAdapter",
    "forward_hook",
    "frozen_parameters",
    "resolve_module",
    "LinearProbe",
    "ProbeError",
    "train_probe",
    "probe_accuracy",
    "save_probe",
    "load_probe",
    "FeatureCacheError",
    "spec_hash",
    "extract_features",
    "similar_classes",
    "similar_by_weights",
    "Explanation",
    "ClassifierExplainer",
]

log = logging.getLogger(__name__)

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
PROBE_FORMAT = "traitloc-probe"
CACHE_FORMAT = "traitloc-feature-cache"


# ------------------------------------------------------------------------------------------------------------------
# hooks and module lookup
# ------------------------------------------------------------------------------------------------------------------
@contextmanager
def forward_hook(module: nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """Register ``hook`` as a forward hook of ``module`` while the context is open; it is always removed on exit,
    also when the body raises."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``model`` while the context is open and restore each
    parameter's own flag on exit (also when the body raises)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


_PART = re.compile(r"^([^\[\]]*)((?:\[[^\[\]]+\])*)$")


def resolve_module(model: nn.Module, target: nn.Module | str) -> tuple[nn.Module, str]:
    """Find the target layer of ``model``: a submodule, or a dotted name with optional indexing.

    Accepted names: ``features.6``, ``layer4``, ``blocks.11.norm1``, ``blocks[-1].norm1``, ``stages[2][0]``.

    Returns
    -------
    module, name : the submodule and its qualified name in ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module to look up a target layer, got {type(model).__name__}")
    if isinstance(target, nn.Module):
        for name, m in model.named_modules(remove_duplicate=False):
            if m is target:
                return m, name or "<model>"
        raise ValueError(f"target layer {type(target).__name__} is not a submodule of the model")
    if not isinstance(target, str) or not target.strip():
        raise TypeError(f"target layer must be a module or a dotted name such as 'layer4', got {target!r}")
    cur: nn.Module = model
    path = ""
    for part in target.strip().split("."):
        m = _PART.match(part)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ValueError(f"cannot parse target layer name {target!r} at {part!r}")
        steps: list[str | int] = [m.group(1)] if m.group(1) else []
        steps += [_index(s, target) for s in re.findall(r"\[([^\[\]]+)\]", m.group(2))]
        for step in steps:
            cur = _child(cur, step, path, target)
            path = f"{path}[{step}]" if isinstance(step, int) else (f"{path}.{step}" if path else step)
    qualified = next((n for n, mod in model.named_modules(remove_duplicate=False) if mod is cur), path)
    return cur, qualified or "<model>"


def _index(s: str, target: str) -> str | int:
    s = s.strip().strip("'\"")
    try:
        return int(s)
    except ValueError:
        if not s:
            raise ValueError(f"empty index in target layer name {target!r}") from None
        return s


def _child(cur: nn.Module, step: str | int, path: str, target: str) -> nn.Module:
    where = repr(path) if path else "the model"
    names = list(cur._modules)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"
    if isinstance(step, int):
        if not isinstance(cur, (nn.Sequential, nn.ModuleList)):
            raise ValueError(f"target layer {target!r}: {where} ({type(cur).__name__}) cannot be indexed with [{step}]")
        if not -len(cur) <= step < len(cur):
            raise ValueError(f"target layer {target!r}: index {step} out of range for {where} of length {len(cur)}")
        return cur[step]
    if isinstance(cur, nn.ModuleDict) and step in cur:
        return cur[step]
    sub = cur._modules.get(step)
    if sub is None:
        if step.lstrip("-").isdigit() and isinstance(cur, (nn.Sequential, nn.ModuleList)):
            return _child(cur, int(step), path, target)
        raise ValueError(f"target layer {target!r}: {where} has no submodule {step!r} (children: {shown})")
    return sub


# ------------------------------------------------------------------------------------------------------------------
# the generic adapter
# ------------------------------------------------------------------------------------------------------------------
def _square_side(n: int) -> int | None:
    if n < 1:
        return None
    s = math.isqrt(n)
    return s if s * s == n else None


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        t = (v, v)
    elif isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        t = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
    if min(t) < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return t


class HookAdapter(TargetAdapter):
    """Split any PyTorch model at a target layer with forward hooks.

    ``model`` maps a normalized image batch ``(B, 3, H, W)`` to an output ``(B, D)``: logits, or features read by a
    linear head. The target layer's output is laid out as

    - ``(B, C, h, w)`` (CNN feature maps): ``acts = (B, h*w, C)``, grid ``(h, w)``;
    - ``(B, L, C)`` (tokens, batch first): the first ``n_prefix_tokens`` tokens (CLS, registers) are dropped and the
      rest laid on the grid. Auto-detected: 1 prefix token if ``L - 1`` is a perfect square, else 0 if ``L`` is;
      otherwise give ``n_prefix_tokens`` and/or ``grid`` (or ``patch_size`` for non-square inputs).

    :meth:`prefix` runs the model once under ``torch.no_grad()`` with a hook that records the target output.
    :meth:`suffix` reruns the model with a hook that *replaces* the target output by the given activations (plus a
    shift broadcast over grid cells; prefix tokens unchanged). The rerun happens with every parameter's
    ``requires_grad`` temporarily off (restored on exit, see :func:`frozen_parameters`) and an input that does not
    require grad, so autograd records only the part of the network after the target layer. The layers before the
    target are still *computed* again by the rerun (a generic model cannot be cut), so one gradient query costs
    one forward pass plus one batched backward from the output to the target layer.

    The model is otherwise used as given: its mode is not changed (a model in training mode triggers a warning,
    since dropout or batch statistics make the two passes differ), and all hooks are removed after each pass.

    Parameters
    ----------
    model : image batch -> (B, D) tensor.
    target_layer : a submodule or its dotted name (``features.6``, ``blocks[-1].norm1``, ``layer4``). The module
        must run exactly once per forward pass.
    normalize : L2-normalize the output before the dot product with explained vectors (CLIP-style embeddings).
    n_prefix_tokens : number of leading non-grid tokens for token layouts.
    grid : the token grid ``(h, w)`` for token layouts (overrides auto-detection).
    patch_size : derive the token grid from the input size (``H // p, W // p``) for token layouts.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str,
        *,
        normalize: bool = False,
        n_prefix_tokens: int | None = None,
        grid: int | Sequence[int] | None = None,
        patch_size: int | Sequence[int] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if n_prefix_tokens is not None and (
            isinstance(n_prefix_tokens, bool) or not isinstance(n_prefix_tokens, int) or n_prefix_tokens < 0
        ):
            raise ValueError(f"n_prefix_tokens must be a non-negative int or None, got {n_prefix_tokens!r}")
        if grid is not None and patch_size is not None:
            raise ValueError("give either grid or patch_size, not both")
        self.model = model
        self.module, self.target_layer = resolve_module(model, target_layer)
        self.normalize = normalize
        self.n_prefix_tokens = n_prefix_tokens
        self.grid = _pair(grid, "grid") if grid is not None else None
        self.patch_size = _pair(patch_size, "patch_size") if patch_size is not None else None

    # -- layout ---------------------------------------------------------------------------------------------------
    def _token_layout(self, L: int, input_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Number of prefix tokens and grid for ``L`` tokens."""
        grid = self.grid
        if self.patch_size is not None:
            grid = (input_size[0] // self.patch_size[0], input_size[1] // self.patch_size[1])
        if grid is not None:
            n = L - grid[0] * grid[1]
            if n < 0 or (self.n_prefix_tokens is not None and n != self.n_prefix_tokens):
                raise ValueError(
                    f"target layer {self.target_layer!r} gives {L} tokens, which does not fit a {grid[0]}x{grid[1]} "
                    f"grid with {self.n_prefix_tokens if self.n_prefix_tokens is not None else 'any'} prefix tokens"
                )
            return n, grid
        if self.n_prefix_tokens is not None:
            s = _square_side(L - self.n_prefix_tokens)
            if s is None:
                raise ValueError(
                    f"target layer {self.target_layer!r} gives {L} tokens; {L - self.n_prefix_tokens} grid tokens "
                    f"after {self.n_prefix_tokens} prefix tokens is not a square grid: pass grid=(h, w) or patch_size"
                )
            return self.n_prefix_tokens, (s, s)
        for n in (1, 0):
            s = _square_side(L - n)
            if s is not None:
                if input_size[0] != input_size[1]:
                    raise ValueError(
                        f"input is {input_size[0]}x{input_size[1]} but the token grid was guessed square ({s}x{s} "
                        f"from {L} tokens): pass patch_size or grid=(h, w)"
                    )
                return n, (s, s)
        raise ValueError(
            f"target layer {self.target_layer!r} gives {L} tokens, neither L nor L-1 is a square grid: pass "
            f"n_prefix_tokens (e.g. 5 for CLS + 4 registers), grid=(h, w) or patch_size"
        )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected an image batch tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if self.model.training:
            warnings.warn(
                "the model is in training mode: dropout/batch-norm statistics make passes differ; call model.eval()",
                stacklevel=3,
            )

    def _call_model(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return a (B={x.shape[0]}, D) tensor, got {shape}")
        return out

    # -- TargetAdapter --------------------------------------------------------------------------------------------
    def prefix(self, x: Tensor) -> Prefix:
        """One forward pass: records the target output and, from there on, the graph of the rest of the network.

        The hook swaps the target output for ``leaf + shift`` (two fresh leaves, values unchanged), so the same pass
        gives the model output *and* an autograd graph back to the target layer only (parameters frozen, input
        without grad): :meth:`grad_mean`/:meth:`grad_cells` then need no second forward pass.
        """
        self._check_input(x)
        store: list[Tensor] = []
        leaves: dict[str, Tensor] = {}

        def capture(_m: nn.Module, _inp: object, out: object) -> object:
            # a copy: a later in-place op (ReLU(inplace=True)) must not change the recorded activations
            store.append(out.detach().clone() if isinstance(out, Tensor) else out)  # type: ignore[arg-type]
            if not isinstance(out, Tensor) or len(store) != 1 or out.ndim not in (3, 4):
                return None
            leaf = store[0].clone().requires_grad_(True)
            C = leaf.shape[1] if leaf.ndim == 4 else leaf.shape[2]
            shift = torch.zeros(leaf.shape[0], C, dtype=leaf.dtype, device=leaf.device, requires_grad=True)
            leaves.update(leaf=leaf, shift=shift)
            if leaf.ndim == 4:
                return leaf + shift[:, :, None, None]
            n = leaf.shape[1] - self._grid_tokens(leaf.shape[1], x)
            add = torch.cat([torch.zeros_like(shift).unsqueeze(1).expand(-1, n, -1), shift.unsqueeze(1).expand(
                -1, leaf.shape[1] - n, -1)], 1)  # fmt: skip
            return leaf + add

        x = x.detach()
        with torch.enable_grad(), frozen_parameters(self.model), forward_hook(self.module, capture):
            out = self._call_model(x)
        graph = (out, leaves["leaf"], leaves["shift"]) if leaves and out.requires_grad else None
        out = out.detach()
        if len(store) != 1:
            raise ValueError(
                f"target layer {self.target_layer!r} ran {len(store)} times in one forward pass; choose a module "
                f"that runs exactly once (a shared activation module cannot be a target)"
            )
        t = store[0]
        if not isinstance(t, Tensor):
            raise ValueError(f"target layer {self.target_layer!r} must output a tensor, got {type(t).__name__}")
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        extra: dict[str, Any] = {"x": x, "output": out, "shape": tuple(t.shape), "graph": graph}
        if t.ndim == 4:
            B, C, h, w = t.shape
            acts = t.detach().flatten(2).transpose(1, 2).contiguous()
            grid = (int(h), int(w))
            extra["layout"] = "cnn"
        elif t.ndim == 3:
            n, grid = self._token_layout(int(t.shape[1]), input_size)
            acts = t.detach()[:, n:].contiguous()
            extra["layout"] = "tokens"
            extra["prefix_tokens"] = t.detach()[:, :n]
        else:
            raise ValueError(
                f"target layer {self.target_layer!r} output has shape {tuple(t.shape)}; expected (B, C, h, w) "
                f"feature maps or (B, L, C) tokens"
            )
        return Prefix(acts=acts, grid=grid, input_size=input_size, extra=extra)

    def suffix(self, pre: Prefix, acts: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        a = pre.acts if acts is None else acts
        if a.shape != pre.acts.shape:
            raise ValueError(f"acts must have shape {tuple(pre.acts.shape)}, got {tuple(a.shape)}")
        if shift is not None:
            if shift.shape != (a.shape[0], a.shape[2]):
                raise ValueError(f"shift must have shape {(a.shape[0], a.shape[2])}, got {tuple(shift.shape)}")
            a = a + shift.unsqueeze(1)
        shape = pre.extra["shape"]
        if pre.extra["layout"] == "cnn":
            new = a.transpose(1, 2).reshape(shape)
        else:
            new = torch.cat([pre.extra["prefix_tokens"].to(a.dtype), a], 1)
        if new._base is not None:  # never hand a view of a leaf to modules that may work in place
            new = new.clone()
        calls = [0]

        def replace(_m: nn.Module, _inp: object, out: object) -> Tensor:
            calls[0] += 1
            if isinstance(out, Tensor) and tuple(out.shape) != tuple(shape):
                raise ValueError(f"target layer output changed shape: {tuple(out.shape)} vs {tuple(shape)}")
            return new.to(out.dtype) if isinstance(out, Tensor) else new

        with frozen_parameters(self.model), forward_hook(self.module, replace):
            e = self._call_model(pre.extra["x"])
        if calls[0] != 1:
            raise ValueError(f"target layer {self.target_layer!r} ran {calls[0]} times in one forward pass")
        return e

    def _grid_tokens(self, L: int, x: Tensor) -> int:
        return L - self._token_layout(L, (int(x.shape[-2]), int(x.shape[-1])))[0]

    def _autograd(self, pre: Prefix, vectors: Tensor, wrt: str) -> Tensor:
        """Gradients from the graph recorded by :meth:`prefix` (no second forward pass); falls back to
        :meth:`suffix` reruns when there is none (e.g. a prefix built elsewhere)."""
        graph = pre.extra.get("graph")
        if graph is None:
            return super()._autograd(pre, vectors, wrt)
        out, leaf, shift = graph
        vectors = _check_vectors(vectors, pre.batch)
        with torch.enable_grad():
            g = batched_vjp(self.score_features(out), shift if wrt == "shift" else leaf, vectors, self.vector_chunk)
        if wrt == "shift":
            return g
        if pre.extra["layout"] == "cnn":
            return g.flatten(3).transpose(2, 3).contiguous()  # (B, P, C, h, w) -> (B, P, N, C)
        n = pre.extra["prefix_tokens"].shape[1]
        return g[:, :, n:].contiguous()

    def embed(self, x: Tensor) -> Tensor:
        """Plain forward to the model output (no gradients, no hooks)."""
        self._check_input(x)
        with torch.no_grad():
            return self._call_model(x.detach())

    def features(self, pre: Prefix) -> Tensor:
        """``f(e)`` of the prefix's images, from the output recorded by :meth:`prefix` (no extra pass)."""
        return self.score_features(pre.extra["output"])


# ------------------------------------------------------------------------------------------------------------------
# linear probes
# ------------------------------------------------------------------------------------------------------------------
class ProbeError(ValueError):
    """A probe could not be trained, saved or loaded; the message says why."""


class LinearProbe(nn.Module):
    """A linear classification head on frozen features: ``logits = features @ W.T + b``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.linear = nn.Linear(in_features, num_classes, bias=bias)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


def _check_features_labels(features: Tensor, labels: Tensor, what: str = "") -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ProbeError(f"{what}features must be a float tensor (N, D), got {got}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ProbeError(f"{what}labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ProbeError(f"{what}features have {features.shape[0]} rows but labels have {labels.shape[0]}")
    if features.shape[0] == 0:
        raise ProbeError(f"{what}features are empty")
    if not torch.isfinite(features).all():
        raise ProbeError(f"{what}features contain NaN or infinite values")
    return features, labels.long()


def train_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    device: str | torch.device | None = None,
) -> tuple[LinearProbe, dict[str, list[float]]]:
    """Train a linear probe with Adam and cross-entropy on frozen features; deterministic given ``seed``.

    Parameters
    ----------
    features : (N, D) float features (as the explained model gives them, e.g. L2-normalized CLIP embeddings).
    labels : (N,) class indices in ``[0, num_classes)``.
    num_classes : number of classes (default ``labels.max() + 1``; give it when some classes have no examples).
    epochs, lr, batch_size, weight_decay : Adam settings; minibatches are reshuffled every epoch.
    seed : seeds the initialization and the shuffling (the global RNG is left untouched).
    val : optional ``(features, labels)`` evaluated after every epoch.
    device : where to train (default: the features' device).

    Returns
    -------
    probe : the trained :class:`LinearProbe` (eval mode, on the training device).
    history : ``loss`` and ``train_accuracy`` per epoch (and ``val_accuracy`` with ``val``).
    """
    features, labels = _check_features_labels(features, labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ProbeError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ProbeError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and name != "seed") or v < 0:
            raise ProbeError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, got {v!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ProbeError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ProbeError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if val is not None:
        val = _check_features_labels(val[0], val[1], "validation ")
        if val[0].shape[1] != features.shape[1]:
            raise ProbeError(f"validation features have {val[0].shape[1]} dims, training features {features.shape[1]}")
    dev = torch.device(device) if device is not None else features.device
    x, y = features.detach().to(dev, torch.float32), labels.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(int(x.shape[1]), num_classes)
    probe.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    if val is not None:
        history["val_accuracy"] = []
    N = x.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(N, generator=gen).to(dev)
            total, correct = 0.0, 0
            for i in range(0, N, batch_size):
                idx = order[i : i + batch_size]
                logits = probe(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y[idx]).sum())
            history["loss"].append(total / N)
            history["train_accuracy"].append(correct / N)
            if val is not None:
                history["val_accuracy"].append(probe_accuracy(probe, val[0], val[1]))
                probe.train()
    probe.eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe, history


def probe_accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``probe`` on ``features`` (fraction in [0, 1])."""
    features, labels = _check_features_labels(features, labels)
    dev = next(probe.parameters()).device
    probe.eval()
    with torch.no_grad():
        pred = probe(features.to(dev, torch.float32)).argmax(1).cpu()
    return float((pred == labels.cpu()).float().mean())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_ready(meta: Mapping[str, Any]) -> str:
    try:
        return json.dumps(meta, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ProbeError(f"probe metadata must be JSON-serializable (plain str/int/float/list/dict): {err}") from err


def save_probe(directory: str | os.PathLike[str], probe: LinearProbe, meta: Mapping[str, Any]) -> Path:
    """Write ``probe.safetensors`` (``weight`` (K, D), ``bias`` (K,)) and ``probe.json`` into ``directory``.

    ``meta`` must hold ``class_names`` (K strings) and should hold ``backbone`` (the spec: a ``--model``/
    ``--pretrained`` pair or a ``--backbone MODULE:FUNCTION``), ``preprocessing``, ``feature_normalization``
    (e.g. ``"l2"`` or ``"none"``), ``test_accuracy`` and ``training`` (epochs, lr, batch size, weight decay, seed).
    ``format``, ``version``, ``in_features``, ``num_classes`` and ``has_bias`` are added.

    Returns
    -------
    The directory path.
    """
    from safetensors.torch import save

    if not isinstance(probe, LinearProbe):
        raise ProbeError(f"probe must be a LinearProbe, got {type(probe).__name__}")
    if not isinstance(meta, Mapping):
        raise ProbeError(f"meta must be a mapping, got {type(meta).__name__}")
    names = meta.get("class_names")
    if not isinstance(names, Sequence) or isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ProbeError("meta['class_names'] must be a list of class-name strings")
    if len(names) != probe.num_classes:
        raise ProbeError(f"meta has {len(names)} class names but the probe has {probe.num_classes} classes")
    out = {k: v for k, v in meta.items() if k not in ("format", "version")}
    out.update(
        format=PROBE_FORMAT,
        version=1,
        in_features=probe.in_features,
        num_classes=probe.num_classes,
        has_bias=probe.bias is not None,
        class_names=list(names),
    )
    text = _json_ready(out)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": probe.weight.detach().float().cpu().contiguous()}
    if probe.bias is not None:
        tensors["bias"] = probe.bias.detach().float().cpu().contiguous()
    _atomic_write_bytes(d / PROBE_WEIGHTS, save(tensors, metadata={"format": PROBE_FORMAT}))
    _atomic_write_bytes(d / PROBE_META, text.encode())
    return d


def load_probe(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[LinearProbe, dict]:
    """Read a probe written by :func:`save_probe`.

    Returns
    -------
    probe : :class:`LinearProbe` in eval mode with frozen parameters.
    meta : the JSON metadata.

    Raises
    ------
    ProbeError
        With a one-line reason for a missing directory/file, corrupt JSON or weights, or mismatched shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(directory)
    if not d.is_dir():
        raise ProbeError(f"probe directory not found: {d}")
    wpath, mpath = d / PROBE_WEIGHTS, d / PROBE_META
    for p in (wpath, mpath):
        if not p.is_file():
            raise ProbeError(f"probe directory {d} lacks {p.name} (write one with traitloc train-probe)")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProbeError(f"{mpath} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{mpath} is not a traitloc probe description (format {PROBE_FORMAT!r} expected)")
    try:
        tensors = load(wpath.read_bytes())
    except (SafetensorError, ValueError, OSError) as err:
        raise ProbeError(f"{wpath} is not a readable safetensors file: {str(err).splitlines()[0]}") from err
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or w.ndim != 2:
        raise ProbeError(f"{wpath} lacks a 2-D 'weight' tensor")
    K, D = int(w.shape[0]), int(w.shape[1])
    if (meta.get("num_classes"), meta.get("in_features")) != (K, D):
        raise ProbeError(
            f"{wpath} holds a {K}x{D} weight but {mpath.name} says "
            f"{meta.get('num_classes')} classes x {meta.get('in_features')} features"
        )
    if bool(meta.get("has_bias", True)) != (b is not None) or (b is not None and tuple(b.shape) != (K,)):
        raise ProbeError(f"{wpath} bias does not match {mpath.name} (expected shape ({K},) or none)")
    names = meta.get("class_names")
    if not isinstance(names, list) or len(names) != K:
        raise ProbeError(f"{mpath.name} must list {K} class_names, got {len(names) if isinstance(names, list) else 0}")
    probe = LinearProbe(D, K, bias=b is not None)
    with torch.no_grad():
        probe.linear.weight.copy_(w)
        if b is not None:
            probe.linear.bias.copy_(b)
    probe.eval().to(device)
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe, meta


# ------------------------------------------------------------------------------------------------------------------
# feature cache
# ------------------------------------------------------------------------------------------------------------------
class FeatureCacheError(ValueError):
    """The feature cache is unusable for this request; the message says why."""


def spec_hash(spec: Mapping[str, Any] | str) -> str:
    """A short stable hash (16 hex digits) of a backbone spec (a JSON-serializable mapping or a string)."""
    text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path, sidecar: Path) -> tuple[list[str], Tensor | None, str | None]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return [], None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            feats = f.get_tensor("features")
        keys = json.loads(md["keys"])
        side = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError, ValueError) as err:
        raise FeatureCacheError(
            f"feature cache {path} is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"delete it or pass overwrite=True"
        ) from err
    if len(keys) != feats.shape[0] or feats.ndim != 2:
        raise FeatureCacheError(f"feature cache {path} is inconsistent (keys vs rows); delete it or overwrite=True")
    h = md.get("spec_hash")
    if side and side.get("spec_hash") != h:
        raise FeatureCacheError(f"feature cache {path} and its sidecar {sidecar.name} disagree; delete both")
    return keys, feats, h


def _write_cache(path: Path, sidecar: Path, keys: list[str], feats: Tensor, spec: Any, h: str) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({"features": feats.contiguous()}, metadata={"keys": json.dumps(keys), "spec_hash": h})
    _atomic_write_bytes(path, data)
    side = {
        "format": CACHE_FORMAT,
        "version": 1,
        "spec_hash": h,
        "spec": spec,
        "n": len(keys),
        "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
    }
    _atomic_write_bytes(sidecar, json.dumps(side, indent=2, default=str).encode())


def extract_features(
    backbone_fn: Callable[[Tensor], Tensor],
    images_iterable: Iterable[Tensor | Callable[[], Tensor]],
    cache_path: str | os.PathLike[str],
    keys: Sequence[str],
    *,
    spec: Mapping[str, Any] | str = "",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    checkpoint_every: int = 1024,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Features of many images with a resumable on-disk cache.

    The cache is one safetensors file (tensor ``features`` (N, D) float32; the row keys and the spec hash in its
    metadata) plus a JSON sidecar ``<cache_path>.json`` with the backbone spec and its hash. Rows whose key is
    cached are reused without calling ``backbone_fn``; new rows are written every ``checkpoint_every`` images and
    when extraction stops (also on an error or interrupt), so a rerun resumes. Rows of other keys already in the
    cache are kept.

    Parameters
    ----------
    backbone_fn : (B, C, H, W) -> (B, D), called under ``torch.no_grad()``.
    images_iterable : one item per key, in the order of ``keys``: a preprocessed (C, H, W) tensor, or a zero-argument
        callable returning one (lazy: not called for cached keys, so cached images are not even decoded).
    cache_path : the ``.safetensors`` file.
    keys : unique string ids of the images (e.g. CUB image ids).
    spec : what identifies the backbone and preprocessing (name, weights hash, image size...); a cache built for
        another spec raises :class:`FeatureCacheError` unless ``overwrite=True``.
    batch_size : images per backbone call.
    device : move image batches there before calling the backbone.
    progress : called as ``progress(done, total)`` after each batch.

    Returns
    -------
    (len(keys), D) float32 CPU tensor in the order of ``keys``.
    """
    keys = list(keys)
    if not all(isinstance(k, str) and k for k in keys):
        raise FeatureCacheError("keys must be non-empty strings")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise FeatureCacheError(f"keys must be unique; {dup!r} appears more than once")
    for name, v in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FeatureCacheError(f"{name} must be a positive int, got {v!r}")
    if not callable(backbone_fn):
        raise FeatureCacheError(f"backbone_fn must be callable, got {type(backbone_fn).__name__}")
    path = Path(cache_path)
    if path.suffix != ".safetensors":
        raise FeatureCacheError(f"cache_path must end in .safetensors, got {path.name}")
    sidecar = path.with_name(path.name + ".json")
    h = spec_hash(spec)
    if overwrite:
        cached_keys, cached, old = [], None, None
    else:
        cached_keys, cached, old = _read_cache(path, sidecar)
        if cached is not None and old != h:
            raise FeatureCacheError(
                f"feature cache {path} was built for another backbone spec (hash {old}, now {h}); use another "
                f"cache path or overwrite=True"
            )
    rows: dict[str, Tensor] = {k: cached[i] for i, k in enumerate(cached_keys)} if cached is not None else {}
    order = list(cached_keys)
    todo = [k for k in keys if k not in rows]
    dirty = [0]

    def flush() -> None:
        if dirty[0] == 0 and path.is_file() and not overwrite:
            return
        if not rows:
            return
        _write_cache(path, sidecar, order, torch.stack([rows[k] for k in order]), spec, h)
        dirty[0] = 0

    n_items = 0
    done = len(keys) - len(todo)
    try:
        batch_keys: list[str] = []
        batch: list[Tensor] = []

        def run_batch() -> None:
            x = torch.stack(batch)
            if device is not None:
                x = x.to(device)
            with torch.no_grad():
                out = backbone_fn(x)
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise FeatureCacheError(f"backbone_fn must return a ({len(batch)}, D) tensor, got {got}")
            out = out.detach().float().cpu()
            if rows and out.shape[1] != next(iter(rows.values())).shape[0]:
                raise FeatureCacheError(f"backbone_fn returned {out.shape[1]}-d features; the cache holds another dim")
            for k, r in zip(batch_keys, out, strict=True):
                rows[k] = r.clone()
                order.append(k)
            dirty[0] += len(batch)
            batch.clear()
            batch_keys.clear()

        pending = set(todo)
        for key, item in zip(keys, images_iterable, strict=False):
            n_items += 1
            if key not in pending:
                continue
            img = item() if callable(item) and not isinstance(item, Tensor) else item
            if not isinstance(img, Tensor) or img.ndim != 3:
                got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise FeatureCacheError(f"image {key!r} must be a preprocessed (C, H, W) tensor, got {got}")
            batch.append(img)
            batch_keys.append(key)
            if len(batch) == batch_size:
                run_batch()
                done += batch_size
                if progress is not None:
                    progress(done, len(keys))
                if dirty[0] >= checkpoint_every:
                    flush()
        if batch:
            done += len(batch)
            run_batch()
            if progress is not None:
                progress(done, len(keys))
        if n_items < len(keys):
            raise FeatureCacheError(f"images_iterable gave {n_items} items for {len(keys)} keys")
    finally:
        flush()
    log.info("features: %d cached, %d computed", len(keys) - len(todo), len(todo))
    return torch.stack([rows[k] for k in keys])


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
        return [self.class_names[t] for t in self.targets]

    @property
    def predicted_names(self) -> list[str]:
        return [self.class_names[p] for p in self.predicted]

    @property
    def reference_names(self) -> list[list[str]]:
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
    adapter : a :class:`~traitloc.engine.adapters.TargetAdapter` (e.g. :class:`HookAdapter`, ``clip_adapter``).
    weight : (K, D) head weight (``torch.eye(K)`` for a model that outputs logits).
    bias : (K,) head bias or ``None`` (only used to report logits and choose references).
    class_names : K names (``"--target NAME"`` lookups).
    method : ``"gradcam"``, ``"layercam"`` or ``"scorecam"``.
    **cam_kwargs : passed to :class:`~traitloc.engine.cam.FinerCAM` (``amp_dtype``, ``scorecam_channels``...).

    Examples
    --------
    >>> explainer = ClassifierExplainer.from_model(model, "layer4", class_names)   # doctest: +SKIP
    >>> res = explainer.explain(x, target="auto", gamma=0.6)                       # doctest: +SKIP
    >>> res.upsampled().shape                                                       # (B, H, W)
    """

    def __init__(
        self,
        adapter: TargetAdapter,
        weight: Tensor,
        bias: Tensor | None,
        class_names: Sequence[str],
        method: str = "gradcam",
        **cam_kwargs: Any,
    ):
        if not isinstance(adapter, TargetAdapter):
            raise TypeError(f"adapter must be a TargetAdapter, got {type(adapter).__name__}")
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
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.adapter = adapter
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.class_names = list(class_names)
        self.method = method
        self.cam = FinerCAM(adapter, method, **cam_kwargs)
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
        """Explainer for a model that outputs logits (``weight = I``); ``kwargs`` go to :class:`HookAdapter` (layout
        options) or :class:`~traitloc.engine.cam.FinerCAM`."""
        adapter_keys = {"n_prefix_tokens", "grid", "patch_size"}
        adapter = HookAdapter(model, target_layer, **{k: v for k, v in kwargs.items() if k in adapter_keys})
        K = len(class_names)
        cam_kwargs = {k: v for k, v in kwargs.items() if k not in adapter_keys}
        return cls(adapter, torch.eye(K), None, class_names, method, **cam_kwargs)

    @property
    def num_classes(self) -> int:
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
    def logits(self, x: Tensor) -> Tensor:
        """(B, K) logits of an image batch."""
        pre = self.cam.prefix(x)
        return self._logits(self.adapter.features(pre))

    def _logits(self, feats: Tensor) -> Tensor:
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
        pre = self.cam.prefix(x)
        feats = self.adapter.features(pre).float()
        if feats.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"the model gives {feats.shape[-1]}-d outputs but the head expects {self.weight.shape[1]}")
        logits = self._logits(feats)
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
        if self.method == "gradcam":
            out = self.cam.gradients(pre, V).combine(C, V)
        else:
            out = self.cam(x, V, C)
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
