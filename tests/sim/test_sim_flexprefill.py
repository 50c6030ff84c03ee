"""FlexPrefill kernels on the simulator, against the CPU ops on the same inputs and against the
fp64 (or fp32) references. Each test batches its cases into one simulator process (run_many).

Float outputs: flash-attention's rule (compare.assert_fa_close): error vs the fp64 reference
<= 2 x the error of PyTorch's own computation in the kernel's precision + a small floor.
Integer outputs (select_blocks): exactly the CPU op's, and the documented tie rule where the
float64 sums round (test_select_blocks_rounding_tie_rule)."""

from __future__ import annotations

import math

import pytest
import torch

import tasksieve.ops as ops
from tasksieve import reference as ref

from test_select_blocks import _inputs as _select_inputs  # tests/ is on sys.path

from .compare import assert_close_tol, assert_equal, assert_fa_close, record
from .gpusim import run_many

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
BIG = 2**31 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The simulator re-parses the runner's PTX in every process (~15 s on a busy 2-core machine),
# so every case of this file runs in ONE process: each `_cases` builder below returns
# (key, op, args, kwargs) tuples (seeded, deterministic); the module fixture `sim` runs them all
# with one run_many and the tests look their results up by key.
_BUILDERS = []


def _cases(fn):
    _BUILDERS.append(fn)
    return fn


@pytest.fixture(scope="module")
def sim():
    calls = [c for b in _BUILDERS for c in b()]
    keys = [c[0] for c in calls]
    assert len(set(keys)) == len(keys), "duplicate case keys"
    results = run_many([(op, a, kw) for _, op, a, kw in calls])
    return {key: (a, kw, r) for (key, _, a, kw), r in zip(calls, results)}


def _get(sim, prefix):
    """[(key, args, kwargs, Result)] of the cases whose key starts with prefix, in order."""
    out = [(k, a, kw, r) for k, (a, kw, r) in sim.items() if k.startswith(prefix)]
    assert out, f"no simulator case {prefix!r}"
    return out


# ---------------------------------------------------------------------------------------------
# js_divergence
# ---------------------------------------------------------------------------------------------


