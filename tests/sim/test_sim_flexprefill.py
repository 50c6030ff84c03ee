"""FlexPrefill kernels on the simulator, against the CPU ops on the same inputs."""

from __future__ import annotations

import pytest
import torch

import tasksieve.ops as ops

from .compare import assert_close_tol, assert_fa_close
from .gpusim import run_many

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _js_reference(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(JSD) per row in the dtype of p (fp64 for the ground truth): normalise (a zero row is
    uniform), clamp at eps, renormalise, natural log."""
    def norm(x):
        s = x.sum(-1, keepdim=True)
        x = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.full_like(x, 1.0 / x.shape[-1]))
        x = x.clamp_min(eps)
        return x / x.sum(-1, keepdim=True)

    p, q = norm(p), norm(q)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return js.clamp_min(0).sqrt()


# rows x n: one row, a warp's worth, not a multiple of 32 columns, long rows, empty batch
JS_SHAPES = [(1, 1), (1, 5), (3, 31), (8, 33), (2, 3, 64), (9, 257), (0, 7), (40, 100)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_js_divergence(dtype):
    g = torch.Generator().manual_seed(0)
    calls, inputs = [], []
    for shape in JS_SHAPES:
        p = torch.rand(shape, generator=g)
        q = torch.rand(shape, generator=g)
        if p.numel() and shape[-1] > 2:  # a zero row, a one-hot row, a row of equal values
            p.view(-1, shape[-1])[0] = 0
            q.view(-1, shape[-1])[-1] = 0
            q.view(-1, shape[-1])[-1, 1] = 1
        p, q = p.to(dtype), q.to(dtype)
        calls.append(("js_divergence", (p, q, 1e-12), {}))
        inputs.append((shape, p, q))
    for (shape, p, q), res in zip(inputs, run_many(calls)):
        (out,) = res.unwrap()
        case = f"shape={shape}"
        cpu = ops.js_divergence(p, q, 1e-12)
        assert out.dtype == torch.float32 and out.shape == cpu.shape
        # both sides do fp32 math on the same (rounded) inputs: they agree to fp32 rounding of
        # sums over n terms, ~n * 2^-24 relative to sqrt(ln 2)
        assert_close_tol("js_divergence", f"{case} vs CPU op", out, cpu,
                         atol=max(shape[-1], 32) * 6e-8 * 4, dtype=dtype)
        ref = _js_reference(p.double(), q.double(), 1e-12)
        # the kernel does fp32 math on the rounded inputs: torch's own fp32 computation on them
        # is the baseline (fp16/bf16 math would underflow at eps and is not what runs)
        same = _js_reference(p.float(), q.float(), 1e-12)
        assert_fa_close("js_divergence", case, out, ref, same, floor=1e-6)
