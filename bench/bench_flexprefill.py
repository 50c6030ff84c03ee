"""FlexPrefill benchmark rows: block-sparse prefill attention vs dense attention.

``block_sparse_attention`` over random causal block sets (every row keeps key-block column 0 and
the diagonal block, plus random causal columns up to the target fraction of its causal blocks)
at 10% and 25% of the causal blocks, against:

1. dense causal SDPA on the same shape (``enable_gqa``; the flash backend on GPU), and
2. FlexAttention (torch.compile'd) with a BlockMask built from the same block sets
   (``reference.block_sparse_block_mask``) on GPU, its output checked against the op. On CPU the
   row is reported as skipped: eager FlexAttention is dense-speed there, and in torch 2.14 its
   eager CPU output disagreed with the reference for non-adjacent block sets.

TFLOP/s counts the work of the computed blocks (4 * D * bs^2 per visited (query block, key
block) pair and head) for the sparse op, and the causal half of the dense work for SDPA.

Run alone: ``python bench/bench_flexprefill.py [--quick] [--device cpu|cuda]`` (same as
``python -m tasksieve.bench --only flexprefill``). The harness calls ``run(ctx, shapes=None)``.
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

FAMILY = "flexprefill"


@dataclass(frozen=True)
class Shape:
    """One prefill attention layer of one sequence."""

    N: int
    H: int = 32
    Hk: int = 8
    D: int = 128
    B: int = 1
    bs: int = 128

    def label(self) -> str:
        return f"B{self.B} H{self.H} Hk{self.Hk} D{self.D} N{self.N} bs{self.bs}"


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        return [Shape(N=8192)] if quick else [Shape(N=8192), Shape(N=32768), Shape(N=32768, bs=64)]
    if quick:
        return [Shape(N=4096, bs=128), Shape(N=8192, bs=128)]
    return [Shape(N=4096, bs=64), Shape(N=4096, bs=128), Shape(N=8192, bs=64),
            Shape(N=8192, bs=128)]


def random_block_sets(B: int, H: int, N: int, bs: int, frac: float, device, seed: int = 0):
    """block_idx [B, H, nb, nb] int32 / block_cnt [B, H, nb]: per row r, column 0, the diagonal
    r and random other causal columns, ~frac of the r + 1 causal blocks in all, ascending."""
    nb = -(-N // bs)
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(nb)
    want = torch.clamp((frac * (r + 1)).round().long(), min=2).minimum(r + 1)  # [nb]
    # random priority per (b, h, r, c); forced columns first; only causal columns count
    pri = torch.rand(B, H, nb, nb, generator=g)
    c = torch.arange(nb)
    pri[..., 0] = 2.0
    pri[..., r, r] = 2.0
    pri = pri.masked_fill(c[None, :] > r[:, None], -1.0)
    order = pri.argsort(dim=-1, descending=True)
    take = c[None, None, None, :] < want[None, None, :, None]
    cols = torch.where(take, order, torch.full_like(order, nb))  # nb sorts last
    cols = cols.sort(dim=-1).values
    cols = torch.where(cols == nb, torch.zeros_like(cols), cols)
    cnt = want.expand(B, H, nb).contiguous()
    return cols.to(torch.int32).to(device), cnt.to(torch.int32).to(device)


def _visited_blocks(block_cnt) -> int:
    return int(block_cnt.sum())


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import dense_causal_sdpa, kernel_label, make_row
    from tasksieve.reference import block_sparse_block_mask

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    gen = torch.Generator(device=dev).manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)

    q = randn(s.B, s.N, s.H, s.D)
    k = randn(s.B, s.N, s.Hk, s.D)
    v = randn(s.B, s.N, s.Hk, s.D)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views
    common = dict(family=FAMILY, dtype=dtype, shape=s.label())
    rows = []

    dense, desc = dense_causal_sdpa(ctx, qt, kt, vt)

    t_dense = ctx.time(dense)
    dense_flops = 4.0 * s.B * s.H * s.D * s.N * (s.N + 1) / 2
    dense_tflops = dense_flops / (t_dense["median_ms"] * 1e-3) / 1e12
    nb = -(-s.N // s.bs)
    causal_blocks = s.B * s.H * nb * (nb + 1) // 2

    for frac in (0.10, 0.25):
        idx, cnt = random_block_sets(s.B, s.H, s.N, s.bs, frac, dev, seed=int(frac * 100))
        visited = _visited_blocks(cnt)
        flops = 4.0 * s.D * s.bs * s.bs * visited

        def sparse():
            return ops.block_sparse_attention(q, k, v, idx, cnt, s.bs)

        sparse()
        t_op = ctx.time(sparse)
        pct = 100.0 * visited / causal_blocks
        rows.append(make_row(ctx, case=f"block_sparse_{int(frac * 100)}pct",
                             impl="ops.block_sparse_attention", t=t_op,
                             baseline=f"dense {desc}", t_base=t_dense, kind="ratio",
                             kernel=kernel_label("block_sparse_attention", dev), flops=flops, ceiling="matmul",
                             note=f"{visited} of {causal_blocks} causal blocks ({pct:.1f}%); "
                                  f"dense at {dense_tflops:.3g} TFLOP/s (causal half)",
                             **common))

        # FlexAttention with the same block sets.
        note = ""
        t_flex = None
        check = ""
        if not ctx.cuda:
            note = ("FlexAttention skipped on CPU: eager mode is dense-speed and, in torch 2.14, "
                    "disagrees with the reference for non-adjacent block sets (the BlockMask "
                    "itself is verified by tests)")
        else:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                bm = block_sparse_block_mask(idx, cnt, s.N, s.N, s.bs, causal=True)
                fa = torch.compile(flex_attention, dynamic=False)

                def flex():
                    return fa(qt, kt, vt, block_mask=bm, enable_gqa=True)

                ref = sparse()[0].float()
                diff = (flex().transpose(1, 2).float() - ref).abs().max().item()
                check = f"max |flex - op| {diff:.1e}" + ("" if diff < 5e-2 else " MISMATCH")
                t_flex = ctx.time(flex)
            except Exception as e:  # noqa: BLE001 - report, don't fail the family
                note = f"FlexAttention skipped: {type(e).__name__}: {str(e)[:80]}"
        if t_flex is not None:
            rows.append(make_row(ctx, case=f"block_sparse_{int(frac * 100)}pct_vs_flex",
                                 impl="ops.block_sparse_attention", t=t_op,
                                 baseline="FlexAttention BlockMask (same sets)", t_base=t_flex,
                                 kernel=kernel_label("block_sparse_attention", dev), flops=flops, check=check,
                                 note=f"{pct:.1f}% blocks",
                                 **common))
        else:
            rows.append(make_row(ctx, case=f"block_sparse_{int(frac * 100)}pct_vs_flex",
                                 impl="ops.block_sparse_attention", t=t_op,
                                 baseline="FlexAttention BlockMask (same sets)",
                                 kernel=kernel_label("block_sparse_attention", dev), flops=flops, note=note, **common))
    return rows


def run_varlen(ctx) -> list[dict]:
    """One row: S prefill sequences of mixed lengths in one packed varlen call (cu_seqlens)
    against one dense-layout call per sequence, same block sets (~25% of the causal blocks)."""
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    if ctx.cuda:
        lens, H, Hk, D, bs = [4096, 1024, 2048, 512], 32, 8, 128, 128
    else:
        lens, H, Hk, D, bs = [1024, 256, 640, 128], 8, 2, 128, 64
    gen = torch.Generator(device=dev).manual_seed(4321)
    total = sum(lens)
    q, k, v = (torch.randn(1, total, h, D, device=dev, generator=gen).to(dtype)
               for h in (H, Hk, Hk))
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32,
                      device=dev)
    nb = [-(-n // bs) for n in lens]
    idx = torch.zeros(len(lens), H, max(nb), max(nb), dtype=torch.int32, device=dev)
    cnt = torch.zeros(len(lens), H, max(nb), dtype=torch.int32, device=dev)
    sets = []
    for s, n in enumerate(lens):
        i_s, c_s = random_block_sets(1, H, n, bs, 0.25, dev, seed=s)
        idx[s, :, :nb[s], :nb[s]] = i_s[0]
        cnt[s, :, :nb[s]] = c_s[0]
        sets.append((i_s, c_s))
    bounds = cu.tolist()

    def packed():
        return ops.block_sparse_attention(q, k, v, idx, cnt, bs, cu_seqlens_q=cu, cu_seqlens_k=cu)

    def separate():
        return [ops.block_sparse_attention(q[:, a:b], k[:, a:b], v[:, a:b], i_s, c_s, bs)
                for (a, b), (i_s, c_s) in zip(zip(bounds, bounds[1:]), sets)]

    got = packed()[0].float()
    want = torch.cat([o for o, _ in separate()], dim=1).float()
    diff = (got - want).abs().max().item()
    t_packed = ctx.time(packed)
    t_sep = ctx.time(separate)
    visited = int(cnt.sum())
    return [make_row(ctx, family=FAMILY, case=f"block_sparse_varlen_{len(lens)}seq",
                     impl="ops.block_sparse_attention (cu_seqlens)", t=t_packed,
                     baseline=f"{len(lens)} separate calls", t_base=t_sep, dtype=dtype,
                     shape=f"S{len(lens)} N{'/'.join(map(str, lens))} H{H} Hk{Hk} D{D} bs{bs}",
                     kernel=kernel_label("block_sparse_attention", dev),
                     flops=4.0 * D * bs * bs * visited, ceiling="matmul",
                     check=f"max |packed - separate| {diff:.1e}"
                           + ("" if diff < 1e-2 else " MISMATCH"),
                     note="~25% of each sequence's causal blocks")]


def run_paged(ctx) -> list[dict]:
    """One row: a prefill chunk whose keys and values live in a paged cache
    (block_sparse_attention_paged through a block table of shuffled pages, vLLM's CPU layout on
    CPU, FlashAttention's on GPU) against the contiguous op on the same K/V, same block sets
    (~25% of the causal blocks). S sequences of Nk keys, the chunk is their last Nq queries."""
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    S, Nk, Nq, H, Hk, D, P, bs = 2, 4096, 1024, 32, 8, 128, 16, 64
    gen = torch.Generator(device=dev).manual_seed(777)
    pages_per_seq = Nk // P
    num_pages = S * pages_per_seq
    layout = "flash_attn" if ctx.cuda else "cpu_attn"
    if layout == "cpu_attn":
        cache = torch.randn(num_pages, Hk, P, 2 * D, device=dev, generator=gen).to(dtype)
    else:
        cache = torch.randn(2, num_pages, P, Hk, D, device=dev, generator=gen).to(dtype)
    kc, vc = ops.paged_kv_views(cache, layout, P, Hk, D)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(7))
    table = perm.view(S, pages_per_seq).to(torch.int32).to(dev)
    lens = torch.full((S,), Nk, dtype=torch.int32, device=dev)
    q = torch.randn(S, Nq, H, D, device=dev, generator=gen).to(dtype)
    k = kc[table.long()].reshape(S, Nk, Hk, D)  # gathered, contiguous
    v = vc[table.long()].reshape(S, Nk, Hk, D)
    full_idx, full_cnt = random_block_sets(S, H, Nk, bs, 0.25, dev, seed=25)
    nbk, nbq = Nk // bs, Nq // bs
    idx = full_idx[:, :, nbk - nbq:].contiguous()
    cnt = full_cnt[:, :, nbk - nbq:].contiguous()

    def paged():
        return ops.block_sparse_attention_paged(q, kc, vc, table, lens, idx, cnt, bs)

    def contiguous():
        return ops.block_sparse_attention(q, k, v, idx, cnt, bs)

    diff = (paged()[0].float() - contiguous()[0].float()).abs().max().item()
    t_paged = ctx.time(paged)
    t_cont = ctx.time(contiguous)
    visited = int(cnt.sum())
    return [make_row(ctx, family=FAMILY, case="block_sparse_paged_25pct",
                     impl="ops.block_sparse_attention_paged", t=t_paged,
                     baseline="ops.block_sparse_attention (contiguous K/V)", t_base=t_cont,
                     dtype=dtype,
                     shape=f"S{S} Nk{Nk} Nq{Nq} H{H} Hk{Hk} D{D} page{P} bs{bs}",
                     kernel=kernel_label("block_sparse_attention_paged", dev),
                     flops=4.0 * D * bs * bs * visited, ceiling="matmul",
                     check=f"max |paged - contiguous| {diff:.1e}"
                           + ("" if diff < 1e-2 else " MISMATCH"),
                     note=f"{layout} cache layout, shuffled pages; ~25% of the causal blocks")]


def run(ctx, shapes=None) -> list[dict]:
    """All FlexPrefill rows for `ctx.device` (default shapes per device and mode, or `shapes`:
    a list of `Shape` or of dicts of Shape fields)."""
    from tasksieve.evaluation.bench import run_shapes

    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return (run_shapes(ctx, FAMILY, shapes, Shape, run_shape) + run_varlen(ctx)
            + run_paged(ctx))


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
