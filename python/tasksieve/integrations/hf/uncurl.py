"""UNCURL on HF MoE models: merge the experts of every MoE layer into fewer experts, task-aware, offline.

Beside PreMoe's pruning and sharing its pattern store: :func:`tasksieve.premoe.profile` records, with every task's
TCESS, the task's router statistics (``ops.router_stats_update``); :func:`merge` clusters each layer's experts by
them and merges every cluster into one expert (see :mod:`tasksieve.methods.uncurl` for the affinity, the clustering,
the unit alignment and the weighting, and why). The merged model is a plain HF model of the same family with fewer
experts per layer: ``tasksieve.premoe.export`` writes it as a standard checkpoint, as for a pruned one.

::

    store = ts.premoe.profile(model, {"essays": texts, "code": code}, tokenizer)
    report = ts.premoe.merge(model, store, task="essays", keep=8)     # or store["essays"], or prompt="..."
    ts.premoe.export(model, "merged/", tokenizer)                     # AutoModelForCausalLM.from_pretrained
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ...methods.premoe import Pattern, PatternStore, _is_int, keep_counts
from ...methods.uncurl import AFFINITIES, CLUSTERINGS, WEIGHTINGS, MergePlan, merge_experts, plan_merge
from . import moe as hf_moe
from .premoe import PruneReport, _param_bytes, check_fits

__all__ = ["merge", "MergeReport", "is_merged"]

MERGED_GROUPS_KEY = "tasksieve_merged_groups"


def is_merged(model) -> bool:
    """True when :func:`merge` rewrote this model (or it was loaded from such an export)."""
    return getattr(getattr(model, "config", None), MERGED_GROUPS_KEY, None) is not None


@dataclass
class MergeReport(PruneReport):
    """What :func:`merge` did: :class:`~tasksieve.integrations.hf.premoe.PruneReport`'s fields, where ``kept[l][j]``
    lists the original expert ids merged into expert j of MoE layer l (also as ``groups``), plus the top-k before
    and after and the :class:`~tasksieve.methods.uncurl.MergePlan`."""

    top_k_before: int = 0
    top_k_after: int = 0
    plan: Optional[MergePlan] = field(repr=False, default=None)

    @property
    def groups(self) -> list:
        return self.kept

    def __str__(self) -> str:
        sizes = sorted({len(g) for layer in self.kept for g in layer})
        return self.summary("UNCURL merge", f" (groups of {sizes[0]}-{sizes[-1]}), top-k {self.top_k_before} -> "
                                            f"{self.top_k_after}")


def _resolve_pattern(store_or_pattern, task, prompt, tokenizer, model) -> Pattern:
    if isinstance(store_or_pattern, Pattern):
        if task is not None or prompt is not None:
            raise ValueError("merge: task= and prompt= pick a task from a store; a Pattern is already one task")
        return store_or_pattern
    if not isinstance(store_or_pattern, PatternStore):
        raise ValueError(f"store_or_pattern: expected a tasksieve.premoe.PatternStore or Pattern, got "
                         f"{type(store_or_pattern).__name__}")
    store = store_or_pattern
    if len(store) == 0:
        raise ValueError("store_or_pattern: the PatternStore is empty")
    if (task is None) == (prompt is None):
        raise ValueError(f"merge: with a PatternStore give exactly one of task= (one of {store.tasks}) or prompt= "
                         "(retrieves the nearest task)")
    if task is not None:
        if task not in store:
            raise ValueError(f"task: {task!r} is not in the store (tasks: {store.tasks})")
        return store[task]
    if not hasattr(store, "retrieve"):
        raise ValueError("prompt: retrieval needs a store loaded with tasksieve.premoe.PatternStore (the HF one)")
    return store.retrieve(prompt, model=model, tokenizer=tokenizer)


def _merge_counts(keep, num_layers: int, num_experts: int, top_k: int, new_top_k: Optional[int]) -> tuple:
    counts = keep_counts(keep, num_layers, num_experts, 1)  # ratio/count/sequence checks and M <= E
    if new_top_k is None:
        if min(counts) < top_k:
            raise ValueError(f"keep={keep!r} leaves {min(counts)} experts in a layer, fewer than the router's top_k "
                             f"{top_k}: pass top_k=<= {min(counts)} to route fewer experts per token, or a larger keep")
        new_top_k = top_k
    if not _is_int(new_top_k) or not 1 <= new_top_k <= top_k:
        raise ValueError(f"top_k must be an int in [1, {top_k}] (the router's top_k or fewer), got {new_top_k!r}")
    if min(counts) < new_top_k:
        raise ValueError(f"keep={keep!r} leaves {min(counts)} experts in a layer, fewer than top_k={new_top_k}")
    return counts, int(new_top_k)


def _check_experts(experts: nn.Module, n_exp: int, where: str) -> None:
    names = {name for name, _ in experts.named_parameters(recurse=False)}
    if not {"gate_up_proj", "down_proj"} <= names:
        raise ValueError(f"{where}: expected experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
                         f"{sorted(names)}")
    other = sorted(names - {"gate_up_proj", "down_proj"})
    if other:
        raise ValueError(f"{where}: merging experts with extra parameters {other} is not supported")
    gu, dn = experts.gate_up_proj, experts.down_proj
    if gu.dim() != 3 or dn.dim() != 3 or gu.shape[0] != n_exp or dn.shape[0] != n_exp or \
            gu.shape[1] != 2 * dn.shape[2] or gu.shape[2] != dn.shape[1]:
        raise ValueError(f"{where}: unexpected expert shapes gate_up_proj {tuple(gu.shape)}, down_proj "
                         f"{tuple(dn.shape)} for {n_exp} experts")


@torch.no_grad()
def merge(model, store_or_pattern, keep=0.5, *, task: Optional[str] = None, prompt=None, tokenizer=None,
          top_k: Optional[int] = None, affinity: str = "logits", clustering: str = "spectral",
          weighting: str = "frequency", align: bool = True, seed: int = 0) -> MergeReport:
    """Merge every MoE layer's experts into ``keep`` experts with the task's router statistics (UNCURL), in place.

    Parameters
    ----------
    model : unpruned, unmerged, unpatched HF MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
    store_or_pattern : PatternStore or Pattern
        Made by :func:`tasksieve.premoe.profile` on this model (it carries the router statistics). With a store,
        ``task=`` names the task or ``prompt=`` (text with ``tokenizer``, or token ids) retrieves it.
    keep : float, int or sequence
        Experts after merging per MoE layer: ratio in (0, 1] (``ceil(ratio * E)``), count, or one per layer
        (non-uniform counts work in memory; export needs one count).
    top_k : int or None
        Experts per token after merging; None keeps the router's. Must be <= every layer's count: ``keep`` below
        the router's top-k needs an explicit, smaller ``top_k``.
    affinity, clustering, weighting, align, seed
        UNCURL's choices (defaults) and the ablations the benchmarks compare: ``affinity`` "logits" | "coselect";
        ``clustering`` "spectral" | "random" (a random equal-size partition); ``weighting`` "frequency" |
        "uniform"; ``align`` False averages without permuting hidden units.

    The experts of each group are merged into one (:func:`tasksieve.methods.uncurl.merge_experts`), the router rows
    likewise; the shared expert is untouched; expert counts and ``top_k`` of the modules and of the config are
    updated. The config records ``tasksieve_merged_groups`` (per MoE layer, the original ids of each merged expert),
    ``tasksieve_merged_from_experts``, ``tasksieve_task`` and ``tasksieve_merge`` (the settings).

    Returns a :class:`MergeReport`.
    """
    conv = hf_moe.moe_convention(model, "merge: model")
    if hf_moe.is_moe_patched(model):
        raise ValueError("merge: model is patched (tasksieve.patch(model, moe=...)); call tasksieve.unpatch(model) "
                         "first")
    if hf_moe.is_pruned(model):
        raise ValueError("merge: model is already pruned; merge the unpruned model")
    if is_merged(model):
        raise ValueError("merge: model is already merged; merge the unmerged model")
    sites = hf_moe.moe_sites(model, "merge: model")
    pattern = _resolve_pattern(store_or_pattern, task, prompt, tokenizer, model)
    check_fits(pattern, model, "store_or_pattern")
    if pattern.stats is None:
        raise ValueError(f"store_or_pattern: task {pattern.task!r} has no router statistics (a store profiled before "
                         "they were recorded); profile it again with tasksieve.premoe.profile")
    for name, value, allowed in (("affinity", affinity, AFFINITIES), ("clustering", clustering, CLUSTERINGS),
                                 ("weighting", weighting, WEIGHTINGS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(align, bool):
        raise ValueError(f"align must be a bool, got {align!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n_exp, router_k = conv["num_experts"], conv["top_k"]
    counts, new_k = _merge_counts(keep, len(sites), n_exp, router_k, top_k)
    for site in sites:
        _check_experts(getattr(site.block, conv["experts_attr"]), n_exp, f"merge: MoE layer {site.layer_idx}")
    plan = plan_merge(pattern.stats, counts, affinity=affinity, clustering=clustering, weighting=weighting,
                      seed=seed)

    before = _param_bytes(model)
    expert_before = sum(_param_bytes(getattr(s.block, conv["experts_attr"])) for s in sites)
    for site, groups, weights, anchors in zip(sites, plan.groups, plan.weights, plan.anchors):
        gate = getattr(site.block, conv["router_attr"])
        experts = getattr(site.block, conv["experts_attr"])
        gu, dn = experts.gate_up_proj, experts.down_proj
        new_gu, new_dn, rows, biases = [], [], [], []
        bias = getattr(gate, "bias", None)
        for g, w, a in zip(groups, weights, anchors):
            ids = g.to(gu.device)
            m_gu, m_dn = merge_experts(gu.index_select(0, ids), dn.index_select(0, ids), w, anchor=a, align=align)
            new_gu.append(m_gu)
            new_dn.append(m_dn)
            wt = w.to(device=gate.weight.device, dtype=torch.float64)
            rows.append((wt[:, None] * gate.weight.index_select(0, g.to(gate.weight.device)).double()).sum(0))
            if isinstance(bias, torch.Tensor):
                biases.append((wt * bias.index_select(0, g.to(bias.device)).double()).sum())
        experts.gate_up_proj = nn.Parameter(torch.stack(new_gu).contiguous(), requires_grad=gu.requires_grad)
        experts.down_proj = nn.Parameter(torch.stack(new_dn).contiguous(), requires_grad=dn.requires_grad)
        gate.weight = nn.Parameter(torch.stack(rows).to(gate.weight.dtype).contiguous(),
                                   requires_grad=gate.weight.requires_grad)
        if isinstance(bias, torch.Tensor):
            gate.bias = nn.Parameter(torch.stack(biases).to(bias.dtype), requires_grad=bias.requires_grad)
        m = len(groups)
        for mod in (gate, experts, site.block):
            if hasattr(mod, "num_experts"):
                mod.num_experts = m
            if hasattr(mod, "top_k"):
                mod.top_k = new_k
    cfg = model.config
    setattr(cfg, conv["num_experts_attr"], max(counts))
    setattr(cfg, conv["top_k_attr"], new_k)
    setattr(cfg, MERGED_GROUPS_KEY, plan.as_lists())
    cfg.tasksieve_merged_from_experts = n_exp
    cfg.tasksieve_task = pattern.task
    cfg.tasksieve_merge = {"affinity": affinity, "clustering": clustering, "weighting": weighting, "align": align,
                           "seed": seed, "top_k_before": router_k}
    return MergeReport(
        task=pattern.task, kept=plan.as_lists(), num_experts_before=n_exp, param_bytes_before=before,
        param_bytes_after=_param_bytes(model), expert_bytes_before=expert_before,
        expert_bytes_after=sum(_param_bytes(getattr(s.block, conv["experts_attr"])) for s in sites),
        moe_layers=[s.layer_idx for s in sites], top_k_before=router_k, top_k_after=new_k, plan=plan,
    )
