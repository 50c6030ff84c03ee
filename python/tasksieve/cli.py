"""The ``tasksieve`` command.

    tasksieve demo  [--length 4000] [--depth 0.5] [--budget 0.12]    dense vs WindowKV on the embedded model
    tasksieve niah  [--lengths ...] [--depths ...] [--methods ...]    passkey grid + KL/top-1 vs full KV
    tasksieve ruler [--tasks ...] [--lengths ...] [--methods ...]     lm-eval's RULER tasks, dense vs each method (.venv-ruler)
    tasksieve bench ...                                               microbenchmarks (tasksieve.bench)
    tasksieve info  [--json]                                          what was built, which ops have kernels
    tasksieve profile --model M --task name=source ... --out store.safetensors     PreMoe TCESS per task
    tasksieve prune   --model M --store S --keep 0.5 (--prompt T | --task name) --out dir   retrieve, prune, export
    tasksieve export  --model M --out dir                             save a model as a plain HF safetensors folder
    tasksieve check-vllm DIR [--tp N]                                 can vLLM serve this exported folder unchanged?

M is a local HF folder (loaded offline), smollm2-135m (the embedded SmolLM2, GGUF dequantised),
smollm2-135m-moe[:<E>x<k>] (the MoEfied SmolLM2, default 16 experts top-8) or tiny:<family> (mixtral, qwen2_moe,
qwen3_moe, olmoe). A task source is a text file (split on blank lines), a .jsonl file (field "text") or a builtin:
pydoc, code, essays.

``python -m tasksieve ...`` is the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["build_parser", "main"]

DEFAULT_NIAH_METHODS = "dense,windowkv:0.12,snapkv:0.12,pyramidkv:0.12"
DEFAULT_NIAH_OUT = "bench/results/niah"
DEFAULT_RULER_METHODS = "dense,flexprefill:0.95:min_budget=2048,block_size=64,windowkv:0.12,windowkv:0.25,snapkv:0.12"
DEFAULT_RULER_OUT = "bench/results/ruler"


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(float(x)) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 16 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts >= 16, got {s!r}")
    return vals


def _depth_list(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {s!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {s!r}")
    return vals


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _budget(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a budget ratio in (0, 1], got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tasksieve",
        description="tasksieve: compute only what the task needs (sparse prefill, KV windows, expert pruning).",
    )
    sub = p.add_subparsers(dest="command", metavar="{demo,niah,ruler,bench,info,profile,prune,merge,export,check-vllm}")
    sub.required = True

    d = sub.add_parser("demo", help="dense vs WindowKV on the embedded SmolLM2-135M with a hidden passkey")
    d.add_argument("--length", type=_positive_int, default=4000, help="context tokens (default 4000)")
    d.add_argument("--depth", type=float, default=0.5, help="relative needle depth in [0, 1] (default 0.5)")
    d.add_argument("--budget", type=_budget, default=0.12, help="WindowKV budget ratio (default 0.12)")
    d.add_argument("--strategy", default="auto", help="WindowKV strategy: auto, max or mean (default auto)")
    d.add_argument("--group", type=_positive_int, default=None,
                   help="WindowKV layers sharing one selection (default: the WindowKV default)")
    d.add_argument("--window", type=_positive_int, default=None, help="WindowKV window length (default: WindowKV's)")
    d.add_argument("--haystack", choices=("essays", "pydoc"), default="essays")
    d.add_argument("--max-new-tokens", type=_positive_int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")

    n = sub.add_parser("niah", help="needle-in-a-haystack grid: pass rate, KL and top-1 agreement vs full KV")
    n.add_argument("--lengths", type=_int_list, default=[1000, 3000, 5000, 7000],
                   help="comma-separated context lengths in tokens (default 1000,3000,5000,7000)")
    n.add_argument("--depths", type=_depth_list, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="comma-separated needle depths (default 0.1,0.3,0.5,0.7,0.9)")
    n.add_argument("--methods", default=DEFAULT_NIAH_METHODS,
                   help="comma-separated: dense and/or name:budget with name in windowkv, snapkv, pyramidkv, "
                        "and/or flexprefill:gamma (sparse prefill), each with optional :key=value,... extras "
                        f"(default {DEFAULT_NIAH_METHODS})")
    n.add_argument("--haystack", choices=("essays", "pydoc"), default="essays")
    n.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded, default) or qwen2.5-coder-0.5b (make qwen-coder; 32k context)")
    n.add_argument("--out", default=DEFAULT_NIAH_OUT, help=f"output folder (default {DEFAULT_NIAH_OUT})")
    n.add_argument("--max-new-tokens", type=_positive_int, default=16)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--threads", type=_positive_int, default=None)
    n.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("ruler", help="lm-eval's offline RULER tasks on the embedded model, dense vs each method "
                                     "(needs lm-eval: make venv-ruler)")
    r.add_argument("--tasks", default="niah_single_1",
                   help="comma-separated: niah_single_1, niah_multikey_2, niah_multikey_3, vt, cwe, fwe "
                        "(ruler_vt, ...) (default niah_single_1)")
    r.add_argument("--lengths", type=_int_list, default=[4096], help="comma-separated sequence lengths (default 4096)")
    r.add_argument("--samples", "--limit", dest="samples", type=_positive_int, default=10,
                   help="samples per task and length, the same for every method (default 10)")
    r.add_argument("--methods", default=DEFAULT_RULER_METHODS,
                   help="comma-separated, as for niah (name:value or name@value, :key=value,... extras) "
                        f"(default {DEFAULT_RULER_METHODS})")
    r.add_argument("--max-gen-toks", type=_positive_int, default=32,
                   help="generation cap in tokens (default 32; the answer comes first)")
    r.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template (default off)")
    r.add_argument("--out", default=DEFAULT_RULER_OUT, help=f"output folder (default {DEFAULT_RULER_OUT})")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=_positive_int, default=None)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", action="store_true",
                   help="keep the answers already in OUT/ruler_samples.jsonl (same settings) and run only the rest")

    _add_premoe_parsers(sub)
    sub.add_parser("bench", help="microbenchmarks (arguments go to tasksieve.bench)", add_help=False)
    sub.add_parser("info", help="build and dispatch information (arguments go to tasksieve.info)", add_help=False)
    return p


# ----------------------------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


def _cache_tokens(cache) -> float:
    """Mean tokens per layer held by a cache (layers may differ after pyramid budgets)."""
    layers = getattr(cache, "layers", None)
    lens = []
    if layers is not None:
        for layer in layers:
            k = getattr(layer, "keys", None)
            if k is not None and hasattr(k, "shape") and k.dim() >= 3:
                lens.append(k.shape[-2])
    return sum(lens) / len(lens) if lens else float("nan")


def _timed_generate(model, ids, max_new_tokens: int):
    """Greedy generate; returns (new token ids, prefill seconds, decode seconds, cache)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class _Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([_Stamp()]),
        )
    t1 = time.perf_counter()
    prefill = (stamps[0] if stamps else t1) - t0
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers < 5.2x
        cache = getattr(out, "past_key_values", None)
    return out.sequences[0, ids.shape[1]:], prefill, t1 - t0 - prefill, cache


