"""HF integration of the KV presses (tasksieve.hf) on tiny random Llama / Qwen2 / Qwen3 / Mistral models."""

import pytest
import torch

from tasksieve import hf
from tasksieve.integrations.hf.patch import _cache_kwarg
from tasksieve.evaluation import models
from tasksieve import reference as ref
from tasksieve.methods.windowkv import PyramidKV, SnapKV, WindowKV

pytest.importorskip("transformers")

FAMILIES = ["llama", "qwen2", "qwen3"]


def _model(family="llama", seed=0, **kw):
    return models.tiny_model(family, seed=seed, **kw)


def _ids(b, n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, n), generator=g)


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _cache_kw(model):
    return _cache_kwarg(model)


def _gen(model, ids, n=8, **kw):
    """Greedy generation of exactly n new tokens (EOS suppressed so every run has full length)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    assert out.shape[1] == ids.shape[1] + n
    return out[:, ids.shape[1]:]


def _lengths(cache):
    return [layer.keys.shape[2] for layer in cache.layers]


# ------------------------------------------------------------------------------------------------------------
# patch / unpatch


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_restores_model_and_prefill_is_dense(family):
    model = _model(family)
    ids = _ids(1, 120)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    hf.patch(model, kv=WindowKV(budget=32, window=8, group=2))
    assert hf.is_patched(model) and model.config._attn_implementation == hf.ATTENTION_NAME
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert torch.equal(out.logits, dense)  # prefill attention is full
    cache = _cache_of(out)
    info = hf.last_info(model)
    assert _lengths(cache) == info["kept_tokens"] and max(info["kept_tokens"]) < 120
    hf.unpatch(model)
    assert model.config._attn_implementation == impl and not hf.is_patched(model)
    for module in model.modules():
        assert not hasattr(module, "_tasksieve")
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_cache_shapes(family):
    model = _model(family)
    cfg = model.config
    n = 200
    press = WindowKV(budget=48, window=8, group=2, strategy="max")  # obs window 32
    with hf.patched(model, kv=press):
        with torch.no_grad():
            cache = _cache_of(model(input_ids=_ids(2, n), use_cache=True))
        info = hf.last_info(model)
    nw = (n - 32) // 8
    tail = n - nw * 8
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert info["budgets"] == [90, 90, 48, 48, 6]  # C 48, L 5, S 2, beta 14: 90 / 48 / 6
    for layer, budget in zip(cache.layers, info["budgets"]):
        kept = min(budget // 8, nw) * 8 + tail
        assert layer.keys.shape == (2, cfg.num_key_value_heads, kept, head_dim)  # KV heads only
        assert layer.values.shape == layer.keys.shape
    assert info["kv_bytes_after"] < info["kv_bytes_before"]
    assert info["strategy"] == "max" and info["obs_window"] == 32 and info["tokens_seen"] == n


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_generation_equals_dense(family):
    model = _model(family)
    ids = _ids(1, 150, seed=1)
    dense = _gen(model, ids, 10)
    for press in (WindowKV(budget=1.0, window=8, group=2), SnapKV(budget=1.0), PyramidKV(budget=150)):
        with hf.patched(model, kv=press):
            assert torch.equal(_gen(model, ids, 10), dense), press


def _queries(model, ids, layer_idx, hidden_states):
    """Layer ``layer_idx`` queries with RoPE, recomputed from its input hidden states ([B, H, N, D])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = model.model.layers[layer_idx]
    attn = layer.self_attn
    h = hidden_states[layer_idx]
    b, n, _ = h.shape
    q = attn.q_proj(layer.input_layernorm(h)).view(b, n, -1, attn.head_dim).transpose(1, 2)
    pos = torch.arange(n)[None].expand(b, n)
    cos, sin = model.model.rotary_emb(h, pos)
    return apply_rotary_pos_emb(q, q, cos, sin)[0]


