"""``python -m flashlab.bench tensor-cores [--quick]``: the tensor-core kernel against torch on a GPU.

Rows (forward, batch 1, ``heads = max(8, 131072 // N)``): ``flashlab_tc_bf16`` and ``flashlab_tc_fp16``
(:mod:`flashlab.cuda.tensor_core`), torch SDPA's ``sdpa_flash_bf16`` and ``sdpa_cudnn_bf16``, and the
chapter-4 float32 kernel ``flashlab_register_tiled``; N 1024..16384, d 64 and 128, causal and not.
Time: median of CUDA-event timings; TFLOP/s by the FlashAttention-2 count. Every row is checked
against a float32 reference (first head, first :data:`CHECK_ROWS` query rows) within the bound
:func:`flashlab.precision.tensor_core_bound` derives for the row's input format (bf16 for torch's).

``--quick`` is a one-minute smoke test: compile, one size, check, time; it prints ``PASS``/``FAIL``
per case with the reason and exits non-zero if anything failed.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback

import numpy as np

from flashlab.bench.common import SPIN_CYCLES, attention_tflops, provenance, write_results

NAME = "gpu_h200_tensor_cores"
IMPLS = (
    "flashlab_tc_bf16",
    "flashlab_tc_fp16",
    "sdpa_flash_bf16",
    "sdpa_cudnn_bf16",
    "flashlab_register_tiled",
)
DTYPE = {"flashlab_tc_bf16": "bfloat16", "flashlab_tc_fp16": "float16", "flashlab_register_tiled": "float32"}
SUSPECT = 8  # --quick: an error this many times torch's bf16 error is a bug, even inside the bound
CHECK_ROWS = 512  # query rows of head 0 checked against the float32 reference


def _tc(dtype: str):
    def make(q, k, v, causal, scale):
        import torch

        from flashlab.cuda import tensor_core as tc

        heads, n, d = q.shape[1:]
        tdt = getattr(torch, dtype)
        q3, k3, v3 = (x[0].to(tdt).contiguous() for x in (q, k, v))
        o = torch.empty_like(q3)
        lse = torch.empty(heads, n, device=q.device)

        def run():
            tc._torch_launch(q3, k3, v3, o, lse, scale, causal)
            return o[None]

        return run

    return make


def runners() -> dict:
    from flashlab.bench import gpu

    return {
        "flashlab_tc_bf16": _tc("bfloat16"),
        "flashlab_tc_fp16": _tc("float16"),
        "sdpa_flash_bf16": gpu.RUNNERS["sdpa_flash_bf16"],
        "sdpa_cudnn_bf16": gpu.RUNNERS["sdpa_cudnn_bf16"],
        "flashlab_register_tiled": gpu.RUNNERS["flashlab_register_tiled"],
    }


_BOUNDS: dict = {}  # (n, d, dtype) -> bound: the inputs depend on (n, d) only


def _check(q, k, v, causal, scale, out, dtype):
    """(max error of head 0's first rows vs float32, the bound for ``dtype``) — the bound from float64
    magnitudes of the same rows (causal or not: the bound assumes every key, so it covers both)."""
    import torch

    from flashlab.precision import tensor_core_bound
    from flashlab.tolerance import attention_bound

    rows = min(CHECK_ROWS, q.shape[2])
    key = (q.shape[2], q.shape[3], dtype)
    qs, ks, vs = q[0, 0, :rows], k[0, 0], v[0, 0]
    s = scale * qs @ ks.T
    if causal:
        mask = torch.ones(rows, ks.shape[0], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, -math.inf)
    ref = torch.softmax(s, dim=-1) @ vs
    err = float((out[0, 0, :rows].float() - ref).abs().max())
    if key not in _BOUNDS:
        qn, kn, vn = (x.double().cpu().numpy() for x in (qs, ks, vs))
        bound = tensor_core_bound(qn, kn, vn, dtype, scale=scale).atol
        _BOUNDS[key] = (
            bound + attention_bound(qn, kn, vn, dtype="float32", scale=scale).atol
        )  # the reference's
    return err, _BOUNDS[key]


def case(impl, n, d, causal, *, repeat, warmup, make=None) -> dict:
    """One row: run, check against float32, time."""
    import torch

    heads = max(8, 131072 // n)
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", generator=gen) for _ in range(3))
    scale = 1.0 / math.sqrt(d)
    from flashlab.bench import gpu

    dtype = DTYPE.get(impl, "bfloat16")
    run = (make or runners()[impl])(q, k, v, causal, scale)
    out = run()
    torch.cuda.synchronize()
    err, bound = _check(q, k, v, causal, scale, out, dtype)
    ms = gpu.median_ms(run, repeat, warmup)
    return {
        "impl": impl,
        "dtype": dtype,
        "causal": causal,
        "heads": heads,
        "n": n,
        "d": d,
        "ms": ms,
        "tflops": attention_tflops(n, n, d, heads, ms / 1e3, causal),
        "max_abs_err_vs_fp32": err,
        "bound": bound,
        "ok": err <= bound,
    }


def quick() -> int:
    """Compile, run one size per case, check, time; say clearly what failed."""
    import torch

    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible to torch")
        return 1
    from flashlab import device

    print(device.describe())
    failed = 0
    sdpa_err = {}  # (d, causal) -> torch's error: a kernel far above it has a bug the loose bound misses
    for impl in ("sdpa_flash_bf16", "flashlab_tc_bf16", "flashlab_tc_fp16"):
        for d in (64, 128):
            for causal in (False, True):
                label = f"{impl} d={d} causal={causal} N=1024"
                t0 = time.perf_counter()
                try:
                    row = case(impl, 1024, d, causal, repeat=5, warmup=2)
                except Exception as e:  # noqa: BLE001 (a smoke test reports every failure)
                    failed += 1
                    print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
                    traceback.print_exc(limit=6)
                    continue
                err = row["max_abs_err_vs_fp32"]
                sdpa_err.setdefault((d, causal), err)
                suspect = err > SUSPECT * sdpa_err[(d, causal)]
                status = "PASS" if row["ok"] and not suspect else "FAIL"
                failed += status == "FAIL"
                print(
                    f"{status} {label}: err {err:.2e} (bound {row['bound']:.2e}, "
                    f"torch sdpa bf16 {sdpa_err[(d, causal)]:.2e}{'; far above torch' if suspect else ''}), "
                    f"{row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s, "
                    f"{time.perf_counter() - t0:.1f} s incl. compile"
                )
    print("all passed" if not failed else f"{failed} case(s) FAILED")
    return 1 if failed else 0


def plot_tflops(path=None):
    """TFLOP/s against N from the CSV (non-causal; one panel per d), the bf16 tensor-core ceiling of
    ``data/hardware.json`` dashed. Returns the figure, or ``None`` if the CSV does not exist."""
    import csv
    from pathlib import Path

    import matplotlib.pyplot as plt

    from flashlab import hardware
    from flashlab.bench.common import DATA

    path = Path(path or DATA / f"{NAME}.csv")
    if not path.exists():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r.get("tflops") and r["causal"] == "False"]
    dims = sorted({r["d"] for r in rows}, key=int)
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 3.6), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((int(r["n"]), float(r["tflops"])) for r in rows if r["impl"] == impl and r["d"] == d)
            if pts:
                ax.plot([n for n, _ in pts], [t for _, t in pts], "o-", label=impl)
        ax.axhline(
            hardware.spec("H200")["bf16_dense_flops_per_s"] / 1e12, ls="--", color="k", label="bf16 peak"
        )
        ax.set(xscale="log", yscale="log", xlabel="N", ylabel="TFLOP/s", title=f"d = {d}, not causal")
    axes[0, 0].legend(fontsize=7)
    return fig


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m flashlab.bench tensor-cores", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="1-minute smoke test (prints PASS/FAIL, writes nothing)"
    )
    p.add_argument("--n", default="1024,2048,4096,8192,16384", help="sequence lengths")
    p.add_argument("--d", default="64,128", help="head dims")
    p.add_argument("--impls", default=",".join(IMPLS), help="implementations")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="directory for the CSV (default data/)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.quick:
        return quick()
    t0 = time.perf_counter()
    make = runners()
    rows = []
    for impl in args.impls.split(","):
        for d in (int(x) for x in args.d.split(",")):
            for causal in (False, True):
                for n in (int(x) for x in args.n.split(",")):
                    try:
                        row = case(
                            impl, n, d, causal, repeat=args.repeat, warmup=args.warmup, make=make[impl]
                        )
                    except Exception as e:  # noqa: BLE001 (a failed backend is a row, not the end)
                        row = {
                            "impl": impl,
                            "n": n,
                            "d": d,
                            "causal": causal,
                            "note": f"failed: {str(e)[:160]}",
                        }
                    rows.append(row)
                    print(
                        {key: (f"{val:.4g}" if isinstance(val, float) else val) for key, val in row.items()}
                    )
    from flashlab.cuda.tensor_core import M_TILES

    meta = provenance() | {
        "timing": f"median of CUDA-event timings, each call after a GPU spin of {SPIN_CYCLES} cycles",
        "m_tiles per warp (d, causal)": {f"{d},{c}": m for (d, c), m in M_TILES.items()},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    path = write_results(NAME, rows, meta, args.out)
    print(f"wrote {len(rows)} rows to {path}")
    return 0 if all(r.get("ok", False) for r in rows) else 1


if __name__ == "__main__":
    import sys

    np.seterr(all="ignore")
    sys.exit(main(sys.argv[1:]))
