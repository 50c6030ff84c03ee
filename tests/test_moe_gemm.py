"""expert_gemm and moe_forward: the compiled ops (CPU always, CUDA when visible) against the fp32
references (tasksieve.reference), a plain per-slot loop, the dense MoE and HF's Mixtral experts.

Low-precision rule (flash-attention's): the op's max error vs the fp32 result of the same
low-precision inputs must be within 2x the max error of the same math done in plain torch in the
low dtype, plus one ulp of the output's magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_CUDA, requires_kernel
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import ops
from tasksieve.reference import (
    check_moe_forward_args,
    reference_expert_gemm,
    reference_moe_forward,
)

GEMM, FWD = "expert_gemm", "moe_forward"


def _gemm(*args, **kwargs):
    return torch.ops.tasksieve.expert_gemm.default(*args, **kwargs)


def _fwd(*args, **kwargs):
    return torch.ops.tasksieve.moe_forward.default(*args, **kwargs)


def _dtypes(device):
    return ([torch.float32, torch.bfloat16, torch.float16] if device == "cpu"
            else [torch.bfloat16, torch.float16])


def _block_ms(device):
    return [1, 4, 16, 64] if device == "cpu" else [16, 32, 64]


def random_routing(T, k, E, g):
    """k distinct experts per token, int64 [T, k]."""
    return torch.rand(T, E, generator=g).argsort(dim=-1)[:, :k]


def random_expert_map(E, E_c, g):
    """int32 [E]: E_c random experts kept under random compact ids, the others -1."""
    m = torch.full((E,), -1, dtype=torch.int32)
    kept = torch.randperm(E, generator=g)[:E_c]
    m[kept] = torch.randperm(E_c, generator=g).to(torch.int32)
    return m


def assert_low_precision_close(out, gt, low):
    """max |out - gt| <= 2 max |low - gt| + one ulp of the largest |gt|."""
    assert out.shape == gt.shape
    if gt.numel() == 0:
        return
    eps = torch.finfo(out.dtype).eps
    scale = max(1.0, gt.abs().max().item())
    base = (low.float() - gt).abs().max().item()
    err = (out.float() - gt).abs().max().item()
    assert err <= 2 * base + eps * scale, (err, base)


def loop_moe(x, w13, w2, ids, wts, expert_map=None):
    """The MoE FFN slot by slot in float64: an implementation independent of the reference."""
    T, H = x.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            xt = x[t].double()
            g = w13[e, :I].double() @ xt
            u = w13[e, I:].double() @ xt
            out[t] += float(wts[t, j]) * (w2[e].double() @ (F.silu(g) * u))
    return out


# ---------------------------------------------------------------------------------------------
# expert_gemm


@pytest.mark.parametrize("device", DEVICES)
@given(
    T=st.sampled_from([0, 1, 2, 5, 17, 70]),
    E=st.integers(1, 9),
    kf=st.floats(0.0, 1.0),
    keep=st.floats(0.0, 1.0),
    use_map=st.booleans(),
    K=st.sampled_from([8, 24, 40]),
    n_out=st.sampled_from([8, 12, 24, 40, 56, 72]),
    silu_mul=st.booleans(),
    gather=st.booleans(),
    weighted=st.booleans(),
    ids64=st.booleans(),
    bi=st.integers(0, 3),
    ti=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_expert_gemm_vs_reference(device, T, E, kf, keep, use_map, K, n_out, silu_mul, gather,
                                  weighted, ids64, bi, ti, seed):
    requires_kernel(GEMM, device)
    dtypes, bms = _dtypes(device), _block_ms(device)
    dtype, block_m = dtypes[ti % len(dtypes)], bms[bi % len(bms)]
    g = torch.Generator().manual_seed(seed)
    k = 1 + int(kf * (E - 1))
    E_c = max(1, round(keep * E)) if use_map else E
    ids = random_routing(T, k, E, g).to(torch.int64 if ids64 else torch.int32)
    emap = random_expert_map(E, E_c, g) if use_map else None
    N = 2 * n_out if silu_mul else n_out
    x = torch.randn(T if gather else T * k, K, generator=g)
    w = torch.randn(E_c, N, K, generator=g) / K ** 0.5
    tw = torch.rand(T, k, generator=g) if weighted else None
    to = dict(device=device)
    x, w = x.to(dtype=dtype, **to), w.to(dtype=dtype, **to)
    ids = ids.to(**to)
    emap = emap.to(**to) if emap is not None else None
    tw = tw.to(**to) if tw is not None else None
    align = ops.moe_align(ids, E, block_m, emap)
    act = "silu_mul" if silu_mul else "none"

    y = _gemm(x, w, *align, block_m, k, gather, act, tw)
    assert y.shape == (T * k, n_out) and y.dtype == dtype and y.device == x.device
    gt = reference_expert_gemm(x.float(), w.float(), *align, block_m, k, gather, act,
                               tw.float() if tw is not None else None)
    if dtype == torch.float32:
        torch.testing.assert_close(y, gt, atol=1e-5, rtol=1e-4)
    else:
        low = reference_expert_gemm(x, w, *align, block_m, k, gather, act, tw, dtype=dtype)
        assert_low_precision_close(y, gt, low)
    # Slots of pruned experts are listed by no tile: their rows are exactly 0.
    if emap is not None and T > 0:
        dropped = (emap.long()[ids.long()] < 0).reshape(-1)
        assert (y[dropped] == 0).all()
    # The wrapper gives the same answer.
    torch.testing.assert_close(ops.expert_gemm(x, w, *align, block_m, k, gather, act, tw), y,
                               atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_gemm_skips_unused_tiles(device):
    """Tiles past num_padded and tiles of expert -1 are not computed even when their ids look
    valid; the rows they list stay 0."""
    requires_kernel(GEMM, device)
    dtype = _dtypes(device)[-1]
    bm = 16
    T, k, K, N = 5, 1, 16, 24
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, K, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(2, N, K, generator=g).to(device=device, dtype=dtype)
    ids = torch.full((3 * bm,), T, dtype=torch.int32)
    ids[0:2] = torch.tensor([0, 1])        # tile 0, expert 1
    ids[bm:bm + 2] = torch.tensor([2, 3])  # tile 1, expert -1
    ids[2 * bm] = 4                        # tile 2, expert 0 but past num_padded
    tiles = torch.tensor([1, -1, 0], dtype=torch.int32)
    npad = torch.tensor([2 * bm], dtype=torch.int32)
    args = [t.to(device) for t in (ids, tiles, npad)]
    y = _gemm(x, w, *args, bm, k, True, "none")
    gt = reference_expert_gemm(x.float(), w.float(), *args, bm, k, True, "none")
    assert (y[2:] == 0).all()
    assert (y[:2] != 0).any()
    torch.testing.assert_close(y.float(), gt, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# moe_forward


def _moe_inputs(T, H, I, E, k, dtype, device, g, E_c=None):
    E_c = E if E_c is None else E_c
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E_c, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E_c, H, I, generator=g) / I ** 0.5
    ids = random_routing(T, k, E, g)
    wts = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            ids.to(**to), wts.to(**to))


def check_moe_forward(x, w13, w2, ids, wts, emap=None):
    out = _fwd(x, w13, w2, ids, wts, emap)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    gt = reference_moe_forward(x.float(), w13.float(), w2.float(), ids, wts.float(), emap)
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, gt, atol=1e-5, rtol=1e-4)
    else:
        low = reference_moe_forward(x, w13, w2, ids, wts, emap, dtype=x.dtype)
        assert_low_precision_close(out, gt, low)
    return out, gt


@pytest.mark.parametrize("device", DEVICES)
@given(
    T=st.sampled_from([0, 1, 3, 17, 70]),
    E=st.integers(1, 9),
    kf=st.floats(0.0, 1.0),
    keep=st.floats(0.0, 1.0),
    use_map=st.booleans(),
    H=st.sampled_from([8, 24, 40]),
    I=st.sampled_from([8, 24, 40, 56]),
    ids64=st.booleans(),
    ti=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_moe_forward_vs_reference(device, T, E, kf, keep, use_map, H, I, ids64, ti, seed):
    requires_kernel(FWD, device)
    dtypes = _dtypes(device)
    dtype = dtypes[ti % len(dtypes)]
    g = torch.Generator().manual_seed(seed)
    k = 1 + int(kf * (E - 1))
    E_c = max(1, round(keep * E)) if use_map else E
    x, w13, w2, ids, wts = _moe_inputs(T, H, I, E, k, dtype, device, g, E_c)
    ids = ids.to(torch.int64 if ids64 else torch.int32)
    emap = random_expert_map(E, E_c, g).to(device) if use_map else None
    check_moe_forward(x, w13, w2, ids, wts, emap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k,H,I", [(1, 4, 2, 24, 40), (9, 6, 3, 40, 24), (33, 3, 3, 8, 56),
                                        (5, 4, 2, 136, 72)])
def test_moe_forward_vs_slot_loop(device, T, E, k, H, I):
    """Against the float64 slot-by-slot loop, with and without a pruning map."""
    requires_kernel(FWD, device)
    g = torch.Generator().manual_seed(T + E)
    for dtype in _dtypes(device):
        x, w13, w2, ids, wts = _moe_inputs(T, H, I, E, k, dtype, device, g)
        out, gt = check_moe_forward(x, w13, w2, ids, wts)
        loop = loop_moe(x.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), wts.cpu())
        torch.testing.assert_close(gt.cpu().double(), loop, atol=1e-5, rtol=1e-5)
        emap = random_expert_map(E, max(1, E - 1), g)
        E_c = int((emap >= 0).sum())
        out, gt = check_moe_forward(x, w13[:E_c], w2[:E_c], ids, wts, emap.to(device))
        loop = loop_moe(x.cpu(), w13[:E_c].cpu(), w2[:E_c].cpu(), ids.cpu(), wts.cpu(), emap)
        torch.testing.assert_close(gt.cpu().double(), loop, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_forward_equals_dense_moe(device):
    """Every expert kept: the routed FFN equals the dense MoE (every expert on every token,
    weighted by the router's top-k weights scattered into [T, E], zeros elsewhere)."""
    requires_kernel(FWD, device)
    T, E, k, H, I = 23, 5, 2, 24, 40
    g = torch.Generator().manual_seed(11)
    dtype = _dtypes(device)[0]
    x, w13, w2, _, _ = _moe_inputs(T, H, I, E, k, dtype, device, g)
    logits = torch.randn(T, E, generator=g).to(device)
    probs = torch.softmax(logits, dim=-1)
    wts, ids = torch.topk(probs, k, dim=-1)
    out = _fwd(x, w13, w2, ids, wts)
    gate = torch.zeros(T, E, dtype=torch.float64, device=device).scatter(1, ids, wts.double())
    xd, w13d, w2d = x.double(), w13.double(), w2.double()
    h = F.silu(torch.einsum("th,eih->tei", xd, w13d[:, :I])) * torch.einsum(
        "th,eih->tei", xd, w13d[:, I:])
    dense = torch.einsum("te,tei,ehi->th", gate, h, w2d)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), dense, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_unused_experts_read_no_weights(device):
    """Experts that no token picks, and experts dropped by expert_map, are never read: NaN
    weights there leave the output finite and equal to the reference."""
    requires_kernel(FWD, device)
    T, E, k, H, I = 6, 6, 2, 24, 24
    g = torch.Generator().manual_seed(5)
    dtype = _dtypes(device)[0]
    x, w13, w2, _, wts = _moe_inputs(T, H, I, E, k, dtype, device, g)
    ids = torch.tensor([[0, 2], [2, 0], [0, 4], [4, 2], [0, 2], [2, 4]], device=device)
    w13n, w2n = w13.clone(), w2.clone()
    for e in (1, 3, 5):  # unused experts
        w13n[e] = float("nan")
        w2n[e] = float("nan")
    out = _fwd(x, w13n, w2n, ids, wts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _fwd(x, w13, w2, ids, wts), atol=0, rtol=0)
    # Expert 4 pruned by the map (compact ids: 0 -> 0, 2 -> 1, 4 -> 2 with weights NaN).
    emap = torch.tensor([0, -1, 1, -1, -1, -1], dtype=torch.int32, device=device)
    w13c = torch.stack([w13[0], w13[2], torch.full_like(w13[0], float("nan"))])
    w2c = torch.stack([w2[0], w2[2], torch.full_like(w2[0], float("nan"))])
    out = _fwd(x, w13c, w2c, ids, wts, emap)
    assert torch.isfinite(out).all()
    check_moe_forward(x, w13c[:2], w2c[:2], ids, wts, emap)


