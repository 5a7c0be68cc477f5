"""Model loading: open_clip models (any name, pretrained tag, local weights file or ``hf-hub:`` name).

Weights are never unpickled: ``.safetensors`` files are read with safetensors, ``.bin``/``.pt``/``.pth`` files
with ``torch.load(weights_only=True)`` (open_clip's own loader, which we call with ``weights_only=True``).
No machine without network access can fetch hub weights; the failure then names the ``--pretrained FILE``
alternative.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from traitloc.io.files import sha256_file

__all__ = [
    "ClipBundle",
    "ModelLoadError",
    "load_clip",
    "resolve_device",
    "register_model_config",
]

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "laion400m_e32"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says what to do instead."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return a torch device; ``"auto"`` picks CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def register_model_config(path: str | os.PathLike[str]) -> str:
    """Register an open_clip model config JSON file and return the model name it is known by (the file stem).

    The JSON must hold ``embed_dim``, ``vision_cfg`` and ``text_cfg`` as open_clip's own configs do.
    """
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model config file not found: {p}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"model config {p} is not valid JSON: {err}") from err
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ModelLoadError(f"model config {p} lacks {', '.join(missing)} (an open_clip model config is expected)")
    open_clip.add_model_config(p)
    return p.stem


@dataclass
class ClipBundle:
    """An open_clip model ready for explanation.

    Attributes
    ----------
    model : the open_clip ``CLIP`` model (eval mode, parameters frozen).
    tokenizer : callable turning a list of strings into token ids.
    name, pretrained : what was asked for; ``pretrained_sha256`` is set when weights came from a local file.
    image_size : the native (height, width) input size of the visual tower.
    mean, std : per-channel normalization constants.
    """

    model: nn.Module
    tokenizer: Any
    name: str
    pretrained: str | None
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    pretrained_sha256: str | None = None
    context_length: int = 77
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def visual(self) -> nn.Module:
        """The image tower (``model.visual``)."""
        return cast(nn.Module, self.model.visual)

    def describe(self) -> dict[str, Any]:
        """Settings for ``run.json`` and TIFF metadata."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "pretrained_sha256": self.pretrained_sha256,
            "image_size": list(self.image_size),
            "device": str(self.device),
        }


def _is_local_file(pretrained: str | None) -> bool:
    return bool(pretrained) and (os.path.sep in str(pretrained) or str(pretrained).endswith(WEIGHT_SUFFIXES))


def _offline_hint(name: str, pretrained: str | None) -> str:
    return (
        f"could not fetch weights for model {name!r} (pretrained={pretrained!r}); this machine may be offline. "
        f"Download the checkpoint elsewhere and pass it with --pretrained /path/to/file.safetensors "
        f"(or .bin/.pt), e.g. --model ViT-B-16 --pretrained /path/to/open_clip_model.safetensors"
    )


def load_clip(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "auto",
    *,
    image_size: int | Sequence[int] | None = None,
) -> ClipBundle:
    """Load an open_clip model for explanation.

    Parameters
    ----------
    name : an open_clip model name (``ViT-B-16``, ``RN50``, ``ViT-B-16-quickgelu`` for OpenAI weights ...),
        an ``hf-hub:org/repo`` name (e.g. ``hf-hub:imageomics/bioclip``), or a path to an open_clip model
        config ``.json`` (registered under its file stem).
    pretrained : a pretrained tag (``laion400m_e32``), a local weights file (``.safetensors`` / ``.bin`` /
        ``.pt``; loaded without pickle), or ``None`` for random weights.
    device : ``"auto"``, ``"cpu"``, ``"cuda"``.
    image_size : optional ``force_image_size`` for the visual tower.

    Raises
    ------
    ModelLoadError
        With a one-line reason; offline hub failures name the ``--pretrained FILE`` alternative.
    """
    import open_clip

    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("model name must be a non-empty string, e.g. 'ViT-B-16'")
    dev = resolve_device(device)
    model_name = name
    if name.endswith(".json"):
        model_name = register_model_config(name)
    sha = None
    if pretrained is not None and pretrained != "" and _is_local_file(pretrained):
        p = Path(pretrained)
        if not p.is_file():
            raise ModelLoadError(f"weights file not found: {p}")
        if p.suffix not in WEIGHT_SUFFIXES:
            raise ModelLoadError(f"weights file {p} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
        sha = sha256_file(p)
        pretrained = str(p)
    is_hub = model_name.startswith("hf-hub:")
    if not is_hub and not model_name.startswith("local-dir:") and model_name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown open_clip model {model_name!r}; see open_clip.list_models() (e.g. ViT-B-16, RN50, "
            f"ViT-B-16-quickgelu), an hf-hub:org/repo name, or a path to a model config .json"
        )
    kwargs: dict[str, Any] = {"device": dev, "weights_only": True}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    has_schema = is_hub or model_name.startswith("local-dir:")
    try:
        model = open_clip.create_model(model_name, pretrained=None if has_schema else (pretrained or None), **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised with a clear one-line message
        first = (str(err).splitlines() or [type(err).__name__])[0]
        if _is_local_file(pretrained) and not has_schema:
            raise ModelLoadError(f"could not load weights {pretrained} into {model_name}: {first}") from err
        if model_name.startswith("local-dir:") or (not pretrained and not is_hub):
            raise ModelLoadError(f"could not build {model_name}: {first}") from err
        raise ModelLoadError(_offline_hint(model_name, pretrained)) from err
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)

    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load the tokenizer for {model_name!r} (offline?): use the architecture's name, e.g. "
            f"--model ViT-B-16 --pretrained /path/to/bioclip.safetensors"
        ) from err
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size_t = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    mean = tuple(cfg.get("mean", OPENAI_MEAN))
    std = tuple(cfg.get("std", OPENAI_STD))
    ctx = int(getattr(tokenizer, "context_length", 77) or 77)
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        image_size=size_t,  # type: ignore[arg-type]
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        device=dev,
        pretrained_sha256=sha,
        context_length=ctx,
    )
