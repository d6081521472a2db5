"""A two-level memory model: HBM traffic counted per tensor, SRAM occupancy with a capacity.

The blocked algorithms call four methods as they run, at tile granularity, so the counted run is
the algorithm itself, not a second copy of it:

- ``read(name, tile)``  / ``write(name, tile)``: a tile of tensor ``name`` moves HBM -> SRAM / SRAM -> HBM;
- ``hold(name, tile)``: the tile ``name`` now occupies SRAM (replacing an earlier tile of that name);
- ``free(*names)``: those tiles leave SRAM.

Tensor names used across the course: Q, K, V, O, l, m, lse, S, P (and dO, dQ, dK, dV, D for the
backward pass).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


class SRAMOverflow(MemoryError):
    """Raised when the tiles held on chip exceed the model's ``sram_bytes``."""


class MemoryModel:
    """Counts HBM reads/writes (bytes and elements, per tensor) and SRAM use (peak, capacity).

    ``sram_bytes=None`` means unlimited SRAM (only the peak is recorded).
    """

    def __init__(self, sram_bytes: int | None = None):
        if sram_bytes is not None and (
            isinstance(sram_bytes, bool) or int(sram_bytes) != sram_bytes or sram_bytes <= 0
        ):
            raise ValueError(f"sram_bytes must be a positive integer or None, got {sram_bytes!r}")
        self.sram_bytes = None if sram_bytes is None else int(sram_bytes)
        self.read_bytes: Counter[str] = Counter()
        self.write_bytes: Counter[str] = Counter()
        self.read_elements: Counter[str] = Counter()
        self.write_elements: Counter[str] = Counter()
        self.held: dict[str, int] = {}
        self.sram_peak_bytes = 0

    # --- HBM traffic -------------------------------------------------------------------------
    def read(self, name: str, tile: np.ndarray) -> None:
        """Count ``tile`` (any shape) as read from HBM under tensor ``name``."""
        self.read_elements[name] += tile.size
        self.read_bytes[name] += tile.nbytes

    def write(self, name: str, tile: np.ndarray) -> None:
        """Count ``tile`` as written to HBM under tensor ``name``."""
        self.write_elements[name] += tile.size
        self.write_bytes[name] += tile.nbytes

    @property
    def hbm_read_bytes(self) -> int:
        return sum(self.read_bytes.values())

    @property
    def hbm_write_bytes(self) -> int:
        return sum(self.write_bytes.values())

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def hbm_read_elements(self) -> int:
        return sum(self.read_elements.values())

    @property
    def hbm_write_elements(self) -> int:
        return sum(self.write_elements.values())

    # --- SRAM occupancy ------------------------------------------------------------------------
    def hold(self, name: str, tile: np.ndarray | int) -> None:
        """Tile ``name`` now occupies SRAM (``tile`` is an array or a byte count)."""
        self.held[name] = int(tile) if isinstance(tile, (int, np.integer)) else tile.nbytes
        used = sum(self.held.values())
        if self.sram_bytes is not None and used > self.sram_bytes:
            tiles = ", ".join(f"{k} {b} B" for k, b in self.held.items())
            raise SRAMOverflow(
                f"SRAM overflow: {used} B held ({tiles}) > sram_bytes={self.sram_bytes}. "
                "Use smaller block sizes (block_q, block_k) or a larger sram_bytes."
            )
        self.sram_peak_bytes = max(self.sram_peak_bytes, used)

    def free(self, *names: str) -> None:
        """Tiles ``names`` leave SRAM (names not held are ignored)."""
        for name in names:
            self.held.pop(name, None)

    @property
    def sram_used_bytes(self) -> int:
        return sum(self.held.values())

    def __repr__(self) -> str:
        return (
            f"MemoryModel(hbm_read_bytes={self.hbm_read_bytes}, "
            f"hbm_write_bytes={self.hbm_write_bytes}, sram_peak_bytes={self.sram_peak_bytes})"
        )
