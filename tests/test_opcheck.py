"""torch.library.opcheck on every op of the library, and torch.compile through the Python API.

SAMPLES maps every op name to a factory ``device -> list of (args, kwargs)``. The test asserts
that every op registered in csrc/ops.cpp has an entry, so adding an op without samples fails
here. opcheck runs its default utilities: schema (mutation/aliasing as declared), autograd
registration, fake tensor (the register_fake in tasksieve/ops/) and AOT dispatch with dynamic
shapes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_kernel
from tasksieve import ops
from tasksieve.ops import _loader


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _window_scores_samples(device):
    g = _gen(0)
    out = []
    for (B, A, H, Hk, N, D, w, reduce, dtype) in [
        (1, 4, 4, 2, 37, 16, 4, "max", torch.float32),
        (2, 3, 6, 3, 20, 8, 3, "mean", torch.bfloat16),
        (2, 5, 2, 2, 5, 8, 1, "max", torch.float16),  # A = N: nw = 0
    ]:
        q = torch.randn(B, A, H, D, generator=g).to(dtype=dtype, device=device)
        k = torch.randn(B, Hk, N, D, generator=g).to(dtype=dtype, device=device).transpose(1, 2)
        out.append(((q, k, w, reduce), {}))
        start = torch.randint(0, N - A + 1, (B,), generator=g, dtype=torch.int32).to(device)
        out.append(((q, k, w, reduce), {"scale": 0.2, "kv_start": start}))
    return out


def _select_windows_samples(device):
    g = _gen(1)
    s = torch.rand(2, 3, 11, generator=g).to(device)
    return [((s, 4, False), {}), ((s, 4, True), {}), ((s, 20, False), {}),
            ((s[..., :0], 3, True), {})]


def _gather_samples(device, inplace):
    g = _gen(2)
    B, Hk, N, w, tail = 2, 2, 30, 4, 5
    kv = [torch.randn(B, Hk, N, D, generator=g).to(device) for D in (8, 16)]
    kv.append(torch.randn(B, N, Hk, 8, generator=g).to(device).transpose(1, 2))  # strided rows
    limit = (N - tail) // w
    rows = [torch.randperm(limit, generator=g)[:3].sort().values for _ in range(B * Hk)]
    idx = torch.stack(rows).view(B, Hk, 3).to(torch.int32).to(device)
    empty = idx[..., :0]
    if inplace:
        # opcheck runs the op several times on the same tensors: give it fresh copies each time.
        return [(([t.clone() for t in kv], idx, w, tail), {}), (([kv[0].clone()], empty, w, N), {})]
    return [((kv, idx, w, tail), {}), (([kv[1]], empty, w, tail), {}),
            (([kv[0]], idx.flip(-1), w, 0), {})]


def _block_sparse_attention_samples(device):
    g = _gen(4)
    out = []
    dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16,
                                                                       torch.float16]
    for (B, Nq, Nk, H, Hk, D, bs), dtype in zip([(1, 20, 37, 4, 2, 64, 16),
                                                 (2, 33, 33, 2, 1, 64, 32)], dtypes):
        q = torch.randn(B, Nq, H, D, generator=g).to(dtype=dtype, device=device)
        k = torch.randn(B, Hk, Nk, D, generator=g).to(dtype=dtype, device=device).transpose(1, 2)
        v = torch.randn(B, Nk, Hk, D, generator=g).to(dtype=dtype, device=device)
        nbq, nbk = -(-Nq // bs), -(-Nk // bs)
        idx = torch.arange(nbk, dtype=torch.int32).expand(B, H, nbq, nbk).contiguous()
        cnt = torch.randint(0, nbk + 1, (B, H, nbq), generator=g, dtype=torch.int32)
        out.append(((q, k, v, idx.to(device), cnt.to(device), bs), {}))
        out.append(((q, k, v, idx.to(device), cnt.to(device), bs), {"scale": 0.1,
                                                                      "causal": False}))
    # packed varlen: 3 sequences (one without queries), nq < nk, lengths off the block grid
    nqs, nks, H, Hk, D, bs = [3, 0, 20], [37, 5, 20], 4, 2, 64, 16
    for dtype in dtypes:
        q = torch.randn(1, sum(nqs), H, D, generator=g).to(dtype=dtype, device=device)
        k = torch.randn(1, sum(nks), Hk, D, generator=g).to(dtype=dtype, device=device)
        v = torch.randn(1, sum(nks), Hk, D, generator=g).to(dtype=dtype, device=device)
        cu_q = torch.tensor([0, 3, 3, 23], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 37, 42, 62], dtype=torch.int32, device=device)
        nbk = torch.tensor([-(-n // bs) for n in nks], dtype=torch.int32)
        idx = torch.arange(3, dtype=torch.int32).expand(3, H, 2, 3).contiguous()
        cnt = (torch.rand(3, H, 2, generator=g) * (nbk.view(3, 1, 1) + 1)).to(torch.int32)
        out.append(((q, k, v, idx.to(device), cnt.to(device), bs),
                    {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}))
        out.append(((q, k, v, idx.to(device), cnt.to(device), bs, 0.2, False, cu_q, cu_k), {}))
    return out


def _js_divergence_samples(device):
    g = _gen(4)
    p = torch.rand(3, 2, 9, generator=g)
    p[0, 0] = 0.0  # an all-zero row (uniform)
    q = torch.rand(3, 2, 9, generator=g)
    return [((p.to(device), q.to(device)), {}),
            ((p.to(device).bfloat16(), q.to(device).bfloat16(), 1e-6), {}),
            ((p[:0].to(device), q[:0].to(device)), {})]


def _flex_estimate_samples(device):
    g = _gen(5)
    out = []
    for (B, Nq, Nk, H, Hk, D, bs, dtype) in [
        (1, 5, 37, 4, 2, 16, 16, torch.float32),
        (2, 20, 40, 6, 2, 16, 16, torch.bfloat16),
        (1, 0, 20, 2, 1, 16, 16, torch.float16),  # Nq = 0: zeros
    ]:
        q = torch.randn(B, Nq, H, D, generator=g).to(dtype=dtype, device=device)
        k = torch.randn(B, Hk, Nk, D, generator=g).to(dtype=dtype, device=device).transpose(1, 2)
        out.append(((q, k, bs), {}))
        out.append(((q, k, bs), {"scale": 0.3}))
    return out


def _select_blocks_samples(device):
    g = _gen(6)
    out = []
    for (B, H, Nq, Nk, bs, gamma, mn, mx) in [
        (1, 3, 37, 37, 8, 0.9, 1, 3),
        (2, 2, 10, 50, 8, 0.5, 0, 2**31 - 1),  # Nq < Nk
        (1, 2, 0, 20, 8, 0.9, 1, 4),            # Nq = 0: empty rows
    ]:
        nb, nbq = -(-Nk // bs), -(-Nq // bs)
        v = torch.rand(B, H, nb, generator=g).to(device)
        s = torch.rand(B, H, nb, generator=g).to(device)
        m = torch.rand(B, H, nbq, nb, generator=g).to(device)
        qa = (torch.arange(B * H).view(B, H) % 2 == 0).to(device)
        out.append(((v, s, m, qa, Nq, Nk, bs, gamma, mn, mx), {}))
    return out


# ---- PreMoe routing samples (tcess_update, router_stats_update, route_topk, moe_align) ----
def _tcess_update_samples(device):
    g = _gen(7)
    out = []
    for (T, E, k, r, dtype) in [(5, 8, 2, 0.1, torch.float32), (9, 6, 3, -1.0, torch.bfloat16),
                                (0, 4, 1, 0.0, torch.float16)]:
        z = torch.randn(T, E, generator=g).to(dtype=dtype, device=device)
        acc = torch.randn(E, generator=g, dtype=torch.float64).to(device)
        count = torch.tensor([3], dtype=torch.int64, device=device)
        out.append(((z, k, r, acc, count), {}))
    return out


def _router_stats_update_samples(device):
    g = _gen(12)
    out = []
    for (T, E, k, dtype, id_dtype) in [(5, 8, 2, torch.float32, torch.int32),
                                       (9, 6, 3, torch.bfloat16, torch.int64),
                                       (0, 4, 1, torch.float16, torch.int64)]:
        z = torch.randn(T, E, generator=g).to(dtype=dtype, device=device)
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(dtype=id_dtype, device=device)
        acc = [torch.randn(*s, generator=g, dtype=torch.float64).to(device)
               for s in ((E,), (E,), (E, E), (E, E))]
        out.append(((z, ids, *acc), {}))
    # strided logits (a transposed view)
    z = torch.randn(6, 7, generator=g).to(device).t().contiguous().t()
    ids = torch.randint(0, 7, (6, 2), generator=g).to(device)
    out.append(((z, ids, *[torch.zeros(*s, dtype=torch.float64, device=device)
                           for s in ((7,), (7,), (7, 7), (7, 7))]), {}))
    return out


def _route_topk_samples(device):
    g = _gen(8)
    z = torch.randn(7, 10, generator=g).to(device)
    keep = (torch.arange(10) % 3 != 0).to(device)
    bias = torch.randn(10, generator=g).to(device)
    return [((z, 3), {}),
            ((z, 2, "softmax", False, keep), {"mask_full": True}),
            ((z.bfloat16(), 4, "sigmoid", True, None, bias, 2.5), {}),
            ((z.half(), 2, "topk_softmax"), {"keep_mask": keep}),
            ((z[:0], 2, "softmax", True), {})]


def _moe_align_samples(device):
    g = _gen(9)
    ids = torch.randint(0, 6, (5, 3), generator=g, dtype=torch.int32).to(device)
    emap = torch.tensor([2, -1, 0, 1, -1, 3], dtype=torch.int32, device=device)
    return [((ids, 6, 4), {}), ((ids.long(), 6, 16, emap), {}), ((ids, 6, 1), {}),
            ((ids[:0], 6, 4), {})]


# ---- PreMoe expert GEMM samples (expert_gemm, moe_forward) ----
def _expert_gemm_samples(device):
    g = _gen(10)
    out = []
    dtypes = ([torch.float32, torch.bfloat16] if device == "cpu"
              else [torch.bfloat16, torch.float16])
    for (T, k, E, K, N, bm, gather, act), dtype in zip(
            [(5, 2, 3, 16, 48, 16, True, "silu_mul"), (7, 1, 4, 8, 40, 32, False, "none")],
            dtypes):
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(torch.int32).to(device)
        align = ops.moe_align(ids, E, bm)
        x = torch.randn(T if gather else T * k, K, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(E, N, K, generator=g).to(device=device, dtype=dtype)
        tw = torch.rand(T, k, generator=g).to(device)
        out.append(((x, w, *align, bm, k, gather), {"activation": act}))
        out.append(((x, w, *align, bm, k, gather, act, tw), {}))
    empty = torch.empty(0, 2, dtype=torch.int32, device=device)
    x0 = torch.empty(0, 8, device=device, dtype=dtypes[1])
    w0 = torch.randn(2, 16, 8, generator=g).to(device=device, dtype=dtypes[1])
    out.append(((x0, w0, *ops.moe_align(empty, 2, 16), 16, 2, True, "silu_mul"), {}))
    return out


def _moe_forward_samples(device):
    g = _gen(11)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    T, E, k, H, I = 6, 4, 2, 16, 24
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    w13 = torch.randn(E, 2 * I, H, generator=g).to(device=device, dtype=dtype)
    w2 = torch.randn(E, H, I, generator=g).to(device=device, dtype=dtype)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(device)
    wts = torch.rand(T, k, generator=g).to(device)
    emap = torch.tensor([1, -1, 0, 2], dtype=torch.int32, device=device)
    return [((x, w13, w2, ids, wts), {}),
            ((x.bfloat16(), w13.bfloat16(), w2.bfloat16(), ids.int(), wts), {}),
            ((x, w13[:3], w2[:3], ids, wts), {"expert_map": emap}),
            ((x[:0], w13, w2, ids[:0], wts[:0]), {})]


def _paged_problem(device, dtype, packed, layout, seed):
    """q, k_cache, v_cache (views of one cache in `layout`), block_table with shuffled page ids
    and garbage past the used pages, seq_lens_k, index, cu_seqlens_q: 3 sequences."""
    g = _gen(seed)
    nks, nqs, H, Hk, D, P, bs = [37, 20, 5], [3, 20, 0], 4, 2, 64, 3, 16
    used = [-(-n // P) for n in nks]
    pages = sum(used) + 1
    if layout == "cpu_attn" and device != "cpu":
        layout = "kv_concat"  # vLLM CPU's transposed K pages are CPU only
    if layout in ("cpu_attn", "kv_concat"):
        cache = torch.randn(pages, Hk, P, 2 * D, generator=g).to(dtype=dtype, device=device)
    else:
        cache = torch.randn(2, pages, P, Hk, D, generator=g).to(dtype=dtype, device=device)
    kc, vc = ops.paged_kv_views(cache, layout, P, Hk, D)
    perm = torch.randperm(pages, generator=g)
    table = torch.full((3, max(used) + 1), 99, dtype=torch.int32)
    at = 0
    for s, u in enumerate(used):
        table[s, :u] = perm[at:at + u].to(torch.int32)
        at += u
    lens = torch.tensor(nks, dtype=torch.int32)
    if packed:
        q = torch.randn(1, sum(nqs), H, D, generator=g)
        cu = torch.tensor([0, 3, 23, 23], dtype=torch.int32).to(device)
        nbq = 2
    else:
        q = torch.randn(3, 5, H, D, generator=g)
        cu = None
        nbq = 1
    nbk = torch.tensor([-(-n // bs) for n in nks], dtype=torch.int32)
    idx = torch.arange(3, dtype=torch.int32).expand(3, H, nbq, 3).contiguous()
    cnt = (torch.rand(3, H, nbq, generator=g) * (nbk.view(3, 1, 1) + 1)).to(torch.int32)
    return (q.to(dtype=dtype, device=device), kc, vc, table.to(device), lens.to(device),
            idx.to(device), cnt.to(device), bs, cu)


def _block_sparse_attention_paged_samples(device):
    out = []
    dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16,
                                                                       torch.float16]
    for i, (dtype, packed, layout) in enumerate([(dtypes[0], False, "cpu_attn"),
                                                 (dtypes[1], True, "flash_attn"),
                                                 (dtypes[0], True, "cpu_attn")]):
        q, kc, vc, table, lens, idx, cnt, bs, cu = _paged_problem(device, dtype, packed, layout,
                                                                  20 + i)
        out.append(((q, kc, vc, table, lens, idx, cnt, bs), {"cu_seqlens_q": cu}))
        out.append(((q, kc, vc, table, lens, idx, cnt, bs, 0.2, False, cu), {}))
    return out


def _flex_estimate_paged_samples(device):
    out = []
    for i, (dtype, packed, layout) in enumerate([(torch.float32, False, "flash_attn"),
                                                 (torch.bfloat16, True, "cpu_attn")]):
        q, kc, _, table, lens, _, _, bs, cu = _paged_problem(device, dtype, packed, layout,
                                                             30 + i)
        out.append(((q, kc, table, lens, bs), {"cu_seqlens_q": cu}))
        out.append(((q, kc, table, lens, 32, 0.3, cu), {}))
    return out


SAMPLES = {
    "block_sparse_attention": _block_sparse_attention_samples,
    "window_scores": _window_scores_samples,
    "select_windows": _select_windows_samples,
    "gather_windows": lambda device: _gather_samples(device, inplace=False),
    "gather_windows_": lambda device: _gather_samples(device, inplace=True),
    "js_divergence": _js_divergence_samples,
    "flex_estimate": _flex_estimate_samples,
    "select_blocks": _select_blocks_samples,
    "block_sparse_attention_paged": _block_sparse_attention_paged_samples,
    "flex_estimate_paged": _flex_estimate_paged_samples,
    # PreMoe routing
    "tcess_update": _tcess_update_samples,
    "router_stats_update": _router_stats_update_samples,
    "route_topk": _route_topk_samples,
    "moe_align": _moe_align_samples,
    # PreMoe expert GEMM
    "expert_gemm": _expert_gemm_samples,
    "moe_forward": _moe_forward_samples,
}


def test_every_op_has_samples():
    names = _loader.op_names()
    assert names, "no tasksieve ops registered"
    missing = sorted(set(names) - set(SAMPLES))
    assert not missing, f"ops without opcheck samples in tests/test_opcheck.py: {missing}"


def test_every_op_has_a_reference_and_a_fake():
    """The op layer and the ground truth live in packages (ops/<family>.py, reference/<family>.py):
    every registered op still has its reference and a registered fake."""
    from torch._library.simple_registry import singleton

    from tasksieve import reference

    names = _loader.op_names()
    no_ref = [n for n in names if not callable(getattr(reference, f"reference_{n}", None))]
    no_fake = [n for n in names if singleton.find(f"tasksieve::{n}").fake_impl.kernel is None]
    assert not no_ref, f"ops without tasksieve.reference.reference_<op>: {no_ref}"
    assert not no_fake, f"ops without a register_fake in tasksieve.ops: {no_fake}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, device):
    if name not in _loader.op_names():
        pytest.fail(f"SAMPLES lists {name!r}, which is not registered")
    requires_kernel(name, device)
    op = getattr(torch.ops.tasksieve, name).default
    for args, kwargs in SAMPLES[name](device):
        torch.library.opcheck(op, args, kwargs)


def test_compile_fullgraph_windowkv():
    """score -> select -> gather (out of place and in place) compiles into one graph on CPU."""
    g = _gen(3)
    B, A, H, Hk, N, D, w, tail = 2, 4, 4, 2, 40, 16, 4, 8
    q = torch.randn(B, A, H, D, generator=g)
    kcache = torch.randn(B, Hk, N, D, generator=g)
    vcache = torch.randn(B, Hk, N, D, generator=g)

    def compress(q, kcache, vcache, kc, vc):
        scores = ops.window_scores(q, kcache.transpose(1, 2), w, "max")
        idx = ops.select_windows(scores, 4, share=True)
        k2, v2 = ops.gather_windows([kcache, vcache], idx, w, tail)
        ops.gather_windows_([kc, vc], idx, w, tail)  # mutates graph inputs
        return scores, idx, k2, v2

    torch._dynamo.reset()
    # No pointwise ops in the graph, so inductor has no C++ kernel to compile (seconds, not a
    # minute, on a cold cache).
    compiled = torch.compile(compress, fullgraph=True, dynamic=False)
    kc, vc = kcache.clone(), vcache.clone()
    got = compiled(q, kcache, vcache, kc, vc) + (kc, vc)
    kc, vc = kcache.clone(), vcache.clone()
    expect = compress(q, kcache, vcache, kc, vc) + (kc, vc)
    torch.testing.assert_close(got[0], expect[0])
    for a, b in zip(got[1:], expect[1:]):
        assert torch.equal(a, b)


def test_meta_tensors_use_the_fakes():
    """Shape inference without data: the wrappers route meta tensors to the fakes."""
    q = torch.empty(2, 4, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 1000, 2, 64, device="meta", dtype=torch.bfloat16)
    scores = ops.window_scores(q, k, 8, "max")
    assert scores.shape == (2, 2, 124) and scores.dtype == torch.float32
    idx = ops.select_windows(scores, 10, share=True)
    assert idx.shape == (2, 2, 10) and idx.dtype == torch.int32
    assert ops.select_windows(scores, 500).shape == (2, 2, 124)
    kv = [torch.empty(2, 2, 1000, d, device="meta", dtype=torch.bfloat16) for d in (64, 32)]
    out = ops.gather_windows(kv, idx, 8, 20)
    assert [tuple(t.shape) for t in out] == [(2, 2, 100, 64), (2, 2, 100, 32)]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "meta" for t in out)
    assert ops.gather_windows_(kv, idx, 8, 20) is None
