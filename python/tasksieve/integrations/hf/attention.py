"""The attention function ``"tasksieve_sdpa"``, registered with transformers' ``AttentionInterface``: dense SDPA
that records the observation queries at prefill, builds the per-layer mask while decoding, and runs
FlexPrefill's sparse prefill when the patch asks for it."""

from __future__ import annotations

from typing import Optional

import torch

from ...methods.flexprefill import flex_prefill_attention
from .state import ATTENTION_NAME, CacheState, _ATTR, _Capture, _ModelState


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
