"""block_sparse_attention: the compiled op (CPU always, CUDA when visible) against the dense
masked fp32 reference (tasksieve.reference.reference_block_sparse_attention).

Low-precision rule (flash-attention's): the op's max error vs the fp32 reference must be within
2x the max error of the same math done in plain torch in the low dtype, plus a small atol.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, requires_kernel
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import ops
from tasksieve.reference import block_sparse_allowed_mask, reference_block_sparse_attention

OP = "block_sparse_attention"


def _op(*args, **kwargs):
    return torch.ops.tasksieve.block_sparse_attention.default(*args, **kwargs)


def _dtypes(device):
    return [torch.float32, torch.bfloat16, torch.float16] if device == "cpu" else [
        torch.bfloat16, torch.float16]


def _head_dims(device):
    return [16, 64] if device == "cpu" else [64, 128]


def make_inputs(B, Nq, Nk, H, Hk, D, bs, dtype, device, seed, *, density=0.5, strided=False,
                full=False, garbage=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g)
    if strided:  # HF cache layout [B, Hk, N, D] viewed as [B, N, Hk, D]
        k = torch.randn(B, Hk, Nk, D, generator=g).transpose(1, 2)
        v = torch.randn(B, Hk, Nk, D, generator=g).transpose(1, 2)
    else:
        k = torch.randn(B, Nk, Hk, D, generator=g)
        v = torch.randn(B, Nk, Hk, D, generator=g)
    nbq, nbk = -(-Nq // bs), -(-Nk // bs)
    max_k = nbk
    rows = []
    cnts = []
    for _ in range(B * H * nbq):
        if full:
            sel = torch.arange(nbk)
        else:
            keep = torch.rand(nbk, generator=g) < density
            sel = torch.nonzero(keep).flatten()
        row = torch.full((max_k,), 10**6 if garbage else 0, dtype=torch.int64)  # ignored tail
        row[: len(sel)] = sel
        rows.append(row)
        cnts.append(len(sel))
    idx = (torch.stack(rows) if rows else torch.zeros(0, max_k, dtype=torch.int64))
    idx = idx.view(B, H, nbq, max_k).to(torch.int32)
    cnt = torch.tensor(cnts, dtype=torch.int32).view(B, H, nbq)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            idx.to(**to), cnt.to(**to))


def check_against_reference(q, k, v, idx, cnt, bs, scale=None, causal=True):
    out, lse = _op(q, k, v, idx, cnt, bs, scale, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    ref_out, ref_lse = reference_block_sparse_attention(q, k, v, idx, cnt, bs, scale, causal)
    # lse: -inf exactly where the reference has no visible key.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)
    else:
        # fp32 ground truth of the low-precision inputs vs the same math in the low dtype.
        q32, k32, v32 = q.float(), k.float(), v.float()
        gt_out, gt_lse = reference_block_sparse_attention(q32, k32, v32, idx, cnt, bs, scale,
                                                          causal)
        low_out, _ = reference_block_sparse_attention(q, k, v, idx, cnt, bs, scale, causal,
                                                      dtype=q.dtype)
        base = (low_out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        err = (out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        assert err <= 2 * base + 1e-3, (err, base)
        torch.testing.assert_close(lse[fin], gt_lse[fin], atol=2e-2, rtol=1e-2)
    # rows with no visible key are exactly zero
    empty = ~fin.transpose(1, 2)  # [B, Nq, H]
    assert (out[empty] == 0).all()
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@given(
    B=st.integers(1, 2),
    Hk=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4, 8]),
    bs=st.sampled_from([16, 32, 64]),
    Nk=st.integers(1, 150),
    frac=st.floats(0.0, 1.0),
    causal=st.booleans(),
    density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    di=st.integers(0, 1),
    ti=st.integers(0, 2),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_vs_reference(device, B, Hk, G, bs, Nk, frac, causal, density, di, ti, strided,
                             seed):
    requires_kernel(OP, device)
    dtypes = _dtypes(device)
    dtype = dtypes[ti % len(dtypes)]
    D = _head_dims(device)[di]
    Nq = max(1, int(round(frac * Nk)))
    args = make_inputs(B, Nq, Nk, Hk * G, Hk, D, bs, dtype, device, seed, density=density,
                       strided=strided)
    check_against_reference(*args, bs, None, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Nq,Nk,bs", [(1, 1, 16), (1, 77, 32), (100, 100, 64), (37, 200, 64),
                                      (130, 130, 128), (5, 260, 128)])
def test_fixed_shapes(device, Nq, Nk, bs):
    requires_kernel(OP, device)
    for dtype in _dtypes(device):
        D = _head_dims(device)[-1]
        args = make_inputs(1, Nq, Nk, 8, 2, D, bs, dtype, device, seed=Nq * 1000 + Nk)
        check_against_reference(*args, bs, 0.3, True)


@pytest.mark.parametrize("device", DEVICES)
def test_all_blocks_equal_dense_causal_sdpa(device):
    requires_kernel(OP, device)
    B, Nq, Nk, H, Hk, bs = 2, 45, 70, 8, 2, 16
    D = _head_dims(device)[-1]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, idx, cnt = make_inputs(B, Nq, Nk, H, Hk, D, bs, dtype, device, 5, full=True)
    out, lse = _op(q, k, v, idx, cnt, bs)
    G = H // Hk
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(G, 1), vf.repeat_interleave(G, 1)
    mask = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril(Nk - Nq)  # bottom-right
    expect = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask).transpose(1, 2)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expect, atol=tol, rtol=tol)
    logits = (qf @ kf.transpose(-1, -2)) / math.sqrt(D)
    expect_lse = logits.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expect_lse, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_non_causal(device):
    requires_kernel(OP, device)
    D = _head_dims(device)[0]
    dtype = _dtypes(device)[0]
    q, k, v, idx, cnt = make_inputs(1, 40, 40, 4, 4, D, 16, dtype, device, 9, density=1.0)
    cnt[:, 1] = 0  # head 1: no blocks at all
    cnt[:, 2, 0] = 0  # head 2: first query block empty
    out, lse = check_against_reference(q, k, v, idx, cnt, 16, None, True)
    assert (out[:, :, 1] == 0).all() and torch.isinf(lse[:, 1]).all()
    assert (lse[:, 1] < 0).all()
    assert (out[:, :16, 2] == 0).all()
    # only the block above the diagonal for query block 0: skipped entirely -> empty rows
    idx2 = idx.clone()
    cnt2 = cnt.clone()
    idx2[:, :, 0, 0] = 2
    cnt2[:, :, 0] = 1
    out2, lse2 = check_against_reference(q, k, v, idx2, cnt2, 16, None, True)
    assert torch.isinf(lse2[:, :, :16]).all()
    check_against_reference(q, k, v, idx2, cnt2, 16, None, False)  # non-causal: visible


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_wrapper(device):
    requires_kernel(OP, device)
    D = _head_dims(device)[0]
    dtype = _dtypes(device)[0]
    q, k, v, idx, cnt = make_inputs(0, 8, 8, 2, 1, D, 16, dtype, device, 1)
    out, lse = _op(q, k, v, idx, cnt, 16)
    assert out.shape == (0, 8, 2, D) and lse.shape == (0, 2, 8)
    args = make_inputs(1, 20, 33, 4, 2, D, 16, dtype, device, 3)
    a = ops.block_sparse_attention(*args, 16, None, True)
    b = _op(*args, 16, None, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_meta_fake_shapes():
    q = torch.empty(2, 100, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 300, 2, 64, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(2, 8, 2, 5, device="meta", dtype=torch.int32)
    cnt = torch.empty(2, 8, 2, device="meta", dtype=torch.int32)
    out, lse = ops.block_sparse_attention(q, k, k, idx, cnt, 64)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32


def _bad_cases(device):
    dtype = _dtypes(device)[0]
    D = _head_dims(device)[0]
    q, k, v, idx, cnt = make_inputs(1, 20, 40, 4, 2, D, 16, dtype, device, 0, garbage=False)
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    cases = [
        ("q must be a 4-D", (q[0], k, v, idx, cnt, 16)),
        ("k must be a 4-D", (q, k[0], v, idx, cnt, 16)),
        ("v must be a 4-D", (q, k, v[0], idx, cnt, 16)),
        ("q must be", (q.to(torch.float64), k, v, idx, cnt, 16)),
        ("k must have the dtype of q", (q, k.to(other), v, idx, cnt, 16)),
        ("v must have the dtype of q", (q, k, v.to(other), idx, cnt, 16)),
        ("k must have the batch size", (q, torch.cat([k, k]), torch.cat([v, v]), idx, cnt, 16)),
        ("v must have the shape of k", (q, k, v[:, :-1], idx, cnt, 16)),
        ("k head dim", (q, k[..., :8], v[..., :8], idx, cnt, 16)),
        ("k heads Hk", (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1),
                        idx, cnt, 16)),
        ("q length Nq", (torch.cat([q, q, q], 1), k, v, idx, cnt, 16)),
        ("q must have a contiguous last dim", (q.transpose(1, 3).contiguous().transpose(1, 3),
                                               k, v, idx, cnt, 16)),
        ("block_size", (q, k, v, idx, cnt, 48)),
        ("block_idx must be int32", (q, k, v, idx.long(), cnt, 16)),
        ("block_cnt must be int32", (q, k, v, idx, cnt.long(), 16)),
        ("block_idx must have shape", (q, k, v, idx[:, :, :1], cnt, 16)),
        ("block_cnt must have shape", (q, k, v, idx, cnt[..., :1], 16)),
    ]
    if device == "cpu":
        bad_cnt = cnt.clone()
        bad_cnt[0, 0, 0] = idx.shape[-1] + 1
        bad_idx = idx.clone()
        bad_idx[0, 0, 0, 0] = 3  # nbk = 3
        cnt1 = cnt.clone()
        cnt1[0, 0, 0] = max(1, int(cnt1[0, 0, 0]))
        cases += [("block_cnt values", (q, k, v, idx, bad_cnt, 16)),
                  ("block_idx values", (q, k, v, bad_idx, cnt1, 16)),
                  ("block_cnt values", (q, k, v, idx, -cnt.abs() - 1, 16))]
    else:
        cases += [("q must be float16 or bfloat16", (q.float(), k.float(), v.float(), idx, cnt,
                                                     16)),
                  ("head dim D must be 64 or 128", (q[..., :32], k[..., :32], v[..., :32], idx,
                                                    cnt, 16)),
                  ("k must be on the device of q", (q, k.cpu(), v, idx, cnt, 16)),
                  ("block_idx must be on the device of q", (q, k, v, idx.cpu(), cnt, 16))]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    requires_kernel(OP, device)
    for msg, args in _bad_cases(device):
        with pytest.raises(RuntimeError, match="tasksieve.block_sparse_attention: .*" + msg):
            _op(*args)
        # the reference (the wrappers' fallback) raises the same message
        if device == "cpu":
            with pytest.raises(RuntimeError, match=msg):
                reference_block_sparse_attention(*args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_skips_out_of_range_columns():
    requires_kernel(OP, "cuda")
    q, k, v, idx, cnt = make_inputs(1, 40, 64, 4, 2, 64, 16, torch.bfloat16, "cuda", 2,
                                    density=1.0, garbage=False)
    bad_idx, bad_cnt = idx.clone(), cnt.clone()
    bad_idx[..., -1] = 10**6  # the last listed column is invalid (nbk = 4 -> max_k = 4)
    out, lse = _op(q, k, v, bad_idx, bad_cnt, 16)
    ok_cnt = (cnt - 1).clamp(min=0)  # same rows without the invalid (last) entry
    exp_out, exp_lse = _op(q, k, v, idx, ok_cnt, 16)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)


def test_allowed_mask_helper():
    idx = torch.tensor([[[[0, 2], [1, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    m = block_sparse_allowed_mask(idx, cnt, 4, 6, 2, causal=True)[0, 0]
    # query i at position 2 + i; query block 0 sees key blocks {0, 2}, block 1 sees {1}
    expect = torch.tensor([[1, 1, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0],
                           [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    expect[1, 4] = False
    assert torch.equal(m, expect)


def test_flex_block_mask_helper_matches_grid():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from tasksieve.reference import block_sparse_block_mask

    idx = torch.tensor([[[[0, 0, 0], [0, 1, 0], [0, 2, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2, 2]]], dtype=torch.int32)
    bm = block_sparse_block_mask(idx, cnt, 48, 48, 16)
    dense = bm.to_dense()[0, 0]
    assert torch.equal(dense.bool(), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]]).bool())


# ---------------------------------------------------------------------------------------------
# Packed varlen (cu_seqlens_q / cu_seqlens_k, flash-attn convention)
# ---------------------------------------------------------------------------------------------


def make_varlen_inputs(nqs, nks, H, Hk, D, bs, dtype, device, seed, *, density=0.5,
                       extra_rows=1, garbage=True):
    """S packed sequences (nqs[s] queries, the last of nks[s] keys). block_idx [S, H, nbq_max,
    max_k] lists random causal-or-not key blocks of each sequence; rows past a sequence's query
    blocks (nbq_max has `extra_rows` spare) and entries past the count hold garbage that the op
    must ignore."""
    g = torch.Generator().manual_seed(seed)
    S = len(nqs)
    total_q, total_k = sum(nqs), sum(nks)
    q = torch.randn(1, total_q, H, D, generator=g)
    k = torch.randn(1, total_k, Hk, D, generator=g)
    v = torch.randn(1, total_k, Hk, D, generator=g)
    cu_q = torch.tensor([0] + torch.tensor(nqs).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(nks).cumsum(0).tolist(), dtype=torch.int32)
    nbq_max = max([-(-n // bs) for n in nqs] + [0]) + extra_rows
    max_k = max([-(-n // bs) for n in nks] + [1])
    fill = 10**6 if garbage else 0
    idx = torch.full((S, H, nbq_max, max_k), fill, dtype=torch.int32)
    cnt = torch.full((S, H, nbq_max), -7 if garbage else 0, dtype=torch.int32)
    for s in range(S):
        nbq_s, nbk_s = -(-nqs[s] // bs), -(-nks[s] // bs)
        for h in range(H):
            for r in range(nbq_s):
                sel = torch.nonzero(torch.rand(nbk_s, generator=g) < density).flatten()
                idx[s, h, r, : len(sel)] = sel.to(torch.int32)
                cnt[s, h, r] = len(sel)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            idx.to(**to), cnt.to(**to), cu_q.to(**to), cu_k.to(**to))


def _per_sequence(q, k, v, idx, cnt, cu_q, cu_k, bs, scale, causal, fn):
    """fn (the dense op or reference) on each sequence's slices, concatenated like varlen."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for s in range(len(cq) - 1):
        nbq_s = -(-(cq[s + 1] - cq[s]) // bs)
        o, l = fn(q[:, cq[s]:cq[s + 1]], k[:, ck[s]:ck[s + 1]], v[:, ck[s]:ck[s + 1]],
                  idx[s:s + 1, :, :nbq_s].contiguous(), cnt[s:s + 1, :, :nbq_s].contiguous(),
                  bs, scale, causal)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def check_varlen(q, k, v, idx, cnt, cu_q, cu_k, bs, scale=None, causal=True):
    """varlen op == the dense op per sequence, and within the dense tests' bounds of the
    reference (fp32 tight; low precision: flash-attention's 2x rule)."""
    out, lse = _op(q, k, v, idx, cnt, bs, scale, causal, cu_q, cu_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (1, q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    sep_out, sep_lse = _per_sequence(q, k, v, idx, cnt, cu_q, cu_k, bs, scale, causal, _op)
    assert torch.equal(torch.isinf(lse), torch.isinf(sep_lse))
    fin_sep = torch.isfinite(sep_lse)
    # Same math on the same rows; only BLAS blocking may differ with the data's alignment, which
    # can move a low-precision output by one rounding step (rtol = its epsilon).
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[q.dtype]
    torch.testing.assert_close(out, sep_out, atol=1e-6, rtol=rtol)
    torch.testing.assert_close(lse[fin_sep], sep_lse[fin_sep], atol=1e-6, rtol=1e-6)

    ref_out, ref_lse = reference_block_sparse_attention(q, k, v, idx, cnt, bs, scale, causal,
                                                        cu_q, cu_k)
    assert ref_out.shape == out.shape and ref_lse.shape == lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)
    else:
        gt_out, gt_lse = reference_block_sparse_attention(q.float(), k.float(), v.float(), idx,
                                                          cnt, bs, scale, causal, cu_q, cu_k)
        low_out, _ = reference_block_sparse_attention(q, k, v, idx, cnt, bs, scale, causal,
                                                      cu_q, cu_k, dtype=q.dtype)
        base = (low_out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        err = (out.float() - gt_out).abs().max().item() if gt_out.numel() else 0.0
        assert err <= 2 * base + 1e-3, (err, base)
        torch.testing.assert_close(lse[fin], gt_lse[fin], atol=2e-2, rtol=1e-2)
    empty = ~fin.transpose(1, 2)  # [1, total_q, H]
    assert (out[empty] == 0).all()
    return out, lse


@st.composite
def _seq_lengths(draw):
    """1..4 sequences: nk in [0, 90], nq <= nk (0 often, nq == nk often, else anywhere)."""
    S = draw(st.integers(1, 4))
    nqs, nks = [], []
    for _ in range(S):
        nk = draw(st.integers(0, 90))
        kind = draw(st.sampled_from(["zero", "full", "part"]))
        nq = 0 if kind == "zero" else nk if kind == "full" else draw(st.integers(0, nk))
        nqs.append(nq)
        nks.append(nk)
    return nqs, nks


@pytest.mark.parametrize("device", DEVICES)
@given(
    lengths=_seq_lengths(),
    Hk=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4]),
    bs=st.sampled_from([16, 32]),
    causal=st.booleans(),
    density=st.sampled_from([0.3, 0.7, 1.0]),
    di=st.integers(0, 1),
    ti=st.integers(0, 1),
    extra_rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_varlen_random_vs_per_sequence_and_reference(device, lengths, Hk, G, bs, causal, density,
                                                     di, ti, extra_rows, seed):
    requires_kernel(OP, device)
    nqs, nks = lengths
    dtype = _dtypes(device)[ti]  # CPU: fp32 / bf16; CUDA: bf16 / fp16
    D = _head_dims(device)[di]
    args = make_varlen_inputs(nqs, nks, Hk * G, Hk, D, bs, dtype, device, seed, density=density,
                              extra_rows=extra_rows)
    check_varlen(*args, bs, None, causal)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_fixed_mixed_lengths(device):
    """Zero-length queries, zero-length sequences, nq < nk, lengths not multiples of the block,
    a one-token sequence, every dtype of the device, both head dims."""
    requires_kernel(OP, device)
    nqs = [0, 5, 70, 1, 0, 64]
    nks = [0, 77, 70, 1, 9, 130]
    for dtype in _dtypes(device):
        for D in _head_dims(device):
            args = make_varlen_inputs(nqs, nks, 8, 2, D, 32, dtype, device, seed=D)
            check_varlen(*args, 32, 0.2, True)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equal_lengths_equal_dense_batch(device):
    """B equal-length sequences packed equal the dense op on the [B, ...] batch."""
    requires_kernel(OP, device)
    B, Nq, Nk, H, Hk, bs = 3, 21, 50, 4, 2, 16
    D = _head_dims(device)[-1]
    dtype = _dtypes(device)[0]
    q, k, v, idx, cnt = make_inputs(B, Nq, Nk, H, Hk, D, bs, dtype, device, 11)
    out, lse = _op(q, k, v, idx, cnt, bs)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=device) * Nq
    cu_k = torch.arange(B + 1, dtype=torch.int32, device=device) * Nk
    pout, plse = _op(q.reshape(1, B * Nq, H, D), k.reshape(1, B * Nk, Hk, D),
                     v.reshape(1, B * Nk, Hk, D), idx, cnt, bs, None, True, cu_q, cu_k)
    torch.testing.assert_close(pout.view(B, Nq, H, D), out, atol=1e-6, rtol=1e-5)
    lse_b = plse.view(H, B, Nq).transpose(0, 1)
    assert torch.equal(torch.isinf(lse_b), torch.isinf(lse))
    fin = torch.isfinite(lse)
    torch.testing.assert_close(lse_b[fin], lse[fin], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_no_sequences_and_wrapper(device):
    requires_kernel(OP, device)
    D = _head_dims(device)[0]
    dtype = _dtypes(device)[0]
    z = torch.zeros(1, dtype=torch.int32, device=device)
    q = torch.zeros(1, 0, 2, D, dtype=dtype, device=device)
    idx = torch.zeros(0, 2, 0, 1, dtype=torch.int32, device=device)
    cnt = torch.zeros(0, 2, 0, dtype=torch.int32, device=device)
    out, lse = _op(q, q[:, :, :1], q[:, :, :1], idx, cnt, 16, None, True, z, z)
    assert out.shape == (1, 0, 2, D) and lse.shape == (1, 2, 0)
    args = make_varlen_inputs([3, 0, 17], [40, 2, 17], 4, 2, D, 16, dtype, device, 4)
    a = ops.block_sparse_attention(*args[:5], 16, None, True, *args[5:])
    b = _op(*args[:5], 16, None, True, *args[5:])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ops.block_sparse_attention(*args[:5], 16, cu_seqlens_q=args[5], cu_seqlens_k=args[6])
    assert torch.equal(a[0], c[0])


def test_varlen_meta_fake_shapes():
    q = torch.empty(1, 100, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 300, 2, 64, device="meta", dtype=torch.bfloat16)
    idx = torch.empty(3, 8, 2, 5, device="meta", dtype=torch.int32)
    cnt = torch.empty(3, 8, 2, device="meta", dtype=torch.int32)
    cu = torch.empty(4, device="meta", dtype=torch.int32)
    out, lse = ops.block_sparse_attention(q, k, k, idx, cnt, 64, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (1, 8, 100) and lse.dtype == torch.float32


def _varlen_bad_cases(device):
    dtype = _dtypes(device)[0]
    D = _head_dims(device)[0]
    # nq = [5, 20, 0], nk = [40, 20, 3]; nbq_max = 2 (+0 spare) ; nbk = [3, 2, 1]
    q, k, v, idx, cnt, cu_q, cu_k = make_varlen_inputs([5, 20, 0], [40, 20, 3], 4, 2, D, 16,
                                                       dtype, device, 0, extra_rows=0,
                                                       garbage=False)
    base = (q, k, v, idx, cnt, 16, None, True)

    def with_cu(cq, ck):
        return base + (cq, ck)

    def t(vals):
        return torch.tensor(vals, dtype=torch.int32, device=device)

    cases = [
        ("cu_seqlens_q and cu_seqlens_k must be given together.*only cu_seqlens_q",
         with_cu(cu_q, None)),
        ("cu_seqlens_q and cu_seqlens_k must be given together.*only cu_seqlens_k",
         with_cu(None, cu_k)),
        ("cu_seqlens_q must be int32", with_cu(cu_q.long(), cu_k)),
        ("cu_seqlens_k must be int32", with_cu(cu_q, cu_k.float())),
        ("cu_seqlens_q must be a 1-D tensor", with_cu(cu_q.view(2, 2), cu_k.view(2, 2))),
        ("cu_seqlens_q must be a 1-D tensor", with_cu(cu_q[:0], cu_k[:0])),
        ("cu_seqlens_k must have the shape of cu_seqlens_q", with_cu(cu_q, cu_k[:-1])),
        ("q must have batch size 1 in varlen mode",
         (torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v])) + base[3:] + (cu_q, cu_k)),
        ("block_idx must have shape \\[S, H, nbq_max, max_k\\]",
         (q, k, v, idx[:2], cnt[:2]) + base[5:] + (cu_q, cu_k)),
        ("block_idx must have shape \\[S, H, nbq_max, max_k\\]",
         (q, k, v, idx[:, :2], cnt) + base[5:] + (cu_q, cu_k)),
        ("block_cnt must have shape \\[S, H, nbq_max\\]",
         (q, k, v, idx, cnt[..., :1]) + base[5:] + (cu_q, cu_k)),
    ]
    if device == "cpu":
        bad_cnt = cnt.clone()
        bad_cnt[1, 2, 1] = idx.shape[-1] + 1
        neg_cnt = cnt.clone()
        neg_cnt[0, 0, 0] = -1
        bad_idx, cnt1 = idx.clone(), cnt.clone()
        bad_idx[0, 1, 0, 0] = 3  # sequence 0: nbk = 3
        cnt1[0, 1, 0] = max(1, int(cnt1[0, 1, 0]))
        bad_idx2, cnt2 = idx.clone(), cnt.clone()
        bad_idx2[1, 0, 1, 0] = 2  # sequence 1: nbk = 2 (valid in sequence 0, not here)
        cnt2[1, 0, 1] = max(1, int(cnt2[1, 0, 1]))
        cases += [
            ("cu_seqlens_q\\[0\\] must be 0", with_cu(t([1, 5, 25, 25]), cu_k)),
            ("cu_seqlens_k\\[0\\] must be 0", with_cu(cu_q, t([3, 40, 60, 63]))),
            ("cu_seqlens_q must be non-decreasing.*cu_seqlens_q\\[2\\]=4 < cu_seqlens_q\\[1\\]=5",
             with_cu(t([0, 5, 4, 25]), cu_k)),
            ("cu_seqlens_k must be non-decreasing", with_cu(cu_q, t([0, 40, 63, 60]))),
            ("cu_seqlens_q\\[-1\\] must equal the packed length \\(dim 1 of q = 25\\)",
             with_cu(t([0, 5, 24, 24]), cu_k)),
            ("cu_seqlens_k\\[-1\\] must equal the packed length \\(dim 1 of k = 63\\)",
             with_cu(cu_q, t([0, 40, 60, 62]))),
            ("sequence 1 has nq=20 queries > nk=10 keys",
             with_cu(cu_q, t([0, 40, 50, 63]))),
            ("block_idx dim 2 \\(nbq_max=1\\) must be >= ceil\\(nq / block_size\\)=2 of sequence 1",
             (q, k, v, idx[:, :, :1], cnt[:, :, :1]) + base[5:] + (cu_q, cu_k)),
            ("block_cnt values must be in \\[0, max_k=3\\], got 4 at sequence 1 head 2 query "
             "block 1", (q, k, v, idx, bad_cnt) + base[5:] + (cu_q, cu_k)),
            ("block_cnt values must be in \\[0, max_k=3\\], got -1 at sequence 0",
             (q, k, v, idx, neg_cnt) + base[5:] + (cu_q, cu_k)),
            ("block_idx values must be in \\[0, nbk=3\\) of sequence 0.*got 3 at sequence 0 "
             "head 1 query block 0 entry 0", (q, k, v, bad_idx, cnt1) + base[5:] + (cu_q, cu_k)),
            ("block_idx values must be in \\[0, nbk=2\\) of sequence 1.*got 2 at sequence 1 "
             "head 0 query block 1 entry 0", (q, k, v, bad_idx2, cnt2) + base[5:] + (cu_q, cu_k)),
        ]
    else:
        cases += [("cu_seqlens_q must be on the device of q", with_cu(cu_q.cpu(), cu_k)),
                  ("cu_seqlens_k must be on the device of q", with_cu(cu_q, cu_k.cpu()))]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_bad_inputs_name_the_argument(device):
    requires_kernel(OP, device)
    cases = _varlen_bad_cases(device)
    for msg, args in cases:
        with pytest.raises(RuntimeError, match="tasksieve.block_sparse_attention: .*" + msg):
            _op(*args)
        if device == "cpu":
            with pytest.raises(RuntimeError, match="tasksieve.block_sparse_attention: .*" + msg):
                reference_block_sparse_attention(*args)
    # the well-formed inputs the cases start from are accepted
    q, k, v, idx, cnt, cu_q, cu_k = make_varlen_inputs([5, 20, 0], [40, 20, 3], 4, 2,
                                                       _head_dims(device)[0], 16,
                                                       _dtypes(device)[0], device, 0,
                                                       extra_rows=0, garbage=False)
    check_varlen(q, k, v, idx, cnt, cu_q, cu_k, 16)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_varlen_malformed_values_stay_in_bounds():
    """The CUDA op cannot validate offsets or index values without a host sync: it clamps
    offsets and skips bad columns. Malformed values must neither fault nor touch memory outside
    the tensors; rows no (clamped) sequence covers come out 0 with lse -inf."""
    requires_kernel(OP, "cuda")
    q, k, v, idx, cnt, cu_q, cu_k = make_varlen_inputs([5, 20, 0], [40, 20, 3], 4, 2, 64, 16,
                                                       torch.bfloat16, "cuda", 3, density=1.0,
                                                       extra_rows=0, garbage=False)

    def t(vals):
        return torch.tensor(vals, dtype=torch.int32, device="cuda")

    for cq, ck in [(t([-9, 5, 25, 10**9]), cu_k), (t([0, 25, 3, 25]), t([0, 2**31 - 1, 60, 63])),
                   (cu_q, t([0, 40, 45, 63])), (t([7, 7, 7, 7]), t([-1, -1, -1, -1]))]:
        out, lse = _op(q, k, v, idx, cnt, 16, None, True, cq, ck)
        torch.cuda.synchronize()
        assert out.shape == q.shape and torch.isfinite(out.float()).all()
    # rows of a sequence whose nq exceeds nbq_max * bs (nbq_max too small) are left 0 / -inf
    out, lse = _op(q, k, v, idx[:, :, :1].contiguous(), cnt[:, :, :1].contiguous(), 16, None,
                   True, cu_q, cu_k)
    assert (out[0, 5 + 16:25] == 0).all() and torch.isinf(lse[0, :, 5 + 16:25]).all()
    # out-of-range columns of a well-formed varlen batch are skipped
    bad_idx = idx.clone()
    bad_idx[..., -1] = 10**6  # the last listed column of every full row is invalid
    full = cnt == idx.shape[-1]
    ok_cnt = torch.where(full, cnt - 1, cnt)
    exp_out, exp_lse = _op(q, k, v, idx, ok_cnt, 16, None, True, cu_q, cu_k)
    out, lse = _op(q, k, v, bad_idx, cnt, 16, None, True, cu_q, cu_k)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)
