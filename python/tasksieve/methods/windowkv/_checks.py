"""Argument checks of the press settings: ValueError naming the press and the field."""

from __future__ import annotations

import math
from typing import Any


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


def _check_budget(cls: str, budget: Any) -> None:
    if _is_int(budget):
        if budget < 1:
            raise ValueError(f"{cls}.budget: an int budget (tokens per layer) must be >= 1, got {budget}")
    elif isinstance(budget, float):
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise ValueError(f"{cls}.budget: a float budget (fraction of the prompt) must be in (0, 1], got {budget}")
    else:
        raise ValueError(
            f"{cls}.budget must be a float in (0, 1] (fraction of the prompt length) or an int >= 1 (tokens per "
            f"layer), got {budget!r} ({type(budget).__name__})"
        )


def _check_pos_int(cls: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        more = " or None" if allow_none else ""
        raise ValueError(f"{cls}.{name} must be an int >= 1{more}, got {value!r}")


def _check_pool(cls: str, pool: Any) -> None:
    if pool not in ("max", "avg"):
        raise ValueError(f"{cls}.pool must be 'max' or 'avg', got {pool!r}")
