"""The vLLM plugin's parts that need no vLLM: its settings, the step plan, one planned layer, and the varlen
FlexPrefill it runs (the engine-level tests are tests/vllm, in .venv-vllm)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tasksieve as ts
from tasksieve import ops
from tasksieve.integrations.vllm.config import ENV_VAR, parse_config, read_config
from tasksieve.integrations.vllm.step import LayerStats, plan_step, run_step
from tasksieve.methods.flexprefill import flex_prefill_attention
from tasksieve.methods.flexprefill_varlen import causal_block_count, flex_prefill_varlen

# ---------------------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("text", ["", "0", "off", " False "])
def test_config_off(text):
    assert parse_config(text) is None
    assert read_config({ENV_VAR: text}) is None
    assert read_config({}) is None


def test_config_values():
    assert parse_config("1") == ts.FlexPrefill()
    fp = parse_config('{"gamma": 0.9, "tau": 0.2, "block_size": 64, "min_budget": 2048, "dense_below": 4096}')
    assert (fp.gamma, fp.tau, fp.block_size, fp.min_budget, fp.dense_threshold) == (0.9, 0.2, 64, 2048, 4096)


@pytest.mark.parametrize("text, message", [
    ('{"gamma": 0.9, "budget": 3}', r"unknown key\(s\) \['budget'\]; the keys are \['gamma'"),
    ('{"gamma": 0}', r"TASKSIEVE_FLEXPREFILL: FlexPrefill.gamma must be a number in \(0, 1\]"),
    ('{"block_size": 48}', "block_size must be 16, 32, 64 or 128"),
    ('{"min_budget": 10, "max_budget": 5}', "max_budget must be >= min_budget"),
    ("[0.9]", "must be a JSON object of FlexPrefill settings, got list"),
    ("gamma=0.9", "must be a JSON object"),
])
def test_config_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config(text)


# ---------------------------------------------------------------------------------------------------------------
# the step plan


@st.composite
def steps(draw):
    R = draw(st.integers(1, 7))
    q_lens = [draw(st.integers(0, 60)) for _ in range(R)]
    contexts = [draw(st.integers(0, 80)) for _ in range(R)]
    return q_lens, contexts, draw(st.integers(0, 90))


def _qsl(q_lens):
    out = [0]
    for n in q_lens:
        out.append(out[-1] + n)
    return out


@settings(max_examples=60, deadline=None)
@given(steps())
def test_plan_step_partitions_requests(case):
    q_lens, contexts, threshold = case
    qsl = _qsl(q_lens)
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    table = torch.arange(len(q_lens) * 3, dtype=torch.int32).view(-1, 3)
    plan = plan_step(qsl, seq_lens, threshold, table)
    groups = {"dense": plan.dense, "fresh": plan.fresh.requests if plan.fresh else [],
              "cont": plan.continued.requests if plan.continued else []}
    assert sorted(sum(groups.values(), [])) == list(range(len(q_lens)))
    for r in range(len(q_lens)):
        sparse = q_lens[r] > 1 and seq_lens[r] >= threshold
        want = "dense" if not sparse else "fresh" if contexts[r] == 0 else "cont"
        assert r in groups[want]
    assert plan.sparse == bool(groups["fresh"] or groups["cont"])
    rows_of = lambda reqs: [i for r in reqs for i in range(qsl[r], qsl[r + 1])]  # noqa: E731
    for g, reqs in ((plan.fresh, groups["fresh"]), (plan.continued, groups["cont"])):
        if g is None:
            continue
        rows = g.rows
        got = list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()
        assert got == rows_of(reqs)
        assert g.cu_seqlens_q.tolist() == _qsl([q_lens[r] for r in reqs])
        assert g.seq_lens_k.tolist() == [seq_lens[r] for r in reqs]
    if plan.continued is not None:
        assert torch.equal(plan.continued.block_table, table[groups["cont"]])
    if plan.dense:
        rows = plan.dense_rows
        got = list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()
        assert got == rows_of(plan.dense)


def test_plan_step_errors():
    with pytest.raises(ValueError, match="query_start_loc must have R \\+ 1 = 3 entries"):
        plan_step([0, 4], [4, 5], 0)
    with pytest.raises(ValueError, match="request 0 has 5 query tokens but 4 keys"):
        plan_step([0, 5], [4], 0)
    with pytest.raises(ValueError, match="continued prefills need the step's block_table"):
        plan_step([0, 4], [9], 0)


# ---------------------------------------------------------------------------------------------------------------
# one planned layer against per-request attention


def _paged(keys, values, k_lens, page, g):
    """Every request's keys and values in shuffled pages of a [pages, page, Hk, D] cache."""
    used = [-(-n // page) for n in k_lens]
    total = sum(used) + 2
    perm = torch.randperm(total, generator=g).tolist()
    kc = torch.randn(total, page, *keys[0].shape[1:], generator=g)
    vc = torch.randn(total, page, *keys[0].shape[1:], generator=g)
    table = torch.zeros(len(k_lens), max(used), dtype=torch.int32)
    at = 0
    for s, n in enumerate(k_lens):
        for j in range(used[s]):
            pg = perm[at]
            at += 1
            table[s, j] = pg
            rows = keys[s][j * page:(j + 1) * page]
            kc[pg, :rows.shape[0]] = rows
            vc[pg, :rows.shape[0]] = values[s][j * page:(j + 1) * page]
    return kc, vc, table


def _dense_reference(q, k, v):
    """Causal attention of the last len(q) of len(k) positions (bottom-right aligned), GQA by repeat."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).float(), v.repeat_interleave(G, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) / math.sqrt(q.shape[-1])
    nq, nk = q.shape[0], k.shape[0]
    mask = torch.arange(nk)[None, :] > (nk - nq + torch.arange(nq))[:, None]
    return torch.einsum("hqk,khd->qhd", torch.softmax(s.masked_fill(mask, float("-inf")), -1), vv)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 70), st.integers(0, 60)), min_size=1, max_size=5),
       st.sampled_from([16, 32]), st.sampled_from([(4, 2), (4, 4), (6, 2)]), st.integers(0, 2**16),
       st.sampled_from([8, 16, 32]))
def test_run_step_equals_per_request_attention(reqs, bs, heads, seed, page):
    g = torch.Generator().manual_seed(seed)
    H, Hk, D = heads[0], heads[1], 16
    settings_ = ts.FlexPrefill(gamma=0.9, tau=0.1, block_size=bs, min_budget=bs, dense_below=40)
    q_lens = [q for q, _ in reqs]
    k_lens = [q + c for q, c in reqs]
    qsl = _qsl(q_lens)
    T = qsl[-1] + 3  # trailing padding rows stay untouched
    query = torch.randn(T, H, D, generator=g)
    keys = [torch.randn(n, Hk, D, generator=g) for n in k_lens]
    values = [torch.randn(n, Hk, D, generator=g) for n in k_lens]
    key = torch.zeros(T, Hk, D)
    value = torch.zeros(T, Hk, D)
    for r, (nq, nk) in enumerate(zip(q_lens, k_lens)):  # the step's own tokens are each request's last nq
        key[qsl[r]:qsl[r + 1]] = keys[r][nk - nq:]
        value[qsl[r]:qsl[r + 1]] = values[r][nk - nq:]
    kc, vc, table = _paged(keys, values, k_lens, page, g)
    plan = plan_step(qsl, k_lens, settings_.dense_threshold, table)
    seen = []

    def dense_forward(q, k, v, out, metadata):
        seen.append(q.shape[0])
        assert metadata is plan.dense_metadata
        at = 0
        for r in plan.dense:
            n = q_lens[r]
            out[at:at + n] = _dense_reference(q[at:at + n], keys[r], values[r])
            at += n

    output = torch.full((T, H, D), 7.0)
    stats = LayerStats()
    run_step(plan, settings_, query, key, value, kc, vc, output, 1 / math.sqrt(D), dense_forward, stats)
    assert torch.equal(output[qsl[-1]:], torch.full((3, H, D), 7.0))
    for r, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        got = output[qsl[r]:qsl[r + 1]]
        if r in plan.dense:
            want = _dense_reference(query[qsl[r]:qsl[r + 1]], keys[r], values[r])
        else:
            want, _ = flex_prefill_attention(query[None, qsl[r]:qsl[r + 1]], keys[r][None], values[r][None],
                                             gamma=0.9, tau=0.1, block_size=bs, min_budget=bs, dense_below=0)
            want = want[0]
        assert torch.allclose(got, want, atol=2e-5, rtol=0), (r, (got - want).abs().max())
    sparse = [r for r in range(len(reqs)) if r not in plan.dense]
    assert stats.sparse_requests == len(sparse) and stats.dense_requests == len(plan.dense)
    assert stats.causal_blocks == sum(causal_block_count(q_lens[r], k_lens[r], bs, H) for r in sparse)
    if sparse:
        assert 0 < int(stats.computed_blocks) <= stats.causal_blocks
    assert sum(seen) == sum(q_lens[r] for r in plan.dense)


# ---------------------------------------------------------------------------------------------------------------
# flex_prefill_varlen


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 90), st.integers(0, 50)), min_size=1, max_size=4),
       st.sampled_from([16, 32, 64]), st.sampled_from([0.5, 0.9, 1.0]), st.integers(0, 2**16))
def test_varlen_equals_per_sequence_flexprefill(seqs, bs, gamma, seed):
    """Packed (fresh prompts: nq == nk) and paged (any context): bit-equal to flex_prefill_attention on each
    sequence alone; the report counts what its patterns hold. (nq >= 2: flex_prefill_attention runs a single
    query dense, the plugin never sends one here.)"""
    g = torch.Generator().manual_seed(seed)
    H, Hk, D = 4, 2, 16
    fp = ts.FlexPrefill(gamma=gamma, tau=0.15, block_size=bs, min_budget=None)
    q_lens = [q for q, _ in seqs]
    k_lens = [q + c for q, c in seqs]
    q = torch.randn(sum(q_lens), H, D, generator=g)
    keys = [torch.randn(n, Hk, D, generator=g) for n in k_lens]
    values = [torch.randn(n, Hk, D, generator=g) for n in k_lens]
    kc, vc, table = _paged(keys, values, k_lens, 16, g)
    out_paged, rep = flex_prefill_varlen(q, q_lens, k_lens, fp, k_cache=kc, v_cache=vc, block_table=table)
    fresh = [n for n in q_lens]
    out_packed, rep_packed = flex_prefill_varlen(
        q, q_lens, fresh, fp, k=torch.cat([k[-n:] for k, n in zip(keys, q_lens)]),
        v=torch.cat([v[-n:] for v, n in zip(values, q_lens)]))
    at = 0
    computed = computed_packed = 0
    for s, (nq, nk) in enumerate(zip(q_lens, k_lens)):
        want, _, pat = flex_prefill_attention(q[None, at:at + nq], keys[s][None], values[s][None], gamma=gamma,
                                              tau=0.15, block_size=bs, dense_below=0, return_pattern=True)
        assert torch.equal(out_paged[at:at + nq], want[0])
        assert torch.equal(rep.is_query_aware[s], pat.is_query_aware[0])
        computed += int(pat.block_cnt.sum())
        want, _, pat = flex_prefill_attention(q[None, at:at + nq], keys[s][None, nk - nq:],
                                              values[s][None, nk - nq:], gamma=gamma, tau=0.15, block_size=bs,
                                              dense_below=0, return_pattern=True)
        assert torch.equal(out_packed[at:at + nq], want[0])
        computed_packed += int(pat.block_cnt.sum())
        at += nq
    assert int(rep.computed_blocks) == computed and int(rep_packed.computed_blocks) == computed_packed
    assert rep.causal_blocks == sum(causal_block_count(a, b, bs, H) for a, b in zip(q_lens, k_lens))


def test_causal_block_count_matches_pattern():
    for nq, nk, bs in ((1, 1, 16), (17, 17, 16), (5, 100, 16), (64, 64, 64), (70, 300, 32)):
        q, k = torch.randn(1, nq, 2, 16), torch.randn(1, nk, 2, 16)
        _, _, pat = flex_prefill_attention(q, k, k, gamma=1.0, block_size=bs, dense_below=0, return_pattern=True)
        assert causal_block_count(nq, nk, bs, 2) == int(pat.causal_blocks().sum()) * 2


def test_varlen_errors():
    fp = ts.FlexPrefill(block_size=16)
    q, k = torch.randn(10, 2, 16), torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="settings must be a FlexPrefill"):
        flex_prefill_varlen(q, [10], [10], object(), k=k, v=k)
    with pytest.raises(ValueError, match="sequence 0 needs ints 1 <= q_len <= k_len"):
        flex_prefill_varlen(q, [10], [9], fp, k=k, v=k)
    with pytest.raises(ValueError, match="q must be \\[total_q=11, H, D\\]"):
        flex_prefill_varlen(q, [11], [11], fp, k=k, v=k)
    with pytest.raises(ValueError, match="give either k and v"):
        flex_prefill_varlen(q, [10], [10], fp)
    with pytest.raises(ValueError, match="block_table must be \\[S=1, max_pages\\]"):
        flex_prefill_varlen(q, [10], [10], fp, k_cache=k[None], v_cache=k[None])
    with pytest.raises(ValueError, match="k and v must be \\[total_k=12, Hk, D\\]"):
        flex_prefill_varlen(q, [10], [12], fp, k=k, v=k)
    assert ops is not None