def test_compile_fullgraph_moe():
    """align -> expert_gemm (gate/up) -> expert_gemm (down) -> sum, and moe_forward, through
    the Python API in one graph on CPU."""
    g = torch.Generator().manual_seed(13)
    T, E, k, H, I, bm = 9, 4, 2, 16, 24, 16
    x, w13, w2, ids, wts = _moe_inputs(T, H, I, E, k, torch.float32, "cpu", g)

    def moe(x, w13, w2, ids, wts):
        align = ops.moe_align(ids, E, bm)
        h = ops.expert_gemm(x, w13, *align, bm, k, True, "silu_mul")
        y = ops.expert_gemm(h, w2, *align, bm, k, False, "none", wts)
        return y.view(T, k, H).sum(1), ops.moe_forward(x, w13, w2, ids, wts)

    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, dynamic=False)
    got = compiled(x, w13, w2, ids, wts)
    expect = moe(x, w13, w2, ids, wts)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_forward_is_deterministic(device):
    requires_kernel(FWD, device)
    g = torch.Generator().manual_seed(9)
    x, w13, w2, ids, wts = _moe_inputs(70, 40, 24, 8, 3, _dtypes(device)[1], device, g)
    a = _fwd(x, w13, w2, ids, wts)
    b = _fwd(x, w13, w2, ids, wts)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# HF Mixtral parity


