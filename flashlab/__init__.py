"""flashlab: FlashAttention from first principles, with every step run, counted or measured.

Importing flashlab decides, before numba is imported, whether numba.cuda kernels run on a GPU
or in numba's CUDA simulator (see :mod:`flashlab.device`). ``flashlab.flash_attention`` is the
NumPy version; the numba.cuda kernels are :mod:`flashlab.cuda` (``flashlab.cuda.flash_attention``,
``flashlab.cuda.flash_attention_backward``; import it explicitly, it imports numba), the
differentiable torch op is :mod:`flashlab.autograd`. ARCHITECTURE.md describes the layers.
"""

from flashlab import device as device

device.select()

from flashlab.attention import naive_attention  # noqa: E402
from flashlab.backward import flash_attention_backward, naive_attention_backward  # noqa: E402
from flashlab.flash import flash_attention  # noqa: E402
from flashlab.memory import MemoryModel  # noqa: E402
from flashlab.online_softmax import merge, online_attention  # noqa: E402

__all__ = [
    "MemoryModel",
    "device",
    "flash_attention",
    "flash_attention_backward",
    "merge",
    "naive_attention",
    "naive_attention_backward",
    "online_attention",
]
