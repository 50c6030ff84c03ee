"""What vLLM needs from an exported folder, checked without vLLM (``make test``): ``ts.premoe.check_vllm``, the
``check-vllm`` command, the non-uniform-keep error of ``export``, and plain HF folders of dense / MoE models
(``save_hf``, ``export_hf``'s specs). vLLM itself serving the folders: tests/vllm/test_premoe_vllm.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tasksieve import premoe
from tasksieve.cli import main as cli
from tasksieve.evaluation.models import parse_moe_spec, save_hf, tiny_model
from tasksieve.evaluation.tiny import tiny_moe_model, tiny_tokenizer


def _pruned(family="mixtral", keep=0.5, **overrides):
    model = tiny_moe_model(family, **overrides)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdef 0123") for _ in range(200)) for _ in range(3)]
    store = premoe.profile(model, {"t": texts}, tiny_tokenizer(), progress=False)
    premoe.prune(model, store["t"], keep=keep)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_pruned_export_passes_check(family, tmp_path):
    model = _pruned(family)
    premoe.export(model, tmp_path / "p", tiny_tokenizer())
    info = premoe.check_vllm(tmp_path / "p")
    assert info["family"] == family and info["num_experts"] == 4 and info["moe_layers"] == 2
    assert premoe.check_vllm(model)["num_experts"] == 4


def test_non_uniform_keep_error_names_family_counts_and_fix(tmp_path):
    model = _pruned("qwen3_moe", keep=[4, 6])
    for call in (lambda: premoe.export(model, tmp_path / "never"), lambda: premoe.check_vllm(model),
                 lambda: premoe.check_vllm(model.config)):
        with pytest.raises(ValueError, match=r"different expert count per layer \(\[4, 6\]") as e:
            call()
        for part in ("'qwen3_moe'", "'num_experts'", "Qwen3MoeForCausalLM", "keep=0.5"):
            assert part in str(e.value)
    assert not (tmp_path / "never").exists()


def test_config_weights_mismatch_and_tp(tmp_path):
    model = _pruned("qwen3_moe")
    out = premoe.export(model, tmp_path / "p", tiny_tokenizer())
    assert premoe.check_vllm(out, tensor_parallel_size=4)["num_experts"] == 4
    with pytest.raises(ValueError, match="refuses tensor_parallel_size 8 > 4 experts"):
        premoe.check_vllm(out, tensor_parallel_size=8)
    cfg = json.loads((out / "config.json").read_text())
    # transformers 5 saves Qwen3-MoE's count as num_local_experts; vLLM's Qwen3MoeForCausalLM reads num_experts:
    # export writes both
    assert cfg["num_experts"] == cfg["num_local_experts"] == 4
    cfg["num_experts"] = 8  # a hand-edited config: the two names disagree
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"different expert counts \{'num_experts': 8, 'num_local_experts': 4\}"):
        premoe.check_vllm(out)
    cfg["num_local_experts"] = 8  # ... and no longer match the sliced weights
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights hold \[4\] experts per MoE layer .* config.num_experts is 8"):
        premoe.check_vllm(out)
    # Mixtral shards each expert over the ranks: no tensor-parallel limit from the expert count
    mix = premoe.export(_pruned("mixtral"), tmp_path / "m")
    assert premoe.check_vllm(mix, tensor_parallel_size=8)["num_experts"] == 4


def test_cli_check_vllm_and_export(tmp_path, capsys):
    assert cli(["export", "--model", "tiny:mixtral", "--out", str(tmp_path / "e")]) == 0
    assert "vLLM: servable unchanged (MixtralForCausalLM, 8 experts per MoE layer, top-2)" in capsys.readouterr().out
    assert cli(["check-vllm", str(tmp_path / "e"), "--tp", "2"]) == 0
    assert "vLLM can serve it unchanged as MixtralForCausalLM" in capsys.readouterr().out
    assert cli(["check-vllm", str(tmp_path / "nothing")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_save_hf_dense_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    out = save_hf(model, tmp_path / "d", tiny_tokenizer())
    assert premoe.check_vllm(out) == {"family": "llama", "architecture": "LlamaForCausalLM", "num_experts": 0,
                                      "top_k": 0, "moe_layers": 0}
    back = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.tensor([[5, 9, 20, 33]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_moe_spec():
    assert parse_moe_spec("smollm2-135m-moe") == (16, 8)
    assert parse_moe_spec("default-moe:16x4") == (16, 4)
    assert parse_moe_spec("smollm2-135m") is None and parse_moe_spec("tiny:mixtral") is None
    with pytest.raises(ValueError, match="<experts>x<top_k>"):
        parse_moe_spec("default-moe:4x8")
