"""Issue 13, "windows that keep units whole": RULER niah_single_1 reproduced offline on the embedded SmolLM2.

RULER's niah_single_1 (lm-eval's ``prepare_niah.py``, "repeat" haystack): the sentence
"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated
``num_haystack`` times, joined by newlines, the needle "One of the special magic numbers for {word} is: {7 digits}."
inserted before a random repetition; the template with RULER's single-needle rewrite ("A special magic number is
hidden ..."), the user turn on SmolLM2's chat template and the answer prefix
"The special magic number for {word} mentioned in the provided text is" after the assistant header, as lm-eval's
``gen_prefix`` does. ``num_haystack`` is the largest count for which the input text plus 128 generated tokens fit the
length (lm-eval's rule, counted on the raw input text). Sample i of length L draws word, number and position from
``random.Random(SEED + i)`` so every method sees the same samples. Pass = the number appears in the greedy answer
(lm-eval's string_match_all for one reference).

Every method runs on one shared dense prefill per sample (``tasksieve.niah.run_case``), which also gives the
decode KL against full KV. ``--diagnose`` instead records, for WindowKV presses, where the needle's digit tokens sit
relative to the window grid, the per-group window scores and the kept windows.

    nice -n 19 .venv/bin/python bench/windowkv_units.py --lengths 4096 --samples 25 \
        --methods "dense,windowkv:0.12,windowkv:0.25,snapkv:0.12" --out bench/results/windowkv_units
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from tasksieve.evaluation import niah
from tasksieve.evaluation.models import load_default

SEED = 13_000
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned in the provided text?"
)
GEN_PREFIX = "The special magic number for {query} mentioned in the provided text is"
# a fixed word list (lm-eval draws from wonderwords' nouns/adjectives/verbs; any plain words do)
WORDS = """apple badge cabin dolphin eagle falcon garden harbor island jungle kettle ladder marble needle orchard
pepper quartz rabbit saddle tunnel umbrella velvet walnut yellow zebra anchor bottle candle desert engine feather
glacier hammer insect jacket kitten lantern magnet napkin oyster pillow quiver rocket shovel throne unicorn violin
window yogurt zipper arrow basket cactus dragon ember forest goblet helmet igloo jigsaw koala lemon meadow nectar
oatmeal parrot""".split()
TOKENS_TO_GENERATE = 128


def input_text(num_haystack: int, key: str, value: str, index: int) -> str:
    sentences = [HAYSTACK] * num_haystack
    sentences.insert(index, NEEDLE.format(key=key, value=value))
    return TEMPLATE.format(context="\n".join(sentences), query=key)


def fit_haystack(tok, length: int) -> int:
    """Largest repetition count whose input text (+ 128 generated tokens) fits ``length`` tokens."""
    lo, hi = 1, length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = len(tok(input_text(mid, "parrot", "1234567", mid // 2)).input_ids) + TOKENS_TO_GENERATE
        if n <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_sample(tok, length: int, i: int, num_haystack: int) -> niah.Case:
    rng = random.Random(SEED + i)
    key = rng.choice(WORDS)
    value = str(rng.randint(10**6, 10**7 - 1))
    index = rng.randrange(num_haystack)
    text = input_text(num_haystack, key, value, index)
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    prompt += GEN_PREFIX.format(query=key)
    ids = tok.encode(prompt, add_special_tokens=False)
    needle = NEEDLE.format(key=key, value=value)
    before = prompt[: prompt.index(needle)]
    return niah.Case(
        length=length, depth=round(index / num_haystack, 4), key=value, seed=SEED + i, haystack="ruler-repeat",
        context=text, prompt=prompt, input_ids=torch.tensor([ids]), context_tokens=len(ids),
        needle_token_pos=len(tok.encode(before, add_special_tokens=False)), needle_char_pos=len(before),
        extra={"word": key, "index": index, "num_haystack": num_haystack, "sample": i},
    )


def digit_positions(tok, case: niah.Case) -> list[int]:
    """Token positions of the needle's number in the prompt (SmolLM2: one token per digit)."""
    ids = case.input_ids[0].tolist()
    pos = []
    # first occurrence of the number after the needle's start
    start = case.needle_token_pos
    for p in range(start, min(len(ids), start + 40)):
        s = tok.decode(ids[p : p + 7])
        if s.strip() == case.key:
            return list(range(p, p + 7))
    return pos


