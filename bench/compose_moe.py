"""All three methods composed on one MoE model: FlexPrefill + WindowKV + PreMoe on the MoEfied SmolLM2, NIAH grid.

The model is SmolLM2-135M-Instruct MoEfied by ``tasksieve.moefy`` into a standard HF Mixtral (E = 16 experts, top-8,
cached under ~/.cache/tasksieve/moe/, see bench/premoe_fidelity.py). A PreMoe pattern store is profiled on the three
tasks (essays / python / docs, profile chunks taken after the MoE-build calibration prefix as in
premoe_fidelity.py) and the essays pattern is used (the NIAH haystack is essays), keep 0.5 (8 of 16 experts).

Every configuration runs the SAME passkey cases (``tasksieve.evaluation.niah.build_case``, essays haystack):

- ``moe-dense``: the MoE model unpatched (plain HF forward and cache): the reference;
- ``prefill``: ``ts.patch(model, prefill=FlexPrefill(...))``;
- ``kv``: ``ts.patch(model, kv=WindowKV(...))``;
- ``moe``: ``ts.patch(model, moe=PreMoe(pattern=essays, keep=0.5))``;
- ``all three``: ONE ``ts.patch(model, kv=..., prefill=..., moe=...)``;
- ``pruned ckpt +prefill+kv``: ``ts.premoe.prune(keep=0.5)`` -> ``export`` -> ``AutoModelForCausalLM.from_pretrained``,
  then ``ts.patch(kv=..., prefill=...)``;
- ``merged ckpt +prefill+kv``: the same with ``ts.premoe.merge(keep=8, top_k=8)`` (UNCURL) when the library has it.

Each configuration is a user's request: patch, a fresh ``DynamicCache``, one prompt forward (timed: "prefill"),
greedy decoding. As in ``tasksieve.evaluation.niah``, the reference's greedy answer is teacher-forced through each
configuration's cache (``kl_top1``; ``KL dec`` = decode steps only) and the KV bytes are read after the prefill
(``cache_nbytes``). Expert bytes: parameters of every ``experts`` module (resident) and of the experts routing may
pick (used; fewer than resident only for PreMoe by masking). A configuration the library refuses (e.g. a patch
that does not accept the model type yet) is recorded as skipped with the error.

Writes ``compose.md``, ``compose.csv``, ``compose.json``, ``compose.png`` (pass per length, KL, prefill time) and
``compose_cases.png`` (the niah per-case heatmap) to ``--out``.

    .venv/bin/python bench/compose_moe.py --threads 2        # ~30 min on 2 shared cores

Lengths default to 250-1000 tokens: a case (7 configurations, 16 new tokens each) costs ~2.5 min at 1000 tokens on
the shared 2-core CPU (prefill ~6 s, a decode step 0.25-0.45 s), so the 1000-4000 grid would take ~2.5 h.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import tasksieve as ts  # noqa: E402
from tasksieve import premoe  # noqa: E402
from tasksieve.evaluation import models, niah  # noqa: E402
from tasksieve.integrations.hf import moe as hf_moe  # noqa: E402

import premoe_fidelity as pf  # noqa: E402  (task streams and the profile/eval split of the fidelity bench)

CONFIGS = ("moe-dense", "prefill", "kv", "moe", "all three", "pruned ckpt +prefill+kv", "merged ckpt +prefill+kv")

CSV_FIELDS = niah.CSV_FIELDS + [
    "config", "spec", "model", "expert_bytes_resident", "expert_bytes_used", "experts_used_per_layer",
    "num_experts_resident", "first_kl", "first_agree",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=1024, help="MoE-build calibration tokens per task")
    p.add_argument("--profile-tokens", type=int, default=2048, help="TCESS profile tokens per task (x seq-len)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tcess-top-k", type=int, default=0,
                   help="k of TCESS (0 = the router's top-k, the better variant in bench/results/premoe; 1 = published)")
    p.add_argument("--task", default="essays", help="pattern of the store used by PreMoe / prune / merge")
    p.add_argument("--keep", type=float, default=0.5, help="PreMoe / prune: fraction of experts kept per layer")
    p.add_argument("--merge-keep", type=int, default=8, help="UNCURL merge: experts after merging")
    p.add_argument("--merge-top-k", type=int, default=8, help="UNCURL merge: router top-k after merging")
    p.add_argument("--lengths", default="250,500,750,1000",
                   help="context tokens (1000-4000 would take ~2.5 h on 2 shared cores; see the module docstring)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--kv-budget", type=float, default=0.25, help="WindowKV budget (fraction of the prompt)")
    p.add_argument("--gamma", type=float, default=0.95, help="FlexPrefill gamma")
    p.add_argument("--block-size", type=int, default=64, help="FlexPrefill block size")
    p.add_argument("--min-budget", type=int, default=128,
                   help="FlexPrefill min_budget in tokens (2 blocks of 64: the prompts here are 5-17 blocks)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts-impl", default="grouped_mm",
                   help="HF experts implementation of the unpatched MoE blocks (grouped_mm: 6 s prefill at 1k tokens "
                        "and 0.24 s per decode step here, eager 15 s and 4.7 s)")
    p.add_argument("--store-cache", type=Path, default=None,
                   help="load the pattern store from this file when it exists, else profile and save it there")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--budget-min", type=float, default=25.0,
                   help="warn (after the first case) when the estimated grid time exceeds this many minutes")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compose_moe")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw the PNGs and compose.md from --out/compose.*")
    p.add_argument("--reading", type=Path, default=None,
                   help="with --replot: a markdown file whose text becomes the 'Reading' section of compose.md")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# models and patches


def expert_bytes(model) -> tuple[int, int, list]:
    """(resident, used, experts used per MoE layer): parameters of every MoE layer's ``experts`` module, and of the
    experts routing may pick (PreMoe masking keeps all resident but lets routing pick only the kept ones)."""
    allowed = None
    if hf_moe.is_moe_patched(model):
        allowed = hf_moe.moe_info(model)["allowed_experts"]
    resident = used = 0
    counts = []
    for i, site in enumerate(hf_moe.moe_sites(model)):
        experts = site.block.experts if hasattr(site.block, "experts") else getattr(site.parent, site.attr).experts
        nbytes = sum(p.numel() * p.element_size() for p in experts.parameters())
        held = int(experts.gate_up_proj.shape[0])
        n = held if allowed is None or allowed[i] is None else len(allowed[i])
        resident += nbytes
        used += nbytes * n // held
        counts.append(n)
    return resident, used, counts


class Config:
    """One configuration: which model, and what ``ts.patch`` gets (``None`` everywhere = unpatched)."""

    def __init__(self, name, model_key, kv=None, prefill=None, moe=None):
        self.name, self.model_key, self.kv, self.prefill, self.moe = name, model_key, kv, prefill, moe

    @property
    def patched(self) -> bool:
        return any(x is not None for x in (self.kv, self.prefill, self.moe))

    def spec(self) -> str:
        parts = [f"model={self.model_key}"]
        for k in ("kv", "prefill", "moe"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{k}={_short(v)}")
        return "; ".join(parts)

    def apply(self, model) -> None:
        if self.patched:
            ts.patch(model, kv=self.kv, prefill=self.prefill, moe=self.moe)

    def remove(self, model) -> None:
        if self.patched and (hf_moe.is_moe_patched(model) or ts.hf.is_patched(model)):
            ts.unpatch(model)


def _short(obj) -> str:
    if isinstance(obj, ts.PreMoe):
        pat = obj.pattern
        pname = getattr(pat, "task", None) or type(pat).__name__
        return f"PreMoe(pattern={pname}, keep={obj.effective_keep}, renorm={obj.renorm})"
    return repr(obj)


# ----------------------------------------------------------------------------------------------------------------
# one request


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.inference_mode()
def prefill(model, ids):
    """One prompt forward on a fresh cache, as a user's request. Returns (last logits [V] fp32, cache)."""
    cache = _new_cache(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{niah.cache_kwarg(model): cache})
    return out.logits[0, -1].float(), cache


