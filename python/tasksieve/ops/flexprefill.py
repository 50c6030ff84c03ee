"""FlexPrefill ops: block_sparse_attention, js_divergence, flex_estimate, select_blocks, and
their fakes.

block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale=None, causal=True,
                       cu_seqlens_q=None, cu_seqlens_k=None)
    -> out [B, Nq, H, D], lse float32 [B, H, Nq]
js_divergence(p, q, eps=1e-12)             -> float32 [...]: sqrt(JSD) per row of [..., n]
flex_estimate(q, k, block_size, scale=None)
    -> (vertical, slash, estimate) float32 [B, H, ceil(Nk / block_size)] each
select_blocks(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma, ...)
    -> (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq])
block_sparse_attention_paged(q, k_cache, v_cache, block_table, seq_lens_k, block_idx, block_cnt,
                             block_size, scale=None, causal=True, cu_seqlens_q=None)
    -> out in q's layout, lse float32 [S, H, Nq] ([1, H, total_q] packed)
flex_estimate_paged(q, k_cache, block_table, seq_lens_k, block_size, scale=None,
                    cu_seqlens_q=None)
    -> (vertical, slash, estimate) float32 [S, H, ceil(max_pages * page_size / block_size)]
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _loader

__all__ = ["block_sparse_attention", "js_divergence", "flex_estimate", "select_blocks",
           "block_sparse_attention_paged", "flex_estimate_paged"]


# ---------------------------------------------------------------------------------------------
# FlexPrefill: block_sparse_attention
# ---------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-style attention over the listed key blocks of every query block.

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries, the LAST Nq of Nk positions (query i sits at position ``Nk - Nq + i``);
        float32 (CPU), float16 or bfloat16; last dim contiguous.
    k, v : Tensor [B, Nk, Hk, D]
        Same dtype and device, H % Hk == 0 (query head h reads KV head ``h // (H // Hk)``),
        Nq <= Nk; last dim contiguous, other strides free.
    block_idx : Tensor [B, H, nbq, max_k] int32
        Key-block columns (ascending) of query block r in the first ``block_cnt[b, h, r]``
        entries; ``nbq = ceil(Nq / block_size)``, columns in ``[0, ceil(Nk / block_size))``. The
        CPU kernel raises on out-of-range columns; the CUDA kernel skips them.
    block_cnt : Tensor [B, H, nbq] int32, values in [0, max_k]
    block_size : int
        16, 32, 64 or 128.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    causal : bool
        Mask keys past each query's position (only blocks straddling the diagonal need it).
    cu_seqlens_q, cu_seqlens_k : Tensor [S + 1] int32, optional
        Packed varlen (flash-attn convention), both or neither: offsets ``0 = c[0] <= ... <=
        c[S]`` of S sequences packed along dim 1, with q [1, total_q, H, D], k/v
        [1, total_k, Hk, D]. Sequence s is the problem above on q rows ``cu_seqlens_q[s]`` ..
        ``cu_seqlens_q[s + 1]`` and k/v rows ``cu_seqlens_k[s]`` .. ``cu_seqlens_k[s + 1]``
        (nq_s <= nk_s, queries the last nq_s positions); then block_idx is
        [S, H, nbq_max, max_k] and block_cnt [S, H, nbq_max] with nbq_max >=
        ceil(max nq_s / block_size) (rows past a sequence's query blocks are ignored) and
        columns relative to the sequence's own keys. The CPU kernel validates the offsets and
        raises; the CUDA kernel cannot without a host sync and clamps them (no out-of-bounds
        access; rows malformed offsets leave uncovered come out 0 with lse -inf).

    Returns
    -------
    out : Tensor [B, Nq, H, D] in q's dtype ([1, total_q, H, D] packed)
    lse : Tensor [B, H, Nq] float32, natural-log log-sum-exp of the visited logits (for merging
        chunks); a row with no visible key has out 0 and lse -inf ([1, H, total_q] packed).
    """
    _loader.require_kernel("block_sparse_attention", q)
    return torch.ops.tasksieve.block_sparse_attention.default(
        q, k, v, block_idx, block_cnt, block_size, scale, causal, cu_seqlens_q, cu_seqlens_k)


