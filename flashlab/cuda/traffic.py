"""A kernel's own memory traffic, counted by running its source over counting arrays.

:func:`count_traffic` (forward) and :func:`count_backward_traffic` run a registry kernel in numba's
CUDA simulator (also on a machine with a GPU), through the launcher's own path
(:func:`flashlab.cuda.launch.run`), but hand it :class:`CountingArray` arrays instead of plain ones:
every element a thread reads or writes in global memory (Q, K, V, O, lse; in the backward also dO,
D, dQ, dK, dV) and in shared memory is counted, together with the set of distinct global elements
read. Nothing is modelled: the numbers are what the kernel's source does, line by line.
:meth:`KernelTraffic.hbm` turns the global counts into a :class:`flashlab.traffic.Traffic`, to
compare with chapter 3's closed form for the same tiles (:func:`model_traffic`). Local arrays
(registers) are not counted.

Global memory here means what the kernel asks of the memory system; on a real GPU, repeated reads
of the same K/V tile by different thread blocks are often served by the L2 cache rather than HBM.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from flashlab.cuda import launch
from flashlab.cuda.registry import make_kernel
from flashlab.traffic import Traffic, fa2_backward, fa2_forward

TENSORS = ("Q", "K", "V", "O", "lse")
BACKWARD_TENSORS = {"q": "Q", "k": "K", "v": "V", "o": "O", "lse": "lse", "do": "dO"}
BACKWARD_TENSORS |= {"delta": "D", "dq": "dQ", "dk": "dK", "dv": "dV"}


class CountingArray:
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


def _shared_totals(blocks) -> tuple[int, int]:
    arrays = [a for block in blocks for a in block.arrays.values()]
    return sum(a.reads() for a in arrays), sum(a.writes() for a in arrays)


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


def _traffic(kernel, spec, arrays: dict, names: dict, blocks) -> KernelTraffic:
    shared_reads, shared_writes = _shared_totals(blocks)
    counted = {names[key]: arr for key, arr in arrays.items()}
    return KernelTraffic(
        kernel=kernel,
        tiles=spec.tiles,
        reads={name: arr.reads() for name, arr in counted.items()},
        writes={name: arr.writes() for name, arr in counted.items()},
        distinct_reads={name: len(arr.distinct) for name, arr in counted.items() if arr.distinct is not None},
        shared_reads=shared_reads,
        shared_writes=shared_writes,
    )


def count_traffic(q, k, v, *, kernel="register_tiled", causal=False, scale=None, tiles=None):
    """Run forward ``kernel`` in the simulator over counting arrays.

    Same inputs as :func:`flashlab.cuda.flash_attention` (float32; keep them tiny: every thread is
    a Python thread). Returns ``(KernelTraffic, o, lse)`` so the caller can also check the answer.
    """
    a, inputs = launch.forward_problem(q, k, v, scale)
    d = a.q.shape[-1]
    spec = make_kernel(kernel, d, causal, **(tiles or {}))
    bh, n_q, _ = inputs["q"].shape
    o = np.full((bh, n_q, d), np.nan, np.float32)  # poisoned: every element must be written
    lse = np.full((bh, n_q), np.nan, np.float32)
    arrays = {key: CountingArray(x, track_distinct=True) for key, x in inputs.items()}
    arrays |= {"o": CountingArray(o), "lse": CountingArray(lse)}
    blocks = launch.run(
        spec, launch.forward_args(arrays, arrays["o"], arrays["lse"], a.scale), make=CountingArray
    )
    names = dict(zip(("q", "k", "v", "o", "lse"), TENSORS, strict=True))
    lead = a.q.shape[:-2]
    return (
        _traffic(kernel, spec, arrays, names, blocks or []),
        o.reshape(lead + (n_q, d)),
        lse.reshape(lead + (n_q,)),
    )


def count_backward_traffic(q, k, v, o, lse, do, *, causal=False, scale=None, tiles=None):
    """Run the backward kernel (pre-pass included) in the simulator over counting arrays.

    Same inputs as :func:`flashlab.cuda.flash_attention_backward` (NumPy, tiny). Returns
    ``(KernelTraffic, (dq, dk, dv))`` with the gradients as 3-d ``(B, N, d)`` float32 arrays.
    """
    a, inputs = launch.backward_problem(q, k, v, o, lse, do, scale)
    spec = make_kernel("backward", a.q.shape[-1], causal, **(tiles or {}))
    outs = {"delta": inputs["lse"], "dq": inputs["q"], "dk": inputs["k"], "dv": inputs["v"]}
    outs = {key: np.full(x.shape, np.nan, np.float32) for key, x in outs.items()}  # poisoned
    arrays = {key: CountingArray(x, track_distinct=key in ("q", "k", "v")) for key, x in inputs.items()}
    arrays |= {key: CountingArray(x) for key, x in outs.items()}
    args = launch.backward_args(arrays, *(arrays[key] for key in ("delta", "dq", "dk", "dv")), scale=a.scale)
    blocks = launch.run_backward(spec, args, make=CountingArray)
    return _traffic("backward", spec, arrays, BACKWARD_TENSORS, blocks), (outs["dq"], outs["dk"], outs["dv"])


def model_traffic(traffic: KernelTraffic, n_q: int, n_k: int, d: int, *, causal=False, batch=1) -> Traffic:
    """Chapter 3's FA2 closed form for the tiles the kernel ran with (forward: block_q = rows,
    block_k = keys; backward: the same names, ``fa2_backward``)."""
    tiles = dict(traffic.tiles)
    model = fa2_backward if traffic.kernel == "backward" else fa2_forward
    return model(n_q, n_k, d, block_q=tiles["rows"], block_k=tiles["keys"], causal=causal, batch=batch)


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
