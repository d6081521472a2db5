"""The explorers in a real browser: JupyterLab in headless Chromium, and the static HTML export.

JupyterLab is started with the command ``make lab`` uses (:func:`flashlab.lab.command`) on a free
127.0.0.1 port with temporary config, data, runtime, settings and workspace folders, no news or update
checks and no language server. Chromium runs all cells of every chapter (waiting for an idle kernel
first) and checks that none shows an error or a solution; in ``06_explorers`` and ``02_tiling_numpy``
it moves a slider of each explorer with the keyboard and checks that the figure changed and that no
error or stderr output appeared. Screenshots go to ``build/browser/``.

The HTML export (``make html``: :func:`flashlab.lab.write_html`, static images ranked above widget views
so that an explorer's output shows its figure, and a local MathJax) is opened in the same browser with
every network request refused: figures and math must render.

Needs Debian's ``chromium`` at ``/usr/bin/chromium`` and ``playwright`` (the ``dev`` extra). Without
them these tests skip and say how to enable them; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flashlab import lab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_explorers.ipynb"
STEP_THROUGH = ROOT / "notebooks" / "02_tiling_numpy.ipynb"
SHOTS = ROOT / "build" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USER_SETTINGS = {
    **lab.LAB_SETTINGS,  # what `make lab` ships: no news or update checks
    # the run must not write its outputs into the repository's notebook
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
}
STDERR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
TIMEOUT_MS = 120_000
#: Run All of a whole chapter: the capstone trains a model (about a minute on 2 idle cores, several
#: under load); the wait ends as soon as every cell has run, so a generous limit only delays a failure
RUN_ALL_TIMEOUT_MS = 600_000

pytestmark = pytest.mark.browser


def _require_browser() -> None:
    missing = [] if CHROMIUM.exists() else [f"Chromium at {CHROMIUM}"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if not missing:
        return
    message = (
        f"browser test needs {' and '.join(missing)}: install Debian's chromium "
        "(sudo apt-get install chromium) and the dev extra (pip install -e '.[dev]'); .ci/run does both"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message + " [CI=true: a missing browser is a failure]")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}{path}?token={token}", method=method)
    with urllib.request.urlopen(request, timeout=5) as reply:
        body = reply.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def jupyterlab(browser, tmp_path_factory):
    """``(base_url, token)`` of JupyterLab started as ``make lab`` does; stopped, kernels too, at the end."""
    tmp = tmp_path_factory.mktemp("jupyterlab")
    settings = tmp / "settings"
    for plugin, values in USER_SETTINGS.items():
        path = settings / f"{plugin.replace(':', '/')}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    argv = lab.command(port, open_browser=False, token=token) + [
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        "--ServerApp.jpserver_extensions",
        "jupyter_lsp=False",
    ]
    env = os.environ | {
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
    }
    log_path = tmp / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        for plugin, values in USER_SETTINGS.items():  # the settings above are the ones in force
            in_force = _api(base, token, f"/lab/api/settings/{plugin}")["settings"]
            assert {key: in_force[key] for key in values} == values, plugin
        yield base, token
    finally:
        try:  # kernels run in their own sessions: shut them down through the server first
            for kernel in _api(base, token, "/api/kernels"):
                _api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def _run_all(browser, jupyterlab, name: str, *selectors: str):
    """Chapter ``name`` open in JupyterLab after Run All (kernel idle again, every cell numbered)."""
    base, token = jupyterlab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.problems, page.outside = [], []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith((base, "data:", "blob:")) else page.outside.append(request.url)
        ),
    )
    # a workspace of its own, reset: only this chapter is open (chapters stay open in a shared one)
    page.goto(f"{base}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    _wait_for_idle_kernel(page)
    page.locator(".jp-NotebookPanel .jp-Notebook").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    for selector in selectors:
        page.wait_for_selector(selector)
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""",
        timeout=RUN_ALL_TIMEOUT_MS,
    )
    _wait_for_idle_kernel(page)
    SHOTS.mkdir(parents=True, exist_ok=True)
    return page


