"""The kernels by name: each entry builds a :class:`~flashlab.cuda.spec.KernelSpec` for ``d`` and tiles.

A new kernel is a module with a factory ``spec(d, causal, tiles, device, target) -> KernelSpec`` and
one line in :data:`REGISTRY`; :func:`make_kernel` checks the name, the head dim and the tiles for it,
and the launcher, the traffic counter, the tests and ``python -m flashlab.bench`` find it there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from flashlab.cuda import backward, decode, forward
from flashlab.cuda.spec import KernelSpec, python_function
from flashlab.inputs import check_block


class Kernel(NamedTuple):
    """One registry entry: its factory, its default tiles per head dim, what it computes."""

    build: Callable[..., KernelSpec]  # (d, causal, tiles, device, target, **options) -> KernelSpec
    tiles: Mapping[int, dict]  # head dim -> default tiles (every tunable tile, with its default)
    computes: str  # "forward" (o, lse from q, k, v) or "backward" (dq, dk, dv), or another contract
    options: tuple = ()  # extra keyword options the factory takes (rowwise: its key_step)


REGISTRY: dict[str, Kernel] = {
    "rowwise": Kernel(forward.rowwise_spec, forward.ROWWISE_TILES, "forward", ("key_step",)),
    "tiled": Kernel(forward.tiled_spec, forward.TILED_TILES, "forward"),
    "register_tiled": Kernel(
        forward.register_tiled_spec, forward.REGISTER_TILED_TILES, "forward", ("index",)
    ),
    "backward": Kernel(backward.backward_spec, backward.BACKWARD_TILES, "backward"),
    "decode": Kernel(decode.decode_spec, decode.TILES, "decode", ("kv_dtype",)),
}


def names(computes: str) -> tuple[str, ...]:
    """The registered kernels that compute ``computes`` (e.g. ``"forward"``), in registry order."""
    return tuple(name for name, entry in REGISTRY.items() if entry.computes == computes)


def make_kernel(
    name: str, d: int, causal: bool = False, *, target: str = "sim", device: Callable | None = None, **tiles
) -> KernelSpec:
    """The spec of kernel ``name`` for head dim ``d``: tiles default per ``d``, any of them overridable.

    ``target``: ``"gpu"`` (``device`` compiles the helpers, ``cuda.jit(device=True)``) or ``"sim"``
    (the helpers stay Python: the simulator and the traffic counter). Other keywords that the entry
    lists in ``options`` (rowwise's ``key_step``) go to its factory; the rest are tiles.
    """
    if name not in REGISTRY:
        raise ValueError(f"kernel must be one of {', '.join(REGISTRY)}, got {name!r}")
    entry = REGISTRY[name]
    if d not in entry.tiles:
        raise ValueError(f"head dim d={d} is not supported by the kernels; supported: {tuple(entry.tiles)}")
    options = {key: tiles.pop(key) for key in entry.options if tiles.get(key) is not None}
    known = entry.tiles[d]
    unknown = set(tiles) - set(known)
    if unknown:
        raise ValueError(
            f"unknown tile parameter(s) {sorted(unknown)} for {name}; known: {sorted(known)}"
            + "".join(f" (option {key!r} belongs to another kernel)" for key in unknown if key == "key_step")
        )
    t = {key: check_block(key, tiles.get(key, value)) for key, value in known.items()}
    return entry.build(d, bool(causal), t, device or python_function, target, **options)
