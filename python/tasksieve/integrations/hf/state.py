"""Where the HF integration keeps its state: per model (:class:`_ModelState`, ``model._tasksieve``) and per
request (:class:`CacheState`, on the cache object), and what one attention call hands to its layer's hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ...methods.flexprefill import FlexPrefill
from ...methods.windowkv.state import PressState


ATTENTION_NAME = "tasksieve_sdpa"
#: Model types ``patch(kv=..., prefill=...)`` accepts (full-attention configs only): the dense families and the MoE
#: families whose attention is Llama's plus at most q/k norms, clamping and projection biases applied before the
#: attention function (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). ``moe=`` alone has its own list
#: (:data:`tasksieve.integrations.hf.moe.SUPPORTED_MOE_TYPES`).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_ATTR = "_tasksieve"


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
