"""RULER through lm-eval: a peer-written long-context suite on a (patched) HuggingFace model.

lm-eval's RULER tasks build their samples themselves with the model's tokenizer, so the prompts, the answers and the
scoring (``string_match_all``: the fraction of reference strings found in the generation) are lm-eval's, not ours.
Only the synthetic tasks whose haystack is generated run offline:

- ``niah_single_1`` ("repeat" haystack: one sentence repeated, a 7-digit number for a word key),
- ``niah_multikey_2`` / ``niah_multikey_3`` ("needle" haystack: distractor needles; number or UUID values),
- ``ruler_vt`` (variable tracking), ``ruler_cwe`` (common words), ``ruler_fwe`` (frequent words).

The essay haystack (``niah_single_2`` ...) and the QA tasks download data sets and cannot run here. lm-eval's RULER
module also tries to download nltk's ``punkt_tab`` at import; without network that prints an error and goes on (the
tasks above never split sentences).

Every method runs the same samples: one ``lm_eval.simple_evaluate`` call per (length, sample, method) with the same
seeds and ``max_seq_lengths=[length]``, so the synthetic data are regenerated identically (checked: the prompts' hashes
must agree across methods, else :func:`run_ruler` raises); lm-eval's ``samples`` argument picks document ``i`` (the
first ``samples`` documents of each task). Sample-major order means a run cut short still has every method on the same
samples, and the CLI rewrites the result files after every step. The
model is wrapped once in lm-eval's ``HFLM`` (batch 1, greedy) and patched / unpatched around each call:
``dense`` (unpatched), KV presses (``windowkv:0.12``, ``snapkv:0.12``, ``pyramidkv:0.12``) through
``hf.patched(model, kv=...)``, ``flexprefill:<gamma>[:k=v,...]`` through ``hf.patched(model, prefill=...)``. Method specs
are niah's: ``niah.parse_methods(ruler.method_specs("dense,windowkv@0.12"))`` (``name@x`` is accepted as ``name:x``);
this module does not import niah itself, to keep the import chain shallow (tests/test_layering.py).

The RULER tasks look their tokenizer up by name or path (``AutoTokenizer.from_pretrained``), so the model's
tokenizer is saved with ``save_pretrained`` into a cache folder (``$TASKSIEVE_CACHE/ruler/tokenizer-<hash>``) and that
path is passed as the task metadata ``tokenizer``.

Generation is capped at ``max_gen_toks`` tokens (default 32; the tasks' own caps are 30-128). For the NIAH tasks the
answer comes first, so the cap does not change their scores; ``ruler_cwe`` asks for 10 words and may be cut by a small
cap. The cap is written into every result file.

Outputs (:func:`write_results`): ``ruler.md`` (table: task x length rows, method columns), ``ruler.csv`` (one row per
task, length and method), ``ruler.png`` (grouped bars), ``ruler_samples.jsonl`` (every sample's references, answer,
score and prompt hash) and ``ruler.json`` (configuration and versions).

Needs ``lm_eval`` (``make venv-ruler`` builds ``.venv-ruler`` with lm-eval pinned); importing this module does not.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .._version import __version__
from ..integrations import hf
from ..methods.flexprefill import FlexPrefill

__all__ = [
    "CSV_FIELDS",
    "DEFAULT_MAX_GEN_TOKS",
    "OFFLINE_TASKS",
    "TASK_ALIASES",
    "method_specs",
    "parse_tasks",
    "require_lm_eval",
    "run_ruler",
    "save_tokenizer",
    "summarize",
    "write_results",
]

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
TASK_ALIASES = {"vt": "ruler_vt", "cwe": "ruler_cwe", "fwe": "ruler_fwe"}
NEEDS_DOWNLOAD = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
                  "ruler_qa_squad", "ruler_qa_hotpot", "qa_squad", "qa_hotpot")  # fmt: skip
DEFAULT_MAX_GEN_TOKS = 32
# RULER sizes every prompt to length - 128 tokens (room for its longest generation), whatever the cap.
RULER_RESERVED_TOKENS = 128

CSV_FIELDS = [
    "task", "length", "method", "samples", "score", "full_matches", "wall_s", "s_per_sample",
    "max_gen_toks", "mean_prompt_tokens", "kv_kept_pct", "prefill_block_pct",
]  # fmt: skip

log = logging.getLogger(__name__)


def require_lm_eval():
    """Import and return ``lm_eval``; a clear error when it is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "tasksieve ruler: lm-eval is not installed in this environment "
            f"({e}). Build its own venv with `make venv-ruler` and run `.venv-ruler/bin/python -m tasksieve ruler ...` "
            "(or `make eval-ruler`); the pinned versions are in requirements/ruler.txt."
        ) from e
    return lm_eval


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"niah_single_1,vt"`` -> ``["niah_single_1", "ruler_vt"]``; tasks that need a download are refused."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        if not t:
            continue
        t = TASK_ALIASES.get(t, t)
        if t in NEEDS_DOWNLOAD:
            raise ValueError(f"tasksieve ruler: {t!r} downloads its haystack or data set and cannot run offline; "
                             f"offline tasks: {', '.join(OFFLINE_TASKS)}")
        if t not in OFFLINE_TASKS:
            raise ValueError(f"tasksieve ruler: unknown task {t!r}; offline tasks: {', '.join(OFFLINE_TASKS)} "
                             f"(aliases: {', '.join(f'{k}={v}' for k, v in TASK_ALIASES.items())})")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("tasksieve ruler: no task given")
    return out


