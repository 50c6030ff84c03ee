"""HuggingFace integration (``ts.hf``): KV-cache compression presses and sparse prefill on Llama / Mistral / Qwen2 /
Qwen3 and Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE causal LMs (full-attention configs), MoE block swap (:mod:`.moe`)
and PreMoe on the MoE ones (:mod:`.premoe`). All three compose on one MoE model:
``patch(model, kv=WindowKV(...), prefill=FlexPrefill(...), moe=PreMoe(...))``.

Modules: :mod:`.state` (per-model and per-request state), :mod:`.attention` (the registered attention function),
:mod:`.cache` (the hooks that compress and evict), :mod:`.patch` (patch / unpatch / info), :mod:`.multi` (one
prefill, many caches), :mod:`.moe` + :mod:`.moe_conventions` (MoE block swap), :mod:`.premoe` (probe, profile,
prune, export).

Public API
----------
``patch(model, kv=None, prefill=None, moe=None)``   install the integration (``kv``: a press or None;
                                              ``prefill``: a :class:`~tasksieve.methods.flexprefill.FlexPrefill` or None;
                                              ``moe``: a :class:`~tasksieve.methods.premoe.PreMoe` or None, see .moe)
``unpatch(model)``                            remove it; the model behaves exactly as before
``patched(model, kv=None, prefill=None)``     context manager: patch, yield the model, unpatch
``last_info(model)``                          what the last compressed request did (strategy, kept tokens, bytes;
                                              with ``prefill``: ``prefill_block_ratio`` of the last prefill)
``cache_info(cache)``                         the same for one cache object
``prefill_multi(model, input_ids, attention_mask, presses)``   ONE prefill -> one compressed cache per press
``decode_step(model, cache, press, next_ids, attention_mask=None)``   one decoding forward on such a cache

How it works (nothing private is monkeypatched)
-----------------------------------------------
* An attention function ``"tasksieve_sdpa"`` is registered with transformers' ``AttentionInterface`` and the model's
  attention implementation is switched to it (``unpatch`` switches back). It computes attention with transformers'
  own ``sdpa_attention_forward``. During prefill it records the last observation queries (RoPE applied) of every
  layer; during decoding it builds the attention mask itself from the per-layer state of the cache (kept padding
  mask + new tokens), because after compression every layer holds a different number of keys and the mask HF
  builds is sized from layer 0.
* A mask function of the same name, registered with ``AttentionMaskInterface``, hands the 2-D padding mask
  ``[B, seen + q]`` through to the attention function unchanged (``None`` when there is no padding).
* A forward pre-hook and a forward hook (``with_kwargs=True``) on every ``self_attn`` get the cache object from the
  call's keyword arguments (``cache`` in transformers >= 5.2x, ``past_key_values`` before). After the prompt's
  attention of layer i ran on the full cache, the hook compresses ``cache.layers[i].keys/.values`` with the press
  and writes the result back (kvpress does the same). Prefill attention is therefore full, unless ``prefill``
  is a :class:`~tasksieve.methods.flexprefill.FlexPrefill`: then the attention function computes every multi-token forward
  without padding and with at least ``prefill.dense_threshold`` queries through
  :func:`~tasksieve.methods.flexprefill.flex_prefill_attention` (sparse prefill, on the query/key/value views transposed to
  ``[B, N, heads, D]``); the cache still receives the full prompt KV, which a ``kv`` press then compresses as usual.
  Decoding, short prompts, padded batches and training with dropout use the dense path.
* A forward pre-hook on the decoder (``model.model``) records the prompt ids (for strategy callables) and, when a
  caller passes a compressed cache without ``position_ids``, supplies them from the true token count: after
  compression ``cache.get_seq_length()`` (layer 0's kept length) no longer equals the number of tokens seen.
  ``generate`` always passes ``position_ids`` derived from the attention mask, so RoPE positions continue from
  the original length.

Model families. The attention of every supported family calls the attention function of
``config._attn_implementation`` with RoPE'd queries and the cache's keys/values; whatever a family adds (Qwen2-MoE's
q/k/v biases, Qwen3-MoE's per-head and OLMoE's all-head q/k RMSNorm, OLMoE's ``clip_qkv``) happens before that call,
so the same function and hooks serve all of them. Sliding-window (or chunked) layers are refused with a ValueError
naming the model and the config fields (Mistral / Mixtral ``sliding_window``, Qwen2-MoE ``layer_types`` from
``use_sliding_window`` / ``max_window_layers``, Qwen3-MoE ``use_sliding_window``): the window lives in the mask HF
builds, which ``tasksieve_sdpa`` replaces, and KV compression needs full-attention cache layers. ``moe=`` alone
does not touch attention and accepts them. With ``moe=`` and ``kv``/``prefill`` together everything is validated
first, then the MoE blocks are swapped, then the attention hooks installed; ``unpatch`` undoes attention first,
then the swap. ``output_router_logits=True`` works on a swapped model (the swapped block runs the HF router module
whenever something hooks it, as transformers' output recorder does).

Per-request state lives on the cache object (``cache._tasksieve``, a :class:`CacheState`): the press, its
:class:`~tasksieve.methods.windowkv.PressState`, each layer's kept-token padding mask, the decode query buffers and the
token counters. The model only holds the patch (``model._tasksieve``, removed by ``unpatch``); attention modules
point to it through ``module._tasksieve``. A new request (a new, empty cache) always starts a new state.

Left padding (batch > 1): the first real token of every row is passed to the scoring op as ``kv_start`` so padding
gets no attention mass; every row gets its own selection; the padding mask of the kept tokens is gathered alongside
the keys and applied at every decoding step. Right padding is not supported for compression.
"""

from .multi import decode_step, prefill_multi
from .patch import cache_info, is_patched, last_info, patch, patched, unpatch
from .state import ATTENTION_NAME, SUPPORTED_MODEL_TYPES, CacheState

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "last_info",
    "cache_info",
    "prefill_multi",
    "decode_step",
    "CacheState",
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
]
