"""router_stats_update (UNCURL's router statistics) against tasksieve.reference.

Random shapes by hypothesis (T in {0, 1, 7, 130}, E in {1, 3, 16, 33, 64}, every k up to
min(E, 8), all three logit dtypes, int32 / int64 ids, distinct ids or ids with repeats), two
calls accumulating onto nonzero sums. counts and coselect are integer counts and must be equal;
logit_sum and logit_gram are fp64 sums of the same exact products in another order (token order
on the CPU, chunks then chunk order on CUDA, BLAS in the reference), so they are compared within
1e-12 of the sum of the absolute terms.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, requires_kernel
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import ops
from tasksieve import reference as R

OP = "router_stats_update"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = 1e-12


def _inputs(g, T, E, k, dtype, id_dtype, distinct, device):
    z = (torch.randn(T, E, generator=g) * 3).to(dtype=dtype, device=device)
    if distinct:
        ids = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    return z, ids.to(dtype=id_dtype, device=device)


def _accumulators(g, E, device, zero=False):
    """counts, logit_sum, logit_gram, coselect: float64, nonzero unless `zero` (counts and
    coselect hold small integers, as they would after earlier calls)."""
    if zero:
        return [torch.zeros(*s, dtype=torch.float64, device=device) for s in ((E,), (E,), (E, E),
                                                                               (E, E))]
    return [torch.randint(0, 5, (E,), generator=g).double().to(device),
            torch.randn(E, generator=g, dtype=torch.float64).to(device),
            torch.randn(E, E, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 5, (E, E), generator=g).double().to(device)]


def _abs_terms(zs, acc0):
    """Per element of (logit_sum, logit_gram): |initial value| + the sum of |terms| of all calls."""
    s, gram = acc0[1].abs().cpu(), acc0[2].abs().cpu()
    for z in zs:
        a = z.double().abs().cpu()
        s = s + a.sum(0)
        gram = gram + a.T @ a
    return s, gram


def _assert_stats(got, want, zs, acc0, what=""):
    counts, lsum, gram, cosel = (t.cpu() for t in got)
    ecounts, esum, egram, ecosel = (t.cpu() for t in want)
    assert torch.equal(counts, ecounts), f"{what} counts"
    assert torch.equal(cosel, ecosel), f"{what} coselect"
    bs, bg = _abs_terms(zs, acc0)
    assert ((lsum - esum).abs() <= RTOL * bs + 1e-300).all(), f"{what} logit_sum"
    assert ((gram - egram).abs() <= RTOL * bg + 1e-300).all(), f"{what} logit_gram"


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@given(T=st.sampled_from([0, 1, 7, 130]), E=st.sampled_from([1, 3, 16, 33, 64]), data=st.data(),
       dtype=st.sampled_from(DTYPES), id_dtype=st.sampled_from([torch.int32, torch.int64]),
       distinct=st.booleans(), seed=st.integers(0, 2**16))
def test_router_stats_update_matches_reference(device, T, E, data, dtype, id_dtype, distinct,
                                               seed):
    requires_kernel(OP, device)
    k = data.draw(st.integers(1, min(E, 8)), label="k")
    T2 = data.draw(st.sampled_from([0, 1, 7, 130]), label="T of the second call")
    g = torch.Generator().manual_seed(seed)
    acc = _accumulators(g, E, device)
    acc0 = [a.clone() for a in acc]
    want = [a.clone() for a in acc]
    zs = []
    for n in (T, T2):  # two calls accumulate
        z, ids = _inputs(g, n, E, k, dtype, id_dtype, distinct, device)
        assert ops.router_stats_update(z, ids, *acc) is None
        R.reference_router_stats_update(z, ids, *want)
        zs.append(z)
        _assert_stats(acc, want, zs, acc0, f"T={n} E={E} k={k} {dtype} {id_dtype}")
    for a in acc:
        assert a.dtype == torch.float64 and a.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_router_stats_update_contract_directly(device):
    """Small exact values: every statistic equals the contract's sum exactly (no rounding)."""
    requires_kernel(OP, device)
    z = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], device=device)
    ids = torch.tensor([[2, 0], [1, 2]], device=device)
    acc = _accumulators(None, 3, device, zero=True)
    ops.router_stats_update(z, ids, *acc)
    counts, lsum, gram, cosel = (t.cpu() for t in acc)
    assert counts.tolist() == [1.0, 1.0, 2.0]
    assert lsum.tolist() == [1.25, 1.0, -0.5]
    zc = z.cpu().double()
    assert torch.equal(gram, zc.T @ zc)
    assert cosel.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]]
    assert torch.equal(torch.diagonal(cosel), counts)  # distinct ids: diag == counts


