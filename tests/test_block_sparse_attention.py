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
