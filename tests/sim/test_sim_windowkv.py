"""WindowKV kernels (window_scores, select_windows, gather_windows, gather_windows_) on the
simulator, against the CPU ops on the same inputs (and the fp64 reference for float outputs).
Every test batches its cases into one simulator process (run_many)."""

from __future__ import annotations

import pytest
import torch

import tasksieve.ops as ops
from tasksieve import reference as ref

from .compare import assert_close_tol, assert_equal, assert_fa_close
from .gpusim import run_many
from .sim_windowkv import inplace_views

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# window_scores
# ---------------------------------------------------------------------------------------------
# (B, A, H, Hk, N, D, window, reduce, kv_start, k layout): GQA 1, 2, 3, 4, 8; A = 1 (one
# token), a partial and a second 32-query tile (33); N - A not a multiple of the window;
# several 64-key chunks; head dims 64 and 128 and others (1, 40, 80 = a partial 64-element stage,
# 256 the largest accepted); windows 1 (kt = 1), 5, 16, and 1030 > 1024 (token mass in the
# global workspace instead of shared memory); left padding; nw = 0; an HF [B, Hk, N, D] cache.
SCORE_CASES = [
    (1, 4, 2, 2, 37, 64, 4, "max", None, "bnhd"),
    (2, 3, 4, 2, 70, 64, 5, "mean", [0, 9], "bnhd"),
    (1, 5, 3, 1, 45, 128, 8, "max", [4], "bhnd"),
    (1, 1, 4, 1, 20, 64, 3, "max", None, "bnhd"),
    (1, 33, 8, 1, 90, 16, 16, "max", [20], "bnhd"),
    (1, 6, 8, 8, 50, 40, 7, "mean", None, "bnhd"),
    (2, 2, 2, 1, 19, 80, 1, "max", [0, 17], "bhnd"),
    (1, 2, 1, 1, 30, 1, 6, "mean", None, "bnhd"),
    (1, 3, 2, 1, 29, 256, 10, "max", None, "bnhd"),
    (1, 2, 2, 2, 1033, 8, 1030, "max", [1], "bnhd"),  # two blocks in the global workspace
    (1, 4, 2, 1, 9, 64, 8, "max", None, "bnhd"),  # N - A = 5 < window: nw = 0
    (1, 3, 2, 1, 150, 64, 2, "max", [5], "bnhd"),  # nw = 73: 3 pass-2 blocks of <= 32 windows
]


def _score_inputs(case, dtype, seed):
    B, A, H, Hk, N, D, window, reduce, start, layout = case
    g = _gen(seed)
    q = (torch.randn(B, A, H, D, generator=g) * 1.5).to(dtype)
    if layout == "bhnd":
        k = (torch.randn(B, Hk, N, D, generator=g) * 1.5).to(dtype).transpose(1, 2)
    else:
        k = (torch.randn(B, N, Hk, D, generator=g) * 1.5).to(dtype)
    ks = None if start is None else torch.tensor(start, dtype=torch.int32)
    return q, k, window, reduce, None, ks


