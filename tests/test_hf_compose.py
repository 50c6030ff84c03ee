"""All three methods on one MoE model behind one ``ts.patch``: WindowKV + FlexPrefill + PreMoe on tiny random Mixtral /
Qwen2-MoE / Qwen3-MoE / OLMoE models (fp32). At settings that change nothing (full budget, gamma = 1, every expert
kept) the composed patch equals the unpatched model; each part alone changes only what it should; all three
together show every effect in one run; unpatch restores the model bitwise; sliding-window configs are refused."""

from __future__ import annotations

import pytest
import torch

import tasksieve as ts
from tasksieve import FlexPrefill, hf
from tasksieve.evaluation.tiny import TINY_FAMILIES, tiny_moe_model
from tasksieve.integrations.hf import moe as hf_moe
from tasksieve.methods.windowkv import WindowKV
from tasksieve.premoe import Pattern, PreMoe

pytest.importorskip("transformers")

FAMILIES = TINY_FAMILIES
ATOL, RTOL = 2e-5, 1e-4  # fp32: the swapped MoE block and the block-sparse prefill reorder sums


def _ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (b, n), generator=g)


def _fp(gamma: float = 1.0) -> FlexPrefill:
    # block 16: dense_threshold = 2 * 16 = 32 <= the 40-token prompts, so the estimate -> select_blocks ->
    # block_sparse_attention path runs (not the dense shortcut)
    return FlexPrefill(gamma=gamma, tau=0.1, block_size=16)


def _pattern(model, seed: int = 1) -> Pattern:
    fp = hf_moe.fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    return Pattern("t", torch.randn(len(fp["moe_layers"]), fp["num_experts"], generator=g), fp)


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(input_ids=ids, **kw).logits


@torch.no_grad()
def _gen(model, ids, n: int = 4):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _hooks(model) -> dict:
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _snapshot(model) -> dict:
    return {
        "impl": model.config._attn_implementation,
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "params": {n: p for n, p in model.named_parameters()},
        "hooks": _hooks(model),
    }


def _assert_restored(model, snap) -> None:
    assert not hf.is_patched(model) and not hf_moe.is_moe_patched(model)
    assert model.config._attn_implementation == snap["impl"]
    assert [(name, id(m)) for name, m in model.named_modules()] == snap["modules"]
    params = dict(model.named_parameters())
    assert params.keys() == snap["params"].keys() and all(params[n] is snap["params"][n] for n in params)
    assert _hooks(model) == snap["hooks"]
    for module in model.modules():
        assert not hasattr(module, "_tasksieve") and not hasattr(module, "_tasksieve_moe")


def _swapped(model) -> list:
    return [isinstance(getattr(s.parent, s.attr), hf_moe.TaskSieveMoeBlock) for s in hf_moe.moe_sites(model)]


def _out_cache(out):
    """The returned cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before (kvpress's 5.2)."""
    c = getattr(out, "cache", None)
    return out.past_key_values if c is None else c


def _kept(cache) -> list:
    return [layer.keys.shape[2] for layer in cache.layers]


# ---------------------------------------------------------------------------------------------------------------
# neutral settings: the composed patch is the model


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_composition_equals_unpatched_and_unpatch_restores(family):
    model = tiny_moe_model(family, seed=2)
    ids = _ids(2, 40, seed=2)
    layers = model.config.num_hidden_layers
    ref = _logits(model, ids)
    ref_toks, ref_steps = _gen(model, ids)
    snap = _snapshot(model)

    ts.patch(model, kv=WindowKV(budget=1.0, window=8, group=2), prefill=_fp(1.0), moe=PreMoe())
    try:
        assert model.config._attn_implementation == hf.ATTENTION_NAME and all(_swapped(model))
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=RTOL)
        info = ts.last_info(model)
        # FlexPrefill really ran its sparse path in every layer (a dense fallback has no JS distance)
        assert info["prefill_block_ratio"] == 1.0
        assert sorted(info["prefill_layers"]) == list(range(layers))
        assert all(lay["js_distance"] is not None for lay in info["prefill_layers"].values())
        # the full budget keeps the whole prompt in every layer
        assert info["press"] == "WindowKV" and info["kept_tokens"] == [40] * layers
        assert _kept(_out_cache(out)) == [40] * layers
        assert info["kv_bytes_after"] == info["kv_bytes_before"] > 0
        assert hf_moe.moe_info(model)["allowed_experts"] == [None] * len(hf_moe.moe_sites(model))
        toks, steps = _gen(model, ids)
        assert torch.equal(toks, ref_toks)
        torch.testing.assert_close(steps, ref_steps, atol=ATOL, rtol=RTOL)
        assert ts.last_info(model)["tokens_seen"] == 40 + 3  # prefill + 3 decoding forwards
    finally:
        ts.unpatch(model)
    _assert_restored(model, snap)
    assert torch.equal(_logits(model, ids), ref)
    assert torch.equal(_gen(model, ids)[0], ref_toks)


# ---------------------------------------------------------------------------------------------------------------
# each part alone changes what it should, and only that


