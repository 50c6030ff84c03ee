"""Choose (E, top-k) for the MoEfied SmolLM2: dense vs MoE perplexity, least-squares router vs oracle router.

For each number of experts E the neurons are clustered and the router fitted once (``moefy.split_layers``, one
shared calibration forward); each top-k then only re-assembles the Mixtral. The *oracle* router picks, per token,
the k experts with the largest true output norm (what the least-squares router is trained to predict), so the gap
LS vs oracle is the router's cost and oracle vs dense is the clustering's / top-k's cost.
Evaluation: held-out essay tokens (after the calibration and profile parts used by ``premoe_fidelity.py``).

    .venv/bin/python bench/moefy_sweep.py           # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from tasksieve.evaluation import models, moefy as mf  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from premoe_fidelity import perplexity, task_streams  # noqa: E402


def oracle_route(moe) -> None:
    """Replace every router's forward by the true top-k experts by output norm (weights 1/k, as the LS router)."""
    for layer in moe.model.layers:
        block = layer.mlp
        experts, k = block.experts, block.gate.top_k

        def forward(self, hidden, experts=experts, k=k):
            h = hidden.reshape(-1, hidden.shape[-1])
            gate, up = torch.einsum("th,eoh->teo", h, experts.gate_up_proj).chunk(2, dim=-1)
            out = torch.einsum("tei,ehi->teh", F.silu(gate) * up, experts.down_proj)
            norms = out.norm(dim=-1)
            idx = torch.topk(norms, k, dim=-1).indices
            return norms, torch.full(idx.shape, 1.0 / k, dtype=h.dtype), idx

        block.gate.forward = types.MethodType(forward, block.gate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="16:4,16:8,32:8,32:16", help="E:k pairs")
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--skip-tokens", type=int, default=2048, help="tokens after calibration to skip (profile part)")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "premoe")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    t_start = time.time()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    dense, tok = models.load_default()
    calib = mf.calibration_ids(tok, args.calib_tokens)
    stream = task_streams(tok)["essays"]
    start = args.calib_tokens + args.skip_tokens
    ev = torch.tensor(stream[start : start + args.eval_tokens]).view(-1, args.seq_len)
    rows = [dict(E="-", k="-", router="dense", ppl=perplexity(dense, ev), recall="", r2="")]
    inputs = mf.collect_mlp_inputs(dense, calib, seq_len=args.seq_len)
    bar = tqdm(total=2 * len(configs), desc="sweep", unit="eval")
    splits_by_e = {}
    for E, k in configs:
        if E not in splits_by_e:
            splits_by_e[E] = mf.split_layers(dense, calib, E, inputs=inputs)
        splits = splits_by_e[E]
        for router in ("least-squares", "oracle"):
            moe = mf.assemble(dense, splits, k)
            moe.set_experts_implementation("eager")
            info = moe.config.tasksieve_moefy
            if router == "oracle":
                oracle_route(moe)
            rows.append(dict(E=E, k=k, router=router, ppl=perplexity(moe, ev),
                             recall=f"{sum(info['topk_recall']) / len(info['topk_recall']):.3f}"
                             if router == "least-squares" else "1 (by definition)",
                             r2=f"{sum(info['r2']) / len(info['r2']):.3f}" if router == "least-squares" else ""))
            bar.update(1)
            del moe
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "moefy_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["E", "k", "router", "ppl", "recall", "r2"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "ppl": f"{r['ppl']:.3f}"})
    import transformers

    lines = [
        "# MoEfied SmolLM2-135M: choosing (E, top-k)",
        "",
        f"Perplexity on {args.eval_tokens} held-out essay tokens ({ev.shape[0]} x {ev.shape[1]}), calibration "
        f"{calib.numel()} mixed tokens (essays, stdlib Python, pydoc topics). Active MLP fraction per token = k/E. "
        "Router recall = mean over layers of the fraction of the router's top-k that are among the true best-k "
        "experts by output norm, on calibration tokens; R^2 of the least-squares fit (no intercept).",
        "",
        "| E | top-k | active | router | perplexity | x dense | router recall | router R^2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense_ppl = rows[0]["ppl"]
    for r in rows:
        active = "100%" if r["E"] == "-" else f"{r['k'] / r['E']:.0%}"
        lines.append(f"| {r['E']} | {r['k']} | {active} | {r['router']} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / dense_ppl:.2f} | {r['recall']} | {r['r2']} |")
    lines += [
        "",
        f"Date {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, {platform.machine()} CPU, torch "
        f"threads {torch.get_num_threads()}, python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; run time {time.time() - t_start:.0f} s. Command: "
        f"`.venv/bin/python bench/moefy_sweep.py {' '.join(sys.argv[1:])}`",
    ]
    (args.out / "moefy_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
