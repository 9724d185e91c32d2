"""Headless Chromium (Debian's) driven by the Python playwright package, without
`playwright install` (no browser download: executable_path=/usr/bin/chromium).
Every wait is bounded so the suite cannot hang."""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import subprocess
import time
import urllib.parse

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "test-artifacts"
# LAB.md: the toolbar's kernel indicator says idle before a kernel exists; the status bar does not.
KERNEL_IDLE = "Python 3 (ipykernel) | Idle"
TRACEBACK = "Traceback (most recent call last)"


def ensure_browser(timeout: float = 600) -> str:
    """/usr/bin/chromium, apt-installed (Debian package, ~20 s) when missing."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # wait for the dpkg lock: `lab up` may be installing packages at the same time
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", "chromium"]
    r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # a stale package list: update once, retry
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=timeout)
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not os.path.exists(CHROMIUM):
        raise RuntimeError(f"could not install chromium (exit {r.returncode}): {r.stderr[-2000:]}")
    return CHROMIUM


@contextlib.contextmanager
def browser(profile_dir, timeout_ms: int = 30_000, viewport=(1400, 1000)):
    """A fresh Chromium profile (launch_persistent_context: --user-data-dir in args is refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile_dir), executable_path=ensure_browser(), headless=True, args=FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]}, timeout=timeout_ms)
        ctx.set_default_timeout(timeout_ms)
        ctx.set_default_navigation_timeout(timeout_ms)
        try:
            yield ctx
        finally:
            ctx.close()


def block_offsite(ctx, allowed_hosts=("127.0.0.1", "localhost")) -> list[str]:
    """Abort every request that would leave the machine; returns the (live) list of their URLs."""
    blocked: list[str] = []

    def handle(route):
        url = route.request.url
        u = urllib.parse.urlsplit(url)
        if u.scheme in ("file", "data", "blob", "about") or u.hostname in allowed_hosts:
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    ctx.route("**/*", handle)
    return blocked


def shot(page, name: str) -> pathlib.Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def open_notebook(page, url: str, name: str, timeout_ms: int = 45_000):
    """Open a notebook URL (give it a fresh workspace: restored tabs would own the status bar)
    and wait until it is the only notebook, active, and its kernel really idle (status bar)."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=timeout_ms)
    page.wait_for_function(
        "n => { const t = document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tab');"
        " const a = document.querySelector('#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current');"
        " return t.length === 1 && a && a.textContent.includes(n); }", arg=name, timeout=timeout_ms)
    wait_kernel_idle(page, timeout_ms)


def status_bar(page) -> str:
    return page.evaluate("() => (document.querySelector('#jp-main-statusbar') || {}).textContent || ''")


def wait_kernel_idle(page, timeout_ms: int = 45_000):
    page.wait_for_function(
        "t => ((document.querySelector('#jp-main-statusbar') || {}).textContent || '').includes(t)",
        arg=KERNEL_IDLE, timeout=timeout_ms)


def run_all(page):
    """Run > Run All Cells, from the menu bar (as a newcomer would)."""
    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def clear_all_outputs(page):
    """Edit > Clear Outputs of All Cells: a notebook may ship expected outputs (nbval);
    a verdict seen after this comes from this run."""
    page.locator("#jp-menu-panel .lm-MenuBar-item", has_text=re.compile(r"^Edit$")).click()
    page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel",
                 has_text=re.compile(r"^Clear Outputs of All Cells$")).click()
    page.wait_for_function("() => !document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                           ".jp-OutputArea-output')", timeout=10_000)


def unexecuted_code_cells(page) -> int:
    """Code cells of the active notebook whose prompt has no execution count."""
    return page.evaluate(
        "() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell "
        ".jp-InputArea-prompt')].filter(p => !/\\[\\d+\\]/.test(p.textContent)).length")


def notebook_text(page) -> str:
    return page.evaluate(
        "() => { const p = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');"
        " return p ? p.textContent : ''; }")


def wait_for_text(page, text: str, timeout_s: float = 60, fail_on=(TRACEBACK,)) -> str:
    """Poll the active notebook's text until `text` shows; fail fast on a traceback.
    Returns the notebook's text."""
    deadline = time.monotonic() + timeout_s
    while True:
        t = notebook_text(page)
        if text in t:
            return t
        for bad in fail_on:
            if bad in t:
                raise AssertionError(f"{bad!r} in the notebook while waiting for {text!r}:\n{_around(t, bad)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not appear within {timeout_s:.0f} s; status bar: "
                                 f"{status_bar(page)!r}; end of notebook text:\n{t[-1500:]}")
        page.wait_for_timeout(250)


def scroll_to_text(page, text: str):
    """Scroll the notebook so the output holding `text` is in view (for the screenshot)."""
    loc = page.locator(".jp-OutputArea-output", has_text=text).last
    loc.scroll_into_view_if_needed(timeout=5_000)
    return loc


def _around(text: str, needle: str, n: int = 1200) -> str:
    i = text.find(needle)
    return text[max(0, i - 300): i + n]
