"""numba.cuda kernels: sources, one launch path, a registry and a traffic counter (see ARCHITECTURE.md).

- :func:`flash_attention` / :func:`flash_attention_backward`: the kernels on NumPy arrays or torch
  CUDA tensors, on a GPU or in numba's CUDA simulator (:mod:`flashlab.device` decides at import);
- :mod:`flashlab.cuda.forward`, :mod:`flashlab.cuda.backward`: the kernel sources, built on the
  shared micro-tile steps of :mod:`flashlab.cuda.microtiles`;
- :mod:`flashlab.cuda.registry`: kernel name -> factory of a :class:`~flashlab.cuda.spec.KernelSpec`;
- :mod:`flashlab.cuda.launch`: the launcher; :mod:`flashlab.cuda.traffic`: the traffic counter.

``flashlab.flash_attention`` is the NumPy version (chapter 2); these are the kernels of chapters 4-5.
"""

import flashlab  # noqa: F401  (decides GPU or simulator before numba is imported)
from flashlab.cuda.launch import flash_attention, flash_attention_backward

__all__ = ["flash_attention", "flash_attention_backward"]
