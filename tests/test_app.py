"""The review app (apps/review.py) driven with Streamlit's AppTest, its store helpers (traitloc/io/reviewkit.py) and
``traitloc app`` (traitloc/cli/app.py).

A run folder is made once per module by ``traitloc localize`` with the tiny random open_clip ViT of conftest.py; the
photos lie in a folder *beside* the run folder (the app shows them where the run recorded them). The app reads its
settings from ``TRAITLOC_APP_*`` variables.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("streamlit")
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from traitloc.io import reviewkit as rk  # noqa: E402
from traitloc.io.decisions import ReviewStore  # noqa: E402
from traitloc.io.store import ResultStore, grid_of, read_results, render_map, render_mask, render_unit_map  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "review.py"
TIMEOUT = 120
CONCEPTS = ["red wing", "blue tail"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_server_caches() -> Iterator[None]:
    """Each test starts like a new server (models, failures, tables and thumbnails are cached per server)."""
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def app_module() -> Iterator[ModuleType]:
    """apps/review.py imported as a module (its ``main()`` only runs as a script)."""
    spec = importlib.util.spec_from_file_location("traitloc_review_app", APP)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def localized(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path, tiny_clip_weights: Path) -> Path:
    """A ``traitloc localize`` run: 3 photos x 2 concepts vs base 'bird' (read-only: copy to modify).

    The photos lie in ``<tmp>/photos``, outside the run folder ``<tmp>/results``.
    """
    from conftest import make_image_array

    from traitloc.cli.commands import main

    top = tmp_path_factory.mktemp("app")
    photos, root = top / "photos", top / "results"
    photos.mkdir()
    for i, size in enumerate([(64, 64), (80, 60), (50, 70)]):
        Image.fromarray(make_image_array(size, seed=i)).save(photos / f"bird{i}.png")
    argv = ["localize", str(photos), *[a for c in CONCEPTS for a in ("--concept", c)], "--base", "bird",
            "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu",
            "--out", str(root), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return root


@pytest.fixture
def results(localized: Path, tmp_path: Path) -> Path:
    """A fresh copy of the run folder (each test writes its own review.sqlite); photos stay where they were."""
    dst = tmp_path / "results"
    shutil.copytree(localized, dst)
    return dst


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, results: Path, tiny_clip_config: Path, tiny_clip_weights: Path) -> Path:
    for k, v in {
        "TRAITLOC_APP_RESULTS_DIR": str(results), "TRAITLOC_APP_MODEL": str(tiny_clip_config),
        "TRAITLOC_APP_PRETRAINED": str(tiny_clip_weights), "TRAITLOC_APP_DEVICE": "cpu", "TRAITLOC_APP_USER": "ana",
    }.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TRAITLOC_APP_IMAGES", raising=False)
    return results


def new_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if page:
        at.query_params["page"] = page
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def note_key(result_id: str) -> str:
    return "note_" + hashlib.sha1(result_id.encode()).hexdigest()[:16]


def headline(at: AppTest) -> str:
    """The 'N of M results' line."""
    return next(t.value for t in at.text if re.match(r"^\d+ of \d+ results", t.value))


def n_images(at: AppTest) -> int:
    """Images on the page (a grid group is one image list)."""
    return sum(len(im.proto.imgs) for im in at.image)


def order(at: AppTest, key: str = "r") -> list[str]:
    return list(at.session_state[f"{key}_frozen"].ids)


def cursor(at: AppTest, key: str = "r") -> int:
    return int(at.session_state[f"{key}_cursor"])


def store_rows(results: Path) -> pd.DataFrame:
    return read_results(results)


# ------------------------------------------------------------------------------------------------------------------
# reviewkit: the table, grids on demand, photos, tiles, order, decisions
# ------------------------------------------------------------------------------------------------------------------
def test_table_reads_the_store_without_grids_and_renders_on_demand(results: Path) -> None:
    table = rk.load_table(results)
    assert table.kind == "localize" and len(table) == 6 and table.bad.empty
    assert "grid" not in table.rows.columns
    full = store_rows(results).set_index("result_id")
    cache = rk.GridCache()
    for row in table.rows.to_dict("records"):
        g = cache.grid(table, row)
        np.testing.assert_array_equal(g.ravel(), np.asarray(full.loc[row["result_id"], "grid"], dtype=np.float32))
        # the photo is where the run recorded it, outside the run folder
        photo = rk.find_photo(row["image"], results)
        assert photo is not None and photo.parent.name == "photos"
        # a tile renders the grid at the thumbnail's size over the photo thumbnail
        thumb = rk.photo_thumbnail(photo, 32)
        assert max(thumb.shape[:2]) <= 32
        data = rk.tile(cache.row_with_grid(table, row), thumb, 32, "overlay", 1.0)
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (thumb.shape[1], thumb.shape[0])


def test_numpy_rendering_matches_the_library_renderer(results: Path) -> None:
    """Thumbnails are rendered in NumPy (no torch import for the grid): the same maps as render_map/render_unit_map."""
    rng = np.random.default_rng(0)
    table, cache = rk.load_table(results), rk.GridCache()

    def same(row: dict[str, Any], size: tuple[int, int]) -> None:
        np.testing.assert_allclose(rk.unit_map(row, size), render_unit_map(row, size), atol=1e-5)
        for signed in (False, True):  # the raw interpolation, ReLU'd and signed, in the grid's units
            grid = grid_of(row) if signed else np.maximum(grid_of(row), 0)
            ref = render_map(row, size, signed=signed)
            np.testing.assert_allclose(rk.upsample_bilinear(grid, size), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())

    for rec in table.rows.to_dict("records")[:2]:
        row = cache.row_with_grid(table, rec)
        for size in [(row["height"], row["width"]), (48, 36), (7, 5), (3, 2), (200, 90)]:
            same(row, size)
    for (h, w), size in [((7, 7), (160, 120)), ((14, 14), (375, 500)), ((1, 1), (5, 5)), ((7, 5), (3, 2))]:
        g = rng.standard_normal((h, w)).astype(np.float32)
        same({"grid": g.ravel(), "grid_h": h, "grid_w": w}, size)


def test_outline_is_the_mask_border() -> None:
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True
    edge = rk.mask_outline(m)
    assert edge.sum() == 8 and not edge[3, 3] and edge[2, 2] and not edge[~m].any()
    unit = np.zeros((7, 7), np.float32)
    unit[2:5, 2:5] = 1.0
    photo = np.zeros((7, 7, 3), np.uint8)
    out = rk.draw(photo, unit, "outline", alpha=1.0, threshold=0.5, outline_width=1)
    assert (out[edge] == [0, 255, 255]).all() and (out[~edge] == 0).all()


def test_find_photo_moved_runs(tmp_path: Path) -> None:
    (tmp_path / "new" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "new" / "sub" / "a.png")
    assert rk.find_photo("/gone/old/sub/a.png", None, tmp_path / "new") == tmp_path / "new" / "sub" / "a.png"
    assert rk.find_photo("sub/a.png", None, None, cwd=str(tmp_path / "new")) == tmp_path / "new" / "sub" / "a.png"
    assert rk.find_photo("/gone/a.png", tmp_path, None) is None
    assert rk.find_photo("", tmp_path) is None


def test_order_groups_and_sorts(results: Path) -> None:
    rows = rk.load_table(results).rows
    ids, groups = rk.order_rows(rows, "trait", "score")
    assert groups == sorted(groups) and len(ids) == 6
    for g in set(groups):
        scores = rows.set_index("result_id").loc[[i for i, gg in zip(ids, groups, strict=True) if gg == g], "score_f"]
        assert list(scores) == sorted(scores, reverse=True)
    ids, groups = rk.order_rows(rows, "photo", "name")
    assert ids == sorted(ids) and groups == ["bird0"] * 2 + ["bird1"] * 2 + ["bird2"] * 2
    ids, _ = rk.order_rows(rows, "none", "score")
    assert list(rows.set_index("result_id").loc[ids, "score_f"]) == sorted(rows["score_f"], reverse=True)


def test_bulk_decisions_and_undo_in_the_review_store(results: Path) -> None:
    store = ReviewStore(results, who="ana")
    store.set("bird0/red-wing", "rejected", "blurry")
    before = store.decisions()
    ids = ["bird0/red-wing", "bird1/red-wing", "bird2/red-wing"]
    entry = rk.apply_decision(store, ids, "accepted", before)
    assert {r: d.status for r, d in store.decisions().items()} == dict.fromkeys(ids, "accepted")
    assert store.get("bird0/red-wing").note == "blurry"  # type: ignore[union-attr]  # notes are kept
    assert store.reviewer_counts() == {"ana": {"accepted": 3, "rejected": 0, "needs-work": 0}}
    rk.undo(store, entry)
    assert {r: (d.status, d.note) for r, d in store.decisions().items()} == {"bird0/red-wing": ("rejected", "blurry")}
    assert [h.action for h in store.history("bird1/red-wing")] == ["set", "clear"]


# ------------------------------------------------------------------------------------------------------------------
# Query
# ------------------------------------------------------------------------------------------------------------------
def query(at: AppTest, concept: str = "red wing", base: str = "bird") -> AppTest:
    at.radio(key="q_source").set_value("Results folder")
    at.selectbox(key="q_pick").set_value("bird0")
    at.text_input(key="q_concept").input(concept)
    at.text_input(key="q_base").input(base)
    return ok(at.run())


def test_query_gamma_change_reuses_the_forward_pass(app_env: Path, tiny_bundle: Any) -> None:
    from traitloc.io.files import map_to_unit
    from traitloc.models.localize import ConceptLocalizer

    at = new_app("Query")
    assert at.sidebar.radio(key="page").value == "Query"
    assert at.session_state["traitloc_forward_passes"] == 0
    query(at)
    assert at.session_state["traitloc_forward_passes"] == 1
    assert at.session_state["traitloc_gradient_passes"] == 1
    first = at.session_state["traitloc_last_query"]
    # gamma = 1 and the same image: the app's map is the one traitloc localize stored
    row = {**store_rows(app_env).set_index("result_id").loc["bird0/red-wing"].to_dict(), "result_id": "bird0/red-wing"}
    np.testing.assert_allclose(first["map01"], render_unit_map(row), atol=1e-5)
    assert n_images(at) == 3 and [m.label for m in at.metric][0] == "objective s"
    assert any("no model pass" in c.value for c in at.caption)  # the caption says what a gamma change costs

    photo = rk.find_photo(row["image"], app_env)
    assert photo is not None
    for gamma in (0.0, 0.35, 2.5):
        ok(at.slider(key="q_gamma").set_value(gamma).run())
        assert at.session_state["traitloc_forward_passes"] == 1  # no new forward pass
        assert at.session_state["traitloc_gradient_passes"] == 1  # and no new backward pass
        got = at.session_state["traitloc_last_query"]
        image = Image.open(photo).convert("RGB")
        ref = ConceptLocalizer(tiny_bundle).explain([image], ["red wing"], "bird", gamma)[0]
        np.testing.assert_allclose(got["map01"], map_to_unit(ref.map(0)), atol=1e-5)
        assert got["score"] == pytest.approx(float(ref.scores[0]), abs=1e-5)
    assert not np.allclose(at.session_state["traitloc_last_query"]["map01"], first["map01"])

    # a new base prompt: text tower and one truncated backward, still no image forward pass
    ok(at.text_input(key="q_base").input("animal").run())
    assert at.session_state["traitloc_forward_passes"] == 1
    assert at.session_state["traitloc_gradient_passes"] == 2
    ok(at.text_input(key="q_base").input("bird").run())
    assert at.session_state["traitloc_gradient_passes"] == 2
    ok(at.selectbox(key="q_pick").set_value("bird1").run())
    assert at.session_state["traitloc_forward_passes"] == 2


@pytest.mark.parametrize("method", ["layercam", "scorecam"])
def test_query_other_methods_match_the_engine(app_env: Path, tiny_bundle: Any, method: str) -> None:
    from traitloc.io.files import map_to_unit
    from traitloc.models.localize import ConceptLocalizer

    at = new_app("Query")
    at.selectbox(key="q_method").set_value(method)
    query(at)
    row = store_rows(app_env).set_index("result_id").loc["bird0/red-wing"]
    image = Image.open(rk.find_photo(row["image"], app_env)).convert("RGB")  # type: ignore[arg-type]
    for gamma in (1.0, 0.4, 2.0):
        ok(at.slider(key="q_gamma").set_value(gamma).run())
        kw = {"scorecam_channels": 64} if method == "scorecam" else {}
        ref = ConceptLocalizer(tiny_bundle, method, **kw).explain([image], ["red wing"], "bird", gamma)[0]
        np.testing.assert_allclose(at.session_state["traitloc_last_query"]["map01"], map_to_unit(ref.map(0)),
                                   atol=1e-4)  # fmt: skip
    assert at.session_state["traitloc_forward_passes"] == 1
    if method == "layercam":  # per-prompt cell gradients are cached: a new gamma needs no backward pass
        assert at.session_state["traitloc_gradient_passes"] == 1
    else:  # Score-CAM's masked passes do not depend on gamma or the base: once per image
        assert at.session_state["traitloc_masked_passes"] == 1
        ok(at.text_input(key="q_base").input("animal").run())
        assert at.session_state["traitloc_masked_passes"] == 1


def test_query_upload_is_processed_in_memory(app_env: Path) -> None:
    before = sorted(p.relative_to(app_env) for p in app_env.rglob("*"))
    at = new_app("Query")
    at.radio(key="q_source").set_value("Upload").run()
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), "green").save(buf, format="PNG")
    at.file_uploader(key="q_upload").upload("../../evil name.png", buf.getvalue(), "image/png")
    at.text_input(key="q_concept").input("red wing")
    ok(at.run())
    assert at.session_state["traitloc_forward_passes"] == 1
    assert at.session_state["traitloc_last_query"]["map01"].shape == (60, 80)
    assert at.slider(key="q_gamma").disabled  # no base prompt: gamma is irrelevant
    ok(at.slider(key="q_threshold").set_value(0.3).run())  # a new mask threshold recomputes nothing
    assert at.session_state["traitloc_forward_passes"] == 1
    after = sorted(p.relative_to(app_env) for p in app_env.rglob("*"))
    assert after == before  # nothing written, not even review.sqlite

    at.file_uploader(key="q_upload").set_value(("x.png", b"not an image", "image/png"))
    at.run()
    assert not at.exception and any("Cannot read" in e.value for e in at.error)


def test_offline_weights_fail_fast_once_with_the_pretrained_hint(
    app_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named weights that are not on this machine, offline: a clear error in seconds, not retried on every
    interaction (the app used to try the download again on each rerun), until the user asks."""
    import traitloc.models.clip

    calls: list[tuple[Any, ...]] = []
    real = traitloc.models.clip.load_clip

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(traitloc.models.clip, "load_clip", counting)
    monkeypatch.setenv("TRAITLOC_APP_MODEL", "ViT-B-16")
    monkeypatch.setenv("TRAITLOC_APP_PRETRAINED", "laion400m_e32")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    at = new_app("Query")
    at.radio(key="q_source").set_value("Results folder")
    at.text_input(key="q_concept").input("red wing")
    at.run()
    assert time.monotonic() - t0 < 30
    errors = [e.value for e in at.error]
    assert any("--pretrained" in e for e in errors), errors
    attempts = at.session_state["traitloc_model_load_attempts"]
    t1 = time.monotonic()
    at.text_input(key="q_base").input("bird").run()
    for gamma in (0.5, 1.5):
        at.slider(key="q_gamma").set_value(gamma).run()
        assert any("--pretrained" in e.value for e in at.error)
    assert time.monotonic() - t1 < 5  # remembered: no new attempt
    assert at.session_state["traitloc_model_load_attempts"] == attempts == 1
    assert len(calls) <= 1
    # the user asks for a retry: one new attempt
    at.button(key="q_retry").click().run()
    assert at.session_state["traitloc_model_load_attempts"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Browse
# ------------------------------------------------------------------------------------------------------------------
def test_browse_grid_and_filters(app_env: Path) -> None:
    at = ok(new_app("Browse"))
    assert headline(at).startswith("6 of 6 results")
    assert n_images(at) == 6 + 1  # six thumbnails and the detail view
    assert not [t.value for t in at.text if "photo not found" in t.value]
    ok(at.multiselect(key="b_labels").select("red wing").run())
    assert headline(at).startswith("3 of 6")
    ok(at.multiselect(key="b_labels").unselect("red wing").run())
    df = store_rows(app_env)
    lo, hi = sorted(df["score"])[2], float(df["score"].max())
    ok(at.slider(key="b_score").set_range(lo, hi).run())
    assert headline(at).startswith("4 of 6")
    ok(at.text_input(key="b_text").input("bird2").run())
    assert headline(at).startswith(f"{int(((df['score'] >= lo) & (df['image_key'] == 'bird2')).sum())} of 6")


def test_browse_review_status_filter_and_views(app_env: Path) -> None:
    ReviewStore(app_env).set("bird1/blue-tail", "rejected", "noise")
    at = new_app("Browse")
    ok(at.selectbox(key="b_review").set_value("rejected").run())
    assert headline(at).startswith("1 of 6")
    assert any("rejected" in t.value and "note: noise" in t.value for t in at.text)
    ok(at.selectbox(key="b_review").set_value("unreviewed").run())
    assert headline(at).startswith("5 of 6")
    for mode in ("overlay", "outline"):
        ok(at.selectbox(key="b_mode").set_value(mode).run())
    ok(at.selectbox(key="b_group").set_value("trait").run())
    assert any(t.value.startswith("concept: ") for t in at.text)
    ok(at.select_slider(key="b_zoom").set_value(4).run())


@pytest.fixture
def explain_like(app_env: Path) -> Path:
    """The run rewritten as a ``traitloc explain`` store, with an ``audit_summary.csv``."""
    df = store_rows(app_env)
    shutil.rmtree(app_env / "results")
    df = df.rename(columns={"concept": "target"}).drop(columns=["base", "trait", "concept_score", "base_score"])
    df["target"] = ["Tabby cat" if c == "red wing" else "Tiger cat" for c in df["target"]]
    df["references"] = ["Tiger cat; Egyptian cat" if t == "Tabby cat" else "Tabby cat" for t in df["target"]]
    df["predicted"] = df["target"]
    df["result_id"] = [f"{k}/{t.lower().replace(' ', '-')}" for k, t in zip(df["image_key"], df["target"], strict=True)]
    cols = {"target": "str", "predicted": "str", "references": "str", "gamma": "float", "method": "str",
            "score": "float"}  # fmt: skip
    store = ResultStore(app_env, cols, ["image_key", "target"])
    store.write([{**r, "grid": np.asarray(r["grid"]).reshape(int(r["grid_h"]), int(r["grid_w"]))}
                 for r in df.to_dict("records")])  # fmt: skip
    pd.DataFrame(
        [
            {"level": "pair", "source": "clip", "true_class": "Tabby cat", "similar_class": "Tiger cat",
             "n_images": 3, "lift": 1.7, "verdict": "looks at: striped back (1.7x)"},
            {"level": "pair", "source": "clip", "true_class": "Tiger cat", "similar_class": "Tabby cat",
             "n_images": 3, "lift": 0.4, "verdict": "ignores: orange coat (0.4x)"},
            {"level": "overall", "source": "clip", "true_class": "all", "similar_class": "all", "verdict": "x"},
        ]
    ).to_csv(app_env / "audit_summary.csv", index=False)  # fmt: skip
    return app_env


def test_browse_explain_run_with_audit_verdicts(explain_like: Path) -> None:
    at = ok(new_app("Browse"))
    assert at.multiselect(key="b_labels").label == "Target class"
    assert set(at.selectbox(key="b_pair").options) == {
        "(all)", "Tabby cat vs Tiger cat", "Tabby cat vs Egyptian cat", "Tiger cat vs Tabby cat"}  # fmt: skip
    ok(at.selectbox(key="b_pair").set_value("Tabby cat vs Egyptian cat").run())
    assert headline(at).startswith("3 of 6 results (explain)")
    table = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    assert list(table["verdict"]) == ["looks at: striped back (1.7x)", "ignores: orange coat (0.4x)"]
    ok(at.selectbox(key="b_audit_pair").set_value("Tiger cat vs Tabby cat").run())
    table = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    assert list(table["verdict"]) == ["ignores: orange coat (0.4x)"]


def test_browse_audit_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    summary = {"level": "pair", "source": "parts", "true_class": "A", "similar_class": "B",
               "verdict": "looks at: bill colour (2.0x)"}  # fmt: skip
    pd.DataFrame([summary]).to_csv(audit / "audit_summary.csv", index=False)
    pd.DataFrame([{"image_id": 1, "true_class": "A", "similar_class": "B", "iou_top10": 0.3}]).to_csv(
        audit / "audit.csv", index=False
    )
    monkeypatch.setenv("TRAITLOC_APP_RESULTS_DIR", str(audit))
    at = ok(new_app("Browse"))
    assert list(next(d.value for d in at.dataframe if "verdict" in d.value.columns)["verdict"]) == [
        "looks at: bill colour (2.0x)"
    ]
    at.sidebar.radio(key="page").set_value("Review").run()
    assert not at.exception and at.warning


# ------------------------------------------------------------------------------------------------------------------
# Review
# ------------------------------------------------------------------------------------------------------------------
def test_review_shortcut_buttons_decide_move_and_undo(app_env: Path) -> None:
    at = ok(new_app())
    assert at.sidebar.radio(key="page").value == "Review"  # a results folder opens on Review
    ids = order(at)
    assert len(ids) == 6 and cursor(at) == 0
    assert any("a accept" in c.value and "u undo" in c.value for c in at.caption)  # the shortcuts are on the page
    ok(at.button(key="kb_accept").click().run())
    store = ReviewStore(app_env)
    assert store.get(ids[0]).status == "accepted" and cursor(at) == 1  # type: ignore[union-attr]
    assert store.history(ids[0])[-1].who == "ana"
    ok(at.button(key="kb_reject").click().run())
    ok(at.button(key="kb_needs").click().run())
    assert [store.get(i).status for i in ids[:3]] == ["accepted", "rejected", "needs-work"]  # type: ignore[union-attr]
    assert cursor(at) == 3
    ok(at.button(key="kb_undo").click().run())  # undo goes back to the item and clears it
    assert store.get(ids[2]) is None and cursor(at) == 2
    ok(at.button(key="kb_prev").click().run())
    ok(at.button(key="kb_prev").click().run())
    assert cursor(at) == 0
    # a decision on a decided item moves to the next *undecided* one (ids[1] is decided)
    ok(at.button(key="kb_reject").click().run())
    assert cursor(at) == 2
    ok(at.button(key="kb_next").click().run())
    assert cursor(at) == 3
    # the decisions persist across a restart (a new session): the detail view of item 1 says so
    at2 = ok(new_app("Review"))
    assert order(at2) == ids
    assert any("✗ rejected" in t.value for t in at2.text)


def test_unreviewed_view_does_not_jump_until_refresh(app_env: Path) -> None:
    at = ok(new_app())
    ok(at.selectbox(key="r_review").set_value("unreviewed").run())
    ids = order(at)
    assert len(ids) == 6
    for k in range(3):
        ok(at.button(key="kb_accept").click().run())
        assert order(at) == ids and cursor(at) == k + 1  # decided items stay where they were
        assert headline(at).startswith("6 of 6")
    ok(at.button(key="r_refresh").click().run())
    assert sorted(order(at)) == sorted(ids[3:]) and headline(at).startswith("3 of 6")


def test_note_edit_is_saved_on_every_edit(app_env: Path) -> None:
    """Editing the note of a decided result saves it at once (it used to be saved only with a new decision)."""
    at = ok(new_app())
    ids = order(at)
    ok(at.button(key="kb_accept").click().run())
    ok(at.button(key="kb_prev").click().run())
    at.text_input(key=note_key(ids[0])).input("clear wing patch")
    ok(at.run())
    got = ReviewStore(app_env).get(ids[0])
    assert got is not None and (got.status, got.note) == ("accepted", "clear wing patch")
    assert any(c.value.startswith("note saved") for c in at.caption)
    # an undecided result: the note is kept and saved with the decision
    ok(at.button(key="kb_next").click().run())
    at.text_input(key=note_key(ids[1])).input("check the tail")
    ok(at.run())
    assert ReviewStore(app_env).get(ids[1]) is None
    assert any("saved with your decision" in c.value for c in at.caption)
    ok(at.button(key="kb_needs").click().run())
    assert ReviewStore(app_env).get(ids[1]).note == "check the tail"  # type: ignore[union-attr]
    # a new session reads the note back into the note field of the current item
    at2 = ok(new_app())
    assert at2.text_input(key=note_key(ids[0])).value == "clear wing patch"


def test_bulk_decision_asks_with_the_count_and_undoes_as_one(app_env: Path) -> None:
    at = ok(new_app())
    ok(at.multiselect(key="r_labels").select("red wing").run())
    ok(at.selectbox(key="rv_bulk_status").set_value("accepted").run())
    ok(at.button(key="rv_bulk_ask").click().run())
    assert any("for 3 results" in w.value for w in at.warning)
    assert ReviewStore(app_env).decisions() == {}  # nothing before the confirmation
    ok(at.button(key="rv_bulk_confirm").click().run())
    got = ReviewStore(app_env).decisions()
    assert sorted(got) == ["bird0/red-wing", "bird1/red-wing", "bird2/red-wing"]
    assert {d.status for d in got.values()} == {"accepted"}
    ok(at.button(key="kb_undo").click().run())
    assert ReviewStore(app_env).decisions() == {}
    # a selection (s) narrows the bulk decision to the selected items
    ok(at.button(key="kb_select").click().run())
    ok(at.button(key="kb_next").click().run())
    ok(at.button(key="kb_select").click().run())
    ok(at.selectbox(key="rv_bulk_status").set_value("rejected").run())
    assert at.selectbox(key="rv_bulk_scope").value == "selection"  # selecting switches the scope
    ok(at.button(key="rv_bulk_ask").click().run())
    ok(at.button(key="rv_bulk_confirm").click().run())
    assert len(ReviewStore(app_env).decisions("rejected")) == 2


def test_progress_per_trait_and_reviewer(app_env: Path) -> None:
    ReviewStore(app_env, who="bo").set("bird0/red-wing", "accepted")
    ReviewStore(app_env, who="cy").set("bird1/red-wing", "rejected")
    at = ok(new_app())
    ok(at.toggle(key="rv_show_progress").set_value(True).run())
    per_trait = next(d.value for d in at.dataframe if "reviewed %" in d.value.columns)
    red = per_trait.set_index("Concept").loc["red wing"]
    assert (red["total"], red["accepted"], red["rejected"], red["unreviewed"]) == (3, 1, 1, 1)
    who = next(d.value for d in at.dataframe if "reviewer" in d.value.columns).set_index("reviewer")
    assert who.loc["bo", "accepted"] == 1 and who.loc["cy", "rejected"] == 1


def test_bad_rows_are_reported_not_dropped_silently(app_env: Path) -> None:
    """Rows that cannot be drawn are counted in a warning with their reasons (they used to vanish from the count)."""
    cols = {"concept": "str", "trait": "str", "base": "str", "gamma": "float", "method": "str", "score": "float"}
    store = ResultStore(app_env, cols, ["image_key", "concept"])
    store.write([
        {"image": "/nowhere/x.png", "image_key": "x", "concept": "red wing", "status": "error: cannot decode",
         "grid": None},
        {"image": "/nowhere/y.png", "image_key": "y", "concept": "red wing", "status": "ok", "width": 10,
         "height": 10, "grid_h": 5, "grid_w": 5, "grid": np.zeros((4, 4), np.float32), "score": 0.1},
    ])  # fmt: skip
    at = ok(new_app("Browse"))
    assert headline(at).startswith("6 of 6")
    assert any("2 results of this run cannot be shown" in w.value for w in at.warning)
    bad = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    reasons = dict(zip(bad["result_id"], bad["reason"], strict=True))
    assert reasons["x/red-wing"] == "status: error: cannot decode"
    assert "does not match its grid of 5 x 5" in reasons["y/red-wing"]


def test_text_from_the_store_is_shown_as_text(app_env: Path) -> None:
    """Labels and paths from the store never become Markdown or links (a link in a name used to be live)."""
    evil = "see [click](http://evil.example) <b>x</b> **b**"
    df = store_rows(app_env)
    shutil.rmtree(app_env / "results")
    df["concept"] = [evil if c == "red wing" else c for c in df["concept"]]
    cols = {"concept": "str", "trait": "str", "base": "str", "gamma": "float", "method": "str", "score": "float"}
    ResultStore(app_env, cols, ["image_key", "concept"]).write(
        [
            {**r, "grid": np.asarray(r["grid"]).reshape(int(r["grid_h"]), int(r["grid_w"]))}
            for r in df.to_dict("records")
        ]
    )
    at = ok(new_app("Browse"))
    ok(at.selectbox(key="b_sort").set_value("name").run())
    ok(at.selectbox(key="b_group").set_value("none").run())
    ok(at.multiselect(key="b_labels").select(evil).run())
    md = [m.value for m in at.markdown] + [c.value for c in at.caption]
    assert not any("](http" in m for m in md), md
    assert any(evil in t.value for t in at.text)  # shown, verbatim, as plain text
    assert any(evil in str(o) for o in at.multiselect(key="b_labels").options)


# ------------------------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------------------------
def test_export_of_accepted_streams_to_exports_with_progress(app_env: Path, app_module: ModuleType) -> None:
    store = ReviewStore(app_env)
    store.set("bird0/red-wing", "accepted", "good")
    store.set("bird1/blue-tail", "accepted")
    store.set("bird2/red-wing", "rejected")
    calls: list[tuple[int, int]] = []
    path = app_module.write_export(
        app_env, ["png", "tiff", "csv"], "accepted", "acc", lambda d, t: calls.append((d, t))
    )
    assert path == app_env.resolve() / "exports" / "acc.zip"
    assert calls and calls[-1][0] == calls[-1][1]
    rows = store_rows(app_env).set_index("result_id")
    with zipfile.ZipFile(path) as zf:
        masks = sorted(n for n in zf.namelist() if n.startswith("masks/"))
        assert masks == ["masks/bird0/red-wing.png", "masks/bird1/blue-tail.png"]
        for rid in ("bird0/red-wing", "bird1/blue-tail"):
            row = {**rows.loc[rid].to_dict(), "result_id": rid}
            got = np.asarray(Image.open(io.BytesIO(zf.read(f"masks/{rid}.png")))) > 0
            np.testing.assert_array_equal(got, render_mask(row, float(row["threshold"])))
        table = next(n for n in zf.namelist() if n.endswith("results.csv"))
        df = pd.read_csv(io.BytesIO(zf.read(table)), keep_default_na=False)
        assert dict(zip(df["result_id"], df["review_note"], strict=True))["bird0/red-wing"] == "good"
    # the current filter: explicit ids
    path2 = app_module.write_export(app_env, ["png"], ["bird2/blue-tail"], "sel")
    with zipfile.ZipFile(path2) as zf:
        assert sorted(n for n in zf.namelist() if n.startswith("masks/")) == ["masks/bird2/blue-tail.png"]


def test_export_from_the_review_page(app_env: Path) -> None:
    ReviewStore(app_env).set("bird0/red-wing", "accepted")
    at = ok(new_app())
    ok(at.button(key="rv_export_go").click().run())
    path = Path(at.session_state["rv_export_path"])
    assert path.parent == app_env.resolve() / "exports" and path.is_file()
    assert at.download_button(key="rv_download")


# ------------------------------------------------------------------------------------------------------------------
# security
# ------------------------------------------------------------------------------------------------------------------
def test_paths_from_the_browser_stay_inside(app_env: Path, app_module: ModuleType, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    (app_env / "link.png").symlink_to(secret)
    Image.new("RGB", (8, 8)).save(app_env / "inside.png")
    cfg = app_module.load_config(argv=[str(app_env)])
    for path in ["../secret.png", str(secret), "link.png", "/etc/passwd", "x/../../secret.png"]:
        assert app_module.safe_file(cfg, path) is None
    assert app_module.safe_file(cfg, "inside.png") is not None
    # the app writes only inside RESULTS_DIR: an export name cannot leave exports/
    ReviewStore(app_env).set("bird0/red-wing", "accepted")
    p = app_module.write_export(app_env, ["png"], "accepted", "../../evil")
    assert p.parent == app_env.resolve() / "exports"


def test_bad_results_dir_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAITLOC_APP_RESULTS_DIR", str(tmp_path / "missing"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and any("not a folder" in e.value for e in at.error)
    assert at.sidebar.radio(key="page").value == "Query"


def test_app_source_never_unpickles() -> None:
    text = (
        APP.read_text()
        + (REPO / "traitloc" / "io" / "decisions.py").read_text()
        + (REPO / "traitloc" / "io" / "reviewkit.py").read_text()
    )
    for bad in ("import pickle", "read_pickle", "torch.load(", "st.cache_data", "np.load(", "joblib"):
        assert bad not in text


# ------------------------------------------------------------------------------------------------------------------
# traitloc app
# ------------------------------------------------------------------------------------------------------------------
def _app_args(*argv: str) -> argparse.Namespace:
    from traitloc.cli import app as app_cli

    parser = argparse.ArgumentParser(prog="traitloc")
    app_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["app", *argv])


def test_app_command_line(results: Path, tiny_clip_config: Path, tiny_clip_weights: Path) -> None:
    from traitloc.cli import app as app_cli

    args = _app_args(str(results), "--port", "8765", "--model", str(tiny_clip_config), "--pretrained",
                     str(tiny_clip_weights))  # fmt: skip
    assert args.host == "127.0.0.1" and args.port == 8765
    cmd, env = app_cli.build_command(args)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and Path(cmd[4]) == APP
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert env["TRAITLOC_APP_RESULTS_DIR"] == str(results.resolve())
    assert env["TRAITLOC_APP_MODEL"] == str(tiny_clip_config.resolve())
    assert env["TRAITLOC_APP_PRETRAINED"] == str(tiny_clip_weights.resolve())
    assert _app_args().results_dir is None and _app_args().port == 8501
    for bad in (["--port", "0"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            _app_args(*bad)


def test_app_command_rejects_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from traitloc.cli import app as app_cli
    from traitloc.pipelines.options import CliError

    with pytest.raises(CliError, match="not a folder"):
        app_cli.run(_app_args(str(tmp_path / "nope")), [])
    assert app_cli.main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_app_subcommand_through_traitloc_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``traitloc app`` through the command line's dispatch."""
    from traitloc.cli import commands as cli

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    args = cli.build_parser().parse_args(["app", str(tmp_path), "--port", "9000"])
    assert (args.command, args.port, args.host) == ("app", 9000, "127.0.0.1")
    assert cli.main(["app", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("traitloc app: error:") and "not a folder" in err and "\n" not in err
