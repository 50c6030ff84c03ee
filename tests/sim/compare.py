"""Error bounds for the simulator tests, and the per-op table they leave behind.

Float outputs follow flash-attention's rule: the kernel's error against an fp32 (or fp64)
reference may be at most ``factor`` (2) times the error of PyTorch's own computation of the same
thing in the kernel's dtype, plus a floor for outputs where that error is 0 (exact in both).
Integer outputs must be equal. Every check is recorded (op, dtype, case, error, bound) into
``build/sim/report.jsonl``; ``python -m tests.sim.report`` turns that into the committed table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .gpusim import REPO

REPORT = Path(os.environ.get("GPUSIM_REPORT", REPO / "build" / "sim" / "report.jsonl"))


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def record(op: str, dtype, case: str, err: float, bound: float | None, passed: bool) -> None:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as f:
        f.write(json.dumps({
            "op": op,
            "dtype": dtype if isinstance(dtype, str) else _dtype_name(dtype),
            "case": case,
            "err": err,
            "bound": bound,
            "passed": passed,
        }) + "\n")


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in fp64; equal infinities and NaN in both places count as 0."""
    a64, b64 = a.double(), b.double()
    same = (a64 == b64) | (a64.isnan() & b64.isnan())
    d = (a64 - b64).abs().masked_fill(same, 0.0)
    if d.isnan().any():
        return float("inf")
    return float(d.max()) if d.numel() else 0.0


def assert_fa_close(op: str, case: str, out: torch.Tensor, ref: torch.Tensor,
                    torch_same_dtype: torch.Tensor, *, floor: float = 0.0,
                    factor: float = 2.0, dtype=None) -> None:
    """flash-attention bound: err(out, ref) <= factor * err(torch_same_dtype, ref) + floor.

    ``dtype``: the op's input dtype for the table (default: the output's)."""
    err = max_abs_err(out, ref)
    base = max_abs_err(torch_same_dtype, ref)
    assert base < float("inf"), f"{op} [{case}]: the torch baseline is not finite; pick another"
    bound = factor * base + floor
    ok = err <= bound
    record(op, dtype or out.dtype, case, err, bound, ok)
    assert ok, (f"{op} [{case}]: max error {err:.3g} vs reference exceeds {factor} x torch's own "
                f"{out.dtype} error {base:.3g} + {floor:.3g}")


def assert_close_tol(op: str, case: str, out: torch.Tensor, ref: torch.Tensor, *, atol: float,
                     rtol: float = 0.0, dtype=None) -> None:
    """A fixed tolerance, for outputs that are fp32 math on both sides (argue it at the call)."""
    err = max_abs_err(out, ref)
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    bound = atol + rtol * scale
    ok = err <= bound and out.shape == ref.shape
    record(op, dtype or out.dtype, case, err, bound, ok)
    assert ok, f"{op} [{case}]: max error {err:.3g} > {bound:.3g} (shape {tuple(out.shape)})"


def assert_equal(op: str, case: str, out: torch.Tensor, ref: torch.Tensor, dtype=None) -> None:
    """Exact equality (integer outputs, or float outputs the kernel must reproduce bit for bit)."""
    ok = out.shape == ref.shape and bool(
        (out == ref).all() if out.dtype != torch.bool else (out == ref).all())
    if ok and out.is_floating_point():
        ok = bool(((out == ref) | (out.isnan() & ref.isnan())).all())
    n_bad = int((out != ref).sum()) if out.shape == ref.shape else -1
    record(op, dtype or out.dtype, case, 0.0 if ok else float(max(n_bad, 1)), 0.0, ok)
    assert ok, f"{op} [{case}]: {n_bad} elements differ (shape {tuple(out.shape)} vs {tuple(ref.shape)})"
