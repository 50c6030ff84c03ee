"""``patch`` / ``unpatch`` / ``patched`` on a HF causal LM, and ``last_info`` / ``cache_info`` of what a request
did."""

from __future__ import annotations

import contextlib
import inspect

import torch

from ...methods.flexprefill import FlexPrefill
from ...methods.windowkv import PyramidKV, SnapKV, WindowKV
from . import moe as hf_moe
from .attention import _register
from .cache import _attn_post_hook, _attn_pre_hook, _decoder_pre_hook
from .state import ATTENTION_NAME, SUPPORTED_MODEL_TYPES, _ATTR, CacheState, _ModelState

_PRESS_TYPES = (WindowKV, SnapKV, PyramidKV)


def _decoder_of(model):
    prefix = getattr(model, "base_model_prefix", "model")
    dec = getattr(model, prefix, None)
    if dec is not None and hasattr(dec, "layers"):
        return dec
    if hasattr(model, "layers"):
        return model
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if hasattr(dec, "layers"):
            return dec
    raise ValueError(f"tasksieve.patch: cannot find the decoder layers of {type(model).__name__}")


_CLASS_NAMES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
}

#: Model types whose attention cannot run through ``tasksieve_sdpa``, and why (named in the error).
_UNSUPPORTED_ATTENTION = {
    "gpt_oss": "its attention adds learned per-head sink logits to the softmax and alternates sliding-window "
               "layers; the tasksieve attention function (transformers' SDPA) and KV compression support neither",
}


def _sliding_layers(config) -> tuple[list[int], str]:
    """Indices of the layers that do not attend to the whole prefix, and the config fields that say so."""
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    fields = []
    for name in ("use_sliding_window", "sliding_window", "max_window_layers", "attention_chunk_size"):
        if getattr(config, name, None) not in (None, False):
            fields.append(f"{name}={getattr(config, name)!r}")
    if layer_types:
        # Qwen2 / Qwen2-MoE / Qwen3: the per-layer list is what the masks and the cache follow (sliding_window is 0
        # or None when use_sliding_window is off)
        bad = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if bad:
            kinds = sorted({layer_types[i] for i in bad})
            fields.insert(0, f"layer_types has {'/'.join(kinds)} at layers {bad}")
        return bad, ", ".join(fields)
    # Mistral / Mixtral / Qwen3-MoE: one sliding_window for every layer (None = full attention); OLMoE has none
    if window is not None or getattr(config, "attention_chunk_size", None) is not None:
        return list(range(n)), ", ".join(fields)
    return [], ""


