"""UNCURL expert merging: the tensor parts (spectral clustering, unit alignment, weighted merge, router statistics)
against plain-torch recomputations, and ``ts.premoe.merge`` / export / CLI on tiny random MoE models."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tasksieve import premoe
from tasksieve.evaluation.tiny import tiny_moe_model
from tasksieve.integrations.hf import moe as hf_moe
from tasksieve.methods.router_stats import RouterStats
from tasksieve.methods.uncurl import (align_units, groups_of, merge_experts, plan_merge, random_clusters,
                                      spectral_clusters)

LOW = list(range(4, 64))
HIGH = list(range(64, 128))


def _partition(labels: torch.Tensor) -> set:
    return {frozenset(g.tolist()) for g in groups_of(labels)}


# ---------------------------------------------------------------------------------------------------------------
# clustering


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_spectral_recovers_planted_blocks(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    e = sum(sizes)
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm = torch.randperm(e, generator=gen)
    labels_true = truth[perm]
    same = (labels_true[:, None] == labels_true[None, :]).double()
    noise = 0.05 * torch.rand(e, e, generator=gen, dtype=torch.float64)
    a = 0.9 * same + 0.02 + (noise + noise.T) / 2
    got = spectral_clusters(a, len(sizes), seed=0)
    assert _partition(got) == _partition(labels_true)


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 40), data=st.data())
def test_spectral_gives_k_nonempty_clusters_in_canonical_order(e, data):
    k = data.draw(st.integers(1, e))
    seed = data.draw(st.integers(0, 100))
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(e, e, generator=gen, dtype=torch.float64)
    labels = spectral_clusters((x + x.T) / 2, k, seed=seed)
    assert labels.shape == (e,) and labels.dtype == torch.long
    assert sorted(torch.unique(labels).tolist()) == list(range(k))
    firsts = [int((labels == j).nonzero()[0]) for j in range(k)]
    assert firsts == sorted(firsts)  # numbered by smallest member
    assert torch.equal(labels, spectral_clusters((x + x.T) / 2, k, seed=seed))  # deterministic


def test_spectral_and_random_reject_bad_input():
    with pytest.raises(ValueError, match="n_clusters"):
        spectral_clusters(torch.ones(4, 4), 5)
    with pytest.raises(ValueError, match="square"):
        spectral_clusters(torch.ones(4, 3), 2)
    with pytest.raises(ValueError, match="non-negative"):
        spectral_clusters(-torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="n_clusters"):
        random_clusters(4, 0)


def test_random_clusters_are_balanced_and_seeded():
    labels = random_clusters(16, 4, seed=3)
    assert torch.bincount(labels).tolist() == [4, 4, 4, 4]
    assert torch.equal(labels, random_clusters(16, 4, seed=3))
    assert not torch.equal(labels, random_clusters(16, 4, seed=4))


# ---------------------------------------------------------------------------------------------------------------
# alignment and merge


def _expert(inter, hidden, gen):
    return (torch.randn(2 * inter, hidden, generator=gen, dtype=torch.float64),
            torch.randn(hidden, inter, generator=gen, dtype=torch.float64))


def _swiglu(gu, dn, x):
    inter = dn.shape[1]
    h = torch.nn.functional.silu(x @ gu[:inter].T) * (x @ gu[inter:].T)
    return h @ dn.T


def _permuted(gu, dn, perm):
    inter = dn.shape[1]
    return torch.cat([gu[:inter][perm], gu[inter:][perm]]), dn[:, perm]


@settings(max_examples=20, deadline=None)
@given(inter=st.integers(1, 24), hidden=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_align_units_recovers_a_permutation(inter, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    gu, dn = _expert(inter, hidden, gen)
    perm = torch.randperm(inter, generator=gen)
    pgu, pdn = _permuted(gu, dn, perm)
    back = align_units(gu, dn, pgu, pdn)
    agu, adn = _permuted(pgu, pdn, back)
    assert torch.equal(agu, gu) and torch.equal(adn, dn)


@settings(max_examples=20, deadline=None)
@given(inter=st.integers(2, 16), hidden=st.integers(2, 8), n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_merging_permuted_copies_is_lossless_only_with_alignment(inter, hidden, n, seed):
    gen = torch.Generator().manual_seed(seed)
    gu, dn = _expert(inter, hidden, gen)
    copies = [(gu, dn)] + [_permuted(gu, dn, torch.randperm(inter, generator=gen)) for _ in range(n - 1)]
    gus = torch.stack([c[0] for c in copies])
    dns = torch.stack([c[1] for c in copies])
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    mgu, mdn = merge_experts(gus, dns, w, anchor=0, align=True)
    torch.testing.assert_close(_swiglu(mgu, mdn, x), _swiglu(gu, dn, x))
    # reference: the plain weighted average of the (unaligned) weights
    ngu, ndn = merge_experts(gus, dns, w, anchor=0, align=False)
    wn = (w / w.sum())[:, None, None]
    torch.testing.assert_close(ngu, (wn * gus).sum(0))
    torch.testing.assert_close(ndn, (wn * dns).sum(0))


def test_merge_experts_rejects_bad_weights():
    gu, dn = torch.zeros(2, 4, 3), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="weights"):
        merge_experts(gu, dn, torch.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        merge_experts(gu, dn, torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------------------------------------------------------
# router statistics


@settings(max_examples=15, deadline=None)
@given(t=st.integers(2, 60), e=st.integers(2, 12), data=st.data())
def test_router_stats_give_correlation_frequency_and_coselection(t, e, data):
    k = data.draw(st.integers(1, e))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(t, e, generator=gen)
    ids = torch.topk(z, k, dim=1).indices
    stats = RouterStats.zeros(1, e)
    half = t // 2
    stats.update(0, z[:half], ids[:half])
    stats.add_tokens(half)
    stats.update(0, z[half:], ids[half:])
    stats.add_tokens(t - half)
    onehot = torch.zeros(t, e, dtype=torch.float64).scatter(1, ids, 1.0)
    torch.testing.assert_close(stats.frequency(0), onehot.mean(0))
    torch.testing.assert_close(stats.coselect[0], onehot.T @ onehot)
    corr = torch.corrcoef(z.double().T)
    torch.testing.assert_close(stats.logit_correlation(0), corr.nan_to_num(0.0).fill_diagonal_(1.0),
                               atol=1e-9, rtol=1e-9)


def test_plan_merge_weights_by_frequency_and_rejects_bad_choices():
    stats = RouterStats.zeros(1, 4)
    z = torch.tensor([[3.0, 2.9, -1.0, -1.1], [2.0, 2.1, 0.0, -0.2], [-1.0, -1.2, 3.0, 2.8], [0.0, 0.1, 1.0, 1.2]])
    ids_skew = torch.tensor([[0], [0], [2], [3]])
    stats.update(0, z, ids_skew)
    stats.add_tokens(4)
    plan = plan_merge(stats, [2])
    assert [g.tolist() for g in plan.groups[0]] == [[0, 1], [2, 3]]
    torch.testing.assert_close(plan.weights[0][0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(plan.weights[0][1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert plan.anchors[0] == [0, 0]
    uni = plan_merge(stats, [2], weighting="uniform")
    torch.testing.assert_close(uni.weights[0][0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    for kw, match in ((dict(affinity="cosine"), "affinity"), (dict(clustering="kmeans"), "clustering"),
                      (dict(weighting="softmax"), "weighting")):
        with pytest.raises(ValueError, match=match):
            plan_merge(stats, [2], **kw)
    with pytest.raises(ValueError, match="one count per MoE layer"):
        plan_merge(stats, [2, 2])


# ---------------------------------------------------------------------------------------------------------------
# HF models


def _store(model, n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return premoe.profile(model, {"low": [torch.randint(4, 64, (n,), generator=gen).tolist()],
                                  "high": [torch.randint(64, 128, (n,), generator=gen).tolist()]},
                          progress=False, seq_len=64)


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(4, 128, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_merge_keeping_every_expert_is_exact_and_merge_changes_the_model(family):
    model = tiny_moe_model(family)
    store = _store(model)
    ids = _ids()
    ref = _logits(model, ids)
    same = copy.deepcopy(model)
    rep = premoe.merge(same, store, task="low", keep=1.0)
    assert rep.num_experts_after == [8, 8]
    torch.testing.assert_close(_logits(same, ids), ref, atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model)
    k = hf_moe.moe_convention(model)["top_k"]
    rep = premoe.merge(merged, store, task="low", keep=4, top_k=min(k, 4))
    assert rep.num_experts_after == [4, 4] and rep.expert_bytes_after * 2 == rep.expert_bytes_before
    conv = hf_moe.moe_convention(merged)
    assert conv["num_experts"] == 4 and conv["top_k"] == min(k, 4)
    for site in hf_moe.moe_sites(merged):
        assert site.block.experts.gate_up_proj.shape[0] == 4 and site.block.gate.weight.shape[0] == 4
        assert sorted(i for g in merged.config.tasksieve_merged_groups[site.moe_idx] for i in g) == list(range(8))
    out = _logits(merged, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert premoe.is_merged(merged) and not premoe.is_merged(model)


def _duplicated_mixtral(seed=0):
    """A tiny Mixtral whose 8 experts are 4 pairs: expert 2j+1 is a unit-permuted copy of expert 2j with the same
    router row, so merging each pair (aligned) computes the same function."""
    model = tiny_moe_model("mixtral", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for site in hf_moe.moe_sites(model):
            ex, gate = site.block.experts, site.block.gate
            inter = ex.down_proj.shape[2]
            for j in range(4):
                perm = torch.randperm(inter, generator=gen)
                gu, dn = ex.gate_up_proj[2 * j], ex.down_proj[2 * j]
                ex.gate_up_proj[2 * j + 1] = torch.cat([gu[:inter][perm], gu[inter:][perm]])
                ex.down_proj[2 * j + 1] = dn[:, perm]
                gate.weight[2 * j + 1] = gate.weight[2 * j]
    return model


def test_merging_duplicated_experts_reproduces_the_model():
    model = _duplicated_mixtral()
    store = _store(model)
    ids = _ids(1)
    ref = _logits(model, ids)
    merged = copy.deepcopy(model)
    # top-2 of 8 picks both copies of the best pair (equal logits); top-1 of the 4 merged pairs picks the same
    rep = premoe.merge(merged, store, task="high", keep=4, top_k=1)
    assert all(sorted(map(sorted, layer)) == [[0, 1], [2, 3], [4, 5], [6, 7]] for layer in rep.groups)
    torch.testing.assert_close(_logits(merged, ids), ref, atol=2e-5, rtol=1e-4)
    unaligned = copy.deepcopy(model)
    premoe.merge(unaligned, store, task="high", keep=4, top_k=1, align=False)
    assert (_logits(unaligned, ids) - ref).abs().max() > 1e-2


def test_merge_export_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe_model("qwen3_moe")
    store = _store(model)
    premoe.merge(model, store, task="low", keep=4)
    ids = _ids(2)
    ref = _logits(model, ids)
    premoe.export(model, tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    assert back.config.num_experts == 4 and back.config.tasksieve_merged_groups == model.config.tasksieve_merged_groups
    torch.testing.assert_close(_logits(back, ids), ref)
    assert premoe.is_merged(back)
    with pytest.raises(ValueError, match="already merged"):
        premoe.merge(back, store, task="low", keep=2)


def test_store_keeps_router_stats_through_save_and_load(tmp_path):
    model = tiny_moe_model("olmoe")
    store = _store(model)
    assert store.has_stats("low") and store["low"].stats.tokens == 256
    back = premoe.PatternStore.load(store.save(tmp_path / "s.safetensors"))
    for task in store.tasks:
        a, b = store[task].stats, back[task].stats
        assert a.tokens == b.tokens
        for f in ("counts", "logit_sum", "logit_gram", "coselect"):
            assert torch.equal(getattr(a, f), getattr(b, f))
    # counts: every token selects top_k experts in every layer
    k = hf_moe.moe_convention(model)["top_k"]
    assert torch.equal(back["low"].stats.counts.sum(1), torch.full((2,), 256.0 * k, dtype=torch.float64))


def test_merge_rejects_bad_input():
    model = tiny_moe_model("mixtral")
    store = _store(model)
    with pytest.raises(ValueError, match="asks for 9 experts"):
        premoe.merge(copy.deepcopy(model), store, task="low", keep=9)
    with pytest.raises(ValueError, match="fewer than the router's top_k 2.*top_k="):
        premoe.merge(copy.deepcopy(model), store, task="low", keep=1)
    with pytest.raises(ValueError, match="top_k must be"):
        premoe.merge(copy.deepcopy(model), store, task="low", keep=4, top_k=3)
    with pytest.raises(ValueError, match="task: 'nope' is not in the store"):
        premoe.merge(copy.deepcopy(model), store, task="nope", keep=4)
    with pytest.raises(ValueError, match="exactly one of task= .* or prompt="):
        premoe.merge(copy.deepcopy(model), store, keep=4)
    with pytest.raises(ValueError, match="store_or_pattern: expected"):
        premoe.merge(copy.deepcopy(model), {"low": 1}, keep=4)
    other = _store(tiny_moe_model("olmoe"))
    with pytest.raises(ValueError, match="store_or_pattern: profiled on a model with model type 'olmoe'"):
        premoe.merge(copy.deepcopy(model), other, task="low", keep=4)
    no_stats = premoe.PatternStore(store.fingerprint, {"low": store["low"].tcess})
    with pytest.raises(ValueError, match="no router statistics"):
        premoe.merge(copy.deepcopy(model), no_stats, task="low", keep=4)
    for kw, match in ((dict(affinity="cos"), "affinity"), (dict(align=1), "align"), (dict(seed=0.5), "seed")):
        with pytest.raises(ValueError, match=match):
            premoe.merge(copy.deepcopy(model), store, task="low", keep=4, **kw)
    pruned = copy.deepcopy(model)
    premoe.prune(pruned, store["low"], keep=4)
    with pytest.raises(ValueError, match="already pruned"):
        premoe.merge(pruned, store, task="low", keep=4)
    merged = copy.deepcopy(model)
    premoe.merge(merged, store, task="low", keep=[4, 3])
    with pytest.raises(ValueError, match="already merged"):
        premoe.merge(merged, store, task="low", keep=2)
    with pytest.raises(ValueError, match="prune: model is merged"):
        premoe.prune(merged, store["low"], keep=4)
    with pytest.raises(ValueError, match="export: model was merged to a different expert count"):
        premoe.export(merged, "/nonexistent/never-written")
    import tasksieve as ts

    patched = copy.deepcopy(model)
    ts.patch(patched, moe=ts.PreMoe())
    with pytest.raises(ValueError, match="is patched"):
        premoe.merge(patched, store, task="low", keep=4)


def test_prune_below_top_k_needs_an_explicit_top_k():
    model = tiny_moe_model("olmoe")  # top-4 of 8
    store = _store(model)
    with pytest.raises(ValueError, match="pass top_k="):
        premoe.prune(copy.deepcopy(model), store["low"], keep=2)
    pruned = copy.deepcopy(model)
    rep = premoe.prune(pruned, store["low"], keep=2, top_k=2)
    assert rep.num_experts_after == [2, 2]
    assert pruned.config.num_experts_per_tok == 2 and hf_moe.fingerprint(pruned)["top_k"] == 4
    assert torch.isfinite(_logits(pruned, _ids())).all()


def test_cli_merge(tmp_path, capsys):
    from tasksieve.cli import main

    base = tmp_path / "base"
    assert main(["export", "--model", "tiny:mixtral", "--out", str(base)]) == 0
    store_path = tmp_path / "store.safetensors"
    assert main(["profile", "--model", str(base), "--task", "code=builtin:code", "--task", "docs=builtin:pydoc",
                 "--out", str(store_path), "--max-tokens", "512", "--seq-len", "128", "--no-progress"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--store", str(store_path), "--task", "code", "--keep", "4",
                 "--out", str(out)]) == 0
    assert "UNCURL merge (task 'code'): 4/8 experts" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(out))
    assert back.config.num_local_experts == 4
    assert main(["merge", "--model", str(base), "--store", str(store_path), "--task", "nope", "--keep", "4",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not in the store" in capsys.readouterr().err
    assert main(["merge", "--model", str(base), "--store", str(store_path), "--task", "code", "--keep", "0.1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "top_k" in capsys.readouterr().err
