"""Text prompts -> normalized CLIP text vectors, with optional template ensembles and a cache.

A concept query compares a concept prompt ("red epaulets") with a base prompt ("bird"):
``s = cos(e(x), t_concept) - gamma * cos(e(x), t_base)``. With templates (``"a photo of a bird with {}."``),
each prompt's vector is the normalized mean of its normalized template embeddings (CLIP prompt ensembling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from traitloc.models.clip import ClipBundle

__all__ = ["PromptError", "TextEncoder", "check_prompt", "text_cache_root"]

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


def text_cache_root() -> Path | None:
    """The folder of the on-disk text-embedding cache, or None when disabled.

    ``$TRAITLOC_CACHE_DIR/text`` if set (an empty value or ``off`` disables the cache), else
    ``$XDG_CACHE_HOME/traitloc/text``, else ``~/.cache/traitloc/text``.
    """
    env = os.environ.get("TRAITLOC_CACHE_DIR")
    if env is not None:
        if env.strip().lower() in ("", "off", "none", "0"):
            return None
        return Path(env).expanduser() / "text"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "traitloc" / "text"


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:40]


class TextEncoder:
    """Encode prompts with a CLIP model's text tower (cached per prompt and template set, in memory and on disk).

    The disk cache (:func:`text_cache_root`) is keyed by the model name, the weights file's sha256, the context
    length and the templates; each prompt's normalized vector is stored under the sha256 of the prompt, in
    safetensors files written atomically (several processes may share the cache). Models without a weights file
    (random or hub weights without a local file) are cached in memory only.

    Parameters
    ----------
    bundle : a loaded :class:`~traitloc.models.clip.ClipBundle`.
    templates : optional templates containing ``{}``; the prompt is inserted and the embeddings averaged.
    batch_size : prompts per text-tower forward pass.
    cache : use the disk cache (default True; also needs the weights' sha256 and :func:`text_cache_root`).

    Attributes
    ----------
    n_encoded : prompts this encoder has run through the text tower (0 when everything came from a cache).
    n_disk_hits : prompts read from the disk cache.
    """

    def __init__(
        self, bundle: ClipBundle, templates: Sequence[str] | None = None, batch_size: int = 256, cache: bool = True
    ):
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
        self.n_encoded = 0
        self.n_disk_hits = 0
        self.cache_dir = self._cache_dir() if cache else None
        self._disk: dict[str, Tensor] | None = None

    def _cache_dir(self) -> Path | None:
        root = text_cache_root()
        sha = getattr(self.bundle, "pretrained_sha256", None)
        if root is None or not sha:
            return None
        spec = json.dumps(
            {"model": self.bundle.name, "weights_sha256": sha, "templates": list(self.templates),
             "context_length": getattr(self.bundle, "context_length", None)}, sort_keys=True,
        )  # fmt: skip
        return root / hashlib.sha256(spec.encode()).hexdigest()[:32]

    def cache_info(self) -> dict[str, Any]:
        """For run.json: where the disk cache is and how much it served."""
        return {"dir": None if self.cache_dir is None else str(self.cache_dir), "encoded": self.n_encoded,
                "disk_hits": self.n_disk_hits}  # fmt: skip

    def _disk_vectors(self) -> dict[str, Tensor]:
        if self._disk is None:
            self._disk = {}
            if self.cache_dir is not None and self.cache_dir.is_dir():
                from safetensors.torch import load_file

                for f in sorted(self.cache_dir.glob("emb-*.safetensors")):
                    try:
                        self._disk.update(load_file(str(f)))
                    except Exception as err:  # noqa: BLE001 - a damaged cache file is skipped, never fatal
                        log.warning("text cache: skipping %s (%s)", f, err)
        return self._disk

    def _save_disk(self, prompts: list[str], vecs: Tensor) -> None:
        if self.cache_dir is None:
            return
        try:
            import secrets

            from safetensors.torch import save

            from traitloc.io.files import atomic_write

            tensors = {_prompt_id(p): v.detach().float().cpu().contiguous() for p, v in zip(prompts, vecs, strict=True)}
            meta = {"prompts": json.dumps({_prompt_id(p): p for p in prompts})}
            path = self.cache_dir / f"emb-{secrets.token_hex(8)}.safetensors"
            atomic_write(path, save(tensors, metadata=meta))
            self._disk_vectors().update(tensors)
        except OSError as err:  # a read-only cache folder must not stop a run
            log.warning("text cache: could not write to %s (%s)", self.cache_dir, err)

    def _encode_texts(self, texts: list[str]) -> Tensor:
        model: Any = self.bundle.model  # an open_clip CLIP (``encode_text``), typed as any nn.Module
        tok = self.bundle.tokenizer
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
        if todo and self.cache_dir is not None:
            disk = self._disk_vectors()
            device = self.bundle.device
            for p in [p for p in todo if _prompt_id(p) in disk]:
                self._cache[p] = disk[_prompt_id(p)].to(device)
                self.n_disk_hits += 1
            todo = [p for p in todo if p not in self._cache]
        if todo:
            texts = [t.format(p) for p in todo for t in self.templates]
            emb = self._encode_texts(texts).view(len(todo), len(self.templates), -1)
            vecs = F.normalize(emb.mean(1), dim=-1)
            for p, v in zip(todo, vecs, strict=True):
                self._cache[p] = v
            self.n_encoded += len(todo)
            self._save_disk(todo, vecs)
        return torch.stack([self._cache[p] for p in cleaned])