# ------------------------------------------------------------------------------------------------------------
# diagnosis


def diagnose(model, tok, case: niah.Case, presses: dict) -> dict:
    """Per WindowKV press: mean group scores and kept windows around the needle; answers of every press."""
    from tasksieve import ops
    from tasksieve.integrations import hf
    from tasksieve.methods.windowkv import prefill as wprefill

    recorded: list = []
    real_select = ops.select_windows

    def recording(scores, keep, share):
        idx = real_select(scores, keep, share)
        recorded.append((scores.detach().clone(), keep, idx.clone()))
        return idx

    wprefill.ops.select_windows = recording  # the same module object: restore below
    try:
        last, caches = hf.prefill_multi(model, case.input_ids, None, {"dense": None, **presses})
    finally:
        wprefill.ops.select_windows = real_select
    digits = digit_positions(tok, case)
    out = {"sample": case.extra["sample"], "key": case.key, "n": case.prompt_tokens, "digits": digits}
    eos = niah._eos_ids(model, tok)
    lf = last.reshape(-1, last.shape[-1])[-1].float()
    with hf.patched(model, kv=None):
        for name, p in {"dense": None, **presses}.items():
            toks, _ = niah._greedy(model, p, caches[name], lf, 12, eos)
            out.setdefault("answers", {})[name] = niah._decode(tok, [t for t in toks if t not in eos]).strip()
    out["recorded"] = recorded
    return out


