"""``traitloc localize --ray``: the same store as the local runner, exactly once under actor failures, resumable.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; every run uses the tiny random open_clip ViT
of ``conftest.py`` on CPU actors. Skips cleanly when ray is not installed (``pip install "traitloc[ray]"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from traitloc.cli.commands import main  # noqa: E402
from traitloc.io.store import part_files, read_results  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # a Ray run starts actor processes: 10-30 s each on 2 cores
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]

CONCEPTS = ["red wing", "blue tail", "white belly"]
KEYS = ["image_key", "concept"]


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    """One local Ray instance for the module (the runs reuse it and leave it running)."""
    if ray.is_initialized():  # pragma: no cover - another module's instance
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def images(tmp_path: Path, image_factory: Callable[..., Path]) -> Path:
    """A folder of 7 small photos of different sizes and one file that does not decode."""
    folder = tmp_path / "images"
    for i in range(7):
        image_factory(f"bird{i}.png", (40 + 6 * i, 64 - 3 * i), folder=folder, seed=100 + i)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def model_args(cfg: Path, weights: Path) -> list[str]:
    return ["--model", str(cfg), "--pretrained", str(weights), "--device", "cpu"]


def localize(capsys: Any, folder: Path, out: Path, margs: list[str], *extra: str, concepts=CONCEPTS) -> int:
    argv = ["localize", str(folder), *[a for c in concepts for a in ("--concept", c)], "--base", "bird"]
    rc = main([*argv, "--batch-size", "2", "--out", str(out), "--quiet", *margs, *extra])
    capsys.readouterr()
    return rc


def raw_store(out: Path) -> Any:
    """Every stored row, duplicates included (no dedupe on read)."""
    return read_results(out, dedupe=False)


def assert_same_store(a: Path, b: Path) -> None:
    """Same keys (each once), same status, scores and grid maps within 1e-6."""
    da, db = raw_store(a), raw_store(b)
    assert not da.duplicated(KEYS).any() and not db.duplicated(KEYS).any()
    da, db = (d.sort_values(KEYS).reset_index(drop=True) for d in (da, db))
    assert da[KEYS].equals(db[KEYS])
    assert list(da["status"]) == list(db["status"])
    ok = da["status"] == "ok"
    for col in ("score", "concept_score", "base_score", "raw_max"):
        np.testing.assert_allclose(da.loc[ok, col].to_numpy(float), db.loc[ok, col].to_numpy(float), atol=1e-6)
    for ga, gb in zip(da.loc[ok, "grid"], db.loc[ok, "grid"], strict=True):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-6, rtol=0)


def test_ray_store_equals_local_store(
    tmp_path: Path, images: Path, tiny_clip_config: Path, tiny_clip_weights: Path, capsys: Any
) -> None:
    margs = model_args(tiny_clip_config, tiny_clip_weights)
    assert localize(capsys, images, tmp_path / "local", margs, "--save", "maps") == 0
    assert localize(capsys, images, tmp_path / "ray", margs, "--save", "maps", "--ray", "--ray-actors", "2") == 0
    assert_same_store(tmp_path / "local", tmp_path / "ray")
    # --save files are written by the actors, beside the store, as the local runner writes them
    from traitloc.io.files import read_map_tiff

    local_maps = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "maps").rglob("*.tif"))
    ray_maps = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray" / "maps").rglob("*.tif"))
    assert local_maps == ray_maps and len(ray_maps) == 7 * len(CONCEPTS)
    for rel in ray_maps[:3]:
        # unit maps (map / max): float32 sums in another thread layout (the actor's torch threads) differ by a few
        # ulps, so relative 1e-5 here; the store's raw grids above are held to 1e-6
        np.testing.assert_allclose(
            read_map_tiff(tmp_path / "ray" / rel)[0], read_map_tiff(tmp_path / "local" / rel)[0], rtol=1e-5, atol=1e-6
        )
    df = raw_store(tmp_path / "ray")
    assert len(df) == 8 * len(CONCEPTS)
    bad = df[df["image_key"] == "broken"]
    assert len(bad) == len(CONCEPTS) and bad["status"].str.startswith("error: ").all()
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["counts"] == {"ok": 7, "failed": 1, "skipped": 0}
    assert info["ray"]["actors"] == 2 and info["ray"]["nodes"] == 1 and info["ray"]["cpus"] == 2
    assert info["ray"]["gpus"] == 0 and info["device"] == "cpu"
    assert info["store_rows_written"] == 8 * len(CONCEPTS) and info["duplicate_rows_removed"] == 0
    # one part per batch of 2 images; the spreadsheet summary lists every row once
    assert len(part_files(tmp_path / "ray")) == 4
    csv_lines = (tmp_path / "ray" / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 8 * len(CONCEPTS)


def test_killed_actor_is_restarted_and_the_store_has_every_key_once(
    tmp_path: Path, images: Path, tiny_clip_config: Path, tiny_clip_weights: Path, capsys: Any
) -> None:
    """An actor killed (SIGKILL) right after writing its batch's part: the batch is retried, its part replaced."""
    from traitloc.data.images import find_images, image_keys
    from traitloc.pipelines.distributed import FAULT_ENV, LocalizeSpec, run_job_ray
    from traitloc.pipelines.localize import LocalizeSettings

    margs = model_args(tiny_clip_config, tiny_clip_weights)
    assert localize(capsys, images, tmp_path / "local", margs) == 0
    out = tmp_path / "killed"
    marker = tmp_path / "killed-once"
    settings = LocalizeSettings(concepts=CONCEPTS, traits=[None] * 3, base="bird", gamma=1.0, batch_size=2, quiet=True)
    local_info = json.loads((tmp_path / "local" / "run.json").read_text())
    run_info = {k: local_info[k] for k in ("model", "pretrained", "pretrained_sha256", "start_utc")}
    spec = LocalizeSpec(
        model=str(tiny_clip_config), pretrained=str(tiny_clip_weights), settings=settings, run_info=run_info,
        out=str(out),
    )  # fmt: skip
    paths = find_images([images])
    keys = image_keys(paths)
    counts = run_job_ray(
        spec, paths, out, dict(run_info), keys=keys, actors=1, batch_size=2, quiet=True,
        remote_args={"runtime_env": {"env_vars": {FAULT_ENV: f"after-write:{marker}"}}},
    )  # fmt: skip
    assert marker.exists(), "the fault was not injected: the test proves nothing"
    assert counts == {"ok": 7, "failed": 1, "skipped": 0}
    assert_same_store(tmp_path / "local", out)  # every (image, concept) exactly once, the same maps
    assert not [p for p in (out / "results").iterdir() if p.name.startswith(".")]  # no temporary files left
    info = json.loads((out / "run.json").read_text())
    # the retried batch replaced its own part (same name): nothing to clean up afterwards
    assert info["orphan_parts_removed"] == 0 and info["duplicate_rows_removed"] == 0


