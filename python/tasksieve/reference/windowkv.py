"""Pure-PyTorch WindowKV ops: window_scores, select_windows, gather_windows(_).

reference_window_scores(q_obs, k, window, reduce, scale, kv_start)   -> float32 [B, Hk, nw]
reference_select_windows(scores, keep, share)                        -> int32 [B, Hk, min(keep, nw)]
reference_gather_windows(kv, idx, window, tail)                      -> [B, Hk, keep*w + tail, D_i]
reference_gather_windows_(kv, idx, window, tail)                     in place, -> None
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._common import _MAX_HEAD_DIM, _SCORE_DTYPES, _fail, _shape

__all__ = [
    "reference_window_scores",
    "reference_select_windows",
    "reference_gather_windows",
    "reference_gather_windows_",
    "window_count",
    "gathered_token_index",
    "check_window_scores_args",
    "check_select_windows_args",
    "check_gather_windows_args",
]


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
    if H < 1:
        _fail(op, f"q_obs heads H must be >= 1, got H={H}")
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