def method_specs(specs: str | Iterable[str]) -> list[str]:
    """Comma-separated method specs for :func:`tasksieve.evaluation.niah.parse_methods`, with ``name@x`` rewritten
    to niah's ``name:x`` (``windowkv@0.12`` == ``windowkv:0.12``)."""
    if isinstance(specs, str):
        specs = specs.split(",")
    fixed = []
    for s in specs:
        head, sep, rest = s.partition(":")
        if "@" in head:
            name, _, val = head.partition("@")
            s = f"{name}:{val}" + (f":{rest}" if sep else "")
        fixed.append(s)
    return fixed


def save_tokenizer(tokenizer, folder: str | os.PathLike | None = None) -> Path:
    """Save ``tokenizer`` where RULER's ``AutoTokenizer.from_pretrained`` can find it; returns the folder.

    Default folder: ``$TASKSIEVE_CACHE/ruler/tokenizer-<hash of its vocabulary and special tokens>`` (not the repo).
    """
    if folder is None:
        from .models import cache_root

        h = hashlib.sha256()
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
        folder = cache_root() / "ruler" / f"tokenizer-{h.hexdigest()[:16]}"
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(folder))
    return folder


def _press_context(model, press):
    if press is None:
        return contextlib.nullcontext(model)
    if isinstance(press, FlexPrefill):
        return hf.patched(model, prefill=press)
    return hf.patched(model, kv=press)


def _metric_value(sample: Mapping, length: int) -> float | None:
    v = sample.get(str(length))
    if v is None:
        return None
    v = float(v)
    return None if v < 0 else v


def _response(sample: Mapping) -> str:
    r = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(r, (list, tuple)) and r:
        r = r[0]
    return "" if r is None else str(r)


def _prompt_hash(doc: Mapping) -> str:
    return hashlib.sha256((str(doc.get("input", "")) + "\x00" + str(doc.get("gen_prefix", ""))).encode()).hexdigest()[:16]


def _mean_pct(vals: Sequence[float], full: bool) -> float | None:
    if vals:
        return round(sum(vals) / len(vals), 1)
    return 100.0 if full else None


