"""Benchmark: peak memory (RSS) of ``traitloc localize`` as the number of images grows.

``traitloc localize`` streams its inputs (images are decoded one batch ahead, each batch's rows are written as one
part of the results store and appended to results.csv), so its peak resident memory should not depend on how many
images a folder holds. This runs the
real console script, each N in a fresh process, over a folder of N generated photo-like JPEGs with 16 concept
prompts against the base prompt "bird", on ViT-B-16 with random weights saved to a local ``.safetensors`` file
(created in the work folder; never committed), and reports per N:

- ``peak_rss_mb``: the process's own peak RSS (``ru_maxrss`` of that child, from ``os.wait4``);
- ``rss_at_progress``: RSS sampled from ``/proc/PID/status`` at 10 %, 25 %, 50 %, 75 % and 100 % of the rows
  written, to show that memory stays flat during a run (the polled maximum is ``polled_peak_rss_mb``);
- wall time, images per second, and the number of rows with ``status == ok``.

Examples
--------
    python benchmarks/memory_localize.py --n 200 2000                   # the default sizes
    python benchmarks/memory_localize.py --n 200 600 --json mem.json    # a shorter run
    nohup python benchmarks/memory_localize.py --n 200 2000 --json mem.json > mem.log 2>&1 &
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CONCEPTS = [
    "red wing", "yellow bill", "black crown", "white belly", "striped tail", "blue back", "orange breast",
    "spotted throat", "long legs", "short beak", "grey nape", "brown wing bars", "eye ring", "crested head",
    "forked tail", "green rump",
]  # fmt: skip
BASE = "bird"
PROGRESS_MARKS = (0.10, 0.25, 0.50, 0.75, 1.00)


def photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture: smooth colour field, a few blurred blobs, sensor noise (compresses like a photo)."""
    w, h = size
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.25) * min(w, h)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + blob * rng.uniform(0, 255, size=3).astype(np.float32)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(seed + existing)
    for i in range(existing, n):
        photo(rng, size).save(folder / f"photo_{i:05d}.jpg", quality=90)


def make_weights(path: Path, model: str) -> Path:
    if path.exists():
        return path
    import open_clip
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    m = open_clip.create_model(model, pretrained=None)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _rows(csv_path: Path) -> int:
    try:
        return max(0, csv_path.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def measure(cmd: list[str], csv_path: Path, total_rows: int, interval: float, log_every: float) -> dict:
    """Run ``cmd``; poll its RSS and progress; return peak RSS (``ru_maxrss`` of this child) and the samples."""
    t0 = time.perf_counter()
    err_path = csv_path.parent.with_name(csv_path.parent.name + ".stderr.txt")
    err_file = open(err_path, "wb")  # a file, not a pipe: a chatty child can never block on a full pipe
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
    samples: list[tuple[float, int, float]] = []  # (seconds, rows, rss MB)
    last_log = t0
    polled_peak = 0.0
    # poll until the child exits, without reaping it (os.wait4 below reaps it and gives its own rusage)
    while True:
        try:
            waited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            waited = None
        if waited is not None:
            break
        rss = _rss_mb(proc.pid)
        if rss is not None:
            now = time.perf_counter()
            rows = _rows(csv_path)
            samples.append((now - t0, rows, rss))
            polled_peak = max(polled_peak, rss)
            if now - last_log >= log_every:
                print(f"  {now - t0:8.0f} s  rows {rows:6d}/{total_rows}  rss {rss:7.0f} MB", flush=True)
                last_log = now
        time.sleep(interval)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err_file.close()
    stderr = err_path.read_bytes().decode(errors="replace")
    seconds = time.perf_counter() - t0
    at_progress = {}
    for mark in PROGRESS_MARKS:
        hit = [s for s in samples if s[1] >= mark * total_rows]
        at_progress[f"{int(mark * 100)}%"] = round(hit[0][2], 1) if hit else None
    return {
        "returncode": proc.returncode,
        "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),  # Linux: kilobytes
        "polled_peak_rss_mb": round(polled_peak, 1),
        "rss_at_progress": at_progress,
        "seconds": round(seconds, 1),
        "stderr_tail": stderr[-1500:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 2000], help="image counts (default: 200 2000)")
    ap.add_argument("--size", default="480x360", help="photo size WxH (default: 480x360)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (images, weights, outputs)")
    ap.add_argument("--interval", type=float, default=0.2, help="RSS polling interval in seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    w, h = (int(v) for v in args.size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="traitloc_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("traitloc") or str(Path(sys.executable).with_name("traitloc"))
    print(f"work folder {work}", flush=True)
    weights = make_weights(work / f"{args.model}-random.safetensors", args.model)
    pool = work / "pool"
    make_images(pool, max(args.n), (w, h))
    results = []
    try:
        for n in args.n:
            folder = work / f"images_{n}"
            if not folder.exists():
                folder.mkdir()
                for p in sorted(pool.glob("*.jpg"))[:n]:
                    os.link(p, folder / p.name)
            out = work / f"out_{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [exe, "localize", str(folder)]
            for c in CONCEPTS:
                cmd += ["--concept", c]
            cmd += ["--base", BASE, "--model", args.model, "--pretrained", str(weights), "--device", args.device,
                    "--batch-size", str(args.batch_size), "--out", str(out), "--quiet"]  # fmt: skip
            total = n * len(CONCEPTS)
            print(f"N = {n}: {' '.join(cmd[:3])} --concept x{len(CONCEPTS)} --base {BASE} ...", flush=True)
            res = measure(cmd, out / "results.csv", total, args.interval, log_every=60.0)
            rows = _rows(out / "results.csv")
            ok = 0
            if (out / "results.csv").exists():
                import csv

                with open(out / "results.csv", newline="") as f:
                    ok = sum(r["status"] == "ok" for r in csv.DictReader(f))
            store_bytes = sum(f.stat().st_size for f in (out / "results").rglob("*") if f.is_file())
            res.update(n_images=n, n_concepts=len(CONCEPTS), rows=rows, rows_ok=ok,
                       images_per_s=round(n / res["seconds"], 3), store_bytes=store_bytes)  # fmt: skip
            print(
                f"N = {n}: rc {res['returncode']}, peak RSS {res['peak_rss_mb']:.0f} MB "
                f"(polled {res['polled_peak_rss_mb']:.0f} MB; at progress {res['rss_at_progress']}), "
                f"{res['seconds']:.0f} s, {res['images_per_s']:.2f} img/s, {ok}/{total} rows ok",
                flush=True,
            )
            results.append(res)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        record = {
            "benchmark": "memory_localize",
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model,
            "weights": "random (open_clip.create_model(pretrained=None), seed 0), local .safetensors",
            "image_size": [w, h],
            "concepts": CONCEPTS,
            "base": BASE,
            "batch_size": args.batch_size,
            "device": args.device,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "results": results,
        }
        if args.json:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
