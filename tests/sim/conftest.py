"""Simulator tests: every test in this folder carries the ``gpusim`` marker (``make test-sim``
selects it, ``make test`` deselects it). A missing simulator or runner is a failure with the fix
in the message, never a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpusim)


@pytest.fixture(scope="session", autouse=True)
def _simulator_present(request):
    if not any(HERE in Path(str(i.fspath)).resolve().parents for i in request.session.items):
        return
    from .gpusim import gpusim_path

    gpusim_path()  # raises with the fix in the message
