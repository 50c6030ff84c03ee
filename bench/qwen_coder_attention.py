"""Attention alone, dense vs FlexPrefill, on Qwen2.5-Coder-0.5B's real queries/keys at 16k and 32k (CPU).

The end-to-end prefill times of ``bench/qwen_coder_niah.py`` include the MLPs and projections (the same in both) and
each run takes minutes, so on a shared machine the load of other users moves the dense / sparse ratio. Here one
NIAH prompt (``niah.build_case``, essays, depth 0.5) is run through the first layers only, the post-RoPE
q / k / v of ``--layers`` are captured, and the two attentions are timed interleaved (dense, flex, dense, flex, ...;
median of ``--reps``) on the same tensors:

- dense: ``F.scaled_dot_product_attention(causal, enable_gqa=True)`` (what HF's SDPA path runs, without repeat_kv);
- flex: ``ts.flex_prefill_attention(gamma, tau, block_size, min_budget)`` (estimate + JSD + selection + kernel),
  its pattern summarised by ``ts.flexprefill.pattern_report``, and its output error vs dense.

    nice -n 19 .venv/bin/python bench/qwen_coder_attention.py --lengths 16000,32000 --layers 1,3 --reps 2
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import tasksieve as ts  # noqa: E402
from tasksieve.evaluation import models, niah  # noqa: E402


class _Stop(Exception):
    pass


@torch.inference_mode()
def capture_qkv(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Post-RoPE q [1, N, H, D], k / v [1, N, Hk, D] of ``layers``; stops the forward after the last one."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    got: dict[int, tuple[torch.Tensor, ...]] = {}
    handles = []

    def hook(idx):
        def fn(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, N, _ = h.shape
            D = module.head_dim
            q = module.q_proj(h).view(B, N, -1, D).transpose(1, 2)
            k = module.k_proj(h).view(B, N, -1, D).transpose(1, 2)
            v = module.v_proj(h).view(B, N, -1, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            got[idx] = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
            if idx == max(layers):
                raise _Stop

        return fn

    for i in layers:
        handles.append(model.model.layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16000,32000")
    p.add_argument("--layers", default="1,3")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--min-budget", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "bench/results/qwen_coder"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = models.load(models.QWEN_CODER)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        case = niah.build_case(tok, n, 0.5, haystack="essays", seed=0)
        t0 = time.perf_counter()
        qkv = capture_qkv(model, case.input_ids, layers)
        print(f"n={n}: captured layers {layers} in {time.perf_counter() - t0:.0f} s", flush=True)
        for layer, (q, k, v) in qkv.items():
            times = {"dense": [], "flex": []}
            cpu = {"dense": [], "flex": []}
            for _ in range(args.reps):
                t0, c0 = time.perf_counter(), time.process_time()
                ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True).transpose(1, 2)
                times["dense"].append(time.perf_counter() - t0)
                cpu["dense"].append(time.process_time() - c0)
                t0, c0 = time.perf_counter(), time.process_time()
                out, _, pattern = ts.flex_prefill_attention(
                    q, k, v, gamma=args.gamma, tau=args.tau, block_size=args.block_size,
                    min_budget=args.min_budget, return_pattern=True)
                times["flex"].append(time.perf_counter() - t0)
                cpu["flex"].append(time.process_time() - c0)
            rep = ts.flexprefill.pattern_report(pattern)
            err = float((out.float() - ref.float()).abs().max())
            d, f = statistics.median(times["dense"]), statistics.median(times["flex"])
            dc, fc = statistics.median(cpu["dense"]), statistics.median(cpu["flex"])
            row = dict(length=n, prompt_tokens=case.prompt_tokens, layer=layer, dense_s=round(d, 3),
                       flex_s=round(f, 3), speedup=round(d / f, 3), dense_cpu_s=round(dc, 3),
                       flex_cpu_s=round(fc, 3), speedup_cpu=round(dc / fc, 3), block_ratio=round(rep["ratio"], 4),
                       query_aware_fraction=round(rep["query_aware_fraction"], 4), max_abs_err=err,
                       dense_all=";".join(f"{t:.2f}" for t in times["dense"]),
                       flex_all=";".join(f"{t:.2f}" for t in times["flex"]))
            rows.append(row)
            print(row, flush=True)
        del qkv
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "attention.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Attention alone: dense SDPA vs FlexPrefill on Qwen2.5-Coder-0.5B's real q/k/v (CPU)",
        "",
        f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} · {args.threads} threads, nice 19, "
        f"shared 2-core AMD EPYC · FlexPrefill gamma {args.gamma}, tau {args.tau}, block {args.block_size}, "
        f"min_budget {args.min_budget} · NIAH prompt at depth 0.5 · interleaved, median of {args.reps}",
        "",
        "Wall seconds move with the other users' load; process CPU seconds (both threads) much less.",
        "",
        "| prompt tokens | layer | dense SDPA s | FlexPrefill s | dense / flex (wall) | dense / flex (CPU s) "
        "| blocks computed | query-aware heads | max abs err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['layer']} | {r['dense_s']:.2f} | {r['flex_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_cpu']:.2f}x ({r['dense_cpu_s']:.1f} / {r['flex_cpu_s']:.1f}) | {100 * r['block_ratio']:.1f}% | {100 * r['query_aware_fraction']:.0f}% | "
                     f"{r['max_abs_err']:.2e} |")
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
