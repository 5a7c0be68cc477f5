"""Run a pipeline job on a Ray cluster: the same store, the same resume, many machines.

:func:`run_job_ray` is the scale-out twin of :func:`traitloc.pipelines.runner.run_job`: the driver prepares and
finishes the run folder as the local runner does, and a pool of Ray actors, each building the job once from a
picklable job spec, computes and writes the store parts; part names fixed by the batch (:func:`batch_part_name`) make
retries exactly once. How it works: ``docs/store.md`` ("On a Ray cluster"); usage: the README ("Scaling out").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traitloc.data.images import ImageLoadError
from traitloc.io.files import atomic_path, write_run_json
from traitloc.io.store import PART_GLOB, ResultStore, part_files
from traitloc.pipelines.runner import (
    Job,
    _compute,
    _CsvSummary,
    finish_info,
    first_line,
    prepare_run,
    progress,
    start_info,
)

__all__ = [
    "ExplainJobSpec",
    "JobSpec",
    "LocalizeSpec",
    "RayUnavailableError",
    "add_ray_arguments",
    "batch_part_name",
    "cluster_info",
    "compact_duplicates",
    "connect",
    "ray_requested",
    "run_explain_ray",
    "run_job_ray",
    "run_localize_ray",
]

log = logging.getLogger(__name__)

#: fault injection for tests: ``after-write:<marker file>`` kills the actor (SIGKILL) right after it wrote a part,
#: before the batch returns, once (the marker file records that it happened)
FAULT_ENV = "TRAITLOC_RAY_FAULT"
#: at most this many decode threads per actor
MAX_DECODE_THREADS = 8

#: ``job_spec(device, keys) -> Job``: a picklable callable that builds the job (and loads its model) on ``device``
#: (``"cpu"``, ``"cuda"``); ``keys`` maps items to image keys (``{}`` in actors: each batch brings its own)
JobSpec = Callable[[str, dict[Any, str]], Job]


class RayUnavailableError(RuntimeError):
    """Ray is not installed, the cluster cannot be reached or cannot hold the actors, or the run failed on it
    (one line that says what to do)."""


# --------------------------------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Dataset API is the part we need
    except ImportError as err:
        raise RayUnavailableError(
            'running on Ray needs the ray extra: pip install "traitloc[ray]" (ray[data])'
        ) from err
    return ray


def ray_requested(args: Any) -> bool:
    """Whether a command's ``args`` ask for Ray (``--ray``); then, before any model loads, raise
    :class:`RayUnavailableError` (one line naming the extra) unless Ray Data can be imported."""
    if getattr(args, "ray", None) is None:
        return False
    _ray()
    return True


def connect(address: str | None = None, *, quiet: bool = False) -> bool:
    """Connect to a Ray cluster (or start a local one); returns whether this call started Ray (then shut it down).

    Parameters
    ----------
    address : str or None
        As :func:`ray.init`: ``None`` connects to the cluster this machine belongs to (``RAY_ADDRESS``, or the one
        started here with ``ray start``) and otherwise starts a local Ray instance; ``"auto"`` only connects (an
        error when there is no cluster); ``"local"`` always starts a new local instance; ``HOST:PORT`` (the head's
        GCS address) or ``ray://HOST:10001`` (Ray Client) connects to that cluster. Ignored when Ray is already
        initialized in this process.
    quiet : bool
        Keep Ray's own logging to warnings.

    Raises
    ------
    RayUnavailableError
        Ray missing, or no cluster at ``address``.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address in (None, "", "local"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address or None, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = first_line(str(err)) or type(err).__name__
        raise RayUnavailableError(
            f"could not connect to Ray at {address or 'auto/local'!r}: {first} (start a cluster with "
            f"`ray start --head`, then pass --ray auto or --ray HOST:6379)"
        ) from err
    return True


def cluster_info() -> dict[str, Any]:
    """Nodes, CPUs and GPUs of the connected cluster (for ``run.json``)."""
    ray = _ray()
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "ray_version": ray.__version__,
        "nodes": len(nodes),
        "cpus": float(res.get("CPU", 0.0)),
        "gpus": float(res.get("GPU", 0.0)),
        "node_resources": [
            {
                "node": n.get("NodeManagerAddress"),
                "CPU": n["Resources"].get("CPU", 0),
                "GPU": n["Resources"].get("GPU", 0),
            }
            for n in nodes
        ],
    }


