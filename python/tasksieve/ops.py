"""Typed wrappers over ``torch.ops.tasksieve.*`` and the fake (meta) implementations.

Each wrapper calls the compiled op (``torch.ops.tasksieve.<op>.default``) when the extension has
a kernel for the input's device, and otherwise the pure-PyTorch reference from
``tasksieve.reference``, which checks its arguments exactly like the kernels do. The fakes make
every op traceable by ``torch.compile`` / ``torch.export``: output shapes come from input sizes
only, so they work with symbolic shapes.

WindowKV
--------
window_scores(q_obs, k, window, reduce="max", scale=None, kv_start=None)
    -> float32 [B, Hk, nw]
select_windows(scores, keep, share=False)  -> int32 [B, Hk, min(keep, nw)]
gather_windows(kv, idx, window, tail)      -> list of [B, Hk, keep*window + tail, D_i]
gather_windows_(kv, idx, window, tail)     in place, -> None
window_count(n, obs, window)               nw = (n - obs) // window

FlexPrefill
-----------
block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale=None, causal=True,
                       cu_seqlens_q=None, cu_seqlens_k=None)
    -> out [B, Nq, H, D], lse float32 [B, H, Nq]
js_divergence(p, q, eps=1e-12)             -> float32 [...]: sqrt(JSD) per row of [..., n]
flex_estimate(q, k, block_size, scale=None)
    -> (vertical, slash, estimate) float32 [B, H, ceil(Nk / block_size)] each
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ext
from . import reference as _ref
from .reference import window_count

__all__ = [
    "window_scores",
    "select_windows",
    "gather_windows",
    "gather_windows_",
    "window_count",
    "block_sparse_attention",
]

# Which (op, dispatch key) pairs have a compiled kernel, looked up once for every registered op:
# a plain dict lookup is free at run time and torch.compile traces it as a constant (a
# dispatcher query would break the graph). Meta tensors go to the registered fakes.
_KERNELS = {
    (op, key): _ext.has_kernel(op, key) if key != "Meta" else True
    for op in _ext.op_names()
    for key in ("CPU", "CUDA", "Meta")
}
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _use_kernel(op: str, t) -> bool:
    if not isinstance(t, torch.Tensor):
        return False  # let the reference name the bad argument
    return _KERNELS.get((op, _DEVICE_KEYS.get(t.device.type)), False)


def _as_list(op: str, kv) -> list:
    # A lone tensor would iterate into its sub-tensors: refuse it with the reference's message.
    if isinstance(kv, torch.Tensor) or not isinstance(kv, (list, tuple)):
        raise RuntimeError(f"tasksieve.{op}: kv must be a list of tensors, got {type(kv).__name__}")
    return list(kv)


def window_scores(
    q_obs: torch.Tensor,
    k: torch.Tensor,
    window: int,
    reduce: str = "max",
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Window scores of the review region from the observation-window attention.

    Parameters
    ----------
    q_obs : Tensor [B, A, H, D]
        The last A queries (RoPE applied); float32, float16 or bfloat16; last dim contiguous.
    k : Tensor [B, N, Hk, D]
        Keys of the same dtype and device, H % Hk == 0, 1 <= A <= N, D <= 256; last dim
        contiguous, other strides free (pass an HF cache ``[B, Hk, N, D]`` as
        ``k.transpose(1, 2)``).
    window : int
        Window length in tokens, >= 1.
    reduce : {"max", "mean"}
        "max": mean of the top ``max(1, window // 2)`` token scores of a window; "mean": mean.
    scale : float, optional
        Softmax scale; default ``1 / sqrt(D)``.
    kv_start : Tensor [B] int32, optional
        Left padding: keys ``j < kv_start[b]`` get no attention; values in ``[0, N - A]``.

    Returns
    -------
    Tensor [B, Hk, nw] float32, ``nw = (N - A) // window`` (may be 0): the causal softmax mass of
    the A queries per token, pooled per window and averaged over the G query heads of each KV
    head.
    """
    if _use_kernel("window_scores", q_obs):
        return torch.ops.tasksieve.window_scores.default(q_obs, k, window, reduce, scale, kv_start)
    return _ref.reference_window_scores(q_obs, k, window, reduce, scale, kv_start)