def run_ruler(
    model,
    tokenizer,
    methods: Mapping[str, Any],
    *,
    tasks: Sequence[str] = ("niah_single_1",),
    lengths: Sequence[int] = (4096,),
    samples: int = 10,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    tokenizer_dir: str | os.PathLike | None = None,
    apply_chat_template: bool = False,
    seed: int = 0,
    progress: bool = True,
    on_step=None,
    previous: Sequence[Mapping] = (),
) -> tuple[list[dict], list[dict]]:
    """Run lm-eval's RULER ``tasks`` at each length for every method. Returns ``(rows, sample_records)``.

    ``rows``: one dict per (task, length, method) with :data:`CSV_FIELDS`; ``score`` is the mean of lm-eval's
    per-sample ``string_match_all`` (in [0, 1]), ``full_matches`` the samples with every reference found.
    ``sample_records``: one dict per sample (method, task, length, index, references, answer, score, prompt hash).
    One ``simple_evaluate`` call per (length, sample, method), picking document ``i`` with lm-eval's ``samples``
    argument; ``on_step(rows, records)`` is called after each.

    ``previous``: sample records of an earlier run with the same settings (its ``ruler_samples.jsonl``); a (length,
    sample, method) whose every task is among them is not run again, and its records are kept. Their prompt hashes
    still have to match the new run's.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = parse_tasks(tasks)
    lengths = [int(n) for n in lengths]
    if not methods:
        raise ValueError("tasksieve ruler: no method given")
    if samples < 1:
        raise ValueError(f"tasksieve ruler: samples must be >= 1, got {samples}")
    if max_gen_toks < 1:
        raise ValueError(f"tasksieve ruler: max_gen_toks must be >= 1, got {max_gen_toks}")
    tok_dir = save_tokenizer(tokenizer, tokenizer_dir)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if hf.is_patched(model):
        raise ValueError("tasksieve ruler: the model is already patched; pass an unpatched model")
    # The context never needs truncating: RULER prompts are at most length - 128 tokens.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
              max_length=max(lengths) + max(max_gen_toks, RULER_RESERVED_TOKENS))
    gen_kwargs = {"max_gen_toks": int(max_gen_toks), "do_sample": False, "temperature": 0.0}
    # What the patch did on each request (KV kept, prefill blocks computed), read right after each generate call.
    infos: list[dict] = []
    generate = lm._model_generate

    def _recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        if hf.is_patched(model):
            infos.append(dict(hf.last_info(model) or {}))
        return out

    lm._model_generate = _recording_generate

    records: list[dict] = []
    hashes: dict[tuple[str, int, int], str] = {}
    kept: dict[tuple[int, int, str], list[dict]] = {}
    for r in previous:
        if r.get("max_gen_toks") != max_gen_toks:
            raise ValueError(f"tasksieve ruler: a previous record was made with max_gen_toks={r.get('max_gen_toks')}, "
                             f"this run uses {max_gen_toks}; start a new output folder")
        kept.setdefault((int(r["length"]), int(r["doc_id"]), r["method"]), []).append(dict(r))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths) * samples * len(methods) * len(tasks), desc="ruler", unit="sample",
                   dynamic_ncols=True)
    # Sample-major order: after every step all methods have answered the same samples, so a run stopped early (a slow
    # shared machine) still compares like with like; ``on_step`` can write the results so far.
    for length in lengths:
        for i in range(samples):
            for name, press in methods.items():
                old = kept.get((length, i, name), [])
                if {r["task"] for r in old} >= set(tasks):
                    old = [r for r in old if r["task"] in tasks]
                    for r in old:
                        hashes.setdefault((r["task"], length, i), r["prompt_sha"])
                    records.extend(old)
                    if bar is not None:
                        bar.update(len(old))
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{name} @ {length}, sample {i + 1}/{samples}")
                infos.clear()
                t0 = time.perf_counter()
                with _press_context(model, press):
                    res = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=list(tasks),
                        samples={t: [i] for t in tasks},
                        gen_kwargs=dict(gen_kwargs),
                        metadata={"tokenizer": str(tok_dir), "max_seq_lengths": [length]},
                        apply_chat_template=apply_chat_template,
                        log_samples=True,
                        bootstrap_iters=0,
                        random_seed=seed,
                        numpy_random_seed=seed + 1234,
                        torch_random_seed=seed + 1234,
                        fewshot_random_seed=seed + 1234,
                        verbosity="ERROR",
                    )
                wall = time.perf_counter() - t0
                kv_pct = [100.0 * x["kv_bytes_after"] / x["kv_bytes_before"] for x in infos
                          if x.get("kv_bytes_after") is not None and x.get("kv_bytes_before")]
                blk_pct = [100.0 * x["prefill_block_ratio"] for x in infos if x.get("prefill_block_ratio") is not None]
                for task in tasks:
                    smp = list((res.get("samples") or {}).get(task, []))
                    if len(smp) != 1:
                        raise RuntimeError(f"tasksieve ruler: lm-eval returned {len(smp)} samples for {task} at "
                                           f"{length}, sample {i} ({name}); expected 1")
                    s, doc = smp[0], smp[0]["doc"]
                    h = _prompt_hash(doc)
                    if hashes.setdefault((task, length, i), h) != h:
                        raise RuntimeError(f"tasksieve ruler: {task} at {length}, sample {i}: method {name!r} got "
                                           "another prompt than the first method (lm-eval's synthetic data were not "
                                           "reproduced)")
                    v = _metric_value(s, length)
                    records.append({
                        "task": task, "length": length, "method": name, "doc_id": s.get("doc_id"),
                        "index": doc.get("index"), "references": list(doc.get("outputs", [])),
                        "answer": _response(s), "score": v,
                        "prompt_tokens": int(doc["length"]) - RULER_RESERVED_TOKENS if "length" in doc else None,
                        "prompt_sha": h, "gen_prefix": doc.get("gen_prefix", ""),
                        "wall_s": round(wall / len(tasks), 2), "max_gen_toks": max_gen_toks,
                        # means over the call's requests (one per task); 100 where the method keeps everything
                        "kv_kept_pct": _mean_pct(kv_pct, press is None or isinstance(press, FlexPrefill)),
                        "prefill_block_pct": _mean_pct(blk_pct, not isinstance(press, FlexPrefill)),
                    })
                    if bar is not None:
                        bar.update(1)
                if on_step is not None:
                    on_step(rows_from_records(records), records)
    if bar is not None:
        bar.close()
    return rows_from_records(records), records


def rows_from_records(records: Sequence[Mapping]) -> list[dict]:
    """One row per (task, length, method) in first-seen order, with :data:`CSV_FIELDS`."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in records:
        groups.setdefault((r["task"], int(r["length"]), r["method"]), []).append(r)

    def mean(vals):
        vals = [float(v) for v in vals if v is not None]
        return round(sum(vals) / len(vals), 2) if vals else None

    rows = []
    for (task, length, method), rs in groups.items():
        scores = [float(r["score"]) if r["score"] is not None else 0.0 for r in rs]
        wall = sum(float(r.get("wall_s") or 0.0) for r in rs)
        rows.append({
            "task": task, "length": length, "method": method, "samples": len(rs),
            "score": sum(scores) / len(scores), "full_matches": sum(1 for v in scores if v >= 1.0),
            "wall_s": round(wall, 1), "s_per_sample": round(wall / len(rs), 1),
            "max_gen_toks": rs[0].get("max_gen_toks"), "mean_prompt_tokens": mean(r.get("prompt_tokens") for r in rs),
            "kv_kept_pct": mean(r.get("kv_kept_pct") for r in rs),
            "prefill_block_pct": mean(r.get("prefill_block_pct") for r in rs),
        })
    return rows


