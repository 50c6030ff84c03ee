"""The WindowKV press: its settings, their checks, and the calls the integration makes (the work is in
:mod:`.prefill` and :mod:`.eviction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from . import eviction, prefill
from ._checks import _check_budget, _check_pos_int, _is_real
from .state import PressState
from .strategy import DEFAULT_OBS_WINDOW, StrategyContext


@dataclass
class WindowKV:
    """WindowKV: keep whole windows of consecutive tokens chosen by the observation window; groups of layers share
    one selection; per-group pyramid budgets; window strategy chosen per request.

    Parameters
    ----------
    budget : float or int
        Float in (0, 1]: fraction of the prompt length N, ``C = floor(budget * N)``; int >= 1: C tokens. C is the
        average review-region budget per layer (before the schedule); each layer keeps its budget rounded down to
        whole windows plus the tail (observation window + the review remainder), so a layer keeps about
        ``C + obs_window`` tokens, as in the paper.
    window : int
        Window length in tokens (paper: 8).
    group : int
        Layers sharing one selection (paper: 8). The first layer of each group scores, the others reuse its
        indices; the last group is shorter when ``num_layers % group != 0``.
    obs_window : int or None
        Observation queries used for scoring. None: 32 for "max", 16 for "mean" (the paper's alpha).
    strategy : {"max", "mean", "auto"} or callable
        Window score: "max" = mean of the top ``window // 2`` token scores (localisation), "mean" = mean of all
        (aggregation). "auto" decides per request from the layer-0 observation attention (:func:`auto_strategy`).
        A callable gets a :class:`StrategyContext` (``input_ids``, layer-0 mean window scores, ``peak_share``) and
        returns "max" or "mean"; it is called once per request.
    schedule : {"arithmetic", "uniform"}
        Per-group budgets of the paper (:func:`windowkv_group_budgets`) or the same budget for every layer.
        Budgets are clamped to the review length; when C covers the whole review region nothing is dropped.
    beta : int or float
        Decay parameter of the arithmetic schedule (paper: 14).
    decode_evict : bool
        Also compress during decoding: when a layer's cache has grown ``window`` tokens past its prefill size,
        rescore it with the last ``obs_window`` queries and drop the lowest whole window(s) (the tail, which holds
        the most recent tokens, is always kept). Off by default.
    per_head : bool
        Select windows per KV head instead of one selection shared by the heads (the paper shares).
    group_scoring : {"mean", "first"}
        How a group chooses its windows. "first" (the paper): the first layer of the group scores and the others
        reuse its indices. "mean": every layer of the group scores and the selection ranks the mean of their window
        scores; the group's layers are compacted together by one gather when its last layer has run (prefill
        attention is full anyway, so nothing waits on it). On small models the first layer of a group is a poor
        judge (layer 0 attends mostly by position), which is why "mean" is the default; see bench/results.
    auto_threshold : float
        ``peak_share`` threshold of the auto rule, in (0, 1].
    auto_top : float
        Fraction of windows counted as "top" by the auto rule, in (0, 1].
    neighbours : {"none", "right", "both"}
        Neighbour rule (keeps units whole across a window boundary): before the selection each window also ranks by
        ``neighbour_weight`` times the score of the window before it (``"right"``) or of both windows next to it
        (``"both"``), so the window that continues a strongly attended one (the tail of a number cut by a window
        boundary) is kept with it. The number of kept windows does not change: a neighbour displaces the weakest
        window. Default ``"right"`` (RULER niah_single_1 at 12%, 25 samples each at 4k and 8k: 25/25 and 25/25
        against 23/25 and 23/25 with ``"none"``, decode KL 5x lower; bench/results/windowkv_units); ``"none"`` is
        the rule-free WindowKV of the paper. See :func:`tasksieve.methods.windowkv.neighbour_scores` and
        docs/design.md.
    neighbour_weight : float
        The share of a window's score its neighbours inherit, in (0, 1].
    """

    budget: Union[float, int] = 0.12
    window: int = 8
    group: int = 8
    obs_window: Optional[int] = None
    strategy: Union[str, Callable[[StrategyContext], str]] = "auto"
    schedule: str = "arithmetic"
    beta: Union[int, float] = 14
    decode_evict: bool = False
    per_head: bool = False
    group_scoring: str = "mean"
    auto_threshold: float = 0.5
    auto_top: float = 0.1
    neighbours: str = "right"
    neighbour_weight: float = 0.5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (also run by ``tasksieve.patch``)."""
        cls = type(self).__name__
        _check_budget(cls, self.budget)
        _check_pos_int(cls, "window", self.window)
        _check_pos_int(cls, "group", self.group)
        _check_pos_int(cls, "obs_window", self.obs_window, allow_none=True)
        if not (callable(self.strategy) or self.strategy in ("max", "mean", "auto")):
            raise ValueError(f"{cls}.strategy must be 'max', 'mean', 'auto' or a callable, got {self.strategy!r}")
        if self.schedule not in ("arithmetic", "uniform"):
            raise ValueError(f"{cls}.schedule must be 'arithmetic' or 'uniform', got {self.schedule!r}")
        if not _is_real(self.beta) or self.beta <= 0:
            raise ValueError(f"{cls}.beta must be a number > 0, got {self.beta!r}")
        if not isinstance(self.decode_evict, bool):
            raise ValueError(f"{cls}.decode_evict must be a bool, got {self.decode_evict!r}")
        if not isinstance(self.per_head, bool):
            raise ValueError(f"{cls}.per_head must be a bool, got {self.per_head!r}")
        if self.group_scoring not in ("mean", "first"):
            raise ValueError(f"{cls}.group_scoring must be 'mean' or 'first', got {self.group_scoring!r}")
        if self.neighbours not in ("none", "right", "both"):
            raise ValueError(f"{cls}.neighbours must be 'none', 'right' or 'both', got {self.neighbours!r}")
        for name in ("auto_threshold", "auto_top", "neighbour_weight"):
            v = getattr(self, name)
            if not _is_real(v) or not (0.0 < float(v) <= 1.0):
                raise ValueError(f"{cls}.{name} must be in (0, 1], got {v!r}")

    # -- integration interface -------------------------------------------------------------------------------

    @property
    def max_obs_window(self) -> int:
        """Observation queries the integration must record per layer."""
        if self.obs_window is not None:
            return self.obs_window
        if self.strategy in DEFAULT_OBS_WINDOW:
            return DEFAULT_OBS_WINDOW[self.strategy]
        return max(DEFAULT_OBS_WINDOW.values())

    def new_state(self, num_layers: int) -> PressState:
        """A fresh per-request state."""
        return PressState(num_layers=num_layers)


    def compress_layer(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        obs_queries: torch.Tensor,
        state: PressState,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress one layer's prompt cache.

        Parameters
        ----------
        layer_idx : int
            Layer index (layers are visited in order; the first layer of each group scores).
        keys, values : Tensor [B, Hk, N, D]
            The layer's full prompt cache.
        obs_queries : Tensor [B, A, H, D]
            The last A >= ``min(max_obs_window, N)`` queries of the prompt (RoPE applied), last dim contiguous.
        state : PressState
            This request's state (from :meth:`new_state`).

        Returns
        -------
        (keys, values) : Tensor [B, Hk, kk * window + tail, D]
            kk = the layer's budget in whole windows (at most nw = (N - A) // window), tail = N - nw * window.
            The inputs themselves when nothing is dropped.
        """
        return prefill.compress_layer(self, layer_idx, keys, values, obs_queries, state)

    def compress_layers(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        obs_queries: torch.Tensor,
        state: PressState,
    ) -> dict:
        """Compress the prompt cache of ``layer_idx``, or of its whole group once the group's last layer has run.

        This is what the integration calls, once per layer in order. Arguments as :meth:`compress_layer`.

        Returns
        -------
        dict {layer: (keys, values, token_index)}
            The layers finished by this call: just ``layer_idx`` with ``group_scoring="first"``; with "mean", nothing
            until the group's last layer, then every layer of the group, compacted by ONE ``gather_windows`` launch.
            token_index: None when nothing was dropped, else ``[B, 1 or Hk, kept]`` int64, the original token of
            each kept row.
        """
        return prefill.compress_group(self, layer_idx, keys, values, obs_queries, state)

    def evict_layer(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        recent_queries: torch.Tensor,
        state: PressState,
        valid: Optional[torch.Tensor] = None,
        step: int = 0,
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Decode-time eviction (``decode_evict=True``): drop whole windows once the layer outgrew its budget.

        Fires when ``N >= target + window`` (target = the layer's size after prefill compression); then it drops
        ``(N - target) // window`` windows, so the layer stays below ``target + window`` tokens. Scores come from
        ``recent_queries`` (the last A queries of this layer, the last A cache rows being their tokens); windows
        holding a padded token (``valid`` False) go first. Group followers reuse their leader's choice of the same
        decode step when their cache has the same length.

        Parameters
        ----------
        keys, values : Tensor [B, Hk, N, D]
        recent_queries : Tensor [B, A, H, D]
        valid : Tensor [B, 1 or Hk, N] bool, optional
            Padding mask of the cache rows.
        step : int
            Decode-step counter of the request (to match a follower with its leader's step).

        Returns
        -------
        None when nothing is evicted, else the compacted ``(keys, values)``; ``state.token_index`` then holds the
        kept rows (indices into the current cache).
        """
        return eviction.evict_layer(self, layer_idx, keys, values, recent_queries, state, valid, step)
