"""Pure-PyTorch PreMoe ops: tcess_update, router_stats_update, route_topk, moe_align,
expert_gemm, moe_forward."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import _SCORE_DTYPES, _fail, _shape

__all__ = [
    "reference_tcess_update",
    "reference_router_stats_update",
    "reference_route_topk",
    "reference_moe_align",
    "moe_align_padded_size",
    "ROUTE_SCORINGS",
    "check_tcess_update_args",
    "check_router_stats_update_args",
    "check_route_topk_args",
    "check_moe_align_args",
    "check_expert_gemm_args",
    "reference_expert_gemm",
    "check_moe_forward_args",
    "reference_moe_forward",
    "EXPERT_GEMM_ACTIVATIONS",
]

# ---------------------------------------------------------------------------------------------
# PreMoe routing: tcess_update, router_stats_update, route_topk, moe_align
# ---------------------------------------------------------------------------------------------

ROUTE_SCORINGS = ("softmax", "sigmoid", "topk_softmax")
_ID_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def _check_router_logits(op: str, router_logits, top_k: int) -> None:
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        _fail(op, f"router_logits must be a 2-D tensor [T, E], got shape {_shape(router_logits)}")
    if router_logits.dtype not in _SCORE_DTYPES:
        _fail(op, f"router_logits must be float32, float16 or bfloat16, got {router_logits.dtype}")
    E = router_logits.shape[1]
    if not 1 <= top_k <= E:
        _fail(op, f"top_k must be in [1, E] = [1, {E}] (E = router_logits.size(1)), got {top_k}")


def _check_expert_vector(op: str, name: str, t, dtype, E: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != E:
        _fail(op, f"{name} must be a 1-D tensor [E] = [{E}], got shape {_shape(t)}")
    if t.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        _fail(op, f"{name} must be on the device of router_logits ({device}), got {t.device}")


def _topk_order(key: torch.Tensor, selectable: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k selectable columns of ``key`` in ranking order: higher key first, equal keys
    to the lower column, NaN as -inf, unselectable columns last. int64 [T, k]."""
    key = torch.nan_to_num(key.float(), nan=float("-inf"), posinf=float("inf"),
                           neginf=float("-inf"))
    # Two stable sorts: by key (ties keep the column order), then selectable first.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    usable = torch.gather(selectable.expand_as(key), -1, order)
    second = torch.sort(usable.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, second)[:, :k]


def check_tcess_update_args(router_logits, top_k, r, acc, count) -> None:
    op = "tcess_update"
    _check_router_logits(op, router_logits, top_k)
    E, dev = router_logits.shape[1], router_logits.device
    if math.isnan(r):
        _fail(op, f"r must be a number, got {r}")
    _check_expert_vector(op, "acc", acc, torch.float64, E, dev)
    if not isinstance(count, torch.Tensor) or tuple(count.shape) != (1,):
        _fail(op, f"count must be a tensor of shape [1], got shape {_shape(count)}")
    if count.dtype != torch.int64:
        _fail(op, f"count must be int64, got {count.dtype}")
    if count.device != dev:
        _fail(op, f"count must be on the device of router_logits ({dev}), got {count.device}")


def reference_tcess_update(router_logits: torch.Tensor, top_k: int, r: float, acc: torch.Tensor,
                           count: torch.Tensor) -> None:
    """Accumulates PreMoe's TCESS statistics in place (``acc`` and ``count``), returns None.

    Per token t: ``sel`` = the top_k experts by raw logit z (ties to the lower id, NaN as -inf);
    ``p = softmax(z[sel])``; ``acc[i] += z_i`` (in float64) for every i in sel with ``p_i >= r``.
    Then ``count += T``. TCESS = acc / count. r <= 0 includes every selected expert.

    Parameters
    ----------
    router_logits : Tensor [T, E] float32, float16 or bfloat16 (math in fp32, sums in fp64)
    top_k : int, in [1, E]
    r : float, probability threshold
    acc : Tensor [E] float64, mutated
    count : Tensor [1] int64, mutated
    """
    check_tcess_update_args(router_logits, top_k, r, acc, count)
    z = router_logits.float()
    T, E = z.shape
    if T > 0:
        sel = _topk_order(z, torch.ones(E, dtype=torch.bool, device=z.device), top_k)
        zs = torch.gather(z, -1, sel)
        p = torch.softmax(zs, dim=-1)
        contrib = torch.where(p >= r, zs.double(), torch.zeros((), dtype=torch.float64,
                                                                  device=z.device))
        acc.index_add_(0, sel.flatten(), contrib.flatten())
    count.add_(T)


