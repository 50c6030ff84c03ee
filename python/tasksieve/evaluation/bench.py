"""Benchmark harness of tasksieve: times the ops against torch baselines and device ceilings.

    python -m tasksieve.bench [--quick] [--device cpu|cuda] [--only FAMILY] [--out DIR]

Times every benchmark family (one `bench/bench_<family>.py` file each, listed in `FAMILIES`)
against its torch baseline, next to the measured ceilings of the device, and writes

* a markdown table to stdout (and `<tag>.md`),
* `<tag>.csv` with one row per comparison and provenance columns (device, torch version,
  tasksieve version, git commit, timestamp),
* `<tag>.png`, a bar chart of the speedups,

under `bench/results/` (or `--out`). `<tag>` is `bench_<device>[_quick]`, or the family name
instead of `bench` when `--only` picks one family.

Timing (`time_fn`):

* CUDA: warm-up calls, then `reps` calls each bracketed by CUDA events; before each call a
  buffer twice the L2 size is zeroed outside the events (cold L2, as flashinfer's
  `bench_gpu_time` does); callers can also pass several input sets (`args=`) that rotate.
  One synchronize at the end; the median, p20 and p80 of the per-call times are reported
  (Liger's quantiles).
* CPU: `time.perf_counter` around each call after the warm-up; median, p20, p80.

A family module defines `run(ctx, **kwargs) -> list[dict]`; the rows are built with
`make_row` so every family reports the same columns.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .._version import __version__
from ..ops import _loader

REPO_ROOT = Path(__file__).resolve().parents[3]
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_OUT = BENCH_DIR / "results"

# Benchmark families: name -> file under bench/. A new family (flexprefill, moe) adds one line.
FAMILIES = {
    "kv_window": "bench_kv_window.py",
    "flexprefill": "bench_flexprefill.py",
    "flex_estimate": "bench_flex_estimate.py",
    "flex_pipeline": "bench_flex_pipeline.py",
    "moe_route": "bench_moe_route.py",
    "moe": "bench_moe.py",
}

# Columns of every row, in CSV order. Times are milliseconds.
ROW_FIELDS = [
    "family", "case", "kind", "impl", "baseline", "device", "dtype", "shape", "kernel",
    "ms", "p20_ms", "p80_ms", "base_ms", "base_p20_ms", "base_p80_ms", "speedup",
    "gbps", "tflops", "pct_ceiling", "ceiling", "reps", "check", "note",
]
PROVENANCE_FIELDS = [
    "mode", "torch_version", "torch_cuda", "tasksieve_version", "git_commit", "timestamp",
    "hostname", "python_version", "cpu_threads", "loadavg",
]


# ---------------------------------------------------------------------------------------------
# timing


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return sorted_vals[lo] * (1.0 - frac) + sorted_vals[hi] * frac


def _summary(times_ms: Sequence[float]) -> dict:
    s = sorted(times_ms)
    return {"median_ms": _quantile(s, 0.5), "p20_ms": _quantile(s, 0.2),
            "p80_ms": _quantile(s, 0.8), "reps": len(s)}


_FLUSH = {}


def _l2_flush_buffer(dev: torch.device) -> torch.Tensor:
    """A buffer twice the L2 size (at least 64 MiB); zeroing it evicts the inputs from L2."""
    key = (dev.type, dev.index)
    if key not in _FLUSH:
        props = torch.cuda.get_device_properties(dev)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        nbytes = max(2 * l2, 64 << 20)
        _FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=dev)
    return _FLUSH[key]


def time_fn(fn: Callable, *, device, warmup: int = 5, reps: int = 50,
            args: Optional[Sequence[tuple]] = None, flush_l2: bool = True,
            max_time_s: Optional[float] = None, min_reps: int = 3) -> dict:
    """Time `fn` and return {"median_ms", "p20_ms", "p80_ms", "reps"}.

    Parameters
    ----------
    fn : callable
        Called as `fn()` or, when `args` is given, as `fn(*args[i % len(args)])` for call i, so
        several input sets rotate (inputs larger than L2 in total stay cold).
    device : str or torch.device
        "cuda[:i]": CUDA events around each call (one synchronize at the end), the L2 flushed
        before each call outside the timed region when `flush_l2`. "cpu": perf_counter.
    warmup, reps : int
        Untimed calls first, then timed calls.
    max_time_s : float, optional
        Cap on the time spent in timed calls: `reps` is lowered (never below `min_reps`) from the
        warm-up's per-call time on CUDA, and the loop stops early on CPU.
    """
    dev = torch.device(device)
    if args:
        n_args = len(args)

        def call(i):
            return fn(*args[i % n_args])
    else:

        def call(i):
            return fn()

    if dev.type == "cuda":
        return _time_cuda(call, dev, warmup, reps, flush_l2, max_time_s, min_reps)
    return _time_cpu(call, warmup, reps, max_time_s, min_reps)


def _time_cpu(call, warmup, reps, max_time_s, min_reps) -> dict:
    for i in range(warmup):
        call(i)
    times = []
    t_start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        call(warmup + i)
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if max_time_s is not None and len(times) >= min_reps and t1 - t_start > max_time_s:
            break
    return _summary(times)


def _time_cuda(call, dev, warmup, reps, flush_l2, max_time_s, min_reps) -> dict:
    with torch.cuda.device(dev):
        torch.cuda.synchronize()
        w0 = torch.cuda.Event(enable_timing=True)
        w1 = torch.cuda.Event(enable_timing=True)
        w0.record()
        for i in range(max(1, warmup)):
            call(i)
        w1.record()
        torch.cuda.synchronize()
        if max_time_s is not None:
            per_call_ms = w0.elapsed_time(w1) / max(1, warmup)
            if per_call_ms > 0:
                reps = max(min_reps, min(reps, int(max_time_s * 1e3 / per_call_ms)))
        flush = _l2_flush_buffer(dev) if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            call(warmup + i)
            ends[i].record()
        torch.cuda.synchronize()
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ---------------------------------------------------------------------------------------------
# device description and ceilings


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device) -> str:
    """GPU name, or CPU model + the threads torch uses."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} thread{'' if n == 1 else 's'})"


