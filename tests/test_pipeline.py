"""The pipeline runner (traitloc.pipelines.runner) with a fake job: no model, no images, just the runner's contract.

Per-item errors, a failing batch retried item by item, CUDA out-of-memory splitting, resume, settings refusal,
run.json (status, counts, previous runs) and the CSV summary (equal to the store after a run).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from traitloc.data.images import ImageLoadError
from traitloc.io.store import grid_of, read_results, results_dir, rows_of
from traitloc.pipelines.runner import (
    STALE_PART_SECONDS,
    Job,
    SettingsMismatchError,
    prefetched,
    refuse_other_settings,
    remove_stale_temp_files,
    run_job,
    split_on_oom,
)

CONCEPTS = ("red wing", "bill")


class FakeJob(Job):
    """Items are strings; ``bad*`` fail to load, ``poison*`` make any batch holding them raise, ``refuse*`` come back
    as a per-item error string; batches larger than ``oom_over`` raise a (fake) CUDA out-of-memory error."""

    name = "fake"
    columns = {"concept": "str", "score": "float", "n": "int"}
    key_columns = ("image_key", "concept")
    csv_columns = ("image", "image_key", "concept", "score", "n", "status")
    csv_name = "results.csv"

    def __init__(
        self,
        concepts: tuple[str, ...] = CONCEPTS,
        oom_over: int | None = None,
        settings: dict[str, Any] | None = None,
        interrupt_at: str | None = None,
    ) -> None:
        self.concepts = concepts
        self.oom_over = oom_over
        self.map_settings = settings or {"gamma": 1.0, "method": "gradcam"}
        self.interrupt_at = interrupt_at
        self.calls: list[list[str]] = []
        self.loaded: list[str] = []

    def item_keys(self, item: str) -> list[tuple[Any, ...]]:
        return [(item, c) for c in self.concepts]

    def load(self, item: str) -> Any:
        self.loaded.append(item)
        if item.startswith("bad"):
            return ImageLoadError(Path(item), "cannot identify image file")
        return {"pixels": len(item)}

    def compute(self, batch: list[tuple[str, Any]]) -> list[list[dict[str, Any]] | str]:
        items = [it for it, _ in batch]
        self.calls.append(items)
        if self.interrupt_at in items:
            raise KeyboardInterrupt
        if self.oom_over is not None and len(batch) > self.oom_over:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        if any(it.startswith("poison") for it in items):
            raise RuntimeError("a batch with a poisoned item\nsecond line of the traceback")
        out: list[list[dict[str, Any]] | str] = []
        for it, loaded in batch:
            if it.startswith("refuse"):
                out.append("the map is not finite (NaN or infinite values)")
                continue
            out.append([self._row(it, c, status="ok", score=_score(it, c), n=loaded["pixels"], grid=_grid(it))
                        for c in self.concepts])  # fmt: skip
        return out

    def _row(self, item: str, concept: str, **kw: Any) -> dict[str, Any]:
        return {"image": f"/photos/{item}.jpg", "image_key": item, "concept": concept, "grid_h": 2, "grid_w": 3,
                "width": 30, "height": 20, **kw}  # fmt: skip

    def error_rows(self, item: str, reason: str) -> list[dict[str, Any]]:
        return [self._row(item, c, status=f"error: {reason}", width=None, height=None) for c in self.concepts]

    def run_info(self) -> dict[str, Any]:
        return {"prompts": list(self.concepts)}


def _score(item: str, concept: str) -> float:
    return round(len(item) + 0.25 * len(concept), 4)


def _grid(item: str) -> np.ndarray:
    return np.arange(6, dtype=np.float32).reshape(2, 3) * len(item)


def _run(job: FakeJob, items: list[str], out: Path, batch_size: int = 3, **info: Any) -> dict[str, int]:
    return run_job(job, items, out, {"argv": ["fake", *items], **info}, batch_size=batch_size, quiet=True)


def _store(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = list(rows_of(read_results(out, dedupe=False)))
    keys = [(r["image_key"], r["concept"]) for r in rows]
    assert len(keys) == len(set(keys)), "a key stored twice"
    return dict(zip(keys, rows, strict=True))


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _info(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def _assert_csv_equals_store(out: Path) -> None:
    store = _store(out)
    rows = _csv(out)
    assert list(rows[0]) == list(FakeJob.csv_columns)
    assert len(rows) == len(store)
    for r in rows:
        s = store[(r["image_key"], r["concept"])]
        assert r["status"] == s["status"] and r["image"] == s["image"]
        if s["status"] == "ok":
            assert float(r["score"]) == s["score"] and int(r["n"]) == s["n"]
        else:
            assert r["score"] == "" and r["n"] == ""


# ------------------------------------------------------------------------------------------------------------------
# a run
# ------------------------------------------------------------------------------------------------------------------
def test_a_run_writes_one_part_per_batch_the_csv_and_run_json(tmp_path: Path) -> None:
    items = [f"im{i}" for i in range(7)]
    job = FakeJob()
    counts = _run(job, items, tmp_path, batch_size=3, model="fake-model")
    assert counts == {"ok": 7, "failed": 0, "skipped": 0}
    assert job.calls == [items[0:3], items[3:6], items[6:7]]
    assert len(list(results_dir(tmp_path).glob("part-*.parquet"))) == 3
    store = _store(tmp_path)
    assert set(store) == {(i, c) for i in items for c in CONCEPTS}
    for (item, concept), row in store.items():
        assert row["status"] == "ok" and row["score"] == _score(item, concept)
        np.testing.assert_array_equal(grid_of(row), _grid(item))
        assert row["result_id"] == f"{item}/{concept.replace(' ', '-')}"
    _assert_csv_equals_store(tmp_path)
    info = _info(tmp_path)
    assert info["status"] == "finished" and info["counts"] == counts
    assert info["model"] == "fake-model" and info["prompts"] == list(CONCEPTS)
    assert info["map_settings"] == job.map_settings
    assert info["store"]["path"] == "results/" and info["store"]["keys"] == ["image_key", "concept"]
    assert (info["n_items"], info["n_items_todo"], info["n_items_skipped_done"]) == (7, 7, 0)
    assert info["store_parts_written"] == 3 and info["store_bytes_written"] > 0
    assert info["start_utc"] <= info["end_utc"]
    assert {"compute_s", "write_s"} <= set(info["timing"])
    assert "previous_runs" not in info
    assert not [p for p in tmp_path.rglob(".*")]


def test_per_item_errors_are_recorded_while_the_batch_goes_on(tmp_path: Path) -> None:
    items = ["im0", "bad1", "im2", "refuse3", "im4"]
    job = FakeJob()
    counts = _run(job, items, tmp_path, batch_size=5)
    assert counts == {"ok": 3, "failed": 2, "skipped": 0}
    assert job.calls == [["im0", "im2", "refuse3", "im4"]]  # the undecodable item never reaches compute
    store = _store(tmp_path)
    assert len(store) == 5 * len(CONCEPTS)
    for c in CONCEPTS:
        assert store[("bad1", c)]["status"] == "error: cannot identify image file"
        assert store[("refuse3", c)]["status"] == "error: the map is not finite (NaN or infinite values)"
        assert store[("im4", c)]["status"] == "ok"
        assert store[("bad1", c)]["grid"] is None and store[("bad1", c)]["width"] is pd_na()
    df = read_results(tmp_path)
    assert str(df["width"].dtype) == "Int64" and str(df["n"].dtype) == "Int64"  # ints stay ints beside errors
    _assert_csv_equals_store(tmp_path)
    assert _info(tmp_path)["status"] == "finished"


def pd_na() -> Any:
    import pandas as pd

    return pd.NA


def test_a_batch_failing_with_a_generic_error_is_retried_item_by_item(tmp_path: Path) -> None:
    items = ["im0", "poison1", "im2", "im3"]
    job = FakeJob()
    counts = _run(job, items, tmp_path, batch_size=4)
    assert job.calls == [items, ["im0"], ["poison1"], ["im2"], ["im3"]]
    assert counts == {"ok": 3, "failed": 1, "skipped": 0}
    store = _store(tmp_path)
    for c in CONCEPTS:
        # the first line of the error only (a status is one line)
        assert store[("poison1", c)]["status"] == "error: RuntimeError: a batch with a poisoned item"
        assert all(store[(i, c)]["status"] == "ok" for i in ("im0", "im2", "im3"))
    _assert_csv_equals_store(tmp_path)


def test_cuda_out_of_memory_splits_the_batch(tmp_path: Path) -> None:
    items = [f"im{i}" for i in range(5)]
    job = FakeJob(oom_over=1)
    counts = _run(job, items, tmp_path, batch_size=5)
    assert counts == {"ok": 5, "failed": 0, "skipped": 0}
    sizes = [len(c) for c in job.calls]
    assert sizes[0] == 5 and max(sizes[1:]) <= 5 // 2 + 1
    assert sorted(c[0] for c in job.calls if len(c) == 1) == items  # each item computed once in a batch that fit
    assert len(_store(tmp_path)) == 5 * len(CONCEPTS)
    # a single item that does not fit becomes that item's error; the run goes on
    job = FakeJob(oom_over=0)
    out = tmp_path / "all_oom"
    assert _run(job, ["im0", "im1"], out) == {"ok": 0, "failed": 2, "skipped": 0}
    assert {r["status"] for r in _store(out).values()} == {
        "error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (fake)"
    }


def test_split_on_oom_halves_batches() -> None:
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return [i * 10 for i in items]

    assert split_on_oom(fn, list(range(7))) == [i * 10 for i in range(7)]
    assert calls[0] == 7 and sum(c for c in calls if c <= 2) == 7  # every item ran once, in a batch that fit

    def never(items: list[int]) -> list[int]:
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        split_on_oom(never, [1])
    with pytest.raises(ValueError, match="other"):  # other errors are not split
        split_on_oom(lambda items: (_ for _ in ()).throw(ValueError("other")), [1, 2, 3])


def test_prefetched_batches_keep_order_and_return_load_errors() -> None:
    loaded: list[int] = []

    def load(i: int) -> Any:
        loaded.append(i)
        return ImageLoadError(Path(f"{i}.png"), "broken") if i == 3 else i * i

    seen = []
    for chunk in prefetched(list(range(8)), 3, load):
        seen.append([i for i, _ in chunk])
        assert all(isinstance(v, ImageLoadError) if i == 3 else v == i * i for i, v in chunk)
        # the next batch is being decoded while this one is used, never more
        assert len(loaded) <= min(8, (len(seen) + 1) * 3)
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(prefetched([], 3, load)) == []


# ------------------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------------------
def test_resume_skips_done_keys_and_accumulates_previous_runs(tmp_path: Path) -> None:
    first = [f"im{i}" for i in range(4)]
    assert _run(FakeJob(), first, tmp_path, start_utc="2026-01-01T00:00:00Z")["ok"] == 4
    parts = sorted(results_dir(tmp_path).glob("part-*.parquet"))

    job = FakeJob()
    counts = _run(job, first, tmp_path)
    assert counts == {"ok": 0, "failed": 0, "skipped": 4}
    assert job.calls == [] and job.loaded == []  # nothing decoded, nothing computed
    assert sorted(results_dir(tmp_path).glob("part-*.parquet")) == parts
    info = _info(tmp_path)
    assert (info["n_items_todo"], info["n_items_skipped_done"]) == (0, 4)
    assert [r["argv"] for r in info["previous_runs"]] == [["fake", *first]]
    assert info["previous_runs"][0]["status"] == "finished"
    assert info["previous_runs"][0]["start_utc"] == "2026-01-01T00:00:00Z"

    # new items and a new concept: only the missing keys are computed and stored
    more = [*first, "im4", "im5"]
    job = FakeJob(concepts=(*CONCEPTS, "eye ring"))
    counts = _run(job, more, tmp_path, batch_size=10)
    assert counts == {"ok": 6, "failed": 0, "skipped": 0}
    assert job.calls == [more]
    store = _store(tmp_path)  # asserts that no key was stored twice
    assert set(store) == {(i, c) for i in more for c in (*CONCEPTS, "eye ring")}
    info = _info(tmp_path)
    assert len(info["previous_runs"]) == 2 and info["previous_runs"][1]["counts"]["skipped"] == 4
    _assert_csv_equals_store(tmp_path)


def test_an_interrupted_run_is_recorded_and_resumes(tmp_path: Path) -> None:
    items = [f"im{i}" for i in range(6)]
    job = FakeJob(interrupt_at="im4")
    with pytest.raises(KeyboardInterrupt):
        _run(job, items, tmp_path, batch_size=2)
    info = _info(tmp_path)
    assert info["status"] == "interrupted" and info["end_utc"]
    assert info["counts"]["ok"] == 4
    assert {k[0] for k in _store(tmp_path)} == {"im0", "im1", "im2", "im3"}
    _assert_csv_equals_store(tmp_path)  # rewritten from the store on the way out

    job = FakeJob()
    assert _run(job, items, tmp_path, batch_size=2) == {"ok": 2, "failed": 0, "skipped": 4}
    assert job.calls == [["im4", "im5"]]
    info = _info(tmp_path)
    assert info["status"] == "finished" and info["previous_runs"][-1]["status"] == "interrupted"
    assert len(_store(tmp_path)) == 6 * len(CONCEPTS)
    _assert_csv_equals_store(tmp_path)


def test_a_lost_or_damaged_csv_summary_is_rebuilt_from_the_store(tmp_path: Path) -> None:
    items = [f"im{i}" for i in range(3)]
    _run(FakeJob(), items, tmp_path)
    (tmp_path / "results.csv").write_text("not,the,columns\n1,2,3\n")
    _run(FakeJob(), items, tmp_path)
    _assert_csv_equals_store(tmp_path)
    (tmp_path / "results.csv").unlink()
    _run(FakeJob(), [*items, "im3"], tmp_path)
    _assert_csv_equals_store(tmp_path)
    assert len(_csv(tmp_path)) == 4 * len(CONCEPTS)


def test_other_settings_are_refused(tmp_path: Path) -> None:
    _run(FakeJob(settings={"gamma": 1.0, "method": "gradcam"}), ["im0"], tmp_path)
    before = sorted(p.name for p in results_dir(tmp_path).iterdir())
    with pytest.raises(SettingsMismatchError, match=r"gamma=1.0 \(now 0.5\)") as exc:
        _run(FakeJob(settings={"gamma": 0.5, "method": "gradcam"}), ["im0", "im1"], tmp_path)
    assert "\n" not in str(exc.value) and "new --out folder" in str(exc.value)
    with pytest.raises(SettingsMismatchError, match="method='gradcam' \\(now 'layercam'\\)"):
        _run(FakeJob(settings={"gamma": 1.0, "method": "layercam"}), ["im1"], tmp_path)
    assert sorted(p.name for p in results_dir(tmp_path).iterdir()) == before  # nothing written
    assert _info(tmp_path)["status"] == "finished"  # the refused runs did not touch run.json
    # the same settings (and a setting the folder did not record): resumes
    assert _run(FakeJob(settings={"gamma": 1.0, "method": "gradcam", "new": 1}), ["im0", "im1"], tmp_path)["ok"] == 1


def test_an_unreadable_run_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{ not json")
    with pytest.raises(SettingsMismatchError, match="unreadable"):
        refuse_other_settings(tmp_path / "run.json", {"gamma": 1.0})
    assert refuse_other_settings(tmp_path / "nothing.json", {"gamma": 1.0}) is None


def test_stale_temporary_files_are_removed_but_a_live_writers_part_is_kept(tmp_path: Path) -> None:
    res = results_dir(tmp_path)
    res.mkdir(parents=True)
    old_part = res / ".part-20260101T000000-h-1-00000000.0123456789ab.tmp"
    live_part = res / ".part-20260101T000001-h-2-00000000.0123456789ac.tmp"
    old_map = tmp_path / "maps" / "im0" / ".red-wing.0123456789ab.tmp.tif"
    old_map.parent.mkdir(parents=True)
    keep = tmp_path / "maps" / "im0" / ".notes"  # not a temporary name: left alone
    for p in (old_part, live_part, old_map, keep):
        p.write_bytes(b"partial")
    past = time.time() - STALE_PART_SECONDS - 60
    os.utime(old_part, (past, past))
    assert remove_stale_temp_files(tmp_path) == 2
    assert not old_part.exists() and not old_map.exists() and live_part.exists() and keep.exists()


def test_a_job_must_say_what_an_item_is() -> None:
    job = Job()
    with pytest.raises(NotImplementedError):
        job.item_keys("x")
    with pytest.raises(NotImplementedError):
        job.compute([])
    with pytest.raises(NotImplementedError):
        job.error_rows("x", "why")
