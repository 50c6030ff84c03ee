"""Paged-KV forms of block_sparse_attention and flex_estimate (block_sparse_attention_paged,
flex_estimate_paged) and the cache-view helper paged_kv_views.

Each random problem puts S sequences of different lengths into a paged cache (page ids shuffled,
so a sequence's pages are neither contiguous nor in order; unused table entries hold garbage the
ops must never read), in both cache layouts (vLLM's CPU backend: per (page, head) K rows then V
rows; FlashAttention: [2, pages, page, Hk, D]). The paged op must equal the contiguous op on the
gathered keys and values, sequence by sequence (same kernel code and summation order on CPU), and
the reference (fp32 tight; fp16/bf16 within flash-attention's 2x rule). Every bad input is an
error naming the argument, identical in the op and the reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_kernel
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import ops
from tasksieve.reference import (reference_block_sparse_attention,
                                 reference_block_sparse_attention_paged,
                                 reference_flex_estimate_paged)

BSA = "block_sparse_attention_paged"
EST = "flex_estimate_paged"


def _bsa(*args, **kwargs):
    return torch.ops.tasksieve.block_sparse_attention_paged.default(*args, **kwargs)


def _est(*args, **kwargs):
    return torch.ops.tasksieve.flex_estimate_paged.default(*args, **kwargs)


def _dtypes(device):
    return [torch.float32, torch.bfloat16, torch.float16] if device == "cpu" else [
        torch.bfloat16, torch.float16]


def _head_dims(device):
    return [16, 64] if device == "cpu" else [64, 128]


def _layouts(device):
    """The cache layouts the ops read on `device`: the CUDA ops load 16-byte vectors along D, so
    vLLM CPU's transposed K pages ("cpu_attn") are CPU only."""
    return ["cpu_attn", "flash_attn", "kv_concat"] if device == "cpu" else ["flash_attn",
                                                                           "kv_concat"]


def _skip_layout(device, layout):
    if layout not in _layouts(device):
        pytest.skip(f"the {layout!r} layout is CPU only (test_cuda_rejects_strided_cache_rows)")


def make_cache(num_pages, page_size, Hk, D, dtype, layout, g, device="cpu"):
    """A random cache in `layout` and its (k, v) views [num_pages, page_size, Hk, D]."""
    if layout == "cpu_attn":
        cache = torch.randn(num_pages, Hk, page_size, 2 * D, generator=g)
    elif layout == "kv_concat":  # logical [pages, Hk, page, 2D], physically [pages, page, Hk, 2D]
        cache = torch.randn(num_pages, page_size, Hk, 2 * D, generator=g).transpose(1, 2)
    else:
        cache = torch.randn(2, num_pages, page_size, Hk, D, generator=g)
    cache = cache.to(dtype=dtype, device=device)
    k, v = ops.paged_kv_views(cache, layout, page_size, Hk, D)
    return cache, k, v


