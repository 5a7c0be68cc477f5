"""The plain full-autograd definition of (Finer-)Grad-CAM and Layer-CAM (``docs/engine.md``, "Reference definition").

Slow and simple on purpose: one full forward and one backward through the whole network per query, with a
forward hook on the target layer. Every fast path of :mod:`traitloc.engine.cam` is tested against this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitloc.engine.adapters import resize_pos_embed
from traitloc.engine.hooks import forward_hook

__all__ = ["capture_activation", "vit_input_grid", "reference_cam"]


@contextmanager
def capture_activation(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record ``module``'s output in ``store["act"]`` while the context is open; the hook is always removed.

    Examples
    --------
    >>> lin = nn.Linear(2, 3)
    >>> with capture_activation(lin) as store:
    ...     _ = lin(torch.zeros(4, 2))
    >>> store["act"].shape, len(lin._forward_hooks)
    (torch.Size([4, 3]), 0)
    """
    store: dict[str, Tensor] = {}
    with forward_hook(module, lambda _m, _inp, out: store.__setitem__("act", out)):
        yield store


@contextmanager
def vit_input_grid(visual: nn.Module, grid: tuple[int, int]) -> Iterator[None]:
    """Let an open_clip ViT's own forward accept a non-native patch grid while the context is open.

    The positional embedding is replaced by its bicubic interpolation to ``grid`` (as the adapters do) and restored
    on exit.

    Parameters
    ----------
    visual : nn.Module
        ``model.visual`` of an open_clip ViT.
    grid : tuple of int
        The input's patch grid ``(h, w)``.
    """
    gs: Any = visual.grid_size  # open_clip's untyped attribute: an int or a pair
    native = (gs, gs) if isinstance(gs, int) else tuple(gs)
    if tuple(grid) == native:
        yield
        return
    original = cast(nn.Parameter, visual.positional_embedding)
    visual.positional_embedding = nn.Parameter(
        resize_pos_embed(original.data, native, grid), requires_grad=original.requires_grad
    )
    try:
        yield
    finally:
        visual.positional_embedding = original


def reference_cam(
    forward: Callable[[Tensor], Tensor],
    target: nn.Module,
    x: Tensor,
    vectors: Tensor,
    coeffs: Tensor,
    *,
    normalize: bool,
    layout: str,
    grid: tuple[int, int] | None = None,
    method: str = "gradcam",
) -> Tensor:
    """Signed (pre-ReLU) maps by full autograd: one forward and one backward through the whole network per query.

    Parameters
    ----------
    forward : callable
        Image batch -> embedding ``(B, D)`` (or a classifier's features, the input of its linear head).
    target : nn.Module
        The target-layer module, hooked.
    x : Tensor
        Normalized image batch ``(B, 3, H, W)``.
    vectors : Tensor
        Explained vectors ``(P, D)``.
    coeffs : Tensor
        Query coefficients ``(Q, P)``: ``s_q = sum_p W_qp <f(e), v_p>``.
    normalize : bool
        Whether ``f`` is L2 normalization.
    layout : str
        ``"vit"`` (tokens ``(B, 1 + h*w, C)``, CLS first, dropped) or ``"cnn"`` (``(B, C, h, w)``).
    grid : tuple of int, optional
        The ViT patch grid ``(h, w)`` (needed for ``layout="vit"``).
    method : str
        ``"gradcam"`` or ``"layercam"``.

    Returns
    -------
    Tensor
        ``(B, Q, h, w)`` signed maps.

    Examples
    --------
    A 1 x 1 convolution as the target layer, global average pooling after it:

    >>> conv = nn.Conv2d(3, 4, 1)
    >>> forward = lambda x: conv(x).mean(dim=(2, 3))
    >>> maps = reference_cam(forward, conv, torch.randn(2, 3, 5, 5), torch.eye(4), torch.eye(4)[:1],
    ...                      normalize=False, layout="cnn")
    >>> maps.shape
    torch.Size([2, 1, 5, 5])
    """
    if method not in ("gradcam", "layercam"):
        raise ValueError(f"reference_cam supports gradcam and layercam, got {method!r}")
    out = []
    for q in range(coeffs.shape[0]):
        with torch.enable_grad(), capture_activation(target) as store:
            # the input requires grad so the whole network is on the tape, as in a plain implementation
            e = forward(x.detach().clone().requires_grad_(True))
            f = F.normalize(e, dim=-1) if normalize else e
            u = (coeffs[q].to(vectors.dtype).unsqueeze(-1) * vectors).sum(0)
            s = (f * u.to(f.dtype)).sum()  # images are independent: summing over the batch is harmless
            act = store["act"]
            (g,) = torch.autograd.grad(s, act)
        act, g = act.detach(), g.detach()
        if layout == "vit":
            if grid is None:
                raise ValueError("layout 'vit' needs the patch grid")
            B, _, C = act.shape
            act = act[:, 1:].reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
            g = g[:, 1:].reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
        elif layout != "cnn":
            raise ValueError(f"layout must be 'vit' or 'cnn', got {layout!r}")
        if method == "gradcam":
            alpha = g.mean(dim=(2, 3), keepdim=True)
            out.append((alpha * act).sum(1))
        else:
            out.append((g.clamp_min(0) * act).sum(1))
    return torch.stack(out, 1)
