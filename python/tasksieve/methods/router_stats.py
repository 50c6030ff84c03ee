"""Router statistics of one task over its calibration tokens: what UNCURL clusters experts by.

Accumulated on the model's device by ``ops.router_stats_update`` (fp64 sums, no host round trip per batch) and
stored beside the TCESS patterns of a :class:`~tasksieve.methods.premoe.PatternStore`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops

__all__ = ["RouterStats"]

_FIELDS = ("counts", "logit_sum", "logit_gram", "coselect")


@dataclass
class RouterStats:
    """Sums over a task's calibration tokens, per MoE layer (L layers, E original experts), all float64.

    Attributes
    ----------
    tokens : int
        Tokens accumulated (every layer sees the same tokens).
    counts : Tensor [L, E]
        How often each expert was among the router's top-k.
    logit_sum : Tensor [L, E]
        Sum of each expert's raw router logit over all tokens.
    logit_gram : Tensor [L, E, E]
        Sum over tokens of z_i * z_j: with ``logit_sum`` it gives the covariance of the router-logit columns.
    coselect : Tensor [L, E, E]
        How often experts i and j were selected for the same token (diagonal = ``counts``).
    """

    tokens: int
    counts: torch.Tensor
    logit_sum: torch.Tensor
    logit_gram: torch.Tensor
    coselect: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, device=None) -> "RouterStats":
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        e = num_experts
        return cls(0, z(num_layers, e), z(num_layers, e), z(num_layers, e, e), z(num_layers, e, e))

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    def update(self, layer: int, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Add one batch of layer ``layer``: ``router_logits [T, E]``, the router's selection ``topk_ids [T, k]``.

        The token count is advanced by :meth:`add_tokens` (once per batch, not per layer).
        """
        ops.router_stats_update(router_logits, topk_ids, self.counts[layer], self.logit_sum[layer],
                                self.logit_gram[layer], self.coselect[layer])

    def add_tokens(self, n: int) -> None:
        self.tokens += int(n)

    def to(self, device) -> "RouterStats":
        return RouterStats(self.tokens, *(getattr(self, f).to(device) for f in _FIELDS))

    def validate(self, num_layers: int, num_experts: int, what: str = "stats") -> None:
        """Raise ValueError naming ``what`` unless every field has the shapes of an (L, E) model."""
        shapes = {"counts": (num_layers, num_experts), "logit_sum": (num_layers, num_experts),
                  "logit_gram": (num_layers, num_experts, num_experts),
                  "coselect": (num_layers, num_experts, num_experts)}
        for name, shape in shapes.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{what}.{name}: expected shape {shape} (MoE layers, experts), got {got}")
        if not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"{what}.tokens: expected an int >= 0, got {self.tokens!r}")

    # -- derived quantities -------------------------------------------------------------------------------------
    def frequency(self, layer: int) -> torch.Tensor:
        """Share of tokens that selected each expert at ``layer``, ``[E]`` float64 (zeros before any token)."""
        return self.counts[layer] / max(self.tokens, 1)

    def logit_correlation(self, layer: int) -> torch.Tensor:
        """Pearson correlation of the experts' router-logit columns over the tokens, ``[E, E]`` float64.

        A column with no variance (or no tokens) correlates 0 with every other and 1 with itself.
        """
        n = max(self.tokens, 1)
        mean = self.logit_sum[layer] / n
        cov = self.logit_gram[layer] / n - mean[:, None] * mean[None, :]
        var = cov.diagonal().clamp(min=0)
        std = var.sqrt()
        ok = std > 1e-12 * max(float(std.max()) if std.numel() else 0.0, 1e-300)
        denom = std[:, None] * std[None, :]
        corr = torch.where(ok[:, None] & ok[None, :], cov / denom.clamp(min=1e-300), torch.zeros_like(cov))
        corr = corr.clamp(-1.0, 1.0)
        corr.fill_diagonal_(1.0)
        return corr

    def coselection_similarity(self, layer: int) -> torch.Tensor:
        """Co-selection normalised by the experts' counts, ``C_ij / sqrt(c_i c_j)`` in [0, 1], ``[E, E]``."""
        c = self.counts[layer].clamp(min=1)
        sim = self.coselect[layer] / (c[:, None] * c[None, :]).sqrt()
        sim = sim.clamp(0.0, 1.0)
        sim.fill_diagonal_(1.0)
        return sim

    # -- persistence (used by the pattern store) ----------------------------------------------------------------
    def tensors(self, prefix: str) -> dict:
        return {f"{prefix}.{f}": getattr(self, f).detach().cpu().contiguous() for f in _FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str, tokens: int) -> "RouterStats":
        return cls(int(tokens), *(tensors[f"{prefix}.{f}"].to(torch.float64) for f in _FIELDS))
