"""Harness helpers: ONE prefill -> one compressed cache per press, and decoding steps on such caches (the NIAH
harness compares methods this way)."""

from __future__ import annotations

from typing import Optional

import torch

from .cache import _new_cache_state
from .patch import _check_press, _unpatch_attention, is_patched, patch
from .state import CacheState, _ATTR, _ModelState


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
            _unpatch_attention(model)  # a MoE swap the caller installed stays


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
            _unpatch_attention(model)  # a MoE swap the caller installed stays
