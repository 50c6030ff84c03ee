"""HuggingFace integration: KV-cache compression presses on Llama / Mistral / Qwen2 / Qwen3 causal LMs.

Public API
----------
``patch(model, kv=None, prefill=None, moe=None)``   install the integration (``kv``: a press or None;
                                              ``prefill``: a :class:`~tasksieve.flexprefill.FlexPrefill` or None;
                                              ``moe``: a :class:`~tasksieve.premoe.PreMoe` or None, see hf_moe)
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
  is a :class:`~tasksieve.flexprefill.FlexPrefill`: then the attention function computes every multi-token forward
  without padding and with at least ``prefill.dense_threshold`` queries through
  :func:`~tasksieve.flexprefill.flex_prefill_attention` (sparse prefill, on the query/key/value views transposed to
  ``[B, N, heads, D]``); the cache still receives the full prompt KV, which a ``kv`` press then compresses as usual.
  Decoding, short prompts, padded batches and training with dropout use the dense path.
* A forward pre-hook on the decoder (``model.model``) records the prompt ids (for strategy callables) and, when a
  caller passes a compressed cache without ``position_ids``, supplies them from the true token count: after
  compression ``cache.get_seq_length()`` (layer 0's kept length) no longer equals the number of tokens seen.
  ``generate`` always passes ``position_ids`` derived from the attention mask, so RoPE positions continue from
  the original length.

Per-request state lives on the cache object (``cache._tasksieve``, a :class:`CacheState`): the press, its
:class:`~tasksieve.windowkv.PressState`, each layer's kept-token padding mask, the decode query buffers and the
token counters. The model only holds the patch (``model._tasksieve``, removed by ``unpatch``); attention modules
point to it through ``module._tasksieve``. A new request (a new, empty cache) always starts a new state.

Left padding (batch > 1): the first real token of every row is passed to the scoring op as ``kv_start`` so padding
gets no attention mass; every row gets its own selection; the padding mask of the kept tokens is gathered alongside
the keys and applied at every decoding step. Right padding is not supported for compression.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .flexprefill import FlexPrefill, flex_prefill_attention
from .windowkv import PressState, PyramidKV, SnapKV, WindowKV

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

ATTENTION_NAME = "tasksieve_sdpa"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_PRESS_TYPES = (WindowKV, SnapKV, PyramidKV)
_ATTR = "_tasksieve"


# ---------------------------------------------------------------------------------------------------------------
# state objects


@dataclass
class _Capture:
    """What the attention function leaves for the layer's forward hook (one forward of one layer)."""

    mode: str  # "prefill" | "decode" | "plain"
    cache: Any
    cstate: Optional["CacheState"]
    layer_idx: int
    obs: Optional[torch.Tensor] = None  # [B, A, H, D]
    scale: Optional[float] = None


@dataclass
class CacheState:
    """Per-request state attached to a cache object as ``cache._tasksieve``.

    Attributes
    ----------
    press : press or None
        The press that compressed this cache (None: a full cache).
    pstate : PressState or None
        The press's per-request state.
    num_layers : int
    valid : list
        Per layer, the padding mask of the cached rows, ``[B, 1 or Hk, n_layer]`` bool, or None (no padding).
    qbuf : list
        Per layer, the last observation queries ``[B, A, H, D]`` (only with ``decode_evict``).
    seen : int
        Tokens (columns, padding included) this cache has been fed.
    next_pos : Tensor [B] int64 or None
        RoPE position of the next token of every row: one past the last position used (``generate`` numbers
        left-padded rows from their first real token, a plain forward without ``position_ids`` from 0).
    targets : list[tuple[CacheState, cache]]
        Where the prefill of this cache writes: itself, or (``prefill_multi``) one cache per press.
    info : dict
    """

    press: Any
    pstate: Optional[PressState]
    num_layers: int
    valid: list = field(default_factory=list)
    qbuf: list = field(default_factory=list)
    seen: int = 0
    next_pos: Optional[torch.Tensor] = None
    targets: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    obs_len: int = 0
    kv_start: Optional[torch.Tensor] = None
    decode_steps: int = 0
    scratch: bool = False

    def __post_init__(self) -> None:
        if not self.valid:
            self.valid = [None] * self.num_layers
        if not self.qbuf:
            self.qbuf = [None] * self.num_layers


