"""What every benchmark shares: timing, provenance, and writing results to ``data/``."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from threadpoolctl import threadpool_info, threadpool_limits

from flashlab import device

DATA = Path(__file__).resolve().parents[2] / "data"


def median_seconds(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs (CPU work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_tflops(n_q: int, n_k: int, d: int, heads: int, seconds: float, causal: bool = False) -> float:
    """Throughput by the FlashAttention-2 convention: 4 N_q N_k d FLOPs per head, halved if causal."""
    flops = 4.0 * n_q * n_k * d * heads * (0.5 if causal else 1.0)
    return flops / seconds / 1e12


def provenance(command: str | None = None) -> dict:
    """Where and how a result was produced: host, device, library versions, UTC date, command."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or "python -m flashlab.bench " + " ".join(sys.argv[1:]),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "os": platform.platform(),
    }
    info.update(device.report())
    return info


def write_results(name: str, rows: list[dict], meta: dict, directory: Path | None = None) -> Path:
    """Write ``rows`` to ``<directory>/<name>.csv`` and ``meta`` to ``<name>.provenance.json``."""
    directory = Path(directory or DATA)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (directory / f"{name}.provenance.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def blas_threads(limit: int | None):
    """Context limiting NumPy's BLAS to ``limit`` threads (``None``: leave it as it is).

    Threads over query blocks that each call a multi-threaded BLAS oversubscribe the cores, and idle
    BLAS threads spinning on a small machine swamp small differences in CPU time.
    """
    return contextlib.nullcontext() if limit is None else threadpool_limits(limit, user_api="blas")


def blas_report() -> dict:
    """NumPy's BLAS library, version and thread count (without file paths), for a provenance record."""
    keys = ("internal_api", "version", "num_threads", "threading_layer", "architecture")
    return {"blas": [{k: lib.get(k) for k in keys} for lib in threadpool_info() if lib["user_api"] == "blas"]}
