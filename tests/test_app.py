"""The review app (apps/review.py) driven with Streamlit's AppTest, and ``traitloc app`` (traitloc/app_cli.py).

A results folder is made once per module by ``traitloc localize`` with the tiny random open_clip ViT of
conftest.py (images inside RESULTS_DIR/images). The app reads its settings from ``TRAITLOC_APP_*`` variables.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from traitloc.export import read_map_tiff  # noqa: E402
from traitloc.store import ReviewStore  # noqa: E402

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
    """A ``traitloc localize`` results folder: 3 images x 2 concepts vs base 'bird' (read-only: copy to modify)."""
    from conftest import make_image_array

    from traitloc.cli import main

    root = tmp_path_factory.mktemp("app") / "results"
    images = root / "images"
    images.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (80, 60), (50, 70)]):
        Image.fromarray(make_image_array(size, seed=i)).save(images / f"bird{i}.png")
    argv = ["localize", str(images), *[a for c in CONCEPTS for a in ("--concept", c)], "--base", "bird",
            "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu",
            "--out", str(root), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return root


@pytest.fixture
def results(localized: Path, tmp_path: Path) -> Path:
    """A fresh copy of the results folder (each test writes its own review.sqlite)."""
    dst = tmp_path / "results"
    shutil.copytree(localized, dst)
    df = pd.read_csv(dst / "results.csv", dtype=str, keep_default_na=False)  # images moved with the copy
    df["image"] = [str(dst / "images" / Path(p).name) for p in df["image"]]
    df.to_csv(dst / "results.csv", index=False)
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


def widget_key(prefix: str, result_id: str) -> str:
    return f"{prefix}_{hashlib.sha1(result_id.encode()).hexdigest()[:16]}"


def audit_table(at: AppTest) -> pd.DataFrame:
    """The audit verdict table on the Browse page."""
    return next(d.value for d in at.dataframe if "verdict" in d.value.columns)


def headline(at: AppTest) -> str:
    """The 'N of M results' line."""
    return next(m.value for m in at.markdown if " results" in m.value and m.value.startswith("**"))


# ------------------------------------------------------------------------------------------------------------------
# Query
# ------------------------------------------------------------------------------------------------------------------
def query(at: AppTest, concept: str = "red wing", base: str = "bird") -> AppTest:
    at.radio(key="q_source").set_value("Results folder")
    at.selectbox(key="q_pick").set_value("images/bird0.png")
    at.text_input(key="q_concept").input(concept)
    at.text_input(key="q_base").input(base)
    return ok(at.run())


def test_query_gamma_change_reuses_the_forward_pass(app_env: Path, tiny_bundle: Any) -> None:
    from traitloc.export import map_to_unit
    from traitloc.localize import ConceptLocalizer

    at = new_app("Query")
    assert at.sidebar.radio(key="page").value == "Query"
    assert at.session_state["traitloc_forward_passes"] == 0
    query(at)
    assert at.session_state["traitloc_forward_passes"] == 1
    assert at.session_state["traitloc_gradient_passes"] == 1
    first = at.session_state["traitloc_last_query"]
    # gamma = 1 and the same image: the app's map is the one traitloc localize wrote
    tif, _ = read_map_tiff(app_env / "maps" / "bird0" / "red-wing.tif")
    np.testing.assert_allclose(first["map01"], tif, atol=1e-5)
    assert len(at.image) == 3 and [m.label for m in at.metric][0] == "objective s"

    for gamma in (0.0, 0.35, 2.5):
        ok(at.slider(key="q_gamma").set_value(gamma).run())
        assert at.session_state["traitloc_forward_passes"] == 1  # no new forward pass
        assert at.session_state["traitloc_gradient_passes"] == 1  # and no new backward pass
        got = at.session_state["traitloc_last_query"]
        image = Image.open(app_env / "images" / "bird0.png").convert("RGB")
        ref = ConceptLocalizer(tiny_bundle).explain([image], ["red wing"], "bird", gamma)[0]
        np.testing.assert_allclose(got["map01"], map_to_unit(ref.map(0)), atol=1e-5)
        assert got["score"] == pytest.approx(float(ref.scores[0]), abs=1e-5)
    assert not np.allclose(at.session_state["traitloc_last_query"]["map01"], first["map01"])

    # a new base prompt: text tower and one truncated backward, still no image forward pass
    ok(at.text_input(key="q_base").input("animal").run())
    assert at.session_state["traitloc_forward_passes"] == 1
    assert at.session_state["traitloc_gradient_passes"] == 2
    # back to the first base: everything cached
    ok(at.text_input(key="q_base").input("bird").run())
    assert at.session_state["traitloc_gradient_passes"] == 2
    # another image: one more forward pass
    ok(at.selectbox(key="q_pick").set_value("images/bird1.png").run())
    assert at.session_state["traitloc_forward_passes"] == 2


@pytest.mark.parametrize("method", ["layercam", "scorecam"])
def test_query_other_methods_match_the_engine(app_env: Path, tiny_bundle: Any, method: str) -> None:
    from traitloc.export import map_to_unit
    from traitloc.localize import ConceptLocalizer

    at = new_app("Query")
    at.selectbox(key="q_method").set_value(method)
    query(at)
    image = Image.open(app_env / "images" / "bird0.png").convert("RGB")
    for gamma in (1.0, 0.4):
        ok(at.slider(key="q_gamma").set_value(gamma).run())
        kw = {"scorecam_channels": 64} if method == "scorecam" else {}
        ref = ConceptLocalizer(tiny_bundle, method, **kw).explain([image], ["red wing"], "bird", gamma)[0]
        np.testing.assert_allclose(at.session_state["traitloc_last_query"]["map01"], map_to_unit(ref.map(0)),
                                   atol=1e-4)  # fmt: skip
    assert at.session_state["traitloc_forward_passes"] == 1
    if method == "layercam":  # per-prompt cell gradients are cached: a new gamma needs no backward pass
        assert at.session_state["traitloc_gradient_passes"] == 1
    else:  # Score-CAM's masked passes depend on gamma: once per (prompts, gamma), cached
        assert at.session_state["traitloc_masked_passes"] == 2
        ok(at.slider(key="q_gamma").set_value(1.0).run())
        assert at.session_state["traitloc_masked_passes"] == 2


def test_query_upload_is_processed_in_memory(app_env: Path) -> None:
    before = sorted(p.relative_to(app_env) for p in app_env.rglob("*"))
    at = new_app("Query")
    at.radio(key="q_source").set_value("Upload").run()
    buf = io.BytesIO()
    Image.open(app_env / "images" / "bird1.png").save(buf, format="PNG")
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

    # a file that is not an image: an error on the page, no crash
    at.file_uploader(key="q_upload").set_value(("x.png", b"not an image", "image/png"))
    at.run()
    assert not at.exception and any("Cannot read" in e.value for e in at.error)


# ------------------------------------------------------------------------------------------------------------------
# Browse
# ------------------------------------------------------------------------------------------------------------------
def test_browse_filters(app_env: Path) -> None:
    at = ok(new_app())
    assert at.sidebar.radio(key="page").value == "Browse"  # a results folder opens on Browse
    assert headline(at).startswith("**6** of 6")
    assert len(at.image) == 18  # image | overlay | mask for every result
    ok(at.multiselect(key="b_labels").select("red wing").run())
    assert headline(at).startswith("**3** of 6")
    assert all("red wing" in m.value for m in at.markdown if m.value.startswith("**red") or "blue" in m.value)
    ok(at.multiselect(key="b_labels").unselect("red wing").run())
    assert at.selectbox(key="b_pair").options == ["(all)", "blue tail vs bird", "red wing vs bird"]
    ok(at.selectbox(key="b_pair").set_value("blue tail vs bird").run())
    assert headline(at).startswith("**3** of 6")
    ok(at.selectbox(key="b_pair").set_value("(all)").run())
    df = pd.read_csv(app_env / "results.csv")
    lo, hi = sorted(df["score"])[2], float(df["score"].max())
    ok(at.slider(key="b_score").set_range(lo, hi).run())
    assert headline(at).startswith("**4** of 6")
    ok(at.text_input(key="b_text").input("bird2").run())
    assert headline(at).startswith(f"**{int(((df['score'] >= lo) & (df['image_key'] == 'bird2')).sum())}** of 6")


def test_browse_review_status_filter(app_env: Path) -> None:
    ReviewStore(app_env).set("bird1/blue-tail", "rejected", "noise")
    at = new_app("Browse")
    ok(at.selectbox(key="b_review").set_value("rejected").run())
    assert headline(at).startswith("**1** of 6")
    assert any("image bird1" in m.value and "rejected" in m.value for m in at.markdown)
    ok(at.selectbox(key="b_review").set_value("unreviewed").run())
    assert headline(at).startswith("**5** of 6")


@pytest.fixture
def explain_like(app_env: Path) -> Path:
    """The results folder rewritten as a ``traitloc explain`` folder with an ``audit_summary.csv``."""
    df = pd.read_csv(app_env / "results.csv", dtype=str, keep_default_na=False)
    df = df.rename(columns={"concept": "target"}).drop(columns=["base"])
    df["target"] = ["Tabby cat" if c == "red wing" else "Tiger cat" for c in df["target"]]
    df["references"] = ["Tiger cat; Egyptian cat" if t == "Tabby cat" else "Tabby cat" for t in df["target"]]
    df["predicted"] = df["target"]
    df.to_csv(app_env / "results.csv", index=False)
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


def test_browse_explain_folder_with_audit_verdicts(explain_like: Path) -> None:
    at = ok(new_app("Browse"))
    assert at.multiselect(key="b_labels").label == "Target class"
    assert set(at.selectbox(key="b_pair").options) == {
        "(all)", "Tabby cat vs Tiger cat", "Tabby cat vs Egyptian cat", "Tiger cat vs Tabby cat"}  # fmt: skip
    ok(at.selectbox(key="b_pair").set_value("Tabby cat vs Egyptian cat").run())
    assert headline(at).startswith("**3** of 6")
    cards = [m.value for m in at.markdown if m.value.startswith("**Tabby cat**")]
    assert len(cards) == 3 and all("looks at: striped back" in c.replace("\\", "") for c in cards)
    table = audit_table(at)
    assert list(table["verdict"]) == ["looks at: striped back (1.7x)", "ignores: orange coat (0.4x)"]
    ok(at.selectbox(key="b_audit_pair").set_value("Tiger cat vs Tabby cat").run())
    assert list(audit_table(at)["verdict"]) == ["ignores: orange coat (0.4x)"]


def test_browse_audit_only_folder(app_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert list(audit_table(at)["verdict"]) == ["looks at: bill colour (2.0x)"]
    at.sidebar.radio(key="page").set_value("Review").run()
    assert not at.exception and at.warning


# ------------------------------------------------------------------------------------------------------------------
# Review
# ------------------------------------------------------------------------------------------------------------------
def test_review_decision_persists_across_restarts(app_env: Path, app_module: ModuleType) -> None:
    at = ok(new_app("Review"))
    assert at.download_button(key="r_download").disabled  # nothing accepted yet
    rid = "bird0/red-wing"
    at.text_input(key=widget_key("note", rid)).input("clear wing patch")
    ok(at.button(key=widget_key("accepted", rid)).click().run())
    ok(at.button(key=widget_key("needs-work", "bird2/blue-tail")).click().run())
    got = ReviewStore(app_env).get(rid)
    assert got is not None and (got.status, got.note) == ("accepted", "clear wing patch")
    assert ReviewStore(app_env).history(rid)[-1].who == "ana"
    assert not at.download_button(key="r_download").disabled

    # a restart (new session): the decision and the note are read back from review.sqlite
    at2 = ok(new_app("Review"))
    assert at2.text_input(key=widget_key("note", rid)).value == "clear wing patch"
    assert at2.button(key=widget_key("accepted", rid)).proto.type == "primary"
    assert at2.button(key=widget_key("rejected", rid)).proto.type == "secondary"
    assert any("image bird0" in m.value and "accepted" in m.value for m in at2.markdown)
    # a second decision on the same result replaces the first; the history keeps both
    ok(at2.button(key=widget_key("rejected", rid)).click().run())
    assert ReviewStore(app_env).get(rid).status == "rejected"  # type: ignore[union-attr]
    assert [h.status for h in ReviewStore(app_env).history(rid)] == ["accepted", "rejected"]
    ok(at2.selectbox(key="r_review").set_value("needs-work").run())
    assert headline(at2).startswith("**1** of 6")


def _check_zip(data: bytes, results: Path, accepted: set[str]) -> zipfile.ZipFile:
    """The zip holds the accepted results' masks (same pixels) and maps (same values), nothing else."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    masks = {n for n in names if n.startswith("masks/")}
    assert masks == {f"masks/{r}.png" for r in accepted}
    for n in masks:
        got = np.asarray(Image.open(io.BytesIO(zf.read(n))))
        np.testing.assert_array_equal(got, np.asarray(Image.open(results / n)))
    for r in accepted:
        got_map = tifffile.imread(io.BytesIO(zf.read(f"maps/{r}.tif")))
        np.testing.assert_array_equal(got_map, read_map_tiff(results / f"maps/{r}.tif")[0])
    return zf


