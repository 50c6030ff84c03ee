"""What the plugin can run, checked when vLLM builds each attention layer (engine start), so a model the plugin
cannot handle fails before the first request instead of in the middle of a generation."""

from __future__ import annotations

from .config import ENV_VAR

__all__ = ["check_layer", "UnsupportedModelError"]

_CUDA_DTYPES = ("torch.float16", "torch.bfloat16")


class UnsupportedModelError(ValueError):
    """The model's attention has a feature FlexPrefill's kernels do not implement."""


def check_layer(impl, device: str, dtype=None) -> None:
    """Raise :class:`UnsupportedModelError` naming the feature when a layer cannot run FlexPrefill.

    ``impl`` is the backend's attention impl after vLLM's own ``__init__`` (num_heads, head_size, sliding_window,
    alibi_slopes, logits_soft_cap, sinks, attn_type, kv_cache_dtype).
    """
    problems = []
    attn_type = str(getattr(impl, "attn_type", "decoder")).lower()
    if "decoder" not in attn_type or "encoder" in attn_type:
        problems.append(f"attention type {getattr(impl, 'attn_type', None)!r} (only causal decoder self-attention)")
    window = getattr(impl, "sliding_window", None)
    if window not in (None, -1) and not (isinstance(window, tuple) and window == (-1, -1)):
        problems.append(f"sliding-window attention (window {window}; FlexPrefill attends to the whole causal "
                        "context)")
    if getattr(impl, "alibi_slopes", None) is not None:
        problems.append("ALiBi position biases")
    if getattr(impl, "logits_soft_cap", None) not in (None, 0, 0.0):
        problems.append(f"logit soft-capping ({impl.logits_soft_cap})")
    if getattr(impl, "sinks", None) is not None:
        problems.append("attention sinks")
    if str(getattr(impl, "kv_cache_dtype", "auto")) not in ("auto", "bfloat16", "float16", "float32"):
        problems.append(f"a quantised KV cache (kv_cache_dtype={impl.kv_cache_dtype!r})")
    if getattr(impl, "num_heads", 1) % max(1, getattr(impl, "num_kv_heads", 1)) != 0:
        problems.append("query heads not a multiple of KV heads")
    if device == "cuda":
        if getattr(impl, "head_size", 64) not in (64, 128):
            problems.append(f"head size {impl.head_size} (the CUDA kernels take 64 or 128)")
        if dtype is not None and str(dtype) not in _CUDA_DTYPES:
            problems.append(f"dtype {dtype} (the CUDA kernels take float16 or bfloat16)")
        if getattr(impl, "dcp_world_size", 1) > 1:
            problems.append("decode context parallelism")
    if problems:
        raise UnsupportedModelError(
            f"{ENV_VAR} is set but this model's attention cannot run FlexPrefill: " + "; ".join(problems)
            + f". Unset {ENV_VAR} to serve this model with vLLM's own attention.")
