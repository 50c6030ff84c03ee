"""tasksieve.moefy: dense Llama -> standard HF Mixtral by neuron clustering + least-squares router.

Tiny random Llama (hidden 64, intermediate 128, 5 layers): fast, no real weights needed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tasksieve.evaluation import models
from tasksieve.evaluation import moefy as mf

E = 8


@pytest.fixture(scope="module")
def dense():
    return models.tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(11)
    return torch.randint(3, 128, (300,), generator=gen)


@pytest.fixture(scope="module")
def moe_k4(dense, calib):
    return mf.moefy(dense, calib, num_experts=E, top_k=4, seq_len=128)


def _expert_rows(moe, layer):
    """[E, I/E, H] gate rows and up rows of a built Mixtral layer."""
    gu = moe.model.layers[layer].mlp.experts.gate_up_proj.detach()
    half = gu.shape[1] // 2
    return gu[:, :half], gu[:, half:]


@torch.no_grad()
def test_all_experts_reproduce_dense_logits(dense, calib):
    moe = mf.moefy(dense, calib, num_experts=E, top_k=E, seq_len=128, router_tolerance=1e-7)
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.randint(3, 128, (2, 37), generator=torch.Generator().manual_seed(5))
    ref = dense(input_ids=ids).logits
    out = moe(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_default_tolerance_bounds_routing_weights(dense, calib, moe_k4):
    # k * w_i stays within the requested tolerance of 1 on the calibration tokens (first order + margin).
    stats = moe_k4.config.tasksieve_moefy
    assert len(stats["max_weight_dev"]) == dense.config.num_hidden_layers
    assert max(stats["max_weight_dev"]) <= 1.5 * stats["router_tolerance"]
    # ... and on fresh tokens the MoE block is the plain sum of its k selected experts to that tolerance.
    block = moe_k4.model.layers[2].mlp
    x = torch.randn(50, dense.config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, idx = block.gate(x)
    assert torch.all((4 * weights - 1).abs() < 0.05)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))


@torch.no_grad()
def test_partition_covers_every_neuron_once(dense, moe_k4):
    inter = dense.config.intermediate_size
    for layer in range(dense.config.num_hidden_layers):
        gate_rows, up_rows = _expert_rows(moe_k4, layer)
        assert gate_rows.shape == (E, inter // E, dense.config.hidden_size)
        mlp = dense.model.layers[layer].mlp
        # Each expert row is exactly one dense neuron's row; together they are a permutation of all neurons.
        match = (gate_rows.reshape(inter, 1, -1) == mlp.gate_proj.weight[None]).all(-1)  # [I, I]
        assert torch.equal(match.sum(1), torch.ones(inter, dtype=torch.long))
        neuron = match.float().argmax(1)
        assert torch.equal(torch.sort(neuron).values, torch.arange(inter))
        # up rows and down columns follow the same neuron order; down is scaled by top_k.
        torch.testing.assert_close(up_rows.reshape(inter, -1), mlp.up_proj.weight[neuron], atol=0, rtol=0)
        down = moe_k4.model.layers[layer].mlp.experts.down_proj  # [E, H, I/E]
        torch.testing.assert_close(
            down.permute(1, 0, 2).reshape(-1, inter), 4 * mlp.down_proj.weight[:, neuron], atol=1e-6, rtol=1e-6
        )


@torch.no_grad()
def test_router_ranking_equals_least_squares_ranking(dense, calib, moe_k4):
    layer = 1
    xs = mf.collect_mlp_inputs(dense, calib, seq_len=128)
    mlp = dense.model.layers[layer].mlp
    act = mf.mlp_activations(mlp, xs[layer])
    groups = mf.partition_neurons(act, E, seed=0 + layer)
    target = mf.expert_contributions(act, mlp.down_proj.weight, groups)
    w_ls, r2 = mf.fit_router(xs[layer], target, ridge=1e-3)
    assert r2 <= 1.0  # no intercept column (Mixtral routers have no bias), so r2 may be < 0 on random weights
    x = torch.randn(200, dense.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pred = x.double() @ w_ls
    _, _, idx = moe_k4.model.layers[layer].mlp.gate(x)
    want = torch.topk(pred, 4, dim=-1)
    # Compare top-k sets where the LS prediction is not a near-tie at the k-th place.
    sorted_pred = torch.sort(pred, dim=-1, descending=True).values
    clear = (sorted_pred[:, 3] - sorted_pred[:, 4]) > 1e-4 * (sorted_pred[:, 0] - sorted_pred[:, -1])
    assert clear.sum() > 150
    got_sets = torch.sort(idx.long(), dim=-1).values[clear]
    want_sets = torch.sort(want.indices, dim=-1).values[clear]
    assert torch.equal(got_sets, want_sets)
    # and the order inside the top-k is the LS order
    order_clear = clear & ((sorted_pred[:, :3] - sorted_pred[:, 1:4]).min(-1).values > 1e-4 * (
        sorted_pred[:, 0] - sorted_pred[:, -1]))
    assert torch.equal(idx.long()[order_clear], want.indices[order_clear])


def test_clustering_deterministic_and_balanced():
    gen = torch.Generator().manual_seed(0)
    act = torch.randn(400, 96, generator=gen)
    a = mf.partition_neurons(act, 6, seed=7)
    b = mf.partition_neurons(act, 6, seed=7)
    assert torch.equal(a, b)
    assert a.shape == (6, 16)
    assert torch.equal(torch.sort(a.flatten()).values, torch.arange(96))


def test_balanced_kmeans_recovers_planted_clusters():
    # Four well-separated directions, 10 noisy points each, shuffled: the clusters must be found exactly.
    gen = torch.Generator().manual_seed(4)
    centers = torch.eye(4, 32) * 5
    truth = torch.arange(4).repeat_interleave(10)
    perm = torch.randperm(40, generator=gen)
    truth = truth[perm]
    feats = centers[truth] + 0.3 * torch.randn(40, 32, generator=gen)
    labels = mf.balanced_kmeans(feats, 4, seed=1)
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 10))
    for c in range(4):
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 4


def test_fit_router_recovers_linear_map():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    got, r2 = mf.fit_router(x, x @ w, ridge=0.0)
    torch.testing.assert_close(got, w)
    assert r2 == pytest.approx(1.0)


@torch.no_grad()
def test_save_and_reload_roundtrip(tmp_path, moe_k4):
    from transformers import MixtralForCausalLM

    moe_k4.save_pretrained(tmp_path)
    again = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again(input_ids=ids).logits, moe_k4(input_ids=ids).logits)
    assert again.config.tasksieve_moefy["num_experts"] == E


def test_bad_arguments(dense, calib):
    with pytest.raises(ValueError, match="num_experts must divide"):
        mf.moefy(dense, calib, num_experts=7, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        mf.moefy(dense, calib, num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="calib_ids"):
        mf.moefy(dense, torch.zeros(0, dtype=torch.long), num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="num_clusters"):
        mf.balanced_kmeans(torch.randn(10, 3), 3)
    with pytest.raises(ValueError, match="tolerance"):
        mf.router_scale(torch.randn(4, 3), 2, 0.0)
    with pytest.raises(ValueError, match="ridge"):
        mf.fit_router(torch.randn(4, 3), torch.randn(4, 2), ridge=-1.0)


@torch.no_grad()
def test_split_once_assemble_per_k(dense, calib):
    splits = mf.split_layers(dense, calib, E, seq_len=128)
    m2 = mf.assemble(dense, splits, 2)
    m8 = mf.assemble(dense, splits, E, router_tolerance=1e-7)
    # Same experts; down_proj carries the top-k factor that cancels Mixtral's renormalised 1/k weights.
    a, b = m2.model.layers[0].mlp.experts, m8.model.layers[0].mlp.experts
    torch.testing.assert_close(a.gate_up_proj, b.gate_up_proj, atol=0, rtol=0)
    torch.testing.assert_close(a.down_proj * (E / 2), b.down_proj)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(m8(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # Routing to 2 of 8 experts changes the output (a test that the routed model is not secretly dense).
    assert (m2(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="layer splits"):
        mf.assemble(dense, splits[:2], 2)


def test_calibration_ids_take_each_task_prefix():
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    texts = {"b": "xyz" * 10, "a": "abc" * 10}
    ids = mf.calibration_ids(CharTokenizer(), 4, texts)
    assert ids.tolist() == [ord(c) for c in "abca" + "xyzx"]  # sorted task names, first tokens of each
    with pytest.raises(ValueError, match="only 30 tokens"):
        mf.calibration_ids(CharTokenizer(), 31, texts)
    with pytest.raises(ValueError, match="tokens_per_task"):
        mf.calibration_ids(CharTokenizer(), 0, texts)
