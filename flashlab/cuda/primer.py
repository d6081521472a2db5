"""Chapter 4's GPU primer: one tiny numba.cuda kernel per idea, and a recorder of who touched what.

Every kernel here is a plain Python function in numba.cuda's dialect. :func:`trace` runs one in
numba's CUDA simulator (on any machine, a GPU one too) over :class:`Recorded` arrays, so every read
and write of global and shared memory is kept with the thread that made it: the primer's pictures
are drawn from these records, not typed. :func:`time_on_gpu` times a kernel where a GPU exists.

Terms (the notebook defines each before use): a **grid** of **blocks** of **threads**; a **warp**
is 32 threads of a block that execute each instruction together (SIMT); **shared memory** is a
block's on-chip scratch (the paper's SRAM), split into 32 **banks** of 4-byte words;
``cuda.syncthreads()`` waits until every thread of the block reaches it; a warp's global load is
**coalesced** when its 32 addresses fall in few 32-byte sectors; **registers** hold a thread's local
variables; **occupancy** is the share of an SM's warp slots that resident warps fill.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import NamedTuple

import numpy as np
from numba import cuda, float32

from flashlab import device, hardware
from flashlab.cuda._numba import simulate
from flashlab.cuda.traffic import CountingArray

WARP = 32  # threads per warp on every NVIDIA GPU so far
BANKS = 32  # shared-memory banks, each 4 bytes wide
SECTOR_BYTES = 32  # the unit in which global memory is fetched

# Per-SM limits of compute capability 9.0 (H100/H200), from the CUDA C++ Programming Guide, table
# "Technical Specifications per Compute Capability"; shared memory per SM is data/hardware.json's.
SM90 = {
    "registers": 65536,  # 32-bit registers per SM
    "register_unit": 256,  # registers are handed to warps in units of 256
    "max_registers_per_thread": 255,
    "threads_per_block": 1024,
    "threads": 2048,
    "blocks": 32,
    "shared_reserved_per_block": 1024,  # bytes the system keeps per resident block
}


# --------------------------------------------------------------------------------------------------
# recording: who touched what
# --------------------------------------------------------------------------------------------------


class Access(NamedTuple):
    """One element access made by one simulated thread."""

    array: str  # name given to :meth:`Trace.wrap` (shared arrays: "shared0", "shared1", ...)
    op: str  # "r" or "w"
    block: tuple  # (blockIdx.x, blockIdx.y)
    thread: int  # flat thread index in the block (x fastest)
    step: int  # how many accesses this thread made to this array before this one
    index: int  # flat (row-major) element index
    seq: int  # global order in which accesses happened in this run


class Trace:
    """Collects the :class:`Access` records of one simulated launch."""

    def __init__(self):
        self.accesses: list[Access] = []
        self._seq = itertools.count()
        self._shared = itertools.count()

    def wrap(self, name: str, array: np.ndarray) -> Recorded:
        """``array`` as a kernel argument whose every element access is recorded under ``name``."""
        return Recorded(array, name, self)

    def shared(self, array: np.ndarray) -> Recorded:
        """Wraps each shared array the kernel declares (pass as ``simulate(make=...)``)."""
        return Recorded(array, f"shared{next(self._shared)}", self)

    def of(self, array: str, op: str | None = None) -> list[Access]:
        """The accesses to ``array`` (``op`` "r" or "w" for one kind), in the order they happened."""
        return [a for a in self.accesses if a.array == array and op in (None, a.op)]


class Recorded(CountingArray):
    """A :class:`flashlab.cuda.traffic.CountingArray` that also records each access in a :class:`Trace`."""

    def __init__(self, array: np.ndarray, name: str, trace: Trace):
        super().__init__(array)
        self.name, self._trace, self._steps = name, trace, {}

    def _record(self, op: str, index) -> None:
        me = threading.current_thread()  # numba's simulator runs each CUDA thread as a Python thread
        t = (me.threadIdx.x, me.threadIdx.y, me.threadIdx.z)
        step = self._steps.get((op, t), 0)
        self._steps[(op, t)] = step + 1
        flat = int(np.ravel_multi_index(tuple(int(i) for i in np.atleast_1d(index)), self.shape))
        block = (me.blockIdx.x, me.blockIdx.y)
        self._trace.accesses.append(
            Access(self.name, op, block, me.thread_id, step, flat, next(self._trace._seq))
        )

    def __getitem__(self, index):
        self._record("r", index)
        return super().__getitem__(index)

    def __setitem__(self, index, value):
        self._record("w", index)
        super().__setitem__(index, value)


def trace(kernel, grid, block, **arrays) -> Trace:
    """Run ``kernel(*arrays.values())`` in the simulator over recorded arrays (scalars pass as they are).

    ``arrays`` maps argument names to NumPy arrays (updated in place, as on a GPU) or scalars.
    """
    t = Trace()
    args = tuple(t.wrap(name, x) if isinstance(x, np.ndarray) else x for name, x in arrays.items())
    simulate(kernel, grid, block, args, make=t.shared)
    return t


def owner_map(accesses: list[Access], shape: tuple, *, block_threads: int | None = None) -> np.ndarray:
    """For each element, the thread that last accessed it (-1: none); with ``block_threads``, the
    global thread index ``block.x * block_threads + thread``."""
    owner = np.full(int(np.prod(shape)), -1)
    for a in sorted(accesses, key=lambda a: a.seq):
        owner[a.index] = a.thread + (a.block[0] * block_threads if block_threads else 0)
    return owner.reshape(shape)


def warp_requests(accesses: list[Access]) -> dict[tuple, list[Access]]:
    """Accesses grouped as a warp issues them: same block, same warp, same step of each thread."""
    groups: dict[tuple, list[Access]] = {}
    for a in accesses:
        groups.setdefault((a.block, a.thread // WARP, a.step), []).append(a)
    return groups


def sectors_per_request(accesses: list[Access], itemsize: int = 4) -> list[int]:
    """For each warp request, the distinct 32-byte sectors its addresses fall in (4 for a coalesced
    warp of float32, 32 when every lane lands in a sector of its own)."""
    return [len({a.index * itemsize // SECTOR_BYTES for a in g}) for g in warp_requests(accesses).values()]


def bank_conflicts(accesses: list[Access]) -> list[int]:
    """For each warp request to shared memory, the most distinct 4-byte words asked of one bank: 1 is
    conflict-free, ``k`` means the request is served in ``k`` passes (one word per bank per pass;
    lanes reading the same word share it, a broadcast)."""
    out = []
    for g in warp_requests(accesses).values():
        words: dict[int, set] = {}
        for a in g:
            words.setdefault(a.index % BANKS, set()).add(a.index)
        out.append(max(len(w) for w in words.values()))
    return out


def early_reads(accesses: list[Access]) -> list[Access]:
    """Reads of an element that happened before its first write in the same block: a race (the value
    read is whatever the slot held before; the simulator fills shared memory with NaN)."""
    first_write: dict[tuple, int] = {}
    for a in accesses:
        if a.op == "w":
            key = (a.block, a.index)
            first_write[key] = min(first_write.get(key, a.seq), a.seq)
    return [a for a in accesses if a.op == "r" and a.seq < first_write.get((a.block, a.index), -1)]


# --------------------------------------------------------------------------------------------------
# the primer's kernels, one idea each
# --------------------------------------------------------------------------------------------------


def global_index(out):
    """Grid, block, thread: thread ``t`` of block ``b`` writes its global index ``b * blockDim + t``."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.shape[0]:  # the last block may have threads past the end
        out[i] = i


