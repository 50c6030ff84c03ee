"""tasksieve: compute only what the task needs in long-context and MoE LLM inference.

Public API::

    import tasksieve as ts
    model, tokenizer = ts.models.load_default()
    ts.patch(model, kv=ts.WindowKV(budget=0.12, window=8, group=8, strategy="auto"))
    model.generate(...)
    ts.unpatch(model)

    out, lse = ts.flex_prefill_attention(q, k, v, gamma=0.95, tau=0.1)   # sparse prefill attention

The folders are the layers, and imports only go down (tests/test_layering.py checks it):

    ops/, reference/   the compiled ops with their fakes; the plain-PyTorch ground truth (tests only)
    methods/           WindowKV / SnapKV / PyramidKV, FlexPrefill, PreMoe on tensors (torch + ops)
    integrations/      HuggingFace patching, MoE block swap, PreMoe on HF models
    evaluation/        model loaders, MoEfication, NIAH and benchmark harnesses, built-in texts, tiny models
    this facade, cli   on top; the evaluation layer is reached lazily (``ts.models``, ``ts.niah``, ``ts.moefy``)
"""

import importlib

from . import ops, premoe
from ._version import __version__
from .integrations import hf
from .integrations.hf import last_info, patch, patched, unpatch
from .methods import flexprefill, windowkv
from .methods.flexprefill import FlexPrefill, flex_prefill_attention
from .methods.premoe import PreMoe
from .methods.windowkv import PyramidKV, SnapKV, WindowKV

# Loaded on first use: the evaluation layer is not needed to patch a model.
_LAZY = {"models": ".evaluation.models", "niah": ".evaluation.niah", "moefy": ".evaluation.moefy"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """What was built and what runs: see `python -m tasksieve.info`."""
    from .ops.info import build_info as _build_info

    return _build_info()


__all__ = ["ops", "hf", "models", "build_info", "WindowKV", "SnapKV", "PyramidKV", "patch",
           "patched", "unpatch", "last_info", "FlexPrefill", "flex_prefill_attention", "flexprefill",
           "windowkv", "premoe", "PreMoe", "__version__"]