def select_windows(scores: torch.Tensor, keep: int, share: bool = False) -> torch.Tensor:
    """The ``min(keep, nw)`` highest-scoring windows of every row, in position order.

    Parameters
    ----------
    scores : Tensor [B, Hk, nw] float32
        Window scores, e.g. from ``window_scores``.
    keep : int
        Windows to keep, >= 0 (clamped to nw).
    share : bool
        False: one selection per KV head. True: rank by the mean over heads; every head of a
        sequence gets the same row.

    Returns
    -------
    Tensor [B, Hk, min(keep, nw)] int32, ascending per row. Ties go to the lower window index;
    NaN scores rank as -inf.
    """
    if _use_kernel("select_windows", scores):
        return torch.ops.tasksieve.select_windows.default(scores, keep, share)
    return _ref.reference_select_windows(scores, keep, share)


def gather_windows(
    kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int
) -> list[torch.Tensor]:
    """Compact K/V tensors (e.g. of every layer of a group) to the selected windows + a tail.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Same B, Hk, N, dtype and device; D_i may differ; last dim contiguous.
    idx : Tensor [B, Hk, keep] int32
        Window indices (from ``select_windows``); ``0 <= v`` and ``v*window + window <= N - tail``.
        The CPU kernel raises on invalid values; the CUDA kernel writes zeros for them.
    window : int
        Window length, >= 1.
    tail : int
        Number of last tokens always kept, in ``[0, N]``.

    Returns
    -------
    list of Tensor [B, Hk, keep*window + tail, D_i], contiguous: window p of row (b, h) is
    window ``idx[b, h, p]`` of the input, followed by the last ``tail`` tokens.
    """
    kv = _as_list("gather_windows", kv)
    if _use_kernel("gather_windows", kv[0] if kv else idx):
        return torch.ops.tasksieve.gather_windows.default(kv, idx, window, tail)
    return _ref.reference_gather_windows(kv, idx, window, tail)


def gather_windows_(kv: Sequence[torch.Tensor], idx: torch.Tensor, window: int, tail: int) -> None:
    """In-place ``gather_windows``: compacts into the first ``keep*window + tail`` positions of
    every tensor of ``kv`` (narrow them afterwards). ``idx`` must be strictly ascending per row.

    Parameters
    ----------
    kv : list of Tensor [B, Hk, N, D_i]
        Modified in place; positions from ``keep*window + tail`` on are left unspecified.
    idx : Tensor [B, Hk, keep] int32
        Strictly ascending window indices per row.
    window, tail : int
        As for ``gather_windows``.
    """
    kv = _as_list("gather_windows_", kv)
    if _use_kernel("gather_windows_", kv[0] if kv else idx):
        torch.ops.tasksieve.gather_windows_.default(kv, idx, window, tail)
        return None
    _ref.reference_gather_windows_(kv, idx, window, tail)
    return None


# ---------------------------------------------------------------------------------------------
# Fakes: shapes from sizes only (SymInt-friendly); the real kernels do the checking.
# ---------------------------------------------------------------------------------------------
if _ext.LOADED:

    @torch.library.register_fake("tasksieve::window_scores")
    def _window_scores_fake(q_obs, k, window, reduce, scale=None, kv_start=None):
        B, A = q_obs.shape[0], q_obs.shape[1]
        N, Hk = k.shape[1], k.shape[2]
        nw = (N - A) // window
        return q_obs.new_empty((B, Hk, nw), dtype=torch.float32)

    @torch.library.register_fake("tasksieve::select_windows")
    def _select_windows_fake(scores, keep, share):
        B, Hk, nw = scores.shape
        return scores.new_empty((B, Hk, torch.sym_min(keep, nw)), dtype=torch.int32)

    @torch.library.register_fake("tasksieve::gather_windows")
    def _gather_windows_fake(kv, idx, window, tail):
        L = idx.shape[2] * window + tail
        return [t.new_empty((t.shape[0], t.shape[1], L, t.shape[3])) for t in kv]

    @torch.library.register_fake("tasksieve::gather_windows_")
    def _gather_windows__fake(kv, idx, window, tail):
        return None