@torch.inference_mode()
def greedy(model, cache, first_logits, max_new_tokens, eos):
    """Greedy decoding from a prefilled cache: niah's own loop on a KV/prefill-patched model (its tasksieve cache),
    the same loop with plain HF forwards otherwise. Returns (tokens, per-step logits [T, V])."""
    if ts.hf.is_patched(model):
        return niah._greedy(model, None, cache, first_logits, max_new_tokens, eos)
    logits = [first_logits.float()]
    tokens: list[int] = []
    for step in range(max_new_tokens):
        tok = int(logits[-1].argmax(-1))
        tokens.append(tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{niah.cache_kwarg(model): cache})
        logits.append(out.logits[0, -1].float())
    return tokens, torch.stack(logits[: len(tokens)])


def run_request(model, cfg: Config, case, max_new_tokens, eos, dense_tokens=None):
    """Patch, prefill (timed), read KV bytes / block ratio / expert bytes, teacher-force ``dense_tokens``, greedy,
    unpatch. Returns a dict of raw results."""
    ids = case.input_ids
    cfg.apply(model)
    try:
        t0 = time.perf_counter()
        first, cache = prefill(model, ids)
        prefill_s = time.perf_counter() - t0
        ratio = float("nan")
        if cfg.prefill is not None:
            r = ts.last_info(model).get("prefill_block_ratio")
            ratio = float("nan") if r is None else float(r)
        nbytes = niah.cache_nbytes(cache)
        resident, used, counts = expert_bytes(model)
        ref = None
        if dense_tokens is not None:
            tf_cache = copy.deepcopy(cache)
            ref = niah._teacher_force(model, tf_cache, first, dense_tokens)
            del tf_cache
        t0 = time.perf_counter()
        tokens, logits = greedy(model, cache, first, max_new_tokens, eos)
        decode_s = time.perf_counter() - t0
        del cache
    finally:
        cfg.remove(model)
    return dict(first=first, prefill_s=prefill_s, ratio=ratio, kv_bytes=nbytes, resident=resident, used=used,
                counts=counts, ref=ref, tokens=tokens, logits=logits, decode_s=decode_s)