def test_window_scores():
    # The first three cases (head dims 64 and 128, GQA 1 and 2, both reductions, left padding,
    # an HF cache layout) run in every dtype; the other shapes, whose awkwardness is index math
    # that does not depend on the dtype, rotate through the dtypes so that the family's
    # simulator time stays within its budget (each still runs in one dtype at least, and every
    # dtype meets several of them).
    calls, inputs = [], []
    for n, case in enumerate(SCORE_CASES):
        dtypes = DTYPES if n < 3 else [DTYPES[n % 3]]
        for dtype in dtypes:
            args = _score_inputs(case, dtype, 100 + n)
            calls.append(("window_scores", args, {}))
            inputs.append((case, args))
    # an explicit scale once
    args = _score_inputs(SCORE_CASES[0], torch.float16, 7)
    args = args[:4] + (0.3,) + args[5:]
    calls.append(("window_scores", args, {}))
    inputs.append((SCORE_CASES[0] + ("scale=0.3",), args))
    # kv_start outside [0, N - A]: the CPU op raises, the CUDA kernel clamps (documented in
    # csrc/cuda/kv_window.cu); compared with the CPU op on the clamped values
    for n, (start, clamped) in enumerate((([50], [33]), ([-7], [0]))):
        q, k, w, red, sc, _ = _score_inputs(SCORE_CASES[0], DTYPES[n], 40 + n)
        calls.append(("window_scores", (q, k, w, red, sc, torch.tensor(start, dtype=torch.int32)),
                      {}))
        args = (q, k, w, red, sc, torch.tensor(clamped, dtype=torch.int32))
        inputs.append((SCORE_CASES[0] + (f"kv_start {start} clamped to {clamped}",), args))
    for (case, args), res in zip(inputs, run_many(calls)):
        (out,) = res.unwrap()
        dtype = args[0].dtype
        # (the fp32 output is recorded under its own dtype by assert_fa_close: name the input's)
        label = f"{str(dtype)[6:]} in: B,A,H,Hk,N,D,w,reduce,start,layout={case}"
        cpu = ops.window_scores(*args)
        assert out.dtype == torch.float32 and out.shape == cpu.shape, label
        q, k, window, reduce, scale, ks = args
        A = q.shape[1]
        # both sides do fp32 math on the same rounded inputs, in different orders (the CPU op:
        # BLAS dots, a 2^x polynomial of ~2 ulp, online softmax per 512-key block; the kernel:
        # 64-element staged dots, expf, per-64-key-chunk stats). A score is a mean of token
        # masses, each a sum of A probabilities <= 1; a probability's relative error is about
        # the logit's absolute error (dot-product rounding, <= ~1e-6 for these |logits| < 40)
        # plus a few ulp, so the two agree to ~A * 2e-6 (observed: <= 5e-7).
        assert_close_tol("window_scores", f"{label} vs CPU op", out, cpu, atol=A * 2e-6,
                         dtype=dtype)
        ref64 = ref.reference_window_scores(q, k, window, reduce, scale, ks,
                                            compute_dtype=torch.float64)
        # the kernel computes in fp32 on the rounded inputs: PyTorch's own fp32 computation of
        # the same formula is the baseline (fp16/bf16 math is not what runs). floor: a few
        # fp32 ulp of a sum of A masses, for outputs the baseline happens to get exact
        same = ref.reference_window_scores(q, k, window, reduce, scale, ks,
                                           compute_dtype=torch.float32)
        assert_fa_close("window_scores", label, out, ref64, same, floor=A * 3e-7, dtype=q.dtype)


# ---------------------------------------------------------------------------------------------
# select_windows: integer output, exactly the CPU op's (same rank rule: higher score first,
# NaN as -inf, ties to the lower index; share ranks by the head-order fp32 mean).
# ---------------------------------------------------------------------------------------------
def _select_cases():
    g = _gen(5)
    cases = []

    def add(label, scores, keep, share):
        cases.append((label, scores, keep, share))

    r = torch.randn(2, 3, 40, generator=g)
    for share in (False, True):
        add("random", r, 7, share)
        add("keep 1", r, 1, share)
        add("keep = nw", r, 40, share)
        add("keep > nw", r, 100, share)
    # ties: few distinct values, every rank boundary lands inside a tie group
    ties = torch.randint(0, 3, (2, 2, 50), generator=g).float()
    for keep in (1, 5, 17, 33):
        add(f"ties keep={keep}", ties, keep, False)
        add(f"ties keep={keep}", ties, keep, True)
    z = torch.zeros(1, 2, 33)
    add("all zero", z, 10, False)
    add("all zero", z, 10, True)
    add("negative zero and zero", torch.tensor([[[0.0, -0.0, 0.0, -0.0, 1e-30, -1e-30]]]), 3, False)
    neg = -torch.rand(1, 2, 30, generator=g) - 1
    add("negative", neg, 9, False)
    add("negative", neg, 9, True)
    nan = torch.randn(1, 3, 37, generator=g)
    nan[0, 0, ::3] = float("nan")
    nan[0, 1, :] = float("nan")
    nan[0, 2, 5] = float("-inf")
    nan[0, 2, 6] = float("inf")
    add("NaN / inf", nan, 12, False)
    add("NaN / inf", nan, 12, True)  # share: a NaN head poisons the mean -> ranks as -inf
    add("NaN rows keep > #finite", nan, 30, False)
    # more than one 256-window block of the compaction scan, nw not a multiple of 256, and a
    # row where every window ties
    big = torch.randn(1, 2, 300, generator=g)
    big[0, 1] = 0.5
    add("nw=300", big, 150, False)
    add("nw=300", big, 257, True)
    add("nw=300 keep 1", big, 1, False)
    add("keep 0", r, 0, False)
    add("nw 0", torch.zeros(1, 2, 0), 3, False)
    add("one window", torch.tensor([[[2.0]], [[float("nan")]]]), 1, False)
    add("subnormal / huge", torch.tensor([[[1e-45, 3e38, -3e38, 1e-38, -1e-45, 3e38]]]), 2, False)
    return cases


