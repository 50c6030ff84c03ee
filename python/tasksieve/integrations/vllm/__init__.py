"""tasksieve inside vLLM: FlexPrefill sparse prefill as an attention-backend plugin.

Enable per engine with one environment variable (off when unset), then use vLLM as usual::

    TASKSIEVE_FLEXPREFILL='{"gamma": 0.95, "block_size": 64, "min_budget": 2048}' vllm serve ./model
    # or in Python, before creating the engine:
    os.environ["TASKSIEVE_FLEXPREFILL"] = '{"gamma": 0.95, "block_size": 64, "min_budget": 2048}'
    llm = vllm.LLM("./model", worker_extension_cls="tasksieve.integrations.vllm.StatsExtension")
    ...
    tasksieve.integrations.vllm.stats(llm)   # what the plugin did, summed over layers and ranks

(``worker_extension_cls`` is vLLM's own way to give workers a method ``LLM.collective_rpc`` can call by name; only
:func:`stats` needs it.)

The package installs a ``vllm.general_plugins`` entry point (:func:`register`), which vLLM calls in every process.
With the variable set, it registers a subclass of the platform's attention backend (``CPU_ATTN`` on CPU,
``FLASH_ATTN`` on CUDA) under the same name: decode tokens and prompts with fewer than ``dense_below`` keys go to
vLLM's kernel unchanged; longer prefills run FlexPrefill through tasksieve's ops, fresh prompts on the step's packed
K/V and chunked-prefill continuations / prefix-cache hits on the paged cache, one launch per layer per form. vLLM
still writes the KV cache. Settings: see :mod:`tasksieve.integrations.vllm.config`.
"""

from __future__ import annotations

from .config import ENV_VAR, parse_config, read_config
from .support import UnsupportedModelError

__all__ = ["register", "stats", "StatsExtension", "ENV_VAR", "parse_config", "read_config",
           "UnsupportedModelError"]

_BACKENDS = {
    "cpu": ("CPU_ATTN", "tasksieve.integrations.vllm.cpu.TasksieveCPUAttentionBackend"),
    "cuda": ("FLASH_ATTN", "tasksieve.integrations.vllm.cuda.TasksieveFlashAttentionBackend"),
}


def register() -> None:
    """vLLM's plugin hook: registers the FlexPrefill backend when ``TASKSIEVE_FLEXPREFILL`` is set; else nothing.

    A malformed setting raises here, i.e. when the engine starts.
    """
    settings = read_config()
    if settings is None:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    kind = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
    if kind is None:
        raise UnsupportedModelError(f"{ENV_VAR} is set but tasksieve's vLLM plugin runs on CPU and CUDA only, not "
                                    f"on {type(current_platform).__name__}")
    name, path = _BACKENDS[kind]
    register_backend(AttentionBackendEnum[name], path)


class StatsExtension:
    """A vLLM worker extension (``LLM(..., worker_extension_cls="tasksieve.integrations.vllm.StatsExtension")``):
    adds :meth:`tasksieve_stats` to every worker so :func:`stats` can read the plugin's counters by name."""

    def tasksieve_stats(self) -> dict:
        """Per attention layer of this worker: the plugin's counters (``LayerStats.as_dict``)."""
        context = self.vllm_config.compilation_config.static_forward_context
        per_layer = {}
        for name, layer in context.items():
            layer_stats = getattr(getattr(layer, "impl", None), "tasksieve_stats", None)
            if layer_stats is not None:
                per_layer[name] = layer_stats.as_dict()
        return per_layer


def stats(llm) -> dict:
    """What the plugin did in an engine so far (reads device counters once: call it between requests).

    Returns
    -------
    dict: ``layers`` (attention layers running the plugin, over all ranks), ``sparse_requests`` /
    ``dense_requests`` / ``paged_requests`` (request x layer counts summed over layers of rank 0),
    ``computed_blocks`` / ``causal_blocks`` (tiles, all ranks and layers), ``ratio`` (computed / causal, 1.0 when
    nothing ran sparse), ``query_aware_fraction`` and ``per_rank`` (the raw per-layer dicts).
    """
    try:
        per_rank = llm.collective_rpc("tasksieve_stats")
    except AttributeError as e:
        raise RuntimeError("tasksieve.integrations.vllm.stats: the engine's workers have no tasksieve_stats; create "
                           "it with worker_extension_cls=\"tasksieve.integrations.vllm.StatsExtension\"") from e
    layers = [d for rank in per_rank for d in rank.values()]
    rank0 = list(per_rank[0].values()) if per_rank else []
    total = lambda key, rows: sum(d[key] for d in rows)  # noqa: E731
    computed, causal = total("computed_blocks", layers), total("causal_blocks", layers)
    heads = total("sparse_heads", layers)
    return {
        "layers": len(layers),
        "sparse_requests": total("sparse_requests", rank0),
        "dense_requests": total("dense_requests", rank0),
        "paged_requests": total("paged_requests", rank0),
        "computed_blocks": computed,
        "causal_blocks": causal,
        "ratio": computed / causal if causal else 1.0,
        "query_aware_fraction": total("query_aware_heads", layers) / heads if heads else 0.0,
        "per_rank": per_rank,
    }