def test_export_zip_of_accepted(app_env: Path, app_module: ModuleType) -> None:
    store = ReviewStore(app_env)
    store.set("bird0/red-wing", "accepted", "good")
    store.set("bird1/blue-tail", "accepted")
    store.set("bird2/red-wing", "rejected")
    before = sorted(p.relative_to(app_env) for p in app_env.rglob("*") if p.is_file())
    data = app_module.build_export_zip(app_env, ["png", "tiff", "csv"], [app_env])
    with _check_zip(data, app_env, {"bird0/red-wing", "bird1/blue-tail"}) as zf:
        table = next(n for n in zf.namelist() if n.endswith("results.csv"))
        df = pd.read_csv(io.BytesIO(zf.read(table)), keep_default_na=False)
        assert sorted(df["result_id"]) == ["bird0/red-wing", "bird1/blue-tail"]
        assert dict(zip(df["result_id"], df["review_note"], strict=True))["bird0/red-wing"] == "good"
    after = sorted(p.relative_to(app_env) for p in app_env.rglob("*") if p.is_file())
    assert [p for p in after if p not in before and not p.name.startswith("review.sqlite")] == []
    assert not (app_env / "exports").exists()  # the temporary zip and its folder are gone
    # decisions are read when the download runs: nothing accepted any more -> the reason, in the zip
    store.set("bird0/red-wing", "rejected")
    store.set("bird1/blue-tail", "needs-work")
    with zipfile.ZipFile(io.BytesIO(app_module.build_export_zip(app_env))) as zf:
        assert zf.namelist() == ["export_error.txt"] and "nothing to export" in zf.read("export_error.txt").decode()


