"""Linear probes on frozen backbone features: training, the resumable feature cache, the probe files, and
:class:`ProbeClassifier`, the one wrapper of a classifier ready to explain (``traitloc train-probe``, ``explain``,
``evaluate`` and ``audit``; see ``docs/engine.md``).

The feature cache lives here because its one job is to feed probe training (``train-probe`` reruns with other
epochs or seeds need no backbone pass); the explanation side is :mod:`traitloc.models.classifier`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traitloc.engine.adapters import Adapter
from traitloc.io.files import atomic_write, sha256_file, to_json
from traitloc.models.backbones import backbone_provenance, build_backbone, make_adapter, rebuild_backbone, spec_hash
from traitloc.models.classifier import ClassifierBundle, ClassifierExplainer

__all__ = [
    "PROBE_WEIGHTS",
    "PROBE_META",
    "LinearProbe",
    "ProbeError",
    "train_probe",
    "probe_accuracy",
    "save_probe",
    "load_probe",
    "FeatureCacheError",
    "extract_features",
    "ProbeClassifier",
    "load_probe_classifier",
    "classifier_info",
]

log = logging.getLogger(__name__)

PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
PROBE_FORMAT = "traitloc-probe"
CACHE_FORMAT = "traitloc-feature-cache"


# ------------------------------------------------------------------------------------------------------------------
# linear probes
# ------------------------------------------------------------------------------------------------------------------
class ProbeError(ValueError):
    """A probe could not be trained, saved or loaded; the message says why."""


def _check_ints(error: type[ValueError], least: int = 1, **values: Any) -> None:
    """Raise ``error`` for the first of ``values`` that is not an int >= ``least`` (1: positive, 0: non-negative)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise error(f"{name} must be a {'positive' if least else 'non-negative'} int, got {v!r}")


