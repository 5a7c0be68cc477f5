"""Benchmark: peak memory (RSS) and time of ``traitloc export`` as the number of exported results grows.

``traitloc export`` renders every selected result from the run's results store and streams it to disk (grid maps
read one store part at a time, one photo decoded per image, files written as they are rendered, a zip written to
a temporary file beside the destination and renamed at the end), so its peak resident memory should not grow with
the number of results. This builds a synthetic run folder per N (no model: :class:`traitloc.io.store.ResultStore`
written directly, in parts of 8 photos x 10 concepts as ``localize`` writes them, 14 x 14 float32 grid maps like
ViT-B-16 at 224 px, photo-like JPEGs of ``--size``), marks every result accepted in ``review.sqlite`` (the review
app's store), then runs the real console script, each N in a fresh process::

    traitloc export RUN --status accepted --format png,tiff --zip export.zip --quiet

and reports per N the process's own peak RSS (``ru_maxrss`` of that child, from ``os.wait4``), the RSS polled
during the run, the wall time, results per second and the zip's size, beside the peak RSS of
``traitloc export --help`` (the interpreter with torch and traitloc imported: the floor).

Examples
--------
    python benchmarks/memory_export.py                                   # N = 500 and 5000, masks + maps
    python benchmarks/memory_export.py --n 5000 --formats png,tiff,coco,geojson,csv --json mem_export.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_localize import _rss_mb, photo  # noqa: E402  (the same photo generator and RSS reader)

CONCEPTS = [
    "red wing", "yellow bill", "black crown", "white belly", "striped tail", "blue back", "orange breast",
    "spotted throat", "long legs", "short beak",
]  # fmt: skip
#: the store columns of a localize run (traitloc.pipelines.localize.LocalizeJob.columns)
IMAGES_PER_PART = 8


def make_run(folder: Path, n_results: int, size: tuple[int, int], grid: int, seed: int = 0) -> int:
    """A run folder with ``n_results`` accepted results (``n_results / len(CONCEPTS)`` photos); returns #photos."""
    from traitloc.io.decisions import ReviewStore
    from traitloc.io.store import ResultStore
    from traitloc.pipelines.localize import LocalizeJob

    rng = np.random.default_rng(seed)
    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    n_images = -(-n_results // len(CONCEPTS))
    store = ResultStore(folder, LocalizeJob.columns, LocalizeJob.key_columns)
    w, h = size
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32)
    rows: list[dict] = []
    ids: list[str] = []
    for i in range(n_images):
        path = photos / f"photo_{i:05d}.jpg"
        photo(rng, size).save(path, quality=90)
        for concept in CONCEPTS:
            if len(ids) == n_results:
                break
            cy, cx = rng.uniform(2, grid - 3, size=2)
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0) - 0.3 + 0.05 * rng.standard_normal((grid, grid))
            row = {"image": str(path.resolve()), "image_key": path.stem, "concept": concept, "base": "bird",
                   "gamma": 1.0, "method": "gradcam", "model": "ViT-B-16", "score": float(rng.normal(0, 0.05)),
                   "status": "ok", "notes": "", "width": w, "height": h, "resize": "stretch",
                   "interpolation": "bilinear", "grid": g.astype(np.float32), "grid_h": grid, "grid_w": grid,
                   "raw_max": float(max(g.max(), 0.0)), "threshold": "0.5", "run_id": "benchmark"}  # fmt: skip
            rows.append(row)
            ids.append(f"{path.stem}/{concept.replace(' ', '-')}")
        if (i + 1) % IMAGES_PER_PART == 0 or i == n_images - 1:
            store.write(rows)
            rows = []
    (folder / "run.json").write_text(json.dumps({"command": "localize", "threshold": 0.5, "model": "ViT-B-16"}))
    review = ReviewStore(folder, synchronous="NORMAL")
    if hasattr(review, "set_many"):
        review.set_many([(rid, "accepted", "") for rid in ids])
    else:  # pragma: no cover - older review store
        for rid in ids:
            review.set(rid, "accepted")
    return n_images


def measure(cmd: list[str], interval: float) -> dict:
    """Run ``cmd``; poll its RSS; return its own peak RSS (``ru_maxrss`` of this child), the polled peak, time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    polled_peak = 0.0
    while True:
        try:
            waited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            waited = None
        if waited is not None:
            break
        rss = _rss_mb(proc.pid)
        if rss is not None:
            polled_peak = max(polled_peak, rss)
        time.sleep(interval)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),  # Linux: kilobytes
        "polled_peak_rss_mb": round(polled_peak, 1),
        "seconds": round(seconds, 1),
        "stderr_tail": stderr[-1500:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[500, 5000], help="result counts (default: 500 5000)")
    ap.add_argument("--size", default="320x240", help="photo size WxH (default: 320x240)")
    ap.add_argument("--grid", type=int, default=14, help="grid side (default: 14, ViT-B-16 at 224 px)")
    ap.add_argument("--formats", default="png,tiff", help="traitloc export --format (default: png,tiff)")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--interval", type=float, default=0.1, help="RSS polling interval in seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    w, h = (int(v) for v in args.size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="traitloc_mem_export_"))
    work.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("traitloc") or str(Path(sys.executable).with_name("traitloc"))
    print(f"work folder {work}", flush=True)
    results = []
    baseline = measure([exe, "export", "--help"], args.interval)
    print(f"baseline (traitloc export --help: Python, torch, traitloc imported): peak RSS "
          f"{baseline['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    try:
        for n in args.n:
            run = work / f"run_{n}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            n_images = make_run(run, n, (w, h), args.grid)
            built = time.perf_counter() - t0
            out = work / f"export_{n}.zip"
            out.unlink(missing_ok=True)
            cmd = [exe, "export", str(run), "--status", "accepted", "--format", args.formats, "--zip", str(out),
                   "--quiet"]  # fmt: skip
            print(f"N = {n} ({n_images} photos, store built in {built:.0f} s): {' '.join(cmd[1:3])} ...", flush=True)
            res = measure(cmd, args.interval)
            store_bytes = sum(p.stat().st_size for p in (run / "results").glob("*"))
            res.update(n_results=n, n_images=n_images, results_per_s=round(n / res["seconds"], 1),
                       zip_mb=round(out.stat().st_size / 2**20, 1) if out.exists() else None,
                       store_mb=round(store_bytes / 2**20, 2))  # fmt: skip
            print(f"N = {n}: rc {res['returncode']}, peak RSS {res['peak_rss_mb']:.0f} MB (polled "
                  f"{res['polled_peak_rss_mb']:.0f} MB), {res['seconds']:.1f} s, {res['results_per_s']} results/s, "
                  f"zip {res['zip_mb']} MB", flush=True)  # fmt: skip
            if res["returncode"]:
                print(res["stderr_tail"], file=sys.stderr)
            results.append(res)
            shutil.rmtree(run, ignore_errors=True)
            out.unlink(missing_ok=True)
    finally:
        record = {
            "benchmark": "memory_export",
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "formats": args.formats,
            "image_size": [w, h],
            "grid": args.grid,
            "concepts": len(CONCEPTS),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "baseline_peak_rss_mb": baseline["peak_rss_mb"],
            "results": results,
        }
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
