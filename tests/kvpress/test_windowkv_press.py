"""WindowKVPress (tasksieve.integrations.kvpress) inside kvpress's own pipeline equals ts.patch(model, kv=WindowKV).

Runs in .venv-kvpress (`make test-kvpress`: kvpress 0.5.5, transformers < 5.3); skipped where kvpress is not
importable (the main .venv), so `make test` is unaffected. The tiny random models and the character tokenizer are
built offline (tasksieve.evaluation.models / tiny).
"""

from __future__ import annotations

import pickle
import random
import sys

import pytest
import torch

# kvpress.presses, not just kvpress: under pytest this folder (tests/kvpress) is itself importable as a namespace
# package named kvpress where the real one is missing
pytest.importorskip("kvpress.presses.base_press")
import kvpress  # noqa: E402

import tasksieve as ts  # noqa: E402
from tasksieve.evaluation.models import tiny_model  # noqa: E402
from tasksieve.evaluation.tiny import tiny_tokenizer  # noqa: E402
from tasksieve.integrations import kvpress as ts_kvpress  # noqa: E402
from tasksieve.integrations.kvpress import WindowKVPress  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3"]


def _context(n: int = 400, seed: int = 0) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choice("abcdefghij klmnop.") for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pipe(model, tok):
    from transformers import pipeline

    return pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")


