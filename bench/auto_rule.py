"""Show WindowKV's "auto" rule on two task types with the embedded model.

Localisation prompts (passkey retrieval, a question about one sentence) and aggregation prompts
(summarise, list the themes) over the same essay contexts: for each prompt, the statistic the
rule computes (``peak_share`` of the layer-0 observation attention, see
``tasksieve.methods.windowkv.auto_strategy``) and the strategy it picks. Writes a markdown table to
bench/results/auto_rule.md.

    python bench/auto_rule.py [--reps 3] [--length 1500]
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch

import tasksieve as ts
from tasksieve import hf
from tasksieve.evaluation import niah

QUESTIONS = {
    "localisation: passkey": None,  # the NIAH needle and question
    "localisation: one fact": "What does the text say about '{word}'? Answer in one sentence.",
    "aggregation: summary": "Summarize the text above in three sentences.",
    "aggregation: themes": "List the main themes of the text above.",
}


def prompts(tokenizer, reps: int, length: int, seed: int):
    text, _ = niah.haystack_text("essays")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    for task, question in QUESTIONS.items():
        for rep in range(reps):
            if question is None:
                case = niah.build_case(tokenizer, length, rng.uniform(0.2, 0.8), seed=seed + rep)
                yield task, case.input_ids
                continue
            start = rng.randrange(0, len(ids) - length)
            context = tokenizer.decode(ids[start : start + length])
            word = rng.choice([w for w in context.split() if len(w) > 7 and w.isalpha()])
            prompt = niah.build_prompt(tokenizer, context, question.format(word=word))
            yield task, torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/auto_rule.md")
    args = p.parse_args(argv)
    model, tokenizer = ts.models.load_default()
    press = ts.WindowKV(budget=0.12, strategy="auto")
    by_task: dict[str, list[tuple[float, str]]] = {}
    for task, input_ids in prompts(tokenizer, args.reps, args.length, args.seed):
        _, caches = hf.prefill_multi(model, input_ids, None, {"auto": press})
        info = hf.cache_info(caches["auto"])
        by_task.setdefault(task, []).append((info["auto_statistic"], info["strategy"]))
        print(f"{task:<26} peak_share={info['auto_statistic']:.3f} -> {info['strategy']}", flush=True)
    lines = [
        "# WindowKV auto rule on two task types",
        "",
        f"Model: SmolLM2-135M-Instruct (embedded), ~{args.length}-token essay contexts, {args.reps} prompts per "
        f"task, rule threshold {press.auto_threshold} (peak_share >= threshold -> max).",
        "",
        "| task | peak_share (mean, min-max) | picked |",
        "|---|---|---|",
    ]
    for task, vals in by_task.items():
        stats = [v for v, _ in vals]
        picks = ", ".join(sorted({s for _, s in vals}))
        lines.append(f"| {task} | {statistics.mean(stats):.3f} ({min(stats):.3f}-{max(stats):.3f}) | {picks} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
