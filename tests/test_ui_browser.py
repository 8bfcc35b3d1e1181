"""The studio in a real browser: Debian's Chromium driven by Playwright's Python API.

Opens the page, sets a label, clicks Generate, waits for the gallery to show an image, runs a two-model
comparison on the Compare tab and saves screenshots that must not be blank. Skips (with the reason) when
Chromium or playwright is missing, unless DIT_REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure.
DIT_UPDATE_SCREENSHOTS=1 also copies the screenshots to docs/ (the README's pictures).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[1] / "docs"
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is not installed (pip install -e '.[ui]')"
    return None


def _require_browser() -> None:
    reason = _missing()
    if reason:
        if os.environ.get("DIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DIT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    from ui.app import free_port

    port = free_port(range(7879, 7859, -1))
    if port is None:
        pytest.skip("no free port in 7860-7879")
    return port


def _not_blank(path: Path) -> None:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert arr.shape[0] > 300 and arr.shape[1] > 300, arr.shape
    assert arr.std() > 5 and len(np.unique(arr)) > 20, f"{path} looks blank"


def test_generate_and_compare_in_chromium(tmp_path):
    _require_browser()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from playwright.sync_api import sync_playwright

    from ui.app import CSS, build_demo
    from ui.context import Studio

    ctx = Studio(tmp_path / "models", tmp_path / "outputs")
    demo = build_demo(ctx).queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(ctx.outputs_dir)], css=CSS)
    shots = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#gen-go").wait_for(timeout=60_000)
            # a label: type "3" in the multiselect and take the option
            labels = page.locator("#gen-labels input")
            labels.click()
            page.get_by_role("option", name="3", exact=True).click()
            page.keyboard.press("Escape")
            per_label = page.locator("#gen-per-label input")
            per_label.fill("5")
            per_label.press("Tab")
            steps = page.locator("#gen-steps input")
            steps.fill("8")
            steps.press("Tab")
            page.locator("#gen-go").click()
            page.locator("#gen-gallery img").first.wait_for(state="visible", timeout=120_000)
            page.locator("#gen-gallery img").nth(4).wait_for(state="visible", timeout=30_000)
            assert page.locator("#gen-gallery img").count() == 5
            page.wait_for_timeout(500)
            shots["generate"] = tmp_path / "studio-generate.png"
            page.screenshot(path=str(shots["generate"]), full_page=True)

            page.get_by_role("tab", name="Compare").click()
            cmp_steps = page.locator("#cmp-steps input")
            cmp_steps.wait_for(timeout=30_000)
            cmp_steps.fill("6")
            cmp_steps.press("Tab")
            page.locator("#cmp-go").click()
            page.locator("#cmp-grids img").nth(1).wait_for(state="visible", timeout=180_000)
            assert page.locator("#cmp-grids img").count() == 2
            page.locator("#cmp-table").get_by_text("dit-digits").first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            shots["compare"] = tmp_path / "studio-compare.png"
            page.screenshot(path=str(shots["compare"]), full_page=True)
            browser.close()
    finally:
        demo.close()
    for path in shots.values():
        _not_blank(path)
    gen_files = list((ctx.outputs_dir / "generate").glob("*/0000-class3-seed0.png"))
    assert gen_files, "the page's Generate did not write the PNG of class 3"
    if os.environ.get("DIT_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        for path in shots.values():
            shutil.copy(path, DOCS / path.name)
