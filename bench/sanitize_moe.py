"""PreMoe cases of bench/sanitize_ops.py (the compute-sanitizer workload).

Each case runs the CUDA op on small, awkward shapes and compares it with the CPU kernel of the same
op on the same inputs (the CPU kernels are tested against the references in the suite): one token
and odd token counts, E from 1 to 256, top-k up to E, all three scorings with masks and biases,
expert maps that drop experts, tiles taller than the token count, hidden and expert sizes that are
multiples of 8 but not of the tile, bf16/fp16.
"""

from __future__ import annotations

import torch

OPS = ("tcess_update", "router_stats_update", "route_topk", "moe_align", "expert_gemm", "moe_forward")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ids(T, k, E, seed, keep=None):
    """Distinct expert ids per token (int32 [T, k]), drawn from `keep` (a list) or range(E)."""
    pool = torch.arange(E) if keep is None else torch.tensor(keep)
    g = _gen(seed)
    rows = [pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]
    return (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)).to(torch.int32)


def cases(r, dev, close, sync):
    """Register every PreMoe case with Runner `r` (see sanitize_ops.Runner)."""
    from tasksieve import ops
    from tasksieve.ops import _loader

    key = "CUDA" if dev.type == "cuda" else "CPU"
    have = {op: _loader.has_kernel(op, key) for op in OPS}

    # ---- routing -------------------------------------------------------------------------------
    route_grid = [  # (T, E, k)
        (1, 1, 1), (7, 8, 2), (33, 64, 8), (5, 60, 4), (130, 128, 8), (3, 256, 8), (0, 16, 2),
    ]
    for i, (T, E, k) in enumerate(route_grid):
        logits = torch.randn(T, E, generator=_gen(600 + i))
        keep = torch.ones(E, dtype=torch.bool)
        if E >= 2 * k:
            keep[torch.randperm(E, generator=_gen(700 + i))[: E // 2]] = False
        bias = torch.randn(E, generator=_gen(800 + i)) * 0.1
        tag = f"T{T} E{E} k{k}"
        if have["route_topk"]:
            for scoring, renorm, use_bias, full in (("softmax", False, False, False),
                                                    ("softmax", True, False, True),
                                                    ("sigmoid", True, True, False),
                                                    ("topk_softmax", False, False, False)):
                def route(scoring=scoring, renorm=renorm, use_bias=use_bias, full=full, logits=logits,
                          keep=keep, bias=bias, k=k, tag=tag):
                    kw = dict(scoring=scoring, renormalize=renorm, keep_mask=keep,
                              bias=bias if use_bias else None, scaling=2.5, mask_full=full)
                    w, ids = ops.route_topk(logits.to(torch.bfloat16).to(dev), k,
                                            **{n: (x.to(dev) if torch.is_tensor(x) else x)
                                               for n, x in kw.items()})
                    sync()
                    if r.check:
                        ww, wi = ops.route_topk(logits.to(torch.bfloat16), k, **kw)
                        if not torch.equal(ids.cpu(), wi):
                            raise AssertionError(f"route_topk {scoring} {tag}: ids differ")
                        close(f"route_topk {scoring} {tag}", w, ww, 1e-4)

                r.case(f"route_topk {scoring} {tag}", route)
        if have["tcess_update"]:
            def tcess(logits=logits, k=k, E=E, tag=tag):
                for rr in (-1.0, 0.3):
                    acc, cnt = torch.zeros(E, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
                    acc_d, cnt_d = acc.to(dev), cnt.to(dev)
                    ops.tcess_update(logits.to(dev), k, rr, acc_d, cnt_d)
                    sync()
                    if r.check:
                        ops.tcess_update(logits, k, rr, acc, cnt)
                        close(f"tcess_update r={rr} {tag}", acc_d, acc, 1e-6)
                        if int(cnt_d.item()) != int(cnt.item()):
                            raise AssertionError(f"tcess_update {tag}: count differs")

            r.case(f"tcess_update {tag}", tcess)
        if have["router_stats_update"]:
            def stats(logits=logits, k=k, E=E, T=T, i=i, tag=tag):
                ids = _ids(T, k, E, 650 + i)
                acc = [torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64),
                       torch.zeros(E, E, dtype=torch.float64), torch.zeros(E, E, dtype=torch.float64)]
                acc_d = [a.to(dev) for a in acc]
                ops.router_stats_update(logits.to(dev), ids.to(dev), *acc_d)
                sync()
                if r.check:
                    ops.router_stats_update(logits, ids, *acc)
                    for name, a_d, a in zip(("counts", "logit_sum", "logit_gram", "coselect"), acc_d, acc):
                        close(f"router_stats_update {name} {tag}", a_d, a, 1e-9)

            r.case(f"router_stats_update {tag}", stats)

    align_grid = [  # (T, k, E, block_m, drop)
        (1, 1, 1, 16, False), (4, 3, 5, 4, False), (37, 2, 8, 16, True), (200, 8, 64, 64, True),
        (3, 8, 256, 128, False), (0, 2, 8, 16, False),
    ]
    if have["moe_align"]:
        for i, (T, k, E, bm, drop) in enumerate(align_grid):
            tag = f"T{T} k{k} E{E} bm{bm}{' map' if drop else ''}"

            def align(T=T, k=k, E=E, bm=bm, drop=drop, i=i, tag=tag):
                ids = _ids(T, k, E, 900 + i)
                emap = None
                if drop:
                    kept = torch.randperm(E, generator=_gen(950 + i))[: (E + 1) // 2].sort().values
                    emap = torch.full((E,), -1, dtype=torch.int32)
                    emap[kept] = torch.arange(len(kept), dtype=torch.int32)
                got = ops.moe_align(ids.to(dev), E, bm, None if emap is None else emap.to(dev))
                sync()
                if r.check:
                    want = ops.moe_align(ids, E, bm, emap)
                    for name, g_, w_ in zip(("sorted_ids", "tile_expert", "num_padded"), got, want):
                        if not torch.equal(g_.cpu(), w_):
                            raise AssertionError(f"moe_align {tag}: {name} differs")

            r.case(f"moe_align {tag}", align)

    # ---- expert GEMM ---------------------------------------------------------------------------
    gemm_grid = [  # (T, k, E_c, H, I, dtype)
        (1, 1, 1, 16, 8, torch.bfloat16), (5, 2, 3, 40, 24, torch.float16),
        (70, 2, 8, 128, 72, torch.bfloat16), (33, 4, 9, 64, 200, torch.bfloat16), (0, 2, 4, 32, 16, torch.float16),
    ]
    for i, (T, k, E, H, I, dtype) in enumerate(gemm_grid):
        tag = f"T{T} k{k} E{E} H{H} I{I} {str(dtype)[6:]}"
        g = _gen(1000 + i)
        x = (torch.randn(T, H, generator=g) * 0.5).to(dtype)
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
        ids = _ids(T, k, E, 1100 + i)
        wts = torch.rand(T, k, generator=g)
        emap = torch.arange(E, dtype=torch.int32)
        if E > 1:
            emap[0] = -1  # one expert dropped: its slots add nothing
        if have["moe_forward"]:
            def fwd(x=x, w13=w13, w2=w2, ids=ids, wts=wts, emap=emap, tag=tag):
                for m in (None, emap):
                    got = ops.moe_forward(x.to(dev), w13.to(dev), w2.to(dev), ids.to(dev), wts.to(dev),
                                          None if m is None else m.to(dev))
                    sync()
                    if r.check:
                        want = ops.moe_forward(x, w13, w2, ids, wts, m)
                        close(f"moe_forward {tag}", got.float(), want.float(), 2e-2)

            r.case(f"moe_forward {tag}", fwd)
        if have["expert_gemm"] and have["moe_align"]:
            def gemm(x=x, w13=w13, ids=ids, wts=wts, E=E, k=k, tag=tag):
                bm = 16
                sid, tiles, npad = ops.moe_align(ids.to(dev), E, bm)
                for act, w in (("silu_mul", w13), ("none", w13)):
                    got = ops.expert_gemm(x.to(dev), w.to(dev), sid, tiles, npad, bm, k, True, act,
                                          wts.to(dev))
                    sync()
                    if r.check:
                        s_c, t_c, n_c = ops.moe_align(ids, E, bm)
                        want = ops.expert_gemm(x, w, s_c, t_c, n_c, bm, k, True, act, wts)
                        close(f"expert_gemm {act} {tag}", got.float(), want.float(), 2e-2)

            r.case(f"expert_gemm {tag}", gemm)
    return have
