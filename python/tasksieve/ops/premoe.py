"""PreMoe ops: tcess_update, router_stats_update, route_topk, moe_align, expert_gemm, moe_forward,
and their fakes."""

from __future__ import annotations

from typing import Optional

import torch

from . import _loader

__all__ = ["tcess_update", "router_stats_update", "route_topk", "moe_align", "expert_gemm",
           "moe_forward"]


# ---------------------------------------------------------------------------------------------
# PreMoe routing: tcess_update, router_stats_update, route_topk, moe_align
# ---------------------------------------------------------------------------------------------


def tcess_update(router_logits: torch.Tensor, top_k: int, r: float, acc: torch.Tensor,
                 count: torch.Tensor) -> None:
    """Accumulates PreMoe's task-conditioned expected selection score (TCESS), in place.

    Per token: the top_k experts by raw logit z (ties to the lower id, NaN as -inf); p = softmax
    over those k logits; ``acc[i] += z_i`` for each of them with ``p_i >= r``. Then
    ``count += T``. TCESS = ``acc / count``; r <= 0 with top_k = 1 is the published default
    (the token-averaged top-1 logit).

    Parameters
    ----------
    router_logits : Tensor [T, E]
        Raw router logits, float32, float16 or bfloat16 (math in fp32); any strides.
    top_k : int
        Experts considered per token, in [1, E].
    r : float
        Probability threshold (not NaN).
    acc : Tensor [E] float64
        Running sums, mutated; same device. Deterministic on CPU and CUDA (the CUDA kernel adds
        per-warp fp64 sums block by block in a fixed order, no atomics).
    count : Tensor [1] int64
        Running token count, mutated; same device.
    """
    _loader.require_kernel("tcess_update", router_logits)
    torch.ops.tasksieve.tcess_update.default(router_logits, top_k, r, acc, count)
    return None


def router_stats_update(router_logits: torch.Tensor, topk_ids: torch.Tensor,
                        counts: torch.Tensor, logit_sum: torch.Tensor, logit_gram: torch.Tensor,
                        coselect: torch.Tensor) -> None:
    """Accumulates UNCURL's router statistics over calibration tokens, in place, in float64.

    With z = router_logits converted to float64 and ``S[t, i]`` = the number of times expert i
    occurs in ``topk_ids[t]`` (a duplicate id counts once per occurrence)::

        counts     += S.sum(0)          logit_sum  += z.sum(0)   (all tokens, selected or not)
        coselect   += S.T @ S           logit_gram += z.T @ z

    For distinct ids per row, ``coselect[i, j]`` counts the tokens that select both i and j
    and its diagonal adds what ``counts`` adds. Deterministic on CPU and CUDA (no atomics on
    floats); the statistics stay on the logits' device, no host sync.

    Parameters
    ----------
    router_logits : Tensor [T, E]
        Router logits, float32, float16 or bfloat16; any strides. T = 0 is a no-op.
    topk_ids : Tensor [T, k] int32 or int64
        The experts each token selects, 1 <= k <= E, ids in [0, E). An id out of range is an
        error on CPU; on CUDA it is skipped (checking would need a host sync).
    counts, logit_sum : Tensor [E] float64
        Mutated; contiguous, on the device of router_logits.
    logit_gram, coselect : Tensor [E, E] float64
        Mutated; contiguous, on the device of router_logits.
    """
    _loader.require_kernel("router_stats_update", router_logits)
    torch.ops.tasksieve.router_stats_update.default(router_logits, topk_ids, counts, logit_sum,
                                                    logit_gram, coselect)
    return None