def _tiny_mixtral_moe(E=6, k=2, H=32, I=24, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                        num_experts_per_tok=k, initializer_range=0.2,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    return model.model.layers[0].mlp


@pytest.mark.parametrize("device", DEVICES)
def test_moe_forward_matches_hf_mixtral(device):
    requires_kernel(FWD, device)
    mlp = _tiny_mixtral_moe()
    experts = mlp.experts
    for dtype in _dtypes(device)[:2]:
        m = mlp.to(device=device, dtype=dtype)
        x = (torch.randn(19, 32, generator=torch.Generator().manual_seed(1))).to(device, dtype)
        with torch.no_grad():
            _, wts, ids = m.gate(x)
            ref = experts(x, ids, wts)
            block = m(x[None])[0]
            out = ops.moe_forward(x, experts.gate_up_proj, experts.down_proj, ids, wts)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out, block, atol=1e-5, rtol=1e-4)
        else:
            with torch.no_grad():
                gt = reference_moe_forward(x.float(), experts.gate_up_proj.float(),
                                           experts.down_proj.float(), ids, wts.float())
            assert_low_precision_close(out, gt, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_moe_forward_matches_hf_mixtral(device):
    """PreMoe pruning: the router masks the pruned experts before top-k, the weights are
    compacted to the kept experts (expert_map: original -> compact). Equal to HF's experts
    forward (all weights present) on the same routing."""
    requires_kernel(FWD, device)
    E, k = 6, 2
    mlp = _tiny_mixtral_moe(E=E, k=k, seed=2)
    experts = mlp.experts
    kept = torch.tensor([4, 1, 3])
    dtype = _dtypes(device)[0]
    m = mlp.to(device=device, dtype=dtype)
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[kept] = torch.arange(len(kept), dtype=torch.int32)
    x = torch.randn(13, 32, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    with torch.no_grad():
        logits = F.linear(x, m.gate.weight).float()
        mask = torch.ones(E, dtype=torch.bool, device=device)
        mask[kept.to(device)] = False
        probs = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
        wts, ids = torch.topk(probs, k, dim=-1)
        wts = wts / wts.sum(-1, keepdim=True)
        ref = experts(x, ids, wts)
        idx = kept.to(device)
        out = ops.moe_forward(x, experts.gate_up_proj[idx].contiguous(),
                              experts.down_proj[idx].contiguous(), ids, wts, emap.to(device))
    assert set(ids.unique().tolist()) <= set(kept.tolist())
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    else:
        with torch.no_grad():
            gt = reference_moe_forward(x.float(), experts.gate_up_proj.float(),
                                       experts.down_proj.float(), ids, wts.float())
        assert_low_precision_close(out, gt, ref)


# ---------------------------------------------------------------------------------------------
# bad input


def _gemm_case(device, dtype):
    g = torch.Generator().manual_seed(0)
    T, k, E, K, N, bm = 4, 2, 3, 16, 24, 16
    ids = random_routing(T, k, E, g).to(torch.int32).to(device)
    align = ops.moe_align(ids, E, bm)
    x = torch.randn(T, K, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(E, N, K, generator=g).to(device=device, dtype=dtype)
    return dict(x=x, w=w, sorted_ids=align[0], tile_expert=align[1], num_padded=align[2],
                block_m=bm, top_k=k, gather=True, activation="none", topk_weights=None)


def _gemm_call(a):
    return (a["x"], a["w"], a["sorted_ids"], a["tile_expert"], a["num_padded"], a["block_m"],
            a["top_k"], a["gather"], a["activation"], a["topk_weights"])


def _gemm_bad_cases(device):
    """(name, mutation of the valid arguments, message), the message naming the argument."""
    cases = [
        ("w dtype", lambda a: a.update(w=a["w"].double()), "w must have the dtype of x"),
        ("w K", lambda a: a.update(w=a["w"][..., :8].contiguous()),
         r"w must have shape \[E_c, N, K\]"),
        ("w 2-D", lambda a: a.update(w=a["w"][0]), "w must be 3-D"),
        ("x 3-D", lambda a: a.update(x=a["x"][None]), "x must be 2-D"),
        ("x int", lambda a: a.update(x=a["x"].int(), w=a["w"].int()),
         "x must be float32, float16 or bfloat16"),
        ("odd N silu", lambda a: a.update(w=a["w"][:, :23].contiguous(), activation="silu_mul"),
         "even number of rows"),
        ("activation", lambda a: a.update(activation="gelu"), "activation must be 'none'"),
        ("top_k", lambda a: a.update(top_k=0), "top_k must be >= 1"),
        ("no-gather rows", lambda a: a.update(gather=False, x=a["x"][:3]),
         "x must have T\\*top_k rows"),
        ("sorted_ids dtype", lambda a: a.update(sorted_ids=a["sorted_ids"].long()),
         "sorted_ids must be a 1-D int32"),
        ("sorted_ids length", lambda a: a.update(sorted_ids=a["sorted_ids"][:-1]),
         "sorted_ids length must be a multiple of block_m"),
        ("tile_expert length", lambda a: a.update(tile_expert=a["tile_expert"][:-1]),
         "tile_expert must be a 1-D int32 tensor of"),
        ("num_padded", lambda a: a.update(num_padded=a["num_padded"].long()),
         "num_padded must be an int32 tensor of one element"),
        ("topk_weights shape", lambda a: a.update(topk_weights=torch.ones(4, 3,
                                                                          device=device)),
         r"topk_weights must have shape \[T, top_k\]"),
    ]
    if device == "cpu":  # value checks need the data on the host: CPU only
        cases += [
            ("tile expert value", lambda a: a["tile_expert"].__setitem__(0, 3),
             r"tile_expert values must be in \[-1, E_c = 3\)"),
            ("slot value", lambda a: a["sorted_ids"].__setitem__(0, 99),
             "sorted_ids values must be slot ids"),
            ("num_padded value", lambda a: a["num_padded"].fill_(10**6),
             "num_padded must be in"),
        ]
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_expert_gemm_bad_input(device):
    requires_kernel(GEMM, device)
    dtype = _dtypes(device)[-1]
    for name, mutate, msg in _gemm_bad_cases(device):
        a = _gemm_case(device, dtype)
        mutate(a)
        with pytest.raises(RuntimeError, match=msg):
            _gemm(*_gemm_call(a))
        if device == "cpu":  # the reference (the wrapper's fallback) says the same
            with pytest.raises(RuntimeError, match=msg):
                reference_expert_gemm(*_gemm_call(a))


def _fwd_case(device, dtype):
    g = torch.Generator().manual_seed(1)
    x, w13, w2, ids, wts = _moe_inputs(5, 16, 24, 4, 2, dtype, device, g)
    return dict(x=x, w13=w13, w2=w2, topk_ids=ids, topk_weights=wts, expert_map=None)


def _fwd_bad_cases(device):
    cases = [
        ("w13 odd rows", lambda a: a.update(w13=a["w13"][:, :47].contiguous()),
         r"w13 must have shape \[E_c, 2I, H\]"),
        ("w13 H", lambda a: a.update(w13=a["w13"][..., :8].contiguous()),
         r"w13 must have shape \[E_c, 2I, H\]"),
        ("w13 dtype", lambda a: a.update(w13=a["w13"].double()), "w13 must have the dtype of x"),
        ("w2 shape", lambda a: a.update(w2=a["w2"][..., :8].contiguous()),
         r"w2 must have shape \[E_c, H, I\] = \[4, 16, 24\]"),
        ("w2 experts", lambda a: a.update(w2=a["w2"][:3]), r"w2 must have shape \[E_c, H, I\]"),
        ("w2 dtype", lambda a: a.update(w2=a["w2"].double()), "w2 must have the dtype of x"),
        ("x 3-D", lambda a: a.update(x=a["x"][None]), r"x must be 2-D \[T, H\]"),
        ("ids dtype", lambda a: a.update(topk_ids=a["topk_ids"].float()),
         "topk_ids must be int32 or int64"),
        ("ids T", lambda a: a.update(topk_ids=a["topk_ids"][:4]),
         r"topk_ids must have shape \[T, k\]"),
        ("weights shape", lambda a: a.update(topk_weights=a["topk_weights"][:, :1]),
         "topk_weights must have the shape of topk_ids"),
        ("weights dtype", lambda a: a.update(topk_weights=a["topk_weights"].long()),
         "topk_weights must be float32, float16 or bfloat16"),
        ("map dtype", lambda a: a.update(expert_map=torch.arange(4, device=device)),
         "expert_map must be a non-empty 1-D int32"),
    ]
    if device == "cpu":
        cases += [
            ("ids range", lambda a: a["topk_ids"].__setitem__((2, 1), 4),
             r"topk_ids values must be in \[0, num_experts = 4\)"),
            ("ids negative", lambda a: a["topk_ids"].__setitem__((0, 0), -1),
             "topk_ids values must be in"),
            ("ids range with map", lambda a: a.update(
                expert_map=torch.tensor([0, 1], dtype=torch.int32)),
             r"topk_ids values must be in \[0, num_experts = 2\) \(expert_map's length\)"),
            ("map values", lambda a: a.update(
                expert_map=torch.tensor([0, 1, 2, 7], dtype=torch.int32)),
             r"expert_map values must be in \[-1, E_c = 4\)"),
        ]
    else:
        cases.append(("fp32 on CUDA", lambda a: a.update(
            x=a["x"].float(), w13=a["w13"].float(), w2=a["w2"].float()),
            "x must be float16 or bfloat16 on CUDA"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_moe_forward_bad_input(device):
    requires_kernel(FWD, device)
    dtype = _dtypes(device)[-1]
    for name, mutate, msg in _fwd_bad_cases(device):
        a = _fwd_case(device, dtype)
        mutate(a)
        args = (a["x"], a["w13"], a["w2"], a["topk_ids"], a["topk_weights"], a["expert_map"])
        with pytest.raises(RuntimeError, match=msg):
            _fwd(*args)
        if device == "cpu":
            with pytest.raises(RuntimeError, match=msg):
                reference_moe_forward(*args)


def test_moe_forward_wrong_device():
    """Arguments on another device than x are named. The reference checks it everywhere; the
    CUDA op when a GPU is visible."""
    a = _fwd_case("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="w13 must be on the device of x"):
        check_moe_forward_args(a["x"], a["w13"].to("meta"), a["w2"], a["topk_ids"],
                               a["topk_weights"])
    if HAS_CUDA:
        b = _fwd_case("cuda", torch.bfloat16)
        with pytest.raises(RuntimeError, match="w2 must be on the device of x"):
            _fwd(b["x"], b["w13"], b["w2"].cpu(), b["topk_ids"], b["topk_weights"])
        with pytest.raises(RuntimeError, match="topk_ids must be on the device of x"):
            _fwd(b["x"], b["w13"], b["w2"], b["topk_ids"].cpu(), b["topk_weights"])
        c = _gemm_case("cuda", torch.bfloat16)
        c["sorted_ids"] = c["sorted_ids"].cpu()
        with pytest.raises(RuntimeError, match="sorted_ids must be on the device of x"):
            _gemm(*_gemm_call(c))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    """T = 0 is valid: empty outputs of the right shape."""
    for op in (GEMM, FWD):
        requires_kernel(op, device)
    dtype = _dtypes(device)[0]
    x = torch.empty(0, 16, device=device, dtype=dtype)
    w13 = torch.randn(3, 48, 16).to(device=device, dtype=dtype)
    w2 = torch.randn(3, 16, 24).to(device=device, dtype=dtype)
    ids = torch.empty(0, 2, dtype=torch.int32, device=device)
    wts = torch.empty(0, 2, device=device)
    out = _fwd(x, w13, w2, ids, wts)
    assert out.shape == (0, 16) and out.dtype == dtype
    align = ops.moe_align(ids, 3, 16)
    y = _gemm(x, w13, *align, 16, 2, True, "silu_mul", wts)
    assert y.shape == (0, 24) and y.dtype == dtype


# ---------------------------------------------------------------------------------------------
# benchmark family (bench/bench_moe.py) on tiny shapes, so it cannot rot


def test_moe_bench_tiny_run(tmp_path):
    from tasksieve.evaluation import bench

    tiny = [dict(name="mixtral-like", E=4, k=2, H=32, I=48, tokens=(1, 16, 8192))]
    ceilings = {"copy_gbps": 10.0, "matmul_tflops": 0.1, "rows": []}
    res = bench.run_benchmarks("cpu", quick=True, only=["moe"], out=tmp_path, ceilings=ceilings,
                               family_kwargs={"moe": {"shapes": tiny}}, plot=False,
                               log=lambda *a: None)
    assert not res["errors"], res["errors"]
    rows = [r for r in res["rows"] if r["family"] == "moe"]
    timed = [r for r in rows if r.get("base_ms") not in (None, "")]
    # 3 keeps x 2 token counts x 2 baselines, and the 50% vs 100% ratio row
    assert len(timed) == 3 * 2 * 2 + 1
    assert any("skipped on CPU" in r["note"] for r in rows if "T8192" in r["case"])
    for r in timed:
        assert r["ms"] > 0 and r["speedup"] > 0
        if r["kind"] == "speedup":
            assert float(r["check"].split()[-1]) < 5e-2, r["check"]  # the op agrees with both
            assert r["tflops"] > 0 and r["gbps"] > 0
    assert any(r["kind"] == "ratio" and "target" in r["check"] for r in timed)


@pytest.mark.parametrize("threads", [1, 2])
def test_moe_forward_under_inference_mode_with_weights_that_require_grad(threads):
    """HF parameters require grad; generate() runs under inference_mode. The CPU kernel's worker
    threads must not re-enter autograd around at::mm (they do not inherit the caller's state)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        E, H, I, k = 16, 64, 32, 4
        w13 = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=gen) * 0.05)
        w2 = torch.nn.Parameter(torch.randn(E, H, I, generator=gen) * 0.05)
        with torch.inference_mode():
            for T in (4, 16, 64):  # decode-sized and prefill-sized groups
                x = torch.randn(T, H, generator=gen)
                w, ids = ops.route_topk(torch.randn(T, E, generator=gen), k, scoring="softmax", renormalize=True)
                out = ops.moe_forward(x, w13, w2, ids, w)
                expect = ops.moe_forward(x, w13.detach(), w2.detach(), ids, w)
                torch.testing.assert_close(out, expect)
    finally:
        torch.set_num_threads(old)
