"""HuggingFace MoE integration: find, swap and restore the sparse MoE blocks of Mixtral / Qwen2-MoE / Qwen3-MoE /
OLMoE causal LMs (transformers v5 layout: 3-D ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).

Used through ``tasksieve.patch(model, moe=tasksieve.PreMoe(...))`` / ``tasksieve.unpatch(model)``; the functions
here are the building blocks :mod:`.premoe` uses too.

How the swap works (nothing is monkeypatched)
---------------------------------------------
Every decoder layer's MoE block (``layer.mlp``, checked by class name from
:data:`tasksieve.integrations.hf.moe_conventions.ROUTER_CONVENTIONS`) is replaced **as a module** by a :class:`TaskSieveMoeBlock`
whose children are the original block's own ``gate``, ``experts`` (and ``shared_expert`` / ``shared_expert_gate``)
objects, so parameter names, devices and dtypes stay those of the model. Its forward:

1. router logits ``z = x W_gate^T`` in the model dtype (as HF), then fp32;
2. ``ops.route_topk`` with the family's convention (softmax -> top-k, renormalised or not), the PreMoe keep mask
   (pruned experts are masked to -inf **before** top-k, never dropped afterwards) and ``mask_full`` for
   ``renorm="mask_full"``;
3. ``ops.moe_forward(x, experts.gate_up_proj, experts.down_proj, ids, weights, expert_map)`` — or, with
   ``use_kernels=False``, the HF experts module's own forward on the same routing;
4. plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` where the family has a shared expert (never pruned).

``unpatch`` sets the original block objects back on their layers: the model is exactly what it was.

Pruned models (see :func:`tasksieve.premoe.prune`) carry ``config.tasksieve_kept_experts`` (per MoE layer, the
original expert id of every compact expert). A swapped block on such a model maps between original and compact
ids with ``expert_map [E_orig] -> compact id or -1`` (the vLLM convention) where it needs to.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...methods.premoe import Pattern, PatternStore, PreMoe, check_fingerprint, retrieval_key
from .moe_conventions import ROUTER_CONVENTIONS, router_convention

__all__ = [
    "MoeSite",
    "TaskSieveMoeBlock",
    "moe_sites",
    "moe_convention",
    "fingerprint",
    "full_router_weight",
    "router_logits_fp32",
    "is_pruned",
    "patch_moe",
    "unpatch_moe",
    "is_moe_patched",
    "moe_info",
    "unswapped",
    "SUPPORTED_MOE_TYPES",
]

SUPPORTED_MOE_TYPES = tuple(sorted(ROUTER_CONVENTIONS))
_ATTR = "_tasksieve_moe"
#: Name of the non-persistent buffer :func:`tasksieve.premoe.prune` leaves on a pruned router: the unpruned router
#: rows ``[E_orig, H]``, so ``renorm="mask_full"`` and retrieval keep working after compaction.
FULL_ROUTER_BUFFER = "tasksieve_full_weight"


# ---------------------------------------------------------------------------------------------------------------
# discovery


@dataclass
class MoeSite:
    """One MoE block of a model.

    Attributes
    ----------
    layer_idx : int
        Index of the decoder layer holding it.
    moe_idx : int
        Index among the MoE layers (0 = the first MoE layer, the one retrieval probes).
    parent : nn.Module
        The decoder layer.
    attr : str
        Attribute of ``parent`` holding the block (``"mlp"``).
    block : nn.Module
        The original HF block (also while the model is patched).
    """

    layer_idx: int
    moe_idx: int
    parent: nn.Module
    attr: str
    block: nn.Module


def _decoder_layers(model) -> Any:
    for obj in (getattr(model, "model", None), model):
        if obj is not None and isinstance(getattr(obj, "layers", None), nn.ModuleList):
            return obj.layers
    raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")


def moe_convention(model, what: str = "model") -> dict:
    """The resolved router convention of ``model`` (see :func:`tasksieve.integrations.hf.moe_conventions.router_convention`).

    Raises ValueError naming ``what`` when the model is not a supported MoE family.
    """
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in ROUTER_CONVENTIONS:
        raise ValueError(
            f"{what}: expected a HF MoE causal LM of model type {', '.join(SUPPORTED_MOE_TYPES)} "
            f"(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), got {type(model).__name__} with model_type {mt!r}"
        )
    return router_convention(config)


def moe_sites(model, what: str = "model") -> list[MoeSite]:
    """Every sparse MoE block of ``model`` in layer order (the original HF blocks, also while patched).

    Raises ValueError naming ``what`` when the model is not a supported MoE family or has no MoE block.
    """
    conv = moe_convention(model, what)
    sites = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, conv["block_attr"], None)
        if isinstance(block, TaskSieveMoeBlock):
            block = block.original
        if block is not None and type(block).__name__ == conv["moe_block_class"]:
            sites.append(MoeSite(i, len(sites), layer, conv["block_attr"], block))
    if not sites:
        raise ValueError(f"{what}: {type(model).__name__} has no {conv['moe_block_class']} block to work on")
    return sites


def is_pruned(model) -> bool:
    """True when :func:`tasksieve.premoe.prune` compacted this model (or it was loaded from such an export)."""
    return getattr(model.config, "tasksieve_kept_experts", None) is not None


def _original_num_experts(model, conv: dict) -> int:
    n = getattr(model.config, "tasksieve_original_num_experts", None)
    return int(n) if n is not None else conv["num_experts"]


def fingerprint(model) -> dict:
    """What a PreMoe pattern must match: model type, MoE layer indices, routed experts (unpruned), top-k."""
    conv = moe_convention(model)
    sites = moe_sites(model)
    return {
        "model_type": model.config.model_type,
        "moe_layers": [s.layer_idx for s in sites],
        "num_experts": _original_num_experts(model, conv),
        "top_k": int(getattr(model.config, "tasksieve_original_top_k", None) or conv["top_k"]),
    }


def full_router_weight(model, site: MoeSite, conv: dict) -> Optional[torch.Tensor]:
    """Router rows of every original expert, ``[E_orig, H]``: the router itself on an unpruned block, the buffer
    left by ``prune`` on a pruned one, None when they are gone (a pruned checkpoint loaded from disk)."""
    gate = getattr(site.block, conv["router_attr"])
    if not is_pruned(model):
        return gate.weight
    return getattr(gate, FULL_ROUTER_BUFFER, None)


def _kept_ids(model, site: MoeSite) -> Optional[list]:
    kept = getattr(model.config, "tasksieve_kept_experts", None)
    return None if kept is None else list(kept[site.moe_idx])


def router_logits_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Raw router logits ``[T, E]`` computed in fp32 (TCESS and retrieval keys, as PreMoe's hook computes them)."""
    return F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float())