def route_topk(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
               renormalize: bool = False, keep_mask: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, scaling: float = 1.0,
               mask_full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused router scoring + pruned-expert mask + top-k + optional renormalisation.

    Parameters
    ----------
    router_logits : Tensor [T, E]
        Raw router logits, float32, float16 or bfloat16 (math in fp32); any strides.
    top_k : int
        Experts per token, in [1, E].
    scoring : {"softmax", "sigmoid", "topk_softmax"}
        ``"softmax"``: s = softmax(z) over the kept experts (over all E with ``mask_full``),
        weights s. ``"sigmoid"``: s = sigmoid(z), weights s. ``"topk_softmax"``: weights =
        softmax over the k selected logits. See ``tasksieve.integrations.hf.moe_conventions`` for the HF
        families.
    renormalize : bool
        Divide the k weights by their sum (no-op for topk_softmax).
    keep_mask : Tensor [E] bool, optional
        Experts that may be selected (None: all). Pruned experts are never selected. At least
        top_k must be kept: checked on the host, which for a CUDA mask is one device-to-host
        read (skipped while a CUDA graph is being captured; the kernel then gives id -1 and
        weight 0 to the columns a token cannot fill).
    bias : Tensor [E] float32, optional
        Added to s for the selection only (DeepSeek-V3's ``e_score_correction_bias``).
    scaling : float
        Multiplies the final weights (DeepSeek's ``routed_scaling_factor``).
    mask_full : bool
        softmax only: the denominator runs over all E experts, so pruning keeps the unpruned
        model's probabilities (matters only without renormalisation).

    Returns
    -------
    (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k]), columns in selection order:
    by s + bias with a bias, by z without one (the same order as s, free of rounding ties);
    higher first, ties to the lower expert id, NaN as -inf.
    """
    _loader.require_kernel("route_topk", router_logits)
    return tuple(torch.ops.tasksieve.route_topk.default(
        router_logits, top_k, scoring, renormalize, keep_mask, bias, scaling, mask_full))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts token slots by expert and pads each expert's run to whole tiles of block_m rows.

    Slot s = t*k + j is ``topk_ids[t, j]``; its compact expert is ``expert_map[id]`` (the id
    itself without a map), -1 drops the slot. A stable counting sort on the device, with
    fixed-size outputs and no host sync on CUDA.

    Parameters
    ----------
    topk_ids : Tensor [T, k] int32 or int64
        Expert ids in [0, num_experts). The CPU op raises on ids out of range; the CUDA op drops
        their slots (never an out-of-bounds access).
    num_experts : int
        E >= 1 (CUDA: at most 1024).
    block_m : int
        Tile height >= 1.
    expert_map : Tensor [num_experts] int32, optional
        Compact id in [0, num_experts) or -1 per expert. Out-of-range entries: an error on CPU,
        a dropped slot on CUDA.

    Returns
    -------
    sorted_ids : Tensor [P] int32
        P = round_up(T*k + num_experts*(block_m-1), block_m). Runs of slot ids in ascending
        compact expert, slots ascending within a run, each run padded with the sentinel T*k to a
        multiple of block_m; experts without slots get no run; sentinel from num_padded on.
    tile_expert : Tensor [P // block_m] int32
        Compact expert of each tile, -1 past num_padded // block_m.
    num_padded : Tensor [1] int32
        Rows in use (a multiple of block_m).
    """
    _loader.require_kernel("moe_align", topk_ids)
    return tuple(torch.ops.tasksieve.moe_align.default(topk_ids, num_experts, block_m,
                                                       expert_map))


if _loader.LOADED and "tcess_update" in _loader.op_names():

    @torch.library.register_fake("tasksieve::tcess_update")
    def _tcess_update_fake(router_logits, top_k, r, acc, count):
        return None


if _loader.LOADED and "router_stats_update" in _loader.op_names():

    @torch.library.register_fake("tasksieve::router_stats_update")
    def _router_stats_update_fake(router_logits, topk_ids, counts, logit_sum, logit_gram,
                                  coselect):
        return None


if _loader.LOADED and "route_topk" in _loader.op_names():

    @torch.library.register_fake("tasksieve::route_topk")
    def _route_topk_fake(router_logits, top_k, scoring="softmax", renormalize=False,
                         keep_mask=None, bias=None, scaling=1.0, mask_full=False):
        T = router_logits.shape[0]
        return (router_logits.new_empty((T, top_k), dtype=torch.float32),
                router_logits.new_empty((T, top_k), dtype=torch.int32))


if _loader.LOADED and "moe_align" in _loader.op_names():

    @torch.library.register_fake("tasksieve::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_m, expert_map=None):
        T, k = topk_ids.shape
        P = (T * k + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
        return (topk_ids.new_empty((P,), dtype=torch.int32),
                topk_ids.new_empty((P // block_m,), dtype=torch.int32),
                topk_ids.new_empty((1,), dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# PreMoe expert GEMM: expert_gemm, moe_forward
# ---------------------------------------------------------------------------------------------


def expert_gemm(x: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                tile_expert: torch.Tensor, num_padded: torch.Tensor, block_m: int, top_k: int,
                gather: bool, activation: str = "none",
                topk_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM over the kept experts, on ``moe_align``'s tiles (no host sync on CUDA).

    Parameters
    ----------
    x : Tensor [T, K] (gather) or [T*top_k, K] (no gather)
        float32 (CPU only), float16 or bfloat16. With gather, slot s = t*top_k + j reads row
        ``s // top_k``, so the tokens are never copied per slot; without, row s.
    w : Tensor [E_c, N, K]
        Expert weights (out x in), x's dtype: E_c compact (kept) experts. With
        ``activation='silu_mul'``, N = 2I: I gate rows, then I up rows (HF v5 ``gate_up_proj``).
    sorted_ids, tile_expert, num_padded : Tensor int32 [P], [P / block_m], [1]
        ``moe_align(topk_ids, num_experts, block_m, expert_map)`` with the same ``block_m``.
        CUDA: block_m in {16, 32, 64}; K a multiple of 8.
    block_m, top_k : int
    gather : bool
    activation : str
        'none': ``y[s] = x_s . w[e]^T``; 'silu_mul': ``y[s] = silu(x_s . w[e,:I]^T) *
        (x_s . w[e,I:]^T)``, fused in the epilogue (2I never reaches memory).
    topk_weights : Tensor [T, top_k] float, optional
        ``y[s] *= topk_weights.flatten()[s]`` in the epilogue.

    Returns
    -------
    Tensor [T*top_k, N or N/2] in x's dtype; rows of slots that no tile lists (dropped by
    expert_map) are 0. fp32 accumulation.
    """
    _loader.require_kernel("expert_gemm", x)
    return torch.ops.tasksieve.expert_gemm.default(x, w, sorted_ids, tile_expert, num_padded,
                                                   block_m, top_k, gather, activation,
                                                   topk_weights)


def moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor,
                expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routed-expert FFN of one MoE layer over the kept experts only.

    Parameters
    ----------
    x : Tensor [T, H]
        Token states, float32 (CPU only), float16 or bfloat16.
    w13 : Tensor [E_c, 2I, H]
        Gate rows then up rows per compact expert (HF v5 ``gate_up_proj``), x's dtype.
    w2 : Tensor [E_c, H, I]
        Down projections (HF v5 ``down_proj``), x's dtype.
    topk_ids : Tensor [T, k] int32 or int64
        Routed experts, in [0, num_experts).
    topk_weights : Tensor [T, k] float
        Router weights of those experts.
    expert_map : Tensor [num_experts] int32, optional
        Original expert id -> compact id in [0, E_c), or -1 (the slot is dropped and adds
        nothing). None: the ids index w13/w2 directly.

    Returns
    -------
    Tensor [T, H] in x's dtype: ``out[t] = sum_j topk_weights[t, j] * w2[e] . (silu(w13[e, :I]
    . x_t) * (w13[e, I:] . x_t))`` over the kept slots (t, j), e their compact expert. The k
    slots of a token are summed in a fixed order (deterministic). CPU: per-expert GEMMs (an
    AVX512-BF16 kernel for bf16 at decode, BLAS otherwise);
    CUDA: moe_align -> expert_gemm (gather, silu_mul) -> expert_gemm (router weight) -> sum
    over k, no host sync. Experts without tokens read no weights.
    """
    _loader.require_kernel("moe_forward", x)
    return torch.ops.tasksieve.moe_forward.default(x, w13, w2, topk_ids, topk_weights,
                                                   expert_map)


if _loader.LOADED and "expert_gemm" in _loader.op_names():

    @torch.library.register_fake("tasksieve::expert_gemm")
    def _expert_gemm_fake(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather,
                          activation="none", topk_weights=None):
        slots = x.shape[0] * top_k if gather else x.shape[0]
        n_out = w.shape[1] // 2 if activation == "silu_mul" else w.shape[1]
        return x.new_empty((slots, n_out))


if _loader.LOADED and "moe_forward" in _loader.op_names():

    @torch.library.register_fake("tasksieve::moe_forward")
    def _moe_forward_fake(x, w13, w2, topk_ids, topk_weights, expert_map=None):
        return x.new_empty(x.shape)
