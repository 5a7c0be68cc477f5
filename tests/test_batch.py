"""One output folder holds one set of map settings: a rerun with other settings is refused, not mixed in."""

from __future__ import annotations

import json

from traitloc.batch import split_on_oom
from traitloc.cli import main


def _run(img, cfg, weights, out, *extra):
    return main(["localize", str(img), "--concept", "red wing", "--base", "bird", "--model", str(cfg),
                 "--pretrained", str(weights), "--out", str(out), "--quiet", *extra])  # fmt: skip


def test_rerun_with_other_settings_is_refused(tmp_path, image_factory, tiny_clip_config, tiny_clip_weights, capsys):
    img = image_factory("a.png", size=(80, 60))
    out = tmp_path / "out"
    assert _run(img, tiny_clip_config, tiny_clip_weights, out) == 0
    before = (out / "maps" / "a" / "red-wing.tif").read_bytes()
    assert _run(img, tiny_clip_config, tiny_clip_weights, out, "--gamma", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gamma=1.0 (now 0.5)" in err[0]
    assert (out / "maps" / "a" / "red-wing.tif").read_bytes() == before  # nothing overwritten
    assert _run(img, tiny_clip_config, tiny_clip_weights, out, "--method", "layercam") == 2
    # same settings, a new concept: fine, added beside the first
    assert _run(img, tiny_clip_config, tiny_clip_weights, out, "--concept", "blue tail") == 0
    assert (out / "maps" / "a" / "blue-tail.tif").exists()
    assert json.loads((out / "run.json").read_text())["gamma"] == 1.0


def test_split_on_oom_halves_batches():
    import torch

    calls = []

    def fn(items):
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return [i * 10 for i in items]

    assert split_on_oom(fn, list(range(7))) == [i * 10 for i in range(7)]
    assert calls[0] == 7 and sum(c for c in calls if c <= 2) == 7  # every item ran once, in a batch that fit


def test_explain_rerun_with_other_gamma_is_refused(tmp_path, image_factory, capsys):
    img = image_factory("b.png", size=(48, 40))
    out = tmp_path / "ex"
    args = ["explain", str(img), "--classifier", "tiny_backbones:tiny_cnn_classifier", "--device", "cpu",
            "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    maps = sorted((out / "maps").rglob("*.tif"))
    before = [m.read_bytes() for m in maps]
    assert main([*args, "--gamma", "1.5"]) == 2
    assert "gamma='0.6' (now '1.5')" in capsys.readouterr().err
    assert [m.read_bytes() for m in maps] == before
    assert main(args) == 0  # same settings: resumes (nothing to do)
