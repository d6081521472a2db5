"""Launching the chapter-4 kernels: ``flash_attention`` on a GPU or in numba's CUDA simulator.

Where the kernels run was decided when :mod:`flashlab` was imported (``flashlab.device.MODE``).
On a GPU, NumPy inputs are copied to the device and the result back; torch CUDA tensors are used
in place (zero-copy through ``__cuda_array_interface__``) and the result is a torch tensor.
In the simulator the very same kernel source runs thread by thread in Python: exact, but slow,
so keep N to a few tiles there.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda

from flashlab import device
from flashlab.inputs import attention_inputs
from flashlab.kernels import (
    HEAD_DIMS,
    KERNELS,
    STATIC_SHARED_LIMIT,
    KernelSpec,
    make_kernel,
    rowwise_key_step,
)

last_run = "no kernel has run yet"  # one line: which kernel ran where, with which launch
_announced = False

# the signature every kernel is compiled for (see flashlab.kernels)
SIGNATURE = (
    "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "float32[:, ::1], int64, int64, float32, int64)"
)


def _announce() -> None:
    global _announced
    if not _announced:
        where = "the GPU" if device.MODE == "gpu" else "numba's CUDA simulator (CPU: exact but slow)"
        print(f"flashlab.gpu: kernels run on {where}; flashlab.gpu.last_run says what ran.")
        _announced = True


@cache
def _device_key_step():
    return cuda.jit(device=True)(rowwise_key_step)


def kernel_spec(name: str, d: int, causal: bool, tiles: dict | None = None) -> KernelSpec:
    """The spec ``flash_attention`` launches (on a GPU, rowwise's inner loop is a device function)."""
    tiles = dict(tiles or {})
    if name == "rowwise" and device.MODE == "gpu":
        tiles["key_step"] = _device_key_step()
    return make_kernel(name, d, causal, **tiles)


@cache
def compiled(spec: KernelSpec):
    """``spec.source`` compiled by ``numba.cuda.jit`` (fast math: ``exp``/``exp2`` by the SFU)."""
    if device.MODE != "gpu":
        return cuda.jit(spec.source)
    return allow_dynamic_shared(cuda.jit(SIGNATURE, fastmath=True)(spec.source), spec.shared_bytes)


def allow_dynamic_shared(kern, nbytes: int):
    """Let the compiled ``kern`` use ``nbytes`` of dynamic shared memory: past 48 KiB a kernel must
    opt in through the CUDA driver (and asks for the largest shared-memory carve-out)."""
    if nbytes > STATIC_SHARED_LIMIT:
        from numba.cuda.cudadrv.driver import binding, driver

        func = next(iter(kern.overloads.values()))._codelibrary.get_cufunc()
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, nbytes, func.handle, func.device.id)
        func.set_shared_memory_carveout(100)
    return kern


def launch(spec: KernelSpec, q, k, v, o, lse, scale: float) -> None:
    """Run ``spec`` on 3-d ``q, k, v (BH, N, d)`` into ``o (BH, N_q, d)``, ``lse (BH, N_q)``.

    Arrays are whatever the mode takes: NumPy arrays (simulator), device arrays or CUDA tensors.
    """
    global last_run
    bh, n_q, d = q.shape
    n_k = k.shape[1]
    grid = (math.ceil(n_q / spec.rows), bh)
    args = (q, k, v, o, lse, n_q, n_k, np.float32(scale), n_k - n_q)
    if n_q:
        compiled(spec)[grid, spec.block, 0, spec.shared_bytes](*args)
    where = "GPU" if device.MODE == "gpu" else "simulator"
    tiles = ", ".join(f"{key}={value}" for key, value in spec.tiles)
    last_run = (
        f"{spec.name} ({tiles}{', causal' if spec.causal else ''}) on the {where}: grid {grid} x "
        f"block {spec.block}, {spec.shared_bytes} B dynamic shared memory"
    )


def _is_torch_cuda(x) -> bool:
    return hasattr(x, "is_cuda") and hasattr(x, "__cuda_array_interface__") and bool(x.is_cuda)


