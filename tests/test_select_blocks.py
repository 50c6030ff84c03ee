"""FlexPrefill block selection (select_blocks): the kernels vs the pure-PyTorch reference in
tasksieve.reference (exactly: untied continuous random scores), the selection rules checked
one by one (gamma = 1, tiny gamma, budget clamps, always-kept blocks, query-aware heads), the
output format, and bad-input errors naming the argument.

CPU always; the same cases on CUDA when a GPU is visible (``device`` parametrization).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_kernel
from tasksieve import ops
from tasksieve import reference as ref

BIG = 2**31 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(B, H, Nq, Nk, bs, seed, qa_frac=0.5, device="cpu"):
    g = _gen(seed)
    nb, nbq = -(-Nk // bs), -(-Nq // bs)
    v = torch.rand(B, H, nb, generator=g)
    v = v / v.sum(-1, keepdim=True)
    s = torch.rand(B, H, nb, generator=g)
    s = s / s.sum(-1, keepdim=True)
    m = torch.rand(B, H, nbq, nb, generator=g)
    d = ref.select_diag_blocks(Nq, Nk, bs)
    causal = torch.arange(nb)[None, :] <= d[:, None]
    m = torch.softmax(m.masked_fill(~causal, float("-inf")), dim=-1)  # row-softmax, causal
    qa = torch.rand(B, H, generator=g) < qa_frac
    return [t.to(device) for t in (v, s, m, qa)]


def _rows(idx, cnt):
    """Python sets of the listed columns, indexed [b][h][r]."""
    B, H, nbq, _ = idx.shape
    idx, cnt = idx.cpu(), cnt.cpu()
    return [[[set(idx[b, h, r, :cnt[b, h, r]].tolist()) for r in range(nbq)] for h in range(H)]
            for b in range(B)]


def _check_format(idx, cnt, Nq, Nk, bs):
    nb, nbq = -(-Nk // bs), -(-Nq // bs)
    B, H = idx.shape[:2]
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape == (B, H, nbq, nb) and cnt.shape == (B, H, nbq)
    assert idx.is_contiguous() and cnt.is_contiguous()
    d = ref.select_diag_blocks(Nq, Nk, bs)
    idx, cnt = idx.cpu(), cnt.cpu()
    for b in range(B):
        for h in range(H):
            for r in range(nbq):
                n = int(cnt[b, h, r])
                row = idx[b, h, r].tolist()
                assert 2 <= n or (n == 1 and int(d[r]) == 0)
                assert row[:n] == sorted(set(row[:n])), "ascending, no duplicates"
                assert row[0] == 0 and row[n - 1] == int(d[r]), "column 0 and diagonal kept"
                assert all(x == 0 for x in row[n:]), "0-padded past block_cnt"


CASES = [
    # B, H, Nq, Nk, bs
    (2, 3, 64, 64, 16),    # square, N a multiple of bs
    (1, 4, 37, 37, 8),     # N not a multiple of bs
    (2, 2, 10, 50, 8),     # Nq < Nk (chunked prefill), one-row partial
    (1, 3, 29, 61, 4),     # Nq < Nk, both not multiples
    (1, 2, 1, 9, 4),       # a single query
    (1, 2, 130, 130, 1),   # block size 1
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(device, case):
    requires_kernel("select_blocks", device)
    B, H, Nq, Nk, bs = case
    for seed, qa_frac in ((0, 0.5), (1, 0.0), (2, 1.0)):
        v, s, m, qa = _inputs(B, H, Nq, Nk, bs, seed, qa_frac, device)
        for gamma in (0.05, 0.5, 0.9, 0.97, 1.0):
            for mn, mx in ((0, BIG), (1, BIG), (2, 3), (0, 0), (5, 5)):
                got = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, gamma, mn, mx)
                want = ref.reference_select_blocks(v.cpu(), s.cpu(), m.cpu(), qa.cpu(), Nq, Nk,
                                                   bs, gamma, mn, mx)
                assert got[0].device.type == torch.device(device).type
                assert torch.equal(got[1].cpu(), want[1]), (seed, gamma, mn, mx)
                assert torch.equal(got[0].cpu(), want[0]), (seed, gamma, mn, mx)
        _check_format(*got, Nq, Nk, bs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_hand_vertical_slash(device, impl):
    requires_kernel("select_blocks", device)
    fn = ops.select_blocks if impl == "op" else ref.reference_select_blocks
    # 1 head, Nq = Nk = 24, bs = 4: nb = nbq = 6, d(r) = r.
    v = torch.tensor([[[0.05, 0.4, 0.05, 0.3, 0.1, 0.1]]], device=device)
    s = torch.tensor([[[0.1, 0.05, 0.6, 0.05, 0.1, 0.1]]], device=device)
    m = torch.zeros(1, 1, 6, 6, device=device)
    qa = torch.zeros(1, 1, dtype=torch.bool, device=device)
    # gamma 0.7: vertical needs {1, 3} (0.4 + 0.3), slash needs {2, 0} (0.6 + 0.1; ties of 0.1
    # go to the lower offset) -> V = {1, 3}, S = {0, 2}.
    idx, cnt = fn(v, s, m, qa, 24, 24, 4, 0.7, 0, BIG)
    want = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 3}, {0, 1, 2, 3, 4}, {0, 1, 3, 5}]
    assert _rows(idx, cnt)[0][0] == want
    # max_blocks = 1: V = {1}, S = {2}.
    idx, cnt = fn(v, s, m, qa, 24, 24, 4, 0.7, 0, 1)
    want = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 3}, {0, 1, 2, 4}, {0, 1, 3, 5}]
    assert _rows(idx, cnt)[0][0] == want
    # Nq = 8 < Nk = 24: query blocks 0, 1 have diagonals 4, 5.
    idx, cnt = fn(v, s, m[:, :, :2], qa, 8, 24, 4, 0.7, 0, BIG)
    assert _rows(idx, cnt)[0][0] == [{0, 1, 2, 3, 4}, {0, 1, 3, 5}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_hand_query_aware(device, impl):
    requires_kernel("select_blocks", device)
    fn = ops.select_blocks if impl == "op" else ref.reference_select_blocks
    nb = 4
    v = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]], device=device)
    s = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]], device=device)
    m = torch.tensor([[[[1.0, 0, 0, 0],
                        [0.2, 0.8, 0, 0],
                        [0.1, 0.85, 0.05, 0],
                        [0.3, 0.02, 0.6, 0.08]]]], device=device)
    m[0, 0, 0, 3] = 5.0  # above the diagonal: ignored
    qa = torch.ones(1, 1, dtype=torch.bool, device=device)
    # total causal mass 4; gamma 0.6 -> 2.4: 1.0 (0,0) + 0.85 (2,1) + 0.8 (1,1) = 2.65.
    idx, cnt = fn(v, s, m, qa, 4 * nb, 4 * nb, 4, 0.6, 0, BIG)
    assert _rows(idx, cnt)[0][0] == [{0}, {0, 1}, {0, 1, 2}, {0, 3}]
    # min_blocks = 1 skeleton: top vertical column 3, top slash offset 0 (already kept).
    idx, cnt = fn(v, s, m, qa, 4 * nb, 4 * nb, 4, 0.6, 1, 1)
    assert _rows(idx, cnt)[0][0] == [{0}, {0, 1}, {0, 1, 2}, {0, 3}]
    # min_blocks = 2 skeleton: columns {3, 2}, offsets {0, 1}.
    idx, cnt = fn(v, s, m, qa, 4 * nb, 4 * nb, 4, 0.6, 2, 2)
    assert _rows(idx, cnt)[0][0] == [{0}, {0, 1}, {0, 1, 2}, {0, 2, 3}]


@pytest.mark.parametrize("device", DEVICES)
def test_gamma_one_selects_all_causal(device):
    requires_kernel("select_blocks", device)
    for (B, H, Nq, Nk, bs) in CASES:
        for qa_frac in (0.0, 1.0):
            v, s, m, qa = _inputs(B, H, Nq, Nk, bs, 3, qa_frac, device)
            idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, 1.0, 0, BIG)
            d = ref.select_diag_blocks(Nq, Nk, bs)
            assert torch.equal(cnt.cpu(), (d + 1).to(torch.int32).expand(B, H, -1))
            _check_format(idx, cnt, Nq, Nk, bs)


@pytest.mark.parametrize("device", DEVICES)
def test_small_gamma_keeps_the_always_kept_set(device):
    requires_kernel("select_blocks", device)
    B, H, Nq, Nk, bs = 2, 3, 37, 45, 8
    d = ref.select_diag_blocks(Nq, Nk, bs).tolist()
    v, s, m, qa = _inputs(B, H, Nq, Nk, bs, 4, 0.0, device)
    # VS heads, budget clamped to 0 lines: exactly column 0 and the diagonal.
    idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, 1e-6, 0, 0)
    for h_rows in _rows(idx, cnt):
        for rows in h_rows:
            assert rows == [{0, dr} for dr in d]
    # Tiny gamma, no clamp: one vertical column and one slash offset (the top ones).
    idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, 1e-6, 0, BIG)
    got = _rows(idx, cnt)
    for b in range(B):
        for h in range(H):
            cv, ts = int(v[b, h].argmax()), int(s[b, h].argmax())
            for r, dr in enumerate(d):
                want = {0, dr} | ({cv} if cv <= dr else set()) | ({dr - ts} if ts <= dr else set())
                assert got[b][h][r] == want
    # QA heads, tiny gamma, no skeleton: the single top causal map entry joins {0, d(r)}.
    qa = torch.ones_like(qa)
    idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, 1e-6, 0, 0)
    got = _rows(idx, cnt)
    mc = m.cpu().clone()
    causal = torch.arange(mc.shape[-1])[None, :] <= torch.tensor(d)[:, None]
    mc[..., ~causal] = -1
    for b in range(B):
        for h in range(H):
            flat = int(mc[b, h].flatten().argmax())
            rq, cq = divmod(flat, mc.shape[-1])
            for r, dr in enumerate(d):
                assert got[b][h][r] == {0, dr} | ({cq} if r == rq else set())


@pytest.mark.parametrize("device", DEVICES)
def test_budget_clamps(device):
    requires_kernel("select_blocks", device)
    B, H, Nq, Nk, bs = 1, 4, 64, 64, 4  # nb = 16, d(r) = r
    v, s, m, qa = _inputs(B, H, Nq, Nk, bs, 5, 0.0, device)
    top = lambda x, k: set(torch.sort(x.cpu(), descending=True, stable=True).indices[:k].tolist())
    for mn, mx, gamma in ((3, 3, 0.01), (3, 3, 1.0), (0, 2, 1.0), (6, 20, 0.01)):
        idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, gamma, mn, mx)
        got = _rows(idx, cnt)
        for h in range(H):
            k = mn if gamma < 0.5 else mx  # tiny gamma needs 1 line -> min; gamma 1 all -> max
            V, S = top(v[0, h], k), top(s[0, h], k)
            for r in range(16):
                want = {0, r} | {c for c in V if c <= r} | {r - t for t in S if t <= r}
                assert got[0][h][r] == want, (mn, mx, gamma, h, r)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    requires_kernel("select_blocks", device)
    v = torch.rand(2, 3, 5, device=device)
    m = torch.rand(2, 3, 0, 5, device=device)
    qa = torch.zeros(2, 3, dtype=torch.bool, device=device)
    idx, cnt = ops.select_blocks(v, v, m, qa, 0, 40, 8, 0.9, 1, 4)
    assert idx.shape == (2, 3, 0, 5) and cnt.shape == (2, 3, 0)
    m1 = torch.rand(0, 3, 1, 5, device=device)
    idx, cnt = ops.select_blocks(v[:0], v[:0], m1, qa[:0], 8, 40, 8, 0.9, 1, 4)
    assert idx.shape == (0, 3, 1, 5) and cnt.shape == (0, 3, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_inputs(device, impl):
    requires_kernel("select_blocks", device)
    fn = ops.select_blocks if impl == "op" else ref.reference_select_blocks
    v, s, m, qa = _inputs(1, 2, 20, 20, 8, 6, 0.5, device)
    good = dict(vertical=v, slash=s, qa_map=m, is_query_aware=qa, q_len=20, kv_len=20,
                block_size=8, gamma=0.9, min_blocks=1, max_blocks=4)

    def call(**kw):
        a = {**good, **kw}
        return fn(a["vertical"], a["slash"], a["qa_map"], a["is_query_aware"], a["q_len"],
                  a["kv_len"], a["block_size"], a["gamma"], a["min_blocks"], a["max_blocks"])

    call()
    bad = [
        (dict(gamma=0.0), "gamma must be in \\(0, 1\\]"),
        (dict(gamma=1.5), "gamma must be in \\(0, 1\\]"),
        (dict(gamma=float("nan")), "gamma must be in"),
        (dict(min_blocks=-1), "min_blocks must be >= 0"),
        (dict(min_blocks=5, max_blocks=4), "max_blocks must be >= min_blocks"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(q_len=21), "q_len must be in \\[0, kv_len"),
        (dict(kv_len=40), "vertical must have shape \\[B, H, nb\\]"),
        (dict(vertical=v.double()), "vertical must be float32"),
        (dict(slash=s.half()), "slash must be float32"),
        (dict(qa_map=m.bfloat16()), "qa_map must be float32"),
        (dict(is_query_aware=qa.int()), "is_query_aware must be bool"),
        (dict(slash=s[:, :1]), "slash must have the shape of vertical"),
        (dict(qa_map=m[:, :, :2]), "qa_map must have shape \\[B, H, nbq, nb\\]"),
        (dict(is_query_aware=qa[:, :1]), "is_query_aware must have shape \\[B, H\\]"),
        (dict(vertical=v[0]), "vertical must have shape \\[B, H, nb\\]"),
    ]
    if device != "cpu":
        bad.append((dict(slash=s.cpu()), "slash must be on the device of vertical"))
    for kw, msg in bad:
        with pytest.raises(RuntimeError, match="tasksieve.select_blocks: " + msg):
            call(**kw)


def test_output_feeds_block_sparse_attention():
    requires_kernel("select_blocks", "cpu")
    B, H, Hk, Nq, Nk, D, bs = 1, 2, 1, 24, 40, 16, 16
    v, s, m, qa = _inputs(B, H, Nq, Nk, bs, 7, 0.5)
    idx, cnt = ops.select_blocks(v, s, m, qa, Nq, Nk, bs, 0.9, 1, 8)
    g = _gen(8)
    q = torch.randn(B, Nq, H, D, generator=g)
    k = torch.randn(B, Nk, Hk, D, generator=g)
    ref.check_block_sparse_attention_args(q, k, k, idx, cnt, bs)
    # Every query sees at least its own key (the diagonal is always kept): finite LSE.
    _, lse = ref.reference_block_sparse_attention(q, k, k, idx, cnt, bs)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_negative_entries_count_as_zero(device, impl):
    """Negative vertical / slash / map entries are not masses: like NaN and -0 they count as 0
    (summed and ranked as 0, ties to the lower index), on every device and in the reference.
    Regression: they used to be summed as negative masses (the CPU op and the reference then
    ranked them last, and the CUDA bisection was not monotone)."""
    requires_kernel("select_blocks", device)
    fn = ops.select_blocks if impl == "op" else ref.reference_select_blocks
    B, H, Nq, Nk, bs = 2, 3, 37, 61, 8
    for seed in range(3):
        v, s, m, qa = _inputs(B, H, Nq, Nk, bs, 40 + seed, 0.5)
        g = _gen(50 + seed)
        neg = [torch.rand(t.shape, generator=g) < 0.4 for t in (v, s, m)]
        v2, s2, m2 = (torch.where(n, -torch.rand(t.shape, generator=g) * 2, t)
                      for t, n in zip((v, s, m), neg))
        v2[0, 0] = -1.0  # a line of negatives only: an all-zero line
        m2[1, 2, 0, 0] = float("-inf")
        clean = [torch.where(t > 0, t, torch.zeros_like(t)) for t in (v2, s2, m2)]
        for gamma, mn, mx in ((0.9, 1, 4), (0.5, 0, BIG), (1.0, 2, 3)):
            got = fn(*(t.to(device) for t in (v2, s2, m2, qa)), Nq, Nk, bs, gamma, mn, mx)
            want = ref.reference_select_blocks(*clean, qa, Nq, Nk, bs, gamma, mn, mx)
            assert torch.equal(got[1].cpu(), want[1]), (seed, gamma)
            assert torch.equal(got[0].cpu(), want[0]), (seed, gamma)
            _check_format(*got, Nq, Nk, bs)


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_lines_select_one_entry(device):
    """A line whose values all count as 0 (zeros, -0, NaN) reaches gamma * 0 with its first
    ranked entry (the lowest index): one column / offset / map entry, clamped by the budget."""
    requires_kernel("select_blocks", device)
    B, H, Nq, Nk, bs = 1, 4, 40, 40, 8
    nb = 5
    nan = float("nan")
    fill = [0.0, -0.0, nan, 0.0]
    v = torch.stack([torch.full((nb,), x) for x in fill])[None]
    s = torch.stack([torch.full((nb,), x) for x in fill[::-1]])[None]
    m = torch.stack([torch.full((nb, nb), x) for x in fill])[None]
    qa = torch.tensor([[False, False, True, True]])
    args = [t.to(device) for t in (v, s, m, qa)]
    idx, cnt = ops.select_blocks(*args, Nq, Nk, bs, 0.9, 1, 8)
    want = ref.reference_select_blocks(v, s, m, qa, Nq, Nk, bs, 0.9, 1, 8)
    assert torch.equal(cnt.cpu(), want[1]) and torch.equal(idx.cpu(), want[0])
    # V = {0}, S = {0} (plus the map's entry (0, 0) for query-aware heads): column 0 and the
    # diagonal only
    rows = _rows(idx, cnt)
    assert all(rows[0][h] == [{0} | {r} for r in range(nb)] for h in range(H))
