"""WindowKV benchmark rows: scoring, selection and the layer-group gather vs torch baselines.

One layer group of a Llama-3-8B-like model (H 32, Hk 8, D 128; 8 layers share one selection, so
the gather moves K and V of 8 layers = 16 tensors in one launch), observation window A = 32,
window 8, budget 12% of the prompt. Rows:

1. window_scores   tasksieve op vs ``reference_window_scores`` (the same work in plain torch).
2. select_windows  op vs ``reference_select_windows`` (share=True: one selection for all heads).
3. gather_windows  one launch for the 16 tensors vs ``index_select`` per tensor; GB/s of the kept
                   rows (read + write) and % of the measured copy ceiling (goal >= 85% on GPU).
   gather_windows_ the in-place variant vs ``t[:, :, :L].copy_(t.index_select(...))``.
4. group_total     scoring + selection + gather of one group: tasksieve vs the torch path, and
                   vs the dense causal prefill attention of the same 8 layers (SDPA, flash
                   backend on GPU) -- the compression overhead relative to prefill attention.

Run alone: ``python bench/bench_kv_window.py [--quick] [--device cpu|cuda]`` (same as
``python -m tasksieve.bench --only kv_window``). The harness calls ``run(ctx, shapes=None)``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tasksieve  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch
import torch.nn.functional as F

from tasksieve import reference

FAMILY = "kv_window"


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration (a layer group of one sequence batch)."""

    N: int  # prompt length (tokens in the cache)
    H: int = 32  # query heads
    Hk: int = 8  # KV heads
    D: int = 128  # head dim
    B: int = 1  # batch
    A: int = 32  # observation window (always-kept suffix)
    window: int = 8  # window length
    layers: int = 8  # layers sharing one selection (the gather moves 2 * layers tensors)
    budget: float = 0.12  # kept fraction of the prompt, suffix included
    share: bool = True  # one selection for all KV heads (WindowKV); False = per head
    reduce: str = "max"

    @property
    def nw(self) -> int:
        return max(0, (self.N - self.A) // self.window)

    @property
    def tail(self) -> int:
        """Always-kept suffix: the A observation tokens plus the partial last window."""
        return self.N - self.nw * self.window

    @property
    def keep(self) -> int:
        target = int(round(self.budget * self.N))
        return max(0, min(self.nw, (target - self.tail) // self.window))

    @property
    def kept(self) -> int:
        return self.keep * self.window + self.tail

    def label(self) -> str:
        return (f"B{self.B} H{self.H} Hk{self.Hk} D{self.D} N{self.N} A{self.A} w{self.window} "
                f"L{self.layers} keep{self.keep}x{self.window}+{self.tail}")


def default_shapes(device: torch.device, quick: bool) -> list[Shape]:
    if device.type == "cuda":
        return [Shape(N=8192)] if quick else [Shape(N=8192), Shape(N=32768)]
    # CPU: fp32 and smaller, so the quick run stays near a minute on 2 cores.
    if quick:
        return [Shape(N=4096, H=8, Hk=2), Shape(N=2048)]
    return [Shape(N=4096, H=8, Hk=2), Shape(N=8192, H=8, Hk=2), Shape(N=4096)]


# ---------------------------------------------------------------------------------------------
# baselines


def torch_gather(kv, idx, window, tail, shared: bool):
    """The torch way: build the token index once, then one index_select per tensor when one
    selection serves every head (shared, batch 1), else one gather per tensor. No validation
    (the strongest plain-torch baseline)."""
    rows = reference.gathered_token_index(kv[0].shape[2], idx, window, tail)
    if shared and idx.shape[0] == 1:
        r = rows[0, 0]
        return [t.index_select(2, r) for t in kv]
    return [torch.gather(t, 2, rows.unsqueeze(-1).expand(*rows.shape, t.shape[3])) for t in kv]


def torch_gather_(kv, idx, window, tail, shared: bool):
    """In-place torch baseline: gather to a temporary, copy it over the front of each tensor."""
    out = torch_gather(kv, idx, window, tail, shared)
    L = out[0].shape[2]
    for t, o in zip(kv, out):
        t[:, :, :L].copy_(o)


def _sdpa_dense(q, kv, layers, expanded=None):
    """Dense causal prefill attention of `layers` layers (K, V of layer l = kv[2l], kv[2l+1])."""
    outs = None
    for layer in range(layers):
        if expanded is not None:
            k, v = expanded[2 * layer], expanded[2 * layer + 1]
            outs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            outs = F.scaled_dot_product_attention(q, kv[2 * layer], kv[2 * layer + 1],
                                                  is_causal=True, enable_gqa=True)
    return outs


def _dense_prefill(ctx, q, kv, layers):
    """Time dense prefill attention; returns (timing, description). On CPU one layer is timed
    and scaled by `layers` (the dense attention dominates the CPU run time)."""
    cuda = ctx.cuda
    timed_layers = layers if cuda else 1
    expanded = None
    desc = "SDPA causal, enable_gqa"
    backend_ctx = None
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend_ctx = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
        desc = "SDPA flash causal, enable_gqa"
    try:
        if backend_ctx is not None:
            with backend_ctx():
                _sdpa_dense(q, kv, 1)
        else:
            _sdpa_dense(q, kv, 1)
        ctx.sync()
    except RuntimeError:
        # No GQA in this backend: repeat K/V to all query heads outside the timed region.
        G = q.shape[1] // kv[0].shape[1]
        expanded = [t.repeat_interleave(G, dim=1) for t in kv[: 2 * timed_layers]]
        desc = desc.replace("enable_gqa", "K/V repeat_interleave'd")

    def dense():
        if backend_ctx is not None:
            with backend_ctx():
                return _sdpa_dense(q, kv, timed_layers, expanded)
        return _sdpa_dense(q, kv, timed_layers, expanded)

    t = ctx.time(dense)
    if timed_layers != layers:
        t = {k: (v * layers / timed_layers if k.endswith("_ms") else v) for k, v in t.items()}
        desc += f", {layers} x 1 layer"
    else:
        desc += f", {layers} layers"
    return t, desc


# ---------------------------------------------------------------------------------------------
# the rows


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def run_shape(ctx, s: Shape) -> list[dict]:
    from tasksieve import ops
    from tasksieve.evaluation.bench import kernel_label, make_row
    from tasksieve.reference import reference_select_windows, reference_window_scores

    dev = ctx.device
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=dev).manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).to(dtype)

    # One query tensor for every layer (dense prefill), K and V per layer in the HF cache
    # layout [B, Hk, N, D]; the group leader (layer 0) scores.
    q = randn(s.B, s.H, s.N, s.D)
    kv = [randn(s.B, s.Hk, s.N, s.D) for _ in range(2 * s.layers)]
    q_obs = q[:, :, s.N - s.A:, :].transpose(1, 2)  # [B, A, H, D], last dim contiguous
    k_lead = kv[0].transpose(1, 2)  # [B, N, Hk, D], a view of the cache
    shape = s.label()
    common = dict(family=FAMILY, dtype=dtype, shape=shape)
    rows = []

    # 1. window_scores -------------------------------------------------------------------------
    scores = ops.window_scores(q_obs, k_lead, s.window, s.reduce)
    ref_scores = reference_window_scores(q_obs, k_lead, s.window, s.reduce)
    err = _rel_err(scores, ref_scores)
    check = f"rel err {err:.1e}" + ("" if err < 2e-2 else " MISMATCH")
    t_op = ctx.time(lambda: ops.window_scores(q_obs, k_lead, s.window, s.reduce))
    t_ref = ctx.time(lambda: reference_window_scores(q_obs, k_lead, s.window, s.reduce))
    # Fewest bytes: K and q_obs read once, scores written once. FLOPs: Q_obs K^T once.
    nbytes = s.B * s.N * s.Hk * s.D * elt + q_obs.numel() * elt + scores.numel() * 4
    flops = 2.0 * s.B * s.H * s.A * s.N * s.D
    rows.append(make_row(ctx, case="window_scores", impl="ops.window_scores", t=t_op,
                         baseline="reference_window_scores (torch)", t_base=t_ref,
                         kernel=kernel_label("window_scores", dev), nbytes=nbytes, flops=flops,
                         ceiling="copy", check=check,
                         note=f"reduce={s.reduce}; GB/s = K + q_obs read once", **common))

    # 2. select_windows ------------------------------------------------------------------------
    idx = ops.select_windows(scores, s.keep, s.share)
    ref_idx = reference_select_windows(scores, s.keep, s.share)
    same = torch.equal(idx.cpu(), ref_idx.cpu())
    check = "idx equal" if same else "idx DIFFER"
    t_op = ctx.time(lambda: ops.select_windows(scores, s.keep, s.share))
    t_ref = ctx.time(lambda: reference_select_windows(scores, s.keep, s.share))
    rows.append(make_row(ctx, case="select_windows", impl="ops.select_windows", t=t_op,
                         baseline="reference_select_windows (torch sort)", t_base=t_ref,
                         kernel=kernel_label("select_windows", dev), check=check,
                         note=f"nw={s.nw} keep={s.keep} share={s.share}", **common))

    # 3. gather_windows: 16 tensors, one launch ---------------------------------------------
    shared = s.share
    base_name = (("index_select" if shared and s.B == 1 else "torch.gather")
                 + f" x{len(kv)} tensors")
    out = ops.gather_windows(kv, idx, s.window, s.tail)
    ref_out = torch_gather(kv, idx, s.window, s.tail, shared)
    same = all(torch.equal(a, b) for a, b in zip(out, ref_out))
    check = "exact" if same else "MISMATCH"
    del out, ref_out
    t_op = ctx.time(lambda: ops.gather_windows(kv, idx, s.window, s.tail))
    t_base = ctx.time(lambda: torch_gather(kv, idx, s.window, s.tail, shared))
    nbytes = 2.0 * len(kv) * s.B * s.Hk * s.kept * s.D * elt
    rows.append(make_row(ctx, case="gather_windows", impl="ops.gather_windows", t=t_op,
                         baseline=base_name, t_base=t_base,
                         kernel=kernel_label("gather_windows", dev), nbytes=nbytes,
                         ceiling="copy", check=check,
                         note=f"{len(kv)} tensors, {s.kept} kept rows each, "
                              f"{nbytes / 1e6:.1f} MB moved (read + write)", **common))

    # 3b. in place (the inputs get scrambled, but ascending idx stay valid on repeats) --------
    kv_ip = [t.clone() for t in kv]
    kv_ip_base = [t.clone() for t in kv]
    ops.gather_windows_(kv_ip, idx, s.window, s.tail)
    torch_gather_(kv_ip_base, idx, s.window, s.tail, shared)
    same = all(torch.equal(a[:, :, :s.kept], b[:, :, :s.kept]) for a, b in zip(kv_ip, kv_ip_base))
    check = "exact" if same else "MISMATCH"
    t_op = ctx.time(lambda: ops.gather_windows_(kv_ip, idx, s.window, s.tail))
    t_base = ctx.time(lambda: torch_gather_(kv_ip_base, idx, s.window, s.tail, shared))
    rows.append(make_row(ctx, case="gather_windows_", impl="ops.gather_windows_ (in place)",
                         t=t_op, baseline=base_name + " + copy_", t_base=t_base,
                         kernel=kernel_label("gather_windows_", dev), nbytes=nbytes,
                         ceiling="copy", check=check, note="compacts into the cache itself",
                         **common))
    del kv_ip, kv_ip_base

    # 4. group total ---------------------------------------------------------------------------
    def tasksieve_group():
        sc = ops.window_scores(q_obs, k_lead, s.window, s.reduce)
        ix = ops.select_windows(sc, s.keep, s.share)
        return ops.gather_windows(kv, ix, s.window, s.tail)

    def torch_group():
        sc = reference_window_scores(q_obs, k_lead, s.window, s.reduce)
        ix = reference_select_windows(sc, s.keep, s.share)
        return torch_gather(kv, ix, s.window, s.tail, shared)

    t_ts = ctx.time(tasksieve_group)
    t_torch = ctx.time(torch_group)
    kernels = sorted({kernel_label(o, dev) for o in ("window_scores", "select_windows",
                                                       "gather_windows")})
    rows.append(make_row(ctx, case="group_total", impl="score + select + gather", t=t_ts,
                         baseline="torch path (reference score + select, index_select)",
                         t_base=t_torch, kernel="/".join(kernels),
                         note=f"one layer group ({s.layers} layers)", **common))

    t_dense, desc = _dense_prefill(ctx, q, kv, s.layers)
    dense_ms = t_dense["median_ms"]
    overhead = 100.0 * t_ts["median_ms"] / dense_ms if dense_ms else math.nan
    attn_flops = 4.0 * s.B * s.H * s.D * (s.N * (s.N + 1) / 2) * s.layers  # causal QK^T + PV
    row = make_row(ctx, case="group_total_vs_prefill", impl="score + select + gather", t=t_ts,
                   baseline=f"dense prefill attention ({desc})", t_base=t_dense,
                   kernel="/".join(kernels), kind="ratio",
                   note=f"compression = {overhead:.2f}% of dense prefill attention; "
                        f"dense at {attn_flops / (t_dense['median_ms'] * 1e-3) / 1e12:.3g} TFLOP/s",
                   **common)
    rows.append(row)
    del q, kv
    return rows


def run(ctx, shapes=None) -> list[dict]:
    """All WindowKV rows for `ctx.device` (default shapes per device and mode, or `shapes`:
    a list of `Shape` or of dicts of Shape fields)."""
    from tasksieve.evaluation.bench import run_shapes

    if shapes is None:
        shapes = default_shapes(ctx.device, ctx.quick)
    return run_shapes(ctx, FAMILY, shapes, Shape, run_shape)


if __name__ == "__main__":
    from tasksieve.evaluation.bench import family_main

    sys.exit(family_main(FAMILY))
