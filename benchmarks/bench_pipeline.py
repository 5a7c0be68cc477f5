"""Benchmark: the whole ``traitloc localize`` pipeline per image vs one plain forward pass (same model, same photos).

For each concept count (1, 16, 312 CUB trait prompts vs the base prompt "bird", Finer Grad-CAM, gamma 1) this runs
the command's own code path (:func:`traitloc.pipelines.localize.run_localize`: decode in a prefetch thread, engine,
results store, results.csv) over the same real photos into a fresh output folder, and reports per image:

- **pipeline**: wall time of the run / number of images, excluding the model load and the one-time text encoding,
  which are measured apart (the text embeddings are encoded once before the timed run; a second run with the same
  weights reads them from the disk cache);
- the runner's breakdown: decode (prefetch thread, overlaps the compute), compute (preprocess + engine), write
  (Parquet part + results.csv, writer thread);
- **plain forward**: ``model.encode_image`` under ``torch.inference_mode()`` on the same images, preprocessed the same
  way, same batch size: the floor a map cannot beat; the ratio pipeline / plain forward is the figure of merit;
- output bytes per image (the store + results.csv + run.json).

The plain forward pass is measured before and after the pipeline runs (the median of the two is the reference), so
drifting machine load shows up. Model: open_clip ViT-B-16 with random weights written to a local ``.safetensors``
(the architecture decides the cost, not the weight values).

Examples
--------
    python benchmarks/bench_pipeline.py --n 200 --json pipeline.json       # 200 CUB photos, 1/16/312 concepts
    python benchmarks/bench_pipeline.py --n 20 --concepts 312 --threads 2  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CUB_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "cub" / "CUB_200_2011" / "images"


def cub_photos(root: Path, n: int) -> list[Path]:
    """``n`` photos spread over the classes present (sorted, deterministic)."""
    if not root.is_dir():
        raise SystemExit(f"CUB images not found at {root} (give --images DIR)")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    per = [sorted(c.glob("*.jpg")) for c in classes]
    out: list[Path] = []
    i = 0
    while len(out) < n and any(i < len(p) for p in per):
        for p in per:
            if i < len(p) and len(out) < n:
                out.append(p[i])
        i += 1
    return out


def make_weights(path: Path, model: str) -> Path:
    if not path.exists():
        import open_clip
        import safetensors.torch

        torch.manual_seed(0)
        m = open_clip.create_model(model, pretrained=None)
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def plain_forward(loc, photos: list[Path], batch: int) -> tuple[float, float, float]:
    """Seconds per image of decode+preprocess, of ``encode_image`` alone (inference mode, same batches), and the
    process CPU seconds per image of ``encode_image``."""
    from traitloc.data.images import load_image

    model = loc.bundle.model.eval()
    t_prep, t_fwd, c_fwd = 0.0, 0.0, 0.0
    for i in range(0, len(photos), batch):
        t0 = time.perf_counter()
        x = torch.stack([loc.to_tensor(load_image(p).image) for p in photos[i : i + batch]])
        t1, c1 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            model.encode_image(x.to(loc.bundle.device))
        t_fwd += time.perf_counter() - t1
        c_fwd += time.process_time() - c1
        t_prep += t1 - t0
    n = len(photos)
    return t_prep / n, t_fwd / n, c_fwd / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="number of photos (default 200)")
    ap.add_argument("--images", type=Path, default=CUB_IMAGES, help="folder of class folders of photos")
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 16, 312], help="concept counts")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--grid-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from traitloc.data.traits import load_trait_list
    from traitloc.models.clip import load_clip
    from traitloc.models.localize import ConceptLocalizer
    from traitloc.pipelines.localize import LocalizeSettings, run_localize

    work = args.work or Path(tempfile.mkdtemp(prefix="traitloc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TRAITLOC_CACHE_DIR"] = str(work / "cache")
    photos = cub_photos(args.images, args.n)
    weights = make_weights(work / f"{args.model}-random.safetensors", args.model)
    prompts = [t.prompt for t in load_trait_list("cub200")]
    prompts = list(dict.fromkeys(prompts))

    t0 = time.perf_counter()
    bundle = load_clip(args.model, str(weights), "cpu")
    load_s = time.perf_counter() - t0
    print(f"{len(photos)} photos from {args.images}; model {args.model} (random weights), load {load_s:.1f} s; "
          f"torch threads {torch.get_num_threads()}; CPU {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    from traitloc.models.text import TextEncoder

    t0 = time.perf_counter()
    TextEncoder(bundle, cache=False).encode([*prompts, "bird"])
    text_cold_s = time.perf_counter() - t0
    print(f"text encoding of {len(prompts) + 1} prompts without the disk cache: {text_cold_s:.1f} s (once per "
          f"weights file and template set; later runs read the disk cache)", flush=True)  # fmt: skip
    loc = ConceptLocalizer(bundle, "gradcam")
    plain_before = plain_forward(loc, photos, args.batch_size)
    print(f"plain forward: {plain_before[1] * 1000:.0f} ms/img (decode+preprocess {plain_before[0] * 1000:.0f})")

    rows = []
    for P in args.concepts:
        concepts = prompts[:P] if P <= len(prompts) else prompts + [f"trait {i}" for i in range(len(prompts), P)]
        loc = ConceptLocalizer(bundle, "gradcam")
        t0 = time.perf_counter()
        loc.text.encode([*concepts, "bird"])  # from the disk cache once filled (cold cost measured above)
        text_s = time.perf_counter() - t0
        out = work / f"run-{P}"
        shutil.rmtree(out, ignore_errors=True)
        settings = LocalizeSettings(concepts=concepts, traits=[None] * len(concepts), base="bird", gamma=1.0,
                                    batch_size=args.batch_size, quiet=True, grid_dtype=args.grid_dtype)  # fmt: skip
        info = {"command": "localize", "argv": ["bench"], **bundle.describe(), "start_utc": None}
        t0, c0 = time.perf_counter(), time.process_time()
        counts = run_localize(photos, out, loc, settings, info)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        run = json.loads((out / "run.json").read_text())
        tm = run["timing"]
        n = len(photos)
        size = folder_bytes(out)
        store = folder_bytes(out / "results")
        rows.append(
            {
                "concepts": P,
                "images": n,
                "ok": counts["ok"],
                "text_encode_s": round(text_s, 2),
                "pipeline_ms_per_img": 1000 * wall / n,
                "pipeline_cpu_ms_per_img": 1000 * cpu / n,
                "decode_ms": 1000 * tm["decode_s"] / n,
                "compute_ms": 1000 * tm["compute_s"] / n,
                "write_ms": 1000 * tm["write_s"] / n,
                "bytes_per_img": size / n,
                "store_bytes_per_img": store / n,
            }  # fmt: skip
        )
        r = rows[-1]
        print(f"P={P:4d}: pipeline {r['pipeline_ms_per_img']:.0f} ms/img (decode {r['decode_ms']:.0f} in the "
              f"prefetch thread, compute {r['compute_ms']:.0f}, write {r['write_ms']:.0f}); "
              f"{r['bytes_per_img'] / 1e3:.0f} kB/img; text embeddings {text_s:.1f} s", flush=True)  # fmt: skip

    loc = ConceptLocalizer(bundle, "gradcam")
    plain_after = plain_forward(loc, photos, args.batch_size)
    fwd = statistics.median([plain_before[1], plain_after[1]])
    fwd_cpu = statistics.median([plain_before[2], plain_after[2]])
    prep = statistics.median([plain_before[0], plain_after[0]])
    print(f"plain forward after: {plain_after[1] * 1000:.0f} ms/img; reference = {fwd * 1000:.0f} ms/img\n")
    print(
        "| concepts | pipeline ms/img | ÷ plain forward | CPU-time ratio | decode* | compute | write | output kB/img |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio_to_forward"] = r["pipeline_ms_per_img"] / (1000 * fwd)
        r["cpu_ratio_to_forward"] = r["pipeline_cpu_ms_per_img"] / (1000 * fwd_cpu)
        print(f"| {r['concepts']} | {r['pipeline_ms_per_img']:.0f} | **{r['ratio_to_forward']:.2f}x** | "
              f"{r['cpu_ratio_to_forward']:.2f}x | "
              f"{r['decode_ms']:.0f} | {r['compute_ms']:.0f} | {r['write_ms']:.0f} | "
              f"{r['bytes_per_img'] / 1e3:.0f} |")  # fmt: skip
    print(f"\nplain forward {fwd * 1000:.0f} ms/img wall, {fwd_cpu * 1000:.0f} ms/img process CPU time "
          f"(+ decode/preprocess {prep * 1000:.0f} ms/img); text encoding {text_cold_s:.1f} s once; model load "
          f"{load_s:.1f} s; * decode runs in the prefetch thread, overlapping compute")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "n": len(photos), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "plain_forward_ms": [plain_before[1] * 1000, plain_after[1] * 1000],
            "plain_forward_cpu_ms": [plain_before[2] * 1000, plain_after[2] * 1000],
            "decode_preprocess_ms": prep * 1000,
            "model_load_s": load_s, "text_encoding_cold_s": text_cold_s, "rows": rows,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
