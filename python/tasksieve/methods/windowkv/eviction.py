"""WindowKV while decoding (``decode_evict=True``): drop the lowest whole windows of a layer that grew a
window past its prefill size."""

from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from .selection import gathered_token_index, neighbour_scores
from .state import PressState


def evict_layer(
    press: "WindowKV",
    layer_idx: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    recent_queries: torch.Tensor,
    state: PressState,
    valid: Optional[torch.Tensor] = None,
    step: int = 0,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """WindowKV.evict_layer: drop whole windows once a layer outgrew its budget while decoding."""
    n = keys.shape[2]
    target = state.kept.get(layer_idx)
    w = press.window
    if target is None or n < target + w or recent_queries is None:
        return None
    a = min(recent_queries.shape[1], n)
    nw = (n - a) // w
    drop = (n - target) // w
    kk = max(0, nw - drop)
    if nw == 0 or kk >= nw:
        return None
    tail = n - nw * w
    g = layer_idx // press.group
    key = (g, step, n)
    idx = state.decode_index.get(key)
    if idx is None:
        scores = ops.window_scores(recent_queries[:, -a:], keys.transpose(1, 2), w, state.strategy or "max",
                                   scale=state.scale)
        if valid is not None:
            bad = ~valid[..., : nw * w].reshape(valid.shape[0], valid.shape[1], nw, w).all(dim=-1)
            scores = scores.masked_fill(bad.expand_as(scores), -1.0)
        if press.neighbours != "none":
            scores = neighbour_scores(scores, press.neighbours, press.neighbour_weight)
            if valid is not None:  # padded windows still go first
                scores = scores.masked_fill(bad.expand_as(scores), -1.0)
        idx = ops.select_windows(scores.contiguous(), kk, share=not press.per_head)
        state.decode_index = {key: idx}
    k2, v2 = ops.gather_windows([keys, values], idx, w, tail)
    state.token_index = gathered_token_index(n, idx if press.per_head else idx[:, :1], w, tail)
    state.evictions += 1
    return k2, v2
