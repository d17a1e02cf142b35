"""fastclip_kernels: the similarity-block contract (see ``reference``) and its implementations.

Importable with torch (and triton, for the Triton path) alone: nothing here imports fastclip_ds,
deepspeed or open_clip.
"""

from .reference import BlockStats, block_grads, block_stats

__all__ = ["BlockStats", "block_grads", "block_stats"]
