"""A two-level memory model: HBM traffic counted per tensor, SRAM occupancy with a capacity.

**Observed** HBM traffic: the algorithms (forward and backward) put their HBM tensors in
:class:`HBMTensor` wrappers (:func:`hbm`, :func:`store`); every slice they take (``t[rows]``) is
counted as a read of that tile and every slice they assign (``t[rows] = x``) as a write, by the
wrapper. A tile taken is read-only, so HBM changes only through a counted assignment. The algorithm
never says what it moves; the count is whatever it actually touched.

**Modelled** SRAM occupancy: the algorithms declare which tiles sit on chip,

- ``hold(name, tile)``: the tile ``name`` now occupies SRAM (replacing an earlier tile of that name);
- ``free(*names)``: those tiles leave SRAM.

Tensor names used across the course: Q, K, V, O, l, m, lse, S, P (and dO, dQ, dK, dV, D for the
backward pass).

Bytes are counted as the tiles are stored here (float32 for float16 input, which is computed in
float32); elements are dtype-free. To compare with the paper's fp16 figures, take the element counts
(:meth:`MemoryModel.traffic`) and price them with :meth:`flashlab.traffic.Traffic.nbytes`.
Counting costs two dictionary updates per tile, so a counted run takes about the time of an
uncounted one (``python -m flashlab.bench memory`` measures it).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from flashlab.traffic import Traffic, fitting_blocks, paper_blocks


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
        self.held: dict[str, int] = {}  # name -> bytes on chip now
        self.held_tiles: dict[str, np.ndarray | int] = {}  # name -> the tile (or byte count) held
        self.sram_used_bytes = 0  # bytes on chip now: the sum of ``held``
        self.sram_peak_bytes = 0
        self.sram_peak_tiles: dict[str, int] = {}  # name -> bytes, at the first moment of the peak

    # --- HBM traffic -------------------------------------------------------------------------
    def read(self, name: str, tile: np.ndarray) -> None:
        """Count ``tile`` (any shape) as read from HBM under tensor ``name``."""
        elements, nbytes = self.read_elements, self.read_bytes  # dict.get: the cheapest update
        elements[name] = elements.get(name, 0) + tile.size
        nbytes[name] = nbytes.get(name, 0) + tile.nbytes

    def write(self, name: str, tile: np.ndarray) -> None:
        """Count ``tile`` as written to HBM under tensor ``name``."""
        elements, nbytes = self.write_elements, self.write_bytes
        elements[name] = elements.get(name, 0) + tile.size
        nbytes[name] = nbytes.get(name, 0) + tile.nbytes

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
        """Tile ``name`` now occupies SRAM (``tile`` is an array or a byte count), replacing an earlier
        tile of that name. Raises :class:`SRAMOverflow` if the tiles held exceed ``sram_bytes``."""
        if isinstance(tile, np.ndarray):
            nbytes = tile.nbytes
        elif isinstance(tile, (int, np.integer)) and not isinstance(tile, bool) and tile >= 0:
            nbytes = int(tile)
        else:
            raise TypeError(f"tile must be an array or a byte count (an integer >= 0), got {tile!r}")
        held = self.held
        used = self.sram_used_bytes + nbytes - held.get(name, 0)
        held[name] = nbytes
        self.held_tiles[name] = tile
        self.sram_used_bytes = used
        if used > self.sram_peak_bytes:  # the peak never exceeds sram_bytes, so only here can it overflow
            if self.sram_bytes is not None and used > self.sram_bytes:
                raise SRAMOverflow(self._overflow_message(name, used))
            self.sram_peak_bytes = used
            self.sram_peak_tiles = dict(held)

    def _overflow_message(self, name: str, used: int) -> str:
        """Which tiles overflowed SRAM, by how much, and block sizes that would fit."""
        held = ", ".join(f"{n} {_describe(t)}" for n, t in self.held_tiles.items())
        return (
            f"SRAM overflow when holding {name!r}: the tiles on chip take {used} B > "
            f"sram_bytes={self.sram_bytes} B (over by {used - self.sram_bytes} B). "
            f"Held: {held}. {self._suggest_blocks()}"
        )

    def _suggest_blocks(self) -> str:
        """Blocks that fit (:func:`flashlab.traffic.fitting_blocks`) for the held tiles' d, d_v, dtype."""
        arrays = {n: t for n, t in self.held_tiles.items() if isinstance(t, np.ndarray) and t.ndim >= 2}
        qk = next((arrays[n] for n in ("Q", "K", "dQ", "dK") if n in arrays), None)
        if qk is None:
            return "Use smaller block sizes (block_q, block_k) or a larger sram_bytes."
        vo = next((arrays[n] for n in ("V", "O", "dV", "dO") if n in arrays), qk)
        d, d_v, problems = qk.shape[-1], vo.shape[-1], math.prod(qk.shape[:-2])
        backward = any(n in arrays for n in ("dQ", "dK", "dV"))
        m = self.sram_bytes // (qk.itemsize * problems)
        per = f" per (batch, head) problem ({problems} run side by side here)" if problems > 1 else ""
        where = f"M = {m} {qk.dtype} elements{per}, d={d}, d_v={d_v}"
        try:
            block_q, block_k = fitting_blocks(m, d, d_v, backward=backward)
        except ValueError as e:
            return f"For {where}: {e}; raise sram_bytes."
        paper_q, paper_k = paper_blocks(m, d)
        return (
            f"For {where}, blocks that fit: block_q={block_q}, block_k={block_k} "
            f"(flashlab.traffic.fitting_blocks; the paper's rule B_c = ceil(M/4d), B_r = min(B_c, d) gives "
            f"block_q={paper_q}, block_k={paper_k}, sized for Q, K, V, O only). Or raise sram_bytes."
        )

    def free(self, *names: str) -> None:
        """Tiles ``names`` leave SRAM (names not held are ignored)."""
        for name in names:
            self.sram_used_bytes -= self.held.pop(name, 0)
            self.held_tiles.pop(name, None)

    # --- reports -----------------------------------------------------------------------------
    def traffic(self) -> Traffic:
        """The counted HBM traffic in elements, per tensor: compare it with a closed form of
        :mod:`flashlab.traffic`, or price it in bytes with :meth:`Traffic.nbytes`."""
        return Traffic(dict(self.read_elements), dict(self.write_elements))

    def summary(self, dtype_bytes: int | None = None, tensor_bytes: dict[str, int] | None = None) -> str:
        """A table of HBM traffic per tensor (elements and bytes) and the SRAM peak.

        Bytes are as counted (the dtype of the tiles), or, with ``dtype_bytes``, every element priced
        at that many bytes except those named in ``tensor_bytes`` (e.g. ``dtype_bytes=2,
        tensor_bytes={"lse": 4}`` for fp16 matrices with fp32 statistics).
        """

        def price(name: str, elements: int, counted: int) -> int:
            return counted if dtype_bytes is None else elements * (tensor_bytes or {}).get(name, dtype_bytes)

        unit = "B as counted" if dtype_bytes is None else f"B at {dtype_bytes} B/element"
        lines = [_row("tensor", ["read elem", "written elem", f"read {unit}", "written B"])]
        totals = [0, 0, 0, 0]
        for name, r, w in self.traffic().table():
            row = [r, w, price(name, r, self.read_bytes[name]), price(name, w, self.write_bytes[name])]
            totals = [a + b for a, b in zip(totals, row, strict=True)]
            lines.append(_row(name, row))
        lines.append(_row("total", totals))
        peak = ", ".join(f"{n} {b} B" for n, b in self.sram_peak_tiles.items()) or "nothing held"
        lines.append(f"SRAM peak {self.sram_peak_bytes} B as counted ({peak})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"MemoryModel(hbm_read_bytes={self.hbm_read_bytes}, "
            f"hbm_write_bytes={self.hbm_write_bytes}, sram_peak_bytes={self.sram_peak_bytes})"
        )


class HBMTensor:
    """A tensor in HBM whose every slice is counted by ``memory``: ``t[key]`` reads that tile,
    ``t[key] = x`` writes it (as many elements as the slice holds). The tile read is read-only (an
    in-place update of it would change HBM uncounted; write ``t[key] = tile + x`` instead).
    ``shape``, ``dtype`` and ``ndim`` are free; :func:`host` hands the array back to the caller
    after the algorithm, uncounted."""

    __slots__ = ("_memory", "array", "name")

    def __init__(self, memory: MemoryModel, name: str, array: np.ndarray):
        self._memory, self.name, self.array = memory, name, array

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)

    def __getitem__(self, key) -> np.ndarray:
        tile = self.array[key]
        self._memory.read(self.name, tile)
        if isinstance(tile, np.ndarray):
            tile.flags.writeable = False  # a view of HBM: written only through __setitem__
        return tile

    def __setitem__(self, key, value) -> None:
        self.array[key] = value
        self._memory.write(self.name, self.array[key])

    def __repr__(self) -> str:
        return f"HBMTensor({self.name!r}, {_describe(self.array)})"