def branch_source(by: str):
    """Warps and SIMT: every thread writes 1.0 on one path or 2.0 on the other; the path is chosen by
    the lane's parity (``by="lane"``: both paths in every warp) or the warp's (``by="warp"``)."""
    LANE = by == "lane"

    def branch(out):
        t = cuda.threadIdx.x
        i = cuda.blockIdx.x * cuda.blockDim.x + t
        pick = t % 2 if LANE else (t // WARP) % 2
        if pick == 0:
            out[i] = 1.0  # path A
        else:
            out[i] = 2.0  # path B

    return branch


BLOCK = 8  # threads per block of the shared-memory kernel (a compile-time size)


def reverse_source(barrier: bool = True):
    """Global vs shared memory: each block reverses its ``BLOCK`` elements through shared memory;
    without the barrier a thread may read a slot before its neighbour has written it."""
    BARRIER = barrier

    def reverse(x, out):
        buf = cuda.shared.array(BLOCK, float32)  # one per block, on chip
        t = cuda.threadIdx.x
        i = cuda.blockIdx.x * BLOCK + t
        buf[t] = x[i]  # global -> shared
        if BARRIER:
            cuda.syncthreads()  # every write above happens before any read below
        out[i] = buf[BLOCK - 1 - t]  # another thread's element

    return reverse


def read_matrix(x, out, by_column):
    """Coalescing: thread ``i`` copies element ``i`` of ``x`` taken row by row (neighbouring lanes
    read neighbouring floats) or column by column (neighbours sit a row apart)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows, cols = x.shape
    if i < rows * cols:
        if by_column:
            out[i] = x[i % rows, i // rows]
        else:
            out[i] = x[i // cols, i % cols]


def row_sums_source(pad: int):
    """Banks: a warp stages a 32 x 32 tile in shared memory, then each lane sums its own row; row
    stride ``32 + pad`` words puts lane ``t``'s word on bank ``t * pad mod 32``."""
    PAD = pad

    def row_sums(x, out):
        tile = cuda.shared.array((WARP, WARP + PAD), float32)
        t = cuda.threadIdx.x
        for r in range(WARP):
            tile[r, t] = x[r, t]  # a warp writes one row: 32 banks, and a coalesced read of x
        cuda.syncthreads()
        s = float32(0.0)
        for c in range(WARP):
            s += tile[t, c]  # a warp reads one column
        out[t] = s

    return row_sums


def micro_tile_source(tm: int, tn: int):
    """Registers: thread ``t`` owns a ``tm x tn`` block of ``c = a^T b`` (``a (k, M)``, ``b (k, N)``);
    per step of the sum it loads ``tm + tn`` values into registers and does ``tm * tn`` multiply-adds."""
    TM, TN = tm, tn

    def micro_tile(a, b, c):
        t = cuda.threadIdx.x
        r0 = t // (c.shape[1] // TN) * TM
        c0 = t % (c.shape[1] // TN) * TN
        acc = cuda.local.array((TM, TN), float32)  # registers, private to the thread
        ra = cuda.local.array(TM, float32)
        rb = cuda.local.array(TN, float32)
        for x in range(TM * TN):
            acc[x // TN, x % TN] = float32(0.0)
        for k in range(a.shape[0]):
            for x in range(TM):
                ra[x] = a[k, r0 + x]
            for y in range(TN):
                rb[y] = b[k, c0 + y]
            for x in range(TM * TN):
                acc[x // TN, x % TN] += ra[x // TN] * rb[x % TN]
        for x in range(TM * TN):
            c[r0 + x // TN, c0 + x % TN] = acc[x // TN, x % TN]

    return micro_tile


class TileOwners(NamedTuple):
    """Which thread of a ``register_tiled`` block wrote each element of P (the S tile after the
    softmax, in shared memory) and of O (in global memory), as recorded in the simulator."""

    s: np.ndarray  # (rows, keys) thread index
    o: np.ndarray  # (rows, d) thread index
    tiles: dict


def register_tiled_owners(d: int = 16, seed: int = 0, **tiles) -> TileOwners:
    """Run :func:`flashlab.cuda.forward.register_tiled_source` on one tile (``N_q = rows``, ``N_k = keys``)
    over recorded arrays; tiny defaults (16 threads) keep the simulator quick."""
    from flashlab.cuda.forward import register_layout
    from flashlab.cuda.registry import make_kernel

    tiles = {"rows": 8, "keys": 8, "tm": 2, "tn": 2, "g": 4, "unroll": 4} | tiles
    spec = make_kernel("register_tiled", d, False, **tiles)
    rows, keys = tiles["rows"], tiles["keys"]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, n, d)).astype(np.float32) for n in (rows, keys, keys))
    o, lse = np.full((1, rows, d), np.nan, np.float32), np.full((1, rows), np.nan, np.float32)
    t = Trace()
    args = (*(t.wrap(n, x) for n, x in zip("qkvo", (q, k, v, o), strict=True)), t.wrap("lse", lse))
    simulate(
        spec.source,
        (1, 1),
        spec.block,
        (*args, rows, keys, np.float32(d**-0.5), 0),
        spec.shared_bytes,
        make=t.shared,
    )
    lay = register_layout(d, rows, keys, tiles["g"])
    smem = owner_map(t.of("shared0", "w"), (lay.floats,))  # P is written after K, over K's space
    s = smem[lay.p : lay.p + rows * lay.p_stride].reshape(rows, lay.p_stride)[:, :keys]
    return TileOwners(s, owner_map(t.of("o", "w"), (rows, d)), tiles)


# --------------------------------------------------------------------------------------------------
# occupancy
# --------------------------------------------------------------------------------------------------


class Occupancy(NamedTuple):
    """How many blocks of one kernel fit on an SM at once, and which resource stops the next one."""

    blocks: int
    limits: dict  # resource -> blocks it allows
    warps: int
    fraction: float  # resident warps / warp slots (the occupancy)

    @property
    def binding(self) -> str:
        return min(self.limits, key=self.limits.get)


def occupancy(threads: int, registers: int, shared_bytes: int, gpu: str = "H200") -> Occupancy:
    """Blocks per SM for a block of ``threads`` using ``registers`` per thread and ``shared_bytes``.

    Limits: ``SM90`` (threads, blocks, registers, allocated per warp in units of 256) and the shared
    memory per SM of ``data/hardware.json``.
    """
    most = SM90["threads_per_block"]
    if not 1 <= threads <= most:
        raise ValueError(f"threads: {threads} per block; a block has 1 to {most} threads")
    if not 1 <= registers <= SM90["max_registers_per_thread"]:
        raise ValueError(f"registers: {registers} per thread; a thread has 1 to 255")
    warps = math.ceil(threads / WARP)
    unit = SM90["register_unit"]
    per_warp = math.ceil(registers * WARP / unit) * unit
    shared_sm = hardware.shared_memory_bytes(gpu)
    limits = {
        "threads": SM90["threads"] // (warps * WARP),
        "blocks": SM90["blocks"],
        "registers": SM90["registers"] // (per_warp * warps),
        "shared memory": shared_sm // (shared_bytes + SM90["shared_reserved_per_block"]),
    }
    blocks = min(limits.values())
    slots = SM90["threads"] // WARP
    return Occupancy(blocks, limits, blocks * warps, blocks * warps / slots)


def fill_sm(threads: int, registers: int, shared_bytes: int, gpu: str = "H200") -> int:
    """Blocks per SM found the slow way: add blocks one by one until one resource runs out (an
    independent check of :func:`occupancy`)."""
    warps = math.ceil(threads / WARP)
    unit = SM90["register_unit"]
    need = {
        "threads": warps * WARP,
        "registers": math.ceil(registers * WARP / unit) * unit * warps,
        "shared": shared_bytes + SM90["shared_reserved_per_block"],
        "blocks": 1,
    }
    have = {
        "threads": SM90["threads"],
        "registers": SM90["registers"],
        "shared": hardware.shared_memory_bytes(gpu),
        "blocks": SM90["blocks"],
    }
    blocks = 0
    while all(have[r] >= need[r] for r in need):
        for r in need:
            have[r] -= need[r]
        blocks += 1
    return blocks


# --------------------------------------------------------------------------------------------------
# timing on a GPU
# --------------------------------------------------------------------------------------------------


def time_on_gpu(kernel, grid, block, *args, repeat: int = 20) -> float | None:
    """Median milliseconds of ``kernel[grid, block](*args)`` on the GPU (arrays copied there first);
    ``None`` in the simulator, where a time would measure Python, not the GPU."""
    if device.MODE != "gpu":
        return None
    jitted = cuda.jit(kernel)
    dev = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    jitted[grid, block](*dev)  # compile and warm up
    times = []
    for _ in range(repeat):
        start, stop = cuda.event(), cuda.event()
        start.record()
        jitted[grid, block](*dev)
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop))
    return float(np.median(times))


def gpu_timings(side: int = 8192) -> dict[str, float] | None:
    """Coalesced vs column-order reads of a ``side x side`` float32 matrix, and conflicting vs padded
    shared-memory columns (1 warp per block, ``side`` blocks), in ms; ``None`` without a GPU."""
    if device.MODE != "gpu":
        return None
    x = np.ones((side, side), np.float32)
    out = np.empty(side * side, np.float32)
    grid = (side * side // 256,)
    tiles = np.ones((WARP, WARP), np.float32)
    sums = np.empty(WARP, np.float32)
    return {
        "rows (coalesced)": time_on_gpu(read_matrix, grid, (256,), x, out, False),
        "columns (strided)": time_on_gpu(read_matrix, grid, (256,), x, out, True),
        "shared, pad 0 (32-way conflict)": time_on_gpu(row_sums_source(0), (side,), (WARP,), tiles, sums),
        "shared, pad 1 (no conflict)": time_on_gpu(row_sums_source(1), (side,), (WARP,), tiles, sums),
    }
