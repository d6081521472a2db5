"""HBM traffic in closed form: how many elements each attention algorithm moves between HBM and SRAM.

Every function here is a formula read off the paper's pseudo-code line by line, in **elements**
(multiply by the bytes of a dtype with :meth:`Traffic.nbytes`). The counted runs
(``naive_attention(..., memory=)``, ``flash_attention(..., memory=)``) must give exactly these
numbers; ``tests/test_traffic.py`` holds the two together over many shapes and block sizes.

Notation (Dao et al. 2022, arXiv 2205.14135): ``N_q`` queries, ``N_k`` keys, head dim ``d``, value
dim ``d_v`` (``= d`` in the paper), query block ``B_r = block_q``, key/value block ``B_c = block_k``,
``T_r = ceil(N_q / B_r)`` row blocks, ``T_c = ceil(N_k / B_c)`` column blocks. The last block of each
may be ragged (shorter). ``batch`` is the number of independent (batch, head) problems: every count
scales by it.

Causal masks are bottom-right aligned (query ``i`` sees key ``j`` iff ``j <= i + N_k - N_q``), and a
tile ``(i, j)`` whose every entry is masked is neither loaded nor computed. Which tiles are computed
comes from the course's one tile schedule, :mod:`flashlab.tiles`: the computed query blocks of a
key/value block are a suffix, the computed key blocks of a query block a prefix, so the sums below
take one term per block, not one per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlab.inputs import check_block
from flashlab.tiles import block_range, first_row_block, last_col_block, n_blocks


@dataclass(frozen=True)
class Traffic:
    """Elements moved between HBM and SRAM, per tensor name (``reads``: HBM -> SRAM).

    Tensors that move nothing are dropped, so two ``Traffic`` compare equal iff every tensor's
    reads and writes agree. ``a + b`` adds (e.g. forward + backward), ``k * a`` scales (e.g. by the
    number of heads).
    """

    reads: dict[str, int]
    writes: dict[str, int]

    def __post_init__(self):
        for side in ("reads", "writes"):
            counts = {name: int(n) for name, n in getattr(self, side).items() if n}
            object.__setattr__(self, side, counts)

    @property
    def read_elements(self) -> int:
        return sum(self.reads.values())

    @property
    def write_elements(self) -> int:
        return sum(self.writes.values())

    @property
    def elements(self) -> int:
        """Reads plus writes: the paper's "HBM accesses"."""
        return self.read_elements + self.write_elements

    def nbytes(self, dtype_bytes: int, tensor_bytes: dict[str, int] | None = None) -> int:
        """Bytes moved when every element takes ``dtype_bytes`` (2 for fp16/bf16, 4 for fp32), except
        the tensors named in ``tensor_bytes`` (e.g. ``{"lse": 4, "Z": 1}``)."""
        sizes = tensor_bytes or {}
        return sum(
            n * sizes.get(name, dtype_bytes) for side in (self.reads, self.writes) for name, n in side.items()
        )

    def table(self) -> list[tuple[str, int, int]]:
        """Rows ``(tensor, elements read, elements written)`` in first-seen order."""
        names = dict.fromkeys([*self.reads, *self.writes])
        return [(name, self.reads.get(name, 0), self.writes.get(name, 0)) for name in names]

    def __add__(self, other: Traffic) -> Traffic:
        if not isinstance(other, Traffic):
            return NotImplemented
        return Traffic(_merge(self.reads, other.reads), _merge(self.writes, other.writes))

    def __mul__(self, factor: int) -> Traffic:
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)):
            return NotImplemented
        return Traffic(
            {k: v * int(factor) for k, v in self.reads.items()},
            {k: v * int(factor) for k, v in self.writes.items()},
        )

    __rmul__ = __mul__


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for name, n in b.items():
        out[name] = out.get(name, 0) + n
    return out


def _sizes(n_q, n_k, d, d_v, batch) -> tuple[int, int, int, int, int]:
    n_q, n_k, d = check_block("n_q", n_q), check_block("n_k", n_k), check_block("d", d)
    d_v = d if d_v is None else check_block("d_v", d_v)
    return n_q, n_k, d, d_v, check_block("batch", batch)


