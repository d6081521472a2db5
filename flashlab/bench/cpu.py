"""``python -m flashlab.bench cpu``: standard vs blocked attention vs torch SDPA on this CPU.

One head, ``d = 64``, float32, ``N_q = N_k = N``. For every ``N`` it times (median of ``--repeat``
runs after one warm-up) and measures the peak memory of:

- ``naive``: :func:`flashlab.naive_attention` (Algorithm 0, the full ``N x N`` matrices);
- ``fa1`` / ``fa2``: :func:`flashlab.flash.flash_attention` at a few block sizes ``(B_r, B_c)``;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the CPU (4-D input, so torch
  picks its fused CPU flash-attention kernel).

Peak memory is the most memory allocated at once during one call, beyond the inputs: by
``tracemalloc`` for NumPy (NumPy reports its buffers to it), by torch's profiler for torch (the
running sum of its allocation and free events). The error column is the largest absolute difference
from a float64 ``naive_attention``. Results go to ``data/cpu_bench.csv`` (+ provenance) and a plot
``data/cpu_bench.png``; the summary checks the chapter's target at ``N = 4096``.
"""

from __future__ import annotations

import argparse
import csv
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from flashlab.attention import naive_attention
from flashlab.bench.common import (
    DATA,
    attention_tflops,
    blas_report,
    blas_threads,
    median_seconds,
    provenance,
    write_results,
)
from flashlab.flash import flash_attention
from flashlab.tolerance import Bound, attention_bound

NAME = "cpu_bench"
SIZES = (1024, 2048, 4096, 8192)
# (loop order, B_r, B_c, threads): the course default 64 x 64, larger tiles that amortise NumPy's
# per-call cost, and FA2's query blocks spread over two threads (BLAS limited to one thread each).
FLASH_SETTINGS = (
    ("fa1", 64, 64, 1),
    ("fa1", 256, 1024, 1),
    ("fa2", 64, 64, 1),
    ("fa2", 256, 1024, 1),
    ("fa2", 256, 1024, 2),
)
TARGET_N, TARGET_TIME_RATIO, TARGET_MEMORY_RATIO = 4096, 2.0, 50.0


