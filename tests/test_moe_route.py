"""PreMoe routing ops: tcess_update, route_topk, moe_align against tasksieve.reference.

Random shapes by hypothesis (T in {0, 1, odd}, E up to 70, every k, every option), untied
logits so the selected ids must match exactly; moe_align is also checked against its contract
directly (not only against the reference). The HF router conventions of
tasksieve.moe_conventions are pinned against the transformers router modules themselves.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import DEVICES, requires_kernel
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import ops
from tasksieve import reference as R
from tasksieve.integrations.hf.moe_conventions import ROUTER_CONVENTIONS, router_convention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _untied_logits(g, T, E, dtype, device):
    """[T, E] logits, every row a permutation of distinct values exactly representable in bf16
    and fp16 (multiples of 1/8 below 16), so no two experts of a row tie in any dtype."""
    rows = [torch.randperm(E, generator=g) for _ in range(T)]
    z = torch.stack(rows).float() if T else torch.empty(0, E)
    z = (z - E / 2) / 8
    return z.to(dtype=dtype, device=device)


def _keep_mask(g, E, k, device):
    """A random bool [E] keeping at least k experts."""
    n_keep = int(torch.randint(k, E + 1, (1,), generator=g))
    mask = torch.zeros(E, dtype=torch.bool)
    mask[torch.randperm(E, generator=g)[:n_keep]] = True
    return mask.to(device)


# ---------------------------------------------------------------------------------------------
# route_topk
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@given(T=st.sampled_from([0, 1, 3, 7, 33]), E=st.integers(1, 70), data=st.data(),
       scoring=st.sampled_from(R.ROUTE_SCORINGS), renormalize=st.booleans(),
       use_mask=st.booleans(), use_bias=st.booleans(), mask_full=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_route_topk_matches_reference(device, T, E, data, scoring, renormalize, use_mask,
                                      use_bias, mask_full, dtype, seed):
    requires_kernel("route_topk", device)
    k = data.draw(st.integers(1, E), label="top_k")
    scaling = data.draw(st.sampled_from([1.0, 2.5]), label="scaling")
    g = torch.Generator().manual_seed(seed)
    z = _untied_logits(g, T, E, dtype, device)
    keep = _keep_mask(g, E, k, device) if use_mask else None
    bias = torch.randn(E, generator=g).to(device) if use_bias else None
    args = (z, k, scoring, renormalize, keep, bias, scaling, mask_full)
    w, ids = ops.route_topk(*args)
    ew, eids = R.reference_route_topk(*args)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (T, k)
    assert torch.equal(ids.cpu(), eids.cpu())
    torch.testing.assert_close(w.cpu(), ew.cpu(), rtol=2e-6, atol=2e-6)
    if keep is not None and T:
        assert keep.cpu()[ids.cpu().long()].all(), "a pruned expert was selected"


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_strided_logits(device):
    requires_kernel("route_topk", device)
    g = torch.Generator().manual_seed(3)
    z = _untied_logits(g, 9, 12, torch.float32, device).t().contiguous().t()  # column-major
    bias = torch.randn(12, generator=g).to(device)
    for scoring in R.ROUTE_SCORINGS:
        got = ops.route_topk(z, 3, scoring, True, None, bias)
        want = R.reference_route_topk(z.contiguous(), 3, scoring, True, None, bias)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_ties_go_to_lower_id(device):
    requires_kernel("route_topk", device)
    z = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    for scoring in R.ROUTE_SCORINGS:
        _, ids = ops.route_topk(z, 3, scoring)
        assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    keep = torch.tensor([True, False, True, True, True], device=device)
    _, ids = ops.route_topk(z, 3, "softmax", keep_mask=keep)
    assert ids.tolist() == [[2, 4, 0], [0, 2, 3]]


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_pruning_semantics(device):
    """Masking = slicing the router rows; mask_full keeps the unpruned probabilities."""
    requires_kernel("route_topk", device)
    g = torch.Generator().manual_seed(5)
    T, E, k = 17, 10, 3
    z = _untied_logits(g, T, E, torch.float32, device) + 0.01 * torch.randn(T, E, generator=g
                                                                          ).to(device)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device=device)
    kept_ids = keep.nonzero().flatten()
    for scoring in R.ROUTE_SCORINGS:
        for renorm in (False, True):
            w, ids = ops.route_topk(z, k, scoring, renorm, keep)
            ws, ids_s = ops.route_topk(z[:, kept_ids].contiguous(), k, scoring, renorm)
            assert torch.equal(ids.long(), kept_ids[ids_s.long()])
            torch.testing.assert_close(w, ws)
    w_full, ids = ops.route_topk(z, k, "softmax", False, keep, mask_full=True)
    torch.testing.assert_close(w_full, torch.softmax(z, -1).gather(1, ids.long()))
    w_sliced, _ = ops.route_topk(z, k, "softmax", False, keep)
    assert (w_sliced > w_full).all()  # a smaller denominator
    # With renormalisation both choices agree.
    torch.testing.assert_close(ops.route_topk(z, k, "softmax", True, keep, mask_full=True)[0],
                               ops.route_topk(z, k, "softmax", True, keep)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_bias_selects_but_does_not_weigh(device):
    """DeepSeek-V3: sigmoid scores, bias for the choice only, renormalised, x scaling."""
    requires_kernel("route_topk", device)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=device)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0], device=device)
    w, ids = ops.route_topk(z, 2, "sigmoid", True, None, bias, scaling=2.5)
    assert ids.tolist() == [[3, 0]]
    s = torch.sigmoid(z[0, [3, 0]])
    torch.testing.assert_close(w[0], 2.5 * s / s.sum())


# ---------------------------------------------------------------------------------------------
# tcess_update
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@given(T=st.sampled_from([0, 1, 5, 33]), E=st.integers(1, 70), data=st.data(),
       r=st.sampled_from([-1.0, 0.0, 0.2, 0.5, 1.0]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_tcess_update_matches_reference(device, T, E, data, r, dtype, seed):
    requires_kernel("tcess_update", device)
    k = data.draw(st.integers(1, E), label="top_k")
    g = torch.Generator().manual_seed(seed)
    z = _untied_logits(g, T, E, dtype, device)
    acc0 = torch.randn(E, generator=g, dtype=torch.float64).to(device)
    count0 = torch.tensor([int(torch.randint(0, 100, (1,), generator=g))], device=device)
    acc, count = acc0.clone(), count0.clone()
    assert ops.tcess_update(z, k, r, acc, count) is None
    eacc, ecount = acc0.clone(), count0.clone()
    R.reference_tcess_update(z, k, r, eacc, ecount)
    torch.testing.assert_close(acc, eacc, rtol=1e-12, atol=1e-9)
    assert torch.equal(count, ecount) and int(count) == int(count0) + T


@pytest.mark.parametrize("device", DEVICES)
def test_tcess_update_published_default(device):
    """k = 1, r = -1: acc = sum of each token's top-1 raw logit, at its expert."""
    requires_kernel("tcess_update", device)
    z = torch.tensor([[0.5, -2.0, 0.1], [-1.0, -3.0, -0.5], [0.2, 0.9, 0.9]], device=device)
    acc = torch.zeros(3, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)
    ops.tcess_update(z, 1, -1.0, acc, count)
    ops.tcess_update(z[:2], 1, -1.0, acc, count)
    assert count.tolist() == [5]
    # Token 3 ties experts 1 and 2 at 0.9: the lower id wins. Sums in fp64 of fp32 logits.
    want = torch.tensor([0.5 + 0.5, float(torch.tensor(0.9)), -0.5 - 0.5], dtype=torch.float64)
    assert torch.equal(acc.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_tcess_update_threshold_and_strided_acc(device):
    requires_kernel("tcess_update", device)
    z = torch.tensor([[2.0, 0.0, 1.0, -5.0]], device=device)  # k=3: p ~ [0.665, 0.090, 0.245]
    base = torch.zeros(4, 2, dtype=torch.float64, device=device)
    acc = base[:, 1]  # non-contiguous, updated in place
    count = torch.zeros(1, dtype=torch.int64, device=device)
    ops.tcess_update(z, 3, 0.2, acc, count)
    assert base[:, 1].tolist() == [2.0, 0.0, 1.0, 0.0] and base[:, 0].abs().sum() == 0
    ops.tcess_update(z, 3, 0.5, acc, count)
    assert base[:, 1].tolist() == [4.0, 0.0, 1.0, 0.0] and count.tolist() == [2]


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------

def _check_align_contract(ids, E, bm, emap, sorted_ids, tiles, num_padded):
    """moe_align's contract, checked directly from topk_ids (independent of the reference)."""
    ids, sorted_ids, tiles = ids.cpu().long(), sorted_ids.cpu().long(), tiles.cpu().long()
    T, k = ids.shape
    S = T * k
    P = -(-(S + E * (bm - 1)) // bm) * bm
    assert sorted_ids.shape == (P,) and tiles.shape == (P // bm,)
    npad = int(num_padded.item())
    assert npad % bm == 0 and 0 <= npad <= P
    compact = ids.flatten() if emap is None else emap.cpu().long()[ids.flatten()]
    expect_rows = []
    for c in range(E):
        slots = (compact == c).nonzero().flatten().tolist()  # ascending
        if slots:
            run = slots + [S] * (-len(slots) % bm)
            expect_rows += run
    assert sorted_ids[:npad].tolist() == expect_rows
    assert (sorted_ids[npad:] == S).all()
    for t in range(P // bm):
        rows = sorted_ids[t * bm:(t + 1) * bm]
        if t < npad // bm:
            real = rows[rows < S]
            assert real.numel() > 0 and (compact[real] == tiles[t]).all()
        else:
            assert tiles[t] == -1


@pytest.mark.parametrize("device", DEVICES)
@given(T=st.sampled_from([0, 1, 3, 8, 33]), E=st.integers(1, 70), k=st.integers(1, 6),
       block_m=st.sampled_from([1, 4, 16, 64]), use_map=st.booleans(),
       id_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**16))
def test_moe_align_matches_reference(device, T, E, k, block_m, use_map, id_dtype, seed):
    requires_kernel("moe_align", device)
    g = torch.Generator().manual_seed(seed)
    # Skewed ids: a few hot experts, so runs of several tiles occur next to empty experts.
    hot = torch.randint(0, E, (T, k), generator=g) % max(1, E // 3)
    cold = torch.randint(0, E, (T, k), generator=g)
    ids = torch.where(torch.rand(T, k, generator=g) < 0.5, hot, cold).to(id_dtype).to(device)
    emap = None
    if use_map:
        perm = torch.randperm(E, generator=g)
        emap = torch.where(torch.rand(E, generator=g) < 0.3, -1, perm).to(torch.int32)
        emap = emap.to(device)
    got = ops.moe_align(ids, E, block_m, emap)
    want = R.reference_moe_align(ids, E, block_m, emap)
    for a, b in zip(got, want):
        assert a.dtype == torch.int32 and a.device == ids.device
        assert torch.equal(a.cpu(), b.cpu())
    _check_align_contract(ids, E, block_m, emap, *got)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_vllm_docstring_example(device):
    """vLLM's moe_align_block_size docstring example, with our (identical) ordering."""
    requires_kernel("moe_align", device)
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32,
                       device=device)
    sorted_ids, tiles, num_padded = ops.moe_align(ids, 5, 4)
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert sorted_ids.numel() == 28 and (sorted_ids[16:] == 12).all()
    assert tiles.tolist() == [1, 2, 3, 4, -1, -1, -1]
    assert num_padded.tolist() == [16]
    emap = torch.tensor([-1, -1, 0, 1, -1], dtype=torch.int32, device=device)  # keep 2 and 3
    sorted_ids, tiles, num_padded = ops.moe_align(ids.long(), 5, 4, emap)
    assert sorted_ids[:8].tolist() == [0, 4, 10, 12, 1, 7, 11, 12]
    assert tiles.tolist()[:3] == [0, 1, -1] and num_padded.tolist() == [8]


@pytest.mark.parametrize("device", DEVICES)
def test_moe_align_many_slots_per_segment(device):
    """More slots than one CUDA segment (256), every expert busy, stable order checked."""
    requires_kernel("moe_align", device)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 7, (300, 4), generator=g, dtype=torch.int32).to(device)
    got = ops.moe_align(ids, 7, 16)
    _check_align_contract(ids, 7, 16, None, *got)


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA drops bad slots; the CPU op raises")
def test_moe_align_cuda_drops_out_of_range_slots():
    requires_kernel("moe_align", "cuda")
    E, bm = 6, 4
    ids = torch.tensor([[0, 7], [-3, 2], [5, 2], [1, 100]], dtype=torch.int32)
    emap = torch.tensor([0, 1, 99, 3, 4, 5], dtype=torch.int32)  # entry 2 out of range
    sorted_ids, tiles, npad = ops.moe_align(ids.cuda(), E, bm, emap.cuda())
    # The same as a valid problem where the bad slots go to an extra expert mapped to -1.
    bad = (ids < 0) | (ids >= E)
    valid_ids = torch.where(bad, E, ids)
    valid_map = torch.cat([torch.where(emap >= E, -1, emap), torch.tensor([-1], dtype=torch.int32)])
    ws, wt, wn = R.reference_moe_align(valid_ids, E + 1, bm, valid_map)
    n = int(wn)
    assert npad.tolist() == [n]
    assert torch.equal(sorted_ids.cpu()[:n], ws[:n]) and torch.equal(tiles.cpu()[:n // bm],
                                                                     wt[:n // bm])


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def _route(impl):
    return ops.route_topk if impl == "ops" else R.reference_route_topk


def _tcess(impl):
    return ops.tcess_update if impl == "ops" else R.reference_tcess_update


def _align(impl):
    return ops.moe_align if impl == "ops" else R.reference_moe_align


IMPLS = ["ops", "reference"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_route_topk_bad_input(device, impl):
    requires_kernel("route_topk", device)
    f = _route(impl)
    z = torch.randn(4, 6, device=device)
    keep = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool, device=device)
    cases = [
        (lambda: f(z, 3, keep_mask=keep), "keep_mask must keep at least top_k = 3"),
        (lambda: f(z, 0), "top_k must be in"),
        (lambda: f(z, -1), "top_k must be in"),
        (lambda: f(z, 7), "top_k must be in"),
        (lambda: f(z, 2, "relu"), "scoring must be one of"),
        (lambda: f(z.double(), 2), "router_logits must be float32"),
        (lambda: f(z[0], 2), "router_logits must be a 2-D"),
        (lambda: f(z, 2, keep_mask=keep[:5]), "keep_mask must be a 1-D"),
        (lambda: f(z, 2, keep_mask=keep.int()), "keep_mask must be"),
        (lambda: f(z, 2, bias=torch.zeros(5, device=device)), "bias must be a 1-D"),
        (lambda: f(z, 2, bias=torch.zeros(6, device=device, dtype=torch.float64)), "bias must be"),
        (lambda: f(z, 2, scaling=float("nan")), "scaling must be finite"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_tcess_update_bad_input(device, impl):
    requires_kernel("tcess_update", device)
    f = _tcess(impl)
    z = torch.randn(4, 6, device=device)
    acc = torch.zeros(6, dtype=torch.float64, device=device)
    cnt = torch.zeros(1, dtype=torch.int64, device=device)
    cases = [
        (lambda: f(z, 0, 0.0, acc, cnt), "top_k must be in"),
        (lambda: f(z, 7, 0.0, acc, cnt), "top_k must be in"),
        (lambda: f(z.int(), 1, 0.0, acc, cnt), "router_logits must be float32"),
        (lambda: f(z, 1, float("nan"), acc, cnt), "r must be a number"),
        (lambda: f(z, 1, 0.0, acc.float(), cnt), "acc must be"),
        (lambda: f(z, 1, 0.0, acc[:5], cnt), "acc must be a 1-D"),
        (lambda: f(z, 1, 0.0, acc, cnt.int()), "count must be int64"),
        (lambda: f(z, 1, 0.0, acc, torch.zeros(2, dtype=torch.int64, device=device)),
         "count must be a tensor of shape"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()
    assert acc.abs().sum() == 0 and cnt.item() == 0  # nothing was half-applied


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_align_bad_input(device, impl):
    requires_kernel("moe_align", device)
    f = _align(impl)
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    emap = torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=device)
    cases = [
        (lambda: f(ids.float(), 4, 4), "topk_ids must be int32 or int64"),
        (lambda: f(ids[0], 4, 4), "topk_ids must be a 2-D"),
        (lambda: f(ids, 0, 4), "num_experts must be >= 1"),
        (lambda: f(ids, 4, 0), "block_m must be >= 1"),
        (lambda: f(ids, 4, 4, emap[:3]), "expert_map must be a 1-D"),
        (lambda: f(ids, 4, 4, emap.long()), "expert_map must be int32"),
        (lambda: f(ids, 4, 2**30), "must fit in int32"),
    ]
    if torch.device(device).type == "cpu" or impl == "reference":
        cases += [
            (lambda: f(ids, 3, 4), r"topk_ids values must be in \[0, num_experts\)"),
            (lambda: f(ids - 1, 4, 4), r"topk_ids values must be in \[0, num_experts\)"),
            (lambda: f(ids, 4, 4, emap * 2), "expert_map values must be -1 or in"),
        ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_expert_limit_is_a_clear_error():
    requires_kernel("route_topk", "cuda")
    z = torch.randn(2, 1025, device="cuda")
    with pytest.raises(RuntimeError, match="at most 1024"):
        ops.route_topk(z, 2)
    with pytest.raises(RuntimeError, match="num_experts must be at most 1024"):
        ops.moe_align(torch.zeros(2, 2, dtype=torch.int32, device="cuda"), 1025, 4)


# ---------------------------------------------------------------------------------------------
# HF router conventions (transformers v5): route_topk reproduces each family's router
# ---------------------------------------------------------------------------------------------

_ATTN = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64)


def _hf_configs():
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(intermediate_size=64, num_local_experts=8,
                                    num_experts_per_tok=2, **_ATTN),
        "qwen2_moe": tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=32, num_experts=8,
                                       num_experts_per_tok=2, norm_topk_prob=False, **_ATTN),
        "qwen3_moe": tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
                                       head_dim=8, **_ATTN),
        "olmoe": tf.OlmoeConfig(intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                **_ATTN),
    }


def test_conventions_cover_the_tested_families():
    assert set(ROUTER_CONVENTIONS) == set(_hf_configs()), (
        "every ROUTER_CONVENTIONS family needs a tiny config in _hf_configs (HF parity test)")
    for conv in ROUTER_CONVENTIONS.values():
        assert conv["scoring"] in R.ROUTE_SCORINGS
    with pytest.raises(ValueError, match="model_type"):
        router_convention(type("C", (), {"model_type": "llama"})())


@pytest.mark.parametrize("family", sorted(ROUTER_CONVENTIONS))
def test_route_topk_reproduces_hf_router(family):
    config = _hf_configs()[family]
    conv = router_convention(config)
    expected_renorm = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}
    assert conv["renormalize"] is expected_renorm.get(family, conv["renormalize"])
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    block = getattr(mod, conv["moe_block_class"])(config).eval()
    router = getattr(block, conv["router_attr"])
    experts = getattr(block, conv["experts_attr"])
    E, k, H = conv["num_experts"], conv["top_k"], config.hidden_size
    torch.nn.init.normal_(router.weight, std=0.5)
    assert tuple(router.weight.shape) == (E, H)
    assert experts.gate_up_proj.shape[0] == E and experts.gate_up_proj.shape[2] == H
    assert experts.down_proj.shape[:2] == (E, H)
    for attr in ("shared_expert_attr", "shared_expert_gate_attr"):
        assert (conv[attr] is not None) == hasattr(block, conv[attr] or "_none_")
    layer_cls = next(c for n, c in vars(mod).items() if n.endswith("DecoderLayer"))
    layer = layer_cls(config, 0)
    assert isinstance(getattr(layer, conv["block_attr"]), type(block))

    x = torch.randn(37, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, hf_w, hf_ids = router(x)
    w, ids = ops.route_topk(logits, k, conv["scoring"], conv["renormalize"])
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(w, hf_w.float(), rtol=1e-5, atol=1e-6)
    # The other renormalisation choice would not match (the convention is pinned, not free).
    w_other, _ = ops.route_topk(logits, k, conv["scoring"], not conv["renormalize"])
    assert not torch.allclose(w_other, hf_w.float(), rtol=1e-3, atol=1e-4)


def test_compile_fullgraph_routing_chain():
    """route_topk -> moe_align -> tcess_update trace into one graph (fakes, mutation)."""
    g = torch.Generator().manual_seed(4)
    z = _untied_logits(g, 11, 9, torch.float32, "cpu")
    keep = torch.ones(9, dtype=torch.bool)
    keep[[2, 5]] = False

    def route(z, keep, acc, count):
        w, ids = ops.route_topk(z, 3, "softmax", True, keep)
        sorted_ids, tiles, npad = ops.moe_align(ids, 9, 4)
        ops.tcess_update(z, 2, 0.0, acc, count)
        return w, ids, sorted_ids, tiles, npad

    torch._dynamo.reset()
    compiled = torch.compile(route, fullgraph=True, dynamic=False)
    acc, count = torch.zeros(9, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    got = compiled(z, keep, acc, count)
    eacc, ecount = torch.zeros(9, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    want = route(z, keep, eacc, ecount)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(acc, eacc) and torch.equal(count, ecount)


def test_bench_family_rows_check_out():
    """The moe_route benchmark family runs on tiny shapes and its checks (ops vs reference, and
    the torch glue baselines vs reference) all pass."""
    from tasksieve.evaluation import bench

    mod = bench.load_family("moe_route")
    ctx = bench.make_context("cpu", quick=True, ceilings={}, log=lambda *a: None)
    rows = mod.run(ctx, shapes=[dict(T=5, E=8, k=2), dict(T=33, E=12, k=4)])
    assert [r["case"] for r in rows] == ["route_topk", "moe_align", "tcess_update",
                                         "router_stats_update"] * 2
    for r in rows:
        assert "MISMATCH" not in r["check"] and "differs" not in r["check"], r
        assert r["ms"] > 0 and r["base_ms"] > 0
