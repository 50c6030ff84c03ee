"""Run tasksieve's CUDA kernels on the functional GPU simulator, CPU tensors in, CPU tensors out.

torch cannot run on the simulator, so each op family has a torch-free runner program
(``csrc/sim/sim_<family>.cu``, built by ``make sim-runners`` into ``build/sim/``) that calls the
same header launchers as the CUDA glue in ``csrc/cuda/``. This module writes a case directory
(``args.txt`` + one raw file per tensor, format in ``csrc/sim/sim_io.h``), runs the runner under
the simulator and reads the outputs back.

- ``run_cases(family, cases)``: several cases in one simulator process (the simulator parses the
  runner's PTX once per process, so batching is what keeps ``make test-sim`` short); returns one
  list of output tensors per case, or the exception text for a case the runner rejected.
- ``run_on_gpusim(op, *args, **kwargs)``: one call with the signature of ``tasksieve.ops.<op>``
  (registered by the family modules ``sim_<family>.py`` in this folder).

``GPUSIM`` is the simulator's ``run`` script (default ``../shared/tools/gpusim/run`` beside the
repository); ``GPUSIM_RUNNERS`` the folder of built runners (default ``build/sim``). Setting
``GPUSIM=native`` runs the runners directly, which is how the same cases run on a real GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GPUSIM = REPO.parent / "shared" / "tools" / "gpusim" / "run"

_DTYPES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def gpusim_path() -> str:
    """The simulator's run script (or "native"), from ``GPUSIM``; raises if it is not there."""
    p = os.environ.get("GPUSIM", str(DEFAULT_GPUSIM))
    if p != "native" and not os.access(p, os.X_OK):
        raise RuntimeError(
            f"no GPU simulator at {p}: set GPUSIM to the path of gpusim's `run` script "
            "(or GPUSIM=native on a machine with a GPU)"
        )
    return p if p == "native" else _usable_simulator(p)


def _usable_simulator(run: str) -> str:
    """``run`` itself, or an overlay of it in build/gpusim whose libcudart sonames are links.

    A copy of the simulator whose ``lib/libcudart.so.13`` (and .12, .11.0) were turned from
    symlinks into small text files (copies that do not keep links do that) fails to load with
    "file too short". The overlay keeps the original files (the script is copied, so that it
    finds the overlay's lib/ beside itself) and restores the links; the original is untouched.
    """
    src = Path(run).resolve().parent
    lib = src / "lib"
    broken = [n for n in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
              if (lib / n).exists() and (lib / n).read_bytes()[:4] != b"\x7fELF"]
    if not broken:
        return run
    ov = REPO / "build" / "gpusim"
    (ov / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copy2(run, ov / "run")
    if not (ov / "cfg").exists():
        (ov / "cfg").symlink_to(src / "cfg")
    real = ov / "lib" / "libcudart.so"
    if not real.exists():
        real.symlink_to(lib / "libcudart.so")
    for n in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
        if not (ov / "lib" / n).exists():
            (ov / "lib" / n).symlink_to("libcudart.so")
    return str(ov / "run")


def runner_path(family: str) -> Path:
    d = Path(os.environ.get("GPUSIM_RUNNERS", REPO / "build" / "sim"))
    exe = d / f"sim_{family}"
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"runner {exe} is not built: run `make sim-runners`")
    return exe


@dataclass
class Case:
    """One op call: ``args`` maps argument names to tensors, ints, floats, bools, strs or None."""

    op: str
    args: Mapping[str, Any]
    label: str = ""


@dataclass
class Result:
    outputs: list[torch.Tensor] = field(default_factory=list)
    error: str | None = None

    def unwrap(self) -> list[torch.Tensor]:
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.outputs


def _write_tensor(path: Path, t: torch.Tensor) -> str:
    if t.dtype not in _DTYPES:
        raise TypeError(f"dtype {t.dtype} cannot be handed to the simulator runner")
    t = t.detach().to("cpu").contiguous()
    flat = t.reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    path.write_bytes(raw.numpy().tobytes())
    return f"{_DTYPES[t.dtype]} {t.dim()} " + " ".join(str(s) for s in t.shape)


