"""Attention that every autograd transform can go through.

``F.scaled_dot_product_attention`` (which ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call)
picks a fused kernel: flash attention (on the CPU too), memory-efficient attention or cuDNN. Their backward
cannot be differentiated again and they have no forward-mode derivative or ``vmap`` batching rule, so a
transformer fails in a double backward (GNR's exact Hessian-vector products, the Hessian measures'
``"double_backward"``) with ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented``, fails in ``torch.func.jvp`` of ``grad`` (the measures' ``"func"``), and runs ``vmap`` one
example at a time behind a performance warning (per-example gradients). The math kernel is plain tensor
operations, for which all three work; :func:`math_attention` selects it for the forward passes run inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__: list[str] = []


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Forward passes inside run scaled-dot-product attention with the math kernel (a global setting of
    torch, restored on exit)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the older switch, which the CPU kernels read as well
        import torch

        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
