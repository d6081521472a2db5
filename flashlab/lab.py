"""The commands behind ``make lab`` and ``make html`` (tests start exactly these commands too).

- ``python -m flashlab.lab [--port PORT] [--no-browser]`` serves the course's ``notebooks/`` on
  127.0.0.1 only. As root (containers, CI) JupyterLab needs ``--allow-root``; it is added then.
- ``python -m flashlab.lab html [--out build/html]`` executes every chapter into static HTML that needs no
  network (local MathJax, embedded figures).
- ``python -m flashlab.lab strip-filter`` installs nbstripout's git filter into this clone (``make lab`` runs
  it): outputs, execution counts and the kernel's language details never reach git, so a learner's runs
  leave ``git status`` clean and ``git pull`` free of conflicts.
- ``python -m flashlab.lab minutes`` prints each chapter's reading estimate (:func:`reading_minutes`), the
  README's "min" column.
- ``python -m flashlab.lab settings`` writes JupyterLab defaults for the course into this environment
  (no news or update checks: the course works offline); ``make lab`` runs it once at setup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TEMPLATES = Path(__file__).resolve().parent / "templates"
# What git's filter strips from a notebook (committed notebooks are its fixed points; a test checks).
STRIP_ARGS = ["--keep-id", "--extra-keys", "metadata.language_info"]
CELL_TIMEOUT_S = 300  # per cell; simulator cells are kept tiny, so this only catches hangs

# JupyterLab settings the course ships (``overrides.json`` of this environment's JupyterLab).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}

# Images rank above widget views: an explorer's output carries both, and static HTML cannot run widgets.
HTML_PRIORITY = [
    "application/javascript",
    "text/html",
    "text/markdown",
    "image/svg+xml",
    "text/vnd.mermaid",
    "text/latex",
    "image/png",
    "image/jpeg",
    "application/vnd.jupyter.widget-view+json",
    "text/plain",
]


def command(port: int = 8888, *, open_browser: bool = True, token: str | None = None) -> list[str]:
    """argv that starts JupyterLab on ``notebooks/`` at ``http://127.0.0.1:<port>/lab``.

    ``token=None`` keeps Jupyter's own random token (printed in the log); tests pass their own.
    """
    argv = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--notebook-dir={NOTEBOOKS}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        # no calls home: the course works offline
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if not open_browser:
        argv.append("--no-browser")
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    return argv


class HeadlessClient(NotebookClient):
    """nbclient without its front-end mimic of the Output widget: the cause of a stall of one timeout.

    nbclient answers each output an ``Output`` widget captures (``widgets.interactive`` draws into one) by
    sending the widget's new state to the kernel on the shell socket, from the task that reads IOPub, while
    another task awaits ``poll()`` on that same socket for the cell's reply. A ZeroMQ socket signals
    readability on its file descriptor edge-triggered, and a ``send`` on the socket can consume the edge of
    a reply that has just arrived; the pending ``poll()`` then sleeps until its timeout, polls once more and
    finds the reply waiting. The run goes on with no error, one timeout late (seen: 299.5 s at
    ``timeout=300``). Without the mimic nothing is ever sent during a cell, so this cannot happen; the
    widget's captured output then lands in the cell's own outputs, which is what static HTML should show.
    """

    def __init__(self, nb, **kw):
        super().__init__(nb, **kw)
        self.widget_registry = {}


def run_notebook(path: Path, *, timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` headless in its folder on the ``flashlab`` kernel.

    Returns ``(nb, cell_seconds, wall_seconds)``: the executed notebook, the kernel-side run time of each
    code cell (busy to idle, from the kernel's own message timestamps) and the wall time of the whole run.
    ``make test``, ``make html`` and CI all execute chapters through this function.
    """
    nb = nbformat.read(path, as_version=4)
    client = HeadlessClient(
        nb,
        timeout=timeout,
        kernel_name="flashlab",
        record_timing=True,
        store_widget_state=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    started = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - started
    cells = []
    for cell in nb.cells:
        times = cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type == "code" and times:
            busy, idle = (datetime.fromisoformat(times[f"iopub.status.{k}"]) for k in ("busy", "idle"))
            cells.append((idle - busy).total_seconds())
    return nb, cells, wall


def mathjax_files() -> Path:
    """The folder of the local MathJax 2 copy (package ``jupyter-server-mathjax``) static pages load."""
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def write_html(notebooks: list[Path], output_dir: Path) -> list[Path]:
    """Execute ``notebooks`` and write them as static HTML pages that need no network.

    Math is typeset by a copy of MathJax in ``output_dir/mathjax``; figures are embedded PNGs.
    """
    from nbconvert import HTMLExporter

    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(mathjax_files(), output_dir / "mathjax", dirs_exist_ok=True)
    exporter = HTMLExporter(
        template_name="course",
        extra_template_basedirs=[str(TEMPLATES)],
        mathjax_url="mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe",
    )
    exporter.display_data_priority = HTML_PRIORITY
    pages = []
    for path in notebooks:
        print(f"executing {path.name} ...", flush=True)
        nb, _, wall = run_notebook(path)
        page = output_dir / f"{path.stem}.html"
        page.write_text(exporter.from_notebook_node(nb)[0], encoding="utf-8")
        print(f"  wrote {page} ({wall:.0f} s)", flush=True)
        pages.append(page)
    return pages


def install_settings(prefix: Path | None = None) -> Path:
    """Merge :data:`LAB_SETTINGS` into ``<prefix>/share/jupyter/lab/settings/overrides.json``."""
    path = Path(prefix or sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    for plugin, values in LAB_SETTINGS.items():
        current.setdefault(plugin, {}).update(values)
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path


def install_strip_filter(root: Path) -> int:
    """Make git see notebooks through nbstripout (this clone only: ``.git/config``, ``.git/info``)."""
    if not (root / ".git").is_dir():
        print("not a git clone: no output filter needed")
        return 0
    clean = " ".join([f'"{sys.executable}"', "-m", "nbstripout", *STRIP_ARGS])
    for key, value in {"clean": clean, "smudge": "cat", "required": "true"}.items():
        subprocess.run(["git", "-C", str(root), "config", f"filter.nbstripout.{key}", value], check=True)
    attributes = root / ".git" / "info" / "attributes"
    attributes.parent.mkdir(exist_ok=True)
    line = "notebooks/*.ipynb filter=nbstripout"
    if line not in (attributes.read_text().splitlines() if attributes.exists() else []):
        with attributes.open("a") as f:
            f.write(line + "\n")
    print("git now ignores notebook outputs in this clone (nbstripout filter)")
    return 0


WORDS_PER_MINUTE, CODE_LINES_PER_MINUTE = 200, 20


def reading_minutes(path: Path) -> int:
    """A chapter's reading estimate: its markdown words at 200 a minute plus its non-blank code lines at
    20 a minute, rounded to the nearest minute (an estimate, not a timed reading; exercises extra)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    lines = sum(sum(1 for x in c.source.splitlines() if x.strip()) for c in nb.cells if c.cell_type == "code")
    return int(words / WORDS_PER_MINUTE + lines / CODE_LINES_PER_MINUTE + 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the flashlab course, or render it to HTML.")
    parser.add_argument(
        "action", nargs="?", default="serve", choices=["serve", "html", "settings", "strip-filter", "minutes"]
    )
    parser.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (default 8888)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.add_argument("--out", type=Path, default=Path("build/html"), help="html: output folder")
    args = parser.parse_args(argv)
    if args.action == "settings":
        print(f"JupyterLab settings for the course written to {install_settings()}")
        return 0
    if args.action == "strip-filter":
        return install_strip_filter(NOTEBOOKS.parent)
    if args.action == "minutes":
        for path in sorted(NOTEBOOKS.glob("*.ipynb")):
            print(f"{path.stem}: {reading_minutes(path)} min")
        return 0
    if args.action == "html":
        write_html(sorted(NOTEBOOKS.glob("*.ipynb")), args.out)
        return 0
    cmd = command(args.port, open_browser=not args.no_browser)
    os.execv(cmd[0], cmd)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