# ----------------------------------------------------------------------------------------------------------------
# output


def _methods_in_order(rows: Sequence[Mapping]) -> list[str]:
    out: list[str] = []
    for r in rows:
        if r["method"] not in out:
            out.append(r["method"])
    return out


def _cells(rows: Sequence[Mapping]) -> tuple[list[tuple[str, int]], list[str], dict]:
    keys: list[tuple[str, int]] = []
    cell = {}
    for r in rows:
        k = (r["task"], int(r["length"]))
        if k not in keys:
            keys.append(k)
        cell[(k, r["method"])] = r
    return keys, _methods_in_order(rows), cell


def summarize(rows: Sequence[Mapping]) -> str:
    """Markdown table: one row per (task, length), one column per method: score and full matches/samples."""
    keys, methods, cell = _cells(rows)
    lines = ["| task | length | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for k in keys:
        vals = []
        for m in methods:
            r = cell.get((k, m))
            vals.append("—" if r is None else f"{float(r['score']):.2f} ({r['full_matches']}/{r['samples']})")
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(vals) + " |")
    if len(keys) > 1:
        means = []
        for m in methods:
            rs = [cell[(k, m)] for k in keys if (k, m) in cell]
            means.append(f"{sum(float(r['score']) for r in rs) / len(rs):.2f}" if rs else "—")
        lines.append("| **mean** | | " + " | ".join(means) + " |")
    wall = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        n = sum(int(r["samples"]) for r in rs)
        wall.append(f"{sum(float(r['wall_s']) for r in rs) / max(n, 1):.1f}")
    lines.append("| s / sample | | " + " | ".join(wall) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Grouped bars: score per (task, length), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, methods, cell = _cells(rows)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.9 * len(keys) * max(len(methods), 1) * 0.5), 4.0))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        ys = [float(cell[(k, m)]["score"]) if (k, m) in cell else 0.0 for k in keys]
        bars = ax.bar(xs, ys, width=width * 0.95, label=m)
        for b, k in zip(bars, keys):
            r = cell.get((k, m))
            if r is not None:
                ax.annotate(f"{r['full_matches']}/{r['samples']}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{t}\n{n}" for t, n in keys], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("RULER score (string_match_all)")
    ax.set_title(title or "RULER (lm-eval) per task and length")
    ax.legend(fontsize=7, ncol=min(len(methods), 3), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def run_config(model=None, tokenizer=None, **kw) -> dict:
    """Configuration record written next to the results (model, versions, date...)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__, "tasksieve": __version__}
    for dist in ("lm_eval", "transformers", "numpy", "gguf"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            pass
    cfg: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "decoding": "greedy",
    }
    if model is not None:
        cfg["model"] = getattr(model.config, "_tasksieve_name", None) or getattr(model.config, "_name_or_path", "")
        cfg["model_arch"] = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        cfg["dtype"] = str(next(model.parameters()).dtype)
        cfg["device"] = str(next(model.parameters()).device)
    if tokenizer is not None:
        cfg["tokenizer"] = type(tokenizer).__name__
    cfg["scoring"] = "lm-eval RULER string_match_all: fraction of reference strings found in the answer"
    cfg.update(kw)
    return cfg


def write_results(rows: Sequence[Mapping], records: Sequence[Mapping], out: str | os.PathLike,
                  config: Mapping | None = None, stem: str = "ruler") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv``, ``<stem>.png``, ``<stem>_samples.jsonl`` and ``<stem>.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png",
             "jsonl": out / f"{stem}_samples.jsonl", "json": out / f"{stem}.json"}
    cfg = dict(config or {})
    md = summarize(rows)
    v = cfg.get("versions", {})
    header = "# RULER (lm-eval)\n\n"
    if cfg:
        header += (
            f"model: {cfg.get('model', '?')} · lm-eval {v.get('lm_eval', '?')} · transformers "
            f"{v.get('transformers', '?')} · torch {v.get('torch', '?')} · date: {cfg.get('date', '?')}\n\n"
            f"samples per task and length: {cfg.get('samples', '?')} (the same for every method) · greedy, generation "
            f"capped at {cfg.get('max_gen_toks', '?')} tokens · cell: mean string_match_all (samples with every "
            "reference found / samples)\n\n"
        )
        if cfg.get("complete") is False:
            header += ("**Partial**: the run was still going or was stopped; each method has answered the same "
                       "samples so far (sample-major order).\n\n")
    paths["md"].write_text(header + md, encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with paths["jsonl"].open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg["summary_markdown"] = md
    paths["json"].write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
    plot(rows, paths["png"], title=f"RULER (lm-eval), {cfg.get('model_short', 'model')}, "
                                   f"gen cap {cfg.get('max_gen_toks', '?')} tok")
    return paths


def host() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}
