"""From scores to kept tokens: SnapKV's pooling of token scores and the original token of every row a
window gather keeps."""

from __future__ import annotations

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
