"""Chapter 3 exercise: FlashAttention-2's forward HBM traffic in closed form.

The learner writes ``fa2_traffic(n, d, block_q, block_k) -> (reads, writes)``: the elements
FA2's forward moves between HBM and SRAM for one square, unmasked head (``N_q = N_k = N``,
``d_v = d``). The checker compares it with a counted run of :func:`flashlab.flash_attention`
(``loop_order="fa2"``, ``memory=``) on small ragged sizes and with
:func:`flashlab.traffic.fa2_forward` on large ones, and when a count is off it names the term
that is wrong by trying the usual wrong formulas on the same sizes. The solution is the closed form
the chapter derives, ``reads = N d + T_r 2 N d``, ``writes = N d + N``.
"""

from __future__ import annotations

import math

import numpy as np

from flashlab import traffic
from flashlab.check import Mistake, exercise, expect
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel


def fa2_forward_traffic(n, d, block_q, block_k):
    """FA2 forward's HBM ``(reads, writes)`` in elements, square (``N_q = N_k = n``), unmasked, ``d_v = d``.

    Each of the ``T_r = ceil(n / B_r)`` query blocks loads its ``Q_i`` once (``n d`` in all) and
    streams the whole of ``K`` and ``V`` past it (``2 n d`` per query block); it writes ``O_i`` and
    ``lse_i`` once (``n d + n`` in all). ``block_k`` changes nothing: every key is loaded once per
    query block whichever way the keys are cut.
    """
    t_r = math.ceil(n / block_q)
    return n * d + t_r * 2 * n * d, n * d + n


# Sizes: (N, d, B_r, B_c). Ragged blocks first (T_r != T_c, B_r not dividing N), then blocks longer
# than N, 1-row blocks, and a large size checked against the closed form only (too big to run here).
COUNTED = [(100, 8, 16, 32), (37, 5, 8, 64), (33, 4, 1, 7), (50, 3, 64, 3), (24, 4, 6, 6)]
CLOSED_FORM_ONLY = [(4096, 128, 128, 64), (1000, 64, 96, 128)]


READS = "count Q once (N d in all) and K, V once per query block (T_r * 2Nd)"
WRITES = "count O once (N d in all) and lse once (N)"


def _counted(n: int, d: int, block_q: int, block_k: int) -> tuple[int, int]:
    """The elements a run of FA2 reads and writes, counted by the memory model."""
    q, k, v = (np.ones((n, d), np.float32) for _ in range(3))
    memory = MemoryModel()
    flash_attention(q, k, v, block_q=block_q, block_k=block_k, loop_order="fa2", memory=memory)
    return memory.hbm_read_elements, memory.hbm_write_elements


def _wrong_reads(n, d, t_r, t_c, block_q):
    """The usual wrong read counts, each with the words that explain it."""
    nd = n * d
    return {
        f"used T_c = ceil(N / B_c) = {t_c} where T_r = ceil(N / B_r) = {t_r} belongs: FA2's outer loop is "
        "over query blocks, and K and V stream past each of them": nd + t_c * 2 * nd,
        "K and V are read once per query block: T_r * 2Nd, not 2Nd (only Algorithm 0 reads them once)": 3
        * nd,
        "K and V are both read once per query block: T_r * 2Nd (you counted only one of them)": nd + t_r * nd,
        "forgot Q: each query block loads its Q_i once, N d in all": t_r * 2 * nd,
        "Q is read once in all (each Q_i stays on chip for its whole inner loop), not once per tile: "
        "N d, not T_c N d": t_c * nd + t_r * 2 * nd,
        f"T_r = ceil(N / B_r) = {t_r}: a ragged last query block is still a block that reads all of K and V, "
        "so round N / B_r up": nd + (n / block_q) * 2 * nd,
        f"T_r = ceil(N / B_r) = {t_r}, not floor(N / B_r) = {n // block_q}: the ragged last query block "
        "reads all of K and V too": nd + (n // block_q) * 2 * nd,
        "that is Algorithm 1's (FA1's) count, 2Nd + T_c (2Nd + 2N): FA2 swaps the loops, so Q_i, O_i, "
        "l_i, m_i stay on chip and K, V are the ones re-read": 2 * nd + t_c * (2 * nd + 2 * n),
    }


def _wrong_writes(n, d, t_r, t_c):
    nd = n * d
    return {
        "O is written once, not per tile: O_i stays on chip through the inner loop and is written at its "
        "end, N d in all (plus lse)": t_c * nd + n,
        "O and lse are written once, not per tile: N d + N in all": t_c * (nd + n),
        "O is written once per query block, N d in all, not once per query block per key block "
        "(T_r T_c tiles)": t_r * t_c * nd + n,
        "forgot lse: FA2 also writes lse_i = m_i + log l_i, one number per row (N), for the backward": nd,
        "FA2 writes one lse per row (N), not l and m (2N)": nd + 2 * n,
        "that is Algorithm 1's (FA1's) count, T_c (Nd + 2N): FA2 writes O and lse once, N d + N": t_c
        * (nd + 2 * n),
    }


def _explain(side: str, got, want: int, wrong: dict, hint: str) -> str:
    words = next((w for w, x in wrong.items() if np.isclose(got, x, rtol=0, atol=0.5)), None)
    return f"{side} = {got}, expected {want}: " + (words or hint)


@exercise(
    "fa2_traffic",
    chapter=3,
    title="FA2's forward HBM traffic fa2_traffic(n, d, block_q, block_k) -> (reads, writes), in elements",
    solution=fa2_forward_traffic,
)
def check_fa2_traffic(fa2_traffic) -> None:
    """Counted runs on ragged sizes, then the closed form on large ones; the first wrong count explained."""
    for counted, sizes in ((True, COUNTED), (False, CLOSED_FORM_ONLY)):
        for n, d, block_q, block_k in sizes:
            out = fa2_traffic(n, d, block_q, block_k)
            expect(
                isinstance(out, tuple) and len(out) == 2,
                f"fa2_traffic must return the pair (reads, writes), got {out!r}",
            )
            closed = traffic.fa2_forward(n, n, d, block_q=block_q, block_k=block_k)
            want = (
                _counted(n, d, block_q, block_k) if counted else (closed.read_elements, closed.write_elements)
            )
            source = "a counted run" if counted else "traffic.fa2_forward"
            what = f"N = {n}, d = {d}, B_r = {block_q}, B_c = {block_k} ({source})"
            t_r, t_c = math.ceil(n / block_q), math.ceil(n / block_k)
            if not np.isclose(out[0], want[0], rtol=0, atol=0.5):
                raise Mistake(
                    f"{what}: "
                    + _explain("reads", out[0], want[0], _wrong_reads(n, d, t_r, t_c, block_q), READS)
                )
            if not np.isclose(out[1], want[1], rtol=0, atol=0.5):
                raise Mistake(
                    f"{what}: " + _explain("writes", out[1], want[1], _wrong_writes(n, d, t_r, t_c), WRITES)
                )