@dataclass
class _ModelState:
    press: Any
    original_impl: Any
    attn_modules: list
    decoder: Any
    num_layers: int
    cache_kw: str
    handles: list = field(default_factory=list)
    capture: dict = field(default_factory=dict)
    last_cache_state: Optional[CacheState] = None
    input_ids: Optional[torch.Tensor] = None
    fwd_pos: Optional[torch.Tensor] = None
    decoder_params: tuple = ()
    prefill: Optional[FlexPrefill] = None
    # per layer of the last multi-token forward that ran the sparse prefill (reset by the decoder pre-hook): small
    # device tensors (ratio [], head_ratio [B, H], is_query_aware [B, H], js_distance [B, H] or None) - never the
    # block index, which is O(nb^2) per head; read through last_info(model)
    prefill_patterns: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# registration with transformers


def _mask_passthrough(*args, attention_mask=None, **kwargs):
    """Mask function for ``tasksieve_sdpa``: return the 2-D padding mask (bool) as is; the attention function builds
    the real mask per layer from the cache state."""
    if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
        return None
    return attention_mask


def _register() -> None:
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53
        AttentionMaskInterface = None
    AttentionInterface.register(ATTENTION_NAME, _attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTENTION_NAME, _mask_passthrough)


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# attention function


def _causal(q_len: int, k_len: int, device) -> torch.Tensor:
    """[q, K] bool: query i (at key position K - q + i) sees keys j <= K - q + i."""
    qi = torch.arange(k_len - q_len, k_len, device=device).view(q_len, 1)
    kj = torch.arange(k_len, device=device).view(1, k_len)
    return kj <= qi


def _to_heads(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, h, q, K] with h in {1, Hk} -> broadcastable to the query heads."""
    h = mask.shape[1]
    if h == 1 or h == num_heads:
        return mask
    return mask.repeat_interleave(num_heads // h, dim=1)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``tasksieve_sdpa`` attention function (query [B, H, q, D], key/value [B, Hk, K, D])."""
    ms: Optional[_ModelState] = getattr(module, _ATTR, None)
    layer_idx = getattr(module, "layer_idx", None)
    cap: Optional[_Capture] = None if ms is None else ms.capture.get(layer_idx)
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    mask2d = attention_mask  # [B, seen + q] bool or None
    cs = None if cap is None else cap.cstate
    tracked = cs is not None and cap.mode == "decode"
    if tracked:
        prev = cs.valid[layer_idx]
        new = None if mask2d is None else mask2d[:, -q_len:].to(torch.bool)
        if prev is None and new is None:
            key_valid = None
        else:
            b = query.shape[0]
            if prev is None:
                prev = torch.ones(b, 1, k_len - q_len, dtype=torch.bool, device=query.device)
            if new is None:
                new = torch.ones(b, q_len, dtype=torch.bool, device=query.device)
            h = prev.shape[1]
            key_valid = torch.cat([prev, new[:, None, :].expand(b, h, q_len)], dim=-1)
        cs.valid[layer_idx] = key_valid
    else:
        if mask2d is None:
            key_valid = None
        else:
            m = mask2d.to(torch.bool)
            if m.shape[-1] >= k_len:
                m = m[:, -k_len:]
            else:
                m = torch.nn.functional.pad(m, (k_len - m.shape[-1], 0), value=True)
            key_valid = m[:, None, :]
        if cs is not None and cap.mode == "prefill":
            cs.valid[layer_idx] = key_valid

    if key_valid is None and (q_len == 1 or q_len == k_len):
        mask = None  # sdpa's is_causal path, exactly as transformers' own sdpa mask skip
    else:
        causal = _causal(q_len, k_len, query.device)[None, None]
        mask = causal if key_valid is None else (key_valid[:, :, None, :] & causal)
        mask = _to_heads(mask, query.shape[1])

    if cap is not None:
        cap.scale = scaling
        if cap.mode == "prefill" and cs is not None and cs.obs_len > 0:
            a = min(cs.obs_len, q_len)
            cap.obs = query[:, :, q_len - a :].transpose(1, 2)
        elif cap.mode == "decode" and cs is not None and cs.qbuf[layer_idx] is not None:
            buf = torch.cat([cs.qbuf[layer_idx], query.transpose(1, 2)], dim=1)
            cs.qbuf[layer_idx] = buf[:, -cs.qbuf[layer_idx].shape[1] :].contiguous()
        if cs is not None and layer_idx == 0:
            _count_tokens(cs, ms.fwd_pos, q_len, query.shape[0], query.device)
    fp = None if ms is None else ms.prefill
    if (fp is not None and key_valid is None and 1 < q_len and q_len >= fp.dense_threshold
            and not (dropout > 0.0 and module.training)):
        out, _, pattern = flex_prefill_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), gamma=fp.gamma, tau=fp.tau,
            block_size=fp.block_size, min_budget=fp.min_budget, max_budget=fp.max_budget, scale=scaling,
            dense_below=fp.dense_below, return_pattern=True)
        # stays on the device: no sync here
        ms.prefill_patterns[layer_idx] = (pattern.ratio(), pattern.head_ratio(), pattern.is_query_aware,
                                          pattern.js_distance)
        return out, None  # [B, q, H, D], like sdpa_attention_forward
    return _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _count_tokens(cs: CacheState, position_ids, q_len: int, batch: int, device) -> None:
    """Advance the token counters by one forward of ``q_len`` tokens that used ``position_ids`` (None: HF's
    default, ``seen + arange(q)``)."""
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() >= 2 and position_ids.shape[-1] == q_len:
        last = position_ids.reshape(-1, q_len)[:, -1].to(device=device, dtype=torch.int64) + 1
        cs.next_pos = last.expand(batch).clone() if last.shape[0] == 1 else last[-batch:].clone()
    else:
        cs.next_pos = torch.full((batch,), cs.seen + q_len, dtype=torch.int64, device=device)
    cs.seen += q_len


