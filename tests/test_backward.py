"""Chapter 5: the backward pass (NumPy Algorithm 4, the standard backward, the kernel)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashlab  # noqa: F401  (before numba)
from flashlab import backward, traffic
from flashlab.attention import naive_attention
from flashlab.backward import flash_attention_backward, naive_attention_backward, row_dot
from flashlab.cuda import flash_attention_backward as kernel_backward
from flashlab.cuda import traffic as kernel_traffic
from flashlab.cuda.registry import make_kernel
from flashlab.flash import flash_attention
from flashlab.inputs import causal_mask
from flashlab.memory import MemoryModel
from tests.conftest import requires_gpu
from tests.strategies import attention_problems

RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def torch_attention(q, k, v, causal, scale=None):
    """Attention as torch autograd sees it (bottom-right causal; a row with no key gives 0)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~torch.from_numpy(causal_mask(q.shape[-2], k.shape[-2])), -math.inf)
    m = s.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    total = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(total > 0, total, 1.0)) @ v


def torch_gradients(q, k, v, do, causal, scale=None):
    """``(dq, dk, dv)`` of float64 attention by torch autograd (the reference)."""
    q, k, v = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
    torch_attention(q, k, v, causal, scale).backward(torch.tensor(np.asarray(do, np.float64)))
    return tuple(x.grad.numpy() for x in (q, k, v))


def assert_grads_close(actual, expected, dtype, rtol=None):
    """Each gradient within ``rtol`` of the reference, relative to the reference's largest entry."""
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    for name, a, e in zip(("dq", "dk", "dv"), actual, expected, strict=True):
        assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        assert np.all(np.isfinite(a)), f"{name}: non-finite values from finite input"
        err = float(np.max(np.abs(a - e), initial=0.0)) / max(1.0, float(np.max(np.abs(e), initial=0.0)))
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g} ({np.dtype(dtype)})"


def forward(q, k, v, causal, scale=None):
    return flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)


