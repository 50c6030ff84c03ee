"""PreMoe on HF MoE models: the retrieval probe, profiling over a model with router hooks, pruning and export.
The tensor-level parts (TCESS, Pattern, the store's storage and lookup, keep sets) are in
:mod:`tasksieve.methods.premoe`.

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

"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ... import ops
from ...methods.premoe import Pattern, PreMoe, _is_int, _is_real, check_fingerprint, retrieval_key
from ...methods.premoe import PatternStore as _PatternStore
from ...methods.router_stats import RouterStats
from . import moe as hf_moe
from .moe import fingerprint

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
    "check_fits",
    "check_vllm",
    "VLLM_ARCHITECTURES",
]

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
    """Profile the TCESS of every task: forward hooks on every MoE block's router input, ``ops.tcess_update``;
    the same hooks accumulate the task's router statistics (``ops.router_stats_update``: selection counts, logit
    sums, logit Gram and co-selection, fp64 on the device) that :func:`tasksieve.premoe.merge` clusters by.

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
    if hf_moe.is_pruned(model) or getattr(model.config, "tasksieve_merged_groups", None) is not None:
        raise ValueError("profile: model is pruned or merged; profile the unreduced model (TCESS ranks the "
                         "original experts)")
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
        store.check_fingerprint(fp, "store")
    streams = {task: _token_stream(texts, tokenizer, task, max_tokens) for task, texts in texts_by_task.items()}

    dev = _device_of(model)
    L = len(sites)
    acc = torch.zeros(L, n_exp, dtype=torch.float64, device=dev)
    count = torch.zeros(L, 1, dtype=torch.int64, device=dev)
    weights = [hf_moe.full_router_weight(model, s, conv) for s in sites]

    router_k = conv["top_k"]
    stats = None  # one RouterStats per task, made in the loop below

    def make_hook(l: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            logits = hf_moe.router_logits_fp32(x, weights[l])
            ops.tcess_update(logits, int(top_k), float(r), acc[l], count[l])
            # UNCURL's statistics: the router's own top-k selection (its scoring picks the same experts as top-k
            # of the logits for every supported family), fp64 sums on the device
            _, ids = ops.route_topk(logits, router_k, conv["scoring"], conv["renormalize"])
            stats.update(l, logits, ids)
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
            stats = RouterStats.zeros(L, n_exp, device=dev)
            if bar is not None:
                bar.set_postfix_str(task)
            chunks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
            full = [c for c in chunks if len(c) == seq_len]
            batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
            batches += [[c] for c in chunks if len(c) != seq_len]
            for batch in batches:
                ids = torch.tensor(batch, dtype=torch.long, device=dev)
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                stats.add_tokens(ids.numel())
                if bar is not None:
                    bar.update(ids.numel())
            store.add(task, (acc / count.clamp(min=1)).float().cpu(), tokens=len(stream), stats=stats)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    store.bind(model, tokenizer)
    return store


class PatternStore(_PatternStore):
    """:class:`tasksieve.methods.premoe.PatternStore` bound to a HF model: ``retrieve(prompt)`` probes the model.

    A store may be bound to a model and tokenizer (``profile`` and ``load(..., model=)`` do) so that
    ``store.retrieve(prompt)`` needs nothing else.
    """

    def __init__(self, fingerprint: dict, tasks: Optional[dict] = None, tokens: Optional[dict] = None):
        super().__init__(fingerprint, tasks, tokens)
        self._model = None
        self._tokenizer = None

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
        self.check_fingerprint(fingerprint(model), what)

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

    @classmethod
    def load(cls, path: Union[str, Path], model=None, tokenizer=None) -> "PatternStore":
        """Read a store written by :meth:`save`; with ``model``, check it fits and bind it."""
        return super().load(path).bind(model, tokenizer)

    @classmethod
    def profile(cls, model, texts_by_task: dict, tokenizer=None, **kwargs) -> "PatternStore":
        """Same as :func:`profile`."""
        return profile(model, texts_by_task, tokenizer, **kwargs)


def check_fits(pattern, model, what: str = "pattern") -> None:
    """Raise ValueError naming ``what`` unless ``pattern`` (a Pattern or PatternStore) was profiled on a model of
    this shape."""
    check_fingerprint(pattern.fingerprint, fingerprint(model), what)


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

    def summary(self, what: str, extra: str = "") -> str:
        """One line: ``what`` (task), experts per layer before/after, parameter and expert bytes."""
        m = self.num_experts_after
        ms = str(m[0]) if len(set(m)) == 1 else f"{min(m)}-{max(m)}"
        return (f"{what} (task {self.task!r}): {ms}/{self.num_experts_before} experts per MoE layer over "
                f"{len(m)} layers{extra}; parameters {self.param_bytes_before / 2**20:.2f} MiB -> "
                f"{self.param_bytes_after / 2**20:.2f} MiB ({100 * self.param_ratio:.1f}%); experts "
                f"{self.expert_bytes_before / 2**20:.2f} MiB -> {self.expert_bytes_after / 2**20:.2f} MiB")

    def __str__(self) -> str:
        return self.summary("PreMoe prune")


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
def prune(model, pattern: Pattern, keep=0.5, *, top_k: Optional[int] = None) -> PruneReport:
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
    top_k : int or None
        Experts per token after pruning; None keeps the router's. A ``keep`` below the router's top-k needs an
        explicit ``top_k`` <= every layer's M (e.g. 4 of 16 experts of a top-8 model: ``top_k=4``); the router's
        modules and the config get the new value.

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
    if getattr(model.config, "tasksieve_merged_groups", None) is not None:
        raise ValueError("prune: model is merged (tasksieve.premoe.merge); prune the unmerged model")
    if isinstance(pattern, PatternStore):
        raise ValueError("pattern: expected a Pattern; pick one with store.retrieve(prompt) or store[task]")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern: expected a tasksieve.premoe.Pattern, got {type(pattern).__name__}")
    check_fits(pattern, model, "pattern")
    router_k = conv["top_k"]
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= router_k):
        raise ValueError(f"top_k must be an int in [1, {router_k}] (the router's top_k or fewer), got {top_k!r}")
    new_k = router_k if top_k is None else int(top_k)
    try:
        keep_sets = pattern.keep_sets(keep, new_k)
    except ValueError as e:
        if top_k is None and "fewer than the router's top_k" in str(e):
            raise ValueError(f"{e}; or pass top_k= (<= the kept count) to route fewer experts per token") from None
        raise
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
            if hasattr(mod, "top_k"):
                mod.top_k = new_k
    counts = [len(ids) for ids in keep_sets]
    cfg = model.config
    setattr(cfg, conv["num_experts_attr"], max(counts))
    setattr(cfg, conv["top_k_attr"], new_k)
    if new_k != router_k:
        cfg.tasksieve_original_top_k = router_k
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
    config holds the new expert count, loadable by plain ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    servable by vLLM unchanged (``vllm serve out_dir``; :func:`check_vllm` says whether a folder fits vLLM).

    A model patched with ``moe=`` is saved in its HF form (the original blocks, temporarily put back). Non-uniform
    pruning (different M per layer) cannot be expressed by a HF config (one expert count per model) and vLLM builds
    every MoE layer from that one count: ValueError naming the family, the per-layer counts and the fix.
    """
    hf_moe.moe_convention(model, "export: model")
    _check_uniform(model.config, "export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attn = getattr(model.config, "_attn_implementation", None)
    with hf_moe.unswapped(model):
        model.save_pretrained(str(out), **save_kwargs)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if attn == "tasksieve_sdpa":  # a KV/prefill patch is live: the export must load with a stock attention
        cfg.pop("_attn_implementation", None)
    # transformers 5 writes the expert count under one name only (Qwen3-MoE: "num_local_experts"), while vLLM's
    # model code and transformers 4 read the other ("num_experts"): write every name the config class maps to it
    for name in _expert_count_names(model.config):
        cfg[name] = int(getattr(model.config, name))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------------------------------
# serving an export with vLLM

#: vLLM's model class for each family tasksieve prunes; vLLM reads the expert count of every MoE layer from the one
#: config field of :data:`moe_conventions.ROUTER_CONVENTIONS` (``num_local_experts`` for Mixtral, ``num_experts``)
VLLM_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# vLLM's Qwen MoE blocks refuse tensor_parallel_size > num_experts (Mixtral and OLMoE shard each expert instead)
_VLLM_TP_AT_MOST_EXPERTS = ("qwen2_moe", "qwen3_moe")


def _layer_counts(config) -> Optional[tuple[str, list[int]]]:
    for key, verb in (("tasksieve_kept_experts", "pruned"), ("tasksieve_merged_groups", "merged")):
        kept = getattr(config, key, None)
        if kept is not None:
            return verb, [len(k) for k in kept]
    return None


def _check_uniform(config, what: str) -> None:
    found = _layer_counts(config)
    if found is None or len(set(found[1])) <= 1:
        return
    verb, counts = found
    family = config.model_type
    attr = _experts_attr(config)
    arch = VLLM_ARCHITECTURES.get(family, "model class")
    raise ValueError(
        f"{what}: model was {verb} to a different expert count per layer ({counts}, one per MoE layer; family "
        f"{family!r}). A HF config holds one {attr!r} for all layers, and vLLM's {arch} builds every MoE layer "
        f"from it, so neither transformers nor vLLM can load this layout. {verb[:-1].capitalize()} with a uniform keep "
        f"(one keep for all layers) instead: a ratio (keep=0.5, `tasksieve prune --keep 0.5`) or a count (keep={max(counts)})"
    )


def _experts_attr(config) -> str:
    from .moe_conventions import ROUTER_CONVENTIONS

    return ROUTER_CONVENTIONS[config.model_type]["num_experts_attr"]


def _expert_count_names(config) -> list[str]:
    """The routed-expert count's config names: the family's own plus its aliases in the class's attribute_map
    (``num_experts`` <-> ``num_local_experts``)."""
    attr = _experts_attr(config)
    amap = getattr(type(config), "attribute_map", {}) or {}
    names = {attr, amap.get(attr, attr)} | {k for k, v in amap.items() if v == attr}
    return sorted(n for n in names if n in ("num_experts", "num_local_experts"))


# expert tensors in a checkpoint: per expert (transformers' saved layout, vLLM's loader) or stacked [E, ...]
_PER_EXPERT_KEY = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.(\d+)\.")
_STACKED_KEY = re.compile(r"layers\.(\d+)\.[^.]+\.experts\.(gate_up_proj|down_proj)$")


def _folder_expert_counts(folder: Path) -> dict[int, int]:
    """Per decoder layer, the routed experts the folder's safetensors hold (per-expert tensors ``...layers.L.<block>
    .experts.<j>.`` or stacked ``...layers.L.<block>.experts.gate_up_proj`` ``[E, ...]``); shared experts are not
    counted. Reads only the safetensors headers."""
    from safetensors import safe_open

    per_expert, stacked = _PER_EXPERT_KEY, _STACKED_KEY
    ids: dict[int, set] = {}
    sizes: dict[int, int] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"check_vllm: {folder} holds no .safetensors weights (vLLM loads safetensors; export with "
                         "tasksieve export / ts.premoe.export)")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                m = per_expert.search(key)
                if m:
                    ids.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
                    continue
                m = stacked.search(key)
                if m:
                    sizes[int(m.group(1))] = int(st.get_slice(key).get_shape()[0])
    out = {layer: len(v) for layer, v in ids.items()}
    out.update(sizes)
    return dict(sorted(out.items()))


def check_vllm(source, tensor_parallel_size: int = 1) -> dict:
    """Check that vLLM can serve ``source`` unchanged: an exported folder (config.json + safetensors), a HF model or
    a config. Raises ValueError with the reason and the fix; returns ``{"family", "architecture", "num_experts",
    "top_k", "moe_layers"}`` (``num_experts`` 0 for a dense model, which needs no MoE check).

    Checked: one expert count for every MoE layer (the config's recorded keep sets, and for a folder the expert
    tensors in the safetensors, must all equal the config's ``num_local_experts`` / ``num_experts``: vLLM sizes every
    layer from that field), the router top-k fits the experts, and for Qwen2-/Qwen3-MoE ``tensor_parallel_size`` at
    most the expert count (vLLM's Qwen MoE blocks refuse more). Not checked: what vLLM's platform adds (e.g. vLLM
    CPU's attention takes head sizes 32, 64, 80, 96, 112, 128, ...; the engine says so at start).
    """
    if not _is_int(tensor_parallel_size) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
    folder = None
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise ValueError(f"check_vllm: {folder} has no config.json (expected a folder written by tasksieve "
                             "export / prune)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    elif isinstance(source, nn.Module):
        config = source.config
    else:
        config = source
    family = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if family not in VLLM_ARCHITECTURES:
        return {"family": family, "architecture": archs[0] if archs else None, "num_experts": 0, "top_k": 0,
                "moe_layers": 0}
    arch = VLLM_ARCHITECTURES[family]
    if archs and archs[0] != arch:
        raise ValueError(f"check_vllm: config.architectures is {archs}; vLLM serves a {family!r} checkpoint as "
                         f"{arch}")
    _check_uniform(config, "check_vllm")
    attr = _experts_attr(config)
    from .moe_conventions import router_convention

    conv = router_convention(config)
    n_exp, top_k = conv["num_experts"], conv["top_k"]
    if isinstance(source, nn.Module):
        layers = {s.layer_idx: int(getattr(getattr(s.block, conv["experts_attr"]), "gate_up_proj").shape[0])
                  for s in hf_moe.moe_sites(source, "check_vllm: model")}
    elif folder is not None:
        layers = _folder_expert_counts(folder)
    else:
        layers = {}
    # every expert-count name the folder's config.json holds (vLLM may read either), else the loaded config's
    counts = {attr: n_exp}
    if folder is not None:
        raw = json.loads((folder / "config.json").read_text())
        counts = {k: raw[k] for k in ("num_experts", "num_local_experts") if k in raw} or counts
    if len(set(counts.values())) > 1:
        raise ValueError(f"check_vllm: family {family!r}: config.json gives different expert counts {counts}; vLLM "
                         f"reads one of them. Re-export with ts.premoe.export / tasksieve export")
    n_exp = next(iter(counts.values()))
    name = next(iter(counts))
    bad = {l: n for l, n in layers.items() if n != n_exp}
    if bad:
        raise ValueError(
            f"check_vllm: family {family!r}: the weights hold {sorted(set(layers.values()))} experts per MoE layer "
            f"(layer: count {bad}) but config.{name} is {n_exp}; vLLM's {arch} builds every MoE layer with that "
            "many experts and cannot load the others. Re-export with one keep for all layers "
            "(ts.premoe.prune(..., keep=0.5) then ts.premoe.export)"
        )
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"check_vllm: family {family!r}: the router's top-k {top_k} does not fit {n_exp} experts "
                         f"per layer; prune with top_k <= the kept count (tasksieve prune --top-k)")
    if family in _VLLM_TP_AT_MOST_EXPERTS and tensor_parallel_size > n_exp:
        raise ValueError(
            f"check_vllm: family {family!r}: vLLM's {arch} refuses tensor_parallel_size {tensor_parallel_size} > "
            f"{n_exp} experts per layer (config.num_experts); serve with tensor_parallel_size <= {n_exp} or keep more "
            "experts"
        )
    return {"family": family, "architecture": arch, "num_experts": n_exp, "top_k": top_k,
            "moe_layers": len(layers) if layers else None}
