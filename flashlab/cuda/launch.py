"""The one launch path: ``flash_attention`` and ``flash_attention_backward`` by numba.cuda kernels.

Where kernels run was decided when :mod:`flashlab` was imported (``flashlab.device.MODE``):

- ``gpu``: :func:`run` compiles ``spec.source`` (fast math, the spec's signature and launch bounds)
  and launches it. NumPy inputs are copied to the device and the results back; torch CUDA tensors
  are used in place (zero-copy through ``__cuda_array_interface__``) and the results are torch tensors.
- ``sim``: :func:`run` executes the very same source thread by thread in Python
  (:func:`flashlab.cuda._numba.simulate`): exact, but slow, so keep N to a few tiles there.
- counting (:mod:`flashlab.cuda.traffic`): as ``sim``, over arrays that count every access.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache

import numpy as np
from numba import cuda

from flashlab import device
from flashlab.cuda import _numba
from flashlab.cuda.backward import preprocess_spec
from flashlab.cuda.registry import REGISTRY, make_kernel, names
from flashlab.cuda.spec import STATIC_SHARED_LIMIT, KernelSpec
from flashlab.inputs import (
    attention_inputs,
    backward_inputs,
    causal_offset,
    check_kernel_head_dims,
    shape_stand_in,
)

last_run = "no kernel has run yet"  # one line: which kernel ran where, with which launch
_announced = False
FORWARD = names("forward")


def _announce() -> None:
    global _announced
    if not _announced:
        where = "the GPU" if device.MODE == "gpu" else "numba's CUDA simulator (CPU: exact but slow)"
        print(f"flashlab.cuda: kernels run on {where}; flashlab.cuda.launch.last_run says what ran.")
        _announced = True


@cache
def device_function(fn):
    """``fn`` compiled as a CUDA device function (once per function: the spec caches stay valid)."""
    return cuda.jit(device=True)(fn)


def kernel_spec(
    name: str, d: int, causal: bool = False, tiles: Mapping | None = None, **options
) -> KernelSpec:
    """The spec of registry kernel ``name`` for where kernels run now (GPU: helpers as device functions).

    ``options``: the entry's extra keywords (rowwise ``key_step``, register_tiled ``index``)."""
    gpu = device.MODE == "gpu"
    return make_kernel(
        name, d, causal, target="gpu" if gpu else "sim", device=device_function if gpu else None,
        **dict(tiles or {}), **options,
    )  # fmt: skip


@cache
def _compiled(source, signature: str, launch_bounds, shared_bytes: int):
    kern = cuda.jit(signature, fastmath=True, launch_bounds=launch_bounds)(source)
    return _numba.allow_dynamic_shared(kern, shared_bytes, STATIC_SHARED_LIMIT)


def compiled(spec: KernelSpec):
    """``spec.source`` compiled by ``numba.cuda.jit`` for the GPU (fast math: ``exp2`` by the SFU),
    allowed the dynamic shared memory it needs."""
    return _compiled(spec.source, spec.signature, spec.launch_bounds, spec.shared_bytes)


def run(spec: KernelSpec, args: Mapping, *, make=None, stream=0):
    """Launch ``spec`` with ``args`` (its ``params`` by name), on ``stream`` on a GPU (a numba stream;
    default the default stream). ``make`` (simulator only) wraps each shared array, as the traffic
    counter does. Returns the blocks' shared memory when simulated."""
    global last_run
    grid = spec.grid(args)
    values = tuple(args[name] for name in spec.params)
    blocks = None
    if math.prod(grid):
        if spec.target == "gpu":
            compiled(spec)[grid, spec.block, stream, spec.shared_bytes](*values)
        else:
            blocks = _numba.simulate(spec.source, grid, spec.block, values, spec.shared_bytes, make)
    where = "GPU" if spec.target == "gpu" else "simulator"
    tiles = ", ".join(f"{key}={value}" for key, value in spec.tiles)
    last_run = (
        f"{spec.name} ({tiles}{', causal' if spec.causal else ''}) on the {where}: grid {grid} x "
        f"block {spec.block}, {spec.shared_bytes} B dynamic shared memory"
    )
    return blocks


def is_cuda_tensor(x) -> bool:
    """A torch tensor on a CUDA device (the kernels use it in place; kernels must then run on the GPU)."""
    cuda_tensor = hasattr(x, "is_cuda") and hasattr(x, "__cuda_array_interface__") and bool(x.is_cuda)
    if cuda_tensor and device.MODE != "gpu":
        raise RuntimeError(
            "torch CUDA tensors were given but kernels run in the simulator (FLASHLAB_DEVICE=sim); "
            "pass NumPy arrays, or restart without FLASHLAB_DEVICE=sim"
        )
    return cuda_tensor


def _on_device(arrays: dict) -> dict:
    """NumPy arrays as the current mode takes them: device copies on a GPU, themselves in the simulator."""
    if device.MODE != "gpu":
        return arrays
    return {name: cuda.to_device(x) if isinstance(x, np.ndarray) else x for name, x in arrays.items()}


