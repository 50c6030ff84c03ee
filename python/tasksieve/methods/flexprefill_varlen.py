"""FlexPrefill over a packed batch of sequences of different lengths (serving engines: vLLM).

Shapes
------
S sequences packed along the token axis; sequence s has ``nq_s`` queries, the LAST ``nq_s`` of its ``nk_s`` key
positions (``nq_s <= nk_s``: a fresh prompt has ``nq_s == nk_s``, a chunked-prefill continuation or a prefix-cache
hit has earlier keys already cached). q ``[total_q, H, D]``, H query heads, Hk KV heads (H % Hk == 0), D head dim.
Keys and values come either packed, ``[total_k, Hk, D]`` (fresh prompts: the step's own K/V), or from a paged cache
``[num_pages, page_size, Hk, D]`` through a block table (continuations: see :func:`tasksieve.ops.paged_kv_views`).

Per sequence this is exactly :func:`tasksieve.methods.flexprefill.flex_prefill_attention` on its queries and keys
(same estimate, same Jensen-Shannon test, same pooled map, same ``select_blocks``), except that every sequence
passed here runs sparse: the caller decides which sequences are long enough. The attention of all sequences is ONE
kernel call (packed varlen, or paged), so a step with many long prompts launches one attention per layer.

The per-sequence part (estimate on the packed form, JSD, pooled map, selection) loops over the S sequences in
Python with host integers the caller already holds (vLLM keeps the lengths on the host): no ``.item()``, no sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import ops
from .flexprefill import FlexPrefill, flex_qa_map

__all__ = ["flex_prefill_varlen", "VarlenReport", "causal_block_count"]


@dataclass
class VarlenReport:
    """What one :func:`flex_prefill_varlen` call computed (tensors stay on the device; nothing syncs).

    Attributes
    ----------
    computed_blocks : Tensor, int64 scalar
        Query-block x key-block tiles attended, summed over sequences and heads.
    causal_blocks : int
        The tiles dense causal attention would attend (host arithmetic on the lengths).
    is_query_aware : Tensor [S, H] bool
        Heads that took the query-aware pattern.
    """

    computed_blocks: torch.Tensor
    causal_blocks: int
    is_query_aware: torch.Tensor


def causal_block_count(q_len: int, kv_len: int, block_size: int, heads: int) -> int:
    """Tiles of dense causal attention for one sequence: ``heads * sum_r (d(r) + 1)`` (host ints, no tensor)."""
    total = 0
    for r in range(-(-q_len // block_size)):
        last_query = (kv_len - q_len) + min((r + 1) * block_size, q_len) - 1
        total += last_query // block_size + 1
    return total * heads


def _check_lengths(q: torch.Tensor, q_lens: Sequence[int], k_lens: Sequence[int]) -> None:
    if len(q_lens) != len(k_lens) or len(q_lens) == 0:
        raise ValueError(f"flex_prefill_varlen: q_lens and k_lens must be non-empty and of equal length, got "
                         f"{len(q_lens)} and {len(k_lens)}")
    for s, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        if not (isinstance(nq, int) and isinstance(nk, int)) or nq < 1 or nq > nk:
            raise ValueError(f"flex_prefill_varlen: sequence {s} needs ints 1 <= q_len <= k_len, got q_len={nq!r}, "
                             f"k_len={nk!r}")
    if q.dim() != 3 or q.shape[0] != sum(q_lens):
        raise ValueError(f"flex_prefill_varlen: q must be [total_q={sum(q_lens)}, H, D], got {list(q.shape)}")


def _offsets(lens: Sequence[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32).to(device, non_blocking=True)


def flex_prefill_varlen(
    q: torch.Tensor,
    q_lens: Sequence[int],
    k_lens: Sequence[int],
    settings: FlexPrefill,
    *,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    seq_lens_k: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, VarlenReport]:
    """FlexPrefill sparse causal attention for S packed sequences, one attention launch for all of them.

    Parameters
    ----------
    q : Tensor [total_q, H, D]
        Packed queries (RoPE applied), sequence s in rows ``sum(q_lens[:s]) ..`` (last dim contiguous).
    q_lens, k_lens : sequence of int
        Host lengths ``1 <= nq_s <= nk_s``.
    settings : FlexPrefill
        gamma, tau, block_size, budgets (``dense_below`` is the caller's business here).
    k, v : Tensor [total_k, Hk, D], optional
        Packed keys and values, sequence s in rows ``sum(k_lens[:s]) ..``. Either these ...
    k_cache, v_cache : Tensor [num_pages, page_size, Hk, D], optional
        ... or a paged cache (any strides but a contiguous last dim), with
    block_table : Tensor [S, max_pages] int32
        Pages of each sequence's keys (key j of sequence s: page ``block_table[s, j // page_size]``).
    seq_lens_k : Tensor [S] int32, optional
        ``k_lens`` on the device (built from ``k_lens`` when absent).
    cu_seqlens_q : Tensor [S + 1] int32, optional
        Offsets of ``q_lens`` on the device (built when absent).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    out : Tensor [total_q, H, D] in q's dtype
    report : VarlenReport
    """
    if not isinstance(settings, FlexPrefill):
        raise ValueError(f"flex_prefill_varlen: settings must be a FlexPrefill, got {type(settings).__name__}")
    _check_lengths(q, q_lens, k_lens)
    paged = k_cache is not None
    if paged == (k is not None) or (k is None) != (v is None) or (k_cache is None) != (v_cache is None):
        raise ValueError("flex_prefill_varlen: give either k and v (packed) or k_cache, v_cache and block_table "
                         "(paged), not both")
    if paged and (block_table is None or block_table.dim() != 2 or block_table.shape[0] != len(q_lens)):
        raise ValueError(f"flex_prefill_varlen: block_table must be [S={len(q_lens)}, max_pages] with a paged "
                         f"cache, got {None if block_table is None else list(block_table.shape)}")
    if not paged and (k.dim() != 3 or k.shape[0] != sum(k_lens) or v.shape != k.shape):
        raise ValueError(f"flex_prefill_varlen: k and v must be [total_k={sum(k_lens)}, Hk, D], got "
                         f"{list(k.shape)} and {list(v.shape)}")

    S, H = len(q_lens), q.shape[1]
    bs = settings.block_size
    lo, hi = settings.budget_blocks()
    device = q.device
    cu_q = _offsets(q_lens, device) if cu_seqlens_q is None else cu_seqlens_q
    q_off = [0]
    for n in q_lens:
        q_off.append(q_off[-1] + n)
    k_off = [0]
    for n in k_lens:
        k_off.append(k_off[-1] + n)

    if paged:
        lens_k = (torch.tensor(list(k_lens), dtype=torch.int32).to(device, non_blocking=True)
                  if seq_lens_k is None else seq_lens_k)
        vertical, slash, estimate = ops.flex_estimate_paged(q[None], k_cache, block_table, lens_k, bs, scale,
                                                            cu_q)
        page = k_cache.shape[1]

    nbq_max = max(-(-n // bs) for n in q_lens)
    nb_max = max(-(-n // bs) for n in k_lens)
    block_idx = torch.zeros(S, H, nbq_max, nb_max, dtype=torch.int32, device=device)
    block_cnt = torch.zeros(S, H, nbq_max, dtype=torch.int32, device=device)
    query_aware = []
    causal = 0
    for s, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        q_s = q[q_off[s]:q_off[s + 1]][None]
        nb = -(-nk // bs)
        if paged:
            pages = block_table[s, :-(-nk // page)].long()
            k_s = k_cache.index_select(0, pages).flatten(0, 1)[:nk][None]
            vert, sl, est = vertical[s:s + 1, :, :nb], slash[s:s + 1, :, :nb], estimate[s:s + 1, :, :nb]
        else:
            k_s = k[k_off[s]:k_off[s + 1]][None]
            vert, sl, est = ops.flex_estimate(q_s, k_s, bs, scale)
        qa = ops.js_divergence(est, vert) < float(settings.tau)
        qa_map = flex_qa_map(q_s, k_s, bs, scale)
        idx, cnt = ops.select_blocks(vert, sl, qa_map, qa, nq, nk, bs, float(settings.gamma), lo, hi)
        nbq = idx.shape[2]
        block_idx[s, :, :nbq, :nb] = idx[0]
        block_cnt[s, :, :nbq] = cnt[0]
        query_aware.append(qa[0])
        causal += causal_block_count(nq, nk, bs, H)

    if paged:
        out, _ = ops.block_sparse_attention_paged(q[None], k_cache, v_cache, block_table, lens_k, block_idx,
                                                  block_cnt, bs, scale, True, cu_q)
    else:
        cu_k = _offsets(k_lens, device)
        out, _ = ops.block_sparse_attention(q[None], k[None], v[None], block_idx, block_cnt, bs, scale, True, cu_q,
                                            cu_k)
    report = VarlenReport(block_cnt.sum(dtype=torch.int64), causal, torch.stack(query_aware))
    return out[0], report
