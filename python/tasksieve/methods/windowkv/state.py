"""The state of one request across layers (:class:`PressState`), never shared between requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class PressState:
    """Everything one request needs across layers. Created by ``press.new_state(num_layers)``; never shared.

    The integration fills the request facts before the first ``compress_layer`` call: ``scale`` (softmax scale of
    the attention), ``kv_start`` (int32 [B], first real token of each left-padded row, or None) and ``input_ids``.
    The press fills the rest while compressing; ``info()`` summarises it.

    Attributes
    ----------
    num_layers : int
    scale : float or None
        Softmax scale (None: 1/sqrt(D)).
    kv_start : Tensor [B] int32 or None
        First real token per row (left padding); clamped per call to ``[0, N - A]`` before reaching the ops.
    input_ids : Tensor [B, N] or None
    strategy : str or None
        Resolved window strategy ("max" / "mean"), WindowKV only.
    obs_window : int or None
        Resolved observation-window length.
    auto_statistic : float or None
        ``peak_share`` of the auto rule (also computed when a callable decides).
    budgets : list[int] or None
        Per-layer budget in tokens (WindowKV: review-region tokens before rounding to windows; SnapKV/PyramidKV:
        tokens kept besides the observation window). None: not compressed.
    kept : dict[int, int]
        Tokens kept per layer after prefill compression (after decode eviction: current length).
    group_index : dict[int, Tensor]
        Window indices ``[B, Hk, kk]`` int32 chosen by each group leader, reused by its followers.
    token_index : Tensor or None
        Original token of every kept row for the last compressed layer, ``[B, 1 or Hk, kept]`` int64.
    """

    num_layers: int
    scale: Optional[float] = None
    kv_start: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    num_tokens: Optional[int] = None
    strategy: Optional[str] = None
    obs_window: Optional[int] = None
    auto_statistic: Optional[float] = None
    auto_per_row: Optional[list] = None
    budgets: Optional[list] = None
    kept: dict = field(default_factory=dict)
    group_index: dict = field(default_factory=dict)
    decode_index: dict = field(default_factory=dict)
    group_pending: dict = field(default_factory=dict)
    group_scores: dict = field(default_factory=dict)
    token_index: Optional[torch.Tensor] = None
    evictions: int = 0

    def info(self) -> dict:
        """Summary for users and benchmarks (plain Python values)."""
        return {
            "strategy": self.strategy,
            "auto_statistic": self.auto_statistic,
            "auto_per_row": None if self.auto_per_row is None else list(self.auto_per_row),
            "obs_window": self.obs_window,
            "num_tokens": self.num_tokens,
            "budgets": None if self.budgets is None else list(self.budgets),
            "kept_tokens": [self.kept.get(i) for i in range(self.num_layers)],
            "decode_evictions": self.evictions,
        }


def _clamped_kv_start(state: PressState, n: int, a: int) -> Optional[torch.Tensor]:
    if state.kv_start is None:
        return None
    return state.kv_start.clamp(0, max(0, n - a)).to(torch.int32)


def _one_layer(press, layer_idx, keys, values, obs_queries, state) -> dict:
    """``compress_layers`` of a press that finishes every layer on its own call."""
    k2, v2 = press.compress_layer(layer_idx, keys, values, obs_queries, state)
    tok, state.token_index = state.token_index, None
    return {layer_idx: (k2, v2, tok)}