if _loader.LOADED and "block_sparse_attention" in _loader.op_names():

    @torch.library.register_fake("tasksieve::block_sparse_attention")
    def _block_sparse_attention_fake(q, k, v, block_idx, block_cnt, block_size, scale=None,
                                     causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
        # Packed varlen keeps q's layout ([1, total_q, H, D]), so the shapes are the same.
        B, Nq, H, D = q.shape
        out = q.new_empty((B, Nq, H, D))
        lse = q.new_empty((B, H, Nq), dtype=torch.float32)
        return out, lse


# ---------------------------------------------------------------------------------------------
# FlexPrefill estimation: js_divergence, flex_estimate
# ---------------------------------------------------------------------------------------------


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon distance per row: ``sqrt(JSD(p, q))``, natural log, in ``[0, sqrt(ln 2)]``.

    Parameters
    ----------
    p, q : Tensor [..., n]
        Same shape, dtype (float32, float64, float16 or bfloat16) and device; n >= 1. Rows need
        not be normalised: each is divided by its sum (a row summing to 0 is uniform).
    eps : float
        Entries are clamped to ``>= eps`` after normalising (then renormalised), so exact zeros
        never give NaN. Finite, > 0.

    Returns
    -------
    Tensor [...] float32.
    """
    _loader.require_kernel("js_divergence", p)
    return torch.ops.tasksieve.js_divergence.default(p, q, eps)


def flex_estimate(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexPrefill pattern estimation in one fused pass.

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries (RoPE applied), the last Nq of the Nk positions; float32, float16 or bfloat16;
        last dim contiguous, other strides free.
    k : Tensor [B, Nk, Hk, D]
        Keys, same dtype and device, H % Hk == 0 (never repeated), Nq <= Nk, D <= 256.
    block_size : int
        Block size bs >= 1 (CUDA: 16, 32, 64 or 128).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    (vertical, slash, estimate), each float32 [B, H, nb], nb = ceil(Nk / bs). With the last
    m = min(bs, Nq) queries as representatives (rep query r at position p_r = Nk - m + r) and
    A their causal fp32 softmax: ``vertical[c]`` = mean over r of the mass on key block c;
    ``slash[t]`` = mean over r of the mass on keys j with ``(p_r - j) // bs == t`` (t = 0: main
    block diagonal); ``estimate`` = softmax over blocks of ``scale * mean(q_rep) . mean(k_c)``
    (no causal mask). vertical and slash rows sum to 1 (zeros when Nq = 0).
    """
    _loader.require_kernel("flex_estimate", q)
    return tuple(torch.ops.tasksieve.flex_estimate.default(q, k, block_size, scale))


if _loader.LOADED and "js_divergence" in _loader.op_names():

    @torch.library.register_fake("tasksieve::js_divergence")
    def _js_divergence_fake(p, q, eps=1e-12):
        return p.new_empty(p.shape[:-1], dtype=torch.float32)


if _loader.LOADED and "flex_estimate" in _loader.op_names():

    @torch.library.register_fake("tasksieve::flex_estimate")
    def _flex_estimate_fake(q, k, block_size, scale=None):
        B, H = q.shape[0], q.shape[2]
        nb = (k.shape[1] + block_size - 1) // block_size
        return tuple(q.new_empty((B, H, nb), dtype=torch.float32) for _ in range(3))



def select_blocks(
    vertical: torch.Tensor, slash: torch.Tensor, qa_map: torch.Tensor,
    is_query_aware: torch.Tensor, q_len: int, kv_len: int, block_size: int, gamma: float,
    min_blocks: int = 1, max_blocks: int = 2**31 - 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill block selection, on the device (no host sync, no per-head loop).

    Parameters
    ----------
    vertical, slash : Tensor [B, H, nb] float32
        Block-pooled vertical and slash masses from ``flex_estimate`` (``slash[t]``: diagonal
        offset block t, 0 = main diagonal); nb = ceil(kv_len / block_size).
    qa_map : Tensor [B, H, nbq, nb] float32
        Pooled block attention map of the query-aware heads (rows: query blocks, nbq =
        ceil(q_len / block_size)); entries above the causal diagonal are ignored. Only read for
        heads with ``is_query_aware``.
    is_query_aware : Tensor [B, H] bool
        ``D_JS < tau`` per head (from ``js_divergence``).
    q_len, kv_len, block_size : int
        The queries are the last q_len of kv_len positions; query block r's diagonal block is
        ``d(r) = (kv_len - q_len + min((r+1)*bs, q_len) - 1) // bs``.
    gamma : float
        Cumulative-mass target in (0, 1].
    min_blocks, max_blocks : int
        Per-head budget clamp of the vertical and slash line counts, in blocks
        (0 <= min_blocks <= max_blocks); query-aware heads get a min_blocks skeleton.

    Returns
    -------
    (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq]) in the
    ``block_sparse_attention`` format. See ``select_blocks`` in ``csrc/ops.cpp`` for the rule.
    """
    _loader.require_kernel("select_blocks", vertical)
    return tuple(torch.ops.tasksieve.select_blocks.default(
        vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma,
        min_blocks, max_blocks))


if _loader.LOADED and "select_blocks" in _loader.op_names():

    @torch.library.register_fake("tasksieve::select_blocks")
    def _select_blocks_fake(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size,
                            gamma, min_blocks, max_blocks):
        B, H, nb = vertical.shape
        nbq = qa_map.shape[2]
        return (vertical.new_empty((B, H, nbq, nb), dtype=torch.int32),
                vertical.new_empty((B, H, nbq), dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Paged-KV forms (chunked prefill over a paged cache): block_sparse_attention_paged,
# flex_estimate_paged
# ---------------------------------------------------------------------------------------------
_PAGED_DOC = """
    q : Tensor [S, Nq, H, D], or [1, total_q, H, D] with ``cu_seqlens_q``
        This chunk's queries (float32 on CPU, float16/bfloat16; last dim contiguous). Dense:
        every sequence's Nq queries are its last Nq key positions (Nq <= seq_lens_k[s]).
    k_cache{v} : Tensor [num_pages, page_size, Hk, D]
        The paged cache{vs} in q's dtype, any strides but a contiguous last dim (see
        ``paged_kv_views`` for vLLM's CPU and FlashAttention layouts); H % Hk == 0.
    block_table : Tensor [S, max_pages] int32
        Page ids of sequence s in order: key j lives in page ``block_table[s, j // page_size]``,
        row ``j % page_size``. Entries past the ``ceil(seq_lens_k[s] / page_size)`` used pages
        are never read.
    seq_lens_k : Tensor [S] int32
        Key count of each sequence (context + this chunk), at most ``max_pages * page_size``.
    cu_seqlens_q : Tensor [S + 1] int32, optional
        Packed queries: sequence s's ``nq_s`` queries are q rows ``cu_seqlens_q[s]`` ..
        ``cu_seqlens_q[s + 1]``, its last nq_s key positions (nq_s <= seq_lens_k[s]).

    The CPU op validates every value (used page ids in [0, num_pages), seq_lens_k, offsets,
    index entries) and raises with the argument's name; the CUDA op cannot without a host sync
    and clamps them (page ids into the cache, lengths into the table's capacity), so it never
    reads out of bounds; the results for malformed values are unspecified.
"""


def block_sparse_attention_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens_k: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_sparse_attention`` with keys and values read from a paged KV cache.

    Same math and outputs as the contiguous op on the gathered keys and values of each
    sequence.

    Parameters
    ----------""" + _PAGED_DOC.format(v=", v_cache", vs="s") + """    block_idx : Tensor [S, H, nbq, max_k] int32; block_cnt : Tensor [S, H, nbq] int32
        Key-block columns of each query block, relative to the sequence's keys, as the
        contiguous op (dense: nbq = ceil(Nq / block_size); packed: nbq_max >= ceil(max nq_s /
        block_size), rows past a sequence's query blocks ignored).
    block_size : int
        16, 32, 64 or 128 (FlexPrefill's block size, independent of the page size).
    scale : float, optional
        Default ``1 / sqrt(D)``.
    causal : bool
        Mask keys past each query's position.

    Returns
    -------
    out : Tensor in q's shape and dtype
    lse : Tensor [S, H, Nq] float32 ([1, H, total_q] packed); a row with no visible key has out
        0 and lse -inf.
    """
    _loader.require_kernel("block_sparse_attention_paged", q)
    return tuple(torch.ops.tasksieve.block_sparse_attention_paged.default(
        q, k_cache, v_cache, block_table, seq_lens_k, block_idx, block_cnt, block_size, scale,
        causal, cu_seqlens_q))


def flex_estimate_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens_k: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flex_estimate`` with the keys read from a paged KV cache, one row per sequence.

    Parameters
    ----------""" + _PAGED_DOC.format(v="", vs="") + """    block_size : int
        Block size bs >= 1 (CUDA: 16, 32, 64 or 128).
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    (vertical, slash, estimate), each float32 [S, H, nb_max] with nb_max =
    ``ceil(max_pages * page_size / bs)`` (from the sizes alone, so nothing syncs). Entries
    ``[0, nb_s)``, nb_s = ceil(seq_lens_k[s] / bs), are ``flex_estimate`` of sequence s's
    queries and gathered keys; entries past them are 0 (a sequence without queries or keys is
    all 0).
    """
    _loader.require_kernel("flex_estimate_paged", q)
    return tuple(torch.ops.tasksieve.flex_estimate_paged.default(
        q, k_cache, block_table, seq_lens_k, block_size, scale, cu_seqlens_q))


if _loader.LOADED and "block_sparse_attention_paged" in _loader.op_names():

    @torch.library.register_fake("tasksieve::block_sparse_attention_paged")
    def _block_sparse_attention_paged_fake(q, k_cache, v_cache, block_table, seq_lens_k,
                                           block_idx, block_cnt, block_size, scale=None,
                                           causal=True, cu_seqlens_q=None):
        B, Nq, H, D = q.shape
        return q.new_empty((B, Nq, H, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


if _loader.LOADED and "flex_estimate_paged" in _loader.op_names():

    @torch.library.register_fake("tasksieve::flex_estimate_paged")
    def _flex_estimate_paged_fake(q, k_cache, block_table, seq_lens_k, block_size, scale=None,
                                  cu_seqlens_q=None):
        S, H = block_table.shape[0], q.shape[2]
        nb_max = (block_table.shape[1] * k_cache.shape[1] + block_size - 1) // block_size
        return tuple(q.new_empty((S, H, nb_max), dtype=torch.float32) for _ in range(3))
