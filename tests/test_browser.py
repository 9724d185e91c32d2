"""The onboarding walk-through in a real browser: JupyterLab (started the way
`make lab-ui` starts it) in headless Chromium, the start page and a section notebook
run from the Run menu on the lab; and the HTML record of a run opened offline.
Screenshots go to test-artifacts/."""
from __future__ import annotations

import hashlib
import time

import pytest

from browser_helpers import (block_offsite, browser, clear_all_outputs, ensure_browser, open_notebook, run_all,
                             scroll_to_text, shot, unexecuted_code_cells, wait_for_text, wait_kernel_idle)
from runbook_lib import htmlreport, ui

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def chromium():
    return ensure_browser()


@pytest.fixture(scope="module")
def jupyterlab(lab, state_dir):
    jl = ui.launch(env={"RUNBOOK_STATE_DIR": str(state_dir)}, timeout=60)
    yield jl
    jl.stop()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_walkthrough_in_jupyterlab(jupyterlab, chromium, tmp_path):
    start_nb = ui.NOTEBOOKS / "00-start.ipynb"
    before = _sha(start_nb)
    t0 = time.monotonic()
    with browser(tmp_path / "profile") as ctx:
        offsite = block_offsite(ctx)
        page = ctx.new_page()

        # The start page, as a newcomer opens it: the picture shows before anything runs.
        open_notebook(page, jupyterlab.url("00-start.ipynb", workspace="t-start"), "00-start.ipynb")
        pic = page.locator(".jp-MarkdownOutput img[alt^='The topology']").first
        pic.wait_for(state="visible", timeout=10_000)
        assert pic.evaluate("img => img.complete && img.naturalWidth > 300"), "the topology picture did not load"
        links = page.locator(".jp-MarkdownOutput a[href*='01-rgw.ipynb']")
        assert links.count() >= 1, "the start page links to 01-rgw.ipynb"
        shot(page, "00-start-opened")

        clear_all_outputs(page)
        run_all(page)
        wait_for_text(page, "VERDICT 00-start: PASS", timeout_s=45)
        wait_kernel_idle(page)
        assert unexecuted_code_cells(page) == 0
        # the topology for the parameters was drawn by the code cell too
        page.locator(".jp-RenderedSVG img, .jp-RenderedSVG svg").first.wait_for(state="visible", timeout=10_000)
        scroll_to_text(page, "VERDICT 00-start: PASS")
        shot(page, "00-start-verdict")
        page.close()  # the executed page is not saved: autosave is off

        # A section notebook, idempotent on the lab.
        page = ctx.new_page()
        open_notebook(page, jupyterlab.url("01-rgw.ipynb", workspace="t-rgw"), "01-rgw.ipynb")
        shot(page, "01-rgw-opened")
        clear_all_outputs(page)  # it may ship its expected verdict (nbval): see this run's
        run_all(page)
        wait_for_text(page, "VERDICT 01-rgw: PASS", timeout_s=90)
        wait_kernel_idle(page)
        assert unexecuted_code_cells(page) == 0, "Run All Cells did not run every cell"
        scroll_to_text(page, "VERDICT 01-rgw: PASS")
        shot(page, "01-rgw-verdict")
        page.close()
    assert offsite == [], f"the browser tried to leave the machine: {offsite}"
    assert _sha(start_nb) == before, "00-start.ipynb changed on disk (autosave must be off)"
    assert time.monotonic() - t0 < 150


def test_html_record_renders_offline(run_notebook, chromium, tmp_path):
    nb, out, _ = run_notebook("00-start")
    html = htmlreport.to_html(out, tmp_path / "00-start.html")
    text = html.read_text()
    assert htmlreport.remote_references(text) == []
    assert "VERDICT 00-start: PASS" in text
    with browser(tmp_path / "profile") as ctx:
        offsite = block_offsite(ctx, allowed_hosts=())
        page = ctx.new_page()
        page.goto(html.as_uri(), wait_until="load")
        page.get_by_text("VERDICT 00-start: PASS").first.wait_for(state="visible", timeout=10_000)
        imgs = page.locator("img[src^='data:image/svg+xml']")
        assert imgs.count() >= 2, "the start page's picture and the topology output are in the HTML"
        assert imgs.first.evaluate("img => img.complete && img.naturalWidth > 300")
        shot(page, "00-start-html-record")
        page.locator("img[src^='data:image/svg+xml']").nth(1).scroll_into_view_if_needed()
        shot(page, "00-start-html-record-topology")
    assert offsite == [], f"the HTML record made network requests: {offsite}"