def test_select_windows():
    cases = _select_cases()
    results = run_many([("select_windows", (s, k, sh), {}) for _, s, k, sh in cases])
    for (label, s, keep, share), res in zip(cases, results):
        (out,) = res.unwrap()
        cpu = ops.select_windows(s, keep, share)
        assert_equal("select_windows", f"{label} keep={keep} share={share} shape={tuple(s.shape)}",
                     out, cpu, dtype="int32")


# ---------------------------------------------------------------------------------------------
# gather_windows / gather_windows_: exact copies (bytes), equal to the CPU op bit for bit.
# ---------------------------------------------------------------------------------------------
def _make_kv(B, Hk, N, Ds, dtype, layout, g):
    kv = []
    for D in Ds:
        if layout == "contiguous":
            t = torch.randn(B, Hk, N, D, generator=g)
        elif layout == "bnhd":  # [B, N, Hk, D] as [B, Hk, N, D]: row stride Hk*D
            t = torch.randn(B, N, Hk, D, generator=g).transpose(1, 2)
        else:  # padded rows: stride(2) = D + 3 (odd: narrow copy units)
            t = torch.randn(B, Hk, N, D + 3, generator=g)[..., :D]
        kv.append((t * 100).to(torch.int32).to(dtype) if dtype in (torch.int32, torch.uint8)
                  else t.to(dtype))
    return kv


# (B, Hk, N, Ds, window, tail, keep, layout): head dims 64/128 and odd ones, several layers,
# tail 0 and > 0, keep 0 (tail only), windows 1..16 not dividing N.
GATHER_CASES = [
    (1, 2, 37, [64, 64], 4, 5, 3, "contiguous"),
    (2, 3, 50, [128, 128, 64, 64], 8, 0, 4, "bnhd"),
    (1, 1, 20, [3, 5], 3, 2, 2, "padded"),
    (2, 2, 17, [1, 8], 1, 3, 6, "contiguous"),
    (1, 2, 40, [16], 16, 7, 2, "padded"),
    (1, 2, 12, [64], 4, 12, 0, "contiguous"),  # keep 0, the whole sequence is the tail
    (1, 1, 9, [8], 2, 1, 4, "bnhd"),  # keep*window + tail == N
    # L = 146 rows: several row tiles out of place; in place the tail moves 4 rows down onto
    # itself (138 rows, more than one 1024-unit chunk of MoveRows)
    (1, 2, 150, [64], 4, 138, 2, "contiguous"),
]
GATHER_DTYPES = DTYPES + [torch.int32, torch.uint8]


def _gather_cases(inplace):
    g = _gen(11 if inplace else 10)
    out = []
    for n, (B, Hk, N, Ds, window, tail, keep, layout) in enumerate(GATHER_CASES):
        dtype = GATHER_DTYPES[n % len(GATHER_DTYPES)] if n > 1 else None
        for dt in ([dtype] if dtype is not None else DTYPES):
            kv = _make_kv(B, Hk, N, Ds, dt, layout, g)
            limit = (N - tail) // window
            if inplace:
                rows = [torch.randperm(limit, generator=g)[:keep].sort().values
                        for _ in range(B * Hk)]
                idx = torch.stack(rows).view(B, Hk, keep)
            else:  # duplicates and any order are fine out of place
                idx = torch.randint(0, max(limit, 1), (B, Hk, keep), generator=g)
            out.append((f"{(B, Hk, N, Ds, window, tail, keep, layout)} {dt}", kv,
                        idx.to(torch.int32), window, tail))
    # more than 32 tensors in one call: the launcher splits the descriptor list
    kv = _make_kv(1, 2, 10, [4] * 35, torch.float16, "contiguous", g)
    idx = torch.tensor([[[0, 2], [1, 3]]], dtype=torch.int32)
    out.append(("35 tensors", kv, idx, 2, 2))
    return out