# ----------------------------------------------------------------------------------------------------------------
# main


def build_models(args, tokenizer, moe, pattern, skipped: dict, configs: list[str], tmp: Path) -> dict:
    """The reloaded pruned / merged checkpoints that ``configs`` need; a missing one goes to ``skipped``."""
    out = {"moe": moe}
    from transformers import AutoModelForCausalLM

    def reload(folder):
        return inference_ready(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), args)

    if "pruned ckpt +prefill+kv" in configs:
        m = copy.deepcopy(moe)
        report = premoe.prune(m, pattern, keep=args.keep)
        print(report)
        premoe.export(m, tmp / "pruned", tokenizer)
        del m
        out["pruned"] = reload(tmp / "pruned")
        out["pruned_report"] = str(report)
    if "merged ckpt +prefill+kv" in configs:
        merge = getattr(premoe, "merge", None)
        if merge is None:
            skipped["merged ckpt +prefill+kv"] = ("`ts.premoe.merge` (UNCURL expert merging) does not exist in this "
                                                  "tasksieve yet")
        else:
            try:
                m = copy.deepcopy(moe)
                report = merge(m, pattern, keep=args.merge_keep, top_k=args.merge_top_k)
                print(report)
                premoe.export(m, tmp / "merged", tokenizer)
                del m
                out["merged"] = reload(tmp / "merged")
                out["merged_report"] = str(report)
            except Exception as e:  # noqa: BLE001 - recorded, the rest of the grid runs
                skipped["merged ckpt +prefill+kv"] = f"merge/export/reload failed: {type(e).__name__}: {e}"
    return out