def _js_reference(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(JSD) per row in the dtype of p (fp64 for the ground truth): normalise (a zero row is
    uniform), clamp at eps, renormalise, natural log."""
    def norm(x):
        s = x.sum(-1, keepdim=True)
        x = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.full_like(x, 1.0 / x.shape[-1]))
        x = x.clamp_min(eps)
        return x / x.sum(-1, keepdim=True)

    p, q = norm(p), norm(q)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return js.clamp_min(0).sqrt()


# rows x n: one row, a warp's worth, not a multiple of 32 columns, long rows, empty batch
JS_SHAPES = [(1, 1), (1, 5), (3, 31), (8, 33), (2, 3, 64), (9, 257), (0, 7), (40, 100)]


@_cases
def _js_cases():
    out = []
    for dtype in DTYPES + [torch.float64]:
        g = torch.Generator().manual_seed(0)
        for shape in JS_SHAPES:
            p = torch.rand(shape, generator=g)
            q = torch.rand(shape, generator=g)
            if p.numel() and shape[-1] > 2:  # a zero row, a one-hot row, a row of equal values
                p.view(-1, shape[-1])[0] = 0
                q.view(-1, shape[-1])[-1] = 0
                q.view(-1, shape[-1])[-1, 1] = 1
            p, q = p.to(dtype), q.to(dtype)
            out.append((f"js {dtype} shape={shape}", "js_divergence", (p, q, 1e-12), {}))
    return out


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_js_divergence(sim, dtype):
    for key, (p, q, eps), _, res in _get(sim, f"js {dtype} "):
        (out,) = res.unwrap()
        shape = tuple(p.shape)
        case = f"shape={shape}"
        cpu = ops.js_divergence(p, q, eps)
        assert out.dtype == torch.float32 and out.shape == cpu.shape
        # both sides do fp32 math on the same (rounded) inputs: they agree to fp32 rounding of
        # sums over n terms, ~n * 2^-24 relative to sqrt(ln 2)
        assert_close_tol("js_divergence", f"{case} vs CPU op", out, cpu,
                         atol=max(shape[-1], 32) * 6e-8 * 4, dtype=dtype)
        ref64 = _js_reference(p.double(), q.double(), eps)
        # the kernel does fp32 math on the rounded inputs: torch's own fp32 computation on them
        # is the baseline (fp16/bf16 math would underflow at eps and is not what runs)
        same = _js_reference(p.float(), q.float(), eps)
        assert_fa_close("js_divergence", case, out, ref64, same, floor=1e-6, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# flex_estimate
# ---------------------------------------------------------------------------------------------

# B, Nq, Nk, H, Hk, D, bs, dtypes: every block size, head dims 64 and 128 and others the kernel
# takes (1 <= D <= 256, staged 64 at a time), GQA 1, 2, 3, 4, 8, Nq < Nk, lengths not multiples
# of the block, one token, no queries, more than one 512-key pass-2 CTA. The simulator's cost
# grows with B * H * ceil(m / 32) * ceil(Nk / 64) * ceil(D / 64) tiles (m = min(bs, Nq)), so
# the larger shapes run in one or two dtypes and the small ones in all three.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EST_CASES = [
    (1, 64, 64, 2, 2, 64, 16, DTYPES),
    (1, 37, 100, 4, 2, 64, 32, [BF16]),    # GQA 2, Nq < Nk, neither a multiple of bs
    (1, 20, 90, 3, 1, 128, 64, [F32]),    # GQA 3, D 128, Nk not a multiple
    (1, 5, 140, 4, 1, 64, 128, [F16]),     # GQA 4, bs 128 > Nq
    (1, 3, 40, 8, 1, 80, 16, [BF16]),           # GQA 8, D 80 (second 64-wide stage partial)
    (1, 1, 1, 1, 1, 64, 16, DTYPES),            # one token
    (1, 1, 45, 2, 2, 17, 32, DTYPES),           # one query, odd D
    (1, 33, 33, 2, 1, 256, 16, [F16]),          # the largest D
    (2, 0, 20, 2, 1, 64, 16, DTYPES),           # no queries: zeros
    (1, 40, 600, 1, 1, 1, 16, [F32]),           # D 1; two pass-2 CTAs (600 > 512 keys)
    (1, 0, 0, 2, 1, 64, 32, [F32]),             # no keys: empty outputs, nothing launched
]


@_cases
def _est_cases():
    out = []
    for i, (B, Nq, Nk, H, Hk, D, bs, dts) in enumerate(EST_CASES):
        for dtype in dts:
            g = _gen(100 + i)
            q = (torch.randn(B, Nq, H, D, generator=g) * 1.5).to(dtype)
            k = (torch.randn(B, Nk, Hk, D, generator=g) * 1.5).to(dtype)
            scale = None if i % 3 else 0.3
            out.append((f"est {dtype} B={B} Nq={Nq} Nk={Nk} H={H} Hk={Hk} D={D} bs={bs}",
                        "flex_estimate", (q, k, bs, scale), {}))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_flex_estimate(sim, dtype):
    for key, (q, k, bs, scale), _, res in _get(sim, f"est {dtype} "):
        case = key[len("est "):]
        outs = res.unwrap()
        cpu = ops.flex_estimate(q, k, bs, scale)
        ref64 = ref.reference_flex_estimate(q, k, bs, scale, compute_dtype=torch.float64)
        # the kernel computes in fp32 from the rounded inputs (any dtype): torch's fp32
        # computation of the same formula is the baseline
        same = ref.reference_flex_estimate(q, k, bs, scale, compute_dtype=torch.float32)
        for name, o, c, r, s in zip(("vertical", "slash", "estimate"), outs, cpu, ref64, same):
            assert o.shape == c.shape and o.dtype == torch.float32, (case, name)
            # masses <= 1, fp32 sums of <= Nk terms in another order than the CPU op: at most
            # ~Nk * 2^-24 apart (worst case; typically far less)
            assert_close_tol("flex_estimate", f"{name} {case} vs CPU op", o, c,
                             atol=max(k.shape[1], 32) * 6e-8, dtype=dtype)
            assert_fa_close("flex_estimate", f"{name} {case}", o, r, s, floor=1e-6, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# select_blocks
# ---------------------------------------------------------------------------------------------


def _sel_inputs(B, H, Nq, Nk, bs, seed, qa_frac=0.5):
    """The CPU tests' continuous random scores (no ties, normalised like flex_estimate's
    outputs), with both head kinds in every case."""
    v, s, m, qa = _select_inputs(B, H, Nq, Nk, bs, seed, qa_frac)
    qa.view(-1)[0] = False
    if qa.numel() > 1:
        qa.view(-1)[-1] = True
    return v, s, m, qa


# B, H, Nq, Nk, bs, [(gamma, min_blocks, max_blocks)]. One thread block per (b, h) runs a
# 64-step bisection of block-wide float64 reductions per line: ~1 s of simulator time per head
# and parameter set, so every case has one vertical-slash and one query-aware head (B * H = 2)
# and the parameter grid is spread over the shapes: gamma tiny / 0.5 / 0.9 / 0.97 / 1, budgets
# none / min 1 / clamped to 8 / [2, 3] / 0 / fixed 5.
SEL_SHAPES = [
    (1, 2, 64, 64, 16, [(0.05, 0, BIG), (0.5, 1, BIG), (0.9, 1, 8), (1.0, 0, BIG)]),
    (1, 2, 100, 100, 32, [(0.97, 2, 3)]),     # not a multiple of the block
    (2, 1, 10, 50, 8, [(0.9, 0, 0)]),         # Nq < Nk, one partial query block, B = 2
    (1, 2, 200, 1000, 64, [(0.9, 5, 5)]),     # Nq < Nk, nb = 16
    (1, 2, 1, 9, 4, [(0.9, 1, 8)]),           # one query
    (1, 2, 300, 300, 128, [(0.5, 1, BIG)]),
    (1, 2, 130, 130, 1, [(0.9, 1, 8)]),       # block size 1: a 130 x 130 map, nb > 128
    (1, 1, 1, 1, 16, [(0.9, 1, 8)]),          # one token
]


def _check_select(cases, tag):
    """cases: [(key, args, kwargs, Result)]: exactly the CPU op's output (which is the
    reference's, checked too)."""
    for key, args, _, res in cases:
        idx, cnt = res.unwrap()
        c_idx, c_cnt = ops.select_blocks(*args)
        r_idx, r_cnt = ref.reference_select_blocks(*args)
        assert torch.equal(c_idx, r_idx) and torch.equal(c_cnt, r_cnt), f"CPU op vs ref {key}"
        assert_equal("select_blocks", f"{tag} block_cnt {key}", cnt, c_cnt)
        assert_equal("select_blocks", f"{tag} block_idx {key}", idx, c_idx)


@_cases
def _sel_random_cases():
    out = []
    for i, (B, H, Nq, Nk, bs, params) in enumerate(SEL_SHAPES):
        v, s, m, qa = _sel_inputs(B, H, Nq, Nk, bs, i)
        for gamma, mn, mx in params:
            out.append((f"sel random B={B} H={H} Nq={Nq} Nk={Nk} bs={bs} gamma={gamma} "
                        f"min={mn} max={mx}", "select_blocks",
                        (v, s, m, qa, Nq, Nk, bs, gamma, mn, mx), {}))
    v, s, m, qa = _sel_inputs(1, 2, 0, 40, 16, 9)  # no query blocks: empty outputs
    out.append(("sel random Nq=0", "select_blocks", (v, s, m, qa, 0, 40, 16, 0.9, 1, 8), {}))
    return out


