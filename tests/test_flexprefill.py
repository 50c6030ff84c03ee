"""FlexPrefill end to end (tasksieve.flexprefill): gamma = 1 equals dense causal attention (out and
lse), the pipeline is consistent with its ops (block sets from select_blocks on the estimate and
the pooled map, output = block_sparse_attention reference on those sets), the pooled query-aware
map against a loop reference, the tau decision, chunked prefill, N not a multiple of the block
size, GQA, the dense fallback, budgets in tokens, bad inputs, and torch.compile(fullgraph=True).

CPU always; the same cases on CUDA when a GPU is visible (``device`` parametrization).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from tasksieve import FlexPrefill, flex_prefill_attention, ops
from tasksieve import reference as ref
from tasksieve.methods.flexprefill import FlexPattern, flex_qa_map, pattern_report


def _qkv(B, Nq, Nk, H, Hk, D, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=g)
    k = torch.randn(B, Nk, Hk, D, generator=g)
    v = torch.randn(B, Nk, Hk, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _dense(q, k, v, scale=None):
    """Causal (bottom-right aligned) attention in fp32 with SDPA + its lse, GQA by repeat."""
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    s = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(G, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(G, dim=1)
    mask = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
    out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=s)
    lse = torch.logsumexp((qf @ kf.transpose(-1, -2) * s).masked_fill(~mask, float("-inf")), dim=-1)
    return out.transpose(1, 2), lse


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Nq,Nk,H,Hk,bs", [
    (1, 64, 64, 2, 2, 16),    # MHA, N multiple of bs
    (2, 100, 100, 4, 2, 16),  # GQA 2, N not a multiple of bs
    (1, 77, 150, 8, 2, 32),   # GQA 4, chunked prefill (Nq < Nk)
    (2, 130, 200, 4, 1, 64),  # MQA, chunked
])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_gamma_one_equals_dense(device, B, Nq, Nk, H, Hk, bs, tau):
    for dtype in _dtypes(device):
        q, k, v = _qkv(B, Nq, Nk, H, Hk, 32, seed=Nq + Nk, device=device, dtype=dtype)
        out, lse, pat = flex_prefill_attention(q, k, v, gamma=1.0, tau=tau, block_size=bs,
                                               dense_below=0, return_pattern=True)
        assert not pat.dense
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32
        want_out, want_lse = _dense(q, k, v)
        torch.testing.assert_close(out.float(), want_out, **_tol(dtype))
        torch.testing.assert_close(lse, want_lse, **_tol(dtype))
        assert float(pat.ratio()) == 1.0
        assert torch.equal(pat.head_ratio(), torch.ones(B, H, device=device))
        assert bool(pat.is_query_aware.all()) == (tau == 1.0)
        assert not bool(pat.is_query_aware.any()) or tau == 1.0


def _qa_map_loop(q, k, bs, scale):
    """Loop reference of the pooled map: per (b, h, r), softmax over causal blocks c <= d(r)."""
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    nb, nbq = -(-Nk // bs), -(-Nq // bs)
    d = ref.select_diag_blocks(Nq, Nk, bs)
    out = torch.zeros(B, H, nbq, nb, dtype=torch.float64)
    q, k = q.double().cpu(), k.double().cpu()
    for b in range(B):
        for h in range(H):
            for r in range(nbq):
                qbar = q[b, r * bs:(r + 1) * bs, h].mean(0) * scale
                logits = torch.stack([qbar @ k[b, c * bs:(c + 1) * bs, h // G].mean(0)
                                      for c in range(int(d[r]) + 1)])
                out[b, h, r, :int(d[r]) + 1] = torch.softmax(logits, 0)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Nq,Nk,H,Hk,bs", [(40, 40, 2, 2, 16), (50, 93, 4, 1, 16),
                                           (33, 200, 8, 2, 32)])
def test_qa_map_vs_loop(device, Nq, Nk, H, Hk, bs):
    q, k, _ = _qkv(2, Nq, Nk, H, Hk, 16, seed=7, device=device)
    got = flex_qa_map(q, k, bs, 0.3)
    assert got.shape == (2, H, -(-Nq // bs), -(-Nk // bs)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), _qa_map_loop(q, k, bs, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Nq,Nk,H,Hk,bs,gamma,tau", [
    (1, 128, 128, 4, 4, 16, 0.5, 0.1),
    (2, 100, 160, 4, 2, 16, 0.7, 0.15),
    (1, 90, 300, 8, 2, 32, 0.3, 0.2),
    (2, 200, 200, 4, 1, 16, 0.9, 0.16),
])
def test_pipeline_is_consistent(device, B, Nq, Nk, H, Hk, bs, gamma, tau):
    """The returned pattern is select_blocks of the estimate; out/lse are the attention over it."""
    q, k, v = _qkv(B, Nq, Nk, H, Hk, 32, seed=B * Nk + Nq, device=device)
    # structured keys (a few strong sink/local keys) so some heads get sparse patterns
    k[:, :4] *= 3.0
    out, lse, pat = flex_prefill_attention(q, k, v, gamma=gamma, tau=tau, block_size=bs,
                                           dense_below=0, return_pattern=True)
    vertical, slash, est = ops.flex_estimate(q, k, bs)
    jsd = ops.js_divergence(est, vertical)
    torch.testing.assert_close(pat.js_distance, jsd)
    assert torch.equal(pat.is_query_aware, jsd < tau)
    idx, cnt = ops.select_blocks(vertical, slash, flex_qa_map(q, k, bs), jsd < tau, Nq, Nk, bs,
                                 gamma, 1, 2**31 - 1)
    assert torch.equal(pat.block_idx, idx) and torch.equal(pat.block_cnt, cnt)
    want_out, want_lse = ref.reference_block_sparse_attention(q, k, v, idx, cnt, bs)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    ratio = float(pat.ratio())
    assert 0.0 < ratio <= 1.0
    hr = pat.head_ratio()
    assert hr.shape == (B, H) and bool(((hr > 0) & (hr <= 1)).all())
    rep = pattern_report(pat)
    assert rep["ratio"] == pytest.approx(ratio)
    assert rep["computed_blocks"] == int(cnt.sum())
    assert rep["computed_blocks"] <= rep["causal_blocks"]
    assert rep["dense"] is False and rep["js_distance"] is not None


def test_sparse_selection_is_sparse_and_follows_gamma():
    """A peaked input at small gamma computes fewer blocks than at gamma = 1 (ratio < 1)."""
    q, k, v = _qkv(1, 256, 256, 4, 2, 32, seed=3)
    k[:, 0] *= 8.0  # a strong sink: most mass on block 0
    ratios = []
    for gamma in (0.3, 0.9, 1.0):
        _, _, pat = flex_prefill_attention(q, k, v, gamma=gamma, tau=0.0, block_size=16,
                                           return_pattern=True)
        ratios.append(float(pat.ratio()))
    assert 0 < ratios[0] <= ratios[1] <= ratios[2] == 1.0
    assert ratios[0] < 1.0


def test_tau_decides_the_pattern():
    q, k, v = _qkv(2, 96, 96, 8, 2, 16, seed=11)
    _, _, p0 = flex_prefill_attention(q, k, v, gamma=0.8, tau=0.0, block_size=16, return_pattern=True)
    _, _, p1 = flex_prefill_attention(q, k, v, gamma=0.8, tau=1.0, block_size=16, return_pattern=True)
    assert not bool(p0.is_query_aware.any())  # sqrt(JSD) >= 0: nothing is < 0
    assert bool(p1.is_query_aware.all())  # sqrt(JSD) <= sqrt(ln 2) < 1
    d = p0.js_distance
    assert bool(((d >= 0) & (d <= math.sqrt(math.log(2)) + 1e-6)).all())
    tau = float(d.median())
    _, _, pm = flex_prefill_attention(q, k, v, gamma=0.8, tau=tau, block_size=16, return_pattern=True)
    assert torch.equal(pm.is_query_aware, d < tau)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 300), (20, 20), (31, 400)])
def test_dense_fallback(Nq, Nk):
    """Decode and short inputs run dense (exact causal attention, bottom-right aligned, with lse)."""
    q, k, v = _qkv(2, Nq, Nk, 4, 2, 16, seed=Nq + Nk)
    out, lse, pat = flex_prefill_attention(q, k, v, gamma=0.5, tau=0.1, block_size=16,
                                           return_pattern=True)  # dense_below = 32
    assert pat.dense and pat.js_distance is None and not bool(pat.is_query_aware.any())
    want_out, want_lse = _dense(q, k, v)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    assert float(pat.ratio()) == 1.0
    assert pattern_report(pat)["dense"] is True


def test_dense_below_default_and_override():
    assert FlexPrefill(block_size=16).dense_threshold == 32
    assert FlexPrefill(block_size=16, min_budget=100).dense_threshold == 100
    assert FlexPrefill(block_size=16, dense_below=5).dense_threshold == 5
    q, k, v = _qkv(1, 40, 40, 2, 2, 16, seed=1)
    *_, pat = flex_prefill_attention(q, k, v, block_size=16, min_budget=48, return_pattern=True)
    assert pat.dense  # 40 < max(32, 48)
    *_, pat = flex_prefill_attention(q, k, v, block_size=16, min_budget=48, dense_below=40,
                                     return_pattern=True)
    assert not pat.dense


def test_budgets_are_tokens_converted_by_ceil():
    assert FlexPrefill(block_size=64, min_budget=100, max_budget=130).budget_blocks() == (2, 3)
    assert FlexPrefill(block_size=16, min_budget=1024).budget_blocks() == (64, 2**31 - 1)
    assert FlexPrefill(block_size=128).budget_blocks() == (1, 2**31 - 1)
    assert FlexPrefill(block_size=32, max_budget=0).budget_blocks() == (0, 0)
    # min_budget covering the whole prompt on a vertical-slash head selects every causal block
    q, k, v = _qkv(1, 96, 96, 2, 1, 16, seed=5)
    *_, pat = flex_prefill_attention(q, k, v, gamma=0.1, tau=0.0, block_size=16, min_budget=96,
                                     dense_below=0, return_pattern=True)
    assert float(pat.ratio()) == 1.0
    # max_budget 0: only column 0 and the diagonal remain
    *_, pat = flex_prefill_attention(q, k, v, gamma=1.0, tau=0.0, block_size=16, max_budget=0,
                                     dense_below=0, return_pattern=True)
    d = ref.select_diag_blocks(96, 96, 16)
    assert torch.equal(pat.block_cnt[0, 0].long(), torch.clamp(d + 1, max=2))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_hf_layout_views(device):
    """HF passes [B, heads, N, D]; its transposed views give the same result as contiguous inputs."""
    q, k, v = _qkv(2, 90, 90, 4, 2, 16, seed=4, device=device)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    a = flex_prefill_attention(q, k, v, gamma=0.6, tau=0.2, block_size=16, return_pattern=True)
    b = flex_prefill_attention(qt, kt, vt, gamma=0.6, tau=0.2, block_size=16, return_pattern=True)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-6)
    assert torch.equal(a[2].block_idx, b[2].block_idx)
    torch.testing.assert_close(flex_qa_map(q, k, 16), flex_qa_map(qt, kt, 16))


def test_method_matches_function():
    q, k, v = _qkv(1, 80, 80, 4, 2, 16, seed=9)
    fp = FlexPrefill(gamma=0.7, tau=0.2, block_size=16, dense_below=0)
    a = fp.attention(q, k, v, scale=0.2)
    b = flex_prefill_attention(q, k, v, gamma=0.7, tau=0.2, block_size=16, dense_below=0, scale=0.2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs,field", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"), (dict(gamma=float("nan")), "gamma"),
    (dict(gamma="0.9"), "gamma"), (dict(tau=-0.1), "tau"), (dict(tau=float("inf")), "tau"),
    (dict(block_size=100), "block_size"), (dict(block_size=256), "block_size"),
    (dict(block_size=True), "block_size"), (dict(min_budget=-1), "min_budget"),
    (dict(max_budget=-5), "max_budget"), (dict(min_budget=1.5), "min_budget"),
    (dict(min_budget=512, max_budget=256), "max_budget"), (dict(dense_below=-1), "dense_below"),
])
def test_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=f"FlexPrefill.{field}"):
        FlexPrefill(**kwargs)
    q, k, v = _qkv(1, 8, 8, 2, 1, 16, seed=0)
    with pytest.raises(ValueError, match=f"flex_prefill_attention.{field}"):
        flex_prefill_attention(q, k, v, **kwargs)


def test_mutated_settings_revalidate():
    fp = FlexPrefill()
    fp.gamma = 2.0
    with pytest.raises(ValueError, match="FlexPrefill.gamma"):
        fp.validate()


@pytest.mark.parametrize("shapes,msg", [
    (((1, 8, 2, 16), (1, 8, 2), (1, 8, 2, 16)), "k must be a 4-D"),
    (((1, 8, 2, 16), (1, 8, 2, 16), (1, 9, 2, 16)), "v must have the shape of k"),
    (((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "must divide the query heads"),
    (((1, 9, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "must be <= the k length"),
    (((2, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 16)), r"k must be \[B=2"),
    (((1, 8, 2, 16), (1, 8, 2, 8), (1, 8, 2, 8)), r"D=16"),
])
def test_bad_tensors(shapes, msg):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=msg):
        flex_prefill_attention(q, k, v, block_size=16)


def test_pattern_report_rejects_non_pattern():
    with pytest.raises(ValueError, match="FlexPattern"):
        pattern_report({"ratio": 1.0})


def test_compile_fullgraph():
    """The whole pipeline (estimate -> JSD -> pooled map -> select -> attention) and the dense
    fallback trace into one graph each, with no graph break or host sync. The aot_eager backend
    checks the full trace (fakes included) without inductor's C++ build, keeping this fast."""
    q, k, v = _qkv(2, 100, 150, 4, 2, 16, seed=2)

    def sparse(q, k, v):
        return flex_prefill_attention(q, k, v, gamma=0.8, tau=0.2, block_size=16, dense_below=0,
                                      return_pattern=True)

    def dense(q, k, v):
        return flex_prefill_attention(q[:, -1:], k, v, gamma=0.8, tau=0.2, block_size=16)

    for fn in (sparse, dense):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")(q, k, v)
        want = fn(q, k, v)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        if fn is sparse:
            assert isinstance(got[2], FlexPattern)
            assert torch.equal(got[2].block_idx, want[2].block_idx)
            assert torch.equal(got[2].block_cnt, want[2].block_cnt)
    torch._dynamo.reset()