def test_gather_windows():
    cases = _gather_cases(inplace=False)
    # the CUDA kernel writes an invalid window index as zeros (the CPU op raises): one case
    kv = _make_kv(1, 2, 10, [8], torch.float32, "contiguous", _gen(3))
    bad = torch.tensor([[[0, 4], [-1, 1]]], dtype=torch.int32)  # 4: 4*2+2 > N - tail = 9
    calls = [("gather_windows", (kv_, idx, w, t), {}) for _, kv_, idx, w, t in cases]
    calls.append(("gather_windows", (kv, bad, 2, 1), {}))
    results = run_many(calls)
    for (label, kv_, idx, w, t), res in zip(cases, results):
        outs = res.unwrap()
        cpu = ops.gather_windows(kv_, idx, w, t)
        assert len(outs) == len(cpu)
        for i, (o, e) in enumerate(zip(outs, cpu)):
            assert_equal("gather_windows", f"{label} kv[{i}]", o, e, dtype=e.dtype)
    (o,) = results[-1].unwrap()
    expect = ref.reference_gather_windows(kv, torch.tensor([[[0, 0], [0, 1]]], dtype=torch.int32),
                                          2, 1)[0]
    expect[0, 0, 2:4] = 0  # window 4 of row 0 and window -1 of row 1: zeros
    expect[0, 1, 0:2] = 0
    assert_equal("gather_windows", "invalid idx -> zeros", o, expect)


def test_gather_windows_inplace():
    cases = _gather_cases(inplace=True)
    # views of one buffer, as the ops accept them: a fused [.., 2D] K|V cache split in the last
    # dim (interleaved rows), and two head ranges of one tensor
    g = _gen(12)
    fused = torch.randn(1, 2, 21, 2 * 64, generator=g).to(torch.bfloat16)
    heads = torch.randn(2, 4, 15, 8, generator=g)
    cases.append(("fused K|V views", [fused[..., :64], fused[..., 64:]],
                  torch.tensor([[[1, 3, 4], [0, 2, 4]]], dtype=torch.int32), 4, 1))
    cases.append(("head-slice views", [heads[:, :2], heads[:, 2:]],
                  torch.tensor([[[0, 5], [2, 3]], [[4, 6], [1, 2]]], dtype=torch.int32), 2, 1))
    cases.append(("identity idx (no move)", [torch.randn(1, 2, 12, 8, generator=g)],
                  torch.tensor([[[0, 1, 2], [0, 1, 3]]], dtype=torch.int32), 3, 0))
    results = run_many([("gather_windows_", (kv, idx, w, t), {}) for _, kv, idx, w, t in cases])
    for (label, kv, idx, w, t), res in zip(cases, results):
        sim = inplace_views(kv, res.unwrap())
        # the CPU op on a copy of the same storage (views rebuilt on it)
        base = kv[0]._base if kv[0]._base is not None else kv[0]
        clone = base.clone()
        mine = [torch.as_strided(clone, v.shape, v.stride(), v.storage_offset() -
                                 base.storage_offset()) if v._base is base or v is base
                else v.clone() for v in kv]
        before = [m.clone() for m in mine]
        ops.gather_windows_(mine, idx, w, t)
        L = idx.shape[2] * w + t
        for i, (s, m, b) in enumerate(zip(sim, mine, before)):
            assert_equal("gather_windows_", f"{label} kv[{i}] rows < L", s[:, :, :L], m[:, :, :L],
                         dtype=m.dtype)
            # the kernel moves rows only: everything past L is what it was (not a contract, but
            # what the kernel does; a write past L would be a bug)
            assert_equal("gather_windows_", f"{label} kv[{i}] rows >= L", s[:, :, L:],
                         b[:, :, L:], dtype=m.dtype)
