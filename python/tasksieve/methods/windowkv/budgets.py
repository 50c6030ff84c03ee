"""Token budgets per layer: the prompt fraction, WindowKV's per-group arithmetic schedule and
PyramidKV's linear one (pure functions, tested against the published numbers)."""

from __future__ import annotations

import math
from typing import Optional, Union

from ._checks import _check_pos_int, _is_int, _is_real


def budget_tokens(budget: Union[int, float], num_tokens: int) -> int:
    """Token budget C of one layer (on average) for a prompt of ``num_tokens`` tokens.

    Parameters
    ----------
    budget : int or float
        An int is a number of tokens; a float in (0, 1] is a fraction of the prompt, ``floor(budget * N)``.
    num_tokens : int
        Prompt length N (the cache length at prefill, padding included).
    """
    if _is_int(budget):
        return int(budget)
    return int(math.floor(float(budget) * num_tokens))


def windowkv_group_budgets(capacity: int, num_layers: int, group: int, beta: Union[int, float] = 14) -> list[int]:
    """WindowKV's per-group budgets (the ``arithmetic`` layer-decay schedule of the paper).

    With L layers, S = ``group`` layers per group, G = ceil(L / S) groups and C = ``capacity``, in integer
    arithmetic: ``last = floor(C * S / beta)``, ``first = 2C - last``, ``step = floor((first - last) / (G - 1))``,
    ``budget_g = first - g * step`` for ``g < G - 1`` and ``budget_{G-1} = last``. G = 1 gives ``[C]`` (the
    official code divides by zero there). When L % S != 0 the last group is shorter and still takes ``last``
    (the official code has no budget for those layers). Budgets are clamped to >= 0 (``S > 2 * beta`` would make
    the first group negative).

    Examples
    --------
    >>> windowkv_group_budgets(512, 32, 8, 14)
    [732, 586, 440, 292]
    """
    if capacity < 0:
        raise ValueError(f"windowkv_group_budgets: capacity must be >= 0, got {capacity}")
    _check_pos_int("windowkv_group_budgets", "num_layers", num_layers)
    _check_pos_int("windowkv_group_budgets", "group", group)
    if not _is_real(beta) or beta <= 0:
        raise ValueError(f"windowkv_group_budgets: beta must be a number > 0, got {beta!r}")
    n_groups = -(-num_layers // group)
    if n_groups == 1:
        return [int(capacity)]
    if _is_int(beta):
        last = (capacity * group) // beta
    else:
        last = int(math.floor(capacity * group / beta))
    first = 2 * capacity - last
    step = (first - last) // (n_groups - 1)
    out = [first - g * step for g in range(n_groups - 1)] + [last]
    return [max(0, int(b)) for b in out]


def windowkv_layer_budgets(
    capacity: int,
    num_layers: int,
    group: int,
    beta: Union[int, float] = 14,
    schedule: str = "arithmetic",
    review_len: Optional[int] = None,
) -> list[int]:
    """Review-region budget (tokens) of every layer: its group's budget, clamped to ``[0, review_len]``.

    ``schedule="uniform"`` gives every layer ``capacity``. The caller rounds each budget down to whole windows.
    """
    if schedule == "arithmetic":
        per_group = windowkv_group_budgets(capacity, num_layers, group, beta)
        budgets = [per_group[layer // group] for layer in range(num_layers)]
    elif schedule == "uniform":
        budgets = [max(0, int(capacity))] * num_layers
    else:
        raise ValueError(f"windowkv_layer_budgets: schedule must be 'arithmetic' or 'uniform', got {schedule!r}")
    if review_len is not None:
        budgets = [min(b, max(0, review_len)) for b in budgets]
    return budgets


def pyramidkv_layer_budgets(
    capacity: int, num_layers: int, num_tokens: int, obs_window: int, beta: Union[int, float] = 20
) -> Optional[list[int]]:
    """PyramidKV's per-layer budgets: tokens kept **besides** the observation window, or None (no compression).

    C = ``capacity`` counts the observation window w (= ``min(obs_window, N)``). Rules (KVCache-Factory):

    * ``N <= C``: no compression (returns None).
    * ``N < 2 (C - w)``: plain SnapKV, every layer ``C - w``.
    * otherwise ``min = floor((C - w) / beta)``, ``max = 2 (C - w) - min``; if ``max >= N - w`` then
      ``max = N - w`` and ``min = 2 (C - w) - max``; ``step = floor((max - min) / (L - 1))``;
      ``budget_l = max - l * step``. L = 1 gives ``C - w`` (no division by zero). Budgets are clamped to
      ``[0, N - w]``.

    Examples
    --------
    >>> b = pyramidkv_layer_budgets(512, 32, 8000, 8, 20); (b[0], b[-1])
    (983, 53)
    """
    w = min(obs_window, num_tokens)
    if num_tokens <= capacity:
        return None
    base = max(0, capacity - w)
    review = num_tokens - w
    if num_tokens < 2 * base or num_layers == 1:
        return [min(base, review)] * num_layers
    if _is_int(beta):
        lo = base // beta
    else:
        lo = int(math.floor(base / beta))
    hi = 2 * base - lo
    if hi >= review:
        hi = review
        lo = 2 * base - hi
    step = (hi - lo) // (num_layers - 1)
    return [max(0, min(review, hi - layer * step)) for layer in range(num_layers)]
