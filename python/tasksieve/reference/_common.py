"""What every reference family shares: the error format of the C++ ``TORCH_CHECK``s and the
dtype / head-dim limits of the kernels."""

from __future__ import annotations

import torch

_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"tasksieve.{op}: {msg}")


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
