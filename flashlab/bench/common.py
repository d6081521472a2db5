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


#: cycles the GPU spins before each timed call: about a millisecond at an H100's or H200's clock,
#: longer than the host needs to queue a call (several numba launches cost far more host time than
#: one torch call; without the spin that host time would be timed as the kernel's)
SPIN_CYCLES = 2_000_000


def gpu_spin() -> None:
    """Keep the GPU busy (``torch.cuda._sleep``) while the host queues the next call: CUDA events
    recorded after it then time the GPU's work, not Python's launch overhead."""
    import torch

    torch.cuda._sleep(SPIN_CYCLES)


def attention_tflops(n_q: int, n_k: int, d: int, heads: int, seconds: float, causal: bool = False) -> float:
    """Throughput by the FlashAttention-2 convention: 4 N_q N_k d FLOPs per head, halved if causal."""
    flops = 4.0 * n_q * n_k * d * heads * (0.5 if causal else 1.0)
    return flops / seconds / 1e12


def provenance(command: str | None = None) -> dict:
    """Where and how a result was produced: host, device, library versions, UTC date, command."""
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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


def _typed(values: list[str]):
    """A column's type from its non-empty values: bool (True/False), int, float, else str."""
    filled = [x for x in values if x != ""]
    for kind in (_bool, int, float):
        try:
            for x in filled:
                kind(x)
        except ValueError:
            continue
        return kind
    return str


def _bool(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


def load_results(name: str, directory: Path | None = None) -> list[dict]:
    """The rows of ``<directory>/<name>.csv`` (as :func:`write_results` wrote them) with typed columns.

    Each column gets one type from its values: ``bool`` (True/False), ``int``, ``float``, else ``str``;
    an empty cell is ``None``. ``FileNotFoundError`` names the command that writes the file, as its
    provenance says (``python -m flashlab.bench ...``).
    """
    path = Path(directory or DATA) / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path.name} does not exist yet: run `python -m flashlab.bench` on a GPU")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    kinds = {col: _typed([row[col] for row in rows]) for col in rows[0]}
    return [{col: None if x == "" else kinds[col](x) for col, x in row.items()} for row in rows]


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
