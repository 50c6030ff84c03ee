"""tasksieve: compute only what the task needs in long-context and MoE LLM inference.

Public API::

    import tasksieve as ts
    model, tokenizer = ts.models.load_default()
    ts.patch(model, kv=ts.WindowKV(budget=0.12, window=8, group=8, strategy="auto"))
    model.generate(...)
    ts.unpatch(model)

    out, lse = ts.flex_prefill_attention(q, k, v, gamma=0.95, tau=0.1)   # sparse prefill attention
"""

from . import _ext, hf, models, ops
from .flexprefill import FlexPrefill, flex_prefill_attention
from .hf import last_info, patch, patched, unpatch
from . import hf_moe, premoe
from .premoe import PreMoe
from .windowkv import PyramidKV, SnapKV, WindowKV

__version__ = "0.1.0"


def build_info() -> dict:
    """What was built and what runs: see `python -m tasksieve.info`."""
    from .info import build_info as _build_info  # lazy, so `python -m tasksieve.info` runs clean

    return _build_info()


__all__ = ["ops", "hf", "models", "build_info", "WindowKV", "SnapKV", "PyramidKV", "patch",
           "patched", "unpatch", "last_info", "FlexPrefill", "flex_prefill_attention",
           "premoe", "hf_moe", "PreMoe"]
