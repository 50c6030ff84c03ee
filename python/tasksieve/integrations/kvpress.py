"""WindowKV as a kvpress press: :class:`WindowKVPress`.

kvpress (NVIDIA's KV-cache compression library) compresses a HuggingFace model's cache with *presses*: dataclasses
whose ``__call__(model)`` context manager registers a forward hook on every ``self_attn``; after a layer's prefill
attention the hook hands that layer's keys and values to ``press.compress(...)`` and writes the result back into the
cache. ``WindowKVPress`` plugs WindowKV into that API and runs it through tasksieve's own method and ops
(:meth:`tasksieve.methods.windowkv.WindowKV.compress_layers`: ``window_scores``, ``select_windows``,
``gather_windows``), so it keeps exactly what ``tasksieve.patch(model, kv=WindowKV(...))`` keeps:

- Groups of ``group`` layers share one selection. With ``group_scoring="mean"`` every layer of a group scores its
  windows and the group ranks their mean, so nothing can be dropped before the group's last layer: the press holds
  the group's full keys and values (references, no copies) in a per-request :class:`PressState` and, at the group's
  last layer, compacts all of its layers with one ``gather_windows`` launch and writes them into the cache. Earlier
  layers of the group stay full in the cache until then (prefill attention reads only its own layer, so nothing
  downstream sees the difference).
- The per-request state lives in a ``WeakKeyDictionary`` on the press object, keyed by the cache: a new cache (or
  layer 0 of a new prefill into an empty one) starts a new request; dropping the cache drops the state. There is no
  module-level mutable state.

kvpress is imported lazily: ``import tasksieve`` never imports it (importing kvpress patches transformers' attention
functions process-wide). The class is built on first access of ``tasksieve.integrations.kvpress.WindowKVPress``;
without kvpress that access raises an ImportError that says how to get it (``make venv-kvpress``).

Shapes follow kvpress: hidden states ``[B, N, hidden]``, keys / values ``[B, Hk, N, D]``, queries ``[B, H, N, D]``.
Supported: the models kvpress hooks (``model.model.layers[i].self_attn``) whose attention tasksieve's HF integration
supports (Llama, Mistral, Qwen2, Qwen3), a DynamicCache, batches without padding (kvpress's pipeline runs batch 1).

Decoding in kvpress's own pipeline: WindowKV's arithmetic schedule (like kvpress's PyramidKVPress) leaves layers
with different lengths. transformers builds one attention mask for all layers from layer 0's length, so a question
of more than one token fed after the compressed context sees a mask that is misaligned in the other layers (a
kvpress limitation, not one of this press). Single-token steps (the usual greedy decode, or the question inside the
compressed context) and ``schedule="uniform"`` are exact; ``tasksieve.patch`` builds its mask per layer.
"""

from __future__ import annotations

import functools
import importlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from ..methods.windowkv import WindowKV
from ..methods.windowkv.state import PressState

#: The kvpress release this adapter is written and tested against (``requirements/kvpress.txt``).
KVPRESS_VERSION = "0.5.5"

__all__ = ["WindowKVPress", "KVPRESS_VERSION", "require_kvpress"]


def require_kvpress():
    """Import kvpress, or raise an ImportError that says how to get it."""
    try:
        importlib.import_module("kvpress.presses.base_press")  # the real kvpress, not a folder that shadows it
        return importlib.import_module("kvpress")
    except ImportError as e:
        raise ImportError(
            "tasksieve.integrations.kvpress needs kvpress (tested with kvpress=="
            f"{KVPRESS_VERSION}, which needs transformers<5.3): run `make venv-kvpress` in the tasksieve repository "
            "for a venv with it, or `pip install -r requirements/kvpress.txt`. Import error: " + str(e)
        ) from e


