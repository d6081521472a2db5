"""The shared error bounds: they hold on random problems in any dtype and reject a real error."""

import numpy as np
import pytest
from hypothesis import given

from flashlab import naive_attention
from flashlab.tolerance import (
    attention_backward_bound,
    attention_bound,
    check_close,
    gamma,
    softmax_bound,
    sum_bound,
    unit_roundoff,
)
from tests.strategies import attention_problems


def test_unit_roundoff_names_numpy_and_torch_dtypes():
    torch = pytest.importorskip("torch")
    assert unit_roundoff(np.float32) == unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff("bfloat16") == unit_roundoff(torch.bfloat16) == 2.0**-8
    with pytest.raises(ValueError, match="dtype"):
        unit_roundoff(np.int32)
    with pytest.raises(ValueError, match="n u >= 1"):
        gamma(10_000, unit_roundoff("bfloat16"))


@given(attention_problems())
def test_bound_holds_for_naive_attention_in_its_dtype(problem):
    q, k, v, causal = problem
    o, lse = naive_attention(q, k, v, causal=causal, return_lse=True)
    o64, lse64 = naive_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=causal, return_lse=True)
    check_close(o, o64, attention_bound(q, k, v), "o")
    check_close(lse, lse64, attention_bound(q, k, v, quantity="lse"), "lse")


def test_check_close_rejects_an_error_above_the_bound_and_non_finite_values():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((20, 8)).astype(np.float32) for _ in range(3))
    o = naive_attention(q, k, v).astype(np.float64)
    bound = attention_bound(q, k, v)
    assert 0 < bound.atol < 1e-3
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_close(o + 2 * bound.atol, o, bound)
    with pytest.raises(AssertionError, match="non-finite"):
        check_close(np.where(o > 0, np.nan, o), o, bound)
    with pytest.raises(AssertionError, match="infinite"):
        check_close(np.full(3, -np.inf), np.zeros(3), bound)


def test_backward_bound_covers_float32_gradients():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    q = (rng.standard_normal((2, 24, 16)) * 3).astype(np.float32)
    k, v = (rng.standard_normal((2, 31, 16)).astype(np.float32) for _ in range(2))
    do = rng.standard_normal((2, 24, 16)).astype(np.float32)

    def grads(dtype):
        t = [torch.tensor(x, dtype=dtype, requires_grad=True) for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=False)
        out.backward(torch.tensor(do, dtype=dtype))
        return [x.grad.numpy() for x in t]

    bounds = attention_backward_bound(q, k, v, do)
    for name, got, want in zip(("dq", "dk", "dv"), grads(torch.float32), grads(torch.float64), strict=True):
        check_close(got, want, bounds[name], name)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sum_and_softmax_bounds_hold_for_every_order(dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 257)) * 20).astype(dtype)
    exact = np.sum(x.astype(np.float64), axis=-1)
    bound = sum_bound(x, dtype)
    for order in (np.arange(257), rng.permutation(257), np.argsort(np.abs(x[0]))):
        got = np.zeros(3, dtype)
        for j in order:  # one rounding per addition, in this order
            got = (got + x[:, j]).astype(dtype)
        check_close(got, exact, bound, "sum")
    p = np.exp(x.astype(np.float64) - x.astype(np.float64).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    xs = x - x.max(-1, keepdims=True)
    ours = np.exp(xs) / np.exp(xs).sum(-1, keepdims=True, dtype=dtype)
    check_close(ours, p, softmax_bound(x), "softmax")
    off = p.copy()
    off[0, 0] += 2 * softmax_bound(x).atol
    with pytest.raises(AssertionError, match="exceeds the bound"):  # the bound is not vacuous
        check_close(off, p, softmax_bound(x), "softmax")
