"""``python -m flashlab.bench kernels``: the kernel log, every variant of the fast kernel timed on one GPU.

Each entry of :data:`VARIANTS` is a kernel of the registry with tile overrides (and, for
``register_tiled``, the shared-memory index type): nothing is timed that the code cannot build. Each is
timed at the shapes of :data:`SHAPES` (batch 1, float32) the way ``python -m flashlab.bench gpu`` times
the kernels (the compiled kernel launched on torch CUDA tensors, warm-up calls, then the median of
``--repeat`` CUDA-event timings), in two passes, the second in reverse order, so that a drift of the GPU
shows as a difference between passes. Each row also has numba's register and local-memory (spill)
report and static counts from the kernel's SASS (``Dispatcher.inspect_sass``, nvdisasm): FFMA, LDS
(any width), LDS.128 and LDL, for the whole kernel. Writes ``data/<--out>.csv`` and, for every variant,
its SASS counts (the whole kernel and its longest loop, the one over K/V tiles) to
``data/<--sass-out>.json``, each with provenance.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

from flashlab.bench.common import DATA, attention_tflops, provenance, write_results

# (label, kernel, tile overrides, options); the defaults are the registry's tiles for each d
VARIANTS = (
    ("rowwise", "rowwise", {}, {}),
    ("tiled", "tiled", {}, {}),
    ("default", "register_tiled", {}, {}),
    ("signed shared-memory indices", "register_tiled", {}, {"index": "signed"}),
    ("unroll=1 (one number per shared load)", "register_tiled", {"unroll": 1}, {}),
    ("unroll=2 (8-byte shared loads)", "register_tiled", {"unroll": 2}, {}),
    ("tm=8 tn=4 g=16", "register_tiled", {"tm": 8, "tn": 4, "g": 16}, {}),
    ("tm=8 tn=4 g=16 unroll=2", "register_tiled", {"tm": 8, "tn": 4, "g": 16, "unroll": 2}, {}),
    ("tm=8 tn=8 g=8 (bigger micro-tile)", "register_tiled", {"tm": 8, "tn": 8, "g": 8}, {}),
    ("K/V copied 1 column per step", "register_tiled", {"load_columns": 1}, {}),
    ("K/V copied 16 columns per step", "register_tiled", {"load_columns": 16}, {}),
    ("rows=64 keys=64 tm=4 tn=8 g=8", "register_tiled", {"rows": 64}, {}),
    ("rows=64 keys=128 tm=4 tn=8 g=16", "register_tiled", {"rows": 64, "keys": 128, "g": 16}, {}),
    ("rows=64 keys=256 tm=4 tn=16 g=16", "register_tiled", {"rows": 64, "keys": 256, "tn": 16, "g": 16}, {}),
    ("sdpa_mem_efficient_fp32", "sdpa_mem_efficient_fp32", {}, {}),
)
MAIN_SHAPE = (32, 4096, 64, False)  # heads, n, d, causal: every variant
# the default, its two closest rivals and the reference also at other sizes, causal and d = 128
WIDE = ("default", "tm=8 tn=4 g=16", "K/V copied 16 columns per step", "sdpa_mem_efficient_fp32")
SHAPES = {MAIN_SHAPE: None, (16, 8192, 64, False): WIDE, (8, 16384, 64, False): WIDE}
SHAPES |= {(32, 4096, 64, True): WIDE, (32, 4096, 128, False): ("default", "rowwise", *WIDE[2:])}
SASS_OPS = ("FFMA", "LDS", "LDS.128", "LDL", "STL", "BAR")
_ANY_WIDTH = ("LDS", "BAR")  # counted with every suffix (LDS.64, LDS.128, BAR.SYNC ...)
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)\)?")


def sass_counts(sass: str) -> dict:
    """Static instruction counts of a kernel's SASS (nvdisasm text, as ``inspect_sass`` gives it).

    ``{"kernel": counts, "main_loop": counts}``: ``counts`` holds :data:`SASS_OPS` (``LDS`` and ``BAR`` count
    every suffix) and ``instructions``; ``main_loop`` is the longest backward branch's body, the loop over K/V
    tiles (loops inside it, such as the K/V copy's, are counted once, not per trip).
    """
    ops, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(ops)
        found = _INSTRUCTION.search(line)
        if not found:
            continue
        ops.append(found.group(1))
        branch = _BRANCH.search(line)
        if found.group(1) == "BRA" and branch and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], len(ops)))
    body = ops[slice(*max(loops, key=lambda span: span[1] - span[0]))] if loops else []
    return {"kernel": _count(ops), "main_loop": _count(body)}


def _count(ops: list[str]) -> dict:
    counts = {
        op: sum(1 for x in ops if x == op or (op in _ANY_WIDTH and x.startswith(op + "."))) for op in SASS_OPS
    }
    return counts | {"instructions": len(ops)}


PASSES_SERVED = 1 / 4  # shared-memory passes per warp-wide FMA instruction a multiprocessor serves per clock


def passes_per_fma(tm: int, tn: int, g: int, unroll: int, d: int = 64) -> float:
    """Shared-memory passes per warp-wide FMA of register_tiled's two loops (S = Q K^T, O += P V): the g
    threads of a row read the same Q (P) numbers (a broadcast, one pass) and g different K rows (V
    columns), one pass per 128 bytes; ``unroll`` (S loop) and ``min(4, d/g)`` (PV loop) numbers per load."""
    td, w = d // g, min(4, d // g)
    s_loop = (tm + tn * max(1, g * unroll / 32)) / unroll
    pv_loop = tm / unroll + td / w * max(1, g * w / 32)
    return (s_loop / (tm * tn) + pv_loop / (tm * td)) / 2


def mean_tflops(log: list[dict], version: str, *, n=4096, d=64, causal=False, tiles=None) -> float | None:
    """Mean TFLOP/s of the log's rows of one variant and shape (over passes); None if not measured."""
    hits = [
        r["tflops"]
        for r in log
        if r["version"] == version and r["n"] == n and r["d"] == d and r["causal"] == causal
        and r.get("tflops") is not None and (tiles is None or r["tiles"] == tiles)
    ]  # fmt: skip
    return sum(hits) / len(hits) if hits else None


def _tiles_text(spec) -> str:
    return " ".join(f"{key}={value}" for key, value in spec.tiles)


def measure(label, kernel, tiles, options, shape, ref, q, k, v, *, repeat, warmup) -> dict:
    """One row: time, registers, SASS counts and error of one variant at one shape."""
    import torch

    from flashlab.bench import gpu
    from flashlab.cuda import launch

    heads, n, d, causal = shape
    row = {"version": label, "kernel": kernel, "heads": heads, "n": n, "d": d, "causal": causal}
    scale = 1.0 / math.sqrt(d)
    if kernel in gpu.RUNNERS:
        run = gpu.RUNNERS[kernel](q, k, v, causal, scale)
    else:
        spec = launch.kernel_spec(kernel, d, causal, tiles, **options)
        kern = launch.compiled(spec)
        row |= {"tiles": _tiles_text(spec), "index": options.get("index", "unsigned")}
        row |= {"regs": kern.get_regs_per_thread(), "local_bytes": kern.get_local_mem_per_thread()}
        run = gpu.flashlab_runner(kernel, tiles, options)(q, k, v, causal, scale)
    out = run()
    row["max_abs_err"] = float((out[:, : gpu.REF_HEADS].double() - ref).abs().max())
    ms = gpu.median_ms(run, repeat, warmup)
    row |= {"ms": ms, "tflops": attention_tflops(n, n, d, heads, ms / 1e3, causal)}
    del out
    torch.cuda.empty_cache()
    return row


def sass_of(kernel, tiles, options, d, causal) -> dict:
    """SASS counts of one variant (``{"error": ...}`` where nvdisasm is missing)."""
    from flashlab.cuda import launch

    spec = launch.kernel_spec(kernel, d, causal, tiles, **options)
    try:
        sass = launch.compiled(spec).inspect_sass()
        if isinstance(sass, dict):  # a dispatcher keyed by signature: the spec compiles exactly one
            (sass,) = sass.values()
    except Exception as e:  # nvdisasm not installed: the timings stay, the counts say why they are absent
        return {"tiles": _tiles_text(spec), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    return {"tiles": _tiles_text(spec)} | sass_counts(sass)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashlab.bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=10, help="timed calls per row (median; >= 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated variant labels (default: all)")
    p.add_argument("--out", default="gpu_h200_kernel_log", help="results go to data/<out>.csv")
    p.add_argument(
        "--sass-out", default="gpu_h200_kernel_sass", help="SASS counts go to data/<sass-out>.json"
    )
    args = p.parse_args(argv)
    if args.repeat < 10:
        p.error(f"--repeat must be >= 10 (a median of at least ten timings), got {args.repeat}")
    labels = [v[0] for v in VARIANTS]
    args.only = [x for x in args.only.split(",") if x] or labels
    unknown = set(args.only) - set(labels)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {labels}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from flashlab import device

    if device.MODE != "gpu":
        print("python -m flashlab.bench kernels needs a CUDA GPU (flashlab runs in the simulator here).")
        return 2
    import torch

    from flashlab.bench import gpu

    t0 = time.perf_counter()
    variants = [v for v in VARIANTS if v[0] in args.only]
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {}
    for shape in SHAPES:
        heads, n, d, causal = shape
        if (heads, n, d) not in inputs:
            inputs[(heads, n, d)] = [
                torch.randn(1, heads, n, d, device="cuda", generator=gen) for _ in range(3)
            ]
    for run in ("1", "2"):
        order = list(SHAPES.items()) if run == "1" else list(reversed(SHAPES.items()))
        for shape, which in order:
            heads, n, d, causal = shape
            q, k, v = inputs[(heads, n, d)]
            ref = gpu.reference(q, k, v, causal, 1.0 / math.sqrt(d))
            todo = [x for x in variants if which is None or x[0] in which]
            for label, kernel, tiles, options in todo if run == "1" else reversed(todo):
                try:
                    row = measure(
                        label,
                        kernel,
                        tiles,
                        options,
                        shape,
                        ref,
                        q,
                        k,
                        v,
                        repeat=args.repeat,
                        warmup=args.warmup,
                    )
                except Exception as e:  # one variant that does not run here must not lose the others
                    row = {"version": label, "kernel": kernel, "heads": heads, "n": n, "d": d}
                    row |= {"causal": causal, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"}
                rows.append({"run": run} | row)
                print(f"pass {run} {label:38s} {heads:3d} x {n:5d} x {d:3d} {'causal' if causal else ''} "
                      f"{row.get('tflops') or 0:6.1f} TFLOP/s", flush=True)  # fmt: skip
            del ref
    meta = provenance() | {
        "gpu": torch.cuda.get_device_name(),
        "timing": f"{args.warmup} warm-up calls, median of {args.repeat} calls timed by CUDA events, "
        "each after a GPU spin; "
        "two passes (run 1, run 2 in reverse order)",
        "error": f"max |o - o_ref| over the first {gpu.REF_HEADS} heads, reference in float64 on the GPU",
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    path = write_results(args.out, rows, meta)
    sass = {
        label: sass_of(kernel, tiles, options, 64, False)
        for label, kernel, tiles, options in variants
        if kernel not in gpu.RUNNERS  # torch's kernels: not ours to disassemble
    }
    sass_meta = provenance() | {"what": sass_counts.__doc__.split("\n\n")[0], "shape": "d = 64, no mask"}
    (DATA / f"{args.sass_out}.json").write_text(json.dumps({"provenance": sass_meta} | sass, indent=1) + "\n")
    print(f"wrote {path.name} ({len(rows)} rows) and {args.sass_out}.json in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