def device_tag(device) -> str:
    """Short file-name tag: 'cpu', or the GPU's model ('h100', 'h200', ...)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    words = [w for w in torch.cuda.get_device_name(dev).replace("NVIDIA", "").split() if w]
    word = (words[0] if words else "cuda").lower()
    return "".join(c for c in word if c.isalnum() or c in "-_") or "cuda"


def measure_ceilings(device, quick: bool = True, *, copy_mib: Optional[int] = None,
                     matmul_n: Optional[int] = None) -> dict:
    """Measured ceilings of the device, as numbers and as table rows.

    GPU: device-to-device `copy_` of a large bf16 tensor (GB/s counting bytes read + written)
    and a bf16 matmul n x n x n (TFLOP/s). CPU: the same copy in fp32 (memcpy bandwidth) and an
    fp32 matmul, for context. Random data, never zeros.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    name = device_name(dev)
    if copy_mib is None:
        copy_mib = (1024 if cuda else 256) if quick else (2048 if cuda else 512)
    if matmul_n is None:
        matmul_n = 8192 if cuda else (1024 if quick else 2048)
    warm, reps, cap = (3, 20, 2.0) if cuda else (1, 10, 2.0)
    dtype_copy = torch.bfloat16 if cuda else torch.float32
    dtype_mm = torch.bfloat16 if cuda else torch.float32

    elt = torch.finfo(dtype_copy).bits // 8
    n_copy = (copy_mib << 20) // elt
    src = torch.randn(n_copy, device=dev, dtype=torch.float32).to(dtype_copy)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device=dev, warmup=warm, reps=reps,
                     flush_l2=False, max_time_s=cap)
    copy_bytes = 2 * src.numel() * elt
    copy_gbps = copy_bytes / (t_copy["median_ms"] * 1e-3) / 1e9
    del src, dst

    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.float32).to(dtype_mm)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.float32).to(dtype_mm)
    t_mm = time_fn(lambda: torch.mm(a, b), device=dev, warmup=warm, reps=reps,
                   flush_l2=False, max_time_s=cap)
    flops = 2.0 * matmul_n ** 3
    mm_tflops = flops / (t_mm["median_ms"] * 1e-3) / 1e12
    del a, b

    dt_copy = str(dtype_copy).replace("torch.", "")
    dt_mm = str(dtype_mm).replace("torch.", "")
    rows = [
        dict(family="ceiling", case="copy_bandwidth", impl="tensor.copy_", baseline="-",
             device=name, dtype=dt_copy, shape=f"{copy_mib} MiB", kernel="torch",
             ms=t_copy["median_ms"], p20_ms=t_copy["p20_ms"], p80_ms=t_copy["p80_ms"],
             gbps=copy_gbps, reps=t_copy["reps"],
             note=("device-to-device copy, bytes read + written" if cuda
                   else "memcpy bandwidth (read + write), context only")),
        dict(family="ceiling", case="matmul", impl="torch.mm", baseline="-", device=name,
             dtype=dt_mm, shape=f"{matmul_n}x{matmul_n}x{matmul_n}", kernel="torch",
             ms=t_mm["median_ms"], p20_ms=t_mm["p20_ms"], p80_ms=t_mm["p80_ms"],
             tflops=mm_tflops, reps=t_mm["reps"],
             note="bf16 matmul, random data" if cuda else "fp32 matmul GFLOP/s = 1000 x TFLOP/s"),
    ]
    return {"copy_gbps": copy_gbps, "matmul_tflops": mm_tflops, "rows": rows}


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class BenchContext:
    """What a family's `run(ctx)` gets: the device, the mode, the ceilings and a timer."""

    device: torch.device
    quick: bool
    ceilings: dict = field(default_factory=dict)
    device_name: str = ""
    warmup: int = 5
    reps: int = 50
    max_time_s: float = 2.0
    log: Callable = print

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn, **kw) -> dict:
        """`time_fn` with this context's device and repetition defaults."""
        kw.setdefault("warmup", self.warmup)
        kw.setdefault("reps", self.reps)
        kw.setdefault("max_time_s", self.max_time_s)
        return time_fn(fn, device=self.device, **kw)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def make_context(device, quick: bool, ceilings: Optional[dict] = None, log=print) -> BenchContext:
    dev = torch.device(device)
    if dev.type == "cuda":
        warmup, reps, cap = (5, 30, 1.0) if quick else (10, 100, 3.0)
    else:
        warmup, reps, cap = (1, 7, 1.5) if quick else (2, 15, 5.0)
    return BenchContext(device=dev, quick=quick, ceilings=ceilings or {},
                        device_name=device_name(dev), warmup=warmup, reps=reps,
                        max_time_s=cap, log=log)


