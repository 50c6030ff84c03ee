"""WindowKV ops (window_scores, select_windows, gather_windows, gather_windows_): kernels vs the
pure-PyTorch references in tasksieve.reference, hand-computed cases, and bad-input errors.

CPU always; the same cases on CUDA when a GPU is visible (``device`` parametrization).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, requires_kernel
from hypothesis import given
from hypothesis import strategies as st
from tasksieve import ops
from tasksieve import reference as ref
from tasksieve.ops import _loader

LOW_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32,) + LOW_DTYPES


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32, device="cpu", amp=1.0):
    return (torch.randn(shape, generator=gen) * amp).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases: the references and the kernels must reproduce numbers worked out on paper.
# ---------------------------------------------------------------------------------------------

# One query (A=1, D=1, scale=1, q=1) at position 4 of N=5 tokens, window 2 -> nw = 2 windows
# ([0, 1], [2, 3]); token 4 is the tail. Logits = k = log([1, 2, 3, 1, 2]) so the softmax is
# [1, 2, 3, 1, 2] / 9. A second query head of the same KV head has q=0: uniform 1/5.
_HAND_K = torch.log(torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0])).view(1, 5, 1, 1)
_HAND_Q = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_window_scores_hand(device, impl):
    requires_kernel("window_scores", device)
    fn = ops.window_scores if impl == "op" else ref.reference_window_scores
    q, k = _HAND_Q.to(device), _HAND_K.to(device)
    # reduce="max" (kt = 1): head 0 -> [2/9, 3/9], head 1 -> [1/5, 1/5]; mean over the 2 heads.
    out = fn(q, k, 2, "max", 1.0)
    expect = torch.tensor([[[(2 / 9 + 0.2) / 2, (3 / 9 + 0.2) / 2]]])
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2) and out.is_contiguous()
    # reduce="mean": head 0 -> [1.5/9, 2/9].
    out = fn(q, k, 2, "mean", 1.0)
    expect = torch.tensor([[[(1.5 / 9 + 0.2) / 2, (2 / 9 + 0.2) / 2]]])
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=1e-6)
    # kv_start = 1: key 0 masked (score 0); head 0 -> [2, 3, 1, 2] / 8, head 1 -> 1/4 each.
    start = torch.tensor([1], dtype=torch.int32, device=device)
    out = fn(q, k, 2, "max", 1.0, start)
    expect = torch.tensor([[[(2 / 8 + 0.25) / 2, (3 / 8 + 0.25) / 2]]])
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=1e-6)
    out = fn(q, k, 2, "mean", 1.0, start)
    expect = torch.tensor([[[(1 / 8 + 0.125) / 2, (2 / 8 + 0.25) / 2]]])
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=1e-6)
    # Default scale is 1/sqrt(D) = 1 for D = 1.
    torch.testing.assert_close(fn(q, k, 2, "max"), fn(q, k, 2, "max", 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_select_windows_hand(device, impl):
    requires_kernel("select_windows", device)
    fn = ops.select_windows if impl == "op" else ref.reference_select_windows
    s = torch.tensor([[[0.1, 0.5, 0.3, 0.5, float("nan")]]], device=device)
    as_list = lambda t: t.cpu().tolist()[0][0]  # noqa: E731
    assert as_list(fn(s, 1)) == [1]  # tie 0.5 / 0.5 -> lower index
    assert as_list(fn(s, 2)) == [1, 3]
    assert as_list(fn(s, 3)) == [1, 2, 3]
    assert as_list(fn(s, 4)) == [0, 1, 2, 3]  # NaN ranks last (as -inf)
    assert as_list(fn(s, 9)) == [0, 1, 2, 3, 4]  # keep >= nw: everything, clamped
    assert fn(s, 0).shape == (1, 1, 0)
    out = fn(s, 9)
    assert out.dtype == torch.int32 and out.shape == (1, 1, 5) and out.is_contiguous()
    # share: means over 2 heads are [0.5, 0.25, 0.5] -> a tie between windows 0 and 2.
    s2 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]], device=device)
    assert fn(s2, 1, True).cpu().tolist() == [[[0], [0]]]
    assert fn(s2, 2, True).cpu().tolist() == [[[0, 2], [0, 2]]]
    assert fn(s2, 1, False).cpu().tolist() == [[[0], [2]]]
    # Empty review region.
    assert fn(torch.empty(2, 3, 0, device=device), 4).shape == (2, 3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_gather_windows_hand(device, impl):
    requires_kernel("gather_windows", device)
    gather = ops.gather_windows if impl == "op" else ref.reference_gather_windows
    gather_ = ops.gather_windows_ if impl == "op" else ref.reference_gather_windows_
    N, D = 10, 2
    k = torch.arange(N * D, dtype=torch.float32, device=device).view(1, 1, N, D)
    v = -k[..., :1].clone()  # different head dim
    # window 2, windows 3 and 1, then the last 2 tokens: rows 6, 7, 2, 3, 8, 9.
    idx = torch.tensor([[[3, 1]]], dtype=torch.int32, device=device)
    out_k, out_v = gather([k, v], idx, 2, 2)
    rows = [6, 7, 2, 3, 8, 9]
    assert out_k.cpu().tolist() == [[[[2.0 * r, 2.0 * r + 1] for r in rows]]]
    assert out_v.cpu().tolist() == [[[[-2.0 * r] for r in rows]]]
    assert out_k.is_contiguous() and out_k.shape == (1, 1, 6, 2) and out_v.shape == (1, 1, 6, 1)
    # In place, ascending windows 1 and 3: rows 2, 3, 6, 7, 8, 9; rows 6.. left as they were.
    idx = torch.tensor([[[1, 3]]], dtype=torch.int32, device=device)
    kk, vv = k.clone(), v.clone()
    assert gather_([kk, vv], idx, 2, 2) is None
    rows = [2, 3, 6, 7, 8, 9] + [6, 7, 8, 9]
    assert kk.cpu().tolist() == [[[[2.0 * r, 2.0 * r + 1] for r in rows]]]
    assert vv.cpu().tolist() == [[[[-2.0 * r] for r in rows]]]
    # keep = 0: only the tail; tail = 0: only windows.
    empty = torch.empty(1, 1, 0, dtype=torch.int32, device=device)
    tail_only = [[[[2.0 * r, 2.0 * r + 1] for r in (7, 8, 9)]]]
    assert gather([k], empty, 2, 3)[0].cpu().tolist() == tail_only
    assert gather([k], idx, 2, 0)[0].shape == (1, 1, 4, 2)


# ---------------------------------------------------------------------------------------------
# window_scores vs the reference on random shapes
# ---------------------------------------------------------------------------------------------


@st.composite
def score_cases(draw):
    N = draw(st.integers(1, 90))
    return dict(
        B=draw(st.integers(1, 3)),
        Hk=draw(st.sampled_from([1, 2, 3])),
        G=draw(st.sampled_from([1, 2, 3, 4, 8])),
        D=draw(st.sampled_from([8, 16, 64])),
        window=draw(st.sampled_from([1, 3, 8, 16])),
        N=N,
        A=draw(st.one_of(st.just(1), st.just(N), st.integers(1, N))),
        reduce=draw(st.sampled_from(["max", "mean"])),
        dtype=draw(st.sampled_from(DTYPES)),
        k_layout=draw(st.sampled_from(["bnhd", "hf"])),  # hf: [B, Hk, N, D].transpose(1, 2)
        q_layout=draw(st.sampled_from(["contiguous", "strided"])),
        kv_start=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.05, 0.3])),
        amp=draw(st.sampled_from([1.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _score_inputs(c, device):
    g = _gen(c["seed"])
    B, N, A, Hk, D = c["B"], c["N"], c["A"], c["Hk"], c["D"]
    H = Hk * c["G"]
    if c["q_layout"] == "contiguous":
        q = _randn((B, A, H, D), g, c["dtype"], device, c["amp"])
    else:  # [B, H, A, D] viewed as [B, A, H, D]: strided A/H dims, contiguous D
        q = _randn((B, H, A, D), g, c["dtype"], device, c["amp"]).transpose(1, 2)
    if c["k_layout"] == "bnhd":
        k = _randn((B, N, Hk, D), g, c["dtype"], device, c["amp"])
    else:
        k = _randn((B, Hk, N, D), g, c["dtype"], device, c["amp"]).transpose(1, 2)
    start = None
    if c["kv_start"]:
        start = torch.randint(0, N - A + 1, (B,), generator=g, dtype=torch.int32).to(device)
    return q, k, start


def _check_scores(c, device):
    q, k, start = _score_inputs(c, device)
    args = (c["window"], c["reduce"], c["scale"], start)
    out = ops.window_scores(q, k, *args)
    nw = ops.window_count(c["N"], c["A"], c["window"])
    assert out.shape == (c["B"], c["Hk"], nw) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.device == q.device
    # Same inputs, fp64 math: only the kernel's fp32 rounding differs (any input dtype).
    exact = ref.reference_window_scores(q, k, *args, compute_dtype=torch.float64)
    torch.testing.assert_close(out, exact, rtol=2e-5, atol=2e-6)
    if c["dtype"] in LOW_DTYPES and nw > 0:
        # Against fp32 inputs: the kernel's error stays within 2x the error of plain PyTorch in
        # the low dtype (flash-attention's error-relative test), plus the dtype's rounding noise.
        qf, kf = q.float(), k.float()
        gold = ref.reference_window_scores(qf, kf, *args, compute_dtype=torch.float64)
        torch_low = ref.reference_window_scores(q, k, *args, compute_dtype=c["dtype"])
        low = gold.to(c["dtype"])
        noise = 2 * ((low + 0.3 - 0.3).double() - gold).abs().max()
        assert (out - gold).abs().max() <= 2 * (torch_low.double() - gold).abs().max() + noise
    return out, exact


def _assert_same_selection(sel, sel_ref, scores_ref, share, tol):
    """sel == sel_ref wherever the reference scores are not tied within tol at the cut."""
    if torch.equal(sel, sel_ref):
        return
    rank = scores_ref.mean(dim=1, keepdim=True).expand_as(scores_ref) if share else scores_ref
    kk = sel.shape[-1]
    for b in range(sel.shape[0]):
        for h in range(sel.shape[1]):
            a, r = set(sel[b, h].tolist()), set(sel_ref[b, h].tolist())
            if a == r:
                continue
            cut = rank[b, h].sort(descending=True).values[kk - 1]
            for m in a ^ r:
                assert abs(float(rank[b, h, m]) - float(cut)) <= tol, (
                    f"selection differs at [{b}, {h}]: {sorted(a)} vs {sorted(r)}, not a near-tie")


@pytest.mark.parametrize("device", DEVICES)
@given(c=score_cases())
def test_window_scores_random(device, c):
    requires_kernel("window_scores", device)
    out, exact = _check_scores(c, device)
    # The selection from the kernel's scores matches the reference's except at near-ties.
    nw = out.shape[-1]
    for share in (False, True):
        keep = max(0, nw // 2)
        sel = ops.select_windows(out, keep, share)
        sel_ref = ref.reference_select_windows(exact.float(), keep, share)
        tol = 1e-4 * (1 + float(exact.abs().max())) if nw else 0.0
        _assert_same_selection(sel.cpu(), sel_ref.cpu(), exact.cpu(), share, tol)


# Shapes that cross the kernel's internal blocks: several 64-key blocks and 512-key chunks in
# both passes, windows longer than a block (100) and than a chunk (700), left padding that
# masks whole blocks, and the [B, Hk, N, D] HF layout.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "N,A,window,G,start",
    [(1300, 40, 8, 4, 0), (1300, 40, 3, 2, 777), (1537, 1, 100, 1, 130), (1500, 33, 700, 3, 65),
     (800, 600, 16, 2, 0), (1100, 64, 16, 8, 1036)],
)
def test_window_scores_large(device, N, A, window, G, start):
    requires_kernel("window_scores", device)
    for reduce, dtype in (("max", torch.float32), ("mean", torch.bfloat16)):
        c = dict(B=2, Hk=2, G=G, D=64, window=window, N=N, A=A, reduce=reduce, dtype=dtype,
                 k_layout="hf", q_layout="contiguous", kv_start=False, scale=None, amp=2.0, seed=N)
        q, k, _ = _score_inputs(c, device)
        s = torch.tensor([start, 0], dtype=torch.int32, device=device)
        out = ops.window_scores(q, k, window, reduce, None, s)
        exact = ref.reference_window_scores(q, k, window, reduce, None, s,
                                            compute_dtype=torch.float64)
        torch.testing.assert_close(out, exact, rtol=2e-5, atol=2e-6)
        if start >= window:
            assert (out[0, :, : start // window] == 0).all()  # fully masked windows score 0


@pytest.mark.parametrize("device", DEVICES)
def test_window_scores_edges(device):
    requires_kernel("window_scores", device)
    g = _gen(0)
    # One-token sequence: A = N = 1 -> no window.
    q, k = _randn((2, 1, 4, 8), g, device=device), _randn((2, 1, 2, 8), g, device=device)
    assert ops.window_scores(q, k, 1, "max").shape == (2, 2, 0)
    # window > N - A -> nw = 0; window = N - A exactly -> one window.
    q, k = _randn((1, 3, 2, 8), g, device=device), _randn((1, 11, 2, 8), g, device=device)
    assert ops.window_scores(q, k, 9, "max").shape == (1, 2, 0)
    assert ops.window_scores(q, k, 8, "mean").shape == (1, 2, 1)
    # window = 1 with reduce max (kt = 1) equals reduce mean.
    torch.testing.assert_close(ops.window_scores(q, k, 1, "max"),
                               ops.window_scores(q, k, 1, "mean"))
    # Batch 0.
    q0, k0 = q[:0], k[:0]
    assert ops.window_scores(q0, k0, 2, "max").shape == (0, 2, 4)
    # The total attention mass of the A queries over the review region is at most A per head.
    q, k = _randn((1, 4, 4, 16), g, device=device), _randn((1, 64, 4, 16), g, device=device)
    s = ops.window_scores(q, k, 1, "mean")
    assert float(s.sum(-1).max()) <= 4 + 1e-4


# ---------------------------------------------------------------------------------------------
# select_windows vs the reference: exact, ties and NaN included
# ---------------------------------------------------------------------------------------------


@st.composite
def select_cases(draw):
    nw = draw(st.integers(0, 40))
    return dict(
        B=draw(st.integers(1, 3)),
        Hk=draw(st.integers(1, 4)),
        nw=nw,
        keep=draw(st.integers(0, nw + 3)),
        share=draw(st.booleans()),
        kind=draw(st.sampled_from(["continuous", "ties", "special"])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(c=select_cases())
def test_select_windows_random(device, c):
    requires_kernel("select_windows", device)
    g = _gen(c["seed"])
    B, Hk, nw = c["B"], c["Hk"], c["nw"]
    if c["kind"] == "continuous":
        s = torch.rand(B, nw, Hk, generator=g)
    elif c["kind"] == "ties":
        s = torch.randint(0, 4, (B, nw, Hk), generator=g).float()
    else:
        s = torch.randn(B, nw, Hk, generator=g)
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
        pick = torch.randint(0, 8, (B, nw, Hk), generator=g)
        s = torch.where(pick < 4, special[pick.clamp(max=3)], s)
    s = s.to(device)
    s = s.transpose(1, 2) if c["strided"] else s.transpose(1, 2).contiguous()
    out = ops.select_windows(s, c["keep"], c["share"])
    expect = ref.reference_select_windows(s, c["keep"], c["share"])
    kk = min(c["keep"], nw)
    assert out.shape == (B, Hk, kk) and out.dtype == torch.int32 and out.is_contiguous()
    assert torch.equal(out.cpu(), expect.cpu())
    if kk > 1:
        assert (out[..., 1:] > out[..., :-1]).all()
    if c["share"]:
        assert (out == out[:, :1]).all()


# ---------------------------------------------------------------------------------------------
# gather_windows / gather_windows_ vs the reference: exact copies
# ---------------------------------------------------------------------------------------------


@st.composite
def gather_cases(draw, inplace):
    N = draw(st.integers(0, 60))
    window = draw(st.sampled_from([1, 3, 8, 16]))
    tail = draw(st.integers(0, N))
    limit = (N - tail) // window
    if inplace:
        keep = draw(st.integers(0, limit))
    else:
        keep = draw(st.integers(0, limit + 2)) if limit > 0 else 0
    return dict(
        B=draw(st.integers(1, 3)),
        Hk=draw(st.integers(1, 3)),
        N=N,
        window=window,
        tail=tail,
        limit=limit,
        keep=keep,
        Ds=draw(st.lists(st.sampled_from([1, 8, 16, 64]), min_size=1, max_size=3)),
        dtype=draw(st.sampled_from(DTYPES + (torch.int32,))),
        layout=draw(st.sampled_from(["contiguous", "bnhd", "padded"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _gather_inputs(c, device, inplace):
    g = _gen(c["seed"])
    B, Hk, N = c["B"], c["Hk"], c["N"]
    kv = []
    for D in c["Ds"]:
        if c["layout"] == "contiguous":
            t = torch.randn(B, Hk, N, D, generator=g)
        elif c["layout"] == "bnhd":  # [B, N, Hk, D] viewed as [B, Hk, N, D]: row stride Hk*D
            t = torch.randn(B, N, Hk, D, generator=g).transpose(1, 2)
        else:  # rows padded: stride(2) = D + 3
            t = torch.randn(B, Hk, N, D + 3, generator=g)[..., :D]
        t = (t * 100).to(c["dtype"]) if c["dtype"] == torch.int32 else t.to(c["dtype"])
        kv.append(t.to(device))
    if inplace:
        rows = [torch.randperm(c["limit"], generator=g)[: c["keep"]].sort().values
                for _ in range(B * Hk)]
        idx = torch.stack(rows).view(B, Hk, c["keep"]) if rows else torch.empty(B, Hk, 0)
    else:
        idx = torch.randint(0, max(c["limit"], 1), (B, Hk, c["keep"]), generator=g)
    return kv, idx.to(torch.int32).to(device)


@pytest.mark.parametrize("device", DEVICES)
@given(c=gather_cases(inplace=False))
def test_gather_windows_random(device, c):
    requires_kernel("gather_windows", device)
    kv, idx = _gather_inputs(c, device, inplace=False)
    before = [t.clone() for t in kv]
    out = ops.gather_windows(kv, idx, c["window"], c["tail"])
    expect = ref.reference_gather_windows(kv, idx, c["window"], c["tail"])
    L = c["keep"] * c["window"] + c["tail"]
    assert isinstance(out, list) and len(out) == len(kv)
    for o, e, t, b in zip(out, expect, kv, before):
        assert o.shape == (c["B"], c["Hk"], L, t.shape[3])
        assert o.dtype == t.dtype and o.is_contiguous()
        assert torch.equal(o, e)
        assert torch.equal(t, b)  # inputs untouched


@pytest.mark.parametrize("device", DEVICES)
@given(c=gather_cases(inplace=True))
def test_gather_windows_inplace_random(device, c):
    requires_kernel("gather_windows_", device)
    kv, idx = _gather_inputs(c, device, inplace=True)
    mine = [t.clone() for t in kv]
    theirs = [t.clone() for t in kv]
    expect = ref.reference_gather_windows(kv, idx, c["window"], c["tail"])
    assert ops.gather_windows_(mine, idx, c["window"], c["tail"]) is None
    ref.reference_gather_windows_(theirs, idx, c["window"], c["tail"])
    L = c["keep"] * c["window"] + c["tail"]
    for m, t, e, orig in zip(mine, theirs, expect, kv):
        assert torch.equal(m[:, :, :L], e)
        assert torch.equal(t[:, :, :L], e)
        if device == "cpu":  # the CPU kernel writes nothing past L
            assert torch.equal(m[:, :, L:], orig[:, :, L:])


def test_gather_windows_matches_select_pipeline(seed):
    """The documented flow: score -> select (per head and shared) -> gather K and V of a group."""
    g = _gen(seed)
    B, A, H, Hk, N, D, w = 2, 4, 8, 2, 50, 16, 4
    q = _randn((B, A, H, D), g)
    caches = [_randn((B, Hk, N, D), g) for _ in range(4)]
    scores = ops.window_scores(q, caches[0].transpose(1, 2), w, "max")
    tail = N - ops.window_count(N, A, w) * w
    for share in (False, True):
        idx = ops.select_windows(scores, 5, share)
        out = ops.gather_windows(caches, idx, w, tail)
        assert torch.equal(out[1], ref.reference_gather_windows([caches[1]], idx, w, tail)[0])
        inplace = [t.clone() for t in caches]
        ops.gather_windows_(inplace, idx, w, tail)
        for o, t in zip(out, inplace):
            assert torch.equal(o, t[:, :, : o.shape[2]])


def test_window_count():
    assert ops.window_count(100, 10, 8) == 11
    assert ops.window_count(5, 5, 1) == 0
    assert ops.window_count(5, 1, 8) == 0
    with pytest.raises(ValueError, match="window"):
        ops.window_count(5, 1, 0)


# ---------------------------------------------------------------------------------------------
# Bad input: every check raises a RuntimeError naming the argument, through the kernel and
# through the reference alike.
# ---------------------------------------------------------------------------------------------


def _q(B=1, A=2, H=4, D=8, dtype=torch.float32):
    return torch.randn(B, A, H, D, dtype=dtype)


def _k(B=1, N=10, Hk=2, D=8, dtype=torch.float32):
    return torch.randn(B, N, Hk, D, dtype=dtype)


def _i32(*vals, shape=None):
    t = torch.tensor(vals, dtype=torch.int32)
    return t.view(shape) if shape is not None else t


F64 = torch.float64
_KV = lambda N=10, D=4: torch.randn(1, 2, N, D)  # noqa: E731
_IDX = lambda *v: torch.tensor(v, dtype=torch.int32).view(1, 2, -1)  # noqa: E731

# (op, args, message regex). Every TORCH_CHECK of csrc/cpu/kv_window.cpp has a case.
BAD_INPUTS = [
    # window_scores
    ("window_scores", lambda: (_q()[0], _k(), 2, "max"), r"q_obs must be a 4-D tensor"),
    ("window_scores", lambda: (_q(), _k()[0], 2, "max"), r"k must be a 4-D tensor"),
    ("window_scores", lambda: (_q(dtype=F64), _k(dtype=F64), 2, "max"),
     r"q_obs must be float32, float16 or bfloat16"),
    ("window_scores", lambda: (_q(), _k(dtype=torch.float16), 2, "max"),
     r"k must have the dtype of q_obs"),
    ("window_scores", lambda: (_q(B=2), _k(B=1), 2, "max"), r"k must have the batch size of q_obs"),
    ("window_scores", lambda: (_q(D=257), _k(D=257), 2, "max"),
     r"q_obs head dim D must be in \[1, 256\]"),
    ("window_scores", lambda: (_q(D=8), _k(D=16), 2, "max"),
     r"k head dim must equal q_obs head dim"),
    ("window_scores", lambda: (_q(H=3), _k(Hk=2), 2, "max"), r"k heads Hk must be >= 1 and divide"),
    ("window_scores", lambda: (_q(H=4), _k(Hk=0), 2, "max"), r"k heads Hk must be >= 1"),
    ("window_scores", lambda: (torch.randn(1, 2, 4, 8, 2)[..., 0], _k(), 2, "max"),
     r"q_obs must be contiguous in the last dim"),
    ("window_scores", lambda: (_q(), torch.randn(1, 10, 2, 8, 2)[..., 0], 2, "max"),
     r"k must be contiguous in the last dim"),
    ("window_scores", lambda: (_q(A=11), _k(N=10), 2, "max"),
     r"q_obs length A must be in \[1, N=10\]"),
    ("window_scores", lambda: (_q(A=0), _k(N=10), 2, "max"), r"q_obs length A must be in"),
    ("window_scores", lambda: (_q(), _k(), 0, "max"), r"window must be >= 1"),
    ("window_scores", lambda: (_q(), _k(), 2, "sum"), r"reduce must be 'max' or 'mean'"),
    ("window_scores", lambda: (_q(), _k(), 2, "max", float("nan")), r"scale must be finite"),
    ("window_scores", lambda: (_q(), _k(), 2, "max", None, torch.zeros(1, dtype=torch.int64)),
     r"kv_start must be int32"),
    ("window_scores", lambda: (_q(), _k(), 2, "max", None, _i32(0, 0)),
     r"kv_start must have shape \[B\]"),
    ("window_scores", lambda: (_q(), _k(), 2, "max", None, _i32(0, shape=(1, 1))),
     r"kv_start must have shape \[B\]"),
    ("window_scores", lambda: (_q(A=2), _k(N=10), 2, "max", None, _i32(9)),
     r"kv_start values must be in \[0, N - A\] = \[0, 8\]"),
    ("window_scores", lambda: (_q(), _k(), 2, "max", None, _i32(-1)),
     r"kv_start values must be in"),
    # select_windows
    ("select_windows", lambda: (torch.rand(2, 5), 2, False), r"scores must be a 3-D tensor"),
    ("select_windows", lambda: (torch.rand(1, 2, 5, dtype=F64), 2, False),
     r"scores must be float32"),
    ("select_windows", lambda: (torch.rand(1, 2, 5), -1, True), r"keep must be >= 0"),
    # gather_windows
    ("gather_windows", lambda: ([], _IDX(0, 1), 2, 0), r"kv must be a non-empty list"),
    ("gather_windows", lambda: ([_KV(), _KV()[0]], _IDX(0, 1), 2, 0),
     r"kv\[1\] must be a 4-D tensor"),
    ("gather_windows", lambda: ([_KV(), _KV(N=9)], _IDX(0, 1), 2, 0),
     r"kv\[1\] must have the \[B, Hk, N\] of kv\[0\]"),
    ("gather_windows", lambda: ([_KV(), _KV().half()], _IDX(0, 1), 2, 0),
     r"kv\[1\] must have the dtype of kv\[0\]"),
    ("gather_windows", lambda: ([torch.randn(1, 2, 10, 4, 2)[..., 0]], _IDX(0, 1), 2, 0),
     r"kv\[0\] must be contiguous in the last dim"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1).view(2, 1), 2, 0), r"idx must be a 3-D tensor"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1).long(), 2, 0), r"idx must be int32"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1).view(1, 1, 2), 2, 0),
     r"idx must have shape \[B, Hk, keep\]"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1), 0, 0), r"window must be >= 1"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1), 2, -1),
     r"tail must be in \[0, N\] = \[0, 10\]"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, 1), 2, 11), r"tail must be in \[0, N\]"),
    ("gather_windows", lambda: ([_KV()], _IDX(0, -1), 2, 0),
     r"idx values must satisfy .* idx\[0, 1, 0\] = -1"),
    # N=10, window 3, tail 2: windows 0 and 1 fit (v*3 + 3 <= 8), window 2 does not.
    ("gather_windows", lambda: ([_KV()], _IDX(1, 2), 3, 2),
     r"idx values must satisfy .* idx\[0, 1, 0\] = 2"),
    # gather_windows_ (the same checks, plus strictly ascending rows)
    ("gather_windows_", lambda: ([], _IDX(0, 1), 2, 0), r"kv must be a non-empty list"),
    ("gather_windows_", lambda: ([_KV(), _KV().half()], _IDX(0, 1), 2, 0),
     r"kv\[1\] must have the dtype"),
    ("gather_windows_", lambda: ([_KV()], _IDX(0, 1).long(), 2, 0), r"idx must be int32"),
    ("gather_windows_", lambda: ([_KV()], _IDX(0, 1), 2, 11), r"tail must be in"),
    ("gather_windows_", lambda: ([_KV()], _IDX(0, 5, 1, 2), 2, 0), r"idx values must satisfy"),
    ("gather_windows_", lambda: ([_KV()], _IDX(0, 1, 2, 2), 2, 0),
     r"idx must be strictly ascending .* idx\[0, 1, 0\] = 2 then 2"),
    ("gather_windows_", lambda: ([_KV()], _IDX(0, 1, 3, 1), 2, 0),
     r"idx must be strictly ascending"),
]


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize(
    "op,make,pattern", BAD_INPUTS, ids=[f"{o}-{p[:30]}" for o, _, p in BAD_INPUTS]
)
def test_bad_input(op, make, pattern, impl):
    requires_kernel(op, "cpu")
    # the reference checks its arguments like the kernel: same errors
    fn = getattr(ops, op) if impl == "kernel" else getattr(ref, f"reference_{op}")
    args = make()
    kv_before = [t.clone() for t in args[0]] if op == "gather_windows_" else None
    with pytest.raises(RuntimeError, match=rf"tasksieve\.{op}: {pattern}"):
        fn(*args)
    if kv_before is not None:  # a rejected in-place call writes nothing
        assert all(torch.equal(a, b) for a, b in zip(args[0], kv_before))


@pytest.mark.parametrize("op", ["gather_windows", "gather_windows_"])
def test_gather_rejects_a_lone_tensor(op):
    with pytest.raises(RuntimeError, match=rf"tasksieve\.{op}: kv must be a list of tensors"):
        getattr(ops, op)(_KV(), _IDX(0, 1), 2, 0)


def test_reference_matches_kernel(seed):
    """The reference gives the kernel's results through the whole score -> select -> gather chain."""
    g = _gen(seed)
    q, k = _randn((2, 6, 4, 16), g), _randn((2, 40, 2, 16), g)
    kv = [_randn((2, 2, 40, 16), g), _randn((2, 2, 40, 8), g)]
    start = _i32(0, 5)
    got = {}
    for impl, lib, prefix in (("kernel", ops, ""), ("reference", ref, "reference_")):
        s = getattr(lib, prefix + "window_scores")(q, k, 4, "max", None, start)
        idx = getattr(lib, prefix + "select_windows")(s, 3, False)
        out = getattr(lib, prefix + "gather_windows")(kv, idx, 4, 6)
        kv2 = [t.clone() for t in kv]
        getattr(lib, prefix + "gather_windows_")(kv2, idx, 4, 6)
        got[impl] = (s, idx, out, kv2)
    a, b = got["kernel"], got["reference"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a visible GPU")
def test_device_mismatch_cuda():
    requires_kernel("window_scores", "cuda")
    with pytest.raises(RuntimeError, match=r"tasksieve\.window_scores: (k|q_obs|kv_start)"):
        ops.window_scores(_q().cuda(), _k(), 2, "max")
    with pytest.raises(RuntimeError, match=r"tasksieve\.window_scores: kv_start"):
        ops.window_scores(_q().cuda(), _k().cuda(), 2, "max", None, _i32(0))
    with pytest.raises(RuntimeError, match=r"tasksieve\.gather_windows: (idx|kv)"):
        ops.gather_windows([_KV().cuda()], _IDX(0, 1), 2, 0)


def test_reference_imports_only_torch():
    """The reference is the ground truth: it must work without the extension and transformers, and
    share no code with the ops it checks (relative imports stay inside the reference package)."""
    mods = set()
    for path in Path(ref.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mods.add("." * node.level if node.level else node.module.split(".")[0])
    assert mods <= {"__future__", "math", "typing", "torch", "."}, mods


def test_no_kernel_is_an_error_naming_op_and_device(monkeypatch):
    """Without a kernel for the input's device the wrapper raises; it never runs other code."""
    monkeypatch.setattr(_loader, "KERNELS", {("window_scores", "CUDA"): True})
    with pytest.raises(RuntimeError, match=r"tasksieve\.window_scores: no kernel for device 'cpu' "
                                           r"\(built: cuda\)"):
        ops.window_scores(_q(), _k(), 2, "max")
    monkeypatch.setattr(_loader, "KERNELS", {})
    with pytest.raises(RuntimeError, match=r"tasksieve\.select_windows: no kernel for device 'cpu' "
                                           r"\(built: none\)"):
        ops.select_windows(torch.rand(1, 2, 5), 2)


# ---------------------------------------------------------------------------------------------
# Regressions (issue 10).
# ---------------------------------------------------------------------------------------------


def test_window_scores_rejects_zero_query_heads():
    """H = 0 query heads with Hk >= 1 used to pass the checks (0 % Hk == 0): the CPU kernel then
    divided by zero (SIGFPE, the interpreter dies) and CUDA returned a bare "invalid argument".
    A subprocess, so that the crash fails this test instead of killing the session."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom tasksieve import ops\n"
        "try:\n"
        "    ops.window_scores(torch.randn(1, 2, 0, 8), torch.randn(1, 10, 2, 8), 2, 'max')\n"
        "    print('NO ERROR')\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the interpreter died (exit {r.returncode}): {r.stderr[-2000:]}"
    assert "tasksieve.window_scores: q_obs heads H must be >= 1, got H=0" in r.stdout, r.stdout
    with pytest.raises(RuntimeError, match=r"tasksieve\.window_scores: q_obs heads H must be >= 1"):
        ops.window_scores(torch.randn(0, 2, 0, 8), torch.randn(0, 10, 2, 8), 2, "max")  # B = 0 too
    with pytest.raises(RuntimeError, match=r"tasksieve\.window_scores: q_obs heads H must be >= 1"):
        ref.reference_window_scores(torch.randn(1, 2, 0, 8), torch.randn(1, 10, 2, 8), 2, "max")


def test_gather_windows_inplace_rejects_overlapping_entries():
    """Two entries of the in-place gather that share bytes race (each is compacted on its own);
    any overlap is refused, not only identical data pointers; disjoint views are fine."""
    idx = _IDX(0, 2, 1, 3)
    buf = torch.randn(1, 2, 12, 4)
    a, b = buf[:, :, :10], buf[:, :, 2:]  # rows 2..9 of buf are in both
    before = buf.clone()
    with pytest.raises(RuntimeError, match=r"tasksieve\.gather_windows_: kv\[0\] and kv\[1\] "
                                           r"must not overlap in memory"):
        ops.gather_windows_([a, b], idx, 2, 1)
    assert torch.equal(buf, before)  # nothing written
    with pytest.raises(RuntimeError, match=r"kv\[0\] and kv\[2\] must not overlap"):
        ops.gather_windows_([buf[:, :, :10], torch.randn(1, 2, 10, 4), buf[:, :, :10]], idx, 2, 1)
    with pytest.raises(RuntimeError, match=r"kv\[0\] and kv\[1\] must not overlap"):
        c = torch.randn(1, 2, 10, 8)  # last dims overlap by one element: [0, 5) and [4, 8)
        ops.gather_windows_([c[..., :5], c[..., 4:]], idx, 2, 1)
    # disjoint views of one buffer: a fused [.., 2D] K|V cache split in the last dim (their
    # extents interleave but no byte is shared), two head slices, a gap between column ranges
    fused, heads, gap = torch.randn(1, 2, 10, 8), torch.randn(1, 4, 10, 4), torch.randn(1, 2, 10, 8)
    for views, i in (([fused[..., :4], fused[..., 4:]], idx),
                     ([heads[:, :2], heads[:, 2:]], idx),
                     ([gap[..., :3], gap[..., 5:]], idx)):
        expect = ref.reference_gather_windows([v.clone() for v in views], i, 2, 1)
        ops.gather_windows_(views, i, 2, 1)
        for v, e in zip(views, expect):
            assert torch.equal(v[:, :, :5], e)
