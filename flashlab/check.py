"""Exercises, one way for the whole course.

A chapter's exercise is a *checker*: a function that runs a learner's function on adversarial
cases and, when something is wrong, raises :class:`Mistake` whose message says what is wrong
in words ("the old denominator was not rescaled"), not only pass/fail. Register it with
:func:`exercise`, naming its reference solution. In a notebook::

    def my_update(...):
        ...                      # the learner's attempt (starts as ``raise NotImplementedError``)

    flashlab.check.check("online_update", my_update)

``check`` prints a success line, explains what is wrong (raising :class:`Mistake`), or, for an
attempt not made yet (``NotImplementedError``), says so without failing, so the notebook still
runs top to bottom. ``show_solution(name)`` prints the hidden solution.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


class Mistake(AssertionError):
    """A learner's answer is wrong; the message says how, in words."""


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


def expect(condition: bool, message: str) -> None:
    """Inside a checker: raise :class:`Mistake` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Mistake(message)


def _exercise(name: str) -> Exercise:
    _load_chapters()
    if name not in EXERCISES:
        known = ", ".join(sorted(EXERCISES))
        raise ValueError(f"no exercise named {name!r}; known exercises: {known}")
    return EXERCISES[name]


def check(name: str, fn: Callable) -> bool:
    """Run exercise ``name``'s checker on ``fn``.

    Returns True when every case passes, False when ``fn`` is not attempted yet (it raises
    ``NotImplementedError``); raises :class:`Mistake` explaining the first thing that is wrong.
    """
    ex = _exercise(name)
    try:
        ex.checker(fn)
    except NotImplementedError:
        print(
            f"[{name}] not attempted yet: fill in the function and run this cell again "
            f"(or flashlab.check.show_solution({name!r}))."
        )
        return False
    print(f"[{name}] correct: {ex.title} passes every adversarial case.")
    return True


def show_solution(name: str) -> str:
    """Print (and return) the source of exercise ``name``'s reference solution."""
    src = inspect.getsource(_exercise(name).solution)
    print(src)
    return src


def _load_chapters() -> None:
    """Import the modules that register exercises (each chapter's module registers its own)."""
    import importlib
    import pkgutil

    import flashlab.exercises as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