# ---------------------------------------------------------------------------------------------------------------
# hooks


def _get_cache(kwargs: dict):
    for name in ("cache", "past_key_values", "past_key_value"):
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def _new_cache_state(ms: _ModelState, press) -> CacheState:
    cs = CacheState(press=press, pstate=None if press is None else press.new_state(ms.num_layers),
                    num_layers=ms.num_layers)
    cs.obs_len = 0 if press is None else press.max_obs_window
    cs.targets = [(cs, None)]
    return cs


def _attn_pre_hook(module, args, kwargs):
    ms: _ModelState = getattr(module, _ATTR)
    layer_idx = module.layer_idx
    cache = _get_cache(kwargs)
    if cache is None:
        ms.capture[layer_idx] = _Capture("plain", None, None, layer_idx)
        return None
    cs = getattr(cache, _ATTR, None)
    fresh = cache.get_seq_length(layer_idx) == 0
    if cs is None:
        if fresh:
            _check_cache_layer(cache, layer_idx, ms.press)
            cs = _new_cache_state(ms, ms.press)
            if ms.input_ids is not None:
                if cs.pstate is not None:
                    cs.pstate.input_ids = ms.input_ids
            setattr(cache, _ATTR, cs)
            ms.last_cache_state = cs
        else:
            ms.capture[layer_idx] = _Capture("plain", cache, None, layer_idx)
            return None
    mode = "prefill" if fresh else "decode"
    ms.capture[layer_idx] = _Capture(mode, cache, cs, layer_idx)
    return None


def _check_cache_layer(cache, layer_idx: int, press) -> None:
    if press is None or layer_idx >= len(getattr(cache, "layers", ())):
        return
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer:
        raise ValueError(
            f"tasksieve: KV compression needs a DynamicCache with full-attention layers; layer {layer_idx} of the "
            f"{type(cache).__name__} is a {type(layer).__name__} (static, sliding, quantized and offloaded layers "
            "are not supported)"
        )


