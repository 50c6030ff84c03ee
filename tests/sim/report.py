"""Turns build/sim/report.jsonl (left by ``make test-sim``) into the committed markdown table:
per op and dtype, the cases run, the worst error and the bound it was held to.

    python -m tests.sim.report [--out bench/results/gpusim/kernels_on_simulator.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections import defaultdict
from pathlib import Path

from .compare import REPORT
from .gpusim import REPO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpusim" /
                                         "kernels_on_simulator.md"))
    args = ap.parse_args()
    rows = [json.loads(line) for line in REPORT.read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"])].append(r)
    lines = [
        "# CUDA kernels on the functional GPU simulator",
        "",
        f"`make test-sim`, {_dt.date.today().isoformat()}: each kernel runs on GPGPU-Sim "
        "(functional mode, PTX for sm_80) through the torch-free runners in `csrc/sim/`, on the "
        "same inputs as the CPU op. Integer outputs must be equal (bound 0); float outputs are "
        "held to flash-attention's rule (at most 2x PyTorch's own error in that dtype against "
        "an fp32/fp64 reference) or, where both sides do fp32 math, a fixed tolerance stated in "
        "the test. `worst ratio` = max over the cases of error / bound.",
        "",
        "| op | dtype | checks | failed | max error | worst ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (op, dt), rs in sorted(groups.items()):
        err = max(r["err"] for r in rs)
        ratios = [r["err"] / r["bound"] for r in rs if r["bound"]]
        worst = f"{max(ratios):.2f}" if ratios else "exact"
        failed = sum(not r["passed"] for r in rs)
        lines.append(f"| `{op}` | {dt} | {len(rs)} | {failed} | {err:.3g} | {worst} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
