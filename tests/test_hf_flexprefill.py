"""HF integration of FlexPrefill (``tasksieve.patch(model, prefill=FlexPrefill(...))``) on tiny random models:
gamma = 1 equals the dense model, sparse prefill really runs through flex_prefill_attention, it composes with
WindowKV, decoding stays dense, and unpatch restores the model."""

import pytest
import torch

from tasksieve import FlexPrefill, hf
from tasksieve.evaluation import models
from tasksieve.integrations.hf import attention as hf_attention
from tasksieve.methods import flexprefill as fpmod
from tasksieve.methods.windowkv import WindowKV

pytest.importorskip("transformers")


def _ids(b, n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (b, n), generator=g)


def _gen(model, ids, n=6, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[:, ids.shape[1]:]


@pytest.fixture
def calls(monkeypatch):
    """Counts the (query length, key length) of every flex_prefill_attention call made by the HF attention
    function."""
    seen = []
    real = fpmod.flex_prefill_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(hf_attention, "flex_prefill_attention", spy)
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gamma_one_equals_dense_and_unpatch_restores(family, calls):
    model = models.tiny_model(family)
    ids = _ids(2, 100)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    hf.patch(model, prefill=FlexPrefill(gamma=1.0, tau=0.1, block_size=16))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers and calls[0] == (100, 100)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    hf.unpatch(model)
    assert model.config._attn_implementation == impl and not hf.is_patched(model)
    for module in model.modules():
        assert not hasattr(module, "_tasksieve")
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_sparse_prefill_runs_and_decode_is_dense(calls):
    model = models.tiny_model("llama")
    ids = _ids(1, 96, seed=3)
    with hf.patched(model, prefill=FlexPrefill(gamma=0.3, tau=0.0, block_size=16)):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        calls.clear()
        toks = _gen(model, ids, 4)
    # one sparse prefill per layer; the 3 decoding forwards (q = 1) never call it
    assert calls == [(96, 96)] * model.config.num_hidden_layers
    assert toks.shape == (1, 4)


def test_short_prompts_are_exactly_dense(calls):
    model = models.tiny_model("llama")
    ids = _ids(1, 20)  # < dense_threshold = 32
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    with hf.patched(model, prefill=FlexPrefill(gamma=0.3, block_size=16)):
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, dense)
    assert calls == []


def test_composes_with_windowkv(calls):
    model = models.tiny_model("llama")
    ids = _ids(1, 150, seed=1)
    press = WindowKV(budget=1.0, window=8, group=2)
    dense = _gen(model, ids, 6)
    # gamma = 1: sparse prefill is dense, the full-budget cache is the full cache -> same tokens as plain HF
    with hf.patched(model, kv=press, prefill=FlexPrefill(gamma=1.0, block_size=16)):
        assert torch.equal(_gen(model, ids, 6), dense)
    assert calls and all(c == (150, 150) for c in calls)
    # sparse prefill + a compressed cache
    with hf.patched(model, kv=WindowKV(budget=48, window=8, group=2), prefill=FlexPrefill(gamma=0.5, block_size=16)):
        toks = _gen(model, ids, 6)
        info = hf.last_info(model)
    assert toks.shape == (1, 6) and max(info["kept_tokens"]) < 150


def test_left_padded_batch_runs_dense(calls):
    model = models.tiny_model("llama")
    ids = _ids(2, 80)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    with hf.patched(model, prefill=FlexPrefill(gamma=0.5, block_size=16)):
        toks = _gen(model, ids, 3, attention_mask=mask)
    assert calls == [] and toks.shape == (2, 3)


def test_patch_rejects_bad_prefill():
    model = models.tiny_model("llama")
    with pytest.raises(ValueError, match="prefill must be a tasksieve.FlexPrefill"):
        hf.patch(model, prefill="flexprefill")
    bad = FlexPrefill()
    bad.tau = -1.0
    with pytest.raises(ValueError, match=r"FlexPrefill\.tau"):
        hf.patch(model, prefill=bad)
    assert not hf.is_patched(model)