# ---------------------------------------------------------------------------------------------
# FlexPrefill: block_sparse_attention
# ---------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    causal: bool = True,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-style attention over the listed key blocks of every query block.

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries, the LAST Nq of Nk positions (query i sits at position ``Nk - Nq + i``);
        float32 (CPU), float16 or bfloat16; last dim contiguous.
    k, v : Tensor [B, Nk, Hk, D]
        Same dtype and device, H % Hk == 0 (query head h reads KV head ``h // (H // Hk)``),
        Nq <= Nk; last dim contiguous, other strides free.
    block_idx : Tensor [B, H, nbq, max_k] int32
        Key-block columns (ascending) of query block r in the first ``block_cnt[b, h, r]``
        entries; ``nbq = ceil(Nq / block_size)``, columns in ``[0, ceil(Nk / block_size))``. The
        CPU kernel raises on out-of-range columns; the CUDA kernel skips them.
    block_cnt : Tensor [B, H, nbq] int32, values in [0, max_k]
    block_size : int
        16, 32, 64 or 128.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    causal : bool
        Mask keys past each query's position (only blocks straddling the diagonal need it).
    cu_seqlens_q, cu_seqlens_k : Tensor [S + 1] int32, optional
        Packed varlen (flash-attn convention), both or neither: offsets ``0 = c[0] <= ... <=
        c[S]`` of S sequences packed along dim 1, with q [1, total_q, H, D], k/v
        [1, total_k, Hk, D]. Sequence s is the problem above on q rows ``cu_seqlens_q[s]`` ..
        ``cu_seqlens_q[s + 1]`` and k/v rows ``cu_seqlens_k[s]`` .. ``cu_seqlens_k[s + 1]``
        (nq_s <= nk_s, queries the last nq_s positions); then block_idx is
        [S, H, nbq_max, max_k] and block_cnt [S, H, nbq_max] with nbq_max >=
        ceil(max nq_s / block_size) (rows past a sequence's query blocks are ignored) and
        columns relative to the sequence's own keys. The CPU kernel validates the offsets and
        raises; the CUDA kernel cannot without a host sync and clamps them (no out-of-bounds
        access; rows malformed offsets leave uncovered come out 0 with lse -inf).

    Returns
    -------
    out : Tensor [B, Nq, H, D] in q's dtype ([1, total_q, H, D] packed)
    lse : Tensor [B, H, Nq] float32, natural-log log-sum-exp of the visited logits (for merging
        chunks); a row with no visible key has out 0 and lse -inf ([1, H, total_q] packed).
    """
    if _use_kernel("block_sparse_attention", q):
        return torch.ops.tasksieve.block_sparse_attention.default(
            q, k, v, block_idx, block_cnt, block_size, scale, causal, cu_seqlens_q, cu_seqlens_k)
    return _ref.reference_block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, scale,
                                                 causal, cu_seqlens_q, cu_seqlens_k)


if _ext.LOADED and "block_sparse_attention" in _ext.op_names():

    @torch.library.register_fake("tasksieve::block_sparse_attention")
    def _block_sparse_attention_fake(q, k, v, block_idx, block_cnt, block_size, scale=None,
                                     causal=True, cu_seqlens_q=None, cu_seqlens_k=None):
        # Packed varlen keeps q's layout ([1, total_q, H, D]), so the shapes are the same.
        B, Nq, H, D = q.shape
        out = q.new_empty((B, Nq, H, D))
        lse = q.new_empty((B, H, Nq), dtype=torch.float32)
        return out, lse


# ---------------------------------------------------------------------------------------------
# FlexPrefill estimation: js_divergence, flex_estimate
# ---------------------------------------------------------------------------------------------

__all__ += ["js_divergence", "flex_estimate"]


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon distance per row: ``sqrt(JSD(p, q))``, natural log, in ``[0, sqrt(ln 2)]``.

    Parameters
    ----------
    p, q : Tensor [..., n]
        Same shape, dtype (float32, float64, float16 or bfloat16) and device; n >= 1. Rows need
        not be normalised: each is divided by its sum (a row summing to 0 is uniform).
    eps : float
        Entries are clamped to ``>= eps`` after normalising (then renormalised), so exact zeros
        never give NaN. Finite, > 0.

    Returns
    -------
    Tensor [...] float32.
    """
    if _use_kernel("js_divergence", p):
        return torch.ops.tasksieve.js_divergence.default(p, q, eps)
    return _ref.reference_js_divergence(p, q, eps)


def flex_estimate(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexPrefill pattern estimation in one fused pass.

    Parameters
    ----------
    q : Tensor [B, Nq, H, D]
        Queries (RoPE applied), the last Nq of the Nk positions; float32, float16 or bfloat16;
        last dim contiguous, other strides free.
    k : Tensor [B, Nk, Hk, D]
        Keys, same dtype and device, H % Hk == 0 (never repeated), Nq <= Nk, D <= 256.
    block_size : int
        Block size bs >= 1 (CUDA: 16, 32, 64 or 128).
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.

    Returns
    -------
    (vertical, slash, estimate), each float32 [B, H, nb], nb = ceil(Nk / bs). With the last
    m = min(bs, Nq) queries as representatives (rep query r at position p_r = Nk - m + r) and
    A their causal fp32 softmax: ``vertical[c]`` = mean over r of the mass on key block c;
    ``slash[t]`` = mean over r of the mass on keys j with ``(p_r - j) // bs == t`` (t = 0: main
    block diagonal); ``estimate`` = softmax over blocks of ``scale * mean(q_rep) . mean(k_c)``
    (no causal mask). vertical and slash rows sum to 1 (zeros when Nq = 0).
    """
    if _use_kernel("flex_estimate", q):
        return tuple(torch.ops.tasksieve.flex_estimate.default(q, k, block_size, scale))
    return _ref.reference_flex_estimate(q, k, block_size, scale)


if _ext.LOADED and "js_divergence" in _ext.op_names():

    @torch.library.register_fake("tasksieve::js_divergence")
    def _js_divergence_fake(p, q, eps=1e-12):
        return p.new_empty(p.shape[:-1], dtype=torch.float32)


if _ext.LOADED and "flex_estimate" in _ext.op_names():

    @torch.library.register_fake("tasksieve::flex_estimate")
    def _flex_estimate_fake(q, k, block_size, scale=None):
        B, H = q.shape[0], q.shape[2]
        nb = (k.shape[1] + block_size - 1) // block_size
        return tuple(q.new_empty((B, H, nb), dtype=torch.float32) for _ in range(3))


__all__ += ["select_blocks"]


def select_blocks(
    vertical: torch.Tensor, slash: torch.Tensor, qa_map: torch.Tensor,
    is_query_aware: torch.Tensor, q_len: int, kv_len: int, block_size: int, gamma: float,
    min_blocks: int = 1, max_blocks: int = 2**31 - 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill block selection, on the device (no host sync, no per-head loop).

    Parameters
    ----------
    vertical, slash : Tensor [B, H, nb] float32
        Block-pooled vertical and slash masses from ``flex_estimate`` (``slash[t]``: diagonal
        offset block t, 0 = main diagonal); nb = ceil(kv_len / block_size).
    qa_map : Tensor [B, H, nbq, nb] float32
        Pooled block attention map of the query-aware heads (rows: query blocks, nbq =
        ceil(q_len / block_size)); entries above the causal diagonal are ignored. Only read for
        heads with ``is_query_aware``.
    is_query_aware : Tensor [B, H] bool
        ``D_JS < tau`` per head (from ``js_divergence``).
    q_len, kv_len, block_size : int
        The queries are the last q_len of kv_len positions; query block r's diagonal block is
        ``d(r) = (kv_len - q_len + min((r+1)*bs, q_len) - 1) // bs``.
    gamma : float
        Cumulative-mass target in (0, 1].
    min_blocks, max_blocks : int
        Per-head budget clamp of the vertical and slash line counts, in blocks
        (0 <= min_blocks <= max_blocks); query-aware heads get a min_blocks skeleton.

    Returns
    -------
    (block_idx int32 [B, H, nbq, nb], block_cnt int32 [B, H, nbq]) in the
    ``block_sparse_attention`` format. See ``select_blocks`` in ``csrc/ops.cpp`` for the rule.
    """
    if _use_kernel("select_blocks", vertical):
        return tuple(torch.ops.tasksieve.select_blocks.default(
            vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size, gamma,
            min_blocks, max_blocks))
    return _ref.reference_select_blocks(vertical, slash, qa_map, is_query_aware, q_len, kv_len,
                                        block_size, gamma, min_blocks, max_blocks)


if _ext.LOADED and "select_blocks" in _ext.op_names():

    @torch.library.register_fake("tasksieve::select_blocks")
    def _select_blocks_fake(vertical, slash, qa_map, is_query_aware, q_len, kv_len, block_size,
                            gamma, min_blocks, max_blocks):
        B, H, nb = vertical.shape
        nbq = qa_map.shape[2]
        return (vertical.new_empty((B, H, nbq, nb), dtype=torch.int32),
                vertical.new_empty((B, H, nbq), dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# PreMoe routing: tcess_update, route_topk, moe_align
# ---------------------------------------------------------------------------------------------

__all__ += ["tcess_update", "route_topk", "moe_align"]


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
        Running sums, mutated; same device. On CUDA the sums use float64 atomics, so the last
        bits may differ from run to run.
    count : Tensor [1] int64
        Running token count, mutated; same device.
    """
    if _use_kernel("tcess_update", router_logits):
        torch.ops.tasksieve.tcess_update.default(router_logits, top_k, r, acc, count)
        return None
    return _ref.reference_tcess_update(router_logits, top_k, r, acc, count)


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
        softmax over the k selected logits. See ``tasksieve.moe_conventions`` for the HF
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
    if _use_kernel("route_topk", router_logits):
        return tuple(torch.ops.tasksieve.route_topk.default(
            router_logits, top_k, scoring, renormalize, keep_mask, bias, scaling, mask_full))
    return _ref.reference_route_topk(router_logits, top_k, scoring, renormalize, keep_mask, bias,
                                     scaling, mask_full)


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
    if _use_kernel("moe_align", topk_ids):
        return tuple(torch.ops.tasksieve.moe_align.default(topk_ids, num_experts, block_m,
                                                           expert_map))
    return _ref.reference_moe_align(topk_ids, num_experts, block_m, expert_map)


if _ext.LOADED and "tcess_update" in _ext.op_names():

    @torch.library.register_fake("tasksieve::tcess_update")
    def _tcess_update_fake(router_logits, top_k, r, acc, count):
        return None


if _ext.LOADED and "route_topk" in _ext.op_names():

    @torch.library.register_fake("tasksieve::route_topk")
    def _route_topk_fake(router_logits, top_k, scoring="softmax", renormalize=False,
                         keep_mask=None, bias=None, scaling=1.0, mask_full=False):
        T = router_logits.shape[0]
        return (router_logits.new_empty((T, top_k), dtype=torch.float32),
                router_logits.new_empty((T, top_k), dtype=torch.int32))


if _ext.LOADED and "moe_align" in _ext.op_names():

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

__all__ += ["expert_gemm", "moe_forward"]


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
    if _use_kernel("expert_gemm", x):
        return torch.ops.tasksieve.expert_gemm.default(x, w, sorted_ids, tile_expert, num_padded,
                                                       block_m, top_k, gather, activation,
                                                       topk_weights)
    return _ref.reference_expert_gemm(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k,
                                      gather, activation, topk_weights)


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
    if _use_kernel("moe_forward", x):
        return torch.ops.tasksieve.moe_forward.default(x, w13, w2, topk_ids, topk_weights,
                                                       expert_map)
    return _ref.reference_moe_forward(x, w13, w2, topk_ids, topk_weights, expert_map)


if _ext.LOADED and "expert_gemm" in _ext.op_names():

    @torch.library.register_fake("tasksieve::expert_gemm")
    def _expert_gemm_fake(x, w, sorted_ids, tile_expert, num_padded, block_m, top_k, gather,
                          activation="none", topk_weights=None):
        slots = x.shape[0] * top_k if gather else x.shape[0]
        n_out = w.shape[1] // 2 if activation == "silu_mul" else w.shape[1]
        return x.new_empty((slots, n_out))


if _ext.LOADED and "moe_forward" in _ext.op_names():

    @torch.library.register_fake("tasksieve::moe_forward")
    def _moe_forward_fake(x, w13, w2, topk_ids, topk_weights, expert_map=None):
        return x.new_empty(x.shape)
