"""Tests for traitloc.models.classifier: the hook adapter against full autograd and torchcam, probes, the feature cache,
similar-class selection and the classifier explainer (tiny random models only)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from traitloc.engine.cam import FinerCAM, finer_coefficients
from traitloc.engine.hooks import HookAdapter, forward_hook, frozen_parameters, resolve_module
from traitloc.engine.reference import reference_cam
from traitloc.models.classifier import ClassifierExplainer, similar_by_weights, similar_classes
from traitloc.models.probes import (
    FeatureCacheError,
    LinearProbe,
    ProbeError,
    extract_features,
    load_probe,
    probe_accuracy,
    save_probe,
    train_probe,
)

K = 10
NAMES = [f"Class {c}" for c in "ABCDEFGHIJ"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyCNN(nn.Module):
    def __init__(self, k: int = K, inplace: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(inplace)
        )
        self.head = nn.Linear(16, k)
        self.fail_after_target = False

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if self.fail_after_target:
            raise RuntimeError("boom")
        return self.head(f.mean((2, 3)))


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
    """Patch embedding, ``n_prefix`` leading tokens (CLS + registers), two blocks, CLS head."""

    def __init__(self, k: int = K, c: int = 16, patch: int = 4, grid: tuple[int, int] = (4, 4), n_prefix: int = 1):
        super().__init__()
        self.patch = nn.Conv2d(3, c, patch, patch)
        self.prefix_tokens = nn.Parameter(torch.randn(1, n_prefix, c) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, n_prefix + grid[0] * grid[1], c) * 0.5)
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, k)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix_tokens.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for b in self.blocks:
            t = b(t)
        return self.head(self.norm(t)[:, 0])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture
def cnn() -> TinyCNN:
    torch.manual_seed(0)
    m = TinyCNN().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.features[3].running_mean.uniform_(-0.2, 0.2)
        m.features[3].running_var.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def vit() -> TinyViT:
    torch.manual_seed(1)
    return TinyViT().eval()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# module lookup and hooks
# ---------------------------------------------------------------------------------------------------------------
def test_resolve_module_names(cnn, vit):
    assert resolve_module(cnn, "features.4")[0] is cnn.features[4]
    assert resolve_module(cnn, "features[-1]") == (cnn.features[4], "features.4")
    assert resolve_module(cnn, "features.-1")[0] is cnn.features[4]
    assert resolve_module(vit, "blocks[-1].norm1") == (vit.blocks[1].norm1, "blocks.1.norm1")
    assert resolve_module(vit, "blocks.0.norm1")[0] is vit.blocks[0].norm1
    assert resolve_module(vit, vit.blocks[1].norm1)[1] == "blocks.1.norm1"
    with pytest.raises(ValueError, match="has no submodule 'nope'"):
        resolve_module(cnn, "features.nope")
    with pytest.raises(ValueError, match="out of range"):
        resolve_module(vit, "blocks[5].norm1")
    with pytest.raises(ValueError, match="cannot be indexed"):
        resolve_module(cnn, "head[0]")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_module(cnn, nn.ReLU())
    with pytest.raises(TypeError, match="dotted name"):
        resolve_module(cnn, 3)  # type: ignore[arg-type]


def test_hooks_removed_when_body_raises(cnn):
    with pytest.raises(RuntimeError, match="inside"), forward_hook(cnn.features[4], lambda *a: None):
        assert len(cnn.features[4]._forward_hooks) == 1
        raise RuntimeError("inside")
    assert _no_hooks(cnn)
    cnn.head.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="inside"), frozen_parameters(cnn):
        raise RuntimeError("inside")
    assert not cnn.head.weight.requires_grad and cnn.head.bias.requires_grad


def test_adapter_hooks_removed_when_model_raises(cnn):
    ad = HookAdapter(cnn, "features.4")
    pre = ad.prefix(torch.randn(1, 3, 16, 16))
    cnn.fail_after_target = True
    with pytest.raises(RuntimeError, match="boom"):
        ad.suffix(pre)
    with pytest.raises(RuntimeError, match="boom"):
        ad.prefix(torch.randn(1, 3, 16, 16))
    assert _no_hooks(cnn)
    assert all(p.requires_grad for p in cnn.parameters())


def test_adapter_leaves_model_as_given(cnn):
    cnn.features[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in cnn.parameters()]
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    cam = FinerCAM(HookAdapter(cnn, "features.4"))
    cam(x, torch.randn(3, K), finer_coefficients(3, [0], [[1, 2]], 0.6))
    FinerCAM(HookAdapter(cnn, "features.4"), "layercam")(x, torch.randn(3, K))
    assert [p.requires_grad for p in cnn.parameters()] == flags
    assert not cnn.training and _no_hooks(cnn)
    assert all(p.grad is None for p in cnn.parameters())
    assert all(torch.equal(v, state[k]) for k, v in cnn.state_dict().items())


def test_training_mode_warns(cnn):
    cnn.train()
    with pytest.warns(UserWarning, match="training mode"):
        HookAdapter(cnn, "features.4").prefix(torch.randn(2, 3, 8, 8))


def test_target_run_twice_rejected():
    act = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 3), act, nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="ran 2 times"):
        HookAdapter(model.eval(), "1").prefix(torch.randn(1, 3, 8, 8))


def test_bad_layouts(cnn):
    ad = HookAdapter(cnn, "head")  # 2-D output
    with pytest.raises(ValueError, match=r"expected \(B, C, h, w\)"):
        ad.prefix(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"image batch \(B, C, H, W\)"):
        HookAdapter(cnn, "features.4").prefix(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="either grid or patch_size"):
        HookAdapter(cnn, "features.4", grid=2, patch_size=2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HookAdapter(lambda x: x, "a")  # type: ignore[arg-type]


def test_token_layout_detection():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16)
    reg = TinyViT(n_prefix=3).eval()  # 3 + 16 tokens: neither L nor L-1 is square
    with pytest.raises(ValueError, match="n_prefix_tokens"):
        HookAdapter(reg, "blocks[-1].norm1").prefix(x)
    for kw in ({"n_prefix_tokens": 3}, {"grid": (4, 4)}, {"patch_size": 4}):
        pre = HookAdapter(reg, "blocks[-1].norm1", **kw).prefix(x)
        assert pre.grid == (4, 4) and pre.acts.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        HookAdapter(reg, "blocks[-1].norm1", grid=(4, 4), n_prefix_tokens=1).prefix(x)
    none = TinyViT(n_prefix=0).eval()
    assert HookAdapter(none, "blocks[-1].norm1").prefix(x).acts.shape == (1, 16, 16)


def test_non_square_token_grid():
    """16x8 input, 4 px patches: 1 + 8 tokens. L = 9 is square, so a guess would be a wrong 3x3 grid."""
    torch.manual_seed(4)
    model = TinyViT(grid=(4, 2)).eval()
    x = torch.randn(2, 3, 16, 8)
    with pytest.raises(ValueError, match="pass patch_size or grid"):
        HookAdapter(model, "blocks.1.norm1").prefix(x)
    for kw in ({"patch_size": 4}, {"grid": (4, 2)}):
        ad = HookAdapter(model, "blocks.1.norm1", **kw)
        V, W = torch.randn(4, K), finer_coefficients(4, [0], [[1, 2, 3]], 0.6)
        out = FinerCAM(ad)(x, V, W)
        assert out.grid == (4, 2)
        ref = reference_cam(model, ad.module, x, V, W, normalize=False, layout="vit", grid=(4, 2))
        assert _rel(out.signed, ref) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# agreement with the full-autograd definition
# ---------------------------------------------------------------------------------------------------------------
def _coeffs(P: int, gamma: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [finer_coefficients(P, [0], [[1, 2, 3]], gamma), finer_coefficients(P, [P - 1], [[P - 2]], gamma)]
    if P > 4:
        rows.append(torch.randn(1, P, generator=g))
    return torch.cat(rows)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("P", [4, 320])
@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_cnn_matches_reference(cnn, batch, P, gamma):
    torch.manual_seed(3)
    x = torch.randn(batch, 3, 16, 16)
    V = torch.randn(P, K)
    W = _coeffs(P, gamma, 4)
    ad = HookAdapter(cnn, "features.4")
    out = FinerCAM(ad)(x, V, W)
    ref = reference_cam(cnn, ad.module, x, V, W, normalize=False, layout="cnn")
    assert out.signed.shape == (batch, W.shape[0], 8, 8)
    assert _rel(out.signed, ref) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("P", [4, 320])
@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_vit_matches_reference(vit, batch, P, gamma):
    torch.manual_seed(5)
    x = torch.randn(batch, 3, 16, 16)
    V = torch.randn(P, K)
    W = _coeffs(P, gamma, 6)
    ad = HookAdapter(vit, "blocks[-1].norm1")
    out = FinerCAM(ad)(x, V, W)
    ref = reference_cam(vit, ad.module, x, V, W, normalize=False, layout="vit", grid=(4, 4))
    assert _rel(out.signed, ref) < 1e-5


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_layercam_and_normalized_match_reference(cnn, vit, which):
    model, layer, layout = (cnn, "features.4", "cnn") if which == "cnn" else (vit, "blocks.1.norm1", "vit")
    torch.manual_seed(7)
    x = torch.randn(2, 3, 16, 16)
    V = torch.randn(6, K)
    W = _coeffs(6, 0.6, 8)
    for normalize in (False, True):
        ad = HookAdapter(model, layer, normalize=normalize)
        for method in ("gradcam", "layercam"):
            out = FinerCAM(ad, method)(x, V, W)
            ref = reference_cam(
                model, ad.module, x, V, W, normalize=normalize, layout=layout, grid=(4, 4), method=method
            )
            assert _rel(out.signed, ref) < 1e-5, (method, normalize)


def test_per_vector_batched_vectors(cnn):
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 16)
    V = torch.randn(2, 5, K)  # (B, P, D)
    W = torch.randn(2, 2, 5)  # (B, Q, P)
    ad = HookAdapter(cnn, "features.4")
    out = FinerCAM(ad)(x, V, W)
    for b in range(2):
        ref = reference_cam(cnn, ad.module, x[b : b + 1], V[b], W[b], normalize=False, layout="cnn")
        assert _rel(out.signed[b : b + 1], ref) < 1e-5


def test_inplace_op_after_target():
    torch.manual_seed(10)
    a, b = TinyCNN(inplace=False).eval(), TinyCNN(inplace=True).eval()
    b.load_state_dict(a.state_dict())
    x, V = torch.randn(2, 3, 16, 16), torch.randn(3, K)
    for method in ("gradcam", "layercam"):
        ma = FinerCAM(HookAdapter(a, "features.3"), method)(x, V).signed
        mb = FinerCAM(HookAdapter(b, "features.3"), method)(x, V).signed
        assert torch.allclose(ma, mb, atol=1e-6)


def test_scorecam_runs(cnn):
    x = torch.randn(1, 3, 16, 16)
    out = FinerCAM(HookAdapter(cnn, "features.4"), "scorecam", scorecam_channels=4)(x, torch.randn(2, K))
    assert out.signed.shape == (1, 2, 8, 8) and torch.isfinite(out.signed).all()


# ---------------------------------------------------------------------------------------------------------------
# torchcam
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchcam_finercam(seed):
    methods = pytest.importorskip("torchcam.methods")
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 32, 32)
    names = [str(i) for i in range(K)]
    with methods.FinerCAM(
        model, "features.4", input_shape=(3, 32, 32), base_method=methods.GradCAM, gamma=0.6, num_references=3
    ) as extractor:
        scores = model(x)
        target = int(scores.argmax())
        tc = extractor(class_idx=target, scores=scores, normalized=False)[0].reshape(-1)
        tc_refs = extractor._reference_indices(None, scores, [target], torch.tensor([[target]]))
    assert _no_hooks(model)
    ours = ClassifierExplainer.from_model(model, "features.4", names).explain(x, gamma=0.6, num_references=3)
    assert ours.references[0] == tc_refs[0].tolist() == similar_classes(scores.detach(), [target], 3)[0].tolist()
    assert ours.targets == [target]
    a = ours.maps.reshape(-1)
    r = float(torch.corrcoef(torch.stack([a, tc]))[0, 1])
    assert r > 0.99
    assert _rel(a, tc) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# similar classes
# ---------------------------------------------------------------------------------------------------------------
def test_similar_classes():
    z = torch.tensor([[0.0, 1.0, 3.0, 2.0, 2.0, 4.0], [5.0, 5.0, 5.0, 1.0, 0.0, 5.0]])
    out = similar_classes(z, torch.tensor([2, 0]), k=3)
    assert out.tolist() == [[3, 4, 5], [1, 2, 5]]  # ties broken by lower index; target excluded
    assert similar_classes(z, 2, k=5).shape == (2, 5)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
        similar_classes(z, 2, k=6)
    with pytest.raises(ValueError, match="out of range"):
        similar_classes(z, [0, 6], k=2)
    with pytest.raises(ValueError, match="logits must be"):
        similar_classes(z[0], 0)


def test_similar_by_weights():
    W = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]])
    assert similar_by_weights(W, 0, k=2).tolist() == [3, 1]
    assert similar_by_weights(W, [0, 2], k=1).tolist() == [[3], [1]]
    with pytest.raises(ValueError, match="k must be"):
        similar_by_weights(W, 0, k=5)


# ---------------------------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------------------------
def _blobs(n: int = 120, d: int = 8, k: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, d, generator=g), y


def test_train_probe_deterministic_and_learns():
    x, y = _blobs()
    global_state = torch.get_rng_state()
    p1, h1 = train_probe(x, y, epochs=30, lr=1e-2, batch_size=32, seed=3, val=(x, y))
    assert torch.equal(global_state, torch.get_rng_state())
    p2, h2 = train_probe(x, y, epochs=30, lr=1e-2, batch_size=32, seed=3)
    p3, _ = train_probe(x, y, epochs=30, lr=1e-2, batch_size=32, seed=4)
    assert torch.equal(p1.weight, p2.weight) and torch.equal(p1.bias, p2.bias)
    assert h1["loss"] == h2["loss"] and len(h1["loss"]) == 30
    assert not torch.equal(p1.weight, p3.weight)
    assert h1["loss"][-1] < h1["loss"][0]
    assert probe_accuracy(p1, x, y) > 0.95 and h1["val_accuracy"][-1] > 0.95
    assert not p1.training and not p1.weight.requires_grad
    assert train_probe(x, y, num_classes=5, epochs=1)[0].num_classes == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"num_classes": 2}, r"labels must lie in \[0, 2\)"),
    ],
)
def test_train_probe_bad_settings(kwargs, match):
    x, y = _blobs(n=12)
    with pytest.raises(ProbeError, match=match):
        train_probe(x, y, **kwargs)


def test_train_probe_bad_data():
    x, y = _blobs(n=12)
    with pytest.raises(ProbeError, match="rows"):
        train_probe(x, y[:5])
    with pytest.raises(ProbeError, match="integer"):
        train_probe(x, y.float())
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ProbeError, match="NaN"):
        train_probe(bad, y)


def test_probe_round_trip(tmp_path):
    x, y = _blobs()
    probe, hist = train_probe(x, y, epochs=5, lr=1e-2)
    meta = {
        "class_names": ["a", "b", "c"],
        "backbone": {"name": "toy", "spec_hash": "abc"},
        "preprocessing": {"resize": [224, 224]},
        "feature_normalization": "none",
        "test_accuracy": probe_accuracy(probe, x, y),
        "training": {"epochs": 5, "lr": 1e-2, "history": hist},
    }
    save_probe(tmp_path / "p", probe, meta)
    loaded, m = load_probe(tmp_path / "p")
    assert torch.equal(loaded.weight, probe.weight) and torch.equal(loaded.bias, probe.bias)
    assert {k: m[k] for k in meta} == json.loads(json.dumps(meta))
    assert m["num_classes"] == 3 and m["in_features"] == 8 and m["format"] == "traitloc-probe"
    assert not loaded.training and not loaded.weight.requires_grad
    no_bias = LinearProbe(8, 3, bias=False)
    save_probe(tmp_path / "nb", no_bias, {"class_names": ["a", "b", "c"]})
    assert load_probe(tmp_path / "nb")[0].bias is None


def test_probe_save_errors(tmp_path):
    probe = LinearProbe(4, 3)
    with pytest.raises(ProbeError, match="class names"):
        save_probe(tmp_path, probe, {"class_names": ["a", "b"]})
    with pytest.raises(ProbeError, match="class_names"):
        save_probe(tmp_path, probe, {})
    with pytest.raises(ProbeError, match="JSON-serializable"):
        save_probe(tmp_path, probe, {"class_names": ["a", "b", "c"], "x": object()})
    with pytest.raises(ProbeError, match="LinearProbe"):
        save_probe(tmp_path, nn.Linear(4, 3), {"class_names": ["a", "b", "c"]})  # type: ignore[arg-type]


def test_probe_load_errors(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        load_probe(tmp_path / "missing")
    d = tmp_path / "p"
    save_probe(d, LinearProbe(4, 3), {"class_names": ["a", "b", "c"]})
    meta = json.loads((d / "probe.json").read_text())
    (d / "probe.json").write_text("{not json")
    with pytest.raises(ProbeError, match="not valid JSON"):
        load_probe(d)
    (d / "probe.json").write_text(json.dumps({**meta, "num_classes": 4}))
    with pytest.raises(ProbeError, match="3x4 weight"):
        load_probe(d)
    (d / "probe.json").write_text(json.dumps({**meta, "class_names": ["a"]}))
    with pytest.raises(ProbeError, match="3 class_names"):
        load_probe(d)
    (d / "probe.json").write_text(json.dumps(meta))
    (d / "probe.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ProbeError, match="not a readable safetensors"):
        load_probe(d)
    (d / "probe.safetensors").unlink()
    with pytest.raises(ProbeError, match="lacks probe.safetensors"):
        load_probe(d)


# ---------------------------------------------------------------------------------------------------------------
# feature cache
# ---------------------------------------------------------------------------------------------------------------
class CountingBackbone:
    def __init__(self, fail_after: int | None = None):
        self.images = 0
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, x: Tensor) -> Tensor:
        if self.fail_after is not None and self.images >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += x.shape[0]
        return torch.cat([x.mean((1, 2, 3))[:, None], x.amax((1, 2, 3))[:, None]], 1)


def _images(n: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 4, generator=g) for _ in range(n)]


def test_feature_cache_reuse(tmp_path):
    imgs, keys = _images(10), [f"img{i}" for i in range(10)]
    cache = tmp_path / "f.safetensors"
    bb = CountingBackbone()
    f1 = extract_features(bb, imgs, cache, keys, spec={"name": "toy"}, batch_size=4)
    assert bb.images == 10 and bb.calls == 3 and f1.shape == (10, 2)
    side = json.loads((tmp_path / "f.safetensors.json").read_text())
    assert side["n"] == 10 and side["spec"] == {"name": "toy"}
    bb2 = CountingBackbone()
    loaded: list[int] = []
    lazy = [lambda i=i: loaded.append(i) or imgs[i] for i in range(10)]
    f2 = extract_features(bb2, lazy, cache, keys, spec={"name": "toy"})
    assert bb2.images == 0 and loaded == [] and torch.equal(f1, f2)
    # a subset in another order, plus new keys: only the new ones are computed, old rows are kept
    more = _images(3, seed=1)
    keys2 = ["new0", "img3", "new1", "img0", "new2"]
    bb3 = CountingBackbone()
    f3 = extract_features(bb3, [more[0], imgs[3], more[1], imgs[0], more[2]], cache, keys2, spec={"name": "toy"})
    assert bb3.images == 3
    assert torch.equal(f3[1], f1[3]) and torch.equal(f3[3], f1[0])
    bb4 = CountingBackbone()
    extract_features(bb4, imgs, cache, keys, spec={"name": "toy"})
    assert bb4.images == 0


def test_feature_cache_resumes_after_interrupt(tmp_path):
    imgs, keys = _images(10), [f"k{i}" for i in range(10)]
    cache = tmp_path / "f.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_features(CountingBackbone(fail_after=4), imgs, cache, keys, batch_size=2)
    bb = CountingBackbone()
    out = extract_features(bb, imgs, cache, keys, batch_size=2)
    assert bb.images == 6
    assert torch.allclose(out, extract_features(CountingBackbone(), imgs, tmp_path / "g.safetensors", keys))


def test_feature_cache_errors(tmp_path):
    imgs, keys = _images(3), ["a", "b", "c"]
    cache = tmp_path / "f.safetensors"
    extract_features(CountingBackbone(), imgs, cache, keys, spec="v1")
    with pytest.raises(FeatureCacheError, match="another backbone spec"):
        extract_features(CountingBackbone(), imgs, cache, keys, spec="v2")
    bb = CountingBackbone()
    extract_features(bb, imgs, cache, keys, spec="v2", overwrite=True)
    assert bb.images == 3
    with pytest.raises(FeatureCacheError, match="unique"):
        extract_features(bb, imgs, cache, ["a", "a", "c"], spec="v2")
    with pytest.raises(FeatureCacheError, match=".safetensors"):
        extract_features(bb, imgs, tmp_path / "f.npy", keys)
    with pytest.raises(FeatureCacheError, match="gave 2 items for 3 keys"):
        extract_features(bb, imgs[:2], tmp_path / "h.safetensors", keys)
    with pytest.raises(FeatureCacheError, match=r"\(C, H, W\) tensor"):
        extract_features(bb, [torch.zeros(4, 4)] * 3, tmp_path / "i.safetensors", keys)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(FeatureCacheError, match="unreadable"):
        extract_features(bb, imgs, tmp_path / "bad.safetensors", keys)


# ---------------------------------------------------------------------------------------------------------------
# the explainer
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def explainer(cnn) -> ClassifierExplainer:
    return ClassifierExplainer.from_model(cnn, "features.4", NAMES)


def _ref_finer(model, layer, x, target, refs, gamma, reverse=False):
    P = 1 + len(refs)
    V = torch.eye(K)[[target, *refs]]
    W = torch.zeros(1, P)
    W[0, 0] = -gamma if reverse else 1.0
    if refs:
        W[0, 1:] = 1.0 / len(refs) if reverse else -gamma / len(refs)
    return reference_cam(model, layer, x, V, W, normalize=False, layout="cnn")[:, 0]


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0, 2.5])
def test_explain_matches_reference(cnn, explainer, gamma):
    torch.manual_seed(11)
    x = torch.randn(1, 3, 16, 16)
    res = explainer.explain(x, gamma=gamma)
    logits = cnn(x).detach()
    assert res.predicted == [int(logits.argmax())] and res.targets == res.predicted
    assert res.references[0] == similar_classes(logits, res.targets, 3)[0].tolist()
    assert torch.allclose(res.logits, logits, atol=1e-6)
    ref = _ref_finer(cnn, cnn.features[4], x, res.targets[0], res.references[0], gamma)
    assert _rel(res.signed, ref) < 1e-5
    assert res.upsampled().shape == (1, 16, 16)
    assert res.target_names == [NAMES[res.targets[0]]] and len(res.reference_names[0]) == 3


def test_explain_gamma_zero_is_gradcam(cnn, explainer):
    x = torch.randn(1, 3, 16, 16)
    a = explainer.explain(x, target=2, gamma=0.0).signed
    b = explainer.explain(x, target=2, references=[], gamma=0.6).signed
    plain = _ref_finer(cnn, cnn.features[4], x, 2, [], 0.0)
    assert _rel(a, plain) < 1e-5 and _rel(b, plain) < 1e-5


def test_explain_reverse(cnn, explainer):
    torch.manual_seed(12)
    x = torch.randn(1, 3, 16, 16)
    res = explainer.explain(x, target="Class C", references=["Class A", 5], gamma=0.6, reverse=True)
    assert res.targets == [2] and res.references == [[0, 5]] and res.reverse
    ref = _ref_finer(cnn, cnn.features[4], x, 2, [0, 5], 0.6, reverse=True)
    assert _rel(res.signed, ref) < 1e-5
    fwd = explainer.explain(x, target=2, references=[0, 5], gamma=1.0).signed
    rev = explainer.explain(x, target=2, references=[0, 5], gamma=1.0, reverse=True).signed
    assert torch.allclose(fwd, -rev, atol=1e-6)
    with pytest.raises(ValueError, match="at least one reference"):
        explainer.explain(x, target=2, references=[], reverse=True)


def test_per_image_targets_and_references_match_single(explainer):
    torch.manual_seed(13)
    x = torch.randn(3, 3, 16, 16)
    targets = [1, "Class H", "auto"]
    refs = [[0, 2, 3], ["Class A"], [4, 6]]
    batch = explainer.explain(x, target=targets, references=refs, gamma=0.6)
    for b in range(3):
        single = explainer.explain(x[b : b + 1], target=targets[b], references=refs[b], gamma=0.6)
        assert single.targets[0] == batch.targets[b] and single.references[0] == batch.references[b]
        assert _rel(batch.signed[b], single.signed[0]) < 1e-5
    # automatic references, per-image targets
    auto = explainer.explain(x, target=[0, 1, 2])
    for b in range(3):
        single = explainer.explain(x[b : b + 1], target=b)
        assert single.references[0] == auto.references[b]
        assert _rel(auto.signed[b], single.signed[0]) < 1e-5


@pytest.mark.parametrize("method", ["layercam", "scorecam"])
def test_explain_other_methods(cnn, method):
    ex = ClassifierExplainer.from_model(cnn, "features.4", NAMES, method=method, scorecam_channels=4)
    res = ex.explain(torch.randn(2, 3, 16, 16), target=[1, 2], references=[[0], [3, 4]])
    assert res.signed.shape == (2, 8, 8) and res.method == method


@pytest.mark.parametrize("method", ["gradcam", "layercam", "scorecam"])
def test_explain_one_forward_per_batch(cnn, method):
    """Every method reuses the batch's one forward pass (Layer-CAM and Score-CAM used to run the model again), with
    the maps of the engine on a fresh prefix (the explainer's output before) and, for the gradient methods, of the
    full-autograd reference."""
    torch.manual_seed(16)
    ex = ClassifierExplainer.from_model(cnn, "features.4", NAMES, method=method, scorecam_channels=4, scorecam_batch=2)
    x = torch.randn(3, 3, 16, 16)
    calls: list[int] = []
    with forward_hook(cnn, lambda _m, inp, _out: calls.append(int(inp[0].shape[0]))):
        res = ex.explain(x, gamma=0.6)
    masked = [2] * (3 * 2) if method == "scorecam" else []  # Score-CAM: 4 masked images per image, 2 per pass
    assert calls == [3, *masked]
    calls.clear()
    with forward_hook(cnn, lambda _m, inp, _out: calls.append(int(inp[0].shape[0]))):
        pre = ex.cam.prefix(x)  # a prefix run by the caller (traitloc explain: the logits first) is reused too
        again = ex.explain(x, gamma=0.6, prefix=pre)
        torch.testing.assert_close(ex.logits(pre), again.logits)
    assert calls == [3, *masked]
    torch.testing.assert_close(again.signed, res.signed, rtol=0, atol=0)
    V = torch.stack([torch.eye(K)[[t, *r]] for t, r in zip(res.targets, res.references, strict=True)])
    W = finer_coefficients(4, [0], [[1, 2, 3]], 0.6)
    before = FinerCAM(HookAdapter(cnn, "features.4"), method, scorecam_channels=4, scorecam_batch=2)(x, V, W)
    torch.testing.assert_close(res.signed, before.signed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(res.cam.scores, before.scores, rtol=0, atol=0)
    if method != "scorecam":
        for b in range(3):
            ref = reference_cam(cnn, cnn.features[4], x[b : b + 1], V[b], W, normalize=False, layout="cnn",
                                method=method)  # fmt: skip
            assert _rel(res.signed[b], ref[0, 0]) < 1e-5


def test_with_method(explainer):
    other = explainer.with_method("layercam", scorecam_channels=2)
    assert other.method == "layercam" and other.adapter is explainer.adapter and other.class_names == NAMES
    assert torch.equal(other.weight, explainer.weight) and other.cam.scorecam_channels == 2


def test_explain_probe_on_features(cnn):
    """A probe on a backbone's features: HookAdapter on the backbone + the probe's weight and bias."""
    torch.manual_seed(14)
    backbone = nn.Sequential(cnn.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    probe = LinearProbe(16, 5).eval()
    ex = ClassifierExplainer(HookAdapter(backbone, "0.4"), probe.weight, probe.bias, list("abcde"))
    x = torch.randn(2, 3, 16, 16)
    res = ex.explain(x, gamma=0.6)
    full = nn.Sequential(backbone, probe)
    assert torch.allclose(res.logits, full(x), atol=1e-6)
    for b in range(2):
        V = torch.eye(5)[[res.targets[b], *res.references[b]]]  # logits of the full model: the bias is included
        W = finer_coefficients(4, [0], [[1, 2, 3]], 0.6)
        ref = reference_cam(full, backbone[0][4], x[b : b + 1], V, W, normalize=False, layout="cnn")
        assert _rel(res.signed[b], ref[0, 0]) < 1e-5


def test_explain_vit(vit):
    torch.manual_seed(15)
    ex = ClassifierExplainer.from_model(vit, "blocks[-1].norm1", NAMES)
    x = torch.randn(2, 3, 16, 16)
    res = ex.explain(x, gamma=0.6)
    for b in range(2):
        V = torch.eye(K)[[res.targets[b], *res.references[b]]]
        W = finer_coefficients(4, [0], [[1, 2, 3]], 0.6)
        ref = reference_cam(vit, vit.blocks[1].norm1, x[b : b + 1], V, W, normalize=False, layout="vit", grid=(4, 4))
        assert _rel(res.signed[b], ref[0, 0]) < 1e-5


def test_explain_bad_inputs(explainer):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"unknown class 'Clas B'; close matches: 'Class B'"):
        explainer.explain(x, target="Clas B")
    assert explainer.class_index("class b") == 1 and explainer.class_index("7") == 7
    with pytest.raises(ValueError, match="equals the target"):
        explainer.explain(x, target=1, references=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        explainer.explain(x, target=10)
    with pytest.raises(ValueError, match="out of range"):
        explainer.explain(x, target=0, references=[-1])
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        explainer.explain(x, gamma=-0.1)
    with pytest.raises(ValueError, match="finite"):
        explainer.explain(x, gamma=float("nan"))
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        explainer.explain(x, target=[1, 2, 3])
    with pytest.raises(ValueError, match="reference lists"):
        explainer.explain(x, target=0, references=[[1], [2], [3]])
    with pytest.raises(ValueError, match="duplicate"):
        explainer.explain(x, target=0, references=[1, 1])
    with pytest.raises(ValueError, match="num_references"):
        explainer.explain(x, num_references=0)
    with pytest.raises(ValueError, match="image batch"):
        explainer.explain(x[0])
    ambiguous = ClassifierExplainer.from_model(explainer.adapter.model, "features.4", ["a", "b", "a"] + NAMES[3:])
    with pytest.raises(ValueError, match="ambiguous"):
        ambiguous.class_index("a")


def test_explainer_constructor_errors(cnn):
    ad = HookAdapter(cnn, "features.4")
    with pytest.raises(ValueError, match="class names"):
        ClassifierExplainer(ad, torch.eye(K), None, NAMES[:3])
    with pytest.raises(ValueError, match="bias"):
        ClassifierExplainer(ad, torch.eye(K), torch.zeros(3), NAMES)
    with pytest.raises(ValueError, match="unknown method"):
        ClassifierExplainer(ad, torch.eye(K), None, NAMES, method="cam")
    with pytest.raises(TypeError, match="Adapter"):
        ClassifierExplainer(cnn, torch.eye(K), None, NAMES)  # type: ignore[arg-type]
    ex = ClassifierExplainer(ad, torch.eye(12), None, [str(i) for i in range(12)])
    with pytest.raises(ValueError, match="10-d outputs but the head expects 12"):
        ex.explain(torch.randn(1, 3, 8, 8))
