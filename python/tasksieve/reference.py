"""Pure-PyTorch references of the tasksieve ops: the ground truth for tests and benchmarks.

Written for clarity, not speed: every op is the literal formula of its contract in
``csrc/ops.cpp``, in fp32 (or fp64 when asked) on whatever device the inputs live on. The
argument checks mirror the C++ ones (same argument names, ``RuntimeError`` like ``TORCH_CHECK``),
so ``tasksieve.ops`` gives the same errors whether it runs a kernel or falls back to this module.

This module needs nothing but torch: it imports neither the compiled extension nor transformers.

WindowKV ops
------------
reference_window_scores(q_obs, k, window, reduce, scale, kv_start)   -> float32 [B, Hk, nw]
reference_select_windows(scores, keep, share)                        -> int32 [B, Hk, min(keep, nw)]
reference_gather_windows(kv, idx, window, tail)                      -> [B, Hk, keep*w + tail, D_i]
reference_gather_windows_(kv, idx, window, tail)                     in place, -> None

FlexPrefill ops
---------------
reference_block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale, causal,
                                 cu_seqlens_q, cu_seqlens_k)
                                                      -> out [B, Nq, H, D], lse fp32 [B, H, Nq]
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "reference_window_scores",
    "reference_select_windows",
    "reference_gather_windows",
    "reference_gather_windows_",
    "window_count",
    "reference_block_sparse_attention",
    "block_sparse_allowed_mask",
    "block_sparse_block_mask",
]

_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"tasksieve.{op}: {msg}")


def window_count(n: int, obs: int, window: int) -> int:
    """Number of whole windows in the review region: ``nw = (n - obs) // window``, 0 if negative.

    Parameters
    ----------
    n : int
        Sequence length N (tokens in the cache).
    obs : int
        Observation-window length A (the last A tokens are always kept).
    window : int
        Window length in tokens, >= 1.
    """
    if window < 1:
        raise ValueError(f"tasksieve.window_count: window must be >= 1, got {window}")
    return max(0, (n - obs) // window)


# ---------------------------------------------------------------------------------------------
# window_scores
# ---------------------------------------------------------------------------------------------


def check_window_scores_args(q_obs, k, window, reduce, scale=None, kv_start=None) -> None:
    """The argument checks of ``window_scores`` (same conditions and wording as the C++ ones).

    Value checks on ``kv_start`` read the tensor (a host sync on CUDA).
    """
    op = "window_scores"
    if not isinstance(q_obs, torch.Tensor) or q_obs.dim() != 4:
        _fail(op, f"q_obs must be a 4-D tensor [B, A, H, D], got shape {_shape(q_obs)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        _fail(op, f"k must be a 4-D tensor [B, N, Hk, D], got shape {_shape(k)}")
    if q_obs.dtype not in _SCORE_DTYPES:
        _fail(op, f"q_obs must be float32, float16 or bfloat16, got {q_obs.dtype}")
    if k.dtype != q_obs.dtype:
        _fail(op, f"k must have the dtype of q_obs ({q_obs.dtype}), got {k.dtype}")
    if k.device != q_obs.device:
        _fail(op, f"k must be on the device of q_obs ({q_obs.device}), got {k.device}")
    B, A, H, D = q_obs.shape
    _, N, Hk, Dk = k.shape
    if k.shape[0] != B:
        _fail(op, f"k must have the batch size of q_obs ({B}), got {k.shape[0]}")
    if D < 1 or D > _MAX_HEAD_DIM:
        _fail(op, f"q_obs head dim D must be in [1, {_MAX_HEAD_DIM}], got {D}")
    if Dk != D:
        _fail(op, f"k head dim must equal q_obs head dim ({D}), got {Dk}")
    if Hk < 1 or H % Hk != 0:
        _fail(op, f"k heads Hk must be >= 1 and divide the q_obs heads H={H}, got Hk={Hk}")
    if q_obs.stride(3) != 1 and D > 1:
        _fail(op, "q_obs must be contiguous in the last dim (stride 1), "
                  f"got stride {q_obs.stride(3)}")
    if k.stride(3) != 1 and D > 1:
        _fail(op, f"k must be contiguous in the last dim (stride 1), got stride {k.stride(3)}")
    if A < 1 or A > N:
        _fail(op, f"q_obs length A must be in [1, N={N}] (N = k.size(1)), got A={A}")
    if window < 1:
        _fail(op, f"window must be >= 1, got {window}")
    if reduce not in ("max", "mean"):
        _fail(op, f"reduce must be 'max' or 'mean', got {reduce!r}")
    if scale is not None and not math.isfinite(scale):
        _fail(op, f"scale must be finite, got {scale}")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor):
            _fail(op, f"kv_start must be an int32 tensor [B], got {type(kv_start).__name__}")
        if kv_start.dtype != torch.int32:
            _fail(op, f"kv_start must be int32, got {kv_start.dtype}")
        if kv_start.dim() != 1 or kv_start.shape[0] != B:
            _fail(op, f"kv_start must have shape [B] = [{B}], got {list(kv_start.shape)}")
        if kv_start.device != q_obs.device:
            _fail(op, f"kv_start must be on the device of q_obs ({q_obs.device}), "
                      f"got {kv_start.device}")
        if B > 0:
            lo, hi = int(kv_start.min()), int(kv_start.max())
            if lo < 0 or hi > N - A:
                _fail(op, f"kv_start values must be in [0, N - A] = [0, {N - A}], got [{lo}, {hi}]")


def reference_window_scores(
    q_obs: torch.Tensor,
    k: torch.Tensor,
    window: int,
    reduce: str = "max",
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Window scores of the review region from the observation-window attention.

    For every query head h, the A observation queries (query i sits at position N - A + i)
    attend causally to the keys ``kv_start[b] <= j <= N - A + i``:
    ``P_h[i, j] = softmax_j(scale * q_i . k_j)``. Token score ``s_h[j] = sum_i P_h[i, j]``.
    The review region is the first ``R = nw * window`` tokens, ``nw = (N - A) // window``;
    window m is tokens ``[m*window, (m+1)*window)``. Per head,
    ``sigma_h[m]`` = mean of the top ``max(1, window // 2)`` token scores of window m
    (``reduce="max"``) or the mean of all its token scores (``reduce="mean"``); masked tokens
    score 0. The result averages sigma over the G = H / Hk query heads of each KV head.

    Parameters
    ----------
    q_obs : Tensor [B, A, H, D]
        The last A queries (RoPE applied); float32, float16 or bfloat16.
    k : Tensor [B, N, Hk, D]
        Keys, same dtype; any strides with the last dim contiguous (pass an HF cache
        ``[B, Hk, N, D]`` as ``k.transpose(1, 2)``).
    window : int
        Window length, >= 1.
    reduce : {"max", "mean"}
        Window reduction.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    kv_start : Tensor [B] int32, optional
        Left padding: keys ``j < kv_start[b]`` are masked; values in ``[0, N - A]``.
    compute_dtype : torch.dtype
        float32 (default) or float64 for the whole computation.

    Returns
    -------
    Tensor [B, Hk, nw] float32, contiguous.
    """
    check_window_scores_args(q_obs, k, window, reduce, scale, kv_start)
    B, A, H, D = q_obs.shape
    N, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    nw = window_count(N, A, window)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    q = q_obs.to(compute_dtype).permute(0, 2, 1, 3)  # [B, H, A, D]
    kk = k.to(compute_dtype).permute(0, 2, 1, 3)  # [B, Hk, N, D]
    kk = kk.repeat_interleave(G, dim=1)  # [B, H, N, D]: query head h uses KV head h // G
    logits = scale * (q @ kk.transpose(-1, -2))  # [B, H, A, N]

    pos_q = torch.arange(N - A, N, device=q.device).view(A, 1)  # position of query i
    pos_k = torch.arange(N, device=q.device).view(1, N)
    visible = (pos_k <= pos_q).view(1, 1, A, N)  # causal
    if kv_start is not None:
        start = kv_start.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
        visible = visible & (pos_k.view(1, 1, 1, N) >= start)
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # every query sees at least its own key
    token_scores = probs.sum(dim=2)  # [B, H, N]

    R = nw * window
    per_window = token_scores[..., :R].reshape(B, H, nw, window)
    if reduce == "max":
        kt = max(1, window // 2)
        sigma = per_window.topk(kt, dim=-1).values.mean(dim=-1)
    else:
        sigma = per_window.mean(dim=-1)
    out = sigma.reshape(B, Hk, G, nw).mean(dim=2)
    return out.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# select_windows
# ---------------------------------------------------------------------------------------------


def check_select_windows_args(scores, keep, share) -> None:
    op = "select_windows"
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        _fail(op, f"scores must be a 3-D tensor [B, Hk, nw], got shape {_shape(scores)}")
    if scores.dtype != torch.float32:
        _fail(op, f"scores must be float32, got {scores.dtype}")
    if keep < 0:
        _fail(op, f"keep must be >= 0, got {keep}")


def reference_select_windows(scores: torch.Tensor, keep: int, share: bool = False) -> torch.Tensor:
    """The ``min(keep, nw)`` best windows per KV head (or shared by all heads), by position.

    Ranking: higher score first; equal scores go to the lower window index; NaN counts as
    -inf. With ``share=True`` a window's rank score is the mean of its scores over the Hk heads
    (summed in head order in fp32, then divided by Hk) and every head gets the same row.

    Parameters
    ----------
    scores : Tensor [B, Hk, nw] float32
        Window scores (from ``window_scores``).
    keep : int
        Windows to keep per row, >= 0; clamped to nw.
    share : bool
        One selection per sequence (True) or per KV head (False).

    Returns
    -------
    Tensor [B, Hk, min(keep, nw)] int32, ascending in every row, contiguous.
    """
    check_select_windows_args(scores, keep, share)
    B, Hk, nw = scores.shape
    kk = min(keep, nw)
    rank = scores
    if share:
        total = torch.zeros(B, nw, dtype=torch.float32, device=scores.device)
        for h in range(Hk):  # head order, like the kernels, so near-ties break identically
            total = total + scores[:, h, :]
        mean = total / Hk if Hk > 0 else total
        rank = mean.unsqueeze(1).expand(B, Hk, nw)
    rank = torch.nan_to_num(rank, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :kk]
    return order.sort(dim=-1).values.to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# gather_windows / gather_windows_
# ---------------------------------------------------------------------------------------------


def check_gather_windows_args(kv, idx, window, tail, *, inplace: bool = False) -> None:
    """The argument checks of ``gather_windows`` / ``gather_windows_`` (values of ``idx`` too)."""
    op = "gather_windows_" if inplace else "gather_windows"
    if isinstance(kv, torch.Tensor) or not isinstance(kv, (list, tuple)):
        _fail(op, f"kv must be a list of tensors, got {type(kv).__name__}")
    if len(kv) == 0:
        _fail(op, "kv must be a non-empty list of tensors [B, Hk, N, D_i], got an empty list")
    ref = kv[0]
    for i, t in enumerate(kv):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(op, f"kv[{i}] must be a 4-D tensor [B, Hk, N, D], got shape {_shape(t)}")
        if t.shape[:3] != ref.shape[:3]:
            _fail(op, f"kv[{i}] must have the [B, Hk, N] of kv[0] {list(ref.shape[:3])}, "
                      f"got {list(t.shape[:3])}")
        if t.dtype != ref.dtype:
            _fail(op, f"kv[{i}] must have the dtype of kv[0] ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            _fail(op, f"kv[{i}] must be on the device of kv[0] ({ref.device}), got {t.device}")
        if t.stride(3) != 1 and t.shape[3] > 1:
            _fail(op, f"kv[{i}] must be contiguous in the last dim (stride 1), "
                      f"got stride {t.stride(3)}")
    B, Hk, N = ref.shape[:3]
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3:
        _fail(op, f"idx must be a 3-D tensor [B, Hk, keep], got shape {_shape(idx)}")
    if idx.dtype != torch.int32:
        _fail(op, f"idx must be int32, got {idx.dtype}")
    if idx.shape[0] != B or idx.shape[1] != Hk:
        _fail(op, f"idx must have shape [B, Hk, keep] with [B, Hk] = [{B}, {Hk}], "
                  f"got {list(idx.shape)}")
    if idx.device != ref.device:
        _fail(op, f"idx must be on the device of kv ({ref.device}), got {idx.device}")
    if window < 1:
        _fail(op, f"window must be >= 1, got {window}")
    if tail < 0 or tail > N:
        _fail(op, f"tail must be in [0, N] = [0, {N}], got {tail}")
    keep = idx.shape[2]
    if idx.numel() == 0:
        return
    limit = (N - tail) // window  # valid v: 0 <= v < limit  <=>  v*window + window <= N - tail
    bad = (idx < 0) | (idx >= limit)
    if bool(bad.any()):
        b, h, p = (int(x) for x in bad.nonzero()[0])
        _fail(op, f"idx values must satisfy 0 <= v and v*window + window <= N - tail "
                  f"(N={N}, window={window}, tail={tail}), "
                  f"got idx[{b}, {h}, {p}] = {int(idx[b, h, p])}")
    if inplace and keep > 1:
        steps = idx[..., 1:] <= idx[..., :-1]
        if bool(steps.any()):
            b, h, p = (int(x) for x in steps.nonzero()[0])
            _fail(op, f"idx must be strictly ascending in every row for the in-place gather, "
                      f"got idx[{b}, {h}, {p}] = {int(idx[b, h, p])} then {int(idx[b, h, p + 1])}")


def gathered_token_index(N: int, idx: torch.Tensor, window: int, tail: int) -> torch.Tensor:
    """Source token of every output row of ``gather_windows``: int64 [B, Hk, keep*window + tail]."""
    B, Hk, keep = idx.shape
    offs = torch.arange(window, device=idx.device)
    body = (idx.long().unsqueeze(-1) * window + offs).reshape(B, Hk, keep * window)
    suffix = torch.arange(N - tail, N, device=idx.device).expand(B, Hk, tail)
    return torch.cat([body, suffix], dim=-1)


def reference_gather_windows(
    kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int
) -> list[torch.Tensor]:
    """Compact every tensor of ``kv`` to the selected windows followed by the last ``tail`` tokens.

    ``out[b, h, p*window + t] = in[b, h, idx[b, h, p]*window + t]`` for ``t < window`` and
    ``out[b, h, keep*window + t] = in[b, h, N - tail + t]`` for ``t < tail``.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Same B, Hk, N, dtype and device; D_i may differ; last dim contiguous.
    idx : Tensor [B, Hk, keep] int32
        Window indices with ``0 <= v`` and ``v*window + window <= N - tail``.
    window : int
        Window length, >= 1.
    tail : int
        Always-kept suffix length, in ``[0, N]``.

    Returns
    -------
    list of Tensor [B, Hk, keep*window + tail, D_i], contiguous, dtype of the inputs.
    """
    check_gather_windows_args(kv, idx, window, tail)
    N = kv[0].shape[2]
    rows = gathered_token_index(N, idx, window, tail)
    out = []
    for t in kv:
        src = rows.unsqueeze(-1).expand(*rows.shape, t.shape[3])
        out.append(torch.gather(t, 2, src).contiguous())
    return out


def reference_gather_windows_(
    kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int
) -> None:
    """In-place ``gather_windows``: writes into the first ``keep*window + tail`` positions of each
    tensor of ``kv`` (the caller narrows). ``idx`` must be strictly ascending in every row.
    Positions from ``keep*window + tail`` on are left as they were.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Modified in place.
    idx : Tensor [B, Hk, keep] int32
        Strictly ascending window indices per row.
    window, tail : int
        As for ``reference_gather_windows``.
    """
    check_gather_windows_args(kv, idx, window, tail, inplace=True)
    N = kv[0].shape[2]
    rows = gathered_token_index(N, idx, window, tail)
    L = rows.shape[-1]
    for t in kv:
        src = rows.unsqueeze(-1).expand(*rows.shape, t.shape[3])
        compact = torch.gather(t, 2, src)  # a copy: reads finish before the writes below
        t[:, :, :L].copy_(compact)


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


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

__all__ += ["reference_js_divergence", "reference_flex_estimate", "flex_num_blocks"]

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
__all__ += ["reference_select_blocks", "select_diag_blocks"]


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
    x = torch.nan_to_num(x, nan=0.0)
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0 -> +0
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
# PreMoe routing: tcess_update, route_topk, moe_align
# ---------------------------------------------------------------------------------------------

__all__ += ["reference_tcess_update", "reference_route_topk", "reference_moe_align",
            "moe_align_padded_size", "ROUTE_SCORINGS"]

ROUTE_SCORINGS = ("softmax", "sigmoid", "topk_softmax")
_ID_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def _check_router_logits(op: str, router_logits, top_k: int) -> None:
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        _fail(op, f"router_logits must be a 2-D tensor [T, E], got shape {_shape(router_logits)}")
    if router_logits.dtype not in _SCORE_DTYPES:
        _fail(op, f"router_logits must be float32, float16 or bfloat16, got {router_logits.dtype}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        _fail(op, f"top_k must be in [1, E] = [1, {E}] (E = router_logits.size(1)), got {top_k}")


def _check_expert_vector(op: str, name: str, t, dtype, E: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != E:
        _fail(op, f"{name} must be a 1-D tensor [E] = [{E}], got shape {_shape(t)}")
    if t.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        _fail(op, f"{name} must be on the device of router_logits ({device}), got {t.device}")


def _topk_order(key: torch.Tensor, selectable: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k selectable columns of ``key`` in ranking order: higher key first, equal keys
    to the lower column, NaN as -inf, unselectable columns last. int64 [T, k]."""
    key = torch.nan_to_num(key.float(), nan=float("-inf"), posinf=float("inf"),
                           neginf=float("-inf"))
    # Two stable sorts: by key (ties keep the column order), then selectable first.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    usable = torch.gather(selectable.expand_as(key), -1, order)
    second = torch.sort(usable.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, second)[:, :k]


def check_tcess_update_args(router_logits, top_k, r, acc, count) -> None:
    op = "tcess_update"
    _check_router_logits(op, router_logits, top_k)
    E, dev = router_logits.shape[1], router_logits.device
    if math.isnan(r):
        _fail(op, f"r must be a number, got {r}")
    _check_expert_vector(op, "acc", acc, torch.float64, E, dev)
    if not isinstance(count, torch.Tensor) or tuple(count.shape) != (1,):
        _fail(op, f"count must be a tensor of shape [1], got shape {_shape(count)}")
    if count.dtype != torch.int64:
        _fail(op, f"count must be int64, got {count.dtype}")
    if count.device != dev:
        _fail(op, f"count must be on the device of router_logits ({dev}), got {count.device}")


def reference_tcess_update(router_logits: torch.Tensor, top_k: int, r: float, acc: torch.Tensor,
                           count: torch.Tensor) -> None:
    """Accumulates PreMoe's TCESS statistics in place (``acc`` and ``count``), returns None.

    Per token t: ``sel`` = the top_k experts by raw logit z (ties to the lower id, NaN as -inf);
    ``p = softmax(z[sel])``; ``acc[i] += z_i`` (in float64) for every i in sel with ``p_i >= r``.
    Then ``count += T``. TCESS = acc / count. r <= 0 includes every selected expert.

    Parameters
    ----------
    router_logits : Tensor [T, E] float32, float16 or bfloat16 (math in fp32, sums in fp64)
    top_k : int, in [1, E]
    r : float, probability threshold
    acc : Tensor [E] float64, mutated
    count : Tensor [1] int64, mutated
    """
    check_tcess_update_args(router_logits, top_k, r, acc, count)
    z = router_logits.float()
    T, E = z.shape
    if T > 0:
        sel = _topk_order(z, torch.ones(E, dtype=torch.bool, device=z.device), top_k)
        zs = torch.gather(z, -1, sel)
        p = torch.softmax(zs, dim=-1)
        contrib = torch.where(p >= r, zs.double(), torch.zeros((), dtype=torch.float64,
                                                                  device=z.device))
        acc.index_add_(0, sel.flatten(), contrib.flatten())
    count.add_(T)


def check_route_topk_args(router_logits, top_k, scoring="softmax", renormalize=False,
                          keep_mask=None, bias=None, scaling=1.0, mask_full=False) -> None:
    """The argument checks of ``route_topk``, including "at least top_k experts kept" (which
    reads keep_mask: one host sync for a CUDA mask)."""
    op = "route_topk"
    _check_router_logits(op, router_logits, top_k)
    E, dev = router_logits.shape[1], router_logits.device
    if scoring not in ROUTE_SCORINGS:
        _fail(op, f"scoring must be one of {', '.join(repr(s) for s in ROUTE_SCORINGS)}, "
                  f"got {scoring!r}")
    if not math.isfinite(scaling):
        _fail(op, f"scaling must be finite, got {scaling}")
    if bias is not None:
        _check_expert_vector(op, "bias", bias, torch.float32, E, dev)
    if keep_mask is not None:
        _check_expert_vector(op, "keep_mask", keep_mask, torch.bool, E, dev)
        kept = int(keep_mask.sum().item())
        if kept < top_k:
            _fail(op, f"keep_mask must keep at least top_k = {top_k} experts, got {kept} kept")


def reference_route_topk(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                         renormalize: bool = False, keep_mask: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, scaling: float = 1.0,
                         mask_full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k with pruned experts masked out, in fp32.

    Scorings (z = logits in fp32, K = kept experts):

    * ``"softmax"``: s = softmax of z over K (over all E when ``mask_full``); w = s.
    * ``"sigmoid"``: s = sigmoid(z); w = s (the bias never enters the weights).
    * ``"topk_softmax"``: w = softmax over the k selected logits.

    Selection: the top_k experts of K by s + bias (with a bias), by z (without one, for every
    scoring: s is increasing in z, and ranking by z keeps two different logits from tying after
    rounding); higher first, ties to the lower id, NaN as -inf. Pruned experts are never
    selected. Then ``renormalize`` divides w by its sum over the k (a no-op for topk_softmax)
    and w is multiplied by ``scaling``. Columns are in selection order.

    Returns
    -------
    (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k])
    """
    check_route_topk_args(router_logits, top_k, scoring, renormalize, keep_mask, bias, scaling,
                          mask_full)
    z = router_logits.float()
    T, E = z.shape
    kept = (keep_mask if keep_mask is not None
            else torch.ones(E, dtype=torch.bool, device=z.device))
    if scoring == "softmax":
        denominator_set = torch.ones_like(kept) if mask_full else kept
        s = torch.softmax(z.masked_fill(~denominator_set, float("-inf")), dim=-1)
    elif scoring == "sigmoid":
        s = torch.sigmoid(z)
    else:
        s = z
    key = s + bias if bias is not None else z
    ids = _topk_order(key, kept, top_k)
    if scoring == "topk_softmax":
        w = torch.softmax(torch.gather(z, -1, ids), dim=-1)
    else:
        w = torch.gather(s, -1, ids)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    w = w * scaling
    return w.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


def check_moe_align_args(topk_ids, num_experts, block_m, expert_map=None) -> None:
    """The argument checks of ``moe_align``, values included (ids and expert_map entries)."""
    op = "moe_align"
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        _fail(op, f"topk_ids must be a 2-D tensor [T, k], got shape {_shape(topk_ids)}")
    if topk_ids.dtype not in _ID_DTYPES:
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if num_experts < 1:
        _fail(op, f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        _fail(op, f"block_m must be >= 1, got {block_m}")
    T, k = topk_ids.shape
    if k < 1:
        _fail(op, f"topk_ids must have at least one column (k >= 1), got shape {_shape(topk_ids)}")
    P = moe_align_padded_size(T * k, num_experts, block_m)
    if P > _INT32_MAX:
        _fail(op, f"the padded size P = {P} (T*k = {T * k}, num_experts = {num_experts}, "
                  f"block_m = {block_m}) must fit in int32")
    if topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min().item()), int(topk_ids.max().item())
        if lo < 0 or hi >= num_experts:
            _fail(op, f"topk_ids values must be in [0, num_experts) = [0, {num_experts}), "
                      f"got [{lo}, {hi}]")
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor) or tuple(expert_map.shape) != (num_experts,):
            _fail(op, f"expert_map must be a 1-D tensor [num_experts] = [{num_experts}], "
                      f"got shape {_shape(expert_map)}")
        if expert_map.dtype != torch.int32:
            _fail(op, f"expert_map must be int32, got {expert_map.dtype}")
        if expert_map.device != topk_ids.device:
            _fail(op, f"expert_map must be on the device of topk_ids ({topk_ids.device}), "
                      f"got {expert_map.device}")
        lo, hi = int(expert_map.min().item()), int(expert_map.max().item())
        if lo < -1 or hi >= num_experts:
            _fail(op, f"expert_map values must be -1 or in [0, num_experts) = "
                      f"[0, {num_experts}), got [{lo}, {hi}]")


def moe_align_padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """Length P of ``moe_align``'s sorted_ids: ``round_up(num_slots + E*(block_m-1), block_m)``."""
    return -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m


def reference_moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                        expert_map: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the token slots by (compact) expert and pads every expert's run to whole tiles.

    Slot s = t*k + j holds ``topk_ids[t, j]``; its compact expert is ``expert_map[id]`` (the id
    without a map); -1 drops the slot. Runs are in ascending compact expert, slots ascending
    within a run (a stable counting sort), each run padded with the sentinel T*k to a multiple
    of block_m; experts without slots get no run.

    Returns
    -------
    sorted_ids int32 [P], P = round_up(T*k + num_experts*(block_m-1), block_m), sentinel from
    num_padded on; tile_expert int32 [P / block_m], the compact expert of each tile, -1 past
    num_padded / block_m; num_padded int32 [1].
    """
    check_moe_align_args(topk_ids, num_experts, block_m, expert_map)
    dev = topk_ids.device
    T, k = topk_ids.shape
    S = T * k
    P = moe_align_padded_size(S, num_experts, block_m)
    ids = topk_ids.reshape(-1).long()
    compact = expert_map.long()[ids] if expert_map is not None else ids
    slots = torch.arange(S, device=dev)
    keep = compact >= 0
    slots, compact = slots[keep], compact[keep]
    # Stable sort by expert: slots stay ascending within each expert.
    order = torch.sort(compact, stable=True).indices
    slots, compact = slots[order], compact[order]
    counts = torch.bincount(compact, minlength=num_experts)
    runs = (counts + block_m - 1) // block_m * block_m
    run_start = torch.cumsum(runs, 0) - runs
    first_of_expert = torch.cumsum(counts, 0) - counts
    position = run_start[compact] + (torch.arange(compact.numel(), device=dev)
                                     - first_of_expert[compact])
    sorted_ids = torch.full((P,), S, dtype=torch.int32, device=dev)
    sorted_ids[position] = slots.to(torch.int32)
    num_padded = int(runs.sum().item())
    tile_expert = torch.full((P // block_m,), -1, dtype=torch.int32, device=dev)
    tiles = runs // block_m
    tile_expert[: num_padded // block_m] = torch.repeat_interleave(
        torch.arange(num_experts, device=dev), tiles).to(torch.int32)
    return sorted_ids, tile_expert, torch.tensor([num_padded], dtype=torch.int32, device=dev)


# ---------------------------------------------------------------------------------------------
# PreMoe expert GEMM: expert_gemm, moe_forward
# ---------------------------------------------------------------------------------------------

__all__ += ["check_expert_gemm_args", "reference_expert_gemm", "check_moe_forward_args",
            "reference_moe_forward", "EXPERT_GEMM_ACTIVATIONS"]

EXPERT_GEMM_ACTIVATIONS = ("none", "silu_mul")


def _check_moe_device(op: str, ref: torch.Tensor, ref_name: str, t, name: str) -> None:
    if isinstance(t, torch.Tensor) and t.device != ref.device:
        _fail(op, f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_moe_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")


def check_expert_gemm_args(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather,
                           activation="none", topk_weights=None) -> dict:
    """The argument checks of ``expert_gemm`` (same order and messages as the C++ ones), values
    of the alignment included (one host sync for device tensors). Returns the sizes: S (slots),
    T, K, N, N_out, E_c, P, tiles, rows (num_padded)."""
    op = "expert_gemm"
    for name, t in (("x", x), ("w", w), ("sorted_ids", sorted_ids), ("tile_expert", tile_expert),
                    ("num_padded", num_padded)):
        _check_moe_tensor(op, name, t)
    for name, t in (("w", w), ("sorted_ids", sorted_ids), ("tile_expert", tile_expert),
                    ("num_padded", num_padded), ("topk_weights", topk_weights)):
        _check_moe_device(op, x, "x", t, name)
    if x.dtype not in _SCORE_DTYPES:
        _fail(op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        _fail(op, f"x must be 2-D ([T, K] with gather, else [T*top_k, K]), got {_shape(x)}")
    if w.dim() != 3:
        _fail(op, f"w must be 3-D [E_c, N, K], got {_shape(w)}")
    if w.dtype != x.dtype:
        _fail(op, f"w must have the dtype of x ({x.dtype}), got {w.dtype}")
    K = x.shape[1]
    E_c, N = w.shape[0], w.shape[1]
    if w.shape[2] != K:
        _fail(op, f"w must have shape [E_c, N, K] with K = x.size(1) = {K}, got {_shape(w)}")
    if E_c < 1:
        _fail(op, f"w must hold at least one expert (E_c >= 1), got {_shape(w)}")
    if top_k < 1:
        _fail(op, f"top_k must be >= 1, got {top_k}")
    if block_m < 1:
        _fail(op, f"block_m must be >= 1, got {block_m}")
    if activation not in EXPERT_GEMM_ACTIVATIONS:
        _fail(op, f"activation must be 'none' or 'silu_mul', got '{activation}'")
    silu_mul = activation == "silu_mul"
    if silu_mul and N % 2:
        _fail(op, f"w must have an even number of rows N (gate rows, then up rows) with "
                  f"activation='silu_mul', got N = {N}")
    if not gather and x.shape[0] % top_k:
        _fail(op, f"x must have T*top_k rows without gather (top_k = {top_k}), got {x.shape[0]}")
    S = x.shape[0] * top_k if gather else x.shape[0]
    T = S // top_k
    if sorted_ids.dtype != torch.int32 or sorted_ids.dim() != 1:
        _fail(op, f"sorted_ids must be a 1-D int32 tensor (moe_align's), got {sorted_ids.dtype} "
                  f"{_shape(sorted_ids)}")
    P = sorted_ids.shape[0]
    if P % block_m:
        _fail(op, f"sorted_ids length must be a multiple of block_m = {block_m}, got {P}")
    tiles = P // block_m
    if tile_expert.dtype != torch.int32 or tuple(tile_expert.shape) != (tiles,):
        _fail(op, f"tile_expert must be a 1-D int32 tensor of P / block_m = {tiles} entries, "
                  f"got {tile_expert.dtype} {_shape(tile_expert)}")
    if num_padded.dtype != torch.int32 or num_padded.numel() != 1:
        _fail(op, f"num_padded must be an int32 tensor of one element, got {num_padded.dtype} "
                  f"{_shape(num_padded)}")
    if topk_weights is not None:
        _check_moe_tensor(op, "topk_weights", topk_weights)
        if topk_weights.dtype not in _SCORE_DTYPES:
            _fail(op, f"topk_weights must be float32, float16 or bfloat16, got "
                      f"{topk_weights.dtype}")
        if tuple(topk_weights.shape) != (T, top_k):
            _fail(op, f"topk_weights must have shape [T, top_k] = [{T}, {top_k}], got "
                      f"{_shape(topk_weights)}")
    rows = int(num_padded.reshape(-1)[0].item())
    if not 0 <= rows <= P:
        _fail(op, f"num_padded must be in [0, P = {P}], got {rows}")
    te = tile_expert.tolist()
    ids = sorted_ids.tolist()
    for t in range(-(-rows // block_m)):
        e = te[t]
        if not -1 <= e < E_c:
            _fail(op, f"tile_expert values must be in [-1, E_c = {E_c}), got {e} at tile {t}")
        if e < 0:
            continue
        for r in range(t * block_m, (t + 1) * block_m):
            if not 0 <= ids[r] <= S:
                _fail(op, f"sorted_ids values must be slot ids in [0, T*top_k = {S}] ({S} = "
                          f"padding), got {ids[r]} at position {r}")
    return dict(S=S, T=T, K=K, N=N, N_out=N // 2 if silu_mul else N, E_c=E_c, P=P, tiles=tiles,
                rows=rows)


def reference_expert_gemm(x: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                          tile_expert: torch.Tensor, num_padded: torch.Tensor, block_m: int,
                          top_k: int, gather: bool, activation: str = "none",
                          topk_weights: Optional[torch.Tensor] = None, *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The grouped expert GEMM over moe_align's tiles, tile by tile, math in ``dtype``.

    Tile i (``i * block_m < num_padded``) with expert ``e = tile_expert[i] >= 0`` lists slots
    ``sorted_ids[i*block_m : (i+1)*block_m]``; entries equal to S = T*top_k are padding. Slot s
    reads input row ``x[s // top_k]`` (gather) or ``x[s]``; 'none': ``y[s] = x_s . w[e]^T``;
    'silu_mul' (w rows: I gate, then I up): ``y[s] = silu(x_s . w[e, :I]^T) * (x_s . w[e, I:]^T)``;
    then ``y[s] *= topk_weights.flatten()[s]`` when given.

    Returns
    -------
    y [T*top_k, N or N/2] in x's dtype; rows of slots no tile lists are 0.
    """
    d = check_expert_gemm_args(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k,
                               gather, activation, topk_weights)
    S, N_out = d["S"], d["N_out"]
    y = torch.zeros(S, N_out, dtype=dtype, device=x.device)
    flat_weights = topk_weights.reshape(-1) if topk_weights is not None else None
    for t in range(-(-d["rows"] // block_m)):
        e = int(tile_expert[t])
        if e < 0:
            continue
        slots = sorted_ids[t * block_m:(t + 1) * block_m].long()
        slots = slots[slots < S]
        if slots.numel() == 0:
            continue
        rows = x[slots // top_k] if gather else x[slots]
        acc = rows.to(dtype) @ w[e].to(dtype).T
        if activation == "silu_mul":
            gate, up = acc.chunk(2, dim=-1)
            acc = torch.nn.functional.silu(gate) * up
        if flat_weights is not None:
            acc = acc * flat_weights[slots].to(dtype)[:, None]
        y[slots] = acc
    return y.to(x.dtype)


def check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map=None) -> dict:
    """The argument checks of ``moe_forward`` (same order and messages as the C++ ones), values
    of topk_ids and expert_map included (one host sync for device tensors). Returns the sizes
    T, H, I, E_c, k, num_experts."""
    op = "moe_forward"
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights)):
        _check_moe_tensor(op, name, t)
    for name, t in (("w13", w13), ("w2", w2), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights), ("expert_map", expert_map)):
        _check_moe_device(op, x, "x", t, name)
    if x.dtype not in _SCORE_DTYPES:
        _fail(op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [T, H], got {_shape(x)}")
    T, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2 or w13.shape[1] < 2:
        _fail(op, f"w13 must have shape [E_c, 2I, H] with H = x.size(1) = {H} and I >= 1 (gate "
                  f"rows, then up rows), got {_shape(w13)}")
    if w13.dtype != x.dtype:
        _fail(op, f"w13 must have the dtype of x ({x.dtype}), got {w13.dtype}")
    E_c, I = w13.shape[0], w13.shape[1] // 2
    if E_c < 1:
        _fail(op, f"w13 must hold at least one expert (E_c >= 1), got {_shape(w13)}")
    if tuple(w2.shape) != (E_c, H, I):
        _fail(op, f"w2 must have shape [E_c, H, I] = [{E_c}, {H}, {I}], got {_shape(w2)}")
    if w2.dtype != x.dtype:
        _fail(op, f"w2 must have the dtype of x ({x.dtype}), got {w2.dtype}")
    if topk_ids.dtype not in _ID_DTYPES:
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        _fail(op, f"topk_ids must have shape [T, k] with T = x.size(0) = {T} and k >= 1, got "
                  f"{_shape(topk_ids)}")
    k = topk_ids.shape[1]
    if topk_weights.dtype not in _SCORE_DTYPES:
        _fail(op, f"topk_weights must be float32, float16 or bfloat16, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        _fail(op, f"topk_weights must have the shape of topk_ids ({_shape(topk_ids)}), got "
                  f"{_shape(topk_weights)}")
    num_experts = E_c
    if expert_map is not None:
        _check_moe_tensor(op, "expert_map", expert_map)
        if expert_map.dtype != torch.int32 or expert_map.dim() != 1 or expert_map.shape[0] < 1:
            _fail(op, f"expert_map must be a non-empty 1-D int32 tensor [num_experts], got "
                      f"{expert_map.dtype} {_shape(expert_map)}")
        num_experts = expert_map.shape[0]
        if T == 0 or H == 0:
            return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)
        bad = ((expert_map < -1) | (expert_map >= E_c)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            _fail(op, f"expert_map values must be in [-1, E_c = {E_c}), got "
                      f"{int(expert_map[i])} at {i}")
    if T == 0 or H == 0:
        return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)
    bad = ((topk_ids < 0) | (topk_ids >= num_experts)).reshape(-1).nonzero()
    if bad.numel():
        s = int(bad[0, 0])
        where = "expert_map's length" if expert_map is not None else "E_c = w13.size(0)"
        _fail(op, f"topk_ids values must be in [0, num_experts = {num_experts}) ({where}), got "
                  f"{int(topk_ids.reshape(-1)[s])} at token {s // k}, column {s % k}")
    return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)


def reference_moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          expert_map: Optional[torch.Tensor] = None, *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The routed-expert FFN as a loop over the kept experts, math in ``dtype``.

    Slot (t, j) goes to compact expert ``e = expert_map[topk_ids[t, j]]`` (the id itself without
    a map; -1 drops the slot) and adds ``topk_weights[t, j] * w2[e] . (silu(w13[e, :I] . x_t) *
    (w13[e, I:] . x_t))`` to ``out[t]``.

    Returns
    -------
    out [T, H] in x's dtype.
    """
    check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map)
    T, H = x.shape
    E_c, I = w13.shape[0], w13.shape[1] // 2
    ids = topk_ids.long()
    compact = expert_map.long()[ids] if expert_map is not None else ids
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    for e in range(E_c):
        tok, col = torch.nonzero(compact == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].to(dtype)
        gate = xe @ w13[e, :I].to(dtype).T
        up = xe @ w13[e, I:].to(dtype).T
        h = torch.nn.functional.silu(gate) * up
        y = (h @ w2[e].to(dtype).T) * topk_weights[tok, col].to(dtype)[:, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)