def _demo(args) -> int:
    import torch

    from .evaluation import models, niah
    from .integrations import hf
    from .methods.windowkv import WindowKV

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.depth <= 1.0:
        print(f"tasksieve demo: --depth must be in [0, 1], got {args.depth}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok = models.load_default()
    print(f"model: {models.DEFAULT_NAME}, loaded in {time.perf_counter() - t0:.1f} s "
          f"({torch.get_num_threads()} CPU threads)")
    case = niah.build_case(tok, args.length, args.depth, haystack=args.haystack, seed=args.seed)
    print(f"prompt: {case.prompt_tokens} tokens ({case.haystack} haystack), passkey {case.key} hidden at depth "
          f"{case.depth_actual:.2f}")
    print(f"question: {niah.QUESTION}\n")
    ids = case.input_ids
    eos = niah._eos_ids(model, tok)

    results = []
    new, pre, dec, cache = _timed_generate(model, ids, args.max_new_tokens)
    results.append(("dense (full KV)", new, pre, dec, cache, ""))

    extra = {k: getattr(args, k) for k in ("group", "window") if getattr(args, k) is not None}
    press = WindowKV(budget=args.budget, strategy=args.strategy, **extra)
    hf.patch(model, kv=press)
    try:
        new, pre, dec, cache = _timed_generate(model, ids, args.max_new_tokens)
        info = niah._press_info(model)
    finally:
        hf.unpatch(model)
    strategy = niah._strategy_of(info)
    if strategy and args.strategy == "auto" and info.get("auto_statistic") is not None:
        thr = getattr(press, "auto_threshold", None)
        strategy += f" (peak share {info['auto_statistic']:.3f}" + (f", threshold {thr:g})" if thr else ")")
    label = ", ".join([f"budget={args.budget:g}"] + [f"{k}={v}" for k, v in extra.items()])
    results.append((f"WindowKV({label})", new, pre, dec, cache, strategy))

    dense_bytes = niah.cache_nbytes(results[0][4])
    width = max(len(r[0]) for r in results)
    for name, new, pre, dec, cache, strategy in results:
        answer = niah._decode(tok, [t for t in new.tolist() if t not in eos]).strip()
        nb = niah.cache_nbytes(cache)
        ok = "PASS" if niah.passed(answer, case.key) else "FAIL"
        print(f"{name:<{width}}  answer: {answer!r}  [{ok}]")
        print(f"{'':<{width}}  KV cache: {_fmt_bytes(nb)} ({_cache_tokens(cache):.0f} tokens/layer, "
              f"{100.0 * nb / dense_bytes:.1f}% of dense)   prefill {pre:.2f} s + decode {dec:.2f} s "
              f"({len(new)} tokens)")
        if strategy:
            how = "picked by the auto rule" if args.strategy == "auto" else "(set explicitly)"
            print(f"{'':<{width}}  window strategy {how}: {strategy}")
    before, after = info.get("kv_bytes_before"), info.get("kv_bytes_after")
    if before and after:
        print(f"\nprompt KV after prefill: dense {_fmt_bytes(before)} -> WindowKV {_fmt_bytes(after)} "
              f"({100.0 * after / before:.1f}% kept)")
    print(f"key: {case.key}  (KV cache sizes above: at the end of generation, prompt + answer tokens)")
    return 0


def _niah(args) -> int:
    import torch

    from .evaluation import models, niah

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = niah.parse_methods(args.methods)
    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    print(f"model: {model.config._tasksieve_name}, loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    rows = niah.run_niah(model, tok, methods, lengths=args.lengths, depths=args.depths, haystack=args.haystack,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    haystack = rows[0]["haystack"] if rows else args.haystack
    cfg = niah.run_config(model, tok, lengths=args.lengths, depths=args.depths, methods=list(methods),
                          method_repr={k: repr(v) for k, v in methods.items()}, haystack=haystack,
                          haystack_requested=args.haystack, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          key_seeds={f"{n}@{d:g}": niah.case_seed(args.seed, n, d)
                                     for n in args.lengths for d in args.depths},
                          wall_s=round(wall, 1))
    paths = niah.write_results(rows, args.out, cfg)
    print(niah.summarize(rows))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _ruler(args) -> int:
    import torch

    from .evaluation import models, niah, ruler

    try:
        ruler.require_lm_eval()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = ruler.parse_tasks(args.tasks)
    methods = niah.parse_methods(ruler.method_specs(args.methods))
    t0 = time.perf_counter()
    model, tok = models.load_default()
    print(f"model: {models.DEFAULT_NAME}, loaded in {time.perf_counter() - t0:.1f} s")
    cfg = ruler.run_config(model, tok, model_short="SmolLM2-135M-Instruct", tasks=tasks, lengths=args.lengths,
                           samples=args.samples, methods=list(methods),
                           method_repr={k: repr(v) for k, v in methods.items()}, max_gen_toks=args.max_gen_toks,
                           chat_template=args.chat_template, seed=args.seed, host=ruler.host())
    previous = []
    jsonl = Path(args.out) / "ruler_samples.jsonl"
    if args.resume and jsonl.exists():
        previous = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
        print(f"resuming: {len(previous)} sample records in {jsonl}")
    t0 = time.perf_counter()

    def write(rows, records, done=False):
        cfg["wall_s"] = round(time.perf_counter() - t0, 1)
        cfg["complete"] = done
        return ruler.write_results(rows, records, args.out, cfg)

    # The files are rewritten after every (sample, method) step, so a run stopped early leaves its results so far.
    rows, records = ruler.run_ruler(model, tok, methods, tasks=tasks, lengths=args.lengths, samples=args.samples,
                                    max_gen_toks=args.max_gen_toks, apply_chat_template=args.chat_template,
                                    seed=args.seed, progress=not args.no_progress, on_step=write,
                                    previous=previous)
    wall = time.perf_counter() - t0
    paths = write(rows, records, done=True)
    print(ruler.summarize(rows))
    print(f"wall {wall:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# PreMoe: profile / prune / export

_DTYPES = ("float32", "bfloat16", "float16")


def _keep_arg(s: str):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] or an expert count, got {s!r}") from None
    if v > 1.0 and v.is_integer():
        return int(v)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] or an expert count, got {s!r}")
    return v


def _task_arg(s: str) -> tuple[str, str]:
    name, sep, source = s.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"expected name=source (a file or a builtin), got {s!r}")
    return name, source


