"""Chapter 4: the numba.cuda kernels, in the CUDA simulator (and against torch on a GPU when there is one)."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.check import Mistake, check
from flashlab.cuda import _numba, flash_attention, launch
from flashlab.cuda import traffic as kernel_traffic
from flashlab.cuda.forward import rowwise_key_step
from flashlab.cuda.registry import make_kernel, names
from flashlab.exercises.kernels import run_rowwise
from tests.conftest import requires_gpu
from tests.strategies import assert_close

# small tiles: a few thread blocks of a few threads each, so the simulator stays quick
SMALL = {
    "rowwise": {"rows": 8, "keys": 4},
    "tiled": {"rows": 4, "keys": 4},
    "register_tiled": {"rows": 8, "keys": 8, "tm": 2, "tn": 2, "g": 4, "unroll": 2},
}
KERNELS = names("forward")
# (N_q, N_k): ragged (not multiples of any tile), smaller than a tile, N_q > N_k (fully masked
# causal rows), N_q < N_k
SHAPES = [(19, 13), (3, 5), (17, 6), (6, 17)]


def _inputs(n_q, n_k, d, seed, spread=1.0, lead=(2,)):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(lead + (n_q, d)) * spread).astype(np.float32)
    k = rng.standard_normal(lead + (n_k, d)).astype(np.float32)
    v = rng.standard_normal(lead + (n_k, d)).astype(np.float32)
    return q, k, v


def _reference(q, k, v, causal, scale=None):
    return naive_attention(
        *(x.astype(np.float64) for x in (q, k, v)), causal=causal, scale=scale, return_lse=True
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q, n_k", SHAPES)
def test_kernel_equals_naive_attention(kernel, causal, n_q, n_k):
    d = 16 if (n_q + n_k) % 2 else 32
    q, k, v = _inputs(n_q, n_k, d, seed=n_q * 31 + n_k)
    o, lse = flash_attention(q, k, v, kernel=kernel, causal=causal, return_lse=True, tiles=SMALL[kernel])
    want_o, want_lse = _reference(q, k, v, causal)
    assert o.dtype == np.float32 and o.shape == q.shape
    assert_close(o, want_o, q, k, v)
    assert_close(lse, want_lse, q, k, v, quantity="lse")
    if causal and n_q > n_k:  # rows that see no key: o = 0, lse = -inf, as naive_attention
        assert np.all(o[:, : n_q - n_k] == 0) and np.all(lse[:, : n_q - n_k] == -np.inf)


@settings(max_examples=6)
@given(
    n_q=st.integers(1, 20),
    n_k=st.integers(1, 20),
    d=st.sampled_from([16, 32]),
    causal=st.booleans(),
    spread=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**31),
)
def test_register_tiled_random_shapes_and_large_logits(n_q, n_k, d, causal, spread, seed):
    q, k, v = _inputs(n_q, n_k, d, seed, spread, lead=(1,))
    o, lse = flash_attention(
        q, k, v, kernel="register_tiled", causal=causal, return_lse=True, tiles=SMALL["register_tiled"]
    )
    want_o, want_lse = _reference(q, k, v, causal)
    assert_close(o, want_o, q, k, v)
    assert_close(lse, want_lse, q, k, v, quantity="lse")


@pytest.mark.parametrize("options", [{"index": "signed"}, {"load_columns": 2}, {"load_columns": 16}])
def test_register_tiled_variants_compute_the_same(options):
    """The kernel log's variants (signed shared-memory indices, K/V copy width) change speed, not results."""
    q, k, v = _inputs(11, 13, 16, seed=5, lead=(1,))
    index = options.pop("index", "unsigned")
    spec = launch.kernel_spec("register_tiled", 16, True, SMALL["register_tiled"] | options, index=index)
    o = np.full((1, 11, 16), np.nan, np.float32)
    lse = np.full((1, 11), np.nan, np.float32)
    arrays = {"q": q, "k": k, "v": v}
    launch.run(spec, launch.forward_args(arrays, o, lse, 0.25))
    want_o, want_lse = _reference(q, k, v, True, scale=0.25)
    assert_close(o, want_o, q, k, v, scale=0.25)
    assert_close(lse, want_lse, q, k, v, scale=0.25, quantity="lse")