def _check_model(model) -> None:
    """Can ``tasksieve_sdpa`` and the cache hooks run this model's attention? (``kv``/``prefill`` only; ``moe=``
    alone never touches attention.)

    What the supported families have in common, and what the integration relies on: every decoder layer has a
    ``self_attn`` with a ``layer_idx`` that calls the attention function of ``config._attn_implementation`` with
    RoPE'd queries ``[B, H, q, D]`` and the cache's keys/values ``[B, Hk, K, D]``; projection biases (Qwen2-MoE),
    q/k RMSNorms (Qwen3-MoE per head, OLMoE over all heads) and OLMoE's ``clip_qkv`` all act before that call, so the
    observation queries, the cached keys and the sparse prefill see exactly what dense attention sees. What would
    break it is attention that does not see the whole prefix: sliding-window (or chunked) layers get their window
    from the mask transformers builds, which ``tasksieve_sdpa`` replaces by a full causal mask, and from
    sliding cache layers, which KV compression refuses - those configs are rejected here.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover
        raise ValueError("tasksieve.patch needs transformers >= 4.56") from e
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"tasksieve.patch: model must be a transformers PreTrainedModel (one of the model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}), got {type(model).__name__}"
        )
    mt = getattr(model.config, "model_type", None)
    if mt in _UNSUPPORTED_ATTENTION:
        raise ValueError(
            f"tasksieve.patch: kv= and prefill= do not support {type(model).__name__} (model type {mt!r}): "
            f"{_UNSUPPORTED_ATTENTION[mt]} (moe= alone works where the MoE family is supported)"
        )
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"tasksieve.patch: unsupported model type {mt!r} ({type(model).__name__}) for kv= / prefill=; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"({', '.join(_CLASS_NAMES[t] for t in SUPPORTED_MODEL_TYPES)})"
        )
    bad, fields = _sliding_layers(model.config)
    if bad:
        raise ValueError(
            f"tasksieve.patch: {type(model).__name__} (model type {mt!r}) uses sliding-window attention "
            f"({fields}), which kv= and prefill= do not support: tasksieve_sdpa attends to the whole prefix and KV "
            "compression needs full-attention cache layers; use a config with full attention only "
            "(sliding_window=None / use_sliding_window=False)"
        )


def _check_press(kv) -> None:
    if kv is None:
        return
    if not isinstance(kv, _PRESS_TYPES):
        raise ValueError(
            f"tasksieve.patch: kv must be a tasksieve.WindowKV, SnapKV or PyramidKV press or None, got "
            f"{type(kv).__name__}"
        )
    kv.validate()


def _check_prefill(prefill) -> None:
    if prefill is None:
        return
    if not isinstance(prefill, FlexPrefill):
        raise ValueError(
            f"tasksieve.patch: prefill must be a tasksieve.FlexPrefill or None, got {type(prefill).__name__}"
        )
    prefill.validate()


def _set_impl(model, name) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - transformers < 4.54
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:  # pragma: no cover - defensive
        model.config._attn_implementation = name


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def is_patched(model) -> bool:
    """True when ``model`` carries a tasksieve patch."""
    return isinstance(getattr(model, _ATTR, None), _ModelState)


def patch(model, kv=None, prefill=None, moe=None):
    """Install the tasksieve integration on a HF causal LM.

    Parameters
    ----------
    model : transformers PreTrainedModel
        For ``kv`` / ``prefill``: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
        ``Qwen3ForCausalLM``, ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM`` or
        ``OlmoeForCausalLM`` (or their decoder-only base models), with full attention in every layer (Mistral /
        Mixtral ``sliding_window=None``, Qwen ``use_sliding_window=False``). For ``moe`` alone: any of the MoE
        families, sliding window or not (attention is not touched).
    kv : WindowKV, SnapKV, PyramidKV or None
        KV-cache press applied to every new request (a forward that starts with an empty cache). None installs the
        integration without compressing (needed to decode with caches made by :func:`prefill_multi`).
    prefill : FlexPrefill or None
        Sparse prefill attention (see the module docstring); composes with ``kv``. None: dense prefill.
    moe : PreMoe or None
        Swap the MoE blocks of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model (see
        :mod:`tasksieve.integrations.hf.moe`). With ``kv`` and ``prefill`` None only the MoE blocks are patched and
        the attention implementation stays the model's own.

    All three compose on one MoE model: ``patch(model, kv=WindowKV(...), prefill=FlexPrefill(...),
    moe=PreMoe(...))``. Everything is validated first (a rejected model or setting leaves the model untouched);
    then the MoE blocks are swapped, then the attention hooks are installed and the attention implementation is
    switched. The two parts are independent (MoE blocks and attention modules share nothing), so the order only
    matters for rolling back: a failure while installing attention puts the original MoE blocks back.

    Returns
    -------
    The same model (patched in place).

    Raises
    ------
    ValueError
        Not a HF model, unsupported architecture or sliding-window layers (with ``kv`` / ``prefill``; the message
        names the model and the config fields), invalid press, prefill or PreMoe, already patched.
    """
    attention = kv is not None or prefill is not None
    if moe is not None and not attention:
        return hf_moe.patch_moe(model, moe)
    _check_model(model)
    if is_patched(model):
        raise ValueError("tasksieve.patch: the model is already patched; call tasksieve.unpatch(model) first")
    _check_press(kv)
    _check_prefill(prefill)
    decoder = _decoder_of(model)
    attn_modules = []
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise ValueError(f"tasksieve.patch: decoder layer {type(layer).__name__} has no self_attn with a layer_idx")
        attn_modules.append(attn)
    if moe is not None:
        # MoE blocks first (patch_moe validates the policy, the pattern and the family before it swaps anything)
        hf_moe.patch_moe(model, moe)
    try:
        _patch_attention(model, decoder, attn_modules, kv, prefill)
    except Exception:
        if moe is not None:
            hf_moe.unpatch_moe(model)
        raise
    return model


def _patch_attention(model, decoder, attn_modules, kv, prefill) -> None:
    _register()
    ms = _ModelState(
        press=kv,
        original_impl=model.config._attn_implementation,
        attn_modules=attn_modules,
        decoder=decoder,
        num_layers=len(attn_modules),
        cache_kw=_cache_kwarg(model),
        decoder_params=tuple(inspect.signature(decoder.forward).parameters),
        prefill=prefill,
    )
    try:
        for attn in attn_modules:
            setattr(attn, _ATTR, ms)
            ms.handles.append(attn.register_forward_pre_hook(_attn_pre_hook, with_kwargs=True))
            ms.handles.append(attn.register_forward_hook(_attn_post_hook, with_kwargs=True))
        setattr(decoder, _ATTR, ms)
        ms.handles.append(decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True))
        setattr(model, _ATTR, ms)
        _set_impl(model, ATTENTION_NAME)
    except Exception:
        _remove(model, ms)
        _set_impl(model, ms.original_impl)
        raise


def _remove(model, ms: _ModelState) -> None:
    for h in ms.handles:
        h.remove()
    ms.handles.clear()
    for m in list(ms.attn_modules) + [ms.decoder, model]:
        if getattr(m, _ATTR, None) is ms:
            delattr(m, _ATTR)
    ms.capture.clear()


def unpatch(model):
    """Remove every hook and attribute of :func:`patch`, restore the attention implementation and put the original
    MoE blocks back (whichever parts were patched).

    Returns the model. Raises ValueError when the model is not patched.
    """
    ms = getattr(model, _ATTR, None)
    if not isinstance(ms, _ModelState) and not hf_moe.is_moe_patched(model):
        raise ValueError("tasksieve.unpatch: the model is not patched")
    # the reverse of patch: attention hooks and implementation first, then the original MoE blocks
    if isinstance(ms, _ModelState):
        _unpatch_attention(model)
    if hf_moe.is_moe_patched(model):
        hf_moe.unpatch_moe(model)
    return model


def _unpatch_attention(model) -> None:
    """Remove the attention part only (hooks, attributes, implementation); a MoE swap stays. For helpers that patch
    attention for one call (:func:`prefill_multi`, :func:`decode_step`) on a model whose MoE blocks the caller
    patched."""
    ms = getattr(model, _ATTR)
    _remove(model, ms)
    _set_impl(model, ms.original_impl)


@contextlib.contextmanager
def patched(model, kv=None, prefill=None, moe=None):
    """``with patched(model, kv=WindowKV(...), prefill=FlexPrefill(...)): model.generate(...)`` — patch, then always
    unpatch."""
    patch(model, kv=kv, prefill=prefill, moe=moe)
    try:
        yield model
    finally:
        unpatch(model)


# ---------------------------------------------------------------------------------------------------------------
# info


def _info_of(cs: CacheState) -> dict:
    out = {"press": None if cs.press is None else type(cs.press).__name__}
    if cs.pstate is not None:
        out.update(cs.pstate.info())
    else:
        out.update({"strategy": None, "auto_statistic": None, "kept_tokens": None})
    out["kv_bytes_before"] = cs.info.get("kv_bytes_before")
    out["kv_bytes_after"] = cs.info.get("kv_bytes_after")
    out["tokens_seen"] = cs.seen
    return out


def cache_info(cache) -> dict:
    """Info of the request held by ``cache``: press, strategy, auto statistic, observation window, per-layer
    budgets and kept tokens, KV bytes before/after prefill compression, tokens seen. Empty dict for a cache
    tasksieve never saw."""
    cs = getattr(cache, _ATTR, None)
    return {} if cs is None else _info_of(cs)


def last_info(model) -> dict:
    """Info (see :func:`cache_info`) of the last request that started under this patch; ``{}`` if none yet.

    Keys: ``press``, ``strategy`` ("max"/"mean" for WindowKV), ``auto_statistic`` (peak share of the auto rule),
    ``auto_per_row``, ``obs_window``, ``num_tokens``, ``budgets``, ``kept_tokens`` (per layer),
    ``decode_evictions``, ``kv_bytes_before``, ``kv_bytes_after``, ``tokens_seen``.

    With ``prefill=FlexPrefill(...)``, also ``prefill_block_ratio``: computed / causal key blocks of the sparse
    prefill attention, averaged over the layers of the last multi-token forward that ran it (1.0 = dense;
    None when that forward ran no layer through FlexPrefill, e.g. padded batches or short prompts). This key is
    present even when the forward used no cache. ``prefill_layers`` gives the per-head pattern of that forward:
    ``{layer: {"ratio": float, "head_ratio": [B][H] floats, "query_aware": [B][H] bools, "js_distance": [B][H]
    floats or None}}`` (computed / causal blocks per head; query-aware vs vertical-slash per head), for tuning
    gamma and tau.
    """
    ms = getattr(model, _ATTR, None)
    if not isinstance(ms, _ModelState):
        raise ValueError("tasksieve.last_info: the model is not patched")
    out = {} if ms.last_cache_state is None else _info_of(ms.last_cache_state)
    if ms.prefill is not None:
        pats = ms.prefill_patterns
        r = [p[0] for p in pats.values()]
        out["prefill_block_ratio"] = float(torch.stack(r).float().mean()) if r else None
        out["prefill_layers"] = {
            layer: {"ratio": float(ratio), "head_ratio": head.cpu().tolist(), "query_aware": qa.cpu().tolist(),
                    "js_distance": None if jsd is None else jsd.cpu().tolist()}
            for layer, (ratio, head, qa, jsd) in sorted(pats.items())}
    return out