class LinearProbe(nn.Module):
    """A linear classification head on frozen features: ``logits = features @ W.T + b``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        _check_ints(ValueError, in_features=in_features, num_classes=num_classes)
        self.linear = nn.Linear(in_features, num_classes, bias=bias)

    @property
    def in_features(self) -> int:
        """The feature size D."""
        return self.linear.in_features

    @property
    def num_classes(self) -> int:
        """The number K of classes."""
        return self.linear.out_features

    @property
    def weight(self) -> Tensor:
        """(K, D) weight."""
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        """(K,) bias or ``None``."""
        return self.linear.bias

    def forward(self, features: Tensor) -> Tensor:
        """Logits (N, K) of features (N, D)."""
        return self.linear(features)


def _check_features_labels(features: Tensor, labels: Tensor, what: str = "") -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ProbeError(f"{what}features must be a float tensor (N, D), got {got}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ProbeError(f"{what}labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ProbeError(f"{what}features have {features.shape[0]} rows but labels have {labels.shape[0]}")
    if features.shape[0] == 0:
        raise ProbeError(f"{what}features are empty")
    if not torch.isfinite(features).all():
        raise ProbeError(f"{what}features contain NaN or infinite values")
    return features, labels.long()


def train_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    device: str | torch.device | None = None,
) -> tuple[LinearProbe, dict[str, list[float]]]:
    """Train a linear probe with Adam and cross-entropy on frozen features; deterministic given ``seed``.

    Parameters
    ----------
    features : (N, D) float features (as the explained model gives them, e.g. L2-normalized CLIP embeddings).
    labels : (N,) class indices in ``[0, num_classes)``.
    num_classes : number of classes (default ``labels.max() + 1``; give it when some classes have no examples).
    epochs, lr, batch_size, weight_decay : Adam settings; minibatches are reshuffled every epoch.
    seed : seeds the initialization and the shuffling (the global RNG is left untouched).
    val : optional ``(features, labels)`` evaluated after every epoch.
    device : where to train (default: the features' device).

    Returns
    -------
    probe : the trained :class:`LinearProbe` (eval mode, on the training device).
    history : ``loss`` and ``train_accuracy`` per epoch (and ``val_accuracy`` with ``val``).
    """
    features, labels = _check_features_labels(features, labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ProbeError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ProbeError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    _check_ints(ProbeError, epochs=epochs, batch_size=batch_size)
    _check_ints(ProbeError, 0, seed=seed)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ProbeError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ProbeError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if val is not None:
        val = _check_features_labels(val[0], val[1], "validation ")
        if val[0].shape[1] != features.shape[1]:
            raise ProbeError(f"validation features have {val[0].shape[1]} dims, training features {features.shape[1]}")
    dev = torch.device(device) if device is not None else features.device
    x, y = features.detach().to(dev, torch.float32), labels.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(int(x.shape[1]), num_classes)
    probe.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"loss": [], "train_accuracy": []}
    if val is not None:
        history["val_accuracy"] = []
    N = x.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(N, generator=gen).to(dev)
            total, correct = 0.0, 0
            for i in range(0, N, batch_size):
                idx = order[i : i + batch_size]
                logits = probe(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                correct += int((logits.detach().argmax(1) == y[idx]).sum())
            history["loss"].append(total / N)
            history["train_accuracy"].append(correct / N)
            if val is not None:
                history["val_accuracy"].append(probe_accuracy(probe, val[0], val[1]))
                probe.train()
    probe.eval()
    probe.requires_grad_(False)
    return probe, history


def probe_accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``probe`` on ``features`` (fraction in [0, 1])."""
    features, labels = _check_features_labels(features, labels)
    dev = next(probe.parameters()).device
    probe.eval()
    with torch.no_grad():
        pred = probe(features.to(dev, torch.float32)).argmax(1).cpu()
    return float((pred == labels.cpu()).float().mean())


def save_probe(directory: str | os.PathLike[str], probe: LinearProbe, meta: Mapping[str, Any]) -> Path:
    """Write ``probe.safetensors`` (``weight`` (K, D), ``bias`` (K,)) and ``probe.json`` into ``directory``.

    ``meta`` must hold ``class_names`` (K strings) and should hold ``backbone`` (the spec: a ``--model``/
    ``--pretrained`` pair or a ``--backbone MODULE:FUNCTION``), ``preprocessing``, ``feature_normalization``
    (e.g. ``"l2"`` or ``"none"``), ``test_accuracy`` and ``training`` (epochs, lr, batch size, weight decay, seed).
    ``format``, ``version``, ``in_features``, ``num_classes`` and ``has_bias`` are added.

    Returns
    -------
    The directory path.
    """
    from safetensors.torch import save

    if not isinstance(probe, LinearProbe):
        raise ProbeError(f"probe must be a LinearProbe, got {type(probe).__name__}")
    if not isinstance(meta, Mapping):
        raise ProbeError(f"meta must be a mapping, got {type(meta).__name__}")
    names = meta.get("class_names")
    if not isinstance(names, Sequence) or isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ProbeError("meta['class_names'] must be a list of class-name strings")
    if len(names) != probe.num_classes:
        raise ProbeError(f"meta has {len(names)} class names but the probe has {probe.num_classes} classes")
    out = {k: v for k, v in meta.items() if k not in ("format", "version")}
    out.update(
        format=PROBE_FORMAT,
        version=1,
        in_features=probe.in_features,
        num_classes=probe.num_classes,
        has_bias=probe.bias is not None,
        class_names=list(names),
    )
    try:
        text = to_json(out, indent=2, ascii_only=True)
    except (TypeError, ValueError) as err:
        raise ProbeError(f"probe metadata must be JSON-serializable (plain str/int/float/list/dict): {err}") from err
    d = Path(directory)  # atomic_write creates it
    tensors = {"weight": probe.weight.detach().float().cpu().contiguous()}
    if probe.bias is not None:
        tensors["bias"] = probe.bias.detach().float().cpu().contiguous()
    atomic_write(d / PROBE_WEIGHTS, save(tensors, metadata={"format": PROBE_FORMAT}))
    atomic_write(d / PROBE_META, text)
    return d


def load_probe(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[LinearProbe, dict]:
    """Read a probe written by :func:`save_probe`.

    Returns
    -------
    probe : :class:`LinearProbe` in eval mode with frozen parameters.
    meta : the JSON metadata.

    Raises
    ------
    ProbeError
        With a one-line reason for a missing directory/file, corrupt JSON or weights, or mismatched shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(directory)
    if not d.is_dir():
        raise ProbeError(f"probe directory not found: {d}")
    wpath, mpath = d / PROBE_WEIGHTS, d / PROBE_META
    for p in (wpath, mpath):
        if not p.is_file():
            raise ProbeError(f"probe directory {d} lacks {p.name} (write one with traitloc train-probe)")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProbeError(f"{mpath} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{mpath} is not a traitloc probe description (format {PROBE_FORMAT!r} expected)")
    try:
        tensors = load(wpath.read_bytes())
    except (SafetensorError, ValueError, OSError) as err:
        raise ProbeError(f"{wpath} is not a readable safetensors file: {str(err).splitlines()[0]}") from err
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or w.ndim != 2:
        raise ProbeError(f"{wpath} lacks a 2-D 'weight' tensor")
    K, D = int(w.shape[0]), int(w.shape[1])
    if (meta.get("num_classes"), meta.get("in_features")) != (K, D):
        raise ProbeError(
            f"{wpath} holds a {K}x{D} weight but {mpath.name} says "
            f"{meta.get('num_classes')} classes x {meta.get('in_features')} features"
        )
    if bool(meta.get("has_bias", True)) != (b is not None) or (b is not None and tuple(b.shape) != (K,)):
        raise ProbeError(f"{wpath} bias does not match {mpath.name} (expected shape ({K},) or none)")
    names = meta.get("class_names")
    if not isinstance(names, list) or len(names) != K:
        raise ProbeError(f"{mpath.name} must list {K} class_names, got {len(names) if isinstance(names, list) else 0}")
    probe = LinearProbe(D, K, bias=b is not None)
    probe.linear.load_state_dict({"weight": w} if b is None else {"weight": w, "bias": b})
    probe.eval().to(device)
    probe.requires_grad_(False)
    return probe, meta


# ------------------------------------------------------------------------------------------------------------------
# feature cache
# ------------------------------------------------------------------------------------------------------------------
class FeatureCacheError(ValueError):
    """The feature cache is unusable for this request; the message says why."""


def _read_cache(path: Path, sidecar: Path) -> tuple[list[str], Tensor | None, str | None]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return [], None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            feats = f.get_tensor("features")
        keys = json.loads(md["keys"])
        side = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError, ValueError) as err:
        raise FeatureCacheError(
            f"feature cache {path} is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"delete it or pass overwrite=True"
        ) from err
    if len(keys) != feats.shape[0] or feats.ndim != 2:
        raise FeatureCacheError(f"feature cache {path} is inconsistent (keys vs rows); delete it or overwrite=True")
    h = md.get("spec_hash")
    if side and side.get("spec_hash") != h:
        raise FeatureCacheError(f"feature cache {path} and its sidecar {sidecar.name} disagree; delete both")
    return keys, feats, h


def _write_cache(path: Path, sidecar: Path, keys: list[str], feats: Tensor, spec: Any, h: str) -> None:
    from safetensors.torch import save

    data = save({"features": feats.contiguous()}, metadata={"keys": to_json(keys, ascii_only=True), "spec_hash": h})
    atomic_write(path, data)
    side = {
        "format": CACHE_FORMAT,
        "version": 1,
        "spec_hash": h,
        "spec": spec,
        "n": len(keys),
        "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
    }
    atomic_write(sidecar, to_json(side, indent=2, ascii_only=True))


def extract_features(
    backbone_fn: Callable[[Tensor], Tensor],
    images_iterable: Iterable[Tensor | Callable[[], Tensor]],
    cache_path: str | os.PathLike[str],
    keys: Sequence[str],
    *,
    spec: Mapping[str, Any] | str = "",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    checkpoint_every: int = 1024,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Features of many images with a resumable on-disk cache.

    The cache is one safetensors file (tensor ``features`` (N, D) float32; the row keys and the spec hash in its
    metadata) plus a JSON sidecar ``<cache_path>.json`` with the backbone spec and its hash. Rows whose key is
    cached are reused without calling ``backbone_fn``; new rows are written every ``checkpoint_every`` images and
    when extraction stops (also on an error or interrupt), so a rerun resumes. Rows of other keys already in the
    cache are kept.

    Parameters
    ----------
    backbone_fn : (B, C, H, W) -> (B, D), called under ``torch.no_grad()``.
    images_iterable : one item per key, in the order of ``keys``: a preprocessed (C, H, W) tensor, or a zero-argument
        callable returning one (lazy: not called for cached keys, so cached images are not even decoded).
    cache_path : the ``.safetensors`` file.
    keys : unique string ids of the images (e.g. CUB image ids).
    spec : what identifies the backbone and preprocessing (name, weights hash, image size...); a cache built for
        another spec raises :class:`FeatureCacheError` unless ``overwrite=True``.
    batch_size : images per backbone call.
    device : move image batches there before calling the backbone.
    progress : called as ``progress(done, total)`` after each batch.

    Returns
    -------
    (len(keys), D) float32 CPU tensor in the order of ``keys``.
    """
    keys = list(keys)
    if not all(isinstance(k, str) and k for k in keys):
        raise FeatureCacheError("keys must be non-empty strings")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise FeatureCacheError(f"keys must be unique; {dup!r} appears more than once")
    _check_ints(FeatureCacheError, batch_size=batch_size, checkpoint_every=checkpoint_every)
    if not callable(backbone_fn):
        raise FeatureCacheError(f"backbone_fn must be callable, got {type(backbone_fn).__name__}")
    path = Path(cache_path)
    if path.suffix != ".safetensors":
        raise FeatureCacheError(f"cache_path must end in .safetensors, got {path.name}")
    sidecar = path.with_name(path.name + ".json")
    h = spec_hash(spec)
    cached_keys, cached, old = ([], None, None) if overwrite else _read_cache(path, sidecar)
    if cached is not None and old != h:
        raise FeatureCacheError(
            f"feature cache {path} was built for another backbone spec (hash {old}, now {h}); use another "
            f"cache path or overwrite=True"
        )
    # cached rows first, then new ones in the order computed (the cache file's row order)
    rows: dict[str, Tensor] = {k: cached[i] for i, k in enumerate(cached_keys)} if cached is not None else {}
    todo = [k for k in keys if k not in rows]
    dirty = 0

    def flush() -> None:
        nonlocal dirty
        if rows and (dirty or overwrite or not path.is_file()):
            _write_cache(path, sidecar, list(rows), torch.stack(list(rows.values())), spec, h)
            dirty = 0

    n_items = 0
    done = len(keys) - len(todo)
    try:
        batch: list[tuple[str, Tensor]] = []

        def run_batch() -> None:
            nonlocal done, dirty
            x = torch.stack([img for _, img in batch])
            if device is not None:
                x = x.to(device)
            with torch.no_grad():
                out = backbone_fn(x)
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(batch):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise FeatureCacheError(f"backbone_fn must return a ({len(batch)}, D) tensor, got {got}")
            out = out.detach().float().cpu()
            if rows and out.shape[1] != next(iter(rows.values())).shape[0]:
                raise FeatureCacheError(f"backbone_fn returned {out.shape[1]}-d features; the cache holds another dim")
            for (k, _), r in zip(batch, out, strict=True):
                rows[k] = r.clone()
            dirty += len(batch)
            done += len(batch)
            batch.clear()
            if progress is not None:
                progress(done, len(keys))

        for key, item in zip(keys, images_iterable, strict=False):
            n_items += 1
            if key in rows:  # cached (keys are unique, so no computed key comes again)
                continue
            img = item() if callable(item) and not isinstance(item, Tensor) else item
            if not isinstance(img, Tensor) or img.ndim != 3:
                got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise FeatureCacheError(f"image {key!r} must be a preprocessed (C, H, W) tensor, got {got}")
            batch.append((key, img))
            if len(batch) == batch_size:
                run_batch()
                if dirty >= checkpoint_every:
                    flush()
        if batch:
            run_batch()
        if n_items < len(keys):
            raise FeatureCacheError(f"images_iterable gave {n_items} items for {len(keys)} keys")
    finally:
        flush()
    log.info("features: %d cached, %d computed", len(keys) - len(todo), len(todo))
    return torch.stack([rows[k] for k in keys])


# ------------------------------------------------------------------------------------------------------------------
# a classifier, ready to explain
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeClassifier:
    """A classifier ready to explain: a linear probe on its rebuilt backbone, or a ``--classifier`` model whose head
    is the identity (``weight = I``); the implementation of :class:`~traitloc.models.classifier.ClassifierBundle`.

    Attributes
    ----------
    explainer : a Grad-CAM :class:`~traitloc.models.classifier.ClassifierExplainer` over the target layer and the
        head (:meth:`~traitloc.models.classifier.ClassifierExplainer.with_method` gives the other methods).
    preprocess : PIL image -> normalized (3, H, W) tensor.
    class_names : the K class names (the explainer's).
    meta : the probe's JSON (empty for a ``--classifier`` or a classifier built in code).
    describe : what ``run.json`` records (:func:`classifier_info`): backbone spec, target layer, probe file hash...
    model : normalized image batch -> logits (B, K) (backbone + head) in eval mode, the model the metrics perturb
        (``None`` for a classifier built in code from an explainer).
    device : where it runs (default: the head's device).
    """

    explainer: ClassifierExplainer
    preprocess: Callable[[Any], Tensor]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    describe: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    device: torch.device = None  # type: ignore[assignment]  # set from the head in __post_init__

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = self.explainer.weight.device

    @property
    def adapter(self) -> Adapter:
        """The target-layer adapter of the explainer."""
        return self.explainer.adapter

    @property
    def weight(self) -> Tensor:
        """(K, D) head weight."""
        return self.explainer.weight

    @property
    def bias(self) -> Tensor | None:
        """(K,) head bias or ``None``."""
        return self.explainer.bias

    @property
    def target_layer(self) -> str:
        """The explained layer's name."""
        return str(getattr(self.adapter, "target_layer", ""))


class _ProbeLogits(nn.Module):
    """Backbone features (L2-normalized with ``normalize``) -> probe logits, as one module."""

    def __init__(self, backbone: nn.Module, head: LinearProbe, normalize: bool):
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of a normalized image batch."""
        f = self.backbone(x)
        f = F.normalize(f, dim=-1) if self.normalize else f
        return self.head(f.to(self.head.linear.weight.dtype))


def load_probe_classifier(
    probe_dir: str | os.PathLike[str], backbone: str | None = None, device: str | torch.device = "cpu"
) -> ProbeClassifier:
    """Load a probe written by ``traitloc train-probe`` and rebuild the backbone it was trained on.

    Parameters
    ----------
    probe_dir : folder with ``probe.safetensors`` and ``probe.json``.
    backbone : override the recorded backbone with ``"efficientnet-lite0"`` or ``"MODULE:FUNCTION"``.
    device : where to run.

    Raises
    ------
    ProbeError, ValueError
        One line: missing/corrupt probe files, a backbone that cannot be rebuilt, or whose feature size differs.
    """
    from traitloc.models.clip import resolve_device

    dev = resolve_device(device)
    probe, meta = load_probe(probe_dir, dev)
    if backbone is not None:
        bb, _ = build_backbone(backbone=backbone, device=dev)
    elif "backbone" not in meta:
        raise ValueError(f"{Path(probe_dir) / 'probe.json'} records no backbone; pass the backbone explicitly")
    else:
        bb = rebuild_backbone(meta["backbone"], dev)
    dim = bb.get("feature_dim")
    if dim is not None and int(dim) != probe.in_features:
        raise ValueError(
            f"the probe's backbone gives {int(dim)}-d features but the probe expects {probe.in_features} "
            f"(probe {probe_dir})"
        )
    # L2-normalized features: a ready adapter (CLIP) normalizes itself; a hooked model gets it from the adapter
    normalize = str(meta.get("feature_normalization", "none")).lower() in ("l2", "normalized")
    hooked = normalize and bb.get("adapter") is None
    adapter = make_adapter(bb, normalize=hooked)
    names = list(meta["class_names"])
    bias = None if probe.bias is None else probe.bias.detach()
    describe = {
        "probe": str(Path(probe_dir).resolve()),
        "probe_sha256": sha256_file(Path(probe_dir) / PROBE_WEIGHTS),
        "backbone": meta.get("backbone"),
        "target_layer": getattr(adapter, "target_layer", None),
        "num_classes": probe.num_classes,
        "probe_test_accuracy": meta.get("test_accuracy"),
        "preprocessing": meta.get("preprocessing"),
    }
    return ProbeClassifier(
        ClassifierExplainer(adapter, probe.weight.detach(), bias, names), bb["preprocess"], names, dict(meta),
        describe, model=_ProbeLogits(bb["model"], probe, hooked).eval(), device=dev,
    )  # fmt: skip


def classifier_info(clf: ClassifierBundle) -> dict[str, Any]:
    """The classifier block of ``run.json`` (``explain`` and ``evaluate``): probe, backbone and weights provenance,
    device, dtype, input size and target layer."""
    d = clf.describe
    backbone: dict[str, Any] = d["backbone"] if isinstance(d.get("backbone"), dict) else {}
    size = getattr(clf.preprocess, "size", None)
    return {
        "probe": d.get("probe"),
        "probe_sha256": d.get("probe_sha256"),
        **backbone_provenance(backbone or {"callable": d.get("classifier")}),
        "backbone": backbone or None,
        "device": str(clf.device),
        "dtype": "fp32",
        "image_size": list(size) if size is not None else None,
        "target_layer": clf.target_layer,
    }
