"""Text prompts -> normalized CLIP text vectors, with optional template ensembles and a cache.

A concept query compares a concept prompt ("red epaulets") with a base prompt ("bird"):
``s = cos(e(x), t_concept) - gamma * cos(e(x), t_base)``. With templates (``"a photo of a bird with {}."``),
each prompt's vector is the normalized mean of its normalized template embeddings (CLIP prompt ensembling).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import ClipBundle

__all__ = ["PromptError", "TextEncoder", "check_prompt"]

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """An unusable prompt (empty, or a template without ``{}``)."""


def check_prompt(prompt: str) -> str:
    """Return the stripped prompt, or raise :class:`PromptError` for an empty one."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    p = " ".join(prompt.split())
    if not p:
        raise PromptError("empty prompt: give a concept text such as 'red epaulets'")
    return p


class TextEncoder:
    """Encode prompts with a CLIP model's text tower (cached per prompt and template set).

    Parameters
    ----------
    bundle : a loaded :class:`~traitloc.models.ClipBundle`.
    templates : optional templates containing ``{}``; the prompt is inserted and the embeddings averaged.
    batch_size : prompts per text-tower forward pass.
    """

    def __init__(self, bundle: ClipBundle, templates: Sequence[str] | None = None, batch_size: int = 256):
        self.bundle = bundle
        self.templates = tuple(templates or ("{}",))
        for t in self.templates:
            if "{}" not in t:
                raise PromptError(f"template {t!r} has no '{{}}' placeholder for the prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._cache: dict[str, Tensor] = {}
        self.truncated: list[str] = []

    def _encode_texts(self, texts: list[str]) -> Tensor:
        model, tok = self.bundle.model, self.bundle.tokenizer
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            ids = tok(chunk)
            if isinstance(ids, Tensor) and ids.ndim == 2:
                # open_clip's tokenizer truncates to the context length and puts EOT last: a non-pad last slot
                for t, row in zip(chunk, ids, strict=True):
                    if int(row[-1]) != 0 and t not in self.truncated:
                        self.truncated.append(t)
                        warnings.warn(
                            f"prompt truncated to the model's {ids.shape[1]} tokens: {t[:60]!r}...",
                            stacklevel=3,
                        )
            with torch.no_grad():
                emb = model.encode_text(ids.to(self.bundle.device))
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out)

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Normalized text vectors ``(P, D)`` (float32, on the model's device) for ``prompts``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = [check_prompt(p) for p in prompts]
        if not cleaned:
            raise PromptError("no prompts given")
        todo = list(dict.fromkeys(p for p in cleaned if p not in self._cache))
        if todo:
            texts = [t.format(p) for p in todo for t in self.templates]
            emb = self._encode_texts(texts).view(len(todo), len(self.templates), -1)
            vecs = F.normalize(emb.mean(1), dim=-1)
            for p, v in zip(todo, vecs, strict=True):
                self._cache[p] = v
        return torch.stack([self._cache[p] for p in cleaned])
