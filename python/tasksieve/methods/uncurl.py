"""UNCURL's tensor-level parts (arXiv 2409.01483): group the experts of a MoE layer by how their router logits move
together on a task, and merge every group into one expert. No model here: the HF side (statistics collection,
rewriting the blocks, export) is :mod:`tasksieve.integrations.hf.uncurl`.

The choices (docs/design.md, "UNCURL"), and why
------------------------------------------------
Affinity (``affinity="logits"``, default): ``A_ij = (1 + rho_ij) / 2`` with ``rho`` the Pearson correlation of
expert i's and expert j's raw router logits over the task's calibration tokens (from the fp64 sums of
``ops.router_stats_update``). Experts whose logits rise and fall together are chosen for the same tokens, so they
can stand in for each other: merging them changes the routing least. UNCURL clusters by router-logit similarity;
MC-SMoE ("merge, then compress") measures expert similarity by router logits too and found it the most reliable of
its candidates. Centering (correlation rather than raw cosine) removes the per-expert offset that only says how
popular an expert is. ``affinity="coselect"`` (co-selection counts ``C_ij / sqrt(c_i c_j)``) is kept as an ablation:
experts chosen *together* are complements, not substitutes, so it is the wrong signal for merging.

Clustering: normalised spectral clustering (Ng-Jordan-Weiss): the ``keep`` leading eigenvectors of
``D^-1/2 A D^-1/2``, rows normalised, k-means (k-means++ seeding, several restarts, fixed seed). Groups may have
different sizes, as in UNCURL; every group is non-empty.

Merge: inside a group the most often selected expert is the anchor; every other member's hidden units are permuted
to the anchor's by weight matching (a linear assignment maximising the inner product of the units' gate row, up row
and down column; a SwiGLU expert computes the same function under any consistent permutation of its units), then
the aligned weights are averaged with weights proportional to how often each member was selected (``counts``). The
router row of the merged expert is the same weighted mean of its members' rows: the merged logit then tracks the
logits of the members that are actually chosen, which dominate the group's log-sum-exp, so the merged expert is
selected where its members were.

Measured (bench/results/uncurl/): on the MoEfied SmolLM2, whose experts are disjoint neuron slices of one dense MLP
that add up, correlated router logits mark slices that fire together (complements, not substitutes), and merging
them costs far more than PreMoe pruning. The premise needs experts with shared structure (trained or upcycled MoEs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .router_stats import RouterStats

__all__ = [
    "affinity_matrix",
    "spectral_clusters",
    "random_clusters",
    "groups_of",
    "align_units",
    "merge_experts",
    "MergePlan",
    "plan_merge",
    "AFFINITIES",
    "CLUSTERINGS",
    "WEIGHTINGS",
]

AFFINITIES = ("logits", "coselect")
CLUSTERINGS = ("spectral", "random")
WEIGHTINGS = ("frequency", "uniform")


def affinity_matrix(stats: RouterStats, layer: int, kind: str = "logits") -> torch.Tensor:
    """Non-negative symmetric expert affinity ``[E, E]`` float64 of ``layer`` (see the module docstring)."""
    if kind == "logits":
        return (1.0 + stats.logit_correlation(layer)) / 2.0
    if kind == "coselect":
        return stats.coselection_similarity(layer)
    raise ValueError(f"affinity must be one of {AFFINITIES}, got {kind!r}")


def _kmeans(points: torch.Tensor, k: int, gen: torch.Generator, n_init: int, iters: int = 100):
    n = points.shape[0]
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        # k-means++ seeding
        first = int(torch.randint(n, (1,), generator=gen))
        centers = [points[first]]
        for _ in range(1, k):
            d2 = torch.cdist(points, torch.stack(centers)).min(dim=1).values ** 2
            if float(d2.sum()) <= 0:
                idx = int(torch.randint(n, (1,), generator=gen))
            else:
                idx = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
            centers.append(points[idx])
        c = torch.stack(centers)
        labels = None
        for _ in range(iters):
            new = torch.cdist(points, c).argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sizes = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, labels, points)
            c = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None].to(points.dtype), c)
            for j in (sizes == 0).nonzero().flatten().tolist():  # an empty cluster takes the farthest point
                far = int((points - c[labels]).norm(dim=1).argmax())
                c[j] = points[far]
                labels[far] = j
        inertia = float(((points - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.clone(), inertia
    return best


def _canonical(labels: torch.Tensor, k: int, points: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exactly k non-empty clusters, numbered in the order of their smallest member."""
    labels = labels.clone()
    while len(torch.unique(labels)) < k:
        # split the largest cluster: its member farthest from the cluster mean starts a new one
        vals, cnts = torch.unique(labels, return_counts=True)
        big = int(vals[cnts.argmax()])
        idx = (labels == big).nonzero().flatten()
        if points is not None:
            centre = points[idx].mean(dim=0)
            far = int(idx[(points[idx] - centre).norm(dim=1).argmax()])
        else:
            far = int(idx[-1])
        free = next(j for j in range(k) if j not in set(vals.tolist()))
        labels[far] = free
    order, seen = {}, 0
    for lab in labels.tolist():
        if lab not in order:
            order[lab] = seen
            seen += 1
    return torch.tensor([order[lab] for lab in labels.tolist()], dtype=torch.long)


