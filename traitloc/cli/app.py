"""``traitloc app``: start the Streamlit review app (``apps/review.py``) on a results folder.

The app is bound to 127.0.0.1 by default, runs headless and sends no usage statistics. RESULTS_DIR and the model
settings reach the app through ``TRAITLOC_APP_*`` environment variables. On POSIX the command *becomes* the
Streamlit server (``exec``), so stopping ``traitloc app`` (Ctrl-C, SIGTERM) stops the server directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_parser", "build_command", "find_app_script", "main", "run"]

#: the ``streamlit run`` options every launch uses (no browser, no telemetry, no code reloading)
STREAMLIT_FLAGS = (
    "--server.headless", "true",
    "--browser.gatherUsageStats", "false",
    "--server.fileWatcherType", "none",
    "--server.runOnSave", "false",
    "--server.enableXsrfProtection", "true",
    "--server.maxUploadSize", "50",
    "--global.developmentMode", "false",
    "--client.toolbarMode", "minimal",
    "--runner.magicEnabled", "false",
)  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add the ``app`` subcommand to the ``traitloc`` parser."""
    p = subparsers.add_parser(
        "app",
        help="review app: review a run's maps as a grid with the keyboard, browse, query concepts, export",
        description="Start the Streamlit review app on 127.0.0.1. Review a localize/explain run (its results store) "
        "as a grid of thumbnails rendered on demand, with keyboard shortcuts, bulk decisions and undo "
        "(RESULTS_DIR/review.sqlite); browse audit verdicts; query concepts on a photo (the model is loaded on "
        "first use); export the accepted set or a filter to RESULTS_DIR/exports/. Photos are read, never written, "
        "where the run recorded them (or under --images); everything the app writes stays under RESULTS_DIR.",
    )
    p.add_argument("results_dir", nargs="?", metavar="RESULTS_DIR", help="results folder (optional: Query only)")
    p.add_argument("--port", type=_port, default=8501, help="port (default: 8501)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; the app has no login, so anyone who can reach a "
        "non-loopback address can read and edit the reviews)",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="a read-only folder where the photos are now, when they moved since the run (searched by "
        "the end of the recorded path, then by file name)",
    )
    p.add_argument(
        "--model",
        default="ViT-B-16",
        help="open_clip model for the Query page: name, hf-hub:..., or config .json (default: ViT-B-16)",
    )
    p.add_argument(
        "--pretrained",
        default="laion400m_e32",
        help="pretrained tag or local weights file (.safetensors/.bin/.pt, no pickle); 'none' for random "
        "weights (default: laion400m_e32)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--user", default=None, help="reviewer name recorded with decisions (default: the OS user)")
    return p


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from err
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {n}")
    return n


def find_app_script() -> Path:
    """Path of ``review.py``: packaged as ``traitloc/apps/review.py``, or ``apps/review.py`` of a source checkout."""
    here = Path(__file__).resolve().parent.parent  # the traitloc package
    for cand in (here / "apps" / "review.py", here.parent / "apps" / "review.py"):
        if cand.is_file():
            return cand
    raise FileNotFoundError("apps/review.py not found next to the traitloc package (install from a source checkout)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def build_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``python -m streamlit run`` command line and the environment that carries the app settings."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(find_app_script()),
        "--server.address", str(args.host), "--server.port", str(args.port), *STREAMLIT_FLAGS,
    ]  # fmt: skip
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("TRAITLOC_APP_")]:
        del env[key]
    settings = {
        "TRAITLOC_APP_RESULTS_DIR": _absolute(args.results_dir),
        "TRAITLOC_APP_IMAGES": _absolute(args.images),
        "TRAITLOC_APP_MODEL": str(Path(args.model).resolve()) if args.model.endswith(".json") else args.model,
        "TRAITLOC_APP_PRETRAINED": _weights(args.pretrained),
        "TRAITLOC_APP_DEVICE": args.device,
        "TRAITLOC_APP_USER": args.user,
    }
    env.update({k: v for k, v in settings.items() if v is not None})
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    return cmd, env


def _weights(pretrained: str) -> str:
    p = Path(pretrained).expanduser()
    return str(p.resolve()) if (os.sep in pretrained or p.suffix in (".safetensors", ".bin", ".pt")) else pretrained


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Check the arguments and start the server (this process becomes it on POSIX); returns its exit status."""
    from traitloc.pipelines.options import CliError

    if importlib.util.find_spec("streamlit") is None:
        raise CliError("the app needs streamlit: pip install 'traitloc[app]'")
    for name, value in (("RESULTS_DIR", args.results_dir), ("--images", args.images)):
        if value is not None and not Path(value).expanduser().is_dir():
            raise CliError(f"{name}: not a folder: {value}")
    try:
        cmd, env = build_command(args)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err
    if not _is_loopback(args.host):
        print(
            f"traitloc app: warning: listening on {args.host}: the app has no login; anyone who can reach "
            f"{args.host}:{args.port} can read the results and change the reviews",
            file=sys.stderr,
        )
    where = f" on {args.results_dir}" if args.results_dir else ""
    print(f"traitloc app: http://{args.host}:{args.port}{where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # pragma: no cover - replaces this process
    import subprocess

    proc = subprocess.Popen(cmd, env=env)  # pragma: no cover - non-POSIX
    try:  # pragma: no cover
        return proc.wait()
    except KeyboardInterrupt:  # pragma: no cover
        proc.terminate()
        return proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m traitloc.cli.app [RESULTS_DIR] ...``: the same as ``traitloc app`` (before it is registered)."""
    from traitloc.pipelines.options import CliError

    parser = argparse.ArgumentParser(prog="traitloc")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["app", *argv])
    try:
        return run(args, argv)
    except CliError as err:
        print(f"traitloc app: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