def _actor_resources(cluster: Mapping[str, Any], actors: int, device: str) -> tuple[float, float]:
    """``(GPUs per actor, CPUs per actor)``.

    With GPUs (and ``device`` not ``cpu``): one GPU per actor, or an equal share of one when there are more actors
    than GPUs (several actors per GPU run the CPU side of their batches, decoding, rows and writing, in parallel);
    CPUs split evenly, at most :data:`MAX_DECODE_THREADS` each. Without GPUs: the CPUs split evenly between the
    actors (torch threads = CPUs per actor).
    """
    gpus = int(cluster["gpus"])
    cpus = float(cluster["cpus"])
    if device.startswith("cuda") and gpus == 0:
        raise RayUnavailableError(f"--device {device}: the Ray cluster has no GPUs; use --device auto or cpu")
    if cpus < actors:
        raise RayUnavailableError(f"--ray-actors {actors}: the Ray cluster has only {cpus:g} CPUs (one per actor)")
    per_cpu = max(1.0, float(math.floor(cpus / actors)))
    if device != "cpu" and gpus > 0:
        share = 1.0 / math.ceil(actors / gpus)  # 1 when actors <= GPUs; 1/2 for two actors per GPU ...
        return share, min(float(MAX_DECODE_THREADS), per_cpu)
    return 0.0, per_cpu


# --------------------------------------------------------------------------------------------------------------
# exactly once
# --------------------------------------------------------------------------------------------------------------
def batch_part_name(run_tag: str, keys: Sequence[tuple[Any, ...]]) -> str:
    """The store part of one batch: ``part-<run tag>-<hash of the batch's sorted keys>.parquet``.

    The same batch gets the same name in every attempt, so a retried batch replaces its own part.
    """
    h = hashlib.sha256(json.dumps(sorted([list(k) for k in keys], key=json.dumps), default=str).encode())
    return f"part-{run_tag}-{h.hexdigest()[:20]}.parquet"


def compact_duplicates(out: str | Path, key_columns: Sequence[str]) -> int:
    """Make every key appear once in a run's store; returns the number of duplicate rows removed.

    Keeps, like :func:`traitloc.io.store.read_results`, the copy in the last part by name; the parts holding
    the other copies are rewritten without them (atomically; a part left empty is deleted). Reads only the key
    columns unless there is something to remove.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = part_files(out)
    if not files:
        return 0
    tables = []
    for i, f in enumerate(files):
        t = pq.read_table(f, columns=list(key_columns))
        tables.append(t.append_column("_part", pa.array([i] * t.num_rows, pa.int32())))
    keys = pa.concat_tables(tables).to_pandas()
    keys["_row"] = keys.groupby("_part").cumcount()
    dup = keys.duplicated(subset=list(key_columns), keep="last")
    if not dup.any():
        return 0
    drop = keys[dup].groupby("_part")["_row"].apply(list)
    for part, rows in drop.items():
        path = files[int(part)]
        table = pq.read_table(path)
        keep = pc.invert(pa.array([i in set(rows) for i in range(table.num_rows)]))
        table = table.filter(keep)
        if table.num_rows == 0:
            path.unlink()
            continue
        with atomic_path(path, keep_suffix=False) as tmp:  # like the store's parts: no ".parquet" while in flight
            pq.write_table(table, tmp, compression="zstd")
    n = int(dup.sum())
    log.warning("removed %d duplicate rows from %d parts of %s", n, len(drop), out)
    return n


def _remove_orphans(out: Path, run_tag: str, reported: set[str]) -> int:
    """Delete this run's parts (and temporary files) that no finished batch reported: died attempts."""
    n = 0
    for f in sorted((out / "results").glob(f"*{run_tag}*")):
        if f.name in reported:
            continue
        if f.match(PART_GLOB) or f.name.startswith("."):
            f.unlink(missing_ok=True)
            n += 1
    if n:
        log.warning("removed %d parts or temporary files left by actors that died", n)
    return n