def _write_case(d: Path, case: Case) -> None:
    lines = [f"op {case.op}"]
    for name, v in case.args.items():
        if v is None:
            lines.append(f"none {name}")
        elif isinstance(v, torch.Tensor):
            lines.append(f"tensor {name} " + _write_tensor(d / f"{name}.bin", v))
        elif isinstance(v, bool):
            lines.append(f"int {name} {int(v)}")
        elif isinstance(v, int):
            lines.append(f"int {name} {v}")
        elif isinstance(v, float):
            lines.append(f"float {name} {v!r}")
        elif isinstance(v, str):
            if not v or any(c.isspace() for c in v):
                raise ValueError(f"string argument {name}={v!r} must be one word")
            lines.append(f"str {name} {v}")
        else:
            raise TypeError(f"argument {name}: cannot pass {type(v).__name__} to the runner")
    (d / "args.txt").write_text("\n".join(lines) + "\n")


def _read_outputs(d: Path) -> list[torch.Tensor]:
    outs = []
    for line in (d / "outputs.txt").read_text().splitlines():
        _, name, dt, nd, *dims = line.split()
        shape = [int(x) for x in dims[: int(nd)]]
        dtype = _FROM_NAME[dt]
        data = (d / f"{name}.out.bin").read_bytes()
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            outs.append(torch.empty(shape, dtype=dtype))
            continue
        if dtype == torch.bool:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.bool)
        else:
            t = torch.frombuffer(bytearray(data), dtype=dtype)
        outs.append(t.reshape(shape).clone())
    return outs


def run_cases(family: str, cases: Sequence[Case], timeout: float = 900.0) -> list[Result]:
    """Runs every case in one runner process; one Result per case, in order."""
    exe = runner_path(family)
    sim = gpusim_path()
    root = Path(tempfile.mkdtemp(prefix=f"tasksieve-sim-{family}-"))
    try:
        dirs = []
        for i, c in enumerate(cases):
            d = root / f"case{i:04d}"
            d.mkdir()
            _write_case(d, c)
            dirs.append(str(d))
        cmd = ([str(exe)] if sim == "native" else [sim, str(exe)]) + dirs
        # the simulator reads PTX with the cuobjdump inside this Python's triton wheel
        env = {**os.environ, "GPUSIM_PYTHON": os.environ.get("GPUSIM_PYTHON", sys.executable)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        results = []
        for d in map(Path, dirs):
            if (d / "error.txt").exists():
                results.append(Result(error=(d / "error.txt").read_text().strip()))
            elif (d / "outputs.txt").exists():
                results.append(Result(outputs=_read_outputs(d)))
            else:
                results.append(Result(error="runner produced no output"))
        if all(r.error == "runner produced no output" for r in results) and cases:
            raise RuntimeError(
                f"runner sim_{family} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


# op name -> (family, function building a Case from the op's own arguments, output count)
_OPS: dict[str, tuple[str, Callable[..., Case]]] = {}


def register(family: str, op: str):
    """Decorator for the family modules: ``fn(*op_args) -> Case`` with the op's signature."""

    def deco(fn: Callable[..., Case]) -> Callable[..., Case]:
        _OPS[op] = (family, fn)
        return fn

    return deco


def make_case(op: str, *args, **kwargs) -> tuple[str, Case]:
    _load_families()
    if op not in _OPS:
        raise KeyError(f"no simulator runner for op {op!r} (known: {sorted(_OPS)})")
    family, build = _OPS[op]
    return family, build(*args, **kwargs)


def run_on_gpusim(op: str, *args, **kwargs):
    """``tasksieve.ops.<op>(*args, **kwargs)``, executed by the op's CUDA kernel on the simulator.

    Returns what the op returns (a tensor or a tuple of tensors; in-place ops return the updated
    tensors). Raises RuntimeError with the runner's message when the launcher reports an error.
    """
    family, case = make_case(op, *args, **kwargs)
    outs = run_cases(family, [case])[0].unwrap()
    return outs[0] if len(outs) == 1 else tuple(outs)


def run_many(calls: Sequence[tuple[str, tuple, dict]]) -> list[Result]:
    """Several ``(op, args, kwargs)`` calls, batched per family; one Result per call, in order."""
    built = [make_case(op, *a, **kw) for op, a, kw in calls]
    results: list[Result | None] = [None] * len(built)
    for family in {f for f, _ in built}:
        idx = [i for i, (f, _) in enumerate(built) if f == family]
        for i, r in zip(idx, run_cases(family, [built[i][1] for i in idx])):
            results[i] = r
    return results  # type: ignore[return-value]


def _load_families() -> None:
    import importlib

    here = Path(__file__).resolve().parent
    for f in sorted(here.glob("sim_*.py")):
        importlib.import_module(f"{__package__}.{f.stem}" if __package__ else f.stem)
