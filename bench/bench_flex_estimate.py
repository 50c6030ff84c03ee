"""FlexPrefill estimation benchmark rows: the fused flex_estimate and js_divergence ops vs their
pure-PyTorch references (the same work in plain torch, materialising the [H, bs, N] scores).

One layer of a Llama-3-8B-like model (H 32, Hk 8, D 128), block 128, prefill of N tokens (the
representative queries are the last 128). Rows:

1. flex_estimate   tasksieve op vs ``reference_flex_estimate`` (fp32 math). TFLOP/s counts the
                   QK^T of the representative queries once (the CUDA kernel computes it twice:
                   two passes, so the [m, N] probabilities never reach memory).
2. js_divergence   op vs ``reference_js_divergence`` on the [B, H, nb] rows flex_estimate makes
                   (estimate vs vertical), and on a larger [4096, 1024] batch of rows.
3. select_blocks   op vs ``reference_select_blocks`` on flex_estimate's vertical/slash lines, a
                   random causal row-softmax block map, every other head query-aware, gamma 0.9.

CPU: fp32, N 4096 / 8192. GPU: bf16, N 8K-128K (the reference is skipped above 32K: it would
materialise several GiB of scores and indices).

Run alone: ``python bench/bench_flex_estimate.py [--quick] [--device cpu|cuda]`` (same as
``python -m tasksieve.bench --only flex_estimate``). The harness calls ``run(ctx, shapes=None)``.
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

FAMILY = "flex_estimate"
REFERENCE_MAX_N_CUDA = 32768


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration (one layer, one sequence batch)."""

    N: int  # prompt length (queries = keys = N)
    H: int = 32
    Hk: int = 8
    D: int = 128
    B: int = 1
    block_size: int = 128

    @property
    def nb(self) -> int:
        return -(-self.N // self.block_size)

    def label(self) -> str:
        return f"B{self.B} H{self.H} Hk{self.Hk} D{self.D} N{self.N} bs{self.block_size}"


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        return ([Shape(N=8192), Shape(N=32768)] if quick
                else [Shape(N=8192), Shape(N=32768), Shape(N=65536), Shape(N=131072)])
    return [Shape(N=4096), Shape(N=8192)]


def _max_err(a, b) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row
    from tasksieve.reference import reference_flex_estimate, reference_js_divergence

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=dev).manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)

    q = randn(s.B, s.N, s.H, s.D)
    k = randn(s.B, s.Hk, s.N, s.D).transpose(1, 2)  # the HF cache layout, viewed [B, N, Hk, D]
    m = min(s.block_size, s.N)
    common = dict(family=FAMILY, dtype=dtype, shape=s.label())
    rows = []

    # 1. flex_estimate -------------------------------------------------------------------------
    out = ops.flex_estimate(q, k, s.block_size)
    with_ref = not ctx.cuda or s.N <= REFERENCE_MAX_N_CUDA
    t_ref, check = None, "reference skipped (memory)"
    if with_ref:
        expect = reference_flex_estimate(q, k, s.block_size)
        err = _max_err(out, expect)
        check = f"max abs err {err:.1e}" + ("" if err < 1e-3 else " MISMATCH")
        del expect
        t_ref = ctx.time(lambda: reference_flex_estimate(q, k, s.block_size))
    t_op = ctx.time(lambda: ops.flex_estimate(q, k, s.block_size))
    nbytes = (s.B * s.N * s.Hk * s.D + s.B * m * s.H * s.D) * elt + 3 * s.B * s.H * s.nb * 4
    flops = 2.0 * s.B * s.H * m * s.N * s.D
    rows.append(make_row(ctx, case="flex_estimate", impl="ops.flex_estimate", t=t_op,
                         baseline="reference_flex_estimate (torch)" if with_ref else "-",
                         t_base=t_ref, kernel=kernel_label("flex_estimate", dev),
                         nbytes=nbytes, flops=flops, ceiling="copy", check=check,
                         note=f"m={m} rep queries; GB/s = K + q_rep read once", **common))

    # 2. js_divergence on the per-head block distributions, and on a larger row batch ---------
    vert, _, est = out
    cases = [("js_divergence_heads", est, vert, f"[{s.B}, {s.H}, {s.nb}] rows")]
    if s.N == default_shapes(dev, ctx.quick)[0].N:
        p = torch.rand(4096, 1024, device=dev, generator=gen)
        qq = torch.rand(4096, 1024, device=dev, generator=gen)
        cases.append(("js_divergence_batch", p, qq, "[4096, 1024] rows"))
    for case, a, b, desc in cases:
        got = ops.js_divergence(a, b)
        err = (got.double() - reference_js_divergence(a, b, compute_dtype=torch.float64)
               .double()).abs().max().item()
        t_op = ctx.time(lambda: ops.js_divergence(a, b))
        t_ref = ctx.time(lambda: reference_js_divergence(a, b))
        rows.append(make_row(ctx, case=case, impl="ops.js_divergence", t=t_op,
                             baseline="reference_js_divergence (torch)", t_base=t_ref,
                             kernel=kernel_label("js_divergence", dev),
                             nbytes=2.0 * a.numel() * a.element_size() + got.numel() * 4,
                             ceiling="copy",
                             check=f"max abs err {err:.1e}" + ("" if err < 1e-3 else " MISMATCH"),
                             note=desc, **{**common, "dtype": a.dtype}))

    # 3. select_blocks on the estimate's lines; every other head query-aware (both paths) ------
    from tasksieve.reference import reference_select_blocks, select_diag_blocks

    _, slash, _ = out
    nbq = s.nb
    causal = (torch.arange(s.nb, device=dev)[None, :]
              <= select_diag_blocks(s.N, s.N, s.block_size, dev)[:, None])
    qa_map = torch.softmax(torch.rand(s.B, s.H, nbq, s.nb, device=dev, generator=gen)
                           .masked_fill(~causal, float("-inf")), dim=-1)
    qa = (torch.arange(s.H, device=dev) % 2 == 0).expand(s.B, s.H).contiguous()
    sel_args = (vert, slash, qa_map, qa, s.N, s.N, s.block_size, 0.9, 1, s.nb)
    got = ops.select_blocks(*sel_args)
    want = reference_select_blocks(*sel_args)
    same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    density = got[1].double().sum().item() / (s.B * s.H * nbq * (nbq + 1) / 2)
    t_op = ctx.time(lambda: ops.select_blocks(*sel_args))
    t_ref = ctx.time(lambda: reference_select_blocks(*sel_args))
    rows.append(make_row(ctx, case="select_blocks", impl="ops.select_blocks", t=t_op,
                         baseline="reference_select_blocks (torch)", t_base=t_ref,
                         kernel=kernel_label("select_blocks", dev),
                         nbytes=(2 * s.nb + nbq * s.nb) * s.B * s.H * 4
                         + (nbq * s.nb + nbq) * s.B * s.H * 4,
                         ceiling="copy", check="exact" if same else "MISMATCH",
                         note=f"gamma 0.9, half the heads query-aware; "
                              f"{density:.0%} of causal blocks kept",
                         **{**common, "dtype": torch.float32}))
    del q, k, out
    return rows