def test_select_blocks_random(sim):
    """Continuous random scores: no sum rounds to a tie, so CUDA == CPU op exactly."""
    _check_select(_get(sim, "sel random "), "random")


@_cases
def _zero_like_cases():
    """Lines whose values all count as 0: zeros, -0, NaN, negatives (assigned fix 1), in
    vertical-slash and query-aware heads, and mixed with positive lines."""
    cases = []
    # the shape that first showed it: B=1, H=2, Nq=Nk=1024, block 128, gamma 0.9, min 1, max 8
    B, H, N, bs = 1, 2, 1024, 128
    nb = N // bs
    for fill in (0.0, -0.0, float("nan"), -1.0):
        v = torch.full((B, H, nb), fill)
        s = torch.full((B, H, nb), fill)
        m = torch.full((B, H, nb, nb), fill)
        qa = torch.tensor([[False, True]])
        cases.append((f"sel zero all {fill} N=1024 bs=128", "select_blocks",
                      (v, s, m, qa, N, N, bs, 0.9, 1, 8), {}))
    # mixed: zero vertical with a random slash, a query-aware head whose causal map is all 0
    # but has mass above the diagonal (ignored), NaN / -0 / negative entries sprinkled
    B, H, Nq, Nk, bs = 1, 3, 100, 160, 16
    v, s, m, qa = _sel_inputs(B, H, Nq, Nk, bs, 77, 0.5)
    v[0, 0] = 0
    s[0, 2] = -0.0
    qa[0, 1] = True
    m[0, 1] = torch.triu(torch.ones_like(m[0, 1]), diagonal=Nk // bs)  # only non-causal mass
    g = _gen(78)
    for t in (v, s, m):
        r = torch.rand(t.shape, generator=g)
        t.masked_fill_(r < 0.1, float("nan"))
        t.masked_fill_((r >= 0.1) & (r < 0.2), -0.0)
        t.copy_(torch.where((r >= 0.2) & (r < 0.35), -t.abs() - 0.1, t))
    for gamma, mn, mx in ((0.9, 1, 8), (1.0, 0, BIG)):
        cases.append((f"sel zero mixed gamma={gamma} min={mn} max={mx}", "select_blocks",
                      (v, s, m, qa, Nq, Nk, bs, gamma, mn, mx), {}))
    return cases


def test_select_blocks_zero_nan_negative_lines(sim):
    """Assigned fixes 1 and 2: a line whose values sum to 0 selects its first ranked entry (as
    the CPU op and the reference do), and NaN / -0 / negative entries count as 0 on both."""
    cases = _get(sim, "sel zero ")
    _check_select(cases, "zero/nan/neg")
    # the reported shape: one column, one offset (the diagonal) and, for the query-aware head,
    # one map entry ((0, 0)) -> rows {0, r}: count 1 for row 0, else 2 (CUDA used to give 1..8)
    d = ref.select_diag_blocks(1024, 1024, 128)
    for key, _, _, res in cases[:4]:
        _, cnt = res.unwrap()
        want = torch.where(d == 0, 1, 2).to(torch.int32).expand(1, 2, -1)
        assert torch.equal(cnt, want), key


def _cuda_line_sum(x: torch.Tensor, sel: torch.Tensor) -> float:
    """The float64 sum AtOrAbove (select_blocks.cuh) forms for an array line of n entries with
    256 threads: thread t adds its entries t, t + 256, ... in order; each warp reduces with the
    xor butterfly (offsets 16, 8, 4, 2, 1: every lane ends with the same value); warp sums are
    added in warp order starting from 0.0."""
    vals = torch.where(sel, torch.where(x > 0, x, torch.zeros_like(x)), torch.zeros_like(x))
    vals = vals.double().tolist()
    acc = [0.0] * 256
    for i, v in enumerate(vals):
        if sel[i]:
            acc[i % 256] += v
    total = 0.0
    for w in range(8):
        lanes = acc[w * 32:(w + 1) * 32]
        for off in (16, 8, 4, 2, 1):
            lanes = [lanes[l] + lanes[l ^ off] for l in range(32)]
        total += lanes[0]
    return total


_TIE_N = 256


@_cases
def _tie_cases():
    cases = []
    # (a) values 1/2, 1/4, 1/8, 1/8 (+ zeros): gamma 0.75 -> 0.75 reached exactly by 2 entries
    nb = 8
    v = torch.tensor([[[0.125, 0.5, 0.0, 0.25, 0.125, 0.0, 0.0, 0.0]]])
    s = torch.tensor([[[0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]]])
    m = torch.zeros(1, 1, nb, nb)
    qa = torch.tensor([[False]])
    for gamma in (0.75, 0.875, 1.0):
        cases.append((f"sel tie exact gamma={gamma}", "select_blocks",
                      (v, s, m, qa, 8 * 16, 8 * 16, 16, gamma, 0, BIG), {}))
    # (b) vertical = 255 ones and 2^60 at index 255; slash all zero (offset 0 only)
    n = _TIE_N
    vb = torch.ones(1, 1, n)
    vb[0, 0, n - 1] = 2.0**60
    sb = torch.zeros(1, 1, n)
    mb = torch.zeros(1, 1, n, n)
    cases.append(("sel tie rounding", "select_blocks", (vb, sb, mb, qa, n, n, 1, 1.0, 0, BIG),
                  {}))
    return cases


def test_select_blocks_rounding_tie_rule(sim):
    """The header's tie rule: the CUDA kernel sums in its reduction tree order, the CPU op in
    rank order, both in float64.
    (a) Exact float64 sums (dyadic values) at exact ties with gamma * total: identical.
    (b) Sums that round: vertical = 255 ones and 2^60 at index 255 (bs 1, Nq = Nk = 256,
    gamma 1). Rank order (CPU op, reference) absorbs every 1 into 2^60: total 2^60, n = 1.
    The CUDA tree adds the 224 ones of warps 0-6 first: total 2^60 + 256, which the top entry
    plus 129 ones reach (2^60 + 129 rounds up; 2^60 + 128 ties to even, down): n = 130.
    Asserted exactly: the CUDA rows against the count that a model of its reduction
    (_cuda_line_sum) gives, the CPU op's against n = 1."""
    _check_select(_get(sim, "sel tie exact "), "exact tie")
    ((key, args, _, res),) = _get(sim, "sel tie rounding")
    idx, cnt = res.unwrap()
    n = _TIE_N
    x = args[0][0, 0]
    ar = torch.arange(n)
    total = _cuda_line_sum(x, torch.ones(n, dtype=torch.bool))
    # ranked: index 255 first, then the ones by index; the first j + 1 ranked entries
    n_cuda = next(j + 1 for j in range(n)
                  if _cuda_line_sum(x, (ar == n - 1) | (ar < j)) >= 1.0 * total)
    assert total == 2.0**60 + 256 and n_cuda == 130

    def rows_for(cols):
        want_idx = torch.zeros(1, 1, n, n, dtype=torch.int32)
        want_cnt = torch.zeros(1, 1, n, dtype=torch.int32)
        for r in range(n):
            row = sorted({0, r} | {c for c in cols if c <= r})
            want_idx[0, 0, r, :len(row)] = torch.tensor(row, dtype=torch.int32)
            want_cnt[0, 0, r] = len(row)
        return want_idx, want_cnt

    c_idx, c_cnt = ops.select_blocks(*args)
    cpu_want = rows_for({n - 1})
    assert torch.equal(c_idx, cpu_want[0]) and torch.equal(c_cnt, cpu_want[1])
    cuda_want = rows_for({n - 1} | set(range(n_cuda - 1)))
    assert_equal("select_blocks", f"tie rule block_cnt (CUDA n={n_cuda}, CPU n=1)", cnt,
                 cuda_want[1])
    assert_equal("select_blocks", f"tie rule block_idx (CUDA n={n_cuda}, CPU n=1)", idx,
                 cuda_want[0])


# ---------------------------------------------------------------------------------------------
# block_sparse_attention
# ---------------------------------------------------------------------------------------------


def _bsa_inputs(B, Nq, Nk, H, Hk, D, bs, dtype, seed, density=0.6, empty_rows=False):
    """q, k, v and a random block list per (b, h, query block), ascending, -1-free; entries
    past the count hold garbage (10**6) that the kernel must ignore. `empty_rows`: some rows
    list nothing, and with causal some list only blocks above the diagonal (fully masked)."""
    g = _gen(seed)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Nk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Nk, Hk, D, generator=g).to(dtype)
    nbq, nbk = -(-Nq // bs), -(-Nk // bs)
    idx = torch.full((B, H, nbq, nbk), 10**6, dtype=torch.int32)
    cnt = torch.zeros(B, H, nbq, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for r in range(nbq):
                sel = torch.nonzero(torch.rand(nbk, generator=g) < density).flatten()
                if empty_rows and (b + h + r) % 3 == 0:
                    sel = sel[:0]
                elif empty_rows and (b + h + r) % 3 == 1:
                    d = (Nk - Nq + min((r + 1) * bs, Nq) - 1) // bs
                    sel = torch.arange(d + 1, nbk) if d + 1 < nbk else sel
                idx[b, h, r, :len(sel)] = sel.to(torch.int32)
                cnt[b, h, r] = len(sel)
    return q, k, v, idx, cnt


def _check_bsa(case, out, lse, args, kwargs, paged=False):
    """out / lse of the kernel vs the fp64 reference (flash-attention bound, the baseline is the
    reference computed in the kernel's dtype) and vs the CPU op on the same inputs (`paged`:
    the block_sparse_attention_paged op and reference)."""
    q = args[0]
    op = ops.block_sparse_attention_paged if paged else ops.block_sparse_attention
    reference = (ref.reference_block_sparse_attention_paged if paged
                 else ref.reference_block_sparse_attention)
    cpu_out, cpu_lse = op(*args, **kwargs)
    f32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
           for a in args]
    r_out, r_lse = reference(*f32, **kwargs, dtype=torch.float64)
    s_out, s_lse = reference(*args, **kwargs, dtype=q.dtype)
    assert out.shape == cpu_out.shape and out.dtype == q.dtype
    assert lse.shape == cpu_lse.shape and lse.dtype == torch.float32
    # fully masked rows: lse -inf and out exactly 0, as the CPU op and the reference
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), case
    empty = torch.isinf(r_lse).transpose(1, 2)  # [B, Nq, H]
    assert (out[empty] == 0).all(), case
    # floor: one output ulp at |out| <= ~3 (fp16 2^-9, bf16 2^-6) for outputs that happen to be
    # exact in torch's low-precision computation
    floor = {torch.float16: 2**-9, torch.bfloat16: 2**-6}[q.dtype]
    assert_fa_close("block_sparse_attention", f"out {case}", out, r_out, s_out, floor=floor)
    # lse is fp32 from logits of the rounded inputs on both sides; torch's low-precision
    # computation rounds the logits to the dtype. floor: fp32 rounding of |lse| <= ~10
    assert_fa_close("block_sparse_attention", f"lse {case}", lse, r_lse, s_lse, floor=1e-5,
                    dtype=q.dtype)
    # vs the CPU op on the same inputs: both accumulate in fp32; the kernel rounds P to the
    # dtype before P V (as flash-attention does) and both round the output once. So they
    # differ by <= u * max|v| (P's relative rounding, sum_j p_j = 1) + 2 u max|out| (two output
    # roundings), u = unit roundoff (fp16 2^-11, bf16 2^-8)
    u = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[q.dtype]
    vmax = float(args[2].float().abs().max()) if args[2].numel() else 0.0  # v (or v_cache)
    omax = float(cpu_out.float().abs().max()) if cpu_out.numel() else 0.0
    assert_close_tol("block_sparse_attention", f"out {case} vs CPU op", out.float(),
                     cpu_out.float(), atol=u * (vmax + 2 * omax), dtype=q.dtype)
    fin = torch.isfinite(cpu_lse)
    assert torch.equal(fin, torch.isfinite(lse)), case
    # lse: fp32 logits of the same inputs on both sides (WMMA vs CPU dot order): a few fp32
    # ulps of |lse| and of the logits' magnitude
    assert_close_tol("block_sparse_attention", f"lse {case} vs CPU op", lse[fin], cpu_lse[fin],
                     atol=1e-4, rtol=1e-5, dtype=q.dtype)


