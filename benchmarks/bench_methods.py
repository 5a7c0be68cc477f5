"""Benchmark: every text-query method, 1 / 16 / 312 prompts, against one plain forward pass and LeGrad's own code.

For each method of the registry that serves text queries on a ViT (``gradcam``, the dense forward-only methods
``maskclip``, ``clearclip``, ``sclip``, ``naclip``, ``gem`` and ``legrad``) and each prompt count P (P concept
prompts vs the base prompt "bird", gamma 1, maps on the patch grid), this times per image:

(m) the method's engine, all P queries in one call (``ConceptLocalizer(bundle, method).engine(x, V, W)``), with the
    text embeddings computed once outside the timed region;
(c) one plain inference forward pass (``model.encode_image(x)`` under ``torch.inference_mode()``): the floor;
(L) for LeGrad, the authors'-style implementation (``tests/refs/authors.py::legrad``, a port of
    ``LeWrapper.compute_legrad_clip``: the image repeated once per prompt, autograd through the last 2 layers).
    Its cost is linear in P; prompt counts above ``--authors-max-prompts`` are extrapolated from the largest
    measured count and marked ``*``.

All peers run once per repetition in a random order, each right after its own plain forward pass (c): the ratio
of a method to one forward is the median over repetitions of these adjacent pairs, in wall time and in the
process's CPU time (``time.process_time``, all threads). On a shared machine the adjacent-pair CPU-time ratio is
the steadiest figure; absolute milliseconds are medians of wall time.

Examples
--------
    python benchmarks/bench_methods.py --repeats 3 --json /tmp/methods.json
    python benchmarks/bench_methods.py --device cuda --repeats 10 --authors-max-prompts 312
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_localize import cpu_model, load_average, load_image, load_prompts, timed  # noqa: E402

METHODS = ("gradcam", "maskclip", "clearclip", "sclip", "naclip", "gem", "legrad")


def build_bundle(device: torch.device, work: Path):
    """A random-weight ViT-B-16 (seed 0) saved as safetensors and loaded through traitloc (as a user would)."""
    import open_clip
    import safetensors.torch

    from traitloc.models.clip import load_clip

    path = work / "vitb16_random_seed0.safetensors"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_clip("ViT-B-16", str(path), device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="1,16,312", help="comma-separated prompt counts")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--authors-max-prompts", type=int, default=16, help="largest P run with the authors' LeGrad")
    ap.add_argument("--work", default="/tmp/traitloc_bench_methods", help="folder for the random weights")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from tests.refs import authors
    from traitloc.engine.cam import finer_coefficients
    from traitloc.models.localize import ConceptLocalizer

    device = torch.device(args.device)
    counts = [int(c) for c in args.prompts.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    bundle = build_bundle(device, Path(args.work))
    model = bundle.model
    x, image_desc = load_image(224, 1)
    x = x.to(device)
    all_prompts, prompt_source = load_prompts(max(counts))
    base_loc = ConceptLocalizer(bundle)
    V_all = base_loc.text.encode([*all_prompts, "bird"])  # (P + 1, D): text once, outside the timed regions
    locs = {m: ConceptLocalizer(bundle, m) for m in methods}

    def inputs(P: int) -> tuple[torch.Tensor, torch.Tensor]:
        V = torch.cat([V_all[:P], V_all[-1:]])
        W = finer_coefficients(P + 1, list(range(P)), [[P]] * P, 1.0)
        return V, W

    def run_plain() -> None:
        with torch.inference_mode():
            model.encode_image(x)

    def run_method(m: str, P: int) -> None:
        V, W = inputs(P)
        locs[m].engine(x, V, W)

    def run_authors(P: int) -> None:
        V, W = inputs(P)
        authors.legrad(bundle.visual, x, W @ V)

    # warm-up
    run_plain()
    for m in methods:
        run_method(m, 1)
    times: dict[str, list[float]] = {"plain": []}
    ratios: dict[str, list[tuple[float, float]]] = {}  # key -> [(wall ratio, cpu ratio)] to the adjacent forward
    jobs: list[tuple[str, object]] = []
    for m in methods:
        for P in counts:
            times[f"{m}|{P}"] = []
            jobs.append((f"{m}|{P}", lambda m=m, P=P: run_method(m, P)))
    authors_counts = [P for P in counts if P <= args.authors_max_prompts] if "legrad" in methods else []
    for P in authors_counts:
        times[f"authors|{P}"] = []
        jobs.append((f"authors|{P}", lambda P=P: run_authors(P)))
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rng = random.Random(0)
    for rep in range(args.repeats):
        order = jobs[:]
        rng.shuffle(order)
        for key, fn in order:
            c0 = time.process_time()
            w_plain = timed(run_plain, device)
            c1 = time.process_time()
            w = timed(fn, device)  # type: ignore[arg-type]
            c2 = time.process_time()
            times["plain"].append(w_plain)
            times[key].append(w)
            ratios.setdefault(key, []).append((w / w_plain, (c2 - c1) / max(c1 - c0, 1e-9)))
        print(f"repetition {rep + 1}/{args.repeats} done (load {load_average()})", file=sys.stderr)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    plain = med["plain"]
    rows = []
    for m in methods:
        for P in counts:
            key = f"{m}|{P}"
            row = {
                "method": m, "prompts": P, "ms": med[key],
                "ratio_wall": statistics.median(r[0] for r in ratios[key]),
                "ratio_cpu": statistics.median(r[1] for r in ratios[key]),
            }  # fmt: skip
            if m == "legrad" and authors_counts:
                if P in authors_counts:
                    row["authors_ms"], row["authors_extrapolated"] = med[f"authors|{P}"], False
                    ours = [r[0] for r in ratios[key]]
                    theirs = [r[0] for r in ratios[f"authors|{P}"]]  # both relative to adjacent forwards
                    row["speedup_vs_authors"] = statistics.median(theirs) / statistics.median(ours)
                else:  # linear in P (one image per prompt): scale the largest measured count
                    ref = max(authors_counts)
                    row["authors_ms"], row["authors_extrapolated"] = med[f"authors|{ref}"] * P / ref, True
                    per_prompt = statistics.median(r[0] for r in ratios[f"authors|{ref}"]) / ref
                    row["speedup_vs_authors"] = per_prompt * P / row["ratio_wall"]
            rows.append(row)
    result = {
        "started_utc": started,
        "device": str(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "ViT-B-16, random weights (seed 0), fp32, 224 px, batch 1",
        "image": image_desc,
        "prompts": prompt_source,
        "repeats": args.repeats,
        "load_average_end": load_average(),
        "plain_forward_ms": plain,
        "rows": rows,
        "raw_seconds": times,
        "raw_ratios_wall_cpu": ratios,
    }
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def markdown(result: dict) -> str:
    lines = [
        f"plain forward (encode_image, inference_mode): {result['plain_forward_ms']:,.1f} ms/img; "
        f"{result['repeats']} repetitions, medians; {result['device']} ({result['cpu']}, {result['threads']} threads)",
        "",
        "| method | P | ms/img (wall, median) | x one forward (wall) | x one forward (CPU time) | authors' LeGrad "
        "ms/img | LeGrad speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        a = s = ""
        if "authors_ms" in r:
            star = "*" if r["authors_extrapolated"] else ""
            a, s = f"{r['authors_ms']:,.1f}{star}", f"{r['speedup_vs_authors']:.1f}x{star}"
        lines.append(
            f"| {r['method']} | {r['prompts']} | {r['ms']:,.1f} | {r['ratio_wall']:.2f} | {r['ratio_cpu']:.2f} | {a} "
            f"| {s} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
