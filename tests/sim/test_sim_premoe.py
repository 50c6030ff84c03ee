"""PreMoe kernels on the simulator (csrc/sim/sim_premoe.cu), against the CPU ops on the same
inputs and against fp64 references.

Every case of the family runs in ONE simulator process (the module fixture ``sim``), except
tcess_update's and router_stats_update's (fixtures ``sim_tcess``, ``sim_rstats``: the first
calls, then the second call of each chain on their outputs, in a second process): the simulator
parses the runner's PTX once per process and that start-up dominates.

Integer outputs (route_topk ids, moe_align's layout, tcess count) must equal the CPU op's
exactly: both sides rank by the same 64-bit key (moe_index.h: higher score first, ties to the
lower expert id, NaN as -inf, -0 as +0), so ties and NaN have one documented answer.
Float outputs: flash-attention's rule against an fp64 computation, with torch's own computation
of the same expression in the kernel's math precision as the baseline (fp32 for the routing
ops, whose kernels upcast; fp16/bf16 for the expert GEMMs), plus a floor of one ulp of the
output magnitude; and the CPU op's output within the bound the triangle inequality gives.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tasksieve import reference as ref

from .compare import assert_close_tol, assert_equal, assert_fa_close, max_abs_err
from .gpusim import run_many

OPS = torch.ops.tasksieve
ROUTE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GEMM_DTYPES = [torch.float16, torch.bfloat16]


def _name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _logits(g, T, E, dtype):
    """Distinct values in every row, exactly representable in bf16 (multiples of 1/8 below 16),
    so no selection depends on rounding; ties and NaN are added on purpose by the cases."""
    z = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() if T else \
        torch.empty(0, E)
    return ((z - E / 2) / 8).to(dtype)


def _keep(g, E, n_keep):
    m = torch.zeros(E, dtype=torch.bool)
    m[torch.randperm(E, generator=g)[:n_keep]] = True
    return m


def _expert_map(g, E, E_c):
    """int32 [E]: E_c experts kept under a random compact id, the others dropped (-1)."""
    m = torch.full((E,), -1, dtype=torch.int32)
    m[torch.randperm(E, generator=g)[:E_c]] = torch.randperm(E_c, generator=g).to(torch.int32)
    return m


def _routing(g, T, k, E):
    """k distinct experts per token (k <= E; else random repeats), int64 [T, k]."""
    if k > E:
        return torch.randint(0, E, (T, k), generator=g)
    return torch.rand(T, E, generator=g).argsort(dim=-1)[:, :k]


# ---------------------------------------------------------------------------------------------
# tcess_update
# ---------------------------------------------------------------------------------------------

def _tcess_cases():
    """(label, logits call 1, logits call 2, top_k, r). r <= 0: every selected expert."""
    g = torch.Generator().manual_seed(1)
    out = []
    for dt in ROUTE_DTYPES:
        n = _name(dt)
        out.append((f"{n} T=1 E=1 k=1 r=0", _logits(g, 1, 1, dt), _logits(g, 1, 1, dt), 1, 0.0))
        out.append((f"{n} T=5 E=8 k=1 r=-1", _logits(g, 5, 8, dt), _logits(g, 3, 8, dt), 1, -1.0))
        out.append((f"{n} T=5 E=8 k=E r=0", _logits(g, 5, 8, dt), _logits(g, 4, 8, dt), 8, 0.0))
        out.append((f"{n} T=7 E=33 k=3 r=0.3", _logits(g, 7, 33, dt) * 3,
                    _logits(g, 7, 33, dt) * 3, 3, 0.3))
        out.append((f"{n} T=37 E=70 k=6 r=0.1 (5 blocks)", _logits(g, 37, 70, dt),
                    _logits(g, 20, 70, dt), 6, 0.1))
        # ties (equal logits: p = 1/2 exactly, at the r = 0.5 boundary, >= keeps it), NaN (ranks
        # as -inf; a selected NaN makes the whole row's p NaN: nothing added), -inf, zeros.
        z = _logits(g, 6, 8, torch.float32)
        z[0] = 1.0
        z[1, 2:6] = 0.5
        z[1, [0, 1, 6, 7]] = -1.0
        z[2, 3] = float("nan")
        z[3, :] = float("nan")
        z[3, 5] = 0.25
        z[4, :7] = float("-inf")
        z[5] = 0.0
        out.append((f"{n} ties/NaN/-inf/zeros k=2 r=0.5", z.to(dt), _logits(g, 2, 8, dt), 2, 0.5))
        # strided: a transposed view (s0 = 1, s1 = T)
        zt = _logits(g, 9, 12, dt).t().contiguous().t()
        out.append((f"{n} strided T=9 E=12 k=4 r=0", zt, _logits(g, 9, 12, dt).t().contiguous().t(),
                    4, 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# router_stats_update
# ---------------------------------------------------------------------------------------------

def _rs_ids(g, T, E, k, distinct, id_dtype):
    ids = (torch.rand(T, E, generator=g).argsort(dim=-1)[:, :k] if distinct
           else torch.randint(0, E, (T, k), generator=g))
    return ids.to(id_dtype)


def _rs_cases():
    """(label, (logits, ids) of call 1, (logits, ids) of call 2). Logits: randn * 3 in the
    dtype (fp64 products of them are exact, only the summation order differs)."""
    g = torch.Generator().manual_seed(3)
    out = []

    def z(T, E, dt):
        return (torch.randn(T, E, generator=g) * 3).to(dt)

    for dt in ROUTE_DTYPES:
        n = _name(dt)
        for (T, T2, E, k, distinct, idt, note) in [
            (1, 1, 1, 1, True, torch.int64, ""),
            (7, 5, 3, 2, False, torch.int32, " repeats"),
            (130, 7, 33, 8, True, torch.int64, " (2 chunks, partial tiles)"),
            (200, 64, 16, 4, False, torch.int32, " repeats (3 chunks)"),
            (0, 3, 5, 2, True, torch.int64, " (T = 0 first)"),
        ]:
            out.append((f"{n} T={T},{T2} E={E} k={k} {_name(idt)}{note}",
                        (z(T, E, dt), _rs_ids(g, T, E, k, distinct, idt)),
                        (z(T2, E, dt), _rs_ids(g, T2, E, k, distinct, idt))))
        # strided logits (a transposed view), non-contiguous ids
        zt = z(9, 12, dt).t().contiguous().t()
        it = _rs_ids(g, 9, 12, 3, True, torch.int64).t().contiguous().t()
        out.append((f"{n} strided T=9 E=12 k=3", (zt, it), (z(4, 12, dt), it[:4])))
        # ids outside [0, E): skipped by the kernel (the CPU op raises)
        bad = _rs_ids(g, 6, 8, 3, True, torch.int32)
        bad[0, 1], bad[2, 0], bad[5, 2] = 8, -1, 2**31 - 1
        out.append((f"{n} out-of-range ids skipped T=6 E=8 k=3", (z(6, 8, dt), bad),
                    (z(2, 8, dt), bad[:2])))
    # one larger E: 2x2 tiles of 32
    out.append(("float32 T=70,9 E=64 k=8 int64",
                (z(70, 64, torch.float32), _rs_ids(g, 70, 64, 8, True, torch.int64)),
                (z(9, 64, torch.float32), _rs_ids(g, 9, 64, 8, True, torch.int64))))
    return out


# ---------------------------------------------------------------------------------------------
# route_topk
# ---------------------------------------------------------------------------------------------

def _route_cases():
    """(label, logits, kwargs of route_topk)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for dt in ROUTE_DTYPES:
        n = _name(dt)
        z = _logits(g, 7, 33, dt)
        for sc in ("softmax", "sigmoid", "topk_softmax"):
            for rn in (False, True):
                out.append((f"{n} {sc} renorm={rn} T=7 E=33 k=3", z,
                            dict(top_k=3, scoring=sc, renormalize=rn)))
        keep = _keep(g, 33, 15)
        for sc, mf in (("softmax", False), ("softmax", True), ("sigmoid", False),
                       ("topk_softmax", False)):
            out.append((f"{n} {sc} keep 15/33 mask_full={mf} k=4 scaling=2.5", z,
                        dict(top_k=4, scoring=sc, keep_mask=keep, mask_full=mf, scaling=2.5)))
        bias = (torch.randperm(33, generator=g).float() - 16) / 64  # distinct, spread keys
        out.append((f"{n} softmax bias k=2", z, dict(top_k=2, scoring="softmax", bias=bias)))
        out.append((f"{n} sigmoid bias renorm scaling=2.5 keep (DeepSeek-V3)", z,
                    dict(top_k=4, scoring="sigmoid", renormalize=True, bias=bias, scaling=2.5,
                         keep_mask=keep)))
        out.append((f"{n} topk_softmax bias k=3", z,
                    dict(top_k=3, scoring="topk_softmax", bias=bias)))
        out.append((f"{n} T=1 E=1 k=1", _logits(g, 1, 1, dt), dict(top_k=1)))
        out.append((f"{n} k=E=8 renorm", _logits(g, 3, 8, dt),
                    dict(top_k=8, scoring="softmax", renormalize=True)))
        out.append((f"{n} E=70 k=6 sigmoid keep 20/70", _logits(g, 5, 70, dt),
                    dict(top_k=6, scoring="sigmoid", keep_mask=_keep(g, 70, 20))))
        out.append((f"{n} E=70 k=70 topk_softmax", _logits(g, 2, 70, dt),
                    dict(top_k=70, scoring="topk_softmax")))
        # ties: whole rows equal, and repeated values; ties to the lower id, with and without a
        # (zero) bias; NaN rows; -inf and zero rows.
        zt = _logits(g, 5, 8, torch.float32)
        zt[0] = 0.5
        zt[1, [1, 4, 6]] = 2.0
        zt[2, [0, 7]] = -0.25
        zt[2, 1:7] = -3.0
        zt[3] = 0.0
        zt[4, :6] = float("-inf")
        zt = zt.to(dt)
        for sc in ("softmax", "topk_softmax"):
            out.append((f"{n} ties {sc} k=3", zt, dict(top_k=3, scoring=sc)))
        out.append((f"{n} ties sigmoid zero bias k=3 renorm", zt,
                    dict(top_k=3, scoring="sigmoid", bias=torch.zeros(8), renormalize=True)))
        zn = _logits(g, 4, 8, torch.float32)
        zn[0, 3] = float("nan")
        zn[1, :6] = float("nan")
        zn[2, :] = float("nan")
        zn = zn.to(dt)
        for sc in ("softmax", "sigmoid", "topk_softmax"):
            out.append((f"{n} NaN {sc} k=3", zn, dict(top_k=3, scoring=sc)))
        zs = _logits(g, 6, 10, dt).t().contiguous().t()
        out.append((f"{n} strided T=6 E=10 k=2", zs, dict(top_k=2, scoring="softmax",
                                                            renormalize=True)))
    return out