@pytest.mark.parametrize("family", FAMILIES)
def test_windowkv_alone_shrinks_the_cache_only(family):
    model = tiny_moe_model(family)
    ids = _ids(2, 40)
    ref = _logits(model, ids)
    snap = _snapshot(model)
    with ts.patched(model, kv=WindowKV(budget=8, window=8, group=2, obs_window=8)):
        assert not any(_swapped(model)) and not hf_moe.is_moe_patched(model)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        info = ts.last_info(model)
        assert "prefill_block_ratio" not in info  # no prefill= : dense prefill
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=RTOL)  # prefill attention stays full
    assert info["kv_bytes_after"] < info["kv_bytes_before"]
    assert max(info["kept_tokens"]) < 40 and _kept(_out_cache(out)) == info["kept_tokens"]
    _assert_restored(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_flexprefill_alone_computes_fewer_blocks_only(family):
    model = tiny_moe_model(family)
    ids = _ids(1, 96, seed=4)
    snap = _snapshot(model)
    with ts.patched(model, prefill=_fp(0.5)):
        assert not any(_swapped(model))
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        info = ts.last_info(model)
    assert 0.0 < info["prefill_block_ratio"] < 1.0
    assert info["press"] is None and _kept(_out_cache(out)) == [96] * model.config.num_hidden_layers
    assert torch.isfinite(out.logits).all()
    _assert_restored(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_premoe_alone_changes_routing_only(family):
    model = tiny_moe_model(family)
    ids = _ids(2, 40)
    ref = _logits(model, ids)
    snap = _snapshot(model)
    pattern = _pattern(model)
    with ts.patched(model, moe=PreMoe(pattern=pattern, keep=0.5)):
        # attention is untouched: the model's own implementation, no tasksieve state or hooks on attention
        assert model.config._attn_implementation == snap["impl"] and not hf.is_patched(model)
        assert all(_swapped(model)) and _hooks(model) == snap["hooks"]
        assert not any(hasattr(m, "_tasksieve") for m in model.modules())
        out = _logits(model, ids)
        info = hf_moe.moe_info(model)
    assert not torch.allclose(out, ref, atol=1e-3)
    expected = [sorted(s.tolist()) for s in pattern.keep_sets(0.5)]
    assert [sorted(a) for a in info["allowed_experts"]] == expected and all(len(a) == 4 for a in expected)
    _assert_restored(model, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_three_show_every_effect_in_one_run(family):
    model = tiny_moe_model(family)
    ids = _ids(2, 96, seed=5)
    snap = _snapshot(model)
    pattern = _pattern(model)
    kv, fp = WindowKV(budget=16, window=8, group=2, obs_window=16), _fp(0.5)
    with ts.patched(model, kv=kv, prefill=fp, moe=PreMoe()):  # every expert kept: the reference for the MoE part
        attn_only = _logits(model, ids)
    with ts.patched(model, kv=kv, prefill=fp, moe=PreMoe(pattern=pattern, keep=0.5)):
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
        info = ts.last_info(model)
        moe = hf_moe.moe_info(model)
        toks, _ = _gen(model, ids, 3)
    assert info["kv_bytes_after"] < info["kv_bytes_before"] and max(info["kept_tokens"]) < 96
    assert _kept(_out_cache(out)) == info["kept_tokens"]
    assert 0.0 < info["prefill_block_ratio"] < 1.0
    assert all(len(a) == 4 for a in moe["allowed_experts"])
    assert not torch.allclose(out.logits, attn_only, atol=1e-3)  # the keep mask changed the experts
    assert toks.shape == (2, 3)
    _assert_restored(model, snap)


# ---------------------------------------------------------------------------------------------------------------
# router outputs and the harness helpers under the composed patch


@pytest.mark.parametrize("family", FAMILIES)
def test_router_logits_and_aux_loss_under_the_composed_patch(family):
    model = tiny_moe_model(family)
    ids = _ids(2, 40)
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
    with ts.patched(model, kv=WindowKV(budget=1.0, window=8, group=2), prefill=_fp(1.0), moe=PreMoe()):
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == len(hf_moe.moe_sites(model))
    for a, b in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=ATOL, rtol=RTOL)
    # with attention untouched, layer 0's router sees the same input: its recorded logits are HF's bit for bit
    with ts.patched(model, moe=PreMoe()):
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    assert torch.equal(out.router_logits[0], ref.router_logits[0])


def test_prefill_multi_keeps_the_callers_moe_swap():
    model = tiny_moe_model("qwen2_moe")
    ids = _ids(1, 40)
    ts.patch(model, moe=PreMoe())
    try:
        last, caches = hf.prefill_multi(model, ids, None, {"full": None, "w": WindowKV(budget=8, window=8, group=2,
                                                                                         obs_window=8)})
        assert hf_moe.is_moe_patched(model) and all(_swapped(model)) and not hf.is_patched(model)
        assert _kept(caches["full"]) == [40, 40] and max(_kept(caches["w"])) < 40
        nxt = last.argmax(-1, keepdim=True)
        hf.decode_step(model, caches["w"], None, nxt)
        assert hf_moe.is_moe_patched(model) and not hf.is_patched(model)
    finally:
        ts.unpatch(model)
    torch.testing.assert_close(last, _logits(model, ids)[:, -1], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------------------
# what cannot be supported


@pytest.mark.parametrize("family, overrides, field", [
    ("mixtral", {"sliding_window": 16}, "sliding_window=16"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16}, "layer_types has sliding_attention"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16"),
])
def test_sliding_window_configs_are_refused_and_nothing_is_patched(family, overrides, field):
    model = tiny_moe_model(family, **overrides)
    snap = _snapshot(model)
    name = type(model).__name__
    for kw in ({"kv": WindowKV()}, {"prefill": _fp()}, {"kv": WindowKV(), "prefill": _fp(), "moe": PreMoe()}):
        with pytest.raises(ValueError, match=rf"{name} \(model type '{family}'\) uses sliding-window attention") as e:
            ts.patch(model, **kw)
        assert field in str(e.value)
        _assert_restored(model, snap)  # validated before the MoE blocks were swapped
    # moe= alone never touches attention, so it works on these configs
    with ts.patched(model, moe=PreMoe()):
        assert all(_swapped(model)) and model.config._attn_implementation == snap["impl"]
    _assert_restored(model, snap)
