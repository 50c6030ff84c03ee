"""Pure-PyTorch FlexPrefill ops: block_sparse_attention, js_divergence, flex_estimate,
select_blocks.

reference_block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale, causal,
                                 cu_seqlens_q, cu_seqlens_k)
                                                      -> out [B, Nq, H, D], lse fp32 [B, H, Nq]
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import _MAX_HEAD_DIM, _SCORE_DTYPES, _fail, _shape

__all__ = [
    "reference_block_sparse_attention",
    "block_sparse_allowed_mask",
    "block_sparse_block_mask",
    "check_block_sparse_attention_args",
    "reference_js_divergence",
    "reference_flex_estimate",
    "flex_num_blocks",
    "check_js_divergence_args",
    "check_flex_estimate_args",
    "reference_select_blocks",
    "select_diag_blocks",
    "check_select_blocks_args",
    "reference_block_sparse_attention_paged",
    "reference_flex_estimate_paged",
    "check_paged_args",
    "gather_paged_kv",
]

# ---------------------------------------------------------------------------------------------
# block_sparse_attention (FlexPrefill)
# ---------------------------------------------------------------------------------------------
_BSA_BLOCK_SIZES = (16, 32, 64, 128)


def check_block_sparse_attention_args(q, k, v, block_idx, block_cnt, block_size, scale=None,
                                      causal=True, cu_seqlens_q=None, cu_seqlens_k=None, *,
                                      check_values: bool = True) -> None:
    """Argument checks of ``block_sparse_attention`` (the CPU kernel's, message for message)."""
    op = "block_sparse_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("block_idx", block_idx),
                    ("block_cnt", block_cnt)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor or None, got {type(t).__name__}")
    if q.dim() != 4:
        _fail(op, f"q must be a 4-D tensor [B, Nq, H, D], got shape {_shape(q)}")
    if k.dim() != 4:
        _fail(op, f"k must be a 4-D tensor [B, Nk, Hk, D], got shape {_shape(k)}")
    if v.dim() != 4:
        _fail(op, f"v must be a 4-D tensor [B, Nk, Hk, D], got shape {_shape(v)}")
    for name, t in (("k", k), ("v", v), ("block_idx", block_idx), ("block_cnt", block_cnt)):
        if t.device != q.device:
            _fail(op, f"{name} must be on the device of q ({q.device}), got {t.device}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        given = "cu_seqlens_q" if cu_seqlens_q is not None else "cu_seqlens_k"
        _fail(op, f"cu_seqlens_q and cu_seqlens_k must be given together (packed varlen mode), "
                  f"got only {given}")
    varlen = cu_seqlens_q is not None
    if varlen:
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.device != q.device:
                _fail(op, f"{name} must be on the device of q ({q.device}), got {t.device}")
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.dtype != torch.int32:
                _fail(op, f"{name} must be int32, got {t.dtype}")
        if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
            _fail(op, f"cu_seqlens_q must be a 1-D tensor [S + 1] (S sequences), got shape "
                      f"{_shape(cu_seqlens_q)}")
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            _fail(op, f"cu_seqlens_k must have the shape of cu_seqlens_q {_shape(cu_seqlens_q)} "
                      f"(one entry per sequence + 1), got {_shape(cu_seqlens_k)}")
    if q.dtype not in _SCORE_DTYPES:
        _fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        _fail(op, f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if v.dtype != q.dtype:
        _fail(op, f"v must have the dtype of q ({q.dtype}), got {v.dtype}")
    B, Nq, H, D = q.shape
    _, Nk, Hk, _ = k.shape
    if k.shape[0] != B:
        _fail(op, f"k must have the batch size of q ({B}), got {k.shape[0]}")
    if varlen and B != 1:
        _fail(op, f"q must have batch size 1 in varlen mode (sequences packed along dim 1), "
                  f"got B={B}")
    if v.shape != k.shape:
        _fail(op, f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        _fail(op, f"q head dim D must be in [1, 256], got {D}")
    if k.shape[3] != D:
        _fail(op, f"k head dim must equal q head dim ({D}), got {k.shape[3]}")
    if Hk < 1 or H % Hk != 0:
        _fail(op, f"k heads Hk must be >= 1 and divide the q heads H={H}, got Hk={Hk}")
    if Nq > Nk:
        _fail(op, f"q length Nq must be <= the k length Nk={Nk}, got Nq={Nq}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and D != 1:
            _fail(op, f"{name} must have a contiguous last dim, got strides {list(t.stride())}")
    if block_size not in _BSA_BLOCK_SIZES:
        _fail(op, f"block_size must be 16, 32, 64 or 128, got {block_size}")
    nbq, nbk = -(-Nq // block_size), -(-Nk // block_size)
    if block_idx.dtype != torch.int32:
        _fail(op, f"block_idx must be int32, got {block_idx.dtype}")
    if block_cnt.dtype != torch.int32:
        _fail(op, f"block_cnt must be int32, got {block_cnt.dtype}")
    if varlen:
        _check_block_sparse_varlen(op, block_idx, block_cnt, cu_seqlens_q, cu_seqlens_k, Nq, Nk,
                                   H, block_size, check_values)
        if scale is not None and not math.isfinite(scale):
            _fail(op, f"scale must be finite, got {scale}")
        return
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, H, nbq):
        _fail(op, f"block_idx must have shape [B, H, nbq, max_k] = [{B}, {H}, {nbq}, max_k] "
                  f"(nbq = ceil(Nq / block_size)), got {_shape(block_idx)}")
    if block_cnt.dim() != 3 or tuple(block_cnt.shape) != (B, H, nbq):
        _fail(op, f"block_cnt must have shape [B, H, nbq] = [{B}, {H}, {nbq}], "
                  f"got {_shape(block_cnt)}")
    max_k = block_idx.shape[3]
    if check_values and block_cnt.numel():
        bad = (block_cnt < 0) | (block_cnt > max_k)
        if bool(bad.any()):
            t = int(bad.flatten().nonzero()[0])
            _fail(op, f"block_cnt values must be in [0, max_k={max_k}], got "
                      f"{int(block_cnt.flatten()[t])} at flat index {t}")
        listed = torch.arange(max_k, device=block_idx.device) < block_cnt.unsqueeze(-1).long()
        badc = listed & ((block_idx < 0) | (block_idx >= nbk))
        if bool(badc.any()):
            flat = int(badc.flatten().nonzero()[0])
            _fail(op, f"block_idx values must be in [0, nbk={nbk}) (nbk = ceil(Nk / block_size)), "
                      f"got {int(block_idx.flatten()[flat])} at row {flat // max_k} "
                      f"entry {flat % max_k}")
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")


def _check_block_sparse_varlen(op, block_idx, block_cnt, cu_seqlens_q, cu_seqlens_k, total_q,
                               total_k, H, block_size, check_values) -> None:
    """The varlen part of ``check_block_sparse_attention_args``: index shapes, then (when
    ``check_values``) the offsets and the index entries of every sequence's used rows."""
    S = cu_seqlens_q.shape[0] - 1
    if block_idx.dim() != 4 or tuple(block_idx.shape[:2]) != (S, H):
        _fail(op, f"block_idx must have shape [S, H, nbq_max, max_k] = [{S}, {H}, nbq_max, max_k] "
                  f"in varlen mode (S = len(cu_seqlens_q) - 1), got {_shape(block_idx)}")
    nbq_max, max_k = block_idx.shape[2], block_idx.shape[3]
    if block_cnt.dim() != 3 or tuple(block_cnt.shape) != (S, H, nbq_max):
        _fail(op, f"block_cnt must have shape [S, H, nbq_max] = [{S}, {H}, {nbq_max}] in varlen "
                  f"mode, got {_shape(block_cnt)}")
    if not check_values:
        return
    for name, packed, cu, total in (("cu_seqlens_q", "q", cu_seqlens_q, total_q),
                                    ("cu_seqlens_k", "k", cu_seqlens_k, total_k)):
        c = cu.tolist()
        if c[0] != 0:
            _fail(op, f"{name}[0] must be 0, got {c[0]}")
        for s in range(S):
            if c[s + 1] < c[s]:
                _fail(op, f"{name} must be non-decreasing, got {name}[{s + 1}]={c[s + 1]} < "
                          f"{name}[{s}]={c[s]}")
        if c[S] != total:
            _fail(op, f"{name}[-1] must equal the packed length (dim 1 of {packed} = {total}), "
                      f"got {c[S]}")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(S):
        nq, nk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        if nq > nk:
            _fail(op, f"sequence {s} has nq={nq} queries > nk={nk} keys (cu_seqlens_q / "
                      f"cu_seqlens_k); its queries must be the last nq of its nk positions")
        if -(-nq // block_size) > nbq_max:
            _fail(op, f"block_idx dim 2 (nbq_max={nbq_max}) must be >= ceil(nq / block_size)="
                      f"{-(-nq // block_size)} of sequence {s} (nq={nq})")
    idx, cnt = block_idx.cpu(), block_cnt.cpu()
    for s in range(S):
        nbq_s, nk = -(-(cq[s + 1] - cq[s]) // block_size), ck[s + 1] - ck[s]
        nbk_s = -(-nk // block_size)
        for h in range(H):
            for r in range(nbq_s):
                n = int(cnt[s, h, r])
                if not 0 <= n <= max_k:
                    _fail(op, f"block_cnt values must be in [0, max_k={max_k}], got {n} at "
                              f"sequence {s} head {h} query block {r}")
                for e, c in enumerate(idx[s, h, r, :n].tolist()):
                    if not 0 <= c < nbk_s:
                        _fail(op, f"block_idx values must be in [0, nbk={nbk_s}) of sequence {s} "
                                  f"(nbk = ceil(nk / block_size), nk={nk}), got {c} at sequence "
                                  f"{s} head {h} query block {r} entry {e}")


def block_sparse_allowed_mask(block_idx: torch.Tensor, block_cnt: torch.Tensor, Nq: int, Nk: int,
                              block_size: int, causal: bool = True) -> torch.Tensor:
    """Bool ``[B, H, Nq, Nk]``: key j is attended by query i (listed block and, if causal,
    ``j <= Nk - Nq + i``). Entries of ``block_idx`` past ``block_cnt`` are ignored."""
    B, H, nbq, max_k = block_idx.shape
    nbk = -(-Nk // block_size)
    dev = block_idx.device
    listed = torch.arange(max_k, device=dev) < block_cnt.unsqueeze(-1).long()  # [B, H, nbq, K]
    cols = torch.where(listed, block_idx.long(), torch.full_like(block_idx, nbk, dtype=torch.long))
    grid = torch.zeros(B, H, nbq, nbk + 1, dtype=torch.bool, device=dev)
    grid.scatter_(3, cols, True)
    grid = grid[..., :nbk]
    qb = torch.arange(Nq, device=dev) // block_size
    kb = torch.arange(Nk, device=dev) // block_size
    mask = grid[:, :, qb][:, :, :, kb]  # [B, H, Nq, Nk]
    if causal:
        pos = torch.arange(Nq, device=dev) + (Nk - Nq)
        mask = mask & (torch.arange(Nk, device=dev)[None, :] <= pos[:, None])
    return mask


def reference_block_sparse_attention(
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
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention over the listed key blocks, in ``dtype`` (fp32 by default).

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]; k, v : Tensor [B, Nk, Hk, D]
        Same dtype (fp32/fp16/bf16), H % Hk == 0, Nq <= Nk; query i sits at position
        ``Nk - Nq + i``.
    block_idx : Tensor [B, H, nbq, max_k] int32
        Key-block columns of query block r in its first ``block_cnt[b, h, r]`` entries.
    block_cnt : Tensor [B, H, nbq] int32, values in [0, max_k]
    block_size : int
        16, 32, 64 or 128; ``nbq = ceil(Nq / bs)``, ``nbk = ceil(Nk / bs)``.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    causal : bool
        Mask keys past the query's position.
    cu_seqlens_q, cu_seqlens_k : Tensor [S + 1] int32, optional (both or neither)
        Packed varlen: B = 1, sequence s is the dense problem on q rows
        ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` and k/v rows ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]``
        with index rows ``block_idx[s, :, :ceil(nq_s / bs)]`` (block_idx [S, H, nbq_max, max_k],
        block_cnt [S, H, nbq_max]).

    Returns
    -------
    out : Tensor [B, Nq, H, D] in q's dtype; lse : Tensor [B, H, Nq] float32 (natural log;
    a row with no visible key gets out 0 and lse -inf).
    """
    check_block_sparse_attention_args(q, k, v, block_idx, block_cnt, block_size, scale, causal,
                                      cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is None:
        return _dense_block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale,
                                             causal, dtype)
    # Packed varlen: every sequence on its own, by the dense formula on its slices.
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        nbq_s = -(-(cq[s + 1] - cq[s]) // block_size)
        o, l = _dense_block_sparse_attention(
            q[:, cq[s]:cq[s + 1]], k[:, ck[s]:ck[s + 1]], v[:, ck[s]:ck[s + 1]],
            block_idx[s:s + 1, :, :nbq_s], block_cnt[s:s + 1, :, :nbq_s], block_size, scale,
            causal, dtype)
        outs.append(o)
        lses.append(l)
    if not outs:  # S = 0: no sequence, total_q = 0
        return (q.new_empty(q.shape).contiguous(),
                torch.empty(1, q.shape[2], 0, dtype=torch.float32, device=q.device))
    return torch.cat(outs, dim=1).contiguous(), torch.cat(lses, dim=2).contiguous()


def _dense_block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale, causal,
                                  dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = q.to(dtype).transpose(1, 2)  # [B, H, Nq, D]
    kf = k.to(dtype).transpose(1, 2).repeat_interleave(G, dim=1)
    vf = v.to(dtype).transpose(1, 2).repeat_interleave(G, dim=1)
    mask = block_sparse_allowed_mask(block_idx, block_cnt, Nq, Nk, block_size, causal)
    logits = (qf @ kf.transpose(-1, -2)) * s
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits.float(), dim=-1)  # [B, H, Nq], -inf for empty rows
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = (p @ vf).transpose(1, 2).to(q.dtype).contiguous()
    return out, lse


def block_sparse_block_mask(block_idx: torch.Tensor, block_cnt: torch.Tensor, Nq: int, Nk: int,
                            block_size: int, causal: bool = True):
    """A ``torch.nn.attention.flex_attention.BlockMask`` equivalent to the block sets (for
    FlexAttention as a baseline). Partial blocks (causal diagonal) use a mask_mod; Nq must equal
    Nk or the offset ``Nk - Nq`` is folded into the mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    off = Nk - Nq
    nbk = -(-Nk // block_size)
    B, H, nbq, max_k = block_idx.shape
    cnt = block_cnt.to(torch.int32).contiguous()
    idx = block_idx.to(torch.int32)
    if max_k < nbk:  # FlexAttention wants nbk columns
        pad = torch.zeros(B, H, nbq, nbk - max_k, dtype=torch.int32, device=idx.device)
        idx = torch.cat([idx, pad], dim=-1)
    idx = idx[..., :nbk].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + off) if causal else (kv_idx >= 0)

    return BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(Nq, Nk))


# ---------------------------------------------------------------------------------------------
# FlexPrefill estimation: js_divergence, flex_estimate
# ---------------------------------------------------------------------------------------------

_JS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def flex_num_blocks(n: int, block_size: int) -> int:
    """``nb = ceil(n / block_size)`` key blocks of a sequence of ``n`` tokens."""
    if block_size < 1:
        raise ValueError(f"tasksieve.flex_num_blocks: block_size must be >= 1, got {block_size}")
    return -(-n // block_size) if n > 0 else 0


def check_js_divergence_args(p, q, eps) -> None:
    """The argument checks of ``js_divergence`` (same conditions and wording as the C++ ones)."""
    op = "js_divergence"
    if not isinstance(p, torch.Tensor):
        _fail(op, f"p must be a tensor [..., n], got {type(p).__name__}")
    if not isinstance(q, torch.Tensor):
        _fail(op, f"q must be a tensor [..., n], got {type(q).__name__}")
    if q.device != p.device:
        _fail(op, f"q must be on the device of p ({p.device}), got {q.device}")
    if p.dtype not in _JS_DTYPES:
        _fail(op, "p must be a float tensor (float32, float64, float16 or bfloat16), "
                  f"got {p.dtype}")
    if q.dtype != p.dtype:
        _fail(op, f"q must have the dtype of p ({p.dtype}), got {q.dtype}")
    if p.dim() < 1:
        _fail(op, "p must have at least 1 dim [..., n], got a 0-d tensor")
    if q.shape != p.shape:
        _fail(op, f"q must have the shape of p ({list(p.shape)}), got {list(q.shape)}")
    if p.shape[-1] < 1:
        _fail(op, f"the last dim n of p must be >= 1, got {p.shape[-1]}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        _fail(op, f"eps must be finite and > 0, got {eps}")


def reference_js_divergence(
    p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12, *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Jensen-Shannon distance per row (``sqrt`` of the divergence, natural log).

    Each row of ``p`` and ``q`` is normalised to sum 1 (a row summing to 0 -- fully masked -- is
    treated as uniform; a negative or NaN sum gives NaN), clamped to ``>= eps`` and renormalised,
    so exact zeros never give NaN. Then ``D = sqrt(max(0, 1/2 sum p log(p/m) + 1/2 sum q
    log(q/m)))`` with ``m = (p + q) / 2``; range ``[0, sqrt(ln 2)]``.

    Parameters
    ----------
    p, q : Tensor [..., n]
        Same shape, dtype (float32, float64, float16 or bfloat16) and device; n >= 1.
    eps : float
        Clamp floor, finite and > 0.
    compute_dtype : torch.dtype
        float32 (default) or float64.

    Returns
    -------
    Tensor [...] float32.
    """
    check_js_divergence_args(p, q, eps)
    n = p.shape[-1]

    def norm(x):
        x = x.to(compute_dtype)
        s = x.sum(-1, keepdim=True)
        uniform = torch.full_like(x, 1.0 / n)
        nan = torch.full_like(x, float("nan"))
        x = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.where(s == 0, uniform, nan))
        x = torch.where(x < eps, torch.full_like(x, eps), x)  # NaN stays NaN
        return x / x.sum(-1, keepdim=True)

    pn, qn = norm(p), norm(q)
    m = 0.5 * (pn + qn)
    d2 = 0.5 * (pn * torch.log(pn / m)).sum(-1) + 0.5 * (qn * torch.log(qn / m)).sum(-1)
    d = torch.where(d2 > 0, d2, torch.zeros_like(d2)).sqrt()  # NaN propagates
    return d.to(torch.float32)


def check_flex_estimate_args(q, k, block_size, scale=None) -> None:
    """The argument checks of ``flex_estimate`` on CPU (same conditions and wording as the C++
    ones; the CUDA kernel also needs block_size in {16, 32, 64, 128})."""
    op = "flex_estimate"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _fail(op, f"q must be a 4-D tensor [B, Nq, H, D], got shape {_shape(q)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        _fail(op, f"k must be a 4-D tensor [B, Nk, Hk, D], got shape {_shape(k)}")
    if k.device != q.device:
        _fail(op, f"k must be on the device of q ({q.device}), got {k.device}")
    if q.dtype not in _SCORE_DTYPES:
        _fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        _fail(op, f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    B, Nq, H, D = q.shape
    _, Nk, Hk, Dk = k.shape
    if k.shape[0] != B:
        _fail(op, f"k must have the batch size of q ({B}), got {k.shape[0]}")
    if D < 1 or D > _MAX_HEAD_DIM:
        _fail(op, f"q head dim D must be in [1, {_MAX_HEAD_DIM}], got {D}")
    if Dk != D:
        _fail(op, f"k head dim must equal q head dim ({D}), got {Dk}")
    if Hk < 1 or H % Hk != 0:
        _fail(op, f"k heads Hk must be >= 1 and divide the q heads H={H}, got Hk={Hk}")
    if q.stride(3) != 1 and D > 1:
        _fail(op, f"q must be contiguous in the last dim (stride 1), got stride {q.stride(3)}")
    if k.stride(3) != 1 and D > 1:
        _fail(op, f"k must be contiguous in the last dim (stride 1), got stride {k.stride(3)}")
    if Nq > Nk:
        _fail(op, f"q length Nq must be <= the k length Nk={Nk} (queries are the last Nq "
                  f"positions), got Nq={Nq}")
    if not isinstance(block_size, int) or block_size < 1:
        _fail(op, f"block_size must be >= 1, got {block_size}")
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")


def reference_flex_estimate(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: Optional[float] = None, *,
    compute_dtype: torch.dtype = torch.float32,
):
    """FlexPrefill pattern estimation (flexprefill.md §1.3 steps 0-5), literally.

    The representative queries are the last ``m = min(block_size, Nq)`` queries; rep query r
    sits at position ``p_r = Nk - m + r`` (queries are the last Nq of Nk positions).
    ``A[r, j]`` = causal softmax over keys ``j <= p_r`` of ``scale * q_r . k_j`` per query head
    (KV head ``h // G``). With ``nb = ceil(Nk / block_size)``:

    - ``vertical[b, h, c] = (1/m) sum_r sum_{j in block c} A[r, j]``
    - ``slash[b, h, t] = (1/m) sum_r sum_{j: (p_r - j) // block_size == t} A[r, j]``
      (t = 0: the main block diagonal)
    - ``estimate[b, h, c] = softmax_c(scale * qbar . kbar_c)``, qbar = mean of the m rep queries,
      kbar_c = mean of the real keys of block c; no causal mask.

    Returns
    -------
    (vertical, slash, estimate), each float32 [B, H, nb]. Nq = 0 gives zeros.
    """
    check_flex_estimate_args(q, k, block_size, scale)
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    bs = block_size
    nb = flex_num_blocks(Nk, bs)
    m = min(bs, Nq)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dev = q.device
    zeros = [torch.zeros(B, H, nb, dtype=torch.float32, device=dev) for _ in range(3)]
    if B * H * nb == 0 or m == 0:
        return tuple(zeros)

    qr = q[:, Nq - m:].to(compute_dtype).permute(0, 2, 1, 3)  # [B, H, m, D]
    kk = k.to(compute_dtype).permute(0, 2, 1, 3).repeat_interleave(G, dim=1)  # [B, H, Nk, D]
    logits = scale * (qr @ kk.transpose(-1, -2))  # [B, H, m, Nk]
    pos = torch.arange(Nk - m, Nk, device=dev).view(m, 1)
    j = torch.arange(Nk, device=dev).view(1, Nk)
    visible = j <= pos
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)

    padded = torch.nn.functional.pad(probs, (0, nb * bs - Nk))
    vertical = padded.view(B, H, m, nb, bs).sum(dim=(2, 4)) / m
    t = ((pos - j).clamp_min(0) // bs).expand(B, H, m, Nk).reshape(B, H, m * Nk)
    masked = probs.masked_fill(~visible, 0.0).reshape(B, H, m * Nk)
    slash = torch.zeros(B, H, nb, dtype=compute_dtype, device=dev).scatter_add_(-1, t, masked) / m

    qbar = qr.mean(dim=2)  # [B, H, D]
    kp = torch.nn.functional.pad(k.to(compute_dtype), (0, 0, 0, 0, 0, nb * bs - Nk))
    counts = (torch.arange(nb, device=dev) * bs).neg().add(Nk).clamp(max=bs).to(compute_dtype)
    kbar = kp.view(B, nb, bs, Hk, D).sum(dim=2) / counts.view(1, nb, 1, 1)  # [B, nb, Hk, D]
    kbar = kbar.permute(0, 2, 1, 3).repeat_interleave(G, dim=1)  # [B, H, nb, D]
    est = torch.softmax(scale * (kbar @ qbar.unsqueeze(-1)).squeeze(-1), dim=-1)
    return (vertical.to(torch.float32).contiguous(), slash.to(torch.float32).contiguous(),
            est.to(torch.float32).contiguous())


# ---------------------------------------------------------------------------------------------
# select_blocks (FlexPrefill)
# ---------------------------------------------------------------------------------------------

def select_diag_blocks(q_len: int, kv_len: int, block_size: int, device=None) -> torch.Tensor:
    """int64 ``[nbq]``: the diagonal key block ``d(r) = (kv_len - q_len + min((r+1)*bs, q_len)
    - 1) // bs`` of each query block r (the block of its last query; queries are the last
    q_len of kv_len positions). Row r may only list blocks ``c <= d(r)``."""
    nbq = flex_num_blocks(q_len, block_size)
    r = torch.arange(nbq, device=device, dtype=torch.int64)
    last = kv_len - q_len + torch.clamp((r + 1) * block_size, max=q_len) - 1
    return torch.div(last, block_size, rounding_mode="floor")


def check_select_blocks_args(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size,
                             gamma, min_blocks, max_blocks) -> None:
    """The argument checks of ``select_blocks`` (same conditions and wording as the C++ ones)."""
    op = "select_blocks"
    for name, t in (("vertical", vertical), ("slash", slash), ("qa_map", qa_map),
                    ("is_query_aware", is_query_aware)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    for name, t in (("slash", slash), ("qa_map", qa_map), ("is_query_aware", is_query_aware)):
        if t.device != vertical.device:
            _fail(op, f"{name} must be on the device of vertical ({vertical.device}), "
                      f"got {t.device}")
    for name, t in (("vertical", vertical), ("slash", slash), ("qa_map", qa_map)):
        if t.dtype != torch.float32:
            _fail(op, f"{name} must be float32, got {t.dtype}")
    if is_query_aware.dtype != torch.bool:
        _fail(op, f"is_query_aware must be bool, got {is_query_aware.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        _fail(op, f"block_size must be >= 1, got {block_size}")
    if not 0 <= q_len <= kv_len:
        _fail(op, f"q_len must be in [0, kv_len={kv_len}] (queries are the last q_len "
                  f"positions), got q_len={q_len}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0 < gamma <= 1):
        _fail(op, f"gamma must be in (0, 1], got {gamma}")
    if min_blocks < 0:
        _fail(op, f"min_blocks must be >= 0, got {min_blocks}")
    if max_blocks < min_blocks:
        _fail(op, f"max_blocks must be >= min_blocks={min_blocks}, got {max_blocks}")
    nb, nbq = flex_num_blocks(kv_len, block_size), flex_num_blocks(q_len, block_size)
    if vertical.dim() != 3 or vertical.shape[2] != nb:
        _fail(op, f"vertical must have shape [B, H, nb] with nb = ceil(kv_len / block_size) = "
                  f"{nb}, got {_shape(vertical)}")
    B, H = vertical.shape[:2]
    if slash.shape != vertical.shape:
        _fail(op, f"slash must have the shape of vertical ({_shape(vertical)}), "
                  f"got {_shape(slash)}")
    if tuple(qa_map.shape) != (B, H, nbq, nb):
        _fail(op, f"qa_map must have shape [B, H, nbq, nb] = [{B}, {H}, {nbq}, {nb}] "
                  f"(nbq = ceil(q_len / block_size)), got {_shape(qa_map)}")
    if tuple(is_query_aware.shape) != (B, H):
        _fail(op, f"is_query_aware must have shape [B, H] = [{B}, {H}], "
                  f"got {_shape(is_query_aware)}")


def _select_top(x: torch.Tensor, valid: torch.Tensor, n_fixed, by_mass: bool, gamma: float,
                lo: int, hi: int) -> torch.Tensor:
    """Bool mask of the top entries of each row of ``x`` [R, n] among ``valid`` (value desc,
    ties to the lower index). by_mass: n = clamp(n(x, gamma), lo, hi) where n(x, gamma) = the
    fewest sorted entries whose float64 prefix sum reaches gamma * (their total, the last prefix
    sum); else n = n_fixed. Always n <= number of valid entries."""
    x = torch.where(x > 0, x, torch.zeros_like(x))  # NaN, -0 and negatives count as +0
    ranked = torch.where(valid, x, torch.full_like(x, float("-inf")))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    nvalid = valid.sum(-1)
    if by_mass:
        c = torch.cumsum(torch.gather(torch.where(valid, x, torch.zeros_like(x)), -1,
                                      order).double(), dim=-1)
        last = c.gather(-1, (nvalid - 1).clamp(min=0).unsqueeze(-1))
        reach = (c >= gamma * last) & (torch.arange(x.shape[-1], device=x.device) < nvalid[:, None])
        n = torch.where(reach.any(-1), reach.double().argmax(-1) + 1, nvalid)
        n = n.clamp(min=lo, max=hi)
    else:
        n = torch.full_like(nvalid, n_fixed)
    n = torch.minimum(n, nvalid)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return (rank < n[:, None]) & valid


def reference_select_blocks(vertical: torch.Tensor, slash: torch.Tensor, qa_map: torch.Tensor,
                            is_query_aware: torch.Tensor, q_len: int, kv_len: int,
                            block_size: int, gamma: float, min_blocks: int, max_blocks: int):
    """FlexPrefill block selection (flexprefill.md §1.3 steps 3, 6-10, with the §2 fixes), the
    literal contract of ``select_blocks`` in ``csrc/ops.cpp``.

    Per (b, h): vertical-slash heads take the top ``nv = min(clamp(n(vertical, gamma),
    min_blocks, max_blocks), nb)`` columns and the top ``ns`` (same rule on slash) diagonal
    offsets; query-aware heads take the top ``min(min_blocks, nb)`` columns and offsets (the
    skeleton) plus the top ``n(causal entries of qa_map[b, h], gamma)`` entries of the flattened
    map (global across rows). Row r then lists every causal block ``c <= d(r)`` that is column 0,
    the diagonal ``d(r)``, a selected column, on a selected offset ``d(r) - c`` or a selected
    map entry.

    Returns
    -------
    (block_idx int32 [B, H, nbq, nb] ascending per row, 0-padded; block_cnt int32 [B, H, nbq]).
    """
    check_select_blocks_args(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size,
                             gamma, min_blocks, max_blocks)
    B, H, nb = vertical.shape
    nbq = qa_map.shape[2]
    dev = vertical.device
    if B * H * nbq * nb == 0:
        return (torch.zeros(B, H, nbq, nb, dtype=torch.int32, device=dev),
                torch.zeros(B, H, nbq, dtype=torch.int32, device=dev))
    d = select_diag_blocks(q_len, kv_len, block_size, dev)  # [nbq]
    c = torch.arange(nb, device=dev)
    causal = c[None, :] <= d[:, None]  # [nbq, nb]
    qa = is_query_aware.reshape(B * H, 1)
    all_valid = torch.ones(B * H, nb, dtype=torch.bool, device=dev)
    sel = {}
    for name, x in (("v", vertical), ("s", slash)):
        x = x.reshape(B * H, nb)
        vs = _select_top(x, all_valid, 0, True, gamma, min_blocks, max_blocks)
        skel = _select_top(x, all_valid, min(min_blocks, nb), False, gamma, 0, 0)
        sel[name] = torch.where(qa, skel, vs).reshape(B, H, nb)
    m = qa_map.reshape(B * H, nbq * nb)
    q_sel = _select_top(m, causal.reshape(1, -1).expand(B * H, -1), 0, True, gamma, 0,
                        nbq * nb + 1)
    q_sel = (q_sel & qa).reshape(B, H, nbq, nb)
    off = (d[:, None] - c[None, :]).clamp(0, max(nb - 1, 0))  # [nbq, nb] offset of (r, c)
    on_slash = torch.gather(sel["s"][:, :, None, :].expand(B, H, nbq, nb), -1,
                            off.expand(B, H, nbq, nb))
    keep = (c == 0) | (c[None, :] == d[:, None])  # [nbq, nb]
    mask = causal & (keep | sel["v"][:, :, None, :] | on_slash | q_sel)
    cnt = mask.sum(-1).to(torch.int32)
    sort_key = torch.where(mask, c, c + nb)
    cols = torch.sort(sort_key, dim=-1).values
    listed = torch.arange(nb, device=dev) < cnt[..., None]
    idx = torch.where(listed, cols, torch.zeros_like(cols)).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


# ---------------------------------------------------------------------------------------------
# Paged-KV forms: block_sparse_attention_paged, flex_estimate_paged
# ---------------------------------------------------------------------------------------------


def check_paged_args(op, q, k_cache, v_cache, block_table, seq_lens_k, cu_seqlens_q, block_size,
                     scale=None, block_idx=None, block_cnt=None, *, check_values: bool = True):
    """Argument checks of the paged ops on CPU (``op`` = "block_sparse_attention_paged" with
    ``v_cache`` and the index, or "flex_estimate_paged" with ``v_cache`` None), in the C++ order
    and wording. Returns ``(S, packed)``."""
    attn = op == "block_sparse_attention_paged"
    tensors = [("q", q), ("k_cache", k_cache), ("block_table", block_table),
               ("seq_lens_k", seq_lens_k)]
    if attn:
        tensors += [("v_cache", v_cache), ("block_idx", block_idx), ("block_cnt", block_cnt)]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if cu_seqlens_q is not None and not isinstance(cu_seqlens_q, torch.Tensor):
        _fail(op, f"cu_seqlens_q must be a tensor or None, got {type(cu_seqlens_q).__name__}")
    if q.dim() != 4:
        _fail(op, f"q must be a 4-D tensor [S, Nq, H, D] (or [1, total_q, H, D] with "
                  f"cu_seqlens_q), got shape {_shape(q)}")
    if k_cache.dim() != 4:
        _fail(op, f"k_cache must be a 4-D tensor [num_pages, page_size, Hk, D], got shape "
                  f"{_shape(k_cache)}")
    if attn and v_cache.dim() != 4:
        _fail(op, f"v_cache must be a 4-D tensor [num_pages, page_size, Hk, D], got shape "
                  f"{_shape(v_cache)}")
    devs = [("k_cache", k_cache)] + ([("v_cache", v_cache)] if attn else []) + [
        ("block_table", block_table), ("seq_lens_k", seq_lens_k)]
    if cu_seqlens_q is not None:
        devs.append(("cu_seqlens_q", cu_seqlens_q))
    for name, t in devs:
        if t.device != q.device:
            _fail(op, f"{name} must be on the device of q ({q.device}), got {t.device}")
    if q.dtype not in _SCORE_DTYPES:
        _fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in [("k_cache", k_cache)] + ([("v_cache", v_cache)] if attn else []):
        if t.dtype != q.dtype:
            _fail(op, f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if block_table.dtype != torch.int32:
        _fail(op, f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2:
        _fail(op, f"block_table must be a 2-D tensor [S, max_pages] (S sequences), got shape "
                  f"{_shape(block_table)}")
    S, max_pages = block_table.shape
    if seq_lens_k.dtype != torch.int32:
        _fail(op, f"seq_lens_k must be int32, got {seq_lens_k.dtype}")
    if seq_lens_k.dim() != 1 or seq_lens_k.shape[0] != S:
        _fail(op, f"seq_lens_k must have shape [S] = [{S}] (block_table dim 0), got "
                  f"{_shape(seq_lens_k)}")
    packed = cu_seqlens_q is not None
    B, Nq, H, D = q.shape
    if packed:
        if cu_seqlens_q.dtype != torch.int32:
            _fail(op, f"cu_seqlens_q must be int32, got {cu_seqlens_q.dtype}")
        if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != S + 1:
            _fail(op, f"cu_seqlens_q must have shape [S + 1] = [{S + 1}] (block_table dim 0 = S "
                      f"sequences), got {_shape(cu_seqlens_q)}")
        if B != 1:
            _fail(op, f"q must have batch size 1 with cu_seqlens_q (sequences packed along dim "
                      f"1), got B={B}")
    elif B != S:
        _fail(op, f"q must have one batch row per sequence (block_table dim 0 = S = {S}), got "
                  f"B={B}")
    if not 1 <= D <= _MAX_HEAD_DIM:
        _fail(op, f"q head dim D must be in [1, 256], got {D}")
    num_pages, page_size, Hk, Dk = k_cache.shape
    if Dk != D:
        _fail(op, f"k_cache head dim must equal q head dim ({D}), got {Dk}")
    if Hk < 1 or H % Hk != 0:
        _fail(op, f"k_cache heads Hk must be >= 1 and divide the q heads H={H}, got Hk={Hk}")
    if attn and v_cache.shape != k_cache.shape:
        _fail(op, f"v_cache must have the shape of k_cache {_shape(k_cache)}, got "
                  f"{_shape(v_cache)}")
    if page_size < 1:
        _fail(op, f"k_cache page size (dim 1) must be >= 1, got {page_size}")
    # the CPU ops read cache rows with any strides (vLLM's CPU pages hold K transposed)
    if q.stride(3) != 1 and D != 1:
        _fail(op, f"q must have a contiguous last dim, got strides {list(q.stride())}")
    nbq = None
    if attn:
        for name, t in (("block_idx", block_idx), ("block_cnt", block_cnt)):
            if t.device != q.device:
                _fail(op, f"{name} must be on the device of q ({q.device}), got {t.device}")
        if block_size not in _BSA_BLOCK_SIZES:
            _fail(op, f"block_size must be 16, 32, 64 or 128, got {block_size}")
        if block_idx.dtype != torch.int32:
            _fail(op, f"block_idx must be int32, got {block_idx.dtype}")
        if block_cnt.dtype != torch.int32:
            _fail(op, f"block_cnt must be int32, got {block_cnt.dtype}")
        if packed:
            if block_idx.dim() != 4 or tuple(block_idx.shape[:2]) != (S, H):
                _fail(op, f"block_idx must have shape [S, H, nbq_max, max_k] = [{S}, {H}, "
                          f"nbq_max, max_k] with cu_seqlens_q, got {_shape(block_idx)}")
        else:
            nbq_d = -(-Nq // block_size)
            if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (S, H, nbq_d):
                _fail(op, f"block_idx must have shape [S, H, nbq, max_k] = [{S}, {H}, {nbq_d}, "
                          f"max_k] (nbq = ceil(Nq / block_size)), got {_shape(block_idx)}")
        nbq = block_idx.shape[2]
        if block_cnt.dim() != 3 or tuple(block_cnt.shape) != (S, H, nbq):
            _fail(op, f"block_cnt must have shape [S, H, nbq] = [{S}, {H}, {nbq}], got "
                      f"{_shape(block_cnt)}")
    elif not isinstance(block_size, int) or block_size < 1:
        _fail(op, f"block_size must be >= 1, got {block_size}")
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")
    if not check_values:
        return S, packed
    cap = max_pages * page_size
    cq = cu_seqlens_q.tolist() if packed else None
    if packed:
        if cq[0] != 0:
            _fail(op, f"cu_seqlens_q[0] must be 0, got {cq[0]}")
        for s in range(S):
            if cq[s + 1] < cq[s]:
                _fail(op, f"cu_seqlens_q must be non-decreasing, got cu_seqlens_q[{s + 1}]="
                          f"{cq[s + 1]} < cu_seqlens_q[{s}]={cq[s]}")
        if cq[S] != Nq:
            _fail(op, f"cu_seqlens_q[-1] must equal the packed length (dim 1 of q = {Nq}), got "
                      f"{cq[S]}")
    lens, table = seq_lens_k.tolist(), block_table.tolist()
    for s in range(S):
        nk = lens[s]
        if not 0 <= nk <= cap:
            _fail(op, f"seq_lens_k[{s}]={nk} must be in [0, max_pages * page_size = {cap}] "
                      f"(block_table dim 1 = {max_pages}, k_cache dim 1 = {page_size})")
        used = -(-nk // page_size)
        for p in range(used):
            if not 0 <= table[s][p] < num_pages:
                _fail(op, f"block_table[{s}, {p}]={table[s][p]} must be a page of k_cache in "
                          f"[0, num_pages={num_pages}) (sequence {s} reads its first {used} "
                          f"pages)")
        if not packed:
            if Nq > nk:
                _fail(op, f"q length Nq={Nq} must be <= seq_lens_k[{s}]={nk} (every sequence's "
                          f"queries are its last Nq positions)")
        else:
            nq = cq[s + 1] - cq[s]
            if nq > nk:
                _fail(op, f"sequence {s} has nq={nq} queries > seq_lens_k[{s}]={nk} keys; its "
                          f"queries must be the last nq of its positions")
            if attn and -(-nq // block_size) > nbq:
                _fail(op, f"block_idx dim 2 (nbq_max={nbq}) must be >= ceil(nq / block_size)="
                          f"{-(-nq // block_size)} of sequence {s} (nq={nq})")
    if attn:
        max_k = block_idx.shape[3]
        idx, cnt = block_idx.cpu(), block_cnt.cpu()
        for s in range(S):
            nq = (cq[s + 1] - cq[s]) if packed else Nq
            nk = lens[s]
            nbk_s = -(-nk // block_size)
            for h in range(H):
                for r in range(-(-nq // block_size)):
                    n = int(cnt[s, h, r])
                    if not 0 <= n <= max_k:
                        _fail(op, f"block_cnt values must be in [0, max_k={max_k}], got {n} at "
                                  f"sequence {s} head {h} query block {r}")
                    for e, c in enumerate(idx[s, h, r, :n].tolist()):
                        if not 0 <= c < nbk_s:
                            _fail(op, f"block_idx values must be in [0, nbk={nbk_s}) of sequence "
                                      f"{s} (nbk = ceil(nk / block_size), nk={nk}), got {c} at "
                                      f"sequence {s} head {h} query block {r} entry {e}")
    return S, packed


def gather_paged_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_lens_k: torch.Tensor,
                    s: int) -> torch.Tensor:
    """The ``[seq_lens_k[s], Hk, D]`` rows of sequence s from a ``[num_pages, page_size, Hk, D]``
    cache, by plain indexing: page ``block_table[s, j // page_size]``, row ``j % page_size``."""
    nk = int(seq_lens_k[s])
    page_size = cache.shape[1]
    j = torch.arange(nk, device=cache.device)
    pages = block_table[s].to(cache.device).long()[j // page_size]
    return cache[pages, j % page_size]


def _paged_queries(q, cu_seqlens_q, S):
    """[(q rows of sequence s as [1, nq_s, H, D])] for every s."""
    if cu_seqlens_q is None:
        return [q[s:s + 1] for s in range(S)]
    cq = cu_seqlens_q.tolist()
    return [q[:, cq[s]:cq[s + 1]] for s in range(S)]


def reference_block_sparse_attention_paged(
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
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged-KV block-sparse attention: each sequence's keys and values are gathered from the
    pages (``gather_paged_kv``) and the dense masked formula is applied per sequence, in
    ``dtype``. q [S, Nq, H, D] (dense) or [1, total_q, H, D] with cu_seqlens_q [S + 1].

    Returns out (q's layout and dtype) and lse float32 [S, H, Nq] / [1, H, total_q]."""
    S, packed = check_paged_args("block_sparse_attention_paged", q, k_cache, v_cache,
                                 block_table, seq_lens_k, cu_seqlens_q, block_size, scale,
                                 block_idx, block_cnt)
    outs, lses = [], []
    for s, qs in enumerate(_paged_queries(q, cu_seqlens_q, S)):
        nbq_s = -(-qs.shape[1] // block_size)
        ks = gather_paged_kv(k_cache, block_table, seq_lens_k, s).unsqueeze(0)
        vs = gather_paged_kv(v_cache, block_table, seq_lens_k, s).unsqueeze(0)
        o, l = _dense_block_sparse_attention(qs, ks, vs, block_idx[s:s + 1, :, :nbq_s],
                                             block_cnt[s:s + 1, :, :nbq_s], block_size, scale,
                                             causal, dtype)
        outs.append(o)
        lses.append(l)
    if not outs:  # S = 0
        return (q.new_empty(q.shape).contiguous(),
                torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32,
                            device=q.device))
    cat = 1 if packed else 0
    return (torch.cat(outs, dim=cat).contiguous(),
            torch.cat(lses, dim=2 if packed else 0).contiguous())


def reference_flex_estimate_paged(
    q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens_k: torch.Tensor,
    block_size: int, scale: Optional[float] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
    *, compute_dtype: torch.dtype = torch.float32,
):
    """Paged-KV FlexPrefill estimation: per sequence, ``reference_flex_estimate`` of its queries
    and its keys gathered from the pages, in entries [0, ceil(nk_s / bs)) of its row of
    ``[S, H, nb_max]`` outputs (nb_max = ceil(max_pages * page_size / bs)), zeros past them."""
    S, _ = check_paged_args("flex_estimate_paged", q, k_cache, None, block_table, seq_lens_k,
                            cu_seqlens_q, block_size, scale)
    H = q.shape[2]
    nb_max = flex_num_blocks(block_table.shape[1] * k_cache.shape[1], block_size)
    outs = [torch.zeros(S, H, nb_max, dtype=torch.float32, device=q.device) for _ in range(3)]
    for s, qs in enumerate(_paged_queries(q, cu_seqlens_q, S)):
        ks = gather_paged_kv(k_cache, block_table, seq_lens_k, s).unsqueeze(0)
        if ks.shape[1] == 0:
            continue
        res = reference_flex_estimate(qs, ks, block_size, scale, compute_dtype=compute_dtype)
        nb_s = res[0].shape[-1]
        for o, r in zip(outs, res):
            o[s, :, :nb_s] = r[0]
    return tuple(outs)