def test_default_tiles_scale_broadcast_and_float16():
    """The tiles flash_attention uses by default (many threads), leading dims broadcast, float16 in/out."""
    q, k, v = _inputs(5, 7, 16, seed=3, lead=(1,))
    q2 = np.stack([q, 2 * q])  # (2, 1, 5, 16): k, v broadcast over the first dim
    q2, k, v = (x.astype(np.float16) for x in (q2, k, v))
    o = flash_attention(q2, k, v, scale=0.7)
    assert o.dtype == np.float16 and o.shape == (2, 1, 5, 16)
    want = naive_attention(q2, k, v, scale=0.7)
    assert np.allclose(o.astype(np.float32), want.astype(np.float32), atol=2e-3)
    assert "register_tiled" in launch.last_run
    assert "simulator" in launch.last_run or "GPU" in launch.last_run


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d": 24}, "d=24"),
        ({"dtype": np.float64}, "float64"),
        ({"kernel": "fast"}, "kernel must be one of"),
        ({"d_v": 8}, "d_v=8"),
        ({"tiles": {"rows": 8, "keys": 8, "tm": 2, "tn": 4, "g": 4}}, "keys=8 must equal g*tn=16"),
        ({"tiles": {"rows": 6, "keys": 8, "tm": 4, "tn": 2, "g": 4}}, "tm=4 must divide rows=6"),
        ({"tiles": {"rows": 8, "keys": 8, "tm": 2, "tn": 2, "g": 4, "unroll": 3}}, "unroll=3 must divide"),
        ({"tiles": {"block": 4}}, "unknown tile parameter"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    d, d_v = kwargs.get("d", 16), kwargs.get("d_v", kwargs.get("d", 16))
    dtype = kwargs.get("dtype", np.float32)
    q = np.ones((4, d), dtype)
    v = np.ones((4, d_v), dtype)
    with pytest.raises(ValueError, match=re.escape(message)):
        flash_attention(q, q, v, kernel=kwargs.get("kernel", "register_tiled"), tiles=kwargs.get("tiles"))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal, n_q, n_k", [(False, 19, 13), (True, 19, 13), (True, 6, 17), (True, 17, 6)])
def test_counted_kernel_traffic_equals_the_model(kernel, causal, n_q, n_k):
    """Global reads/writes counted from the kernel's own source == chapter 3's FA2 closed form."""
    q, k, v = _inputs(n_q, n_k, 16, seed=7)
    traffic, o, lse = kernel_traffic.count_traffic(q, k, v, kernel=kernel, causal=causal, tiles=SMALL[kernel])
    model = kernel_traffic.model_traffic(traffic, n_q, n_k, 16, causal=causal, batch=2)
    assert traffic.hbm() == model
    assert_close(o, _reference(q, k, v, causal)[0], q, k, v)  # the counted run computes the answer
    # Q once; K and V once per query block that computes with them (FA2's re-reads, shown)
    rereads = traffic.rereads()
    assert rereads["Q"] == 1.0
    blocks = math.ceil(n_q / SMALL[kernel]["rows"])
    assert 1.0 <= rereads["K"] == rereads["V"] <= blocks
    if not causal:
        assert rereads["K"] == blocks


@pytest.mark.parametrize("n_q, n_k", [(32, 32), (40, 20)])
def test_register_tiling_reads_shared_memory_less_per_fma(n_q, n_k):
    q, k, v = _inputs(n_q, n_k, 32, seed=1, lead=(1,))
    tiles = {"rows": 32, "keys": 16, "tm": 4, "tn": 4, "g": 4}
    row, _, _ = kernel_traffic.count_traffic(q, k, v, kernel="rowwise", tiles={"rows": 32, "keys": 16})
    reg, _, _ = kernel_traffic.count_traffic(q, k, v, kernel="register_tiled", tiles=tiles)
    assert reg.shared_reads == kernel_traffic.register_tiled_shared_reads(n_q, n_k, 32, tiles)
    per_fma = {
        name: kernel_traffic.shared_per_fma(t, n_q, n_k, 32) for name, t in (("row", row), ("reg", reg))
    }
    assert per_fma["row"] == pytest.approx(1.0)  # every multiply-add reads one K or V element
    if n_q % 32 == 0 and n_k % 16 == 0:  # ragged edges compute padded tiles: reads without useful FMAs
        assert per_fma["reg"] < 0.5 * per_fma["row"]


def test_every_forward_kernel_of_the_registry_is_tested():
    assert set(KERNELS) == set(SMALL), "a new forward kernel needs small simulator tiles in SMALL"


def test_numba_private_apis_are_there():
    """flashlab uses numba-cuda internals (flashlab/cuda/_numba.py); an upgrade that moves one fails here."""
    missing = _numba.missing_private_apis()
    assert not missing, "numba-cuda lacks private APIs flashlab uses: " + "; ".join(missing)


def test_simulated_shared_memory_is_one_array_per_block():
    """numba's simulator can hand two threads of one block two different static shared arrays (it checks
    and inserts without a lock: a kernel then reads a tile another thread never wrote). Ours is locked."""
    import threading

    from numba import float32

    memory, barrier, got = _numba.SharedMemory(0), threading.Barrier(32), []

    def thread():
        barrier.wait()
        got.append(memory.array((4, 4), float32))  # every thread: the same source line

    threads = [threading.Thread(target=thread) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 32 and all(a is got[0] for a in got)
    assert np.all(np.isnan(got[0])), "shared memory starts as NaN, so reading an unwritten entry shows"


# --- the exercise ----------------------------------------------------------------------------------


def _no_rescale(q_row, k_tile, v_tile, jj, scale, m, l, acc):  # noqa: E741
    s = np.float32(0.0)
    for c in range(q_row.shape[0]):
        s += q_row[c] * k_tile[jj, c]
    s *= scale
    m_new = max(m, s)
    p = math.exp(s - m_new)
    for c in range(acc.shape[0]):
        acc[c] += p * v_tile[jj, c]  # forgot acc * alpha
    return m_new, l * math.exp(m - m_new) + p


def _no_max(q_row, k_tile, v_tile, jj, scale, m, l, acc):  # noqa: E741
    s = np.float32(0.0)
    for c in range(q_row.shape[0]):
        s += q_row[c] * k_tile[jj, c]
    p = math.exp(s * scale)  # overflows for large scores
    for c in range(acc.shape[0]):
        acc[c] += p * v_tile[jj, c]
    return max(m, s * scale), l + p


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the no-max answer overflows:
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the mistake it must name
def test_exercise_accepts_the_solution_and_names_wrong_answers():
    assert check("rowwise_inner_loop", rowwise_key_step) is True
    with pytest.raises(Mistake, match="multiply the old sum l AND every acc"):
        check("rowwise_inner_loop", _no_rescale)
    with pytest.raises(Mistake, match="Subtract the running max"):
        check("rowwise_inner_loop", _no_max)


def test_exercise_kernel_is_the_rowwise_kernel():
    q, k, v = (x[0] for x in _inputs(9, 6, 16, seed=2))
    o, lse = run_rowwise(rowwise_key_step, q, k, v, causal=True)
    want_o, want_lse = _reference(q, k, v, True)
    assert_close(o, want_o, q, k, v)
    assert_close(lse, want_lse, q, k, v, quantity="lse")
    assert make_kernel("rowwise", 16, True).block == (128,)


# --- on a GPU: against torch at sizes the simulator cannot reach -----------------------------------


@requires_gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("causal, n_q, n_k", [(False, 1000, 777), (True, 1000, 777), (True, 777, 1000)])
def test_gpu_kernels_match_torch(kernel, d, causal, n_q, n_k):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(d + n_q)
    q = torch.randn(2, 3, n_q, d, device="cuda", generator=gen)
    k, v = (torch.randn(2, 3, n_k, d, device="cuda", generator=gen) for _ in range(2))
    o, lse = flash_attention(q, k, v, kernel=kernel, causal=causal, return_lse=True)
    assert isinstance(o, torch.Tensor) and o.is_cuda and o.shape == q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    if causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device="cuda").tril(n_k - n_q)
        s = s.masked_fill(~mask, -math.inf)
    want_lse = torch.logsumexp(s, dim=-1)
    want = torch.nan_to_num(torch.softmax(s, dim=-1)) @ v.double()
    assert float((o.double() - want).abs().max()) < 1e-4
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert float((lse.double() - want_lse)[seen].abs().max()) < 1e-4
    o_np = flash_attention(*(x.cpu().numpy() for x in (q, k, v)), kernel=kernel, causal=causal)
    assert np.abs(o_np - o.cpu().numpy()).max() < 1e-5  # NumPy in, NumPy out: the same kernel


def test_results_load_back_with_typed_columns(tmp_path):
    from flashlab.bench.common import load_results, write_results

    rows = [
        {"impl": "a", "causal": True, "n": 1024, "ms": 1.5, "note": ""},
        {"impl": "b", "causal": False, "n": 2048, "ms": None, "note": "OOM"},
    ]
    write_results("bench", rows, {"command": "test"}, directory=tmp_path)
    back = load_results("bench", directory=tmp_path)
    assert back[0] == {"impl": "a", "causal": True, "n": 1024, "ms": 1.5, "note": None}
    assert back[1]["causal"] is False and back[1]["ms"] is None and back[1]["note"] == "OOM"
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_results("missing", directory=tmp_path)


NCU_RAW = """==PROF== Connected to process 4242 (/usr/bin/python3)
==PROF== Profiling "register_tiled": 0%....50%....100% - 38 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Block Size","Grid Size","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio"
"","","","","","","","%","usecond","ratio","ratio","ratio"
"0","4242","python3","127.0.0.1","cudapy::flashlab::cuda::forward::register_tiled_source::<locals>::register_tiled","(256, 1, 1)","(32, 32, 1)","7.15","4,912.61","1.52","0.31","2.05"
"1","4242","python3","127.0.0.1","cudapy::flashlab::cuda::backward::backward_source::<locals>::backward","(256, 1, 1)","(64, 32, 1)","12.40","15,001.00","0.90","1.10","0.20"
"""  # noqa: E501  (the shape of `ncu --csv --page raw`: header, units, one row per kernel)


def test_ncu_raw_csv_is_parsed_into_metrics_and_stall_reasons():
    from argparse import Namespace

    from flashlab.bench import profile

    kernels = profile.parse_raw_csv(NCU_RAW)
    assert [k["kernel"].rsplit("::", 1)[-1] for k in kernels] == ["register_tiled", "backward"]
    forward = kernels[0]["metrics"]
    assert forward["gpu__time_duration.sum"] == ("usecond", 4912.61)  # thousands separators dropped
    assert list(profile.stall_reasons(forward)) == ["mio_throttle", "barrier", "long_scoreboard"]
    rows = profile.rows_from(kernels, Namespace(heads=32, n=4096, d=64, causal=False))
    assert {r["target"] for r in rows} == {"forward", "backward"} and len(rows) == 2 * 5
    brief = profile.summary(rows)
    assert brief["forward"]["metrics"]["duration"] == (4912.61, "usecond")
    assert next(iter(brief["backward"]["stalls"])) == "long_scoreboard"
    with pytest.raises(ValueError, match="no ncu raw CSV"):
        profile.parse_raw_csv("==PROF== Connected\nno kernels were profiled\n")
    args = Namespace(heads=32, n=4096, d=64, causal=False, targets=profile.DEFAULT_TARGETS)
    command = profile.ncu_command(args, "ncu")
    assert command[:4] == ["ncu", "--csv", "--page", "raw"] and "WarpStateStats" in command
    assert (
        "regex:register_tiled_source|backward_source" in command and "--targets=forward,backward" in command
    )
    assert command[command.index("--launch-count") + 1] == "2"
    command = profile.ncu_command(Namespace(**vars(args) | {"targets": "tensor_core"}), "ncu")
    assert "regex:flash_tc" in command and command[command.index("--launch-count") + 1] == "1"
    with pytest.raises(ValueError, match="targets: got 'forward,wmma'"):
        profile.selected("forward,wmma")


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_3:
        /*0020*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/                   STS [R5], R4 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_4:
        /*0050*/                   LDS.128 R8, [R6] ;
        /*0060*/                   LDS R12, [R7] ;
        /*0070*/                   FFMA R13, R8, R12, R13 ;
        /*0080*/              @P0  BRA `(.L_x_4) ;
        /*0090*/                   LDL R14, [R1] ;
        /*00a0*/              @!P1 BRA `(.L_x_3) ;
        /*00b0*/                   EXIT ;
"""


def test_sass_counts_find_the_kernel_and_its_main_loop():
    from flashlab.bench.kernels import sass_counts

    counts = sass_counts(SASS)
    assert counts["kernel"] == {
        "FFMA": 1, "LDS": 2, "LDS.128": 1, "LDL": 1, "STL": 0, "BAR": 1, "instructions": 12,
    }  # fmt: skip
    assert counts["main_loop"]["instructions"] == 9  # .L_x_3 .. its branch: the longest loop
    assert counts["main_loop"]["LDL"] == 1 and counts["main_loop"]["FFMA"] == 1


def test_every_kernel_log_variant_is_built_by_the_registry():
    """`python -m flashlab.bench kernels` times only what the code can build: every variant at every shape."""
    from flashlab.bench import gpu
    from flashlab.bench.kernels import SHAPES, VARIANTS

    for label, kernel, tiles, options in VARIANTS:
        for (_, _, d, causal), which in SHAPES.items():
            if which is None or label in which:
                if kernel in gpu.RUNNERS:
                    continue
                spec = make_kernel(kernel, d, causal, **tiles, **options)
                assert spec.block[0] <= 1024 and spec.shared_bytes <= 227 * 1024, label


def test_whole_kernel_exercise_accepts_the_solution_and_names_wrong_kernels():
    from flashlab.cuda.forward import rowwise_source
    from flashlab.exercises.kernels import KEYS, ROWS

    assert check("rowwise_kernel", rowwise_source(16, ROWS, KEYS, False)) is True
    with pytest.raises(Mistake, match="carry over from one K/V tile"):
        check("rowwise_kernel", rowwise_source(16, ROWS, KEYS, False, key_step=_no_rescale))
    with pytest.raises(Mistake, match="differs from naive attention|OverflowError"):
        check("rowwise_kernel", rowwise_source(16, ROWS, KEYS, False, key_step=_no_max))
