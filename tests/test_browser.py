"""The review app in a real browser: ``traitloc app`` serves a ``traitloc localize`` results folder and Debian's
chromium, driven by playwright, accepts a result and downloads the export zip.

Needs ``playwright`` (the Python package; ``playwright install`` is not used) and ``/usr/bin/chromium``; skipped
cleanly otherwise. Saves a screenshot of the Review page; with ``TRAITLOC_UPDATE_SCREENSHOTS=1`` it also replaces
``docs/images/review_app.png`` (the README's), so a plain test run leaves the work tree clean.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
pytest.importorskip("streamlit")
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "review_app.png"
START_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_command() -> list[str]:
    """``traitloc app`` (the registered subcommand), or the same module run directly until it is registered."""
    from traitloc.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "app" in (sub.choices or {}):
        exe = Path(sys.executable).with_name("traitloc")
        return [str(exe), "app"] if exe.is_file() else [sys.executable, "-m", "traitloc.cli", "app"]
    return [sys.executable, "-m", "traitloc.app_cli"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path, tiny_clip_weights: Path) -> Path:
    """A localize results folder (tiny model) whose images (real photos from scikit-image) live inside it."""
    from skimage import data

    from traitloc.cli import main

    root = tmp_path_factory.mktemp("browser") / "results"
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("chelsea", "coffee"):
        im = Image.fromarray(getattr(data, name)())
        im.thumbnail((320, 320))
        im.save(images / f"{name}.png")
    argv = ["localize", str(images), "--concept", "striped fur", "--concept", "round object", "--base", "photo",
            "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights), "--device", "cpu",
            "--out", str(root), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return root


@pytest.fixture
def app_url(results: Path, tiny_clip_config: Path, tiny_clip_weights: Path, tmp_path: Path) -> Iterator[str]:
    """Start ``traitloc app RESULTS_DIR --port P`` and stop it afterwards, whatever happens."""
    port = _free_port()
    cmd = [*_app_command(), str(results), "--port", str(port), "--model", str(tiny_clip_config),
           "--pretrained", str(tiny_clip_weights), "--device", "cpu", "--user", "browser-test"]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    log = (tmp_path / "app.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"traitloc app exited with {proc.returncode}:\n{(tmp_path / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"traitloc app did not start in {START_TIMEOUT:.0f} s:\n{(tmp_path / 'app.log').read_text()}"
                )
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_accept_download_and_screenshot(app_url: str, results: Path, tmp_path: Path) -> None:
    from traitloc.store import ReviewStore

    # the app listens on loopback only
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", int(app_url.rsplit(":", 1)[1]))) == 0

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{app_url}/?page=Review")
            page.get_by_role("heading", name="Review").wait_for()
            accept = page.get_by_role("button", name="Accept", exact=True)
            sync_api.expect(accept).to_have_count(4, timeout=60_000)  # 2 images x 2 concepts, once all drawn
            note = page.get_by_label("Note").first
            note.fill("stripes well covered")
            note.press("Enter")
            page.wait_for_timeout(500)
            accept.first.click()
            download_button = page.get_by_role("button", name="Download accepted (1) as zip")
            download_button.wait_for()
            deadline = time.monotonic() + 30
            while not ReviewStore(results, readonly=True).accepted() and time.monotonic() < deadline:
                time.sleep(0.2)
            accepted = ReviewStore(results, readonly=True).accepted()
            assert len(accepted) == 1
            decision = ReviewStore(results, readonly=True).get(accepted[0])
            assert decision is not None and decision.note == "stripes well covered"
            assert ReviewStore(results, readonly=True).history(accepted[0])[-1].who == "browser-test"

            page.wait_for_function(
                "() => [...document.querySelectorAll('button')].some("
                "b => b.innerText.includes('Download accepted (1)') && !b.disabled)"
            )
            with page.expect_download() as info:
                download_button.click()
            zip_path = tmp_path / "accepted.zip"
            info.value.save_as(zip_path)

            page.wait_for_timeout(500)
            shot = tmp_path / "review_app.png"
            page.screenshot(path=str(shot), full_page=False)
            if os.environ.get("TRAITLOC_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture on request only
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)
        finally:
            browser.close()

    with zipfile.ZipFile(zip_path) as zf:
        masks = sorted(n for n in zf.namelist() if n.startswith("masks/"))
        assert masks == [f"masks/{accepted[0]}.png"]
        for n in masks:
            got = np.asarray(Image.open(io.BytesIO(zf.read(n))))
            np.testing.assert_array_equal(got, np.asarray(Image.open(results / n)))
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
