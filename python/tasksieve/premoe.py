"""``ts.premoe``: PreMoe in one namespace, for users (see :mod:`tasksieve.integrations.hf.premoe` for the HF model
operations and :mod:`tasksieve.methods.premoe` for the tensor-level parts).

    store = ts.premoe.profile(model, {"math": math_texts, "code": code_texts}, tokenizer)
    pattern = store.retrieve("Solve 3x + 5 = 11.")
    ts.premoe.prune(model, pattern, keep=0.5)
    ts.premoe.export(model, "pruned/", tokenizer)           # vllm serve pruned/  (ts.premoe.check_vllm("pruned/"))

    ts.premoe.merge(model, store, task="math", keep=8)     # UNCURL: merge experts instead of dropping them
"""

from .integrations.hf.premoe import (
    Pattern,
    PatternStore,
    PreMoe,
    PruneReport,
    check_fits,
    check_vllm,
    export,
    probe_key,
    profile,
    prune,
    retrieval_key,
)
from .integrations.hf.uncurl import MergeReport, is_merged, merge
from .methods.premoe import check_keep, keep_counts
from .methods.router_stats import RouterStats

__all__ = ["PreMoe", "Pattern", "PatternStore", "PruneReport", "profile", "prune", "export", "retrieval_key",
           "probe_key", "check_fits", "check_vllm", "check_keep", "keep_counts", "merge", "MergeReport", "is_merged", "RouterStats"]
