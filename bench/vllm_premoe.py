"""PreMoe's pruned MoEfied SmolLM2 served by vLLM's CPU engine with no tasksieve code in the engine: agreement with
transformers on the same folder, and tokens/s pruned vs unpruned in vLLM, measured in one run.

    .venv/bin/python bench/vllm_premoe.py --out bench/results/vllm        # ~15-25 min on 2 shared cores

The orchestrator (main venv) loads the MoEfied SmolLM2 (``tasksieve.models.load_default_moe(16, 8)``: E = 16, top-8,
the build of bench/results/premoe and bench/results/compose_moe), profiles the pattern store exactly as
bench/compose_moe.py does (essays / python / docs, 2048 tokens per task in 512-token chunks after the MoE-build
calibration prefix, TCESS k = the router top-k), prunes with the ``essays`` pattern at keep 0.5 (8 of 16 experts in
every layer) and exports both the unpruned and the pruned model with ``ts.premoe.export`` (what ``tasksieve prune``
writes). transformers then runs each folder: greedy continuations of 10 prompts (token ids; no EOS stop) and the
perplexity of six 512-token evaluation chunks (two per task, disjoint from calibration and profile).

Each folder is then served by vLLM in .venv-vllm (``--worker``, one engine per process, TASKSIEVE_FLEXPREFILL unset):
the same continuations (ignore_eos), the same perplexities through ``prompt_logprobs``, and timed generation. Engines
alternate unpruned / pruned for ``--rounds`` rounds, so both see the same machine state. fp32, eager, greedy, no
prefix caching.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODELS = ("unpruned", "pruned")


# ---------------------------------------------------------------------------------------------------------------
# worker: one engine (runs in .venv-vllm)


def _worker(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(Path(args.job).read_text())
    t0 = time.perf_counter()
    llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=1024, enable_prefix_caching=False,
              seed=0)
    result = {"startup_s": time.perf_counter() - t0}
    cfg = llm.llm_engine.model_config.hf_config
    result["num_experts"] = int(getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0))

    def gen(ids_list, **kw):
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids_list], SamplingParams(temperature=0.0, **kw),
                            use_tqdm=False)

    if job.get("fidelity"):
        outs = gen(job["prompts"], max_tokens=job["new_tokens"], logprobs=1, ignore_eos=True)
        result["greedy"] = [{"tokens": list(o.outputs[0].token_ids),
                             "logprobs": [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                            for o in outs]
        outs = gen(job["eval"], max_tokens=1, prompt_logprobs=1)
        result["eval_nll"] = [[lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                              for o in outs]
    timings = []
    for _ in range(job["repeats"]):
        for name, ids_list, max_tokens in (("decode b1", job["timing"][:1], job["timing_tokens"]),
                                           ("decode b16", job["timing"], job["timing_tokens"]),
                                           ("prefill 4x512", job["eval"][:4], 1)):
            t = time.perf_counter()
            outs = gen(ids_list, max_tokens=max_tokens, ignore_eos=True)
            wall = time.perf_counter() - t
            new = sum(len(o.outputs[0].token_ids) for o in outs)
            prompt = sum(len(o.prompt_token_ids) for o in outs)
            timings.append({"what": name, "wall_s": wall, "new_tokens": new, "prompt_tokens": prompt})
    result["timings"] = timings
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# orchestrator (main venv)


def _prepare(args, work: Path) -> dict:
    """Folders, prompts, evaluation chunks, the transformers reference. Cached in work/prepared.json."""
    cached = work / "prepared.json"
    if args.reuse and cached.is_file():
        return json.loads(cached.read_text())
    import torch

    sys.path.insert(0, str(ROOT / "python"))
    sys.path.insert(0, str(ROOT / "bench"))
    import premoe_fidelity as pf
    from tasksieve import premoe
    from tasksieve.evaluation import models

    t0 = time.perf_counter()
    moe, tok = models.load_default_moe(args.num_experts, args.top_k, calib_tokens_per_task=args.calib_tokens)
    moe.eval().requires_grad_(False)
    streams = pf.task_streams(tok)
    split = {t: pf.split_stream(s, args.calib_tokens, args.profile_tokens, args.eval_tokens, args.seq_len)
             for t, s in streams.items()}
    folders = {m: work / m for m in MODELS}
    premoe.export(moe, folders["unpruned"], tok)
    store = premoe.profile(moe, {t: [split[t][0]] for t in pf.TASKS}, tok, max_tokens=args.profile_tokens,
                           top_k=None, seq_len=args.seq_len, batch_size=2, progress=False)
    report = premoe.prune(moe, store[args.task], keep=args.keep)
    premoe.export(moe, folders["pruned"], tok)
    del moe
    checks = {m: premoe.check_vllm(folders[m]) for m in MODELS}
    # prompts: 10 windows of 48 tokens from the evaluation chunks (4 essays, 3 python, 3 docs); timing: 16 windows
    evals = {t: split[t][1] for t in pf.TASKS}
    prompts = []
    for t, n in zip(pf.TASKS, (4, 3, 3)):
        prompts += [evals[t][j % evals[t].shape[0], 120 * (j // evals[t].shape[0]):][:48].tolist() for j in range(n)]
    timing = [evals[t][j % 2, 32 * j:32 * j + 64].tolist() for t in pf.TASKS for j in range(6)][:16]
    eval_chunks = [row.tolist() for t in pf.TASKS for row in evals[t]]
    prep_s = time.perf_counter() - t0

    from transformers import AutoModelForCausalLM

    hf = {}
    for m in MODELS:
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(folders[m]), dtype=torch.float32, local_files_only=True)
        model.eval().requires_grad_(False)
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(args.experts_impl)
        greedy = []
        with torch.inference_mode():
            for p in prompts:
                out = model(input_ids=torch.tensor([p]), use_cache=True)
                past, toks, lps, gaps = out.past_key_values, [], [], []
                logits = out.logits[0, -1]
                for _ in range(args.new_tokens):
                    lp = torch.log_softmax(logits.float(), -1)
                    top2 = torch.topk(lp, 2)
                    t = int(top2.indices[0])
                    toks.append(t)
                    lps.append(float(top2.values[0]))
                    gaps.append(float(top2.values[0] - top2.values[1]))
                    out = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
                    past, logits = out.past_key_values, out.logits[0, -1]
                greedy.append({"tokens": toks, "logprobs": lps, "top2_gap": gaps})
            nll = []
            for chunk in eval_chunks:
                ids = torch.tensor([chunk])
                lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
                nll.append(lp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
        hf[m] = {"greedy": greedy, "eval_nll": nll, "s": time.perf_counter() - t1}
        del model
    prep = {"folders": {m: str(f) for m, f in folders.items()}, "prompts": prompts, "timing": timing,
            "eval": eval_chunks, "eval_tasks": [t for t in pf.TASKS for _ in range(evals[t].shape[0])], "hf": hf,
            "checks": checks, "report": str(report), "prep_s": prep_s,
            "folder_bytes": {m: sum(p.stat().st_size for p in folders[m].glob("*.safetensors")) for m in MODELS}}
    cached.write_text(json.dumps(prep))
    return prep


def _run_engine(job: dict, work: Path, name: str) -> dict:
    job_path, out_path = work / f"{name}.job.json", work / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(job.get("kv_gib", 2)))
    env.pop("TASKSIEVE_FLEXPREFILL", None)
    t = time.perf_counter()
    proc = subprocess.run([str(VLLM_PY), __file__, "--worker", "--job", str(job_path), "--out", str(out_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"engine {name} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(out_path.read_text())
    res["process_s"] = time.perf_counter() - t
    return res


def _compare(hf_rows, v_rows) -> dict:
    same, first_div, max_diff, tie_div = 0, [], 0.0, 0
    for h, v in zip(hf_rows, v_rows):
        n = len(h["tokens"])
        k = next((i for i in range(n) if h["tokens"][i] != v["tokens"][i]), n)
        same += k == n
        first_div.append(k)
        if k < n and h["top2_gap"][k] < 1e-3:
            tie_div += 1
        diffs = [abs(a - b) for a, b in zip(h["logprobs"][:k], v["logprobs"][:k])]
        max_diff = max([max_diff] + diffs)
    return {"identical": same, "prompts": len(hf_rows), "first_divergence": first_div, "max_lp_diff": max_diff,
            "tie_divergences": tie_div}


def _ppl(nll_rows, tasks) -> dict:
    out = {}
    for task in dict.fromkeys(tasks):
        vals = [x for row, t in zip(nll_rows, tasks) if t == task for x in row]
        out[task] = math.exp(-sum(vals) / len(vals))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "vllm_premoe")
    ap.add_argument("--num-experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--profile-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--task", default="essays")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (agreement)")
    ap.add_argument("--timing-tokens", type=int, default=64, help="generated tokens per request in the timings")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine")
    ap.add_argument("--rounds", type=int, default=2, help="unpruned / pruned engine pairs")
    ap.add_argument("--experts-impl", default="grouped_mm", help="HF experts implementation for the reference")
    ap.add_argument("--reuse", action="store_true", help="reuse work/prepared.json (folders + HF reference)")
    args = ap.parse_args()
    if args.worker:
        return _worker(argparse.Namespace(job=args.job, out=str(args.out)))

    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    prep = _prepare(args, args.work)
    print(f"prepared in {prep['prep_s']:.0f} s (+ HF {sum(h['s'] for h in prep['hf'].values()):.0f} s): "
          f"{prep['report']}", flush=True)
    runs = {m: [] for m in MODELS}
    for rnd in range(args.rounds):
        order = MODELS if rnd % 2 == 0 else MODELS[::-1]
        for m in order:
            job = {"model": prep["folders"][m], "prompts": prep["prompts"], "eval": prep["eval"],
                   "timing": prep["timing"], "new_tokens": args.new_tokens, "timing_tokens": args.timing_tokens,
                   "repeats": args.repeats, "fidelity": rnd == 0}
            print(f"round {rnd + 1}/{args.rounds}: vLLM {m}", flush=True)
            runs[m].append(_run_engine(job, args.work, f"{m}-r{rnd}"))
    _write(args, prep, runs, time.perf_counter() - t_start)


def _write(args, prep, runs, elapsed) -> None:
    import torch
    import transformers

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    vv = subprocess.run([str(VLLM_PY), "-c", "import importlib.metadata as m, transformers, torch; "
                         "print(m.version('vllm-cpu'), transformers.__version__, torch.__version__)"],
                        capture_output=True, text=True).stdout.split()
    rows, md_fid, md_time = [], [], []
    tasks = prep["eval_tasks"]
    for m in MODELS:
        first = runs[m][0]
        cmp_ = _compare(prep["hf"][m]["greedy"], first["greedy"])
        ppl_hf, ppl_v = _ppl(prep["hf"][m]["eval_nll"], tasks), _ppl(first["eval_nll"], tasks)
        nll_diff = max(abs(a - b) for hr, vr in zip(prep["hf"][m]["eval_nll"], first["eval_nll"])
                       for a, b in zip(hr, vr))
        md_fid.append(
            f"| {m} | {first['num_experts']} | {cmp_['identical']}/{cmp_['prompts']} | "
            f"{', '.join(str(x) for x in cmp_['first_divergence'])} | {cmp_['max_lp_diff']:.2e} | "
            + " | ".join(f"{ppl_hf[t]:.3f} / {ppl_v[t]:.3f}" for t in ppl_hf) + f" | {nll_diff:.2e} |")
        for t in ppl_hf:
            rows.append({"model": m, "metric": f"ppl_{t}", "hf": round(ppl_hf[t], 5), "vllm": round(ppl_v[t], 5)})
        rows.append({"model": m, "metric": "greedy_identical_prompts", "hf": cmp_["prompts"],
                     "vllm": cmp_["identical"]})
        rows.append({"model": m, "metric": "max_token_nll_diff", "hf": 0, "vllm": f"{nll_diff:.3g}"})
    whats = [t["what"] for t in runs["unpruned"][0]["timings"]][: len(runs["unpruned"][0]["timings"]) // args.repeats]
    tps = {}
    for m in MODELS:
        for w in whats:
            vals = []
            for r in runs[m]:
                for t in r["timings"]:
                    if t["what"] == w:
                        n = t["prompt_tokens"] if w.startswith("prefill") else t["new_tokens"]
                        vals.append(n / t["wall_s"])
            tps[(m, w)] = vals
            rows.append({"model": m, "metric": f"tok_per_s {w}", "hf": "", "vllm": round(statistics.median(vals), 2)})
    for w in whats:
        u, p = statistics.median(tps[("unpruned", w)]), statistics.median(tps[("pruned", w)])
        unit = "prompt tok/s" if w.startswith("prefill") else "generated tok/s"
        md_time.append(f"| {w} ({unit}) | {u:.1f} ({', '.join(f'{x:.1f}' for x in tps[('unpruned', w)])}) | "
                       f"{p:.1f} ({', '.join(f'{x:.1f}' for x in tps[('pruned', w)])}) | {p / u:.2f}x |")
    with open(out / "premoe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "metric", "hf", "vllm"])
        w.writeheader()
        w.writerows(rows)
    mib = {m: prep["folder_bytes"][m] / 2**20 for m in MODELS}
    startup = {m: ", ".join(f"{r['startup_s']:.0f}" for r in runs[m]) for m in MODELS}
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"""# PreMoe-pruned MoEfied SmolLM2 served by vLLM (CPU)

