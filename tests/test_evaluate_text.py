"""``traitloc evaluate-text``: the trait-localization benchmark of the text-query methods.

Known answers on synthetic CUB data (:mod:`tests.cubfake`: each bird is a slate-grey ellipse with two discs of its
class's wing colour on the wing keypoints):

- a hand-built localizer that sees only colour (its map of "<colour> wings" is how close each pixel is to that
  colour) must hit the wings for the bird's own wing colour: pointing game 1 and most energy inside the wing region;
- a uniform map has ``energy_inside`` equal to the region's area share exactly (lift 1) and points nowhere;
- an all-zero map is an ``empty map``: no scores, a miss in the pointing game.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.cubfake import COLOR_RGB, make_fake_cub
from traitloc.data.cub import CUB
from traitloc.pipelines.evaluate_text import (
    EMPTY_MAP,
    TextEvalSettings,
    part_group,
    run_text_eval,
    score_map,
    summarize,
)

SHARED_CUB = Path(__file__).resolve().parents[2] / "shared" / "cub"


class _Maps:
    def __init__(self, maps: list[np.ndarray]):
        self.maps = maps

    def map(self, q: int) -> np.ndarray:
        return self.maps[q]


class ColourLocalizer:
    """Sees only colour: the map of a prompt naming a colour is ``relu(1 - |pixel - colour| / tau)``; any other
    prompt gives an all-zero map. The base prompt is ignored (it has no colour)."""

    def __init__(self, tau: float = 0.2):
        self.tau = tau
        self.calls = 0

    def explain(self, images, concepts, base=None, gamma=1.0):
        self.calls += 1
        out = []
        for im in images:
            px = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
            maps = []
            for c in concepts:
                colour = next((COLOR_RGB[w] for w in c.split() if w in COLOR_RGB), None)
                if colour is None:
                    maps.append(np.zeros(px.shape[:2], np.float32))
                    continue
                d = np.linalg.norm(px - np.asarray(colour) / 255.0, axis=-1)
                maps.append(np.clip(1.0 - d / self.tau, 0.0, None).astype(np.float32))
            out.append(_Maps(maps))
        return out


class ConstantLocalizer:
    def __init__(self, value: float):
        self.value = value

    def explain(self, images, concepts, base=None, gamma=1.0):
        return [_Maps([np.full((im.height, im.width), self.value, np.float32) for _ in concepts]) for im in images]


@pytest.fixture(scope="module")
def fake_cub(tmp_path_factory: pytest.TempPathFactory) -> CUB:
    root = make_fake_cub(tmp_path_factory.mktemp("cub"), n_classes=4, images_per_class=4, size=(96, 72))
    return CUB(root)


@pytest.fixture(scope="module")
def evaluated(fake_cub: CUB, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("text_eval")
    loc = {"colour": ColourLocalizer(), "uniform": ConstantLocalizer(1.0), "zero": ConstantLocalizer(0.0)}
    s = TextEvalSettings(methods=tuple(loc), pointing_tolerance=4.0, quiet=True)
    res = run_text_eval(fake_cub, loc, out, s, run_info={"random_weights": True})
    assert res["counts"]["failed"] == 0 and res["counts"]["ok"] == 3 * len(fake_cub.split("test"))
    return out, pd.read_csv(out / "text_eval.csv")


def test_part_group() -> None:
    assert part_group(("left wing", "right wing")) == "wings"
    assert part_group(("crown",)) == "crown"
    assert part_group(("left eye", "right eye", "forehead")) == "eyes+forehead"
    assert part_group(()) == "whole bird"


def test_score_map_known_answers() -> None:
    region = np.zeros((10, 10), bool)
    region[2:4, 2:7] = True  # 10 of 100 pixels
    m = np.zeros((10, 10))
    m[3, 3] = 2.0
    m[8, 8] = 1.0
    s = score_map(m, region, 0.0)
    assert s["status"] == "ok" and s["pointing_hit"] == 1.0
    assert s["energy_inside"] == pytest.approx(2 / 3) and s["area_share"] == pytest.approx(0.1)
    assert s["lift"] == pytest.approx(20 / 3)
    assert score_map(np.ones((10, 10)), region, 0.0)["energy_inside"] == pytest.approx(0.1)
    empty = score_map(np.zeros((10, 10)), region, 0.0)
    assert empty["status"] == EMPTY_MAP and empty["pointing_hit"] == ""


def test_summarize_counts_empty_maps_as_misses() -> None:
    rows = pd.DataFrame(
        {"image_id": [1, 1, 2, 2], "method": ["m"] * 4, "part_group": ["wings", "wings", "crown", "wings"],
         "pointing_hit": [1.0, 0.0, np.nan, 1.0], "energy_inside": [0.5, 0.1, np.nan, 0.3],
         "area_share": [0.1, 0.1, 0.2, 0.1], "lift": [5.0, 1.0, np.nan, 3.0],
         "status": ["ok", "ok", EMPTY_MAP, "ok"]}
    )  # fmt: skip
    s = summarize(rows).set_index("part_group")
    assert s.loc["wings", "pointing_game"] == pytest.approx(2 / 3)
    assert s.loc["crown", "pointing_game"] == 0.0 and s.loc["crown", "empty_maps"] == 1
    assert s.loc["all", "pointing_game"] == pytest.approx(0.5)
    assert s.loc["all", "energy_inside"] == pytest.approx(0.3) and s.loc["all", "n_images"] == 2
    assert list(s.index)[-1] == "all"


def test_colour_model_hits_its_own_wings(evaluated, fake_cub: CUB) -> None:
    _, df = evaluated
    colour = df[df["method"] == "colour"]
    own = []
    for r in colour[colour["attribute"].str.startswith("has_wing_color::")].itertuples():
        wing = fake_cub.classes.set_index("class_id").loc[r.class_id, "name"].split(".")[1].split("_")[0].lower()
        if r.attribute == f"has_wing_color::{wing}":
            own.append(r)
    assert len(own) == len(fake_cub.split("test"))  # one per test image: wings are always visible
    for r in own:
        assert r.status == "ok" and r.pointing_hit == 1.0, r
        assert r.energy_inside > 0.4 and r.lift > 5, r
        assert r.part_group == "wings" and set(r.visible_parts.split(";")) == {"left wing", "right wing"}


def test_uniform_and_empty_maps(evaluated) -> None:
    _, df = evaluated
    uni = df[df["method"] == "uniform"]
    assert (uni["status"] == "ok").all()
    np.testing.assert_allclose(uni["energy_inside"], uni["area_share"], rtol=1e-9)
    np.testing.assert_allclose(uni["lift"], 1.0)
    assert (uni["pointing_hit"] == 0).all()  # a constant map points nowhere
    zero = df[df["method"] == "zero"]
    assert (zero["status"] == EMPTY_MAP).all() and zero["energy_inside"].isna().all()


def test_items_are_the_visible_parts_only(evaluated, fake_cub: CUB) -> None:
    _, df = evaluated
    test_ids = set(fake_cub.split("test")["image_id"])
    assert set(df["image_id"]) == test_ids
    for image_id, sub in df[df["method"] == "uniform"].groupby("image_id"):
        locs = fake_cub.part_locs(int(image_id)).set_index("part")
        hidden = set(locs.index[~locs["visible"].astype(bool)])
        for r in sub.itertuples():
            assert r.part_group != "whole bird"
            assert not set(r.visible_parts.split(";")) & hidden
    # an attribute whose only part is hidden has no row: e.g. a hidden crown means no crown_color rows
    assert (df["part_group"] != "").all()


def test_summary_files_and_run_json(evaluated) -> None:
    out, _ = evaluated
    summary = pd.read_csv(out / "text_eval_summary.csv")
    overall = summary[summary["part_group"] == "all"].set_index("method")
    assert overall.loc["colour", "pointing_game"] > overall.loc["uniform", "pointing_game"] == 0.0
    assert overall.loc["zero", "empty_maps"] == overall.loc["zero", "n_items"]
    md = (out / "text_eval_summary.md").read_text()
    assert "meaningless" in md and "| wings |" in md
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["methods"] == ["colour", "uniform", "zero"]
    assert info["settings"]["base"] == "bird" and info["settings"]["gamma"] == 1.0
    assert set(info["headline"]) == {"colour", "uniform", "zero"}


def test_resume_skips_finished_pairs_and_refuses_other_settings(fake_cub: CUB, tmp_path: Path) -> None:
    loc = ColourLocalizer()
    s = TextEvalSettings(methods=("colour",), limit=2, quiet=True)
    run_text_eval(fake_cub, {"colour": loc}, tmp_path, s)
    n = len(pd.read_csv(tmp_path / "text_eval.csv"))
    calls = loc.calls
    res = run_text_eval(fake_cub, {"colour": loc}, tmp_path, s)
    assert res["counts"] == {"ok": 0, "failed": 0, "skipped": 2} and loc.calls == calls
    assert len(pd.read_csv(tmp_path / "text_eval.csv")) == n
    # a new method in the same folder runs only that method
    s2 = TextEvalSettings(methods=("colour", "uniform"), limit=2, quiet=True)
    res = run_text_eval(fake_cub, {"colour": loc, "uniform": ConstantLocalizer(1.0)}, tmp_path, s2)
    assert res["counts"] == {"ok": 2, "failed": 0, "skipped": 2}
    with pytest.raises(ValueError, match="other settings"):
        run_text_eval(fake_cub, {"colour": loc}, tmp_path, TextEvalSettings(methods=("colour",), limit=2, gamma=0.5))


def test_a_failing_method_is_recorded(fake_cub: CUB, tmp_path: Path) -> None:
    class Broken:
        def explain(self, *a, **k):
            raise RuntimeError("boom")

    s = TextEvalSettings(methods=("broken", "uniform"), limit=1, quiet=True)
    res = run_text_eval(fake_cub, {"broken": Broken(), "uniform": ConstantLocalizer(1.0)}, tmp_path, s)
    assert res["counts"]["failed"] == 1 and res["counts"]["ok"] == 1
    df = pd.read_csv(tmp_path / "text_eval.csv")
    assert df.loc[df["method"] == "broken", "status"].str.contains("boom").all()


def test_cli_end_to_end_every_method(fake_cub: CUB, tiny_clip_config, tiny_clip_weights, tmp_path: Path) -> None:
    from traitloc.cli.commands import main
    from traitloc.engine.methods import TEXT_METHODS

    out = tmp_path / "out"
    rc = main(["evaluate-text", "--cub-root", str(fake_cub.root), "--model", str(tiny_clip_config), "--pretrained",
               str(tiny_clip_weights), "--limit", "1", "--device", "cpu", "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0
    df = pd.read_csv(out / "text_eval.csv")
    assert set(df["method"]) == set(TEXT_METHODS)
    assert df["status"].isin(["ok", EMPTY_MAP]).all()
    summary = pd.read_csv(out / "text_eval_summary.csv")
    assert set(summary.loc[summary["part_group"] == "all", "method"]) == set(TEXT_METHODS)
    info = json.loads((out / "run.json").read_text())
    assert info["pretrained_sha256"] and info["random_weights"] is False
    with pytest.raises(SystemExit, match="2"):
        main(["evaluate-text", "--cub-root", str(fake_cub.root), "--methods", "nope", "--out", str(out)])


def test_cli_bad_input(tmp_path: Path) -> None:
    from traitloc.cli.commands import main

    with pytest.raises(SystemExit):
        main(["evaluate-text", "--cub-root", str(tmp_path), "--methods", "bogus", "--out", str(tmp_path / "o")])
    assert main(["evaluate-text", "--cub-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0


@pytest.mark.skipif(not (SHARED_CUB / "CUB_200_2011").is_dir(), reason="../shared/cub is not present")
def test_real_cub_runs(tiny_clip_config, tiny_clip_weights, tmp_path: Path) -> None:
    """On the real CUB subset (tiny random model: figures meaningless): one photo, two methods."""
    from traitloc.cli.commands import main

    rc = main(["evaluate-text", "--cub-root", str(SHARED_CUB), "--model", str(tiny_clip_config), "--pretrained",
               str(tiny_clip_weights), "--limit", "1", "--methods", "gradcam,clearclip", "--device", "cpu",
               "--quiet", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    df = pd.read_csv(tmp_path / "text_eval.csv")
    assert len(df) > 20 and set(df["method"]) == {"gradcam", "clearclip"}
    assert df["area_share"].between(0, 1).all() and not math.isnan(df["area_share"].mean())