@pytest.fixture(scope="module")
def notebook(browser, jupyterlab):
    """The explorer chapter (6) open in JupyterLab after Run All, with every cell executed."""
    page = _run_all(browser, jupyterlab, NOTEBOOK.name, ".flashlab-block-size .widget-slider .noUi-handle")
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def tiling(browser, jupyterlab):
    """Chapter 2, where the step-through lives, after Run All."""
    page = _run_all(
        browser, jupyterlab, STEP_THROUGH.name, ".flashlab-step-through .widget-slider .noUi-handle"
    )
    try:
        yield page
    finally:
        page.close()


def _wait_for_idle_kernel(page) -> None:
    page.wait_for_function(
        """() => [...document.querySelectorAll('.jp-StatusBar-Item')]
                 .some(item => /\\|\\s*Idle/.test(item.textContent))"""
    )


def _assert_no_errors(page) -> None:
    assert page.locator(STDERR_OUTPUT).count() == 0, page.locator(STDERR_OUTPUT).first.inner_text()
    outputs = " ".join(page.locator(".jp-OutputArea").all_inner_texts())
    for sign in ("Traceback", "Error displaying widget", "Exception"):
        assert sign not in outputs, f"{sign!r} in the notebook's outputs"
    assert not page.problems, page.problems


def _wait_for_new_image(image, before: bytes, timeout_s: float = 30) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = image.screenshot()
        if now != before:
            return now
        time.sleep(0.2)
    raise AssertionError("the explorer's figure did not change")


def _wait_for_text(page, locator, text: str) -> None:
    """Until ``locator``'s text is ``text`` (a readout) or starts with it / contains it (a status line)."""
    page.wait_for_function(
        "([el, text]) => el.textContent.trim() === text || el.textContent.includes(text)",
        arg=[locator.element_handle(), text],
    )


def _slider(explorer, label: str):
    """The slider of ``explorer`` whose description is exactly ``label``."""
    labels = explorer.locator(".widget-slider .widget-label").all_inner_texts()
    assert label in labels, f"no slider {label!r} among {labels}"
    return explorer.locator(".widget-slider").nth(labels.index(label))


def _press(page, handle, key: str, times: int = 1) -> None:
    handle.focus()
    for _ in range(times):
        page.keyboard.press(key)


def test_block_size_explorer_redraws_when_a_slider_moves_with_the_keyboard(notebook):
    page = notebook
    explorer = page.locator(".flashlab-block-size")
    image, status = explorer.locator("img").first, explorer.locator(".flashlab-status")
    explorer.scroll_into_view_if_needed()
    _assert_no_errors(page)
    before = image.screenshot()
    page.screenshot(path=str(SHOTS / "block_size_explorer_before.png"))
    n_slider, m_slider, b_c = (_slider(explorer, label) for label in ("N", "SRAM M (KiB)", "B_c"))
    assert n_slider.locator(".widget-readout").inner_text().strip() == "4096"
    _press(page, n_slider.locator(".noUi-handle"), "ArrowRight")
    _wait_for_text(page, n_slider.locator(".widget-readout"), "8192")
    _wait_for_text(page, status, "N = 8192,")  # the kernel redrew for the new N
    after_n = _wait_for_new_image(image, before)
    # M one step down (164 -> 160 KiB): the blocks follow the paper's rule, B_c = ceil(M / 4d) = 160.
    _press(page, m_slider.locator(".noUi-handle"), "ArrowLeft")
    _wait_for_text(page, b_c.locator(".widget-readout"), "160")
    _wait_for_text(page, status, "on chip of 163,840 B")  # 160 KiB
    _wait_for_new_image(image, after_n)
    assert status.inner_text().startswith("fits in SRAM")
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "block_size_explorer_after.png"))
    image.screenshot(path=str(SHOTS / "block_size_figure_after.png"))
    _assert_no_errors(page)


