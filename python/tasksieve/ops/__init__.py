"""Typed wrappers over ``torch.ops.tasksieve.*`` and the fake (meta) implementations.

Each wrapper calls the compiled op (``torch.ops.tasksieve.<op>.default``); a device without a
kernel is a ``RuntimeError`` naming the op and the devices built (CPU kernels always exist). The
fakes make every op traceable by ``torch.compile`` / ``torch.export``: output shapes come from
input sizes only, so they work with symbolic shapes. One module per op family, like csrc/:

windowkv      window_scores, select_windows, gather_windows, gather_windows_, window_count
flexprefill   block_sparse_attention, js_divergence, flex_estimate, select_blocks,
              block_sparse_attention_paged, flex_estimate_paged
paged         paged_kv_views (vLLM's CPU / FlashAttention paged caches as K and V views)
premoe        tcess_update, router_stats_update, route_topk, moe_align, expert_gemm,
              moe_forward

The plain-PyTorch ground truth of every op is ``tasksieve.reference`` (tests and benchmarks only).
"""

from .flexprefill import (block_sparse_attention, block_sparse_attention_paged, flex_estimate,
                          flex_estimate_paged, js_divergence, select_blocks)
from .paged import paged_kv_views
from .premoe import (expert_gemm, moe_align, moe_forward, route_topk, router_stats_update,
                     tcess_update)
from .windowkv import gather_windows, gather_windows_, select_windows, window_count, window_scores

__all__ = [
    "window_scores",
    "select_windows",
    "gather_windows",
    "gather_windows_",
    "window_count",
    "block_sparse_attention",
    "js_divergence",
    "flex_estimate",
    "select_blocks",
    "block_sparse_attention_paged",
    "flex_estimate_paged",
    "paged_kv_views",
    "tcess_update",
    "router_stats_update",
    "route_topk",
    "moe_align",
    "expert_gemm",
    "moe_forward",
]
