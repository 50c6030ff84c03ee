"""Views of a paged KV cache as the ``[num_pages, page_size, Hk, D]`` key and value tensors that
the paged ops (``block_sparse_attention_paged``, ``flex_estimate_paged``) read.

paged_kv_views(cache, layout, page_size, num_kv_heads, head_dim) -> (k_cache, v_cache)

Both layouts are views (no copy). The CPU ops take any strides; the CUDA ops need a contiguous last dim (the
``"flash_attn"`` layout).
"""

from __future__ import annotations

import torch

__all__ = ["paged_kv_views", "PAGED_KV_LAYOUTS"]

PAGED_KV_LAYOUTS = ("cpu_attn", "flash_attn", "kv_concat")


def paged_kv_views(cache: torch.Tensor, layout: str, page_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views ``[num_pages, page_size, num_kv_heads, head_dim]`` of one layer's
    paged KV cache.

    Parameters
    ----------
    cache : Tensor
        One layer's cache, in one of three layouts:

        - ``"cpu_attn"`` (vLLM's CPU attention backend, its ``vec`` / ``vec16`` kernels):
          ``[num_pages, Hk, page_size, 2 * D]``, or the same memory as ``[num_pages, Hk, 2 *
          page_size, D]``. Per (page, KV head) the first half holds the page's keys TRANSPOSED
          (``D`` rows of ``page_size``: key row j, dim d at ``d * page_size + j``) and the second
          half its values as ``page_size`` rows of ``D``. The key view is therefore strided along
          D (the CPU ops read any strides; the CUDA ops need a contiguous last dim and take the
          ``"flash_attn"`` layout).
        - ``"flash_attn"`` (FlashAttention's own and older vLLM GPU layout): ``[2, num_pages,
          page_size, Hk, D]``; ``k = cache[0]``, ``v = cache[1]``.
        - ``"kv_concat"`` (vLLM 0.32's GPU backends, e.g. FlashAttention): logical ``[num_pages, Hk,
          page_size, 2 * D]`` in any physical dim order, key = the first ``D`` entries of the last
          dim, value = the last ``D``; ``k = cache.transpose(1, 2)[..., :D]``.
    layout : str
        ``"cpu_attn"``, ``"flash_attn"`` or ``"kv_concat"``.
    page_size, num_kv_heads, head_dim : int
        Tokens per page, KV heads Hk and head dim D; the cache's shape must match them.

    Returns
    -------
    (k_cache, v_cache), each a view ``[num_pages, page_size, Hk, D]`` of ``cache``.
    """
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"paged_kv_views: cache must be a tensor, got {type(cache).__name__}")
    for name, v in (("page_size", page_size), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"paged_kv_views: {name} must be an int >= 1, got {v!r}")
    P, Hk, D = page_size, num_kv_heads, head_dim
    shape = tuple(cache.shape)
    if layout == "cpu_attn":
        if cache.dim() != 4 or shape[1] != Hk or shape[2:] not in ((P, 2 * D), (2 * P, D)):
            raise ValueError(
                f"paged_kv_views: a 'cpu_attn' cache must have shape [num_pages, Hk, page_size, "
                f"2 * D] = [num_pages, {Hk}, {P}, {2 * D}] or [num_pages, Hk, 2 * page_size, D] "
                f"= [num_pages, {Hk}, {2 * P}, {D}], got {list(shape)}")
        view = cache if shape[2:] == (2 * P, D) else cache.view(shape[0], Hk, 2 * P, D)
        sp, sh = view.stride(0), view.stride(1)
        if view.stride(3) != 1 or view.stride(2) != D:
            raise ValueError(f"paged_kv_views: a 'cpu_attn' cache must be contiguous within each (page, head), "
                             f"got strides {list(cache.stride())}")
        k = view.as_strided((shape[0], P, Hk, D), (sp, 1, sh, P), view.storage_offset())
        return k, view[:, :, P:].permute(0, 2, 1, 3)
    if layout == "flash_attn":
        if cache.dim() != 5 or shape[0] != 2 or shape[2:] != (P, Hk, D):
            raise ValueError(
                f"paged_kv_views: a 'flash_attn' cache must have shape [2, num_pages, page_size, "
                f"Hk, D] = [2, num_pages, {P}, {Hk}, {D}], got {list(shape)}")
        return cache[0], cache[1]
    if layout == "kv_concat":
        if cache.dim() != 4 or shape[1:] != (Hk, P, 2 * D):
            raise ValueError(
                f"paged_kv_views: a 'kv_concat' cache must have shape [num_pages, Hk, page_size, 2 * D] = "
                f"[num_pages, {Hk}, {P}, {2 * D}], got {list(shape)}")
        k, v = cache.transpose(1, 2).split(D, dim=-1)
        return k, v
    raise ValueError(f"paged_kv_views: layout must be one of {PAGED_KV_LAYOUTS}, got {layout!r}")
