"""flashlab: FlashAttention from first principles, with every step run, counted or measured.

Importing flashlab decides, before numba is imported, whether numba.cuda kernels run on a GPU
or in numba's CUDA simulator (see :mod:`flashlab.device`).
"""

from flashlab import device as device

device.select()

from flashlab.attention import naive_attention  # noqa: E402

__all__ = ["device", "naive_attention"]
