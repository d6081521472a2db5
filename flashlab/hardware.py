"""Reference hardware figures (HBM and on-chip memory sizes, bandwidths), read from ``data/hardware.json``.

Each entry carries its ``source``; the course quotes numbers from here rather than typing them.
On-chip SRAM has one definition for the whole course, :func:`shared_memory_bytes`: the shared memory
one streaming multiprocessor (SM) can give its thread blocks (A100: 164 KiB; the paper's "192 KB" is
the L1 cache and shared memory together). The file's ``definitions`` entry states each key.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

HARDWARE_FILE = Path(__file__).resolve().parents[1] / "data" / "hardware.json"


@cache
def _file() -> dict[str, dict]:
    return json.loads(HARDWARE_FILE.read_text())


def definitions() -> dict[str, str]:
    """What each per-SM memory key of ``data/hardware.json`` means."""
    return dict(_file()["definitions"])


def specs() -> dict[str, dict]:
    """All GPU entries of ``data/hardware.json``, keyed by GPU (``"A100"``, ``"H200"``)."""
    return {gpu: entry for gpu, entry in _file().items() if gpu != "definitions"}


def spec(gpu: str) -> dict:
    """One GPU's figures; ``ValueError`` naming the known GPUs for an unknown one."""
    table = specs()
    if gpu not in table:
        raise ValueError(f"gpu must be one of {sorted(table)}, got {gpu!r}")
    return table[gpu]


def shared_memory_bytes(gpu: str) -> int:
    """On-chip SRAM per SM in bytes, as every chapter uses it: the shared memory one SM can hold."""
    return int(spec(gpu)["shared_memory_bytes_per_sm"])


def sram_elements(gpu: str, element_bytes: int) -> int:
    """The paper's ``M``: how many elements of ``element_bytes`` bytes fit in :func:`shared_memory_bytes`."""
    if isinstance(element_bytes, bool) or not isinstance(element_bytes, int) or element_bytes <= 0:
        raise ValueError(
            f"element_bytes must be a positive integer (2 for fp16, 4 for fp32), got {element_bytes!r}"
        )
    return shared_memory_bytes(gpu) // element_bytes
