"""FlexPrefill cases of bench/sanitize_ops.py (the compute-sanitizer workload).

Each case runs the CUDA op on small, awkward shapes and compares it with the CPU kernel of the same
op on the same inputs (the CPU kernels are tested against the references in the suite): odd Nq/Nk,
Nq < Nk, a single token, GQA G in {1, 4}, head dims 64/128, every block size, fp16/bf16, an empty
row budget, and block_idx entries out of range (the CUDA kernel must skip them, never read out of
bounds).
"""

from __future__ import annotations

import torch

OPS = ("flex_estimate", "js_divergence", "select_blocks", "block_sparse_attention",
       "block_sparse_attention_paged", "flex_estimate_paged")


def _rand(shape, dtype, seed, dev):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(dev)


def cases(r, dev, close, sync):
    """Register every FlexPrefill case with Runner `r` (see sanitize_ops.Runner)."""
    from tasksieve import ops
    from tasksieve.ops import _loader

    key = "CUDA" if dev.type == "cuda" else "CPU"
    have = {op: _loader.has_kernel(op, key) for op in OPS}
    # (B, Nq, Nk, H, Hk, D, bs, dtype)
    grid = [
        (1, 1, 1, 2, 1, 64, 16, torch.bfloat16),
        (1, 37, 37, 4, 4, 64, 16, torch.float16),
        (2, 20, 130, 8, 2, 128, 32, torch.bfloat16),
        (1, 200, 333, 4, 1, 128, 64, torch.float16),
        (1, 300, 300, 2, 2, 64, 128, torch.bfloat16),
    ]
    for i, (B, Nq, Nk, H, Hk, D, bs, dtype) in enumerate(grid):
        tag = f"B{B} Nq{Nq} Nk{Nk} H{H} Hk{Hk} D{D} bs{bs} {str(dtype)[6:]}"
        q = _rand((B, Nq, H, D), dtype, 100 + i, dev)
        k = _rand((B, Hk, Nk, D), dtype, 200 + i, dev).transpose(1, 2)  # strided [B, Nk, Hk, D]
        v = _rand((B, Nk, Hk, D), dtype, 300 + i, dev)
        nb, nbq = -(-Nk // bs), -(-Nq // bs)

        if have["flex_estimate"]:
            def est(q=q, k=k, bs=bs, tag=tag):
                got = ops.flex_estimate(q, k, bs)
                sync()
                if r.check:
                    want = ops.flex_estimate(q.cpu(), k.cpu(), bs)
                    for name, g_, w_ in zip(("vertical", "slash", "estimate"), got, want):
                        close(f"flex_estimate {name} {tag}", g_, w_, 2e-2)

            r.case(f"flex_estimate {tag}", est)

        if have["block_sparse_attention"]:
            def bsa(q=q, k=k, v=v, bs=bs, nb=nb, nbq=nbq, B=B, H=H, i=i, tag=tag):
                g = torch.Generator().manual_seed(400 + i)
                idx = torch.stack([torch.randperm(nb, generator=g) for _ in range(B * H * nbq)])
                idx = idx.sort(-1).values.view(B, H, nbq, nb).to(torch.int32)
                cnt = torch.randint(0, nb + 1, (B, H, nbq), generator=g, dtype=torch.int32)
                out, lse = ops.block_sparse_attention(q, k, v, idx.to(dev), cnt.to(dev), bs)
                sync()
                if r.check:
                    wo, wl = ops.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), idx, cnt, bs)
                    close(f"block_sparse_attention out {tag}", out.float(), wo.float(), 2e-2)
                    fin = torch.isfinite(wl)
                    if not torch.equal(torch.isfinite(lse.cpu()), fin):
                        raise AssertionError(f"block_sparse_attention lse {tag}: -inf rows differ")
                    close(f"block_sparse_attention lse {tag}", lse.cpu()[fin], wl[fin], 1e-3)

            r.case(f"block_sparse_attention {tag}", bsa)

            def bsa_invalid(q=q, k=k, v=v, bs=bs, nb=nb, nbq=nbq, B=B, H=H, tag=tag):
                # columns past nb, negative ones and counts past max_k: skipped, never read
                idx = torch.full((B, H, nbq, 3), nb + 5, dtype=torch.int32)
                idx[..., 0] = -7
                idx[..., 1] = 0
                cnt = torch.full((B, H, nbq), 3, dtype=torch.int32)
                ops.block_sparse_attention(q, k, v, idx.to(dev), cnt.to(dev), bs)
                sync()

            if dev.type == "cuda":  # the CPU kernel raises on these instead (tested in the suite)
                r.case(f"block_sparse_attention invalid idx {tag}", bsa_invalid)

        if have["select_blocks"]:
            def sel(B=B, H=H, Nq=Nq, Nk=Nk, bs=bs, nb=nb, nbq=nbq, i=i, tag=tag):
                g = torch.Generator().manual_seed(500 + i)
                vert = torch.rand(B, H, nb, generator=g)
                slash = torch.rand(B, H, nb, generator=g)
                qa_map = torch.rand(B, H, nbq, nb, generator=g)
                qa = torch.rand(B, H, generator=g) < 0.5
                args = (Nq, Nk, bs, 0.9, 1, 4)
                gi, gc = ops.select_blocks(vert.to(dev), slash.to(dev), qa_map.to(dev), qa.to(dev), *args)
                sync()
                if r.check:
                    wi, wc = ops.select_blocks(vert, slash, qa_map, qa, *args)
                    if not (torch.equal(gi.cpu(), wi) and torch.equal(gc.cpu(), wc)):
                        raise AssertionError(f"select_blocks {tag}: sets differ from the CPU kernel")

            r.case(f"select_blocks {tag}", sel)

    if have["block_sparse_attention"]:
        def varlen(malformed: bool):
            # 3 packed sequences (nq, nk): one empty, one nq < nk off the block grid, one nq = nk
            lens = [(0, 5), (37, 100), (64, 64)]
            H, Hk, D, bs = 4, 2, 64, 16
            cq = torch.tensor([0] + [sum(q for q, _ in lens[: i + 1]) for i in range(3)], dtype=torch.int32)
            ck = torch.tensor([0] + [sum(k for _, k in lens[: i + 1]) for i in range(3)], dtype=torch.int32)
            q = _rand((1, int(cq[-1]), H, D), torch.bfloat16, 601, dev)
            k = _rand((1, int(ck[-1]), Hk, D), torch.bfloat16, 602, dev)
            v = _rand((1, int(ck[-1]), Hk, D), torch.bfloat16, 603, dev)
            nbq, nb = 4, 7
            idx = torch.arange(nb, dtype=torch.int32).expand(3, H, nbq, nb).contiguous()
            cnt = torch.randint(0, nb + 1, (3, H, nbq), generator=torch.Generator().manual_seed(604),
                                dtype=torch.int32)
            for s, (nq, nk) in enumerate(lens):  # keep every listed column inside its sequence
                cnt[s] = cnt[s].clamp(max=-(-nk // bs))
            if malformed:  # decreasing, past the end, nq > nk: the CUDA kernel clamps, never faults
                cq = torch.tensor([0, 90, 10, 500], dtype=torch.int32)
                ck = torch.tensor([0, 3, 2, 400], dtype=torch.int32)
                idx[..., 0] = 1000
            out, lse = ops.block_sparse_attention(q, k, v, idx.to(dev), cnt.to(dev), bs,
                                                  cu_seqlens_q=cq.to(dev), cu_seqlens_k=ck.to(dev))
            sync()
            if r.check and not malformed:
                wo, wl = ops.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), idx, cnt, bs,
                                                    cu_seqlens_q=cq, cu_seqlens_k=ck)
                close("block_sparse_attention varlen out", out.float(), wo.float(), 2e-2)
                fin = torch.isfinite(wl)
                close("block_sparse_attention varlen lse", lse.cpu()[fin], wl[fin], 1e-3)

        r.case("block_sparse_attention varlen", lambda: varlen(False))
        if dev.type == "cuda":  # the CPU kernel raises on malformed offsets (tested in the suite)
            r.case("block_sparse_attention varlen malformed cu_seqlens", lambda: varlen(True))

    if have["block_sparse_attention_paged"] and have["flex_estimate_paged"]:
        def paged(layout: str, malformed: bool):
            # 2 sequences of 45 and 100 keys in shuffled 3-token pages, packed chunks of 13 and 37 queries
            H, Hk, D, bs, P = 4, 2, 64, 16, 3
            nks, nqs = [45, 100], [13, 37]
            max_pages = -(-max(nks) // P)
            num_pages = 2 * max_pages + 1
            if layout == "kv_concat":  # vLLM 0.32's GPU cache ("cpu_attn", K transposed, is CPU only)
                cache = _rand((num_pages, Hk, P, 2 * D), torch.bfloat16, 701, dev)
            else:
                cache = _rand((2, num_pages, P, Hk, D), torch.bfloat16, 701, dev)
            kc, vc = ops.paged_kv_views(cache, layout, P, Hk, D)
            perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(702))
            table = perm[: 2 * max_pages].view(2, max_pages).to(torch.int32)
            lens = torch.tensor(nks, dtype=torch.int32)
            cq = torch.tensor([0, nqs[0], sum(nqs)], dtype=torch.int32)
            q = _rand((1, sum(nqs), H, D), torch.bfloat16, 703, dev)
            nb, nbq = -(-max(nks) // bs), -(-max(nqs) // bs)
            idx = torch.arange(nb, dtype=torch.int32).expand(2, H, nbq, nb).contiguous()
            cnt = torch.stack([torch.full((H, nbq), -(-n // bs), dtype=torch.int32) for n in nks])
            if malformed:  # page ids past the cache, lengths past the table: clamped on CUDA, never read
                table[0, 1] = 10_000
                table[1, 0] = -4
                lens = torch.tensor([10_000, 7], dtype=torch.int32)
            args = (table.to(dev), lens.to(dev))
            out, lse = ops.block_sparse_attention_paged(q, kc, vc, *args, idx.to(dev), cnt.to(dev), bs,
                                                        cu_seqlens_q=cq.to(dev))
            est = ops.flex_estimate_paged(q, kc, *args, bs, cu_seqlens_q=cq.to(dev))
            sync()
            if r.check and not malformed:
                cpu = (table, lens)
                wo, wl = ops.block_sparse_attention_paged(q.cpu(), kc.cpu(), vc.cpu(), *cpu, idx, cnt, bs,
                                                          cu_seqlens_q=cq)
                close(f"block_sparse_attention_paged out {layout}", out.float(), wo.float(), 2e-2)
                fin = torch.isfinite(wl)
                close(f"block_sparse_attention_paged lse {layout}", lse.cpu()[fin], wl[fin], 1e-3)
                want = ops.flex_estimate_paged(q.cpu(), kc.cpu(), *cpu, bs, cu_seqlens_q=cq)
                for name, g_, w_ in zip(("vertical", "slash", "estimate"), est, want):
                    close(f"flex_estimate_paged {name} {layout}", g_, w_, 2e-2)

        for layout in ("kv_concat", "flash_attn"):
            r.case(f"paged {layout}", lambda layout=layout: paged(layout, False))
            if dev.type == "cuda":  # the CPU kernels raise on malformed tables (tested in the suite)
                r.case(f"paged {layout} malformed table", lambda layout=layout: paged(layout, True))

    if have["js_divergence"]:
        def jsd():
            p = torch.rand(5, 3, 33)
            p[0, 0] = 0.0
            qv = torch.rand(5, 3, 33)
            qv[1, 2, :5] = 0.0
            for dtype in (torch.float32, torch.bfloat16):
                got = ops.js_divergence(p.to(dtype).to(dev), qv.to(dtype).to(dev))
                sync()
                if r.check:
                    close(f"js_divergence {str(dtype)[6:]}", got,
                          ops.js_divergence(p.to(dtype), qv.to(dtype)), 1e-3)

        r.case("js_divergence rows with zeros", jsd)
    return have
