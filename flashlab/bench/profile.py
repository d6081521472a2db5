"""``python -m flashlab.bench profile``: Nsight Compute counters of the forward and backward kernels.

Runs ``ncu`` (Nsight Compute, on the GPU machine) over a child process that launches, once each, the
``--targets`` (default ``forward,backward``: ``register_tiled`` and the backward kernel, float32;
``tensor_core``: chapter 8's kernel, bf16), batch 1, ``--heads`` x ``--n`` x ``--d`` (default
32 x 4096 x 64, as the kernel log). ``ncu`` collects the sections in :data:`SECTIONS`
(speed of light, occupancy, warp stall reasons, memory workload) and prints every raw metric
(``--csv --page raw``); :func:`parse_raw_csv` reads that, and ``data/<--out>.csv`` gets one row per
kernel and metric (``target, kernel, heads, n, d, causal, metric, unit, value``) with a provenance
file that holds the exact ``ncu`` command. Metrics the notebooks read: :data:`KEY_METRICS`.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import subprocess
import sys
import time

from flashlab.bench.common import provenance, write_results

SECTIONS = ("SpeedOfLight", "Occupancy", "WarpStateStats", "MemoryWorkloadAnalysis")
# kernel-name regexes (numba's mangled names hold the Python function's qualified name)
TARGETS = {"forward": "register_tiled_source", "backward": "backward_source", "tensor_core": "flash_tc"}
DEFAULT_TARGETS = "forward,backward"
STALL_PREFIX = "smsp__average_warps_issue_stalled_"  # + reason + "_per_issue_active.ratio"
KEY_METRICS = {
    "gpu__time_duration.sum": "duration",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM throughput, % of peak",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM throughput, % of peak",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed": (
        "shared-memory wavefronts, % of peak"
    ),
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy, % of the SM's warps",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical occupancy, %",
    "launch__registers_per_thread": "registers per thread",
}


def parse_raw_csv(text: str) -> list[dict]:
    """``ncu --csv --page raw`` output -> one dict per profiled kernel: ``{"kernel", "metrics"}``, with
    ``metrics = {name: (unit, value)}`` (value a float where it reads as a number, else the text).

    Lines before the CSV header (the program's own output, ``==PROF==`` messages) are skipped; the row
    after the header that has no ``ID`` holds the units.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID","Process ID"')), None)
    if start is None:
        raise ValueError('no ncu raw CSV found (expected a header starting with "ID","Process ID")')
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, rows = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    units = {}
    if rows and rows[0][0] == "":
        units, rows = dict(zip(header, rows[0], strict=True)), rows[1:]
    name_col = header.index("Kernel Name")
    kernels = []
    for row in rows:
        metrics = {
            name: (units.get(name, ""), _number(value))
            for name, value in zip(header, row, strict=True)
            if "__" in name  # metric names look like unit__counter.rollup; the rest is launch info
        }
        kernels.append({"kernel": row[name_col], "metrics": metrics})
    return kernels


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def stall_reasons(metrics: dict) -> dict[str, float]:
    """Warp stall reasons (cycles a warp waits per issued instruction), largest first."""
    reasons = {
        name[len(STALL_PREFIX) : -len("_per_issue_active.ratio")]: value
        for name, (_, value) in metrics.items()
        if name.startswith(STALL_PREFIX)
        and name.endswith("_per_issue_active.ratio")
        and isinstance(value, float)
    }
    return dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per target (``forward``, ``backward``), from the rows of ``data/gpu_h200_ncu.csv``: the
    :data:`KEY_METRICS` found (``{label: (value, unit)}``) and the stall reasons, largest first."""
    out = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        # the value column mixes numbers and text (ncu's 'no data', names), so it loads as text
        metrics = {r["metric"]: (r["unit"], _number(str(r["value"]))) for r in rows if r["target"] == target}
        found = {label: metrics[m][::-1] for m, label in KEY_METRICS.items() if m in metrics}
        out[target] = {"metrics": found, "stalls": stall_reasons(metrics)}
    return out


def ncu_command(args, ncu: str) -> list[str]:
    """The ``ncu`` command line that profiles one launch of each of ``args.targets`` in a child process."""
    targets = selected(args.targets)
    regex = "|".join(TARGETS[t] for t in targets)
    child = [sys.executable, "-m", "flashlab.bench.profile", "--launch", f"--targets={','.join(targets)}"]
    child += [f"--heads={args.heads}", f"--n={args.n}", f"--d={args.d}"] + (
        ["--causal"] if args.causal else []
    )
    return (
        [
            ncu,
            "--csv",
            "--page",
            "raw",
            "--clock-control",
            "none",  # leave the clocks as the benchmarks see them
            # numba's kernels are C++-mangled; their Python names are only in the mangled name
            "--kernel-name-base",
            "mangled",
            "--print-kernel-base",
            "mangled",
            "--kernel-name",
            f"regex:{regex}",
            "--launch-count",
            str(len(targets)),
        ]
        + [x for section in SECTIONS for x in ("--section", section)]
        + child
    )


def selected(targets: str) -> list[str]:
    """``--targets`` as a list, each checked against :data:`TARGETS`."""
    names = [t for t in targets.split(",") if t]
    wrong = [t for t in names if t not in TARGETS]
    if wrong or not names:
        raise ValueError(f"targets: got {targets!r}; use a comma-separated subset of {', '.join(TARGETS)}")
    return names


def launch_targets(heads: int, n: int, d: int, causal: bool, targets: list[str]) -> None:
    """The child: one launch of each target on the GPU (the backward: pre-pass + kernel)."""
    import numpy as np
    from numba import cuda

    from flashlab.cuda import launch

    rng = np.random.default_rng(0)
    host = {name: rng.standard_normal((heads, n, d)).astype(np.float32) for name in ("q", "k", "v", "do")}
    if "tensor_core" in targets:
        from flashlab.cuda.tensor_core import flash_attention_tc

        flash_attention_tc(host["q"], host["k"], host["v"], causal=causal, dtype="bfloat16")
    if not {"forward", "backward"} & set(targets):
        return
    dev = {name: cuda.to_device(x) for name, x in host.items()}
    o, lse = cuda.device_array((heads, n, d), np.float32), cuda.device_array((heads, n), np.float32)
    scale = 1.0 / math.sqrt(d)
    forward = launch.kernel_spec("register_tiled", d, causal)
    backward = launch.kernel_spec("backward", d, causal)
    if forward.target == "gpu":  # compile before the profiled launches
        launch.compiled(forward), launch.compiled(backward)
    launch.run(forward, launch.forward_args({k: dev[k] for k in "qkv"}, o, lse, scale))
    if "backward" in targets:
        outs = {"delta": cuda.device_array((heads, n), np.float32)}
        outs |= {name: cuda.device_array((heads, n, d), np.float32) for name in ("dq", "dk", "dv")}
        inputs = {k: dev[k] for k in "qkv"} | {"o": o, "lse": lse, "do": dev["do"]}
        launch.run_backward(backward, launch.backward_args(inputs, **outs, scale=scale))
    cuda.synchronize()


def rows_from(kernels: list[dict], args) -> list[dict]:
    """One CSV row per (kernel, metric), the target named by which regex its kernel name matches."""
    rows = []
    for k in kernels:
        target = next((t for t, pattern in TARGETS.items() if pattern in k["kernel"]), "other")
        base = {"target": target, "kernel": k["kernel"][:120], "heads": args.heads, "n": args.n, "d": args.d}
        base["causal"] = args.causal
        for metric, (unit, value) in sorted(k["metrics"].items()):
            rows.append(base | {"metric": metric, "unit": unit, "value": value})
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashlab.bench profile", description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--n", type=int, default=4096, help="sequence length (N_q = N_k)")
    p.add_argument("--d", type=int, default=64, help="head dim (16, 32, 64, 128)")
    p.add_argument("--causal", action="store_true")
    p.add_argument(
        "--targets", default=DEFAULT_TARGETS, help=f"kernels to profile: some of {', '.join(TARGETS)}"
    )
    p.add_argument("--ncu", default="ncu", help="the Nsight Compute command line tool")
    p.add_argument("--out", default="gpu_h200_ncu", help="results go to data/<out>.csv")
    p.add_argument("--launch", action="store_true", help="(the child ncu profiles: launch the kernels once)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from flashlab import device

    if device.MODE != "gpu":
        print("python -m flashlab.bench profile needs a CUDA GPU and Nsight Compute (ncu).")
        return 2
    if args.launch:
        launch_targets(args.heads, args.n, args.d, args.causal, selected(args.targets))
        return 0
    t0 = time.perf_counter()
    command = ncu_command(args, args.ncu)
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        print(f"ncu failed with exit code {done.returncode}")
        return 1
    try:
        kernels = parse_raw_csv(done.stdout)
    except ValueError:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise
    version = subprocess.run([args.ncu, "--version"], capture_output=True, text=True).stdout.strip()
    meta = provenance() | {
        "ncu command": " ".join(command),
        "ncu version": version.splitlines()[-1] if version else "unknown",
        "what": "Nsight Compute raw metrics of one launch of each kernel (ncu replays it once per pass)",
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    path = write_results(args.out, rows_from(kernels, args), meta)
    for k in kernels:
        target = next((t for t, pattern in TARGETS.items() if pattern in k["kernel"]), "other")
        top = ", ".join(f"{r} {v:.2f}" for r, v in list(stall_reasons(k["metrics"]).items())[:4])
        print(f"{target}: top stall reasons (cycles per issued instruction): {top}")
    print(f"wrote {path.name} ({len(kernels)} kernels) in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