def _blocked(n_q, n_k, d, d_v, batch, block_q, block_k) -> tuple[int, int, int, int, int, int, int]:
    blocks = check_block("block_q", block_q), check_block("block_k", block_k)
    return (*_sizes(n_q, n_k, d, d_v, batch), *blocks)


# --- which tiles a (causal) blocked algorithm computes ------------------------------------------
def computed_rows(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool = False) -> int:
    """``R``: the query rows of every computed tile ``(i, j)``, summed (``T_c N_q`` without a mask).

    What Algorithm 1 and Algorithm 4 load per inner step scales with it. Causal: key block ``j`` is
    computed with the query blocks from :func:`flashlab.tiles.first_row_block` on, a suffix of
    ``N_q - B_r first_row_block(j)`` rows.
    """
    t_c = n_blocks(n_k, block_k)
    if not causal:
        return t_c * n_q
    return sum(n_q - block_q * first_row_block(j, n_q, n_k, block_q, block_k, True) for j in range(t_c))


def computed_keys(n_q: int, n_k: int, block_q: int, block_k: int, causal: bool = False) -> tuple[int, int]:
    """``(C, live)``: the keys of every computed tile, summed (``T_r N_k`` without a mask), and the
    query rows of the query blocks that compute at least one tile (``N_q`` without a mask).

    Causal: query block ``i`` is computed with key blocks ``0 .. last_col_block(i)``
    (:func:`flashlab.tiles.last_col_block`), a prefix; none when that is ``-1`` (every row of the
    block fully masked: possible when ``N_q > N_k``).
    """
    t_r = n_blocks(n_q, block_q)
    if not causal:
        return t_r * n_k, n_q
    keys = live = 0
    for i in range(t_r):
        last = last_col_block(i, n_q, n_k, block_q, block_k, True)
        if last >= 0:
            keys += block_range(last, block_k, n_k)[1]
            r0, r1 = block_range(i, block_q, n_q)
            live += r1 - r0
    return keys, live


# --- forward ------------------------------------------------------------------------------------
def standard_forward(n_q: int, n_k: int, d: int, d_v: int | None = None, *, batch: int = 1) -> Traffic:
    """Algorithm 0 (standard attention), ``4 N d + 4 N^2`` elements when ``N_q = N_k = N``, ``d_v = d``.

    Line 1: read Q (``N_q d``), K (``N_k d``); write S (``N_q N_k``).
    Line 2: read S; write P (``N_q N_k`` each).
    Line 3: read P (``N_q N_k``), V (``N_k d_v``); write O (``N_q d_v``).
    A causal mask changes nothing: the masked entries of S and P are stored and moved as well.
    """
    n_q, n_k, d, d_v, batch = _sizes(n_q, n_k, d, d_v, batch)
    nn = n_q * n_k
    return batch * Traffic(
        reads={"Q": n_q * d, "K": n_k * d, "S": nn, "P": nn, "V": n_k * d_v},
        writes={"S": nn, "P": nn, "O": n_q * d_v},
    )


def fa1_forward(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    batch: int = 1,
) -> Traffic:
    """Algorithm 1 (FlashAttention forward, outer loop over K/V blocks, inner over Q blocks).

    Square and unmasked: reads ``2Nd + T_c (2Nd + 2N)``, writes ``T_c (Nd + 2N)``.

    Line 6: load K_j, V_j once per outer step: ``N_k (d + d_v)`` in all.
    Line 8: per computed tile (i, j) load Q_i, O_i, l_i, m_i: ``r_i (d + d_v + 2)``.
    Lines 12-13: per computed tile write O_i, l_i, m_i back: ``r_i (d_v + 2)``.
    With ``R = sum over computed tiles of r_i`` (``T_c N_q`` unmasked, see :func:`computed_rows`).
    Line 2 (O = 0, l = 0, m = -inf initialised in HBM) is not counted.
    """
    n_q, n_k, d, d_v, batch, block_q, block_k = _blocked(n_q, n_k, d, d_v, batch, block_q, block_k)
    rows = computed_rows(n_q, n_k, block_q, block_k, causal)
    return batch * Traffic(
        reads={"K": n_k * d, "V": n_k * d_v, "Q": rows * d, "O": rows * d_v, "l": rows, "m": rows},
        writes={"O": rows * d_v, "l": rows, "m": rows},
    )


