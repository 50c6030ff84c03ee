"""Call every tasksieve CUDA op once per small, awkward case: the workload for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
        python bench/sanitize_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 99 python bench/sanitize_ops.py

(bench/device_check.sh runs both.) Disabling torch's caching allocator makes every tensor its
own allocation, so an out-of-bounds access shows up instead of landing in a neighbour.

Cases: odd N (not a multiple of the window), A = 1 and A = N (no window), G in {1, 3, 8},
head dims 1, 3, 72, 128, 256, fp32 / fp16 / bf16, left padding (kv_start), strided and
misaligned views (transposed caches, a last-dim slice at an odd element offset, so 16-byte
vector paths must fall back), empty selections, NaN and tied scores, kv lists of 1 to 70 tensors
(the launcher chunks long lists), the in-place gather, and invalid window indices (the CUDA
gather must write zeros there and never touch memory out of bounds).

FlexPrefill's cases live in bench/sanitize_flex.py, PreMoe's in bench/sanitize_moe.py.

Every result is also compared with the pure-torch reference on the CPU (so the GPU runs only our
kernels plus a few copies). Exit status: 0 when every case ran and matched, 1 otherwise, 2 when
no CUDA kernel is registered. Without a GPU the script says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

try:
    import tasksieve  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch

DEV = torch.device("cuda")  # --device cpu runs the same cases on the CPU kernels (self-test)
OPS = ("window_scores", "select_windows", "gather_windows", "gather_windows_")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Runner:
    def __init__(self, check: bool):
        self.check = check
        self.n = 0
        self.failed = []

    def case(self, name, fn):
        self.n += 1
        try:
            fn()
            _sync()
        except Exception as exc:  # noqa: BLE001 - record and go on
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed, scale=1.0):
    """Random CPU data (never zeros), in dtype."""
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def _strided_cache(B, Hk, N, D, dtype, seed, layout):
    """A [B, Hk, N, D] tensor on the GPU with the last dim contiguous and awkward other strides.

    layout: 'contig'; 'bnhd' (transpose of a [B, N, Hk, D] buffer); 'slice' (the last dim is a
    slice at element offset 1 of a wider buffer: rows are not 16-byte aligned)."""
    if layout == "contig":
        return _rand((B, Hk, N, D), dtype, seed).to(DEV)
    if layout == "bnhd":
        return _rand((B, N, Hk, D), dtype, seed).to(DEV).transpose(1, 2)
    if layout == "slice":
        return _rand((B, Hk, N, D + 3), dtype, seed).to(DEV)[..., 1:D + 1]
    raise ValueError(layout)


def _expect_raise(fn, word):
    try:
        fn()
    except RuntimeError as exc:
        if word not in str(exc):
            raise AssertionError(f"error does not name {word!r}: {exc}") from exc
        return
    raise AssertionError("expected a RuntimeError")


def _close(name, got, want, tol):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {list(got.shape)} != {list(want.shape)}")
    if want.numel() == 0:
        return
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    err = (got - want).norm().item() / max(want.norm().item(), 1e-30)
    if err > tol:
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g}")


# ---------------------------------------------------------------------------------------------


def cases_window_scores(r: Runner):
    from tasksieve import ops
    from tasksieve.reference import reference_window_scores

    # (B, A, H, Hk, D, N, window, reduce, kv_start, layout)
    grid = [
        (1, 1, 1, 1, 1, 1, 1, "max", None, "contig"),        # N = A = 1: nw = 0
        (1, 4, 2, 1, 3, 4, 2, "mean", None, "contig"),       # A = N: no window
        (1, 1, 3, 1, 72, 37, 4, "max", None, "bnhd"),        # A = 1, G = 3, odd N
        (2, 7, 8, 1, 128, 131, 8, "max", [0, 60], "bnhd"),   # G = 8, left padding
        (2, 5, 4, 2, 64, 70, 3, "mean", [3, 0], "slice"),    # misaligned rows
        (1, 32, 8, 8, 256, 300, 16, "max", None, "bnhd"),    # D = 256, G = 1
        (1, 16, 4, 4, 128, 517, 8, "max", None, "slice"),    # several key tiles, odd N
        (3, 3, 6, 3, 80, 50, 64, "max", None, "contig"),     # window > N - A: nw = 0
        (1, 2, 2, 2, 32, 40, 5, "max", [38], "contig"),      # kv_start = N - A
    ]
    for dtype in DTYPES:
        for i, (B, A, H, Hk, D, N, w, red, start, layout) in enumerate(grid):
            name = (f"window_scores[{i}] {str(dtype)[6:]} B{B} A{A} H{H} Hk{Hk} D{D} N{N} "
                    f"w{w} {red} {layout}")

            def run(B=B, A=A, H=H, Hk=Hk, D=D, N=N, w=w, red=red, start=start, layout=layout,
                    dtype=dtype, i=i, name=name):
                q_full = _rand((B, H, A + 2, D), dtype, 10 + i).to(DEV)
                q_obs = q_full[:, :, 2:, :].transpose(1, 2)  # [B, A, H, D], strided
                k = _strided_cache(B, Hk, N, D, dtype, 20 + i, layout).transpose(1, 2)
                ks = None if start is None else torch.tensor(start, dtype=torch.int32).to(DEV)
                out = ops.window_scores(q_obs, k, w, red, None, ks)
                _sync()
                if r.check:
                    want = reference_window_scores(q_obs.cpu(), k.cpu(), w, red, None,
                                                   None if ks is None else ks.cpu())
                    _close(name, out, want, 1e-3 if dtype == torch.float32 else 1e-2)

            r.case(name, run)

    def explicit_scale():
        q = _rand((1, 4, 4, 64), torch.bfloat16, 1).to(DEV)
        k = _rand((1, 100, 2, 64), torch.bfloat16, 2).to(DEV)
        out = ops.window_scores(q, k, 8, "mean", 0.05)
        if r.check:
            _close("window_scores scale", out,
                   reference_window_scores(q.cpu(), k.cpu(), 8, "mean", 0.05), 1e-2)

    r.case("window_scores explicit scale", explicit_scale)


def cases_select_windows(r: Runner):
    from tasksieve import ops
    from tasksieve.reference import reference_select_windows

    def scores_case(B, Hk, nw, kind, seed):
        s = torch.rand((B, Hk, nw), generator=_gen(seed))
        if kind == "ties":
            s = torch.round(s * 4) / 4
        elif kind == "nan" and s.numel():
            s.view(-1)[:: 3] = float("nan")
        elif kind == "equal":
            s.fill_(0.5)
        elif kind == "inf" and s.numel():
            s.view(-1)[:: 5] = float("-inf")
            s.view(-1)[1:: 7] = float("inf")
        return s

    grid = [
        (1, 1, 0, 5, "rand"),      # no window at all
        (1, 2, 7, 0, "rand"),      # keep = 0
        (2, 3, 7, 10, "rand"),     # keep > nw
        (1, 8, 33, 9, "ties"),
        (2, 4, 50, 13, "nan"),
        (1, 2, 64, 64, "equal"),
        (3, 1, 129, 17, "inf"),
        (1, 8, 1000, 118, "rand"),  # Llama-like 8K prompt
        (1, 2, 5000, 700, "rand"),  # long row
        (2, 8, 4093, 1, "rand"),    # keep = 1, odd nw
    ]
    for share in (False, True):
        for i, (B, Hk, nw, keep, kind) in enumerate(grid):
            name = f"select_windows[{i}] share={share} B{B} Hk{Hk} nw{nw} keep{keep} {kind}"

            def run(B=B, Hk=Hk, nw=nw, keep=keep, kind=kind, i=i, share=share, name=name):
                s = scores_case(B, Hk, nw, kind, 100 + i)
                out = ops.select_windows(s.to(DEV), keep, share)
                _sync()
                if r.check:
                    want = reference_select_windows(s, keep, share)
                    if not torch.equal(out.cpu(), want):
                        raise AssertionError(f"{name}: indices differ from the reference")

            r.case(name, run)

    def strided_scores():
        s = torch.rand((2, 8, 40), generator=_gen(7)).to(DEV).transpose(1, 2).contiguous()
        s = s.transpose(1, 2)  # non-contiguous [2, 8, 40]
        try:
            out = ops.select_windows(s, 5, False)
        except RuntimeError as exc:  # a clear refusal is fine too
            if "contiguous" in str(exc):
                print(f"note: select_windows refuses non-contiguous scores: {exc}")
                return
            raise
        if r.check and not torch.equal(out.cpu(), reference_select_windows(s.cpu(), 5, False)):
            raise AssertionError("strided scores: indices differ")

    r.case("select_windows non-contiguous scores", strided_scores)


def _valid_idx(B, Hk, keep, limit, seed, shared=False):
    """Strictly ascending valid window indices [B, Hk, keep] with values < limit."""
    g = _gen(seed)
    rows = []
    for _ in range(1 if shared else B * Hk):
        rows.append(torch.sort(torch.randperm(limit, generator=g)[:keep]).values)
    idx = torch.stack(rows) if rows else torch.zeros((0, keep), dtype=torch.long)
    if shared:
        idx = idx.expand(B * Hk, keep)
    return idx.reshape(B, Hk, keep).to(torch.int32).contiguous()


def _expected_with_invalid(kv_cpu, idx, window, tail):
    """The CUDA contract: valid windows copied, invalid ones zero, then the tail."""
    out = []
    N = kv_cpu[0].shape[2]
    B, Hk, keep = idx.shape
    limit = (N - tail) // window
    for t in kv_cpu:
        o = torch.zeros((B, Hk, keep * window + tail, t.shape[3]), dtype=t.dtype)
        for b in range(B):
            for h in range(Hk):
                for p in range(keep):
                    v = int(idx[b, h, p])
                    if 0 <= v < limit:
                        o[b, h, p * window:(p + 1) * window] = t[b, h, v * window:(v + 1) * window]
                if tail:
                    o[b, h, keep * window:] = t[b, h, N - tail:]
        out.append(o)
    return out


def cases_gather(r: Runner):
    from tasksieve import ops
    from tasksieve.reference import reference_gather_windows, reference_gather_windows_

    # (B, Hk, N, dims, dtype, window, tail, keep, layout)
    grid = [
        (1, 1, 1, [1], torch.float32, 1, 1, 0, "contig"),              # keep 0, tail = N
        (1, 2, 9, [3], torch.float16, 2, 1, 4, "contig"),              # 6-byte rows
        (2, 2, 37, [64, 72], torch.bfloat16, 4, 5, 3, "bnhd"),         # K/V dims differ
        (1, 8, 200, [128] * 16, torch.bfloat16, 8, 32, 12, "contig"),  # a layer group
        (2, 3, 50, [80, 3], torch.float32, 8, 0, 5, "slice"),          # tail 0, misaligned
        (1, 2, 64, [128], torch.float16, 64, 0, 1, "contig"),          # one window = N
        (1, 1, 30, [16] * 70, torch.float32, 3, 3, 4, "contig"),       # 70 tensors: chunked
        (3, 1, 16, [256], torch.bfloat16, 5, 1, 0, "bnhd"),            # keep 0, tail 1
    ]
    for i, (B, Hk, N, dims, dtype, w, tail, keep, layout) in enumerate(grid):
        tag = (f"B{B} Hk{Hk} N{N} D{dims[0]}{'..' if len(set(dims)) > 1 else ''}x{len(dims)} "
               f"{str(dtype)[6:]} w{w} tail{tail} keep{keep} {layout}")

        def make(i=i, B=B, Hk=Hk, N=N, dims=dims, dtype=dtype, layout=layout):
            return [_strided_cache(B, Hk, N, D, dtype, 300 + 17 * i + j, layout)
                    for j, D in enumerate(dims)]

        limit = (N - tail) // w

        def run_out(i=i, B=B, Hk=Hk, keep=keep, w=w, tail=tail, limit=limit, make=make, tag=tag):
            kv = make()
            idx = _valid_idx(B, Hk, keep, limit, 500 + i)
            out = ops.gather_windows(kv, idx.to(DEV), w, tail)
            _sync()
            if r.check:
                want = reference_gather_windows([t.cpu() for t in kv], idx, w, tail)
                for a, b in zip(out, want):
                    if not torch.equal(a.cpu(), b):
                        raise AssertionError(f"gather_windows {tag}: differs from the reference")

        def run_inplace(i=i, B=B, Hk=Hk, keep=keep, w=w, tail=tail, limit=limit, make=make,
                        tag=tag):
            kv = make()
            before = [t.cpu().clone() for t in kv]
            idx = _valid_idx(B, Hk, keep, limit, 600 + i)
            ops.gather_windows_(kv, idx.to(DEV), w, tail)
            _sync()
            if r.check:
                reference_gather_windows_(before, idx, w, tail)
                L = keep * w + tail
                for a, b in zip(kv, before):
                    if not torch.equal(a.cpu()[:, :, :L], b[:, :, :L]):
                        raise AssertionError(f"gather_windows_ {tag}: differs from the reference")

        r.case(f"gather_windows[{i}] {tag}", run_out)
        r.case(f"gather_windows_[{i}] {tag}", run_inplace)

    # Invalid indices: the CUDA kernel must stay in bounds and write zeros for them.
    def invalid_out():
        B, Hk, N, w, tail = 2, 2, 40, 4, 6
        kv = [_strided_cache(B, Hk, N, D, torch.bfloat16, 900 + D, "bnhd") for D in (64, 8)]
        limit = (N - tail) // w  # 8
        idx = torch.tensor([[[0, 3, limit, -1], [1, 2, 7, 1 << 30]],
                            [[-(1 << 30), 5, 6, 7], [limit - 1, limit + 1, 2, 0]]],
                           dtype=torch.int32)
        if DEV.type == "cpu":  # the CPU kernel validates and raises
            _expect_raise(lambda: ops.gather_windows(kv, idx, w, tail), "idx")
            return
        out = ops.gather_windows(kv, idx.to(DEV), w, tail)
        _sync()
        if r.check:
            want = _expected_with_invalid([t.cpu() for t in kv], idx, w, tail)
            for a, b in zip(out, want):
                if not torch.equal(a.cpu(), b):
                    raise AssertionError("invalid idx: expected zeros for invalid windows")

    def invalid_inplace():
        B, Hk, N, w, tail = 1, 2, 48, 8, 8
        kv = [_rand((B, Hk, N, 32), torch.float16, 950 + j).to(DEV) for j in range(2)]
        limit = (N - tail) // w  # 5
        idx = torch.tensor([[[0, 2, limit], [1, limit + 3, 1 << 29]]], dtype=torch.int32)
        if DEV.type == "cpu":
            _expect_raise(lambda: ops.gather_windows_(kv, idx, w, tail), "idx")
            return
        ops.gather_windows_(kv, idx.to(DEV), w, tail)  # must not fault; values unspecified
        _sync()

    r.case("gather_windows invalid indices (zeros)", invalid_out)
    r.case("gather_windows_ invalid indices (in bounds)", invalid_inplace)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparisons with the reference")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: run the same cases on the CPU kernels (a self-test of this script)")
    args = p.parse_args(argv)
    global DEV
    DEV = torch.device(args.device)
    key = "CUDA" if DEV.type == "cuda" else "CPU"
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA GPU visible; nothing to check")
        return 0
    from tasksieve.ops import _loader

    have = {op: _loader.has_kernel(op, key) for op in OPS}
    print(f"{key} kernels:", ", ".join(f"{op}={'yes' if v else 'NO'}" for op, v in have.items()))
    if not any(have.values()):
        print(f"sanitize_ops: no tasksieve {key} kernel is registered (extension loaded: "
              f"{_loader.LOADED}, {_loader.LOAD_ERROR}); build the extension first")
        return 2
    r = Runner(check=not args.no_check)
    if have["window_scores"]:
        cases_window_scores(r)
    if have["select_windows"]:
        cases_select_windows(r)
    if have["gather_windows"] or have["gather_windows_"]:
        cases_gather(r)
    # The other families keep their cases in their own files next to this one.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sanitize_flex
    import sanitize_moe

    have.update(sanitize_flex.cases(r, DEV, _close, _sync))
    have.update(sanitize_moe.cases(r, DEV, _close, _sync))
    missing = [op for op, v in have.items() if not v]
    print(f"sanitize_ops: {r.n} cases, {len(r.failed)} failed"
          + (f"; ops without a {key} kernel (reference ran instead): {', '.join(missing)}"
             if missing else ""))
    for name in r.failed:
        print(f"  failed: {name}")
    return 1 if r.failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
