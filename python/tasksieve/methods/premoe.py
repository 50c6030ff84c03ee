"""PreMoe's tensor-level parts (arXiv 2505.17639): TCESS over router logits, task patterns, their store with
nearest-task lookup, keep sets, and the :class:`PreMoe` routing settings. No model here: probing, profiling,
pruning and export of HF models are in :mod:`tasksieve.integrations.hf.premoe`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import ops
from .router_stats import RouterStats

__all__ = [
    "PreMoe",
    "Pattern",
    "PatternStore",
    "retrieval_key",
    "check_keep",
    "keep_counts",
    "check_fingerprint",
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
    stats : RouterStats or None
        The task's router statistics (what UNCURL's merge clusters by); None for stores profiled before they
        existed.
    """

    task: str
    tcess: torch.Tensor
    fingerprint: dict
    distance: Optional[float] = None
    stats: Optional[RouterStats] = None

    @property
    def num_layers(self) -> int:
        return int(self.tcess.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.tcess.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.fingerprint["top_k"])

    def keep_counts(self, keep=0.5, top_k: Optional[int] = None) -> list[int]:
        """M per MoE layer for ``keep`` (see :meth:`keep_sets`)."""
        return keep_counts(keep, self.num_layers, self.num_experts, self.top_k if top_k is None else top_k)

    def keep_sets(self, keep=0.5, top_k: Optional[int] = None) -> list[torch.Tensor]:
        """Per MoE layer, the kept expert ids (LongTensor, ascending): that layer's own top-M by TCESS.

        ``keep``: ratio in (0, 1] (M = ceil(ratio * E)), an int M, or one of those per MoE layer (non-uniform M).
        ``top_k``: experts per token the pruned model will route (default: the router's).
        Raises ValueError naming ``keep`` when M < top_k, M > E or the ratio is outside (0, 1].
        """
        counts = self.keep_counts(keep, top_k)
        out = []
        for l, m in enumerate(counts):
            order = torch.argsort(self.tcess[l], descending=True, stable=True)
            out.append(torch.sort(order[:m]).values)
        return out


def check_fingerprint(stored: dict, actual: dict, what: str) -> None:
    """Raise ValueError naming ``what`` unless the model fingerprint ``actual`` is the profiled one ``stored``."""
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

    This class holds no model: :class:`tasksieve.integrations.hf.premoe.PatternStore` (``ts.premoe.PatternStore``)
    adds the HF side (binding a model, ``retrieve(prompt)``, ``profile``).
    """

    def __init__(self, fingerprint: dict, tasks: Optional[dict] = None, tokens: Optional[dict] = None):
        self.fingerprint = dict(fingerprint)
        self.fingerprint.setdefault("tcess_top_k", 1)
        self.fingerprint.setdefault("tcess_r", -1.0)
        self._tasks: dict[str, torch.Tensor] = {}
        self._stats: dict[str, RouterStats] = {}
        self.tokens: dict[str, int] = dict(tokens or {})
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

    def add(self, task: str, tcess: torch.Tensor, tokens: Optional[int] = None,
            stats: Optional[RouterStats] = None) -> None:
        """Add or replace a task's TCESS ``[n_moe_layers, E]`` (and its router statistics, when given)."""
        shape = (len(self.fingerprint["moe_layers"]), int(self.fingerprint["num_experts"]))
        if not isinstance(tcess, torch.Tensor) or tuple(tcess.shape) != shape:
            got = tuple(tcess.shape) if isinstance(tcess, torch.Tensor) else type(tcess).__name__
            raise ValueError(f"tcess[{task!r}]: expected a tensor of shape {shape} (MoE layers, experts), got {got}")
        if stats is not None:
            if not isinstance(stats, RouterStats):
                raise ValueError(f"stats[{task!r}]: expected a RouterStats, got {type(stats).__name__}")
            stats.validate(*shape, what=f"stats[{task!r}]")
            self._stats[task] = stats.to("cpu")
        else:
            self._stats.pop(task, None)
        self._tasks[task] = tcess.detach().float().cpu().contiguous()
        if tokens is not None:
            self.tokens[task] = int(tokens)

    def has_stats(self, task: str) -> bool:
        """True when the store holds router statistics for ``task`` (stores profiled by this version do)."""
        return task in self._stats

    def __getitem__(self, task: str) -> Pattern:
        if task not in self._tasks:
            raise KeyError(f"task {task!r} is not in the store (tasks: {self.tasks})")
        return Pattern(task, self._tasks[task], dict(self.fingerprint), stats=self._stats.get(task))

    def keys(self) -> torch.Tensor:
        """Retrieval keys ``[n_tasks, E]``: the first-MoE-layer TCESS of every task."""
        if not self._tasks:
            raise ValueError("PatternStore: the store is empty")
        return torch.stack([t[0] for t in self._tasks.values()])


    def check_fingerprint(self, fp: dict, what: str) -> None:
        """Raise ValueError naming ``what`` unless ``fp`` describes the model the store was profiled on."""
        check_fingerprint(self.fingerprint, fp, what)

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

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the store as one safetensors file (metadata in its header)."""
        from safetensors.torch import save_file

        if not self._tasks:
            raise ValueError("PatternStore.save: the store is empty")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"tcess.{i}": t for i, t in enumerate(self._tasks.values())}
        stats_tokens = {}
        for i, name in enumerate(self.tasks):
            if name in self._stats:
                tensors.update(self._stats[name].tensors(f"stats.{i}"))
                stats_tokens[name] = self._stats[name].tokens
        meta = {"format": _FORMAT, "tasks": json.dumps(self.tasks), "tokens": json.dumps(self.tokens),
                "fingerprint": json.dumps(self.fingerprint), "stats_tokens": json.dumps(stats_tokens)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PatternStore":
        """Read a store written by :meth:`save`."""
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
            stats_tokens = json.loads(meta.get("stats_tokens", "{}"))
            stored = set(f.keys())
            stats = {name: RouterStats.from_tensors({k: f.get_tensor(k) for k in stored
                                                     if k.startswith(f"stats.{i}.")}, f"stats.{i}",
                                                    stats_tokens[name])
                     for i, name in enumerate(names) if name in stats_tokens}
        store = cls(json.loads(meta["fingerprint"]), tasks, json.loads(meta.get("tokens", "{}")))
        for name, st in stats.items():
            store.add(name, store._tasks[name], stats=st)
        return store


@dataclass
class PreMoe:
    """PreMoe routing for ``tasksieve.patch(model, moe=PreMoe(...))`` (a validated dataclass; no run-time state).

    Every MoE block is swapped for a block that routes with ``ops.route_topk`` and computes the experts with
    ``ops.moe_forward`` (see :mod:`tasksieve.integrations.hf.moe`). Pruning here is by masking (weights stay resident, fully
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