@st.composite
def backward_problems(draw, max_n=100):
    """(q, k, v, do, causal, block_q, block_k): random shapes, dtypes, logit sizes and blocks."""
    q, k, v, causal = draw(attention_problems(max_n=max_n, max_d=32))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    do = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(
        lead + (q.shape[-2], v.shape[-1])
    )
    block_q = draw(st.integers(max(1, q.shape[-2] // 20), 70))
    block_k = draw(st.integers(max(1, k.shape[-2] // 20), 70))
    return q, k, v, do.astype(q.dtype), causal, block_q, block_k


# --- NumPy: Algorithm 4 and Algorithm 3 against torch autograd ----------------------------------
@given(backward_problems())
def test_flash_backward_equals_torch_autograd(problem):
    q, k, v, do, causal, block_q, block_k = problem
    o, lse = forward(q, k, v, causal)
    grads = flash_attention_backward(q, k, v, o, lse, do, block_q=block_q, block_k=block_k, causal=causal)
    assert all(g.dtype == q.dtype for g in grads)
    assert_grads_close(grads, torch_gradients(q, k, v, do, causal), q.dtype)


@given(backward_problems(max_n=60))
def test_standard_backward_equals_torch_autograd(problem):
    q, k, v, do, causal, _, _ = problem
    grads = naive_attention_backward(q, k, v, do, causal=causal)
    assert_grads_close(grads, torch_gradients(q, k, v, do, causal), q.dtype)


@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_block_sizes_do_not_change_the_gradients(n_q, n_k, block_q, block_k, causal):
    rng = np.random.default_rng(n_q * 31 + n_k)
    q, k, v, do = (rng.standard_normal((2, n, 5)) for n in (n_q, n_k, n_k, n_q))
    o, lse = forward(q, k, v, causal, scale=0.7)
    one_tile = flash_attention_backward(
        q, k, v, o, lse, do, block_q=n_q, block_k=n_k, causal=causal, scale=0.7
    )
    tiled = flash_attention_backward(
        q, k, v, o, lse, do, block_q=block_q, block_k=block_k, causal=causal, scale=0.7
    )
    for a, b in zip(tiled, one_tile, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_finite_differences_on_a_tiny_case(causal):
    """Central differences of L = sum(O * W) in every entry of q, k, v agree with the gradients."""
    rng = np.random.default_rng(7)
    q, k, v, w = rng.standard_normal((3, 2)), rng.standard_normal((4, 2)), rng.standard_normal((4, 3)), None
    w = rng.standard_normal((3, 3))
    o, lse = forward(q, k, v, causal)
    grads = flash_attention_backward(q, k, v, o, lse, w, block_q=2, block_k=3, causal=causal)
    h = 1e-6
    inputs = [q, k, v]
    for x, g in zip(inputs, grads, strict=True):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + h
            up = np.sum(naive_attention(*inputs, causal=causal) * w)
            x[idx] = old - h
            down = np.sum(naive_attention(*inputs, causal=causal) * w)
            x[idx] = old
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


def test_fully_masked_rows_get_zero_gradient():
    """Causal with N_q > N_k: the first N_q - N_k queries see no key (o = 0, lse = -inf)."""
    rng = np.random.default_rng(3)
    q, k, v, do = rng.standard_normal((9, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), None
    do = rng.standard_normal((9, 4))
    o, lse = forward(q, k, v, True)
    assert np.all(np.isneginf(lse[:4]))
    dq, dk, dv = flash_attention_backward(q, k, v, o, lse, do, block_q=2, block_k=2, causal=True)
    assert np.all(dq[:4] == 0) and np.all(np.isfinite(dq))
    assert_grads_close((dq, dk, dv), torch_gradients(q, k, v, do, True), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite_and_exact(dtype):
    rng = np.random.default_rng(1)
    q, k, v, do = (rng.standard_normal((2, 40, 8)) for _ in range(4))
    q = q * (1e4 / np.max(np.abs(q @ np.swapaxes(k, -1, -2) / math.sqrt(8))))  # largest logit: 1e4
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    for causal in (False, True):
        o, lse = forward(q, k, v, causal)
        grads = flash_attention_backward(q, k, v, o, lse, do, block_q=7, block_k=9, causal=causal)
        # Logits of 1e4 in float32 carry absolute errors ~1e-3 in S - lse: compare in float64 only.
        if dtype == np.float64:
            assert_grads_close(grads, torch_gradients(q, k, v, do, causal), dtype, rtol=1e-8)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_broadcast_inputs_get_summed_gradients():
    rng = np.random.default_rng(5)
    q, k, v = (
        rng.standard_normal((2, 1, 6, 4)),
        rng.standard_normal((1, 3, 7, 4)),
        rng.standard_normal((7, 4)),
    )
    do = rng.standard_normal((2, 3, 6, 4))
    o, lse = forward(q, k, v, False)
    grads = flash_attention_backward(q, k, v, o, lse, do, block_q=4, block_k=3)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert_grads_close(grads, torch_gradients(q, k, v, do, False), np.float64)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"block_q": 0}, ValueError, "block_q"),
        ({"block_k": 2.5}, TypeError, "block_k"),
        ({"o": np.zeros((5, 4))}, ValueError, "o must have shape"),
        ({"lse": np.zeros((6, 1))}, ValueError, "lse must have shape"),
        ({"do": np.zeros((6, 3))}, ValueError, "do must have shape"),
        ({"do": np.zeros((6, 4), dtype=int)}, TypeError, "do must be a floating-point"),
        ({"scale": float("nan")}, ValueError, "scale"),
    ],
)
def test_bad_arguments_name_themselves(change, error, match):
    rng = np.random.default_rng(0)
    args = {
        "q": rng.standard_normal((6, 4)),
        "k": rng.standard_normal((5, 4)),
        "v": rng.standard_normal((5, 4)),
    }
    args["o"], args["lse"] = forward(args["q"], args["k"], args["v"], False)
    args["do"] = np.ones((6, 4))
    args.update(change)
    options = {name: args.pop(name) for name in ("block_q", "block_k", "scale") if name in args}
    with pytest.raises(error, match=match):
        flash_attention_backward(**args, **options)


# --- counted traffic against the closed forms --------------------------------------------------
@given(attention_problems(max_n=90), st.integers(3, 60), st.integers(3, 60))
def test_counted_backward_traffic_equals_closed_form(problem, block_q, block_k):
    q, k, v, causal = problem
    n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    batch = math.prod(lead)
    o, lse = forward(q, k, v, causal)
    do = np.ones_like(o)
    memory = MemoryModel()
    flash_attention_backward(
        q, k, v, o, lse, do, block_q=block_q, block_k=block_k, causal=causal, memory=memory
    )
    expected = traffic.fa2_backward(
        n_q, n_k, d, d_v, block_q=block_q, block_k=block_k, causal=causal, batch=batch
    )
    assert memory.traffic() == expected
    assert memory.hbm_bytes == expected.elements * q.dtype.itemsize
    bound = (
        batch
        * q.dtype.itemsize
        * traffic.sram_elements(block_q, block_k, d, d_v, n_q=n_q, n_k=n_k, backward=True)
    )
    exact = not causal or n_q <= n_k
    assert memory.sram_peak_bytes == bound if exact else memory.sram_peak_bytes <= bound

    standard = MemoryModel()
    naive_attention_backward(q, k, v, do, causal=causal, memory=standard)
    assert standard.traffic() == traffic.standard_backward(n_q, n_k, d, d_v, batch=batch)


def small_problem(n_q=13, n_k=11, d=5, d_v=3, causal=True):
    """A ragged causal problem (``N_q != N_k``) with its forward's ``o, lse`` and a gradient ``do``."""
    rng = np.random.default_rng(7)
    q, k, v = (
        rng.standard_normal((2, n_q, d)),
        rng.standard_normal((2, n_k, d)),
        rng.standard_normal((2, n_k, d_v)),
    )
    o, lse = forward(q, k, v, causal)
    return q, k, v, o, lse, rng.standard_normal(o.shape)


def test_an_extra_look_at_o_is_observed_though_nothing_declares_it(monkeypatch):
    """A pre-pass that slices all of O once more, with no counter call: the wrappers count it."""
    q, k, v, o, lse, do = small_problem()
    blocks = {"block_q": 4, "block_k": 3, "causal": True}
    closed = traffic.fa2_backward(13, 11, 5, 3, batch=2, **blocks)

    def looks_at_o_again(do, o, **options):
        o[...]  # a plain slice of the HBM tensor O: nothing here calls the counter
        return row_dot(do, o, **options)

    monkeypatch.setattr(backward, "row_dot", looks_at_o_again)
    memory = MemoryModel()
    grads = flash_attention_backward(q, k, v, o, lse, do, memory=memory, **blocks)
    same = flash_attention_backward(q, k, v, o, lse, do, **blocks)
    assert all(np.array_equal(a, b) for a, b in zip(grads, same, strict=True))  # the same arithmetic
    assert memory.traffic().reads["O"] == 2 * closed.reads["O"]  # all of O read twice: counted twice
    assert memory.traffic() != closed


def test_causal_tiles_not_skipped_are_counted_as_the_unmasked_loop(monkeypatch):
    """A variant that visits every tile (masking those above the diagonal to P = 0): same gradients,
    and the observed traffic is the unmasked closed form, not the causal one."""
    q, k, v, o, lse, do = small_problem()
    blocks = {"block_q": 4, "block_k": 3}
    monkeypatch.setattr(backward, "first_row_block", lambda *args: 0)
    memory = MemoryModel()
    grads = flash_attention_backward(q, k, v, o, lse, do, causal=True, memory=memory, **blocks)
    monkeypatch.undo()
    same = flash_attention_backward(q, k, v, o, lse, do, causal=True, **blocks)
    assert all(np.array_equal(a, b) for a, b in zip(grads, same, strict=True))  # P = 0 adds exact zeros
    assert memory.traffic() == traffic.fa2_backward(13, 11, 5, 3, batch=2, causal=False, **blocks)
    assert memory.traffic() != traffic.fa2_backward(13, 11, 5, 3, batch=2, causal=True, **blocks)


def test_flash_backward_moves_less_than_the_standard_backward_as_n_grows():
    """Counted, not modelled: the standard backward moves 7 N^2 matrix entries, Algorithm 4 O(N^2 d / B_c)."""
    ratios = []
    for n in (64, 256, 1024):
        q, k, v, do = (np.ones((n, 16)) for _ in range(4))
        o, lse = forward(q, k, v, False)
        flash, standard = MemoryModel(), MemoryModel()
        flash_attention_backward(q, k, v, o, lse, do, block_q=64, block_k=64, memory=flash)
        naive_attention_backward(q, k, v, do, memory=standard)
        assert standard.traffic().reads["P"] == 2 * n * n and "P" not in flash.traffic().reads
        ratios.append(standard.hbm_bytes / flash.hbm_bytes)
    assert ratios[0] < ratios[1] < ratios[2]


# --- the numba.cuda kernel (simulator here) ------------------------------------------------------
# Small tiles: 32 threads per block instead of 256, so the simulator stays quick; every tile rule holds
# (keys = tk * R, rows = g * tn, min(32, d) divides the threads and their quotient divides rows).
SMALL = {"keys": 8, "rows": 8, "tk": 2, "tn": 1, "g": 8, "unroll": 2}


@pytest.mark.parametrize(
    "n_q, n_k, d, causal, tiles",
    [
        (20, 23, 16, True, SMALL),
        (23, 20, 16, True, SMALL),
        (10, 35, 32, False, SMALL),
        (1, 17, 16, True, SMALL),
        (17, 1, 16, False, SMALL),
        (6, 20, 64, True, SMALL),
        (9, 11, 128, True, SMALL),
        (19, 21, 16, True, {"keys": 8, "rows": 16, "tk": 4, "tn": 2, "g": 8, "unroll": 4}),
    ],
)
def test_kernel_equals_numpy_backward(n_q, n_k, d, causal, tiles):
    """Ragged (N not a multiple of the tiles), N smaller than a tile, N_q != N_k, fully masked rows,
    every head dim; several Q tiles per thread block and several key blocks (causal: Q tiles above
    the diagonal skipped, tiles below it unmasked)."""
    rng = np.random.default_rng(n_q + n_k + d)
    q, do = (rng.standard_normal((1, 2, n_q, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, n_k, d)).astype(np.float32) for _ in range(2))
    o, lse = forward(q, k, v, causal)
    grads = kernel_backward(q, k, v, o, lse, do, causal=causal, tiles=tiles)
    assert all(g.dtype == np.float32 for g in grads)
    wide = [x.astype(np.float64) for x in (q, k, v, o, lse, do)]
    assert_grads_close(grads, flash_attention_backward(*wide, causal=causal), np.float32)


@pytest.mark.parametrize("n_q, n_k, causal", [(19, 13, False), (13, 19, True), (19, 13, True)])
def test_counted_kernel_backward_traffic_equals_the_model(n_q, n_k, causal):
    """Global reads/writes counted from the backward kernel's source (pre-pass included) == chapter 3's
    FA2 closed form for the same tiles, but for one pass: the pre-pass writes dQ = 0 to global memory
    (line 5 of Algorithm 4, which the model counts as an allocation), N_q d more writes of dQ."""
    rng = np.random.default_rng(n_q * n_k)
    q, k, v, do = (rng.standard_normal((2, n, 16)).astype(np.float32) for n in (n_q, n_k, n_k, n_q))
    o, lse = forward(q, k, v, causal)
    counted, grads = kernel_traffic.count_backward_traffic(q, k, v, o, lse, do, causal=causal, tiles=SMALL)
    model = kernel_traffic.model_traffic(counted, n_q, n_k, 16, causal=causal, batch=2)
    zeroing = traffic.Traffic({}, {"dQ": 2 * n_q * 16})
    assert counted.hbm() == model + zeroing
    assert counted.rereads()["K"] == counted.rereads()["V"] == 1.0  # K_j, V_j: loaded once, kept on chip
    wide = [x.astype(np.float64) for x in (q, k, v, o, lse, do)]
    assert_grads_close(grads, flash_attention_backward(*wide, causal=causal), np.float32)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
def test_default_backward_tiles_obey_the_tile_rules(d):
    """The GPU's tiles (256 threads: too slow to simulate here, run by the GPU tests) pass the checks."""
    spec = make_kernel("backward", d, True)
    assert spec.block == (spec.tile["keys"] // spec.tile["tk"] * spec.tile["g"],)
    assert spec.launch_bounds == (spec.block[0], spec.tile["blocks"])


def test_backward_tiles_are_checked_by_name():
    q = np.ones((4, 16), np.float32)
    with pytest.raises(ValueError, match="rows=8 must equal g\\*tn=16"):
        kernel_backward(q, q, q, q, np.zeros(4), q, tiles={"keys": 8, "rows": 8, "tk": 2, "tn": 2, "g": 8})
    with pytest.raises(ValueError, match="dQ step needs"):
        kernel_backward(q, q, q, q, np.zeros(4), q, tiles={"keys": 4, "rows": 4, "tk": 2, "tn": 1, "g": 4})


@pytest.mark.parametrize(
    "shapes, match",
    [(((8, 24), (8, 24), (8, 24)), "d=24 is not supported"), (((8, 16), (8, 16), (8, 32)), "d_v=32")],
)
def test_kernel_rejects_unsupported_head_dims(shapes, match):
    q, k, v = (np.ones(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        kernel_backward(q, k, v, np.ones((8, shapes[2][1])), np.zeros(8), np.ones((8, shapes[2][1])))


@requires_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_on_gpu_equals_float64_autograd(causal):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 1000, 64, device="cuda", generator=gen) for _ in range(4))
    q64, k64, v64 = (x.double().cpu().requires_grad_() for x in (q, k, v))
    o64 = torch_attention(q64, k64, v64, causal)
    o64.backward(do.double().cpu())
    s = q64.detach() @ k64.detach().transpose(-1, -2) / 8.0
    if causal:
        s = s.masked_fill(~torch.from_numpy(causal_mask(1000, 1000)), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    grads = kernel_backward(q, k, v, o64.detach().float().cuda(), lse.float().cuda(), do, causal=causal)
    assert all(g.is_cuda and g.dtype == torch.float32 for g in grads)
    expected = [x.grad.numpy() for x in (q64, k64, v64)]
    assert_grads_close([g.cpu().numpy() for g in grads], expected, np.float32)


# --- the chapter-5 exercise: one (query block, key block) pair -----------------------------------
def test_block_pair_exercise_accepts_the_solution_and_names_each_mistake():
    from flashlab.check import Mistake, check
    from flashlab.exercises import backward as ex

    assert check("backward_block_pair", ex.block_pair_backward) is True
    for mistake, words in ex.BLOCK_MISTAKES.items():
        with pytest.raises(Mistake, match=words.split(":")[0][:40]):
            check("backward_block_pair", mistake)

    def transposed(q, k, v, do, lse, delta, scale, mask):
        dq, dk, dv = ex.block_pair_backward(q, k, v, do, lse, delta, scale, mask)
        s = np.where(mask, scale * (q @ k.T), -np.inf)
        p = np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[:, None])
        return dq, dk, p @ v  # P dO written as P V: the wrong shape for dV_j

    with pytest.raises(Mistake, match="dv_j must have shape"):
        check("backward_block_pair", transposed)