# ------------------------------------------------------------------------------------------------------------------
# security
# ------------------------------------------------------------------------------------------------------------------
def test_paths_leaving_results_dir_are_never_read(app_env: Path, app_module: ModuleType, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    (app_env / "overlays" / "link.png").symlink_to(secret)
    df = pd.read_csv(app_env / "results.csv", dtype=str, keep_default_na=False)
    bad = df.iloc[0].copy()
    bad["map"], bad["overlay"], bad["mask"], bad["image"] = (
        "maps/../../secret.tif", "overlays/link.png", "../secret.png", str(secret))  # fmt: skip
    df.loc[0, ["overlay", "mask", "image"]] = ["overlays/link.png", str(secret), "/etc/passwd"]
    pd.concat([df, bad.to_frame().T]).to_csv(app_env / "results.csv", index=False)
    cfg = app_module.load_config(argv=[str(app_env)])
    for path in ["../secret.png", str(secret), "overlays/link.png", "/etc/passwd", "overlays/../../secret.png"]:
        assert app_module.safe_file(cfg, path) is None
    assert app_module.safe_file(cfg, "overlays/bird0/red-wing.png") is not None
    folder = app_module.load_folder(cfg)
    assert len(folder.results) == 6  # the row with a map outside maps/ is dropped
    at = ok(new_app("Browse"))
    assert len(at.image) == 18 - 3  # row 0's image, overlay and mask all lie outside: none is shown
    ReviewStore(app_env).set("bird0/red-wing", "accepted")
    # traitloc.formats refuses the whole export: the Review page says why and disables the download
    at = new_app("Review")
    assert at.download_button(key="r_download").disabled
    assert any("Export unavailable" in e.value and "secret" in e.value for e in at.error)
    # and a download started anyway gets the reason, not files from outside
    with zipfile.ZipFile(io.BytesIO(app_module.build_export_zip(app_env, ["png", "tiff"]))) as zf:
        assert zf.namelist() == ["export_error.txt"]
        assert "secret" in zf.read("export_error.txt").decode()


def test_bad_results_dir_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRAITLOC_APP_RESULTS_DIR", str(tmp_path / "missing"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and any("not a folder" in e.value for e in at.error)
    assert at.sidebar.radio(key="page").value == "Query"


def test_app_source_never_unpickles() -> None:
    text = APP.read_text() + (REPO / "traitloc" / "store.py").read_text()
    for bad in ("import pickle", "read_pickle", "torch.load(", "st.cache_data", "np.load(", "joblib"):
        assert bad not in text


# ------------------------------------------------------------------------------------------------------------------
# traitloc app
# ------------------------------------------------------------------------------------------------------------------
def _app_args(*argv: str) -> argparse.Namespace:
    from traitloc import app_cli

    parser = argparse.ArgumentParser(prog="traitloc")
    app_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["app", *argv])


def test_app_command_line(results: Path, tiny_clip_config: Path, tiny_clip_weights: Path) -> None:
    from traitloc import app_cli

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
    from traitloc import app_cli
    from traitloc.cli import CliError

    with pytest.raises(CliError, match="not a folder"):
        app_cli.run(_app_args(str(tmp_path / "nope")), [])
    assert app_cli.main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_text_from_results_files_is_escaped(app_module: ModuleType) -> None:
    text = app_module.md("[click](http://evil.example) ![x](http://t.example/p.png) <img src=x> **b**")
    assert re.search(r"(?<!\\)[\[\]()<>*!]", text) is None  # every Markdown/HTML character is escaped
    assert text.replace("\\", "") == "[click](http://evil.example) ![x](http://t.example/p.png) <img src=x> **b**"


def test_app_subcommand_through_traitloc_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``traitloc app`` once traitloc.cli lists app_cli among its subcommand modules."""
    from traitloc import cli

    if "app_cli" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "app_cli"))
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    args = cli.build_parser().parse_args(["app", str(tmp_path), "--port", "9000"])
    assert (args.command, args.port, args.host) == ("app", 9000, "127.0.0.1")
    assert cli.main(["app", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("traitloc app: error:") and "not a folder" in err and "\n" not in err
