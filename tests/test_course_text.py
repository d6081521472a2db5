"""The course reads in order: every GPU term is defined before it is used, and cells are sized for reading.

**Definitions.** A term is defined where it first appears in **bold** in a markdown cell (``**warps**``,
``**`cuda.syncthreads()`**``). Reading order is the notebooks' file order (``00_`` ... ``04_gpu_primer``,
``04_numba_cuda`` ...), cell by cell. A *use* is a match of the term's pattern in a markdown cell outside a
heading line (a heading announces the topic its paragraph then defines). No use may come before the first
definition. Uses that are not the GPU sense of a word (a grid of x values) are listed in
:data:`NOT_THE_GPU_SENSE`; uses still waiting for their chapter's fix in :data:`USED_BEFORE_DEFINED`.

**Sizes.** A markdown cell holds at most :data:`MAX_WORDS` words, a code cell at most :data:`MAX_LINES`
lines. :data:`TOO_LONG` lists the cells known to break the rule, by cell id; it shrinks as chapters are
fixed, and a listed cell that now fits (or is gone) must leave the list.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_WORDS = 250
MAX_LINES = 30

#: term -> (pattern of a use, pattern a bold span must contain to define it); case-insensitive but SASS
TERMS = {
    "grid": (r"\bgrids?\b", r"\bgrids?\b"),
    "block": (r"\bthread[ -]blocks?\b", r"\b(thread[ -])?blocks?\b"),
    "thread": (r"\bthreads?\b", r"\bthreads?\b"),
    "warp": (r"\bwarps?\b", r"\bwarps?\b"),
    "shared memory": (r"\bshared[ -]memory\b", r"\bshared[ -]memory\b"),
    "syncthreads": (r"syncthreads", r"syncthreads"),
    "coalesced": (r"\bcoalesc\w*", r"\bcoalesc\w*"),
    "bank": (r"\bbanks?\b", r"\bbanks?\b"),
    "register": (r"\bregisters?\b", r"\bregisters?\b"),
    "occupancy": (r"\boccupancy\b", r"\boccupancy\b"),
    "SASS": (r"(?-i:\bSASS\b)", r"(?-i:\bSASS\b)"),
    "LDS.128": (r"\bLDS\.128\b", r"\bLDS\.128\b"),
    "launch bounds": (r"\blaunch[ _]bounds\b", r"\blaunch[ _]bounds\b"),
}

#: (notebook stem, term) -> why the word there is not the GPU term (these uses are not checked)
NOT_THE_GPU_SENSE = {
    ("01_online_softmax", "grid"): "a grid of x values",
    ("01_online_softmax", "thread"): "threads of a parallel CPU reduction, in general words",
    ("02_tiling_numpy", "grid"): "the tile schedule drawn as a grid of tiles",
    ("03_io_complexity", "grid"): "chapter 6's tile grid",
}

#: (notebook stem, term) -> the use waiting for a fix (define the term there, or drop the word); to empty
USED_BEFORE_DEFINED = {
    ("00_attention", "shared memory"): "SRAM is 'on-chip shared memory': bold **shared memory** there",
    ("00_attention", "bank"): "'one bank per SM' contradicts chapter 4's 32 banks per SM",
    ("02_tiling_numpy", "block"): "'its own thread block (chapter 4)': a forward reference",
    ("02_tiling_numpy", "thread"): "the same forward reference to chapter 4's thread blocks",
    ("03_io_complexity", "occupancy"): "used for the B_c = 256 remark before chapter 4 defines it",
    ("03_io_complexity", "shared memory"): "'the H200's shared memory per SM' before chapter 4 defines it",
}

#: notebook stem -> {cell id: the size it had when listed}; cells over the size rules, to empty
TOO_LONG: dict[str, dict[str, str]] = {}

BOLD = re.compile(r"\*\*(.+?)\*\*", re.S)


def _cells():
    """(notebook stem, cell index, cell) in reading order."""
    for path in NOTEBOOKS:
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            yield path.stem, index, cell


def _prose(source: str) -> str:
    """A markdown cell's text with heading lines blanked (same length, so offsets stay comparable)."""
    return "\n".join(
        " " * len(line) if line.lstrip().startswith("#") else line for line in source.split("\n")
    )


