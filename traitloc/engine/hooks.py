"""Hooks on arbitrary PyTorch modules and the generic :class:`HookAdapter` (see ``docs/engine.md``).

:func:`forward_hook` and :func:`frozen_parameters` are scoped context managers (always undone on exit),
:func:`resolve_module` finds a target layer by submodule or dotted name, and :class:`HookAdapter` splits any
``nn.Module`` at that layer for the Finer-CAM engine (:class:`~traitloc.engine.cam.FinerCAM`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from traitloc.engine.adapters import Prefix, TargetAdapter, _check_vectors, batched_vjp

__all__ = ["HookAdapter", "forward_hook", "frozen_parameters", "resolve_module"]


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
    sub = cur._modules.get(step)  # also a ModuleDict's entries
    if sub is None:
        if step.lstrip("-").isdigit() and isinstance(cur, (nn.Sequential, nn.ModuleList)):
            return _child(cur, int(step), path, target)
        raise ValueError(f"target layer {target!r}: {where} has no submodule {step!r} (children: {shown})")
    return sub


# ------------------------------------------------------------------------------------------------------------------
# the generic adapter
# ------------------------------------------------------------------------------------------------------------------
def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    t = [v, v] if isinstance(v, int) else list(v) if isinstance(v, Sequence) else []
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
    if min(t) < 1:
        raise ValueError(f"{what} must be positive, got {v!r}")
    return int(t[0]), int(t[1])


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
        fixed = self.n_prefix_tokens
        for n in (1, 0) if fixed is None else (fixed,):
            s = math.isqrt(max(L - n, 0))
            if L - n >= 1 and s * s == L - n:  # a square grid
                if fixed is None and input_size[0] != input_size[1]:
                    raise ValueError(
                        f"input is {input_size[0]}x{input_size[1]} but the token grid was guessed square ({s}x{s} "
                        f"from {L} tokens): pass patch_size or grid=(h, w)"
                    )
                return n, (s, s)
        if fixed is not None:
            raise ValueError(
                f"target layer {self.target_layer!r} gives {L} tokens; {L - fixed} grid tokens "
                f"after {fixed} prefix tokens is not a square grid: pass grid=(h, w) or patch_size"
            )
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
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
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
            n = self._token_layout(leaf.shape[1], input_size)[0]
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
        extra: dict[str, Any] = {"x": x, "output": out, "shape": tuple(t.shape), "graph": graph}
        if t.ndim == 4:
            acts = t.detach().flatten(2).transpose(1, 2).contiguous()
            grid = (int(t.shape[2]), int(t.shape[3]))
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
        """Rerun the model with the target output replaced by ``acts`` (+ ``shift`` on every cell); the output."""
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
