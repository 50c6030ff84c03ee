"""PreMoe profiling (TCESS), the pattern store, retrieval and keep sets on tiny random MoE models, against plain-torch
recomputations from HF's own router logits (reference/premoe.md §2-§4)."""

from __future__ import annotations

import math

import pytest
import torch

import tasksieve as ts
from tasksieve import premoe
from tasksieve.integrations.hf import moe as hf_moe
from tasksieve.evaluation.models import load_model
from tasksieve.evaluation.tiny import tiny_moe_model, tiny_tokenizer
from tasksieve.premoe import Pattern, PatternStore

from conftest import DEVICES

LOW = list(range(4, 64))
HIGH = list(range(64, 128))


def _tcess_reference(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Plain torch: per token, the top-k raw logits at their experts, 0 elsewhere; mean over tokens (fp64)."""
    z = logits.double()
    top = torch.topk(z, k, dim=-1)
    marker = torch.zeros_like(z).scatter(-1, top.indices, top.values)
    return marker.mean(0)


@torch.no_grad()
def _router_logits(model, chunks) -> list[torch.Tensor]:
    """HF's own router logits (output_router_logits) of every MoE layer over the given sequences, [T, E] each."""
    per_layer = None
    for c in chunks:
        out = model(input_ids=torch.tensor([c]), output_router_logits=True, use_cache=False)
        rl = [r.reshape(-1, r.shape[-1]) for r in out.router_logits]
        per_layer = rl if per_layer is None else [torch.cat([a, b]) for a, b in zip(per_layer, rl)]
    return per_layer


@pytest.mark.parametrize("family,k", [("mixtral", 1), ("qwen2_moe", 1), ("olmoe", None)])
def test_profile_matches_reference_tcess(family, k):
    model = tiny_moe_model(family, seed=1)
    stream = (LOW * 2)[:100]
    store = premoe.profile(model, {"low": [stream[:50], stream[50:]]}, top_k=k, seq_len=32, batch_size=2,
                           progress=False)
    kk = 1 if k == 1 else model.config.num_experts_per_tok
    assert store.fingerprint["tcess_top_k"] == kk and store.tokens["low"] == 100
    chunks = [stream[i:i + 32] for i in range(0, 100, 32)]  # what profile runs: 3 x 32 + 1 x 4
    ref = torch.stack([_tcess_reference(z, kk) for z in _router_logits(model, chunks)]).float()
    got = store["low"].tcess
    assert got.shape == (2, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    if kk == 1:  # top-1: the row sum is the mean of every token's max logit
        for l, z in enumerate(_router_logits(model, chunks)):
            assert math.isclose(float(got[l].sum()), float(z.max(-1).values.mean()), rel_tol=1e-4, abs_tol=1e-5)


def test_profile_texts_with_tokenizer_and_progress(capsys):
    model = tiny_moe_model("qwen3_moe", seed=2)
    tok = tiny_tokenizer()
    texts = {"prose": ["The cat sat on the mat. " * 4], "code": ["def f(x):\n    return x * 2\n" * 4]}
    store = premoe.profile(model, texts, tok, seq_len=24, max_tokens=60, progress=True)
    assert store.tasks == ["prose", "code"] and store.tokens == {"prose": 60, "code": 60}
    assert "PreMoe profile" in capsys.readouterr().err
    ids = tok(texts["prose"][0])["input_ids"][:60]
    chunks = [ids[i:i + 24] for i in range(0, 60, 24)]
    ref = torch.stack([_tcess_reference(z) for z in _router_logits(model, chunks)]).float()
    torch.testing.assert_close(store["prose"].tcess, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICES == ["cpu"], reason="needs a GPU")
def test_profile_and_retrieve_on_gpu_match_cpu():
    model = tiny_moe_model("qwen2_moe", seed=8)
    tasks = {"low": [LOW * 2], "high": [HIGH * 2]}
    cpu = premoe.profile(model, tasks, seq_len=32, progress=False)
    model.to("cuda")
    gpu = premoe.profile(model, tasks, seq_len=32, progress=False)
    for t in cpu.tasks:
        torch.testing.assert_close(gpu[t].tcess, cpu[t].tcess, atol=1e-4, rtol=1e-4)
    assert gpu.retrieve(HIGH[5:40]).task == "high"
    with ts.patched(model, moe=ts.PreMoe(pattern=gpu, keep=0.5)):
        with torch.no_grad():
            model(input_ids=torch.tensor([LOW[:30]], device="cuda"))
        assert hf_moe.moe_info(model)["task"] == "low"


def test_profile_works_on_patched_model_and_adds_to_store():
    model = tiny_moe_model("mixtral", seed=3)
    a = premoe.profile(model, {"low": [LOW]}, progress=False)
    with ts.patched(model, moe=ts.PreMoe()):
        b = premoe.profile(model, {"high": [HIGH]}, progress=False, store=a)
    assert b is a and a.tasks == ["low", "high"]
    c = premoe.profile(model, {"high": [HIGH]}, progress=False)
    torch.testing.assert_close(a["high"].tcess, c["high"].tcess, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# store


def test_store_save_load_roundtrip_and_fingerprint(tmp_path):
    model = tiny_moe_model("olmoe", seed=4)
    store = premoe.profile(model, {"low": [LOW], "high": [HIGH]}, progress=False)
    path = store.save(tmp_path / "s" / "store.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "tasksieve.premoe.PatternStore/1"
    loaded = PatternStore.load(path, model=model)
    assert loaded.tasks == store.tasks and loaded.tokens == store.tokens
    assert loaded.fingerprint == store.fingerprint
    for t in store.tasks:
        assert torch.equal(loaded[t].tcess, store[t].tcess)
    assert loaded.retrieve(HIGH[:40]).task == "high"
    other = tiny_moe_model("olmoe", num_experts=6)
    with pytest.raises(ValueError, match="routed experts"):
        PatternStore.load(path, model=other)
    deeper = tiny_moe_model("olmoe", num_hidden_layers=3)
    with pytest.raises(ValueError, match="MoE layers"):
        PatternStore.load(path, model=deeper)
    with pytest.raises(ValueError, match="model type"):
        PatternStore.load(path, model=tiny_moe_model("qwen3_moe"))
    with pytest.raises(ValueError, match="path"):
        PatternStore.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="tcess"):
        store.add("bad", torch.zeros(3, 8))
    with pytest.raises(KeyError, match="nope"):
        store["nope"]


def test_retrieve_nearest_by_l2_and_stops_after_first_router():
    model = tiny_moe_model("mixtral", seed=5)
    store = premoe.profile(model, {"low": [LOW * 2], "high": [HIGH * 2]}, seq_len=32, progress=False)
    prompt = torch.tensor(HIGH[10:50])
    # the key is the top-1 masked mean of the first MoE layer's fp32 logits over the prompt
    key = premoe.probe_key(model, prompt)
    ref = _tcess_reference(_router_logits(model, [prompt.tolist()])[0]).float()
    torch.testing.assert_close(key, ref, atol=1e-5, rtol=1e-4)
    keys = store.keys()
    d = torch.linalg.vector_norm(keys - key[None], dim=1)
    ran = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        p = store.retrieve(prompt)
    finally:
        handle.remove()
    assert ran == []  # the probe never reached layer 1
    assert p.task == store.tasks[int(d.argmin())] == "high"
    assert math.isclose(p.distance, float(d.min()), rel_tol=1e-5)
    assert torch.equal(p.tcess, store["high"].tcess)
    assert store.retrieve(LOW[:30]).task == "low"
    # batch mode: rows concatenated; padding left out by the attention mask
    batch = torch.tensor([HIGH[:20], [0] * 10 + HIGH[20:30]])
    mask = torch.tensor([[1] * 20, [0] * 10 + [1] * 10])
    kb = premoe.probe_key(model, batch, attention_mask=mask)
    zs = _router_logits(model, [HIGH[:20], HIGH[20:30]])[0]
    torch.testing.assert_close(kb, _tcess_reference(zs).float(), atol=1e-4, rtol=1e-3)


def test_retrieve_text_needs_tokenizer_and_model():
    model = tiny_moe_model("qwen2_moe", seed=6)
    tok = tiny_tokenizer()
    store = premoe.profile(model, {"a": ["aaaa bbbb " * 5], "b": ["{}[]();:" * 5]}, tok, progress=False)
    assert store.retrieve("aaaa bbbb aaaa").task == "a"
    assert store.retrieve("{}[]();:{}[]").task == "b"
    bare = PatternStore(store.fingerprint, {t: store[t].tcess for t in store.tasks})
    with pytest.raises(ValueError, match="model"):
        bare.retrieve([5, 6, 7])
    with pytest.raises(ValueError, match="tokenizer"):
        bare.retrieve("text", model=model)
    with pytest.raises(ValueError, match="prompt"):
        store.retrieve(3.5)


# ---------------------------------------------------------------------------------------------------------------
# keep sets


def test_keep_sets_are_each_layers_top_m():
    fp = {"model_type": "mixtral", "moe_layers": [0, 1, 2], "num_experts": 8, "top_k": 2}
    g = torch.Generator().manual_seed(0)
    tcess = torch.randn(3, 8, generator=g)
    tcess[2, 5] = tcess[2, 1]  # a tie: the lower id wins
    p = Pattern("t", tcess, fp)
    for keep, m in ((0.5, 4), (1.0, 8), (0.3, 3), (0.25, 2), (5, 5), (2, 2)):
        sets = p.keep_sets(keep)
        assert [len(s) for s in sets] == [m] * 3
        for l, s in enumerate(sets):
            assert s.tolist() == sorted(s.tolist()) and s.dtype == torch.long
            threshold = tcess[l, s].min()
            dropped = [e for e in range(8) if e not in s.tolist()]
            assert all(tcess[l, e] <= threshold for e in dropped)
    ranks = torch.argsort(tcess[2], descending=True, stable=True).tolist()
    tie_rank = ranks.index(1)
    assert ranks.index(5) == tie_rank + 1
    assert 1 in p.keep_sets(tie_rank + 1)[2].tolist() and 5 not in p.keep_sets(tie_rank + 1)[2].tolist()
    assert [len(s) for s in p.keep_sets([2, 0.5, 8])] == [2, 4, 8]


@pytest.mark.parametrize("keep,match", [(0.0, "keep"), (1.01, "keep"), (-0.5, "keep"), (float("nan"), "keep"),
                                        (0.1, "top_k"), (1, "top_k"), (9, "has 8"), (0, "keep"), (True, "keep"),
                                        ([2, 2], "one value per MoE layer"), ([2, 2, 1], r"keep\[2\]"),
                                        ([], "keep"), ("half", "keep")])
def test_keep_sets_reject_bad_keep(keep, match):
    p = Pattern("t", torch.zeros(3, 8), {"model_type": "mixtral", "moe_layers": [0, 1, 2], "num_experts": 8,
                                         "top_k": 2})
    with pytest.raises(ValueError, match=match):
        p.keep_sets(keep)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_profile_rejects_bad_input():
    model = tiny_moe_model("mixtral")
    with pytest.raises(ValueError, match=r"texts_by_task\['a'\]: empty"):
        premoe.profile(model, {"a": []}, progress=False)
    with pytest.raises(ValueError, match="texts_by_task"):
        premoe.profile(model, {}, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        premoe.profile(model, {"a": ["some text"]}, progress=False)
    with pytest.raises(ValueError, match=r"texts_by_task\['a'\]"):
        premoe.profile(model, {"a": "a single string"}, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        premoe.profile(model, {"a": [LOW]}, top_k=9, progress=False)
    with pytest.raises(ValueError, match="r must"):
        premoe.profile(model, {"a": [LOW]}, r=2.0, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        premoe.profile(model, {"a": [LOW]}, seq_len=0, progress=False)
    with pytest.raises(ValueError, match="model"):
        premoe.profile(ts.models.tiny_model("llama", num_hidden_layers=2), {"a": [LOW]}, progress=False)
    store = premoe.profile(model, {"a": [LOW]}, progress=False)
    premoe.prune(model, store["a"], keep=0.5)
    with pytest.raises(ValueError, match="pruned"):
        premoe.profile(model, {"a": [LOW]}, progress=False)
    other = tiny_moe_model("mixtral", num_local_experts=6)
    with pytest.raises(ValueError, match="store"):
        premoe.profile(other, {"b": [LOW]}, progress=False, store=store)


def test_pruned_model_still_retrieves_with_kept_router_rows():
    model = tiny_moe_model("olmoe", seed=7)
    store = premoe.profile(model, {"low": [LOW * 2], "high": [HIGH * 2]}, seq_len=32, progress=False)
    key = premoe.probe_key(model, HIGH[:30])
    premoe.prune(model, store["low"], keep=0.5)
    torch.testing.assert_close(premoe.probe_key(model, HIGH[:30]), key)
    assert store.retrieve(HIGH[:30], model=model).task == "high"
    report_sets = model.config.tasksieve_kept_experts
    assert report_sets == [s.tolist() for s in store["low"].keep_sets(0.5)]
    assert isinstance(hf_moe.moe_sites(model)[0].block.gate.tasksieve_full_weight, torch.Tensor)
    assert "tasksieve_full_weight" not in "".join(model.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_export_profile_prune_roundtrip(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tasksieve.cli import main

    base = tmp_path / "base"
    assert main(["export", "--model", "tiny:qwen2_moe", "--out", str(base)]) == 0
    prose = tmp_path / "prose.txt"
    prose.write_text("The quick brown fox jumps over the lazy dog.\n\nA second paragraph of plain prose.\n" * 3)
    store_path = tmp_path / "store.safetensors"
    assert main(["profile", "--model", str(base), "--task", f"prose={prose}", "--task", "code=builtin:code",
                 "--out", str(store_path), "--max-tokens", "200", "--seq-len", "64", "--no-progress"]) == 0
    store = PatternStore.load(store_path)
    assert store.tasks == ["prose", "code"] and store.tokens["code"] == 200
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(base), "--store", str(store_path), "--keep", "0.5",
                 "--prompt", "def add(a, b):\n    return a + b\n", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "retrieved task 'code'" in text and "4/8 experts" in text
    pruned = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert pruned.config.num_experts == 4 and pruned.config.tasksieve_task == "code"
    # the same pruning in memory gives the same logits
    model, tok = load_model(str(base))
    premoe.prune(model, store["code"], keep=0.5)
    ids = torch.tensor([HIGH[:12]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_cli_rejects_bad_input(tmp_path, capsys):
    from tasksieve.cli import main

    assert main(["profile", "--model", "tiny:nope", "--task", "a=code", "--out", str(tmp_path / "s")]) == 2
    assert "tiny families" in capsys.readouterr().err
    assert main(["profile", "--model", str(tmp_path / "missing"), "--task", "a=code",
                 "--out", str(tmp_path / "s")]) == 2
    assert main(["profile", "--model", "tiny:mixtral", "--task", "a=no_such_source",
                 "--out", str(tmp_path / "s")]) == 2
    assert "neither a file nor a builtin" in capsys.readouterr().err
    store_path = tmp_path / "s.safetensors"
    assert main(["profile", "--model", "tiny:mixtral", "--task", "a=code", "--out", str(store_path),
                 "--max-tokens", "64", "--no-progress"]) == 0
    assert main(["prune", "--model", "tiny:olmoe", "--store", str(store_path), "--task", "a",
                 "--out", str(tmp_path / "p")]) == 2
    assert "model type" in capsys.readouterr().err
    assert main(["prune", "--model", "tiny:mixtral", "--store", str(store_path), "--task", "a", "--keep", "0.1",
                 "--out", str(tmp_path / "p")]) == 2
    assert "top_k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--model", "tiny:mixtral", "--store", str(store_path), "--keep", "-1", "--task", "a",
              "--out", str(tmp_path / "p")])
