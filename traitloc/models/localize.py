"""Concept queries by text: the Python API and the streaming batch pipeline behind ``traitloc localize``.

Needs model weights (a local file: nothing is downloaded), so the example is not run as a doctest:

>>> from traitloc import load_clip, ConceptLocalizer  # doctest: +SKIP
>>> loc = ConceptLocalizer(load_clip("ViT-B-16", "/path/to/weights.safetensors"))  # doctest: +SKIP
>>> res = loc.explain([pil_image], ["red epaulets", "yellow bill"], base="bird", gamma=1.0)  # doctest: +SKIP
>>> res[0].map(0).shape  # (H, W) of the original image, ReLU map in raw units  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from traitloc.engine.adapters import Prefix, TargetAdapter, clip_adapter
from traitloc.engine.cam import CamOutput, FinerCAM, GradCache, finer_coefficients, upsample_maps
from traitloc.engine.dense import DenseCache, DenseCLIP, LeGrad, LeGradCache
from traitloc.engine.methods import CAM_METHODS, DENSE_METHODS, TEXT_METHODS, get_method
from traitloc.models.clip import ClipBundle
from traitloc.models.text import TextEncoder, check_prompt

__all__ = ["ConceptLocalizer", "ConceptMaps", "QueryCache", "RESIZE_MODES", "preprocess_image", "input_size_for"]

RESIZE_MODES = ("stretch", "aspect")


def input_size_for(orig_wh: tuple[int, int], native_hw: tuple[int, int], mode: str, multiple: int) -> tuple[int, int]:
    """Model input (H, W) for an image of size (width, height).

    ``stretch``: the native size (the whole image, aspect ratio not kept). ``aspect``: about the native number of
    pixels with the image's aspect ratio, sides rounded to multiples of the patch (ViT) or stride (ResNet).
    """
    if mode == "stretch":
        return native_hw
    if mode != "aspect":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    w, h = orig_wh
    area = native_hw[0] * native_hw[1]
    scale = math.sqrt(area / max(1, w * h))
    H = max(multiple, int(round(h * scale / multiple)) * multiple)
    W = max(multiple, int(round(w * scale / multiple)) * multiple)
    return (H, W)


def preprocess_image(
    image: Image.Image, size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """RGB PIL image -> normalized (3, H, W) float tensor, resized (bicubic) to ``size_hw`` unless already that size.

    The whole image is kept (no crop), so a map on the input grid covers the whole original image.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    H, W = size_hw
    if image.size != (W, H):
        image = image.resize((W, H), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (arr - m) / s


@dataclass
class ConceptMaps:
    """Maps of one image for a list of concept queries.

    ``signed[q]`` is the pre-ReLU map on the model grid; :meth:`map` brings the ReLU map to ``size``.
    """

    signed: Tensor  # (Q, h, w)
    concepts: list[str]
    base: str | None
    gamma: float
    method: str
    scores: Tensor  # (Q,) the explained objective s_concept - gamma * s_base
    concept_scores: Tensor  # (Q,) cosine with the concept prompt
    base_score: float | None
    size: tuple[int, int]  # (H, W) of the original image
    info: dict[str, Any] = field(default_factory=dict)

    def map(self, q: int, size: tuple[int, int] | None = None, signed: bool = False) -> np.ndarray:
        """Map of query ``q`` at ``size`` (default: the original image), float32, raw units."""
        m = self.signed[q] if signed else self.signed[q].clamp_min(0)
        return upsample_maps(m, size or self.size).cpu().numpy().astype(np.float32)


class ConceptLocalizer:
    """Finer-CAM concept queries with an open_clip model.

    Parameters
    ----------
    bundle : a loaded model (:func:`traitloc.models.clip.load_clip`).
    method : ``gradcam`` (default), ``layercam``, ``scorecam`` (any open_clip model) or, for open_clip ViTs, the
        dense forward-only methods ``maskclip``, ``clearclip``, ``sclip``, ``naclip``, ``gem`` and ``legrad``
        (:mod:`traitloc.engine.methods` lists them with their equations; ``docs/methods.md`` says when to pick which).
    templates : optional prompt templates containing ``{}`` (ensembled).
    resize : ``stretch`` (default; native square, whole image) or ``aspect`` (keep the aspect ratio).
    amp_dtype : autocast dtype on CUDA (``torch.bfloat16``), or ``None``.
    scorecam_channels : Score-CAM channel budget (``None``: all channels).
    """

    def __init__(
        self,
        bundle: ClipBundle,
        method: str = "gradcam",
        *,
        templates: Sequence[str] | None = None,
        resize: str = "stretch",
        amp_dtype: torch.dtype | None = None,
        scorecam_channels: int | None = None,
        adapter: TargetAdapter | None = None,
    ):
        if method not in TEXT_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(TEXT_METHODS)}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.bundle = bundle
        self.method = method
        self.resize = resize
        self.adapter = adapter or clip_adapter(bundle.visual, normalize=True)
        scale = getattr(bundle.model, "logit_scale", None)
        tau = float(scale.exp()) if isinstance(scale, Tensor) else 100.0
        # ``cam`` serves Grad-CAM gradients (``gradients()``) for every method; ``engine`` computes the method's maps
        self.cam = FinerCAM(
            self.adapter,
            method if method in CAM_METHODS else "gradcam",
            score_temperature=tau,
            scorecam_channels=scorecam_channels,
            amp_dtype=amp_dtype,
        )
        self.engine: FinerCAM | DenseCLIP | LeGrad = self.cam
        if method in DENSE_METHODS:
            self.engine = DenseCLIP(self.adapter, method, amp_dtype=amp_dtype)  # type: ignore[arg-type]
        elif method == "legrad":
            self.engine = LeGrad(self.adapter, amp_dtype=amp_dtype)  # type: ignore[arg-type]
        self.text = TextEncoder(bundle, templates)
        self.multiple = int(getattr(self.adapter, "patch", (32, 32))[0])

    @property
    def target_layer(self) -> str:
        """A readable name of the layer (or blocks) the method reads its maps from (recorded in ``run.json``)."""
        if self.method in CAM_METHODS:
            return self.adapter.target_layer
        if self.method == "gem":
            return f"visual.transformer.resblocks[-{self.engine.gem_blocks}:] (GEM path)"  # type: ignore[union-attr]
        if self.method == "legrad":
            return f"visual.transformer.resblocks[-{self.engine.layers}:].attn (attention maps)"  # type: ignore[union-attr]
        return f"visual.transformer.resblocks[-1] ({self.method} last block)"

    def input_size(self, orig_wh: tuple[int, int]) -> tuple[int, int]:
        """Model input (H, W) for an image of size (width, height) under this localizer's resize mode."""
        return input_size_for(orig_wh, self.bundle.image_size, self.resize, self.multiple)

    def to_tensor(self, image: Image.Image) -> Tensor:
        """The image resized (:meth:`input_size`) and normalized for the model: ``(3, H, W)`` float32."""
        return preprocess_image(image, self.input_size(image.size), self.bundle.mean, self.bundle.std)

    def query_vectors(self, concepts: Sequence[str], base: str | None) -> tuple[list[str], Tensor, Tensor]:
        """Unique prompts, their vectors (P, D) and the Finer coefficients for ``gamma = 1`` building blocks."""
        concepts = [check_prompt(c) for c in concepts]
        if not concepts:
            raise ValueError("no concepts given")
        prompts = list(dict.fromkeys([*concepts, *([check_prompt(base)] if base is not None else [])]))
        return concepts, self.text.encode(prompts), torch.tensor([prompts.index(c) for c in concepts])

    def explain_tensor(
        self,
        x: Tensor,
        concepts: Sequence[str],
        base: str | None = None,
        gamma: float = 1.0,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[ConceptMaps]:
        """Explain a preprocessed batch ``x`` (B, 3, H, W). ``sizes``: original (H, W) per image."""
        if not math.isfinite(float(gamma)):
            raise ValueError(f"gamma must be finite, got {gamma}")
        concepts, V, idx = self.query_vectors(concepts, base)
        prompts_n = V.shape[0]
        base_i = prompts_n - 1 if base is not None else None
        refs = [[base_i] if base_i is not None and base_i != i else [] for i in idx.tolist()]
        W = finer_coefficients(prompts_n, idx.tolist(), refs, gamma if base is not None else 0.0)
        x = x.to(self.bundle.device)
        out: CamOutput = self.engine(x, V, W)
        assert out.features is not None
        per_prompt = out.features.float() @ V.t()  # (B, P) cosine with each prompt
        res = []
        for b in range(x.shape[0]):
            res.append(
                ConceptMaps(
                    signed=out.signed[b].detach(),
                    concepts=list(concepts),
                    base=base,
                    gamma=float(gamma),
                    method=self.method,
                    scores=out.scores[b].detach().cpu(),
                    concept_scores=per_prompt[b, idx].detach().cpu(),
                    base_score=float(per_prompt[b, base_i]) if base_i is not None else None,
                    size=tuple(sizes[b]) if sizes is not None else tuple(x.shape[-2:]),  # type: ignore[arg-type]
                )
            )
        return res

    def explain(
        self, images: Sequence[Image.Image], concepts: Sequence[str], base: str | None = None, gamma: float = 1.0
    ) -> list[ConceptMaps]:
        """Explain PIL images (each resized as configured; maps come back at each image's own size)."""
        out: list[ConceptMaps] = []
        for group in _group_by_size([(im, self.input_size(im.size)) for im in images]):
            x = torch.stack([self.to_tensor(im) for im in group])
            out.extend(self.explain_tensor(x, concepts, base, gamma, sizes=[(im.size[1], im.size[0]) for im in group]))
        return out

    def gradients(self, image: Image.Image, prompts: Sequence[str]) -> tuple[GradCache, list[str]]:
        """Per-prompt Grad-CAM weights of one image, to recombine interactively (new gamma/base: no backward)."""
        prompts = list(dict.fromkeys(check_prompt(p) for p in prompts))
        x = self.to_tensor(image).unsqueeze(0).to(self.bundle.device)
        return self.cam.gradients(x, self.text.encode(prompts)), prompts

    def prefix(self, x: Tensor) -> Prefix:
        """Run the model up to the target layer on a normalized batch ``(B, 3, H, W)`` (no gradients)."""
        return self.cam.prefix(x.to(self.bundle.device))

    def query_cache(self, image: Image.Image, prompts: Sequence[str]) -> QueryCache:
        """Per-prompt results of one image for this localizer's method, to recombine interactively.

        For every method whose registry entry has ``cached_regamma`` (gradcam, the dense methods, legrad) a new
        gamma or base among ``prompts`` costs no forward or backward pass (:meth:`QueryCache.explain`); for
        layercam and scorecam the cache keeps the model input and recomputes.
        """
        prompts = list(dict.fromkeys(check_prompt(p) for p in prompts))
        if not prompts:
            raise ValueError("no prompts given")
        x = self.to_tensor(image).unsqueeze(0).to(self.bundle.device)
        V = self.text.encode(prompts)
        cache: Any = None
        if get_method(self.method).cached_regamma:
            if isinstance(self.engine, DenseCLIP):
                cache = self.engine.features(x)
            elif isinstance(self.engine, LeGrad):
                cache = self.engine.gradients(x, V)
            else:
                cache = self.cam.gradients(x, V)
        return QueryCache(self, prompts, V, cache, x, (image.size[1], image.size[0]))


@dataclass
class QueryCache:
    """What one image costs once for a list of prompts; :meth:`explain` recombines any concept, base and gamma."""

    localizer: ConceptLocalizer
    prompts: list[str]
    vectors: Tensor  # (P, D)
    cache: GradCache | DenseCache | LeGradCache | None
    x: Tensor  # (1, 3, H, W) model input
    size: tuple[int, int]  # original (H, W)

    def explain(self, concepts: Sequence[str], base: str | None = None, gamma: float = 1.0) -> ConceptMaps:
        """Maps of ``concepts`` vs ``base`` at ``gamma``; every prompt must be among the cached ``prompts``."""
        if not math.isfinite(float(gamma)):
            raise ValueError(f"gamma must be finite, got {gamma}")
        concepts = [check_prompt(c) for c in concepts]
        if not concepts:
            raise ValueError("no concepts given")
        wanted = [*concepts, *([check_prompt(base)] if base is not None else [])]
        missing = [p for p in wanted if p not in self.prompts]
        if missing:
            raise ValueError(f"prompt(s) not in this cache: {', '.join(map(repr, missing))}; make a new query_cache")
        idx = [self.prompts.index(c) for c in concepts]
        base_i = self.prompts.index(check_prompt(base)) if base is not None else None
        refs = [[base_i] if base_i is not None and base_i != i else [] for i in idx]
        W = finer_coefficients(len(self.prompts), idx, refs, gamma if base is not None else 0.0)
        loc = self.localizer
        if self.cache is not None:
            out = self.cache.combine(W, self.vectors)
        else:
            out = loc.engine(self.x, self.vectors, W)
        assert out.features is not None
        per_prompt = out.features.float() @ self.vectors.t().to(out.features.device).float()
        return ConceptMaps(
            signed=out.signed[0].detach(),
            concepts=list(concepts),
            base=base,
            gamma=float(gamma),
            method=loc.method,
            scores=out.scores[0].detach().cpu(),
            concept_scores=per_prompt[0, idx].detach().cpu(),
            base_score=float(per_prompt[0, base_i]) if base_i is not None else None,
            size=self.size,
        )


def _group_by_size(items: Iterable[tuple[Image.Image, tuple[int, int]]]) -> Iterator[list[Image.Image]]:
    """Consecutive runs of images sharing a model input size (batches must be rectangular)."""
    group: list[Image.Image] = []
    size = None
    for im, s in items:
        if group and s != size:
            yield group
            group = []
        group.append(im)
        size = s
    if group:
        yield group