def fa2_forward(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    batch: int = 1,
) -> Traffic:
    """FlashAttention-2 forward (outer loop over Q blocks, inner over K/V blocks).

    Square and unmasked: reads ``Nd + T_r 2Nd``, writes ``Nd + N``.

    Per outer step i: load Q_i (``N_q d`` in all); per computed tile (i, j) load K_j, V_j:
    ``c_j (d + d_v)`` with ``C = sum over computed tiles of c_j`` (``T_r N_k`` unmasked, see
    :func:`computed_keys`); at the end of step i write O_i and lse_i once: ``N_q (d_v + 1)``.
    O and lse are written (O = 0, lse = -inf) even for a fully masked query block, which loads nothing.
    """
    n_q, n_k, d, d_v, batch, block_q, block_k = _blocked(n_q, n_k, d, d_v, batch, block_q, block_k)
    keys, q_rows = computed_keys(n_q, n_k, block_q, block_k, causal)
    return batch * Traffic(
        reads={"Q": q_rows * d, "K": keys * d, "V": keys * d_v},
        writes={"O": n_q * d_v, "lse": n_q},
    )


FORWARD = {"standard": standard_forward, "fa1": fa1_forward, "fa2": fa2_forward}


def forward_traffic(
    algorithm: str,
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = False,
    batch: int = 1,
) -> Traffic:
    """The forward closed form of ``algorithm`` (``"standard"``, ``"fa1"`` or ``"fa2"``): one signature
    for sweeps and widgets (block sizes and ``causal`` are ignored by ``"standard"``)."""
    if algorithm not in FORWARD:
        raise ValueError(f"algorithm must be one of {', '.join(FORWARD)}, got {algorithm!r}")
    if algorithm == "standard":
        return standard_forward(n_q, n_k, d, d_v, batch=batch)
    return FORWARD[algorithm](n_q, n_k, d, d_v, block_q=block_q, block_k=block_k, causal=causal, batch=batch)


def grouped(traffic: Traffic, group: int) -> Traffic:
    """``traffic`` counted per query head, with K and V shared by ``group`` query heads (grouped-query
    attention; ``group = h_q`` is multi-query): the query tiles of a group are stacked on chip, so K and
    V are read once per group and their reads divide by ``group``. Pass a forward whose ``batch``
    counts query heads."""
    group = check_block("group", group)
    reads = dict(traffic.reads)
    for name in ("K", "V"):
        if reads.get(name, 0) % group:
            raise ValueError(
                f"group={group} does not divide the {reads[name]} {name} reads: batch must count "
                "query heads, a multiple of group"
            )
        reads[name] = reads.get(name, 0) // group
    return Traffic(reads, traffic.writes)


# --- backward -----------------------------------------------------------------------------------
def standard_backward(n_q: int, n_k: int, d: int, d_v: int | None = None, *, batch: int = 1) -> Traffic:
    """Algorithm 3 (standard attention backward), ``8 N d + 7 N^2`` elements when square with ``d_v = d``.

    Line 1: read P (``N_q N_k``), dO (``N_q d_v``); write dV (``N_k d_v``).
    Line 2: read dO, V (``N_k d_v``); write dP (``N_q N_k``).
    Line 3: read P, dP; write dS (``N_q N_k`` each).
    Line 4: read dS, K (``N_k d``); write dQ (``N_q d``).
    Line 5: read dS, Q (``N_q d``); write dK (``N_k d``).
    """
    n_q, n_k, d, d_v, batch = _sizes(n_q, n_k, d, d_v, batch)
    nn = n_q * n_k
    return batch * Traffic(
        reads={"P": 2 * nn, "dO": 2 * n_q * d_v, "V": n_k * d_v, "dP": nn, "dS": 2 * nn}
        | {"K": n_k * d, "Q": n_q * d},
        writes={"dV": n_k * d_v, "dP": nn, "dS": nn, "dQ": n_q * d, "dK": n_k * d},
    )