def inference_ready(model, args):
    """eval mode, no parameter requires grad, the chosen HF experts implementation.

    ``requires_grad_(False)`` is needed, not cosmetic: the CPU ``moe_forward`` calls ``at::mm`` on the expert
    weights inside ``at::parallel_for`` workers, which do not inherit the caller's inference mode, so with weights
    that require grad and more than one torch thread it fails under ``torch.inference_mode()`` ("Inference tensors
    cannot be saved for backward"), which niah's decoding helpers use."""
    model.eval()
    model.requires_grad_(False)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(args.experts_impl)
    return model


def make_configs(args, pattern) -> dict[str, Config]:
    fp = ts.FlexPrefill(gamma=args.gamma, block_size=args.block_size, min_budget=args.min_budget)
    kv = ts.WindowKV(budget=args.kv_budget)
    pm = ts.PreMoe(pattern=pattern, keep=args.keep)
    return {
        "moe-dense": Config("moe-dense", "moe"),
        "prefill": Config("prefill", "moe", prefill=fp),
        "kv": Config("kv", "moe", kv=kv),
        "moe": Config("moe", "moe", moe=pm),
        "all three": Config("all three", "moe", kv=kv, prefill=fp, moe=pm),
        "pruned ckpt +prefill+kv": Config("pruned ckpt +prefill+kv", "pruned", kv=kv, prefill=fp),
        "merged ckpt +prefill+kv": Config("merged ckpt +prefill+kv", "merged", kv=kv, prefill=fp),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in wanted:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown {c!r}; choose from {', '.join(CONFIGS)}")
    if "moe-dense" not in wanted:
        wanted = ["moe-dense"] + wanted  # the reference every KL is measured against
    wanted = [c for c in CONFIGS if c in wanted]

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = models.load_default()
    moe, _ = models.load_default_moe(args.num_experts, args.top_k, calib_tokens_per_task=args.calib_tokens,
                                     dense=dense, tokenizer=tokenizer)
    del dense
    inference_ready(moe, args)

    # PreMoe pattern store on the three tasks, profile chunks after the MoE-build calibration prefix
    t0 = time.time()
    streams = pf.task_streams(tokenizer)
    profile_ids = {t: pf.split_stream(s, args.calib_tokens, args.profile_tokens, 0, args.seq_len)[0]
                   for t, s in streams.items()}
    if args.store_cache is not None and args.store_cache.is_file():
        store = premoe.PatternStore.load(args.store_cache, model=moe, tokenizer=tokenizer)
        store_src = f"loaded from {args.store_cache}"
    else:
        store = premoe.profile(moe, {t: [profile_ids[t]] for t in pf.TASKS}, tokenizer,
                               max_tokens=args.profile_tokens, top_k=args.tcess_top_k or None, seq_len=args.seq_len,
                               batch_size=2, progress=True)
        store_src = "profiled in this run"
        if args.store_cache is not None:
            store.save(args.store_cache)
    profile_s = time.time() - t0
    pattern = store[args.task]

    skipped: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="compose_moe_"))
    mdl = build_models(args, tokenizer, moe, pattern, skipped, wanted, tmp)
    configs = make_configs(args, pattern)

    cases = [(n, d) for n in lengths for d in depths]
    # warm-up: one short forward per configuration (thread pools, first-call costs), so the first timed case is not
    # charged for them
    warm = niah.build_case(tokenizer, 256, 0.5, haystack="essays", seed=args.seed)
    for name in [c for c in wanted if c not in skipped]:
        cfg = configs[name]
        try:
            cfg.apply(mdl[cfg.model_key])
            prefill(mdl[cfg.model_key], warm.input_ids)
        except ValueError:
            pass  # recorded as skipped by the grid
        finally:
            cfg.remove(mdl[cfg.model_key])
    # retrieval check: which task does the store pick for the first NIAH prompt (PreMoe's probe)?
    probe_case = niah.build_case(tokenizer, lengths[0], depths[0], haystack="essays", seed=args.seed)
    retrieved = store.retrieve(probe_case.input_ids[0], model=moe).task

    eos = niah._eos_ids(moe, tokenizer)
    rows: list[dict] = []
    active = [c for c in wanted if c not in skipped]
    bar = tqdm(total=len(cases) * len(active), desc="compose", unit="run")
    first_case_s = None
    torch.manual_seed(args.seed)
    try:
        for ci, (n, d) in enumerate(cases):
            t_case = time.time()
            case = niah.build_case(tokenizer, n, d, haystack="essays", seed=args.seed)
            ref = run_request(mdl["moe"], configs["moe-dense"], case, args.max_new_tokens, eos)
            dense_tokens, dense_logits = ref["tokens"], ref["logits"]
            dense_bytes = ref["kv_bytes"]
            for name in active:
                bar.set_postfix_str(f"n={n} d={d:g} {name}")
                cfg = configs[name]
                if name == "moe-dense":
                    res = ref
                    kl, agree = niah.kl_top1(dense_logits, dense_logits)
                else:
                    try:
                        res = run_request(mdl[cfg.model_key], cfg, case, args.max_new_tokens, eos, dense_tokens)
                    except ValueError as e:
                        skipped[name] = f"{type(e).__name__}: {e}"
                        bar.total -= len(cases) - ci - 1  # its later cases will not run
                        bar.update(1)
                        tqdm.write(f"skipping {name!r}: {skipped[name]}")
                        continue
                    kl, agree = niah.kl_top1(dense_logits, res["ref"])
                answer = niah._decode(tokenizer, [t for t in res["tokens"] if t not in eos]).strip()
                row = niah._row(case, name, answer, kl, agree, len(dense_tokens), res["kv_bytes"], dense_bytes,
                                prefill_s=res["prefill_s"], decode_s=res["decode_s"],
                                sparse_prefill=cfg.prefill is not None, prefill_block_ratio=res["ratio"])
                row.update(config=name, spec=cfg.spec(), model=cfg.model_key, expert_bytes_resident=res["resident"],
                           expert_bytes_used=res["used"], experts_used_per_layer=_counts(res["counts"]),
                           num_experts_resident=_counts([int(x) for x in _held(mdl[cfg.model_key])]),
                           first_kl=float(kl[0]), first_agree=bool(agree[0]))
                rows.append(row)
                bar.update(1)
            active = [c for c in active if c not in skipped]
            write_csv(args.out / "compose.csv", rows)  # after every case, so an interrupted run keeps its rows
            if ci == 0:
                first_case_s = time.time() - t_case
                est = _estimate(first_case_s, lengths, depths)
                tqdm.write(f"first case (n={n}) took {first_case_s:.0f} s for {len(active)} configs; estimated grid "
                           f"{est / 60:.0f} min (half fixed, half ~ length)"
                           + (f"  ** over the {args.budget_min:.0f} min budget: use shorter --lengths **"
                              if est / 60 > args.budget_min else ""))
    finally:
        bar.close()
    runtime = time.time() - t_start

    meta = dict(
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), runtime_s=round(runtime),
        profile_s=round(profile_s), store_src=store_src, git=_git(), first_case_s=None if first_case_s is None else round(first_case_s),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}, "
                f"no GPU", versions=_versions(),
        command=".venv/bin/python bench/compose_moe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        lengths=lengths, depths=depths, configs=wanted, skipped=skipped, retrieved_for_niah_prompt=retrieved,
        specs={k: configs[k].spec() for k in wanted},
        store_tokens={t: len(profile_ids[t]) for t in pf.TASKS}, moefy=_moefy_info(moe),
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        reports={k: mdl[k] for k in ("pruned_report", "merged_report") if k in mdl},
    )
    write_all(args, rows, meta)
    print((args.out / "compose.md").read_text())
    print(f"wrote {args.out}/compose.md, .csv, .json{'' if args.no_plot else ', .png'} in {runtime:.0f} s")
    return 0


