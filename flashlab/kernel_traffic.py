"""A kernel's own memory traffic, counted by running its source over counting arrays.

:func:`count_traffic` runs one of :mod:`flashlab.kernels` in numba's CUDA simulator (also on a
machine with a GPU), but hands it :class:`Counted` arrays instead of plain ones: every element a
thread reads or writes in global memory (Q, K, V, O, lse) and in shared memory is counted, together
with the set of distinct global elements read. Nothing is modelled: the numbers are what the
kernel's source does, line by line. :meth:`KernelTraffic.hbm` turns the global counts into a
:class:`flashlab.traffic.Traffic`, to compare with chapter 3's closed form for the same tiles
(:func:`model_traffic`). Local arrays (registers) are not counted.

Global memory here means what the kernel asks of the memory system; on a real GPU, repeated reads
of the same K/V tile by different thread blocks are often served by the L2 cache rather than HBM.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass

import numpy as np

from flashlab.inputs import attention_inputs
from flashlab.kernels import make_kernel
from flashlab.traffic import Traffic, fa2_forward

TENSORS = ("Q", "K", "V", "O", "lse")


class Counted:
    """An array a simulated kernel reads and writes through ``[...]``, counting element accesses.

    Counts are kept per simulated thread (each thread updates only its own counter) and summed
    by :meth:`reads` / :meth:`writes`; ``distinct`` (global arrays only) records which elements
    were read at least once, so re-reads show as ``reads() > len(distinct)``.
    """

    def __init__(self, array: np.ndarray, track_distinct: bool = False):
        self.array = array
        self.shape = array.shape
        self._reads: dict[int, int] = {}
        self._writes: dict[int, int] = {}
        self.distinct: set | None = set() if track_distinct else None

    def __getitem__(self, index):
        me = threading.get_ident()
        self._reads[me] = self._reads.get(me, 0) + 1
        if self.distinct is not None:
            self.distinct.add(index)
        return self.array[index]

    def __setitem__(self, index, value):
        me = threading.get_ident()
        self._writes[me] = self._writes.get(me, 0) + 1
        self.array[index] = value

    def reads(self) -> int:
        return sum(self._reads.values())

    def writes(self) -> int:
        return sum(self._writes.values())


class _CountingShared:
    """``cuda.shared`` for the simulator: every shared array (static or dynamic) is :class:`Counted`.

    As in numba's simulator, a static array is identified by the source line that declares it,
    so all threads of a block get the same one.
    """

    def __init__(self, dynamic_bytes: int, wrap=Counted):
        self._dynamic_bytes = dynamic_bytes
        self._wrap = wrap
        self.arrays: dict = {}
        self._lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        from numba.cuda.np import numpy_support

        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        with self._lock:
            if key not in self.arrays:
                dtype = numpy_support.as_dtype(dtype)
                if shape == 0:
                    shape = self._dynamic_bytes // dtype.itemsize
                # NaN, not zeros: a kernel that reads shared memory it never wrote shows it
                self.arrays[key] = self._wrap(np.full(shape, np.nan, dtype))
            return self.arrays[key]


def simulate(
    source, grid: tuple, block: tuple, args: tuple, dynamic_shared_bytes: int = 0, shared_array=Counted
) -> list:
    """Run kernel ``source`` (a Python function) in numba's simulator, one block after another.

    Unlike ``cuda.jit(...)[grid, block]`` in simulator mode, this works on a GPU machine too and
    passes the arguments as they are (so :class:`Counted` arrays stay counted). Every shared array
    is wrapped by ``shared_array`` (:class:`Counted` or a subclass that also records who touched
    what); returns, per block, ``(shared reads, shared writes)`` in elements.
    """
    from numba.cuda.errors import normalize_kernel_dimensions
    from numba.cuda.simulator.kernel import BlockManager, _push_kernel_context
    from numba.cuda.simulator.kernelapi import FakeCUDAModule, swapped_cuda_module

    grid, block = normalize_kernel_dimensions(grid, block)
    counts = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)  # simulated threads meet at every syncthreads: switch often
    try:
        for grid_point in np.ndindex(*grid):
            fake = FakeCUDAModule(grid, block, dynamic_shared_bytes)
            shared = _CountingShared(dynamic_shared_bytes, shared_array)
            fake._shared = shared
            with _push_kernel_context(fake), swapped_cuda_module(source, fake):
                BlockManager(source, grid, block, False).run(grid_point, *args)
            counts.append(
                (
                    sum(a.reads() for a in shared.arrays.values()),
                    sum(a.writes() for a in shared.arrays.values()),
                )
            )
    finally:
        sys.setswitchinterval(old_interval)
    return counts


@dataclass(frozen=True)
class KernelTraffic:
    """What one kernel run did: element reads/writes per global tensor, shared-memory totals."""

    kernel: str
    tiles: tuple
    reads: dict[str, int]
    writes: dict[str, int]
    distinct_reads: dict[str, int]
    shared_reads: int
    shared_writes: int

    def hbm(self) -> Traffic:
        """The global-memory counts as a :class:`flashlab.traffic.Traffic` (chapter 3's units)."""
        return Traffic(dict(self.reads), dict(self.writes))

    def rereads(self) -> dict[str, float]:
        """Reads per distinct element read, per tensor (1.0: every element read once)."""
        return {name: self.reads[name] / n for name, n in self.distinct_reads.items() if n}


def count_traffic(q, k, v, *, kernel="register_tiled", causal=False, scale=None, tiles=None):
    """Run ``kernel`` in the simulator over counting arrays.

    Same inputs as :func:`flashlab.gpu.flash_attention` (float32; keep them tiny: every thread is
    a Python thread). Returns ``(KernelTraffic, o, lse)`` so the caller can also check the answer.
    """
    a = attention_inputs(q, k, v, scale)
    d = a.q.shape[-1]
    spec = make_kernel(kernel, d, causal, **(tiles or {}))
    q3, k3, v3 = (np.ascontiguousarray(x.reshape(-1, *x.shape[-2:]), np.float32) for x in (a.q, a.k, a.v))
    bh, n_q, n_k = q3.shape[0], q3.shape[1], k3.shape[1]
    o = np.full(q3.shape, np.nan, np.float32)  # poisoned: every element must be written
    lse = np.full(q3.shape[:2], np.nan, np.float32)
    arrays = {
        name: Counted(x, track_distinct=name in ("Q", "K", "V"))
        for name, x in zip(TENSORS, (q3, k3, v3, o, lse), strict=True)
    }
    grid = (math.ceil(n_q / spec.rows), bh)
    args = (*arrays.values(), n_q, n_k, np.float32(a.scale), n_k - n_q)
    shared = simulate(spec.source, grid, spec.block, args, spec.shared_bytes)
    traffic = KernelTraffic(
        kernel=kernel,
        tiles=spec.tiles,
        reads={name: arr.reads() for name, arr in arrays.items()},
        writes={name: arr.writes() for name, arr in arrays.items()},
        distinct_reads={name: len(arr.distinct) for name, arr in arrays.items() if arr.distinct is not None},
        shared_reads=sum(r for r, _ in shared),
        shared_writes=sum(w for _, w in shared),
    )
    lead = a.q.shape[:-2]
    return traffic, o.reshape(lead + (n_q, d)), lse.reshape(lead + (n_q,))


def model_traffic(traffic: KernelTraffic, n_q: int, n_k: int, d: int, *, causal=False, batch=1) -> Traffic:
    """Chapter 3's FA2 closed form for the tiles the kernel ran with (block_q = rows, block_k = keys)."""
    tiles = dict(traffic.tiles)
    return fa2_forward(n_q, n_k, d, block_q=tiles["rows"], block_k=tiles["keys"], causal=causal, batch=batch)


def shared_per_fma(traffic: KernelTraffic, n_q: int, n_k: int, d: int, *, batch: int = 1) -> float:
    """Shared-memory element reads per useful multiply-add (``2 N_q N_k d`` of them per head).

    The number that register tiling lowers: a thread that reuses each loaded value for several
    multiply-adds needs fewer shared-memory reads per multiply-add.
    """
    return traffic.shared_reads / (2 * n_q * n_k * d * batch)


def register_tiled_shared_reads(n_q: int, n_k: int, d: int, tiles: dict, *, batch: int = 1) -> int:
    """Predicted shared-memory element reads of ``register_tiled`` without a mask, from its loops.

    Each of the ``T = (rows / tm) g`` threads of a block, per K/V tile: ``d (tm + tn)`` reads for
    S (a tm-column of Q and a tn-row of K per step of the dot product), ``tm g`` for the row maxima,
    ``keys (tm + d/g)`` for O += P V; at the end each of the ``g`` threads of a row reads the row's
    ``g`` partial sums, for the ``N_q`` rows that exist.
    """
    rows, keys, tm, tn, g = (tiles[name] for name in ("rows", "keys", "tm", "tn", "g"))
    threads = rows // tm * g
    per_tile = d * (tm + tn) + tm * g + keys * (tm + d // g)
    t_r, t_c = math.ceil(n_q / rows), math.ceil(n_k / keys)
    return batch * (t_r * t_c * threads * per_tile + n_q * g * g)
