"""``traitloc train-probe``: the paper's classifier, a linear probe on a frozen backbone.

Trained on the CUB train split of the classes that have images, with every image's features cached under
``PROBE_DIR/cache/``; saved as ``probe.safetensors`` + ``probe.json`` (:func:`traitloc.models.probes.save_probe`) with
the backbone spec that :func:`traitloc.models.probes.load_probe_classifier` rebuilds it from. Backbones (open_clip,
EfficientNet-Lite0, ``MODULE:FUNCTION``): ``docs/engine.md`` ("traitloc train-probe").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from traitloc.models.backbones import DEFAULT_MODEL, DEFAULT_PRETRAINED

__all__ = ["keep_freed_memory", "add_parser", "parse_classes", "run", "train_probe_on_cub"]

log = logging.getLogger(__name__)

CACHE_DIR = "cache"


# ------------------------------------------------------------------------------------------------------------------
# process setup for long CPU runs
# ------------------------------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str | None:
    """Ask glibc's allocator to keep freed memory in the process (a command-line setting for long CPU runs).

    CNN activations of a batch are tens of MB; by default glibc serves each from a fresh ``mmap`` and unmaps it on
    free, so every forward pass page-faults its memory in again. On the 2-core machines here that kernel time was
    half of EfficientNet-Lite0's CPU time (76 ms per image at batch 64, 41 ms with this setting). This sets
    ``M_MMAP_MAX = 0`` (no ``mmap`` for allocations) and ``M_TRIM_THRESHOLD = 1 GiB`` with ``mallopt``; the
    process keeps its peak heap until it exits. Best effort: a no-op (returns ``None``) off glibc.

    Returns
    -------
    A description for ``run.json``, or ``None`` when not applied.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
    except (OSError, AttributeError):
        return None
    return "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB" if ok else None


# ------------------------------------------------------------------------------------------------------------------
# training on CUB
# ------------------------------------------------------------------------------------------------------------------
def parse_classes(text: str | None, cub: Any) -> list[int] | None:
    """CUB class ids from ``--classes``: comma-separated ids, ``A-B`` ranges and names (``1-25``, ``17,Cardinal``).

    Returns ``None`` for no selection (all classes that have images).
    """
    if text is None:
        return None
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit():
            a, b = int(lo), int(hi)
            if a > b:
                raise ValueError(f"--classes: empty range {part!r}")
            ids.extend(cub.class_id(i) for i in range(a, b + 1))
        else:
            ids.append(cub.class_id(int(part)) if part.isdigit() else cub.class_id(part))
    if not ids:
        raise ValueError(f"--classes: no class given in {text!r}")
    return list(dict.fromkeys(ids))


def _select_classes(cub: Any, wanted: list[int] | None) -> tuple[list[int], list[str]]:
    """Class ids the probe learns (ascending) and notes about left-out classes; raises for unusable ones."""
    images = cub.images
    present = images[images["exists"]]
    train_counts = present[present["is_train"]]["class_id"].value_counts()
    all_counts = present["class_id"].value_counts()
    listed = images["class_id"].value_counts()
    name = dict(zip(cub.classes["class_id"], cub.classes["name"], strict=True))
    where = cub.base / "images"
    notes: list[str] = []
    if wanted is not None:
        for c in wanted:
            if int(all_counts.get(c, 0)) == 0:
                raise ValueError(
                    f"class {name[c]} has no image files under {where} ({int(listed.get(c, 0))} listed in images.txt)"
                )
        ids = sorted(wanted)
    else:
        ids = sorted(int(c) for c in all_counts.index)
        empty_listed = sorted(int(c) for c in listed.index if int(all_counts.get(c, 0)) == 0)
        if empty_listed:
            shown = ", ".join(name[c] for c in empty_listed[:5]) + (", ..." if len(empty_listed) > 5 else "")
            notes.append(
                f"{len(empty_listed)} class(es) listed in images.txt have no image files and are left out: {shown}"
            )
    no_train = [c for c in ids if int(train_counts.get(c, 0)) == 0]
    if no_train:
        c = no_train[0]
        raise ValueError(
            f"class {name[c]} has {int(all_counts.get(c, 0))} image file(s) but none in the train split, so the probe "
            f"cannot learn it; leave it out with --classes"
        )
    if len(ids) < 2:
        raise ValueError(f"a probe needs at least 2 classes with images; {cub.root} has {len(ids)}")
    return ids, notes