def hbm(memory: MemoryModel | None, name: str, array: np.ndarray):
    """``array`` as the HBM tensor ``name`` whose slices ``memory`` counts; ``array`` itself when
    ``memory`` is None (an uncounted run pays nothing) or when it already is an :class:`HBMTensor`
    (a tensor handed on to a helper stays the one tensor it was)."""
    return array if memory is None or isinstance(array, HBMTensor) else HBMTensor(memory, name, array)


def store(memory: MemoryModel | None, name: str, array: np.ndarray):
    """Write all of ``array`` (computed on chip) to a new HBM tensor ``name`` and return that tensor:
    one counted write of ``array.size`` elements; ``array`` itself when ``memory`` is None."""
    if memory is None:
        return array
    tensor = HBMTensor(memory, name, np.empty_like(array))
    tensor[...] = array
    return tensor


def host(x):
    """The plain array behind an :class:`HBMTensor` (or ``x`` itself): the result handed to the caller."""
    return x.array if isinstance(x, HBMTensor) else x


def _describe(tile: np.ndarray | int) -> str:
    """``'64x64 float32 16384 B'`` for an array, ``'512 B'`` for a byte count."""
    if isinstance(tile, (int, np.integer)):
        return f"{int(tile)} B"
    return f"{'x'.join(map(str, tile.shape))} {tile.dtype} {tile.nbytes} B"


def _row(label: str, cells: list) -> str:
    """One line of :meth:`MemoryModel.summary`'s table."""
    return f"{label:<8}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (14, 14, 24, 14), strict=True))
