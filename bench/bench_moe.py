"""PreMoe benchmark rows: the pruned-expert FFN (``moe_forward``) vs torch baselines.

Two layer shapes, bf16: OLMoE-like (E 64, top-8, H 2048, I 1024) and Mixtral-like (E 8, top-2,
H 4096, I 14336), at T tokens in {1, 16, 128, 8192} (CPU: {1, 16, 128}; 8192 tokens is minutes
of CPU time per call and is reported as skipped), keeping 100%, 50% and 25% of the experts. A
pruned layer holds only the kept experts' weights (compacted, ``expert_map`` original ->
compact) and its router masks the pruned experts before top-k, so every token still gets k
experts. Routing: random router logits with a fixed seed, softmax over the kept experts, top-k,
renormalised.

Per (layer, T, keep), ``ops.moe_forward`` against, on the same routing:

1. ``torch._grouped_mm`` with the usual routing glue (argsort of the flat expert ids, counts,
   gather, grouped_mm on ``w13.transpose(-2, -1)``, SiLU * up, grouped_mm on w2, router weight,
   ``index_add_``); skipped with the reason when ``torch._grouped_mm`` is missing or fails on
   the device/dtype;
2. a per-expert loop (HF eager style: the experts that got tokens, one linear each).

TFLOP/s counts the useful work 2 * T * k * 3 * H * I; GB/s counts the kept expert weights the
routing actually touches (experts with at least one token) plus x and out, the traffic that
bounds decode. The target row: Mixtral-like, 16 tokens, time with 100% of the experts / time
with 50% (target >= 1.7x on CPU).

Run alone: ``python bench/bench_moe.py [--quick] [--device cpu|cuda]`` (same as
``python -m tasksieve.bench --only moe``). The harness calls ``run(ctx, shapes=None)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tasksieve  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch
import torch.nn.functional as F

FAMILY = "moe"
KEEPS = (1.0, 0.5, 0.25)
TARGET_RATIO = 1.7


@dataclass(frozen=True)
class Shape:
    """One MoE layer, timed at several token counts."""

    name: str
    E: int
    k: int
    H: int
    I: int
    tokens: tuple = (1, 16, 128, 8192)
    keeps: tuple = field(default=KEEPS)

    def label(self) -> str:
        return f"{self.name} E{self.E} top{self.k} H{self.H} I{self.I}"


OLMOE = dict(name="olmoe-like", E=64, k=8, H=2048, I=1024)
MIXTRAL = dict(name="mixtral-like", E=8, k=2, H=4096, I=14336)


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    tokens = (1, 16, 128, 8192)
    return [Shape(**OLMOE, tokens=tokens), Shape(**MIXTRAL, tokens=tokens)]


def random_weights(E, H, I, dtype, device, seed):
    """w13 [E, 2I, H], w2 [E, H, I], built one expert at a time (no fp32 copy of the layer)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w2 = torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):
        w13[e] = (torch.randn(2 * I, H, device=device, generator=g) / H ** 0.5).to(dtype)
        w2[e] = (torch.randn(H, I, device=device, generator=g) / I ** 0.5).to(dtype)
    return w13, w2


