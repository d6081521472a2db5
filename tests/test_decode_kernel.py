"""The split-KV decoding kernels (numba.cuda), in the simulator at tiny sizes and on a GPU if present."""

import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlab.attention import naive_attention
from flashlab.cuda.decode import count_traffic, decode_attention, decode_traffic
from flashlab.tolerance import attention_bound, check_close
from tests.conftest import requires_gpu


def inputs(lead, rows, n_k, d, kv_dtype, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(lead + (rows, d)) * spread).astype(np.float32)
    k, v = (rng.standard_normal(lead + (n_k, d)).astype(kv_dtype) for _ in range(2))
    return q, k, v


def check(q, k, v, causal, o, lse):
    """Against float64 attention of the stored values (a float16 cache converts exactly)."""
    o_ref, lse_ref = naive_attention(
        *(x.astype(np.float64) for x in (q, k, v)), causal=causal, return_lse=True
    )
    check_close(o, o_ref, attention_bound(q, k, v, dtype=np.float32), "o")
    check_close(lse, lse_ref, attention_bound(q, k, v, dtype=np.float32, quantity="lse"), "lse")


@settings(max_examples=4)  # every simulated thread is a Python thread
@given(
    rows=st.integers(1, 3),
    n_k=st.integers(1, 70),
    splits=st.integers(1, 6),
    kv_dtype=st.sampled_from([np.float32, np.float16]),
    causal=st.booleans(),
    seed=st.integers(0, 99),
)
def test_simulator_equals_reference(rows, n_k, splits, kv_dtype, causal, seed):
    q, k, v = inputs((2,), rows, n_k, 64, kv_dtype, seed, spread=3.0)  # ragged n_k, splits not dividing it
    o, lse = decode_attention(q, k, v, splits=splits, causal=causal, return_lse=True, threads=32)
    check(q, k, v, causal, o, lse)


def test_rows_that_see_no_key_and_empty_splits():
    q, k, v = inputs((1,), 4, 2, 64, np.float16, seed=1)  # causal, N_q > N_k: rows 0, 1 see nothing
    o, lse = decode_attention(q, k, v, splits=5, causal=True, return_lse=True, threads=32)  # 3 empty splits
    assert np.all(o[:, :2] == 0) and np.all(np.isneginf(lse[:, :2]))
    check(q, k, v, True, o, lse)


def test_head_dim_128_and_broadcast_leading_dims():
    q, _, _ = inputs((2, 1), 1, 20, 128, np.float32, seed=2)
    _, k, v = inputs((1, 1), 1, 20, 128, np.float32, seed=3)  # one cache shared by two query batches
    o, lse = decode_attention(q, k, v, splits=2, threads=64, return_lse=True)
    check(q, *(np.broadcast_to(x, (2, 1, 20, 128)) for x in (k, v)), False, o, lse)


@pytest.mark.parametrize(("d", "kv_dtype", "unroll"), [(128, np.float16, 2), (64, np.float32, 1)])
def test_key_groups_of_every_width_and_warps_merged(d, kv_dtype, unroll):
    q, k, v = inputs((1,), 2, 45, d, kv_dtype, seed=5, spread=3.0)  # 16 lanes per key group, 2 warps
    o, lse = decode_attention(q, k, v, splits=2, causal=True, return_lse=True, threads=64, unroll=unroll)
    check(q, k, v, True, o, lse)


def test_counted_traffic_equals_the_closed_form():
    q, k, v = inputs((2,), 2, 37, 64, np.float16, seed=3)
    traffic, o, lse = count_traffic(q, k, v, splits=3, causal=True, threads=32)
    assert traffic == decode_traffic(2, 2, 37, 64, 3)  # K and V read exactly once
    check(q, k, v, True, o, lse)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(d=32), "head dim d=32"),
        (dict(rows=9), "1..8"),
        (dict(splits=0), "splits must be a positive integer"),
        (dict(threads=48), "threads=48 must be a multiple of 32"),
        (dict(threads=1024, rows=8), "threads=1024 with rows=8 at d=64 needs"),
        (dict(v_dtype=np.float64), "stored as one of"),
    ],
)
def test_bad_input_is_refused_by_name(change, message):
    d, rows = change.get("d", 64), change.get("rows", 1)
    q, k, v = inputs((1,), rows, 8, d, np.float32, seed=0)
    v = v.astype(change.get("v_dtype", np.float32))
    with pytest.raises(ValueError, match=message):
        decode_attention(q, k, v, splits=change.get("splits", 2), threads=change.get("threads", 32))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_long_cache_auto_splits(kv_dtype, d):
    q, k, v = inputs((2, 4), 2, 20000, d, kv_dtype, seed=4)
    o, lse = decode_attention(q, k, v, causal=True, return_lse=True)
    check(q, k, v, True, o, lse)


def test_benchmark_command_runs_at_a_tiny_size(tmp_path):
    from flashlab.bench.__main__ import main

    argv = ["decode", "--kv", "40", "--batch", "1", "--d", "64", "--heads", "1", "--kv-dtype", "float16"]
    argv += ["--impls", "flashlab_decode,sdpa_math", "--repeat", "1", "--warmup", "0", "--dir", str(tmp_path)]
    assert main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "gpu_h200_decode.csv").open()))
    assert [r["impl"] for r in rows] == ["flashlab_decode", "sdpa_math"]
    assert all(float(r["max_abs_err"]) <= float(r["err_bound"]) for r in rows)
    assert int(rows[0]["kv_bytes"]) == 2 * 40 * 64 * 2
    meta = json.loads((tmp_path / "gpu_h200_decode.provenance.json").read_text())
    assert meta["command"].startswith("python -m flashlab.bench") and meta["heads"] == 1
