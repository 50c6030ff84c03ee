"""WindowKV / SnapKV / PyramidKV policy: budget schedules, the auto rule, pooling, selection, validation.

Pure tensor tests (no transformers model); the HF integration is tested in test_hf_windowkv.py.
"""

import math

import pytest
import torch

from tasksieve import reference as ref
from tasksieve.methods.windowkv import (
    PressState,
    PyramidKV,
    SnapKV,
    StrategyContext,
    WindowKV,
    auto_strategy,
    budget_tokens,
    pool_scores,
    pyramidkv_layer_budgets,
    windowkv_group_budgets,
    windowkv_layer_budgets,
)

# ------------------------------------------------------------------------------------------------------------
# budget schedules vs reference/windowkv.md §1.4 and §3


@pytest.mark.parametrize(
    "capacity, expected",
    [
        (512, [732, 586, 440, 292]),
        (1024, [1463, 1171, 879, 585]),
        (2048, [2926, 2341, 1756, 1170]),
    ],
)
def test_windowkv_group_budgets_llama3(capacity, expected):
    assert windowkv_group_budgets(capacity, 32, 8, 14) == expected


@pytest.mark.parametrize(
    "group, expected",
    [
        (4, [3511, 3024, 2537, 2050, 1563, 1076, 585]),
        (7, [3072, 2390, 1708, 1024]),
        (14, [2048, 2048]),
    ],
)
def test_windowkv_group_budgets_qwen(group, expected):
    assert windowkv_group_budgets(2048, 28, group, 14) == expected


def test_windowkv_group_budgets_single_group_is_uniform():
    assert windowkv_group_budgets(1000, 8, 8, 14) == [1000]
    assert windowkv_group_budgets(1000, 5, 8, 14) == [1000]  # one (short) group
    assert windowkv_layer_budgets(300, 4, 4, 14) == [300] * 4


def test_windowkv_layer_budgets_uneven_groups_and_clamp():
    # L = 28, S = 8: four groups (8, 8, 8, 4 layers); the last, shorter group takes `last`
    per_group = windowkv_group_budgets(2048, 28, 8, 14)
    assert len(per_group) == 4 and per_group[-1] == (2048 * 8) // 14
    per_layer = windowkv_layer_budgets(2048, 28, 8, 14)
    assert len(per_layer) == 28
    assert per_layer[:8] == [per_group[0]] * 8 and per_layer[24:] == [per_group[3]] * 4
    # clamp to the review length
    clamped = windowkv_layer_budgets(2048, 28, 8, 14, review_len=1500)
    assert max(clamped) == 1500 and clamped[-1] == per_group[3]
    # uniform schedule
    assert windowkv_layer_budgets(100, 6, 2, 14, schedule="uniform", review_len=64) == [64] * 6
    # S > 2 beta would make the first group negative: clamped to 0
    assert min(windowkv_group_budgets(100, 64, 32, 14)) == 0


@pytest.mark.parametrize("capacity, first, last", [(512, 983, 53), (1024, 1982, 60), (2048, 3978, 103)])
def test_pyramidkv_budgets_llama3(capacity, first, last):
    b = pyramidkv_layer_budgets(capacity, 32, 8000, 8, 20)
    assert (b[0], b[-1]) == (first, last)
    assert all(x >= y for x, y in zip(b, b[1:]))


def test_pyramidkv_budgets_fallbacks():
    # N <= C: no compression
    assert pyramidkv_layer_budgets(512, 32, 500, 8, 20) is None
    assert pyramidkv_layer_budgets(512, 32, 512, 8, 20) is None
    # C < N < 2 (C - w): plain SnapKV, C - w everywhere
    assert pyramidkv_layer_budgets(512, 32, 900, 8, 20) == [504] * 32
    # max >= N - w: max = N - w, min = 2 (C - w) - max
    # (reachable only when floor((C - w) / beta) <= w, i.e. small C)
    n, c, w = 186, 100, 8
    b = pyramidkv_layer_budgets(c, 32, n, w, 20)
    hi = n - w  # 178 < the unclamped max 180
    lo = 2 * (c - w) - hi  # 6
    step = (hi - lo) // 31
    assert b[0] == hi == 178 and step == 5 and b[-1] == hi - 31 * step == 23
    # one layer: no division by zero
    assert pyramidkv_layer_budgets(100, 1, 1000, 8, 20) == [92]
    # budget smaller than the window: 0 tokens besides the window
    assert pyramidkv_layer_budgets(4, 3, 100, 8, 20) == [0, 0, 0]


