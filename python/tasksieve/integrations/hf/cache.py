"""The hooks that work on the cache: after each layer's prefill attention, compress its keys and values with the
press; while decoding, evict and keep the token counters and padding masks of every layer."""

from __future__ import annotations

from typing import Optional

import torch

from .state import CacheState, _ATTR, _Capture, _ModelState


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
