"""The dense CLIP methods and LeGrad against ports of their authors' code, through ``ConceptLocalizer``.

Exactness (issue "Text queries that localize"): every method, on a tiny random ViT and on a random ViT-B-16
(``slow``), gamma 0 and 1, one and many prompts, a batch of images: Pearson > 0.999 at the grid against
:mod:`tests.refs.authors` explaining the query vector ``v_concept - gamma * v_base``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.refs import authors
from traitloc.engine import methods
from traitloc.engine.adapters import clip_adapter
from traitloc.engine.dense import DenseCLIP, LeGrad, naclip_neighbourhood
from traitloc.models.localize import ConceptLocalizer

NEW_METHODS = ("maskclip", "clearclip", "sclip", "naclip", "gem", "legrad")
PROMPTS = ["red wing", "yellow bill", "striped tail", "bird"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten().double() - a.double().mean()
    b = b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def reference(method: str, visual: torch.nn.Module, x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(B, Q, h, w) authors' maps of the query vectors U (Q, D) for a batch, one image at a time."""
    if method == "legrad":
        return torch.stack([authors.legrad(visual, x[b : b + 1], U) for b in range(x.shape[0])])
    return torch.cat([getattr(authors, method)(visual, x[b : b + 1], U) for b in range(x.shape[0])])


def query_vectors(loc: ConceptLocalizer, concepts: list[str], base: str | None, gamma: float) -> torch.Tensor:
    V = loc.text.encode(concepts)
    if base is None:
        return V
    return V - gamma * loc.text.encode([base])