def test_budget_tokens():
    assert budget_tokens(0.12, 1000) == 120
    assert budget_tokens(1.0, 37) == 37
    assert budget_tokens(64, 1000) == 64


# ------------------------------------------------------------------------------------------------------------
# the auto rule


def _peaked_inputs(B=2, N=200, H=4, Hk=2, D=16, A=32, hot=(40, 41, 42, 120)):
    # every observation query points along u; a few keys too: attention concentrates on them
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    q = 6.0 * u + 0.1 * torch.randn(B, A, H, D)
    k = 0.1 * torch.randn(B, N, Hk, D)
    for j in hot:
        k[:, j] = 6.0 * u
    return q, k


def test_auto_rule_peaked_chooses_max():
    q, k = _peaked_inputs()
    scores = ref.reference_window_scores(q, k, 8, "mean")
    strategy, stat, per_row = auto_strategy(scores)
    assert strategy == "max"
    assert stat > 0.8 and len(per_row) == 2


def test_auto_rule_flat_chooses_mean():
    B, N, H, Hk, D, A = 2, 200, 4, 2, 16, 32
    q = torch.zeros(B, A, H, D)  # every key equally likely: flat attention
    k = torch.randn(B, N, Hk, D)
    scores = ref.reference_window_scores(q, k, 8, "mean")
    strategy, stat, _ = auto_strategy(scores)
    assert strategy == "mean"
    assert stat < 0.3


def test_auto_rule_edge_cases_and_threshold():
    assert auto_strategy(torch.zeros(1, 2, 1))[0] == "max"  # < 2 windows
    flat = torch.ones(1, 2, 30)
    strategy, stat, _ = auto_strategy(flat, threshold=0.5, top_frac=0.1)
    assert strategy == "mean" and math.isclose(stat, 3 / 29, rel_tol=1e-5)  # window 0 (sink) dropped
    assert auto_strategy(flat, threshold=0.05)[0] == "max"


def test_windowkv_auto_resolves_per_state():
    """The decision is stored in the request state; a second state decides afresh."""
    press = WindowKV(budget=48, window=8, group=2, strategy="auto")
    q, k = _peaked_inputs(B=1)
    keys = k.transpose(1, 2).contiguous()  # [B, Hk, N, D]
    st1 = press.new_state(4)
    press.compress_layer(0, keys, keys.clone(), q, st1)
    assert st1.strategy == "max" and st1.obs_window == 32 and st1.auto_statistic > 0.8
    st2 = press.new_state(4)
    press.compress_layer(0, keys, keys.clone(), torch.zeros_like(q), st2)
    assert st2.strategy == "mean" and st2.obs_window == 16
    assert st1.strategy == "max"  # untouched


def test_windowkv_strategy_callable():
    seen = []

    def decide(ctx: StrategyContext) -> str:
        seen.append(ctx)
        return "mean"

    press = WindowKV(budget=48, window=8, group=2, strategy=decide)
    q, k = _peaked_inputs(B=1)
    keys = k.transpose(1, 2).contiguous()
    st = press.new_state(2)
    press.compress_layer(0, keys, keys, q, st)
    press.compress_layer(1, keys, keys, q, st)
    assert len(seen) == 1 and st.strategy == "mean" and st.obs_window == 16
    assert seen[0].window_scores.dim() == 3 and seen[0].peak_share > 0.8
    bad = WindowKV(budget=48, strategy=lambda ctx: "median")
    with pytest.raises(ValueError, match="callable must return"):
        bad.compress_layer(0, keys, keys, q, bad.new_state(1))


