"""WindowKV's window strategy per request: ``"max"`` (localisation) or ``"mean"`` (aggregation), and
the ``"auto"`` rule that picks one from the layer-0 observation attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


#: Observation window (the paper's alpha) used when ``obs_window`` is None, per strategy.
DEFAULT_OBS_WINDOW = {"max": 32, "mean": 16}


@dataclass
class StrategyContext:
    """What a strategy callable gets, once per request, at the first scoring layer.

    Attributes
    ----------
    input_ids : Tensor [B, N] or None
        The prompt's token ids when the integration saw them (``model(input_ids=...)`` / ``generate``), else None.
    window_scores : Tensor [B, Hk, nw] float32
        Layer-0 window scores with ``reduce="mean"`` from the last ``min(32, N)`` queries (or ``obs_window`` when set).
    peak_share : float
        The statistic of the ``"auto"`` rule (see :func:`auto_strategy`), mean over the batch.
    """

    input_ids: Optional[torch.Tensor]
    window_scores: torch.Tensor
    peak_share: float


def auto_strategy(
    window_scores: torch.Tensor, threshold: float = 0.5, top_frac: float = 0.1
) -> tuple[str, float, list[float]]:
    """The ``"auto"`` rule: ``"max"`` when the observation-window attention is peaked, ``"mean"`` when it is flat.

    Statistic (``peak_share``), per batch row: average the window scores over the KV heads, drop window 0 (the
    attention sink, which draws mass in every task) when at least 3 windows exist, normalise to a distribution p
    over the remaining n windows and take the mass of its ``k = max(1, ceil(top_frac * n))`` largest entries.
    Uniform attention gives ``k / n`` (about ``top_frac``); attention concentrated on a few windows gives close
    to 1. The request's statistic is the mean over rows; ``peak_share >= threshold`` -> ``"max"`` (information
    localisation, e.g. QA / retrieval: keep the windows holding the peaks), else ``"mean"`` (aggregation, e.g.
    summarisation: keep the windows with the most total mass). Fewer than 2 windows -> ``"max"`` with statistic
    1.0 (nothing is compressed at that size anyway).

    The rule runs once per request on layer 0 (the first group leader), so no layer has to wait for the decision.
    Calibration caveat: on SmolLM2-135M-Instruct (the embedded default model, ~1.5k-token prompts over essay text)
    the layer-0 statistic was 0.29-0.30 for passkey retrieval, factual QA, summarisation, theme listing and title
    writing alike (and no single deeper layer separated the two task families either), so there "auto" picks
    ``"mean"`` for every prompt. The statistic does separate attention that really is concentrated (> 0.9 in the
    tests) from flat attention (about ``top_frac``); pass ``strategy="max"``/``"mean"`` or a callable when the
    task type is known.


    Parameters
    ----------
    window_scores : Tensor [B, Hk, nw]
        Scores from ``ops.window_scores(..., reduce="mean")``.
    threshold : float
        Decision threshold in (0, 1].
    top_frac : float
        Fraction of windows counted as "top", in (0, 1].

    Returns
    -------
    (strategy, peak_share, per_row_peak_share)
    """
    s = window_scores.detach().float()
    if s.dim() != 3:
        raise ValueError(f"auto_strategy: window_scores must be [B, Hk, nw], got shape {list(s.shape)}")
    nw = s.shape[-1]
    if nw < 2 or s.shape[0] == 0:
        return "max", 1.0, [1.0] * s.shape[0]
    m = s.mean(dim=1)  # [B, nw]
    if nw >= 3:
        m = m[:, 1:]
    m = m.clamp_min(0)
    n = m.shape[-1]
    k = max(1, math.ceil(top_frac * n))
    total = m.sum(dim=-1).clamp_min(1e-30)
    top = m.topk(k, dim=-1).values.sum(dim=-1)
    per_row = (top / total).tolist()
    stat = float(sum(per_row) / len(per_row))
    return ("max" if stat >= threshold else "mean"), stat, per_row