def _add_premoe_parsers(sub) -> None:
    model_help = ("local HF model folder (offline), smollm2-135m-moe[:<E>x<k>] (the MoEfied SmolLM2, default 16x8) or "
                  "tiny:<family> with family in mixtral, qwen2_moe, qwen3_moe, olmoe")
    pr = sub.add_parser("profile", help="PreMoe: profile the TCESS of calibration tasks into a pattern store")
    pr.add_argument("--model", required=True, help=model_help)
    pr.add_argument("--task", type=_task_arg, action="append", required=True, metavar="NAME=SOURCE",
                    help="a task: NAME=file (.txt split on blank lines, .jsonl field text) or NAME=builtin "
                         "(pydoc, code, essays); repeat for several tasks")
    pr.add_argument("--out", required=True, help="output store (.safetensors)")
    pr.add_argument("--max-tokens", type=_positive_int, default=65536, help="tokens per task (default 65536)")
    pr.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    pr.add_argument("--batch-size", type=_positive_int, default=8)
    pr.add_argument("--top-k", type=_positive_int, default=1, help="k of TCESS (default 1, as published)")
    pr.add_argument("--dtype", choices=_DTYPES, default="float32")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--no-progress", action="store_true")

    pn = sub.add_parser("prune", help="PreMoe: retrieve a task pattern, prune the experts, export a smaller HF model")
    _add_reduce_args(pn, model_help, "kept", "pruning", "pruned")
    mg = sub.add_parser("merge", help="UNCURL: merge each MoE layer's experts by a task's router statistics, "
                                      "export a smaller HF model")
    _add_reduce_args(mg, model_help, "after merging", "merging", "merged")
    mg.add_argument("--affinity", choices=("logits", "coselect"), default="logits",
                    help="expert similarity: router-logit correlation (default, UNCURL) or co-selection (ablation)")
    mg.add_argument("--no-align", action="store_true", help="average without aligning hidden units (ablation)")
    mg.add_argument("--seed", type=int, default=0, help="k-means seed of the spectral clustering")

    ex = sub.add_parser("export", help="save a model as a plain HF safetensors folder (+ tokenizer) that transformers "
                                       "and vLLM load offline")
    ex.add_argument("--model", required=True,
                    help="smollm2-135m (the embedded SmolLM2, its GGUF dequantised), " + model_help)
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--dtype", choices=_DTYPES, default="float32")

    cv = sub.add_parser("check-vllm", help="check that vLLM can serve an exported folder unchanged (one expert count "
                                           "for all MoE layers, config and weights agree, top-k, tensor parallel)")
    cv.add_argument("folder", help="a folder written by tasksieve prune / merge / export")
    cv.add_argument("--tp", type=_positive_int, default=1, help="tensor_parallel_size vLLM will use (default 1)")


