"""Every exercise, one way: its solution passes, an unattempted stub does not fail, it is used and indexed;
a failed check reports in one screen; a solution is shown only on request.

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
import numpy as np
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
    check.show_solution(name, reveal=True)
    src = check.solution_source(name)
    assert src.strip() and src in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_solution_stays_hidden_unless_asked(name, capsys):
    check.show_solution(name)
    out = capsys.readouterr().out
    assert "reveal=True" in out
    assert not any(line.strip() and line.strip() in out for line in check.solution_source(name).splitlines())


def test_in_a_notebook_a_button_reveals_the_solution_only_when_clicked(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(check, "_in_notebook", lambda: True)
    monkeypatch.setattr("IPython.display.display", shown.append)
    name = NAMES[0]
    check.show_solution(name)
    (box,) = shown
    button, output = box.children
    assert capsys.readouterr().out == "" and output.outputs == ()
    button.click()
    assert "".join(o["text"] for o in output.outputs) == check.solution_source(name)
    assert button.disabled


# --- a failed check teaches in one screen ------------------------------------------------------------


def _row_scale(x, v):
    """The demo exercise's solution: each row of x (n, d) times its own v (n,)."""
    return x * v[:, None]


def _check_row_scale(fn):
    x = np.arange(6.0).reshape(3, 2)
    v = np.array([1.0, 2.0, 3.0])
    check.expect(np.allclose(fn(x.copy(), v.copy()), _row_scale(x, v)), "row r must be scaled by v[r]")
    x = np.arange(16.0).reshape(4, 4)
    v = np.arange(1.0, 5.0)
    check.expect(np.allclose(fn(x, v), _row_scale(x, v)), "wrong when n = d")


@pytest.fixture
def demo(monkeypatch):
    ex = check.Exercise("row_scale", 0, "scale each row", _check_row_scale, _row_scale)
    monkeypatch.setitem(check.EXERCISES, "row_scale", ex)
    return "row_scale"


def _failure(name, fn) -> check.Mistake:
    with pytest.raises(check.Mistake) as info:
        check.check(name, fn)
    report = "\n".join(info.value._render_traceback_())  # what Jupyter shows instead of a traceback
    assert report == info.value.report()
    assert len(report.splitlines()) <= 20, report
    for internal in ("Traceback", "check.py", "_check_row_scale", "exercises/", 'File "'):
        assert internal not in report, f"the report shows the checker's internals ({internal}):\n{report}"
    return info.value


def test_broadcasting_error_is_reported_with_the_learners_line_and_a_hint(demo):
    def forgot_the_column(x, v):
        return x * v  # (3, 2) * (3,) cannot broadcast

    mistake = _failure(demo, forgot_the_column)
    report = mistake.report()
    assert "ValueError" in report and "`return x * v" in report
    assert "v[:, None]" in mistake.hint
    assert "x = [[0., 1.]" in report and "shape (3, 2)" in report  # the failing input, by name


def test_silent_broadcast_to_a_wrong_shape_gets_a_shape_hint(demo):
    def summed_the_rows(x, v):
        return (x * v[:, None]).sum(axis=1)  # (3,): np.allclose broadcasts it against (3, 2) or fails

    mistake = _failure(demo, summed_the_rows)
    assert "[(3,)]" in mistake.hint and "[(3, 2)]" in mistake.hint and "keepdims" in mistake.hint


def test_wrong_values_get_the_checkers_message_and_the_input(demo):
    def reversed_scale(x, v):
        return x * v[::-1, None]

    mistake = _failure(demo, reversed_scale)
    assert str(mistake) == "row r must be scaled by v[r]"
    assert "v = [1., 2., 3.]" in mistake.report()
    assert mistake.hint is None  # right shapes: no generic hint pretends to know more


def test_a_missing_return_is_named(demo):
    def no_return(x, v):
        x * v[:, None]  # noqa: B018

    mistake = _failure(demo, no_return)
    assert "could not be used" in mistake.message and "return" in mistake.hint


# --- Run All never prints a solution -------------------------------------------------------------------

#: notebook stem -> {cell id: what it does}: cells that check the reference solution or reveal it on Run
#: All (under an unattempted exercise); each chapter's owner replaces the cell with
#: ``check.show_solution("<name>")`` (a button), and the lead empties this list
SOLUTION_ON_RUN_ALL: dict[str, dict[str, str]] = {}
CHECKS_A_SOLUTION = re.compile(r"check\(\s*[\"']\w+[\"']\s*,\s*[^)]*(solution|EXERCISES)")
REVEALS = re.compile(r"reveal\s*=\s*True")


def test_run_all_shows_no_solution():
    bad = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        allowed = SOLUTION_ON_RUN_ALL.get(path.stem, {})
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "code" or cell.get("id") in allowed:
                continue
            if CHECKS_A_SOLUTION.search(cell.source) or REVEALS.search(cell.source):
                bad.append(f"{path.stem} cell {index} (id {cell.get('id')})")
    assert not bad, (
        "these cells print a solution, or 'correct' for the reference solution, on Run All; use "
        "check.show_solution(name), which shows a button:\n" + "\n".join(bad)
    )


def test_solution_list_holds_only_cells_still_showing_one():
    stale = []
    for stem, ids in SOLUTION_ON_RUN_ALL.items():
        cells = {
            c.get("id"): c for c in nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4).cells
        }
        for cell_id in ids:
            src = cells[cell_id].source if cell_id in cells else ""
            if not (CHECKS_A_SOLUTION.search(src) or REVEALS.search(src)):
                stale.append(f"{stem} {cell_id}")
    assert not stale, "remove from SOLUTION_ON_RUN_ALL in tests/test_exercises.py: " + ", ".join(stale)


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
