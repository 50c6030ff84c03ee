"""SnapKV and PyramidKV, the token-level baselines: per-KV-head top tokens by pooled observation
attention, with one budget for every layer (SnapKV) or budgets decreasing with depth (PyramidKV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ... import ops
from ._checks import _check_budget, _check_pool, _check_pos_int, _is_real
from .budgets import budget_tokens, pyramidkv_layer_budgets
from .selection import pool_scores
from .state import PressState, _clamped_kv_start, _one_layer


def _snap_scores(press, keys, obs_queries, state, a) -> torch.Tensor:
    """Per-KV-head token scores of the review region [B, Hk, N - a]: observation mass (summed over the queries,
    mean over the G query heads), pooled; padded tokens get -inf."""
    n = keys.shape[2]
    kv_start = _clamped_kv_start(state, n, a)
    scores = ops.window_scores(obs_queries[:, -a:], keys.transpose(1, 2), 1, "mean", scale=state.scale,
                               kv_start=kv_start)
    pooled = pool_scores(scores, press.kernel, press.pool)
    if kv_start is not None:
        pos = torch.arange(n - a, device=keys.device).view(1, 1, -1)
        pooled = pooled.masked_fill(pos < kv_start.to(keys.device).view(-1, 1, 1).long(), float("-inf"))
    return pooled.contiguous()


def _snap_gather(keys, values, idx, a, state):
    """Gather the selected tokens per head (torch.gather) and append the observation window."""
    B, Hk, n, D = keys.shape
    tok = idx.to(torch.int64)
    kk = tok.shape[-1]
    gi = tok.unsqueeze(-1).expand(B, Hk, kk, D)
    k2 = torch.cat([keys[:, :, : n - a].gather(2, gi), keys[:, :, n - a :]], dim=2)
    gv = tok.unsqueeze(-1).expand(B, Hk, kk, values.shape[-1])
    v2 = torch.cat([values[:, :, : n - a].gather(2, gv), values[:, :, n - a :]], dim=2)
    tail = torch.arange(n - a, n, device=keys.device, dtype=torch.int64).expand(B, Hk, a)
    state.token_index = torch.cat([tok, tail], dim=-1)
    return k2, v2


@dataclass
class SnapKV:
    """SnapKV baseline: per-KV-head top tokens by pooled observation-window attention, plus the window.

    Parameters
    ----------
    budget : float or int
        Total tokens per layer C, observation window included (float: fraction of the prompt). ``N <= C``: no
        compression; otherwise each KV head keeps its top ``C - obs_window`` tokens (position order) + the window.
    obs_window : int
        Observation queries (SnapKV: 32).
    kernel : int
        Pooling width (stride 1, padding ``kernel // 2``); 1 disables pooling.
    pool : {"max", "avg"}
    """

    budget: Union[float, int] = 0.12
    obs_window: int = 32
    kernel: int = 7
    pool: str = "max"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        cls = type(self).__name__
        _check_budget(cls, self.budget)
        _check_pos_int(cls, "obs_window", self.obs_window)
        _check_pos_int(cls, "kernel", self.kernel)
        _check_pool(cls, self.pool)

    decode_evict = False

    @property
    def max_obs_window(self) -> int:
        return self.obs_window

    def new_state(self, num_layers: int) -> PressState:
        return PressState(num_layers=num_layers)

    def _layer_budget(self, layer_idx: int, n: int, state: PressState) -> Optional[int]:
        if state.budgets is None and state.num_tokens is None:
            state.num_tokens = n
            state.obs_window = min(self.obs_window, n)
            c = budget_tokens(self.budget, n)
            state.budgets = None if n <= c else [max(0, c - state.obs_window)] * state.num_layers
        return None if state.budgets is None else state.budgets[layer_idx]

    def compress_layers(self, layer_idx, keys, values, obs_queries, state) -> dict:
        """As :meth:`WindowKV.compress_layers`: token-level presses finish every layer on its own call."""
        return _one_layer(self, layer_idx, keys, values, obs_queries, state)

    def compress_layer(self, layer_idx, keys, values, obs_queries, state):
        """Same contract as :meth:`WindowKV.compress_layer`; output ``[B, Hk, keep + a, D]`` (per-head tokens)."""
        n = keys.shape[2]
        keep = self._layer_budget(layer_idx, n, state)
        a = min(self.obs_window, n)
        if keep is None or keep >= n - a:
            state.kept[layer_idx] = n
            state.token_index = None
            return keys, values
        scores = _snap_scores(self, keys, obs_queries, state, a)
        idx = ops.select_windows(scores, keep, share=False)
        k2, v2 = _snap_gather(keys, values, idx, a, state)
        state.kept[layer_idx] = k2.shape[2]
        return k2, v2


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV baseline: SnapKV scoring with per-layer budgets decreasing linearly with depth
    (:func:`pyramidkv_layer_budgets`, KVCache-Factory rules and fallbacks).

    Parameters
    ----------
    budget : float or int
        Average tokens per layer C, observation window included.
    obs_window : int
        Observation queries (KVCache-Factory LongBench setting: 8).
    kernel, pool
        As :class:`SnapKV`.
    beta : int or float
        Pyramid steepness (20).
    """

    budget: Union[float, int] = 0.12
    obs_window: int = 8
    kernel: int = 7
    pool: str = "max"
    beta: Union[int, float] = 20

    def validate(self) -> None:
        super().validate()
        if not _is_real(self.beta) or self.beta <= 0:
            raise ValueError(f"{type(self).__name__}.beta must be a number > 0, got {self.beta!r}")

    def _layer_budget(self, layer_idx: int, n: int, state: PressState) -> Optional[int]:
        if state.budgets is None and state.num_tokens is None:
            state.num_tokens = n
            state.obs_window = min(self.obs_window, n)
            c = budget_tokens(self.budget, n)
            state.budgets = pyramidkv_layer_budgets(c, state.num_layers, n, self.obs_window, self.beta)
        return None if state.budgets is None else state.budgets[layer_idx]