# ---------------------------------------------------------------------------------------------------------------
# the swapped block


class TaskSieveMoeBlock(nn.Module):
    """Drop-in replacement of one HF sparse MoE block: router -> ``ops.route_topk`` -> ``ops.moe_forward``.

    Shapes: ``hidden_states [B, S, H]`` (or ``[T, H]``) in, same shape out. T = B*S tokens, E_c experts held by
    ``experts`` (E_orig before pruning), k = the router's top-k.

    Parameters
    ----------
    original : nn.Module
        The HF block; its children become this module's children (same objects).
    conv : dict
        Resolved router convention of the family.
    moe_idx : int
        Index among the MoE layers.
    renorm : "slice" | "mask_full"
        How pruned experts leave the softmax (see :class:`tasksieve.premoe.PreMoe`).
    use_kernels : bool
        True: experts through ``ops.moe_forward``; False: the HF experts module's own forward.
    kept_ids : list[int] or None
        Original expert id of every compact expert when the model is pruned.
    num_experts_orig : int
        Routed experts before pruning.
    """

    def __init__(self, original: nn.Module, conv: dict, moe_idx: int, renorm: str, use_kernels: bool,
                 kept_ids: Optional[list], num_experts_orig: int):
        super().__init__()
        # a plain attribute, not a child: the original's parameters are already ours through its children
        self.__dict__["original"] = original
        self.moe_idx = moe_idx
        self.gate = getattr(original, conv["router_attr"])
        self.experts = getattr(original, conv["experts_attr"])
        self.has_shared = conv.get("shared_expert_attr") is not None
        if self.has_shared:
            self.shared_expert = getattr(original, conv["shared_expert_attr"])
            self.shared_expert_gate = getattr(original, conv["shared_expert_gate_attr"])
        self.top_k = int(self.gate.top_k)
        self.scoring = conv["scoring"]
        self.renormalize = bool(getattr(self.gate, "norm_topk_prob", conv["renormalize"])
                                if conv.get("renormalize_attr") else conv["renormalize"])
        self.weights_in_logits_dtype = bool(conv["weights_in_logits_dtype"])
        self.renorm = renorm
        self.use_kernels = use_kernels
        self.num_experts_orig = int(num_experts_orig)
        self.num_experts_compact = int(self.experts.gate_up_proj.shape[0])
        dev = self.experts.gate_up_proj.device
        # non-persistent buffers: they follow .to(device) and never reach a state_dict
        self.register_buffer(
            "kept_ids", None if kept_ids is None else torch.tensor(kept_ids, dtype=torch.long, device=dev),
            persistent=False)
        expert_map = None
        if renorm == "mask_full" and kept_ids is not None:
            expert_map = torch.full((self.num_experts_orig,), -1, dtype=torch.int32, device=dev)
            expert_map[self.kept_ids] = torch.arange(len(kept_ids), dtype=torch.int32, device=dev)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self.register_buffer("keep_mask", None, persistent=False)
        self.set_keep(None)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts_compact}/{self.num_experts_orig}, top_k={self.top_k}, "
                f"scoring={self.scoring}, renormalize={self.renormalize}, renorm={self.renorm!r}, "
                f"use_kernels={self.use_kernels}")

    def set_keep(self, keep_orig: Optional[torch.Tensor]) -> None:
        """Mask of the experts routing may pick, in ORIGINAL expert ids (bool ``[E_orig]``; None = all held)."""
        dev = self.experts.gate_up_proj.device
        if self.renorm == "mask_full" and self.kept_ids is not None:
            mask = torch.zeros(self.num_experts_orig, dtype=torch.bool, device=dev)
            mask[self.kept_ids] = True
            if keep_orig is not None:
                mask &= keep_orig.to(dev)
        elif keep_orig is None:
            mask = None
        else:
            keep_orig = keep_orig.to(dev)
            mask = keep_orig[self.kept_ids] if self.kept_ids is not None else keep_orig.clone()
        if mask is not None:
            n = int(mask.sum())
            if n < self.top_k:
                raise ValueError(
                    f"keep: MoE layer {self.moe_idx} would keep {n} experts, fewer than the router's top_k "
                    f"{self.top_k} (of the experts this pruned model still holds)"
                )
            if bool(mask.all()):
                mask = None
        self.keep_mask = mask

    def full_weight(self) -> Optional[torch.Tensor]:
        """Router rows of every original expert ``[E_orig, H]`` (None on a pruned model without them)."""
        if self.kept_ids is None:
            return self.gate.weight
        return getattr(self.gate, FULL_ROUTER_BUFFER, None)

    def router_weight(self) -> torch.Tensor:
        return self.full_weight() if self.renorm == "mask_full" else self.gate.weight

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[T, H]`` -> (router logits in the model dtype, topk_weights fp32 ``[T, k]``, topk_ids int32 ``[T, k]``)."""
        weight = self.router_weight()
        gate = self.gate
        if gate._forward_hooks or gate._forward_pre_hooks:
            # someone observes the router module: transformers' output recorder (``output_router_logits=True``,
            # the aux loss; installed on first use and kept), or a user's hook. Run the HF router itself so its hooks
            # see its own output (before any keep mask), but route on our own logits: the first output is the raw
            # logits in current transformers, the softmax probabilities in 5.0-5.2 (kvpress's pin), which would
            # route on probabilities. F.linear(x, gate.weight) is the HF router's linear bit for bit.
            gate(x)
        logits = F.linear(x, weight.to(x.dtype))  # none of the supported routers has a bias
        w, ids = ops.route_topk(
            logits.float(), self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            keep_mask=self.keep_mask, mask_full=self.renorm == "mask_full",
        )
        if self.weights_in_logits_dtype and logits.dtype != torch.float32:
            w = w.to(logits.dtype).float()  # HF rounds the weights to the logits' dtype
        return logits, w, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        state = self.__dict__.get("_state")
        if state is not None:
            state.before_block(self, x, shape)
        _, w, ids = self.route(x)
        if self.use_kernels:
            out = ops.moe_forward(x, self.experts.gate_up_proj, self.experts.down_proj, ids, w, self.expert_map)
        else:
            local = ids.long() if self.expert_map is None else self.expert_map[ids.long()].long()
            out = self.experts(x, local, w.to(x.dtype) if self.weights_in_logits_dtype else w)
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# patch state


@dataclass
class MoeState:
    """What ``patch(model, moe=...)`` installed (``model._tasksieve_moe``; removed by unpatch).

    ``swaps``: (parent, attr, original block, swapped block) per MoE layer. ``store``/``keep``: with a
    :class:`~tasksieve.premoe.PatternStore`, the first MoE block of every new request (a forward whose KV cache is
    empty or absent, seen by a pre-hook on the decoder; for a decoder called without keyword arguments, a forward of
    more than one token per row) computes the retrieval key from its own router input, and the nearest
    task's keep sets are applied to every layer for that request and its decoding steps. The key covers every
    token of the forward (rows concatenated, as PreMoe's batch mode; left padding included, so retrieve with
    :meth:`~tasksieve.premoe.PatternStore.retrieve` and a fixed Pattern when padding matters).
    """

    policy: Any
    swaps: list = field(default_factory=list)
    store: Any = None
    keep: Any = None
    pattern: Any = None
    distance: Optional[float] = None
    requests: int = 0
    fresh: Optional[bool] = None  # set by the decoder pre-hook: this forward starts a request (empty / no cache)
    handles: list = field(default_factory=list)

    def before_forward(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or not hasattr(cache, "get_seq_length"):
            self.fresh = True
        else:
            self.fresh = int(cache.get_seq_length()) == 0

    def before_block(self, block: TaskSieveMoeBlock, x: torch.Tensor, shape: torch.Size) -> None:
        if self.store is None or block.moe_idx != 0:
            return
        if self.fresh is not None:
            # a chunked prefill or teacher-forced tokens on a live cache continue the request
            new_request = self.pattern is None or self.fresh
            self.fresh = None
        else:
            new_request = self.pattern is None or (len(shape) == 3 and shape[1] > 1) or (len(shape) == 2 and shape[0] > 1)
        if not new_request:
            return
        key = retrieval_key(router_logits_fp32(x, block.full_weight()))
        pattern = self.store.nearest(key)
        self.apply(pattern)
        self.requests += 1

    def apply(self, pattern) -> None:
        keep_sets = pattern.keep_sets(self.keep)
        masks = []
        for (_, _, _, blk), ids in zip(self.swaps, keep_sets):
            m = torch.zeros(blk.num_experts_orig, dtype=torch.bool)
            m[ids] = True
            masks.append(m)
        for (_, _, _, blk), m in zip(self.swaps, masks):
            blk.set_keep(m)
        self.pattern = pattern
        self.distance = pattern.distance


def is_moe_patched(model) -> bool:
    return isinstance(getattr(model, _ATTR, None), MoeState)


def patch_moe(model, policy) -> Any:
    """Swap every MoE block of ``model`` for a :class:`TaskSieveMoeBlock` configured by ``policy`` (a
    :class:`tasksieve.premoe.PreMoe`). Prefer ``tasksieve.patch(model, moe=policy)``."""
    if not isinstance(policy, PreMoe):
        raise ValueError(f"tasksieve.patch: moe must be a tasksieve.PreMoe or None, got {type(policy).__name__}")
    policy.validate()
    if is_moe_patched(model):
        raise ValueError("tasksieve.patch: the model's MoE blocks are already patched; call tasksieve.unpatch(model)")
    conv = moe_convention(model, "tasksieve.patch: model")
    sites = moe_sites(model, "tasksieve.patch: model")
    act = getattr(model.config, "hidden_act", "silu")
    if policy.use_kernels and act != "silu":
        raise ValueError(f"tasksieve.patch: moe_forward computes SiLU(gate) * up experts; model.config.hidden_act is "
                         f"{act!r} (use PreMoe(use_kernels=False))")
    n_orig = _original_num_experts(model, conv)
    if isinstance(policy.pattern, (Pattern, PatternStore)):
        check_fingerprint(policy.pattern.fingerprint, fingerprint(model), "PreMoe.pattern")
    state = MoeState(policy=policy)
    if isinstance(policy.pattern, PatternStore):
        state.store = policy.pattern
        state.keep = policy.effective_keep
        policy.pattern[policy.pattern.tasks[0]].keep_counts(state.keep)  # bad keep fails at patch time
    blocks = []
    for site in sites:
        kept = _kept_ids(model, site)
        if full_router_weight(model, site, conv) is None and (policy.renorm == "mask_full" or state.store is not None):
            raise ValueError(
                "PreMoe: renorm='mask_full' and retrieval from a PatternStore need the unpruned router rows, which "
                "this pruned model no longer holds (a pruned checkpoint loaded from disk; the model prune() compacted "
                "in memory keeps them); use renorm='slice' and a Pattern"
            )
        blocks.append(TaskSieveMoeBlock(site.block, conv, site.moe_idx, policy.renorm, policy.use_kernels, kept,
                                        n_orig))
    state.swaps = [(s.parent, s.attr, s.block, b) for s, b in zip(sites, blocks)]
    if isinstance(policy.pattern, Pattern):
        state.keep = policy.effective_keep
        state.apply(policy.pattern)  # validates keep against every layer before anything is swapped
    for parent, attr, _, blk in state.swaps:
        blk.__dict__["_state"] = state
        setattr(parent, attr, blk)
    if state.store is not None:
        decoder = _decoder_owner(model)
        if decoder is not None:
            state.handles.append(decoder.register_forward_pre_hook(state.before_forward, with_kwargs=True))
    setattr(model, _ATTR, state)
    return model


def _decoder_owner(model) -> Optional[nn.Module]:
    for obj in (getattr(model, "model", None), model):
        if obj is not None and isinstance(getattr(obj, "layers", None), nn.ModuleList):
            return obj
    return None


def unpatch_moe(model) -> Any:
    """Put the original MoE block objects back; the model is exactly as before the patch."""
    state = getattr(model, _ATTR, None)
    if not isinstance(state, MoeState):
        raise ValueError("tasksieve.unpatch: the model's MoE blocks are not patched")
    for parent, attr, original, blk in state.swaps:
        setattr(parent, attr, original)
        blk.__dict__.pop("_state", None)
    for h in state.handles:
        h.remove()
    state.handles.clear()
    delattr(model, _ATTR)
    return model


@contextlib.contextmanager
def unswapped(model):
    """Temporarily put the original HF blocks back (export saves the HF form); swaps again afterwards."""
    state = getattr(model, _ATTR, None)
    if not isinstance(state, MoeState):
        yield model
        return
    for parent, attr, original, _ in state.swaps:
        setattr(parent, attr, original)
    try:
        yield model
    finally:
        for parent, attr, _, blk in state.swaps:
            setattr(parent, attr, blk)


def moe_info(model) -> dict:
    """What the MoE patch does now: the policy, the retrieved task (with a store), its key distance, the experts
    routing may pick per MoE layer (original ids; None = all the model holds) and the requests retrieved so far."""
    state = getattr(model, _ATTR, None)
    if not isinstance(state, MoeState):
        raise ValueError("tasksieve.moe_info: the model's MoE blocks are not patched")
    kept = []
    for _, _, _, blk in state.swaps:
        if blk.keep_mask is None:
            kept.append(None)
        elif blk.renorm == "mask_full" or blk.kept_ids is None:
            kept.append(torch.nonzero(blk.keep_mask).flatten().tolist())
        else:
            kept.append(blk.kept_ids[blk.keep_mask].tolist())
    return {
        "policy": repr(state.policy),
        "task": None if state.pattern is None else state.pattern.task,
        "distance": state.distance,
        "allowed_experts": kept,
        "requests": state.requests,
    }