def encode_item(item: Any) -> str:
    """An item as text for the Ray Dataset: a path, a string, or a tuple of strings/numbers (JSON)."""
    if isinstance(item, Path):
        return json.dumps(["path", str(item)])
    if isinstance(item, tuple):
        return json.dumps(["tuple", list(item)])
    if isinstance(item, str):
        return json.dumps(["str", item])
    raise TypeError(f"cannot send an item of type {type(item).__name__} to Ray actors (a path, str or tuple)")


def decode_item(text: str) -> Any:
    """The inverse of :func:`encode_item`."""
    kind, value = json.loads(text)
    return Path(value) if kind == "path" else tuple(value) if kind == "tuple" else value


# --------------------------------------------------------------------------------------------------------------
# the actor
# --------------------------------------------------------------------------------------------------------------
class _BatchWorker:
    """A Ray Data actor: the model and the job built once; each call decodes, computes and writes one batch."""

    def __init__(self, spec: JobSpec, out: str, run_tag: str, threads: int) -> None:
        import ray
        import torch

        use_gpu = bool(ray.get_gpu_ids())
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.job = spec(self.device, {})
        self.store = ResultStore(out, self.job.columns, self.job.key_columns, self.job.grid_dtype)
        self.run_tag = run_tag
        self.decode = ThreadPoolExecutor(max_workers=max(1, min(MAX_DECODE_THREADS, threads)))
        self.fault = os.environ.get(FAULT_ENV, "")

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        job = self.job
        t0 = time.perf_counter()
        items = [decode_item(str(p)) for p in batch["item"]]
        keys = getattr(job, "keys", None)
        if isinstance(keys, dict):  # a job that maps items to image keys (localize): this batch's keys
            keys.clear()
            keys.update(zip(items, (str(k) for k in batch["key"]), strict=True))
        done = [set(map(tuple, json.loads(str(d)))) for d in batch["done"]]
        loaded = list(self.decode.map(job.load, items))
        t1 = time.perf_counter()
        per_item: list[tuple[Any, Any, list[dict[str, Any]], set[tuple[Any, ...]]]] = []
        good: list[tuple[Any, Any]] = []
        good_done = []
        ok = failed = 0
        for item, im, d in zip(items, loaded, done, strict=True):
            if isinstance(im, ImageLoadError):
                per_item.append((item, None, job.error_rows(item, im.reason), d))
                failed += 1
            else:
                good.append((item, im))
                good_done.append(d)
        results = _compute(job, good) if good else []
        for (item, im), res, d in zip(good, results, good_done, strict=True):
            if isinstance(res, str):
                per_item.append((item, None, job.error_rows(item, first_line(res)), d))
                failed += 1
            else:
                per_item.append((item, im, res, d))
                if job.rows_ok(res):
                    ok += 1
                else:
                    failed += 1
        t2 = time.perf_counter()
        rows: list[dict[str, Any]] = []
        for item, im, item_rows, d in per_item:
            fresh = [r for r in item_rows if tuple(r.get(k) for k in job.key_columns) not in d]
            if fresh and im is not None:
                fresh = job.finish(fresh, item, im)
            rows.extend(fresh)
        name = batch_part_name(self.run_tag, [tuple(r.get(k) for k in job.key_columns) for r in rows])
        path = self.store.write(rows, name=name)
        t3 = time.perf_counter()
        self._maybe_fail()
        return {
            "part": [path.name if path is not None else ""],
            "items": [len(items)],
            "ok": [ok],
            "failed": [failed],
            "rows": [len(rows)],
            "bytes": [path.stat().st_size if path is not None else 0],
            "decode_s": [t1 - t0],
            "compute_s": [t2 - t1],
            "write_s": [t3 - t2],
        }

    def _maybe_fail(self) -> None:
        """Fault injection for tests (:data:`FAULT_ENV`): die once, right after writing a part."""
        if not self.fault.startswith("after-write:"):
            return
        marker = Path(self.fault.split(":", 1)[1])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------------------------
