"""UNCURL expert merging vs PreMoe pruning on a real-weight MoE, per task, at 8 of 16 and 4 of 16 experts.

The MoE is SmolLM2-135M-Instruct MoEfied by ``tasksieve.moefy`` (16 experts, top-8, a standard HF Mixtral), the
tasks and their disjoint calibration / profile / evaluation parts are those of ``bench/premoe_fidelity.py``. One
``ts.premoe.profile`` pass records every task's TCESS and router statistics; then, per expert count M and task:

- ``prune``: PreMoe as published (TCESS k = 1), ``ts.premoe.prune(model, store[task], keep=M)``;
- ``uncurl``: ``ts.premoe.merge(model, store, task=task, keep=M)`` (spectral clusters of router-logit correlation,
  units aligned by weight matching, frequency-weighted average);
- ``merge_noalign``: the same clusters and weights, averaged without aligning hidden units;
- ``merge_random``: random equal-size groups (several seeds), merged the UNCURL way;
- ``uncurl_other``: merged with another task's statistics.

Top-k: M = 8 keeps the router's top-8. At M = 4 no model can route 8 experts; every method uses top-4 (every kept
or merged expert, the most compute a token can get) and, because moefy encodes the dense MLP as
``sum over the top-k of (k * w_i) * expert_i`` with ``k * w_i ~ 1``, every expert's ``down_proj`` is multiplied by
4 / 8 when top-k drops to 4, for every method alike, so a selected expert again contributes its dense share.

Writes ``uncurl.md``, ``uncurl.csv`` and ``uncurl.png`` to ``--out``.

    .venv/bin/python bench/uncurl_fidelity.py --threads 2        # ~10 min on 2 cores (first run builds the MoE)
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from premoe_fidelity import perplexity, split_stream, task_streams  # noqa: E402

from tasksieve import premoe  # noqa: E402
from tasksieve.evaluation import models  # noqa: E402
from tasksieve.integrations.hf import moe as hf_moe  # noqa: E402

TASKS = ("essays", "python", "docs")
METHODS = ("prune", "uncurl", "merge_noalign", "merge_random", "uncurl_other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--keeps", default="15,8,4",
                   help="expert counts after pruning / merging (15: one merge or drop per layer, for the trend)")
    p.add_argument("--calib-tokens", type=int, default=1024, help="MoE-build calibration tokens per task")
    p.add_argument("--profile-tokens", type=int, default=6144, help="profile tokens per task (multiple of seq-len)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="evaluation tokens per task (multiple of seq-len)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--no-rescale", action="store_true",
                   help="do not rescale down_proj by new_k / k when top-k drops (see the module docstring)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "uncurl")
    return p.parse_args(argv)


def rescale_for_top_k(model, old_k: int) -> None:
    """moefy's encoding: expert outputs carry a factor top_k; keep ``k * w ~ 1`` after top-k changes."""
    new_k = hf_moe.moe_convention(model)["top_k"]
    if new_k == old_k:
        return
    with torch.no_grad():
        for site in hf_moe.moe_sites(model):
            site.block.experts.down_proj.mul_(new_k / old_k)


