"""What a kernel is to the launcher: :class:`KernelSpec`, built by a factory of the registry.

A spec holds a kernel's source (a Python function numba compiles), how to launch it (block,
dynamic shared memory, grid from the arguments), the names of its arguments in order, the
signature it is compiled for on a GPU, and the tiles it was built with. The launcher
(:mod:`flashlab.cuda.launch`) and the traffic counter (:mod:`flashlab.cuda.traffic`) read nothing
else, so a new kernel is a module with a factory returning a spec, plus one registry line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

STATIC_SHARED_LIMIT = 48 * 1024  # bytes of static shared memory a CUDA kernel may declare


def python_function(fn: Callable) -> Callable:
    """A helper as it is: how the simulator and the traffic counter call device helpers."""
    return fn


@dataclass(frozen=True)
class KernelSpec:
    """One kernel, ready to launch.

    ``params``: argument names in launch order (arrays and scalars); ``grid(args)`` gives the grid
    for a mapping of those names to values; ``block``: threads per block; ``shared_bytes``: dynamic
    shared memory (0: the kernel declares static arrays); ``signature``: numba's signature on a
    GPU; ``launch_bounds``: ``(threads, blocks per SM)`` or None; ``tiles``: ``((name, value), ...)``;
    ``target``: ``"gpu"`` (helpers compiled as device functions) or ``"sim"`` (plain Python).
    """

    name: str
    d: int
    causal: bool
    source: Callable
    params: tuple
    grid: Callable[[Mapping], tuple] = field(compare=False)
    block: tuple
    shared_bytes: int
    signature: str
    tiles: tuple
    target: str
    launch_bounds: tuple | None = None

    @property
    def tile(self) -> dict:
        """The tiles as a dict, e.g. ``spec.tile["rows"]``."""
        return dict(self.tiles)


def check_divides(kernel: str, big: int, big_name: str, small: int, small_name: str) -> None:
    """``ValueError`` naming both tile sizes unless ``small`` divides ``big``."""
    if big % small:
        raise ValueError(f"{kernel}: {small_name}={small} must divide {big_name}={big}")
