"""Loads the compiled extension tolerantly: `import tasksieve` never fails without it.

`LOADED` says whether tasksieve._C was imported; `LOAD_ERROR` keeps the reason when it was not.
ops.py falls back to the pure-PyTorch references for ops or devices without a kernel.
"""

import torch

LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrars)

    LOADED = True
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOADED = False
    LOAD_ERROR = repr(exc)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when `tasksieve::op_name` has a kernel registered for `dispatch_key` ('CPU', 'CUDA')."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tasksieve::{op_name}", dispatch_key)


def op_names() -> list[str]:
    """Every op declared in csrc/ops.cpp, as registered with the dispatcher."""
    if not LOADED:
        return []
    prefix = "tasksieve::"
    names = {n[len(prefix):].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith(prefix)}
    return sorted(names)