def _gather_valid(valid: Optional[torch.Tensor], tok: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if valid is None or tok is None:
        return valid
    b, h = tok.shape[0], tok.shape[1]
    src = valid.expand(b, max(h, valid.shape[1]), valid.shape[-1])
    if tok.shape[1] != src.shape[1]:
        tok = tok.expand(b, src.shape[1], tok.shape[-1])
    return src.gather(2, tok)


def _kv_bytes(k: torch.Tensor, v: torch.Tensor) -> int:
    return k.numel() * k.element_size() + v.numel() * v.element_size()


def _layer_kv(cache, layer_idx: int):
    layer = cache.layers[layer_idx]
    return layer, layer.keys, layer.values


@torch.no_grad()
def _attn_post_hook(module, args, kwargs, output):
    ms: _ModelState = getattr(module, _ATTR)
    layer_idx = module.layer_idx
    cap = ms.capture.pop(layer_idx, None)
    if cap is None or cap.cstate is None:
        return None
    cs = cap.cstate
    cache = cap.cache
    if cap.mode == "prefill":
        _prefill_layer(ms, cs, cache, layer_idx, cap)
    elif cap.mode == "decode" and cs.press is not None and getattr(cs.press, "decode_evict", False):
        _evict_layer(cs, cache, layer_idx)
    return None


def _start_request(cs: CacheState, parent: CacheState, cap: _Capture) -> None:
    """Fill the press state's request facts (scale, left-padding starts) once, at the first layer."""
    if cs.pstate is not None and cs.pstate.num_tokens is None:
        cs.pstate.scale = cap.scale
        cs.pstate.kv_start = parent.kv_start
    cs.info.setdefault("kv_bytes_before", 0)
    cs.info.setdefault("kv_bytes_after", 0)


def _prefill_layer(ms: _ModelState, cs: CacheState, cache, layer_idx: int, cap: _Capture) -> None:
    layer, keys, values = _layer_kv(cache, layer_idx)
    valid = cs.valid[layer_idx]
    if layer_idx == 0 and valid is not None and cs.kv_start is None:
        v = valid[:, 0, :]
        first = torch.where(v.any(-1), v.to(torch.int64).argmax(-1), torch.zeros_like(v[:, 0], dtype=torch.int64))
        cs.kv_start = first.to(torch.int32)
    for tcs, dest in cs.targets:
        if tcs is not cs and layer_idx == 0:
            tcs.seen, tcs.next_pos, tcs.kv_start = cs.seen, cs.next_pos, cs.kv_start
        _start_request(tcs, cs, cap)
        press = tcs.press
        if press is None:
            done = {layer_idx: (keys, values, None)}
        else:
            # WindowKV with group scoring returns nothing until a group's last layer, then the whole group
            done = press.compress_layers(layer_idx, keys, values, cap.obs, tcs.pstate)
        if press is not None and getattr(press, "decode_evict", False) and cap.obs is not None:
            a = min(tcs.pstate.obs_window or cap.obs.shape[1], cap.obs.shape[1])
            tcs.qbuf[layer_idx] = cap.obs[:, cap.obs.shape[1] - a :].contiguous()
        for li, (k2, v2, tok) in done.items():
            # prefill padding masks are the same for every layer, so this layer's serves the group
            tcs.valid[li] = _gather_valid(valid, tok)
            tcs.info["kv_bytes_before"] += _kv_bytes(keys, values)
            tcs.info["kv_bytes_after"] += _kv_bytes(k2, v2)
            if dest is None:
                cache.layers[li].keys, cache.layers[li].values = k2, v2
            else:
                # initialise the layer through the public API with an empty update, then hand over the tensors
                # (DynamicLayer.update would concatenate, i.e. copy, them)
                dest.update(k2[:, :, :0], v2[:, :, :0], li)
                dest.layers[li].keys, dest.layers[li].values = k2, v2
    if cs.scratch:
        # the forward's own cache is a scratch copy (prefill_multi): free this layer now
        layer.keys = keys.new_empty((keys.shape[0], keys.shape[1], 0, keys.shape[3]))
        layer.values = values.new_empty((values.shape[0], values.shape[1], 0, values.shape[3]))
        cs.valid[layer_idx] = None


def _evict_layer(cs: CacheState, cache, layer_idx: int) -> None:
    layer, keys, values = _layer_kv(cache, layer_idx)
    res = cs.press.evict_layer(layer_idx, keys, values, cs.qbuf[layer_idx], cs.pstate,
                               valid=cs.valid[layer_idx], step=cs.seen)
    if res is None:
        return
    layer.keys, layer.values = res
    cs.valid[layer_idx] = _gather_valid(cs.valid[layer_idx], cs.pstate.token_index)
    cs.pstate.token_index = None


def _decoder_pre_hook(module, args, kwargs):
    """Record the prompt ids; supply position_ids (and cache_position) for compressed caches when missing."""
    ms: _ModelState = getattr(module, _ATTR)
    ids = kwargs.get("input_ids", args[0] if args else None)
    ms.input_ids = ids if isinstance(ids, torch.Tensor) else None
    ms.fwd_pos = kwargs.get("position_ids")
    x0 = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if isinstance(x0, torch.Tensor) and x0.dim() >= 2 and x0.shape[1] > 1:
        ms.prefill_patterns = {}  # a new multi-token forward: forget the last sparse-prefill pattern
    cache = _get_cache(kwargs)
    cs = getattr(cache, _ATTR, None) if cache is not None else None
    if cs is None or cs.seen == 0:
        return None
    x = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if x is None:
        return None
    q_len = x.shape[1]
    changed = False
    if kwargs.get("position_ids") is None and "position_ids" in ms.decoder_params:
        base = cs.next_pos if cs.next_pos is not None else torch.full((x.shape[0],), cs.seen, dtype=torch.int64)
        kwargs["position_ids"] = base.to(x.device)[:, None] + torch.arange(q_len, device=x.device)[None, :]
        ms.fwd_pos = kwargs["position_ids"]
        changed = True
    if "cache_position" in ms.decoder_params and kwargs.get("cache_position") is None:
        kwargs["cache_position"] = torch.arange(cs.seen, cs.seen + q_len, device=x.device)
        changed = True
    return (args, kwargs) if changed else None


# ---------------------------------------------------------------------------------------------------------------
# patch / unpatch


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


def _check_model(model) -> None:
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
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"tasksieve.patch: unsupported model type {mt!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
            f"Qwen3ForCausalLM)"
        )
    layer_types = getattr(model.config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if mt == "mistral" and getattr(model.config, "sliding_window", None) is not None:
        sliding = True
    if sliding:
        raise ValueError(
            f"tasksieve.patch: {type(model).__name__} uses sliding-window attention layers, which KV compression "
            "does not support; use a config with full attention only (sliding_window=None / use_sliding_window=False)"
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
        ``LlamaForCausalLM``, ``MistralForCausalLM`` (full attention), ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM``
        (or their decoder-only base models).
    kv : WindowKV, SnapKV, PyramidKV or None
        KV-cache press applied to every new request (a forward that starts with an empty cache). None installs the
        integration without compressing (needed to decode with caches made by :func:`prefill_multi`).
    prefill : FlexPrefill or None
        Sparse prefill attention (see the module docstring); composes with ``kv``. None: dense prefill.
    moe : PreMoe or None
        Swap the MoE blocks of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model (see :mod:`tasksieve.hf_moe`). With
        ``kv`` and ``prefill`` None only the MoE blocks are patched (any supported MoE model type).

    Returns
    -------
    The same model (patched in place).

    Raises
    ------
    ValueError
        Not a HF model, unsupported architecture or sliding-window layers, invalid press or prefill, already
        patched.
    """
    if moe is not None:
        from . import hf_moe

        if kv is None and prefill is None:
            return hf_moe.patch_moe(model, moe)
        hf_moe.patch_moe(model, moe)
        try:
            return patch(model, kv=kv, prefill=prefill)
        except Exception:
            hf_moe.unpatch_moe(model)
            raise
    _check_model(model)
    if is_patched(model):
        raise ValueError("tasksieve.patch: the model is already patched; call tasksieve.unpatch(model) first")
    _check_press(kv)
    _check_prefill(prefill)
    _register()
    decoder = _decoder_of(model)
    attn_modules = []
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise ValueError(f"tasksieve.patch: decoder layer {type(layer).__name__} has no self_attn with a layer_idx")
        attn_modules.append(attn)
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
        raise
    return model


def _remove(model, ms: _ModelState) -> None:
    for h in ms.handles:
        h.remove()
    ms.handles.clear()
    for m in list(ms.attn_modules) + [ms.decoder, model]:
        if getattr(m, _ATTR, None) is ms:
            delattr(m, _ATTR)
    ms.capture.clear()


def unpatch(model):
    """Remove every hook and attribute of :func:`patch` and restore the attention implementation.

    Returns the model. Raises ValueError when the model is not patched.
    """
    from . import hf_moe

    ms = getattr(model, _ATTR, None)
    if not isinstance(ms, _ModelState) and not hf_moe.is_moe_patched(model):
        raise ValueError("tasksieve.unpatch: the model is not patched")
    if hf_moe.is_moe_patched(model):
        hf_moe.unpatch_moe(model)
    if not isinstance(ms, _ModelState):
        return model
    _remove(model, ms)
    _set_impl(model, ms.original_impl)
    return model


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


# ---------------------------------------------------------------------------------------------------------------
# harness helpers: one prefill, many caches


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


@torch.no_grad()
def prefill_multi(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], presses: dict):
    """ONE prefill forward, one compressed cache per press.

    Prefill attention is full and identical for every press, so a single forward suffices: after each layer's
    attention, the hook compresses that layer's full KV once per press into that press's own cache (``None`` =
    the full, uncompressed KV).

    Parameters
    ----------
    model : patched or unpatched supported HF causal LM
        If it is not patched, it is patched (``kv=None``) for the call and unpatched afterwards.
    input_ids : LongTensor [B, N]
        The prompt (left-padded when B > 1).
    attention_mask : LongTensor/BoolTensor [B, N] or None
        1 = real token, 0 = left padding.
    presses : dict[str, press or None]

    Returns
    -------
    last_logits : Tensor [B, V]
        Logits of the last prompt position (identical to a dense forward).
    caches : dict[str, DynamicCache]
        One cache per press, each carrying its own request state (see :func:`cache_info`). Continue each with
        :func:`decode_step` (or ``model(...)`` / ``model.generate(...)`` on a patched model, passing the cache).
    """
    if not isinstance(presses, dict):
        raise ValueError(f"tasksieve.prefill_multi: presses must be a dict name -> press or None, got {type(presses)}")
    for name, p in presses.items():
        try:
            _check_press(p)
        except ValueError as e:
            raise ValueError(f"tasksieve.prefill_multi: presses[{name!r}]: {e}") from None
    own = not is_patched(model)
    if own:
        patch(model, kv=None)
    try:
        ms: _ModelState = getattr(model, _ATTR)
        scratch = _new_cache(model)
        root = CacheState(press=None, pstate=None, num_layers=ms.num_layers, scratch=True)
        caches = {}
        for name, p in presses.items():
            dest = _new_cache(model)
            tcs = _new_cache_state(ms, p)
            if tcs.pstate is not None and isinstance(input_ids, torch.Tensor):
                tcs.pstate.input_ids = input_ids
            setattr(dest, _ATTR, tcs)
            root.targets.append((tcs, dest))
            root.obs_len = max(root.obs_len, tcs.obs_len)
            caches[name] = dest
        setattr(scratch, _ATTR, root)
        kwargs = {ms.cache_kw: scratch}
        if attention_mask is not None:
            # number left-padded rows from their first real token, as generate does
            pos = attention_mask.to(torch.int64).cumsum(-1) - 1
            kwargs["position_ids"] = pos.masked_fill(attention_mask == 0, 0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **kwargs)
        for name, dest in caches.items():
            getattr(dest, _ATTR).next_pos = root.next_pos
            getattr(dest, _ATTR).seen = root.seen
        if root.targets:
            ms.last_cache_state = root.targets[-1][0]
        return out.logits[:, -1, :], caches
    finally:
        if own:
            unpatch(model)


@torch.no_grad()
def decode_step(model, cache, press, next_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """One decoding forward of ``next_ids`` on a cache from :func:`prefill_multi` (or from a patched forward).

    RoPE positions continue one past the last position each row used (``prefill_multi`` numbers left-padded rows
    from their first real token, as ``generate`` does); the mask of every layer is built from the cache's own
    kept-token padding mask, so nothing about the original prompt has to be passed.

    Parameters
    ----------
    model : supported HF causal LM (patched or not; patched with ``kv=None`` for the call when not)
    cache : DynamicCache
        Updated in place (one more token per row per call; decode eviction applies with ``WindowKV(decode_evict=
        True)``).
    press : press or None
        The press the cache was made with (checked against the cache), for readability of harness code.
    next_ids : LongTensor [B, q]
        The next token(s) of every row (usually q = 1, the argmax of the previous logits).
    attention_mask : Tensor [B, q] or [B, seen + q], optional
        Only its last q columns are read (1 = real token); default all ones.

    Returns
    -------
    logits : Tensor [B, V]
        Logits of the last new position.
    """
    cs = getattr(cache, _ATTR, None)
    if cs is None:
        raise ValueError(
            "tasksieve.decode_step: cache was not produced by tasksieve (prefill_multi or a patched model)"
        )
    if press is not None and cs.press is not press and cs.press != press:
        raise ValueError(
            f"tasksieve.decode_step: the cache was made with {cs.press!r}, not with the given press {press!r}"
        )
    own = not is_patched(model)
    if own:
        patch(model, kv=None)
    try:
        ms: _ModelState = getattr(model, _ATTR)
        q_len = next_ids.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -q_len:]
            # the pass-through mask needs seen + q columns only for its last q; pad on the left with ones
            pad = torch.ones(attention_mask.shape[0], cs.seen, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
        base = cs.next_pos.to(next_ids.device) if cs.next_pos is not None else torch.full(
            (next_ids.shape[0],), cs.seen, dtype=torch.int64, device=next_ids.device)
        position_ids = base[:, None] + torch.arange(q_len, device=next_ids.device)[None, :]
        kwargs = {ms.cache_kw: cache}
        out = model(input_ids=next_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :]
    finally:
        if own:
            unpatch(model)
