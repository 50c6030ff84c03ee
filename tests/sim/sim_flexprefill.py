"""Simulator cases for the FlexPrefill ops: each function takes the op's own arguments and
builds the runner case, doing the conversions the CUDA glue does (csrc/cuda/flexprefill_*.cu)."""

from __future__ import annotations

import torch

from .gpusim import Case, register

FAMILY = "flexprefill"


@register(FAMILY, "js_divergence")
def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> Case:
    if p.dtype == torch.float64:  # the glue runs fp64 through the fp32 kernel
        p, q = p.float(), q.float()
    return Case("js_divergence", {"p": p, "q": q, "eps": float(eps)})