def _first(term: str):
    """The first definition and the first checked use of ``term``: ``(order, stem, cell, excerpt)`` each."""
    use, define = (re.compile(p, re.I) for p in TERMS[term])
    first_def = first_use = None
    for order, (stem, index, cell) in enumerate(_cells()):
        if cell.cell_type != "markdown":
            continue
        text = _prose(cell.source)
        if first_def is None:
            spans = [m.start() for m in BOLD.finditer(text) if define.search(m.group(1))]
            if spans:
                first_def = ((order, spans[0]), stem, index, text[spans[0] : spans[0] + 60])
        skip = (stem, term) in NOT_THE_GPU_SENSE or (stem, term) in USED_BEFORE_DEFINED
        m = None if skip or first_use is not None else use.search(text)
        if m:
            start = max(0, m.start() - 40)
            first_use = ((order, m.start()), stem, index, text[start : m.end() + 40].replace("\n", " "))
    return first_def, first_use


@pytest.mark.parametrize("term", list(TERMS))
def test_term_is_defined_before_its_first_use(term):
    first_def, first_use = _first(term)
    assert first_def is not None, f"{term!r} is never defined (no markdown cell has it in **bold**)"
    if first_use is not None:
        _, use_stem, use_cell, excerpt = first_use
        _, def_stem, def_cell, _ = first_def
        assert first_def[0] <= first_use[0], (
            f"{term!r} is used in {use_stem} cell {use_cell} ('...{excerpt}...') before its definition in "
            f"{def_stem} cell {def_cell}: define it there (in bold) or move the definition earlier"
        )


@pytest.mark.parametrize("entry", sorted(NOT_THE_GPU_SENSE | USED_BEFORE_DEFINED))
def test_listed_early_uses_still_exist(entry):
    stem, term = entry
    use = re.compile(TERMS[term][0], re.I)
    texts = [_prose(c.source) for s, _, c in _cells() if s == stem and c.cell_type == "markdown"]
    assert any(use.search(t) for t in texts), (
        f"{stem} no longer uses {term!r}: remove {entry} from the list in tests/test_course_text.py"
    )


def _size(cell) -> tuple[int, int, str]:
    """(size, limit, unit) of a cell under the size rules."""
    if cell.cell_type == "markdown":
        return len(cell.source.split()), MAX_WORDS, "words"
    return len(cell.source.splitlines()), MAX_LINES, "lines"


def test_cells_are_sized_for_reading():
    bad = []
    for stem, index, cell in _cells():
        if cell.cell_type not in ("markdown", "code"):
            continue
        size, limit, unit = _size(cell)
        if size > limit and cell.get("id") not in TOO_LONG.get(stem, {}):
            first = cell.source.strip().split("\n")[0][:60]
            bad.append(f"{stem} cell {index} (id {cell.get('id')}): {size} {unit} > {limit}: {first!r}")
    assert not bad, "cells over the size rules (split them, or move code into the package):\n" + "\n".join(
        bad
    )


def test_too_long_list_holds_only_cells_still_too_long():
    cells = {(stem, cell.get("id")): cell for stem, _, cell in _cells()}
    stale = []
    for stem, ids in TOO_LONG.items():
        for cell_id in ids:
            cell = cells.get((stem, cell_id))
            if cell is None or _size(cell)[0] <= _size(cell)[1]:
                stale.append(f"{stem} {cell_id}: {'gone' if cell is None else 'now within the rules'}")
    assert not stale, "remove from TOO_LONG in tests/test_course_text.py:\n" + "\n".join(stale)