@pytest.mark.parametrize("device", DEVICES)
def test_router_stats_update_duplicate_ids_count_each_occurrence(device):
    requires_kernel(OP, device)
    z = torch.zeros(2, 4, device=device)
    ids = torch.tensor([[1, 1, 3], [0, 2, 2]], dtype=torch.int32, device=device)
    acc = _accumulators(None, 4, device, zero=True)
    ops.router_stats_update(z, ids, *acc)
    counts, _, _, cosel = (t.cpu() for t in acc)
    assert counts.tolist() == [1.0, 2.0, 2.0, 1.0]
    # S = [[0, 2, 0, 1], [1, 0, 2, 0]]; coselect = S^T S
    S = torch.tensor([[0, 2, 0, 1], [1, 0, 2, 0]], dtype=torch.float64)
    assert torch.equal(cosel, S.T @ S)
    assert cosel[1, 1] == 4 and cosel[1, 3] == 2


@pytest.mark.parametrize("device", DEVICES)
def test_router_stats_update_strided_inputs_and_symmetry(device):
    """Transposed logits and ids views; the Gram and coselect matrices are exactly symmetric."""
    requires_kernel(OP, device)
    g = torch.Generator().manual_seed(11)
    T, E, k = 70, 33, 5
    z, ids = _inputs(g, T, E, k, torch.float32, torch.int64, True, device)
    zt = z.t().contiguous().t()
    idt = ids.t().contiguous().t()
    assert not zt.is_contiguous() and not idt.is_contiguous()
    acc = _accumulators(g, E, device, zero=True)
    want = _accumulators(g, E, device, zero=True)
    ops.router_stats_update(zt, idt, *acc)
    R.reference_router_stats_update(z, ids, *want)
    _assert_stats(acc, want, [z], want)
    assert torch.equal(acc[2], acc[2].T) and torch.equal(acc[3], acc[3].T)


@pytest.mark.parametrize("device", DEVICES)
def test_router_stats_update_is_deterministic(device):
    """The same inputs give the same bits, whatever the CPU thread count (CUDA: chunk order)."""
    requires_kernel(OP, device)
    g = torch.Generator().manual_seed(5)
    z, ids = _inputs(g, 300, 16, 4, torch.bfloat16, torch.int32, False, device)
    runs = []
    threads = torch.get_num_threads()
    for n in ([1, threads] if device == "cpu" else [threads, threads]):
        torch.set_num_threads(n)
        try:
            acc = _accumulators(None, 16, device, zero=True)
            ops.router_stats_update(z, ids, *acc)
        finally:
            torch.set_num_threads(threads)
        runs.append(acc)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_router_stats_update_large_E_cpu():
    """E = 256 (E*E accumulators), a few tokens."""
    requires_kernel(OP, "cpu")
    g = torch.Generator().manual_seed(2)
    z, ids = _inputs(g, 9, 256, 8, torch.float32, torch.int64, True, "cpu")
    acc = _accumulators(g, 256, "cpu")
    acc0 = [a.clone() for a in acc]
    want = [a.clone() for a in acc]
    ops.router_stats_update(z, ids, *acc)
    R.reference_router_stats_update(z, ids, *want)
    _assert_stats(acc, want, [z], acc0)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

IMPLS = ["ops", "reference"]


