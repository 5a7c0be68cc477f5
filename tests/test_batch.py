"""One output folder holds one set of map settings: a rerun with other settings is refused, not mixed in."""

from __future__ import annotations

from traitloc.cli.commands import main

# The localize refusal (gamma, base, method, model weights, templates, resize, grid dtype) is tested through the store
# in tests/test_cli_localize.py::test_a_folder_made_with_other_settings_is_refused, and split_on_oom with the runner
# in tests/test_pipeline.py.


def test_explain_rerun_with_other_gamma_is_refused(tmp_path, image_factory, capsys):
    img = image_factory("b.png", size=(48, 40))
    out = tmp_path / "ex"
    args = ["explain", str(img), "--classifier", "tiny_backbones:tiny_cnn_classifier", "--device", "cpu",
            "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    parts = sorted((out / "results").glob("part-*.parquet"))
    before = [m.read_bytes() for m in parts]
    assert len(parts) == 1
    assert main([*args, "--gamma", "1.5"]) == 2
    assert "gamma=0.6 (now 1.5)" in capsys.readouterr().err  # gamma is a number in every command's settings
    assert sorted((out / "results").glob("part-*.parquet")) == parts and [m.read_bytes() for m in parts] == before
    assert main(args) == 0  # same settings: resumes (nothing to do)
    assert sorted((out / "results").glob("part-*.parquet")) == parts