def report(out: Path) -> str:
    """windowkv_units.md / .csv / .png from every samples*.jsonl under ``out``."""
    import csv

    rows = [json.loads(line) for f in sorted(out.glob("samples*.jsonl")) for line in f.read_text().splitlines()]
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    lengths = sorted({r["length"] for r in rows})
    # only samples every method finished count
    table = []
    for length in lengths:
        per = {}
        for r in rows:
            if r["length"] == length:
                per.setdefault(r["sample"], {})[r["method"]] = r
        # the methods run on every sample so far share one sample set; a method dropped from a later run
        # (fewer samples) is reported on the samples it has
        common = [m for m in methods if all(m in d for d in per.values())]
        full = sorted(i for i, d in per.items() if all(m in d for m in common))
        for m in methods:
            rs = [per[i][m] for i in sorted(per) if m in per[i]] if m not in common else [per[i][m] for i in full]
            if not rs:
                continue
            lost = [f"{r['key']}->{r['answer'][:12]!r}" for r in rs if not r["passed"]]
            if len(lost) > 4:
                lost = lost[:3] + [f"(+{len(lost) - 3} more)"]
            table.append(dict(
                length=length, method=m, samples=len(rs), passed=sum(r["passed"] for r in rs),
                kl_decode=sum(r["kl_decode"] for r in rs) / len(rs),
                top1_decode=sum(r["top1_decode"] for r in rs) / len(rs),
                kv_kept_pct=sum(r["kv_kept_pct"] for r in rs) / len(rs),
                prompt_tokens=sum(r["prompt_tokens"] for r in rs) / len(rs),
                failed=" ".join(lost),
            ))
    with (out / "windowkv_units.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = ["| length | method | pass | KL dec | top-1 dec | KV kept | failed (key -> answer) |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for t in table:
        lines.append(f"| {t['length']} | {t['method']} | {t['passed']}/{t['samples']} | {t['kl_decode']:.4f} | "
                     f"{t['top1_decode']:.3f} | {t['kv_kept_pct']:.1f}% | {t['failed']} |")
    lines += ["", "Per sample: how the window grid (window 8) splits the 7 digit tokens (e.g. `2|5` = two digits in one "
              "window, five in the next) and which methods lost the number.", "",
              "| length | sample | key | digits at | split | failed |", "|---:|---:|---|---|---|---|"]
    for length in lengths:
        per = {}
        for r in rows:
            if r["length"] == length:
                per.setdefault(r["sample"], []).append(r)
        for i in sorted(per):
            rs = per[i]
            d = rs[0]["digit_pos"]
            split = "|".join(str(sum(1 for p in d if p // 8 == w)) for w in sorted({p // 8 for p in d}))
            bad = ", ".join(f"{r['method']} ({r['answer'][:10]!r})" for r in rs
                            if not r["passed"] and not r["method"].startswith("kvp-"))
            nkvp = sum(1 for r in rs if not r["passed"] and r["method"].startswith("kvp-"))
            bad += f"{'; ' if bad and nkvp else ''}{nkvp} kvpress rows" if nkvp else ""
            lines.append(f"| {length} | {i} | {rs[0]['key']} | {d[0]}-{d[-1]} | {split} | {bad} |")
    md = "\n".join(lines) + "\n"
    (out / "windowkv_units.md").write_text(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 4.5))
        width = 0.8 / max(1, len(lengths))
        for j, length in enumerate(lengths):
            ts = {t["method"]: t for t in table if t["length"] == length}
            ys = [100.0 * ts[m]["passed"] / ts[m]["samples"] if m in ts else 0 for m in methods]
            n = max((ts[m]["samples"] for m in ts), default=0)
            ax.bar([i + j * width for i in range(len(methods))], ys, width, label=f"{length} tokens ({n} samples)")
        ax.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels([m.replace("windowkv", "wkv").replace(":neighbours=", " nb=").replace(
            ",neighbour_weight=", " w=") for m in methods], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("niah_single_1 pass %")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
        ax.set_title("RULER niah_single_1 (repeat haystack) reproduced, SmolLM2-135M-Instruct")
        fig.tight_layout()
        fig.savefig(out / "windowkv_units.png", dpi=120)
    except ImportError:  # pragma: no cover
        pass
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--methods", default="dense,windowkv:0.12,windowkv:0.25,snapkv:0.12")
    ap.add_argument("--out", default="bench/results/windowkv_units")
    ap.add_argument("--tag", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--report", action="store_true", help="only write the md/csv/png from the jsonl files")
    args = ap.parse_args(argv)
    if args.report:
        print(report(Path(args.out)))
        return 0
    torch.set_num_threads(args.threads)
    model, tok = load_default()
    methods = niah.parse_methods(args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"samples{args.tag}.jsonl"
    done = set()
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((r["length"], r["sample"], r["method"]))
    for length in [int(x) for x in args.lengths.split(",")]:
        nh = fit_haystack(tok, length)
        for i in range(args.start, args.start + args.samples):
            todo = {m: p for m, p in methods.items() if (length, i, m) not in done}
            if not todo:
                continue
            case = build_sample(tok, length, i, nh)
            digits = digit_positions(tok, case)
            t0 = time.perf_counter()
            rows = niah.run_case(model, tok, case, todo, max_new_tokens=args.max_new_tokens)
            dt = time.perf_counter() - t0
            with jsonl.open("a") as f:
                for r in rows:
                    r.update(sample=i, word=case.extra["word"], index=case.extra["index"], num_haystack=nh,
                             digit_pos=digits, wall_s=round(dt, 2))
                    f.write(json.dumps(r) + "\n")
            print(f"L={length} i={i} n={case.prompt_tokens} {dt:.1f}s " + " ".join(
                f"{r['method']}={'ok' if r['passed'] else r['answer']!r}" for r in rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
