"""Training on the GPU: time per step and peak memory of the capstone model, flashlab's op vs SDPA.

``python -m flashlab.bench train`` trains :class:`flashlab.transformer.AttentionOnly` (2 layers, 4 heads of
16) on the induction task of :mod:`flashlab.induction` at sequence lengths ``N >= 2048``, once with
flashlab's differentiable op (the numba forward and backward kernels on CUDA tensors) and once with torch's
SDPA restricted to its memory-efficient backend in float32 (``sdpa``: torch's own choice, e.g. on a CPU).
Per row: the median wall time of a training step (forward, backward, Adam; the device synchronised
around each), and ``torch.cuda.max_memory_allocated`` over the timed steps. Results: ``data/<out>.csv``
and ``<out>.provenance.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from flashlab import device
from flashlab.bench.common import provenance, write_results
from flashlab.induction import Task
from flashlab.transformer import AttentionOnly, flashlab, sdpa


def sdpa_mem_efficient_fp32(q, k, v):
    """SDPA, causal, with only the memory-efficient backend allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return sdpa(q, k, v)


IMPLS = {"flashlab": flashlab, "sdpa_mem_efficient_fp32": sdpa_mem_efficient_fp32, "sdpa": sdpa}


def train_row(impl: str, n: int, *, batch: int, steps: int, warmup: int, where: str, seed: int = 0) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of the model on sequences of ``n`` tokens."""
    task = Task(vocab=n // 2 + 64, half=n // 2)
    torch.manual_seed(seed)
    model = AttentionOnly(task.vocab, 2 * task.half).to(where)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = task.batch(batch, torch.Generator().manual_seed(seed)).to(where)
    cuda = where.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses, times = [], []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        logits = model(b.inputs, IMPLS[impl])[b.scored]
        loss = torch.nn.functional.cross_entropy(logits, b.targets[b.scored])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {
        "impl": impl, "n_tokens": b.inputs.shape[1], "batch": batch, "heads": 4, "d_head": 16, "layers": 2,
        "ms_per_step": 1e3 * statistics.median(times[warmup:]),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "loss_first": losses[0], "loss_last": losses[-1], "steps": steps, "device": where,
    }  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashlab.bench train", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2048,4096,8192", help="sequence lengths (comma-separated)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--impls", default="flashlab,sdpa_mem_efficient_fp32", help=f"from {','.join(IMPLS)}")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check of this script)")
    p.add_argument("--out", default="gpu_h200_train", help="results go to <dir>/<out>.csv")
    p.add_argument("--dir", default=None, help="directory for the results (default: data/)")
    args = p.parse_args(argv)
    args.n = [int(x) for x in args.n.split(",") if x]
    args.impls = [x for x in args.impls.split(",") if x]
    if set(args.impls) - set(IMPLS):
        p.error(f"unknown impls {sorted(set(args.impls) - set(IMPLS))}; choose from {','.join(IMPLS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and device.MODE != "gpu":
        print("python -m flashlab.bench train needs a CUDA GPU (flashlab runs in the simulator here).")
        return 2
    rows = []
    for n in args.n:
        for impl in args.impls:
            row = train_row(
                impl, n, batch=args.batch, steps=args.steps, warmup=args.warmup, where=args.device
            )
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    meta = provenance() | {
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "timing": f"{args.warmup} warm-up steps, median wall time of {args.steps} synchronised steps",
        "model": "AttentionOnly: 2 layers, 4 heads of 16, Adam lr 3e-3, induction task, one fixed batch",
    }
    path = write_results(args.out, rows, meta, Path(args.dir) if args.dir else None)
    print(f"wrote {len(rows)} rows to {path}")
    return 0