def run_job_ray(
    job_spec: JobSpec,
    items: Sequence[Any],
    out_dir: str | Path,
    run_info: dict[str, Any],
    *,
    keys: Mapping[Any, str] | None = None,
    address: str | None = None,
    actors: int = 1,
    batch_size: int = 8,
    device: str = "auto",
    quiet: bool = False,
    remote_args: Mapping[str, Any] | None = None,
    job: Job | None = None,
) -> dict[str, int]:
    """Run the job that ``job_spec`` builds over ``items`` on a Ray cluster, into the store of ``out_dir``.

    Parameters
    ----------
    job_spec : callable ``(device, keys) -> Job``
        Picklable; builds the job (and loads its model). Called once on the driver (``device="cpu"``, for the
        settings, keys and summaries) and once in every actor.
    items : sequence
        The items (image paths) of the whole run, finished ones included (they are skipped).
    out_dir : path
        The run folder, on a filesystem every node sees.
    run_info : dict
        ``run.json`` entries (argv, model, ...), as for :func:`traitloc.pipelines.runner.run_job`.
    keys : mapping item -> image key, optional
        For jobs that look image keys up in a ``keys`` dict (localize): the keys of all items (made unique over the
        whole run by the driver); each batch hands its items' keys to the actor's job. Jobs whose items carry their
        key (explain) need none.
    address : str or None
        The cluster (see :func:`connect`).
    actors : int
        Actors in the pool (each holds one model; one GPU each when the cluster has GPUs).
    batch_size : int
        Images per batch (one store part per batch).
    device : str
        ``auto`` (GPU actors when the cluster has GPUs), ``cpu`` or ``cuda``.
    quiet : bool
        No progress bar.
    remote_args : mapping, optional
        More named arguments of :meth:`ray.data.Dataset.map_batches` for the actors (e.g.
        ``{"runtime_env": {...}, "memory": ..., "accelerator_type": "H100"}``).
    job : Job, optional
        The driver's job, if the caller has built it already (default: ``job_spec("cpu", keys)``). The driver uses
        it for the keys, the settings, run.json and the summaries, never to compute.

    Returns
    -------
    dict
        Image counts ``ok``, ``failed``, ``skipped`` (as the local runner).
    """
    ray = _ray()
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    out = Path(out_dir).resolve()
    keys = dict(keys or {})
    if job is None:
        job = job_spec("cpu", dict(keys))
    store, todo, previous = prepare_run(job, items, out)
    done = job.done_keys
    started = connect(address, quiet=quiet)
    try:
        cluster = cluster_info()
        gpus_per_actor, cpus = _actor_resources(cluster, actors, device)
        use_gpu = gpus_per_actor > 0
        run_tag = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-ray" + secrets.token_hex(3)
        info = start_info(job, items, todo, previous, run_info)
        info.update(
            device="cuda" if use_gpu else "cpu",
            ray={
                **cluster, "address": address, "actors": actors, "gpus_per_actor": gpus_per_actor,
                "cpus_per_actor": cpus, "batch_size": batch_size, "max_restarts": -1, "max_task_retries": -1,
                "run_tag": run_tag,
            },
        )  # fmt: skip
        write_run_json(out / "run.json", info)
        counts = {"ok": 0, "failed": 0, "skipped": len(items) - len(todo)}
        timing = {"decode_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
        reported: set[str] = set()
        written = {"bytes": 0, "parts": 0, "rows": 0}
        status = "failed"
        t0 = time.perf_counter()
        bar = progress(len(todo), quiet, f"{job.name} (ray, {actors} actor{'s' if actors > 1 else ''})")
        try:
            if todo:
                ds = _dataset(ray, todo, keys, job, done, batch_size)
                # Ray Data's actor pools restart a dead actor and retry its batch (max_restarts=-1,
                # max_task_retries=-1 by default; not passed here: ray_remote_args are deprecated in Ray 2.60)
                mapped = ds.map_batches(
                    _BatchWorker,
                    fn_constructor_kwargs={"spec": job_spec, "out": str(out), "run_tag": run_tag, "threads": int(cpus)},
                    batch_size=batch_size,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=actors),
                    num_cpus=cpus,
                    num_gpus=gpus_per_actor,
                    **dict(remote_args or {}),
                )
                for res in mapped.iter_rows():
                    counts["ok"] += int(res["ok"])
                    counts["failed"] += int(res["failed"])
                    for k in timing:
                        timing[k] += float(res[k])
                    if res["part"]:
                        reported.add(str(res["part"]))
                        written["parts"] += 1
                        written["bytes"] += int(res["bytes"])
                        written["rows"] += int(res["rows"])
                    bar.update(int(res["items"]))
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except ray.exceptions.RayError as err:  # e.g. an actor that cannot build its job on some node
            cause = getattr(err, "cause", None) or err
            raise RayUnavailableError(
                f"the run on Ray failed: {type(cause).__name__}: {first_line(str(cause))} (finished batches are "
                f"stored: rerun the same command to resume)"
            ) from err
        finally:
            bar.close()
            removed = dupes = 0
            if status == "finished":
                removed = _remove_orphans(out, run_tag, reported)
                dupes = compact_duplicates(out, job.key_columns)
            for csv_spec in job.csv_specs():
                _CsvSummary(out / csv_spec.name, job, csv_spec).rebuild(out, job)
            finish_info(
                info, job, status, counts, t0, timing, written["bytes"], written["parts"],
                store_rows_written=written["rows"], orphan_parts_removed=removed, duplicate_rows_removed=dupes,
            )  # fmt: skip
            info["device"] = "cuda" if use_gpu else "cpu"  # the actors' (the driver's job is on the CPU)
            write_run_json(out / "run.json", info)
    finally:
        if started:
            ray.shutdown()
    job.summarize(out, info)
    return counts