def test_step_through_redraws_with_the_keyboard_and_plays(tiling):
    page = tiling
    explorer = page.locator(".flashlab-step-through")
    image, status = explorer.locator("img").first, explorer.locator(".flashlab-status")
    explorer.scroll_into_view_if_needed()
    before = image.screenshot()
    step = _slider(explorer, "tile visit")
    readout = step.locator(".widget-readout")
    assert readout.inner_text().strip() == "1"
    _press(page, step.locator(".noUi-handle"), "ArrowRight", times=3)
    _wait_for_text(page, readout, "4")
    _wait_for_text(page, status, "fa2, tile visit 4 of 12:")  # the kernel caught up with every key press
    stepped = _wait_for_new_image(image, before)
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "step_through_visit4.png"))
    explorer.get_by_role("button", name="fa1").click()
    _wait_for_text(page, status, "fa1, tile visit 4 of 12:")
    toggled = _wait_for_new_image(image, stepped)
    explorer.locator(".widget-play button").first.click()  # play: the slider advances on its own
    page.wait_for_function("el => Number(el.textContent) >= 5", arg=readout.element_handle())
    _wait_for_new_image(image, toggled)
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "step_through_playing.png"))
    _assert_no_errors(page)


OTHER_CHAPTERS = sorted(
    path.name for path in (ROOT / "notebooks").glob("*.ipynb") if path not in (NOTEBOOK, STEP_THROUGH)
)


@pytest.mark.parametrize("name", OTHER_CHAPTERS)
def test_run_all_completes_every_chapter_with_no_error_and_no_solution(browser, jupyterlab, name):
    page = _run_all(browser, jupyterlab, name)
    try:
        _assert_no_errors(page)
        outputs = " ".join(page.locator(".jp-OutputArea").all_inner_texts())
        assert "def solution" not in outputs and "] correct" not in outputs, f"{name}: a solution shows"
        assert page.outside == [], f"{name} fetched from outside: {page.outside}"
    finally:
        page.close()


def test_jupyterlab_calls_nothing_outside_this_machine(notebook):
    assert notebook.outside == [], "no news, update checks or CDNs: the course works offline"


def test_html_export_shows_the_static_figures_and_math_offline(browser, tmp_path):
    out = tmp_path / "html"
    lab.write_html([NOTEBOOK], out)  # what `make html` runs for every chapter
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    outside = []
    try:
        refuse = lambda route: (outside.append(route.request.url), route.abort())  # noqa: E731
        page.route(re.compile(r"^https?://"), refuse)
        page.goto((out / f"{NOTEBOOK.stem}.html").as_uri(), wait_until="load")
        images = page.locator('img[src^="data:image/png;base64,"]')
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        drawn = len(re.findall(r"widgets\.\w+_(?:explorer|figure)\(", NOTEBOOK.read_text()))
        assert drawn >= 2 and images.count() == drawn, "each explorer and each plain figure, as a PNG"
        widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert all(w > 300 for w in widths), widths
        assert page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count() == 0
        assert "Traceback" not in page.inner_text("body")
        page.wait_for_function(
            "() => window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0"
            " && document.querySelectorAll('.MathJax, .MathJax_Display').length > 0",
            timeout=TIMEOUT_MS,
        )
        raw = page.evaluate(
            "[...document.querySelectorAll('.jp-MarkdownOutput')].map(e => e.innerText).join(' ')"
        )
        assert not re.findall(r"\$[^$\n]+\$", raw), "math left as raw LaTeX"
        assert outside == [], f"the static pages fetched from the network: {outside}"
        SHOTS.mkdir(parents=True, exist_ok=True)
        images.first.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "html_export.png"))
    finally:
        page.close()


@pytest.mark.parametrize(("ci", "outcome"), [(None, pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_browser_skips_with_instructions_but_fails_under_ci(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install chromium"):
        _require_browser()