# B, Nq, Nk, H, Hk, D, bs, causal, empty_rows, dtypes. The simulator's cost grows with
# B * H * (query blocks x 64-row chunks) * listed 64-key sub-tiles, so the larger shapes run in
# one dtype each (alternating) and the small ones in both.
BSA_CASES = [
    (1, 64, 64, 2, 2, 64, 16, True, False, [F16, BF16]),
    (1, 100, 100, 2, 1, 64, 32, True, True, [BF16]),    # GQA 2, N not a multiple, masked rows
    (1, 40, 130, 3, 1, 128, 64, True, False, [F16]),    # GQA 3, Nq < Nk, D 128
    (1, 70, 70, 4, 1, 64, 128, False, True, [BF16]),    # GQA 4, non-causal, bs 128 > N
    (2, 17, 50, 8, 1, 64, 16, True, True, [F16]),       # GQA 8, B 2, masked rows
    (1, 1, 1, 1, 1, 64, 16, True, False, [F16, BF16]),  # one token
    (1, 1, 90, 2, 2, 128, 32, False, False, [BF16]),    # one query, non-causal, D 128
    (1, 48, 48, 2, 2, 128, 16, True, True, [BF16]),     # D 128 in bf16, masked rows
    (1, 0, 20, 2, 1, 64, 16, True, False, [F16]),       # no queries: empty outputs
]


