"""The backward pass on the GPU: rows for ``data/gpu_h200.csv`` with ``direction="bwd"``.

:func:`backward_rows` times, for each shape, the backward of

- ``flashlab_bwd``: the numba.cuda kernel of :mod:`flashlab.cuda.backward` (pre-pass + main kernel),
  given ``o`` and ``lse`` as a forward would save them;
- ``torch_naive_fp32``: autograd through ``softmax(scale Q K^T) V`` written as matmul, softmax, matmul
  (P saved by the forward, ``N^2`` floats per head);
- ``sdpa_mem_efficient_fp32``: ``scaled_dot_product_attention`` with the memory-efficient backend.

Each is timed alone (the forward runs once, untimed, before): warm-up calls, then CUDA events around
each of ``repeat`` calls, the median reported. TFLOP/s use the FlashAttention-2 convention: the
backward does 2.5x the forward's ``4 N^2 d`` FLOPs per head (halved if causal). ``peak_mem_bytes``:
``torch.cuda.max_memory_allocated`` during one backward call, everything live counted (inputs, what
the forward saved, the gradients). ``max_abs_err``: the largest difference of dq, dk, dv from
float64 gradients of the same inputs. Causal rows use ``N_q = N_k``, where torch's top-left
``is_causal`` and flashlab's bottom-right convention agree.
"""

from __future__ import annotations

import math
import time

from flashlab.bench import gpu as forward_bench
from flashlab.bench.common import attention_tflops

BACKWARD_FLOP_FACTOR = 2.5  # FlashAttention-2's convention: backward FLOPs = 2.5 x forward FLOPs
IMPLS = ("flashlab_bwd", "torch_naive_fp32", "sdpa_mem_efficient_fp32")


def _reference(q, k, v, do, causal: bool, scale: float):
    """Float64 ``o``, ``lse`` and gradients, one head at a time (the ``N x N`` matrices of one head only),
    kept on the host so that they do not count in the peak memory measured afterwards."""
    import torch

    outs = {name: [] for name in ("o", "lse", "dq", "dk", "dv")}
    for h in range(q.shape[1]):
        q64, k64, v64 = (x[:, h].double().requires_grad_() for x in (q, k, v))
        s = scale * q64 @ k64.transpose(-1, -2)
        if causal:
            s = s.masked_fill(forward_bench.future_mask(s.shape[-1], s.device), -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        o = torch.exp(s - lse[..., None]) @ v64
        grads = torch.autograd.grad(o, (q64, k64, v64), do[:, h].double())
        for name, x in zip(outs, (o.detach(), lse.detach(), *grads), strict=True):
            outs[name].append(x.cpu())
        del s, o, grads
    return {name: torch.stack(xs, dim=1) for name, xs in outs.items()}


def _torch_backward(impl: str):
    """The backward of the forward benchmark's ``impl``: its forward runs once, untimed; autograd is timed."""
    import torch

    def make(q, k, v, do, causal, scale, ref):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        o = forward_bench.RUNNERS[impl](q, k, v, causal, scale)()
        return lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)

    return make


def _flashlab_backward(q, k, v, do, causal, scale, ref):
    import torch

    from flashlab.cuda import flash_attention_backward

    o, lse = (ref[name].to(q.device, torch.float32) for name in ("o", "lse"))  # as a forward saves them
    return lambda: flash_attention_backward(q, k, v, o, lse, do, causal=causal, scale=scale)


RUNNERS = {
    "flashlab_bwd": _flashlab_backward,
    "torch_naive_fp32": _torch_backward("torch_naive_fp32"),
    "sdpa_mem_efficient_fp32": _torch_backward("sdpa_mem_efficient_fp32"),
}


def backward_rows(
    shapes,
    *,
    causal=(False, True),
    impls=IMPLS,
    repeat: int = 10,
    warmup: int = 3,
    seed: int = 0,
    budget_s: float | None = None,
    progress=None,
) -> list[dict]:
    """Time the backward of each implementation in ``impls`` for each ``(heads, n, d)`` in ``shapes``
    and each value in ``causal``, on the current CUDA device, in float32 with batch 1.

    Returns one dict per measurement with the columns ``direction`` (``"bwd"``), ``impl``, ``dtype``,
    ``causal``, ``heads``, ``n``, ``d``, ``ms``, ``tflops``, ``peak_mem_bytes``, ``max_abs_err``.
    ``note`` is empty, or says why the figures are: ``"OOM"`` (out of GPU memory), ``"failed: ..."``
    (the error), or ``"skipped: ..."`` (past ``budget_s`` seconds from the start of this call).
    ``progress``: an optional callable told ``"bwd impl heads x n x d causal"`` before each row.
    """
    import torch

    unknown = set(impls) - set(RUNNERS)
    if unknown:
        raise ValueError(f"impls must be among {IMPLS}, got unknown {sorted(unknown)}")
    if repeat < 10:
        raise ValueError(f"repeat must be >= 10 (a median of at least ten timings), got {repeat}")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    t0 = time.perf_counter()
    empty = {"ms": None, "tflops": None, "peak_mem_bytes": None, "max_abs_err": None}
    rows = []
    for heads, n, d in shapes:
        scale = 1.0 / math.sqrt(d)
        q, k, v, do = (
            torch.randn(1, heads, n, d, device="cuda", dtype=torch.float32, generator=gen) for _ in range(4)
        )
        for is_causal in causal:
            over = budget_s is not None and time.perf_counter() - t0 > budget_s
            ref = None if over else _reference(q, k, v, do, is_causal, scale)
            for impl in impls:
                if progress is not None:
                    progress(f"bwd {impl} {heads}x{n}x{d} causal={is_causal}")
                row = {"direction": "bwd", "impl": impl, "dtype": "float32", "causal": is_causal}
                row |= {"heads": heads, "n": n, "d": d}
                if over or (budget_s is not None and time.perf_counter() - t0 > budget_s):
                    rows.append(row | empty | {"note": f"skipped: past the {budget_s:.0f} s budget"})
                    continue
                try:
                    step = RUNNERS[impl](q, k, v, do, is_causal, scale, ref)
                    grads = step()
                    err = max(
                        float((g.cpu().double() - ref[f"d{x}"]).abs().max())
                        for g, x in zip(grads, "qkv", strict=True)
                    )
                    del grads
                    peak = forward_bench.peak_bytes(step)
                    ms = forward_bench.median_ms(step, repeat, warmup)
                    tflops = BACKWARD_FLOP_FACTOR * attention_tflops(n, n, d, heads, ms / 1e3, is_causal)
                    row |= {
                        "ms": ms,
                        "tflops": tflops,
                        "peak_mem_bytes": peak,
                        "max_abs_err": err,
                        "note": "",
                    }
                except torch.cuda.OutOfMemoryError:
                    row |= empty | {"note": "OOM"}
                except Exception as e:  # one broken row must not lose the others (the note says why)
                    row |= empty | {"note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                step = None
                torch.cuda.empty_cache()
                rows.append(row)
            del ref
    return rows
