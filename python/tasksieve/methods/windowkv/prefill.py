"""WindowKV at prefill: resolve the request (strategy, observation window, budgets), then score, select
and gather windows per layer, or per group of layers with ``group_scoring="mean"``."""

from __future__ import annotations

import torch

from ... import ops
from .budgets import budget_tokens, windowkv_layer_budgets
from .selection import gathered_token_index, neighbour_scores
from .state import PressState, _clamped_kv_start, _one_layer
from .strategy import DEFAULT_OBS_WINDOW, StrategyContext, auto_strategy


def resolve(press: "WindowKV", keys: torch.Tensor, obs_queries: torch.Tensor, state: PressState) -> None:
    """Fix strategy, observation window and budgets for the request (first call only)."""
    n = keys.shape[2]
    state.num_tokens = n
    strategy = press.strategy
    if strategy == "auto" or callable(strategy):
        a0 = min(press.obs_window or max(DEFAULT_OBS_WINDOW.values()), n, obs_queries.shape[1])
        scores = ops.window_scores(
            obs_queries[:, -a0:], keys.transpose(1, 2), press.window, "mean",
            scale=state.scale, kv_start=_clamped_kv_start(state, n, a0),
        )
        decided, stat, per_row = auto_strategy(scores, press.auto_threshold, press.auto_top)
        state.auto_statistic, state.auto_per_row = stat, per_row
        if callable(strategy):
            decided = strategy(StrategyContext(input_ids=state.input_ids, window_scores=scores, peak_share=stat))
            if decided not in ("max", "mean"):
                raise ValueError(f"WindowKV.strategy: the callable must return 'max' or 'mean', got {decided!r}")
        strategy = decided
    state.strategy = strategy
    state.obs_window = press.obs_window if press.obs_window is not None else DEFAULT_OBS_WINDOW[strategy]
    a = min(state.obs_window, n)
    review = ((n - a) // press.window) * press.window
    capacity = budget_tokens(press.budget, n)
    if capacity >= review:
        # the average budget covers the whole review region: nothing to drop in any layer (the pyramid would
        # otherwise still cut the last groups of a short prompt)
        state.budgets = [review] * state.num_layers
    else:
        state.budgets = windowkv_layer_budgets(
            capacity, state.num_layers, press.group, press.beta, press.schedule, review_len=review
        )


def compress_layer(
    press: "WindowKV",
    layer_idx: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    obs_queries: torch.Tensor,
    state: PressState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WindowKV.compress_layer: score (group leaders), select, gather one layer."""
    if state.strategy is None:
        resolve(press, keys, obs_queries, state)
    B, Hk, n, D = keys.shape
    w = press.window
    a = min(state.obs_window, n)
    nw = (n - a) // w
    tail = n - nw * w
    kk = min(state.budgets[layer_idx] // w, nw)
    if kk >= nw:
        state.kept[layer_idx] = n
        state.token_index = None
        return keys, values
    g = layer_idx // press.group
    idx = state.group_index.get(g)
    if idx is None or idx.shape[-1] != kk or idx.shape[0] != B:
        scores = ops.window_scores(
            obs_queries[:, -a:], keys.transpose(1, 2), w, state.strategy,
            scale=state.scale, kv_start=_clamped_kv_start(state, n, a),
        )
        scores = _neighbours(press, scores, state, n, a)
        idx = ops.select_windows(scores, kk, share=not press.per_head)
        state.group_index[g] = idx
    k2, v2 = ops.gather_windows([keys, values], idx, w, tail)
    tok = gathered_token_index(n, idx if press.per_head else idx[:, :1], w, tail)
    state.token_index = tok
    state.kept[layer_idx] = k2.shape[2]
    return k2, v2


def compress_group(
    press: "WindowKV",
    layer_idx: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    obs_queries: torch.Tensor,
    state: PressState,
) -> dict:
    """WindowKV.compress_layers: with group_scoring='mean', score every layer, gather the group at its last layer."""
    if press.group_scoring == "first":
        return _one_layer(press, layer_idx, keys, values, obs_queries, state)
    if state.strategy is None:
        resolve(press, keys, obs_queries, state)
    n = keys.shape[2]
    w = press.window
    a = min(state.obs_window, n)
    nw = (n - a) // w
    tail = n - nw * w
    kk = min(state.budgets[layer_idx] // w, nw)
    if kk >= nw:  # budgets are per group, so the whole group takes this branch
        state.kept[layer_idx] = n
        return {layer_idx: (keys, values, None)}
    g = layer_idx // press.group
    scores = ops.window_scores(
        obs_queries[:, -a:], keys.transpose(1, 2), w, state.strategy,
        scale=state.scale, kv_start=_clamped_kv_start(state, n, a),
    )
    pending = state.group_pending.setdefault(g, [])
    pending.append((layer_idx, keys, values))
    total = state.group_scores.get(g)
    state.group_scores[g] = scores if total is None else total + scores
    if layer_idx != min((g + 1) * press.group, state.num_layers) - 1:
        return {}
    del state.group_pending[g]
    mean_scores = _neighbours(press, state.group_scores.pop(g) / len(pending), state, n, a)
    idx = ops.select_windows(mean_scores.contiguous(), kk, share=not press.per_head)
    state.group_index[g] = idx
    out = ops.gather_windows([t for _, k, v in pending for t in (k, v)], idx, w, tail)
    tok = gathered_token_index(n, idx if press.per_head else idx[:, :1], w, tail)
    done = {}
    for j, (li, _, _) in enumerate(pending):
        state.kept[li] = out[2 * j].shape[2]
        done[li] = (out[2 * j], out[2 * j + 1], tok)
    return done


def _neighbours(press: "WindowKV", scores: torch.Tensor, state: PressState, n: int, a: int) -> torch.Tensor:
    """The press's neighbour rule on a layer's or group's window scores (identity with ``neighbours="none"``)."""
    if press.neighbours == "none":
        return scores
    return neighbour_scores(scores, press.neighbours, press.neighbour_weight, press.window,
                            _clamped_kv_start(state, n, a))
