"""Command-line options shared by the commands, and the error type for bad input.

Argument types (:func:`gamma_arg`, :func:`threshold_arg`, :func:`positive_int`, :func:`save_kinds_arg`) and
option groups (:func:`add_model_arguments`, :func:`add_store_arguments`) used by every command's
``add_parser``; :class:`CliError` is raised for bad input and printed by ``traitloc`` as one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = [
    "SHARED_OPTIONS",
    "CliError",
    "Parser",
    "add_model_arguments",
    "add_shared",
    "add_store_arguments",
    "cli_errors",
    "gamma_arg",
    "nonneg_float",
    "nonneg_int",
    "positive_int",
    "pretrained_tag",
    "report_counts",
    "save_kinds_arg",
    "threshold_arg",
]


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""


@contextmanager
def cli_errors(*errors: type[Exception], prefix: str = "", first_line: bool = False) -> Iterator[None]:
    """Raise the ``errors`` of the ``with`` block as :class:`CliError`: ``prefix`` + the message (its first line)."""
    try:
        yield
    except errors as err:
        text = str(err).splitlines()[0] if first_line else str(err)
        raise CliError(prefix + text) from err


def report_counts(
    command: str, counts: Mapping[str, int], out: Any, quiet: bool, what: str = "images", seconds: float | None = None
) -> int:
    """Print ``traitloc COMMAND: N WHAT done, N failed, N already done [(S s)] -> OUT`` unless ``quiet``.

    Returns the exit status of a run with these ``counts``: 1 when every item failed (none done, now or before).
    """
    if not quiet:
        took = "" if seconds is None else f" ({seconds:.0f} s)"
        print(
            f"traitloc {command}: {counts['ok']} {what} done, {counts['failed']} failed, {counts['skipped']} already "
            f"done{took} -> {out}",
            file=sys.stderr,
        )
    return 1 if counts["failed"] and not counts["ok"] and not counts["skipped"] else 0


def pretrained_tag(text: str | None) -> str | None:
    """The ``--pretrained`` tag or file; ``None`` (random weights) for ``none`` or an empty value."""
    return None if str(text).lower() in ("none", "") else text


class Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit with status 2."""
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def gamma_arg(text: str) -> float:
    """A finite float (the Finer-CAM comparison strength)."""
    try:
        g = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"gamma must be a number, got {text!r}") from err
    if g != g or g in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"gamma must be finite, got {text!r}")
    return g


def threshold_arg(text: str) -> float | str:
    """A mask threshold in [0, 1) or ``'otsu'``."""
    if text == "otsu":
        return text
    try:
        t = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"threshold must be a number in [0, 1) or 'otsu', got {text!r}") from err
    if not 0 <= t < 1:
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1), got {t}")
    return t


def save_kinds_arg(text: str) -> tuple[str, ...]:
    """Comma-separated kinds of per-result files (maps, masks, overlays, signed)."""
    from traitloc.pipelines.localize import SAVE_KINDS

    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in SAVE_KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(bad)}; choose from {', '.join(SAVE_KINDS)}")
    return kinds


def add_store_arguments(p: argparse.ArgumentParser, per: str) -> None:
    """``--save KINDS`` and ``--grid-dtype`` of the commands that write a results store (localize, explain)."""
    p.add_argument(
        "--save",
        type=save_kinds_arg,
        default=(),
        metavar="KINDS",
        help=f"also write files per {per}, comma-separated: maps (float32 TIFF, map / max), masks (PNG), overlays "
        "(PNG), signed (pre-ReLU TIFF); for small runs: the store holds every map already (render on demand with "
        "traitloc export)",
    )
    p.add_argument(
        "--grid-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="how grid maps are stored: float32 renders exactly (default), float16 halves the store",
    )


def _int_from(text: str, least: int, expected: str) -> int:
    try:
        n = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from err
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {n}")
    return n


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_from(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int_from(text, 0, "an integer >= 0")


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (gammas, sigmas and tolerances of ``audit`` and ``evaluate-text``)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


#: options that several commands share word for word: flag -> ``add_argument`` keywords (see :func:`add_shared`)
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "paths": {"nargs": "+", "metavar": "PATH", "help": "image files or folders (searched recursively)"},
    "--cub-root": {"required": True, "metavar": "DIR", "help": "folder holding CUB_200_2011/ (or that folder)"},
    "--split": {"choices": ["test", "train", "all"], "default": "test", "help": "CUB split (default: test)"},
    "--threshold": {
        "type": threshold_arg, "default": 0.5, "help": "mask threshold on the [0,1] map, or 'otsu' (default: 0.5)"
    },
    "--scorecam-channels": {
        "type": positive_int, "default": None,
        "help": "Score-CAM channel budget: the k channels of largest spatial variance (default: all)",
    },
    "--device": {"default": "auto", "help": "auto (CUDA if available), cpu, cuda, cuda:N (default: auto)"},
    "--quiet": {"action": "store_true"},
    "--out": {"required": True, "metavar": "DIR", "help": "output folder"},
}  # fmt: skip


def add_shared(p: Any, *flags: str, quiet: str = "no progress bar") -> None:
    """Add the options ``flags`` (keys of :data:`SHARED_OPTIONS`) to a parser or argument group, in this order.

    ``quiet`` is the help of ``--quiet``.
    """
    for flag in flags:
        p.add_argument(flag, **SHARED_OPTIONS[flag], **({"help": quiet} if flag == "--quiet" else {}))


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model option group: --model, --pretrained, --device, --dtype, --batch-size, --seed."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="ViT-B-16",
        help="open_clip model name (ViT-B-16, RN50, ViT-B-16-quickgelu for OpenAI weights), "
        "hf-hub:imageomics/bioclip, or a path to an open_clip model config .json (default: ViT-B-16)",
    )
    g.add_argument(
        "--pretrained",
        default="laion400m_e32",
        help="pretrained tag (laion400m_e32, needs network) or a local weights file "
        ".safetensors/.bin/.pt (loaded without pickle); 'none' for random weights "
        "(default: laion400m_e32)",
    )
    add_shared(g, "--device")
    g.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 autocast on CUDA (ignored on CPU) (default: fp32)",
    )
    g.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")  # fmt: skip
