"""Loads the compiled extension tolerantly: `import tasksieve` never fails without it.

`LOADED` says whether tasksieve._C was imported; `LOAD_ERROR` keeps the reason when it was not.
The wrappers ask `require_kernel` before each call: an op or device without a kernel is an error
that names both, never a silent detour through other code.
"""

import torch

LOAD_ERROR = None
try:
    from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY registrars)

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


# Which (op, dispatch key) pairs have a compiled kernel, looked up once for every registered op:
# a plain dict lookup is free at run time and torch.compile traces it as a constant (a
# dispatcher query would break the graph). Meta tensors go to the registered fakes.
KERNELS = {
    (op, key): has_kernel(op, key) if key != "Meta" else True
    for op in op_names()
    for key in ("CPU", "CUDA", "Meta")
}
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def require_kernel(op: str, t) -> None:
    """Raise unless `tasksieve::op` has a kernel for the device of tensor `t`.

    A non-tensor passes: the op's schema rejects it with the argument's name.
    """
    if not isinstance(t, torch.Tensor):
        return
    if not KERNELS.get((op, _DEVICE_KEYS.get(t.device.type)), False):
        _no_kernel(op, t.device.type)


def _no_kernel(op: str, device: str) -> None:
    built = [d for d, key in _DEVICE_KEYS.items() if key != "Meta" and KERNELS.get((op, key))]
    why = "" if LOADED else f"; tasksieve._C did not load: {LOAD_ERROR}"
    raise RuntimeError(f"tasksieve.{op}: no kernel for device '{device}' "
                       f"(built: {', '.join(built) or 'none'}{why})")