def _dataset(
    ray: Any,
    todo: Sequence[Any],
    keys: Mapping[Any, str],
    job: Job,
    done: set[tuple[Any, ...]],
    batch_size: int,
) -> Any:
    """A Ray Dataset of the items still to do: path, image key and the item's keys already stored (if any)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would count rows of its own operators
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and log-folder lines on every run
    rows = []
    for it in todo:
        partial = [list(k) for k in job.item_keys(it) if k in done]
        rows.append({"item": encode_item(it), "key": str(keys.get(it, "")), "done": json.dumps(partial)})
    # one block per batch: a retried task redoes one batch, and the actors share the work evenly
    return ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))


# --------------------------------------------------------------------------------------------------------------
# the localize job, built from the command's arguments
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalizeSpec:
    """What an actor needs to build ``traitloc localize``'s job: the model arguments and the settings (picklable).

    Calling it loads the model (:func:`traitloc.models.clip.load_clip`) and returns a
    :class:`traitloc.pipelines.localize.LocalizeJob`, exactly as the command builds it for the local runner.
    """

    model: str
    pretrained: str | None
    method: str = "gradcam"
    templates: tuple[str, ...] | None = None
    resize: str = "stretch"
    dtype: str = "fp32"
    scorecam_channels: int | None = None
    seed: int = 0
    settings: Any = None  # traitloc.pipelines.localize.LocalizeSettings
    run_info: dict[str, Any] = field(default_factory=dict)
    out: str = "."

    def __call__(self, device: str, keys: dict[Any, str]) -> Job:
        import torch

        from traitloc.models.clip import load_clip
        from traitloc.models.localize import ConceptLocalizer
        from traitloc.pipelines.localize import LocalizeJob

        torch.manual_seed(self.seed)
        bundle = load_clip(self.model, self.pretrained, device)
        amp = torch.bfloat16 if self.dtype == "bf16" else None
        loc = ConceptLocalizer(
            bundle, self.method, templates=list(self.templates) if self.templates else None, resize=self.resize,
            amp_dtype=amp, scorecam_channels=self.scorecam_channels,
        )  # fmt: skip
        return LocalizeJob(loc, self.settings, keys, self.run_info, self.out)


# --------------------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------------------
def add_ray_arguments(p: Any) -> None:
    """``--ray [ADDRESS]`` and ``--ray-actors N`` for a command's argument parser (no Ray import)."""
    from traitloc.pipelines.options import positive_int

    g = p.add_argument_group("scale out (Ray)")
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (pip install 'traitloc[ray]'): no value = the cluster this machine belongs to, "
        "else a local Ray instance; 'auto' = the running cluster only; 'local' = a new local instance; HOST:6379 or "
        "ray://HOST:10001 = that cluster. Images, weights and --out must be on a filesystem every node sees",
    )
    g.add_argument(
        "--ray-actors",
        type=positive_int,
        default=1,
        metavar="N",
        help="with --ray: actors, each holding one model: one GPU each when the cluster has GPUs (an equal share of "
        "one when there are more actors than GPUs), else the CPUs split between them (default: 1)",
    )


