"""Tiny seeded models for the command-line tests, in the ``MODULE:FUNCTION`` contract of
:mod:`traitloc.models.backbones`.

Importable as ``tiny_backbones`` when ``tests/`` is on ``sys.path`` (pytest puts it there) or is the working
directory (``traitloc`` imports ``MODULE`` from the working directory). Every factory builds the same weights on
every call and in every process (a private seeded generator; the global RNG is untouched).

Backbones (``--backbone``): :func:`tiny_cnn_backbone` (features (B, 16), target ``features.4``, 32 px input, a
16 x 16 grid) and :func:`tiny_vit_backbone` (CLS features (B, 16), target ``blocks[-1].norm1``, 16 px input, a 4 x 4
grid of 4 px patches). Classifiers (``--classifier``): :func:`tiny_cnn_classifier`, :func:`tiny_vit_classifier`
(:data:`CLASS_NAMES`), and broken ones for the error tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from traitloc.models.backbones import ImagePreprocess

#: Class names of the tiny classifiers.
CLASS_NAMES = ["Red winged bird", "Blue winged bird", "Green winged bird", "Yellow winged bird", "Grey bird"]


class TinyCNN(nn.Module):
    """Two convolutions (the second followed by batch norm and ReLU, the target ``features.4``), mean pooling, and
    an optional linear head."""

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.head = nn.Linear(16, num_classes) if num_classes else None

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x).mean((2, 3))
        return self.head(f) if self.head is not None else f


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (4 px), a CLS token, two blocks, final norm; CLS features or a linear head on them."""

    def __init__(self, num_classes: int | None = None, c: int = 16, grid: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, c) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, c) * 0.5)
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, num_classes) if num_classes else None

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for b in self.blocks:
            t = b(t)
        f = self.norm(t)[:, 0]
        return self.head(f) if self.head is not None else f


def _seeded(factory: Any, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if isinstance(model, TinyCNN):
        bn = model.features[3]
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # non-trivial running statistics
            bn.running_mean.copy_(torch.rand(16, generator=g) * 0.4 - 0.2)
            bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    return model.eval()


def tiny_cnn_backbone() -> dict[str, Any]:
    """A tiny CNN feature backbone (``--backbone tiny_backbones:tiny_cnn_backbone``)."""
    model = _seeded(TinyCNN, 0)
    return {"model": model, "target_layer": "features.4", "preprocess": ImagePreprocess(32), "feature_dim": 16}


def tiny_vit_backbone() -> dict[str, Any]:
    """A tiny ViT feature backbone: CLS features, target ``blocks[-1].norm1`` (1 CLS + 4 x 4 patch tokens)."""
    model = _seeded(TinyViT, 1)
    return {"model": model, "target_layer": "blocks[-1].norm1", "preprocess": ImagePreprocess(16), "feature_dim": 16}


def tiny_cnn_classifier() -> dict[str, Any]:
    """A tiny CNN classifier over :data:`CLASS_NAMES` (``--classifier tiny_backbones:tiny_cnn_classifier``)."""
    model = _seeded(lambda: TinyCNN(len(CLASS_NAMES)), 2)
    return {"model": model, "target_layer": "features.4", "preprocess": ImagePreprocess(32), "class_names": CLASS_NAMES}


def tiny_vit_classifier() -> dict[str, Any]:
    """A tiny ViT classifier over :data:`CLASS_NAMES`."""
    model = _seeded(lambda: TinyViT(len(CLASS_NAMES)), 3)
    return {
        "model": model,
        "target_layer": "blocks[-1].norm1",
        "preprocess": ImagePreprocess(16),
        "class_names": CLASS_NAMES,
    }


def wrong_shape_classifier() -> dict[str, Any]:
    """Broken: the model gives 3 logits for 5 class names."""
    model = _seeded(lambda: TinyCNN(3), 4)
    return {"model": model, "target_layer": "features.4", "preprocess": ImagePreprocess(32), "class_names": CLASS_NAMES}


class _Spatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _seeded(TinyCNN, 5).features

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)  # (B, C, h, w): not logits


def spatial_output_classifier() -> dict[str, Any]:
    """Broken: the model returns feature maps (B, C, h, w) instead of logits (B, K)."""
    return {
        "model": _Spatial().eval(),
        "target_layer": "features.4",
        "preprocess": ImagePreprocess(32),
        "class_names": CLASS_NAMES,
    }
