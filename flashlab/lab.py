"""The commands behind ``make lab`` and ``make html`` (tests start exactly these commands too).

- ``python -m flashlab.lab [--port PORT] [--no-browser]`` serves the course's ``notebooks/`` on
  127.0.0.1 only. As root (containers, CI) JupyterLab needs ``--allow-root``; it is added then.
- ``python -m flashlab.lab html [--out build/html]`` executes every chapter into static HTML.
- ``python -m flashlab.lab settings`` writes JupyterLab defaults for the course into this environment
  (no news or update checks: the course works offline); ``make lab`` runs it once at setup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# JupyterLab settings the course ships (``overrides.json`` of this environment's JupyterLab).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}

# Images rank above widget views: an explorer's output carries both, and static HTML cannot run widgets.
# (Not ``store_widget_state=False``: nbclient then fails on notebooks with Output widgets, e.g. interact.)
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


def html_command(output_dir: Path, notebooks: list[Path]) -> list[str]:
    """argv that executes ``notebooks`` and writes them as static HTML into ``output_dir``."""
    return [
        sys.executable,
        "-m",
        "jupyter",
        "nbconvert",
        "--to",
        "html",
        "--execute",
        "--ExecutePreprocessor.timeout=600",
        f"--NbConvertBase.display_data_priority={HTML_PRIORITY!r}",
        "--output-dir",
        str(output_dir),
        *map(str, notebooks),
    ]


def install_settings(prefix: Path | None = None) -> Path:
    """Merge :data:`LAB_SETTINGS` into ``<prefix>/share/jupyter/lab/settings/overrides.json``."""
    path = Path(prefix or sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    for plugin, values in LAB_SETTINGS.items():
        current.setdefault(plugin, {}).update(values)
    path.write_text(json.dumps(current, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the flashlab course, or render it to HTML.")
    parser.add_argument("action", nargs="?", default="serve", choices=["serve", "html", "settings"])
    parser.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (default 8888)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.add_argument("--out", type=Path, default=Path("build/html"), help="html: output folder")
    args = parser.parse_args(argv)
    if args.action == "settings":
        print(f"JupyterLab settings for the course written to {install_settings()}")
        return 0
    if args.action == "html":
        args.out.mkdir(parents=True, exist_ok=True)
        return subprocess.call(html_command(args.out, sorted(NOTEBOOKS.glob("*.ipynb"))))
    cmd = command(args.port, open_browser=not args.no_browser)
    os.execv(cmd[0], cmd)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
