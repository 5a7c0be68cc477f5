"""Trait-localization benchmark for text queries (``traitloc evaluate-text``): which method finds the part a trait
prompt names?

Runs on a CUB-layout folder with the user's own open_clip weights and scores every text-query method
(:mod:`traitloc.engine.methods`) against CUB's expert part keypoints: pointing game and energy inside the audit's part
regions, per method and part group. Protocol and outputs (``text_eval.csv``, ``text_eval_summary.csv`` / ``.md``,
``run.json``): ``docs/methods.md`` ("traitloc evaluate-text").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ROW_COLUMNS",
    "SUMMARY_COLUMNS",
    "TextEvalSettings",
    "add_parser",
    "part_group",
    "run",
    "run_text_eval",
    "score_map",
    "summarize",
]

ROW_COLUMNS = [
    "image_id", "image", "class_id", "method", "attribute", "prompt", "part_group", "visible_parts",
    "pointing_hit", "energy_inside", "area_share", "lift", "raw_max", "status",
]  # fmt: skip
ROW_KEY = ["image_id", "method", "attribute"]
SUMMARY_COLUMNS = [
    "method", "part_group", "n_items", "n_images", "pointing_game", "energy_inside", "area_share", "lift",
    "empty_maps",
]  # fmt: skip
EMPTY_MAP = "empty map"
NO_VISIBLE = "no visible part"
_DONE = frozenset({"ok", EMPTY_MAP, NO_VISIBLE})
_PAIRED = {"left wing": "wings", "right wing": "wings", "left eye": "eyes", "right eye": "eyes", "left leg": "legs"}
_PAIRED["right leg"] = "legs"


def part_group(parts: Sequence[str]) -> str:
    """Body-region label of an attribute's parts: left/right pairs merged (``wings``, ``eyes``, ``legs``),
    several parts joined with ``+``, no part: ``whole bird``."""
    names = sorted({_PAIRED.get(p, p) for p in parts})
    return "+".join(names) if names else "whole bird"


@dataclass(frozen=True)
class TextEvalSettings:
    """Settings of a text-localization benchmark (recorded in ``run.json``; a rerun must use the same)."""

    methods: tuple[str, ...]
    split: str = "test"
    base: str = "bird"
    gamma: float = 1.0
    sigma_scale: float = 0.1
    pointing_tolerance: float = 15.0
    whole_bird: bool = False
    limit: int | None = None
    quiet: bool = False

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the rows (everything but the methods, limit and progress)."""
        d = asdict(self)
        d.pop("quiet")
        d.pop("methods")  # methods may be added to a folder later, and images (limit, split) too
        d.pop("limit")
        return d


def score_map(map2d: np.ndarray, region: np.ndarray, pointing_tolerance: float = 15.0) -> dict[str, Any]:
    """Scores of one ReLU map (H, W) against a part region (H, W, bool): pointing hit, energy inside, chance."""
    from traitloc.metrics.maps import energy_inside, pointing_hit

    area = float(region.mean())
    raw_max = float(map2d.max()) if map2d.size else 0.0
    if not raw_max > 0:
        return {"pointing_hit": "", "energy_inside": "", "area_share": area, "lift": "", "raw_max": raw_max,
                "status": EMPTY_MAP}  # fmt: skip
    e = energy_inside(map2d, region)
    hit = float(pointing_hit(map2d, region, pointing_tolerance))
    return {"pointing_hit": hit, "energy_inside": e, "area_share": area, "lift": e / area if area > 0 else "",
            "raw_max": raw_max, "status": "ok"}  # fmt: skip


def _items(
    cub: Any, image_id: int, shape: tuple[int, int], box: tuple[float, ...], traits: list[Any], s: TextEvalSettings
) -> list[dict]:
    """The attributes of one image whose part is visible, with their part regions."""
    from traitloc.metrics.attributes import parts_attribute_map

    locs = cub.part_locs(image_id)
    out = []
    cache: dict[tuple[str, ...], Any] = {}
    for t in traits:
        if not t.parts and not s.whole_bird:
            continue
        if t.parts not in cache:
            cache[t.parts] = parts_attribute_map(shape, locs, t.parts, box, sigma_scale=s.sigma_scale)
        am = cache[t.parts]
        if am is None:  # no visible part
            continue
        out.append({"trait": t, "region": am.region, "visible": am.info.get("visible_parts", [])})
    return out


