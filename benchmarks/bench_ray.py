"""Benchmark: ``traitloc localize`` on the local runner vs on Ray (1 and 2 actors), side by side in one run.

The same command, ``traitloc localize PHOTOS --traits cub200 --base bird`` (312 CUB attribute prompts, Finer
Grad-CAM, gamma 1), over the same real photos from CUB-200-2011 (``--cub``; never copied anywhere), on ViT-B-16 with
random weights (``open_clip.create_model("ViT-B-16", pretrained=None)``, seeded, saved by this script to a
``.safetensors`` file in the work folder) on the CPU:

- ``local``: the embedded runner (:func:`traitloc.pipelines.runner.run_job`);
- ``ray-1``: ``--ray local --ray-actors 1`` (one actor with all the cores);
- ``ray-2``: ``--ray local --ray-actors 2`` (cores split between the actors, torch threads = cores per actor).

Each configuration runs as the real console script in a fresh process into a fresh output folder. Reported per run:
``loop_s`` (the runner's own ``seconds`` in run.json: for the local runner the batch loop, for Ray everything after
connecting, actor start and model load in the actors included), the command's wall time (model loading and Ray start
included), images/s for both, the store's bytes per image, and the load average before and after. The text
embeddings of the 312 prompts are computed once beforehand (one untimed 1-image run) into a shared on-disk cache, so
no configuration pays for them. ``--configs`` sets the runs and their order (default ``local,ray-1,ray-2``).
``--split`` also times the stages of one batch in-process (decode, model, rows, Parquet write; ms per image) and
measures the store's bytes per image with float32 and float16 grids (:func:`stage_split`).

Examples
--------
    . .venv/bin/activate && export HF_HUB_OFFLINE=1
    python benchmarks/bench_ray.py --n 200 --json ray.json
    python benchmarks/bench_ray.py --n 200 --configs ray-2,ray-1,local --json ray_rev.json   # the other order
    python benchmarks/bench_ray.py --n 32 --configs "" --split          # the stages of a batch only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
DEFAULT_CUB = HERE.parent.parent / "shared" / "cub"
CONFIGS = {
    "local": [],
    "ray-1": ["--ray", "local", "--ray-actors", "1"],
    "ray-2": ["--ray", "local", "--ray-actors", "2"],
}


def make_weights(workdir: Path, model: str, seed: int) -> Path:
    """Random open_clip weights (seeded) saved as safetensors in ``workdir``."""
    out = workdir / f"{model}-random-seed{seed}.safetensors"
    if out.exists():
        return out
    import open_clip
    import safetensors.torch
    import torch

    torch.manual_seed(seed)
    m = open_clip.create_model(model, pretrained=None)
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(out))
    return out


def pick_photos(cub: Path, n: int) -> list[Path]:
    """``n`` photos spread evenly over the sorted CUB image list (all classes present in the copy)."""
    root = cub / "CUB_200_2011" / "images"
    if not root.is_dir():
        sys.exit(f"no CUB images under {root} (--cub)")
    photos = sorted(p for p in root.rglob("*.jpg"))
    if len(photos) < n:
        sys.exit(f"only {len(photos)} photos under {root}, asked for {n}")
    step = len(photos) / n
    return [photos[int(i * step)] for i in range(n)]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_one(name: str, photos: list[Path], out: Path, common: list[str], env: dict[str, str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "traitloc.cli", "localize", *map(str, photos), *common, "--out", str(out)]
    argv += CONFIGS[name]
    before = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    n = len(photos)
    parts = sorted((out / "results").glob("part-*.parquet"))
    store_bytes = sum(p.stat().st_size for p in parts)
    rec = {
        "config": name,
        "images": n,
        "ok": info["counts"]["ok"],
        "loop_s": info["seconds"],
        "wall_s": round(wall, 2),
        "loop_img_s": round(n / info["seconds"], 3),
        "wall_img_s": round(n / wall, 3),
        "timing": info.get("timing"),
        "store_bytes": store_bytes,
        "store_parts": len(parts),
        "bytes_per_image": round(store_bytes / n),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "ray": info.get("ray"),
    }
    print(json.dumps({k: v for k, v in rec.items() if k != "ray"}), flush=True)
    return rec


def stage_split(weights: Path, photos: list[Path], model: str, batch: int, workdir: Path) -> dict:
    """Where one batch's time goes inside the job (ms per image): decode, model (the engine), rows (grids to store
    rows with their mask fractions), Parquet write; and the store's bytes per image with float32 and float16 grids.
    Batches of ``photos``, the first a warm-up; the means of the others."""
    import torch

    from traitloc.data.images import image_keys
    from traitloc.data.traits import load_trait_list
    from traitloc.io.store import ResultStore
    from traitloc.models.clip import load_clip
    from traitloc.models.localize import ConceptLocalizer
    from traitloc.pipelines.localize import LocalizeJob, LocalizeSettings
    from traitloc.pipelines.runner import load_or_error

    loc = ConceptLocalizer(load_clip(model, str(weights), "cpu"), "gradcam")
    traits = load_trait_list("cub200")
    concepts = [t.prompt for t in traits]
    s = LocalizeSettings(concepts=concepts, traits=[t.name for t in traits], base="bird", gamma=1.0, quiet=True)
    chunks = [photos[i : i + batch] for i in range(0, len(photos) - batch + 1, batch)]
    if len(chunks) < 2:
        sys.exit(f"--split needs at least 2 batches of photos (--n {2 * batch})")
    job = LocalizeJob(loc, s, image_keys(photos), {"model": model}, workdir / "split")
    stores = {g: ResultStore(workdir / f"split-{g}", job.columns, job.key_columns, g) for g in ("float32", "float16")}
    for st in stores.values():
        shutil.rmtree(st.dir, ignore_errors=True)
    ms = {"decode": 0.0, "model": 0.0, "rows": 0.0, "write": 0.0}
    nbytes = {}
    for i, chunk in enumerate(chunks):
        t0 = time.perf_counter()
        loaded = [load_or_error(p) for p in chunk]
        t1 = time.perf_counter()
        maps = loc.explain([im.image for im in loaded], concepts, "bird", 1.0)
        t2 = time.perf_counter()
        rows = [r for p, im, m in zip(chunk, loaded, maps, strict=True) for r in job._rows(p, im, m)]
        t3 = time.perf_counter()
        part = stores["float32"].write(rows)
        t4 = time.perf_counter()
        if i == 0:
            continue
        for k, v in zip(ms, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            ms[k] += 1000 * v / len(chunk) / (len(chunks) - 1)
        nbytes["float32"] = nbytes.get("float32", 0) + part.stat().st_size / len(chunk) / (len(chunks) - 1)
        f16 = stores["float16"].write(rows).stat().st_size
        nbytes["float16"] = nbytes.get("float16", 0) + f16 / len(chunk) / (len(chunks) - 1)
    rec = {"ms_per_image": {k: round(v, 1) for k, v in ms.items()}, "store_bytes_per_image": nbytes,
           "torch_threads": torch.get_num_threads(), "loadavg": loadavg()}  # fmt: skip
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="photos (default: 200)")
    ap.add_argument("--cub", type=Path, default=DEFAULT_CUB, help=f"CUB data (default: {DEFAULT_CUB})")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--configs", default="local,ray-1,ray-2", help="runs, in this order (default: local,ray-1,ray-2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/traitloc_bench_ray"))
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument(
        "--split", action="store_true", help="also time the stages of one batch in-process (see stage_split)"
    )
    args = ap.parse_args()

    import torch

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"unknown config(s) {bad}; choose from {list(CONFIGS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = make_weights(args.workdir, args.model, seed=0)
    photos = pick_photos(args.cub, args.n)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAITLOC_CACHE_DIR": str(args.workdir / "text_cache")}
    common = ["--traits", "cub200", "--base", "bird", "--model", args.model, "--pretrained", str(weights)]
    common += ["--device", "cpu", "--batch-size", str(args.batch_size), "--quiet"]
    # the 312 text embeddings, once, into the shared cache (untimed)
    run_one("local", photos[:1], args.workdir / "warmup", common, env)
    results = [run_one(c, photos, args.workdir / f"out-{c}", common, env) for c in configs]
    split = None
    if args.split:
        os.environ["TRAITLOC_CACHE_DIR"] = env["TRAITLOC_CACHE_DIR"]
        split = stage_split(weights, photos, args.model, args.batch_size, args.workdir)
    import ray

    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "ray": ray.__version__,
        "cuda": torch.cuda.is_available(),
    }
    local = next((r for r in results if r["config"] == "local"), None)
    print("\n| config | images | loop s | loop img/s | wall s | wall img/s | vs local (loop) | store bytes/image |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = f"{r['loop_img_s'] / local['loop_img_s']:.2f}x" if local else "-"
        print(
            f"| {r['config']} | {r['images']} | {r['loop_s']:.1f} | {r['loop_img_s']:.3f} | {r['wall_s']:.1f} | "
            f"{r['wall_img_s']:.3f} | {rel} | {r['bytes_per_image']:,} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"cub": str(args.cub)}, "runs": results, "split": split},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
