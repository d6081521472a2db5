"""Exercises, one way for the whole course.

A chapter's exercise is a *checker*: a function that runs a learner's function on adversarial
cases and, when something is wrong, raises :class:`Mistake` whose message says what is wrong
in words ("the old denominator was not rescaled"), not only pass/fail. Register it with
:func:`exercise`, naming its reference solution. In a notebook::

    def my_update(...):
        ...                      # the learner's attempt (starts as ``raise NotImplementedError``)

    flashlab.check.check("online_update", my_update)

``check`` prints a success line, or raises :class:`Mistake` with a report that fits on one screen:
what is wrong, the input the function was last given, and a hint (a shape that differs from the
solution's, or a NumPy broadcasting error, gets a hint of its own). In Jupyter the report replaces the
traceback, so nothing of the checker's own code shows. An attempt not made yet (``NotImplementedError``)
is reported without failing, so the notebook still runs top to bottom.

``show_solution(name)`` never prints the solution by itself: in a notebook it shows a button that
reveals it; elsewhere it says how to ask. ``show_solution(name, reveal=True)`` prints it.
"""

from __future__ import annotations

import functools
import inspect
import linecache
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class Mistake(AssertionError):
    """A learner's answer is wrong; the message says how, in words.

    ``str(mistake)`` is the message; :meth:`report` adds the exercise, the failing input and the hint.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exercise: str | None = None
        self.inputs: str | None = None

    def report(self) -> str:
        """The short report a learner sees: message, failing input, hint."""
        lines = [f"✗ {self.exercise}: {self.message}" if self.exercise else f"✗ {self.message}"]
        if self.inputs:
            lines += ["", "your function was last called with:", self.inputs]
        if self.hint:
            lines += ["", f"hint: {self.hint}"]
        return "\n".join(lines)

    def _render_traceback_(self) -> list[str]:
        """IPython shows these lines instead of a traceback."""
        return self.report().splitlines()


@dataclass(frozen=True)
class Exercise:
    name: str
    chapter: int
    title: str
    checker: Callable[[Callable], None]
    solution: Callable


EXERCISES: dict[str, Exercise] = {}


def exercise(name: str, *, chapter: int, title: str, solution: Callable):
    """Decorator registering ``checker(fn)`` as exercise ``name`` with its reference ``solution``."""

    def register(checker: Callable[[Callable], None]) -> Callable[[Callable], None]:
        if name in EXERCISES:
            raise ValueError(f"exercise {name!r} is registered twice")
        EXERCISES[name] = Exercise(name, chapter, title, checker, solution)
        return checker

    return register


def expect(condition: bool, message: str, hint: str | None = None) -> None:
    """Inside a checker: raise :class:`Mistake` with ``message`` (and ``hint``) unless ``condition`` holds."""
    if not condition:
        raise Mistake(message, hint=hint)


def _exercise(name: str) -> Exercise:
    _load_chapters()
    if name not in EXERCISES:
        known = ", ".join(sorted(EXERCISES))
        raise ValueError(f"no exercise named {name!r}; known exercises: {known}")
    return EXERCISES[name]


# --- recording what the learner's function was given --------------------------------------------


def _plain(x):
    """A copy of ``x`` as it is now: arrays copied (also the simulator's counted arrays), rest as is."""
    array = getattr(x, "array", x)  # flashlab.cuda.traffic.CountingArray wraps a NumPy array
    return np.array(array, copy=True) if isinstance(array, np.ndarray) else x


class _Spy:
    """Calls ``fn`` unchanged and remembers the last call's arguments (as they were) and result."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.args: tuple | None = None
        self.result = None

    def __getattr__(self, name):  # __globals__, __code__, ...: a kernel checker compiles fn's own source
        return getattr(self.fn, name)

    def __call__(self, *args):
        self.args = tuple(_plain(a) for a in args)
        self.result = None
        self.result = self.fn(*args)
        return self.result


def _show(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 12:
            body = np.array2string(value, precision=4, separator=", ").replace("\n", "")
            return f"{body}  ({value.dtype}, shape {value.shape})"
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
        span = f", values {finite.min():.4g} .. {finite.max():.4g}" if finite.size else ", none finite"
        return f"{value.dtype} array of shape {value.shape}{span}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _inputs(fn: Callable, args: tuple) -> str:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    names += [f"argument {i + 1}" for i in range(len(names), len(args))]
    return "\n".join(f"  {name} = {_show(a)}" for name, a in zip(names, args, strict=False))


def _shapes(value) -> list:
    items = value if isinstance(value, tuple) else (value,)
    return [np.shape(x) for x in items]


def _shape_hint(ex: Exercise, spy: _Spy) -> str | None:
    """When the learner's last result has other shapes than the solution's on the same input."""
    if spy.args is None or spy.result is None:
        return None
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            want = ex.solution(*(_plain(a) for a in spy.args))
    except Exception:  # the solution is not defined on this input: no hint to give
        return None
    got_shapes, want_shapes = _shapes(spy.result), _shapes(want)
    if got_shapes == want_shapes:
        return None
    return (
        f"your function returned shapes {got_shapes} where the solution returns {want_shapes}. "
        "A shape that grew or vanished usually comes from broadcasting: a per-row vector v of shape (n,) "
        "combines with an (n, d) matrix only as a column, v[:, None]; and sum/max(axis=...) removes the "
        "axis you name (keepdims=True keeps it)."
    )


def _learner_line(error: BaseException, fn: Callable) -> str | None:
    """The line of the learner's code where ``error`` was raised, if it was raised inside ``fn`` (or a
    helper of the learner's, in the same file, that ``fn`` called)."""
    code = getattr(fn, "__code__", None)
    tb, line, inside = error.__traceback__, None, False
    while tb is not None:
        frame_code = tb.tb_frame.f_code
        inside = inside or frame_code is code
        if inside and code is not None and frame_code.co_filename == code.co_filename:
            line = linecache.getline(frame_code.co_filename, tb.tb_lineno).strip() or f"line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


def _from_error(error: Exception, fn: Callable) -> Mistake:
    """A learner-facing :class:`Mistake` for an exception the learner's function (or its result) caused."""
    what = f"{type(error).__name__}: {error}"
    line = _learner_line(error, fn)
    if line is None:
        message = f"what your function returned could not be used ({what})"
        hint = "check that it returns what the exercise asks for, in that order (did it return at all?)"
    else:
        message = f"your function raised {what}, at `{line.strip()}`"
        hint = None
    if "broadcast" in str(error):
        hint = (
            "NumPy could not line up the two shapes in the message. To combine one number per row (shape "
            "(n,)) with an (n, d) matrix, make it a column: v[:, None]."
        )
    return Mistake(message, hint=hint)


def check(name: str, fn: Callable) -> bool:
    """Run exercise ``name``'s checker on ``fn``.

    Returns True when every case passes, False when ``fn`` is not attempted yet (it raises
    ``NotImplementedError``); raises :class:`Mistake` explaining the first thing that is wrong, with
    the input ``fn`` was last called with and a hint.
    """
    ex = _exercise(name)
    spy = _Spy(fn)
    try:
        ex.checker(spy)
    except NotImplementedError:
        print(
            f"[{name}] not attempted yet: fill in the function and run this cell again "
            f"(or flashlab.check.show_solution({name!r}))."
        )
        return False
    except Mistake as mistake:
        found, generic = mistake, False
    except Exception as error:  # the learner's code failed: say so in words, not a traceback
        found, generic = _from_error(error, fn), True
    else:
        print(f"[{name}] correct: {ex.title} passes every adversarial case.")
        return True
    found.exercise = name
    if spy.args is not None:
        found.inputs = _inputs(fn, spy.args)
    if generic or not found.hint:  # a checker's own hint wins; a differing shape beats a generic one
        found.hint = _shape_hint(ex, spy) or found.hint
    raise found from None


# --- solutions, shown only on request -----------------------------------------------------------


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def solution_source(name: str) -> str:
    """The source of exercise ``name``'s reference solution (for tests and :func:`show_solution`)."""
    return inspect.getsource(_exercise(name).solution)


def show_solution(name: str, reveal: bool = False) -> None:
    """Show exercise ``name``'s solution only when the learner asks for it.

    ``reveal=True`` prints it. Otherwise, in a notebook, displays a button that reveals it when
    clicked (so Run All shows none); elsewhere prints how to ask.
    """
    src = solution_source(name)
    if reveal:
        print(src)
        return
    if not _in_notebook():
        print(f"[{name}] the solution is hidden: call show_solution({name!r}, reveal=True) to see it.")
        return
    import ipywidgets
    from IPython.display import display

    button = ipywidgets.Button(description="Show the solution", button_style="warning")
    shown = ipywidgets.Output()

    def on_click(_):
        button.disabled = True
        shown.append_stdout(src)

    button.on_click(on_click)
    display(ipywidgets.VBox([button, shown]))


def _load_chapters() -> None:
    """Import the modules that register exercises (each chapter's module registers its own)."""
    import importlib
    import pkgutil

    import flashlab.exercises as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