def _route_weights(z, ids, top_k, scoring="softmax", renormalize=False, keep_mask=None,
                   bias=None, scaling=1.0, mask_full=False):
    """route_topk's weights for the given ids, in z's dtype (fp64: the ground truth; fp32:
    torch's own computation in the kernel's math precision)."""
    ids = ids.long()
    if scoring == "softmax":
        den = keep_mask if keep_mask is not None and not mask_full else \
            torch.ones(z.shape[1], dtype=torch.bool)
        w = torch.gather(torch.softmax(z.masked_fill(~den, float("-inf")), -1), -1, ids)
    elif scoring == "sigmoid":
        w = torch.sigmoid(torch.gather(z, -1, ids))
    else:
        w = torch.softmax(torch.gather(z, -1, ids), -1)
    if renormalize and scoring != "topk_softmax":
        w = w / w.sum(-1, keepdim=True)
    return w * scaling


# ---------------------------------------------------------------------------------------------
# moe_align
# ---------------------------------------------------------------------------------------------

def _align_cases():
    """(label, topk_ids, num_experts, block_m, expert_map)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for id_dt in (torch.int32, torch.int64):
        for bm in (16, 32, 64):
            n = f"{_name(id_dt)} bm={bm}"
            out.append((f"{n} 1 token k=1 E=4", _routing(g, 1, 1, 4).to(id_dt), 4, bm, None))
            out.append((f"{n} T=5 k=2 E=8 map 5/8", _routing(g, 5, 2, 8).to(id_dt), 8, bm,
                        _expert_map(g, 8, 5)))
            hot = torch.randint(0, 2, (33, 3), generator=g)
            cold = torch.randint(0, 7, (33, 3), generator=g)
            skew = torch.where(torch.rand(33, 3, generator=g) < 0.5, hot, cold)
            out.append((f"{n} T=33 k=3 E=7 skewed (S=99)", skew.to(id_dt), 7, bm, None))
            out.append((f"{n} T=90 k=3 E=70 map 40/70 (2 segments)",
                        torch.randint(0, 70, (90, 3), generator=g).to(id_dt), 70, bm,
                        _expert_map(g, 70, 40)))
            out.append((f"{n} T=3 k=2 E=5 map drops all", torch.randint(0, 5, (3, 2),
                        generator=g).to(id_dt), 5, bm, torch.full((5,), -1, dtype=torch.int32)))
            out.append((f"{n} T=0", torch.empty(0, 2, dtype=id_dt), 3, bm, None))
    return out


def _align_bad_values_case():
    """Ids and expert_map entries outside [0, E): the CPU op raises, the CUDA kernel drops their
    slots (documented in ops.moe_align). Expected: the valid problem where the bad slots go to
    an extra expert E mapped to -1 (tests/test_moe_route.py, CUDA-only test there)."""
    E, bm = 6, 16
    ids = torch.tensor([[0, 7], [-3, 2], [5, 2], [1, 100]], dtype=torch.int32)
    emap = torch.tensor([0, 1, 99, 3, 4, 5], dtype=torch.int32)  # entry 2 out of range
    bad = (ids < 0) | (ids >= E)
    valid_ids = torch.where(bad, E, ids)
    valid_map = torch.cat([torch.where(emap >= E, -1, emap), torch.tensor([-1], dtype=torch.int32)])
    want = ref.reference_moe_align(valid_ids, E + 1, bm, valid_map)
    return (ids, E, bm, emap), want


# ---------------------------------------------------------------------------------------------
# expert_gemm
# ---------------------------------------------------------------------------------------------

# (T, k, E, E_c or None (no map), K, n_out, silu_mul, gather, weighted, block_m)
GEMM_CONFIGS = [
    (1, 1, 4, None, 8, 8, False, True, False, 16),      # 1 token, K = 8 (not a multiple of 16)
    (5, 2, 6, None, 24, 40, True, True, True, 16),       # K = 24 (not a multiple of 16 or 32)
    (17, 2, 9, 6, 40, 72, False, False, True, 32),       # map drops 3; N = 72 > one 64-col tile
    (33, 3, 5, None, 72, 24, True, True, False, 64),     # S = 99 > one 64-row tile per expert
    (9, 4, 40, None, 16, 12, True, False, True, 16),     # many experts (40), N_out = 12
    (12, 2, 8, 5, 8, 70, True, True, True, 32),          # map; N_out = 70 (2 column tiles)
    (20, 2, 3, None, 56, 8, False, True, True, 64),      # 40 slots over 3 experts in 64-rows
]


def _gemm_cases():
    """(label, args of expert_gemm)."""
    g = torch.Generator().manual_seed(4)
    out = []
    for dt in GEMM_DTYPES:
        for (T, k, E, E_c, K, n_out, silu, gather, weighted, bm) in GEMM_CONFIGS:
            label = (f"{_name(dt)} T={T} k={k} E={E} E_c={E_c or E} K={K} N_out={n_out} "
                     f"{'silu_mul' if silu else 'none'} gather={gather} w={weighted} bm={bm}")
            ids = _routing(g, T, k, E)
            emap = _expert_map(g, E, E_c) if E_c else None
            ec = E_c or E
            N = 2 * n_out if silu else n_out
            x = torch.randn(T if gather else T * k, K, generator=g).to(dt)
            w = (torch.randn(ec, N, K, generator=g) / K ** 0.5).to(dt)
            tw = torch.rand(T, k, generator=g) if weighted else None
            align = OPS.moe_align.default(ids.to(torch.int32), E, bm, emap)
            out.append((label, (x, w, *align, bm, k, gather, "silu_mul" if silu else "none", tw)))
    return out


def _non_prefix_case(dt):
    """Assigned fix 3: a layout whose valid tiles are not a prefix (the CPU op accepts it). T = 2
    tokens, k = 1, one expert, block_m 16: the old CUDA grid stopped at ceil(S / 16) + min(E_c,
    S) = 2 tiles, so tile 3 (the only valid one) was never launched and its rows stayed 0."""
    g = torch.Generator().manual_seed(5)
    bm, T, K, N = 16, 2, 16, 24
    x = torch.randn(T, K, generator=g).to(dt)
    w = torch.randn(1, N, K, generator=g).to(dt)
    ids = torch.full((4 * bm,), T, dtype=torch.int32)
    ids[3 * bm:3 * bm + 2] = torch.tensor([1, 0], dtype=torch.int32)
    tiles = torch.tensor([-1, -1, -1, 0], dtype=torch.int32)
    npad = torch.tensor([4 * bm], dtype=torch.int32)
    return (x, w, ids, tiles, npad, bm, 1, True, "none", None)


def _skipped_tiles_case(dt):
    """Tiles past num_padded and tiles of expert -1 are not computed even when their ids look
    valid (tests/test_moe_gemm.py::test_expert_gemm_skips_unused_tiles): their rows stay 0."""
    g = torch.Generator().manual_seed(3)
    bm, T, K, N = 16, 5, 16, 24
    x = torch.randn(T, K, generator=g).to(dt)
    w = torch.randn(2, N, K, generator=g).to(dt)
    ids = torch.full((3 * bm,), T, dtype=torch.int32)
    ids[0:2] = torch.tensor([0, 1])        # tile 0, expert 1
    ids[bm:bm + 2] = torch.tensor([2, 3])  # tile 1, expert -1
    ids[2 * bm] = 4                        # tile 2, expert 0 but past num_padded
    tiles = torch.tensor([1, -1, 0], dtype=torch.int32)
    npad = torch.tensor([2 * bm], dtype=torch.int32)
    return (x, w, ids, tiles, npad, bm, 1, True, "none", None)


def _gemm_bad_values_case(dt):
    """A tile whose expert is >= E_c and a slot id > S inside a valid tile: the CPU op raises,
    the CUDA kernel skips the tile and treats the slot as padding (moe_gemm.cu's contract).
    Returns (args, the same layout sanitised: expert -1, slot = the sentinel S)."""
    g = torch.Generator().manual_seed(7)
    bm, T, k, K, N = 16, 4, 2, 24, 40
    x = torch.randn(T, K, generator=g).to(dt)
    w = (torch.randn(2, N, K, generator=g) / K ** 0.5).to(dt)
    S = T * k
    ids = torch.full((4 * bm,), S, dtype=torch.int32)
    ids[0:3] = torch.tensor([0, 3, 99])       # tile 0, expert 1; 99 is no slot
    ids[bm:bm + 2] = torch.tensor([1, 2])     # tile 1, expert 5 >= E_c: skipped
    ids[2 * bm:2 * bm + 2] = torch.tensor([4, 7])  # tile 2, expert 0
    tiles = torch.tensor([1, 5, 0, -1], dtype=torch.int32)
    npad = torch.tensor([3 * bm], dtype=torch.int32)
    tw = torch.rand(T, k, generator=g)
    clean_ids = torch.where(ids > S, S, ids)
    clean_tiles = torch.where(tiles >= 2, -1, tiles)
    return ((x, w, ids, tiles, npad, bm, k, True, "silu_mul", tw),
            (x, w, clean_ids, clean_tiles, npad, bm, k, True, "silu_mul", tw))


# ---------------------------------------------------------------------------------------------
# moe_forward
# ---------------------------------------------------------------------------------------------

# (T, k, E, E_c or None, H, I, ids int64); block_m = choose_block_m(T*k, E_c) in brackets
FWD_CONFIGS = [
    (1, 2, 4, None, 16, 24, False),   # 1 token [16]
    (5, 2, 6, 4, 40, 24, True),       # 5 tokens, map drops 2 [16]
    (16, 3, 8, 5, 24, 40, False),     # 16 tokens, map drops 3 [16]
    (16, 2, 3, 1, 72, 8, True),       # one kept expert: 32 slots -> block_m 32 (some dropped)
    (16, 3, 1, None, 8, 16, False),   # one expert, 48 slots -> block_m 64
]


def _fwd_cases():
    g = torch.Generator().manual_seed(6)
    out = []
    for dt in GEMM_DTYPES:
        for (T, k, E, E_c, H, I, ids64) in FWD_CONFIGS:
            ec = E_c or E
            label = f"{_name(dt)} T={T} k={k} E={E} E_c={ec} H={H} I={I} ids64={ids64}"
            ids = _routing(g, T, k, E).to(torch.int64 if ids64 else torch.int32)
            emap = _expert_map(g, E, ec) if E_c else None
            x = torch.randn(T, H, generator=g).to(dt)
            w13 = (torch.randn(ec, 2 * I, H, generator=g) / H ** 0.5).to(dt)
            w2 = (torch.randn(ec, H, I, generator=g) / I ** 0.5).to(dt)
            wts = torch.softmax(torch.randn(T, k, generator=g), -1)
            out.append((label, (x, w13, w2, ids, wts, emap)))
    return out


# ---------------------------------------------------------------------------------------------
# one simulator run for the module
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    rc, ac = _route_cases(), _align_cases()
    gc, fc = _gemm_cases(), _fwd_cases()
    npc = [_non_prefix_case(dt) for dt in GEMM_DTYPES]
    skc = [_skipped_tiles_case(dt) for dt in GEMM_DTYPES]
    abv = _align_bad_values_case()
    gbv = [_gemm_bad_values_case(dt) for dt in GEMM_DTYPES]
    calls = [("route_topk", (z,), kw) for (_, z, kw) in rc]
    calls += [("moe_align", (ids, E, bm, m), {}) for (_, ids, E, bm, m) in ac]
    calls += [("expert_gemm", a, {}) for (_, a) in gc]
    calls += [("expert_gemm", a, {}) for a in npc]
    calls += [("expert_gemm", a, {}) for a in skc]
    calls += [("moe_align", abv[0], {})]
    calls += [("expert_gemm", a, {}) for (a, _) in gbv]
    calls += [("moe_forward", a, {}) for (_, a) in fc]
    it = iter(run_many(calls))
    return {
        "route": list(zip(rc, [next(it) for _ in rc])),
        "align": list(zip(ac, [next(it) for _ in ac])),
        "gemm": list(zip(gc, [next(it) for _ in gc])),
        "non_prefix": list(zip(npc, [next(it) for _ in npc])),
        "skipped": list(zip(skc, [next(it) for _ in skc])),
        "align_bad": (abv, next(it)),
        "gemm_bad": list(zip(gbv, [next(it) for _ in gbv])),
        "fwd": list(zip(fc, [next(it) for _ in fc])),
    }


@pytest.fixture(scope="module")
def sim_tcess():
    tc = _tcess_cases()
    calls = []
    for (_, z1, _, k, r) in tc:
        acc0 = torch.linspace(-1, 1, z1.shape[1], dtype=torch.float64)  # onto nonzero sums
        calls.append(("tcess_update", (z1, k, r, acc0, torch.tensor([3])), {}))
    first = run_many(calls)
    # the second call of every chain, on the simulator's own first result
    calls2 = [("tcess_update", (z2, k, r, *r1.unwrap()), {})
              for (_, _, z2, k, r), r1 in zip(tc, first)]
    return list(zip(tc, first, run_many(calls2)))


def _rs_acc0(E):
    """Nonzero starting accumulators (counts, logit_sum, logit_gram, coselect); the matrices
    symmetric, as sums of earlier calls are."""
    g = torch.Generator().manual_seed(E)
    gram = torch.randn(E, E, generator=g, dtype=torch.float64)
    cosel = torch.randint(0, 4, (E, E), generator=g).double()
    return [torch.randint(0, 4, (E,), generator=g).double(),
            torch.randn(E, generator=g, dtype=torch.float64), gram + gram.T, cosel + cosel.T]


@pytest.fixture(scope="module")
def sim_rstats():
    rc = _rs_cases()
    first = run_many([("router_stats_update", (z1, i1, *_rs_acc0(z1.shape[1])), {})
                      for (_, (z1, i1), _) in rc])
    # the second call of every chain, on the simulator's own first result
    second = run_many([("router_stats_update", (z2, i2, *r1.unwrap()), {})
                       for (_, _, (z2, i2)), r1 in zip(rc, first)])
    return list(zip(rc, first, second))


def _dtype_of(label: str) -> str:
    return label.split()[0]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_tcess_update(sim_tcess):
    for (label, z1, z2, k, r), r1, r2 in sim_tcess:
        E = z1.shape[1]
        acc = torch.linspace(-1, 1, E, dtype=torch.float64)
        count = torch.tensor([3])
        outs = []
        for z, res in ((z1, r1), (z2, r2)):
            OPS.tcess_update.default(z, k, r, acc, count)  # CPU op, in place
            ref_acc = torch.linspace(-1, 1, E, dtype=torch.float64) if not outs else outs[-1]
            ref_count = torch.tensor([3])
            want = ref_acc.clone()
            ref.reference_tcess_update(z, k, r, want, ref_count)
            got_acc, got_count = res.unwrap()
            call = "call 1" if not outs else "call 2"
            # The sums are of fp32 values (exact in fp64) in another order (per warp, per
            # block, then blocks in order on CUDA; token order on the CPU): they differ by at most (#terms) * 2^-53 * sum |z|.
            zf = z.float().nan_to_num(0, 0, 0).abs()
            terms = z.shape[0] * 2 * k + 2
            tol = terms * 2.0 ** -53 * (float(zf.sum()) * 2 + 2)
            assert_close_tol("tcess_update", f"{label} {call} acc vs CPU op", got_acc, acc,
                             atol=tol, dtype=z.dtype)
            if not outs:
                assert_close_tol("tcess_update", f"{label} {call} acc vs reference", got_acc,
                                 want, atol=tol, dtype=z.dtype)
            assert_equal("tcess_update", f"{label} {call} count", got_count, count,
                         dtype=z.dtype)
            outs.append(got_acc)


def _rs_valid(ids, E):
    """ids with the out-of-range entries dropped, as S [T, E] float64 (what the kernel counts)."""
    ok = (ids >= 0) & (ids < E)
    S = torch.zeros(ids.shape[0], E, dtype=torch.float64)
    S.scatter_add_(1, torch.where(ok, ids.long(), 0), ok.double())
    return S


def test_router_stats_update(sim_rstats):
    names = ("counts", "logit_sum", "logit_gram", "coselect")
    for (label, *calls), *results in sim_rstats:
        E = calls[0][0].shape[1]
        cpu = _rs_acc0(E)  # the CPU op's chain (valid ids) or a direct fp64 computation
        abs_sum, abs_gram = cpu[1].abs(), cpu[2].abs()
        for n_call, ((z, ids), res) in enumerate(zip(calls, results), 1):
            got = res.unwrap()
            zd = z.double()
            valid = bool(((ids >= 0) & (ids < E)).all())
            if valid:
                OPS.router_stats_update.default(z, ids, *cpu)  # CPU op, in place
                if n_call == 1:
                    want = _rs_acc0(E)
                    ref.reference_router_stats_update(z, ids, *want)
            else:  # the contract with the bad slots dropped
                S = _rs_valid(ids, E)
                for a, d in zip(cpu, (S.sum(0), zd.sum(0), zd.T @ zd, S.T @ S)):
                    a.add_(d)
                want = None
            abs_sum = abs_sum + zd.abs().sum(0)
            abs_gram = abs_gram + zd.abs().T @ zd.abs()
            case = f"{label} call {n_call}"
            for name, g_, c_ in zip(names, got, cpu):
                assert g_.shape == c_.shape and g_.dtype == torch.float64, (case, name)
            # counts and coselect: integers, exact
            assert_equal("router_stats_update", f"{case} counts", got[0], cpu[0], dtype=z.dtype)
            assert_equal("router_stats_update", f"{case} coselect", got[3], cpu[3], dtype=z.dtype)
            # sums of the same exact fp64 products in another order (chunks, then chunks in
            # order, FMA on the device; token order on the CPU): within 1e-12 of sum |terms|
            for name, g_, c_, b in (("logit_sum", got[1], cpu[1], abs_sum),
                                    ("logit_gram", got[2], cpu[2], abs_gram)):
                assert_close_tol("router_stats_update", f"{case} {name} vs CPU", g_, c_,
                                 atol=1e-12 * float(b.max()), dtype=z.dtype)
                assert ((g_ - c_).abs() <= 1e-12 * b).all(), f"{case} {name} elementwise"
            assert torch.equal(got[2], got[2].T) and torch.equal(got[3], got[3].T), case
            if want is not None and n_call == 1:
                assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3]), case
                for i in (1, 2):
                    assert ((got[i] - want[i]).abs() <= 1e-12 * (abs_sum, abs_gram)[i - 1]
                            ).all(), f"{case} {names[i]} vs reference"


@pytest.mark.parametrize("dtype", ROUTE_DTYPES, ids=_name)
def test_route_topk(sim, dtype):
    for (label, z, kw), res in sim["route"]:
        if _dtype_of(label) != _name(dtype):
            continue
        w, ids = res.unwrap()
        cw, cids = OPS.route_topk.default(z, kw["top_k"], kw.get("scoring", "softmax"),
                                          kw.get("renormalize", False), kw.get("keep_mask"),
                                          kw.get("bias"), kw.get("scaling", 1.0),
                                          kw.get("mask_full", False))
        assert_equal("route_topk", f"{label} ids", ids, cids, dtype=dtype)
        # fp32 math on both sides (expf vs std::exp, a warp-tree vs a serial sum over <= E
        # terms): relative differences of a few (E + 8) fp32 ulps of the weights' scale.
        E = z.shape[1]
        scale = max(1.0, abs(kw.get("scaling", 1.0)))
        # NaN weights (a NaN logit in a softmax denominator or a selected NaN) in exactly the
        # CPU op's places; the values compared elsewhere (NaN -> 0 on both sides, since the
        # tolerance helper scales by max |ref|, which a NaN would poison).
        assert_equal("route_topk", f"{label} NaN weights", w.isnan(), cw.isnan(), dtype=dtype)
        assert_close_tol("route_topk", f"{label} weights vs CPU op", w.nan_to_num(0.0),
                         cw.nan_to_num(0.0), atol=4 * (E + 8) * 2.0 ** -24 * scale, dtype=dtype)
        truth = _route_weights(z.double(), cids, **kw)
        same = _route_weights(z.float(), cids, **kw)
        assert_fa_close("route_topk", f"{label} weights", w, truth, same,
                        floor=2.0 ** -23 * scale, dtype=dtype)


def test_moe_align(sim):
    for (label, ids, E, bm, emap), res in sim["align"]:
        got = res.unwrap()
        want = OPS.moe_align.default(ids, E, bm, emap)
        for name, a, b in zip(("sorted_ids", "tile_expert", "num_padded"), got, want):
            assert_equal("moe_align", f"{label} {name}", a, b, dtype=_dtype_of(label))


def _check_gemm(label, args, y):
    x, w, sorted_ids, tiles, npad, bm, k, gather, act, tw = args
    cpu = OPS.expert_gemm.default(*args)
    assert y.shape == cpu.shape and y.dtype == x.dtype
    # fp64 math on the rounded inputs, rounded once to fp32 at the end (the reference takes
    # fp32/fp16/bf16 tensors only): the ground truth to 2^-24 relative.
    truth = ref.reference_expert_gemm(x.float(), w.float(), sorted_ids, tiles, npad, bm, k,
                                      gather, act, tw.float() if tw is not None else None,
                                      dtype=torch.float64)
    same = ref.reference_expert_gemm(x, w, sorted_ids, tiles, npad, bm, k, gather, act,
                                     tw.to(x.dtype) if tw is not None else None, dtype=x.dtype)
    floor = torch.finfo(x.dtype).eps * max(1.0, float(truth.abs().max())) if truth.numel() \
        else 0.0
    assert_fa_close("expert_gemm", label, y, truth, same, floor=floor)
    # The CPU op is within its own error of the truth; so |y - cpu| <= 2 base + floor + err(cpu).
    base = max_abs_err(same, truth)
    assert_close_tol("expert_gemm", f"{label} vs CPU op", y, cpu,
                     atol=2 * base + floor + max_abs_err(cpu, truth), dtype=x.dtype)
    # Rows no tile lists (dropped slots) are exactly 0, as on the CPU.
    zero_rows = (cpu == 0).all(-1) & (truth == 0).all(-1)
    assert_equal("expert_gemm", f"{label} unlisted rows", y[zero_rows], cpu[zero_rows],
                 dtype=x.dtype)


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=_name)
def test_expert_gemm(sim, dtype):
    for (label, args), res in sim["gemm"]:
        if _dtype_of(label) == _name(dtype):
            (y,) = res.unwrap()
            _check_gemm(label, args, y)


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=_name)
def test_expert_gemm_tiles_not_a_prefix(sim, dtype):
    """Assigned fix 3: every tile the CPU op accepts is computed on CUDA, wherever it lies."""
    for args, res in sim["non_prefix"]:
        if args[0].dtype != dtype:
            continue
        (y,) = res.unwrap()
        cpu = OPS.expert_gemm.default(*args)
        assert (cpu != 0).all(), "the case must have nonzero expected rows in the skipped tile"
        _check_gemm(f"{_name(dtype)} valid tile 3 of 4 only (not a prefix)", args, y)


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=_name)
def test_expert_gemm_skips_unused_tiles(sim, dtype):
    for args, res in sim["skipped"]:
        if args[0].dtype != dtype:
            continue
        (y,) = res.unwrap()
        assert (y[2:] == 0).all() and (y[:2] != 0).any()
        _check_gemm(f"{_name(dtype)} tiles past num_padded / of expert -1", args, y)


def test_moe_align_drops_out_of_range_slots(sim):
    ((ids, E, bm, emap), (ws, wt, wn)), res = sim["align_bad"]
    sorted_ids, tiles, npad = res.unwrap()
    n = int(wn)
    case = "ids -3, 7, 100 and map entry 99 dropped"
    assert_equal("moe_align", f"{case} num_padded", npad, wn, dtype="int32")
    assert_equal("moe_align", f"{case} sorted_ids", sorted_ids[:n], ws[:n], dtype="int32")
    assert_equal("moe_align", f"{case} tile_expert", tiles[:n // bm], wt[:n // bm], dtype="int32")
    assert (sorted_ids[n:] == ids.numel()).all() and (tiles[n // bm:] == -1).all()


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=_name)
def test_expert_gemm_skips_out_of_range_values(sim, dtype):
    for (args, clean), res in sim["gemm_bad"]:
        if args[0].dtype != dtype:
            continue
        (y,) = res.unwrap()
        with pytest.raises(RuntimeError, match="values must be"):
            OPS.expert_gemm.default(*args)  # the CPU op refuses what CUDA skips
        _check_gemm(f"{_name(dtype)} expert 5 >= E_c and slot 99 > S skipped", clean, y)


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=_name)
def test_moe_forward(sim, dtype):
    for (label, args), res in sim["fwd"]:
        if _dtype_of(label) != _name(dtype):
            continue
        (out,) = res.unwrap()
        x, w13, w2, ids, wts, emap = args
        cpu = OPS.moe_forward.default(*args)
        assert out.shape == cpu.shape and out.dtype == dtype
        truth = ref.reference_moe_forward(x.float(), w13.float(), w2.float(), ids, wts.float(),
                                          emap, dtype=torch.float64)  # fp64 math, fp32 out
        same = ref.reference_moe_forward(x, w13, w2, ids, wts.to(dtype), emap, dtype=dtype)
        floor = torch.finfo(dtype).eps * max(1.0, float(truth.abs().max()))
        assert_fa_close("moe_forward", label, out, truth, same, floor=floor)
        base = max_abs_err(same, truth)
        assert_close_tol("moe_forward", f"{label} vs CPU op", out, cpu,
                         atol=2 * base + floor + max_abs_err(cpu, truth), dtype=dtype)
