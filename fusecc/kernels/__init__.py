"""Hand-written Triton kernels, one per file (public API re-exported here).

`triton.jit` reads TRITON_INTERPRET when a kernel is defined: set it (CPU-only machines) before
importing this package.
"""

from fusecc.kernels.attention_routing import flash_attention
from fusecc.kernels.cache_write import write_kv_cache
from fusecc.kernels.paged_attention import paged_attention
from fusecc.kernels.paged_prefill_attention import paged_prefill_attention
from fusecc.kernels.varlen_attention import varlen_attention

__all__ = ["flash_attention", "varlen_attention", "paged_attention", "paged_prefill_attention", "write_kv_cache"]
