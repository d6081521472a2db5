"""``python -m flashlab.bench decode``: split-KV decoding against torch SDPA and the HBM bound.

One query row per sequence (decoding), ``heads`` heads (default 32), KV cache lengths ``--kv``,
batches ``--batch``, head dims ``--d``, cache stored float32 or float16 (``--kv-dtype``). Rows:

- ``flashlab_decode``: :func:`flashlab.cuda.decode.decode_attention`'s two kernels (auto splits),
  launched from prepared arguments, so that only the kernels are timed; query in float32;
- ``sdpa_math``, ``sdpa_mem_efficient``, ``sdpa_flash``, ``sdpa_cudnn``: torch's
  ``scaled_dot_product_attention`` pinned to one backend, on the same values with q, k, v all in
  the cache dtype (torch takes one dtype); a backend that refuses a dtype gets a ``note``.

Timing on a GPU: before each call a buffer larger than the L2 cache is zeroed (so the cache is
read from HBM) and the GPU then spins about a millisecond (:func:`flashlab.bench.common.gpu_spin`),
so that the host has queued the whole call before its first kernel starts: CUDA events around the
call time the GPU's work, not Python's launch overhead (two numba launches cost more host time
than one torch call). The median of ``--repeat``. With ``--graph`` each call is captured once in a
CUDA graph and the replays are timed instead; a call that cannot be captured is timed as launched
(column ``timing``).
``kv_bytes`` = bytes of K and V; ``bound_ms`` = kv_bytes / HBM bandwidth (data/hardware.json);
``hbm_fraction`` = bound_ms / ms. ``max_abs_err`` is against float64 attention of the first two
heads of the first sequence, ``err_bound`` the derived bound
(:func:`flashlab.tolerance.attention_bound`) in float32; for torch's float16 rows
:func:`flashlab.precision.tensor_core_bound` (16-bit inputs and P, float32 sums).
Without a GPU the same rows run on the CPU (kernels in the simulator, wall-clock time): that
only checks the command at tiny sizes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

from flashlab import device
from flashlab.bench.common import SPIN_CYCLES, gpu_spin, provenance, write_results
from flashlab.hardware import spec

IMPLS = ("flashlab_decode", "sdpa_math", "sdpa_mem_efficient", "sdpa_flash", "sdpa_cudnn")
BACKENDS = {
    "sdpa_math": "MATH",
    "sdpa_mem_efficient": "EFFICIENT_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
REF_HEADS = 2
L2_FLUSH_BYTES = 256 * 2**20  # more than the H200's 50 MB L2 cache


def time_ms(fn, repeat: int, warmup: int, graph: bool = False) -> tuple[float, str]:
    """Median milliseconds of ``fn()`` and how it was timed: on a GPU by CUDA events, each call after
    an L2 flush and a spin (the host's launch work hidden), around ``fn()`` (``"launch"``) or, with
    ``graph``, around replays of a CUDA graph of
    ``fn`` (``"graph"``; ``"launch"`` where ``fn`` cannot be captured); else wall clock."""
    import torch

    for _ in range(warmup):
        fn()
    if device.MODE != "gpu":
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), "wall clock"
    torch.cuda.synchronize()
    call, how = fn, "launch"
    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured, capture_error_mode="thread_local"):
                fn()
            call, how = captured.replay, "graph"
        except Exception:  # noqa: BLE001 (any capture failure: time the plain launch instead)
            torch.cuda.synchronize()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    events = []
    for _ in range(repeat):
        flush.zero_()
        gpu_spin()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), how


def _flashlab(q, k, v, *, threads=None, unroll=None, splits=None):
    """A prepared launch of the two decoding kernels (torch CUDA tensors, or NumPy in the simulator);
    ``threads``, ``unroll`` and ``splits`` default to the kernel's (:data:`flashlab.cuda.decode.TILES`,
    :func:`flashlab.cuda.decode.default_splits`)."""
    import torch
    from numba import cuda

    from flashlab.cuda import decode

    batch, heads, rows, d = q.shape
    bh, n_k = batch * heads, k.shape[-2]
    threads = threads or decode.TILES[d]["threads"]
    splits = splits or decode.default_splits(n_k, bh, threads)
    kv_dtype = str(k.dtype).removeprefix("torch.")
    first, combine = decode.specs(d, rows, False, kv_dtype, splits, threads, unroll=unroll)
    tensors = [q.float().reshape(bh, rows, d), k.reshape(bh, n_k, d), v.reshape(bh, n_k, d)]
    tensors += [
        torch.empty(s, dtype=torch.float32, device=q.device)
        for s in decode.buffer_shapes(bh, rows, d, splits)
    ]
    arrays = [cuda.as_cuda_array(x) if device.MODE == "gpu" else x.numpy() for x in tensors]
    args = decode.args_for(*arrays, 1.0 / math.sqrt(d))

    def run():  # on torch's current stream: the one a CUDA graph captures
        handle = torch.cuda.current_stream().cuda_stream if device.MODE == "gpu" else 0
        decode.run(first, combine, args, stream=cuda.external_stream(handle) if handle else 0)
        return tensors[3].reshape(batch, heads, rows, d)

    return run, splits


def _sdpa(backend: str):
    def make(q, k, v):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = getattr(SDPBackend, backend)
        q = q.to(k.dtype)

        def run():
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return run, None

    return make


RUNNERS = {"flashlab_decode": _flashlab} | {impl: _sdpa(be) for impl, be in BACKENDS.items()}


def row(impl: str, q, k, v, ref, *, repeat: int, warmup: int, bandwidth: float, graph: bool = False) -> dict:
    """Time and check one implementation on one input; failures become a ``note``."""
    import torch

    from flashlab.precision import tensor_core_bound
    from flashlab.tolerance import attention_bound

    batch, heads, _, d = q.shape
    n_k, kv_dtype = k.shape[-2], str(k.dtype).removeprefix("torch.")
    kv_bytes = 2 * k.numel() * k.element_size()
    out = {"impl": impl, "kv_dtype": kv_dtype, "batch": batch, "heads": heads, "n_k": n_k, "d": d}
    out |= {"kv_bytes": kv_bytes, "bound_ms": kv_bytes / bandwidth * 1e3}
    try:
        run, splits = RUNNERS[impl](q, k, v)
        o = run()[0, :REF_HEADS].double().cpu().numpy()
        # flashlab computes in float32; torch's float16 kernels take q in float16, P rounded to 16 bits,
        # and accumulate in float32 (the tensor-core bound of chapter 8)
        first = [x[0, :REF_HEADS].double().cpu().numpy() for x in (q, k, v)]
        if impl == "flashlab_decode" or kv_dtype == "float32":
            bound = attention_bound(*first, dtype="float32").atol
        else:
            bound = tensor_core_bound(*first, kv_dtype).atol
        ms, how = time_ms(run, repeat, warmup, graph)
        out |= {"ms": ms, "gb_per_s": kv_bytes / ms / 1e6, "hbm_fraction": kv_bytes / bandwidth * 1e3 / ms}
        out |= {"timing": how} if graph else {}
        out |= {
            "splits": splits,
            "max_abs_err": float(np.max(np.abs(o - ref))),
            "err_bound": bound,
            "note": "",
        }
    except (RuntimeError, ValueError) as e:  # e.g. a backend that does not take this dtype or shape
        out |= {"note": f"failed: {str(e).splitlines()[0][:120]}"}
    if device.MODE == "gpu":
        torch.cuda.empty_cache()
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashlab.bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--kv", default="1024,4096,16384,65536,131072", help="KV cache lengths (comma-separated)")
    p.add_argument("--batch", default="1,4,16,64", help="batch sizes (comma-separated)")
    p.add_argument("--d", default="64,128", help="head dims, from 64,128")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-dtype", default="float32,float16", help="cache dtypes, from float32,float16")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"from {','.join(IMPLS)}")
    p.add_argument("--max-kv-gib", type=float, default=32.0, help="skip inputs whose K+V exceed this")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=500.0, help="seconds; later rows are skipped past it")
    p.add_argument("--out", default="gpu_h200_decode", help="results go to <dir>/<out>.csv")
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    p.add_argument("--dir", default=None, help="folder for the results (default: the project's data/)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    import torch

    args = parse(argv)
    impls = args.impls.split(",")
    if unknown := set(impls) - set(IMPLS):
        raise ValueError(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    where = "cuda" if device.MODE == "gpu" else "cpu"
    bandwidth = spec("H200")["hbm_bytes_per_s"][0]
    rows, t0 = [], time.perf_counter()
    gen = torch.Generator(where).manual_seed(0)
    for kv_dtype in args.kv_dtype.split(","):
        for d in _ints(args.d):
            for batch in _ints(args.batch):
                for n_k in _ints(args.kv):
                    item = np.dtype(kv_dtype).itemsize
                    if 2 * batch * args.heads * n_k * d * item > args.max_kv_gib * 2**30:
                        continue
                    if time.perf_counter() - t0 > args.budget:
                        print(f"budget of {args.budget} s spent: later rows skipped")
                        break
                    q = torch.randn(batch, args.heads, 1, d, device=where, generator=gen)
                    k, v = (
                        torch.randn(batch, args.heads, n_k, d, device=where, generator=gen).to(
                            getattr(torch, kv_dtype)
                        )
                        for _ in range(2)
                    )
                    ref = _reference(q, k, v)
                    for impl in impls:
                        rows.append(
                            row(
                                impl,
                                q,
                                k,
                                v,
                                ref,
                                repeat=args.repeat,
                                warmup=args.warmup,
                                bandwidth=bandwidth,
                                graph=args.graph,
                            )
                        )
                        print(_line(rows[-1]), flush=True)
                    del q, k, v
    meta = provenance()
    meta |= {
        "torch": torch.__version__,
        "heads": args.heads,
        "bandwidth_bytes_per_s": bandwidth,
        "timing": f"L2 flushed ({L2_FLUSH_BYTES} B zeroed), then a GPU spin of {SPIN_CYCLES} cycles, "
        f"before each call; median of {args.repeat} "
        + (
            "wall-clock timings (CPU, not a measurement)"
            if device.MODE != "gpu"
            else "CUDA-event timings of CUDA-graph replays (column timing: graph, or launch where a call "
            "could not be captured)"
            if args.graph
            else "CUDA-event timings"
        ),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    path = write_results(args.out, rows, meta, args.dir)
    print(f"wrote {path}")
    return 0


def _reference(q, k, v) -> np.ndarray:
    """Float64 attention of the first two heads of the first sequence (on the device)."""
    import torch

    q, k, v = (x[0, :REF_HEADS].double() for x in (q, k, v))
    return (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v).cpu().numpy()


def _line(r: dict) -> str:
    shape = f"b{r['batch']:3d} x h{r['heads']} x kv{r['n_k']:7d} x d{r['d']:3d} {r['kv_dtype']:7s}"
    if r.get("ms") is None:
        return f"{r['impl']:20s} {shape} {r['note']}"
    speed = f"{r['gb_per_s']:7.0f} GB/s ({r['hbm_fraction']:.0%} of HBM)"
    return f"{r['impl']:20s} {shape} {r['ms']:9.4f} ms {speed}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
