"""Router conventions of the HuggingFace MoE families tasksieve supports (transformers v5 layout).

``ROUTER_CONVENTIONS`` maps a config's ``model_type`` to how that family routes and where its parts live, so the
PreMoe layer can reproduce the HF router with ``tasksieve.ops.route_topk`` and find the modules to swap or prune
without per-family code. ``tests/test_moe_route.py`` pins every entry against the HF router modules themselves.

Fields of each entry
--------------------
``scoring``
    The ``route_topk`` scoring that reproduces the router: ``"softmax"`` (softmax over the experts, then top-k),
    ``"sigmoid"`` or ``"topk_softmax"`` (top-k on the raw logits, then softmax over the k).
``renormalize``
    Whether the k selected weights are divided by their sum when the config does not say otherwise.
``renormalize_attr``
    Name of the config attribute that overrides ``renormalize`` (``"norm_topk_prob"``), or ``None`` when the
    family always does the same thing (Mixtral always renormalises).
``weights_in_logits_dtype``
    True when HF casts the routing weights back to the router logits' dtype (bf16 models get bf16 weights);
    Mixtral keeps them fp32. Matters only for bit-level parity with HF.
``num_experts_attr`` / ``top_k_attr``
    Config attributes holding the routed expert count and the experts per token.
``moe_block_class``
    Class name of the sparse MoE block (the module a MoE swap replaces).
``block_attr``
    Attribute of a decoder layer holding the MoE block. Families with ``mlp_only_layers`` /
    ``decoder_sparse_step`` (Qwen) put a dense MLP there on some layers: check the class, not the attribute.
``router_attr``
    Attribute of the MoE block holding the router: ``weight [E, H]`` (no bias), ``top_k``, ``num_experts``;
    its forward returns ``(router_logits [T, E], topk_weights [T, k], topk_ids [T, k])``.
``experts_attr``
    Attribute of the MoE block holding the routed experts: ``gate_up_proj [E, 2I, H]`` (gate rows first),
    ``down_proj [E, H, I]``, ``act_fn``.
``shared_expert_attr`` / ``shared_expert_gate_attr``
    Attributes of the always-on shared expert (an MLP, never pruned) and of its scalar gate
    (``Linear(H, 1)``; output = ``sigmoid(gate(x)) * shared_expert(x)``), or ``None`` when the family has none.

Pruning note: when ``renormalize`` resolves to False (OLMoE, Qwen2-MoE, Qwen3-MoE with ``norm_topk_prob=False``),
dropping pruned router rows changes the softmax denominator; ``route_topk(..., mask_full=True)`` keeps the
unpruned model's probabilities instead. With renormalisation both choices give the same weights.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROUTER_CONVENTIONS", "router_convention"]

_SOFTMAX_TOPK_ROUTER = dict(
    scoring="softmax",
    num_experts_attr="num_experts",
    top_k_attr="num_experts_per_tok",
    block_attr="mlp",
    router_attr="gate",
    experts_attr="experts",
)

ROUTER_CONVENTIONS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        _SOFTMAX_TOPK_ROUTER,
        renormalize=True,
        renormalize_attr=None,
        weights_in_logits_dtype=False,
        num_experts_attr="num_local_experts",
        moe_block_class="MixtralSparseMoeBlock",
        shared_expert_attr=None,
        shared_expert_gate_attr=None,
    ),
    "qwen2_moe": dict(
        _SOFTMAX_TOPK_ROUTER,
        renormalize=False,
        renormalize_attr="norm_topk_prob",
        weights_in_logits_dtype=True,
        moe_block_class="Qwen2MoeSparseMoeBlock",
        shared_expert_attr="shared_expert",
        shared_expert_gate_attr="shared_expert_gate",
    ),
    "qwen3_moe": dict(
        _SOFTMAX_TOPK_ROUTER,
        renormalize=False,
        renormalize_attr="norm_topk_prob",
        weights_in_logits_dtype=True,
        moe_block_class="Qwen3MoeSparseMoeBlock",
        shared_expert_attr=None,
        shared_expert_gate_attr=None,
    ),
    "olmoe": dict(
        _SOFTMAX_TOPK_ROUTER,
        renormalize=False,
        renormalize_attr="norm_topk_prob",
        weights_in_logits_dtype=True,
        moe_block_class="OlmoeSparseMoeBlock",
        shared_expert_attr=None,
        shared_expert_gate_attr=None,
    ),
}


def router_convention(config: Any) -> dict[str, Any]:
    """The convention of ``config.model_type`` with the config's own values resolved.

    Returns a copy of the ``ROUTER_CONVENTIONS`` entry where ``renormalize`` already reflects
    ``renormalize_attr`` (when the config has it), plus ``num_experts`` and ``top_k`` read from the config.
    Raises ``ValueError`` naming the model type when the family is not supported.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTER_CONVENTIONS:
        raise ValueError(
            f"config.model_type: expected one of {sorted(ROUTER_CONVENTIONS)}, got {model_type!r}"
        )
    convention = dict(ROUTER_CONVENTIONS[model_type])
    attr = convention["renormalize_attr"]
    if attr is not None and getattr(config, attr, None) is not None:
        convention["renormalize"] = bool(getattr(config, attr))
    convention["num_experts"] = int(getattr(config, convention["num_experts_attr"]))
    convention["top_k"] = int(getattr(config, convention["top_k_attr"]))
    return convention
