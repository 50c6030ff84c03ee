"""The MoE block swap (ts.patch(model, moe=ts.PreMoe(...))), pruning and export on tiny random MoE models of the four
HF families, against plain-torch references of the routing semantics (reference/premoe.md §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasksieve as ts
from tasksieve import premoe
from tasksieve.integrations.hf import moe as hf_moe
from tasksieve.evaluation.tiny import TINY_FAMILIES, tiny_moe_model, tiny_tokenizer
from tasksieve.premoe import Pattern, PreMoe

from conftest import DEVICES

FAMILIES = TINY_FAMILIES
UNNORMALISED = ("qwen2_moe", "olmoe")


def _ids(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, shape, generator=g)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _pattern(model, seed: int = 1) -> Pattern:
    fp = hf_moe.fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    return Pattern("t", torch.randn(len(fp["moe_layers"]), fp["num_experts"], generator=g), fp)


class MaskedReference(nn.Module):
    """Plain-torch MoE block: pruned experts -> -inf before top-k, a per-token expert loop.

    ``allowed`` bool [E] (None = all). mask_full: the softmax runs over all E, top-k among the allowed.
    """

    def __init__(self, block, allowed, renormalize: bool, mask_full: bool = False):
        super().__init__()
        self.block, self.allowed, self.renormalize, self.mask_full = block, allowed, renormalize, mask_full

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gate, experts = self.block.gate, self.block.experts
        z = F.linear(x, gate.weight).double()
        allowed = (self.allowed.to(z.device) if self.allowed is not None
                   else torch.ones(z.shape[1], dtype=torch.bool, device=z.device))
        masked = z.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(z if self.mask_full else masked, dim=-1)
        ids = torch.topk(masked, gate.top_k, dim=-1).indices
        w = torch.gather(p, -1, ids)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x, dtype=torch.float64)
        inter = experts.down_proj.shape[2]
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                e = int(ids[t, j])
                h = experts.gate_up_proj[e].double() @ x[t].double()
                out[t] += w[t, j] * (experts.down_proj[e].double() @ (F.silu(h[:inter]) * h[inter:]))
        if hasattr(self.block, "shared_expert"):
            out += (torch.sigmoid(self.block.shared_expert_gate(x)) * self.block.shared_expert(x)).double()
        return out.to(x.dtype).reshape(shape)


@torch.no_grad()
def _reference_logits(model, ids, allowed_per_layer, mask_full=False):
    conv = hf_moe.moe_convention(model)
    sites = hf_moe.moe_sites(model)
    try:
        for site, allowed in zip(sites, allowed_per_layer):
            setattr(site.parent, site.attr, MaskedReference(site.block, allowed, conv["renormalize"], mask_full))
        return _logits(model, ids)
    finally:
        for site in sites:
            setattr(site.parent, site.attr, site.block)


def _masks(keep_sets, num_experts):
    out = []
    for ids in keep_sets:
        m = torch.zeros(num_experts, dtype=torch.bool)
        m[ids] = True
        out.append(m)
    return out


# ---------------------------------------------------------------------------------------------------------------
# swap / restore


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keep_all_matches_hf_and_unpatch_restores_exactly(family, device):
    model = tiny_moe_model(family, seed=3).to(device)
    ids = _ids(3).to(device)
    params_before = {n: p for n, p in model.named_parameters()}
    blocks_before = [s.block for s in hf_moe.moe_sites(model)]
    ref = _logits(model, ids)
    ts.patch(model, moe=PreMoe())
    try:
        swapped = [getattr(s.parent, s.attr) for s in hf_moe.moe_sites(model)]
        assert all(isinstance(b, hf_moe.TaskSieveMoeBlock) for b in swapped)
        # the swapped blocks hold the model's own parameters: same names, same objects
        assert {n: p for n, p in model.named_parameters()} == params_before
        out = _logits(model, ids)
    finally:
        ts.unpatch(model)
    torch.testing.assert_close(out, ref, atol=2e-5 if device == "cpu" else 1e-4, rtol=1e-4)
    assert not hf_moe.is_moe_patched(model)
    assert [s.block for s in hf_moe.moe_sites(model)] == blocks_before
    assert all(getattr(s.parent, s.attr) is s.block for s in hf_moe.moe_sites(model))
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys() and all(after[n] is params_before[n] for n in after)
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_patch_without_kernels_uses_hf_experts_and_matches(family):
    model = tiny_moe_model(family, seed=4)
    ids = _ids(4)
    ref = _logits(model, ids)
    with ts.patched(model, moe=PreMoe(use_kernels=False)):
        out = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_pattern_matches_plain_torch_reference(family, device):
    model = tiny_moe_model(family, seed=5).to(device)
    ids = _ids(5).to(device)
    pattern = _pattern(model, seed=5)
    keep_sets = pattern.keep_sets(0.5)
    assert [len(k) for k in keep_sets] == [4, 4]
    ref = _reference_logits(model, ids, _masks(keep_sets, 8))
    dense = _logits(model, ids)
    with ts.patched(model, moe=PreMoe(pattern=pattern, keep=0.5)):
        out = _logits(model, ids)
        info = hf_moe.moe_info(model)
    assert info["allowed_experts"] == [k.tolist() for k in keep_sets]
    torch.testing.assert_close(out, ref, atol=2e-5 if device == "cpu" else 1e-4, rtol=1e-4)
    assert not torch.allclose(out, dense, atol=1e-3)  # the pruning did change the model


@pytest.mark.parametrize("family", UNNORMALISED)
def test_mask_full_keeps_unpruned_probabilities(family):
    model = tiny_moe_model(family, seed=6)
    ids = _ids(6)
    keep_sets = _pattern(model, seed=6).keep_sets(0.5)
    masks = _masks(keep_sets, 8)
    full_ref = _reference_logits(model, ids, masks, mask_full=True)
    slice_ref = _reference_logits(model, ids, masks, mask_full=False)
    assert not torch.allclose(full_ref, slice_ref, atol=1e-4)  # the two semantics really differ here
    with ts.patched(model, moe=PreMoe(pattern=_pattern(model, seed=6), keep=0.5, renorm="mask_full")):
        out = _logits(model, ids)
    torch.testing.assert_close(out, full_ref, atol=2e-5, rtol=1e-4)


def test_mask_full_equals_slice_for_renormalising_family():
    model = tiny_moe_model("mixtral", seed=7)
    ids = _ids(7)
    p = _pattern(model, seed=7)
    with ts.patched(model, moe=PreMoe(pattern=p, keep=0.5, renorm="slice")):
        a = _logits(model, ids)
    with ts.patched(model, moe=PreMoe(pattern=p, keep=0.5, renorm="mask_full")):
        b = _logits(model, ids)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# prune


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_compacts_and_hf_forward_equals_masked_reference(family):
    model = tiny_moe_model(family, seed=8)
    ids = _ids(8)
    pattern = _pattern(model, seed=8)
    keep_sets = pattern.keep_sets(0.5)
    ref = _reference_logits(model, ids, _masks(keep_sets, 8))
    mask_full_ref = _reference_logits(model, ids, _masks(keep_sets, 8), mask_full=True)
    conv = hf_moe.moe_convention(model)
    old = [s.block.experts.gate_up_proj for s in hf_moe.moe_sites(model)]
    kept_rows = [o.detach()[k].clone() for o, k in zip(old, keep_sets)]
    report = premoe.prune(model, pattern, keep=0.5)
    del old
    assert report.kept == [k.tolist() for k in keep_sets]
    assert report.num_experts_after == [4, 4]
    assert report.expert_bytes_after * 2 == report.expert_bytes_before
    assert report.param_bytes_after < report.param_bytes_before
    cfg = model.config
    assert getattr(cfg, conv["num_experts_attr"]) == 4 and cfg.tasksieve_original_num_experts == 8
    assert cfg.tasksieve_kept_experts == report.kept
    for site, rows, k in zip(hf_moe.moe_sites(model), kept_rows, keep_sets):
        assert site.block.experts.gate_up_proj.shape[0] == 4 and site.block.experts.down_proj.shape[0] == 4
        assert site.block.gate.weight.shape[0] == 4 and site.block.gate.num_experts == 4
        assert site.block.experts.num_experts == 4
        assert torch.equal(site.block.experts.gate_up_proj, rows)
    # HF's own forward on the compacted model = slicing = masking before top-k
    torch.testing.assert_close(_logits(model, ids), ref, atol=2e-5, rtol=1e-4)
    # tasksieve's block on the compacted model, both semantics
    with ts.patched(model, moe=PreMoe()):
        torch.testing.assert_close(_logits(model, ids), ref, atol=2e-5, rtol=1e-4)
    with ts.patched(model, moe=PreMoe(renorm="mask_full")):
        torch.testing.assert_close(_logits(model, ids), mask_full_ref, atol=2e-5, rtol=1e-4)


def test_prune_non_uniform_keep_and_export_refuses():
    model = tiny_moe_model("qwen3_moe", seed=9)
    ids = _ids(9)
    pattern = _pattern(model, seed=9)
    keep_sets = pattern.keep_sets([3, 6])
    ref = _reference_logits(model, ids, _masks(keep_sets, 8))
    report = premoe.prune(model, pattern, keep=[3, 6])
    assert report.num_experts_after == [3, 6]
    torch.testing.assert_close(_logits(model, ids), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="uniform keep"):
        premoe.export(model, "/nonexistent/never_written")


def test_patched_pattern_on_pruned_model_maps_to_compact_ids():
    model = tiny_moe_model("olmoe", seed=10)
    ids = _ids(10)
    wide = _pattern(model, seed=10)
    g = torch.Generator().manual_seed(11)
    narrow = Pattern("n", wide.tcess + 0.3 * torch.randn(wide.tcess.shape, generator=g), wide.fingerprint)
    premoe.prune(model, wide, keep=6)
    kept = [set(k) for k in model.config.tasksieve_kept_experts]
    narrow5 = [set(s.tolist()) for s in narrow.keep_sets(5)]
    # routing may pick what narrow keeps AND the pruned model still holds
    masks = [torch.tensor([e in n and e in k for e in range(8)]) for n, k in zip(narrow5, kept)]
    assert all(int(m.sum()) >= 4 for m in masks) and any(int(m.sum()) < 6 for m in masks)
    ref = _reference_logits_pruned(model, ids, masks)
    with ts.patched(model, moe=PreMoe(pattern=narrow, keep=5)):
        torch.testing.assert_close(_logits(model, ids), ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def _reference_logits_pruned(model, ids, masks_orig):
    """Masked reference on a pruned model: masks in original ids -> compact ids."""
    compact = [m[torch.tensor(k)] for m, k in zip(masks_orig, model.config.tasksieve_kept_experts)]
    return _reference_logits(model, ids, compact)


# ---------------------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_with_plain_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe_model(family, seed=12)
    ids = _ids(12)
    premoe.prune(model, _pattern(model, seed=12), keep=0.5)
    ts.patch(model, moe=PreMoe())  # export saves the HF form of a patched model
    try:
        out = premoe.export(model, tmp_path / "pruned", tiny_tokenizer())
    finally:
        ts.unpatch(model)
    ref = _logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    loaded.eval()
    conv = hf_moe.moe_convention(loaded)
    assert conv["num_experts"] == 4
    assert loaded.config.tasksieve_kept_experts == model.config.tasksieve_kept_experts
    for site in hf_moe.moe_sites(loaded):
        assert site.block.experts.gate_up_proj.shape[0] == 4
    torch.testing.assert_close(_logits(loaded, ids), ref, atol=0, rtol=0)
    assert (out / "tokenizer.json").is_file()
    # a loaded pruned checkpoint still runs through tasksieve (slice semantics) but has no full router
    with ts.patched(loaded, moe=PreMoe()):
        torch.testing.assert_close(_logits(loaded, ids), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="mask_full"):
        ts.patch(loaded, moe=PreMoe(renorm="mask_full"))


# ---------------------------------------------------------------------------------------------------------------
# retrieval inside the patched forward


def test_patch_with_store_retrieves_per_request():
    model = tiny_moe_model("mixtral", seed=13)
    low = [list(range(4, 64)) * 2]
    high = [list(range(64, 128)) * 2]
    store = premoe.profile(model, {"low": low, "high": high}, seq_len=32, progress=False)
    with ts.patched(model, moe=PreMoe(pattern=store, keep=0.5)):
        _logits(model, torch.arange(70, 120)[None])
        info = hf_moe.moe_info(model)
        assert info["task"] == "high" and info["requests"] == 1
        assert info["allowed_experts"] == [k.tolist() for k in store["high"].keep_sets(0.5)]
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.arange(5, 60)[None], past_key_values=cache, use_cache=True)
            assert hf_moe.moe_info(model)["task"] == "low"
            model(input_ids=torch.tensor([[100]]), past_key_values=cache, use_cache=True)  # a decoding step keeps it
        info = hf_moe.moe_info(model)
        assert info["task"] == "low" and info["requests"] == 2


def test_store_retrieval_only_at_the_start_of_a_request():
    """A multi-token forward on a live cache (chunked prefill, teacher forcing) continues the request: no new
    retrieval from its tokens. A new (empty) cache starts a new request."""
    from transformers import DynamicCache

    model = tiny_moe_model("mixtral", seed=13)
    store = premoe.profile(model, {"low": [list(range(4, 64)) * 2], "high": [list(range(64, 128)) * 2]},
                           seq_len=32, progress=False)
    with ts.patched(model, moe=PreMoe(pattern=store, keep=0.5)), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.arange(70, 120)[None], past_key_values=cache, use_cache=True)
        assert hf_moe.moe_info(model)["task"] == "high"
        model(input_ids=torch.arange(5, 40)[None], past_key_values=cache, use_cache=True)  # second chunk
        info = hf_moe.moe_info(model)
        assert info["task"] == "high" and info["requests"] == 1
        model(input_ids=torch.arange(5, 40)[None], past_key_values=DynamicCache(config=model.config), use_cache=True)
        info = hf_moe.moe_info(model)
        assert info["task"] == "low" and info["requests"] == 2
    assert not model.model._forward_pre_hooks


def test_generate_runs_patched():
    model = tiny_moe_model("qwen2_moe", seed=14)
    ids = _ids(14, (1, 6))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        with ts.patched(model, moe=PreMoe()):
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_patch_rejects_non_moe_model_and_bad_policies():
    dense = ts.models.tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match="model"):
        ts.patch(dense, moe=PreMoe())
    model = tiny_moe_model("mixtral")
    p = _pattern(model)
    with pytest.raises(ValueError, match="moe must be a tasksieve.PreMoe"):
        ts.patch(model, moe="premoe")
    with pytest.raises(ValueError, match="PreMoe.keep"):
        ts.patch(model, moe=PreMoe(keep=0.5))  # no pattern: nothing to prune by
    for keep in (0.0, 1.5, -2, True, "half"):
        with pytest.raises(ValueError, match="keep"):
            ts.patch(model, moe=PreMoe(pattern=p, keep=keep))
    with pytest.raises(ValueError, match="top_k"):
        ts.patch(model, moe=PreMoe(pattern=p, keep=1))
    with pytest.raises(ValueError, match="has 8"):
        ts.patch(model, moe=PreMoe(pattern=p, keep=9))
    with pytest.raises(ValueError, match="renorm"):
        ts.patch(model, moe=PreMoe(pattern=p, renorm="full"))
    other = tiny_moe_model("mixtral", num_local_experts=6)
    with pytest.raises(ValueError, match="routed experts"):
        ts.patch(other, moe=PreMoe(pattern=p))
    assert not hf_moe.is_moe_patched(model) and not hf_moe.is_moe_patched(other)
    ts.patch(model, moe=PreMoe())
    with pytest.raises(ValueError, match="already patched"):
        ts.patch(model, moe=PreMoe())
    ts.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        ts.unpatch(model)


def test_prune_rejects_bad_input():
    model = tiny_moe_model("olmoe")
    p = _pattern(model)
    with pytest.raises(ValueError, match="top_k"):
        premoe.prune(model, p, keep=0.25)  # 2 of 8 < top-4
    with pytest.raises(ValueError, match="keep"):
        premoe.prune(model, p, keep=[4])  # one value for two layers
    with pytest.raises(ValueError, match="pattern"):
        premoe.prune(model, "math")
    other = tiny_moe_model("olmoe", num_hidden_layers=3)
    with pytest.raises(ValueError, match="MoE layers"):
        premoe.prune(other, p)
    with ts.patched(model, moe=PreMoe()):
        with pytest.raises(ValueError, match="unpatch"):
            premoe.prune(model, p)
    premoe.prune(model, p)
    with pytest.raises(ValueError, match="already pruned"):
        premoe.prune(model, p)
    with pytest.raises(ValueError, match="model"):
        premoe.prune(ts.models.tiny_model("llama", num_hidden_layers=2), p)
