"""The differentiable op: saved tensors, gradcheck, float32 gradients against SDPA, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flashlab  # noqa: F401  (before numba)
from flashlab.autograd import flash_attention
from flashlab.inputs import causal_mask
from flashlab.tolerance import attention_backward_bound, attention_bound, check_close
from tests.conftest import requires_gpu


def sdpa(q, k, v, causal, scale=None):
    """torch's SDPA with the course's bottom-right causal mask; a row that sees no key gives 0."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if not causal:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    hidden = max(n_q - n_k, 0)  # the first rows see no key (SDPA would give nan there)
    mask = torch.from_numpy(causal_mask(n_q - hidden, n_k)).to(q.device)
    seen = torch.nn.functional.scaled_dot_product_attention(
        q[..., hidden:, :], k, v, attn_mask=mask, scale=scale
    )
    return torch.cat([seen.new_zeros(seen.shape[:-2] + (hidden, v.shape[-1])), seen], dim=-2)


def gradients(attention, q, k, v, do, **options):
    """``(o, dq, dk, dv)`` of ``attention`` at ``q, k, v`` for the output gradient ``do``."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = attention(*leaves, **options)
    o.backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def check_against_float64_sdpa(q, k, v, do, causal, scale=None, **options):
    """flashlab's float32 o, dq, dk, dv within the derived bounds of float64 SDPA, and within the sum of
    both float32 computations' bounds of float32 SDPA (each sits within its bound of the exact value)."""
    ours = gradients(flash_attention, q, k, v, do, causal=causal, scale=scale, **options)
    ref = gradients(sdpa, *(x.double() for x in (q, k, v, do)), causal=causal, scale=scale)
    theirs = gradients(sdpa, q, k, v, do, causal=causal, scale=scale)
    arrays = [x.detach().cpu().numpy() for x in (q, k, v, do)]
    bounds = {"o": attention_bound(*arrays[:3], scale=scale)}
    bounds.update(attention_backward_bound(*arrays, causal=causal, scale=scale))
    for (name, bound), a, e, t in zip(bounds.items(), ours, ref, theirs, strict=True):
        assert a.dtype == q.dtype and a.device == q.device, f"{name}: {a.dtype} on {a.device}"
        check_close(a.cpu(), e.cpu(), bound, name)
        check_close(
            a.cpu(), t.cpu(), type(bound)(2 * bound.atol, f"2 x ({bound.formula})"), f"{name} vs SDPA"
        )


@st.composite
def problems(draw, max_n=70, max_d=24):
    """(q, k, v, do, causal, scale, block_q, block_k), float32: ragged N_q != N_k, blocks not dividing N."""
    n_q, n_k = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    d_v = draw(st.sampled_from([d, max(1, d // 2), d + 3]))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    spread = draw(st.sampled_from([0.1, 1.0, 5.0]))  # logits up to a few tens
    q = torch.randn(lead + (n_q, d), generator=gen) * spread
    k, v = torch.randn(lead + (n_k, d), generator=gen), torch.randn(lead + (n_k, d_v), generator=gen)
    do = torch.randn(lead + (n_q, d_v), generator=gen)
    scale = draw(st.sampled_from([None, 0.3]))
    return q, k, v, do, draw(st.booleans()), scale, draw(st.integers(1, 40)), draw(st.integers(1, 40))


@given(problems())
def test_float32_gradients_match_sdpa_on_random_shapes(problem):
    q, k, v, do, causal, scale, block_q, block_k = problem
    check_against_float64_sdpa(q, k, v, do, causal, scale, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("n_q, n_k, causal", [(5, 7, False), (6, 6, True), (4, 9, True), (8, 3, True)])
def test_gradcheck_in_float64(n_q, n_k, causal):
    """Finite differences of the float64 CPU path (8 x 3 causal: the first five rows see no key)."""
    gen = torch.Generator().manual_seed(n_q * n_k)
    q, k = (torch.randn(2, n, 3, dtype=torch.float64, generator=gen) for n in (n_q, n_k))
    v = torch.randn(2, n_k, 4, dtype=torch.float64, generator=gen)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda *a: flash_attention(*a, causal=causal, scale=0.8, block_q=3, block_k=2), inputs
    )


def test_saves_q_k_v_o_and_lse_never_p():
    q = torch.randn(2, 3, 40, 8, requires_grad=True)
    k, v = (torch.randn(2, 3, 50, 8, requires_grad=True) for _ in range(2))
    o = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    saved = o.grad_fn.saved_tensors
    shapes = [(2, 3, 40, 8), (2, 3, 50, 8), (2, 3, 50, 8), (2, 3, 40, 8), (2, 3, 40)]
    assert [tuple(t.shape) for t in saved] == shapes, "saved: q, k, v, o and lse (..., N_q), nothing else"
    for t, x in zip(saved[:4], (q, k, v, o), strict=True):
        assert torch.equal(t, x)
    s = q.detach() @ k.detach().transpose(-1, -2) / 8**0.5
    s = s.masked_fill(~torch.from_numpy(causal_mask(40, 50)), -torch.inf)
    q64, k64, v64 = (x.detach().numpy() for x in (q, k, v))
    check_close(
        saved[4], torch.logsumexp(s.double(), -1), attention_bound(q64, k64, v64, quantity="lse"), "lse"
    )


def test_kernels_in_the_simulator_match_sdpa():
    """``kernels=True`` on CPU tensors: the numba forward and backward kernels, in the simulator (tiny)."""
    gen = torch.Generator().manual_seed(4)
    q, do = (torch.randn(1, 9, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 13, 16, generator=gen) for _ in range(2))
    check_against_float64_sdpa(q, k, v, do, causal=True, kernels=True)


@requires_gpu
@pytest.mark.parametrize("n_q, n_k, causal", [(1000, 1000, True), (300, 1111, True), (777, 513, False)])
def test_kernels_on_cuda_tensors_match_sdpa(n_q, n_k, causal):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(2, 4, n_q, 64, device="cuda", generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 4, n_k, 64, device="cuda", generator=gen) for _ in range(2))
    check_against_float64_sdpa(q, k, v, do, causal)


F16, F64 = torch.float16, torch.float64


def inputs(dtype=torch.float32, **change):
    """Good arguments (N_q = 6, N_k = 5, d = 4) in ``dtype``, with ``change`` applied."""
    return {"q": torch.ones(6, 4, dtype=dtype), "k": torch.ones(5, 4, dtype=dtype),
            "v": torch.ones(5, 4, dtype=dtype), **change}  # fmt: skip


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"q": torch.ones(4, 6).t()}, ValueError, "q is not contiguous"),
        ({"k": torch.ones(5, 4, dtype=F16)}, ValueError, "k is torch.float16 but q is torch.float32"),
        (inputs(F16), ValueError, "float32 or torch.float64"),
        ({"v": torch.ones(5, 4, device="meta")}, ValueError, "v is on meta but q is on cpu"),
        ({"v": torch.ones(4, 4)}, ValueError, "do not fit"),
        ({"k": torch.ones(2, 5, 4)}, ValueError, "same leading dims"),
        ({"q": np.ones((6, 4), np.float32)}, TypeError, "q must be a torch.Tensor"),
        (inputs(F64, kernels=True), ValueError, "numba kernels compute in torch.float32"),
    ],
)  # fmt: skip
def test_bad_input_is_named(change, error, match):
    args = inputs(**change)
    with pytest.raises(error, match=match):
        flash_attention(**args)
