"""From scores to kept tokens: SnapKV's pooling of token scores, WindowKV's neighbour rule on window scores
and the original token of every row a window gather keeps."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def pool_scores(scores: torch.Tensor, kernel: int, pool: str) -> torch.Tensor:
    """SnapKV's 1-D pooling of token scores along the last dim (stride 1, padding ``kernel // 2``, same length).

    Parameters
    ----------
    scores : Tensor [B, Hk, n] float32
    kernel : int
        Pooling width >= 1 (1 = no pooling). Max pooling pads with -inf, average pooling counts the zero padding
        (``count_include_pad=True``, as SnapKV does).
    pool : {"max", "avg"}

    Returns
    -------
    Tensor [B, Hk, n] float32, contiguous.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores.contiguous()
    B, Hk, n = scores.shape
    x = scores.reshape(B * Hk, 1, n)
    pad = kernel // 2
    if pool == "max":
        y = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=pad)
    else:
        y = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=pad, count_include_pad=True)
    return y[..., :n].reshape(B, Hk, n).contiguous()


def neighbour_scores(
    scores: torch.Tensor,
    side: str,
    weight: float,
    window: int = 1,
    kv_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """WindowKV's neighbour rule: a window also ranks by ``weight`` times the score of the window(s) next to it.

    ``out[i] = max(s[i], weight * s[i - 1])`` (``side="right"``: the window right after a strong window inherits
    from it) or ``max(s[i], weight * s[i - 1], weight * s[i + 1])`` (``"both"``); ``"none"`` returns ``scores``.
    The selection that follows keeps the same number of windows, so a neighbour of a strong window displaces the
    weakest kept window and the budget does not change. NaN entries neither give nor take (``torch.fmax``).
    Windows lying entirely in a row's left padding (their last token before ``kv_start``) keep their own score, so
    padding never inherits budget. Everything stays on the device.

    Parameters
    ----------
    scores : Tensor [B, Hk, nw] float32
    side : {"none", "right", "both"}
    weight : float in (0, 1]
    window : int
        Window length (only used with ``kv_start``).
    kv_start : Tensor [B] int, optional
        First real token of each row.

    Returns
    -------
    Tensor [B, Hk, nw] float32, contiguous.
    """
    if side == "none" or scores.shape[-1] < 2:
        return scores.contiguous()
    if side not in ("right", "both"):
        raise ValueError(f"neighbour_scores: side must be 'none', 'right' or 'both', got {side!r}")
    w = float(weight)
    out = scores.clone()
    out[..., 1:] = torch.fmax(out[..., 1:], w * scores[..., :-1])
    if side == "both":
        out[..., :-1] = torch.fmax(out[..., :-1], w * scores[..., 1:])
    if kv_start is not None:
        nw = scores.shape[-1]
        ends = (torch.arange(nw, device=scores.device) + 1) * window  # one past each window's last token
        pad = ends[None, :] <= kv_start.to(scores.device, torch.int64)[:, None]  # [B, nw]
        out = torch.where(pad[:, None, :], scores, out)
    return out.contiguous()


def gathered_token_index(n: int, idx: torch.Tensor, window: int, tail: int) -> torch.Tensor:
    """Original token of every row ``ops.gather_windows`` keeps: int64 ``[B, Hk, keep * window + tail]``.

    Window ``idx[b, h, p]`` covers tokens ``idx * window .. idx * window + window - 1``; the tail is the last
    ``tail`` tokens of the ``n`` cached ones.
    """
    B, Hk, keep = idx.shape
    start = idx.to(torch.int64).unsqueeze(-1) * window
    kept = (start + torch.arange(window, device=idx.device)).reshape(B, Hk, keep * window)
    last = torch.arange(n - tail, n, device=idx.device).expand(B, Hk, tail)
    return torch.cat([kept, last], dim=-1)