def _to_host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.copy_to_host()


def forward_problem(q, k, v, scale):
    """Validated NumPy inputs: ``(attention inputs, {"q","k","v"}: (BH, N, d) float32 C-contiguous)``."""
    a = attention_inputs(q, k, v, scale)
    d = check_kernel_head_dims(a.q.shape[-1], a.v.shape[-1], a.q.dtype, REGISTRY["register_tiled"].tiles)
    arrays = {
        name: np.ascontiguousarray(x.reshape(-1, x.shape[-2], d), np.float32)
        for name, x in (("q", a.q), ("k", a.k), ("v", a.v))
    }
    return a, arrays


def forward_args(arrays: Mapping, o, lse, scale: float) -> dict:
    """The forward's named launch arguments (:data:`flashlab.cuda.forward.PARAMS`)."""
    n_q, n_k = arrays["q"].shape[1], arrays["k"].shape[1]
    return dict(arrays, o=o, lse=lse, n_q=n_q, n_k=n_k, scale=np.float32(scale), offset=n_k - n_q)


def flash_attention(
    q, k, v, *, kernel="register_tiled", causal=False, scale=None, return_lse=False, tiles=None
):
    """FlashAttention forward by a numba.cuda kernel: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    ``kernel``: a forward kernel of the registry (``"rowwise"``, ``"tiled"``, ``"register_tiled"``,
    see :mod:`flashlab.cuda.forward`); ``tiles``: optional tile sizes for it (dict). Float32 compute,
    d in {16, 32, 64, 128}, d_v = d, any N_q and N_k, leading dims broadcast; ``causal`` is
    bottom-right aligned as in :func:`flashlab.naive_attention`. NumPy in, NumPy out (float16 inputs
    come back float16); torch CUDA tensors (float32) in, torch tensors out, no copies.
    """
    if kernel not in FORWARD:
        raise ValueError(f"kernel must be one of {', '.join(FORWARD)}, got {kernel!r}")
    _announce()
    if is_cuda_tensor(q):
        return _torch_forward(q, k, v, kernel, causal, scale, return_lse, tiles)
    a, arrays = forward_problem(q, k, v, scale)
    lead, (bh, n_q, d) = a.q.shape[:-2], arrays["q"].shape
    spec = kernel_spec(kernel, d, causal, tiles)
    args = _on_device(
        forward_args(arrays, np.empty((bh, n_q, d), np.float32), np.empty((bh, n_q), np.float32), a.scale)
    )
    run(spec, args)
    o = _to_host(args["o"]).reshape(lead + (n_q, d)).astype(a.out_dtype, copy=False)
    lse = _to_host(args["lse"]).reshape(lead + (n_q,))
    return (o, lse) if return_lse else o


def _torch_forward(q, k, v, kernel, causal, scale, return_lse, tiles):
    """Torch CUDA tensors in place: validated through inputs.py on zero-byte stand-ins."""
    import torch

    for name, x in (("k", k), ("v", v)):
        if not is_cuda_tensor(x) or x.device != q.device:
            raise TypeError(f"{name} must be a CUDA tensor on {q.device} like q, got {type(x).__name__}")
    a = attention_inputs(*(shape_stand_in(name, x) for name, x in (("q", q), ("k", k), ("v", v))), scale)
    d = check_kernel_head_dims(a.q.shape[-1], a.v.shape[-1], np.float32, REGISTRY[kernel].tiles)
    lead, n_q = a.q.shape[:-2], a.q.shape[-2]
    q3, k3, v3 = (
        x.expand(lead + tuple(x.shape[-2:])).reshape(-1, x.shape[-2], d).contiguous() for x in (q, k, v)
    )
    o = torch.empty(q3.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q.device)
    views = {name: cuda.as_cuda_array(x) for name, x in (("q", q3), ("k", k3), ("v", v3))}
    run(
        kernel_spec(kernel, d, causal, tiles),
        forward_args(views, *map(cuda.as_cuda_array, (o, lse)), a.scale),
    )
    o, lse = o.reshape(lead + (n_q, d)), lse.reshape(lead + (n_q,))
    return (o, lse) if return_lse else o


def backward_args(arrays: Mapping, delta, dq, dk, dv, scale: float) -> dict:
    """The backward's named launch arguments (pre-pass and kernel, :mod:`flashlab.cuda.backward`)."""
    n_q, n_k = arrays["q"].shape[1], arrays["k"].shape[1]
    extra = {"delta": delta, "dq": dq, "dk": dk, "dv": dv, "scale": np.float32(scale)}
    return dict(arrays, **extra, offset=causal_offset(n_q, n_k))