@_cases
def _bsa_dense_cases():
    out = []
    for i, (B, Nq, Nk, H, Hk, D, bs, causal, er, dts) in enumerate(BSA_CASES):
        for dtype in dts:
            args = _bsa_inputs(B, Nq, Nk, H, Hk, D, bs, dtype, 200 + i, empty_rows=er)
            kw = dict(block_size=bs, scale=None if i % 2 else 0.11, causal=causal)
            out.append((f"bsa {dtype} B={B} Nq={Nq} Nk={Nk} H={H} Hk={Hk} D={D} bs={bs} "
                        f"causal={causal}", "block_sparse_attention", args, kw))
    return out


@pytest.mark.parametrize("dtype", HALF)
def test_block_sparse_attention_dense(sim, dtype):
    for key, args, kw, res in _get(sim, f"bsa {dtype} "):
        out, lse = res.unwrap()
        _check_bsa(key[4:], out, lse, args, kw)


def _varlen_inputs(nqs, nks, H, Hk, D, bs, dtype, seed, density=0.7, extra_rows=1):
    """S packed sequences (nqs[s] queries, the last of nks[s] keys); block_idx [S, H, nbq_max,
    max_k] of random key blocks; rows past a sequence's query blocks (`extra_rows` spare) and
    entries past the count hold garbage the op must ignore."""
    g = _gen(seed)
    S = len(nqs)
    q = torch.randn(1, sum(nqs), H, D, generator=g).to(dtype)
    k = torch.randn(1, sum(nks), Hk, D, generator=g).to(dtype)
    v = torch.randn(1, sum(nks), Hk, D, generator=g).to(dtype)
    cu_q = torch.tensor([0] + torch.tensor(nqs).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(nks).cumsum(0).tolist(), dtype=torch.int32)
    nbq_max = max([-(-n // bs) for n in nqs] + [0]) + extra_rows
    max_k = max([-(-n // bs) for n in nks] + [1])
    idx = torch.full((S, H, nbq_max, max_k), 10**6, dtype=torch.int32)
    cnt = torch.full((S, H, nbq_max), -7, dtype=torch.int32)
    for s in range(S):
        nbq_s, nbk_s = -(-nqs[s] // bs), -(-nks[s] // bs)
        for h in range(H):
            for r in range(nbq_s):
                sel = torch.nonzero(torch.rand(nbk_s, generator=g) < density).flatten()
                idx[s, h, r, :len(sel)] = sel.to(torch.int32)
                cnt[s, h, r] = len(sel)
    return q, k, v, idx, cnt, cu_q, cu_k


def _varlen_model(q, k, v, idx, cnt, cu_q, cu_k, bs, scale, causal):
    """What the CUDA varlen op returns for ANY offsets (block_sparse_attention.cuh and
    block::seq_span): sequence s covers query rows [qb, qb + nq) and keys [kb, kb + nk) with
    qb = clamp(cu_q[s], 0, total_q), qe = clamp(cu_q[s+1], qb, total_q), kb, ke likewise,
    nk = ke - kb, nq = min(qe - qb, nk); its query blocks r < nbq_max are the dense problem on
    those rows with the listed columns in [0, ceil(nk / bs)) (counts clamped to [0, max_k],
    other columns skipped). Rows no sequence writes stay 0 / -inf (the glue's pre-fill).
    Returns (out64, lse64, out_same_dtype, lse_same_dtype, covered [total_q] int: how many
    sequences write each row)."""
    total_q, total_k = q.shape[1], k.shape[1]
    S, H, nbq_max, max_k = idx.shape
    D = q.shape[3]
    outs = {dt: torch.zeros(1, total_q, H, D, dtype=torch.float32) for dt in ("64", "same")}
    lses = {dt: torch.full((1, H, total_q), float("-inf")) for dt in ("64", "same")}
    covered = torch.zeros(total_q, dtype=torch.int64)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(S):
        qb = min(max(cq[s], 0), total_q)
        qe = min(max(cq[s + 1], qb), total_q)
        kb = min(max(ck[s], 0), total_k)
        ke = min(max(ck[s + 1], kb), total_k)
        nk = ke - kb
        nq = min(qe - qb, nk)
        nq_w = min(nq, nbq_max * bs)  # query blocks past nbq_max are not written
        if nq_w <= 0:
            continue
        nbq_s, nbk_s = -(-nq // bs), -(-nk // bs)
        nbq_w = -(-nq_w // bs)
        c_idx = torch.zeros(1, H, nbq_s, max(max_k, 1), dtype=torch.int32)
        c_cnt = torch.zeros(1, H, nbq_s, dtype=torch.int32)
        for h in range(H):
            for r in range(nbq_w):
                n = min(max(int(cnt[s, h, r]), 0), max_k)
                cols = [c for c in idx[s, h, r, :n].tolist() if 0 <= c < nbk_s]
                c_idx[0, h, r, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
                c_cnt[0, h, r] = len(cols)
        sl_q, sl_k = slice(qb, qb + nq), slice(kb, ke)
        for tag, dt in (("64", torch.float64), ("same", q.dtype)):
            conv = (lambda t: t.float()) if tag == "64" else (lambda t: t)
            o, l = ref.reference_block_sparse_attention(
                conv(q[:, sl_q]), conv(k[:, sl_k]), conv(v[:, sl_k]), c_idx, c_cnt, bs, scale,
                causal, dtype=dt)
            outs[tag][:, qb:qb + nq_w] = o[:, :nq_w].float()
            lses[tag][:, :, qb:qb + nq_w] = l[:, :, :nq_w]
        covered[qb:qb + nq_w] += 1
    return outs["64"], lses["64"], outs["same"], lses["same"], covered


# name, nqs, nks, H, Hk, D, bs, causal, dtype: empty sequences (nq = 0, nk = 0), nq < nk,
# lengths not multiples of the block, a one-token sequence
VARLEN_CASES = [
    ("mixed", [0, 5, 40, 1, 0, 33], [0, 47, 40, 1, 9, 70], 4, 2, 64, 16, True, F16),
    ("noncausal", [3, 0, 20], [30, 0, 20], 2, 1, 128, 32, False, BF16),
]


@_cases
def _bsa_varlen_cases():
    out = []
    for i, (name, nqs, nks, H, Hk, D, bs, causal, dtype) in enumerate(VARLEN_CASES):
        args = _varlen_inputs(nqs, nks, H, Hk, D, bs, dtype, 300 + i)
        q, k, v, idx, cnt, cu_q, cu_k = args
        out.append((f"bsavar ok {name}", "block_sparse_attention", (q, k, v, idx, cnt),
                    dict(block_size=bs, scale=None, causal=causal, cu_seqlens_q=cu_q,
                         cu_seqlens_k=cu_k)))
    # no sequences at all (cu_seqlens = [0]): empty outputs, nothing launched
    q, k, v, idx, cnt, cu_q, cu_k = _varlen_inputs([], [], 2, 2, 64, 16, BF16, 305)
    out.append(("bsavar ok no sequences", "block_sparse_attention", (q, k, v, idx, cnt),
                dict(block_size=16, scale=None, causal=True, cu_seqlens_q=cu_q,
                     cu_seqlens_k=cu_k)))
    # malformed offsets (the CUDA op cannot check them without a host sync; the CPU op raises)
    q, k, v, idx, cnt, cu_q, cu_k = _varlen_inputs([5, 20, 0], [40, 20, 3], 2, 1, 64, 16, F16,
                                                   310)
    t = lambda vals: torch.tensor(vals, dtype=torch.int32)  # noqa: E731
    bad = [
        ("neg and huge q offsets", t([-9, 5, 25, 10**9]), cu_k),
        ("decreasing q, huge k", t([0, 25, 3, 25]), t([0, 2**31 - 1, 60, 63])),
        ("k offsets past the end", cu_q, t([0, 40, 45, 63])),
        ("all q 7, all k -1", t([7, 7, 7, 7]), t([-1, -1, -1, -1])),
    ]
    for name, cq, ck in bad:
        out.append((f"bsavar bad {name}", "block_sparse_attention", (q, k, v, idx, cnt),
                    dict(block_size=16, scale=None, causal=True, cu_seqlens_q=cq,
                         cu_seqlens_k=ck)))
    # nbq_max too small for sequence 1 (20 queries, 2 blocks): its second block is not written
    out.append(("bsavar bad nbq_max 1", "block_sparse_attention",
                (q, k, v, idx[:, :, :1].contiguous(), cnt[:, :, :1].contiguous()),
                dict(block_size=16, scale=None, causal=True, cu_seqlens_q=cu_q,
                     cu_seqlens_k=cu_k)))
    return out


def test_block_sparse_attention_varlen(sim):
    """Well-formed packed varlen: vs the CPU op and the fp64 reference (flash-attention bound)."""
    for key, args, kw, res in _get(sim, "bsavar ok "):
        out, lse = res.unwrap()
        _check_bsa(key, out, lse, args, kw)


def test_block_sparse_attention_varlen_malformed_offsets(sim):
    """Malformed cu_seqlens: no fault, and exactly what the header documents (the offsets are
    clamped by block::seq_span; rows no clamped sequence writes keep the glue's 0 / -inf).
    Rows that two clamped sequences both write are written by either CTA (unordered on a real
    card): there only finiteness is asserted. The CPU op rejects all of these."""
    for key, args, kw, res in _get(sim, "bsavar bad "):
        out, lse = res.unwrap()
        q = args[0]
        with pytest.raises(RuntimeError, match="tasksieve.block_sparse_attention"):
            ops.block_sparse_attention(*args, **kw)
        o64, l64, os_, ls_, covered = _varlen_model(
            *args, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["block_size"], kw["scale"],
            kw["causal"])
        assert out.shape == q.shape and lse.shape == (1, q.shape[2], q.shape[1])
        assert torch.isfinite(out.float()).all(), key
        multi = covered > 1
        # uncovered rows: exactly the pre-fill
        none = covered == 0
        assert (out[0, none] == 0).all() and torch.isneginf(lse[0][:, none]).all(), key
        one = ~multi
        floor = {torch.float16: 2**-9, torch.bfloat16: 2**-6}[q.dtype]
        assert torch.equal(torch.isinf(lse[0][:, one]), torch.isinf(l64[0][:, one])), key
        assert_fa_close("block_sparse_attention", f"varlen out {key} ({int(multi.sum())} "
                        "rows written twice skipped)", out[:, one], o64[:, one], os_[:, one],
                        floor=floor)
        assert_fa_close("block_sparse_attention", f"varlen lse {key}", lse[..., one],
                        l64[..., one], ls_[..., one], floor=1e-5, dtype=q.dtype)



# ---------------------------------------------------------------------------------------------
# Paged KV: block_sparse_attention_paged, flex_estimate_paged. Their cases run in a process of
# their own (fixture sim_paged), so `-k paged` runs only these. Problems come from
# tests/test_paged_flexprefill.py: sequences of different lengths in shuffled pages of both
# cache layouts, garbage past each sequence's used table entries and index counts.
# ---------------------------------------------------------------------------------------------

from test_paged_flexprefill import Problem  # noqa: E402  (tests/ is on sys.path)

_PAGED_BUILDERS = []


def _paged_cases(fn):
    _PAGED_BUILDERS.append(fn)
    return fn


@pytest.fixture(scope="module")
def sim_paged():
    calls = [c for b in _PAGED_BUILDERS for c in b()]
    keys = [c[0] for c in calls]
    assert len(set(keys)) == len(keys), "duplicate case keys"
    results = run_many([(op, a, kw) for _, op, a, kw in calls])
    return {key: (a, kw, r) for (key, _, a, kw), r in zip(calls, results)}


def _gathered_varlen(p):
    """The problem as a contiguous packed varlen call on the gathered keys and values:
    (q [1, total_q, H, D], k, v [1, total_k, Hk, D], idx, cnt, cu_q, cu_k)."""
    ks, vs = zip(*(p.kv(s) for s in range(p.S)))
    k, v = torch.cat(ks, 1), torch.cat(vs, 1)
    if p.packed:
        q, cu_q = p.q, p.cu
    else:
        q = p.q.reshape(1, -1, *p.q.shape[2:])
        cu_q = torch.arange(p.S + 1, dtype=torch.int32) * p.q.shape[1]
    cu_k = torch.tensor([0] + torch.tensor(p.nks).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, p.idx, p.cnt, cu_q, cu_k


# name, nks, nqs, packed, H, Hk, D, page_size, bs, causal, dtype, layout
BSA_PAGED = [
    ("dense ps16", [70, 45], [45, 45], False, 4, 2, 64, 16, 16, True, F16, "flash_attn"),
    ("packed ps3", [40, 33, 9, 1], [40, 1, 0, 1], True, 2, 1, 128, 3, 32, True, BF16,
     "kv_concat"),
    ("packed ps1 noncausal", [70, 20], [5, 20], True, 2, 2, 64, 1, 64, False, F16, "kv_concat"),
    ("dense ps3 nq1", [50, 64], [1, 1], False, 4, 1, 64, 3, 32, True, BF16, "flash_attn"),
]


def _bsa_paged_problem(i):
    name, nks, nqs, packed, H, Hk, D, ps, bs, causal, dtype, layout = BSA_PAGED[i]
    return name, Problem(nks, nqs, packed, H, Hk, D, ps, bs, dtype, layout, "cpu", 400 + i,
                         density=0.7), causal


@_paged_cases
def _bsa_paged_cases():
    out = []
    for i in range(len(BSA_PAGED)):
        name, p, causal = _bsa_paged_problem(i)
        kw = dict(scale=None, causal=causal, cu_seqlens_q=p.cu)
        out.append((f"bsapaged ok {name}", "block_sparse_attention_paged", p.attn_args(), kw))
        q, k, v, idx, cnt, cu_q, cu_k = _gathered_varlen(p)
        out.append((f"bsapaged twin {name}", "block_sparse_attention", (q, k, v, idx, cnt),
                    dict(block_size=p.bs, scale=None, causal=causal, cu_seqlens_q=cu_q,
                         cu_seqlens_k=cu_k)))
    # malformed values (the CPU op raises; the CUDA op clamps): page ids outside the cache,
    # lengths past the table's capacity or negative, offsets out of order
    _, p, _ = _bsa_paged_problem(1)
    bt = p.block_table.clone()
    bt[0, 0], bt[1, 1] = -7, 10**6
    bad = [("page ids", bt, p.seq_lens, p.cu),
           ("lengths", p.block_table, torch.tensor([10**9, -4, 9, 1], dtype=torch.int32), p.cu),
           ("offsets", p.block_table, p.seq_lens,
            torch.tensor([-9, 30, 2, 10**9, 5], dtype=torch.int32))]
    for name, table, lens, cu in bad:
        out.append((f"bsapaged bad {name}", "block_sparse_attention_paged",
                    (p.q, p.k, p.v, table, lens, p.idx, p.cnt, p.bs),
                    dict(scale=None, causal=True, cu_seqlens_q=cu)))
    return out


def test_block_sparse_attention_paged(sim_paged):
    """vs the CPU op and the fp64 reference (flash-attention bound), and bit for bit the
    contiguous varlen kernel on the gathered keys and values (same math, other loads)."""
    for i in range(len(BSA_PAGED)):
        name, p, causal = _bsa_paged_problem(i)
        key = f"bsapaged ok {name}"
        args, kw, res = sim_paged[key]
        out, lse = res.unwrap()
        _check_bsa(key, out, lse, args, kw, paged=True)
        t_out, t_lse = sim_paged[f"bsapaged twin {name}"][2].unwrap()
        assert_equal("block_sparse_attention_paged", f"out {name} vs contiguous kernel",
                     out.reshape(t_out.shape), t_out, dtype=p.q.dtype)
        want_lse = t_lse if p.packed else t_lse.view(p.H, p.S, -1).transpose(0, 1)
        assert_equal("block_sparse_attention_paged", f"lse {name} vs contiguous kernel", lse,
                     want_lse, dtype=p.q.dtype)


def test_block_sparse_attention_paged_malformed_values(sim_paged):
    """Malformed page ids, lengths and offsets: the kernel clamps them (no fault, finite
    outputs); the CPU op rejects every one of them."""
    for key, args, kw, res in _get(sim_paged, "bsapaged bad "):
        out, lse = res.unwrap()
        with pytest.raises(RuntimeError, match="tasksieve.block_sparse_attention_paged"):
            ops.block_sparse_attention_paged(*args, **kw)
        assert out.shape == args[0].shape and torch.isfinite(out.float()).all(), key
        assert not torch.isnan(lse).any(), key
        record("block_sparse_attention_paged", args[0].dtype, f"{key}: finite, in bounds", 0.0,
               0.0, True)


# name, nks, nqs, packed, H, Hk, D, page_size, bs, dtype, layout
EST_PAGED = [
    ("dense ps16", [70, 45], [20, 20], False, 4, 2, 64, 16, 16, F32, "flash_attn"),
    ("packed ps3", [100, 33, 9], [100, 1, 0], True, 2, 1, 64, 3, 32, BF16, "kv_concat"),
    ("packed ps1 D128", [40, 65], [3, 65], True, 2, 2, 128, 1, 64, F16, "flash_attn"),
    ("dense equal ps3", [45, 45], [45, 45], False, 2, 1, 64, 3, 16, F16, "kv_concat"),
]


def _est_paged_problem(i):
    name, nks, nqs, packed, H, Hk, D, ps, bs, dtype, layout = EST_PAGED[i]
    return name, Problem(nks, nqs, packed, H, Hk, D, ps, bs, dtype, layout, "cpu", 500 + i)


@_paged_cases
def _est_paged_cases():
    out = []
    for i in range(len(EST_PAGED)):
        name, p = _est_paged_problem(i)
        scale = None if i % 2 else 0.3
        out.append((f"estpaged ok {name}", "flex_estimate_paged", p.est_args(),
                    dict(scale=scale, cu_seqlens_q=p.cu)))
        if not p.packed and len(set(p.nks)) == 1:  # a contiguous twin on the gathered keys
            k = torch.cat([p.kv(s)[0] for s in range(p.S)], 0)
            out.append((f"estpaged twin {name}", "flex_estimate", (p.q, k, p.bs, scale), {}))
    _, p = _est_paged_problem(1)
    bt = p.block_table.clone()
    bt[0, 0] = -3
    out.append(("estpaged bad lengths and pages", "flex_estimate_paged",
                (p.q, p.k, bt, torch.tensor([10**9, 33, -1], dtype=torch.int32), p.bs),
                dict(scale=None, cu_seqlens_q=p.cu)))
    return out


def test_flex_estimate_paged(sim_paged):
    for i in range(len(EST_PAGED)):
        name, p = _est_paged_problem(i)
        args, kw, res = sim_paged[f"estpaged ok {name}"]
        outs = res.unwrap()
        cpu = ops.flex_estimate_paged(*args, **kw)
        ref64 = ref.reference_flex_estimate_paged(*args, **kw, compute_dtype=torch.float64)
        same = ref.reference_flex_estimate_paged(*args, **kw, compute_dtype=torch.float32)
        dtype = p.q.dtype
        for oname, o, c, r, s_ in zip(("vertical", "slash", "estimate"), outs, cpu, ref64, same):
            assert o.shape == c.shape and o.dtype == torch.float32, (name, oname)
            assert_close_tol("flex_estimate_paged", f"{oname} {name} vs CPU op", o, c,
                             atol=max(max(p.nks), 32) * 6e-8, dtype=dtype)
            assert_fa_close("flex_estimate_paged", f"{oname} {name}", o, r, s_, floor=1e-6,
                            dtype=dtype)
        twin = sim_paged.get(f"estpaged twin {name}")
        if twin is not None:
            for oname, o, t in zip(("vertical", "slash", "estimate"), outs, twin[2].unwrap()):
                nb = t.shape[-1]  # the table's capacity may hold more blocks: zeros there
                assert_equal("flex_estimate_paged", f"{oname} {name} vs contiguous kernel",
                             o[..., :nb], t, dtype=dtype)
                assert (o[..., nb:] == 0).all(), (name, oname)


def test_flex_estimate_paged_malformed_values(sim_paged):
    for key, args, kw, res in _get(sim_paged, "estpaged bad "):
        outs = res.unwrap()
        with pytest.raises(RuntimeError, match="tasksieve.flex_estimate_paged"):
            ops.flex_estimate_paged(*args, **kw)
        for o in outs:
            assert torch.isfinite(o).all(), key
        record("flex_estimate_paged", args[0].dtype, f"{key}: finite, in bounds", 0.0, 0.0, True)
