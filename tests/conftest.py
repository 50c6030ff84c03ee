"""Shared test fixtures and settings.

- ``DEVICES``: ["cpu"] plus "cuda" when a GPU is visible; parametrize with it so CUDA runs the
  same cases.
- ``requires_kernel(op, device)``: fails (CPU) or skips (CUDA kernel not built) unless
  ``tasksieve::op`` has a compiled kernel for ``device``.
- Hypothesis profiles: "ci" (default: no deadline, few examples, derandomized) and "dev" (more
  examples); pick with ``HYPOTHESIS_PROFILE=dev``.
- ``seed``: seeds torch and random; returns the seed.

The compiled extension is required: the session stops at start-up if ``tasksieve._C`` is missing.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_configure(config):
    from tasksieve.ops import _loader

    if not _loader.LOADED:
        raise pytest.UsageError(
            "tasksieve._C is not importable, the test suite needs the compiled extension "
            f"({_loader.LOAD_ERROR}). Build it with: "
            "TASKSIEVE_CUDA=0 .venv/bin/pip install --no-build-isolation -e ."
        )


def requires_kernel(op: str, device) -> None:
    """Fail (CPU) or skip (CUDA kernel not built in this install) unless ``op`` has a kernel."""
    from tasksieve.ops import _loader

    dev = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}[dev]
    if _loader.has_kernel(op, key):
        return
    if dev == "cpu":
        pytest.fail(f"tasksieve::{op} has no CPU kernel: every op must have one")
    pytest.skip(f"tasksieve::{op} has no CUDA kernel in this build")


@pytest.fixture
def seed():
    """Seeds torch and random with a fixed value and returns it."""
    value = 1234
    random.seed(value)
    torch.manual_seed(value)
    return value