def gather(cache, table_row, nk):
    """Sequence's [nk, Hk, D] rows, page by page (written independently of the reference)."""
    ps = cache.shape[1]
    pages = [cache[int(p)] for p in table_row[: -(-nk // ps)].tolist()]
    if not pages:
        return cache[:0].reshape(0, *cache.shape[2:])
    return torch.cat(pages, 0)[:nk]


class Problem:
    """S sequences in a paged cache: nks keys each, queries nqs (packed) or Nq (dense)."""

    def __init__(self, nks, nqs, packed, H, Hk, D, page_size, bs, dtype, layout, device, seed,
                 density=0.5, extra_pages=2, extra_rows=1):
        g = torch.Generator().manual_seed(seed)
        S = len(nks)
        used = [-(-n // page_size) for n in nks]
        num_pages = sum(used) + extra_pages
        self.cache, self.k, self.v = make_cache(num_pages, page_size, Hk, D, dtype, layout, g,
                                                device)
        perm = torch.randperm(num_pages, generator=g).tolist()
        max_pages = max(used + [0]) + (seed % 3)
        table = torch.full((S, max_pages), 10**6 if seed % 2 else -1, dtype=torch.int32)
        at = 0
        for s in range(S):
            table[s, : used[s]] = torch.tensor(perm[at:at + used[s]], dtype=torch.int32)
            at += used[s]
        self.block_table = table.to(device)
        self.seq_lens = torch.tensor(nks, dtype=torch.int32, device=device)
        self.packed = packed
        if packed:
            self.q = torch.randn(1, sum(nqs), H, D, generator=g).to(dtype=dtype, device=device)
            self.cu = torch.tensor([0] + torch.tensor(nqs, dtype=torch.int64).cumsum(0).tolist(),
                                   dtype=torch.int32, device=device)
            nbq = max([-(-n // bs) for n in nqs] + [0]) + extra_rows
        else:
            Nq = nqs[0] if nqs else 0
            self.q = torch.randn(S, Nq, H, D, generator=g).to(dtype=dtype, device=device)
            self.cu = None
            nbq = -(-Nq // bs)
        self.nks, self.nqs, self.bs, self.S, self.H = nks, nqs, bs, S, H
        max_k = max([-(-n // bs) for n in nks] + [1])
        idx = torch.full((S, H, nbq, max_k), 10**6, dtype=torch.int32)
        cnt = torch.full((S, H, nbq), -5 if packed else 0, dtype=torch.int32)
        for s in range(S):
            nbk = -(-nks[s] // bs)
            for h in range(H):
                for r in range(-(-nqs[s] // bs)):
                    sel = torch.nonzero(torch.rand(nbk, generator=g) < density).flatten()
                    idx[s, h, r, : len(sel)] = sel.to(torch.int32)
                    cnt[s, h, r] = len(sel)
        self.idx, self.cnt = idx.to(device), cnt.to(device)

    def attn_args(self):
        return (self.q, self.k, self.v, self.block_table, self.seq_lens, self.idx, self.cnt,
                self.bs)

    def est_args(self):
        return (self.q, self.k, self.block_table, self.seq_lens, self.bs)

    def q_rows(self, s):
        if self.packed:
            a = int(self.cu[s])
            return self.q[:, a:a + self.nqs[s]]
        return self.q[s:s + 1]

    def kv(self, s):
        row = self.block_table[s].cpu()
        return (gather(self.k, row, self.nks[s]).unsqueeze(0),
                gather(self.v, row, self.nks[s]).unsqueeze(0))


def _lengths(draw, packed):
    S = draw(st.integers(1, 3))
    nks = [draw(st.integers(1, 110)) for _ in range(S)]
    if packed:
        nqs = []
        for nk in nks:
            kind = draw(st.sampled_from(["full", "one", "part", "zero"]))
            nqs.append({"full": nk, "one": 1, "zero": 0}.get(kind) or draw(st.integers(1, nk)))
        return nks, nqs
    kind = draw(st.sampled_from(["full", "one", "part"]))
    m = min(nks)
    Nq = {"full": m, "one": 1}.get(kind) or draw(st.integers(1, m))
    return nks, [Nq] * S


@st.composite
def problems(draw, device):
    packed = draw(st.booleans())
    nks, nqs = _lengths(draw, packed)
    Hk = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 4]))
    dtypes = _dtypes(device)
    return dict(nks=nks, nqs=nqs, packed=packed, H=Hk * G, Hk=Hk,
                D=draw(st.sampled_from(_head_dims(device))),
                page_size=draw(st.sampled_from([1, 3, 16])),
                bs=draw(st.sampled_from([16, 32, 64])),
                dtype=dtypes[draw(st.integers(0, len(dtypes) - 1))],
                layout=draw(st.sampled_from(_layouts(device))),
                seed=draw(st.integers(0, 2**16)),
                density=draw(st.sampled_from([0.3, 0.7, 1.0])))


# ---------------------------------------------------------------------------------------------
# block_sparse_attention_paged
# ---------------------------------------------------------------------------------------------


def check_bsa(p: Problem, scale=None, causal=True):
    out, lse = _bsa(*p.attn_args(), scale, causal, p.cu)
    assert out.shape == p.q.shape and out.dtype == p.q.dtype
    assert lse.shape == (p.q.shape[0], p.H, p.q.shape[1]) and lse.dtype == torch.float32
    # == the contiguous op on the gathered K/V, sequence by sequence (same code, same order)
    for s in range(p.S):
        qs = p.q_rows(s)
        ks, vs = p.kv(s)
        nbq_s = -(-qs.shape[1] // p.bs)
        o, l = torch.ops.tasksieve.block_sparse_attention.default(
            qs, ks, vs, p.idx[s:s + 1, :, :nbq_s].contiguous(),
            p.cnt[s:s + 1, :, :nbq_s].contiguous(), p.bs, scale, causal)
        if p.packed:
            a = int(p.cu[s])
            got_o, got_l = out[:, a:a + qs.shape[1]], lse[:, :, a:a + qs.shape[1]]
        else:
            got_o, got_l = out[s:s + 1], lse[s:s + 1]
        if p.q.device.type == "cpu":
            assert torch.equal(got_o, o), f"sequence {s}: out differs from the contiguous op"
            assert torch.equal(got_l, l), f"sequence {s}: lse differs from the contiguous op"
        else:  # different loads, same WMMA math: at most a rounding of the output apart
            torch.testing.assert_close(got_o, o)
            torch.testing.assert_close(got_l, l)
    # == the reference
    ref_out, ref_lse = reference_block_sparse_attention_paged(*p.attn_args(), scale, causal,
                                                              p.cu)
    assert ref_out.shape == out.shape and ref_lse.shape == lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    if p.q.dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)
    else:
        f32 = (p.q.float(), p.k.float(), p.v.float())
        gt_out, gt_lse = reference_block_sparse_attention_paged(*f32, *p.attn_args()[3:], scale,
                                                                causal, p.cu)
        low_out, _ = reference_block_sparse_attention_paged(*p.attn_args(), scale, causal, p.cu,
                                                            dtype=p.q.dtype)
        base = (low_out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        err = (out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        assert err <= 2 * base + 1e-3, (err, base)
        torch.testing.assert_close(lse[fin], gt_lse[fin], atol=2e-2, rtol=1e-2)
    empty = ~fin.transpose(1, 2)
    assert (out[empty] == 0).all()
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data(), causal=st.booleans())
def test_bsa_paged_random(device, data, causal):
    requires_kernel(BSA, device)
    kw = data.draw(problems(device))
    density = kw.pop("density")
    p = Problem(**kw, device=device, density=density)
    check_bsa(p, None, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["cpu_attn", "flash_attn", "kv_concat"])
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_bsa_paged_fixed(device, layout, page_size):
    """Every dtype; dense (nq = nk for the shortest sequence) and packed (nq = nk, nq = 1, no
    queries, nq < nk) with sequences that are not multiples of the page or the block."""
    requires_kernel(BSA, device)
    _skip_layout(device, layout)
    D = _head_dims(device)[-1]
    for i, dtype in enumerate(_dtypes(device)):
        bs = [16, 32, 64][i % 3]
        check_bsa(Problem([70, 45, 100], [45] * 3, False, 8, 2, D, page_size, bs, dtype,
                          layout, device, seed=10 + i), 0.2, True)
        check_bsa(Problem([70, 45, 100, 9], [70, 1, 0, 5], True, 8, 2, D, page_size, bs, dtype,
                          layout, device, seed=20 + i), None, True)


@pytest.mark.parametrize("device", DEVICES)
def test_bsa_paged_shared_prefix_pages(device):
    """Two sequences that share their first pages (a reused prefix) read the same memory."""
    requires_kernel(BSA, device)
    D, dtype = _head_dims(device)[0], _dtypes(device)[0]
    p = Problem([40, 40], [8, 8], False, 4, 2, D, 16, 16, dtype, "flash_attn", device, seed=3)
    p.block_table[1, :2] = p.block_table[0, :2]
    out, _ = check_bsa(p)
    p.idx[1] = p.idx[0]
    p.cnt[1] = p.cnt[0]
    p.block_table[1, 2] = p.block_table[0, 2]
    p.q[1] = p.q[0]
    out, lse = _bsa(*p.attn_args())
    assert torch.equal(out[0], out[1]) and torch.equal(lse[0], lse[1])


@pytest.mark.parametrize("device", DEVICES)
def test_bsa_paged_wrapper_and_empty(device):
    requires_kernel(BSA, device)
    D, dtype = _head_dims(device)[0], _dtypes(device)[0]
    p = Problem([30, 17], [2, 17], True, 4, 2, D, 3, 16, dtype, "cpu_attn", device, seed=5)
    a = ops.block_sparse_attention_paged(*p.attn_args(), cu_seqlens_q=p.cu)
    b = _bsa(*p.attn_args(), None, True, p.cu)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # no queries at all (dense Nq = 0) and no sequences
    p0 = Problem([5, 9], [0, 0], False, 4, 2, D, 3, 16, dtype, "cpu_attn", device, seed=6)
    out, lse = _bsa(*p0.attn_args())
    assert out.shape == (2, 0, 4, D) and lse.shape == (2, 4, 0)
    z = torch.zeros(1, dtype=torch.int32, device=device)
    q = torch.zeros(1, 0, 4, D, dtype=dtype, device=device)
    out, lse = _bsa(q, p.k, p.v, p.block_table[:0], p.seq_lens[:0], p.idx[:0], p.cnt[:0], 16,
                    None, True, z)
    assert out.shape == (1, 0, 4, D) and lse.shape == (1, 4, 0)


def _bsa_bad_cases(device):
    dtype = _dtypes(device)[0]
    D = _head_dims(device)[0]
    p = Problem([40, 20], [20, 20], False, 4, 2, D, 16, 16, dtype, "flash_attn", device, seed=0,
                extra_rows=0)
    pk = Problem([40, 20, 3], [5, 20, 0], True, 4, 2, D, 16, 16, dtype, "flash_attn", device,
                 seed=1, extra_rows=0)
    q, k, v, bt, sl, idx, cnt, bs = p.attn_args()
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16

    def t(vals):
        return torch.tensor(vals, dtype=torch.int32, device=device)

    cases = [
        ("q must be a 4-D", (q[0], k, v, bt, sl, idx, cnt, bs)),
        ("k_cache must be a 4-D", (q, k[0], v, bt, sl, idx, cnt, bs)),
        ("v_cache must be a 4-D", (q, k, v[0], bt, sl, idx, cnt, bs)),
        ("q must be float", (q.double(), k, v, bt, sl, idx, cnt, bs)),
        ("k_cache must have the dtype of q", (q, k.to(other), v, bt, sl, idx, cnt, bs)),
        ("v_cache must have the dtype of q", (q, k, v.to(other), bt, sl, idx, cnt, bs)),
        ("block_table must be int32", (q, k, v, bt.long(), sl, idx, cnt, bs)),
        ("block_table must be a 2-D tensor", (q, k, v, bt[0], sl, idx, cnt, bs)),
        ("seq_lens_k must be int32", (q, k, v, bt, sl.long(), idx, cnt, bs)),
        ("seq_lens_k must have shape \\[S\\] = \\[2\\]", (q, k, v, bt, sl[:1], idx, cnt, bs)),
        ("q must have one batch row per sequence", (q[:1], k, v, bt, sl, idx[:1], cnt[:1], bs)),
        ("k_cache head dim must equal", (q, k[..., :8], v[..., :8], bt, sl, idx, cnt, bs)),
        ("k_cache heads Hk must be >= 1 and divide",
         (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), bt, sl, idx,
          cnt, bs)),
        ("v_cache must have the shape of k_cache", (q, k, v[:-1], bt, sl, idx, cnt, bs)),
        ("q must have a contiguous last dim",
         (q.transpose(1, 3).contiguous().transpose(1, 3), k, v, bt, sl, idx, cnt, bs)),
        ("block_size must be 16, 32, 64 or 128", (q, k, v, bt, sl, idx, cnt, 24)),
        ("block_idx must be int32", (q, k, v, bt, sl, idx.long(), cnt, bs)),
        ("block_cnt must be int32", (q, k, v, bt, sl, idx, cnt.long(), bs)),
        ("block_idx must have shape \\[S, H, nbq, max_k\\]",
         (q, k, v, bt, sl, idx[:, :, :1], cnt, bs)),
        ("block_cnt must have shape", (q, k, v, bt, sl, idx, cnt[..., :1], bs)),
        ("cu_seqlens_q must be int32",
         pk.attn_args() + (None, True, pk.cu.long())),
        ("cu_seqlens_q must have shape \\[S \\+ 1\\] = \\[4\\]",
         pk.attn_args() + (None, True, pk.cu[:-1])),
        ("q must have batch size 1 with cu_seqlens_q",
         (torch.cat([pk.q, pk.q]),) + pk.attn_args()[1:] + (None, True, pk.cu)),
        ("block_idx must have shape \\[S, H, nbq_max, max_k\\]",
         pk.attn_args()[:5] + (pk.idx[:2], pk.cnt[:2], 16, None, True, pk.cu)),
    ]
    if device == "cpu":
        bad_bt = bt.clone()
        bad_bt[1, 0] = k.shape[0]  # sequence 1 reads page 0 of its table
        neg_bt = bt.clone()
        neg_bt[0, 2] = -1
        cap = bt.shape[1] * k.shape[1]
        bad_cnt, bad_idx, cnt1 = cnt.clone(), idx.clone(), cnt.clone()
        bad_cnt[1, 2, 1] = idx.shape[-1] + 1
        bad_idx[1, 0, 0, 0] = 2  # sequence 1: nk = 20 -> nbk = 2
        cnt1[1, 0, 0] = max(1, int(cnt1[1, 0, 0]))
        cases += [
            (f"seq_lens_k\\[1\\]={cap + 1} must be in \\[0, max_pages \\* page_size = {cap}\\]",
             (q, k, v, bt, t([40, cap + 1]), idx, cnt, bs)),
            ("seq_lens_k\\[0\\]=-1 must be in", (q, k, v, bt, t([-1, 20]), idx, cnt, bs)),
            (f"block_table\\[1, 0\\]={k.shape[0]} must be a page of k_cache in "
             f"\\[0, num_pages={k.shape[0]}\\) \\(sequence 1 reads its first 2 pages\\)",
             (q, k, v, bad_bt, sl, idx, cnt, bs)),
            ("block_table\\[0, 2\\]=-1 must be a page", (q, k, v, neg_bt, sl, idx, cnt, bs)),
            ("q length Nq=20 must be <= seq_lens_k\\[1\\]=19",
             (q, k, v, bt, t([40, 19]), idx, cnt, bs)),
            ("block_cnt values must be in \\[0, max_k=3\\], got 4 at sequence 1 head 2 query "
             "block 1", (q, k, v, bt, sl, idx, bad_cnt, bs)),
            ("block_idx values must be in \\[0, nbk=2\\) of sequence 1.*got 2 at sequence 1 head "
             "0 query block 0 entry 0", (q, k, v, bt, sl, bad_idx, cnt1, bs)),
            ("cu_seqlens_q\\[0\\] must be 0", pk.attn_args() + (None, True, t([1, 5, 25, 25]))),
            ("cu_seqlens_q must be non-decreasing.*cu_seqlens_q\\[2\\]=4 < cu_seqlens_q\\[1\\]=5",
             pk.attn_args() + (None, True, t([0, 5, 4, 25]))),
            ("cu_seqlens_q\\[-1\\] must equal the packed length \\(dim 1 of q = 25\\)",
             pk.attn_args() + (None, True, t([0, 5, 24, 24]))),
            ("sequence 2 has nq=4 queries > seq_lens_k\\[2\\]=3 keys",
             pk.attn_args() + (None, True, t([0, 1, 21, 25]))),
            ("block_idx dim 2 \\(nbq_max=1\\) must be >= ceil\\(nq / block_size\\)=2 of sequence 1",
             pk.attn_args()[:5] + (pk.idx[:, :, :1], pk.cnt[:, :, :1], 16, None, True, pk.cu)),
            ("scale must be finite", (q, k, v, bt, sl, idx, cnt, bs, float("inf"))),
        ]
    else:
        cases += [("k_cache must be on the device of q", (q, k.cpu(), v, bt, sl, idx, cnt, bs)),
                  ("block_table must be on the device of q",
                   (q, k, v, bt.cpu(), sl, idx, cnt, bs)),
                  ("seq_lens_k must be on the device of q", (q, k, v, bt, sl.cpu(), idx, cnt, bs)),
                  ("q must be float16 or bfloat16", (q.float(), k.float(), v.float(), bt, sl,
                                                     idx, cnt, bs))]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_bsa_paged_bad_inputs_name_the_argument(device):
    requires_kernel(BSA, device)
    for msg, args in _bsa_bad_cases(device):
        with pytest.raises(RuntimeError, match=f"tasksieve.{BSA}: .*" + msg):
            _bsa(*args)
        if device == "cpu":
            with pytest.raises(RuntimeError, match=f"tasksieve.{BSA}: .*" + msg):
                reference_block_sparse_attention_paged(*args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_bsa_paged_malformed_values_stay_in_bounds():
    """The CUDA op cannot validate without a host sync: page ids and lengths are clamped, bad
    columns skipped. Malformed values must not fault; outputs stay finite."""
    requires_kernel(BSA, "cuda")
    p = Problem([40, 20, 3], [5, 20, 0], True, 4, 2, 64, 16, 16, torch.bfloat16, "flash_attn",
                "cuda", seed=1)
    bt = p.block_table.clone()
    bt[0, 0], bt[1, 1] = -7, 10**6

    def t(vals):
        return torch.tensor(vals, dtype=torch.int32, device="cuda")

    for table, lens, cu in [(bt, p.seq_lens, p.cu), (p.block_table, t([10**9, -4, 3]), p.cu),
                            (p.block_table, p.seq_lens, t([-9, 30, 2, 10**9]))]:
        out, lse = _bsa(p.q, p.k, p.v, table, lens, p.idx, p.cnt, 16, None, True, cu)
        torch.cuda.synchronize()
        assert torch.isfinite(out.float()).all()


def test_bsa_paged_meta_fake_shapes():
    q = torch.empty(3, 100, 8, 64, device="meta", dtype=torch.bfloat16)
    kc = torch.empty(50, 16, 2, 64, device="meta", dtype=torch.bfloat16)
    bt = torch.empty(3, 20, device="meta", dtype=torch.int32)
    sl = torch.empty(3, device="meta", dtype=torch.int32)
    idx = torch.empty(3, 8, 2, 5, device="meta", dtype=torch.int32)
    cnt = torch.empty(3, 8, 2, device="meta", dtype=torch.int32)
    out, lse = ops.block_sparse_attention_paged(q, kc, kc, bt, sl, idx, cnt, 64)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (3, 8, 100)
    v, s, e = ops.flex_estimate_paged(q, kc, bt, sl, 64)
    assert v.shape == s.shape == e.shape == (3, 8, 5) and v.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# flex_estimate_paged
# ---------------------------------------------------------------------------------------------


def check_est(p: Problem, scale=None):
    outs = _est(*p.est_args(), scale, p.cu)
    nb_max = -(-(p.block_table.shape[1] * p.k.shape[1]) // p.bs)
    for o in outs:
        assert o.shape == (p.S, p.H, nb_max) and o.dtype == torch.float32
    for s in range(p.S):
        ks, _ = p.kv(s)
        nb_s = -(-p.nks[s] // p.bs)
        want = torch.ops.tasksieve.flex_estimate.default(p.q_rows(s), ks, p.bs, scale)
        for name, o, w in zip(("vertical", "slash", "estimate"), outs, want):
            if p.q.device.type == "cpu":
                assert torch.equal(o[s, :, :nb_s], w[0]), f"{name} of sequence {s}"
            else:
                torch.testing.assert_close(o[s, :, :nb_s], w[0], atol=1e-6, rtol=1e-5)
            assert (o[s, :, nb_s:] == 0).all(), f"{name} of sequence {s} past nb_s"
    ref = reference_flex_estimate_paged(*p.est_args(), scale, p.cu)
    for name, o, r in zip(("vertical", "slash", "estimate"), outs, ref):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4, msg=name)
    return outs


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data(), use_scale=st.booleans())
def test_est_paged_random(device, data, use_scale):
    requires_kernel(EST, device)
    kw = data.draw(problems(device))
    kw.pop("density")
    if device == "cpu":
        kw["bs"] = data.draw(st.sampled_from([16, 32, 64, 5]))  # CPU: any block size
    p = Problem(**kw, device=device)
    check_est(p, 0.3 if use_scale else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["cpu_attn", "flash_attn", "kv_concat"])
def test_est_paged_fixed(device, layout):
    requires_kernel(EST, device)
    _skip_layout(device, layout)
    D = _head_dims(device)[-1]
    for i, dtype in enumerate(_dtypes(device)):
        for page_size in (1, 3, 16):
            check_est(Problem([70, 45, 100], [45] * 3, False, 8, 2, D, page_size, 32, dtype,
                              layout, device, seed=i))
            check_est(Problem([70, 45, 100, 9, 1], [70, 1, 0, 5, 1], True, 4, 1, D, page_size,
                              16, dtype, layout, device, seed=7 + i))


def _est_bad_cases(device):
    dtype = _dtypes(device)[0]
    D = _head_dims(device)[0]
    p = Problem([40, 20], [20, 20], False, 4, 2, D, 16, 16, dtype, "flash_attn", device, seed=0)
    pk = Problem([40, 20, 3], [5, 20, 0], True, 4, 2, D, 16, 16, dtype, "flash_attn", device,
                 seed=1)
    q, k, bt, sl, bs = p.est_args()

    def t(vals):
        return torch.tensor(vals, dtype=torch.int32, device=device)

    cases = [
        ("q must be a 4-D", (q[0], k, bt, sl, bs)),
        ("k_cache must be a 4-D", (q, k[0], bt, sl, bs)),
        ("k_cache must have the dtype of q", (q, k.double(), bt, sl, bs)),
        ("block_table must be int32", (q, k, bt.float(), sl, bs)),
        ("seq_lens_k must have shape", (q, k, bt, sl[:1], bs)),
        ("q must have one batch row per sequence", (q[:1], k, bt, sl, bs)),
        ("k_cache heads Hk must be >= 1 and divide",
         (q, k[:, :, :1].expand(-1, -1, 3, -1), bt, sl, bs)),
        ("cu_seqlens_q must have shape", pk.est_args() + (None, pk.cu[:2])),
        ("q must have batch size 1 with cu_seqlens_q",
         (torch.cat([pk.q, pk.q]),) + pk.est_args()[1:] + (None, pk.cu)),
    ]
    if device == "cpu":
        bad_bt = bt.clone()
        bad_bt[0, 1] = 10**6
        cases += [
            ("block_size must be >= 1", (q, k, bt, sl, 0)),
            ("scale must be finite", (q, k, bt, sl, bs, float("nan"))),
            ("seq_lens_k\\[0\\]=1000 must be in", (q, k, bt, t([1000, 20]), bs)),
            ("block_table\\[0, 1\\]=1000000 must be a page", (q, k, bad_bt, sl, bs)),
            ("q length Nq=20 must be <= seq_lens_k\\[0\\]=7", (q, k, bt, t([7, 20]), bs)),
            ("sequence 2 has nq=4 queries > seq_lens_k\\[2\\]=3 keys",
             pk.est_args() + (None, t([0, 1, 21, 25]))),
            ("cu_seqlens_q\\[-1\\] must equal", pk.est_args() + (None, t([0, 5, 25, 26]))),
        ]
    else:
        cases += [("block_size must be 16, 32, 64 or 128 on CUDA", (q, k, bt, sl, 24))]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_est_paged_bad_inputs_name_the_argument(device):
    requires_kernel(EST, device)
    for msg, args in _est_bad_cases(device):
        with pytest.raises(RuntimeError, match=f"tasksieve.{EST}: .*" + msg):
            _est(*args)
        if device == "cpu":
            with pytest.raises(RuntimeError, match=f"tasksieve.{EST}: .*" + msg):
                reference_flex_estimate_paged(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_est_paged_wrapper(device):
    requires_kernel(EST, device)
    p = Problem([30, 17], [2, 17], True, 4, 2, _head_dims(device)[0], 3, 16,
                _dtypes(device)[0], _layouts(device)[0], device, seed=5)
    a = ops.flex_estimate_paged(*p.est_args(), cu_seqlens_q=p.cu)
    b = _est(*p.est_args(), None, p.cu)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# paged_kv_views
# ---------------------------------------------------------------------------------------------


def test_paged_kv_views_layouts():
    P, Hk, D, n = 3, 2, 4, 5
    # cpu_attn (vLLM CPU, vec/vec16 kernels): per (page, head) K transposed ([D, P]), then V rows
    # ([P, D]); both accepted shapes give the same views, no copy
    cache = torch.arange(n * Hk * P * 2 * D, dtype=torch.float32).view(n, Hk, P, 2 * D)
    k, v = ops.paged_kv_views(cache, "cpu_attn", P, Hk, D)
    k2, v2 = ops.paged_kv_views(cache.view(n, Hk, 2 * P, D), "cpu_attn", P, Hk, D)
    assert k.shape == v.shape == (n, P, Hk, D) and torch.equal(k, k2) and torch.equal(v, v2)
    flat = cache.view(n, Hk, 2 * P * D)
    for pg in range(n):
        for r in range(P):
            for h in range(Hk):
                for d in range(D):
                    assert k[pg, r, h, d] == flat[pg, h, d * P + r]
                    assert v[pg, r, h, d] == flat[pg, h, P * D + r * D + d]
    assert k.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    # flash_attn: [2, pages, page, Hk, D]
    fc = torch.randn(2, n, P, Hk, D)
    k, v = ops.paged_kv_views(fc, "flash_attn", P, Hk, D)
    assert torch.equal(k, fc[0]) and torch.equal(v, fc[1]) and k.data_ptr() == fc.data_ptr()
    # kv_concat (vLLM 0.32 GPU): logical [pages, Hk, page, 2D], any physical order
    for phys in (torch.randn(n, Hk, P, 2 * D), torch.randn(n, P, Hk, 2 * D).transpose(1, 2)):
        k, v = ops.paged_kv_views(phys, "kv_concat", P, Hk, D)
        assert k.stride(3) == 1 and k.data_ptr() == phys.data_ptr()
        for pg in range(n):
            for r in range(P):
                for h in range(Hk):
                    assert torch.equal(k[pg, r, h], phys[pg, h, r, :D])
                    assert torch.equal(v[pg, r, h], phys[pg, h, r, D:])


def test_paged_ops_read_vllm_cpu_pages_as_written():
    """Pages filled the way vLLM CPU's vec kernels write them (key row j, dim d of head h at
    d * P + j of the page's K half; value rows after), read back by both ops: the same results as
    the same keys and values in plain [pages, P, Hk, D] tensors."""
    g = torch.Generator().manual_seed(3)
    n, P, Hk, D, H, bs = 4, 16, 2, 32, 4, 16
    keys = torch.randn(n, P, Hk, D, generator=g)
    vals = torch.randn(n, P, Hk, D, generator=g)
    cache = torch.empty(n, Hk, 2 * P * D)
    cache[:, :, :P * D] = keys.permute(0, 2, 3, 1).reshape(n, Hk, D * P)
    cache[:, :, P * D:] = vals.permute(0, 2, 1, 3).reshape(n, Hk, P * D)
    kc, vc = ops.paged_kv_views(cache.view(n, Hk, P, 2 * D), "cpu_attn", P, Hk, D)
    assert torch.equal(kc, keys) and torch.equal(vc, vals)
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    lens = torch.tensor([40], dtype=torch.int32)
    q = torch.randn(1, 24, H, D, generator=g)
    idx = torch.arange(3, dtype=torch.int32).expand(1, H, 2, 3).contiguous()
    cnt = torch.tensor([2, 3], dtype=torch.int32).expand(1, H, 2).contiguous()
    got = ops.block_sparse_attention_paged(q, kc, vc, table, lens, idx, cnt, bs)
    want = ops.block_sparse_attention_paged(q, keys, vals, table, lens, idx, cnt, bs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    got = ops.flex_estimate_paged(q, kc, table, lens, bs)
    want = ops.flex_estimate_paged(q, keys, table, lens, bs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.cuda
def test_cuda_rejects_strided_cache_rows():
    """The CUDA ops load 16-byte vectors along D: a cache with a strided last dim (vLLM CPU's
    transposed K pages) is refused by name, not read wrongly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    requires_kernel(BSA, "cuda")
    n, P, Hk, D, H = 2, 16, 2, 64, 4
    cache = torch.randn(n, Hk, P, 2 * D, device="cuda", dtype=torch.float16)
    kc, vc = ops.paged_kv_views(cache, "cpu_attn", P, Hk, D)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([20], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 4, H, D, device="cuda", dtype=torch.float16)
    idx = torch.zeros(1, H, 1, 2, dtype=torch.int32, device="cuda")
    cnt = torch.ones(1, H, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="k_cache must have a contiguous last dim on CUDA"):
        ops.block_sparse_attention_paged(q, kc, vc, table, lens, idx, cnt, 16)
    with pytest.raises(RuntimeError, match="k_cache must have a contiguous last dim on CUDA"):
        ops.flex_estimate_paged(q, kc, table, lens, 16)


def test_paged_kv_views_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        ops.paged_kv_views(torch.zeros(2, 1, 3, 2, 4), "vllm", 3, 2, 4)
    with pytest.raises(ValueError, match="'flash_attn' cache must have shape"):
        ops.paged_kv_views(torch.zeros(2, 1, 3, 2, 4), "flash_attn", 4, 2, 4)
    with pytest.raises(ValueError, match="'cpu_attn' cache must have shape"):
        ops.paged_kv_views(torch.zeros(1, 2, 3, 4), "cpu_attn", 3, 2, 4)
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        ops.paged_kv_views(torch.zeros(1, 2, 3, 8), "cpu_attn", 0, 2, 4)
    with pytest.raises(TypeError, match="cache must be a tensor"):
        ops.paged_kv_views([1], "cpu_attn", 1, 1, 1)


def test_paged_views_feed_the_ops_without_copies():
    """The views go to the ops as they are (strided); the contiguous copies give the same."""
    p = Problem([33, 20], [20, 20], False, 4, 2, 16, 16, 16, torch.float32, "cpu_attn", "cpu",
                seed=9)
    assert not p.k.is_contiguous()
    a = _bsa(*p.attn_args())
    b = _bsa(p.q, p.k.contiguous(), p.v.contiguous(), *p.attn_args()[3:])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ea = _est(*p.est_args())
    eb = _est(p.q, p.k.contiguous(), *p.est_args()[2:])
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))


def test_reference_gathers_like_the_contiguous_reference():
    """The paged reference on a cache holding one sequence in order is the contiguous one."""
    p = Problem([50], [50], False, 4, 2, 16, 16, 16, torch.float32, "flash_attn", "cpu", seed=2)
    ks, vs = p.kv(0)
    a = reference_block_sparse_attention_paged(*p.attn_args())
    b = reference_block_sparse_attention(p.q, ks, vs, p.idx, p.cnt, p.bs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
