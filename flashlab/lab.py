"""The JupyterLab command behind ``make lab`` (tests start exactly this command too).

``python -m flashlab.lab [--port PORT] [--no-browser]`` serves the course's ``notebooks/`` on
127.0.0.1 only. As root (containers, CI) JupyterLab needs ``--allow-root``; it is added then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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
        "--ServerApp.port_retries=0" if port else "--ServerApp.port_retries=50",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (default 8888)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    args = parser.parse_args(argv)
    cmd = command(args.port, open_browser=not args.no_browser)
    os.execv(cmd[0], cmd)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
