"""Every use of numba-cuda's private (undocumented) API in flashlab, in this one module.

numba-cuda gives no public way to (1) let a compiled kernel use more than 48 KiB of dynamic shared
memory, or (2) run a kernel's source in its CUDA simulator over arrays we choose (counting arrays)
and with a shared-memory allocator we choose, one thread block at a time. flashlab needs both, so
it reaches into numba-cuda here and nowhere else; ``pyproject.toml`` pins numba-cuda to the versions
this was tested with, and ``tests/test_kernels.py`` checks every name in :data:`PRIVATE_APIS`, so an
upgrade that moves one fails by name instead of deep inside a kernel launch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

# (module, name, what flashlab uses it for). Simulator names are imported; GPU-only names are looked
# up in numba-cuda's source without importing it (importing the GPU modules in simulator mode fails).
PRIVATE_APIS = (
    ("numba.cuda.simulator.kernel", "BlockManager", "run one thread block of a kernel in the simulator"),
    ("numba.cuda.simulator.kernel", "_push_kernel_context", "make cuda.* inside the kernel the fake module"),
    ("numba.cuda.simulator.kernelapi", "FakeCUDAModule", "the simulator's per-block cuda module"),
    ("numba.cuda.simulator.kernelapi", "swapped_cuda_module", "swap cuda.* in the kernel's globals"),
    ("numba.cuda.simulator.kernelapi", "FakeCUDAModule._shared", "replace cuda.shared (counting, locked)"),
    ("numba.cuda.simulator.kernelapi", "FakeCUDAModule._atomic", "replace cuda.atomic (one read per add)"),
    ("numba.cuda.errors", "normalize_kernel_dimensions", "grid and block as 3-tuples"),
    ("numba.cuda.np.numpy_support", "as_dtype", "numba dtype -> NumPy dtype for shared arrays"),
    ("numba_cuda.numba.cuda.dispatcher", "_Kernel.library", "the compiled kernel's code library"),
    ("numba_cuda.numba.cuda.codegen", "get_cufunc", "the CUDA function handle of a compiled kernel"),
    ("numba_cuda.numba.cuda.cudadrv.driver", "set_shared_memory_carveout", "largest shared carve-out"),
    ("numba_cuda.numba.cuda.cudadrv.driver", "cuKernelSetAttribute", "allow > 48 KiB dynamic shared"),
)


def missing_private_apis() -> list[str]:
    """The entries of :data:`PRIVATE_APIS` this numba-cuda lacks, as ``"module.name (use)"`` lines."""
    missing = []
    for module, name, use in PRIVATE_APIS:
        if module.startswith("numba_cuda."):  # GPU side: read the source, do not import it
            spec = importlib.util.find_spec(module.rsplit(".", 1)[0])
            path = None if spec is None else Path(spec.origin).parent / (module.rsplit(".", 1)[1] + ".py")
            attr = name.rsplit(".", 1)[-1]
            text = path.read_text() if path is not None and path.exists() else ""
            if f"def {attr}" not in text and f"{attr}(" not in text:
                missing.append(f"{module}.{name} ({use})")
            continue
        try:
            obj = importlib.import_module(module)
            for part in name.split("."):
                if isinstance(obj, type) and not hasattr(obj, part):  # an attribute set by the constructor
                    if f"self.{part} =" not in Path(sys.modules[obj.__module__].__file__).read_text():
                        raise AttributeError(part)
                    continue
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name} ({use})")
    return missing


def allow_dynamic_shared(kern, nbytes: int, static_limit: int):
    """Let the compiled ``kern`` use ``nbytes`` of dynamic shared memory: past ``static_limit`` (48 KiB)
    a kernel must opt in through the CUDA driver; it also asks for the largest shared-memory carve-out."""
    if nbytes > static_limit:
        from numba.cuda.cudadrv.driver import binding, driver

        func = next(iter(kern.overloads.values())).library.get_cufunc()
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, nbytes, func.handle, func.device.id)
        func.set_shared_memory_carveout(100)
    return kern


class SharedMemory:
    """``cuda.shared`` for one simulated thread block, safe under the simulator's threads.

    numba's own simulator identifies a static array by the source line that declares it, but
    checks and inserts without a lock: two threads of a block that reach the line at once can get
    two different arrays, each partly written (an uninitialised, sometimes non-finite, tile). Here
    the check and insert hold a lock. Arrays start as NaN, so a kernel that reads shared memory it
    never wrote shows it. ``make(array)`` may wrap each new array (the traffic counter counts them).
    """

    def __init__(self, dynamic_bytes: int, make: Callable[[np.ndarray], object] = lambda a: a):
        self._dynamic_bytes = dynamic_bytes
        self._make = make
        self.arrays: dict = {}
        self._lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        from numba.cuda.np import numpy_support

        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        with self._lock:
            if key not in self.arrays:
                dtype = numpy_support.as_dtype(dtype)
                if shape == 0:  # the dynamic array: all of the launch's dynamic shared memory
                    shape = self._dynamic_bytes // dtype.itemsize
                fill = np.nan if dtype.kind == "f" else np.iinfo(dtype).max  # never written: shows
                self.arrays[key] = self._make(np.full(shape, fill, dtype))
            return self.arrays[key]


class Atomic:
    """``cuda.atomic`` for the simulator: ``add`` under one lock, reading the old value once (numba's
    reads it twice, which a counting array would count as two reads of global memory)."""

    _lock = threading.Lock()

    def add(self, array, index, value):
        with self._lock:
            old = array[index]
            array[index] = old + value
        return old


def simulate(source, grid: tuple, block: tuple, args: tuple, dynamic_shared_bytes: int = 0, make=None):
    """Run kernel ``source`` (a Python function) in numba's simulator, one block after another.

    Unlike ``cuda.jit(...)[grid, block]`` in simulator mode, this works on a GPU machine too, passes
    the arguments as they are (NumPy arrays, or counting arrays that stay counting), and gives each
    block a :class:`SharedMemory` (and :class:`Atomic`). Returns, per block, its ``SharedMemory``.
    """
    from numba.cuda.errors import normalize_kernel_dimensions
    from numba.cuda.simulator.kernel import BlockManager, _push_kernel_context
    from numba.cuda.simulator.kernelapi import FakeCUDAModule, swapped_cuda_module

    grid, block = normalize_kernel_dimensions(grid, block)
    blocks = []
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)  # simulated threads meet at every syncthreads: switch often
    try:
        for grid_point in np.ndindex(*grid):
            fake = FakeCUDAModule(grid, block, dynamic_shared_bytes)
            shared = SharedMemory(dynamic_shared_bytes, *(() if make is None else (make,)))
            fake._shared = shared
            fake._atomic = Atomic()
            with _push_kernel_context(fake), swapped_cuda_module(source, fake):
                BlockManager(source, grid, block, False).run(grid_point, *args)
            blocks.append(shared)
    finally:
        sys.setswitchinterval(old_interval)
    return blocks