# ------------------------------------------------------------------------------------------------------------
# WindowKV compress_layer against the op references


def test_windowkv_compress_layer_matches_reference_and_groups_share():
    torch.manual_seed(1)
    B, N, H, Hk, D = 2, 150, 4, 2, 16
    press = WindowKV(budget=40, window=8, group=2, strategy="max", schedule="uniform")
    st = press.new_state(3)
    qs = [torch.randn(B, 32, H, D) for _ in range(3)]
    ks = [torch.randn(B, Hk, N, D) for _ in range(3)]
    vs = [torch.randn(B, Hk, N, D) for _ in range(3)]
    outs = [press.compress_layer(i, ks[i], vs[i], qs[i], st) for i in range(3)]
    nw, tail = (N - 32) // 8, N - ((N - 32) // 8) * 8
    s0 = ref.reference_window_scores(qs[0], ks[0].transpose(1, 2), 8, "max")
    idx0 = ref.reference_select_windows(s0, 40 // 8, share=True)
    s2 = ref.reference_window_scores(qs[2], ks[2].transpose(1, 2), 8, "max")
    idx2 = ref.reference_select_windows(s2, 40 // 8, share=True)
    for layer, idx in ((0, idx0), (1, idx0), (2, idx2)):  # layer 1 follows its leader (layer 0)
        ek, ev = ref.reference_gather_windows([ks[layer], vs[layer]], idx, 8, tail)
        assert torch.equal(outs[layer][0], ek) and torch.equal(outs[layer][1], ev)
        assert outs[layer][0].shape == (B, Hk, 5 * 8 + tail, D)
    assert st.kept == {0: 40 + tail, 1: 40 + tail, 2: 40 + tail}
    assert nw > 5


def test_windowkv_budget_covers_prompt_keeps_everything():
    press = WindowKV(budget=1.0, window=8, group=2, strategy="mean")
    k = torch.randn(1, 2, 100, 16)
    st = press.new_state(2)
    out_k, out_v = press.compress_layer(0, k, k, torch.randn(1, 16, 4, 16), st)
    assert out_k is k and st.token_index is None and st.kept[0] == 100


def test_windowkv_per_head_and_token_index():
    torch.manual_seed(2)
    press = WindowKV(budget=24, window=4, group=1, strategy="mean", per_head=True, obs_window=8)
    k = torch.randn(1, 2, 60, 8)
    v = torch.randn(1, 2, 60, 8)
    st = press.new_state(1)
    out_k, _ = press.compress_layer(0, k, v, torch.randn(1, 8, 4, 8), st)
    tok = st.token_index
    assert tok.shape == (1, 2, out_k.shape[2])
    assert torch.equal(out_k, k.gather(2, tok[..., None].expand(-1, -1, -1, 8)))


def test_windowkv_kv_start_masks_padding():
    """Left padding of whole windows changes nothing: same real tokens kept."""
    torch.manual_seed(3)
    H, Hk, D, N, P = 4, 2, 16, 120, 16
    q = torch.randn(1, 32, H, D)
    k = torch.randn(1, Hk, N, D)
    press = WindowKV(budget=40, window=8, group=1, strategy="max")
    st = press.new_state(1)
    alone, _ = press.compress_layer(0, k, k, q, st)
    kp = torch.cat([torch.randn(1, Hk, P, D), k], dim=2)
    stp = press.new_state(1)
    stp.kv_start = torch.tensor([P], dtype=torch.int32)
    padded, _ = press.compress_layer(0, kp, kp, q, stp)
    assert torch.equal(padded, alone)


# ------------------------------------------------------------------------------------------------------------
# SnapKV / PyramidKV


def test_pool_scores_hand_made():
    x = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 5.0, 0.0, 0.0]]])
    assert torch.equal(pool_scores(x, 3, "max"), torch.tensor([[[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 0.0]]]))
    avg = pool_scores(x, 3, "avg")
    assert torch.allclose(avg, torch.tensor([[[1 / 3, 1 / 3, 1 / 3, 5 / 3, 5 / 3, 5 / 3, 0.0]]]))
    assert torch.equal(pool_scores(x, 1, "max"), x)
    assert pool_scores(x, 4, "max").shape == x.shape  # even kernel keeps the length