@pytest.mark.parametrize("group_scoring", ["first", "mean"])
def test_cached_keys_equal_reference_gather_and_groups_share(group_scoring):
    model = _model("llama", seed=3)
    ids = _ids(2, 180, seed=3)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
        full = _cache_of(out)
        full_kv = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
        press = WindowKV(budget=40, window=8, group=2, strategy="max", schedule="uniform",
                         group_scoring=group_scoring)
        with hf.patched(model, kv=press):
            comp = _cache_of(model(input_ids=ids, use_cache=True))
        a = 32
        n = ids.shape[1]
        tail = n - ((n - a) // 8) * 8

        def scores_of(layer):
            q = _queries(model, ids, layer, out.hidden_states)
            return ref.reference_window_scores(q[:, :, -a:].transpose(1, 2), full_kv[layer][0].transpose(1, 2), 8,
                                               "max", scale=model.model.layers[layer].self_attn.scaling)

        for first in (0, 2, 4):
            members = range(first, min(first + 2, 5))
            if group_scoring == "first":
                scores = scores_of(first)
            else:  # the mean of the window scores of every layer of the group
                scores = sum(scores_of(layer) for layer in members) / len(members)
            idx = ref.reference_select_windows(scores, 40 // 8, share=True)
            for layer in members:
                ek, ev = ref.reference_gather_windows(list(full_kv[layer]), idx, 8, tail)
                assert torch.equal(comp.layers[layer].keys, ek), layer
                assert torch.equal(comp.layers[layer].values, ev), layer


# ------------------------------------------------------------------------------------------------------------
# decoding: positions, masks, padding


def test_uniform_schedule_decode_matches_plain_hf_on_the_compressed_cache():
    """With equal per-layer lengths, plain HF (explicit positions) on a copy of the compressed cache is a reference
    for the patched decode: RoPE positions continue from the original length and the mask covers the kept keys."""
    from transformers import DynamicCache

    model = _model("qwen3", seed=4)
    ids = _ids(1, 160, seed=4)
    press = WindowKV(budget=40, window=8, group=5, strategy="mean", schedule="uniform")
    logits, caches = hf.prefill_multi(model, ids, None, {"w": press})
    cache = caches["w"]
    copy = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), i)
    nxt = logits.argmax(-1, keepdim=True)
    ours = hf.decode_step(model, cache, press, nxt)
    with torch.no_grad():
        plain = model(input_ids=nxt, position_ids=torch.tensor([[160]]), use_cache=True,
                      **{_cache_kw(model): copy}).logits[:, -1]
    assert torch.allclose(ours, plain, atol=1e-5, rtol=1e-5)


def test_direct_calls_without_position_ids_continue_positions():
    model = _model("llama", seed=5)
    ids = _ids(1, 130, seed=5)
    press = WindowKV(budget=32, window=8, group=2, strategy="max")
    with hf.patched(model, kv=press):
        expected = _gen(model, ids, 6)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache, toks = _cache_of(out), []
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(6):
                toks.append(nxt)
                out = model(input_ids=nxt, use_cache=True, **{_cache_kw(model): cache})
                nxt = out.logits[:, -1:].argmax(-1)
    assert torch.equal(torch.cat(toks, 1), expected)


@pytest.mark.parametrize(
    "press",
    [
        WindowKV(budget=48, window=8, group=2, strategy="max"),
        WindowKV(budget=48, window=8, group=3, strategy="mean", per_head=True),
        SnapKV(budget=60, obs_window=16),
        PyramidKV(budget=60, obs_window=8),
    ],
    ids=["windowkv", "windowkv_per_head", "snapkv", "pyramidkv"],
)
def test_left_padded_batch_matches_single_rows(press):
    model = _model("qwen2", seed=6)
    a, b = _ids(1, 160, seed=7), _ids(1, 144, seed=8)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 16, dtype=torch.long), b], 1)], 0)  # 16 = 2 windows of pad
    mask = torch.ones_like(batch)
    mask[1, :16] = 0
    with hf.patched(model, kv=press):
        both = _gen(model, batch, 10, attention_mask=mask)
        kept_batch = hf.last_info(model)["kept_tokens"]
        alone_a = _gen(model, a, 10)
        alone_b = _gen(model, b, 10)
    assert torch.equal(both[0], alone_a[0]) and torch.equal(both[1], alone_b[0])
    assert max(kept_batch) < 160
    # logits too, through the harness API
    logits, caches = hf.prefill_multi(model, batch, mask, {"p": press})
    la, ca = hf.prefill_multi(model, a, None, {"p": press})
    lb, cb = hf.prefill_multi(model, b, None, {"p": press})
    assert torch.allclose(logits[0], la[0], atol=1e-5) and torch.allclose(logits[1], lb[0], atol=1e-5)
    nxt = logits.argmax(-1, keepdim=True)
    step = hf.decode_step(model, caches["p"], press, nxt)
    sa = hf.decode_step(model, ca["p"], press, nxt[:1])
    sb = hf.decode_step(model, cb["p"], press, nxt[1:])
    assert torch.allclose(step[0], sa[0], atol=1e-5) and torch.allclose(step[1], sb[0], atol=1e-5)