def _check_router_stats_accumulator(name: str, t, shape: tuple, shape_name: str, device) -> None:
    op = "router_stats_update"
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        _fail(op, f"{name} must have shape {shape_name} = {list(shape)} "
                  f"(E = router_logits.size(1)), got {_shape(t)}")
    if t.dtype != torch.float64:
        _fail(op, f"{name} must be torch.float64, got {t.dtype}")
    if t.device != device:
        _fail(op, f"{name} must be on the device of router_logits ({device}), got {t.device}")
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous (it is updated in place), got strides "
                  f"{list(t.stride())}")


def check_router_stats_update_args(router_logits, topk_ids, counts, logit_sum, logit_gram,
                                   coselect) -> None:
    """Every check of ``router_stats_update``, the values of topk_ids included (which the CUDA
    op skips instead: one host sync here for CUDA ids)."""
    op = "router_stats_update"
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        _fail(op, f"router_logits must be a 2-D tensor [T, E], got shape {_shape(router_logits)}")
    if router_logits.dtype not in _SCORE_DTYPES:
        _fail(op, f"router_logits must be float32, float16 or bfloat16, got {router_logits.dtype}")
    T, E = router_logits.shape
    dev = router_logits.device
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        _fail(op, f"topk_ids must be a 2-D tensor [T, k], got shape {_shape(topk_ids)}")
    if topk_ids.dtype not in _ID_DTYPES:
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.shape[0] != T:
        _fail(op, f"topk_ids must have T = router_logits.size(0) = {T} rows, got shape "
                  f"{_shape(topk_ids)}")
    k = topk_ids.shape[1]
    if not 1 <= k <= E:
        _fail(op, f"topk_ids must have k in [1, E] = [1, {E}] columns "
                  f"(E = router_logits.size(1)), got k = {k}")
    if topk_ids.device != dev:
        _fail(op, f"topk_ids must be on the device of router_logits ({dev}), got "
                  f"{topk_ids.device}")
    _check_router_stats_accumulator("counts", counts, (E,), "[E]", dev)
    _check_router_stats_accumulator("logit_sum", logit_sum, (E,), "[E]", dev)
    _check_router_stats_accumulator("logit_gram", logit_gram, (E, E), "[E, E]", dev)
    _check_router_stats_accumulator("coselect", coselect, (E, E), "[E, E]", dev)
    bad = ((topk_ids < 0) | (topk_ids >= E)).nonzero()
    if bad.numel():
        t, j = (int(v) for v in bad[0])
        _fail(op, f"topk_ids must be in [0, E) = [0, {E}), got {int(topk_ids[t, j])} "
                  f"at [{t}, {j}]")


def reference_router_stats_update(router_logits: torch.Tensor, topk_ids: torch.Tensor,
                                  counts: torch.Tensor, logit_sum: torch.Tensor,
                                  logit_gram: torch.Tensor, coselect: torch.Tensor) -> None:
    """Accumulates UNCURL's router statistics in place (all four float64), returns None.

    z = router_logits in float64; S [T, E] float64, ``S[t, i]`` = the number of occurrences of
    expert i in ``topk_ids[t]`` (duplicates count once each). Then ``counts += S.sum(0)``,
    ``logit_sum += z.sum(0)``, ``logit_gram += z.T @ z``, ``coselect += S.T @ S``.

    Parameters
    ----------
    router_logits : Tensor [T, E] float32, float16 or bfloat16
    topk_ids : Tensor [T, k] int32 or int64, 1 <= k <= E, values in [0, E)
    counts, logit_sum : Tensor [E] float64, contiguous, mutated
    logit_gram, coselect : Tensor [E, E] float64, contiguous, mutated
    """
    check_router_stats_update_args(router_logits, topk_ids, counts, logit_sum, logit_gram,
                                   coselect)
    T, E = router_logits.shape
    if T == 0:
        return
    z = router_logits.to(torch.float64)
    S = torch.zeros(T, E, dtype=torch.float64, device=z.device)
    S.scatter_add_(1, topk_ids.long(), torch.ones(topk_ids.shape, dtype=torch.float64,
                                                  device=z.device))
    counts.add_(S.sum(0))
    logit_sum.add_(z.sum(0))
    logit_gram.add_(z.T @ z)
    coselect.add_(S.T @ S)


