"""FlexPrefill inside vLLM's CPU engine on SmolLM2-135M: the NIAH grid and time to first token, vLLM dense vs
vLLM + the tasksieve plugin, measured in one run on one machine.

    make bench-vllm            # = .venv/bin/python bench/vllm_flexprefill.py --out bench/results/vllm

The orchestrator (main venv) exports the embedded SmolLM2 as an HF folder once, builds the NIAH cases with the
project's harness (same haystack, needle, lengths and depths as bench/results/niah_flexprefill), then starts one
vLLM engine per configuration in .venv-vllm (``--worker``; the plugin is configured by the environment, so a
configuration is a process). Engines alternate dense / plugin for the timing rounds, so both see the same machine
state. Greedy, fp32, eager, no prefix caching (repeated timing prompts must not hit the cache), one chunk per
prompt (max_num_batched_tokens above the longest prompt).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PLUGIN = {"gamma": 0.95, "tau": 0.1, "block_size": 64, "min_budget": 2048}
LENGTHS = (1000, 3000, 5000, 7000)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TTFT_LENGTHS = (4000, 8000)


# ---------------------------------------------------------------------------------------------------------------
# worker: one engine (runs in .venv-vllm)


def _worker(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(args.job).read_text())
    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=8192, max_num_batched_tokens=8192,
              enable_prefix_caching=False, seed=0, worker_extension_cls="tasksieve.integrations.vllm.StatsExtension")
    plugin = bool(os.environ.get("TASKSIEVE_FLEXPREFILL"))
    if plugin:
        from tasksieve.integrations.vllm import stats
    result = {"plugin": plugin}

    if job.get("niah"):
        params = SamplingParams(max_tokens=16, temperature=0.0)
        answers = []
        for case in job["niah"]:  # one prompt at a time: each its own prefill, like the HF harness
            before = stats(llm) if plugin else None
            out = llm.generate([TokensPrompt(prompt_token_ids=case["ids"])], params, use_tqdm=False)[0]
            after = stats(llm) if plugin else None
            ratio = 1.0
            if plugin and after["causal_blocks"] > before["causal_blocks"]:
                ratio = ((after["computed_blocks"] - before["computed_blocks"])
                         / (after["causal_blocks"] - before["causal_blocks"]))
            answers.append({"answer": out.outputs[0].text, "tokens": list(out.outputs[0].token_ids),
                            "ratio": ratio})
        result["niah"] = answers

    if job.get("ttft"):
        params = SamplingParams(max_tokens=1, temperature=0.0)
        timings = {}
        for item in job["ttft"]:
            prompt = TokensPrompt(prompt_token_ids=item["ids"])
            llm.generate([prompt], params, use_tqdm=False)  # warm-up (allocator, kernels)
            before = stats(llm) if plugin else None
            times, first = [], None
            for _ in range(job["repeats"]):
                t0 = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)[0]
                times.append(time.perf_counter() - t0)
                first = out.outputs[0].token_ids[0]
            after = stats(llm) if plugin else None
            ratio = 1.0
            if plugin and after["causal_blocks"] > before["causal_blocks"]:
                ratio = ((after["computed_blocks"] - before["computed_blocks"])
                         / (after["causal_blocks"] - before["causal_blocks"]))
            timings[str(len(item["ids"]))] = {"times": times, "first_token": first, "ratio": ratio}
        result["ttft"] = timings
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# orchestrator (main venv)


def _export_model(folder: Path) -> None:
    if (folder / "config.json").exists():
        return
    import torch

    from tasksieve.evaluation.models import load_default

    model, tok = load_default(dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    # The weights are already dequantised to fp32; the GGUF "quantizer" only blocks serialisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _run_engine(job: dict, plugin: bool, work: Path, name: str) -> dict:
    job_path, out_path = work / f"{name}.job.json", work / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="4")
    env.pop("TASKSIEVE_FLEXPREFILL", None)
    if plugin:
        env["TASKSIEVE_FLEXPREFILL"] = json.dumps(PLUGIN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(VLLM_PY), __file__, "--worker", "--job", str(job_path), "--out", str(out_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-5000:]}")
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out_path.read_text())


def _plot(rows, ttft, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, cfg in zip(axes[:2], ("dense", "plugin")):
        grid = np.zeros((len(DEPTHS), len(LENGTHS)))
        for r in rows:
            if r["config"] == cfg:
                grid[DEPTHS.index(r["depth"]), LENGTHS.index(r["length"])] = r["pass"]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(LENGTHS)), [str(n) for n in LENGTHS])
        ax.set_yticks(range(len(DEPTHS)), [str(d) for d in DEPTHS])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        passed = int(grid.sum())
        ax.set_title(f"vLLM {'dense' if cfg == 'dense' else '+ tasksieve FlexPrefill'}: {passed}/{grid.size}")
    ax = axes[2]
    xs = np.arange(len(TTFT_LENGTHS))
    d = [ttft[str(n)]["dense_median"] for n in TTFT_LENGTHS]
    p = [ttft[str(n)]["plugin_median"] for n in TTFT_LENGTHS]
    ax.bar(xs - 0.2, d, 0.4, label="vLLM dense")
    ax.bar(xs + 0.2, p, 0.4, label="vLLM + plugin")
    for x, a, b in zip(xs, d, p):
        ax.text(x + 0.2, b, f"{a / b:.2f}x", ha="center", va="bottom")
    ax.set_xticks(xs, [str(n) for n in TTFT_LENGTHS])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s, median)")
    ax.legend()
    fig.suptitle("SmolLM2-135M on vLLM 0.32 CPU (2 cores): FlexPrefill gamma 0.95, block 64, min_budget 2048")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global LENGTHS, TTFT_LENGTHS  # --lengths / --ttft-lengths (smaller smoke runs) replace the defaults
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm"))
    ap.add_argument("--model-dir", default=None, help="SmolLM2 as an HF folder (exported once when missing)")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per length and engine round")
    ap.add_argument("--rounds", type=int, default=2, help="dense / plugin engine pairs for the timings")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--ttft-lengths", default=",".join(map(str, TTFT_LENGTHS)))
    ap.add_argument("--skip-niah", action="store_true")
    ap.add_argument("--note", default="", help="a sentence about the run (e.g. the machine's load) for the table")
    ap.add_argument("--reuse", action="store_true",
                    help="write the tables from the engine outputs already in build/bench-vllm (complete dense / "
                         "plugin pairs only) instead of running engines")
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    from tasksieve.evaluation import niah

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "build" / "bench-vllm"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("TASKSIEVE_CACHE", Path.home() / ".cache" / "tasksieve"))
    model_dir = Path(args.model_dir) if args.model_dir else cache / "smollm2-135m-instruct-hf"
    _export_model(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    LENGTHS = tuple(int(x) for x in args.lengths.split(","))
    TTFT_LENGTHS = tuple(int(x) for x in args.ttft_lengths.split(","))
    lengths = LENGTHS
    cases = [niah.build_case(tok, n, d) for n in lengths for d in DEPTHS]
    ttft_ids = [niah.build_case(tok, n, 0.5).input_ids[0].tolist() for n in TTFT_LENGTHS]
    ttft_ids = [ids[:n] for ids, n in zip(ttft_ids, TTFT_LENGTHS)]

    t_start = time.perf_counter()
    results = {"dense": [], "plugin": []}
    if args.reuse:
        rnd = 0
        while (work / f"dense{rnd}.out.json").exists() and (work / f"plugin{rnd}.out.json").exists():
            for cfg in ("dense", "plugin"):
                results[cfg].append(json.loads((work / f"{cfg}{rnd}.out.json").read_text()))
            rnd += 1
        if not rnd:
            raise SystemExit(f"--reuse: no complete dense/plugin pair in {work}")
        args.rounds = rnd
    for rnd in range(0 if args.reuse else args.rounds):
        for cfg in ("dense", "plugin"):
            job = {"model": str(model_dir), "repeats": args.repeats, "ttft": [{"ids": ids} for ids in ttft_ids]}
            if rnd == 0 and not args.skip_niah:
                job["niah"] = [{"ids": c.input_ids[0].tolist()} for c in cases]
            print(f"round {rnd + 1}/{args.rounds}, {cfg}", flush=True)
            results[cfg].append(_run_engine(job, cfg == "plugin", work, f"{cfg}{rnd}"))

    rows = []
    if not args.skip_niah:
        for cfg in ("dense", "plugin"):
            for c, a in zip(cases, results[cfg][0]["niah"]):
                rows.append({"config": cfg, "length": c.length, "depth": c.depth, "prompt_tokens": c.prompt_tokens,
                             "key": c.key, "pass": int(niah.passed(a["answer"], c.key)),
                             "answer": a["answer"].strip(), "ratio": round(a["ratio"], 4)})
    ttft = {}
    for n, ids in zip(TTFT_LENGTHS, ttft_ids):
        k = str(len(ids))
        d = [t for r in results["dense"] for t in r["ttft"][k]["times"]]
        p = [t for r in results["plugin"] for t in r["ttft"][k]["times"]]
        ttft[str(n)] = {
            "tokens": len(ids), "dense_median": statistics.median(d), "plugin_median": statistics.median(p),
            "dense_times": d, "plugin_times": p,
            "speedup": statistics.median(d) / statistics.median(p),
            "ratio": results["plugin"][0]["ttft"][k]["ratio"],
            "same_first_token": len({r["ttft"][k]["first_token"] for r in results["dense"] + results["plugin"]}) == 1,
        }
    elapsed = time.perf_counter() - t_start
    _write(out, rows, ttft, elapsed, args)


def _write(out: Path, rows, ttft, elapsed, args) -> None:
    import platform

    import transformers

    vllm_version = subprocess.run([str(VLLM_PY), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                                  capture_output=True, text=True).stdout.strip()
    if rows:
        with open(out / "flexprefill_niah.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    with open(out / "flexprefill_ttft.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_tokens", "dense_median_s", "plugin_median_s", "speedup", "computed_block_ratio",
                     "dense_prefill_tok_s", "plugin_prefill_tok_s", "same_first_token", "runs_each"])
        for n in TTFT_LENGTHS:
            t = ttft[str(n)]
            w.writerow([t["tokens"], f"{t['dense_median']:.3f}", f"{t['plugin_median']:.3f}", f"{t['speedup']:.2f}",
                        f"{t['ratio']:.3f}", f"{t['tokens'] / t['dense_median']:.0f}",
                        f"{t['tokens'] / t['plugin_median']:.0f}", t["same_first_token"], len(t["dense_times"])])
    lines = ["# FlexPrefill inside vLLM (CPU engine)", "",
             f"SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantised to fp32, exported as an HF folder) served by "
             f"vllm-cpu {vllm_version} on this project's 2-core CPU machine (no GPU), fp32, eager, no prefix cache; "
             f"plugin `TASKSIEVE_FLEXPREFILL='{json.dumps(PLUGIN)}'` (dense below 2048 keys). "
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, transformers {transformers.__version__} (harness). "
             + (f"whole run {elapsed / 60:.1f} min. " if not args.reuse else "") +
             "Reproduce: `make bench-vllm`.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["## Time to first token", "",
              f"Median of {len(ttft[str(TTFT_LENGTHS[0])]['dense_times'])} prefills per engine (max_tokens=1, one "
              f"chunk), {args.rounds} engine rounds alternating dense / plugin. An absolute time means little on a "
              "shared CPU; the ratio is measured in the same run.", "",
              "| prompt tokens | vLLM dense | vLLM + plugin | speed-up | computed blocks | prefill tok/s dense → plugin "
              "| same first token |", "|---:|---:|---:|---:|---:|---:|:---:|"]
    for n in TTFT_LENGTHS:
        t = ttft[str(n)]
        lines.append(f"| {t['tokens']} | {t['dense_median']:.2f} s | {t['plugin_median']:.2f} s | "
                     f"**{t['speedup']:.2f}x** | {100 * t['ratio']:.1f}% | {t['tokens'] / t['dense_median']:.0f} → "
                     f"{t['tokens'] / t['plugin_median']:.0f} | {'yes' if t['same_first_token'] else 'NO'} |")
    if rows:
        lines += ["", "## NIAH grid (passkey, essays haystack, the project's harness)", "",
                  "| config | pass | " + " | ".join(f"n={n}" for n in LENGTHS) + " | computed blocks (mean) |",
                  "|---|---:|" + "---:|" * len(LENGTHS) + "---:|"]
        for cfg in ("dense", "plugin"):
            rs = [r for r in rows if r["config"] == cfg]
            per = [f"{sum(r['pass'] for r in rs if r['length'] == n)}/{len(DEPTHS)}" for n in LENGTHS]
            mean_ratio = statistics.mean(r["ratio"] for r in rs)
            lines.append(f"| {'vLLM dense' if cfg == 'dense' else 'vLLM + plugin'} | "
                         f"{sum(r['pass'] for r in rs)}/{len(rs)} | " + " | ".join(per) +
                         f" | {100 * mean_ratio:.1f}% |")
        dense = {(r["length"], r["depth"]): r for r in rows if r["config"] == "dense"}
        plugin = {(r["length"], r["depth"]): r for r in rows if r["config"] == "plugin"}
        same_set = all(dense[k]["pass"] == plugin[k]["pass"] for k in dense)
        same_answers = sum(dense[k]["answer"] == plugin[k]["answer"] for k in dense)
        lines += ["", f"Pass set equal to vLLM dense: **{'yes' if same_set else 'no'}**; identical answers: "
                  f"{same_answers}/{len(dense)}. Answers per case: `flexprefill_niah.csv`."]
    (out / "flexprefill.md").write_text("\n".join(lines) + "\n")
    (out / "flexprefill.json").write_text(json.dumps({"ttft": ttft, "niah": rows, "plugin": PLUGIN}, indent=1))
    if rows:
        _plot(rows, ttft, out / "flexprefill.png")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