def _stand_in(name: str, x) -> np.ndarray:
    """A zero-byte float32 NumPy stand-in with ``x``'s shape, so inputs.py can validate the shapes."""
    if str(x.dtype) != "torch.float32":
        raise ValueError(f"{name}: the kernels compute in float32, got a {x.dtype} tensor ({name}.float())")
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(x.shape), (0,) * x.dim())


def _check_kernel_dims(q_shape, v_shape, dtype) -> int:
    d = q_shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim d={d} is not supported by the kernels; supported d: {HEAD_DIMS}")
    if v_shape[-1] != d:
        raise ValueError(f"v's head dim must equal q's for the kernels: got d={d}, d_v={v_shape[-1]}")
    if np.dtype(dtype) != np.float32:
        raise ValueError(
            f"the kernels compute in float32; got dtype {np.dtype(dtype)}. Pass float32 (or float16) "
            "arrays, e.g. q.astype(np.float32); flashlab.naive_attention handles float64"
        )
    return d


def flash_attention(
    q, k, v, *, kernel="register_tiled", causal=False, scale=None, return_lse=False, tiles=None
):
    """FlashAttention forward by a numba.cuda kernel: ``o (..., N_q, d)`` (and ``lse (..., N_q)``).

    ``kernel``: ``"rowwise"``, ``"tiled"`` or ``"register_tiled"`` (see :mod:`flashlab.kernels`);
    ``tiles``: optional tile sizes for that kernel (dict). Float32 compute, d in {16, 32, 64, 128},
    d_v = d, any N_q and N_k, leading dims broadcast; ``causal`` is bottom-right aligned as in
    :func:`flashlab.naive_attention`. NumPy in, NumPy out (float16 inputs come back float16);
    torch CUDA tensors (float32) in, torch tensors out, no copies.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    _announce()
    if _is_torch_cuda(q):
        return _torch_flash(q, k, v, kernel, causal, scale, return_lse, tiles)
    a = attention_inputs(q, k, v, scale)
    d = _check_kernel_dims(a.q.shape, a.v.shape, a.q.dtype)
    lead, n_q = a.q.shape[:-2], a.q.shape[-2]
    q3, k3, v3 = (np.ascontiguousarray(x.reshape(-1, x.shape[-2], d)) for x in (a.q, a.k, a.v))
    o = np.empty(q3.shape, np.float32)
    lse = np.empty(q3.shape[:2], np.float32)
    spec = kernel_spec(kernel, d, causal, tiles)
    dev = [cuda.to_device(x) for x in (q3, k3, v3, o, lse)]  # the simulator copies too
    launch(spec, *dev, a.scale)
    o, lse = dev[3].copy_to_host(), dev[4].copy_to_host()
    o = o.reshape(lead + (n_q, d)).astype(a.out_dtype, copy=False)
    lse = lse.reshape(lead + (n_q,))
    return (o, lse) if return_lse else o


def _torch_flash(q, k, v, kernel, causal, scale, return_lse, tiles):
    """Torch CUDA tensors in place: validated through inputs.py on zero-byte stand-ins."""
    import torch

    for name, x in (("k", k), ("v", v)):
        if not _is_torch_cuda(x) or x.device != q.device:
            raise TypeError(f"{name} must be a CUDA tensor on {q.device} like q, got {type(x).__name__}")
    a = attention_inputs(*(_stand_in(name, x) for name, x in (("q", q), ("k", k), ("v", v))), scale)
    d = _check_kernel_dims(a.q.shape, a.v.shape, np.float32)
    lead, n_q = a.q.shape[:-2], a.q.shape[-2]
    q3, k3, v3 = (
        x.expand(lead + tuple(x.shape[-2:])).reshape(-1, x.shape[-2], d).contiguous() for x in (q, k, v)
    )
    o = torch.empty(q3.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q3.shape[:2], dtype=torch.float32, device=q.device)
    spec = kernel_spec(kernel, d, causal, tiles)
    launch(spec, *(cuda.as_cuda_array(x) for x in (q3, k3, v3, o, lse)), a.scale)
    o, lse = o.reshape(lead + (n_q, d)), lse.reshape(lead + (n_q,))
    return (o, lse) if return_lse else o