def test_snapkv_matches_plain_torch():
    torch.manual_seed(4)
    B, N, H, Hk, D, A = 2, 90, 4, 2, 8, 16
    press = SnapKV(budget=40, obs_window=A, kernel=5, pool="max")
    q = torch.randn(B, A, H, D)
    k = torch.randn(B, Hk, N, D)
    v = torch.randn(B, Hk, N, D)
    st = press.new_state(1)
    out_k, out_v = press.compress_layer(0, k, v, q, st)
    # plain-torch SnapKV: observation attention, summed over queries, mean over the group, max-pooled, top-k
    kr = k.repeat_interleave(H // Hk, dim=1)
    logits = torch.einsum("bahd,bhnd->bhan", q, kr) / math.sqrt(D)
    causal = torch.arange(N)[None, :] <= torch.arange(N - A, N)[:, None]
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    tok = probs.sum(2)[..., : N - A].reshape(B, Hk, H // Hk, N - A).mean(2)
    pooled = torch.nn.functional.max_pool1d(tok.reshape(B * Hk, 1, -1), 5, 1, 2).reshape(B, Hk, -1)
    # max pooling copies peaks to their neighbours: equal scores, the lower position wins
    idx = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., : 40 - A].sort(-1).values
    exp_k = torch.cat([k[:, :, : N - A].gather(2, idx[..., None].expand(-1, -1, -1, D)), k[:, :, N - A :]], 2)
    exp_v = torch.cat([v[:, :, : N - A].gather(2, idx[..., None].expand(-1, -1, -1, D)), v[:, :, N - A :]], 2)
    assert torch.equal(out_k, exp_k) and torch.equal(out_v, exp_v)
    assert out_k.shape == (B, Hk, 40, D)
    # N <= C: nothing compressed
    st2 = SnapKV(budget=90, obs_window=A).new_state(1)
    assert SnapKV(budget=90, obs_window=A).compress_layer(0, k, v, q, st2)[0] is k


def test_pyramidkv_layers_follow_budgets():
    torch.manual_seed(5)
    L, B, N, H, Hk, D = 4, 1, 200, 4, 2, 8
    press = PyramidKV(budget=60, obs_window=8)
    st = press.new_state(L)
    for layer in range(L):
        k = torch.randn(B, Hk, N, D)
        out_k, _ = press.compress_layer(layer, k, k, torch.randn(B, 8, H, D), st)
        assert out_k.shape[2] == st.budgets[layer] + 8
    assert st.budgets == pyramidkv_layer_budgets(60, L, N, 8, 20)


# ------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(budget=0.0), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(budget=0), "budget"),
        (dict(budget=-3), "budget"),
        (dict(budget=True), "budget"),
        (dict(budget="10%"), "budget"),
        (dict(window=0), "window"),
        (dict(group=0), "group"),
        (dict(obs_window=0), "obs_window"),
        (dict(strategy="median"), "strategy"),
        (dict(schedule="geometric"), "schedule"),
        (dict(beta=0), "beta"),
        (dict(decode_evict="yes"), "decode_evict"),
        (dict(auto_threshold=0.0), "auto_threshold"),
    ],
)
def test_windowkv_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"WindowKV\.{field}"):
        WindowKV(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (SnapKV, dict(budget=0.0), "budget"),
        (SnapKV, dict(obs_window=0), "obs_window"),
        (SnapKV, dict(kernel=0), "kernel"),
        (SnapKV, dict(pool="min"), "pool"),
        (PyramidKV, dict(beta=-1), "beta"),
        (PyramidKV, dict(budget=2.0), "budget"),
    ],
)
def test_baseline_validation(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**kwargs)


def test_press_state_info_is_plain():
    st = PressState(num_layers=2)
    info = st.info()
    assert info["kept_tokens"] == [None, None] and info["strategy"] is None