def _rope(module, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on queries ``[B, H, A, D]`` with ``cos``/``sin`` ``[B, A, D]``: the model family's own
    ``apply_rotary_pos_emb`` when its modeling module has one (the function its attention calls), else Llama's."""
    mod = importlib.import_module(type(module).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is not None:
        q_emb, _ = fn(q, q[:, :1], cos, sin)
        return q_emb
    half = q.shape[-1] // 2
    rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def _observation_queries(module, hidden_states: torch.Tensor, a: int, position_embeddings) -> torch.Tensor:
    """The last ``a`` queries of the prompt as the attention saw them: projection (+ bias), Qwen3's q-norm, RoPE.

    hidden_states ``[B, N, hidden]`` -> ``[B, a, H, D]`` (the layout of ``tasksieve.ops.window_scores``), last dim
    contiguous.
    """
    from kvpress.utils import get_prerope_query_states

    q = get_prerope_query_states(module, hidden_states[:, -a:])  # [B, H, a, D]
    cos, sin = position_embeddings
    q = _rope(module, q, cos[:, -a:], sin[:, -a:])
    return q.transpose(1, 2).contiguous()


def _check_layer(cache, layer_idx: int) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or type(layers[layer_idx]) is not DynamicLayer:
        kind = type(layers[layer_idx]).__name__ if layers is not None and layer_idx < len(layers) else "none"
        raise ValueError(
            f"WindowKVPress: needs a DynamicCache with full-attention layers; layer {layer_idx} of the "
            f"{type(cache).__name__} is {kind} (static, sliding, quantized and offloaded layers are not supported)"
        )


def _build(BasePress) -> type:
    @dataclass
    class WindowKVPress(BasePress):
        """WindowKV (whole windows of consecutive tokens, chosen by the observation window, shared by groups of
        layers, per-group pyramid budgets) as a kvpress press, running tasksieve's ops.

        Parameters
        ----------
        compression_ratio : float in [0, 1)
            kvpress's convention: the fraction of the prompt's KV to remove. WindowKV's budget is
            ``1 - compression_ratio`` of the prompt (rounded to 9 decimals, so 0.88 gives exactly 0.12): the average
            review-region budget per layer, rounded down to whole windows, plus the always-kept tail (observation
            window + remainder), as in ``tasksieve.WindowKV``. 0 keeps everything.
        window, group, obs_window, strategy, schedule, beta, per_head, group_scoring, auto_threshold, auto_top,
        neighbours, neighbour_weight
            As :class:`tasksieve.WindowKV` (same defaults). ``decode_evict`` has no counterpart: kvpress presses act
            at prefill only.

        Use
        ---
        >>> from kvpress import KVPressTextGenerationPipeline  # registers "kv-press-text-generation"
        >>> from transformers import pipeline
        >>> from tasksieve.integrations.kvpress import WindowKVPress
        >>> pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
        >>> pipe(context, question=question, press=WindowKVPress(compression_ratio=0.88))["answer"]

        ``press.windowkv()`` is the equivalent ``tasksieve.WindowKV`` (``ts.patch(model, kv=press.windowkv())``
        keeps the same KV); ``press.info(cache)`` summarises what the press did to a cache (strategy, budgets, kept
        tokens per layer).
        """

        compression_ratio: float = 0.0
        window: int = 8
        group: int = 8
        obs_window: Optional[int] = None
        strategy: Union[str, Callable[..., str]] = "auto"
        schedule: str = "arithmetic"
        beta: Union[int, float] = 14
        per_head: bool = False
        group_scoring: str = "mean"
        auto_threshold: float = 0.5
        auto_top: float = 0.1
        neighbours: str = "right"
        neighbour_weight: float = 0.5
        # per request (per cache object) state; not a setting
        _states: Any = field(default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False)

        def __post_init__(self) -> None:
            cr = self.compression_ratio
            if isinstance(cr, bool) or not isinstance(cr, (int, float)) or not (0.0 <= float(cr) < 1.0):
                raise ValueError(f"WindowKVPress.compression_ratio must be a number in [0, 1), got {cr!r}")
            try:
                self.windowkv()
            except ValueError as e:
                raise ValueError(str(e).replace("WindowKV.", "WindowKVPress.", 1)) from None

        def __getstate__(self) -> dict:  # pickle the settings, never a request's state
            return {k: v for k, v in self.__dict__.items() if k != "_states"}

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)
            self._states = weakref.WeakKeyDictionary()

        def windowkv(self) -> WindowKV:
            """The :class:`tasksieve.WindowKV` this press runs (budget = ``1 - compression_ratio``)."""
            return WindowKV(
                budget=round(1.0 - float(self.compression_ratio), 9), window=self.window, group=self.group,
                obs_window=self.obs_window, strategy=self.strategy, schedule=self.schedule, beta=self.beta,
                decode_evict=False, per_head=self.per_head, group_scoring=self.group_scoring,
                auto_threshold=self.auto_threshold, auto_top=self.auto_top, neighbours=self.neighbours,
                neighbour_weight=self.neighbour_weight,
            )

        def info(self, cache) -> Optional[dict]:
            """What the press did to ``cache`` (strategy, observation window, budgets, kept tokens per layer), or
            None if it never compressed it."""
            st = self._states.get(cache)
            return None if st is None else st.info()

        def compress(
            self,
            module: torch.nn.Module,
            hidden_states: torch.Tensor,
            keys: torch.Tensor,
            values: torch.Tensor,
            attentions: Optional[torch.Tensor],
            kwargs: dict,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Compress the prompt cache of ``module``'s layer, or of its whole group at the group's last layer.

            Parameters
            ----------
            module : the attention layer (``layer_idx``, ``config``, ``q_proj``, ``scaling``).
            hidden_states : Tensor [B, N, hidden]
                The layer's attention input (the observation queries are projected from its last rows).
            keys, values : Tensor [B, Hk, N, D]
                The layer's full prompt cache (RoPE'd keys).
            attentions : unused (WindowKV scores with its fused op, never with materialised attention weights).
            kwargs : the attention forward's keyword arguments; needs ``past_key_values`` (the cache, where the
                group's earlier layers are written back) and ``position_embeddings`` (cos, sin ``[B, N, D]``).

            Returns
            -------
            (keys, values) : Tensor [B, Hk, n_kept, D]
                This layer's kept KV: ``kk * window + tail`` rows once its group is compacted; the inputs unchanged
                while the group is pending (earlier layers of a group are replaced in the cache at its last layer).
            """
            if float(self.compression_ratio) == 0.0:
                return keys, values
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if cache is None:
                raise ValueError("WindowKVPress.compress: the attention call passed no cache (past_key_values)")
            layer_idx = module.layer_idx
            _check_layer(cache, layer_idx)
            press = self.windowkv()
            if layer_idx == 0 or cache not in self._states:
                st = press.new_state(module.config.num_hidden_layers)
                st.scale = getattr(module, "scaling", None)
                self._states[cache] = st
            st = self._states[cache]
            n = keys.shape[2]
            a = min(press.max_obs_window, n, hidden_states.shape[1])
            obs = _observation_queries(module, hidden_states, a, kwargs["position_embeddings"])
            done = press.compress_layers(layer_idx, keys, values, obs, st)
            out = (keys, values)
            for li, (k2, v2, _tok) in done.items():
                if li == layer_idx:
                    out = (k2, v2)
                else:  # an earlier layer of the group, compacted by the same gather launch
                    cache.layers[li].keys, cache.layers[li].values = k2, v2
            return out

    WindowKVPress.__module__ = __name__
    WindowKVPress.__qualname__ = "WindowKVPress"
    return WindowKVPress


@functools.cache
def _press_class() -> type:
    """Define the press class once kvpress is importable (memoised: one class per process, never mutated)."""
    require_kvpress()
    from kvpress.presses.base_press import BasePress

    return _build(BasePress)


def __getattr__(name: str):
    if name == "WindowKVPress":
        return _press_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
