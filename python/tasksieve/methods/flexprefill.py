"""FlexPrefill: context-aware sparse attention for the prefill (arXiv 2502.20766), on the tasksieve ops.

Shapes
------
B batch, Nq queries, Nk keys (the queries are the LAST Nq of Nk positions: chunked prefill and prefix
caches work), H query heads, Hk KV heads (G = H / Hk, K/V never repeated), D head dim, bs block size,
nb = ceil(Nk / bs) key blocks, nbq = ceil(Nq / bs) query blocks. Layout ``[B, N, H, D]`` (flash-attn); pass an
HF ``[B, H, N, D]`` tensor as ``x.transpose(1, 2)``.

Pipeline (:func:`flex_prefill_attention`), all on the device: no ``.item()``, no host sync, no per-head loop
---------------------------------------------------------------------------------------------------------------
1. ``ops.flex_estimate``: the last ``min(bs, Nq)`` queries against all keys give the block-pooled vertical and
   slash masses and the pooled-query estimate ā, ``[B, H, nb]`` each.
2. ``ops.js_divergence(estimate, vertical)``: the Jensen-Shannon distance per head; a head is query-aware iff
   it is ``< tau``, otherwise vertical-slash.
3. :func:`flex_qa_map`: the pooled block attention map of every head, ``[B, H, nbq, nb]`` (block-mean queries,
   scaled, against block-mean keys; block-causal mask with the diagonal; fp32 row softmax). O(nb²), tiny.
4. ``ops.select_blocks``: per head, the block set reaching mass ``gamma`` (budgets clamped to
   ``[ceil(min_budget / bs), ceil(max_budget / bs)]`` blocks; column 0 and the diagonal always kept).
5. ``ops.block_sparse_attention``: attention over the selected blocks; returns ``out`` and the fp32 ``lse``.

Prompts with ``Nq < dense_below`` query tokens (default ``max(2 * bs, min_budget)``) and decoding (``Nq <= 1``)
run dense: ``block_sparse_attention`` with every causal block listed, which is exact causal attention (bottom-right
aligned) and still gives the lse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import ops

__all__ = [
    "FlexPrefill",
    "FlexPattern",
    "flex_prefill_attention",
    "flex_qa_map",
    "pattern_report",
    "BLOCK_SIZES",
    "diag_blocks",
]

#: Block sizes the kernels take.
BLOCK_SIZES = (16, 32, 64, 128)
_NO_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------
# settings


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _validate(cls: str, gamma, tau, block_size, min_budget, max_budget, dense_below) -> None:
    if not _is_real(gamma) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"{cls}.gamma must be a number in (0, 1] (cumulative attention mass), got {gamma!r}")
    if not _is_real(tau) or float(tau) < 0.0:
        raise ValueError(f"{cls}.tau must be a number >= 0 (Jensen-Shannon distance threshold), got {tau!r}")
    if not _is_int(block_size) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{cls}.block_size must be 16, 32, 64 or 128, got {block_size!r}")
    for name, value in (("min_budget", min_budget), ("max_budget", max_budget), ("dense_below", dense_below)):
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{cls}.{name} must be an int >= 0 (tokens) or None, got {value!r}")
    if min_budget is not None and max_budget is not None and min_budget > max_budget:
        raise ValueError(f"{cls}.max_budget must be >= min_budget={min_budget} (tokens), got {max_budget}")


def _budget_blocks(min_budget: Optional[int], max_budget: Optional[int], block_size: int) -> tuple[int, int]:
    """Token budgets -> (min_blocks, max_blocks) by ceil(tokens / block_size); None -> 1 block / no limit."""
    hi = _NO_MAX if max_budget is None else -(-max_budget // block_size)
    lo = min(1, hi) if min_budget is None else -(-min_budget // block_size)
    return lo, hi


def _dense_below(dense_below: Optional[int], min_budget: Optional[int], block_size: int) -> int:
    if dense_below is not None:
        return dense_below
    return max(2 * block_size, 0 if min_budget is None else min_budget)


@dataclass
class FlexPrefill:
    """Settings of FlexPrefill sparse prefill attention (a validated dataclass; no run-time state).

    Parameters
    ----------
    gamma : float
        Cumulative attention mass each head's block set must reach, in (0, 1]; 1 selects every causal block
        (dense). The paper uses 0.9-0.95.
    tau : float
        Pattern threshold, >= 0: a head whose Jensen-Shannon distance between the estimated and the true block
        distribution is ``< tau`` is query-aware, otherwise vertical-slash. 0: all vertical-slash; any value
        above ``sqrt(ln 2) ~ 0.833``: all query-aware.
    block_size : int
        16, 32, 64 or 128.
    min_budget, max_budget : int or None
        Per-head clamp of the vertical and slash line counts, in **tokens**, converted to blocks by
        ``ceil(tokens / block_size)``. None: 1 block (0 when ``max_budget`` is 0) / no upper limit. Both
        >= 0, ``min_budget <= max_budget``.
    dense_below : int or None
        Inputs with fewer query tokens than this run dense; default ``max(2 * block_size, min_budget)``.

    Examples
    --------
    >>> fp = FlexPrefill(gamma=0.9, tau=0.1, min_budget=1024)
    >>> fp.budget_blocks()
    (8, 2147483647)
    """

    gamma: float = 0.95
    tau: float = 0.1
    block_size: int = 128
    min_budget: Optional[int] = None
    max_budget: Optional[int] = None
    dense_below: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a setting is invalid (also after mutating a field)."""
        _validate("FlexPrefill", self.gamma, self.tau, self.block_size, self.min_budget, self.max_budget,
                  self.dense_below)

    def budget_blocks(self) -> tuple[int, int]:
        """``(min_blocks, max_blocks)``: the token budgets in blocks, ``ceil(tokens / block_size)``."""
        return _budget_blocks(self.min_budget, self.max_budget, self.block_size)

    @property
    def dense_threshold(self) -> int:
        """Query lengths below this run dense (``dense_below`` or its default)."""
        return _dense_below(self.dense_below, self.min_budget, self.block_size)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  return_pattern: bool = False):
        """:func:`flex_prefill_attention` with these settings."""
        return flex_prefill_attention(q, k, v, gamma=self.gamma, tau=self.tau, block_size=self.block_size,
                                      min_budget=self.min_budget, max_budget=self.max_budget, scale=scale,
                                      return_pattern=return_pattern, dense_below=self.dense_below)