@pytest.mark.parametrize("group", [2, 3, 4])
def test_generate_with_groups_not_dividing_layers(group):
    model = _model("llama", seed=9)  # 5 layers
    press = WindowKV(budget=40, window=8, group=group, strategy="mean")
    with hf.patched(model, kv=press):
        out = _gen(model, _ids(1, 170, seed=9), 6)
        info = hf.last_info(model)
    assert out.shape == (1, 6)
    kept = info["kept_tokens"]
    for layer in range(5):
        assert kept[layer] == kept[(layer // group) * group]  # a group shares its budget
    assert len(set(kept)) == -(-5 // group) or min(kept) == max(kept)


def test_decode_evict_keeps_cache_within_budget_plus_window():
    model = _model("llama", seed=10)
    ids = torch.cat([_ids(1, 150, seed=10), torch.cat([torch.zeros(1, 8, dtype=torch.long),
                                                        _ids(1, 142, seed=11)], 1)], 0)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    press = WindowKV(budget=32, window=8, group=2, strategy="max", decode_evict=True)
    with hf.patched(model, kv=press):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                                 do_sample=False, return_dict_in_generate=True)
        info = hf.last_info(model)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert info["decode_evictions"] > 0
    for layer, kept in zip(cache.layers, info["kept_tokens"]):
        assert kept <= layer.keys.shape[2] < kept + 8
    # without eviction the cache grows by every generated token
    with hf.patched(model, kv=WindowKV(budget=32, window=8, group=2, strategy="max")):
        with torch.no_grad():
            out2 = model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                                  do_sample=False, return_dict_in_generate=True)
    cache2 = out2.cache if getattr(out2, "cache", None) is not None else out2.past_key_values
    assert _lengths(cache2) == [k + 39 for k in info["kept_tokens"]]


# ------------------------------------------------------------------------------------------------------------
# state isolation


def test_two_models_patched_with_different_presses_do_not_interfere():
    m1, m2 = _model("llama", seed=11), _model("qwen2", seed=12)
    ids = _ids(1, 150, seed=13)
    p1 = WindowKV(budget=32, window=8, group=2, strategy="max")
    p2 = SnapKV(budget=40, obs_window=16)
    with hf.patched(m1, kv=p1):
        r1 = _gen(m1, ids, 8)
    with hf.patched(m2, kv=p2):
        r2 = _gen(m2, ids, 8)
    hf.patch(m1, kv=p1)
    hf.patch(m2, kv=p2)
    try:
        g1a = _gen(m1, ids, 4)
        g2 = _gen(m2, ids, 8)
        g1 = _gen(m1, ids, 8)
        assert hf.last_info(m1)["press"] == "WindowKV" and hf.last_info(m2)["press"] == "SnapKV"
    finally:
        hf.unpatch(m1)
        hf.unpatch(m2)
    assert torch.equal(g1, r1) and torch.equal(g2, r2) and torch.equal(g1a, r1[:, :4])


def test_strategy_is_decided_per_request():
    calls = []

    def by_first_token(ctx):
        calls.append(int(ctx.input_ids[0, 0]))
        return "max" if int(ctx.input_ids[0, 0]) % 2 == 0 else "mean"

    model = _model("qwen3", seed=14)
    even, odd = _ids(1, 140, seed=15), _ids(1, 140, seed=16)
    even[0, 0], odd[0, 0] = 10, 11
    press = WindowKV(budget=32, window=8, group=2, strategy=by_first_token)
    infos = []
    with hf.patched(model, kv=press):
        for x in (even, odd, even):
            with torch.no_grad():
                model(input_ids=x, use_cache=True)
            infos.append(hf.last_info(model))
    assert calls == [10, 11, 10]
    assert [i["strategy"] for i in infos] == ["max", "mean", "max"]
    assert [i["obs_window"] for i in infos] == [32, 16, 32]
    assert all(isinstance(i["auto_statistic"], float) for i in infos)


def _magnet_model(magnet=5):
    """Qwen2 whose layer-0 queries all point at the keys of token ``magnet`` (q bias along one low-frequency RoPE
    dim, k weight = that token's normalised embedding), so attention is peaked exactly when the prompt holds it."""
    model = _model("qwen2", seed=17, rope_theta=1e9)
    attn, cfg = model.model.layers[0].self_attn, model.config
    d = attn.head_dim
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens.weight[magnet])
        for t in (attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias):
            t.zero_()
        for h in range(cfg.num_attention_heads):
            attn.q_proj.bias[h * d + d - 1] = 8.0
        for h in range(cfg.num_key_value_heads):
            attn.k_proj.weight[h * d + d - 1] = 8.0 * x / (x @ x)
    return model