def _f(impl):
    return ops.router_stats_update if impl == "ops" else R.reference_router_stats_update


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_router_stats_update_bad_input(device, impl):
    requires_kernel(OP, device)
    f = _f(impl)
    E = 6
    z = torch.randn(4, E, device=device)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [5, 0]], dtype=torch.int32, device=device)
    acc = _accumulators(None, E, device, zero=True)
    counts, lsum, gram, cosel = acc
    names = ["counts", "logit_sum", "logit_gram", "coselect"]

    def with_acc(pos, t):
        args = list(acc)
        args[pos] = t
        return lambda: f(z, ids, *args)

    cases = [
        (lambda: f(z[0], ids, *acc), "router_logits must be a 2-D"),
        (lambda: f(z.unsqueeze(0), ids, *acc), "router_logits must be a 2-D"),
        (lambda: f(z.double(), ids, *acc), "router_logits must be float32"),
        (lambda: f(z.int(), ids, *acc), "router_logits must be float32"),
        (lambda: f(z, ids[0], *acc), "topk_ids must be a 2-D"),
        (lambda: f(z, ids.unsqueeze(0), *acc), "topk_ids must be a 2-D"),
        (lambda: f(z, ids.float(), *acc), "topk_ids must be int32 or int64"),
        (lambda: f(z, ids.to(torch.int16), *acc), "topk_ids must be int32 or int64"),
        (lambda: f(z, ids[:3], *acc), r"topk_ids must have T = router_logits.size\(0\) = 4"),
        (lambda: f(z, torch.zeros(4, E + 1, dtype=torch.int64, device=device), *acc),
         r"topk_ids must have k in \[1, E\] = \[1, 6\]"),
        (lambda: f(z, ids[:, :0], *acc), r"topk_ids must have k in \[1, E\]"),
    ]
    for pos, name in enumerate(names):
        a = acc[pos]
        shape = r"\[E\]" if a.dim() == 1 else r"\[E, E\]"
        cases += [
            (with_acc(pos, a.float()), f"{name} must be torch.float64"),
            (with_acc(pos, a.long()), f"{name} must be torch.float64"),
            (with_acc(pos, a[:-1]), f"{name} must have shape {shape}"),
            (with_acc(pos, a.unsqueeze(0)), f"{name} must have shape {shape}"),
            (with_acc(pos, a.flatten() if a.dim() == 2 else a.view(1, E).expand(E, E)),
             f"{name} must have shape {shape}"),
            (with_acc(pos, torch.zeros(2 * a.numel(), dtype=torch.float64, device=device)[::2]
                      .view(a.shape) if a.dim() == 1 else a.t()),
             f"{name} must be contiguous"),
        ]
        if impl == "reference":  # the dispatcher sends a meta argument to the fake
            cases.append((with_acc(pos, torch.empty_like(a, device="meta")),
                          f"{name} must be on the device of router_logits"))
        if device != "cpu":
            cases.append((with_acc(pos, a.cpu()), f"{name} must be on the device of router_logits"))
    if device != "cpu":
        cases.append((lambda: f(z, ids.cpu(), *acc), "topk_ids must be on the device"))
    if device == "cpu":  # CUDA skips out-of-range ids instead (no host sync)
        for bad in (E, -1, 2**31 - 1):
            bad_ids = ids.clone()
            bad_ids[2, 1] = bad
            cases.append((lambda b=bad_ids: f(z, b, *acc),
                          rf"topk_ids must be in \[0, E\) = \[0, 6\), got {bad} at \[2, 1\]"))
        cases.append((lambda: f(z, ids.long() - 1, *acc),
                      r"topk_ids must be in \[0, E\) = \[0, 6\), got -1 at \[0, 0\]"))
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()
    for a in acc:  # nothing was half-applied
        assert a.abs().sum() == 0


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_router_stats_update_cuda_skips_out_of_range_ids(device):
    requires_kernel(OP, device)
    z = torch.randn(3, 5, device=device)
    ids = torch.tensor([[0, 5], [-1, 2], [4, 100]], device=device)
    acc = _accumulators(None, 5, device, zero=True)
    ops.router_stats_update(z, ids, *acc)
    assert acc[0].cpu().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    want = _accumulators(None, 5, device, zero=True)
    R.reference_router_stats_update(z, torch.tensor([[0], [2], [4]], device=device), *want)
    assert torch.equal(acc[3].cpu(), want[3].cpu())


def test_router_stats_update_compiles_fullgraph():
    """route_topk -> router_stats_update trace into one graph (fake, mutation of four inputs)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(11, 9, generator=g)

    def stats(z, counts, lsum, gram, cosel):
        w, ids = ops.route_topk(z, 3, "softmax")
        ops.router_stats_update(z, ids, counts, lsum, gram, cosel)
        return w

    torch._dynamo.reset()
    compiled = torch.compile(stats, fullgraph=True, dynamic=False)
    acc = _accumulators(None, 9, "cpu", zero=True)
    want = _accumulators(None, 9, "cpu", zero=True)
    assert torch.equal(compiled(z, *acc), stats(z, *want))
    for a, b in zip(acc, want):
        assert torch.equal(a, b)