def _git() -> str:
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.rstrip("\n")

    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "python", "csrc").splitlines()]
    return f"{git('rev-parse', '--short', 'HEAD')}" + (f" (uncommitted changes in {', '.join(dirty)})" if dirty
                                                       else " (python/ and csrc/ clean)")


def _held(model) -> list[int]:
    return [int(s.block.experts.gate_up_proj.shape[0]) for s in hf_moe.moe_sites(model)]


def _counts(counts) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))


def _estimate(first_s: float, lengths, depths) -> float:
    """Grid time from the first case: about half of a short case is decoding, which does not grow with the length
    (measured: 106 s at n=250, ~2.5 min at n=1000 on the shared 2-core machine)."""
    n0 = lengths[0]
    return first_s * len(depths) * sum(0.5 + 0.5 * n / n0 for n in lengths)


def _versions() -> str:
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def _moefy_info(moe) -> dict:
    info = getattr(moe.config, "tasksieve_moefy", None) or {}
    keep = ("calib_tokens", "seq_len", "seed", "ridge", "router_tolerance")
    return {k: info[k] for k in keep if k in info}


# ----------------------------------------------------------------------------------------------------------------
# reporting


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def summary(rows, meta) -> list[dict]:
    lengths = meta["lengths"]
    out = []
    for name in meta["configs"]:
        rs = [r for r in rows if r["config"] == name]
        if not rs:
            out.append(dict(config=name, skipped=meta["skipped"].get(name, "no rows")))
            continue
        longest = max(int(r["length"]) for r in rs)
        rl = [r for r in rs if int(r["length"]) == longest]
        ratios = [float(r["prefill_block_ratio"]) for r in rs if not math.isnan(float(r["prefill_block_ratio"]))]
        out.append(dict(
            config=name, spec=rs[0]["spec"], n=len(rs), passed=sum(bool(r["passed"]) for r in rs),
            per_length={n: (sum(bool(r["passed"]) for r in rs if int(r["length"]) == n),
                            sum(1 for r in rs if int(r["length"]) == n)) for n in lengths},
            kl=statistics.fmean(float(r["kl"]) for r in rs),
            kl_decode=statistics.fmean(float(r["kl_decode"]) for r in rs),
            top1_decode=statistics.fmean(float(r["top1_decode"]) for r in rs),
            first_agree=statistics.fmean(float(bool(r["first_agree"])) for r in rs),
            prefill_s={n: _med([float(r["prefill_s"]) for r in rs if int(r["length"]) == n]) for n in lengths},
            kv_bytes_longest=_med([int(r["kv_bytes"]) for r in rl]),
            kv_pct=statistics.fmean(float(r["kv_kept_pct"]) for r in rs), longest=longest,
            expert_resident=int(rs[0]["expert_bytes_resident"]), expert_used=int(rs[0]["expert_bytes_used"]),
            experts_used=rs[0]["experts_used_per_layer"], experts_held=rs[0]["num_experts_resident"],
            block_ratio=statistics.fmean(ratios) if ratios else None,
            block_ratio_by_len={n: statistics.fmean(v) if (v := [float(r["prefill_block_ratio"]) for r in rs
                                                                 if int(r["length"]) == n
                                                                 and not math.isnan(float(r["prefill_block_ratio"]))])
                                else None for n in lengths},
        ))
    return out


