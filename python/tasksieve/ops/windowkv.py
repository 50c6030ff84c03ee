"""WindowKV ops: window_scores, select_windows, gather_windows(_), and their fakes.

window_scores(q_obs, k, window, reduce="max", scale=None, kv_start=None)
    -> float32 [B, Hk, nw]
select_windows(scores, keep, share=False)  -> int32 [B, Hk, min(keep, nw)]
gather_windows(kv, idx, window, tail)      -> list of [B, Hk, keep*window + tail, D_i]
gather_windows_(kv, idx, window, tail)     in place, -> None
window_count(n, obs, window)               nw = (n - obs) // window
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _loader

__all__ = ["window_scores", "select_windows", "gather_windows", "gather_windows_", "window_count"]


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


def _as_list(op: str, kv) -> list:
    # A lone tensor would iterate into its sub-tensors: refuse it before the dispatcher does.
    if isinstance(kv, torch.Tensor) or not isinstance(kv, (list, tuple)):
        raise RuntimeError(f"tasksieve.{op}: kv must be a list of tensors, got {type(kv).__name__}")
    return list(kv)


def window_scores(
    q_obs: torch.Tensor,
    k: torch.Tensor,
    window: int,
    reduce: str = "max",
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Window scores of the review region from the observation-window attention.

    Parameters
    ----------
    q_obs : Tensor [B, A, H, D]
        The last A queries (RoPE applied); float32, float16 or bfloat16; last dim contiguous.
    k : Tensor [B, N, Hk, D]
        Keys of the same dtype and device, H % Hk == 0, 1 <= A <= N, D <= 256; last dim
        contiguous, other strides free (pass an HF cache ``[B, Hk, N, D]`` as
        ``k.transpose(1, 2)``).
    window : int
        Window length in tokens, >= 1.
    reduce : {"max", "mean"}
        "max": mean of the top ``max(1, window // 2)`` token scores of a window; "mean": mean.
    scale : float, optional
        Softmax scale; default ``1 / sqrt(D)``.
    kv_start : Tensor [B] int32, optional
        Left padding: keys ``j < kv_start[b]`` get no attention; values in ``[0, N - A]``.

    Returns
    -------
    Tensor [B, Hk, nw] float32, ``nw = (N - A) // window`` (may be 0): the causal softmax mass of
    the A queries per token, pooled per window and averaged over the G query heads of each KV
    head.
    """
    _loader.require_kernel("window_scores", q_obs)
    return torch.ops.tasksieve.window_scores.default(q_obs, k, window, reduce, scale, kv_start)


def select_windows(scores: torch.Tensor, keep: int, share: bool = False) -> torch.Tensor:
    """The ``min(keep, nw)`` highest-scoring windows of every row, in position order.

    Parameters
    ----------
    scores : Tensor [B, Hk, nw] float32
        Window scores, e.g. from ``window_scores``.
    keep : int
        Windows to keep, >= 0 (clamped to nw).
    share : bool
        False: one selection per KV head. True: rank by the mean over heads; every head of a
        sequence gets the same row.

    Returns
    -------
    Tensor [B, Hk, min(keep, nw)] int32, ascending per row. Ties go to the lower window index;
    NaN scores rank as -inf.
    """
    _loader.require_kernel("select_windows", scores)
    return torch.ops.tasksieve.select_windows.default(scores, keep, share)


def gather_windows(
    kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int
) -> list[torch.Tensor]:
    """Compact K/V tensors (e.g. of every layer of a group) to the selected windows + a tail.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Same B, Hk, N, dtype and device; D_i may differ; last dim contiguous.
    idx : Tensor [B, Hk, keep] int32
        Window indices (from ``select_windows``); ``0 <= v`` and ``v*window + window <= N - tail``.
        The CPU kernel raises on invalid values; the CUDA kernel writes zeros for them.
    window : int
        Window length, >= 1.
    tail : int
        Number of last tokens always kept, in ``[0, N]``.

    Returns
    -------
    list of Tensor [B, Hk, keep*window + tail, D_i], contiguous: window p of row (b, h) is
    window ``idx[b, h, p]`` of the input, followed by the last ``tail`` tokens.
    """
    kv = _as_list("gather_windows", kv)
    _loader.require_kernel("gather_windows", kv[0] if kv else idx)
    return torch.ops.tasksieve.gather_windows.default(kv, idx, window, tail)


def gather_windows_(kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int) -> None:
    """In-place ``gather_windows``: compacts into the first ``keep*window + tail`` positions of
    every tensor of ``kv`` (narrow them afterwards). ``idx`` must be strictly ascending per row.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Modified in place; positions from ``keep*window + tail`` on are left unspecified.
    idx : Tensor [B, Hk, keep] int32
        Strictly ascending window indices per row.
    window, tail : int
        As for ``gather_windows``.
    """
    kv = _as_list("gather_windows_", kv)
    _loader.require_kernel("gather_windows_", kv[0] if kv else idx)
    torch.ops.tasksieve.gather_windows_.default(kv, idx, window, tail)
    return None


# ---------------------------------------------------------------------------------------------
# Fakes: shapes from sizes only (SymInt-friendly); the real kernels do the checking.
# ---------------------------------------------------------------------------------------------
if _loader.LOADED:

    @torch.library.register_fake("tasksieve::window_scores")
    def _window_scores_fake(q_obs, k, window, reduce, scale=None, kv_start=None):
        B, A = q_obs.shape[0], q_obs.shape[1]
        N, Hk = k.shape[1], k.shape[2]
        nw = (N - A) // window
        return q_obs.new_empty((B, Hk, nw), dtype=torch.float32)

    @torch.library.register_fake("tasksieve::select_windows")
    def _select_windows_fake(scores, keep, share):
        B, Hk, nw = scores.shape
        return scores.new_empty((B, Hk, torch.sym_min(keep, nw)), dtype=torch.int32)

    @torch.library.register_fake("tasksieve::gather_windows")
    def _gather_windows_fake(kv, idx, window, tail):
        L = idx.shape[2] * window + tail
        return [t.new_empty((t.shape[0], t.shape[1], L, t.shape[3])) for t in kv]

    @torch.library.register_fake("tasksieve::gather_windows_")
    def _gather_windows__fake(kv, idx, window, tail):
        return None
