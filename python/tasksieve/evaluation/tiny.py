"""Tiny random MoE models and a character tokenizer: tests and the CLI's ``tiny:<family>`` run without any
download."""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.hf import moe as hf_moe

__all__ = ["TINY_FAMILIES", "tiny_moe_config", "tiny_moe_model", "tiny_tokenizer"]

TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe_config(family: str = "mixtral", **overrides):
    """Config of a small random MoE causal LM: hidden 64, 2 layers, 4 heads / 2 KV heads, 8 experts, vocab 128.

    Mixtral and Qwen3-MoE route top-2 (Qwen3-MoE renormalised), Qwen2-MoE (with a 64-wide shared expert) and OLMoE
    top-4 un-normalised.
    """
    import transformers

    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False)
    per = {
        "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                          sliding_window=None)),
        "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                             num_experts_per_tok=4, shared_expert_intermediate_size=64,
                                             norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
        "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                             num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                             decoder_sparse_step=1, mlp_only_layers=[])),
        "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=4,
                                      norm_topk_prob=False)),
    }
    if family not in per:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    cls, kw = per[family]
    kw = {**base, **kw, **overrides}
    return getattr(transformers, cls)(**kw)


def tiny_moe_model(family: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A small random MoE causal LM (see :func:`tiny_moe_config`), deterministic for a given ``seed``, eval mode.

    Router rows are drawn with std 1 (HF's 0.02 init makes every token's router logits nearly equal), so routing is
    decisive and tasks differ in their experts, as in trained models.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_moe_config(family, **overrides)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        for site in hf_moe.moe_sites(model):
            nn.init.normal_(site.block.gate.weight, std=1.0)
    model.eval()
    return model


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models (printable ASCII + newline + tab, 101 ids < vocab 128;
    ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3): text tasks and ``save_pretrained`` without any download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ---------------------------------------------------------------------------------------------------------------
# command-line helpers (tasksieve profile / prune / export)