def spectral_clusters(affinity: torch.Tensor, n_clusters: int, seed: int = 0, n_init: int = 10) -> torch.Tensor:
    """Normalised spectral clustering of ``affinity [E, E]`` (symmetric, >= 0) into ``n_clusters`` non-empty groups.

    Returns labels ``[E]`` (LongTensor), clusters numbered in the order of their smallest expert id. Deterministic for
    a given ``seed``.
    """
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity: expected a square matrix [E, E], got {tuple(affinity.shape)}")
    e = affinity.shape[0]
    if not 1 <= n_clusters <= e:
        raise ValueError(f"n_clusters must be in [1, {e}], got {n_clusters}")
    if n_clusters == e:
        return torch.arange(e)
    if n_clusters == 1:
        return torch.zeros(e, dtype=torch.long)
    a = affinity.detach().to(torch.float64).cpu().clone()
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("affinity: expected finite, non-negative entries")
    a = (a + a.T) / 2
    a.fill_diagonal_(0.0)
    deg = a.sum(dim=1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    m = inv[:, None] * a * inv[None, :]
    _, vecs = torch.linalg.eigh(m)
    u = vecs[:, -n_clusters:]
    y = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    gen = torch.Generator().manual_seed(int(seed))
    labels = _kmeans(y, n_clusters, gen, n_init)
    return _canonical(labels, n_clusters, y)


def random_clusters(num_experts: int, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """A random partition into ``n_clusters`` groups of (near) equal size; labels as :func:`spectral_clusters`."""
    if not 1 <= n_clusters <= num_experts:
        raise ValueError(f"n_clusters must be in [1, {num_experts}], got {n_clusters}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_experts, generator=gen)
    labels = torch.empty(num_experts, dtype=torch.long)
    labels[perm] = torch.arange(num_experts) % n_clusters
    return _canonical(labels, n_clusters)


def groups_of(labels: torch.Tensor) -> list[torch.Tensor]:
    """Labels ``[E]`` -> the expert ids of every cluster (ascending), clusters in label order."""
    return [(labels == j).nonzero().flatten() for j in range(int(labels.max()) + 1)]


def _unit_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    inter = down.shape[1]
    return torch.cat([gate_up[:inter], gate_up[inter:], down.T], dim=1).to(torch.float64)


def align_units(anchor_gate_up: torch.Tensor, anchor_down: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm [I]`` of an expert's hidden units that best matches the anchor's: unit ``perm[u]`` of the
    expert goes to position u. Weight matching: maximise sum_u <f_anchor(u), f(perm[u])> over permutations, with
    f(u) = (gate row u, up row u, down column u). Shapes: ``gate_up [2I, H]``, ``down [H, I]``."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is a dependency of the hf extra
        raise ImportError("UNCURL's unit alignment needs scipy (pip install scipy), or align=False") from e
    fa = _unit_features(anchor_gate_up, anchor_down)
    fm = _unit_features(gate_up, down)
    score = (fa @ fm.T).cpu().numpy()
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def merge_experts(gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, anchor: int = 0,
                  align: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge n experts into one: ``gate_up [n, 2I, H]``, ``down [n, H, I]``, ``weights [n]`` (>= 0, not all 0)
    -> ``(gate_up [2I, H], down [H, I])`` in the input dtype; the average is computed in fp32 or wider."""
    n, two_i, _ = gate_up.shape
    inter = two_i // 2
    w = weights.detach().to(torch.float64).cpu()
    if w.shape != (n,) or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"weights: expected {n} non-negative merge weights, not all zero, got {weights.tolist()}")
    w = w / w.sum()
    acc_dtype = torch.float64 if gate_up.dtype == torch.float64 else torch.float32
    gu_acc = torch.zeros(gate_up.shape[1:], dtype=acc_dtype, device=gate_up.device)
    dn_acc = torch.zeros(down.shape[1:], dtype=acc_dtype, device=down.device)
    for m in range(n):
        gu, dn = gate_up[m], down[m]
        if align and m != anchor and n > 1:
            perm = align_units(gate_up[anchor], down[anchor], gu, dn).to(gu.device)
            gu = torch.cat([gu[:inter][perm], gu[inter:][perm]], dim=0)
            dn = dn[:, perm]
        gu_acc += float(w[m]) * gu.to(acc_dtype)
        dn_acc += float(w[m]) * dn.to(acc_dtype)
    return gu_acc.to(gate_up.dtype), dn_acc.to(down.dtype)


@dataclass
class MergePlan:
    """Which original experts become which merged expert, per MoE layer, and with what weights.

    ``groups[l][j]``: original expert ids (ascending) merged into expert j of layer l; ``weights[l][j]``: their
    merge weights (same order, sum 1); ``anchors[l][j]``: the member the others are aligned to.
    """

    groups: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    anchors: list = field(default_factory=list)
    affinity: str = "logits"
    clustering: str = "spectral"
    weighting: str = "frequency"

    @property
    def num_experts_after(self) -> list[int]:
        return [len(g) for g in self.groups]

    def as_lists(self) -> list[list[list[int]]]:
        return [[g.tolist() for g in layer] for layer in self.groups]


def plan_merge(stats: RouterStats, keep_counts: list[int], *, affinity: str = "logits",
               clustering: str = "spectral", weighting: str = "frequency", seed: int = 0) -> MergePlan:
    """Cluster every layer's experts into ``keep_counts[l]`` groups and fix the merge weights (no weights touched).

    ``clustering="random"`` ignores the statistics for grouping (a baseline); ``weighting="uniform"`` averages the
    members equally. A group whose members were never selected is averaged uniformly.
    """
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {clustering!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if len(keep_counts) != stats.num_layers:
        raise ValueError(f"keep_counts: expected one count per MoE layer ({stats.num_layers}), got {len(keep_counts)}")
    plan = MergePlan(affinity=affinity, clustering=clustering, weighting=weighting)
    for layer, k in enumerate(keep_counts):
        if clustering == "spectral":
            labels = spectral_clusters(affinity_matrix(stats, layer, affinity), k, seed=seed)
        else:
            labels = random_clusters(stats.num_experts, k, seed=seed + 7919 * layer)
        groups = groups_of(labels)
        counts = stats.counts[layer].detach().cpu().to(torch.float64)
        ws, anchors = [], []
        for g in groups:
            c = counts[g]
            w = c / c.sum() if weighting == "frequency" and float(c.sum()) > 0 else torch.full((len(g),), 1.0 / len(g),
                                                                                               dtype=torch.float64)
            ws.append(w)
            anchors.append(int(torch.argmax(c)))  # first of the most selected (stable)
        plan.groups.append(groups)
        plan.weights.append(ws)
        plan.anchors.append(anchors)
    return plan
