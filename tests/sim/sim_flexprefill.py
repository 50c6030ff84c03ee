"""Simulator cases for the FlexPrefill ops: each function takes the op's own arguments and
builds the runner case, doing the conversions the CUDA glue does (csrc/cuda/flexprefill_*.cu):
fp64 -> fp32 for js_divergence, contiguous tensors, the default scale 1/sqrt(D) resolved here
(the glue computes it in double and passes it as float). The runner allocates the outputs as
the glue does (at::empty as 0xFF garbage, at::zeros / at::full(-inf) in varlen mode)."""

from __future__ import annotations

import math

import torch

from .gpusim import Case, register

FAMILY = "flexprefill"


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _scale(scale, D: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(D)


@register(FAMILY, "js_divergence")
def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> Case:
    if p.dtype == torch.float64:  # the glue runs fp64 through the fp32 kernel
        p, q = p.float(), q.float()
    return Case("js_divergence", {"p": p, "q": q, "eps": float(eps)})


@register(FAMILY, "flex_estimate")
def flex_estimate(q: torch.Tensor, k: torch.Tensor, block_size: int, scale=None) -> Case:
    return Case("flex_estimate", {"q": _c(q), "k": _c(k), "block_size": int(block_size),
                                  "scale": _scale(scale, q.shape[-1])})


@register(FAMILY, "select_blocks")
def select_blocks(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma,
                  min_blocks=1, max_blocks=2**31 - 1) -> Case:
    return Case("select_blocks", {
        "vertical": _c(vertical), "slash": _c(slash), "qa_map": _c(qa_map),
        "is_query_aware": _c(is_query_aware), "q_len": int(q_len), "kv_len": int(kv_len),
        "block_size": int(block_size), "gamma": float(gamma), "min_blocks": int(min_blocks),
        "max_blocks": int(max_blocks)})


@register(FAMILY, "block_sparse_attention")
def block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale=None, causal=True,
                           cu_seqlens_q=None, cu_seqlens_k=None) -> Case:
    return Case("block_sparse_attention", {
        "q": _c(q), "k": _c(k), "v": _c(v), "block_idx": _c(block_idx),
        "block_cnt": _c(block_cnt), "block_size": int(block_size),
        "scale": _scale(scale, q.shape[-1]), "causal": bool(causal),
        "cu_seqlens_q": None if cu_seqlens_q is None else _c(cu_seqlens_q),
        "cu_seqlens_k": None if cu_seqlens_k is None else _c(cu_seqlens_k)})


def _cache_storage(k_cache: torch.Tensor, v_cache: torch.Tensor | None = None):
    """(flat tensor holding the caches' memory, k element offset, v element offset): the
    runner reads the caches through their own strides, as the CUDA glue hands them over."""
    def flat(t):
        st = t.untyped_storage()
        return torch.empty(0, dtype=t.dtype).set_(st, 0, (st.nbytes() // t.element_size(),),
                                                  (1,))

    fk = flat(k_cache)
    if v_cache is None:
        return fk, k_cache.storage_offset(), 0
    if v_cache.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr():
        return fk, k_cache.storage_offset(), v_cache.storage_offset()
    return (torch.cat([fk, flat(v_cache)]), k_cache.storage_offset(),
            fk.numel() + v_cache.storage_offset())


def _strides(prefix: str, t: torch.Tensor) -> dict:
    return {f"{prefix}_sp": t.stride(0), f"{prefix}_sn": t.stride(1), f"{prefix}_sh": t.stride(2)}


@register(FAMILY, "block_sparse_attention_paged")
def block_sparse_attention_paged(q, k_cache, v_cache, block_table, seq_lens_k, block_idx,
                                 block_cnt, block_size, scale=None, causal=True,
                                 cu_seqlens_q=None) -> Case:
    buf, k_off, v_off = _cache_storage(k_cache, v_cache)
    return Case("block_sparse_attention_paged", {
        "q": _c(q), "cache": buf, "k_offset": k_off, "v_offset": v_off,
        "num_pages": k_cache.shape[0], "page_size": k_cache.shape[1], "Hk": k_cache.shape[2],
        **_strides("k", k_cache), **_strides("v", v_cache),
        "block_table": _c(block_table), "seq_lens_k": _c(seq_lens_k),
        "block_idx": _c(block_idx), "block_cnt": _c(block_cnt), "block_size": int(block_size),
        "scale": _scale(scale, q.shape[-1]), "causal": bool(causal),
        "cu_seqlens_q": None if cu_seqlens_q is None else _c(cu_seqlens_q)})


@register(FAMILY, "flex_estimate_paged")
def flex_estimate_paged(q, k_cache, block_table, seq_lens_k, block_size, scale=None,
                        cu_seqlens_q=None) -> Case:
    buf, k_off, _ = _cache_storage(k_cache)
    return Case("flex_estimate_paged", {
        "q": _c(q), "cache": buf, "k_offset": k_off, "num_pages": k_cache.shape[0],
        "page_size": k_cache.shape[1], "Hk": k_cache.shape[2], **_strides("k", k_cache),
        "block_table": _c(block_table), "seq_lens_k": _c(seq_lens_k),
        "block_size": int(block_size), "scale": _scale(scale, q.shape[-1]),
        "cu_seqlens_q": None if cu_seqlens_q is None else _c(cu_seqlens_q)})