def run_paged(ctx, small: bool = False) -> list[dict]:
    """One row: flex_estimate_paged on a prefill chunk whose keys live in a paged cache (shuffled
    16-token pages; vLLM's CPU layout on CPU, FlashAttention's on GPU) against flex_estimate on the
    same keys gathered contiguous. S sequences of Nk keys, the chunk is their last Nq queries."""
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    S, Nk, Nq, H, Hk, D, P, bs = (2, 201, 37, 4, 2, 16, 3, 16) if small else (2, 4096, 1024, 32, 8, 128, 16, 128)
    gen = torch.Generator(device=dev).manual_seed(4321)
    num_pages = S * (Nk // P)  # Nk is a multiple of P
    layout = "flash_attn" if ctx.cuda else "cpu_attn"
    if layout == "cpu_attn":
        cache = torch.randn(num_pages, Hk, P, 2 * D, device=dev, generator=gen).to(dtype)
    else:
        cache = torch.randn(2, num_pages, P, Hk, D, device=dev, generator=gen).to(dtype)
    kc, _ = ops.paged_kv_views(cache, layout, P, Hk, D)
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(9))
    table = perm.view(S, Nk // P).to(torch.int32).to(dev)
    lens = torch.full((S,), Nk, dtype=torch.int32, device=dev)
    q = torch.randn(S, Nq, H, D, device=dev, generator=gen).to(dtype)
    k = kc[table.long()].reshape(S, Nk, Hk, D)

    def paged():
        return ops.flex_estimate_paged(q, kc, table, lens, bs)

    def contiguous():
        return ops.flex_estimate(q, k, bs)

    err = _max_err(paged(), contiguous())
    t_paged = ctx.time(paged)
    t_cont = ctx.time(contiguous)
    return [make_row(ctx, family=FAMILY, case="flex_estimate_paged", impl="ops.flex_estimate_paged", t=t_paged,
                     baseline="ops.flex_estimate (contiguous K)", t_base=t_cont, dtype=dtype,
                     shape=f"S{S} Nk{Nk} Nq{Nq} H{H} Hk{Hk} D{D} page{P} bs{bs}",
                     kernel=kernel_label("flex_estimate_paged", dev),
                     flops=2.0 * S * H * min(bs, Nq) * Nk * D, ceiling="matmul",
                     check=f"max |paged - contiguous| {err:.1e}" + ("" if err < 1e-3 else " MISMATCH"),
                     note=f"{layout} cache layout, shuffled pages")]


def run(ctx, shapes=None) -> list[dict]:
    """All flex_estimate rows for `ctx.device` (default shapes per device and mode, or `shapes`:
    a list of `Shape` or of dicts of Shape fields), plus the paged-cache row (a tiny one with `shapes`)."""
    from tasksieve.evaluation.bench import run_shapes

    small = shapes is not None
    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return run_shapes(ctx, FAMILY, shapes, Shape, run_shape) + run_paged(ctx, small)


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