def _run(pipe, context, question, press, max_new_tokens=10):
    """Answer and the cache kvpress's pipeline leaves behind: it trims each answer off again, so the cache holds the
    KV kept after the prefill."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        answer = pipe(context, question=question, press=press, cache=cache, max_new_tokens=max_new_tokens)["answer"]
    return answer, cache


def _assert_same_kv(a, b):
    assert len(a.layers) == len(b.layers)
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert x.keys.shape == y.keys.shape, (i, x.keys.shape, y.keys.shape)
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values), f"layer {i}"


def _both(model, tok, press, context, question):
    pipe = _pipe(model, tok)
    got = _run(pipe, context, question, press)
    with ts.patched(model, kv=press.windowkv()):  # the same WindowKV through tasksieve's own integration
        ref = _run(pipe, context, question, None)
        info = ts.last_info(model)
    return got, ref, info


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [
    dict(compression_ratio=0.75, window=4, group=2, strategy="mean"),              # arithmetic per-group budgets
    dict(compression_ratio=0.88, window=8, group=3, strategy="auto"),
    dict(compression_ratio=0.6, window=4, group=2, strategy="max", group_scoring="first", per_head=True),
    dict(compression_ratio=0.8, window=4, group=3, strategy="mean", neighbours="both", neighbour_weight=0.7),
])
def test_pipeline_equals_ts_patch(family, settings, tok):
    model = tiny_model(family, seed=1)
    press = WindowKVPress(**settings)
    context = _context()
    # question "" = the pipeline feeds one token ("\n") after the compressed context, then greedy single-token steps
    (answer, cache), (ref_answer, ref_cache), info = _both(model, tok, press, context, "")
    n = len(context) + 1  # <s> + one token per character
    kept = [layer.keys.shape[2] for layer in cache.layers]
    assert kept == info["kept_tokens"] and max(kept) < n  # really compressed, as tasksieve reports
    assert press.info(cache)["kept_tokens"] == kept and press.info(cache)["num_tokens"] == n
    _assert_same_kv(cache, ref_cache)
    assert answer == ref_answer and len(answer) > 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pipeline_with_a_question_uniform_schedule(family, tok):
    """A multi-token question after the compressed context: exact when every layer keeps the same length (kvpress's
    pipeline builds one mask from layer 0's length, see the module docstring of tasksieve.integrations.kvpress)."""
    model = tiny_model(family, seed=2)
    press = WindowKVPress(compression_ratio=0.75, window=4, group=2, schedule="uniform")
    (answer, cache), (ref_answer, ref_cache), _ = _both(model, tok, press, _context(seed=3), "which letters?")
    assert len({layer.keys.shape[2] for layer in cache.layers}) == 1
    _assert_same_kv(cache, ref_cache)
    assert answer == ref_answer


def test_context_manager_direct_and_requests_do_not_leak(tok):
    """`with press(model)` on a plain forward; two requests on two caches each get their own state."""
    from transformers import DynamicCache

    model = tiny_model("llama", seed=4)
    press = WindowKVPress(compression_ratio=0.5, window=4, group=2)
    ids_a = torch.tensor([tok.encode(_context(300, seed=5))])
    ids_b = torch.tensor([tok.encode(_context(200, seed=6))])
    caches = {}
    with torch.no_grad(), press(model):
        for name, ids in (("a", ids_a), ("b", ids_b)):
            caches[name] = DynamicCache()
            model(input_ids=ids, past_key_values=caches[name])
    assert press.info(caches["a"])["num_tokens"] == 300 and press.info(caches["b"])["num_tokens"] == 200
    assert not model._forward_hooks and all(not l.self_attn._forward_hooks for l in model.model.layers)
    with torch.no_grad(), ts.patched(model, kv=press.windowkv()):
        for name, ids in (("a", ids_a), ("b", ids_b)):
            ref = DynamicCache()
            model(input_ids=ids, past_key_values=ref)
            _assert_same_kv(caches[name], ref)
    # no compression at ratio 0 (kvpress's convention), and the press pickles like any dataclass press
    full = DynamicCache()
    with torch.no_grad(), WindowKVPress(compression_ratio=0.0)(model):
        model(input_ids=ids_a, past_key_values=full)
    assert all(layer.keys.shape[2] == 300 for layer in full.layers)
    clone = pickle.loads(pickle.dumps(WindowKVPress(compression_ratio=0.5, window=4)))
    assert clone == WindowKVPress(compression_ratio=0.5, window=4)


def test_is_a_kvpress_press():
    press = WindowKVPress(compression_ratio=0.88)
    assert isinstance(press, kvpress.BasePress)
    assert press.windowkv() == ts.WindowKV(budget=0.12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(compression_ratio=1.0), r"WindowKVPress\.compression_ratio must be a number in \[0, 1\)"),
    (dict(compression_ratio=-0.1), r"WindowKVPress\.compression_ratio"),
    (dict(compression_ratio="0.5"), r"WindowKVPress\.compression_ratio"),
    (dict(compression_ratio=0.5, window=0), r"WindowKVPress\.window"),
    (dict(compression_ratio=0.5, group=-1), r"WindowKVPress\.group"),
    (dict(compression_ratio=0.5, strategy="median"), r"WindowKVPress\.strategy"),
    (dict(compression_ratio=0.5, schedule="linear"), r"WindowKVPress\.schedule"),
    (dict(compression_ratio=0.5, group_scoring="last"), r"WindowKVPress\.group_scoring"),
    (dict(compression_ratio=0.5, neighbours="left"), r"WindowKVPress\.neighbours"),
    (dict(compression_ratio=0.5, neighbours="right", neighbour_weight=0.0), r"WindowKVPress\.neighbour_weight"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowKVPress(**kwargs)


def test_refuses_a_quantized_or_static_cache(tok):
    from transformers import StaticCache

    model = tiny_model("llama", seed=0)
    ids = torch.tensor([tok.encode(_context(100))])
    cache = StaticCache(config=model.config, max_cache_len=128)
    with pytest.raises(ValueError, match="WindowKVPress: needs a DynamicCache"):
        with torch.no_grad(), WindowKVPress(compression_ratio=0.5)(model):
            model(input_ids=ids, past_key_values=cache)


def test_clear_error_without_kvpress(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress now raises ImportError
    with pytest.raises(ImportError, match=r"needs kvpress .*make venv-kvpress"):
        ts_kvpress.require_kvpress()
    with pytest.raises(AttributeError):
        ts_kvpress.NoSuchPress  # noqa: B018