def make_row(ctx: BenchContext, *, family: str, case: str, impl: str, t: dict,
             baseline: str = "-", t_base: Optional[dict] = None, dtype="", shape: str = "",
             kernel: str = "", nbytes: Optional[float] = None, flops: Optional[float] = None,
             ceiling: Optional[str] = None, check: str = "", note: str = "",
             kind: str = "speedup") -> dict:
    """One comparison row. `t`/`t_base` come from `time_fn`; `nbytes` (read + written) gives
    GB/s and `flops` TFLOP/s of the tasksieve side; `ceiling` ('copy' or 'matmul') adds the
    percentage of the measured ceiling. `kind`: 'speedup' when the baseline does the same work,
    'ratio' when it does different work (e.g. compression cost vs prefill attention); the
    speedup column is baseline ms / tasksieve ms either way."""
    ms = t["median_ms"]
    row = dict(family=family, case=case, kind=kind, impl=impl, baseline=baseline,
               device=ctx.device_name,
               dtype=str(dtype).replace("torch.", ""), shape=shape, kernel=kernel,
               ms=ms, p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], reps=t.get("reps", ""),
               check=check, note=note)
    if t_base is not None:
        row.update(base_ms=t_base["median_ms"], base_p20_ms=t_base["p20_ms"],
                   base_p80_ms=t_base["p80_ms"])
        if ms > 0:
            row["speedup"] = t_base["median_ms"] / ms
    if nbytes is not None and ms > 0:
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
    if flops is not None and ms > 0:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    if ceiling == "copy" and row.get("gbps") and ctx.ceilings.get("copy_gbps"):
        row["pct_ceiling"] = 100.0 * row["gbps"] / ctx.ceilings["copy_gbps"]
        row["ceiling"] = f"copy {ctx.ceilings['copy_gbps']:.0f} GB/s"
    elif ceiling == "matmul" and row.get("tflops") and ctx.ceilings.get("matmul_tflops"):
        row["pct_ceiling"] = 100.0 * row["tflops"] / ctx.ceilings["matmul_tflops"]
        row["ceiling"] = f"matmul {ctx.ceilings['matmul_tflops']:.2f} TFLOP/s"
    return row


