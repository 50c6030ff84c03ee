"""FlexPrefill estimation ops (js_divergence, flex_estimate): kernels vs the pure-PyTorch
references in tasksieve.reference, hand-computed cases, and bad-input errors.

CPU always; the same cases on CUDA when a GPU is visible (``device`` parametrization). The CUDA
flex_estimate takes block sizes 16..128 (powers of 2) only, so its random cases draw from those.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, requires_kernel
from hypothesis import given
from hypothesis import strategies as st
from tasksieve import ops
from tasksieve import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SQRT_LN2 = math.sqrt(math.log(2.0))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# js_divergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_js_divergence_hand(device, impl):
    requires_kernel("js_divergence", device)
    fn = ops.js_divergence if impl == "op" else ref.reference_js_divergence
    p = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],   # disjoint from q's row -> sqrt(ln 2)
        [0.0, 0.0, 0.0, 0.0],   # all zero (uniform) vs all zero -> 0
        [1.0, 2.0, 3.0, 0.0],   # identical, with an exact zero -> 0
        [2.0, 4.0, 6.0, 0.0],   # same distribution, unnormalised -> 0
        [0.0, 0.0, 0.0, 0.0],   # uniform vs uniform -> 0
        [0.5, 0.5, 0.0, 0.0],   # vs [0, 0, 0.5, 0.5]: disjoint
    ], device=device)
    q = torch.tensor([
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 2.0, 3.0, 0.0],
        [1.0, 2.0, 3.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.5, 0.5],
    ], device=device)
    d = fn(p, q)
    assert d.dtype == torch.float32 and d.shape == (6,)
    assert not torch.isnan(d).any()
    expect = torch.tensor([SQRT_LN2, 0.0, 0.0, 0.0, 0.0, SQRT_LN2])
    torch.testing.assert_close(d.cpu(), expect, atol=2e-4, rtol=0)
    # Exactly zero for identical rows (m == p, log 1 == 0).
    assert d[1].item() == 0.0 and d[2].item() == 0.0
    # Two-point case by hand: p = [1, 0], q = [1/2, 1/2], m = [3/4, 1/4]:
    # 1/2 (1 log(4/3)) + 1/2 (1/2 log(2/3) + 1/2 log 2).
    d2 = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    got = fn(torch.tensor([1.0, 0.0], device=device), torch.tensor([0.5, 0.5], device=device))
    assert got.shape == ()
    assert abs(got.item() - math.sqrt(d2)) < 1e-4


@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    n=st.integers(1, 70),
    zero_frac=st.sampled_from([0.0, 0.5, 1.0]),
    dtype=st.sampled_from(DTYPES + (torch.float64,)),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("device", DEVICES)
def test_js_divergence_vs_reference(device, lead, n, zero_frac, dtype, seed):
    requires_kernel("js_divergence", device)
    g = _gen(seed)
    shape = tuple(lead) + (n,)
    p = torch.rand(shape, generator=g)
    q = torch.rand(shape, generator=g)
    p = torch.where(torch.rand(shape, generator=g) < zero_frac, torch.zeros_like(p), p)
    p, q = p.to(dtype).to(device), q.to(dtype).to(device)
    got = ops.js_divergence(p, q)
    expect = ref.reference_js_divergence(p, q, compute_dtype=torch.float64)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    assert not torch.isnan(got).any()
    assert (got >= 0).all() and (got <= SQRT_LN2 + 1e-5).all()
    # sqrt amplifies fp32 rounding near 0: absolute tolerance.
    torch.testing.assert_close(got.cpu(), expect.cpu(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_js_divergence_eps_and_noncontiguous(device):
    requires_kernel("js_divergence", device)
    g = _gen(5)
    p = torch.rand(8, 6, generator=g).to(device).t()  # non-contiguous rows
    q = torch.rand(8, 6, generator=g).to(device).t()
    torch.testing.assert_close(ops.js_divergence(p, q, 1e-3).cpu(),
                               ref.reference_js_divergence(p, q, 1e-3, compute_dtype=torch.float64)
                               .cpu(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_js_divergence_bad_inputs(device, impl):
    requires_kernel("js_divergence", device)
    fn = ops.js_divergence if impl == "op" else ref.reference_js_divergence
    p = torch.rand(3, 5, device=device)
    with pytest.raises(RuntimeError, match="q must have the shape of p"):
        fn(p, torch.rand(3, 4, device=device))
    with pytest.raises(RuntimeError, match="last dim n of p must be >= 1"):
        fn(p[:, :0], p[:, :0])
    for eps in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
            fn(p, p, eps)
    with pytest.raises(RuntimeError, match="p must be a float tensor"):
        fn(torch.ones(3, 5, dtype=torch.int32, device=device),
           torch.ones(3, 5, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="q must have the dtype of p"):
        fn(p, p.double())
    with pytest.raises(RuntimeError, match="p must have at least 1 dim"):
        fn(p[0, 0], p[0, 0])
    if device == "cuda":
        with pytest.raises(RuntimeError, match="q must be on the device of p"):
            fn(p, p.cpu())
    # Empty leading dims are valid.
    assert fn(p[:0], p[:0]).shape == (0,)


# ---------------------------------------------------------------------------------------------
# flex_estimate
# ---------------------------------------------------------------------------------------------


def _qk(B, Nq, Nk, H, Hk, D, dtype, device, seed, k_layout="bnhd"):
    g = _gen(seed)
    q = torch.randn(B, Nq, H, D, generator=g).to(dtype=dtype, device=device)
    if k_layout == "bnhd":
        k = torch.randn(B, Nk, Hk, D, generator=g).to(dtype=dtype, device=device)
    else:  # HF cache [B, Hk, N, D] viewed as [B, N, Hk, D]
        k = torch.randn(B, Hk, Nk, D, generator=g).to(dtype=dtype, device=device).transpose(1, 2)
    return q, k


def _check_against_reference(q, k, bs, scale=None):
    got = ops.flex_estimate(q, k, bs, scale)
    expect = ref.reference_flex_estimate(q, k, bs, scale, compute_dtype=torch.float64)
    nb = ref.flex_num_blocks(k.shape[1], bs)
    B, H = q.shape[0], q.shape[2]
    for name, a, b in zip(("vertical", "slash", "estimate"), got, expect):
        assert a.shape == (B, H, nb) and a.dtype == torch.float32 and a.is_contiguous(), name
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=2e-5, rtol=1e-4, msg=name)
    if q.shape[1] > 0 and nb > 0:
        for name, a in zip(("vertical", "slash", "estimate"), got):
            torch.testing.assert_close(a.sum(-1).cpu(), torch.ones(B, H), atol=1e-4, rtol=0,
                                       msg=name)
    return got


# One KV head, D = 1, scale = 1, block_size 2, Nk = 3 keys with k = log([1, 2, 3]) and Nq = 2
# queries q = 1 (positions 1, 2); m = min(2, 2) = 2 representatives.
#   query at pos 1 sees keys 0, 1: A = [1, 2, 0] / 3;  query at pos 2: A = [1, 2, 3] / 6.
#   vertical: block 0 = keys {0, 1}: (1 + 1/2) / 2 = 3/4; block 1 = key 2: (0 + 1/2) / 2 = 1/4.
#   slash: pos 1: delta(key1) = 0, delta(key0) = 1 -> t = 0 gets 1; pos 2: delta = 0, 1 (keys
#   2, 1) -> t = 0 gets 5/6, delta 2 (key 0) -> t = 1 gets 1/6; slash = [(1 + 5/6)/2, 1/12].
#   estimate: qbar = 1, kbar = [log(1)+log(2), log 3] / [2, 1] -> softmax([log sqrt 2, log 3])
#   = [sqrt 2, 3] / (sqrt 2 + 3).
_HAND_Q = torch.ones(1, 2, 1, 1)
_HAND_K = torch.log(torch.tensor([1.0, 2.0, 3.0])).view(1, 3, 1, 1)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_flex_estimate_hand(impl):
    requires_kernel("flex_estimate", "cpu")
    fn = ops.flex_estimate if impl == "op" else ref.reference_flex_estimate
    v, s, e = fn(_HAND_Q, _HAND_K, 2, 1.0)
    torch.testing.assert_close(v, torch.tensor([[[0.75, 0.25]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s, torch.tensor([[[(1 + 5 / 6) / 2, 1 / 12]]]), atol=1e-6, rtol=0)
    r2 = math.sqrt(2)
    torch.testing.assert_close(e, torch.tensor([[[r2 / (r2 + 3), 3 / (r2 + 3)]]]), atol=1e-6,
                               rtol=0)
    # Default scale 1/sqrt(D) = 1 for D = 1; Nq = 1 keeps only the last query (pos 2).
    torch.testing.assert_close(fn(_HAND_Q, _HAND_K, 2)[0], v)
    v1, s1, _ = fn(_HAND_Q[:, 1:], _HAND_K, 2, 1.0)
    torch.testing.assert_close(v1, torch.tensor([[[0.5, 0.5]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s1, torch.tensor([[[5 / 6, 1 / 6]]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_estimate_hand_cuda_block(device):
    """A hand case at a CUDA-supported block size: uniform logits (q = 0). Nk = 20, bs = 16,
    Nq = 3 (m = 3, positions 17, 18, 19): query at position p sees p + 1 keys uniformly."""
    requires_kernel("flex_estimate", device)
    q = torch.zeros(1, 3, 2, 4, device=device)
    k = torch.randn(1, 20, 1, 4, generator=_gen(0)).to(device)
    v, s, e = ops.flex_estimate(q, k, 16)
    # vertical block 1 = keys 16..19: visible 1, 2, 3 of them for p = 17, 18, 19.
    v1 = (2 / 18 + 3 / 19 + 4 / 20) / 3
    torch.testing.assert_close(v.cpu()[0, :, 1], torch.full((2,), v1), atol=1e-6, rtol=0)
    # slash t = 0 = the 16 nearest offsets: 16/18, 16/19, 16/20.
    s0 = (16 / 18 + 16 / 19 + 16 / 20) / 3
    torch.testing.assert_close(s.cpu()[0, :, 0], torch.full((2,), s0), atol=1e-6, rtol=0)
    torch.testing.assert_close(e.cpu(), torch.full((1, 2, 2), 0.5), atol=1e-6, rtol=0)


@given(
    B=st.integers(1, 2),
    Hk=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3, 4, 8]),
    D=st.sampled_from([16, 64]),
    bs=st.sampled_from([1, 3, 16, 32, 64]),
    Nk=st.integers(1, 150),
    nq_kind=st.sampled_from(["one", "less", "all", "random"]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["bnhd", "cache"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("device", DEVICES)
def test_flex_estimate_vs_reference(device, B, Hk, G, D, bs, Nk, nq_kind, dtype, layout, seed):
    requires_kernel("flex_estimate", device)
    if device == "cuda" and bs < 16:
        bs = 16
    Nq = {"one": 1, "less": max(1, Nk - 7), "all": Nk,
          "random": 1 + seed % Nk}[nq_kind]
    q, k = _qk(B, Nq, Nk, Hk * G, Hk, D, dtype, device, seed, layout)
    _check_against_reference(q, k, bs)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_estimate_long_and_strided(device):
    """Keys spanning several CUDA CTAs (512 keys each), Nk not a multiple of the block, a
    strided q, an explicit scale and peaked attention."""
    requires_kernel("flex_estimate", device)
    q, k = _qk(1, 200, 1100, 4, 2, 64, torch.float32, device, 7, "cache")
    q_strided = torch.randn(1, 4, 200, 64, generator=_gen(8)).to(device).transpose(1, 2)
    for bs in (16, 128):
        _check_against_reference(q, k, bs)
        _check_against_reference(q_strided * 3, k, bs, 0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_flex_estimate_empty(device, impl):
    requires_kernel("flex_estimate", device)
    fn = ops.flex_estimate if impl == "op" else ref.reference_flex_estimate
    q, k = _qk(2, 4, 40, 4, 2, 16, torch.float32, device, 0)
    for qq, kk, shape in [
        (q[:0], k[:0], (0, 4, 3)),        # B = 0
        (q[:, :0], k[:, :0], (2, 4, 0)),  # Nk = 0 (and Nq = 0)
    ]:
        out = fn(qq, kk, 16)
        assert all(t.shape == shape and t.dtype == torch.float32 for t in out)
    # Nq = 0 with keys: no queries, no mass anywhere -> zeros.
    out = fn(q[:, :0], k, 16)
    assert all(t.shape == (2, 4, 3) and not t.cpu().any() for t in out)
    # H = 0 query heads with Hk >= 1 is valid and empty.
    out = fn(q[:, :, :0], k, 16)
    assert all(t.shape == (2, 0, 3) for t in out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_flex_estimate_bad_inputs(device, impl):
    requires_kernel("flex_estimate", device)
    fn = ops.flex_estimate if impl == "op" else ref.reference_flex_estimate
    q, k = _qk(1, 4, 40, 4, 2, 16, torch.float32, device, 0)
    cases = [
        ((q[0], k, 16), "q must be a 4-D tensor"),
        ((q, k[0], 16), "k must be a 4-D tensor"),
        ((q.int(), k.int(), 16), "q must be float32, float16 or bfloat16"),
        ((q, k.half(), 16), "k must have the dtype of q"),
        ((q, k.expand(2, -1, -1, -1), 16), "k must have the batch size of q"),
        ((q, k[..., :8], 16), "k head dim must equal q head dim"),
        ((q[:, :, :3], k, 16), "k heads Hk must be >= 1 and divide the q heads"),
        ((q, k[:, :, :0], 16), "k heads Hk must be >= 1"),
        ((q, k[:, :3], 16), "q length Nq must be <= the k length Nk"),
        ((q, k, 0), "block_size must be >= 1"),
        ((q, k, -4), "block_size must be >= 1"),
        ((q[..., ::2], k[..., ::2], 16), "q must be contiguous in the last dim"),
        ((q, k.repeat_interleave(2, dim=-1)[..., ::2], 16), "k must be contiguous in the last dim"),
        ((q.new_zeros(1, 4, 4, 300), k.new_zeros(1, 40, 2, 300), 16),
         "q head dim D must be in"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn(*args)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        fn(q, k, 16, float("nan"))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="k must be on the device of q"):
            fn(q, k.cpu(), 16)
        if impl == "op":
            for bad in (8, 24, 256):
                with pytest.raises(RuntimeError, match="block_size must be 16, 32, 64 or 128"):
                    fn(q, k, bad)


def test_meta_tensors_use_the_fakes():
    """Shape inference without data: the wrappers route meta tensors to the fakes."""
    q = torch.empty(2, 5, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 1000, 2, 64, device="meta", dtype=torch.bfloat16)
    out = ops.flex_estimate(q, k, 128)
    assert [tuple(t.shape) for t in out] == [(2, 8, 8)] * 3
    assert all(t.dtype == torch.float32 and t.device.type == "meta" for t in out)
    d = ops.js_divergence(out[0], out[2])
    assert d.shape == (2, 8) and d.dtype == torch.float32


def test_bench_family_tiny():
    """The bench family runs end to end on a tiny CPU shape, and its checks pass."""
    from tasksieve.evaluation import bench

    mod = bench.load_family("flex_estimate")
    ctx = bench.make_context("cpu", quick=True, ceilings={}, log=lambda *a: None)
    ctx.reps, ctx.warmup = 2, 0
    rows = mod.run(ctx, shapes=[dict(N=200, H=4, Hk=2, D=16, block_size=16)])
    assert [r["case"] for r in rows] == ["flex_estimate", "js_divergence_heads", "select_blocks",
                                         "flex_estimate_paged"]
    assert all("MISMATCH" not in r["check"] for r in rows)
