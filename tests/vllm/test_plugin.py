"""The FlexPrefill vLLM plugin inside vLLM's CPU engine (``make test-vllm``; fp32, tiny random models).

Every engine runs in its own process (tests/vllm/plugin_driver.py): the plugin is configured by the environment,
so each configuration is a separate engine; the tests compare what the runs produced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# No conftest here: a second conftest.py would replace the suite's own `conftest` module. vLLM's CPU engine only
# (on a GPU machine bench/vllm_device_check.py checks the plugin), and only where vLLM is really installed: without
# it, this folder itself would import as a namespace package named "vllm".
_VLLM = importlib.util.find_spec("vllm")
if _VLLM is None or _VLLM.origin is None or torch.cuda.is_available():
    pytest.skip("needs vLLM's CPU engine (make test-vllm)", allow_module_level=True)

import tasksieve as ts
from tasksieve.evaluation.models import tiny_model
from tasksieve.evaluation.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SPARSE = {"gamma": 0.9, "tau": 0.1, "block_size": 16, "min_budget": 32, "dense_below": 128}
DENSE_EQUIVALENT = {"gamma": 1.0, "block_size": 16, "dense_below": 128}
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (head_dim 32: vLLM's CPU kernels take 32 and up) with a char tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, max_position_embeddings=2048)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run_engine(model_dir, out_dir, name, flex=None, tp=1, chunk=None, scenarios="batch", expect_fail=False):
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TASKSIEVE_FLEXPREFILL", None)
    if flex is not None:
        env["TASKSIEVE_FLEXPREFILL"] = flex if isinstance(flex, str) else json.dumps(flex)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    out = Path(out_dir) / f"{name}.json"
    cmd = [sys.executable, "-m", "tests.vllm.plugin_driver", str(model_dir), str(out), "--tp", str(tp),
           "--scenarios", scenarios]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_fail:
        assert proc.returncode != 0, f"{name}: the engine started although it should not have"
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Engines started lazily, once per configuration, shared by the tests of this module."""
    out_dir = tmp_path_factory.mktemp("runs")
    cache = {}
    configs = {
        "dense": dict(scenarios="batch,prefix,decode_mix"),
        "plugin_g1": dict(flex=DENSE_EQUIVALENT, scenarios="batch,prefix,decode_mix"),
        "dense_chunked": dict(chunk=256, scenarios="batch,decode_mix"),
        "plugin_g1_chunked": dict(flex=DENSE_EQUIVALENT, chunk=256, scenarios="batch,decode_mix"),
        "plugin_sparse": dict(flex=SPARSE),
        "plugin_sparse_tp2": dict(flex=SPARSE, tp=2),
    }

    def get(name):
        if name not in cache:
            cache[name] = run_engine(model_dir, out_dir, name, **configs[name])
        return cache[name]

    return get


def assert_same(a, b, scenarios, tol=TOL):
    for sc in scenarios:
        assert len(a[sc]) == len(b[sc])
        for i, (x, y) in enumerate(zip(a[sc], b[sc])):
            assert x["tokens"] == y["tokens"], f"{sc}[{i}]: tokens differ"
            diff = max((abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])), default=0.0)
            assert diff <= tol, f"{sc}[{i}]: logprobs differ by {diff}"
            pl = [(p, q) for p, q in zip(x.get("prompt_logprobs", []), y.get("prompt_logprobs", []))
                  if p is not None]
            diff = max((abs(p - q) for p, q in pl), default=0.0)
            assert diff <= tol, f"{sc}[{i}]: prompt logprobs differ by {diff}"


def test_gamma_one_equals_vllm(runs):
    """gamma = 1 selects every causal block: a batch mixing short (dense) and long (sparse) prompts, a
    prefix-cache hit (the paged form) and a request decoding while a long prompt prefills in the same step give
    vLLM's own tokens and logprobs, prompt logprobs included."""
    dense, plugin = runs("dense"), runs("plugin_g1")
    assert_same(dense, plugin, ["batch", "prefix", "decode_mix"])
    s = plugin["stats"]
    assert s["sparse_requests"] > 0 and s["dense_requests"] > 0, s
    assert s["paged_requests"] > 0, "the prefix-cache hit did not take the paged form"
    assert s["computed_blocks"] == s["causal_blocks"] > 0


def test_gamma_one_equals_vllm_chunked(runs):
    """Chunked prefill forced (max_num_batched_tokens 256): continuations read the paged cache."""
    dense, plugin = runs("dense_chunked"), runs("plugin_g1_chunked")
    assert_same(dense, plugin, ["batch", "decode_mix"])
    s = plugin["stats"]
    assert s["paged_requests"] > 0 and s["computed_blocks"] == s["causal_blocks"], s


def test_sparse_equals_hf_patch(runs, model_dir):
    """gamma 0.9: the sparse path ran (counter, fewer blocks than causal) and the prompt logprobs equal
    ts.patch(model, prefill=FlexPrefill(...)) on the HF model from the same folder: same selection, same kernel."""
    run = runs("plugin_sparse")
    s = run["stats"]
    assert s["sparse_requests"] > 0 and 0 < s["computed_blocks"] < s["causal_blocks"], s
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    settings = ts.FlexPrefill(**SPARSE)
    ts.patch(model, prefill=settings)
    try:
        for rec in run["batch"]:
            ids = torch.tensor([rec["prompt_token_ids"]])
            with torch.inference_mode():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            want = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
            got = torch.tensor(rec["prompt_logprobs"][1:])
            assert torch.allclose(got, want, atol=1e-3, rtol=0), (rec["prompt_len"], (got - want).abs().max())
            assert rec["tokens"][0] == int(logp[-1].argmax())
    finally:
        ts.unpatch(model)
    with torch.inference_mode():  # and the dense model differs: the test would notice a dense plugin
        ids = torch.tensor([run["batch"][3]["prompt_token_ids"]])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    dense_lp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    assert (torch.tensor(run["batch"][3]["prompt_logprobs"][1:]) - dense_lp).abs().max() > 1e-3


def test_tensor_parallel_two_equals_one(runs):
    """TP 2 (gloo, one core per rank): each rank runs FlexPrefill on its heads; equal to TP 1."""
    one, two = runs("plugin_sparse"), runs("plugin_sparse_tp2")
    assert_same(one, two, ["batch"])
    assert two["stats"]["sparse_requests"] > 0
    assert two["stats"]["computed_blocks"] == one["stats"]["computed_blocks"]


@pytest.mark.parametrize("flex, message", [
    ('{"gamma": 0.9, "budget": 3}', r"unknown key\(s\) \['budget'\]"),
    ('{"gamma": 1.5}', r"gamma must be a number in \(0, 1\]"),
    ("{gamma: 0.9}", "must be a JSON object"),
])
def test_bad_configuration_fails_at_engine_start(model_dir, tmp_path, flex, message):
    import re

    text = run_engine(model_dir, tmp_path, "bad", flex=flex, expect_fail=True)
    assert re.search(message, text), text[-3000:]


def test_unsupported_model_fails_at_engine_start(tmp_path):
    """A sliding-window model (Mistral-style): FlexPrefill attends the whole causal context, so the engine
    refuses to start, naming the feature."""
    path = tmp_path / "tiny-mistral"
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        sliding_window=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    MistralForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    text = run_engine(path, tmp_path, "sliding", flex=SPARSE, expect_fail=True)
    assert "cannot run FlexPrefill: sliding-window attention" in text, text[-3000:]