# ---------------------------------------------------------------------------------------------
# provenance and output


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short HEAD hash, '+dirty' when the code differs from it (changed or new files under
    python/, csrc/, bench/ but bench/results/, setup.py); 'none' without a commit."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-dir"],
                                    capture_output=True, text=True, timeout=10)
            return "none" if inside.returncode == 0 else "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "python", "csrc", "bench", "setup.py",
                                ":(exclude)bench/results"], capture_output=True, text=True,
                               timeout=10)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tasksieve_version() -> str:
    return __version__


def provenance(quick: bool) -> dict:
    return {
        "mode": "quick" if quick else "full",
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda or "",
        "tasksieve_version": tasksieve_version(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": platform.node(),
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        # CPU timings swing with other processes on the machine: keep the 1-min load with them
        # (run_benchmarks records it before the benchmarks start).
        "loadavg": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
    }


def _fmt(v, digits=3) -> str:
    """Numbers for the table: 3 significant digits below 10, one decimal up to 1000."""
    if v is None or v == "":
        return ""
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a == 0:
        return "0"
    return f"{v:.{digits}g}"


def _fmt_speedup(v) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"


def _short_device(name: str) -> str:
    for junk in ("(R)", "(TM)", "NVIDIA ", " CPU", "Processor"):
        name = name.replace(junk, "")
    if "@" in name:
        head, _, tail = name.partition("@")
        threads = tail[tail.find("("):] if "(" in tail else ""
        name = f"{head.strip()} {threads}".strip()
    return " ".join(name.split())


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of rows (ceiling rows and comparison rows)."""
    head = ["family", "case", "device", "dtype", "shape", "tasksieve / impl", "ms [p20, p80]",
            "baseline", "baseline ms", "speedup", "GB/s", "TFLOP/s", "% ceiling", "check",
            "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = _fmt(r.get("ms"))
        if r.get("p20_ms") not in (None, ""):
            ms += f" [{_fmt(r.get('p20_ms'))}, {_fmt(r.get('p80_ms'))}]"
        impl = r.get("impl", "")
        if r.get("kernel"):
            impl += f" ({r['kernel']})"
        speed = r.get("speedup")
        cells = [
            r.get("family", ""), r.get("case", ""), _short_device(r.get("device", "")),
            r.get("dtype", ""), r.get("shape", ""), impl, ms, r.get("baseline", ""),
            _fmt(r.get("base_ms")), _fmt_speedup(speed),
            _fmt(r.get("gbps")), _fmt(r.get("tflops")), _fmt(r.get("pct_ceiling")),
            r.get("check", ""), r.get("note", ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path, prov: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS + PROVENANCE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: ("" if r.get(k) is None else r.get(k, "")) for k in ROW_FIELDS}
            for k, v in out.items():
                if isinstance(v, float):
                    out[k] = f"{v:.6g}"
            out.update(prov)
            w.writerow(out)
    return path


def write_markdown(rows: Sequence[dict], path: Path, prov: dict, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    devices = sorted({r.get("device", "") for r in rows if r.get("device")})
    text = (f"# {title}\n\n"
            f"- device: {', '.join(devices)}\n"
            f"- mode: {prov['mode']}; torch {prov['torch_version']} "
            f"(CUDA {prov['torch_cuda'] or '-'}); "
            f"tasksieve {prov['tasksieve_version']}; commit {prov['git_commit']}; "
            f"{prov['timestamp']}; load average {prov['loadavg']}\n"
            "- times: median of the timed calls, [p20, p80] in brackets; speedup = baseline ms / "
            "tasksieve ms; GB/s counts bytes read + written; % ceiling is of the measured copy "
            "bandwidth (or matmul rate) in the ceiling rows.\n\n"
            + format_table(rows) + "\n")
    path.write_text(text)
    return path


def write_plot(rows: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    """Horizontal bars of speedup (log scale) per comparison row; None without matplotlib."""
    data = [r for r in rows if r.get("speedup") not in (None, "") and r.get("family") != "ceiling"]
    if not data:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['case']} | {r.get('dtype', '')} {r.get('shape', '')}\nvs {r.get('baseline', '')}"
              for r in data]
    vals = [float(r["speedup"]) for r in data]
    colors = ["#e08a1e" if r.get("kind") == "ratio" else "#2b7bba" for r in data]
    fig_h = 1.0 + 0.55 * len(data)
    fig, ax = plt.subplots(figsize=(10, fig_h))
    ypos = list(range(len(data)))[::-1]
    ax.barh(ypos, vals, color=colors)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    for y, v in zip(ypos, vals):
        ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("baseline ms / tasksieve ms (median). blue: speedup on the same work; "
                  "orange: ratio to different work", fontsize=8)
    ax.set_title(title, fontsize=9)
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    ax.set_xlim(lo / 2.0, hi * 3.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# families and the driver



def kernel_label(op: str, device) -> str:
    """What a row times: "cpu kernel" / "cuda kernel", or "no kernel" when the op has none for the
    device (the op then raises)."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return f"{key.lower()} kernel" if _loader.has_kernel(op, key) else "no kernel"


def dense_causal_sdpa(ctx: "BenchContext", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The dense baseline of the attention families: causal SDPA with ``enable_gqa`` on
    ``[B, H, N, D]`` views, pinned to the flash backend on GPU. Returns ``(fn, description)``."""
    import torch.nn.functional as F

    if not ctx.cuda:
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                "SDPA causal, enable_gqa")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return fn, "SDPA flash causal, enable_gqa"


def run_shapes(ctx: "BenchContext", family: str, shapes, shape_cls, run_shape) -> list[dict]:
    """The loop every family's ``run(ctx, shapes)`` shares: shapes are ``shape_cls`` instances or dicts
    of its fields; one log line per shape; the CUDA cache is emptied between shapes."""
    rows = []
    for s in shapes:
        if isinstance(s, dict):
            s = shape_cls(**s)
        ctx.log(f"[bench] {family} {s.label()}")
        rows += run_shape(ctx, s)
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows


def family_main(family: str, argv=None) -> int:
    """``python bench/bench_<family>.py [args]``: the harness CLI restricted to that family."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--only" not in argv:
        argv = ["--only", family] + argv
    return main(argv)

def load_family(name: str):
    """Import bench/<file> of family `name` by path (bench/ is not a package)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown benchmark family {name!r}; known: {', '.join(FAMILIES)}")
    path = BENCH_DIR / FAMILIES[name]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the benchmark families live in the source checkout's bench/ "
            "folder; run from a clone (pip install -e .)")
    mod_name = f"tasksieve_bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return mod


def run_benchmarks(device="cpu", quick: bool = True, only: Optional[Sequence[str]] = None,
                   out: Optional[os.PathLike] = None, family_kwargs: Optional[dict] = None,
                   ceilings: Optional[dict] = None, plot: bool = True, log=print) -> dict:
    """Run families, write CSV/MD/PNG, return {"rows", "paths", "errors", "table"}.

    `family_kwargs` maps a family to extra keyword arguments of its `run` (e.g. shapes);
    `ceilings` skips the ceiling measurement when given (a dict from `measure_ceilings`).
    """
    dev = torch.device(device)
    names = list(only) if only else list(FAMILIES)
    for n in names:
        if n not in FAMILIES:
            raise KeyError(f"unknown benchmark family {n!r}; known: {', '.join(FAMILIES)}")
    load_before = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    torch.manual_seed(0)
    if ceilings is None:
        log(f"[bench] measuring ceilings on {device_name(dev)} ...")
        ceilings = measure_ceilings(dev, quick)
    ctx = make_context(dev, quick, ceilings, log=log)
    rows = list(ceilings.get("rows", []))
    errors = {}
    for n in names:
        log(f"[bench] family {n} ({'quick' if quick else 'full'}, {ctx.device_name})")
        t0 = time.perf_counter()
        try:
            mod = load_family(n)
            rows += mod.run(ctx, **(family_kwargs or {}).get(n, {}))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other families
            errors[n] = f"{type(exc).__name__}: {exc}"
            log(f"[bench] family {n} FAILED:\n{traceback.format_exc()}")
        log(f"[bench] family {n} took {time.perf_counter() - t0:.1f} s")

    prov = provenance(quick)
    prov["loadavg"] = load_before  # the load before our own work started
    tag = (("_".join(names) if only else "bench") + f"_{device_tag(dev)}"
           + ("_quick" if quick else ""))
    out_dir = Path(out) if out else DEFAULT_OUT
    title = (f"tasksieve bench: {', '.join(names)} on {ctx.device_name} "
             f"({'quick' if quick else 'full'})")
    paths = {"csv": write_csv(rows, out_dir / f"{tag}.csv", prov),
             "md": write_markdown(rows, out_dir / f"{tag}.md", prov, title)}
    if plot:
        png = write_plot(rows, out_dir / f"{tag}.png", title)
        if png is not None:
            paths["png"] = png
    return {"rows": rows, "paths": paths, "errors": errors, "table": format_table(rows),
            "provenance": prov}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m tasksieve.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few reps (~1 min on 2 CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--only", action="append", default=None, metavar="FAMILY",
                   help="run only this family (repeatable or comma-separated): "
                        + ", ".join(FAMILIES))
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); shown in the device column")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--list", action="store_true", help="list the families and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    if args.list:
        for n, f in FAMILIES.items():
            print(f"{n}\tbench/{f}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("tasksieve.bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    only = None
    if args.only:
        only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    try:
        res = run_benchmarks(device, quick=args.quick, only=only, out=args.out,
                             plot=not args.no_plot)
    except KeyError as exc:
        print(f"tasksieve.bench: {exc.args[0]}", file=sys.stderr)
        return 2
    prov = res["provenance"]
    print()
    print(f"torch {prov['torch_version']} | tasksieve {prov['tasksieve_version']} | "
          f"commit {prov['git_commit']} | {prov['timestamp']} | {prov['mode']} | "
          f"load average before {prov['loadavg']}")
    print(res["table"])
    print()
    for kind, path in res["paths"].items():
        print(f"wrote {kind}: {path}")
    for n, err in res["errors"].items():
        print(f"FAILED family {n}: {err}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