`{' '.join(['.venv/bin/python', 'bench/vllm_premoe.py'] + sys.argv[1:])}`, {dt.date.today().isoformat()}, {elapsed / 60:.0f} min.
vLLM {vv[0] if vv else '?'} (CPU engine, transformers {vv[1] if len(vv) > 1 else '?'}, torch {vv[2] if len(vv) > 2 else '?'}) in
.venv-vllm; the reference is transformers {transformers.__version__} (torch {torch.__version__}, experts
implementation `{args.experts_impl}`) on the same folders. {cpu}, {os.cpu_count()} cores shared with other
users' jobs (load average at the end: {os.getloadavg()[0]:.1f}). fp32, greedy, eager, no prefix caching.

Model: SmolLM2-135M-Instruct MoEfied into a Mixtral with E = {args.num_experts}, top-{args.top_k}
(`tasksieve.models.load_default_moe`). Pruned: {prep['report']}; pattern `{args.task}` from a store profiled as in
`bench/compose_moe.py` (essays / python / docs, {args.profile_tokens} tokens per task after the calibration prefix,
TCESS k = router top-k), keep {args.keep}. Both folders written by `ts.premoe.export` (what `tasksieve prune`
writes) and served by vLLM unchanged, no tasksieve code in the engine: safetensors {mib['unpruned']:.0f} MiB
unpruned, {mib['pruned']:.0f} MiB pruned; `check_vllm`: {prep['checks']['pruned']['num_experts']} experts in every
one of {prep['checks']['pruned']['moe_layers']} MoE layers.