def check_against_reference(loc: ConceptLocalizer, x: torch.Tensor, concepts, base, gamma) -> None:
    res = loc.explain_tensor(x, concepts, base=base, gamma=gamma)
    ref = reference(loc.method, loc.bundle.visual, x, query_vectors(loc, concepts, base, gamma))
    for b, r in enumerate(res):
        assert r.signed.shape == ref[b].shape
        for q in range(len(concepts)):
            assert pearson(r.signed[q], ref[b, q]) > 0.999, (loc.method, b, q)
            torch.testing.assert_close(r.signed[q], ref[b, q].float(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def tiny_x() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 64, generator=g)


# ---------------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------------
def test_registry_is_the_one_list() -> None:
    from traitloc.engine import cam

    assert cam.METHODS == methods.CAM_METHODS == ("gradcam", "layercam", "scorecam")
    assert methods.TEXT_METHODS == tuple(methods.REGISTRY)
    assert set(NEW_METHODS) <= set(methods.TEXT_METHODS)
    for m in methods.REGISTRY.values():
        assert m.equation and m.source and m.url.startswith("https://")
        assert m.family in ("cam", "dense", "attention-gradient")
        assert not (m.forward_only and m.family != "dense")
        assert m.resnet == (m.family == "cam")
    assert methods.method_names(classifier=True) == methods.CAM_METHODS
    with pytest.raises(ValueError, match="choose one of"):
        methods.get_method("nope")


def test_cli_and_app_read_the_registry() -> None:
    from traitloc.cli.commands import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    act = next(a for a in sub.choices["localize"]._actions if "--method" in a.option_strings)
    assert tuple(act.choices) == methods.TEXT_METHODS


def test_docs_list_every_method() -> None:
    """docs/methods.md has one table row per registry method, in registry order, with its capability flags."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    names = [line.split("`")[1] for line in rows]
    assert names[: len(methods.REGISTRY)] == list(methods.REGISTRY)
    for line, m in zip(rows, methods.REGISTRY.values(), strict=False):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == ("yes" if m.resnet else "no") and cells[5] == ("yes" if m.forward_only else "no"), m.name


def test_localizer_rejects_unknown_method_and_resnets(tiny_bundle, tiny_rn_config, tiny_rn_weights) -> None:
    from traitloc.models.clip import load_clip

    with pytest.raises(ValueError, match="unknown method"):
        ConceptLocalizer(tiny_bundle, "bogus")
    rn = load_clip(str(tiny_rn_config), str(tiny_rn_weights), "cpu")
    for m in NEW_METHODS:
        with pytest.raises(ValueError, match="open_clip ViT"):
            ConceptLocalizer(rn, m)


# ---------------------------------------------------------------------------------------------------------------------
# exactness on the tiny ViT
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_matches_authors_tiny_many_prompts(tiny_bundle, tiny_x, method, gamma) -> None:
    loc = ConceptLocalizer(tiny_bundle, method)
    check_against_reference(loc, tiny_x, PROMPTS[:3], "bird", gamma)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_matches_authors_tiny_one_prompt_no_base(tiny_bundle, tiny_x, method) -> None:
    loc = ConceptLocalizer(tiny_bundle, method)
    check_against_reference(loc, tiny_x[:1], ["red wing"], None, 1.0)
    res = loc.explain_tensor(tiny_x[:1], ["red wing"], base=None, gamma=5.0)
    res0 = loc.explain_tensor(tiny_x[:1], ["red wing"], base=None, gamma=0.0)
    torch.testing.assert_close(res[0].signed, res0[0].signed)  # no base: gamma is irrelevant


@pytest.mark.parametrize("method", NEW_METHODS)
def test_outputs_and_scores(tiny_bundle, tiny_x, method) -> None:
    """Same ConceptMaps contract as gradcam: shapes, image-level scores from the CLS embedding, base score."""
    loc = ConceptLocalizer(tiny_bundle, method)
    grad = ConceptLocalizer(tiny_bundle, "gradcam")
    res = loc.explain_tensor(tiny_x, PROMPTS[:3], base="bird", gamma=0.7, sizes=[(50, 70), (64, 64)])
    ref = grad.explain_tensor(tiny_x, PROMPTS[:3], base="bird", gamma=0.7)
    for r, g in zip(res, ref, strict=True):
        assert r.method == method and r.signed.shape == (3, 4, 4) and r.gamma == 0.7
        torch.testing.assert_close(r.scores, g.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r.concept_scores, g.concept_scores, rtol=1e-4, atol=1e-5)
        assert r.base_score == pytest.approx(g.base_score, abs=1e-5)
    assert res[0].map(0).shape == (50, 70)
    if not methods.get_method(method).signed:
        assert float(res[0].signed.min()) >= 0


@pytest.mark.parametrize("method", NEW_METHODS)
def test_batched_equals_one_by_one(tiny_bundle, tiny_x, method) -> None:
    loc = ConceptLocalizer(tiny_bundle, method)
    both = loc.explain_tensor(tiny_x, PROMPTS[:2], base="bird")
    for b in range(2):
        one = loc.explain_tensor(tiny_x[b : b + 1], PROMPTS[:2], base="bird")[0]
        torch.testing.assert_close(both[b].signed, one.signed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_any_aspect_ratio(tiny_bundle, method) -> None:
    """Non-square inputs (resize='aspect'): a grid of the input's shape, maps at the original size."""
    from PIL import Image

    loc = ConceptLocalizer(tiny_bundle, method, resize="aspect")
    im = Image.new("RGB", (120, 60), (200, 30, 30))
    res = loc.explain([im], ["red wing"], base="bird")[0]
    H, W = loc.input_size(im.size)
    assert res.signed.shape == (1, H // 16, W // 16)
    assert res.map(0).shape == (60, 120)


def test_legrad_chunks_do_not_change_the_result(tiny_bundle, tiny_x) -> None:
    ad = clip_adapter(tiny_bundle.visual)
    V = tiny_bundle.model.encode_text(tiny_bundle.tokenizer(PROMPTS))
    a = LeGrad(ad, vector_chunk=1)(tiny_x, V)
    b = LeGrad(ad, vector_chunk=64)(tiny_x, V)
    torch.testing.assert_close(a.signed, b.signed)


def test_naclip_neighbourhood() -> None:
    om = naclip_neighbourhood((3, 4), sigma=1.0)
    assert om.shape == (13, 13)
    assert float(om[0].abs().sum()) == 0 and float(om[:, 0].abs().sum()) == 0
    assert float(om[1, 1]) == 1.0
    assert float(om[1, 2]) == pytest.approx(torch.exp(torch.tensor(-0.5)).item())  # one patch apart


def test_bad_arguments(tiny_bundle) -> None:
    ad = clip_adapter(tiny_bundle.visual)
    with pytest.raises(ValueError, match="dense method"):
        DenseCLIP(ad, "gradcam")
    with pytest.raises(ValueError, match="naclip_sigma"):
        DenseCLIP(ad, "naclip", naclip_sigma=0)
    with pytest.raises(ValueError, match="layers"):
        LeGrad(ad, layers=99)
    with pytest.raises(ValueError, match="multiple of the patch"):
        DenseCLIP(ad, "clearclip").features(torch.zeros(1, 3, 60, 64))


# ---------------------------------------------------------------------------------------------------------------------
# cached re-gamma: a new gamma or base runs no forward pass (forward counter on the patch embedding)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", *NEW_METHODS])
def test_regamma_reuses_the_cache(tiny_bundle, method) -> None:
    from PIL import Image

    assert methods.get_method(method).cached_regamma
    loc = ConceptLocalizer(tiny_bundle, method)
    im = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    calls = []
    handle = tiny_bundle.visual.conv1.register_forward_hook(lambda *_: calls.append(1))
    try:
        qc = loc.query_cache(im, PROMPTS)
        n_after_cache = len(calls)
        got = {
            (g, base): qc.explain(["red wing", "yellow bill"], base=base, gamma=g)
            for g in (0.0, 0.5, 1.0, 2.0)
            for base in ("bird", "striped tail", None)
        }
        assert len(calls) == n_after_cache == 1  # one forward pass for every gamma and base
    finally:
        handle.remove()
    for (g, base), r in got.items():
        direct = loc.explain([im], ["red wing", "yellow bill"], base=base, gamma=g)[0]
        torch.testing.assert_close(r.signed, direct.signed, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r.scores, direct.scores, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not in this cache"):
        qc.explain(["blue crown"], base="bird")


def test_query_cache_recomputes_for_layercam(tiny_bundle) -> None:
    from PIL import Image

    loc = ConceptLocalizer(tiny_bundle, "layercam")
    im = Image.new("RGB", (64, 64), (10, 200, 30))
    qc = loc.query_cache(im, PROMPTS)
    assert qc.cache is None
    r = qc.explain(["red wing"], base="bird", gamma=0.5)
    torch.testing.assert_close(r.signed, loc.explain([im], ["red wing"], base="bird", gamma=0.5)[0].signed)


# ---------------------------------------------------------------------------------------------------------------------
# exactness on a random ViT-B-16 (224 px)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitb16_bundle(tmp_path_factory):
    import open_clip
    import safetensors.torch

    from traitloc.models.clip import load_clip

    path = tmp_path_factory.mktemp("vitb16") / "vitb16.safetensors"
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    finally:
        torch.random.set_rng_state(state)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_clip("ViT-B-16", str(path), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW_METHODS)
def test_matches_authors_vitb16(vitb16_bundle, method) -> None:
    """One image, three queries in one call: concept at gamma 0, the same at gamma 1, another concept at gamma 1."""
    from traitloc.engine.cam import finer_coefficients

    loc = ConceptLocalizer(vitb16_bundle, method)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    V = loc.text.encode(["red wing", "yellow bill", "bird"])
    W = finer_coefficients(3, [0, 0, 1], [[2], [2], [2]], [0.0, 1.0, 1.0])
    out = loc.engine(x, V, W)
    ref = reference(method, vitb16_bundle.visual, x, W @ V)
    assert out.signed.shape == ref.shape == (1, 3, 14, 14)
    for q in range(3):
        assert pearson(out.signed[0, q], ref[0, q]) > 0.999, q
    torch.testing.assert_close(out.signed, ref.float(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------------------------------
# the review app's Query page
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW_METHODS)
def test_app_query_matches_the_localizer(tiny_bundle, method, monkeypatch) -> None:
    """apps/review.py's run_query for the new methods: same map as the Python API, and a gamma change reuses the
    cached forward pass (dense) or per-prompt gradients (LeGrad)."""
    import importlib.util
    import sys
    from pathlib import Path

    from PIL import Image

    from traitloc.io.files import map_to_unit

    app = Path(__file__).resolve().parents[1] / "apps" / "review.py"
    spec = importlib.util.spec_from_file_location("traitloc_review_app_dense", app)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert set(NEW_METHODS) <= set(mod.query_methods())
        counts: dict[str, int] = {}
        state: dict = {}
        monkeypatch.setattr(mod, "_bump", lambda name, n=1: counts.__setitem__(name, counts.get(name, 0) + n))
        monkeypatch.setattr(mod.st, "session_state", state)
        loc = ConceptLocalizer(tiny_bundle)  # the app loads one gradcam localizer per server
        im = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
        for gamma in (1.0, 0.3, 0.0):
            got = mod.run_query(loc, im, "img0", "red wing", "bird", gamma, method)
            ref = ConceptLocalizer(tiny_bundle, method).explain([im], ["red wing"], "bird", gamma)[0]
            np.testing.assert_allclose(map_to_unit(got.map(0)), map_to_unit(ref.map(0)), atol=1e-4)
        expensive = counts.get(mod.FORWARD_COUNTER, 0) + counts.get(mod.GRADIENT_COUNTER, 0)
        assert expensive == 2  # the image's prefix once, then the method's forward or gradients once
    finally:
        sys.modules.pop(spec.name, None)


# ---------------------------------------------------------------------------------------------------------------------
# traitloc localize --method M: same outputs and resume as gradcam
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["naclip", "legrad"])
def test_cli_localize_new_methods(tiny_clip_config, tiny_clip_weights, image_factory, tmp_path, method) -> None:
    import csv

    from PIL import Image

    from traitloc.cli.commands import main
    from traitloc.io.store import read_results, render_map, rows_of
    from traitloc.models.clip import load_clip

    img = image_factory("bird.png", size=(80, 60))
    out = tmp_path / "out"
    argv = ["localize", str(img), "--concept", "red wing", "--concept", "yellow bill", "--base", "bird", "--gamma",
            "0.5", "--method", method, "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights),
            "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [method, method] and all(r["status"] == "ok" for r in rows)
    loc = ConceptLocalizer(load_clip(str(tiny_clip_config), str(tiny_clip_weights), "cpu"), method)
    ref = loc.explain([Image.open(img).convert("RGB")], ["red wing", "yellow bill"], "bird", 0.5)[0]
    for row in rows_of(read_results(out)):
        q = ["red wing", "yellow bill"].index(row["concept"])
        np.testing.assert_allclose(render_map(row), ref.map(q), rtol=1e-4, atol=1e-6)
    assert main(argv) == 0  # resume: nothing redone
    assert len(list(rows_of(read_results(out, dedupe=False)))) == 2
