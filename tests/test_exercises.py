"""Every exercise, one way: its solution passes, an unattempted stub does not fail, it is used and indexed.

Chapter-specific wrong answers (each rejected with the right words) are tested next to each chapter's
code (this file checks that such a test exists); this file holds what every exercise must satisfy,
whichever chapter registered it.

The README's exercise index is a section whose heading contains "Exercise" and which names every
exercise in backticks on some line, e.g. a table row ``| `online_update` | 1 | the online softmax step |``.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from flashlab import check

ROOT = Path(__file__).resolve().parents[1]

check._load_chapters()
NAMES = sorted(check.EXERCISES)


def _notebook_code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def _checked_in(name: str) -> list[str]:
    """Names of the notebooks with a ``check("name", ...)`` call (any quote, any prefix)."""
    pattern = re.compile(r"check\(\s*[\"']" + re.escape(name) + r"[\"']")
    return [p.name for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if pattern.search(_notebook_code(p))]


def _readme_index() -> str:
    """The README's exercise-index section: from a heading containing "Exercise" to the next heading
    of the same or a higher level ("" when there is none)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for start, line in enumerate(lines):
        heading = re.match(r"(#+)\s", line)
        if heading and "exercise" in line.lower():
            level = len(heading.group(1))
            end = next(
                (k for k in range(start + 1, len(lines)) if re.match(rf"#{{1,{level}}}\s", lines[k])),
                len(lines),
            )
            return "\n".join(lines[start:end])
    return ""


def test_exercises_are_registered():
    assert NAMES, "no exercise is registered: each chapter registers its own in flashlab/exercises/"


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_its_checker(name, capsys):
    ex = check.EXERCISES[name]
    ex.checker(ex.solution)  # raises Mistake, naming what is wrong, if the solution were rejected
    assert check.check(name, ex.solution) is True
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_unattempted_stub_reports_and_does_not_fail(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError

    assert check.check(name, stub) is False
    assert "not attempted" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_solution_is_shown_on_request(name, capsys):
    src = check.show_solution(name)
    assert src.strip() and src in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_exercise_is_used_in_its_chapter_notebook(name):
    chapter = check.EXERCISES[name].chapter
    users = _checked_in(name)
    assert users, f"exercise {name!r} is checked in no notebook (no check({name!r}, ...) call)"
    assert any(u.startswith(f"{chapter:02d}_") for u in users), (
        f"exercise {name!r} is registered for chapter {chapter} but checked only in {users}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_exercise_is_in_the_readme_index(name):
    index = _readme_index()
    assert index, "README.md has no exercise index (a heading containing 'Exercise')"
    assert f"`{name}`" in index, f"README.md's exercise index does not name `{name}`"


def _tests_wrong_answers(path: Path, name: str) -> bool:
    """Does the test file name exercise ``name`` (quoted) and expect a ``Mistake``?"""
    text = path.read_text(encoding="utf-8")
    return re.search(rf"[\"']{re.escape(name)}[\"']", text) is not None and "Mistake" in text


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answers_are_tested_by_the_chapter(name):
    chapter_tests = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name != Path(__file__).name]
    assert any(_tests_wrong_answers(p, name) for p in chapter_tests), (
        f"no chapter test rejects a wrong answer to {name!r} (pytest.raises(check.Mistake, ...))"
    )