def train_probe_on_cub(
    cub_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bb: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    classes: str | None = None,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 256,
    feature_batch_size: int = 32,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Extract (cached) features of the CUB images of the chosen classes, train the probe, save it.

    Returns
    -------
    dict with ``meta`` (the saved probe JSON), ``counts`` and ``seconds`` (feature extraction, training).
    """
    from traitloc.data.cub import CUB
    from traitloc.data.images import ImageLoadError, load_image
    from traitloc.models.backbones import spec_hash
    from traitloc.models.probes import extract_features, probe_accuracy, save_probe, train_probe
    from traitloc.pipelines.runner import progress as progress_bar

    cub = CUB(cub_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # missing files are counted and reported below
        chosen = parse_classes(classes, cub)
        ids, notes = _select_classes(cub, chosen)
        df = cub.split("all", classes=ids)
    missing = int(cub.images["class_id"].isin(ids).sum()) - len(df)
    if missing:
        notes.append(f"{missing} image(s) of these classes listed in images.txt are missing and skipped")
    class_names = [str(n) for n in cub.classes.set_index("class_id").loc[ids, "name"]]
    index_of = {c: k for k, c in enumerate(ids)}
    preprocess, model = bb["preprocess"], bb["model"]
    device = bb.get("device") or next((p.device for p in model.parameters()), torch.device("cpu"))
    cache = Path(out) / CACHE_DIR / f"features-{spec_hash(spec)}.safetensors"

    failed: dict[str, str] = {}
    rows = [(str(int(i)), cub.image_path(int(i))) for i in df["image_id"]]

    def loader(path: Path) -> Callable[[], Tensor]:
        return lambda: preprocess(load_image(path).image)

    t0 = time.perf_counter()
    bar = progress_bar(len(rows), quiet, "features")
    try:
        while True:
            todo = [(k, p) for k, p in rows if k not in failed]
            try:
                with torch.no_grad():
                    feats = extract_features(
                        model, [loader(p) for _, p in todo], cache, [k for k, _ in todo], spec=dict(spec),
                        batch_size=feature_batch_size, device=device, progress=lambda done, _: bar.update(done - bar.n),
                    )  # fmt: skip
                break
            except ImageLoadError as err:  # recorded and left out; the cache keeps every finished row
                key = next((k for k, p in todo if Path(p) == err.path), None)
                if key is None:
                    raise
                failed[key] = err.reason
                log.warning("%s: %s (left out)", err.path, err.reason)
                bar.reset(total=len(rows) - len(failed))
        bar.update(len(rows) - len(failed) - bar.n)  # cached rows report no progress of their own
    finally:
        bar.close()
    t_feat = time.perf_counter() - t0
    keys = [k for k, _ in rows if k not in failed]
    by_id = df.set_index(df["image_id"].astype(str))
    labels = torch.tensor([index_of[int(by_id.at[k, "class_id"])] for k in keys])
    is_train = torch.tensor([bool(by_id.at[k, "is_train"]) for k in keys])
    if not is_train.any():
        raise ValueError(f"no train-split images could be read under {cub.base / 'images'}")
    t1 = time.perf_counter()
    probe, history = train_probe(
        feats[is_train], labels[is_train], num_classes=len(ids), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
    )
    t_train = time.perf_counter() - t1
    test = ~is_train
    acc = probe_accuracy(probe, feats[test], labels[test]) if test.any() else None
    per_class: dict[str, dict[str, Any]] = {}
    if acc is not None:
        with torch.no_grad():
            pred = probe(feats[test]).argmax(1)
        for k, name in enumerate(class_names):
            sel = labels[test] == k
            n = int(sel.sum())
            per_class[name] = {"n_test": n, "accuracy": float((pred[sel] == k).float().mean()) if n else None}
    train_acc = probe_accuracy(probe, feats[is_train], labels[is_train])
    normalization = "l2" if spec.get("kind") == "open_clip" else "none"
    meta = {
        "class_names": class_names,
        "cub_class_ids": ids,
        "backbone": dict(spec),
        "preprocessing": spec.get("preprocessing"),
        "feature_normalization": normalization,
        "feature_normalization_note": (
            "features are the backbone model's output as is"
            + (" (open_clip: the L2-normalized image embedding)" if normalization == "l2" else "")
        ),
        "test_accuracy": acc,
        "train_accuracy": train_acc,
        "test_accuracy_per_class": per_class,
        "n_train": int(is_train.sum()),
        "n_test": int(test.sum()),
        "training": {
            "optimizer": "Adam",
            "loss": "cross-entropy",
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "weight_decay": 0.0,
            "seed": seed,
            "final_loss": history["loss"][-1] if history["loss"] else None,
            "split": "CUB train_test_split.txt: train (is_train=1) for training, test for test_accuracy",
        },
        "data": {"cub_root": str(cub.root.resolve()), "failed_images": failed, "notes": notes},
        "feature_cache": str(cache.relative_to(out)),
    }
    save_probe(out, probe, meta)
    return {
        "meta": meta,
        "counts": {"images": len(rows), "failed": len(failed), "train": meta["n_train"], "test": meta["n_test"]},
        "seconds": {"features": round(t_feat, 3), "training": round(t_train, 3)},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from err
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train-probe`` to a ``argparse`` subparsers object and return its parser."""
    from traitloc.pipelines.options import add_shared, positive_int

    p = subparsers.add_parser(
        "train-probe",
        help="train the paper's classifier: a linear probe on a frozen backbone, on CUB-200-2011",
        description="Train a linear probe (Adam, cross-entropy) on frozen backbone features of the CUB train split "
        "(classes that have images), report its test-split accuracy, and save probe.safetensors + probe.json "
        "(class names, backbone spec, preprocessing, feature normalization, accuracy, settings) and run.json "
        "into --out. Features of every image are cached under OUT/cache/, so a rerun (other --epochs, --lr, "
        "--seed) needs no backbone pass.",
    )
    add_shared(p, "--cub-root")
    g = p.add_argument_group("backbone (choose --model/--pretrained or --backbone)")
    g.add_argument(
        "--model",
        default=None,
        help=f"open_clip model name, hf-hub:org/repo or a model config .json (default: {DEFAULT_MODEL})",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        metavar="TAG|FILE",
        help=f"open_clip pretrained tag (needs network) or a local weights file; 'none' for random weights "
        f"(default: {DEFAULT_PRETRAINED})",
    )
    g.add_argument(
        "--backbone",
        default=None,
        metavar="MODULE:FUNCTION|efficientnet-lite0",
        help="a function returning model (image batch -> features), target_layer and preprocess (the working "
        "directory is importable), or 'efficientnet-lite0' for ImageNet EfficientNet-Lite0",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="LIST",
        help="CUB classes to learn: ids, ranges and names, e.g. '1-25' or '17,Cardinal' (default: every class "
        "with image files; each chosen class needs train images)",
    )
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default: 100)")
    p.add_argument("--lr", type=_positive_float, default=3e-4, help="Adam learning rate (default: 3e-4)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="probe training minibatch (default: 256)")
    p.add_argument("--feature-batch-size", type=positive_int, default=32, help="images per backbone pass (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe's initialization and shuffling (default: 0)")
    add_shared(p, "--device", "--quiet", quiet="no progress bar or summary")
    p.add_argument("--out", required=True, metavar="PROBE_DIR", help="output folder for the probe")
    return p


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``traitloc train-probe``; bad input raises :class:`traitloc.pipelines.options.CliError` (one line)."""
    from traitloc.io.files import utc_now, write_run_json
    from traitloc.models.backbones import backbone_provenance, build_backbone
    from traitloc.models.clip import ModelLoadError
    from traitloc.pipelines.options import CliError, cli_errors

    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    start = utc_now()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    with cli_errors(FileNotFoundError, ValueError, prefix="--cub-root: "):
        from traitloc.data.cub import CUB

        CUB(args.cub_root)  # fail fast on a bad root, before loading a model
    torch.manual_seed(args.seed)
    allocator = keep_freed_memory()
    with cli_errors(ModelLoadError, ValueError):  # CallableError is a ValueError
        bb, spec = build_backbone(
            model=args.model, pretrained=args.pretrained, backbone=args.backbone, device=args.device
        )
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "command": "train-probe",
        "argv": list(argv),
        "cub_root": str(Path(args.cub_root).resolve()),
        "backbone": spec,
        **backbone_provenance(spec),
        "device": str(bb.get("device")),
        "dtype": "fp32",
        "image_size": pre.get("resize") if isinstance(pre := spec.get("preprocessing"), dict) else None,
        "target_layer": spec.get("target_layer"),
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "allocator": allocator,
        "start_utc": start,
        "end_utc": None,
        "status": "running",
    }
    write_run_json(out / "run.json", info)
    try:
        res = train_probe_on_cub(
            args.cub_root, out, bb, spec, classes=args.classes, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, feature_batch_size=args.feature_batch_size, seed=args.seed, quiet=args.quiet,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:  # ProbeError and FeatureCacheError are ValueErrors
        info.update(status=f"error: {err}", end_utc=utc_now())
        write_run_json(out / "run.json", info)
        raise CliError(str(err).splitlines()[0]) from err
    meta = res["meta"]
    info.update(
        end_utc=utc_now(),
        status="finished",
        classes=meta["class_names"],
        test_accuracy=meta["test_accuracy"],
        train_accuracy=meta["train_accuracy"],
        counts=res["counts"],
        seconds=res["seconds"],
        notes=res["notes"],
    )
    write_run_json(out / "run.json", info)
    if not args.quiet:
        for note in res["notes"]:
            print(f"traitloc train-probe: note: {note}", file=sys.stderr)
        acc = meta["test_accuracy"]
        acc_s = "n/a (no test images)" if acc is None else f"{acc:.4f} ({meta['n_test']} test images)"
        print(
            f"traitloc train-probe: {len(meta['class_names'])} classes, {meta['n_train']} train images; "
            f"test accuracy {acc_s} -> {out}",
            file=sys.stderr,
        )
    return 0
