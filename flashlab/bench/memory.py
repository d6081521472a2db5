"""``python -m flashlab.bench memory``: what counting HBM/SRAM traffic costs.

Times each algorithm with ``memory=None`` and with a :class:`flashlab.memory.MemoryModel` in the same
run, alternating the two so that drift affects both alike, and reports the median of the per-pair
ratios; the target is a counted run at most 1.15x the time of an uncounted one. Writes
``data/memory_overhead.csv`` and its provenance.

Counting costs a few dictionary updates per tile, whatever the tile's size, so the ratio is worst for
small tiles. The default blocks start at 64: for d = 64 the paper's rule gives ``B_r = 64`` and
``B_c >= 64`` for every SRAM of at least ``4 d^2`` elements (32 KB in fp16), i.e. on every GPU
(``--blocks 32`` shows the cost at smaller tiles). CPU time is measured with BLAS on one thread
(``threadpoolctl``): idle BLAS threads spinning on
two cores otherwise swamp the difference being measured.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from flashlab.attention import naive_attention
from flashlab.bench.common import blas_threads, provenance, write_results
from flashlab.flash import flash_attention
from flashlab.memory import MemoryModel

TARGET = 1.15


def paired_medians(fn, *, repeat: int) -> tuple[float, float, float]:
    """CPU seconds of ``fn(None)`` and ``fn(MemoryModel())`` timed in alternation after a warm-up:
    ``(median uncounted, median counted, median of the per-pair ratios)``.

    CPU time (``time.process_time``, all threads of this process) rather than wall time, so that
    other processes sharing the machine do not enter the ratio.
    """
    fn(None)
    fn(MemoryModel())
    plain, counted = [], []
    for _ in range(repeat):
        for memory, times in ((None, plain), (MemoryModel(), counted)):
            t0 = time.process_time()
            fn(memory)
            times.append(time.process_time() - t0)
    ratios = np.array(counted) / np.array(plain)
    return float(np.median(plain)), float(np.median(counted)), float(np.median(ratios))


def cases(n: int, d: int, blocks: list[int]):
    """``(label, block, fn(memory))`` for the standard algorithm and both loop orders per block size."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
    yield "standard", "", lambda memory: naive_attention(q, k, v, memory=memory)
    for block in blocks:
        for loop_order in ("fa1", "fa2"):
            yield (
                loop_order,
                block,
                lambda memory, b=block, lo=loop_order: flash_attention(
                    q, k, v, block_q=b, block_k=b, loop_order=lo, memory=memory
                ),
            )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashlab.bench memory", description=__doc__)
    parser.add_argument("--n", type=int, default=2048, help="sequence length N (default 2048)")
    parser.add_argument("--d", type=int, default=64, help="head dim d (default 64)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256], help="square block sizes")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each, counted and not")
    args = parser.parse_args(argv)
    rows = []
    for label, block, fn in cases(args.n, args.d, args.blocks):
        with blas_threads(1):
            plain, counted, ratio = paired_medians(fn, repeat=args.repeat)
        rows.append(
            {
                "algorithm": label,
                "block": block,
                "n": args.n,
                "d": args.d,
                "dtype": "float32",
                "uncounted_cpu_s": f"{plain:.6f}",
                "counted_cpu_s": f"{counted:.6f}",
                "ratio": f"{ratio:.3f}",
            }
        )
        print(
            f"{label:>8} block {block!s:>4}: {plain * 1e3:8.2f} ms, counted {counted * 1e3:8.2f} ms, "
            f"ratio {ratio:.3f}"
        )
    worst = max(float(r["ratio"]) for r in rows)
    meta = provenance(" ".join(["python -m flashlab.bench memory", *argv]))
    meta.update(
        target=f"counted <= {TARGET}x uncounted", worst_ratio=worst, repeat=args.repeat, blas_threads=1
    )
    path = write_results("memory_overhead", rows, meta)
    verdict = "met" if worst <= TARGET else "MISSED"
    print(f"worst counted/uncounted ratio {worst:.3f} (target <= {TARGET}: {verdict}); wrote {path.name}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