def fa1_backward(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    lse: bool = False,
    batch: int = 1,
) -> Traffic:
    """Algorithm 4 (FlashAttention backward: outer loop over K/V blocks, inner over Q blocks).

    Square and unmasked: reads ``2Nd + T_c (4Nd + 2N)``, writes ``T_c Nd + 2Nd``.

    Line 7: load K_j, V_j once per outer step: ``N_k (d + d_v)``.
    Line 10: per computed tile (i, j) load Q_i, O_i, dO_i, dQ_i, l_i, m_i:
    ``r_i (2d + 2d_v + 2)`` (``lse=True``: an implementation that saved ``lse_i = m_i + log l_i``
    loads that one vector instead of l_i and m_i: ``r_i (2d + 2d_v + 1)``).
    Lines 11-20, 22 (S, P, dV~_j, dP, D_i = rowsum(dO_i * O_i), dS, dK~_j) stay on chip.
    Line 21: per computed tile write dQ_i: ``r_i d``.
    Line 24: write dK_j, dV_j once per outer step: ``N_k (d + d_v)``.
    ``R = sum over computed tiles of r_i`` as in :func:`fa1_forward`. Line 5 (dQ, dK, dV = 0 in HBM)
    is not counted.
    """
    n_q, n_k, d, d_v, batch, block_q, block_k = _blocked(n_q, n_k, d, d_v, batch, block_q, block_k)
    rows = computed_rows(n_q, n_k, block_q, block_k, causal)
    stats = {"lse": rows} if lse else {"l": rows, "m": rows}
    return batch * Traffic(
        reads={"K": n_k * d, "V": n_k * d_v, "Q": rows * d, "O": rows * d_v, "dO": rows * d_v}
        | {"dQ": rows * d}
        | stats,
        writes={"dQ": rows * d, "dK": n_k * d, "dV": n_k * d_v},
    )


def fa2_backward(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = False,
    batch: int = 1,
) -> Traffic:
    """FlashAttention-2 backward (Dao 2023, Algorithm 2): D precomputed once, lse instead of l and m.

    Square and unmasked: reads ``4Nd + T_c (3Nd + 2N)``, writes ``N + T_c Nd + 2Nd``.

    Line 4 (a separate pass): read dO, O (``N_q d_v`` each); write ``D = rowsum(dO * O)`` (``N_q``).
    Line 6: load K_j, V_j once per outer step: ``N_k (d + d_v)``.
    Line 9: per computed tile (i, j) load Q_i, dO_i, dQ_i, lse_i, D_i: ``r_i (2d + d_v + 2)``.
    Line 15: per computed tile update dQ_i += dS K_j in HBM (an atomic add on a GPU): write ``r_i d``.
    Line 18: write dK_j, dV_j once per outer step: ``N_k (d + d_v)``.
    """
    n_q, n_k, d, d_v, batch, block_q, block_k = _blocked(n_q, n_k, d, d_v, batch, block_q, block_k)
    rows = computed_rows(n_q, n_k, block_q, block_k, causal)
    return batch * Traffic(
        reads={"O": n_q * d_v, "dO": n_q * d_v + rows * d_v, "K": n_k * d, "V": n_k * d_v}
        | {"Q": rows * d, "dQ": rows * d, "lse": rows, "D": rows},
        writes={"D": n_q, "dQ": rows * d, "dK": n_k * d, "dV": n_k * d_v},
    )


# --- a standard implementation, kernel by kernel (the paper's Figure 2, left) --------------------
EXTRA_KERNELS = ("scale", "mask", "dropout")