def test_rerun_after_a_killed_driver_does_only_the_rest(
    tmp_path: Path, images: Path, tiny_clip_config: Path, tiny_clip_weights: Path, capsys: Any
) -> None:
    """Parts lost (a driver killed mid-run) are recomputed, and only they; a new concept adds only its rows."""
    import pyarrow.parquet as pq

    margs = model_args(tiny_clip_config, tiny_clip_weights)
    out = tmp_path / "ray"
    assert localize(capsys, images, out, margs, "--ray", "--concept", "black crown") == 0
    parts = part_files(out)
    assert len(parts) == 4
    lost = parts[1:3]
    all_keys = set(raw_store(out)[KEYS].itertuples(index=False, name=None))
    kept = {p: p.stat().st_mtime_ns for p in parts if p not in lost}
    lost_rows = {
        tuple(r) for p in lost for r in pq.read_table(p, columns=KEYS).to_pandas().itertuples(index=False, name=None)
    }
    for p in lost:
        p.unlink()
    info = json.loads((out / "run.json").read_text())
    info["status"] = "running"  # as a killed driver leaves it
    (out / "run.json").write_text(json.dumps(info))

    assert localize(capsys, images, out, margs, "--ray", "--concept", "black crown") == 0
    info = json.loads((out / "run.json").read_text())
    assert info["n_items_todo"] == 4 and info["counts"]["skipped"] == 4
    assert info["store_rows_written"] == len(lost_rows) == 4 * 4
    assert len(info["previous_runs"]) == 1 and info["previous_runs"][0]["status"] == "running"
    assert all(p.exists() and p.stat().st_mtime_ns == t for p, t in kept.items())  # finished parts untouched
    df = raw_store(out)
    assert not df.duplicated(KEYS).any()
    assert set(df[KEYS].itertuples(index=False, name=None)) == all_keys and len(all_keys) == 8 * 4

    # a new concept: only its 8 rows are computed, the 32 stored rows stay as they are
    assert localize(capsys, images, out, margs, "--ray", "--concept", "black crown", "--concept", "long bill") == 0
    info = json.loads((out / "run.json").read_text())
    assert info["n_items_todo"] == 8 and info["store_rows_written"] == 8
    df = raw_store(out)
    assert len(df) == 8 * 5 and not df.duplicated(KEYS).any()
    assert (df["concept"] == "long bill").sum() == 8


def test_explain_on_ray_equals_local(
    tmp_path: Path, image_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``traitloc explain --ray``: a classifier given as MODULE:FUNCTION (imported from the working directory in
    every actor, as on the driver) writes the same store as the local runner."""
    monkeypatch.chdir(Path(__file__).parent)  # tiny_backbones.py: importable from the working directory
    folder = tmp_path / "images"
    for s in range(5):
        image_factory(f"i{s}.png", size=(48 + 4 * s, 40), folder=folder, seed=s)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    base = ["explain", str(folder), "--classifier", "tiny_backbones:tiny_vit_classifier", "--device", "cpu"]
    base += ["--batch-size", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--out", str(tmp_path / "ray"), "--ray", "--ray-actors", "2"]) == 0
    capsys.readouterr()
    keys = ["image_key", "target_spec", "reference_spec"]
    da, db = (raw_store(tmp_path / d).sort_values(keys).reset_index(drop=True) for d in ("local", "ray"))
    assert len(da) == 6 and not db.duplicated(keys).any()
    assert da[keys].equals(db[keys]) and list(da["status"]) == list(db["status"])
    assert list(da["target"]) == list(db["target"]) and list(da["references"]) == list(db["references"])
    ok = da["status"] == "ok"
    assert ok.sum() == 5
    np.testing.assert_allclose(da.loc[ok, "score"].to_numpy(float), db.loc[ok, "score"].to_numpy(float), atol=1e-6)
    for ga, gb in zip(da.loc[ok, "grid"], db.loc[ok, "grid"], strict=True):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-6, rtol=0)
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert info["counts"] == {"ok": 5, "failed": 1, "skipped": 0} and info["ray"]["actors"] == 2