def _absolute_if_file(value: str | None) -> str | None:
    """A local file argument (weights, model config) as an absolute path, so actors on other nodes find it."""
    if value and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def run_localize_ray(
    args: Any,
    pretrained: str | None,
    localizer: Any,
    settings: Any,
    run_info: dict[str, Any],
) -> dict[str, int]:
    """``traitloc localize ... --ray``: the command's job on a Ray cluster (see :func:`run_job_ray`).

    ``localizer`` is the driver's (on the CPU: for the settings and run.json); every actor loads its own from the
    same arguments.
    """
    from traitloc.data.images import find_images, image_keys
    from traitloc.pipelines.localize import LocalizeJob

    paths = find_images(args.paths)
    keys = image_keys(paths)
    info = {
        **run_info,
        "cwd": os.getcwd(),
        "inputs": [str(Path(p).resolve()) for p in args.paths],
        "n_images": len(paths),
    }
    spec = LocalizeSpec(
        model=_absolute_if_file(args.model) or args.model, pretrained=_absolute_if_file(pretrained),
        method=args.method, templates=tuple(args.template) or None, resize=args.resize, dtype=args.dtype,
        scorecam_channels=args.scorecam_channels, seed=args.seed, settings=settings, run_info=run_info,
        out=str(Path(args.out).resolve()),
    )  # fmt: skip
    job = LocalizeJob(localizer, settings, keys, run_info, spec.out)
    return run_job_ray(
        spec, paths, spec.out, info, keys=keys, address=args.ray or None, actors=args.ray_actors,
        batch_size=settings.batch_size, device=args.device, quiet=settings.quiet, job=job,
    )  # fmt: skip


@dataclass(frozen=True)
class ExplainJobSpec:
    """What an actor needs to build ``traitloc explain``'s job (picklable): the command's
    :class:`traitloc.pipelines.explain.ExplainSpec`, the run folder and the driver's working directory (``--classifier
    MODULE:FUNCTION`` is imported from it, as on the driver)."""

    spec: Any  # traitloc.pipelines.explain.ExplainSpec
    out: str
    cwd: str

    def __call__(self, device: str, keys: dict[Any, str]) -> Job:
        import dataclasses

        from traitloc.pipelines.explain import build_explain_job

        if self.cwd and os.path.isdir(self.cwd):
            os.chdir(self.cwd)  # an actor process of its own: the classifier module resolves as on the driver
        return build_explain_job(dataclasses.replace(self.spec, device=device), self.out)


def run_explain_ray(args: Any, spec: Any, job: Job, run_info: dict[str, Any]) -> dict[str, int]:
    """``traitloc explain ... --ray``: the command's job on a Ray cluster (see :func:`run_job_ray`).

    ``job`` is the driver's (built on the CPU: for the settings and run.json); every actor builds its own from
    ``spec`` on its GPU or CPUs.
    """
    import dataclasses

    from traitloc.pipelines.explain import explain_items

    items = explain_items(args.paths)
    info = {
        **run_info,
        "cwd": os.getcwd(),
        "inputs": [str(Path(p).resolve()) for p in args.paths],
        "n_images": len(items),
    }
    if spec.probe:
        spec = dataclasses.replace(spec, probe=str(Path(spec.probe).resolve()))
    out = str(Path(args.out).resolve())
    job_spec = ExplainJobSpec(spec=spec, out=out, cwd=os.getcwd())
    return run_job_ray(
        job_spec, items, out, info, address=args.ray or None, actors=args.ray_actors, batch_size=spec.batch_size,
        device=spec.device, quiet=spec.quiet, job=job,
    )  # fmt: skip