def tracemalloc_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (as seen by ``tracemalloc``) during one call of ``fn``."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def torch_peak(fn: Callable[[], object]) -> int:
    """Peak bytes torch's CPU allocator holds during one call of ``fn``, from its profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    used = peak = 0
    for event in events:
        used += event.nbytes()
        peak = max(peak, used)
    return peak


def cases(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> list[tuple[dict, Callable[[], np.ndarray], str]]:
    """``(description, call, peak-memory method)`` for every implementation, on the same inputs."""
    import torch

    threads = torch.get_num_threads()
    tq, tk, tv = (torch.from_numpy(x)[None] for x in (q, k, v))  # (1, 1, N, d): torch's fused CPU kernel
    out = [
        (
            {"method": "naive", "loop_order": "", "block_q": "", "block_k": "", "workers": 1},
            lambda: naive_attention(q, k, v),
            "",
        )
    ]
    for loop_order, block_q, block_k, workers in FLASH_SETTINGS:
        row = {"method": loop_order, "loop_order": loop_order, "block_q": block_q, "block_k": block_k}
        call = partial(
            flash_attention, q, k, v, block_q=block_q, block_k=block_k, loop_order=loop_order, workers=workers
        )
        out.append((row | {"workers": workers}, call, ""))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)[0].numpy()

    out.append(
        (
            {"method": "sdpa", "loop_order": "", "block_q": "", "block_k": "", "workers": threads},
            sdpa,
            "torch",
        )
    )
    return out


def runnable_processes() -> int | None:
    """How many threads the Linux kernel has ready to run right now (``None`` elsewhere)."""
    try:
        with open("/proc/stat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError):
        return None


def wait_for_quiet(max_seconds: float, calm_seconds: float = 3.0, busy: int = 1) -> float:
    """Wait until at most ``busy`` other threads are runnable for ``calm_seconds`` (up to ``max_seconds``).

    Timings on a machine shared with other work scatter widely; starting each case on a quiet
    machine makes the median meaningful. Returns the seconds waited (0 where this cannot be known).
    """
    t0 = time.monotonic()
    calm_since = t0
    while time.monotonic() - t0 < max_seconds:
        running = runnable_processes()
        if running is None:
            return 0.0
        now = time.monotonic()
        if running > busy + 1:  # this process counts as one
            calm_since = now
        elif now - calm_since >= calm_seconds:
            break
        time.sleep(0.2)
    return time.monotonic() - t0


def bench_inputs(n: int, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float32 ``q, k, v`` (each ``(1, n, d)``) that :func:`measure` times at sequence length ``n``."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, n, d)).astype(np.float32) for _ in range(3))
    return q, k, v


def error_bound(n: int, d: int = 64, seed: int = 0, rows: int = 1024) -> Bound:
    """The derived float32 bound (:func:`flashlab.tolerance.attention_bound`) on the error column at ``n``.

    Computed ``rows`` queries at a time (the bound is a maximum over rows, so the largest chunk bound is
    the whole bound) to keep the ``n x n`` magnitudes out of memory.
    """
    q, k, v = bench_inputs(n, d, seed)
    chunks = [attention_bound(q[:, r : r + rows], k, v) for r in range(0, n, rows)]
    return max(chunks, key=lambda b: b.atol)


def measure(
    sizes, repeat: int, d: int = 64, seed: int = 0, progress: bool = True, quiet_wait: float = 0.0
) -> list[dict]:
    """Time, peak memory and error of every case at every ``N`` in ``sizes``; one row each.

    Each case is timed in one block (warm-up, then ``repeat`` runs): alternating NumPy and torch
    calls would let one library's idle-spinning helper threads slow the other down. With
    ``quiet_wait > 0`` each case first waits (up to that many seconds) for a quiet machine.
    """
    from tqdm.auto import tqdm

    rows = []
    n_cases = len(FLASH_SETTINGS) + 2
    with tqdm(total=len(sizes) * n_cases, desc="cpu bench", disable=not progress) as bar:
        for n in sizes:
            q, k, v = bench_inputs(n, d, seed)
            reference = naive_attention(q.astype(np.float64), k, v)
            for row, call, peak_by in cases(q, k, v):
                bar.set_postfix_str(f"N={n} {label(row)}")
                waited = wait_for_quiet(quiet_wait) if quiet_wait > 0 else 0.0
                with blas_threads(1 if row["workers"] > 1 and row["method"] != "sdpa" else None):
                    seconds = median_seconds(call, repeat=repeat, warmup=1)
                    peak = torch_peak(call) if peak_by == "torch" else tracemalloc_peak(call)
                    error = float(np.max(np.abs(call() - reference)))
                rows.append(
                    row
                    | {
                        "n": n,
                        "d": d,
                        "heads": 1,
                        "dtype": "float32",
                        "seconds": seconds,
                        "tflops": attention_tflops(n, n, d, 1, seconds),
                        "peak_bytes": peak,
                        "peak_by": "torch profiler" if peak_by == "torch" else "tracemalloc",
                        "max_abs_err_vs_float64": error,
                        "repeat": repeat,
                        "waited_for_quiet_s": round(waited, 1),
                    }
                )
                bar.update()
    return rows


def label(row: dict) -> str:
    """Legend text for one case, e.g. ``flash_attention fa2 256x2048``."""
    if row["method"] in ("fa1", "fa2"):
        threads = f", {row['workers']} threads" if int(row["workers"]) > 1 else ""
        return f"flash_attention {row['method']} {row['block_q']}x{row['block_k']}{threads}"
    return {"naive": "naive_attention (NumPy)", "sdpa": "torch SDPA (CPU)"}[row["method"]]


def load_results(path: Path | None = None) -> list[dict]:
    """Rows of ``cpu_bench.csv`` (``data/`` by default) with numbers converted back from text."""
    path = Path(path or DATA / f"{NAME}.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("n", "d", "heads", "peak_bytes", "repeat", "workers"):
            row[key] = int(row[key])
        for key in ("seconds", "tflops", "max_abs_err_vs_float64"):
            row[key] = float(row[key])
    return rows


def target_summary(rows: list[dict], n: int = TARGET_N) -> dict:
    """The chapter's target at ``N = n``: the fastest flash setting's time and memory ratios."""
    at_n = [r for r in rows if r["n"] == n]
    if not at_n:
        return {}
    by = {label(r): r for r in at_n}
    best = min((r for r in at_n if r["method"] in ("fa1", "fa2")), key=lambda r: r["seconds"])
    sdpa, naive = by["torch SDPA (CPU)"], by["naive_attention (NumPy)"]
    time_ratio = best["seconds"] / sdpa["seconds"]
    memory_ratio = naive["peak_bytes"] / best["peak_bytes"]
    return {
        "n": n,
        "best_flash": label(best),
        "time_over_sdpa": round(time_ratio, 3),
        "naive_memory_over_flash": round(memory_ratio, 1),
        "met": bool(time_ratio <= TARGET_TIME_RATIO and memory_ratio >= TARGET_MEMORY_RATIO),
    }


def plot_results(rows: list[dict]):
    """Time and peak memory against N, one line per implementation (log-log). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    sizes = sorted({r["n"] for r in rows})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(label(r) for r in rows):
        mine = sorted((r for r in rows if label(r) == name), key=lambda r: r["n"])
        style = {"lw": 2.5} if not name.startswith("flash") else {"ls": "--" if " fa1 " in name else "-"}
        ns = [r["n"] for r in mine]
        ax_t.plot(ns, [r["seconds"] * 1e3 for r in mine], marker="o", label=name, **style)
        ax_m.plot(ns, [r["peak_bytes"] / 2**20 for r in mine], marker="o", label=name, **style)
    for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
        ax.set(
            xscale="log", yscale="log", xlabel="sequence length N (d = 64, one head, float32)", ylabel=what
        )
        ax.set_xticks(sizes, labels=[str(n) for n in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle("Attention on this CPU: time and memory")
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashlab.bench cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="sequence lengths N")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each case wait up to this many seconds for a quiet machine (Linux; default 0: no wait)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the package's data/)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.sizes) < 1:
        parser.error("--repeat and every --sizes value must be >= 1")
    import matplotlib

    matplotlib.use("Agg")
    import torch

    rows = measure(args.sizes, args.repeat, quiet_wait=args.quiet_wait)
    summary = target_summary(rows)
    meta = provenance("python -m flashlab.bench cpu " + " ".join(argv)) | {
        "torch_threads": torch.get_num_threads(),
        **blas_report(),
        "target": summary,
    }
    path = write_results(NAME, rows, meta, args.out)
    fig = plot_results(rows)
    fig.savefig(path.with_suffix(".png"), dpi=120)
    for row in rows:
        print(
            f"N={row['n']:6d} {label(row):44s} {row['seconds'] * 1e3:9.2f} ms "
            f"{row['peak_bytes'] / 2**20:9.2f} MiB  err {row['max_abs_err_vs_float64']:.1e}"
        )
    if summary:
        print(
            f"target at N={summary['n']}: best {summary['best_flash']} takes {summary['time_over_sdpa']}x "
            f"torch SDPA's time (target <= {TARGET_TIME_RATIO}); naive_attention uses "
            f"{summary['naive_memory_over_flash']}x its peak memory (target >= {TARGET_MEMORY_RATIO}): "
            + ("met" if summary["met"] else "NOT met")
        )
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0