def test_auto_strategy_decides_per_request_from_the_attention():
    model = _magnet_model(magnet=5)
    plain = _ids(1, 160, seed=17)
    plain[plain == 5] = 6
    peaked = plain.clone()
    peaked[0, [40, 41, 90]] = 5
    press = WindowKV(budget=32, window=8, group=2, strategy="auto")
    infos = []
    with hf.patched(model, kv=press):
        for x in (peaked, plain, peaked):
            with torch.no_grad():
                model(input_ids=x, use_cache=True)
            infos.append(hf.last_info(model))
    assert [i["strategy"] for i in infos] == ["max", "mean", "max"]
    assert [i["obs_window"] for i in infos] == [32, 16, 32]
    assert infos[0]["auto_statistic"] > 0.9 > press.auto_threshold > infos[1]["auto_statistic"]
    assert infos[0]["auto_per_row"] == [infos[0]["auto_statistic"]]
    # the random-weight model is flat
    flat = _model("llama", seed=17)
    with hf.patched(flat, kv=press):
        with torch.no_grad():
            flat(input_ids=plain, use_cache=True)
        assert hf.last_info(flat)["strategy"] == "mean"


# ------------------------------------------------------------------------------------------------------------
# harness helpers


def test_prefill_multi_and_decode_step_match_patched_generate():
    model = _model("llama", seed=18)
    ids = _ids(2, 150, seed=18)
    mask = torch.ones_like(ids)
    presses = {
        "dense": None,
        "wkv": WindowKV(budget=0.25, window=8, group=2, strategy="max"),
        "snap": SnapKV(budget=50),
        "pyr": PyramidKV(budget=50),
        "evict": WindowKV(budget=40, window=8, group=2, decode_evict=True),
    }
    with torch.no_grad():
        dense_last = model(input_ids=ids).logits[:, -1]
    logits, caches = hf.prefill_multi(model, ids, mask, presses)
    assert not hf.is_patched(model)
    assert torch.allclose(logits, dense_last, atol=1e-5)
    assert _lengths(caches["dense"]) == [150] * 5
    assert _lengths(caches["snap"]) == [50] * 5
    assert _lengths(caches["pyr"]) == [90, 70, 50, 30, 10]
    assert hf.cache_info(caches["wkv"])["strategy"] == "max"
    for name, press in presses.items():
        cache, nxt, toks = caches[name], logits.argmax(-1, keepdim=True), []
        for _ in range(12):
            toks.append(nxt)
            nxt = hf.decode_step(model, cache, press, nxt).argmax(-1, keepdim=True)
        with hf.patched(model, kv=press):
            assert torch.equal(torch.cat(toks, 1), _gen(model, ids, 12, attention_mask=mask)), name
    with pytest.raises(ValueError, match="not with the given press"):
        hf.decode_step(model, caches["snap"], presses["pyr"], nxt)


def test_mistral_full_attention_supported():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, sliding_window=None)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    ids = _ids(1, 120)
    dense = _gen(model, ids, 6)
    with hf.patched(model, kv=WindowKV(budget=1.0, group=2)):
        assert torch.equal(_gen(model, ids, 6), dense)


# ------------------------------------------------------------------------------------------------------------
# bad input


def test_patch_rejects_bad_input():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    with pytest.raises(ValueError, match="PreTrainedModel"):
        hf.patch(torch.nn.Linear(2, 2))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match="supported model types: llama, mistral, qwen2, qwen3"):
        hf.patch(gpt2)
    sliding = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                               sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window"):
        hf.patch(sliding)
    model = _model("llama")
    with pytest.raises(ValueError, match="kv must be"):
        hf.patch(model, kv="windowkv")
    bad = WindowKV()
    bad.window = 0
    with pytest.raises(ValueError, match=r"WindowKV\.window"):
        hf.patch(model, kv=bad)
    bad = WindowKV()
    bad.budget = 1.5
    with pytest.raises(ValueError, match=r"WindowKV\.budget"):
        hf.patch(model, kv=bad)
    assert not hf.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)
    hf.patch(model, kv=WindowKV())
    try:
        with pytest.raises(ValueError, match="already patched"):
            hf.patch(model, kv=SnapKV())
    finally:
        hf.unpatch(model)
    with pytest.raises(ValueError, match="presses"):
        hf.prefill_multi(model, _ids(1, 20), None, {"x": "snapkv"})


def test_static_cache_is_rejected_for_compression():
    from transformers import StaticCache

    model = _model("llama")
    try:
        cache = StaticCache(config=model.config, max_cache_len=64)
    except TypeError:  # older signature
        pytest.skip("StaticCache signature differs")
    with hf.patched(model, kv=WindowKV(budget=8)):
        with pytest.raises(ValueError, match="DynamicCache"):
            with torch.no_grad():
                model(input_ids=_ids(1, 40), use_cache=True, **{_cache_kw(model): cache})