def diag_blocks(q_len: int, kv_len: int, block_size: int, device=None) -> torch.Tensor:
    """int64 ``[ceil(q_len / bs)]``: per query block r, the key block of its last query (the queries are the last
    ``q_len`` of ``kv_len`` positions). Row r may list the key blocks ``c <= d(r)``, the diagonal included."""
    r = torch.arange(-(-q_len // block_size), device=device, dtype=torch.int64)
    last_query = (kv_len - q_len) + torch.clamp((r + 1) * block_size, max=q_len) - 1
    return torch.div(last_query, block_size, rounding_mode="floor")


# ---------------------------------------------------------------------------------------------------------------
# pattern


@dataclass
class FlexPattern:
    """The sparse pattern one :func:`flex_prefill_attention` call used (all tensors stay on the device).

    Attributes
    ----------
    block_idx : Tensor [B, H, nbq, nb] int32
        Key blocks of each query block, ascending in the first ``block_cnt`` entries.
    block_cnt : Tensor [B, H, nbq] int32
    is_query_aware : Tensor [B, H] bool
        Query-aware heads (all False on the dense path).
    js_distance : Tensor [B, H] float32 or None
        Jensen-Shannon distance of every head (None on the dense path).
    q_len, kv_len, block_size : int
    dense : bool
        True when the call ran dense (short input or decode).
    """

    block_idx: torch.Tensor
    block_cnt: torch.Tensor
    is_query_aware: torch.Tensor
    js_distance: Optional[torch.Tensor]
    q_len: int
    kv_len: int
    block_size: int
    dense: bool

    def causal_blocks(self) -> torch.Tensor:
        """int64 [nbq]: causal key blocks of each query block, ``d(r) + 1``."""
        return diag_blocks(self.q_len, self.kv_len, self.block_size, self.block_cnt.device) + 1

    def head_ratio(self) -> torch.Tensor:
        """float32 [B, H]: computed blocks / causal blocks per head, in (0, 1] (1 = dense)."""
        total = self.causal_blocks().sum().clamp(min=1)
        return (self.block_cnt.sum(-1).double() / total).float()

    def ratio(self) -> torch.Tensor:
        """float32 scalar tensor: computed blocks / causal blocks over all heads and sequences."""
        B, H = self.block_cnt.shape[:2]
        total = (self.causal_blocks().sum() * (B * H)).clamp(min=1)
        return (self.block_cnt.sum().double() / total).float()


def pattern_report(pattern: FlexPattern) -> dict:
    """Plain-Python summary of a :class:`FlexPattern` (synchronises with the device; for tuning and benchmarks).

    Returns
    -------
    dict with ``ratio`` (float, computed / causal blocks overall), ``head_ratio`` (list [B][H] of floats),
    ``query_aware_fraction`` (float), ``is_query_aware`` (list [B][H] of bools), ``js_distance`` (list [B][H] or
    None), ``dense`` (bool), ``q_len``, ``kv_len``, ``block_size``, ``computed_blocks`` and ``causal_blocks``
    (ints, summed over batch and heads).
    """
    if not isinstance(pattern, FlexPattern):
        raise ValueError(f"pattern_report: pattern must be a FlexPattern, got {type(pattern).__name__}")
    B, H = pattern.block_cnt.shape[:2]
    qa = pattern.is_query_aware
    return {
        "ratio": float(pattern.ratio()),
        "head_ratio": pattern.head_ratio().cpu().tolist(),
        "query_aware_fraction": float(qa.float().mean()) if qa.numel() else 0.0,
        "is_query_aware": qa.cpu().tolist(),
        "js_distance": None if pattern.js_distance is None else pattern.js_distance.cpu().tolist(),
        "dense": pattern.dense,
        "q_len": pattern.q_len,
        "kv_len": pattern.kv_len,
        "block_size": pattern.block_size,
        "computed_blocks": int(pattern.block_cnt.sum()),
        "causal_blocks": int(pattern.causal_blocks().sum()) * B * H,
    }


# ---------------------------------------------------------------------------------------------------------------
# the pooled query-aware map


def _block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, N, h, D] -> fp32 [B, ceil(N / bs), h, D]: mean of the real tokens of every block (grid from 0)."""
    B, N, h, D = x.shape
    nblk = -(-N // block_size)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, nblk * block_size - N))
    counts = (N - torch.arange(nblk, device=x.device) * block_size).clamp(max=block_size).float()
    return xf.reshape(B, nblk, block_size, h, D).sum(dim=2) / counts.view(1, nblk, 1, 1)


def flex_qa_map(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: Optional[float] = None) -> torch.Tensor:
    """Pooled block attention map of the query-aware heads (vectorised, GQA without repeating K).

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries, the last Nq of the Nk positions.
    k : Tensor [B, Nk, Hk, D]
        Keys, H % Hk == 0 (query head h reads KV head ``h // (H // Hk)``).
    block_size : int
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor [B, H, nbq, nb] float32: row r is ``softmax_c(scale * qbar_r . kbar_c)`` over the causal key blocks
    ``c <= d(r)`` (diagonal included, see ``select_blocks``), 0 elsewhere; ``qbar_r`` = mean of the queries of
    query block r (grid from the first query), ``kbar_c`` = mean of the keys of key block c.
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qbar = _block_mean(q, block_size) * s  # [B, nbq, H, D]
    kbar = _block_mean(k, block_size)  # [B, nb, Hk, D]
    nbq, nb = qbar.shape[1], kbar.shape[1]
    logits = torch.einsum("brkgd,bckd->bkgrc", qbar.reshape(B, nbq, Hk, G, D), kbar).reshape(B, H, nbq, nb)
    d = diag_blocks(Nq, Nk, block_size, q.device)
    causal = torch.arange(nb, device=q.device)[None, :] <= d[:, None]  # [nbq, nb]
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# attention


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flex_prefill_attention: {name} must be a 4-D tensor [B, N, heads, D], got {shape}")
    B, Nq, H, D = q.shape
    if v.shape != k.shape:
        raise ValueError(f"flex_prefill_attention: v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flex_prefill_attention: k must be [B={B}, Nk, Hk, D={D}], got {list(k.shape)}")
    Nk, Hk = k.shape[1], k.shape[2]
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"flex_prefill_attention: the KV heads Hk={Hk} must divide the query heads H={H}")
    if Nq > Nk:
        raise ValueError(f"flex_prefill_attention: q length Nq={Nq} must be <= the k length Nk={Nk} (queries are "
                         "the last Nq positions)")


def _all_causal_blocks(B: int, H: int, q_len: int, kv_len: int, block_size: int, device):
    """Every causal block of every row: (block_idx [B, H, nbq, nb] int32, block_cnt [B, H, nbq] int32)."""
    nb = -(-kv_len // block_size)
    d = diag_blocks(q_len, kv_len, block_size, device)  # [nbq]
    nbq = d.shape[0]
    cols = torch.arange(nb, device=device, dtype=torch.int32)
    idx = torch.where(cols[None, :] <= d[:, None], cols[None, :], torch.zeros_like(cols)[None, :])
    idx = idx.expand(B, H, nbq, nb).contiguous()
    cnt = (d + 1).to(torch.int32).expand(B, H, nbq).contiguous()
    return idx, cnt


def flex_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: float = 0.95,
    tau: float = 0.1,
    block_size: int = 128,
    min_budget: Optional[int] = None,
    max_budget: Optional[int] = None,
    scale: Optional[float] = None,
    return_pattern: bool = False,
    dense_below: Optional[int] = None,
):
    """FlexPrefill causal attention: estimate each head's pattern, select blocks, attend only to them.

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries (RoPE applied), the LAST Nq of the Nk positions (query i sits at ``Nk - Nq + i``); float32
        (CPU), float16 or bfloat16; last dim contiguous, other strides free.
    k, v : Tensor [B, Nk, Hk, D]
        Keys and values, same dtype and device, H % Hk == 0 (never repeated), Nq <= Nk.
    gamma, tau, block_size, min_budget, max_budget, dense_below
        As in :class:`FlexPrefill` (budgets in tokens).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    return_pattern : bool
        Also return the :class:`FlexPattern` used.

    Returns
    -------
    out : Tensor [B, Nq, H, D] in q's dtype
    lse : Tensor [B, H, Nq] float32, natural-log log-sum-exp of the attended logits (to merge chunks)
    pattern : FlexPattern, only with ``return_pattern``

    Raises
    ------
    ValueError
        Invalid settings (naming the argument) or inconsistent q/k/v shapes.
    """
    _validate("flex_prefill_attention", gamma, tau, block_size, min_budget, max_budget, dense_below)
    _check_qkv(q, k, v)
    B, Nq, H, _ = q.shape
    Nk = k.shape[1]
    bs = block_size
    if Nq <= 1 or Nq < _dense_below(dense_below, min_budget, bs):
        idx, cnt = _all_causal_blocks(B, H, Nq, Nk, bs, q.device)
        out, lse = ops.block_sparse_attention(q, k, v, idx, cnt, bs, scale, True)
        if not return_pattern:
            return out, lse
        qa = torch.zeros(B, H, dtype=torch.bool, device=q.device)
        return out, lse, FlexPattern(idx, cnt, qa, None, Nq, Nk, bs, True)

    vertical, slash, estimate = ops.flex_estimate(q, k, bs, scale)
    jsd = ops.js_divergence(estimate, vertical)  # [B, H]
    qa = jsd < float(tau)
    qa_map = flex_qa_map(q, k, bs, scale)
    lo, hi = _budget_blocks(min_budget, max_budget, bs)
    idx, cnt = ops.select_blocks(vertical, slash, qa_map, qa, Nq, Nk, bs, float(gamma), lo, hi)
    out, lse = ops.block_sparse_attention(q, k, v, idx, cnt, bs, scale, True)
    if not return_pattern:
        return out, lse
    return out, lse, FlexPattern(idx, cnt, qa, jsd, Nq, Nk, bs, False)
