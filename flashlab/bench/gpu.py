"""``python -m flashlab.bench gpu``: the chapter-4 kernels against torch on one GPU, in one run.

Forward rows (``direction="fwd"``), float32 unless the impl says bf16, batch 1:

- ``flashlab_rowwise``, ``flashlab_tiled``, ``flashlab_register_tiled``: :mod:`flashlab.cuda.forward`;
- ``torch_naive_fp32``: matmul, (mask,) softmax, matmul (S and P in GPU memory);
- ``sdpa_math_fp32``, ``sdpa_mem_efficient_fp32``, ``sdpa_flash_bf16``, ``sdpa_cudnn_bf16``:
  ``torch.nn.functional.scaled_dot_product_attention`` pinned to one backend.

For each ``N`` the number of heads is ``max(8, 131072 // N)`` (128 x 1024 ... 8 x 16384), so every
run has the same number of query rows and fills the GPU. Each row: warm-up calls, then CUDA events
around each of ``--repeat`` (>= 10) calls, each after a GPU spin that hides the host's launch work
(:func:`flashlab.bench.common.gpu_spin`), the median; TFLOP/s by ``4 N^2 d`` per head, halved for
causal (:func:`flashlab.bench.common.attention_tflops`); ``peak_mem_bytes`` = torch's
``max_memory_allocated`` during one call, inputs included; ``max_abs_err`` = the largest difference
from a float64 reference computed on the GPU for the first two heads. Causal rows have N_q = N_k
(torch's top-left and flashlab's bottom-right conventions agree there).

Backward rows (``direction="bwd"``) come from :func:`flashlab.bench.gpu_backward.backward_rows`.
Everything goes to ``data/<--out>.csv`` with a provenance file; :func:`flashlab.bench.common.load_results`
reads it back with typed columns.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from flashlab import device
from flashlab.bench.common import SPIN_CYCLES, attention_tflops, gpu_spin, provenance, write_results

FLASHLAB = ("flashlab_rowwise", "flashlab_tiled", "flashlab_register_tiled")
TORCH = (
    "torch_naive_fp32",
    "sdpa_math_fp32",
    "sdpa_mem_efficient_fp32",
    "sdpa_flash_bf16",
    "sdpa_cudnn_bf16",
)
IMPLS = FLASHLAB + TORCH
# which units compute each implementation's multiply-adds (so that each is compared with its own ceiling)
UNITS = dict.fromkeys(FLASHLAB + ("torch_naive_fp32", "sdpa_math_fp32"), "fp32 FMA")
UNITS |= {"sdpa_mem_efficient_fp32": "3xTF32 tensor cores"}  # CUTLASS OpMultiplyAddFastF32 on sm80+
UNITS |= {"sdpa_flash_bf16": "bf16 tensor cores", "sdpa_cudnn_bf16": "bf16 tensor cores"}


def ceiling_flops(units: str, gpu: dict) -> float:
    """FLOP/s ceiling of ``units`` from a ``data/hardware.json`` entry: the FMA rate; bf16 dense tensor
    cores; 3xTF32 = three TF32 products per float32 product, TF32 at half the bf16 rate (Hopper)."""
    return {
        "fp32 FMA": gpu["fp32_flops_per_s"],
        "bf16 tensor cores": gpu["bf16_dense_flops_per_s"],
        "3xTF32 tensor cores": gpu["bf16_dense_flops_per_s"] / 2 / 3,
    }[units]


ROWS_PER_RUN = 131072  # heads x N: enough query rows to fill an H200 (1024 blocks of 128 rows)
REF_HEADS = 2  # heads checked against the float64 reference


def heads_for(n: int) -> int:
    """Heads for sequence length ``n``: ``max(8, 131072 // n)``."""
    return max(8, ROWS_PER_RUN // n)


def median_ms(fn, repeat: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` on the GPU: ``warmup`` untimed calls, then CUDA events per call,
    each recorded after :func:`~flashlab.bench.common.gpu_spin` (the GPU's time, not the host's)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gpu_spin()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bytes(fn) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn()`` (what was live before included).

    Garbage from earlier rows is collected first, so that "live before" means this row's tensors.
    """
    import gc

    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def future_mask(n: int, device_):
    """``(n, n)`` bool, True where key ``j > i`` is in query ``i``'s future: the entries causal attention
    masks out (the opposite of :func:`flashlab.inputs.causal_mask`, which is True where visible)."""
    import torch

    return torch.ones(n, n, dtype=torch.bool, device=device_).triu(1)


def reference(q, k, v, causal: bool, scale: float):
    """Float64 attention of the first :data:`REF_HEADS` heads, on the GPU."""
    import torch

    q, k, v = (x[:, :REF_HEADS].double() for x in (q, k, v))
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(future_mask(s.shape[-1], s.device), -math.inf)
    return torch.softmax(s, dim=-1) @ v


def flashlab_runner(kernel: str, tiles: dict | None = None, options: dict | None = None):
    """A prepared launch of one kernel (registry name, optional tiles and options): compiled once,
    arguments built once, so only the launch is timed."""

    def make(q, k, v, causal, scale):
        import torch
        from numba import cuda

        from flashlab.cuda import launch

        heads, n, d = q.shape[1:]
        spec = launch.kernel_spec(kernel, d, causal, tiles, **(options or {}))
        o = torch.empty(1, heads, n, d, device=q.device)
        lse = torch.empty(1, heads, n, device=q.device)
        views = {name: cuda.as_cuda_array(x[0]) for name, x in (("q", q), ("k", k), ("v", v))}
        args = launch.forward_args(views, cuda.as_cuda_array(o[0]), cuda.as_cuda_array(lse[0]), scale)
        kern = launch.compiled(spec)[spec.grid(args), spec.block, 0, spec.shared_bytes]
        values = tuple(args[name] for name in spec.params)

        def run():
            kern(*values)
            return o

        return run

    return make


def _naive_fp32(q, k, v, causal, scale):
    import torch

    mask = future_mask(q.shape[-2], q.device) if causal else None

    def run():
        s = scale * q @ k.transpose(-1, -2)
        if mask is not None:
            s = s.masked_fill(mask, -math.inf)
        return torch.softmax(s, dim=-1) @ v

    return run


def _sdpa(backend: str, dtype: str):
    def make(q, k, v, causal, scale):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = getattr(SDPBackend, backend)
        q, k, v = (x.to(getattr(torch, dtype)) for x in (q, k, v))

        def run():
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, scale=scale
                )

        return run

    return make


RUNNERS = {
    "flashlab_rowwise": flashlab_runner("rowwise"),
    "flashlab_tiled": flashlab_runner("tiled"),
    "flashlab_register_tiled": flashlab_runner("register_tiled"),
    "torch_naive_fp32": _naive_fp32,
    "sdpa_math_fp32": _sdpa("MATH", "float32"),
    "sdpa_mem_efficient_fp32": _sdpa("EFFICIENT_ATTENTION", "float32"),
    "sdpa_flash_bf16": _sdpa("FLASH_ATTENTION", "bfloat16"),
    "sdpa_cudnn_bf16": _sdpa("CUDNN_ATTENTION", "bfloat16"),
}


def forward_row(impl, q, k, v, causal, ref, *, repeat, warmup) -> dict:
    """Time, measure and check one implementation on one input (batch 1, ``heads x n x d``)."""
    import torch

    heads, n, d = q.shape[1:]
    scale = 1.0 / math.sqrt(d)
    dtype = "bfloat16" if impl.endswith("bf16") else "float32"
    row = {"direction": "fwd", "impl": impl, "dtype": dtype, "causal": causal, "heads": heads, "n": n, "d": d}
    empty = {"ms": None, "tflops": None, "peak_mem_bytes": None, "max_abs_err": None}
    try:
        run = RUNNERS[impl](q, k, v, causal, scale)
        out = run()
        err = float((out[:, :REF_HEADS].double() - ref).abs().max())
        del out
        peak = peak_bytes(run)
        ms = median_ms(run, repeat, warmup)
        row |= {"ms": ms, "tflops": attention_tflops(n, n, d, heads, ms / 1e3, causal)}
        row |= {"peak_mem_bytes": peak, "max_abs_err": err, "note": ""}
    except torch.cuda.OutOfMemoryError:
        row |= empty | {"note": "OOM"}
    except RuntimeError as e:  # e.g. a backend that does not run here
        row |= empty | {"note": f"failed: {str(e).splitlines()[0][:120]}"}
    torch.cuda.empty_cache()
    return row


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashlab.bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="1024,2048,4096,8192,16384", help="sequence lengths (comma-separated)")
    p.add_argument("--d", default="64,128", help="head dims (comma-separated, from 16,32,64,128)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"forward impls, from {','.join(IMPLS)}")
    p.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    p.add_argument("--slow-max-n", type=int, default=16384, help="largest N for flashlab_rowwise/_tiled")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per row (median; >= 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later rows are skipped past it")
    p.add_argument("--bwd-n", default="1024,2048,4096,8192,16384", help="N for backward rows ('' for none)")
    p.add_argument("--out", default="gpu_h200", help="results go to data/<out>.csv")
    args = p.parse_args(argv)
    args.n, args.d, args.bwd_n = _parse_ints(args.n), _parse_ints(args.d), _parse_ints(args.bwd_n)
    args.impls = [x for x in args.impls.split(",") if x]
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {','.join(IMPLS)}")
    if args.repeat < 10:
        p.error(f"--repeat must be >= 10 (a median of at least ten timings), got {args.repeat}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if device.MODE != "gpu":
        print("python -m flashlab.bench gpu needs a CUDA GPU (flashlab runs in the simulator here).")
        return 2
    import torch

    t0 = time.perf_counter()
    causal_values = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for d in args.d:
        for n in args.n:
            heads = heads_for(n)
            q, k, v = (torch.randn(1, heads, n, d, device="cuda", generator=gen) for _ in range(3))
            for causal in causal_values:
                ref = reference(q, k, v, causal, 1.0 / math.sqrt(d))
                for impl in args.impls:
                    base = {
                        "direction": "fwd",
                        "impl": impl,
                        "causal": causal,
                        "heads": heads,
                        "n": n,
                        "d": d,
                    }
                    if time.perf_counter() - t0 > args.budget:
                        rows.append(base | {"note": f"skipped: past the {args.budget:.0f} s budget"})
                        continue
                    if impl in ("flashlab_rowwise", "flashlab_tiled") and n > args.slow_max_n:
                        rows.append(base | {"note": f"skipped: slow kernel capped at N <= {args.slow_max_n}"})
                        continue
                    row = forward_row(impl, q, k, v, causal, ref, repeat=args.repeat, warmup=args.warmup)
                    rows.append(row)
                    print(_line(row), flush=True)
                del ref
            del q, k, v
            torch.cuda.empty_cache()
            write_results(args.out, rows, _meta(args, t0, partial=True))  # a cut-off run keeps its rows
    rows += _backward(args, causal_values, t0)
    meta = _meta(args, t0, partial=False)
    path = write_results(args.out, rows, meta)
    print(f"wrote {len(rows)} rows to {path.name} in {meta['elapsed_s']} s")
    return 0


def _meta(args, t0: float, partial: bool) -> dict:
    """Provenance of this run (GPU, driver, CUDA, versions, date, command) and how it measured."""
    import torch

    meta = provenance()
    meta |= {
        "gpu": torch.cuda.get_device_name(),
        "nvidia driver": _driver_version(),
        "cuda (torch build)": torch.version.cuda,
        "heads rule": f"heads = max(8, {ROWS_PER_RUN} // N), batch 1",
        "timing": f"{args.warmup} warm-up calls, median of {args.repeat} calls timed by CUDA events, "
        f"each after a GPU spin of {SPIN_CYCLES} cycles",
        "error": f"max |o - o_ref| over the first {REF_HEADS} heads, reference in float64 on the GPU",
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "complete": not partial,
    }
    return meta


def _driver_version() -> str:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it ("unknown" without nvidia-smi)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _backward(args, causal_values, t0) -> list[dict]:
    """Backward rows from :mod:`flashlab.bench.gpu_backward`, if time is left."""
    from flashlab.bench.gpu_backward import backward_rows

    shapes = [(heads_for(n), n, d) for d in args.d for n in args.bwd_n]
    if not shapes or time.perf_counter() - t0 > args.budget:
        return []
    try:
        rows = backward_rows(shapes, causal=causal_values, repeat=args.repeat, warmup=args.warmup)
    except Exception as e:  # keep the forward rows of a long run even if the backward breaks
        print(f"backward rows failed: {type(e).__name__}: {e}")
        return []
    for row in rows:
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    ms, tf = row.get("ms"), row.get("tflops")
    figures = f"{ms:9.3f} ms {tf:6.1f} TFLOP/s" if ms is not None else f"{row.get('note', '')}"
    causal = "causal" if row["causal"] else "      "
    shape = f"{row['heads']:4d} x {row['n']:6d} x {row['d']:4d}"
    return f"{row['direction']} {row['impl']:26s} {shape} {causal} {figures}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