def pruned_routing(T, E, k, kept, device, seed):
    """Router with the pruned experts masked before top-k: (weights fp32 [T, k], original ids
    int32 [T, k], expert_map int32 [E] original -> compact or -1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(T, E, device=device, generator=g)
    keep = torch.zeros(E, dtype=torch.bool, device=device)
    keep[kept] = True
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    wts, ids = torch.topk(probs, k, dim=-1)
    wts = wts / wts.sum(-1, keepdim=True)
    emap = torch.full((E,), -1, dtype=torch.int32, device=device)
    emap[kept] = torch.arange(len(kept), dtype=torch.int32, device=device)
    return wts, ids.to(torch.int32), emap


def grouped_mm_moe(x, w13, w2, cids, wts):
    """The routed FFN with torch._grouped_mm and torch routing glue (compact ids [T, k])."""
    T, k = cids.shape
    E_c = w13.shape[0]
    flat = cids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.float(), bins=E_c, min=0, max=E_c - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // k
    gu = torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    y = y * wts.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def loop_moe(x, w13, w2, cids, wts):
    """The routed FFN as HF's eager experts loop: one linear per expert that got tokens."""
    out = torch.zeros_like(x)
    for e in torch.unique(cids).tolist():
        tok, col = torch.where(cids == e)
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e]) * wts[tok, col, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _nan_time() -> dict:
    nan = float("nan")
    return {"median_ms": nan, "p20_ms": nan, "p80_ms": nan, "reps": 0}


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row

    dev = ctx.device
    dtype = torch.bfloat16
    kernel = kernel_label("moe_forward", dev)
    w13_full, w2_full = random_weights(s.E, s.H, s.I, dtype, dev, seed=0)
    has_gmm = hasattr(torch, "_grouped_mm")
    rows = []
    t_by_keep = {}
    elt = torch.finfo(dtype).bits // 8
    expert_bytes = 3 * s.H * s.I * elt
    tokens = [T for T in s.tokens if ctx.cuda or T <= 128]
    for T in s.tokens:
        if T not in tokens:
            rows.append(make_row(ctx, family=FAMILY, case=f"{s.name} T{T}",
                                 impl="ops.moe_forward", t=_nan_time(), dtype=dtype,
                                 shape=f"{s.label()} T{T}", kernel=kernel,
                                 note="skipped on CPU: minutes per call at this token count"))
    for keep in s.keeps:
        n_keep = max(s.k, round(keep * s.E))
        kept = torch.randperm(s.E, generator=torch.Generator().manual_seed(n_keep))[:n_keep]
        kept = kept.sort().values.to(dev)
        if n_keep == s.E:
            w13, w2 = w13_full, w2_full
        else:  # the pruned checkpoint: only the kept experts' weights, compacted
            w13, w2 = w13_full[kept].contiguous(), w2_full[kept].contiguous()
        for T in tokens:
            x = (torch.randn(T, s.H, device=dev, generator=torch.Generator(device=dev)
                             .manual_seed(T)) * 0.5).to(dtype)
            wts, ids, emap = pruned_routing(T, s.E, s.k, kept, dev, seed=T)
            cids = emap[ids.long()].long()  # the baselines route on compact ids
            hit = int(torch.unique(cids).numel())
            nbytes = hit * expert_bytes + 2 * T * s.H * elt
            flops = 2.0 * T * s.k * 3 * s.H * s.I
            shape = f"{s.label()} T{T} keep {n_keep}/{s.E}"
            case = f"{s.name} T{T} keep{int(keep * 100)}"
            ceiling = "copy" if T <= 128 else "matmul"

            def ours():
                return ops.moe_forward(x, w13, w2, ids, wts, emap)

            out = ours()
            t_op = ctx.time(ours)
            t_by_keep[(T, keep)] = t_op
            note = f"{hit} of {n_keep} kept experts hit"

            def loop():
                return loop_moe(x, w13, w2, cids, wts)

            check = f"max|op - loop| {_max_diff(out, loop()):.1e}"
            t_loop = ctx.time(loop)
            rows.append(make_row(ctx, family=FAMILY, case=case, impl="ops.moe_forward", t=t_op,
                                 baseline="per-expert loop (HF eager)", t_base=t_loop,
                                 dtype=dtype, shape=shape, kernel=kernel, nbytes=nbytes,
                                 flops=flops, ceiling=ceiling, check=check, note=note))

            gmm_note, t_gmm, gmm_check = "", None, ""
            if not has_gmm:
                gmm_note = "torch._grouped_mm is missing in this torch"
            else:
                try:
                    def gmm():
                        return grouped_mm_moe(x, w13, w2, cids, wts)

                    gmm_check = f"max|op - grouped_mm| {_max_diff(out, gmm()):.1e}"
                    t_gmm = ctx.time(gmm)
                except Exception as exc:  # noqa: BLE001 - report, don't fail the family
                    gmm_note = (f"torch._grouped_mm failed on {dev.type}/{dtype}: "
                                f"{type(exc).__name__}: {str(exc)[:80]}")
            rows.append(make_row(ctx, family=FAMILY, case=case, impl="ops.moe_forward", t=t_op,
                                 baseline="torch._grouped_mm + routing glue", t_base=t_gmm,
                                 dtype=dtype, shape=shape, kernel=kernel, nbytes=nbytes,
                                 flops=flops, ceiling=ceiling, check=gmm_check,
                                 note=gmm_note or note))
            del x, out
        del w13, w2
        if ctx.cuda:
            torch.cuda.empty_cache()

    # The pruning payoff: the same layer with half of its experts, same tokens.
    for T in tokens:
        if s.name == MIXTRAL["name"] and T == 16 and (T, 1.0) in t_by_keep \
                and (T, 0.5) in t_by_keep:
            ratio = t_by_keep[(T, 1.0)]["median_ms"] / t_by_keep[(T, 0.5)]["median_ms"]
            verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
            rows.append(make_row(ctx, family=FAMILY, case=f"{s.name} T{T} keep50 vs keep100",
                                 impl="ops.moe_forward 50% experts", t=t_by_keep[(T, 0.5)],
                                 baseline="ops.moe_forward 100% experts",
                                 t_base=t_by_keep[(T, 1.0)], kind="ratio", dtype=dtype,
                                 shape=f"{s.label()} T{T}", kernel=kernel,
                                 check=f"{ratio:.2f}x {verdict} the {TARGET_RATIO}x target",
                                 note="pruned layer (compacted weights, masked router) vs "
                                      "the full layer"))
    return rows


def run(ctx, shapes=None) -> list[dict]:
    """All MoE rows for `ctx.device` (default shapes, or `shapes`: a list of `Shape` or of dicts
    of Shape fields)."""
    from tasksieve.evaluation.bench import run_shapes

    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return run_shapes(ctx, FAMILY, shapes, Shape, run_shape)


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