def standard_kernels(
    n_q: int,
    n_k: int,
    d: int,
    d_v: int | None = None,
    *,
    extra: tuple[str, ...] = EXTRA_KERNELS,
    backward: bool = False,
    batch: int = 1,
) -> list[tuple[str, Traffic]]:
    """The kernels an unfused framework implementation launches, each moving its ``N_q x N_k``
    operands through HBM: ``[(kernel, traffic), ...]`` in launch order.

    Always: ``S = Q K^T``, ``softmax`` (S -> P), ``O = P V`` (Algorithm 0). ``extra`` adds separate
    elementwise kernels, each reading and writing the whole score matrix: ``"scale"`` (S * tau),
    ``"mask"`` (masked_fill; the broadcast boolean mask itself is not counted), ``"dropout"`` (reads P,
    writes the dropped P_drop and the keep mask Z, one byte per element in PyTorch). With
    ``backward=True`` the backward kernels follow in reverse order (Algorithm 3 plus the backward of
    each extra kernel; the dropout backward reads Z). ``extra=()`` gives exactly
    :func:`standard_forward` (+ :func:`standard_backward`).
    """
    n_q, n_k, d, d_v, batch = _sizes(n_q, n_k, d, d_v, batch)
    unknown = set(extra) - set(EXTRA_KERNELS)
    if unknown:
        raise ValueError(f"extra must name kernels among {EXTRA_KERNELS}, got unknown {sorted(unknown)}")
    nn = n_q * n_k
    p = "P_drop" if "dropout" in extra else "P"

    def kernel(name, reads, writes):
        return (name, batch * Traffic(reads, writes))

    def elementwise(name, src, dst, also_written=None):
        return kernel(name, {src: nn}, {dst: nn} | (also_written or {}))

    fwd = [kernel("S = Q K^T", {"Q": n_q * d, "K": n_k * d}, {"S": nn})]
    fwd += [elementwise(k, "S", "S") for k in ("scale", "mask") if k in extra]
    fwd.append(elementwise("softmax", "S", "P"))
    if "dropout" in extra:
        fwd.append(elementwise("dropout", "P", "P_drop", {"Z": nn}))
    fwd.append(kernel("O = P V", {p: nn, "V": n_k * d_v}, {"O": n_q * d_v}))
    if not backward:
        return fwd
    bwd = [
        kernel("dV = P^T dO", {p: nn, "dO": n_q * d_v}, {"dV": n_k * d_v}),
        kernel("dP = dO V^T", {"dO": n_q * d_v, "V": n_k * d_v}, {"dP": nn}),
    ]
    if "dropout" in extra:
        bwd.append(kernel("dropout backward", {"dP": nn, "Z": nn}, {"dP": nn}))
    bwd.append(kernel("softmax backward", {"P": nn, "dP": nn}, {"dS": nn}))
    bwd += [elementwise(f"{k} backward", "dS", "dS") for k in ("mask", "scale") if k in extra]
    bwd.append(kernel("dQ = dS K", {"dS": nn, "K": n_k * d}, {"dQ": n_q * d}))
    bwd.append(kernel("dK = dS^T Q", {"dS": nn, "Q": n_q * d}, {"dK": n_k * d}))
    return fwd + bwd


def total(kernels: list[tuple[str, Traffic]]) -> Traffic:
    """The traffic of a list of ``(kernel, traffic)`` pairs, summed."""
    return sum((t for _, t in kernels), Traffic({}, {}))


