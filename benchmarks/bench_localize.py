"""Benchmark: Finer Grad-CAM concept maps for many prompts with traitloc's engine vs per-prompt loops.

For each prompt count P (concept prompts vs the base prompt "bird", Finer Grad-CAM, gamma 1), on one random
open_clip model and the same image(s), this measures per image:

(a) traitloc's engine, all P queries in one call (``FinerCAM(clip_adapter(model.visual))(x, vectors, coeffs)``,
    maps on the patch grid), and the same plus bilinear upsampling of all P maps to the input size;
(b) a per-prompt loop of pytorch-grad-cam's ``GradCAM`` on the same model and target layer (ViT token
    ``reshape_transform``, a custom target computing the Finer objective on the normalized embedding); its output
    is min-max normalized and resized to the input, as that library always does;
(r) the plain full-autograd reference loop (``traitloc.engine.reference.reference_cam``, one backward per query);
(c) one plain inference forward pass (``model.encode_image`` under ``torch.inference_mode()``), the floor.

The loops cost the same per prompt whatever P is, so they are measured on ``--loop-prompts`` prompts per repetition
and extrapolated linearly (the output says so). All peers run once per repetition, in a random order; medians are
reported. Text embeddings are computed once, outside the timed regions.

Examples
--------
    python benchmarks/bench_localize.py --repeats 5 --json out.json                     # CPU, 1 image
    python benchmarks/bench_localize.py --device cuda --batch 32 --dtype bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

BASE_PROMPT = "bird"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# -- inputs ---------------------------------------------------------------------------------------------------------
def load_prompts(n: int) -> tuple[list[str], str]:
    """``n`` concept prompts: the CUB-200 trait prompts first, then synthetic ``"trait i"`` fillers."""
    prompts: list[str] = []
    note = ""
    try:
        from traitloc.data.traits import load_trait_list

        prompts = [t.prompt for t in load_trait_list("cub200")]
        source = f"CUB-200 trait prompts (traitloc.data.traits.load_trait_list('cub200'), {len(prompts)})"
    except Exception as err:  # the list is optional for the benchmark
        source = f"synthetic prompts ('trait 0', ...): CUB trait list unavailable ({type(err).__name__}: {err})"
    if n > len(prompts):
        k = len(prompts)
        prompts = prompts + [f"trait {i}" for i in range(k, n)]
        if k:
            note = f"; prompts {k}..{n - 1} are synthetic ('trait {k}', ...)"
    return prompts[:n], source + note


def load_image(size: int, batch: int) -> tuple[Tensor, str]:
    """A real photo (scikit-image's chelsea), center-cropped, resized and CLIP-normalized; repeated ``batch`` times."""
    try:
        from skimage import data

        img = torch.from_numpy(data.chelsea().copy()).permute(2, 0, 1).float() / 255.0
        desc = "skimage.data.chelsea()"
    except Exception:  # scikit-image missing: a fixed random image
        img = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
        desc = "random image (seed 0)"
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return img[None].repeat(batch, 1, 1, 1).contiguous(), f"{desc}, {size}x{size}, batch {batch}"


# -- timing ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of ``fn`` (CUDA synchronized before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- peers ----------------------------------------------------------------------------------------------------------
class NormalizedEmbedding(nn.Module):
    """The CLIP image tower as a module returning the L2-normalized image embedding (what the score reads)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(x), dim=-1)


class LinearTarget:
    """pytorch-grad-cam target: ``<f(e), u>`` with ``u = v_concept - gamma * v_base`` (the Finer objective)."""

    def __init__(self, u: Tensor):
        self.u = u

    def __call__(self, output: Tensor) -> Tensor:
        return (output * self.u.to(output.dtype)).sum(-1)


def vit_reshape(grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """ViT tokens (B, 1 + h*w, C) -> (B, C, h, w), CLS dropped (float32: numpy has no bfloat16)."""

    def reshape(t: Tensor) -> Tensor:
        B, _, C = t.shape
        return t[:, 1:].reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2).float()

    return reshape


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="open_clip ViT model name (random weights)")
    ap.add_argument("--prompts", default="1,16,312,1000", help="comma-separated prompt counts P")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (peers interleaved in each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1, help="images per batch")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (CUDA only)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--loop-prompts", type=int, default=2, help="prompts the per-prompt loops run per repetition")
    ap.add_argument("--skip-gradcam-loop", action="store_true", help="skip pytorch-grad-cam's loop")
    ap.add_argument("--skip-reference-loop", action="store_true", help="skip the full-autograd reference loop")
    ap.add_argument("--no-upsample", action="store_true", help="skip the upsampling column")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="stage breakdown + torch.profiler of the engine")
    ap.add_argument("--profile-prompts", default="", help="prompt counts to profile (default: the two largest P)")
    ap.add_argument("--json", type=Path, default=None, help="write all samples and medians to this JSON file")
    args = ap.parse_args(argv)

    try:
        counts = sorted({int(p) for p in args.prompts.split(",") if p.strip()})
    except ValueError:
        ap.error(f"--prompts must be comma-separated integers, got {args.prompts!r}")
    if not counts or counts[0] < 1:
        ap.error("--prompts needs positive counts")
    if args.repeats < 1 or args.batch < 1 or args.loop_prompts < 1:
        ap.error("--repeats, --batch and --loop-prompts must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available")
    if args.dtype == "bf16" and device.type != "cuda":
        ap.error("--dtype bf16 is for CUDA (autocast); use fp32 on CPU")
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip

    from traitloc.engine.adapters import clip_adapter
    from traitloc.engine.cam import FinerCAM, finer_coefficients
    from traitloc.engine.reference import reference_cam

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).to(device).eval().requires_grad_(False)
    visual = model.visual
    if not hasattr(visual, "transformer"):
        ap.error(f"{args.model} is not a ViT; this benchmark drives the ViT token layout")
    target = visual.transformer.resblocks[-1].ln_1
    adapter = clip_adapter(visual)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    engine = FinerCAM(adapter, amp_dtype=amp)

    x, image_desc = load_image(args.image_size, args.batch)
    x = x.to(device)
    grid = (args.image_size // adapter.patch[0], args.image_size // adapter.patch[1])

    # text vectors once, outside every timed region
    pmax = counts[-1]
    prompts, prompt_source = load_prompts(pmax)
    tok = open_clip.get_tokenizer(args.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        embs = []
        texts = prompts + [BASE_PROMPT]
        for i in range(0, len(texts), 256):
            embs.append(model.encode_text(tok(texts[i : i + 256]).to(device)).float())
        text = F.normalize(torch.cat(embs), dim=-1)
    text_s = time.perf_counter() - t0
    concept, base = text[:pmax], text[pmax:]

    def inputs(P: int) -> tuple[Tensor, Tensor]:
        V = torch.cat([concept[:P], base])  # (P + 1, D), base last
        W = finer_coefficients(P + 1, list(range(P)), [[P]] * P, args.gamma).to(device)
        return V, W

    problems = {P: inputs(P) for P in counts}
    k = min(args.loop_prompts, pmax)
    loop_V, loop_W = inputs(k)
    loop_u = loop_W @ loop_V  # (k, D) explained query vectors

    # -- the peers, each one callable -----------------------------------------------------------------------------
    def run_plain() -> None:
        with torch.inference_mode(), autocast(device, args.dtype):
            model.encode_image(x)

    def run_engine(P: int) -> tuple[float, float]:
        V, W = problems[P]
        _sync(device)
        t0 = time.perf_counter()
        out = engine(x, V, W)
        _sync(device)
        t1 = time.perf_counter()
        if not args.no_upsample:
            out.upsampled()
            _sync(device)
        return t1 - t0, time.perf_counter() - t1

    gcam = None
    if not args.skip_gradcam_loop:
        from pytorch_grad_cam import GradCAM

        gcam = GradCAM(model=NormalizedEmbedding(model), target_layers=[target], reshape_transform=vit_reshape(grid))
    # frozen parameters: the input must require grad or no gradient reaches the target layer
    x_req = x.detach().clone().requires_grad_(True)

    def run_gradcam_loop() -> None:
        assert gcam is not None
        for q in range(k):
            with autocast(device, args.dtype):
                gcam(input_tensor=x_req, targets=[LinearTarget(loop_u[q])] * args.batch)

    def run_reference_loop() -> None:
        with autocast(device, args.dtype):
            reference_cam(
                model.encode_image, target, x, loop_V, loop_W, normalize=True, layout="vit", grid=grid, method="gradcam"
            )

    # -- interleaved repetitions ----------------------------------------------------------------------------------
    samples: dict[str, list[float]] = {"plain": [], "gradcam_loop_per_prompt": [], "reference_loop_per_prompt": []}
    for P in counts:
        samples[f"engine_{P}"] = []
        samples[f"upsample_{P}"] = []
    loads = [load_average()]
    print(
        f"# traitloc bench_localize: {args.model} (random), {image_desc}, device {device}, dtype {args.dtype}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        flush=True,
    )
    order_rng = random.Random(0)
    for rep in range(args.warmup + args.repeats):
        keep = rep >= args.warmup
        # every peer once per repetition, in a fresh random order: slow drifts in the machine's load and any
        # after-effects of one peer on the next (thread pools, allocator) fall on all peers alike
        tasks: list[tuple[str, int]] = [("plain", 0)] + [("engine", P) for P in counts]
        tasks += [("gradcam", 0)] if gcam is not None else []
        tasks += [("reference", 0)] if not args.skip_reference_loop else []
        order_rng.shuffle(tasks)
        for kind, P in tasks:
            if kind == "engine":
                te, tu = run_engine(P)
                if keep:
                    samples[f"engine_{P}"].append(te)
                    samples[f"upsample_{P}"].append(tu)
                continue
            fn = {"plain": run_plain, "gradcam": run_gradcam_loop, "reference": run_reference_loop}[kind]
            t = timed(fn, device)
            if keep:
                name = {"plain": "plain", "gradcam": "gradcam_loop_per_prompt"}.get(kind, "reference_loop_per_prompt")
                samples[name].append(t if kind == "plain" else t / k)
        tag = "warm-up" if not keep else f"repeat {rep - args.warmup + 1}/{args.repeats}"
        print(f"#   {tag} done (load {load_average()})", file=sys.stderr, flush=True)
    loads.append(load_average())
    if gcam is not None:
        gcam.activations_and_grads.release()

    # -- report ---------------------------------------------------------------------------------------------------
    B = args.batch
    med = {name: statistics.median(v) for name, v in samples.items() if v}
    ms = {name: 1e3 * v / B for name, v in med.items()}  # per image
    rows = []
    for P in counts:
        eng = ms[f"engine_{P}"]
        up = ms[f"upsample_{P}"] if not args.no_upsample else float("nan")
        row = {
            "P": P,
            "engine_ms": eng,
            "engine_upsampled_ms": eng + up,
            "gradcam_loop_ms": ms["gradcam_loop_per_prompt"] * P if gcam is not None else float("nan"),
            "reference_loop_ms": ms["reference_loop_per_prompt"] * P if not args.skip_reference_loop else float("nan"),
            "plain_ms": ms["plain"],
            "loop_extrapolated": P > k,
        }
        row["gradcam_loop_over_engine"] = row["gradcam_loop_ms"] / eng
        row["gradcam_loop_over_engine_upsampled"] = row["gradcam_loop_ms"] / row["engine_upsampled_ms"]
        row["engine_over_plain"] = eng / row["plain_ms"]
        row["engine_upsampled_over_plain"] = row["engine_upsampled_ms"] / row["plain_ms"]
        row["engine_images_per_s"] = 1e3 / eng
        row["plain_images_per_s"] = 1e3 / row["plain_ms"]
        rows.append(row)

    def f(v: float, nd: int = 1) -> str:
        return "n/a" if v != v else f"{v:,.{nd}f}"

    hdr = (
        "| P | (a) engine ms/img | (a+up) +upsample ms/img | (b) grad-cam loop ms/img | (r) reference loop ms/img "
        "| (c) plain fwd ms/img | (b)/(a) | (b)/(a+up) | (a)/(c) | (a+up)/(c) | engine img/s | plain img/s |"
    )
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:

        def loop(v: float, extrapolated: bool = r["loop_extrapolated"]) -> str:
            return f(v) + ("*" if extrapolated and v == v else "")

        lines.append(
            f"| {r['P']} | {f(r['engine_ms'])} | {f(r['engine_upsampled_ms'])} | {loop(r['gradcam_loop_ms'])} "
            f"| {loop(r['reference_loop_ms'])} | {f(r['plain_ms'])} | {f(r['gradcam_loop_over_engine'])} "
            f"| {f(r['gradcam_loop_over_engine_upsampled'])} | {f(r['engine_over_plain'], 2)} "
            f"| {f(r['engine_upsampled_over_plain'], 2)} | {f(r['engine_images_per_s'])} "
            f"| {f(r['plain_images_per_s'])} |"
        )
    notes = [
        f"medians of {args.repeats} interleaved repetitions (peers in a random order each; +{args.warmup} warm-up), "
        f"per image "
        f"(batch {B}); Finer Grad-CAM, concept vs {BASE_PROMPT!r}, gamma {args.gamma}",
        f"* loops measured on {k} prompt(s) per repetition and extrapolated linearly to P "
        f"(per prompt: grad-cam {f(ms.get('gradcam_loop_per_prompt', float('nan')))} ms/img, "
        f"reference {f(ms.get('reference_loop_per_prompt', float('nan')))} ms/img)",
        "(a) maps on the patch grid; (a+up) adds bilinear upsampling of all P maps to the input size; "
        "pytorch-grad-cam's loop always returns normalized maps at the input size",
        f"prompts: {prompt_source}; text encoding ({len(texts)} texts, {text_s:.1f} s) not timed",
        f"load average (1/5/15 min) before: {loads[0]}; after: {loads[1]}",
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs"
        + (f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    ]
    print("\n".join(lines))
    for n in notes:
        print("- " + n)

    profile: dict[str, object] = {}
    if args.profile:
        pcounts = [int(p) for p in args.profile_prompts.split(",") if p.strip()] or counts[-2:]
        profile = run_profile(engine, x, pcounts, inputs, run_plain, device, args)

    if args.json:
        payload = {
            "argv": sys.argv,
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "batch": B,
            "image": image_desc,
            "prompts": prompt_source,
            "loop_prompts": k,
            "load_average_before_after": loads,
            "samples_s": samples,
            "rows": rows,
            "notes": notes,
            "profile": profile,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def run_profile(engine, x: Tensor, counts: list[int], inputs, run_plain, device, args) -> dict[str, object]:
    """Where the engine's time goes: prefix / weights / combine / upsample medians (beside a plain forward pass
    timed in the same repetitions) and a torch.profiler table of one engine call."""
    from torch.profiler import ProfilerActivity, profile, record_function

    out: dict[str, object] = {}
    for P in counts:
        V, W = inputs(P)
        stages: dict[str, list[float]] = {"prefix": [], "gradients": [], "combine": [], "upsample": [], "plain": []}
        for rep in range(args.warmup + args.repeats):
            t_plain = timed(run_plain, device)
            _sync(device)
            t0 = time.perf_counter()
            pre = engine.prefix(x)
            _sync(device)
            t1 = time.perf_counter()
            cache = engine.gradients(pre, V)
            _sync(device)
            t2 = time.perf_counter()
            maps = cache.combine(W, V)
            _sync(device)
            t3 = time.perf_counter()
            if not args.no_upsample:
                maps.upsampled()
            _sync(device)
            t4 = time.perf_counter()
            if rep >= args.warmup:
                for name, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t_plain), strict=True):
                    stages[name].append(v)
        meds = {n: 1e3 * statistics.median(v) / args.batch for n, v in stages.items()}
        print(
            f"\n## engine stages at P={P} (median ms per image; plain = one inference forward pass, same repetitions): "
            + ", ".join(f"{n} {v:.1f}" for n, v in meds.items())
            + f" | load {load_average()}"
        )
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:  # the same work as engine(x, V, W), stage by stage
            with record_function("stage: prefix (forward to the target layer)"):
                pre = engine.prefix(x)
            with record_function("stage: gradients (per-vector Grad-CAM weights)"):
                cache = engine.gradients(pre, V)
            with record_function("stage: combine (Finer coefficients, maps)"):
                cache.combine(W, V)
            _sync(device)
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"  # inclusive: stages on top
        table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=48)
        print(f"## torch.profiler, engine at P={P} (one call, by stage, sorted by {key})\n{table}")
        out[str(P)] = {"stages_ms_per_image": meds, "profiler_table": table}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
