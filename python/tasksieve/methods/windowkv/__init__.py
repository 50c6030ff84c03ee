"""KV-cache compression presses: WindowKV (task-adaptive window selection) and the SnapKV / PyramidKV baselines.

A *press* is a small, validated dataclass holding the settings of one compression method. It owns no run-time
state: everything that belongs to one request (the resolved strategy, the budgets, the indices a group leader
shares with its followers, ...) lives in a :class:`PressState` created by :meth:`new_state` and passed explicitly to
every call. One request's choice never leaks into the next, and two models can use the same press object.

Shapes (HF cache layout)
------------------------
B batch, H query heads, Hk KV heads (G = H / Hk), N cached tokens, D head dim, A observation queries.

* ``keys``, ``values``: ``[B, Hk, N, D]`` (``transformers`` cache layout, KV heads only).
* ``obs_queries``: ``[B, A, H, D]``, the last A queries of the prompt with RoPE applied (the layout of the
  ``tasksieve.ops`` window ops; the HF ``[B, H, q, D]`` query is passed as ``query[:, :, -A:].transpose(1, 2)``).

Every press exposes ``compress_layer(layer_idx, keys, values, obs_queries, state) -> (keys, values)``, called once
per layer, in layer order, right after the prompt's attention ran with the full cache. It returns the kept keys
and values, ``[B, Hk, kept, D]``, and records in ``state.token_index`` which original token each kept row holds
(``[B, 1 or Hk, kept]`` int64, ``None`` when nothing was dropped) so the integration can gather per-token side data
such as the padding mask. The HF integration is :mod:`tasksieve.integrations.hf`.

WindowKV in short
-----------------
The review region (the prompt minus the last ``obs_window`` tokens) is cut into whole windows of ``window`` tokens.
The observation queries score each window (``tasksieve.ops.window_scores``: fp32 softmax over all keys, mass summed
over the observation queries and averaged over the query heads of each KV head; per window either the mean of the
top ``window // 2`` token scores, ``"max"``, or the mean of all of them, ``"mean"``). The best windows are kept
(``ops.select_windows``, one selection shared by all KV heads by default), in position order, followed by the tail
(the observation window plus the review remainder that does not fill a whole window), and the layer's cache is
compacted with ``ops.gather_windows``. Only the first layer of each group of ``group`` layers scores; the others
reuse its indices. Budgets follow the paper's per-group arithmetic schedule (see :func:`windowkv_group_budgets`).
"""

from typing import Union

from .budgets import budget_tokens, pyramidkv_layer_budgets, windowkv_group_budgets, windowkv_layer_budgets
from .selection import gathered_token_index, neighbour_scores, pool_scores
from .snapkv import PyramidKV, SnapKV
from .state import PressState
from .strategy import DEFAULT_OBS_WINDOW, StrategyContext, auto_strategy
from .windowkv import WindowKV

__all__ = [
    "WindowKV",
    "SnapKV",
    "PyramidKV",
    "PressState",
    "StrategyContext",
    "auto_strategy",
    "budget_tokens",
    "windowkv_group_budgets",
    "windowkv_layer_budgets",
    "pyramidkv_layer_budgets",
    "pool_scores",
    "neighbour_scores",
    "gathered_token_index",
    "DEFAULT_OBS_WINDOW",
    "Press",
]

Press = Union[WindowKV, SnapKV, PyramidKV]