def run_backward(spec: KernelSpec, args: Mapping, *, make=None) -> list:
    """The pre-pass (``D = rowsum(dO * O)``, ``dQ = 0``) and then the backward kernel ``spec``;
    returns the simulated blocks' shared memory (pre-pass first), empty on a GPU."""
    first = run(preprocess_spec(spec.d, spec.target), args, make=make) or []
    return first + (run(spec, args, make=make) or [])


def backward_problem(q, k, v, o, lse, do, scale):
    """Validated NumPy inputs: ``(attention inputs, {"q","k","v","o","lse","do"}: (B, ...) float32)``."""
    a, o, lse, do = backward_inputs(q, k, v, o, lse, do, scale)
    check_kernel_head_dims(a.q.shape[-1], a.v.shape[-1], np.float32, REGISTRY["backward"].tiles)
    n_b, lead = math.prod(a.q.shape[:-2]), a.q.ndim - 2
    arrays = {
        name: np.ascontiguousarray(x, np.float32).reshape((n_b,) + x.shape[lead:])
        for name, x in (("q", a.q), ("k", a.k), ("v", a.v), ("o", o), ("lse", lse), ("do", do))
    }
    return a, arrays


def flash_attention_backward(q, k, v, o, lse, do, *, causal=False, scale=None, tiles=None):
    """Gradients ``(dq, dk, dv)`` of attention by the numba.cuda backward kernel, float32.

    Shapes: ``q, o, do (..., N_q, d)``, ``k, v (..., N_k, d)``, ``lse (..., N_q)`` (as the forward returns
    with ``return_lse=True``), ``d`` in ``{16, 32, 64, 128}``, any ``N_q, N_k``; bottom-right
    ``causal``; ``scale`` defaults to ``1/sqrt(d)``; ``tiles``: optional tiles of the ``"backward"``
    kernel (:func:`flashlab.cuda.backward.backward_spec`).

    - NumPy arrays (any float dtype, leading dims broadcast as in the forward): computed in float32,
      gradients returned as NumPy float32, summed back to the shapes of ``q, k, v``.
    - torch CUDA tensors (float32, equal leading dims, on a GPU only): nothing is copied; the
      outputs are torch tensors allocated by torch, so ``torch.cuda.max_memory_allocated`` sees them.
    """
    from flashlab.backward import gradients_to_inputs

    _announce()
    if is_cuda_tensor(q):
        return _torch_backward(q, k, v, o, lse, do, causal, scale, tiles)
    a, arrays = backward_problem(q, k, v, o, lse, do, scale)
    spec = kernel_spec("backward", a.q.shape[-1], causal, tiles)
    outs = {"delta": arrays["lse"], "dq": arrays["q"], "dk": arrays["k"], "dv": arrays["v"]}
    outs = {name: np.empty(x.shape, np.float32) for name, x in outs.items()}
    args = _on_device(backward_args(arrays, **outs, scale=a.scale))
    run_backward(spec, args)
    grads = tuple(
        _to_host(args[g]).reshape(x.shape) for g, x in zip(("dq", "dk", "dv"), (a.q, a.k, a.v), strict=True)
    )
    return gradients_to_inputs(a._replace(out_dtype=np.dtype(np.float32)), q, k, v, grads)


def _torch_backward(q, k, v, o, lse, do, causal, scale, tiles):
    """Torch CUDA tensors in place: validated through inputs.py on zero-byte stand-ins."""
    import torch

    tensors = {"q": q, "k": k, "v": v, "o": o, "lse": lse, "do": do}
    for name, x in tensors.items():
        if not is_cuda_tensor(x) or x.device != q.device:
            raise TypeError(f"{name} must be a CUDA tensor on {q.device} like q, got {type(x).__name__}")
    lead = tuple(q.shape[:-2])
    for name in ("k", "v"):
        if tuple(tensors[name].shape[:-2]) != lead:
            raise ValueError(
                f"{name} must have q's leading dims {lead} for the kernel on torch tensors (no "
                f"broadcasting: its gradient would need summing), got {tuple(tensors[name].shape)}"
            )
    a, *_ = backward_inputs(*(shape_stand_in(name, x) for name, x in tensors.items()), scale)
    d = check_kernel_head_dims(a.q.shape[-1], a.v.shape[-1], np.float32, REGISTRY["backward"].tiles)
    n_b = math.prod(lead)
    ins = {name: x.detach().contiguous().reshape((n_b, *x.shape[len(lead) :])) for name, x in tensors.items()}
    outs = {"delta": ins["lse"], "dq": ins["q"], "dk": ins["k"], "dv": ins["v"]}
    outs = {name: torch.empty_like(x) for name, x in outs.items()}
    views = {name: cuda.as_cuda_array(x) for name, x in ins.items()}
    args = backward_args(views, **{name: cuda.as_cuda_array(x) for name, x in outs.items()}, scale=a.scale)
    run_backward(kernel_spec("backward", d, causal, tiles), args)
    return tuple(outs[g].reshape(x.shape) for g, x in zip(("dq", "dk", "dv"), (q, k, v), strict=True))
