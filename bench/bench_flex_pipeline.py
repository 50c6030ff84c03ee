"""FlexPrefill end to end, stage by stage: estimate, classify, select, attention, total.

The Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128; bf16 on GPU, fp32 on CPU)
at 8k, 32k, 64k and 128k tokens on GPU (4k and 8k on CPU), one sequence. Random q/k/v make every head
flat, so FlexPrefill would keep almost every block; the inputs here are structured instead
(:func:`structured_qkv`): a few "sink" key positions every query attends to (vertical lines) and a
positional term that makes each query attend to its neighbourhood (the slash), with noise on top, so
the selection sees the kind of pattern real prompts have. Each row's note gives the selected-block
ratio and the query-aware head fraction.

Rows per shape (``gamma`` 0.95, ``tau`` 0.1):

* ``estimate`` (``ops.flex_estimate``), ``classify`` (``ops.js_divergence`` + the pooled map
  ``flex_qa_map``), ``select`` (``ops.select_blocks``), ``attention`` (``ops.block_sparse_attention``
  over the selected sets), each timed alone, every one against dense SDPA (kind ``ratio``: different
  work, shows the share of the dense cost);
* ``total``: ``flex_prefill_attention`` against dense causal SDPA (flash backend on GPU) - the
  end-to-end speedup;
* ``selection_share``: estimate + classify + select as a fraction of the total;
* ``attention_throughput``: the block-sparse kernel's TFLOP/s per computed block against dense
  SDPA's TFLOP/s on the causal half (the baseline time is dense SDPA's scaled to the same FLOPs, so
  the speedup column is the throughput ratio);
* ``attention_vs_flex``: the same block sets through FlexAttention with a BlockMask (GPU; skipped on
  CPU with the reason);
* ``total_vs_flash_attn``: only when ``flash_attn`` is importable (optional; nothing depends on it).

Run alone: ``python bench/bench_flex_pipeline.py [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tasksieve  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch

FAMILY = "flex_pipeline"


@dataclass(frozen=True)
class Shape:
    """One prefill attention layer of one sequence, with the FlexPrefill settings."""

    N: int
    H: int = 32
    Hk: int = 8
    D: int = 128
    bs: int = 128
    gamma: float = 0.95
    tau: float = 0.1

    def label(self) -> str:
        return f"H{self.H} Hk{self.Hk} D{self.D} N{self.N} bs{self.bs} g{self.gamma}"


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        # quick keeps the sizes the targets name (64k and 128k) plus 8k; each size recompiles FlexAttention
        sizes = (8192, 65536, 131072) if quick else (8192, 32768, 65536, 131072)
        return [Shape(N=n) for n in sizes]
    return [Shape(N=4096)] if quick else [Shape(N=4096), Shape(N=8192)]


def structured_qkv(s: Shape, dtype, device, seed: int = 0):
    """q [1, N, H, D], k/v [1, N, Hk, D] whose attention has sinks and a local diagonal.

    Keys at 8 random positions and position 0 carry a shared direction every query also carries
    (vertical lines); 16 frequency pairs of cos/sin position features make q_i . k_j grow as
    |i - j| shrinks (the slash); the rest is Gaussian noise (std 1 for k/v, 0.25 for q). Per head the feature weights vary, so
    heads differ."""
    g = torch.Generator().manual_seed(seed)
    N, H, Hk, D = s.N, s.H, s.Hk, s.D
    G = H // Hk
    pos = torch.arange(N, dtype=torch.float32)
    nf = 16
    omega = 2 * math.pi / torch.logspace(math.log10(16), math.log10(1024), nf)
    phase = pos[:, None] * omega[None, :]
    feat = torch.cat([phase.cos(), phase.sin()], dim=-1)  # [N, 32]
    k = torch.randn(1, N, Hk, D, generator=g)
    v = torch.randn(1, N, Hk, D, generator=g)
    q = 0.25 * torch.randn(1, N, H, D, generator=g)
    local = 2.0 + 1.0 * torch.rand(Hk, generator=g)  # per KV head
    sink = 12.0 + 4.0 * torch.rand(Hk, generator=g)
    k[0, :, :, :32] += feat[:, None, :] * local[None, :, None]
    q[0, :, :, :32] += (feat[:, None, :] * local.repeat_interleave(G)[None, :, None])
    sinks = torch.randperm(N, generator=g)[:8]
    sinks = torch.cat([torch.zeros(1, dtype=torch.long), sinks])
    k[0, sinks, :, 32] += sink[None, :]
    q[0, :, :, 32] += sink.repeat_interleave(G)[None, :]
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype),
            v.to(device=device, dtype=dtype))


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import dense_causal_sdpa, kernel_label, make_row
    from tasksieve.methods.flexprefill import _budget_blocks, flex_prefill_attention, flex_qa_map
    from tasksieve.reference import block_sparse_block_mask

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    q, k, v = structured_qkv(s, dtype, dev)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    common = dict(family=FAMILY, dtype=dtype, shape=s.label())
    bs, N = s.bs, s.N
    lo, hi = _budget_blocks(None, None, bs)

    dense, desc = dense_causal_sdpa(ctx, qt, kt, vt)
    desc = "dense " + desc

    t_dense = ctx.time(dense)
    dense_flops = 4.0 * s.H * s.D * N * (N + 1) / 2

    # The stages, run once to get their outputs, then timed alone.
    vertical, slash, estimate = ops.flex_estimate(q, k, bs)

    def classify():
        jsd = ops.js_divergence(estimate, vertical)
        return jsd < s.tau, flex_qa_map(q, k, bs)

    qa, qa_map = classify()

    def select():
        return ops.select_blocks(vertical, slash, qa_map, qa, N, N, bs, s.gamma, lo, hi)

    idx, cnt = select()

    def attention():
        return ops.block_sparse_attention(q, k, v, idx, cnt, bs)

    def total():
        return flex_prefill_attention(q, k, v, gamma=s.gamma, tau=s.tau, block_size=bs)

    nb = -(-N // bs)
    causal_blocks = s.H * nb * (nb + 1) // 2
    visited = int(cnt.sum())
    ratio = visited / causal_blocks
    qa_frac = float(qa.float().mean())
    pattern_note = f"{100 * ratio:.1f}% of causal blocks, {100 * qa_frac:.0f}% heads query-aware"
    flops = 4.0 * s.D * bs * bs * visited

    times = {
        "estimate": ctx.time(lambda: ops.flex_estimate(q, k, bs)),
        "classify": ctx.time(classify),
        "select": ctx.time(select),
        "attention": ctx.time(attention),
    }
    t_total = ctx.time(total)
    rows = []
    kernels = {"estimate": "flex_estimate", "classify": "js_divergence", "select": "select_blocks",
               "attention": "block_sparse_attention"}
    for stage, t in times.items():
        rows.append(make_row(ctx, case=stage, impl=f"stage {stage}", t=t, baseline=desc, t_base=t_dense,
                             kind="ratio", kernel=kernel_label(kernels[stage], dev),
                             flops=flops if stage == "attention" else None,
                             ceiling="matmul" if stage == "attention" else None,
                             note=pattern_note if stage == "attention" else "", **common))
    sel_ms = sum(times[x]["median_ms"] for x in ("estimate", "classify", "select"))
    share = sel_ms / t_total["median_ms"] if t_total["median_ms"] > 0 else float("nan")
    rows.append(make_row(ctx, case="total", impl="flex_prefill_attention", t=t_total, baseline=desc,
                         t_base=t_dense, kernel=kernel_label("block_sparse_attention", dev),
                         note=f"{pattern_note}; selection {100 * share:.1f}% of total", **common))
    sel_t = {"median_ms": sel_ms, "p20_ms": sel_ms, "p80_ms": sel_ms}
    rows.append(make_row(ctx, case="selection_share", impl="estimate + classify + select", t=sel_t,
                         baseline="flex_prefill_attention total", t_base=t_total, kind="ratio",
                         note=f"selection = {100 * share:.2f}% of the total (sum of stage medians)",
                         **common))
    # Throughput per computed block: dense time scaled to the sparse FLOPs is the time dense SDPA
    # would need for the same work at its own TFLOP/s.
    scale = flops / dense_flops
    t_equiv = {key: t_dense[key] * scale for key in ("median_ms", "p20_ms", "p80_ms")}
    dense_tflops = dense_flops / (t_dense["median_ms"] * 1e-3) / 1e12
    rows.append(make_row(ctx, case="attention_throughput", impl="ops.block_sparse_attention",
                         t=times["attention"], baseline="dense SDPA TFLOP/s (causal half), same FLOPs",
                         t_base=t_equiv, kind="ratio", flops=flops, ceiling="matmul",
                         kernel=kernel_label("block_sparse_attention", dev),
                         note=f"speedup column = sparse TFLOP/s / dense {dense_tflops:.3g} TFLOP/s",
                         **common))

    if ctx.cuda:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            bm = block_sparse_block_mask(idx, cnt, N, N, bs, causal=True)
            fa = torch.compile(flex_attention, dynamic=False)

            def flex():
                return fa(qt, kt, vt, block_mask=bm, enable_gqa=True)

            diff = (flex().transpose(1, 2).float() - attention()[0].float()).abs().max().item()
            check = f"max |flex - op| {diff:.1e}" + ("" if diff < 5e-2 else " MISMATCH")
            rows.append(make_row(ctx, case="attention_vs_flex", impl="ops.block_sparse_attention",
                                 t=times["attention"], baseline="FlexAttention BlockMask (same sets)",
                                 t_base=ctx.time(flex), flops=flops, check=check, note=pattern_note,
                                 kernel=kernel_label("block_sparse_attention", dev), **common))
        except Exception as e:  # noqa: BLE001 - report, don't fail the family
            rows.append(make_row(ctx, case="attention_vs_flex", impl="ops.block_sparse_attention",
                                 t=times["attention"], baseline="FlexAttention BlockMask (same sets)",
                                 note=f"FlexAttention failed: {type(e).__name__}: {str(e)[:80]}",
                                 **common))
        try:
            from flash_attn import flash_attn_func  # optional baseline
        except Exception:  # noqa: BLE001 - not installed: no row
            flash_attn_func = None
        if flash_attn_func is not None:
            t_fa = ctx.time(lambda: flash_attn_func(q, k, v, causal=True))
            rows.append(make_row(ctx, case="total_vs_flash_attn", impl="flex_prefill_attention",
                                 t=t_total, baseline="flash_attn_func dense causal", t_base=t_fa,
                                 note=pattern_note, **common))
    else:
        rows.append(make_row(ctx, case="attention_vs_flex", impl="ops.block_sparse_attention",
                             t=times["attention"], baseline="FlexAttention BlockMask (same sets)",
                             note="skipped on CPU: eager FlexAttention is dense-speed there and, in torch "
                                  "2.14, disagrees with the reference for non-adjacent block sets",
                             **common))
    return rows


def run(ctx, shapes=None) -> list[dict]:
    """All pipeline rows for `ctx.device` (default shapes, or `shapes`: `Shape`s or dicts)."""
    from tasksieve.evaluation.bench import run_shapes

    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return run_shapes(ctx, FAMILY, shapes, Shape, run_shape)


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