def check_route_topk_args(router_logits, top_k, scoring="softmax", renormalize=False,
                          keep_mask=None, bias=None, scaling=1.0, mask_full=False) -> None:
    """The argument checks of ``route_topk``, including "at least top_k experts kept" (which
    reads keep_mask: one host sync for a CUDA mask)."""
    op = "route_topk"
    _check_router_logits(op, router_logits, top_k)
    E, dev = router_logits.shape[1], router_logits.device
    if scoring not in ROUTE_SCORINGS:
        _fail(op, f"scoring must be one of {', '.join(repr(s) for s in ROUTE_SCORINGS)}, "
                  f"got {scoring!r}")
    if not math.isfinite(scaling):
        _fail(op, f"scaling must be finite, got {scaling}")
    if bias is not None:
        _check_expert_vector(op, "bias", bias, torch.float32, E, dev)
    if keep_mask is not None:
        _check_expert_vector(op, "keep_mask", keep_mask, torch.bool, E, dev)
        kept = int(keep_mask.sum().item())
        if kept < top_k:
            _fail(op, f"keep_mask must keep at least top_k = {top_k} experts, got {kept} kept")


def reference_route_topk(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                         renormalize: bool = False, keep_mask: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, scaling: float = 1.0,
                         mask_full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Router top-k with pruned experts masked out, in fp32.

    Scorings (z = logits in fp32, K = kept experts):

    * ``"softmax"``: s = softmax of z over K (over all E when ``mask_full``); w = s.
    * ``"sigmoid"``: s = sigmoid(z); w = s (the bias never enters the weights).
    * ``"topk_softmax"``: w = softmax over the k selected logits.

    Selection: the top_k experts of K by s + bias (with a bias), by z (without one, for every
    scoring: s is increasing in z, and ranking by z keeps two different logits from tying after
    rounding); higher first, ties to the lower id, NaN as -inf. Pruned experts are never
    selected. Then ``renormalize`` divides w by its sum over the k (a no-op for topk_softmax)
    and w is multiplied by ``scaling``. Columns are in selection order.

    Returns
    -------
    (topk_weights float32 [T, top_k], topk_ids int32 [T, top_k])
    """
    check_route_topk_args(router_logits, top_k, scoring, renormalize, keep_mask, bias, scaling,
                          mask_full)
    z = router_logits.float()
    T, E = z.shape
    kept = (keep_mask if keep_mask is not None
            else torch.ones(E, dtype=torch.bool, device=z.device))
    if scoring == "softmax":
        denominator_set = torch.ones_like(kept) if mask_full else kept
        s = torch.softmax(z.masked_fill(~denominator_set, float("-inf")), dim=-1)
    elif scoring == "sigmoid":
        s = torch.sigmoid(z)
    else:
        s = z
    key = s + bias if bias is not None else z
    ids = _topk_order(key, kept, top_k)
    if scoring == "topk_softmax":
        w = torch.softmax(torch.gather(z, -1, ids), dim=-1)
    else:
        w = torch.gather(s, -1, ids)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    w = w * scaling
    return w.to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


def check_moe_align_args(topk_ids, num_experts, block_m, expert_map=None) -> None:
    """The argument checks of ``moe_align``, values included (ids and expert_map entries)."""
    op = "moe_align"
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        _fail(op, f"topk_ids must be a 2-D tensor [T, k], got shape {_shape(topk_ids)}")
    if topk_ids.dtype not in _ID_DTYPES:
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if num_experts < 1:
        _fail(op, f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        _fail(op, f"block_m must be >= 1, got {block_m}")
    T, k = topk_ids.shape
    if k < 1:
        _fail(op, f"topk_ids must have at least one column (k >= 1), got shape {_shape(topk_ids)}")
    P = moe_align_padded_size(T * k, num_experts, block_m)
    if P > _INT32_MAX:
        _fail(op, f"the padded size P = {P} (T*k = {T * k}, num_experts = {num_experts}, "
                  f"block_m = {block_m}) must fit in int32")
    if topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min().item()), int(topk_ids.max().item())
        if lo < 0 or hi >= num_experts:
            _fail(op, f"topk_ids values must be in [0, num_experts) = [0, {num_experts}), "
                      f"got [{lo}, {hi}]")
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor) or tuple(expert_map.shape) != (num_experts,):
            _fail(op, f"expert_map must be a 1-D tensor [num_experts] = [{num_experts}], "
                      f"got shape {_shape(expert_map)}")
        if expert_map.dtype != torch.int32:
            _fail(op, f"expert_map must be int32, got {expert_map.dtype}")
        if expert_map.device != topk_ids.device:
            _fail(op, f"expert_map must be on the device of topk_ids ({topk_ids.device}), "
                      f"got {expert_map.device}")
        lo, hi = int(expert_map.min().item()), int(expert_map.max().item())
        if lo < -1 or hi >= num_experts:
            _fail(op, f"expert_map values must be -1 or in [0, num_experts) = "
                      f"[0, {num_experts}), got [{lo}, {hi}]")


def moe_align_padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """Length P of ``moe_align``'s sorted_ids: ``round_up(num_slots + E*(block_m-1), block_m)``."""
    return -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m


def reference_moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                        expert_map: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the token slots by (compact) expert and pads every expert's run to whole tiles.

    Slot s = t*k + j holds ``topk_ids[t, j]``; its compact expert is ``expert_map[id]`` (the id
    without a map); -1 drops the slot. Runs are in ascending compact expert, slots ascending
    within a run (a stable counting sort), each run padded with the sentinel T*k to a multiple
    of block_m; experts without slots get no run.

    Returns
    -------
    sorted_ids int32 [P], P = round_up(T*k + num_experts*(block_m-1), block_m), sentinel from
    num_padded on; tile_expert int32 [P / block_m], the compact expert of each tile, -1 past
    num_padded / block_m; num_padded int32 [1].
    """
    check_moe_align_args(topk_ids, num_experts, block_m, expert_map)
    dev = topk_ids.device
    T, k = topk_ids.shape
    S = T * k
    P = moe_align_padded_size(S, num_experts, block_m)
    ids = topk_ids.reshape(-1).long()
    compact = expert_map.long()[ids] if expert_map is not None else ids
    slots = torch.arange(S, device=dev)
    keep = compact >= 0
    slots, compact = slots[keep], compact[keep]
    # Stable sort by expert: slots stay ascending within each expert.
    order = torch.sort(compact, stable=True).indices
    slots, compact = slots[order], compact[order]
    counts = torch.bincount(compact, minlength=num_experts)
    runs = (counts + block_m - 1) // block_m * block_m
    run_start = torch.cumsum(runs, 0) - runs
    first_of_expert = torch.cumsum(counts, 0) - counts
    position = run_start[compact] + (torch.arange(compact.numel(), device=dev)
                                     - first_of_expert[compact])
    sorted_ids = torch.full((P,), S, dtype=torch.int32, device=dev)
    sorted_ids[position] = slots.to(torch.int32)
    num_padded = int(runs.sum().item())
    tile_expert = torch.full((P // block_m,), -1, dtype=torch.int32, device=dev)
    tiles = runs // block_m
    tile_expert[: num_padded // block_m] = torch.repeat_interleave(
        torch.arange(num_experts, device=dev), tiles).to(torch.int32)
    return sorted_ids, tile_expert, torch.tensor([num_padded], dtype=torch.int32, device=dev)


# ---------------------------------------------------------------------------------------------
# PreMoe expert GEMM: expert_gemm, moe_forward
# ---------------------------------------------------------------------------------------------

EXPERT_GEMM_ACTIVATIONS = ("none", "silu_mul")


def _check_moe_device(op: str, ref: torch.Tensor, ref_name: str, t, name: str) -> None:
    if isinstance(t, torch.Tensor) and t.device != ref.device:
        _fail(op, f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_moe_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")


def check_expert_gemm_args(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather,
                           activation="none", topk_weights=None) -> dict:
    """The argument checks of ``expert_gemm`` (same order and messages as the C++ ones), values
    of the alignment included (one host sync for device tensors). Returns the sizes: S (slots),
    T, K, N, N_out, E_c, P, tiles, rows (num_padded)."""
    op = "expert_gemm"
    for name, t in (("x", x), ("w", w), ("sorted_ids", sorted_ids), ("tile_expert", tile_expert),
                    ("num_padded", num_padded)):
        _check_moe_tensor(op, name, t)
    for name, t in (("w", w), ("sorted_ids", sorted_ids), ("tile_expert", tile_expert),
                    ("num_padded", num_padded), ("topk_weights", topk_weights)):
        _check_moe_device(op, x, "x", t, name)
    if x.dtype not in _SCORE_DTYPES:
        _fail(op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        _fail(op, f"x must be 2-D ([T, K] with gather, else [T*top_k, K]), got {_shape(x)}")
    if w.dim() != 3:
        _fail(op, f"w must be 3-D [E_c, N, K], got {_shape(w)}")
    if w.dtype != x.dtype:
        _fail(op, f"w must have the dtype of x ({x.dtype}), got {w.dtype}")
    K = x.shape[1]
    E_c, N = w.shape[0], w.shape[1]
    if w.shape[2] != K:
        _fail(op, f"w must have shape [E_c, N, K] with K = x.size(1) = {K}, got {_shape(w)}")
    if E_c < 1:
        _fail(op, f"w must hold at least one expert (E_c >= 1), got {_shape(w)}")
    if top_k < 1:
        _fail(op, f"top_k must be >= 1, got {top_k}")
    if block_m < 1:
        _fail(op, f"block_m must be >= 1, got {block_m}")
    if activation not in EXPERT_GEMM_ACTIVATIONS:
        _fail(op, f"activation must be 'none' or 'silu_mul', got '{activation}'")
    silu_mul = activation == "silu_mul"
    if silu_mul and N % 2:
        _fail(op, f"w must have an even number of rows N (gate rows, then up rows) with "
                  f"activation='silu_mul', got N = {N}")
    if not gather and x.shape[0] % top_k:
        _fail(op, f"x must have T*top_k rows without gather (top_k = {top_k}), got {x.shape[0]}")
    S = x.shape[0] * top_k if gather else x.shape[0]
    T = S // top_k
    if sorted_ids.dtype != torch.int32 or sorted_ids.dim() != 1:
        _fail(op, f"sorted_ids must be a 1-D int32 tensor (moe_align's), got {sorted_ids.dtype} "
                  f"{_shape(sorted_ids)}")
    P = sorted_ids.shape[0]
    if P % block_m:
        _fail(op, f"sorted_ids length must be a multiple of block_m = {block_m}, got {P}")
    tiles = P // block_m
    if tile_expert.dtype != torch.int32 or tuple(tile_expert.shape) != (tiles,):
        _fail(op, f"tile_expert must be a 1-D int32 tensor of P / block_m = {tiles} entries, "
                  f"got {tile_expert.dtype} {_shape(tile_expert)}")
    if num_padded.dtype != torch.int32 or num_padded.numel() != 1:
        _fail(op, f"num_padded must be an int32 tensor of one element, got {num_padded.dtype} "
                  f"{_shape(num_padded)}")
    if topk_weights is not None:
        _check_moe_tensor(op, "topk_weights", topk_weights)
        if topk_weights.dtype not in _SCORE_DTYPES:
            _fail(op, f"topk_weights must be float32, float16 or bfloat16, got "
                      f"{topk_weights.dtype}")
        if tuple(topk_weights.shape) != (T, top_k):
            _fail(op, f"topk_weights must have shape [T, top_k] = [{T}, {top_k}], got "
                      f"{_shape(topk_weights)}")
    rows = int(num_padded.reshape(-1)[0].item())
    if not 0 <= rows <= P:
        _fail(op, f"num_padded must be in [0, P = {P}], got {rows}")
    te = tile_expert.tolist()
    ids = sorted_ids.tolist()
    for t in range(-(-rows // block_m)):
        e = te[t]
        if not -1 <= e < E_c:
            _fail(op, f"tile_expert values must be in [-1, E_c = {E_c}), got {e} at tile {t}")
        if e < 0:
            continue
        for r in range(t * block_m, (t + 1) * block_m):
            if not 0 <= ids[r] <= S:
                _fail(op, f"sorted_ids values must be slot ids in [0, T*top_k = {S}] ({S} = "
                          f"padding), got {ids[r]} at position {r}")
    return dict(S=S, T=T, K=K, N=N, N_out=N // 2 if silu_mul else N, E_c=E_c, P=P, tiles=tiles,
                rows=rows)


def reference_expert_gemm(x: torch.Tensor, w: torch.Tensor, sorted_ids: torch.Tensor,
                          tile_expert: torch.Tensor, num_padded: torch.Tensor, block_m: int,
                          top_k: int, gather: bool, activation: str = "none",
                          topk_weights: Optional[torch.Tensor] = None, *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The grouped expert GEMM over moe_align's tiles, tile by tile, math in ``dtype``.

    Tile i (``i * block_m < num_padded``) with expert ``e = tile_expert[i] >= 0`` lists slots
    ``sorted_ids[i*block_m : (i+1)*block_m]``; entries equal to S = T*top_k are padding. Slot s
    reads input row ``x[s // top_k]`` (gather) or ``x[s]``; 'none': ``y[s] = x_s . w[e]^T``;
    'silu_mul' (w rows: I gate, then I up): ``y[s] = silu(x_s . w[e, :I]^T) * (x_s . w[e, I:]^T)``;
    then ``y[s] *= topk_weights.flatten()[s]`` when given.

    Returns
    -------
    y [T*top_k, N or N/2] in x's dtype; rows of slots no tile lists are 0.
    """
    d = check_expert_gemm_args(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k,
                               gather, activation, topk_weights)
    S, N_out = d["S"], d["N_out"]
    y = torch.zeros(S, N_out, dtype=dtype, device=x.device)
    flat_weights = topk_weights.reshape(-1) if topk_weights is not None else None
    for t in range(-(-d["rows"] // block_m)):
        e = int(tile_expert[t])
        if e < 0:
            continue
        slots = sorted_ids[t * block_m:(t + 1) * block_m].long()
        slots = slots[slots < S]
        if slots.numel() == 0:
            continue
        rows = x[slots // top_k] if gather else x[slots]
        acc = rows.to(dtype) @ w[e].to(dtype).T
        if activation == "silu_mul":
            gate, up = acc.chunk(2, dim=-1)
            acc = torch.nn.functional.silu(gate) * up
        if flat_weights is not None:
            acc = acc * flat_weights[slots].to(dtype)[:, None]
        y[slots] = acc
    return y.to(x.dtype)


def check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map=None) -> dict:
    """The argument checks of ``moe_forward`` (same order and messages as the C++ ones), values
    of topk_ids and expert_map included (one host sync for device tensors). Returns the sizes
    T, H, I, E_c, k, num_experts."""
    op = "moe_forward"
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights)):
        _check_moe_tensor(op, name, t)
    for name, t in (("w13", w13), ("w2", w2), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights), ("expert_map", expert_map)):
        _check_moe_device(op, x, "x", t, name)
    if x.dtype not in _SCORE_DTYPES:
        _fail(op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [T, H], got {_shape(x)}")
    T, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2 or w13.shape[1] < 2:
        _fail(op, f"w13 must have shape [E_c, 2I, H] with H = x.size(1) = {H} and I >= 1 (gate "
                  f"rows, then up rows), got {_shape(w13)}")
    if w13.dtype != x.dtype:
        _fail(op, f"w13 must have the dtype of x ({x.dtype}), got {w13.dtype}")
    E_c, I = w13.shape[0], w13.shape[1] // 2
    if E_c < 1:
        _fail(op, f"w13 must hold at least one expert (E_c >= 1), got {_shape(w13)}")
    if tuple(w2.shape) != (E_c, H, I):
        _fail(op, f"w2 must have shape [E_c, H, I] = [{E_c}, {H}, {I}], got {_shape(w2)}")
    if w2.dtype != x.dtype:
        _fail(op, f"w2 must have the dtype of x ({x.dtype}), got {w2.dtype}")
    if topk_ids.dtype not in _ID_DTYPES:
        _fail(op, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.shape[1] < 1:
        _fail(op, f"topk_ids must have shape [T, k] with T = x.size(0) = {T} and k >= 1, got "
                  f"{_shape(topk_ids)}")
    k = topk_ids.shape[1]
    if topk_weights.dtype not in _SCORE_DTYPES:
        _fail(op, f"topk_weights must be float32, float16 or bfloat16, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        _fail(op, f"topk_weights must have the shape of topk_ids ({_shape(topk_ids)}), got "
                  f"{_shape(topk_weights)}")
    num_experts = E_c
    if expert_map is not None:
        _check_moe_tensor(op, "expert_map", expert_map)
        if expert_map.dtype != torch.int32 or expert_map.dim() != 1 or expert_map.shape[0] < 1:
            _fail(op, f"expert_map must be a non-empty 1-D int32 tensor [num_experts], got "
                      f"{expert_map.dtype} {_shape(expert_map)}")
        num_experts = expert_map.shape[0]
        if T == 0 or H == 0:
            return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)
        bad = ((expert_map < -1) | (expert_map >= E_c)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            _fail(op, f"expert_map values must be in [-1, E_c = {E_c}), got "
                      f"{int(expert_map[i])} at {i}")
    if T == 0 or H == 0:
        return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)
    bad = ((topk_ids < 0) | (topk_ids >= num_experts)).reshape(-1).nonzero()
    if bad.numel():
        s = int(bad[0, 0])
        where = "expert_map's length" if expert_map is not None else "E_c = w13.size(0)"
        _fail(op, f"topk_ids values must be in [0, num_experts = {num_experts}) ({where}), got "
                  f"{int(topk_ids.reshape(-1)[s])} at token {s // k}, column {s % k}")
    return dict(T=T, H=H, I=I, E_c=E_c, k=k, num_experts=num_experts)


def reference_moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          expert_map: Optional[torch.Tensor] = None, *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The routed-expert FFN as a loop over the kept experts, math in ``dtype``.

    Slot (t, j) goes to compact expert ``e = expert_map[topk_ids[t, j]]`` (the id itself without
    a map; -1 drops the slot) and adds ``topk_weights[t, j] * w2[e] . (silu(w13[e, :I] . x_t) *
    (w13[e, I:] . x_t))`` to ``out[t]``.

    Returns
    -------
    out [T, H] in x's dtype.
    """
    check_moe_forward_args(x, w13, w2, topk_ids, topk_weights, expert_map)
    T, H = x.shape
    E_c, I = w13.shape[0], w13.shape[1] // 2
    ids = topk_ids.long()
    compact = expert_map.long()[ids] if expert_map is not None else ids
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    for e in range(E_c):
        tok, col = torch.nonzero(compact == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok].to(dtype)
        gate = xe @ w13[e, :I].to(dtype).T
        up = xe @ w13[e, I:].to(dtype).T
        h = torch.nn.functional.silu(gate) * up
        y = (h @ w2[e].to(dtype).T) * topk_weights[tok, col].to(dtype)[:, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)
