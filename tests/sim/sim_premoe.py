"""Simulator cases for the PreMoe ops: each function takes the op's own arguments and builds the
runner case (csrc/sim/sim_premoe.cu), doing the conversions the CUDA glue does
(csrc/cuda/moe_route.cu, csrc/cuda/moe_gemm.cu): contiguous copies, router weights to fp32, the
host-side keep_mask count of route_topk. Shape/dtype checks stay with the CPU op's checks
(csrc/checks/), which the tests call on the same inputs."""

from __future__ import annotations

from typing import Optional

import torch

from .gpusim import Case, register

FAMILY = "premoe"


def _logits_args(z: torch.Tensor) -> dict:
    """The router logits as the kernel reads them: the smallest flat span of storage that holds
    the view (any non-negative strides), with sizes and strides in elements."""
    assert z.dim() == 2 and all(s >= 0 for s in z.stride())
    Tn, E = z.shape
    s0, s1 = z.stride()
    span = 1 + (Tn - 1) * s0 + (E - 1) * s1 if z.numel() else 0
    flat = torch.as_strided(z, (span,), (1,)).clone() if span else z.new_empty(0)
    return {"router_logits": flat, "Tn": Tn, "E": E, "s0": s0, "s1": s1}


@register(FAMILY, "tcess_update")
def tcess_update(router_logits: torch.Tensor, top_k: int, r: float, acc: torch.Tensor,
                 count: torch.Tensor) -> Case:
    # Returns (acc, count) updated; the caller copies them back (the op mutates in place).
    return Case("tcess_update", {**_logits_args(router_logits), "top_k": int(top_k),
                                 "r": float(r), "acc": acc.contiguous(), "count": count})


@register(FAMILY, "router_stats_update")
def router_stats_update(router_logits: torch.Tensor, topk_ids: torch.Tensor, counts: torch.Tensor,
                        logit_sum: torch.Tensor, logit_gram: torch.Tensor,
                        coselect: torch.Tensor) -> Case:
    # Returns (counts, logit_sum, logit_gram, coselect) updated; the caller copies them back (the
    # op mutates in place). The glue requires contiguous accumulators and makes topk_ids
    # contiguous.
    return Case("router_stats_update", {
        **_logits_args(router_logits), "topk_ids": topk_ids.contiguous(), "counts": counts,
        "logit_sum": logit_sum, "logit_gram": logit_gram, "coselect": coselect})


@register(FAMILY, "route_topk")
def route_topk(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
               renormalize: bool = False, keep_mask: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, scaling: float = 1.0,
               mask_full: bool = False) -> Case:
    if keep_mask is not None:  # the glue's host-side check (checks::check_route_topk_kept)
        kept = int(keep_mask.sum())
        if kept < top_k:
            raise RuntimeError(f"tasksieve.route_topk: keep_mask must keep at least top_k = "
                               f"{top_k} experts, got {kept} kept")
        keep_mask = keep_mask.contiguous()
    return Case("route_topk", {**_logits_args(router_logits), "top_k": int(top_k),
                               "scoring": scoring, "renormalize": bool(renormalize),
                               "keep_mask": keep_mask,
                               "bias": bias.contiguous() if bias is not None else None,
                               "scaling": float(scaling), "mask_full": bool(mask_full)})


@register(FAMILY, "moe_align")
def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: Optional[torch.Tensor] = None) -> Case:
    return Case("moe_align", {"topk_ids": topk_ids.contiguous(), "num_experts": int(num_experts),
                              "block_m": int(block_m),
                              "expert_map": expert_map.contiguous()
                              if expert_map is not None else None})


@register(FAMILY, "expert_gemm")
def expert_gemm(x: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                tile_expert: torch.Tensor, num_padded: torch.Tensor, block_m: int, top_k: int,
                gather: bool, activation: str = "none",
                topk_weights: Optional[torch.Tensor] = None) -> Case:
    return Case("expert_gemm", {
        "x": x.contiguous(), "w": w.contiguous(), "sorted_ids": sorted_ids.contiguous(),
        "tile_expert": tile_expert.contiguous(), "num_padded": num_padded.contiguous(),
        "block_m": int(block_m), "top_k": int(top_k), "gather": bool(gather),
        "activation": activation,
        "topk_weights": topk_weights.float().contiguous() if topk_weights is not None else None})


@register(FAMILY, "moe_forward")
def moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor,
                expert_map: Optional[torch.Tensor] = None) -> Case:
    return Case("moe_forward", {
        "x": x.contiguous(), "w13": w13.contiguous(), "w2": w2.contiguous(),
        "topk_ids": topk_ids.contiguous(), "topk_weights": topk_weights.float().contiguous(),
        "expert_map": expert_map.contiguous() if expert_map is not None else None})