def build(moe, store, method: str, task: str, keep: int, top_k: int, seed: int, rescale: bool):
    model = copy.deepcopy(moe)
    if method == "prune":
        rep = premoe.prune(model, store[task], keep=keep, top_k=top_k)
    elif method == "uncurl":
        rep = premoe.merge(model, store, task=task, keep=keep, top_k=top_k)
    elif method == "merge_noalign":
        rep = premoe.merge(model, store, task=task, keep=keep, top_k=top_k, align=False)
    elif method == "merge_random":
        rep = premoe.merge(model, store, task=task, keep=keep, top_k=top_k, clustering="random", seed=seed)
    else:
        raise AssertionError(method)
    if rescale:
        rescale_for_top_k(model, hf_moe.moe_convention(moe)["top_k"])
    return model, rep


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    keeps = [int(x) for x in args.keeps.split(",")]
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = models.load_default()
    moe, _ = models.load_default_moe(args.num_experts, args.top_k, calib_tokens_per_task=args.calib_tokens,
                                     dense=dense, tokenizer=tokenizer)
    moe.set_experts_implementation("eager")
    streams = task_streams(tokenizer)
    profile_ids, eval_ids = {}, {}
    for t, stream in streams.items():
        profile_ids[t], eval_ids[t] = split_stream(stream, args.calib_tokens, args.profile_tokens,
                                                   args.eval_tokens, args.seq_len)
    t0 = time.time()
    store = premoe.profile(moe, {t: [profile_ids[t]] for t in TASKS}, tokenizer, max_tokens=args.profile_tokens,
                           seq_len=args.seq_len, batch_size=2, progress=True)
    profile_s = time.time() - t0

    rows: list[dict] = []
    bar = tqdm(total=2 * len(TASKS) + len(keeps) * len(TASKS) * (2 * len(TASKS) + 1 + args.random_seeds),
               desc="perplexity", unit="eval")

    def record(method, keep, top_k, stats_task, eval_task, ppl, seed="", merge_s=float("nan"), rep=None):
        rows.append(dict(method=method, keep=keep, top_k=top_k, stats_task=stats_task, eval_task=eval_task,
                         seed=seed, perplexity=ppl, build_s=merge_s,
                         expert_mib=(rep.expert_bytes_after / 2**20) if rep is not None else float("nan")))

    for name, model in (("dense", dense), ("moe_all", moe)):
        for task in TASKS:
            bar.set_postfix_str(f"{name} on {task}")
            record(name, args.num_experts if name == "moe_all" else "", args.top_k if name == "moe_all" else "",
                   "", task, perplexity(model, eval_ids[task]))
            bar.update(1)
    groups_seen = {}
    for keep in keeps:
        top_k = min(args.top_k, keep)
        for stats_task in TASKS:
            jobs = [("prune", 0), ("uncurl", 0), ("merge_noalign", 0)]
            jobs += [("merge_random", s) for s in range(args.random_seeds)]
            for method, seed in jobs:
                t1 = time.time()
                model, rep = build(moe, store, method, stats_task, keep, top_k, seed, not args.no_rescale)
                build_s = time.time() - t1
                if method == "uncurl":
                    groups_seen[(keep, stats_task)] = rep.groups
                for eval_task in TASKS:
                    m = method
                    if eval_task != stats_task:
                        if method == "uncurl":
                            m = "uncurl_other"
                        elif method == "prune":
                            m = "prune_other"
                        else:
                            continue  # the baselines are compared on their own task only
                    bar.set_postfix_str(f"{method} {keep}/{args.num_experts} {stats_task} on {eval_task}")
                    ppl = perplexity(model, eval_ids[eval_task])
                    record(m, keep, top_k, stats_task, eval_task, ppl, seed if method == "merge_random" else "",
                           build_s, rep)
                    bar.update(1)
                del model
    bar.close()
    runtime = time.time() - t_start

    with open(args.out / "uncurl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    table = summarise(rows, keeps, args)
    write_markdown(args, table, keeps, groups_seen, profile_s, runtime, store)
    write_plot(args, table, keeps)
    print((args.out / "uncurl.md").read_text())
    return 0


def _get(rows, method, keep, eval_task, stats_task=None):
    return [r["perplexity"] for r in rows if r["method"] == method and r["keep"] == keep and
            r["eval_task"] == eval_task and (stats_task is None or r["stats_task"] == stats_task)]


def summarise(rows, keeps, args) -> dict:
    out = {}
    for task in TASKS:
        out[("dense", task)] = _get(rows, "dense", "", task)[0]
        out[("moe_all", task)] = _get(rows, "moe_all", args.num_experts, task)[0]
        for keep in keeps:
            out[("prune", keep, task)] = _get(rows, "prune", keep, task, task)[0]
            out[("uncurl", keep, task)] = _get(rows, "uncurl", keep, task, task)[0]
            out[("merge_noalign", keep, task)] = _get(rows, "merge_noalign", keep, task, task)[0]
            rnd = _get(rows, "merge_random", keep, task, task)
            out[("merge_random", keep, task)] = (statistics.fmean(rnd), min(rnd), max(rnd))
            others = {r["stats_task"]: r["perplexity"] for r in rows if r["method"] == "uncurl_other" and
                      r["keep"] == keep and r["eval_task"] == task}
            out[("uncurl_other", keep, task)] = others
    return out


def _versions() -> str:
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def write_markdown(args, t, keeps, groups_seen, profile_s, runtime, store) -> None:
    E, k = args.num_experts, args.top_k
    lines = [
        "# UNCURL expert merging vs PreMoe pruning (MoEfied SmolLM2-135M, 16 experts, top-8)",
        "",
        "Perplexity on "
        f"{args.eval_tokens} held-out tokens per task ({args.eval_tokens // args.seq_len} sequences of "
        f"{args.seq_len}); lower is better. Statistics and TCESS from one `ts.premoe.profile` pass over "
        f"{args.profile_tokens} tokens per task. Random merge: {args.random_seeds} seeds, mean [min, max]. "
        "`other task's stats`: the UNCURL merge built from each other task's statistics, evaluated on this task.",
        "",
        f"Top-k: at 8/{E} the router's top-{k}; at 4/{E} top-4 for every method (all kept / merged experts; a "
        "model with 4 experts cannot route 8). moefy stores each expert multiplied by the top-k (its router "
        "weights are ~1/k), so when top-k drops to 4 every expert's `down_proj` is multiplied by 4/8 for every "
        "method alike" + (" (disabled in this run: `--no-rescale`)" if args.no_rescale else "") + ".",
        "",
    ]
    for keep in keeps:
        top_k = min(k, keep)
        lines += [f"## {keep} of {E} experts (top-{top_k})", "",
                  "| eval task | dense | MoE all 16 | PreMoe prune (TCESS) | **UNCURL merge** | merge, no alignment |"
                  " random merge | UNCURL, other task's stats | UNCURL < prune |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for task in TASKS:
            mean, lo, hi = t[("merge_random", keep, task)]
            others = t[("uncurl_other", keep, task)]
            u, p = t[("uncurl", keep, task)], t[("prune", keep, task)]
            lines.append(
                f"| {task} | {t[('dense', task)]:.2f} | {t[('moe_all', task)]:.2f} | {p:.2f} | **{u:.2f}** | "
                f"{t[('merge_noalign', keep, task)]:.2f} | {mean:.2f} [{lo:.2f}, {hi:.2f}] | "
                + ", ".join(f"{o} {v:.2f}" for o, v in others.items())
                + f" | {'yes' if u < p else '**no**'} |")
        lines.append("")
    at4 = [t[("uncurl", 4, task)] < t[("prune", 4, task)] for task in TASKS] if 4 in keeps else []
    if at4:
        lines += [f"Target (UNCURL merge beats PreMoe pruning at 4 of {E} on every task): "
                  f"**{'met' if all(at4) else 'NOT met'}** ({sum(at4)}/{len(at4)} tasks).", ""]
    lines += ["## Groups (UNCURL, first three MoE layers, own task's statistics)", ""]
    for (keep, task), groups in sorted(groups_seen.items(), key=lambda x: (-x[0][0], x[0][1])):
        sizes = sorted(len(g) for layer in groups for g in layer)
        lines.append(f"- {keep}/{E}, {task}: group sizes {sizes[0]}-{sizes[-1]} (median "
                     f"{statistics.median(sizes):g}); " + "; ".join(str(g) for g in groups[:3]))
    lines += [
        "",
        "## Provenance",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; profile {profile_s:.0f} s; "
        f"total run time {runtime:.0f} s.",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}, no GPU; {_versions()}; fp32.",
        "- Command: `.venv/bin/python bench/uncurl_fidelity.py " + " ".join(sys.argv[1:]) + "`",
    ]
    (args.out / "uncurl.md").write_text("\n".join(lines) + "\n")


def write_plot(args, t, keeps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [("prune", "PreMoe prune (TCESS)"), ("uncurl", "UNCURL merge"), ("merge_noalign", "merge, no alignment"),
             ("merge_random", "random merge (mean, min-max)"), ("uncurl_other", "UNCURL, best other task's stats")]
    fig, axes = plt.subplots(1, len(keeps), figsize=(6 * len(keeps), 4.5), squeeze=False)
    width = 0.15
    for ax, keep in zip(axes[0], keeps):
        for j, (key, label) in enumerate(conds):
            ys, errs = [], [[], []]
            for task in TASKS:
                v = t[(key, keep, task)]
                if key == "merge_random":
                    mean, lo, hi = v
                    ys.append(mean)
                    errs[0].append(mean - lo)
                    errs[1].append(hi - mean)
                else:
                    y = min(v.values()) if key == "uncurl_other" else v
                    ys.append(y)
                    errs[0].append(0)
                    errs[1].append(0)
            xs = [i + (j - 2) * width for i in range(len(TASKS))]
            ax.bar(xs, ys, width, label=label, yerr=errs if key == "merge_random" else None)
        for i, task in enumerate(TASKS):
            ax.hlines(t[("moe_all", task)], i - 0.4, i + 0.4, colors="k", linestyles="--",
                      label="MoE all 16" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(TASKS)), TASKS)
        ax.set_title(f"{keep} of {args.num_experts} experts (top-{min(args.top_k, keep)})")
        ax.set_ylabel("perplexity (log)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("UNCURL merge vs PreMoe prune, MoEfied SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(args.out / "uncurl.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
