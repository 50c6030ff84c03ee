"""PreMoe routing benchmark rows: route_topk, moe_align, tcess_update and router_stats_update vs
the torch glue a user would otherwise write (the same work in plain torch ops, no host sync).

Shapes: T tokens in {16 (decode), 8192 (prefill)} x E experts in {8 (Mixtral, k 2), 64 (OLMoE,
k 8), 128 (Qwen3-MoE, k 8)}. Rows per shape:

1. route_topk    softmax over the kept experts (a quarter pruned by keep_mask) -> top-k ->
                 renormalise, vs ``softmax(z.masked_fill(~keep, -inf)).topk(k)`` + divide.
2. moe_align     block_m 16 (64 on the GPU at T 8192), vs argsort(stable) + bincount + cumsum +
                 scatter + searchsorted for the tile experts, all on the device.
3. tcess_update  k = the shape's k, r = -1 (every selected expert), vs topk + softmax +
                 index_add_ into the fp64 accumulator.
4. router_stats_update  UNCURL's statistics of the route_topk ids (counts, logit sums, fp64
                 Gram matrix z^T z, co-selection S^T S), vs the reference's math without its
                 checks: z.double(), one-hot S by scatter_add_, two fp64 matmuls, four add_.

CPU: fp32 logits. GPU: bf16 logits. The check column compares with tasksieve.reference (ids and
alignment exact, weights / sums within tolerance).

Run alone: ``python bench/bench_moe_route.py [--quick] [--device cpu|cuda]`` (same as
``python -m tasksieve.bench --only moe_route``). The harness calls ``run(ctx, shapes=None)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tasksieve  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch

FAMILY = "moe_route"


@dataclass(frozen=True)
class Shape:
    """One routing problem: T tokens of one MoE layer with E experts, top-k."""

    T: int
    E: int
    k: int

    def label(self) -> str:
        return f"T{self.T} E{self.E} k{self.k}"


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    return [Shape(T, E, k) for T in (16, 8192) for (E, k) in ((8, 2), (64, 8), (128, 8))]


def torch_route(z, k, keep):
    """The usual router glue: masked softmax, top-k, renormalise."""
    p = torch.softmax(z.float().masked_fill(~keep, float("-inf")), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids.to(torch.int32)


def torch_align(ids, E, block_m):
    """moe_align in plain torch ops on the device (no host sync): stable argsort by expert,
    bincount, padded-run cumsum, scatter, searchsorted for the tile experts."""
    flat = ids.flatten().long()
    S = flat.numel()
    dev = flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    runs = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(runs, 0)
    first = torch.cumsum(counts, 0) - counts
    expert = flat[order]
    pos = (ends - runs)[expert] + torch.arange(S, device=dev) - first[expert]
    P = -(-(S + E * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((P,), S, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    num_padded = ends[-1:]
    tile_rows = torch.arange(P // block_m, device=dev) * block_m
    tile_expert = torch.searchsorted(ends, tile_rows, right=True)
    tile_expert = torch.where(tile_rows < num_padded, tile_expert, -1).to(torch.int32)
    return sorted_ids, tile_expert, num_padded.to(torch.int32)


def torch_tcess(z, k, r, acc, count):
    zs, sel = torch.topk(z.float(), k, dim=-1)
    p = torch.softmax(zs, dim=-1)
    acc.index_add_(0, sel.flatten(), torch.where(p >= r, zs, 0.0).double().flatten())
    count += z.shape[0]


def torch_router_stats(z, ids, counts, logit_sum, logit_gram, coselect):
    """reference_router_stats_update's math without its argument checks (whose id range check
    reads the ids on the host)."""
    zd = z.double()
    S = torch.zeros(zd.shape, dtype=torch.float64, device=zd.device)
    S.scatter_add_(1, ids.long(), torch.ones(ids.shape, dtype=torch.float64, device=zd.device))
    counts.add_(S.sum(0))
    logit_sum.add_(zd.sum(0))
    logit_gram.add_(zd.T @ zd)
    coselect.add_(S.T @ S)


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row
    from tasksieve.reference import (reference_moe_align, reference_route_topk,
                                     reference_router_stats_update, reference_tcess_update)

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=dev).manual_seed(1234)
    z = torch.randn(s.T, s.E, device=dev, generator=gen).to(dtype)
    keep = torch.ones(s.E, dtype=torch.bool, device=dev)
    keep[torch.randperm(s.E, device=dev, generator=gen)[: s.E // 4]] = False
    common = dict(family=FAMILY, dtype=dtype, shape=s.label())
    rows = []

    # 1. route_topk ----------------------------------------------------------------------------
    w, ids = ops.route_topk(z, s.k, "softmax", True, keep)
    ew, eids = reference_route_topk(z, s.k, "softmax", True, keep)
    err = (w - ew).abs().max().item()
    ok = torch.equal(ids, eids) and err < 1e-5
    check = f"ids exact, max abs err {err:.1e}" if ok else f"MISMATCH (err {err:.1e})"
    # Timed as a user calls it: with a CUDA keep_mask that includes the one host read of the
    # kept count (the glue has no such check).
    t_op = ctx.time(lambda: ops.route_topk(z, s.k, "softmax", True, keep))
    t_base = ctx.time(lambda: torch_route(z, s.k, keep))
    rows.append(make_row(ctx, case="route_topk", impl="ops.route_topk", t=t_op,
                         baseline="torch softmax+topk+renorm", t_base=t_base,
                         kernel=kernel_label("route_topk", dev),
                         nbytes=s.T * s.E * elt + s.T * s.k * 8, ceiling="copy", check=check,
                         note="softmax over kept experts (E/4 pruned), renormalised", **common))

    # 2. moe_align -----------------------------------------------------------------------------
    bm = 64 if ctx.cuda and s.T >= 4096 else 16
    got = ops.moe_align(ids, s.E, bm)
    want = reference_moe_align(ids, s.E, bm)
    glue = torch_align(ids, s.E, bm)
    same = all(torch.equal(a, b) for a, b in zip(got, want))
    same_glue = all(torch.equal(a, b) for a, b in zip(glue, want))
    P = got[0].numel()
    t_op = ctx.time(lambda: ops.moe_align(ids, s.E, bm))
    t_base = ctx.time(lambda: torch_align(ids, s.E, bm))
    rows.append(make_row(ctx, case="moe_align", impl="ops.moe_align", t=t_op,
                         baseline="torch argsort+bincount+cumsum", t_base=t_base,
                         kernel=kernel_label("moe_align", dev),
                         nbytes=ids.numel() * 4 + (P + P // bm + 1) * 4, ceiling="copy",
                         check=("exact" if same else "MISMATCH")
                         + ("" if same_glue else " (glue differs)"),
                         note=f"block_m {bm}, int32 ids from route_topk",
                         **{**common, "dtype": torch.int32}))

    # 3. tcess_update --------------------------------------------------------------------------
    acc = torch.zeros(s.E, dtype=torch.float64, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    eacc, ecount = acc.clone(), count.clone()
    ops.tcess_update(z, s.k, -1.0, acc, count)
    reference_tcess_update(z, s.k, -1.0, eacc, ecount)
    rel = ((acc - eacc).abs().max() / eacc.abs().max().clamp_min(1e-30)).item()
    ok = rel < 1e-9 and torch.equal(count, ecount)
    t_op = ctx.time(lambda: ops.tcess_update(z, s.k, -1.0, acc, count))
    t_base = ctx.time(lambda: torch_tcess(z, s.k, -1.0, acc, count))
    rows.append(make_row(ctx, case="tcess_update", impl="ops.tcess_update", t=t_op,
                         baseline="torch topk+softmax+index_add_", t_base=t_base,
                         kernel=kernel_label("tcess_update", dev),
                         nbytes=s.T * s.E * elt, ceiling="copy",
                         check=f"max rel err {rel:.1e}" + ("" if ok else " MISMATCH"),
                         note="r = -1 (every selected expert), fp64 accumulator", **common))

    # 4. router_stats_update -------------------------------------------------------------------
    def zeros4():
        return [torch.zeros(*sh, dtype=torch.float64, device=dev)
                for sh in ((s.E,), (s.E,), (s.E, s.E), (s.E, s.E))]

    acc, eacc, gacc = zeros4(), zeros4(), zeros4()
    ops.router_stats_update(z, ids, *acc)
    reference_router_stats_update(z, ids, *eacc)
    torch_router_stats(z, ids, *gacc)
    za = z.double().abs()
    scale = (za.T @ za).clamp_min(1e-300)  # sum of |terms| per Gram element
    rel = max(((acc[1] - eacc[1]).abs() / za.sum(0).clamp_min(1e-300)).max().item(),
              ((acc[2] - eacc[2]).abs() / scale).max().item())
    ok = (rel < 1e-12 and torch.equal(acc[0], eacc[0]) and torch.equal(acc[3], eacc[3])
          and all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(gacc, eacc)))
    t_op = ctx.time(lambda: ops.router_stats_update(z, ids, *acc))
    t_base = ctx.time(lambda: torch_router_stats(z, ids, *gacc))
    rows.append(make_row(ctx, case="router_stats_update", impl="ops.router_stats_update",
                         t=t_op, baseline="torch fp64 z.T@z + one-hot S.T@S", t_base=t_base,
                         kernel=kernel_label("router_stats_update", dev),
                         nbytes=s.T * s.E * elt + s.T * s.k * 4 + 2 * (2 * s.E * s.E + 2 * s.E) * 8,
                         flops=2.0 * s.T * s.E * s.E,
                         check=("counts/coselect exact, sums max err/sum|terms| "
                                f"{rel:.1e}") + ("" if ok else " MISMATCH"),
                         note="ids from route_topk; fp64 sums, deterministic", **common))
    return rows


def run(ctx, shapes=None) -> list[dict]:
    """All moe_route rows for `ctx.device` (default shapes, or `shapes`: a list of `Shape` or of
    dicts of Shape fields)."""
    from tasksieve.evaluation.bench import run_shapes

    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return run_shapes(ctx, FAMILY, shapes, Shape, run_shape)


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