# --- SRAM: the paper's block rule and what it has to hold ----------------------------------------
def paper_blocks(m: int, d: int) -> tuple[int, int]:
    """The paper's block sizes for an SRAM of ``M = m`` elements (Algorithm 1, line 1):
    ``B_c = ceil(M / 4d)``, ``B_r = min(B_c, d)``. Returns ``(B_r, B_c)`` = ``(block_q, block_k)``.

    The rule sizes the four tiles with ``d`` columns, Q_i, O_i (``B_r`` rows) and K_j, V_j (``B_c``
    rows), to share M: see :func:`paper_sram_elements` for exactly what fits.
    """
    m, d = check_block("m (SRAM size in elements)", m), check_block("d", d)
    block_k = -(-m // (4 * d))
    return min(block_k, d), block_k


def paper_sram_elements(block_q: int, block_k: int, d: int, d_v: int | None = None) -> int:
    """The SRAM the paper's accounting charges: Q_i, O_i (``B_r x d``, ``B_r x d_v``) and K_j, V_j
    (``B_c x d``, ``B_c x d_v``), i.e. ``(B_r + B_c)(d + d_v)`` elements.

    What holds exactly, for ``(B_r, B_c) = paper_blocks(M, d)`` and ``d_v = d``: the four tiles take
    ``2d (B_r + B_c) <= 4d B_c = 4d ceil(M / 4d) < M + 4d`` elements, so they fit in M whenever 4d
    divides M, and otherwise overshoot by fewer than 4d elements (one row of each tile). The paper's
    proof of Theorem 2 keeps only ``B_c d = O(M)`` and ``B_r B_c = O(M)``: the score tile S_ij
    (``B_r B_c <= M / 4 + d``) and the row statistics are extra, within those constant factors
    (:func:`sram_elements` counts them too).
    """
    _, _, d, d_v, _ = _sizes(1, 1, d, d_v, 1)
    return (check_block("block_q", block_q) + check_block("block_k", block_k)) * (d + d_v)


def sram_elements(
    block_q: int,
    block_k: int,
    d: int,
    d_v: int | None = None,
    *,
    n_q: int | None = None,
    n_k: int | None = None,
    backward: bool = False,
) -> int:
    """The peak SRAM, in elements, of what the course's blocked implementations hold on chip.

    Forward (:func:`flashlab.flash_attention`, both loop orders): K_j, V_j (``B_c (d + d_v)``), Q_i,
    O_i and the row statistics m_i, l_i (``B_r (d + d_v + 2)``) and one score tile S_ij, which P_ij
    overwrites (``B_r B_c``). Backward (:func:`flashlab.flash_attention_backward`): K_j, V_j and the
    accumulators dK_j, dV_j (``2 B_c (d + d_v)``), Q_i, dQ_i, dO_i, lse_i, D_i
    (``B_r (2d + d_v + 2)``), and P_ij, dS_ij (``2 B_r B_c``). Per (batch, head) problem; with
    ``n_q``, ``n_k`` given, a block longer than the sequence counts only the rows that exist. This is
    the exact peak of a counted run, except that a causal run with ``N_q > N_k`` may skip every full
    query block and so hold less.
    """
    _, _, d, d_v, _ = _sizes(1, 1, d, d_v, 1)
    b_r, b_c = check_block("block_q", block_q), check_block("block_k", block_k)
    b_r = b_r if n_q is None else min(b_r, check_block("n_q", n_q))
    b_c = b_c if n_k is None else min(b_c, check_block("n_k", n_k))
    if backward:
        return 2 * b_c * (d + d_v) + b_r * (2 * d + d_v + 2) + 2 * b_r * b_c
    return b_c * (d + d_v) + b_r * (d + d_v + 2) + b_r * b_c


def fitting_blocks(m: int, d: int, d_v: int | None = None, *, backward: bool = False) -> tuple[int, int]:
    """The largest blocks of the paper's shape (``B_r = min(B_c, d)``) whose every tile fits in
    ``M = m`` elements by :func:`sram_elements`: ``(block_q, block_k)``.

    Unlike :func:`paper_blocks`, this never overflows; ``ValueError`` if even 1 x 1 tiles do not fit.
    """
    m = check_block("m (SRAM size in elements)", m)

    def fits(b_c: int) -> bool:
        return sram_elements(min(b_c, d), b_c, d, d_v, backward=backward) <= m

    if not fits(1):
        need = sram_elements(1, 1, d, d_v, backward=backward)
        raise ValueError(f"sram_elements={m} is too small: even 1 x 1 blocks need {need} elements (d={d})")
    lo, hi = 1, m // d  # fits(lo); K_j alone takes B_c d <= M
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return min(lo, d), lo


def attention_flops(n_q: int, n_k: int, d: int, d_v: int | None = None, *, batch: int = 1) -> int:
    """Matmul FLOPs of one attention forward: ``2 N_q N_k d`` for ``Q K^T`` plus ``2 N_q N_k d_v`` for
    ``P V`` (a multiply-add is 2 FLOPs; ``4 N^2 d`` when square, the FlashAttention-2 convention)."""
    n_q, n_k, d, d_v, batch = _sizes(n_q, n_k, d, d_v, batch)
    return 2 * n_q * n_k * (d + d_v) * batch
