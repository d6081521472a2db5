"""The project's own promises: packaging in sync, notebooks stripped, `make lab` serves the course."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from flashlab import lab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_environment_yml_names_the_same_requirements_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    named = {r for r in pip_section if not r.startswith("-e")}
    assert named == wanted, f"only in environment.yml: {named - wanted}; only in pyproject: {wanted - named}"
    assert "-e ." in pip_section, "environment.yml must install the project itself (-e .)"


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no chapter"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_what_the_output_filter_commits(path):
    """`make lab` installs nbstripout's git filter; a committed notebook must be its fixed point, or a
    learner's clone shows the notebook modified before any edit."""
    done = subprocess.run(
        [sys.executable, "-m", "nbstripout", "-t", *lab.STRIP_ARGS],
        input=path.read_text(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == json.loads(path.read_text()), (
        f"{path.name}: the filter would change it; run "
        f"`python -m nbstripout {' '.join(lab.STRIP_ARGS)} {path.relative_to(ROOT)}`"
    )


def test_make_lab_installs_the_output_filter(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert lab.install_strip_filter(tmp_path) == 0
    nb = tmp_path / "notebooks" / "a.ipynb"
    nb.parent.mkdir()
    committed = json.loads(NOTEBOOKS[0].read_text())
    run = json.loads(NOTEBOOKS[0].read_text())
    run["metadata"]["language_info"] = {"name": "python", "version": "3.11.7"}
    first = next(c for c in run["cells"] if c["cell_type"] == "code")
    first["execution_count"] = 1
    first["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi\n"}]
    nb.write_text(json.dumps(run))
    staged = subprocess.run(
        ["git", "-C", str(tmp_path), "add", "notebooks/a.ipynb"], capture_output=True, text=True
    )
    assert staged.returncode == 0, staged.stderr
    blob = subprocess.run(
        ["git", "-C", str(tmp_path), "show", ":notebooks/a.ipynb"], capture_output=True, text=True, check=True
    )
    assert json.loads(blob.stdout) == committed, "the filter kept a learner's outputs or kernel details"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_on_the_flashlab_kernel(path):
    kernel = json.loads(path.read_text())["metadata"]["kernelspec"]["name"]
    assert kernel == "flashlab", f"{path.name}: kernelspec is {kernel!r}; `make lab` registers 'flashlab'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_command_serves_the_course(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **__import__("os").environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    proc = subprocess.Popen(
        lab.command(port, open_browser=False, token=token),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/lab?token={token}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, f"JupyterLab exited: {proc.stderr.read().decode()[-2000:]}"
                assert time.monotonic() < deadline, "JupyterLab did not answer on /lab within 90 s"
                time.sleep(0.5)
        assert r.status == 200 and "JupyterLab" in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}") as r:
            listed = {item["name"] for item in json.load(r)["content"]}
        assert {p.name for p in NOTEBOOKS} <= listed, "the server does not serve notebooks/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}") as r:
            assert "flashlab" in json.load(r)["kernelspecs"], "kernel 'flashlab' is not registered"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ruff_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:]


# A float comparison in a chapter goes through flashlab.tolerance (a bound derived from the problem and
# printed with its formula), never a bare limit tuned on one machine's BLAS.
BARE_LIMIT = re.compile(
    r"(?:[<>]=?\s*[0-9.]+e-\d+)|(?:\b(?:atol|rtol)\s*=)|(?:\b(?:allclose|assert_allclose|isclose|approx)\()"
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_float_checks_use_the_tolerance_helper(path):
    nb = json.loads(path.read_text())
    bare = [
        f"cell {i}: {line.strip()}"
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if BARE_LIMIT.search(line.split("#")[0])
    ]
    assert not bare, f"{path.name}: compare floats with flashlab.tolerance, not a bare limit:\n" + "\n".join(
        bare
    )


def test_readme_minutes_are_the_chapters_reading_estimates():
    """The README's "min" column is computed from the chapters (a number in prose is printed by code)."""
    from flashlab.lab import reading_minutes

    table = re.findall(
        r"\| \[`([0-9a-z_]+)`\]\(notebooks/\1\.ipynb\) \| (\d+) \|", (ROOT / "README.md").read_text()
    )
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(stem for stem, _ in table) == [p.stem for p in notebooks], (
        "a chapter missing from the table"
    )
    stale = {s: (int(m), reading_minutes(ROOT / "notebooks" / f"{s}.ipynb")) for s, m in table}
    stale = {s: pair for s, pair in stale.items() if pair[0] != pair[1]}
    assert not stale, f"README minutes (stated, computed) differ; `python -m flashlab.lab minutes`: {stale}"
