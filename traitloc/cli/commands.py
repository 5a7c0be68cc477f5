"""The ``traitloc`` command (DESIGN.md §6). Each subcommand prints progress on long work (``--quiet`` silences
it), exits non-zero with a one-line reason on bad input, and writes ``run.json`` beside its outputs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from traitloc.engine.methods import TEXT_METHODS
from traitloc.pipelines.options import (
    CliError,
    Parser,
    add_model_arguments,
    add_store_arguments,
    gamma_arg,
    positive_int,
    threshold_arg,
)

__all__ = ["main", "build_parser", "CliError"]


def build_parser() -> argparse.ArgumentParser:
    from traitloc import __version__

    parser = Parser(
        prog="traitloc",
        description="Localize visual traits in images and audit species classifiers with Finer-CAM.",
    )
    parser.add_argument("--version", action="version", version=f"traitloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "localize",
        help="where is a trait, by text: concept vs base prompt maps, masks and scores",
        description="Finer-CAM maps of text concepts (compared against a base prompt) for images or folders. "
        "Writes the results store results/part-*.parquet (one row per image and concept: scores and the signed grid "
        "map, rendered to full-size maps, masks and overlays on demand), results.csv and run.json under --out; "
        "rerunning into the same --out skips finished rows.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="TEXT",
        help="a concept prompt, e.g. 'red epaulets' (repeat for several)",
    )
    p.add_argument(
        "--traits",
        metavar="FILE|NAME",
        help="a trait list: built-in name (cub200) or a .csv (prompt column) / .txt (one per line)",
    )
    p.add_argument(
        "--base",
        metavar="TEXT",
        default=None,
        help="base prompt the concept is compared against, e.g. 'bird' (default: none = plain CAM)",
    )
    p.add_argument(
        "--gamma",
        type=gamma_arg,
        default=1.0,
        help="comparison strength: s = s_concept - gamma * s_base (default: 1.0; 0 = plain CAM)",
    )
    p.add_argument(
        "--method",
        choices=TEXT_METHODS,
        default="gradcam",
        help="localization method (default: gradcam); forward-only dense methods and LeGrad for open_clip ViTs: "
        "see docs/methods.md",
    )
    p.add_argument(
        "--template",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt template with {} (repeat to ensemble), e.g. 'a photo of a bird with {}.'",
    )
    p.add_argument(
        "--resize",
        choices=["stretch", "aspect"],
        default="stretch",
        help="stretch: whole image to the model's square input; aspect: keep the aspect ratio "
        "(positional embedding interpolated) (default: stretch)",
    )
    p.add_argument(
        "--threshold", type=threshold_arg, default=0.5, help="mask threshold on the [0,1] map, or 'otsu' (default: 0.5)"
    )
    p.add_argument(
        "--scorecam-channels",
        type=positive_int,
        default=None,
        help="Score-CAM channel budget: the k channels of largest spatial variance (default: all)",
    )
    add_store_arguments(p, "(image, concept)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")  # fmt: skip
    add_model_arguments(p)
    from traitloc.pipelines.distributed import add_ray_arguments

    add_ray_arguments(p)
    for name in SUBCOMMAND_MODULES:
        mod = importlib.import_module(f"traitloc.{name}")
        before = set(sub.choices)
        mod.add_parser(sub)
        for command in set(sub.choices) - before:
            COMMANDS[command] = _module_runner(mod)
    return parser


def _module_runner(mod: Any) -> Any:
    def runner(args: argparse.Namespace, argv: Sequence[str]) -> int:
        return int(mod.run(args, argv))

    return runner


def _run_info(args: argparse.Namespace, argv: Sequence[str], bundle: Any) -> dict[str, Any]:
    from traitloc.io.files import utc_now

    return {
        "command": args.command,
        "argv": list(argv),
        **bundle.describe(),
        "dtype": args.dtype,
        "seed": args.seed,
        "start_utc": utc_now(),
    }


def _concepts(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    from traitloc.models.text import PromptError, check_prompt

    concepts: list[str] = []
    traits: list[str | None] = []
    for c in args.concept:
        try:
            concepts.append(check_prompt(c))
        except PromptError as err:
            raise CliError(f"--concept: {err}") from err
        traits.append(None)
    if args.traits:
        from traitloc.data.traits import load_trait_list

        try:
            tl = load_trait_list(args.traits)
        except (ValueError, FileNotFoundError, OSError) as err:
            raise CliError(f"--traits: {err}") from err
        for t in tl:
            concepts.append(check_prompt(t.prompt))
            traits.append(t.name)
    if not concepts:
        raise CliError("give at least one --concept TEXT or --traits FILE|NAME")
    seen: dict[str, int] = {}
    uc, ut = [], []
    for c, t in zip(concepts, traits, strict=True):
        if c not in seen:
            seen[c] = 1
            uc.append(c)
            ut.append(t)
    return uc, ut


def _cmd_localize(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from traitloc.data.images import find_images
    from traitloc.models.clip import load_clip
    from traitloc.models.localize import ConceptLocalizer
    from traitloc.models.text import PromptError, check_prompt
    from traitloc.pipelines.localize import LocalizeSettings, SettingsMismatchError, run_localize

    concepts, traits = _concepts(args)
    if args.base is not None:
        try:
            args.base = check_prompt(args.base)
        except PromptError as err:
            raise CliError(f"--base: {err}") from err
    try:
        find_images(args.paths)  # fail fast, before loading a model
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from err
    torch.manual_seed(args.seed)
    pretrained = None if str(args.pretrained).lower() in ("none", "") else args.pretrained
    on_ray = getattr(args, "ray", None) is not None
    if on_ray:
        from traitloc.pipelines.distributed import require_ray

        require_ray()  # fail fast, before loading a model
    bundle = load_clip(args.model, pretrained, "cpu" if on_ray else args.device)  # with --ray: the actors compute
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    loc = ConceptLocalizer(
        bundle, args.method, templates=args.template or None, resize=args.resize, amp_dtype=amp,
        scorecam_channels=args.scorecam_channels,
    )  # fmt: skip
    settings = LocalizeSettings(
        concepts=concepts, traits=traits, base=args.base, gamma=args.gamma, batch_size=args.batch_size,
        threshold=args.threshold, save=args.save, quiet=args.quiet, grid_dtype=args.grid_dtype,
    )  # fmt: skip
    try:
        if on_ray:
            from traitloc.pipelines.distributed import run_localize_ray

            counts = run_localize_ray(args, pretrained, loc, settings, _run_info(args, argv, bundle))
        else:
            counts = run_localize(args.paths, args.out, loc, settings, _run_info(args, argv, bundle))
    except SettingsMismatchError as err:
        raise CliError(str(err)) from err
    if not args.quiet:
        print(
            f"traitloc localize: {counts['ok']} images done, {counts['failed']} failed, "
            f"{counts['skipped']} already done -> {args.out}",
            file=sys.stderr,
        )
    return 1 if counts["failed"] and not counts["ok"] and not counts["skipped"] else 0


COMMANDS: dict[str, Any] = {"localize": _cmd_localize}
#: modules that add one subcommand each: ``add_parser(subparsers)`` and ``run(args, argv) -> int``
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pipelines.train",
    "pipelines.explain",
    "pipelines.evaluate",
    "pipelines.evaluate_text",
    "pipelines.audit",
    "pipelines.export",
    "cli.app",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``traitloc`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="traitloc: %(message)s")
    if getattr(args, "quiet", False):
        warnings.filterwarnings("ignore", category=UserWarning, module="open_clip")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from traitloc.io.store import StoreError
    from traitloc.models.clip import ModelLoadError
    from traitloc.models.text import PromptError
    from traitloc.pipelines.distributed import RayUnavailableError

    try:
        return COMMANDS[args.command](args, argv)
    except (CliError, ModelLoadError, PromptError, StoreError, RayUnavailableError) as err:
        print(f"traitloc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"traitloc {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