def run_text_eval(
    cub: Any,
    localizers: Mapping[str, Any],
    out_dir: str | Path,
    settings: TextEvalSettings,
    *,
    run_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; write ``text_eval.csv``, the summaries and ``run.json`` under ``out_dir``.

    Parameters
    ----------
    cub : a :class:`traitloc.data.cub.CUB` reader.
    localizers : method name -> an object with ``explain(images, concepts, base=, gamma=)`` returning, per image,
        maps with ``.map(q)`` (a :class:`~traitloc.models.localize.ConceptLocalizer`; tests pass hand-built ones).
    settings : :class:`TextEvalSettings`.
    run_info : extra entries for ``run.json``.

    Returns
    -------
    dict with ``counts`` (``ok``, ``failed``, ``skipped`` image x method pairs), ``summary`` and ``seconds``.
    """
    import time

    from traitloc.data.images import load_image
    from traitloc.data.traits import load_trait_list
    from traitloc.io.csvlog import ResultsTable
    from traitloc.io.files import atomic_write, to_json, utc_now, write_run_json

    s = settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    table = ResultsTable(out / "text_eval.csv", ROW_COLUMNS, ROW_KEY)
    old = out / "run.json"
    fingerprint = json.loads(to_json(s.fingerprint()))
    if old.is_file() and len(table):
        try:
            before = json.loads(old.read_text()).get("settings")
        except (OSError, json.JSONDecodeError):
            before = None
        changed = sorted(k for k in fingerprint if before is not None and before.get(k) != fingerprint[k])
        if changed:
            raise ValueError(
                f"{out} holds a benchmark made with other settings ({', '.join(changed)}); use a new --out"
            )
    by_name = {t.name: t for t in load_trait_list("cub200")}
    traits = [by_name[n] for n in cub.attribute_names if n in by_name]
    df = cub.split(s.split)
    if s.limit is not None:
        df = df.iloc[: s.limit]
    done = {(r["image_id"], r["method"]) for r in table.rows() if r["status"] in _DONE}  # failures are retried
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    info: dict[str, Any] = dict(run_info or {})
    info.update(
        command=info.get("command", "evaluate-text"), start_utc=info.get("start_utc") or utc_now(), end_utc=None,
        cub_root=str(cub.root), methods=list(s.methods), settings=fingerprint, n_images=len(df), status="running",
    )  # fmt: skip
    write_run_json(out / "run.json", info)
    from tqdm.auto import tqdm

    for r in tqdm(list(df.itertuples(index=False)), desc="evaluate-text", unit="img", disable=s.quiet):
        image_id = int(r.image_id)
        todo = [m for m in s.methods if (str(image_id), m) not in done]
        counts["skipped"] += len(s.methods) - len(todo)
        if not todo:
            continue
        try:
            image = load_image(cub.image_path(image_id)).image  # upright RGB; CUB keypoints are in its pixels
            box = (float(r.x), float(r.y), float(r.width), float(r.height))
            items = _items(cub, image_id, (image.height, image.width), box, traits, s)
        except Exception as err:  # noqa: BLE001 - recorded per image, the run goes on
            counts["failed"] += len(todo)
            table.append(
                [_error_row(r, m, "", f"{type(err).__name__}: {err}") for m in todo]
            )  # fmt: skip
            continue
        prompts = [it["trait"].prompt for it in items]
        for m in todo:
            rows = []
            try:
                if prompts:
                    res = localizers[m].explain([image], prompts, base=s.base, gamma=s.gamma)[0]
                for q, it in enumerate(items):
                    t = it["trait"]
                    sc = score_map(res.map(q), it["region"], s.pointing_tolerance)
                    rows.append(
                        {"image_id": image_id, "image": str(r.path), "class_id": int(r.class_id), "method": m,
                         "attribute": t.name, "prompt": t.prompt, "part_group": part_group(t.parts),
                         "visible_parts": ";".join(it["visible"]), **sc}
                    )  # fmt: skip
                if not rows:  # nothing visible: mark the pair done
                    rows.append(_error_row(r, m, "", NO_VISIBLE))
                counts["ok"] += 1
            except Exception as err:  # noqa: BLE001
                counts["failed"] += 1
                rows = [_error_row(r, m, "", f"{type(err).__name__}: {err}")]
            table.append(rows)
    summary = summarize(_frame(table.rows()))
    atomic_write(out / "text_eval_summary.csv", summary.to_csv(index=False, float_format="%.4g", lineterminator="\n"))
    atomic_write(out / "text_eval_summary.md", summary_markdown(summary, random_weights=info.get("random_weights")))
    info.update(end_utc=utc_now(), status="done", counts=counts, seconds=round(time.time() - t0, 3))
    info["headline"] = {
        str(row.method): {"pointing_game": _f(row.pointing_game), "energy_inside": _f(row.energy_inside),
                          "chance_energy": _f(row.area_share), "n_items": int(row.n_items)}
        for row in summary[summary["part_group"] == "all"].itertuples()
    }  # fmt: skip
    write_run_json(out / "run.json", info)
    return {"counts": counts, "summary": summary, "seconds": time.time() - t0}


def _f(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 4)


def _error_row(r: Any, method: str, attribute: str, status: str) -> dict[str, Any]:
    return {
        "image_id": int(r.image_id), "image": str(r.path), "class_id": int(r.class_id), "method": method,
        "attribute": attribute or "(all)", "prompt": "", "part_group": "", "visible_parts": "", "pointing_hit": "",
        "energy_inside": "", "area_share": "", "lift": "", "raw_max": "", "status": status,
    }  # fmt: skip


def _frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    for c in ("pointing_hit", "energy_inside", "area_share", "lift", "raw_max"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method x part group (and ``all``): items, images, pointing game (empty maps = misses), mean energy
    inside, mean area share (chance), mean lift, empty maps."""
    import pandas as pd

    df = rows[rows["status"].isin(["ok", EMPTY_MAP])].copy()
    out = []
    for (m, g), sub in [*df.groupby(["method", "part_group"]), *((k, v) for k, v in _all_groups(df))]:
        hits = sub["pointing_hit"].fillna(0.0)
        out.append(
            {"method": m, "part_group": g, "n_items": len(sub), "n_images": sub["image_id"].nunique(),
             "pointing_game": float(hits.mean()) if len(sub) else float("nan"),
             "energy_inside": float(sub["energy_inside"].mean()), "area_share": float(sub["area_share"].mean()),
             "lift": float(sub["lift"].mean()), "empty_maps": int((sub["status"] == EMPTY_MAP).sum())}
        )  # fmt: skip
    res = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    return res.sort_values(["method", "part_group"], key=lambda c: c.map(lambda v: (v == "all", v))).reset_index(
        drop=True
    )


def _all_groups(df: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return [((m, "all"), sub) for m, sub in df.groupby("method")]


def summary_markdown(summary: pd.DataFrame, random_weights: bool | None = None) -> str:
    """Pivot tables (part group x method) of the pointing game and of the energy inside the part region."""
    lines = ["# traitloc evaluate-text", ""]
    if random_weights:
        lines += ["**Random weights: these figures are meaningless (they only show that the pipeline runs).**", ""]
    methods = list(dict.fromkeys(summary["method"]))
    groups = sorted(set(summary["part_group"]) - {"all"}) + ["all"]
    for col, title in (("pointing_game", "Pointing game (share of hits)"), ("energy_inside", "Energy inside the part "
                       "region (chance: area share)")):  # fmt: skip
        lines += [f"## {title}", "", "| part group | " + " | ".join(methods) + " | chance (area share) |"]
        lines.append("|---" * (len(methods) + 2) + "|")
        for g in groups:
            sub = summary[summary["part_group"] == g].set_index("method")
            vals = [
                f"{sub.loc[m, col]:.3f}" if m in sub.index and not math.isnan(sub.loc[m, col]) else "" for m in methods
            ]
            chance = sub["area_share"].mean() if len(sub) else float("nan")
            lines.append(f"| {g} | " + " | ".join(vals) + f" | {chance:.3f} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def _methods(text: str) -> tuple[str, ...]:
    from traitloc.engine.methods import TEXT_METHODS

    if text.strip() == "all":
        return TEXT_METHODS
    ms = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in ms if m not in TEXT_METHODS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad)}; choose from all, {', '.join(TEXT_METHODS)}"
        )
    return ms


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate-text`` subcommand and return it."""
    from traitloc.pipelines.options import add_shared, nonneg_float, positive_int

    p = subparsers.add_parser(
        "evaluate-text",
        help="trait-localization benchmark of the text-query methods on a CUB-layout folder",
        description="For every photo of a CUB split and every attribute whose body part is visible, map the "
        "attribute's prompt against --base with each method and score the map against the part's keypoint region "
        "(pointing game, energy inside). Writes text_eval.csv (resumable), text_eval_summary.csv/.md (per method "
        "and part group) and run.json under --out. Use your own weights: with random weights the figures are "
        "meaningless.",
    )
    add_shared(p, "--cub-root")
    p.add_argument(
        "--methods", type=_methods, default=_methods("all"), metavar="LIST",
        help="comma-separated methods, or all (default: all; see docs/methods.md)",
    )  # fmt: skip
    add_shared(p, "--split")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images of the split")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name, hf-hub:org/repo or a config .json")
    p.add_argument(
        "--pretrained", default="laion400m_e32",
        help="pretrained tag or local weights file (.safetensors/.bin/.pt); 'none' for random weights",
    )  # fmt: skip
    p.add_argument("--base", default="bird", help="base prompt (default: bird)")
    p.add_argument("--gamma", type=nonneg_float, default=1.0, help="Finer contrast strength (default: 1.0)")
    p.add_argument("--sigma-scale", type=nonneg_float, default=0.1, help="part-region radius / sqrt(box area) (0.1)")
    p.add_argument("--pointing-tolerance", type=nonneg_float, default=15.0, help="pointing-game tolerance, px (15)")
    p.add_argument("--whole-bird", action="store_true", help="also score whole-bird attributes against the box")
    p.add_argument(
        "--scorecam-channels", type=positive_int, default=64, metavar="K",
        help="Score-CAM channel budget: the K channels of largest spatial variance (default: 64)",
    )  # fmt: skip
    add_shared(p, "--device", "--quiet", "--out")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``traitloc evaluate-text``; bad input raises :class:`traitloc.pipelines.options.CliError`."""
    from traitloc.data.cub import CUB
    from traitloc.io.files import utc_now
    from traitloc.models.clip import load_clip
    from traitloc.models.localize import ConceptLocalizer
    from traitloc.pipelines.options import cli_errors, pretrained_tag, report_counts

    start = utc_now()
    with cli_errors(ValueError, FileNotFoundError):
        if args.sigma_scale <= 0:
            raise ValueError("--sigma-scale must be > 0")
        settings = TextEvalSettings(
            methods=tuple(args.methods), split=args.split, base=args.base, gamma=args.gamma,
            sigma_scale=args.sigma_scale, pointing_tolerance=args.pointing_tolerance, whole_bird=args.whole_bird,
            limit=args.limit, quiet=args.quiet,
        )  # fmt: skip
        cub = CUB(args.cub_root)
        cub.attribute_names, cub.part_locations  # noqa: B018 - fail fast on missing files
    pretrained = pretrained_tag(args.pretrained)
    bundle = load_clip(args.model, pretrained, args.device)
    localizers: dict[str, Any] = {}
    with cli_errors(ValueError, prefix="--methods: "):
        for m in settings.methods:
            localizers[m] = ConceptLocalizer(bundle, m, scorecam_channels=args.scorecam_channels)
            if len(localizers) > 1:  # one text encoder (and its cache) for all methods
                localizers[m].text = next(iter(localizers.values())).text
    run_info = {"command": "evaluate-text", "argv": list(argv), "start_utc": start, **bundle.describe(),
                "random_weights": pretrained is None, "gamma": settings.gamma, "base": settings.base,
                "scorecam_channels": args.scorecam_channels}  # fmt: skip
    with cli_errors(ValueError):
        res = run_text_eval(cub, localizers, args.out, settings, run_info=run_info)
    status = report_counts("evaluate-text", res["counts"], args.out, args.quiet, "image x method pairs", res["seconds"])
    if not args.quiet:
        overall = res["summary"][res["summary"]["part_group"] == "all"]
        if pretrained is None:
            print("  random weights: the figures below are meaningless", file=sys.stderr)
        for row in overall.itertuples():
            print(
                f"  {row.method:>9}: pointing game {row.pointing_game:.3f}, energy inside {row.energy_inside:.3f} "
                f"(chance {row.area_share:.3f}), {row.n_items} items",
                file=sys.stderr,
            )
    return status