def table(summ, meta) -> str:
    lengths = meta["lengths"]
    head = (["config", "pass"] + [f"pass n={n}" for n in lengths] + ["KL dec", "top-1 dec", "KL (all)", "1st tok = ref"]
            + [f"prefill s n={n}" for n in lengths] + ["KV bytes (n={})".format(max(lengths)), "expert bytes resident / used",
                                                       "block ratio"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summ:
        if "skipped" in s:
            lines.append(f"| `{s['config']}` | skipped: {s['skipped']} |" + " |" * (len(head) - 2))
            continue
        cells = [f"`{s['config']}`", f"{s['passed']}/{s['n']}"]
        cells += [f"{a}/{b}" for a, b in (s["per_length"][n] for n in lengths)]
        cells += [f"{s['kl_decode']:.4f}", f"{100 * s['top1_decode']:.1f}%", f"{s['kl']:.4f}",
                  f"{100 * s['first_agree']:.0f}%"]
        cells += [f"{s['prefill_s'][n]:.1f}" for n in lengths]
        cells.append(f"{_fmt_bytes(s['kv_bytes_longest'])} ({s['kv_pct']:.0f}%)")
        same = s["expert_resident"] == s["expert_used"]
        cells.append(f"{_fmt_bytes(s['expert_resident'])} ({s['experts_held']} exp.)" if same else
                     f"{_fmt_bytes(s['expert_resident'])} / {_fmt_bytes(s['expert_used'])} "
                     f"({s['experts_held']} / {s['experts_used']} exp.)")
        cells.append("-" if s["block_ratio"] is None else
                     f"{100 * s['block_ratio']:.0f}% (" + ", ".join(
                         "-" if s["block_ratio_by_len"][n] is None else f"{100 * s['block_ratio_by_len'][n]:.0f}"
                         for n in lengths) + ")")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_all(args, rows, meta) -> None:
    out = args.out
    write_csv(out / "compose.csv", rows)
    summ = summary(rows, meta)
    (out / "compose.json").write_text(json.dumps({**meta, "summary": summ}, indent=2, default=str))
    write_markdown(args, summ, meta)
    if not args.no_plot and rows:
        write_plot(out / "compose.png", summ, meta)
        niah.plot_heatmap(rows, out / "compose_cases.png",
                          title="MoEfied SmolLM2: passkey per case (green pass / red fail; cell = KL dec vs moe-dense)")


def write_markdown(args, summ, meta) -> None:
    a = meta["args"]
    E, k = a["num_experts"], a["top_k"]
    lines = [
        "# FlexPrefill + WindowKV + PreMoe composed on one MoE model (NIAH passkey)",
        "",
        f"Model: SmolLM2-135M-Instruct MoEfied by `tasksieve.moefy` into a standard HF Mixtral, E = {E} experts, "
        f"top-{k} (fp32, CPU). Haystack: essays; needle depths {meta['depths']}, lengths {meta['lengths']} tokens "
        f"({len(meta['depths']) * len(meta['lengths'])} cases), greedy, {a['max_new_tokens']} new tokens.",
        "",
        "Configurations (each a user's request: `ts.patch` -> fresh cache -> one prompt forward -> greedy decode):",
        "",
    ]
    for name, spec in meta["specs"].items():
        lines.append(f"- `{name}`: {spec}")
    lines += [
        "",
        table(summ, meta),
        "- `pass`: the 5-digit key appears in the greedy answer. `KL dec` / `top-1 dec`: the reference's (`moe-dense`) "
        "greedy answer teacher-forced through the configuration's cache, KL(ref || config) in nats and top-1 "
        "agreement over the decode steps (as `tasksieve.evaluation.niah`); `KL (all)` includes the first answer "
        "token, which prefill- and MoE-changing configurations predict from their own prompt forward; `1st tok = ref`: "
        "share of cases whose first answer token equals the reference's.",
        "- `prefill s`: median over the depths of the prompt forward's wall time (patched model, fresh cache), "
        "measured in this run on a shared CPU: compare within a column, expect noise of tens of percent.",
        f"- `KV bytes`: K/V tensors after the prefill at n = {max(meta['lengths'])} (median), and in parentheses the "
        "mean over all cases as % of the reference's.",
        "- `expert bytes`: parameters of all MoE layers' `experts` modules; resident / used where PreMoe masks (the "
        "kept experts' share). `block ratio`: FlexPrefill's computed / causal key blocks "
        "(`ts.last_info(model)['prefill_block_ratio']`), mean over cases, then per length.",
    ]
    if meta["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- `{k}`: {v}" for k, v in meta["skipped"].items()]
    lines += ["", "## Reading", "", meta.get("reading", "_(filled in by hand after the run)_"), ""]
    lines += [
        "## Settings",
        "",
        f"- PreMoe store: `ts.premoe.profile` on essays / python / docs, {a['profile_tokens']} tokens per task in "
        f"chunks of {a['seq_len']} spread over each task stream after the MoE-build calibration prefix "
        f"(`bench/premoe_fidelity.py`'s `split_stream`), TCESS k = "
        f"{a['tcess_top_k'] or k}{' (the router top-k)' if not a['tcess_top_k'] else ''}; pattern used: "
        f"`{a['task']}`, keep {a['keep']}. `store.retrieve` on the first NIAH prompt picks "
        f"`{meta['retrieved_for_niah_prompt']}`. Store {meta.get('store_src', '')}, {meta['profile_s']} s.",
        f"- The NIAH haystack is the first tokens of the essays text; the first {a['calib_tokens']} of them also "
        "calibrated the MoE build (the profile chunks do not overlap the calibration prefix).",
    ]
    for k, v in meta.get("reports", {}).items():
        lines.append(f"- {k.replace('_', ' ')}: {v}")
    lines += [
        "",
        "## Provenance",
        "",
        f"- Date: {meta['date']}; total run time {meta['runtime_s']} s (first case {meta['first_case_s']} s).",
        f"- Machine: {meta['machine']}; {meta['versions']}; experts implementation of the HF blocks "
        f"`{a['experts_impl']}`.",
        f"- Code: tasksieve at {meta.get('git', '?')}.",
        f"- Command: `{meta['command']}`"
        + (" (the Reading section was added afterwards with `--replot --reading FILE`, which redraws from the CSV)"
           if meta.get("reading") else ""),
    ]
    (args.out / "compose.md").write_text("\n".join(lines) + "\n")


def write_plot(path, summ, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = [s for s in summ if "skipped" not in s]
    lengths = meta["lengths"]
    names = [s["config"] for s in summ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) + 2.6),
                             gridspec_kw={"width_ratios": [1.1, 1.0, 1.2]})
    ax = axes[0]
    grid = torch.tensor([[s["per_length"][n][0] / max(1, s["per_length"][n][1]) for n in lengths] for s in summ])
    ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, s in enumerate(summ):
        for j, n in enumerate(lengths):
            a, b = s["per_length"][n]
            ax.text(j, i, f"{a}/{b}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("context tokens")
    ax.set_title("passkey found (per length)", fontsize=10)

    ax = axes[1]
    y = range(len(names))
    kls = [max(s["kl_decode"], 1e-6) for s in summ]
    ax.barh(list(y), kls, color="#4a7ab5")
    for i, s in enumerate(summ):
        ax.text(max(kls[i], 1.2e-4), i, f" {s['kl_decode']:.3f} / {100 * s['top1_decode']:.0f}%", va="center",
                fontsize=8)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("KL dec vs moe-dense (nats, log) / top-1 dec")
    ax.set_title("decode fidelity vs the unpatched MoE", fontsize=10)
    ax.set_xlim(1e-4, max(kls) * 20)

    ax = axes[2]
    for s in summ:
        ax.plot(lengths, [s["prefill_s"][n] for n in lengths], marker="o", label=s["config"])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("prefill wall time, median (s)")
    ax.set_title("prefill time, median over depths\n(2 CPU cores, wall clock, this run)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"MoEfied SmolLM2-135M (Mixtral E={meta['args']['num_experts']}, top-{meta['args']['top_k']}): "
                 "FlexPrefill + WindowKV + PreMoe composed", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(args) -> int:
    meta = json.loads((args.out / "compose.json").read_text())
    meta.pop("summary", None)
    meta["depths"] = [float(d) for d in meta["depths"]]
    if args.reading is not None:
        meta["reading"] = args.reading.read_text().strip()
    rows = []
    with open(args.out / "compose.csv", newline="") as f:
        for r in csv.DictReader(f):
            r["passed"] = r["passed"] == "True"
            r["first_agree"] = r["first_agree"] == "True"
            r["sparse_prefill"] = r.get("sparse_prefill") == "True"
            r["prefill_block_ratio"] = float(r["prefill_block_ratio"]) if r["prefill_block_ratio"] else float("nan")
            for k in ("kl", "kl_decode", "top1", "top1_decode", "depth"):
                r[k] = float(r[k])
            rows.append(r)
    meta["args"]["out"] = str(args.out)
    args_ns = argparse.Namespace(**{**vars(args), "out": args.out})
    write_all(args_ns, rows, meta)
    print((args.out / "compose.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
