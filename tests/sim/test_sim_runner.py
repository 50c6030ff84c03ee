"""The simulator harness itself: a launcher's error reaches Python as that case's error while the
other cases of the batch still run, and a missing simulator or runner is a clear failure."""

from __future__ import annotations

import pytest
import torch

from . import gpusim
from .gpusim import run_many


def test_launcher_error_is_reported_per_case():
    p = torch.rand(3, 9)
    q = torch.rand(3, 9)
    # eps = 0 is refused by JsDivergence's launcher (the op's checks would refuse it first)
    res = run_many([
        ("js_divergence", (p, q, 1e-12), {}),
        ("js_divergence", (p, q, 0.0), {}),
        ("js_divergence", (p, q, 1e-12), {}),
    ])
    assert res[0].error is None and res[2].error is None
    assert torch.equal(res[0].outputs[0], res[2].outputs[0])
    assert res[1].error is not None and "cudaErrorInvalidValue" in res[1].error
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        res[1].unwrap()


def test_missing_simulator_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUSIM", str(tmp_path / "no-such-run"))
    with pytest.raises(RuntimeError, match="no GPU simulator at .*set GPUSIM"):
        gpusim.gpusim_path()
    monkeypatch.setenv("GPUSIM_RUNNERS", str(tmp_path))
    with pytest.raises(RuntimeError, match="make sim-runners"):
        gpusim.runner_path("flexprefill")


def test_unknown_op_is_a_clear_error():
    with pytest.raises(KeyError, match="no simulator runner for op 'nope'"):
        gpusim.run_on_gpusim("nope", torch.zeros(1))