def _add_reduce_args(p, model_help: str, kept: str, doing: str, done: str) -> None:
    """Arguments shared by ``prune`` and ``merge``: model, store, keep, task or prompt, top-k, output."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--store", required=True, help="pattern store written by tasksieve profile")
    p.add_argument("--keep", type=_keep_arg, default=0.5,
                   help=f"experts {kept} per MoE layer: ratio in (0, 1] or a count (default 0.5)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--prompt", help="retrieve the nearest task for this prompt")
    how.add_argument("--task", dest="task_name", help="use this stored task")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help=f"experts per token after {doing} (default: the router's; needed when --keep is smaller)")
    p.add_argument("--out", required=True, help=f"output folder of the {done} HF checkpoint")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--device", default="cpu")


def _premoe_model(args):
    import torch

    from .evaluation.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=getattr(args, "device", "cpu"))


def _premoe(args) -> int:
    from .evaluation.tasks import task_texts
    from .integrations.hf import premoe

    try:
        model, tok = _premoe_model(args)
        if args.command == "profile":
            texts = {name: task_texts(source) for name, source in args.task}
            t0 = time.perf_counter()
            store = premoe.profile(model, texts, tok, top_k=args.top_k, max_tokens=args.max_tokens,
                                   seq_len=args.seq_len, batch_size=args.batch_size, progress=not args.no_progress)
            path = store.save(args.out)
            print(f"profiled {', '.join(f'{t} ({store.tokens[t]} tokens)' for t in store.tasks)} in "
                  f"{time.perf_counter() - t0:.1f} s; wrote {path}")
        elif args.command in ("prune", "merge"):
            store = premoe.PatternStore.load(args.store, model=model, tokenizer=tok)
            if args.prompt is not None:
                pattern = store.retrieve(args.prompt)
                print(f"retrieved task {pattern.task!r} (L2 distance {pattern.distance:.4g}; tasks {store.tasks})")
            elif args.task_name not in store:
                raise ValueError(f"--task: {args.task_name!r} is not in the store (tasks: {store.tasks})")
            else:
                pattern = store[args.task_name]
            if args.command == "prune":
                report = premoe.prune(model, pattern, keep=args.keep, top_k=args.top_k)
            else:
                from .integrations.hf.uncurl import merge

                report = merge(model, pattern, keep=args.keep, top_k=args.top_k, affinity=args.affinity,
                               align=not args.no_align, seed=args.seed)
            out = premoe.export(model, args.out, tok)
            print(report)
            print(f"wrote {out}")
            _print_vllm(out)
        else:
            from .evaluation.models import save_hf
            from .integrations.hf.moe import moe_convention

            try:
                moe_convention(model)
            except ValueError:  # a dense model (the embedded SmolLM2): a plain folder, the GGUF dequantised
                out = save_hf(model, args.out, tok)
            else:
                out = premoe.export(model, args.out, tok)
            print(f"wrote {out}")
            _print_vllm(out)
    except (ValueError, KeyError) as e:
        print(f"tasksieve {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def _print_vllm(folder) -> None:
    from .integrations.hf.premoe import check_vllm

    info = check_vllm(folder)
    what = (f"{info['architecture']}, {info['num_experts']} experts per MoE layer, top-{info['top_k']}"
            if info["num_experts"] else f"{info['architecture']}, dense")
    print(f"vLLM: servable unchanged ({what}): vllm serve {folder}")


def _check_vllm(args) -> int:
    from .integrations.hf.premoe import check_vllm

    try:
        info = check_vllm(args.folder, tensor_parallel_size=args.tp)
    except ValueError as e:
        print(f"tasksieve check-vllm: {e}", file=sys.stderr)
        return 2
    what = (f"{info['num_experts']} experts in each of {info['moe_layers']} MoE layers, top-{info['top_k']}"
            if info["num_experts"] else "dense")
    print(f"{args.folder}: vLLM can serve it unchanged as {info['architecture']} ({what}) at tensor_parallel_size "
          f"{args.tp}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .evaluation import bench

        return int(bench.main(argv[1:]) or 0)
    if argv and argv[0] == "info":
        from .ops import info

        return int(info.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "niah":
        return _niah(args)
    if args.command == "ruler":
        return _ruler(args)
    if args.command in ("profile", "prune", "merge", "export"):
        return _premoe(args)
    if args.command == "check-vllm":
        return _check_vllm(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
