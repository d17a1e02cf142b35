"""fastclip_kernels: the similarity-block contract (see ``reference``) and its implementations.

``block_stats`` / ``block_grads`` take ``impl``: ``"dense"`` (the reference, materialises M×N),
``"chunked"`` (PyTorch, O(M·chunk) memory), ``"triton"`` (fused kernels; CUDA, or CPU under
``TRITON_INTERPRET=1``) or ``"auto"`` (on CUDA what the cost model in ``schedule`` predicts faster for
the dtype and shape; on CPU chunked).
``block_lse``, ``clip_loss`` and ``fastclip_surrogate`` are differentiable wrappers (``autograd``).

Importable with torch (and triton, for the Triton path) alone: nothing here imports fastclip_ds,
deepspeed or open_clip.
"""

from .autograd import block_lse, clip_loss, fastclip_surrogate
from .dispatch import IMPLS, block_grads, block_stats, resolve_impl, triton_module
from .reference import BlockStats

__all__ = [
    "IMPLS",
    "BlockStats",
    "block_grads",
    "block_lse",
    "block_stats",
    "clip_loss",
    "fastclip_surrogate",
    "resolve_impl",
    "triton_module",
]
