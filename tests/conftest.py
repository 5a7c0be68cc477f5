"""Shared test fixtures: tiny random open_clip models saved to local files, and small test images.

No test may reach the network: ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub (it reads
the variable at import time) and again by an autouse fixture.

Fixtures (names are stable; other test files rely on them)
---------------------------------------------------------
tiny_clip_config, tiny_clip_weights
    Path of a tiny open_clip ViT config JSON (registered by traitloc under its stem ``traitloc_tiny_vit``;
    64 px input, 16 px patches, a 4 x 4 grid, 2 blocks of width 64, embedding dim 32) and of a ``.safetensors``
    file with seeded random weights for it. Pass them as ``--model CONFIG --pretrained WEIGHTS``.
tiny_rn_config, tiny_rn_weights
    The same for a tiny open_clip ModifiedResNet (``traitloc_tiny_rn``: layers [1, 1, 1, 1], width 16,
    64 px input, a 2 x 2 final grid, attention pooling).
tiny_bundle
    ``traitloc.models.clip.load_clip(tiny_clip_config, tiny_clip_weights, "cpu")`` (session-scoped: do not modify it).
image_factory
    ``image_factory(name, size=(w, h), mode="RGB", ...) -> Path`` writes a small deterministic test image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before any import of huggingface_hub (read at import time)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_VIT_NAME = "traitloc_tiny_vit"
TINY_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": TINY_TEXT_CFG,
}
TINY_RN_NAME = "traitloc_tiny_rn"
TINY_RN_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    # a list of 4 layer counts selects open_clip's ModifiedResNet; heads = width * 32 // head_width
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": TINY_TEXT_CFG,
}
#: native input size (height, width) of both tiny models
TINY_IMAGE_SIZE = (64, 64)
MODEL_SEED = 1234


@pytest.fixture(scope="session", autouse=True)
def _hf_hub_offline() -> Any:
    """Keep every test offline (``HF_HUB_OFFLINE=1``), restoring the previous value afterwards."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(autouse=True)
def _text_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh on-disk text-embedding cache per test (``TRAITLOC_CACHE_DIR``), never the user's own."""
    folder = tmp_path_factory.mktemp("traitloc_cache")
    monkeypatch.setenv("TRAITLOC_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding the tiny model configs and weights."""
    return tmp_path_factory.mktemp("tiny_models")


def _write_config(folder: Path, name: str, cfg: dict[str, Any]) -> Path:
    path = folder / f"{name}.json"
    if not path.exists():
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _write_weights(config: Path, seed: int = MODEL_SEED) -> Path:
    """Seeded random weights of the model described by ``config``, saved next to it as safetensors."""
    import open_clip
    import safetensors.torch
    import torch

    out = config.with_suffix(".safetensors")
    if out.exists():
        return out
    open_clip.add_model_config(config)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(config.stem, pretrained=None)
    finally:
        torch.random.set_rng_state(state)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_clip_config(tiny_models_dir: Path) -> Path:
    """Path to the tiny open_clip ViT config JSON (model name ``traitloc_tiny_vit``)."""
    return _write_config(tiny_models_dir, TINY_VIT_NAME, TINY_VIT_CONFIG)


@pytest.fixture(scope="session")
def tiny_clip_weights(tiny_clip_config: Path) -> Path:
    """Path to seeded random weights (``.safetensors``) of :func:`tiny_clip_config`."""
    return _write_weights(tiny_clip_config)


@pytest.fixture(scope="session")
def tiny_rn_config(tiny_models_dir: Path) -> Path:
    """Path to the tiny open_clip ModifiedResNet config JSON (model name ``traitloc_tiny_rn``)."""
    return _write_config(tiny_models_dir, TINY_RN_NAME, TINY_RN_CONFIG)


@pytest.fixture(scope="session")
def tiny_rn_weights(tiny_rn_config: Path) -> Path:
    """Path to seeded random weights (``.safetensors``) of :func:`tiny_rn_config`."""
    return _write_weights(tiny_rn_config)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_clip_config: Path, tiny_clip_weights: Path) -> Any:
    """The tiny ViT loaded with traitloc on the CPU (shared by the session: treat as read-only)."""
    from traitloc.models.clip import load_clip

    return load_clip(str(tiny_clip_config), str(tiny_clip_weights), "cpu")


# ------------------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------------------
def make_image_array(size: tuple[int, int], seed: int = 0, channels: int = 3) -> np.ndarray:
    """A deterministic uint8 test picture of ``size = (width, height)``: smooth colour blobs plus a bright disc.

    The content is structured (not white noise) and asymmetric, so rotations and flips change it.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, h // 16 + 2), max(2, w // 16 + 2), channels), dtype=np.uint8)
    base = np.stack(
        [
            np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.Resampling.BILINEAR))
            for c in range(channels)
        ],
        axis=-1,
    ).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * 0.3, w * 0.7  # off-centre: not symmetric under rotation
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.2 * min(w, h)) ** 2
    base[disc] = 0.3 * base[disc] + 0.7 * 255.0
    return np.clip(base, 0, 255).astype(np.uint8)


def _as_mode(rgb: np.ndarray, mode: str, seed: int) -> Image.Image:
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGB":
        return im
    if mode == "L":
        return im.convert("L")
    if mode == "RGBA":
        h, w = rgb.shape[:2]
        alpha = np.tile(np.linspace(40, 255, w, dtype=np.float32), (h, 1)).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        return im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "CMYK":
        return im.convert("CMYK")
    if mode in ("I;16", "I16"):
        gray = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return Image.fromarray(gray)  # mode I;16
    if mode == "1":
        return im.convert("1")
    raise ValueError(f"image_factory: unsupported mode {mode!r}")


@pytest.fixture
def image_factory(tmp_path: Path) -> Callable[..., Path]:
    """Return ``make(name, size=(64, 64), mode="RGB", *, folder=None, seed=0, exif_orientation=None,
    array=None, **save_kwargs) -> Path``.

    Writes a deterministic picture (:func:`make_image_array`) as ``folder / name`` (default folder:
    ``tmp_path / "images"``), the format chosen by the extension. ``mode``: RGB, L, RGBA, P, CMYK, I;16 or 1.
    ``exif_orientation`` (1-8) stores the pixels as given with that EXIF orientation tag (JPEG, PNG, TIFF, WebP).
    ``array`` replaces the generated RGB pixels (uint8, (H, W, 3)). Extra keyword arguments go to ``PIL.Image.save``.
    """
    default_folder = tmp_path / "images"

    def make(
        name: str,
        size: tuple[int, int] = TINY_IMAGE_SIZE[::-1],
        mode: str = "RGB",
        *,
        folder: str | os.PathLike[str] | None = None,
        seed: int = 0,
        exif_orientation: int | None = None,
        array: np.ndarray | None = None,
        **save_kwargs: Any,
    ) -> Path:
        out_dir = Path(folder) if folder is not None else default_folder
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        rgb = make_image_array(tuple(size), seed) if array is None else np.asarray(array, dtype=np.uint8)
        im = _as_mode(rgb, mode, seed)
        if exif_orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = int(exif_orientation)
            save_kwargs["exif"] = exif
        if path.suffix.lower() in (".jpg", ".jpeg"):
            save_kwargs.setdefault("quality", 95)
        im.save(path, **save_kwargs)
        return path

    return make
