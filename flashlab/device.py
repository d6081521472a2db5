"""Where numba.cuda kernels run: a real GPU or numba's CUDA simulator.

The decision is made once, when :mod:`flashlab` is imported, and *before* numba is imported:
numba reads ``NUMBA_ENABLE_CUDASIM`` only at its own import. ``FLASHLAB_DEVICE`` chooses:

- ``auto`` (default): a GPU if the CUDA driver reports one, otherwise the simulator;
- ``gpu``: a GPU, or a ``RuntimeError`` saying why there is none;
- ``sim``: the simulator, even where a GPU exists (slow, but it runs the same kernel source
  in Python, so you can print from a kernel and step through it).

``NUMBA_ENABLE_CUDASIM=1`` set by hand before import also selects the simulator.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib import metadata

_MODES = ("auto", "gpu", "sim")


def _cuda_gpus() -> list[str]:
    """Names of the GPUs the CUDA driver sees, asked through ``libcuda`` without importing numba."""
    names = {"Linux": "libcuda.so.1", "Windows": "nvcuda.dll"}
    try:
        lib = ctypes.CDLL(names.get(platform.system(), "libcuda.so.1"))
    except OSError:
        return []
    if lib.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    gpus = []
    for ordinal in range(count.value):
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(dev), ordinal) == 0 and lib.cuDeviceGetName(buf, 256, dev) == 0:
            gpus.append(buf.value.decode())
    return gpus


def select(requested: str | None = None) -> str:
    """Decide ``"gpu"`` or ``"sim"`` and set ``NUMBA_ENABLE_CUDASIM`` accordingly.

    ``requested`` defaults to the ``FLASHLAB_DEVICE`` environment variable (``auto`` if unset).
    Must run before numba is first imported; :mod:`flashlab` calls it at import.
    """
    requested = (requested or os.environ.get("FLASHLAB_DEVICE", "auto")).strip().lower()
    if requested not in _MODES:
        raise ValueError(
            f"FLASHLAB_DEVICE={requested!r} is not understood; expected one of {', '.join(_MODES)}"
        )
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and requested == "auto":
        mode = "sim"
    elif requested == "sim":
        mode = "sim"
    else:
        gpus = _cuda_gpus()
        if requested == "gpu" and not gpus:
            raise RuntimeError(
                "FLASHLAB_DEVICE=gpu but the CUDA driver reports no GPU (libcuda missing or "
                "cuInit failed). Unset FLASHLAB_DEVICE to fall back to the simulator."
            )
        mode = "gpu" if gpus else "sim"
    if "numba" in sys.modules:
        already = "sim" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else "gpu"
        if already != mode:
            raise RuntimeError(
                f"numba was imported before flashlab, in {already!r} mode, so flashlab cannot switch "
                f"it to {mode!r}. Restart the kernel and import flashlab first."
            )
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if mode == "sim" else "0"
    global MODE
    MODE = mode
    return mode


MODE: str = "sim"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, str]:
    """What this kernel runs on: device (GPU name or ``"simulator"``) and library versions.

    Meant for a notebook's first cell; ``print(flashlab.device.describe())`` gives one line.
    """
    info = {"mode": MODE}
    if MODE == "gpu":
        from numba import cuda

        dev = cuda.get_current_device()
        info["device"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        info["compute capability"] = ".".join(map(str, dev.compute_capability))
        try:
            info["driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
        except Exception:  # older numba-cuda keeps the driver version elsewhere
            info["driver"] = "unknown"
    else:
        info["device"] = "simulator (numba CUDA simulator on the CPU: exact, but slow)"
    info["python"] = platform.python_version()
    for dist in ("numpy", "numba", "numba-cuda", "torch"):
        info[dist] = _version(dist)
    return info


def describe() -> str:
    """One line naming the device and versions, e.g. for ``print`` in a notebook's first cell."""
    info = report()
    rest = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("mode", "device"))
    return f"flashlab runs kernels on: {info['device']} | {rest}"
