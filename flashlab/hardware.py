"""Reference hardware figures (HBM and SRAM sizes and bandwidths), read from ``data/hardware.json``.

Each entry carries its ``source``; the course quotes numbers from here rather than typing them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

HARDWARE_FILE = Path(__file__).resolve().parents[1] / "data" / "hardware.json"


@cache
def specs() -> dict[str, dict]:
    """All entries of ``data/hardware.json``, keyed by GPU (``"A100"``, ``"H200"``)."""
    return json.loads(HARDWARE_FILE.read_text())


def spec(gpu: str) -> dict:
    """One GPU's figures; ``ValueError`` naming the known GPUs for an unknown one."""
    table = specs()
    if gpu not in table:
        raise ValueError(f"gpu must be one of {sorted(table)}, got {gpu!r}")
    return table[gpu]