## Agreement with transformers on the same folder

{len(prep['prompts'])} prompts of 48 tokens (4 essays, 3 Python source, 3 docs, from the evaluation chunks), {args.new_tokens} greedy
tokens each (no EOS stop); perplexity of {len(prep['eval'])} evaluation chunks of {args.seq_len} tokens (two per task,
disjoint from the MoE calibration and the profile), vLLM's through `prompt_logprobs`.

| folder | experts vLLM built | identical continuations | first differing token per prompt ({args.new_tokens} = none) | max logprob diff before it | ppl essays HF / vLLM | ppl python HF / vLLM | ppl docs HF / vLLM | max per-token NLL diff |
|---|---:|---:|---|---:|---:|---:|---:|---:|
""" + "\n".join(md_fid) + f"""

## Throughput in vLLM, pruned vs unpruned (same run)

Median tokens/s over {args.rounds} engine rounds (alternating unpruned / pruned) x {args.repeats} timed runs; every
run in parentheses. `decode b1`: one request, {args.timing_tokens} generated tokens; `decode b16`: 16 requests of 64-token
prompts, {args.timing_tokens} tokens each; `prefill 4x512`: four 512-token prompts, one generated token. Engine start
(s): unpruned {startup['unpruned']}, pruned {startup['pruned']}.

| run | unpruned | pruned | pruned / unpruned |
|---|---:|---:|---:|
""" + "\n".join(md_time) + """

## Reading

(written by hand after reading the numbers)
"""
    (out / "premoe.md").write_text(text)
    (out / "premoe.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "prep": {k: prep[k] for k in ("checks", "report", "folder_bytes")},
                                                  "runs": runs, "tps": {f"{m}|{w}": v for (m, w), v in tps.items()}},
                                                 indent=1))
    print(text)


if __name__ == "__main__":
    main()
