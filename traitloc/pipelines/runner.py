"""One resumable runner under every command that walks a list of images: localize, explain, evaluate, audit.

A command is a small :class:`Job` (what an item is, how to decode it, how a batch becomes rows, which columns
the rows have); :func:`run_job` does the rest, the same way for all of them:

- images decoded one batch ahead in a background thread (:func:`prefetched`), never all held in memory;
- a batch that runs out of GPU memory is split in halves (:func:`split_on_oom`); a batch that fails otherwise is
  retried image by image, and an image that still fails becomes rows with ``status = "error: <reason>"`` while the
  run goes on;
- one Parquet part per batch in the run's results store (:class:`traitloc.io.store.ResultStore`), written
  atomically; ``results.csv`` (the spreadsheet summary) appended after each part and rewritten from the store at
  the end, so a run killed at any moment resumes: a rerun skips every key already in the store;
- a rerun with other map settings into the same folder is refused (:func:`refuse_other_settings`);
- ``run.json`` provenance, with the earlier runs of a resumed folder under ``previous_runs``;
- a progress bar (``quiet`` silences it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from traitloc.data.images import ImageLoadError, LoadedImage, load_image
from traitloc.io.files import is_temp_name, utc_now, write_run_json
from traitloc.io.store import ResultStore, read_results, results_dir

__all__ = [
    "CsvSpec",
    "Job",
    "SettingsMismatchError",
    "bool_text",
    "prefetched",
    "progress",
    "refuse_other_settings",
    "remove_stale_temp_files",
    "run_job",
    "finish_info",
    "split_on_oom",
    "start_info",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
def split_on_oom(fn: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """Run ``fn(items)``; on CUDA out-of-memory, split the batch in halves and retry (down to one item)."""
    try:
        return fn(items)
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("CUDA out of memory for a batch of %d images: splitting it", len(items))
        return split_on_oom(fn, items[:half]) + split_on_oom(fn, items[half:])


def progress(total: int, quiet: bool, desc: str) -> Any:
    """A tqdm progress bar on stderr (disabled when ``quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def load_or_error(path: Path) -> LoadedImage | ImageLoadError:
    """Decode an image; any failure comes back as an :class:`ImageLoadError` (never raised)."""
    try:
        return load_image(path)
    except ImageLoadError as err:
        return err
    except Exception as err:  # noqa: BLE001 - any decoder failure is a per-image error, never fatal
        return ImageLoadError(path, f"{type(err).__name__}: {err}")


def prefetched(
    items: Sequence[Any], batch: int, load: Callable[[Any], Any] | None = None
) -> Iterator[list[tuple[Any, Any]]]:
    """Batches of ``(item, load(item))``; the next batch loads in a background thread while this one computes.

    ``load`` defaults to decoding an image path (a failure is returned as an :class:`ImageLoadError`, never raised).
    """
    fn = load or load_or_error
    chunks = [list(items[i : i + batch]) for i in range(0, len(items), batch)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(lambda c: [(p, fn(p)) for p in c], chunks[0])
        for i in range(len(chunks)):
            cur = fut.result()
            if i + 1 < len(chunks):
                fut = pool.submit(lambda c: [(p, fn(p)) for p in c], chunks[i + 1])
            yield cur


#: a temporary store part younger than this may belong to a writer that is still running (several writers
#: may share one store), so it is left alone
STALE_PART_SECONDS = 3600.0


def remove_stale_temp_files(out: Path) -> int:
    """Delete temporary files that a killed run left behind in ``out`` (its output folders and top level).

    A run killed during an atomic write leaves a hidden ``.name.xxxxxxxxxxxx.tmp.ext`` file; the final file is
    never partial (and readers skip hidden files), but the temporary one stays unless removed. Temporary store
    parts are removed only when older than :data:`STALE_PART_SECONDS`. Returns the number of files removed.
    """
    n = 0
    now = time.time()
    tops = [out, results_dir(out)] + [out / d for d in ("maps", "masks", "overlays", "signed")]
    for top in tops:
        if not top.is_dir():
            continue
        recursive = top not in (out, results_dir(out))
        for path in top.rglob(".*") if recursive else top.glob(".*"):
            if not (path.is_file() and is_temp_name(path.name)):
                continue
            try:
                if top == results_dir(out) and now - path.stat().st_mtime < STALE_PART_SECONDS:
                    continue
                path.unlink()
                n += 1
            except OSError as err:
                log.warning("could not remove a stale temporary file %s: %s", path, err)
    return n


class SettingsMismatchError(ValueError):
    """An output folder holds results made with other settings."""


def refuse_other_settings(run_json: Path, new: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse to mix runs with different map settings in one output folder; returns the earlier run.json.

    A store's keys name the image and the concept or target, not gamma/base/method/model..., so a second run
    with other ``new`` settings would mix incomparable maps under one key. New images or concepts are fine.
    The settings are kept in run.json under ``map_settings``.
    """
    if not run_json.exists():
        return None
    try:
        old = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SettingsMismatchError(f"{run_json} is unreadable ({err}); use a new --out folder") from err
    before = old.get("map_settings", {})
    diff = [f"{k}={before[k]!r} (now {v!r})" for k, v in new.items() if k in before and before[k] != v]
    if diff:
        raise SettingsMismatchError(
            f"{run_json.parent} holds results made with {', '.join(diff)}; rerun with the same settings to "
            f"resume, or choose a new --out folder"
        )
    return old


def previous_runs(old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The ``previous_runs`` list of a resumed folder's run.json: the earlier runs, oldest first."""
    if not old:
        return []
    keep = ("argv", "start_utc", "end_utc", "status", "counts", "truncated_prompts")
    return [*old.get("previous_runs", []), {k: old.get(k) for k in keep}]


def first_line(text: str) -> str:
    """The first line of a message ("" for none): error reasons are stored as one line."""
    lines = str(text).splitlines()
    return lines[0] if lines else ""


# --------------------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsvSpec:
    """One spreadsheet summary of a job's store: a CSV appended per batch and rewritten from the store at the end.

    Attributes
    ----------
    name : file name in the run folder (e.g. ``results.csv``).
    columns : its columns, in order (made by :meth:`Job.csv_row` and :meth:`Job.csv_frame` from the store rows).
    key_columns : the CSV's row keys (a row appended again for a key replaces the earlier one).
    where : only the store rows whose columns have these values (None: every row).
    """

    name: str
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    where: Mapping[str, Any] | None = None

    def selects(self, row: Mapping[str, Any]) -> bool:
        """Whether a store row belongs in this summary (its columns match :attr:`where`)."""
        return self.where is None or all(row.get(k) == v for k, v in self.where.items())


class Job:
    """What a command does with a batch of items; :func:`run_job` does the rest.

    Subclasses set :attr:`name`, :attr:`columns` (store columns beyond
    :data:`traitloc.io.store.BASE_COLUMNS`), :attr:`key_columns`, :attr:`map_settings` and implement
    :meth:`item_keys`, :meth:`compute` and :meth:`error_rows`. An item is usually an image path.
    """

    name: str = "job"
    columns: dict[str, str] = {}
    key_columns: tuple[str, ...] = ("image_key",)
    #: columns of the spreadsheet summary ``results.csv`` (empty: no summary)
    csv_columns: tuple[str, ...] = ()
    csv_name: str = "results.csv"
    #: settings that must match for a folder to be resumed (kept in run.json)
    map_settings: dict[str, Any] = {}
    grid_dtype: str = "float32"
    #: a rerun recomputes the items whose stored rows have ``status = "error: ..."`` (the new rows replace them)
    retry_errors: bool = False
    #: keys already in the store, set by the runner before the first batch (a job may skip work for them)
    done_keys: set[tuple[Any, ...]] = frozenset()  # type: ignore[assignment]

    def item_keys(self, item: Any) -> list[tuple[Any, ...]]:
        """The store keys (values of :attr:`key_columns`) that ``item`` produces."""
        raise NotImplementedError

    def load(self, item: Any) -> Any:
        """Decode an item (runs in the prefetch thread); return an :class:`ImageLoadError` on failure."""
        return load_or_error(Path(item))

    def compute(self, batch: list[tuple[Any, Any]]) -> list[list[dict[str, Any]] | str]:
        """Rows of each ``(item, loaded)`` of a batch, or the reason (str) an item failed.

        May raise: the runner splits the batch on CUDA out-of-memory and otherwise retries item by item.
        """
        raise NotImplementedError

    def error_rows(self, item: Any, reason: str) -> list[dict[str, Any]]:
        """Rows that record that ``item`` failed (``status = "error: ..."``)."""
        raise NotImplementedError

    def finish(self, rows: list[dict[str, Any]], item: Any, loaded: Any) -> list[dict[str, Any]]:
        """Hook run in a writer thread before the rows are stored (e.g. ``--save`` files); default: nothing."""
        return rows

    def csv_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """The ``results.csv`` row of a store row (default: the CSV columns, lists as text)."""
        return {c: _csv_value(row.get(c)) for c in self.csv_columns}

    def csv_specs(self) -> list[CsvSpec]:
        """The spreadsheet summaries (default: :attr:`csv_name` with :attr:`csv_columns`, if any, keyed as the store).

        Each summary's rows are :meth:`csv_row` of the selected store rows (restricted to its columns) while the run
        goes, and :meth:`csv_frame` of the store when it is rewritten at the end.
        """
        if not self.csv_columns:
            return []
        return [CsvSpec(self.csv_name, tuple(self.csv_columns), tuple(self.key_columns))]

    def csv_frame(self, df: Any) -> Any:
        """Format a DataFrame of store rows (all columns but the grid) as CSV rows, like :meth:`csv_row` does.

        Default: unchanged. A job whose :meth:`csv_row` formats values (e.g. ``true``/``false``) does the same here,
        so that the summary reads the same after it is rewritten from the store.
        """
        return df

    def run_info(self) -> dict[str, Any]:
        """Extra run.json entries (settings, prompts...)."""
        return {}

    def rows_ok(self, rows: list[dict[str, Any]]) -> bool:
        """Whether an item's rows count it as done well in the counts (default: every ``status`` is ``ok``)."""
        return all(str(r.get("status")) == "ok" for r in rows)

    def summarize(self, out: Path, info: dict[str, Any]) -> None:
        """Hook at the end of a run (e.g. aggregate tables); default: nothing."""


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and v != v:
        return ""
    return v


def bool_text(v: Any) -> str:
    """``true``/``false`` as the CSV summaries write a boolean column ("" when missing)."""
    import numpy as np
    import pandas as pd

    if v is None or (not isinstance(v, (list, tuple, np.ndarray)) and pd.isna(v)):
        return ""
    return str(bool(v)).lower()


# --------------------------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------------------------
def prepare_run(job: Job, items: Sequence[Any], out: Path) -> tuple[ResultStore, list[Any], dict[str, Any] | None]:
    """Make the folder, check the settings, open the store and keep the items with work left to do."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    previous = refuse_other_settings(out / "run.json", job.map_settings)
    store = ResultStore(out, job.columns, job.key_columns, job.grid_dtype)
    done = store.done_keys()
    if job.retry_errors and done:
        df = read_results(out, columns=[*job.key_columns, "status"])
        failed = df["status"].fillna("").astype(str).str.startswith("error")
        done = set(df.loc[~failed, list(job.key_columns)].itertuples(index=False, name=None))
    todo = [it for it in items if any(k not in done for k in job.item_keys(it))]
    job.done_keys = done
    return store, todo, previous


def start_info(
    job: Job, items: Sequence[Any], todo: Sequence[Any], previous: dict[str, Any] | None, run_info: dict[str, Any]
) -> dict[str, Any]:
    """run.json at the start of a run (``status: running``): ``run_info``, the job's entries, the counts of items
    to do and already done, the settings, the store, and the earlier runs of a resumed folder."""
    info = dict(run_info)
    if previous:
        info["previous_runs"] = previous_runs(previous)
    info.update(job.run_info())
    info.update(
        start_utc=info.get("start_utc") or utc_now(),
        end_utc=None,
        n_items=len(items),
        n_items_todo=len(todo),
        n_items_skipped_done=len(items) - len(todo),
        map_settings=job.map_settings,
        store={"path": "results/", "format": "parquet", "grid_dtype": job.grid_dtype, "keys": list(job.key_columns)},
        status="running",
    )
    return info


def run_job(
    job: Job,
    items: Sequence[Any],
    out_dir: str | Path,
    run_info: dict[str, Any],
    *,
    batch_size: int = 8,
    quiet: bool = False,
) -> dict[str, int]:
    """Run ``job`` over ``items`` into ``out_dir``; returns image counts ``ok``, ``failed``, ``skipped``.

    Resumable: items whose keys are all in the store are skipped, and rows already stored are never written
    twice. ``run.json`` is written at the start (``status: running``) and at the end (``finished``, with counts
    and timing, even after an error or Ctrl-C).
    """
    out = Path(out_dir)
    store, todo, previous = prepare_run(job, items, out)
    done = job.done_keys
    info = start_info(job, items, todo, previous, run_info)
    write_run_json(out / "run.json", info)
    counts = {"ok": 0, "failed": 0, "skipped": len(items) - len(todo)}
    timing = {"decode_s": 0.0, "compute_s": 0.0, "write_s": 0.0}

    def timed_load(item: Any) -> Any:  # runs in the prefetch thread: overlaps with compute
        t1 = time.perf_counter()
        try:
            return job.load(item)
        finally:
            timing["decode_s"] += time.perf_counter() - t1

    csvs = [_CsvSummary(out / spec.name, job, spec) for spec in job.csv_specs()]
    bar = progress(len(todo), quiet, job.name)
    writer = ThreadPoolExecutor(max_workers=1)
    pending: list[Future[Any]] = []
    t0 = time.perf_counter()

    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(k) for k in job.key_columns)

    def store_batch(per_item: list[tuple[Any, Any, list[dict[str, Any]]]]) -> None:
        t1 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for item, loaded, item_rows in per_item:
            fresh = [r for r in item_rows if key_of(r) not in done]
            if fresh and loaded is not None:
                fresh = job.finish(fresh, item, loaded)
            rows.extend(fresh)
        store.write(rows)  # the part is the commit point
        for csv in csvs:
            csv.append(rows)
        for r in rows:
            done.add(key_of(r))
        timing["write_s"] += time.perf_counter() - t1

    def drain(limit: int) -> None:
        while len(pending) > limit:
            pending.pop(0).result()

    status = "failed"
    try:
        for chunk in prefetched(todo, batch_size, timed_load):
            per_item: list[tuple[Any, Any, list[dict[str, Any]]]] = []
            good = []
            for item, loaded in chunk:
                if isinstance(loaded, ImageLoadError):
                    per_item.append((item, None, job.error_rows(item, loaded.reason)))
                    counts["failed"] += 1
                else:
                    good.append((item, loaded))
            tc = time.perf_counter()
            results = _compute(job, good) if good else []
            timing["compute_s"] += time.perf_counter() - tc
            for (item, loaded), res in zip(good, results, strict=True):
                if isinstance(res, str):
                    per_item.append((item, None, job.error_rows(item, first_line(res))))
                    counts["failed"] += 1
                else:
                    per_item.append((item, loaded, res))
                    ok = job.rows_ok(res)
                    counts["ok" if ok else "failed"] += 1
            drain(1)  # at most one batch being written while the next computes
            pending.append(writer.submit(store_batch, per_item))
            bar.update(len(chunk))
        drain(0)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            drain(0)
        finally:
            writer.shutdown(wait=True)
            bar.close()
            for csv in csvs:
                csv.rebuild(out, job)
            finish_info(info, job, status, counts, t0, timing, store.bytes_written, store.parts_written)
            write_run_json(out / "run.json", info)
    job.summarize(out, info)
    return counts


def finish_info(
    info: dict[str, Any],
    job: Job,
    status: str,
    counts: dict[str, int],
    t0: float,
    timing: dict[str, float],
    bytes_written: int,
    parts_written: int,
    **extra: Any,
) -> dict[str, Any]:
    """run.json at the end of a run: status, counts, seconds since ``t0``, time per stage, what was written."""
    info.update(
        end_utc=utc_now(),
        status=status,
        counts=counts,
        seconds=round(time.perf_counter() - t0, 3),
        timing={k: round(v, 3) for k, v in timing.items()},
        store_bytes_written=bytes_written,
        store_parts_written=parts_written,
        **extra,
    )
    info.update(job.run_info())
    return info


def _compute(job: Job, good: list[tuple[Any, Any]]) -> list[list[dict[str, Any]] | str]:
    """``job.compute`` on a batch: split on CUDA OOM, retried item by item on any other error."""
    try:
        return split_on_oom(job.compute, good)
    except Exception as err:  # noqa: BLE001 - a failing batch is retried image by image
        log.debug("batch failed (%s: %s); retrying item by item", type(err).__name__, err)
    results: list[list[dict[str, Any]] | str] = []
    for one in good:
        try:
            results.extend(split_on_oom(job.compute, [one]))
        except Exception as e1:  # noqa: BLE001 - recorded as this item's error
            log.warning("%s: %s: %s", one[0], type(e1).__name__, e1)
            results.append(f"{type(e1).__name__}: {e1}")
    return results


class _CsvSummary:
    """``results.csv``: appended per batch, rewritten from the store at the end (the store is the truth)."""

    def __init__(self, path: Path, job: Job, spec: CsvSpec | None = None) -> None:
        from traitloc.io.csvlog import ResultsTable

        self.path = path
        self.job = job
        self.spec = spec or CsvSpec(path.name, tuple(job.csv_columns), tuple(job.key_columns))
        cols, keys = list(self.spec.columns), list(self.spec.key_columns)
        try:
            self.table: Any = ResultsTable(path, cols, keys)
        except ValueError:  # an unreadable or foreign summary: rebuilt from the store at the end
            path.unlink(missing_ok=True)
            self.table = ResultsTable(path, cols, keys)

    def append(self, rows: list[dict[str, Any]]) -> None:
        chosen = [self.table_row(r) for r in rows if self.spec.selects(r)]
        if chosen:
            self.table.append(chosen)

    def table_row(self, row: dict[str, Any]) -> dict[str, Any]:
        full = self.job.csv_row(row)
        return {c: full.get(c, "") for c in self.spec.columns}

    def rebuild(self, out: Path, job: Job) -> None:
        """Rewrite the summary from the store (atomically), so it lists every stored row exactly once."""
        from traitloc.io.files import atomic_write

        stored = _store_columns(job)
        wanted = set(self.spec.columns) | set(self.spec.where or ())
        if type(job).csv_frame is not Job.csv_frame:  # the job may derive CSV columns from any stored column
            wanted |= stored - {"grid"}
        df = read_results(out, columns=[c for c in sorted(stored) if c in wanted])
        for k, v in (self.spec.where or {}).items():
            df = df[df[k] == v]
        df = job.csv_frame(df.reset_index(drop=True))
        for c in self.spec.columns:
            if c not in df.columns:
                df[c] = ""
        df = df[list(self.spec.columns)]
        atomic_write(self.path, df.to_csv(index=False, na_rep="", float_format=None, lineterminator="\n"))


def _store_columns(job: Job) -> set[str]:
    from traitloc.io.store import BASE_COLUMNS

    return set(BASE_COLUMNS) | set(job.columns)
